//! CUDA II: LoRA training of the GPU decoder (`cuda_llama::GpuLlama`) in mixed precision. fp16 weights and
//! activations; the LoRA factors of the linear layers (q, k, v, o, gate, up, down, or any subset: a projection
//! without LoRA has no buffers and no LoRA passes) kept as fp32 master weights
//! with fp16 copies for the passes; gradients of one backward pass in fp16, loss-scaled, added into fp32
//! accumulators; dynamic loss scaling (`cuda::LossScaler`: an overflowing step is skipped and the scale halved);
//! gradient clipping on the unscaled norm; AdamW (`kernels/optim.cu`). Every op is a kernel of `kernels/*.cu`
//! (forward and backward) or a cuBLASLt GEMM; the log-probs of the answer are computed one block of rows at a time
//! (`logprob_gather_f16`, `logprob_bwd_f16`), so the softmax over the vocabulary never exists for more than one
//! block. LoRA dropout draws the CPU trainer's masks (`kernels/lora.cu`). Image features come in as input rows
//! (`train_dpo_gpu`, `train_sft_gpu`). `engine/tests/cuda_train.rs` checks the DPO loss and every LoRA gradient
//! against the CPU backend.
//!
//! The image path trains here too when the adapter has LoRA on the vision tower's or the projector's linear layers,
//! or replaces the projector's weights and biases (peft `modules_to_save`, `--train-projector`): each image's
//! features are computed under the current values with the activations kept (`GpuLora::image_forward`), the
//! decoder's backward pass returns the gradient of its input rows, and the image rows' share runs back through the
//! projector and the tower's layers down to the lowest one with LoRA (`image_backward`: layer norms, unmasked
//! attention, activations). Those parameters sit after the decoder's in the same flat buffers, so loss scaling,
//! clipping and AdamW treat them as one (biases without weight decay, as on the CPU).

use crate::adapter::Adapter;
use crate::config::LlamaConfig;
use crate::cuda::{derr, err, to_i32, AdamW, AttnRows, Gpu};
use crate::cuda_llama::{GpuLlama, Input};
use crate::cuda_lora::*;
pub use crate::cuda_lora::{inference_rank, GpuLora, PROJECTIONS};
use crate::error::Result;
use crate::train::dpo::{pair_loss, DpoConfig, PairLogps};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::f16;

/// Answer rows whose logits exist at once.
const LOGIT_BLOCK: usize = 256;

/// What one training step measured.
#[derive(Clone, Debug)]
pub struct StepReport {
    /// The loss (unscaled).
    pub loss: f64,
    pub logps: PairLogps,
    /// The unscaled gradient norm before clipping; None when the step overflowed and was skipped (or when no
    /// optimizer step was asked for).
    pub grad_norm: Option<f64>,
    /// The loss scale the step ran with.
    pub loss_scale: f32,
}

/// Saved activations of one layer for the backward pass.
struct LayerTape {
    x_in: CudaSlice<f16>,
    h1: CudaSlice<f16>,
    /// After RoPE.
    qkv: CudaSlice<f16>,
    att: CudaSlice<f16>,
    lse: CudaSlice<f32>,
    x_mid: CudaSlice<f16>,
    h2: CudaSlice<f16>,
    gu: CudaSlice<f16>,
    act: CudaSlice<f16>,
    /// x A^T of each module (rows, r); None for a projection without LoRA.
    t: Vec<Option<CudaSlice<f16>>>,
    /// The dropout seed the forward pass drew its masks with (None: no dropout); the backward redraws them.
    drop: Option<u64>,
}

/// A chunk of rows after the layers: a shared prompt, or an answer attending one.
struct ChunkTape {
    rows: usize,
    layers: Vec<LayerTape>,
    /// The rows' positions (RoPE).
    pos: CudaSlice<i32>,
    /// The residual stream after the last layer, and after the final norm.
    x_final: CudaSlice<f16>,
    hf: CudaSlice<f16>,
}

/// An answer's forward pass after a shared prompt.
struct AnswerTape {
    chunk: ChunkTape,
    /// The rows that predict the answer's tokens: the prompt's last final-norm row, then the answer's but its last.
    pred: CudaSlice<f16>,
    labels: CudaSlice<i32>,
    lse: CudaSlice<f32>,
    logp_sum: f64,
}

/// One sequence's forward pass, kept for its backward.
struct SeqTape {
    rows: usize,
    answer_start: usize,
    /// Every layer's saved activations; empty with activation recomputation, which keeps `inputs` instead.
    layers: Vec<LayerTape>,
    /// Each layer's input, with activation recomputation (`GpuLora::recompute`).
    inputs: Vec<CudaSlice<f16>>,
    /// Positions 0..rows (RoPE), for recomputing a layer.
    pos: CudaSlice<i32>,
    x_final: CudaSlice<f16>,
    hf: CudaSlice<f16>,
    labels: CudaSlice<i32>,
    lse: CudaSlice<f32>,
    logp_sum: f64,
    /// The forward pass's dropout seed (a recomputed layer draws the same masks).
    drop: Option<u64>,
}

impl GpuLora {
    /// Backward of `lora_fwd`: given dy (columns dy_off.. of rows ldy apart), writes dA and dB into `g16` (added
    /// with `acc`) and adds the LoRA path's input gradient into dx; with the forward's dropout seed, through the
    /// same masks. Nothing for a projection without LoRA.
    #[allow(clippy::too_many_arguments)]
    fn lora_bwd(
        &mut self,
        gpu: &Gpu,
        l: usize,
        j: usize,
        x: &CudaSlice<f16>,
        t: Option<&CudaSlice<f16>>,
        dy: &CudaSlice<f16>,
        dy_off: usize,
        ldy: usize,
        dx: &mut CudaSlice<f16>,
        rows: usize,
        acc: bool,
        drop: Option<u64>,
    ) -> Result<()> {
        if !self.slots[l][j].present {
            return Ok(());
        }
        let t = t.ok_or_else(|| err(format!("no saved x A^T of LoRA layer {l} {}", PROJECTIONS[j])))?;
        let (g, mask) = (self.geom(l, j), self.mask(l, j, drop));
        // Several chunks of one pass (a shared prompt and its answers) add their gradients: beta 1 after the first.
        lora_grads(
            gpu,
            &self.p16,
            &mut self.g16,
            0,
            g,
            x,
            t,
            dy,
            dy_off,
            ldy,
            Some(dx),
            rows,
            if acc { 1.0 } else { 0.0 },
            mask,
        )
    }

    /// The forward pass of `ids` under base + this adapter, saving what the backward needs; the log-probs of
    /// ids[answer_start..] (each predicted from the position before it).
    fn forward(&self, gpu: &Gpu, model: &GpuLlama, ids: &[u32], answer_start: usize) -> Result<SeqTape> {
        self.forward_seq(gpu, model, Input::Ids(ids), ids.get(answer_start..).unwrap_or_default(), answer_start, None)
    }

    /// `forward` of any input (`Input::Embeds`: rows made on the host, e.g. with image features) whose rows
    /// `answer_start..` are the answer tokens `answer`, with LoRA dropout masks drawn from `drop` (None: none).
    #[allow(clippy::too_many_arguments)]
    fn forward_seq(
        &self,
        gpu: &Gpu,
        model: &GpuLlama,
        seq: Input,
        answer: &[u32],
        answer_start: usize,
        drop: Option<u64>,
    ) -> Result<SeqTape> {
        let cfg = &model.cfg;
        // The answer's labels are checked here; the input (ids or rows) by `input_rows`.
        check_labels(cfg, answer)?;
        let (mut x, rows) = self.input_rows(gpu, model, seq)?;
        if answer_start == 0
            || answer_start >= rows
            || rows > model.max_positions
            || answer.len() != rows - answer_start
        {
            return Err(err(format!("training sequence of {rows} positions with {} answer tokens from {answer_start} (needs a prompt, an answer and at most {} positions)", answer.len(), model.max_positions)));
        }
        let c = cfg.hidden_size;
        let eps = cfg.rms_norm_eps as f32;
        let s = &gpu.stream;
        let a = |n: usize| s.alloc_zeros::<f16>(n).map_err(derr);
        let pos: Vec<i32> = (0..rows as i32).collect();
        let dpos = s.clone_htod(&pos).map_err(derr)?;
        let mut layers = Vec::with_capacity(model.layers.len());
        let mut inputs = Vec::new();
        for li in 0..model.layers.len() {
            let tape = self.layer_forward(gpu, model, li, &mut x, &dpos, rows, drop)?;
            if self.recompute {
                // Keep the layer's input only; the backward pass runs the layer again from it.
                inputs.push(tape.x_in);
            } else {
                layers.push(tape);
            }
        }
        let mut hf = a(rows * c)?;
        gpu.rmsnorm_dev(&mut hf, &x, &model.norm, rows, eps)?;
        let (labels, lse, logp_sum) = head_forward(gpu, model, &hf, answer_start - 1, answer)?;
        Ok(SeqTape { rows, answer_start, layers, inputs, pos: dpos, x_final: x, hf, labels, lse, logp_sum, drop })
    }

    /// The rows of `seq` on the device (ids looked up in the embedding table, or host rows uploaded), checked.
    fn input_rows(&self, gpu: &Gpu, model: &GpuLlama, seq: Input) -> Result<(CudaSlice<f16>, usize)> {
        let cfg = &model.cfg;
        let c = cfg.hidden_size;
        let s = &gpu.stream;
        match seq {
            Input::Ids(ids) => {
                if let Some((at, t)) = ids.iter().enumerate().find(|(_, &t)| t as usize >= cfg.vocab_size) {
                    return Err(err(format!(
                        "token id {t} at position {at} is outside the vocabulary of {}",
                        cfg.vocab_size
                    )));
                }
                let ids32: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
                let dids = s.clone_htod(&ids32).map_err(derr)?;
                let mut flag = s.alloc_zeros::<i32>(1).map_err(derr)?;
                let mut x = s.alloc_zeros::<f16>((ids.len() * c).max(1)).map_err(derr)?;
                gpu.embedding_ids_dev(&mut x, &model.embed, c, &dids, ids.len(), &mut flag)?;
                Ok((x, ids.len()))
            }
            Input::Embeds(e) => {
                if !e.len().is_multiple_of(c) {
                    return Err(err(format!(
                        "training input of {} values is not a whole number of rows of {c}",
                        e.len()
                    )));
                }
                if let Some(at) = e.iter().position(|v| !v.is_finite()) {
                    return Err(err(format!("training input value {at} is {}", e[at])));
                }
                Ok((gpu.upload_f16(e)?, e.len() / c))
            }
        }
    }

    /// A shared prompt's forward pass: every layer's tape (its qkv is what the answers attend) and the final rows.
    fn forward_prompt(&self, gpu: &Gpu, model: &GpuLlama, seq: Input) -> Result<ChunkTape> {
        let (mut x, rows) = self.input_rows(gpu, model, seq)?;
        if rows == 0 || rows >= model.max_positions {
            return Err(err(format!("a prompt of {rows} positions (needs 1 to {})", model.max_positions - 1)));
        }
        self.forward_chunk(gpu, model, &mut x, rows, 0, None)
    }

    /// `rows` rows at positions `p0..` through every layer (attending `ctx`'s rows first when given), then the
    /// final norm.
    fn forward_chunk(
        &self,
        gpu: &Gpu,
        model: &GpuLlama,
        x: &mut CudaSlice<f16>,
        rows: usize,
        p0: usize,
        ctx: Option<&ChunkTape>,
    ) -> Result<ChunkTape> {
        let c = model.cfg.hidden_size;
        let s = &gpu.stream;
        let pos: Vec<i32> = (p0..p0 + rows).map(|p| p as i32).collect();
        let dpos = s.clone_htod(&pos).map_err(derr)?;
        let mut layers = Vec::with_capacity(model.layers.len());
        for li in 0..model.layers.len() {
            layers.push(self.layer_forward_ctx(
                gpu,
                model,
                li,
                x,
                &dpos,
                rows,
                ctx.map(|t| &t.layers[li].qkv),
                None,
            )?);
        }
        let mut hf = s.alloc_zeros::<f16>(rows * c).map_err(derr)?;
        gpu.rmsnorm_dev(&mut hf, x, &model.norm, rows, model.cfg.rms_norm_eps as f32)?;
        Ok(ChunkTape { rows, layers, pos: dpos, x_final: x.try_clone().map_err(derr)?, hf })
    }

    /// An answer after a shared prompt: its rows through every layer attending the prompt, and the log-probs of its
    /// tokens (the first predicted by the prompt's last row, each later one by the answer row before it).
    fn forward_answer(
        &self,
        gpu: &Gpu,
        model: &GpuLlama,
        prompt: &ChunkTape,
        seq: Input,
        answer: &[u32],
    ) -> Result<AnswerTape> {
        let cfg = &model.cfg;
        let c = cfg.hidden_size;
        let (mut x, rows) = self.input_rows(gpu, model, seq)?;
        if rows == 0 || rows != answer.len() || prompt.rows + rows > model.max_positions {
            return Err(err(format!(
                "an answer of {rows} rows for {} tokens after a {}-position prompt (at most {} positions)",
                answer.len(),
                prompt.rows,
                model.max_positions
            )));
        }
        check_labels(cfg, answer)?;
        let chunk = self.forward_chunk(gpu, model, &mut x, rows, prompt.rows, Some(prompt))?;
        let s = &gpu.stream;
        let a = |n: usize| s.alloc_zeros::<f16>(n).map_err(derr);
        let mut pred = a(rows * c)?;
        let p = prompt.rows;
        s.memcpy_dtod(&prompt.hf.slice((p - 1) * c..p * c), &mut pred.slice_mut(..c)).map_err(derr)?;
        if rows > 1 {
            s.memcpy_dtod(&chunk.hf.slice(..(rows - 1) * c), &mut pred.slice_mut(c..)).map_err(derr)?;
        }
        let (labels, lse, logp_sum) = head_forward(gpu, model, &pred, 0, answer)?;
        Ok(AnswerTape { chunk, pred, labels, lse, logp_sum })
    }

    /// The backward pass of a prompt and its two answers (`dlogp`: each answer's derivative per token log-prob,
    /// loss-scaled): the answers' head rows and layers, the prompt getting its last row's share of both heads and,
    /// at every layer, the gradients of the keys and values the answers attended; LoRA gradients of all three
    /// added into the accumulators. The same gradients as two whole sequences, from one pass over the prompt.
    /// Returns the gradient of the prompt's input rows (loss-scaled).
    fn backward_shared(
        &mut self,
        gpu: &Gpu,
        model: &GpuLlama,
        prompt: &ChunkTape,
        answers: [(&AnswerTape, f32); 2],
    ) -> Result<CudaSlice<f16>> {
        let cfg = &model.cfg;
        let (c, h, kvh, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let nqkv = (h + 2 * kvh) * hd;
        let eps = cfg.rms_norm_eps as f32;
        let s = gpu.stream.clone();
        let a = |n: usize| s.alloc_zeros::<f16>(n).map_err(derr);
        let p = prompt.rows;
        let mut dlast = a(c)?;
        let mut dxs = Vec::with_capacity(2);
        for (at, dlogp) in answers {
            let rows = at.chunk.rows;
            let mut dpred = a(rows * c)?;
            head_backward(gpu, model, &at.pred, 0, &at.labels, &at.lse, dlogp, &mut dpred)?;
            // Row 0 predicted from the prompt's last row; row i > 0 from answer row i - 1 (the last answer row
            // predicts nothing).
            let mut first = a(c)?;
            s.memcpy_dtod(&dpred.slice(..c), &mut first.slice_mut(..)).map_err(derr)?;
            gpu.residual_add_dev(&mut dlast, &first, c)?;
            let mut dhf = a(rows * c)?;
            if rows > 1 {
                s.memcpy_dtod(&dpred.slice(c..), &mut dhf.slice_mut(..(rows - 1) * c)).map_err(derr)?;
            }
            let mut dx = a(rows * c)?;
            gpu.rmsnorm_bwd_dev(&mut dx, None, &dhf, &at.chunk.x_final, &model.norm, rows, eps)?;
            dxs.push(dx);
        }
        let mut dhf_p = a(p * c)?;
        s.memcpy_dtod(&dlast.slice(..), &mut dhf_p.slice_mut((p - 1) * c..)).map_err(derr)?;
        let mut dx_p = a(p * c)?;
        gpu.rmsnorm_bwd_dev(&mut dx_p, None, &dhf_p, &prompt.x_final, &model.norm, p, eps)?;
        drop(dhf_p);
        for li in (0..model.layers.len()).rev() {
            let mut dctx = a(p * nqkv)?;
            for (k, ((at, _), dx)) in answers.iter().zip(dxs.iter_mut()).enumerate() {
                self.layer_backward(
                    gpu,
                    model,
                    li,
                    &at.chunk.layers[li],
                    dx,
                    at.chunk.rows,
                    &at.chunk.pos,
                    Some((&prompt.layers[li].qkv, &mut dctx)),
                    None,
                    k > 0,
                )?;
            }
            self.layer_backward(
                gpu,
                model,
                li,
                &prompt.layers[li],
                &mut dx_p,
                p,
                &prompt.pos,
                None,
                Some(&dctx),
                true,
            )?;
        }
        gpu.grad_accumulate_dev(&mut self.g32, &self.g16)?;
        Ok(dx_p)
    }

    /// `dpo_pair` with the prompt run once for both answers (`share_prompt`): the prompt's rows go through the
    /// decoder once, each answer attends its keys and values, and the backward pass sums both answers' gradients
    /// into the prompt's. Answers are given as their own input rows and ids.
    #[allow(clippy::too_many_arguments)]
    /// Also returns the gradient of the prompt's input rows (loss-scaled).
    fn dpo_pair_shared(
        &mut self,
        gpu: &Gpu,
        model: &GpuLlama,
        prompt: Input,
        chosen: (Input, &[u32]),
        rejected: (Input, &[u32]),
        refs: (f64, f64),
        cfg: &DpoConfig,
        weight: f64,
    ) -> Result<(f64, PairLogps, Vec<CudaSlice<f16>>)> {
        let pt = self.forward_prompt(gpu, model, prompt)?;
        let tc = self.forward_answer(gpu, model, &pt, chosen.0, chosen.1)?;
        let tr = self.forward_answer(gpu, model, &pt, rejected.0, rejected.1)?;
        let logps = PairLogps {
            policy_chosen: tc.logp_sum,
            policy_rejected: tr.logp_sum,
            ref_chosen: refs.0,
            ref_rejected: refs.1,
        };
        let (loss, d_pc, d_pr) = pair_loss(cfg, &logps, chosen.1.len(), rejected.1.len());
        if !loss.is_finite() {
            return Err(err(format!("the loss is {loss} (log-probs {logps:?})")));
        }
        let scale = self.scaler.scale as f64 * weight;
        let dx = self.backward_shared(gpu, model, &pt, [(&tc, (d_pc * scale) as f32), (&tr, (d_pr * scale) as f32)])?;
        Ok((loss, logps, vec![dx]))
    }

    /// Layer `li`'s forward pass over `x` (rows, hidden), in place, returning what its backward pass needs.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        gpu: &Gpu,
        model: &GpuLlama,
        li: usize,
        x: &mut CudaSlice<f16>,
        dpos: &CudaSlice<i32>,
        rows: usize,
        drop: Option<u64>,
    ) -> Result<LayerTape> {
        self.layer_forward_ctx(gpu, model, li, x, dpos, rows, None, drop)
    }

    /// `layer_forward` of rows that attend a context's keys and values first (`ctx`: a shared prompt's qkv at this
    /// layer, after RoPE) and then their own, causally.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward_ctx(
        &self,
        gpu: &Gpu,
        model: &GpuLlama,
        li: usize,
        x: &mut CudaSlice<f16>,
        dpos: &CudaSlice<i32>,
        rows: usize,
        ctx: Option<&CudaSlice<f16>>,
        drop: Option<u64>,
    ) -> Result<LayerTape> {
        let cfg = &model.cfg;
        let l = &model.layers[li];
        let (c, h, kvh, hd, inter) =
            (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size);
        let nqkv = (h + 2 * kvh) * hd;
        let eps = cfg.rms_norm_eps as f32;
        let s = &gpu.stream;
        let a = |n: usize| s.alloc_zeros::<f16>(n).map_err(derr);
        let x_in = x.try_clone().map_err(derr)?;
        let mut h1 = a(rows * c)?;
        gpu.rmsnorm_dev(&mut h1, x, &l.input_norm, rows, eps)?;
        let mut qkv = a(rows * nqkv)?;
        gpu.linear_device(&h1, &l.qkv, &mut qkv, rows, c, nqkv)?;
        let mut t = Vec::with_capacity(7);
        for j in 0..7 {
            t.push(if self.has_module(li, j) { Some(a(rows * self.r)?) } else { None });
        }
        for (j, off) in [(Q, 0), (K, h * hd), (V, (h + kvh) * hd)] {
            self.lora_fwd(gpu, li, j, &h1, t[j].as_mut(), &mut qkv, off, nqkv, rows, drop)?;
        }
        gpu.rope_strided_dev(&mut qkv, dpos, &model.cos, &model.sin, rows, h + kvh, hd, nqkv)?;
        let mut att = a(rows * h * hd)?;
        let mut lse = s.alloc_zeros::<f32>(rows * h).map_err(derr)?;
        match ctx {
            None => attention_fwd(gpu, cfg, &qkv, &mut att, &mut lse, rows)?,
            Some(cq) => {
                let p = cq.len() / nqkv;
                let mut cat = a((p + rows) * nqkv)?;
                s.memcpy_dtod(&cq.slice(..p * nqkv), &mut cat.slice_mut(..p * nqkv)).map_err(derr)?;
                s.memcpy_dtod(&qkv.slice(..rows * nqkv), &mut cat.slice_mut(p * nqkv..)).map_err(derr)?;
                attention_fwd_at(gpu, cfg, &cat, p, rows, p + rows, &mut att, &mut lse)?;
            }
        }
        let mut tmp = a(rows * c)?;
        gpu.linear_device(&att, &l.o, &mut tmp, rows, h * hd, c)?;
        self.lora_fwd(gpu, li, O, &att, t[O].as_mut(), &mut tmp, 0, c, rows, drop)?;
        gpu.residual_add_dev(x, &tmp, rows * c)?;
        let x_mid = x.try_clone().map_err(derr)?;
        let mut h2 = a(rows * c)?;
        gpu.rmsnorm_dev(&mut h2, x, &l.post_norm, rows, eps)?;
        let mut gu = a(rows * 2 * inter)?;
        gpu.linear_device(&h2, &l.gate_up, &mut gu, rows, c, 2 * inter)?;
        self.lora_fwd(gpu, li, G, &h2, t[G].as_mut(), &mut gu, 0, 2 * inter, rows, drop)?;
        self.lora_fwd(gpu, li, U, &h2, t[U].as_mut(), &mut gu, inter, 2 * inter, rows, drop)?;
        let mut act = a(rows * inter)?;
        gpu.swiglu_fused_dev(&mut act, &gu, rows, inter)?;
        gpu.linear_device(&act, &l.down, &mut tmp, rows, inter, c)?;
        self.lora_fwd(gpu, li, D, &act, t[D].as_mut(), &mut tmp, 0, c, rows, drop)?;
        gpu.residual_add_dev(x, &tmp, rows * c)?;
        Ok(LayerTape { x_in, h1, qkv, att, lse, x_mid, h2, gu, act, t, drop })
    }

    /// The backward pass of `tape` for a loss whose derivative with respect to each answer token's log-prob is
    /// `dlogp` (already multiplied by the loss scale); the LoRA gradients are added into the fp32 accumulators.
    /// Returns the gradient of the input rows (rows, hidden; loss-scaled).
    fn backward(&mut self, gpu: &Gpu, model: &GpuLlama, tape: &SeqTape, dlogp: f32) -> Result<CudaSlice<f16>> {
        let cfg = &model.cfg;
        let rows = tape.rows;
        let c = cfg.hidden_size;
        let eps = cfg.rms_norm_eps as f32;
        let s = gpu.stream.clone();
        let a = |n: usize| s.alloc_zeros::<f16>(n).map_err(derr);
        // The head, one block of answer rows at a time: recompute the logits, turn them into their gradient in
        // place, and multiply back into the hidden rows.
        let mut dhf = a(rows * c)?;
        head_backward(gpu, model, &tape.hf, tape.answer_start - 1, &tape.labels, &tape.lse, dlogp, &mut dhf)?;
        let mut dx = a(rows * c)?;
        gpu.rmsnorm_bwd_dev(&mut dx, None, &dhf, &tape.x_final, &model.norm, rows, eps)?;
        drop(dhf);
        for li in (0..model.layers.len()).rev() {
            let recomputed;
            let lt = match tape.layers.get(li) {
                Some(lt) => lt,
                None => {
                    let mut x = tape
                        .inputs
                        .get(li)
                        .ok_or_else(|| err(format!("no saved input of layer {li}")))?
                        .try_clone()
                        .map_err(derr)?;
                    recomputed = self.layer_forward(gpu, model, li, &mut x, &tape.pos, rows, tape.drop)?;
                    &recomputed
                }
            };
            self.layer_backward(gpu, model, li, lt, &mut dx, rows, &tape.pos, None, None, false)?;
        }
        gpu.grad_accumulate_dev(&mut self.g32, &self.g16)?;
        Ok(dx)
    }

    /// Layer `li`'s backward pass for `rows` rows at positions `pos`: from `dx` (the gradient of the layer's output)
    /// to the gradient of its input (in place), the LoRA gradients written into `g16` (added to it with `acc`).
    /// With `ctx` the rows attended a context's keys and values first (a shared prompt: its qkv at this layer, `P`
    /// rows), and the gradients of those keys and values are added into the context's `dctx` (P rows of qkv
    /// width). `extra` is added to this layer's qkv gradient before RoPE's backward (the prompt's share from the
    /// answers that attended it).
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &mut self,
        gpu: &Gpu,
        model: &GpuLlama,
        li: usize,
        lt: &LayerTape,
        dx: &mut CudaSlice<f16>,
        rows: usize,
        pos: &CudaSlice<i32>,
        ctx: Option<(&CudaSlice<f16>, &mut CudaSlice<f16>)>,
        extra: Option<&CudaSlice<f16>>,
        acc: bool,
    ) -> Result<()> {
        let cfg = &model.cfg;
        let (c, h, kvh, hd, inter) =
            (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size);
        let nqkv = (h + 2 * kvh) * hd;
        let eps = cfg.rms_norm_eps as f32;
        let s = gpu.stream.clone();
        let a = |n: usize| s.alloc_zeros::<f16>(n).map_err(derr);
        let l = &model.layers[li];
        let mut tmp = a(rows * c)?;
        let mut dh = a(rows * c)?;
        // MLP: x_out = x_mid + down(swiglu(gate_up(rmsnorm(x_mid)))).
        let mut dact = a(rows * inter)?;
        gpu.gemm(
            &dx.slice(..),
            c,
            false,
            &l.down.slice(..),
            inter,
            false,
            &mut dact.slice_mut(..),
            inter,
            rows,
            inter,
            c,
            1.0,
            0.0,
        )?;
        self.lora_bwd(gpu, li, D, &lt.act, lt.t[D].as_ref(), dx, 0, c, &mut dact, rows, acc, lt.drop)?;
        let mut dgu = a(rows * 2 * inter)?;
        swiglu_bwd(gpu, &mut dgu, &dact, &lt.gu, rows, inter)?;
        drop(dact);
        gpu.gemm(
            &dgu.slice(..),
            2 * inter,
            false,
            &l.gate_up.slice(..),
            c,
            false,
            &mut dh.slice_mut(..),
            c,
            rows,
            c,
            2 * inter,
            1.0,
            0.0,
        )?;
        self.lora_bwd(gpu, li, G, &lt.h2, lt.t[G].as_ref(), &dgu, 0, 2 * inter, &mut dh, rows, acc, lt.drop)?;
        self.lora_bwd(gpu, li, U, &lt.h2, lt.t[U].as_ref(), &dgu, inter, 2 * inter, &mut dh, rows, acc, lt.drop)?;
        drop(dgu);
        gpu.rmsnorm_bwd_dev(&mut tmp, None, &dh, &lt.x_mid, &l.post_norm, rows, eps)?;
        gpu.residual_add_dev(dx, &tmp, rows * c)?;
        // Attention: x_mid = x_in + o(attention(rope(qkv(rmsnorm(x_in))))).
        let mut datt = a(rows * h * hd)?;
        gpu.gemm(
            &dx.slice(..),
            c,
            false,
            &l.o.slice(..),
            h * hd,
            false,
            &mut datt.slice_mut(..),
            h * hd,
            rows,
            h * hd,
            c,
            1.0,
            0.0,
        )?;
        self.lora_bwd(gpu, li, O, &lt.att, lt.t[O].as_ref(), dx, 0, c, &mut datt, rows, acc, lt.drop)?;
        let mut dqkv = match ctx {
            None => {
                let mut dqkv = a(rows * nqkv)?;
                attention_bwd(gpu, cfg, lt, &datt, &mut dqkv, rows)?;
                dqkv
            }
            Some((ctx_qkv, dctx)) => {
                // Keys and values: the context's rows, then these; the queries are these rows.
                let p = ctx_qkv.len() / nqkv;
                let mut cat = a((p + rows) * nqkv)?;
                s.memcpy_dtod(&ctx_qkv.slice(..p * nqkv), &mut cat.slice_mut(..p * nqkv)).map_err(derr)?;
                s.memcpy_dtod(&lt.qkv.slice(..rows * nqkv), &mut cat.slice_mut(p * nqkv..)).map_err(derr)?;
                let mut dcat = a((p + rows) * nqkv)?;
                attention_bwd_at(gpu, cfg, &cat, &mut dcat, p, rows, p + rows, &lt.att, &lt.lse, &datt)?;
                drop(cat);
                // The context's share (its dq columns are zero: no context row is a query here).
                let mut share = a(p * nqkv)?;
                s.memcpy_dtod(&dcat.slice(..p * nqkv), &mut share.slice_mut(..)).map_err(derr)?;
                gpu.residual_add_dev(dctx, &share, p * nqkv)?;
                let mut dqkv = a(rows * nqkv)?;
                s.memcpy_dtod(&dcat.slice(p * nqkv..), &mut dqkv.slice_mut(..)).map_err(derr)?;
                dqkv
            }
        };
        drop(datt);
        if let Some(e) = extra {
            gpu.residual_add_dev(&mut dqkv, e, rows * nqkv)?;
        }
        rope_bwd(gpu, model, &mut dqkv, pos, rows)?;
        gpu.gemm(
            &dqkv.slice(..),
            nqkv,
            false,
            &l.qkv.slice(..),
            c,
            false,
            &mut dh.slice_mut(..),
            c,
            rows,
            c,
            nqkv,
            1.0,
            0.0,
        )?;
        for (j, off) in [(Q, 0), (K, h * hd), (V, (h + kvh) * hd)] {
            self.lora_bwd(gpu, li, j, &lt.h1, lt.t[j].as_ref(), &dqkv, off, nqkv, &mut dh, rows, acc, lt.drop)?;
        }
        gpu.rmsnorm_bwd_dev(&mut tmp, None, &dh, &lt.x_in, &l.input_norm, rows, eps)?;
        gpu.residual_add_dev(dx, &tmp, rows * c)
    }

    /// Checks the accumulated gradients, then (unless they overflowed) takes one AdamW step with them, unscaled
    /// and clipped to `max_grad_norm`; the accumulators are zeroed either way. Returns the unscaled gradient norm,
    /// None for a skipped step.
    pub fn optimizer_step(&mut self, gpu: &Gpu, opt: &AdamW, max_grad_norm: f64) -> Result<Option<f64>> {
        self.check_trainable()?;
        let sumsq = gpu.sumsq_dev(&self.g32)?;
        match self.scaler.step(sumsq, max_grad_norm) {
            None => {
                gpu.stream.memset_zeros(&mut self.g32).map_err(derr)?;
                Ok(None)
            }
            Some((norm, factor)) => {
                self.steps += 1;
                let (nd, total) = (self.no_decay, self.p32.len());
                gpu.adamw_range(
                    &mut self.p32,
                    &mut self.m,
                    &mut self.v,
                    &mut self.g32,
                    Some(&mut self.p16),
                    0..nd,
                    opt,
                    self.steps,
                    factor,
                )?;
                // Biases trained in full: no weight decay (the CPU trainer's AdamW decays matrices only).
                let plain = AdamW { weight_decay: 0.0, ..*opt };
                gpu.adamw_range(
                    &mut self.p32,
                    &mut self.m,
                    &mut self.v,
                    &mut self.g32,
                    Some(&mut self.p16),
                    nd..total,
                    &plain,
                    self.steps,
                    factor,
                )?;
                Ok(Some(norm))
            }
        }
    }

    /// One DPO pair: forward passes of prompt+chosen and prompt+rejected under base + adapter, the loss of
    /// `crate::train::dpo::pair_loss` against the reference log-probs `refs` (chosen, rejected), both backward
    /// passes (gradients loss-scaled, accumulated), then an optimizer step when `opt` is given (with its clipping
    /// norm). Without `opt` the scaled gradients stay accumulated (`grads`, divided by `scaler.scale`).
    #[allow(clippy::too_many_arguments)]
    pub fn dpo_step(
        &mut self,
        gpu: &Gpu,
        model: &GpuLlama,
        prompt: &[u32],
        chosen: &[u32],
        rejected: &[u32],
        refs: (f64, f64),
        cfg: &DpoConfig,
        opt: Option<(&AdamW, f64)>,
    ) -> Result<StepReport> {
        self.dpo_step_dropout(gpu, model, prompt, chosen, rejected, refs, cfg, opt, None)
    }

    /// `dpo_step` with LoRA dropout (probability `dropout`) drawn from `dropout_seed` as
    /// `train::dpo::pair_forward_backward` draws it for the same seed (None: no dropout).
    #[allow(clippy::too_many_arguments)]
    pub fn dpo_step_dropout(
        &mut self,
        gpu: &Gpu,
        model: &GpuLlama,
        prompt: &[u32],
        chosen: &[u32],
        rejected: &[u32],
        refs: (f64, f64),
        cfg: &DpoConfig,
        opt: Option<(&AdamW, f64)>,
        dropout_seed: Option<u64>,
    ) -> Result<StepReport> {
        self.check_trainable()?;
        if chosen.is_empty() || rejected.is_empty() {
            return Err(err("chosen and rejected answers must not be empty"));
        }
        let scale = self.scaler.scale;
        let seed = dropout_seed.filter(|_| self.dropout > 0.0);
        let (loss, logps, _) = if self.share_prompt && !self.recompute && seed.is_none() {
            self.dpo_pair_shared(
                gpu,
                model,
                Input::Ids(prompt),
                (Input::Ids(chosen), chosen),
                (Input::Ids(rejected), rejected),
                refs,
                cfg,
                1.0,
            )?
        } else {
            let (sc, sr) = ([prompt, chosen].concat(), [prompt, rejected].concat());
            let drops = (crate::train::dpo::part_seed(seed, 1), crate::train::dpo::part_seed(seed, 2));
            self.dpo_pair(
                gpu,
                model,
                (Input::Ids(&sc), chosen, prompt.len()),
                (Input::Ids(&sr), rejected, prompt.len()),
                refs,
                cfg,
                1.0,
                drops,
            )?
        };
        let grad_norm = match opt {
            Some((o, clip)) => self.optimizer_step(gpu, o, clip)?,
            None => None,
        };
        Ok(StepReport { loss, logps, grad_norm, loss_scale: scale })
    }

    /// Forward and backward passes of one pair, each answer given as (input rows, answer ids, first answer row);
    /// the gradients of `weight` times the pair's loss are added to the accumulators (loss-scaled). Returns the
    /// loss (unweighted, unscaled) and the log-probs.
    #[allow(clippy::too_many_arguments)]
    /// Also returns the gradients of both sequences' input rows (loss-scaled).
    fn dpo_pair(
        &mut self,
        gpu: &Gpu,
        model: &GpuLlama,
        chosen: (Input, &[u32], usize),
        rejected: (Input, &[u32], usize),
        refs: (f64, f64),
        cfg: &DpoConfig,
        weight: f64,
        drops: (Option<u64>, Option<u64>),
    ) -> Result<(f64, PairLogps, Vec<CudaSlice<f16>>)> {
        let tc = self.forward_seq(gpu, model, chosen.0, chosen.1, chosen.2, drops.0)?;
        let tr = self.forward_seq(gpu, model, rejected.0, rejected.1, rejected.2, drops.1)?;
        let logps = PairLogps {
            policy_chosen: tc.logp_sum,
            policy_rejected: tr.logp_sum,
            ref_chosen: refs.0,
            ref_rejected: refs.1,
        };
        let (loss, d_pc, d_pr) = pair_loss(cfg, &logps, chosen.1.len(), rejected.1.len());
        if !loss.is_finite() {
            return Err(err(format!("the loss is {loss} (log-probs {logps:?})")));
        }
        let scale = self.scaler.scale as f64 * weight;
        let dc = self.backward(gpu, model, &tc, (d_pc * scale) as f32)?;
        drop(tc);
        let dr = self.backward(gpu, model, &tr, (d_pr * scale) as f32)?;
        Ok((loss, logps, vec![dc, dr]))
    }

    /// One SFT example: the mean negative log-likelihood of `answer` after `prompt`, its backward pass and an
    /// optimizer step when `opt` is given. Returns the loss.
    pub fn sft_step(
        &mut self,
        gpu: &Gpu,
        model: &GpuLlama,
        prompt: &[u32],
        answer: &[u32],
        opt: Option<(&AdamW, f64)>,
    ) -> Result<(f64, Option<f64>)> {
        self.check_trainable()?;
        if answer.is_empty() {
            return Err(err("the answer must not be empty"));
        }
        let t = self.forward(gpu, model, &[prompt, answer].concat(), prompt.len())?;
        let n = answer.len() as f64;
        let loss = -t.logp_sum / n;
        self.backward(gpu, model, &t, (-1.0 / n * self.scaler.scale as f64) as f32)?;
        drop(t);
        let norm = match opt {
            Some((o, clip)) => self.optimizer_step(gpu, o, clip)?,
            None => None,
        };
        Ok((loss, norm))
    }

    /// Summed log-prob of `answer` after `prompt` under base + adapter (no tape kept).
    pub fn answer_logp(&self, gpu: &Gpu, model: &GpuLlama, prompt: &[u32], answer: &[u32]) -> Result<f64> {
        Ok(self.forward(gpu, model, &[prompt, answer].concat(), prompt.len())?.logp_sum)
    }
}

/// The image path's forward pass under the adapter's image-path LoRA (`GpuLora::image_forward`), kept for its
/// backward.
pub(crate) struct ImageTape {
    /// Tokens of the tower (patches and the class token).
    t: usize,
    /// The lowest tower layer with LoRA; the layers before it keep no tape (nothing below it is trained).
    first: usize,
    layers: Vec<ImageLayerTape>,
    /// The projector's input rows, its first layer's output before and after the activation, and x A^T of its
    /// two layers' LoRA.
    sel: CudaSlice<f16>,
    p1: CudaSlice<f16>,
    pa: CudaSlice<f16>,
    proj_t: [Option<CudaSlice<f16>>; 2],
    /// The projected features (rows, text hidden).
    pub(crate) features: CudaSlice<f16>,
    pub(crate) rows: usize,
    drop: Option<u64>,
}

/// One tower layer's saved activations.
struct ImageLayerTape {
    x_in: CudaSlice<f16>,
    h1: CudaSlice<f16>,
    q: CudaSlice<f16>,
    k: CudaSlice<f16>,
    v: CudaSlice<f16>,
    att: CudaSlice<f16>,
    lse: CudaSlice<f32>,
    x_mid: CudaSlice<f16>,
    h2: CudaSlice<f16>,
    /// fc1's output before and after the activation.
    fpre: CudaSlice<f16>,
    fact: CudaSlice<f16>,
    /// x A^T of q, k, v, out_proj, fc1, fc2 (None: no LoRA there).
    t: [Option<CudaSlice<f16>>; 6],
}

fn act_bwd_kernel(a: crate::config::Activation) -> Result<&'static str> {
    match a {
        crate::config::Activation::Gelu => Ok("gelu_bwd_f16"),
        crate::config::Activation::QuickGelu => Ok("quick_gelu_bwd_f16"),
        other => Err(err(format!("the GPU image path has no backward kernel for the activation {other:?}"))),
    }
}

impl GpuLora {
    /// The image-path module named `name`, if this copy trains it.
    fn image_slot(&self, name: &str) -> Option<&ImageSlot> {
        self.image.iter().find(|sl| sl.name == name)
    }

    /// The weight (`weight`) or bias of image-path layer `layer` this copy trains in full, if it does.
    fn image_param(&self, layer: &str, weight: bool) -> Option<&ImageParam> {
        self.image_params.iter().find(|p| p.layer == layer && p.weight == weight)
    }

    /// The weight image-path layer `lin` runs with: the one this copy trains, or the model's.
    fn image_weight<'a>(&'a self, lin: &'a crate::cuda_clip::Lin) -> cudarc::driver::CudaView<'a, f16> {
        match self.image_param(&lin.name, true) {
            Some(pp) => self.p16.slice(pp.at..pp.at + pp.len),
            None => lin.w.slice(..),
        }
    }

    fn image_geom(sl: &ImageSlot) -> Geom {
        Geom { a: sl.a, b: sl.b, n_in: sl.n_in, n_out: sl.n_out, r: sl.r, scale: sl.scale }
    }

    fn image_mask(&self, sl: &ImageSlot, drop: Option<u64>) -> Option<(u64, f64)> {
        drop.filter(|_| self.dropout > 0.0).map(|seed| (seed ^ sl.mask_offset, self.dropout))
    }

    /// y = x W^T + b of a linear layer of the image path, plus its LoRA when this copy trains one there (x dropped
    /// out under `drop`); returns x A^T for the backward.
    fn image_linear(
        &self,
        gpu: &Gpu,
        lin: &crate::cuda_clip::Lin,
        x: &CudaSlice<f16>,
        y: &mut CudaSlice<f16>,
        rows: usize,
        drop: Option<u64>,
    ) -> Result<Option<CudaSlice<f16>>> {
        gpu.gemm(
            &x.slice(..),
            lin.n_in,
            false,
            &self.image_weight(lin),
            lin.n_in,
            true,
            &mut y.slice_mut(..),
            lin.n_out,
            rows,
            lin.n_out,
            lin.n_in,
            1.0,
            0.0,
        )?;
        match self.image_param(&lin.name, false) {
            Some(pp) => crate::cuda_clip::bias_add(gpu, y, &self.p16.slice(pp.at..pp.at + pp.len), rows, lin.n_out)?,
            None => {
                if let Some(b) = &lin.b {
                    crate::cuda_clip::bias_add(gpu, y, &b.slice(..), rows, lin.n_out)?;
                }
            }
        }
        let Some(sl) = self.image_slot(&lin.name) else { return Ok(None) };
        let mut t = gpu.stream.alloc_zeros::<f16>(rows * sl.r).map_err(derr)?;
        lora_apply(gpu, &self.p16, Self::image_geom(sl), x, &mut t, y, 0, lin.n_out, rows, self.image_mask(sl, drop))?;
        Ok(Some(t))
    }

    /// Backward of `image_linear` from dy: dx = dy W (added into dx with `acc`), plus the LoRA path's share, whose
    /// factor gradients go into `g16_img`. `dx` None: the input gradient is not needed.
    #[allow(clippy::too_many_arguments)]
    fn image_linear_bwd(
        &mut self,
        gpu: &Gpu,
        lin: &crate::cuda_clip::Lin,
        x: &CudaSlice<f16>,
        t: Option<&CudaSlice<f16>>,
        dy: &CudaSlice<f16>,
        mut dx: Option<&mut CudaSlice<f16>>,
        rows: usize,
        acc: bool,
        drop: Option<u64>,
    ) -> Result<()> {
        if let Some(dx) = dx.as_deref_mut() {
            gpu.gemm(
                &dy.slice(..),
                lin.n_out,
                false,
                &self.image_weight(lin),
                lin.n_in,
                false,
                &mut dx.slice_mut(..),
                lin.n_in,
                rows,
                lin.n_in,
                lin.n_out,
                1.0,
                if acc { 1.0 } else { 0.0 },
            )?;
        }
        // A weight trained in full: dW = dy^T x (the input before any LoRA dropout); a bias: the column sums of dy.
        let base = self.dec_total;
        if let Some(pp) = self.image_param(&lin.name, true).cloned() {
            gpu.gemm(
                &dy.slice(..),
                lin.n_out,
                true,
                &x.slice(..),
                lin.n_in,
                false,
                &mut self.g16_img.slice_mut(pp.at - base..pp.at - base + pp.len),
                lin.n_in,
                lin.n_out,
                lin.n_in,
                rows,
                1.0,
                0.0,
            )?;
        }
        if let Some(pp) = self.image_param(&lin.name, false).cloned() {
            let ones = gpu.upload_f16(&vec![1.0f32; rows])?;
            gpu.gemm(
                &ones.slice(..),
                rows,
                false,
                &dy.slice(..),
                lin.n_out,
                false,
                &mut self.g16_img.slice_mut(pp.at - base..pp.at - base + pp.len),
                lin.n_out,
                1,
                lin.n_out,
                rows,
                1.0,
                0.0,
            )?;
        }
        let Some(sl) = self.image_slot(&lin.name).cloned() else { return Ok(()) };
        let t = t.ok_or_else(|| err(format!("no saved x A^T of {}", lin.name)))?;
        let mask = self.image_mask(&sl, drop);
        // Each image-path module runs once per image: its gradients overwrite the last image's.
        lora_grads(
            gpu,
            &self.p16,
            &mut self.g16_img,
            self.dec_total,
            Self::image_geom(&sl),
            x,
            t,
            dy,
            0,
            lin.n_out,
            dx,
            rows,
            0.0,
            mask,
        )
    }

    /// The image path's forward pass for preprocessed pixels under base + this copy's image-path LoRA (dropout
    /// masks from `drop`, as the CPU trainer's image part draws them), keeping what `image_backward` needs.
    pub(crate) fn image_forward(
        &self,
        gpu: &Gpu,
        vision: &crate::cuda_clip::GpuVision,
        pixels: &[f32],
        drop: Option<u64>,
    ) -> Result<ImageTape> {
        use crate::cuda_clip::{act_kernel, activation_dev, layernorm_dev};
        let cfg = &vision.cfg;
        let (d, inter, heads) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads);
        let eps = cfg.layer_norm_eps as f32;
        let st = &gpu.stream;
        let a = |n: usize| st.alloc_zeros::<f16>(n).map_err(derr);
        let act = act_kernel(cfg.hidden_act).ok_or_else(|| err("vision activation"))?;
        let (mut x, t) = vision.embed(gpu, pixels)?;
        let trained = |lin: &crate::cuda_clip::Lin| {
            self.image_slot(&lin.name).is_some() || self.image_params.iter().any(|p| p.layer == lin.name)
        };
        let first = vision
            .layers
            .iter()
            .position(|l| [&l.q, &l.k, &l.v, &l.o, &l.fc1, &l.fc2].into_iter().any(trained))
            .unwrap_or(vision.layers.len());
        let mut layers = Vec::new();
        for (li, l) in vision.layers.iter().enumerate() {
            // Below the lowest trained layer nothing is kept.
            let keep = li >= first;
            let x_in = if keep { Some(x.try_clone().map_err(derr)?) } else { None };
            let mut h1 = a(t * d)?;
            layernorm_dev(gpu, &mut h1, &x, &l.ln1, t, d, eps)?;
            let (mut q, mut k, mut v) = (a(t * d)?, a(t * d)?, a(t * d)?);
            let tq = self.image_linear(gpu, &l.q, &h1, &mut q, t, drop)?;
            let tk = self.image_linear(gpu, &l.k, &h1, &mut k, t, drop)?;
            let tv = self.image_linear(gpu, &l.v, &h1, &mut v, t, drop)?;
            let mut att = a(t * d)?;
            let mut lse = st.alloc_zeros::<f32>(t * heads).map_err(derr)?;
            gpu.attention_prefill_strided_dev(
                &mut att,
                Some(&mut lse),
                &q,
                d,
                &k,
                &v,
                t,
                t,
                heads,
                heads,
                cfg.head_dim(),
                false,
            )?;
            let mut tmp = a(t * d)?;
            let to = self.image_linear(gpu, &l.o, &att, &mut tmp, t, drop)?;
            gpu.residual_add_dev(&mut x, &tmp, t * d)?;
            let x_mid = if keep { Some(x.try_clone().map_err(derr)?) } else { None };
            let mut h2 = a(t * d)?;
            layernorm_dev(gpu, &mut h2, &x, &l.ln2, t, d, eps)?;
            let mut fpre = a(t * inter)?;
            let tf1 = self.image_linear(gpu, &l.fc1, &h2, &mut fpre, t, drop)?;
            let mut fact = fpre.try_clone().map_err(derr)?;
            activation_dev(gpu, act, &mut fact, t * inter)?;
            let tf2 = self.image_linear(gpu, &l.fc2, &fact, &mut tmp, t, drop)?;
            gpu.residual_add_dev(&mut x, &tmp, t * d)?;
            if let (Some(x_in), Some(x_mid)) = (x_in, x_mid) {
                layers.push(ImageLayerTape {
                    x_in,
                    h1,
                    q,
                    k,
                    v,
                    att,
                    lse,
                    x_mid,
                    h2,
                    fpre,
                    fact,
                    t: [tq, tk, tv, to, tf1, tf2],
                });
            }
        }
        let (row0, rows) = vision.selected(t);
        let ct = vision.proj1.n_out;
        let mut sel = a(rows * d)?;
        st.memcpy_dtod(&x.slice(row0 * d..t * d), &mut sel.slice_mut(..)).map_err(derr)?;
        let mut p1 = a(rows * ct)?;
        let t1 = self.image_linear(gpu, &vision.proj1, &sel, &mut p1, rows, drop)?;
        let mut pa = p1.try_clone().map_err(derr)?;
        activation_dev(
            gpu,
            act_kernel(vision.proj_act).ok_or_else(|| err("projector activation"))?,
            &mut pa,
            rows * ct,
        )?;
        let mut features = a(rows * ct)?;
        let t2 = self.image_linear(gpu, &vision.proj2, &pa, &mut features, rows, drop)?;
        Ok(ImageTape { t, first, layers, sel, p1, pa, proj_t: [t1, t2], features, rows, drop })
    }

    /// Backward of `image_forward` from the features' gradient `dfeat` (rows, text hidden; loss-scaled): the
    /// image path's LoRA gradients, added into the fp32 accumulators.
    pub(crate) fn image_backward(
        &mut self,
        gpu: &Gpu,
        vision: &crate::cuda_clip::GpuVision,
        tape: &ImageTape,
        dfeat: &CudaSlice<f16>,
    ) -> Result<()> {
        let cfg = &vision.cfg;
        let (d, inter, heads) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads);
        let eps = cfg.layer_norm_eps as f32;
        let st = gpu.stream.clone();
        let a = |n: usize| st.alloc_zeros::<f16>(n).map_err(derr);
        let (t, rows, dseed) = (tape.t, tape.rows, tape.drop);
        let ct = vision.proj1.n_out;
        // The projector: features = linear_2(act(linear_1(sel))).
        let mut dpa = a(rows * ct)?;
        self.image_linear_bwd(
            gpu,
            &vision.proj2,
            &tape.pa,
            tape.proj_t[1].as_ref(),
            dfeat,
            Some(&mut dpa),
            rows,
            false,
            dseed,
        )?;
        let mut dp1 = a(rows * ct)?;
        gpu.activation_bwd_dev(act_bwd_kernel(vision.proj_act)?, &mut dp1, &dpa, &tape.p1, rows * ct)?;
        drop(dpa);
        let tower = tape.first < vision.layers.len();
        let mut dsel = if tower { Some(a(rows * d)?) } else { None };
        self.image_linear_bwd(
            gpu,
            &vision.proj1,
            &tape.sel,
            tape.proj_t[0].as_ref(),
            &dp1,
            dsel.as_mut(),
            rows,
            false,
            dseed,
        )?;
        if let Some(dsel) = dsel {
            // The tower's output rows the projector read get their gradient; the rest (the class token's) none.
            let mut dx = a(t * d)?;
            let (row0, _) = vision.selected(t);
            st.memcpy_dtod(&dsel.slice(..), &mut dx.slice_mut(row0 * d..(row0 + rows) * d)).map_err(derr)?;
            let act = act_bwd_kernel(cfg.hidden_act)?;
            for li in (tape.first..vision.layers.len()).rev() {
                let (l, lt) = (&vision.layers[li], &tape.layers[li - tape.first]);
                // MLP: x_out = x_mid + fc2(act(fc1(ln2(x_mid)))).
                let mut dfact = a(t * inter)?;
                self.image_linear_bwd(gpu, &l.fc2, &lt.fact, lt.t[5].as_ref(), &dx, Some(&mut dfact), t, false, dseed)?;
                let mut dfpre = a(t * inter)?;
                gpu.activation_bwd_dev(act, &mut dfpre, &dfact, &lt.fpre, t * inter)?;
                drop(dfact);
                let mut dh = a(t * d)?;
                self.image_linear_bwd(gpu, &l.fc1, &lt.h2, lt.t[4].as_ref(), &dfpre, Some(&mut dh), t, false, dseed)?;
                let mut tmp = a(t * d)?;
                gpu.layernorm_bwd_dx_dev(&mut tmp, &dh, &lt.x_mid, &l.ln2.0, t, d, eps)?;
                gpu.residual_add_dev(&mut dx, &tmp, t * d)?;
                // Attention: x_mid = x_in + out_proj(attention(q, k, v of ln1(x_in))), no mask.
                let mut datt = a(t * d)?;
                self.image_linear_bwd(gpu, &l.o, &lt.att, lt.t[3].as_ref(), &dx, Some(&mut datt), t, false, dseed)?;
                let (mut dq, mut dk, mut dv) = (a(t * d)?, a(t * d)?, a(t * d)?);
                gpu.attention_bwd_dev(
                    &mut dq,
                    &mut dk,
                    &mut dv,
                    &lt.q,
                    &lt.k,
                    &lt.v,
                    &lt.att,
                    &lt.lse,
                    &datt,
                    t,
                    t,
                    heads,
                    heads,
                    cfg.head_dim(),
                    false,
                )?;
                drop(datt);
                // The lowest trained layer needs no input gradient.
                let below = li > tape.first;
                let mut dh1 = if below { Some(a(t * d)?) } else { None };
                self.image_linear_bwd(gpu, &l.q, &lt.h1, lt.t[0].as_ref(), &dq, dh1.as_mut(), t, false, dseed)?;
                self.image_linear_bwd(gpu, &l.k, &lt.h1, lt.t[1].as_ref(), &dk, dh1.as_mut(), t, true, dseed)?;
                self.image_linear_bwd(gpu, &l.v, &lt.h1, lt.t[2].as_ref(), &dv, dh1.as_mut(), t, true, dseed)?;
                if let Some(dh1) = dh1 {
                    gpu.layernorm_bwd_dx_dev(&mut tmp, &dh1, &lt.x_in, &l.ln1.0, t, d, eps)?;
                    gpu.residual_add_dev(&mut dx, &tmp, t * d)?;
                }
            }
        }
        let base = self.dec_total;
        gpu.grad_accumulate_at(&mut self.g32, base, &self.g16_img)
    }

    /// `image_backward` from the decoder's input-row gradients `dxs` of one example (each holding the image's
    /// feature rows from row `row0`; a shared prompt gives one, two whole sequences two), summed.
    fn image_backward_from_rows(
        &mut self,
        gpu: &Gpu,
        vision: &crate::cuda_clip::GpuVision,
        tape: &ImageTape,
        dxs: &[CudaSlice<f16>],
        row0: usize,
        c: usize,
    ) -> Result<()> {
        let n = tape.rows * c;
        let st = gpu.stream.clone();
        let mut dfeat = st.alloc_zeros::<f16>(n).map_err(derr)?;
        let mut part = st.alloc_zeros::<f16>(n).map_err(derr)?;
        for dx in dxs {
            if dx.len() < (row0 * c) + n {
                return Err(err(format!(
                    "the decoder's input gradient has {} rows, the image's features end at row {}",
                    dx.len() / c,
                    row0 + tape.rows
                )));
            }
            st.memcpy_dtod(&dx.slice(row0 * c..row0 * c + n), &mut part.slice_mut(..)).map_err(derr)?;
            gpu.residual_add_dev(&mut dfeat, &part, n)?;
        }
        self.image_backward(gpu, vision, tape, &dfeat)
    }
}

/// An answer's tokens must be ids of the vocabulary (they index the logits).
fn check_labels(cfg: &LlamaConfig, answer: &[u32]) -> Result<()> {
    match answer.iter().enumerate().find(|(_, &t)| t as usize >= cfg.vocab_size) {
        Some((at, t)) => Err(err(format!("answer token {t} at {at} is outside the vocabulary of {}", cfg.vocab_size))),
        None => Ok(()),
    }
}

/// The log-probs of `answer` under the head: rows `first..` of the final-norm output `hf` each predict the next
/// answer token, one block of rows at a time (the softmax over the vocabulary never exists for more rows). Returns
/// the labels and each row's log-sum-exp on the device (for `head_backward`) and the summed log-prob.
fn head_forward(
    gpu: &Gpu,
    model: &GpuLlama,
    hf: &CudaSlice<f16>,
    first: usize,
    answer: &[u32],
) -> Result<(CudaSlice<i32>, CudaSlice<f32>, f64)> {
    let (c, vocab) = (model.cfg.hidden_size, model.cfg.vocab_size);
    let n = answer.len();
    let s = &gpu.stream;
    let labels = s.clone_htod(&answer.iter().map(|&t| t as i32).collect::<Vec<i32>>()).map_err(derr)?;
    let logp = s.alloc_zeros::<f32>(n).map_err(derr)?;
    let lse = s.alloc_zeros::<f32>(n).map_err(derr)?;
    let mut logits = s.alloc_zeros::<f16>(LOGIT_BLOCK.min(n) * vocab).map_err(derr)?;
    let v32 = to_i32(vocab, "vocab")?;
    for b0 in (0..n).step_by(LOGIT_BLOCK) {
        let nb = LOGIT_BLOCK.min(n - b0);
        gpu.gemm(
            &hf.slice((first + b0) * c..),
            c,
            false,
            &model.head().slice(..),
            c,
            true,
            &mut logits.slice_mut(..),
            vocab,
            nb,
            vocab,
            c,
            1.0,
            0.0,
        )?;
        let (po, lo, yo) = (gpu.dptr(&logp, b0), gpu.dptr(&lse, b0), gpu.dptr(&labels, b0));
        let mut b = s.launch_builder(gpu.f("logprob_gather_f16")?);
        b.arg(&po).arg(&lo).arg(&logits).arg(&yo).arg(&v32);
        unsafe { b.launch(LaunchConfig { grid_dim: (nb as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }
            .map_err(derr)?;
    }
    let logp_sum = s.clone_dtoh(&logp).map_err(derr)?.iter().map(|&v| v as f64).sum();
    Ok((labels, lse, logp_sum))
}

/// Backward of `head_forward` for a loss whose derivative with respect to each token's log-prob is `dlogp`: the
/// logits recomputed a block at a time, turned into their gradient in place, and multiplied back into rows
/// `first..` of `dhf` (assigned).
#[allow(clippy::too_many_arguments)]
fn head_backward(
    gpu: &Gpu,
    model: &GpuLlama,
    hf: &CudaSlice<f16>,
    first: usize,
    labels: &CudaSlice<i32>,
    lse: &CudaSlice<f32>,
    dlogp: f32,
    dhf: &mut CudaSlice<f16>,
) -> Result<()> {
    let (c, vocab) = (model.cfg.hidden_size, model.cfg.vocab_size);
    let n = labels.len();
    let s = &gpu.stream;
    let dl = s.clone_htod(&vec![dlogp; n]).map_err(derr)?;
    let mut logits = s.alloc_zeros::<f16>(LOGIT_BLOCK.min(n) * vocab).map_err(derr)?;
    let v32 = to_i32(vocab, "vocab")?;
    for b0 in (0..n).step_by(LOGIT_BLOCK) {
        let nb = LOGIT_BLOCK.min(n - b0);
        let row = (first + b0) * c;
        gpu.gemm(
            &hf.slice(row..),
            c,
            false,
            &model.head().slice(..),
            c,
            true,
            &mut logits.slice_mut(..),
            vocab,
            nb,
            vocab,
            c,
            1.0,
            0.0,
        )?;
        let (lo, yo, wo) = (gpu.dptr(lse, b0), gpu.dptr(labels, b0), gpu.dptr(&dl, b0));
        let mut b = s.launch_builder(gpu.f("logprob_bwd_f16")?);
        b.arg(&mut logits).arg(&lo).arg(&yo).arg(&wo).arg(&v32);
        unsafe { b.launch(LaunchConfig { grid_dim: (nb as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }
            .map_err(derr)?;
        gpu.gemm(
            &logits.slice(..),
            vocab,
            false,
            &model.head().slice(..),
            c,
            false,
            &mut dhf.slice_mut(row..),
            c,
            nb,
            c,
            vocab,
            1.0,
            0.0,
        )?;
    }
    Ok(())
}

/// Causal attention of a fused QKV buffer (after RoPE) into `att`, saving each row's log-sum-exp.
fn attention_fwd(
    gpu: &Gpu,
    cfg: &LlamaConfig,
    qkv: &CudaSlice<f16>,
    att: &mut CudaSlice<f16>,
    lse: &mut CudaSlice<f32>,
    rows: usize,
) -> Result<()> {
    attention_fwd_at(gpu, cfg, qkv, 0, rows, rows, att, lse)
}

/// Causal attention of the `n_q` query rows of `qkv` from row `q_row` on, over its first `n_k` rows' keys and
/// values (the queries are the last `n_q` positions of the `n_k`).
#[allow(clippy::too_many_arguments)]
fn attention_fwd_at(
    gpu: &Gpu,
    cfg: &LlamaConfig,
    qkv: &CudaSlice<f16>,
    q_row: usize,
    n_q: usize,
    n_k: usize,
    att: &mut CudaSlice<f16>,
    lse: &mut CudaSlice<f32>,
) -> Result<()> {
    let (h, kvh, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let nqkv = (h + 2 * kvh) * hd;
    if qkv.len() < n_k * nqkv || q_row + n_q > n_k {
        return Err(err(format!("attention: {n_q} queries from row {q_row} over {n_k} keys exceed the buffers")));
    }
    gpu.attention_fwd_at(att, Some(lse), fused_rows(gpu, cfg, qkv, q_row), n_q, n_k, h, kvh, hd, true)
}

/// q (from row `q_row`), k and v (from row 0) of a fused QKV buffer.
fn fused_rows(gpu: &Gpu, cfg: &LlamaConfig, qkv: &CudaSlice<f16>, q_row: usize) -> AttnRows {
    let (h, kvh, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let nqkv = (h + 2 * kvh) * hd;
    AttnRows {
        q: gpu.dptr(qkv, q_row * nqkv),
        k: gpu.dptr(qkv, h * hd),
        v: gpu.dptr(qkv, (h + kvh) * hd),
        q_stride: nqkv,
        kv_stride: nqkv,
    }
}

/// Backward of `attention_fwd`: dq, dk, dv written into the fused `dqkv` (before RoPE's backward).
fn attention_bwd(
    gpu: &Gpu,
    cfg: &LlamaConfig,
    lt: &LayerTape,
    datt: &CudaSlice<f16>,
    dqkv: &mut CudaSlice<f16>,
    rows: usize,
) -> Result<()> {
    attention_bwd_at(gpu, cfg, &lt.qkv, dqkv, 0, rows, rows, &lt.att, &lt.lse, datt)
}

/// Backward of `attention_fwd_at`: dq of the `n_q` query rows (into `dqkv` from row `q_row`) and dk, dv of all `n_k`
/// key rows (into `dqkv`'s k and v columns from row 0), given the forward's output `att` and log-sum-exp.
#[allow(clippy::too_many_arguments)]
fn attention_bwd_at(
    gpu: &Gpu,
    cfg: &LlamaConfig,
    qkv: &CudaSlice<f16>,
    dqkv: &mut CudaSlice<f16>,
    q_row: usize,
    n_q: usize,
    n_k: usize,
    att: &CudaSlice<f16>,
    lse: &CudaSlice<f32>,
    datt: &CudaSlice<f16>,
) -> Result<()> {
    let (h, kvh, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let nqkv = (h + 2 * kvh) * hd;
    if qkv.len() < n_k * nqkv || dqkv.len() < n_k * nqkv || q_row + n_q > n_k {
        return Err(err(format!(
            "attention backward: {n_q} queries from row {q_row} over {n_k} keys exceed the buffers"
        )));
    }
    gpu.attention_bwd_at(
        fused_rows(gpu, cfg, dqkv, q_row),
        fused_rows(gpu, cfg, qkv, q_row),
        att,
        lse,
        datt,
        n_q,
        n_k,
        h,
        kvh,
        hd,
        true,
    )
}

/// RoPE's backward on the q and k columns of a fused dqkv.
fn rope_bwd(gpu: &Gpu, model: &GpuLlama, dqkv: &mut CudaSlice<f16>, dpos: &CudaSlice<i32>, rows: usize) -> Result<()> {
    let cfg = &model.cfg;
    let (h, kvh, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let (t, nh, d, st) = (
        to_i32(rows, "rows")?,
        to_i32(h + kvh, "heads")?,
        to_i32(hd, "head_dim")?,
        to_i32((h + 2 * kvh) * hd, "stride")?,
    );
    let mut b = gpu.stream.launch_builder(gpu.f("rope_bwd_f16")?);
    b.arg(dqkv).arg(dpos).arg(&model.cos).arg(&model.sin).arg(&t).arg(&nh).arg(&d).arg(&st);
    unsafe {
        b.launch(LaunchConfig {
            grid_dim: (rows as u32, (h + kvh) as u32, 1),
            block_dim: (64, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .map_err(derr)?;
    Ok(())
}

/// SwiGLU's backward into the fused gate/up gradient.
fn swiglu_bwd(
    gpu: &Gpu,
    dgu: &mut CudaSlice<f16>,
    dout: &CudaSlice<f16>,
    gu: &CudaSlice<f16>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let (r, c) = (rows as i64, to_i32(cols, "cols")?);
    let mut b = gpu.stream.launch_builder(gpu.f("swiglu_bwd_fused_f16")?);
    b.arg(dgu).arg(dout).arg(gu).arg(&r).arg(&c);
    unsafe { b.launch(crate::cuda::cfg1(rows * cols, 256)) }.map_err(derr)?;
    Ok(())
}

/// Why `train_dpo_gpu` and `train_sft_gpu` cannot train `adapter` (the caller then trains on the CPU), or None.
pub fn gpu_trainable(cfg: &LlamaConfig, adapter: &Adapter) -> Option<String> {
    if let Some((name, _)) = adapter.saved_params().find(|(n, _)| !crate::cuda_clip::in_image_path(n)) {
        return Some(format!("the adapter trains the whole parameter {name} (modules_to_save; the GPU trainer trains whole weights and biases of the image path's linear layers only)"));
    }
    if let Err(e) = inference_rank(cfg, adapter) {
        return Some(e.to_string());
    }
    if let Some((name, _)) = adapter
        .modules()
        .into_iter()
        .find(|(n, _)| !n.starts_with("language_model.") && !crate::cuda_clip::in_image_path(n))
    {
        return Some(format!("the adapter has LoRA on {name} (the GPU trainer trains the decoder's projections and the image path's linear layers)"));
    }
    None
}

/// `train::trainer::train_dpo` on the GPU, step for step the same schedule (pair order, batches, learning rate,
/// clipping, metrics), for an adapter `gpu_trainable` accepts: each answer's input rows (the prompt's text
/// embeddings with the image features of the CPU vision tower, then the answer's) are made on the host, the
/// decoder's forward and backward passes run on the device in fp16 with fp32 LoRA masters and dynamic loss
/// scaling; a step whose gradients overflow is skipped (its `grad_norm` is NaN). `features` gives an image's
/// projected features (the image path has no LoRA here). Runs from `opt.step` until `stop_after` steps in total
/// (or the schedule's end), continuing `opt`'s moments and loss scale; the trained factors are written back into
/// `adapter` and the optimizer state into `opt`, so the run can be saved and resumed on either device. Returns
/// the number of steps this call skipped.
#[allow(clippy::too_many_arguments)]
pub fn train_dpo_gpu(
    gpu: &Gpu,
    gmodel: &GpuLlama,
    model: &crate::llava::Model,
    adapter: &mut Adapter,
    pairs: &[crate::train::dpo::TokenPair],
    refs: &[(f64, f64)],
    cfg: &crate::train::trainer::TrainConfig,
    opt: &mut crate::train::optim::AdamW,
    stop_after: Option<usize>,
    vision: Option<&crate::cuda_clip::GpuVision>,
    features: &mut dyn FnMut(&crate::image::PixelValues) -> Result<Vec<f32>>,
    on_step: &mut dyn FnMut(&crate::train::trainer::StepLog),
) -> Result<u64> {
    if pairs.len() != refs.len() {
        return Err(err(format!("{} pairs but {} reference log-prob pairs", pairs.len(), refs.len())));
    }
    let accumulate = |gl: &mut GpuLora,
                      feats: &mut FeatureCache,
                      batch: &[usize],
                      step: usize|
     -> Result<crate::train::trainer::StepMetrics> {
        let weight = 1.0 / batch.len() as f64;
        let mut m = crate::train::trainer::StepMetrics::default();
        for &i in batch {
            let p = &pairs[i];
            // Dropout seeds as the CPU trainer draws them (train::trainer::train_dpo): per step and pair.
            let seed = (gl.dropout > 0.0).then(|| crate::train::trainer::dropout_seed(cfg.seed, step, i));
            let fixed = if gl.trains_image_path() { None } else { feats.get(p.pixels, features)? };
            let (l, lp) = gl.pair_gradients(gpu, gmodel, model, vision, p, fixed, refs[i], &cfg.dpo, weight, seed)?;
            m.add(cfg.dpo.beta, l, &lp, weight);
        }
        Ok(m)
    };
    let log = |m: crate::train::trainer::StepMetrics, batch: &[usize], d: StepDone| {
        on_step(&m.log(d.step, d.total, d.epoch, d.lr, d.grad_norm, batch.len(), d.t0))
    };
    run_schedule(
        gpu,
        gmodel,
        adapter,
        opt,
        (pairs.len(), cfg.batch_size, cfg.epochs, cfg.seed),
        stop_after,
        model.llm.recompute_cheap,
        accumulate,
        log,
    )
}

impl GpuLora {
    /// One DPO pair's forward and backward passes, its gradients (`weight` times the pair's loss, loss-scaled)
    /// added to the accumulators, as `train::dpo::pair_forward_backward` computes them on the CPU: with its image
    /// (`vision`: the image path on the device, needed when this copy trains the image path's LoRA; `fixed`: the
    /// image's features otherwise), and LoRA dropout drawn from `seed` (None: none). Returns the loss and log-probs.
    #[allow(clippy::too_many_arguments)]
    pub fn pair_gradients(
        &mut self,
        gpu: &Gpu,
        gmodel: &GpuLlama,
        model: &crate::llava::Model,
        vision: Option<&crate::cuda_clip::GpuVision>,
        p: &crate::train::dpo::TokenPair,
        fixed: Option<&[f32]>,
        refs: (f64, f64),
        cfg: &DpoConfig,
        weight: f64,
        seed: Option<u64>,
    ) -> Result<(f64, PairLogps)> {
        self.check_trainable()?;
        let c = gmodel.cfg.hidden_size;
        let seed = seed.filter(|_| self.dropout > 0.0);
        // Masks per part (image, chosen, rejected) as the CPU trainer draws them; the two answers' prompt rows then
        // differ, so they run whole.
        let drops = (crate::train::dpo::part_seed(seed, 1), crate::train::dpo::part_seed(seed, 2));
        let img = self.example_image(gpu, vision, p.pixels, fixed, crate::train::dpo::part_seed(seed, 0))?;
        let f = img.features.as_deref();
        // The input row where the image's features start (the prompt is both sequences' prefix).
        let mut image_row = None;
        let (l, lp, dxs) = if self.share_prompt && !self.recompute && seed.is_none() {
            // The prompt's rows (image features included) once; each answer's own token rows.
            let (xp, rp) = model.embed_inputs(p.prompt_ids, f)?;
            image_row = image_start(model, p.prompt_ids, &rp);
            let (xc, _) = model.embed_inputs(p.chosen_ids, None)?;
            let (xr, _) = model.embed_inputs(p.rejected_ids, None)?;
            self.dpo_pair_shared(
                gpu,
                gmodel,
                Input::Embeds(&xp),
                (Input::Embeds(&xc), p.chosen_ids),
                (Input::Embeds(&xr), p.rejected_ids),
                refs,
                cfg,
                weight,
            )?
        } else {
            let mut rows = |answer: &[u32]| -> Result<(Vec<f32>, usize)> {
                let (x, r) = model.embed_inputs(&[p.prompt_ids, answer].concat(), f)?;
                image_row = image_start(model, p.prompt_ids, &r);
                let n = x.len() / c;
                Ok((x, n.saturating_sub(answer.len())))
            };
            let (xc, sc) = rows(p.chosen_ids)?;
            let (xr, sr) = rows(p.rejected_ids)?;
            self.dpo_pair(
                gpu,
                gmodel,
                (Input::Embeds(&xc), p.chosen_ids, sc),
                (Input::Embeds(&xr), p.rejected_ids, sr),
                refs,
                cfg,
                weight,
                drops,
            )?
        };
        if let (Some(tape), Some(v)) = (&img.tape, vision) {
            let at = image_row.ok_or_else(|| err("an image was given but the prompt holds no image token"))?;
            self.image_backward_from_rows(gpu, v, tape, &dxs, at, c)?;
        }
        Ok((l, lp))
    }

    /// An example's image (`px`): under this copy's image-path LoRA when it trains one (computed on the device
    /// with `drop`'s masks, the tape kept), else the `fixed` features.
    fn example_image<'f>(
        &self,
        gpu: &Gpu,
        vision: Option<&crate::cuda_clip::GpuVision>,
        px: Option<&crate::image::PixelValues>,
        fixed: Option<&'f [f32]>,
        drop: Option<u64>,
    ) -> Result<ExampleImage<'f>> {
        match (px, self.trains_image_path()) {
            (Some(px), true) => {
                let v = vision.ok_or_else(|| {
                    err("the adapter trains the image path, but the model's image path is not on the GPU")
                })?;
                let tape = self.image_forward(gpu, v, &px.data, drop)?;
                let host = gpu.download_f16(&tape.features)?;
                Ok(ExampleImage { features: Some(std::borrow::Cow::Owned(host)), tape: Some(tape) })
            }
            (Some(_), false) if fixed.is_none() => Err(err("an image without its features")),
            _ => Ok(ExampleImage { features: fixed.map(std::borrow::Cow::Borrowed), tape: None }),
        }
    }

    /// The accumulated (loss-scaled) gradient of the image-path parameter `name` (canonical, e.g.
    /// `multi_modal_projector.linear_1.weight`) this copy trains in full.
    pub fn image_param_grad(&self, gpu: &Gpu, name: &str) -> Result<Vec<f32>> {
        self.check_trainable()?;
        let pp = self
            .image_params
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| err(format!("no image-path parameter {name} trained in full")))?;
        let all = gpu.stream.clone_dtoh(&self.g32).map_err(derr)?;
        Ok(all[pp.at..pp.at + pp.len].to_vec())
    }

    /// The accumulated (loss-scaled) gradients of the image-path module `name` (canonical): (dA, dB).
    pub fn image_grads(&self, gpu: &Gpu, name: &str) -> Result<(Vec<f32>, Vec<f32>)> {
        self.check_trainable()?;
        let sl = self.image_slot(name).ok_or_else(|| err(format!("no image-path LoRA module {name}")))?;
        let all = gpu.stream.clone_dtoh(&self.g32).map_err(derr)?;
        Ok((all[sl.a..sl.a + sl.r * sl.n_in].to_vec(), all[sl.b..sl.b + sl.n_out * sl.r].to_vec()))
    }
}

/// An example's image for the decoder: its features, and the image path's tape when the GPU copy trains the image
/// path (the features are then computed under the current LoRA at every step, on the device); else the features
/// of the image path without LoRA, computed once per run (cached).
struct ExampleImage<'f> {
    features: Option<std::borrow::Cow<'f, [f32]>>,
    tape: Option<ImageTape>,
}

/// The first input row of the image's features, from the row map `embed_inputs` returned for a sequence that
/// starts with `prompt`; None when the prompt holds no image token.
fn image_start(model: &crate::llava::Model, prompt: &[u32], rows: &[usize]) -> Option<usize> {
    let at = model.image_token_id().and_then(|id| prompt.iter().position(|&t| t == id))?;
    rows.get(at).copied()
}

/// An optimizer step `run_schedule` took.
struct StepDone {
    /// Steps done, this one included.
    step: usize,
    total: usize,
    epoch: usize,
    lr: f64,
    /// NaN for a step skipped on fp16 overflow.
    grad_norm: f64,
    t0: std::time::Instant,
}

/// The schedule of both GPU trainers (`train::trainer::step_batch`: `shape` = items, batch size, epochs, seed): the
/// adapter uploaded with `opt`'s state, then from `opt.step` until `stop_after` steps in total (or the schedule's
/// end) `accumulate(gpu copy, image features, batch, step)` adds a batch's gradients, an optimizer step follows and
/// `log` reports it; the trained factors and the optimizer state go back into `adapter` and `opt`. `recompute`
/// (the model's `recompute_cheap`, `--recompute`) turns on `GpuLora::recompute`. Returns the number of steps
/// skipped on fp16 overflow.
#[allow(clippy::too_many_arguments)]
fn run_schedule<R>(
    gpu: &Gpu,
    gmodel: &GpuLlama,
    adapter: &mut Adapter,
    opt: &mut crate::train::optim::AdamW,
    shape: (usize, usize, usize, u64),
    stop_after: Option<usize>,
    recompute: bool,
    mut accumulate: impl FnMut(&mut GpuLora, &mut FeatureCache, &[usize], usize) -> Result<R>,
    mut log: impl FnMut(R, &[usize], StepDone),
) -> Result<u64> {
    let (n, batch_size, epochs, seed) = shape;
    let mut gl = GpuLora::from_adapter(gpu, &gmodel.cfg, adapter)?;
    gl.recompute = recompute;
    gl.load_optimizer(gpu, adapter, opt)?;
    let skipped_before = gl.scaler.skipped;
    let per_epoch = crate::train::trainer::steps_per_epoch(n, batch_size);
    let total = per_epoch * epochs;
    let end = stop_after.map_or(total, |s| s.min(total));
    let mut feats = FeatureCache::default();
    while opt.step < end {
        let t0 = std::time::Instant::now();
        let epoch = opt.step / per_epoch;
        let batch = &crate::train::trainer::step_batch(n, batch_size, seed, opt.step);
        let r = accumulate(&mut gl, &mut feats, batch, opt.step)?;
        let (lr, grad_norm) = gl.schedule_step(gpu, opt)?;
        log(r, batch, StepDone { step: opt.step, total, epoch, lr, grad_norm, t0 });
    }
    gl.write_back(gpu, adapter)?;
    gl.store_optimizer(gpu, adapter, opt)?;
    Ok(gl.scaler.skipped - skipped_before)
}

/// Each image's projected features, computed once per training call (they do not depend on the decoder's LoRA).
#[derive(Default)]
struct FeatureCache(std::collections::HashMap<*const crate::image::PixelValues, Vec<f32>>);

impl FeatureCache {
    fn get(
        &mut self,
        px: Option<&crate::image::PixelValues>,
        features: &mut dyn FnMut(&crate::image::PixelValues) -> Result<Vec<f32>>,
    ) -> Result<Option<&[f32]>> {
        let Some(px) = px else { return Ok(None) };
        let f = match self.0.entry(px as *const crate::image::PixelValues) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(features(px)?),
        };
        Ok(Some(f.as_slice()))
    }
}

impl GpuLora {
    /// The optimizer step `opt.step` of the schedule with the accumulated gradients (its learning rate, `opt`'s
    /// betas, epsilon, weight decay and clipping), then `opt.step` advances (a skipped overflow step too). Returns
    /// (learning rate, unscaled gradient norm; NaN for a skipped step).
    fn schedule_step(&mut self, gpu: &Gpu, opt: &mut crate::train::optim::AdamW) -> Result<(f64, f64)> {
        let lr = opt.cfg.lr_at(opt.step);
        opt.step += 1;
        let o = &opt.cfg;
        let hyper = AdamW {
            lr: lr as f32,
            beta1: o.beta1 as f32,
            beta2: o.beta2 as f32,
            eps: o.eps as f32,
            weight_decay: o.weight_decay as f32,
        };
        let norm = self.optimizer_step(gpu, &hyper, o.max_grad_norm)?;
        Ok((lr, norm.unwrap_or(f64::NAN)))
    }
}

/// `train::sft::train_sft` of a LoRA adapter on the GPU, for an adapter `gpu_trainable` accepts: the same
/// batches, learning rate, clipping and per-token loss (each example's prompt rows with its image's features,
/// `features`, made on the host; the decoder's passes on the device in fp16 with dynamic loss scaling). Runs from
/// `opt.step` until `stop_after` steps in total (or the schedule's end), continuing and handing back `opt`'s
/// state as `train_dpo_gpu` does. Returns the number of steps this call skipped.
#[allow(clippy::too_many_arguments)]
pub fn train_sft_gpu(
    gpu: &Gpu,
    gmodel: &GpuLlama,
    model: &crate::llava::Model,
    adapter: &mut Adapter,
    examples: &[crate::train::sft::SftExample],
    cfg: &crate::train::sft::SftConfig,
    opt: &mut crate::train::optim::AdamW,
    stop_after: Option<usize>,
    vision: Option<&crate::cuda_clip::GpuVision>,
    features: &mut dyn FnMut(&crate::image::PixelValues) -> Result<Vec<f32>>,
    on_step: &mut dyn FnMut(&crate::train::sft::SftStepLog),
) -> Result<u64> {
    let c = gmodel.cfg.hidden_size;
    let accumulate =
        |gl: &mut GpuLora, feats: &mut FeatureCache, batch: &[usize], step: usize| -> Result<(f64, usize)> {
            let tokens: usize = batch.iter().map(|&i| examples[i].answer_ids.len()).sum();
            // The loss is the mean over the batch's answer tokens.
            let weight = 1.0 / tokens.max(1) as f64;
            let mut nll = 0.0;
            for &i in batch {
                let ex = &examples[i];
                if ex.answer_ids.is_empty() {
                    return Err(err("an SFT example needs a non-empty answer"));
                }
                // Dropout masks as the CPU trainer draws them (train::sft::train_sft, sft_forward_backward).
                let seed = (gl.dropout > 0.0).then(|| crate::train::trainer::dropout_seed(cfg.seed, step, i));
                let fixed = if gl.trains_image_path() { None } else { feats.get(ex.pixels, features)? };
                let img = gl.example_image(gpu, vision, ex.pixels, fixed, crate::train::dpo::part_seed(seed, 0))?;
                let f = img.features.as_deref();
                let (x, row_of) = model.embed_inputs(&[ex.prompt_ids, ex.answer_ids].concat(), f)?;
                let rows = x.len() / c;
                let t = gl.forward_seq(
                    gpu,
                    gmodel,
                    Input::Embeds(&x),
                    ex.answer_ids,
                    rows.saturating_sub(ex.answer_ids.len()),
                    crate::train::dpo::part_seed(seed, 1),
                )?;
                if !t.logp_sum.is_finite() {
                    return Err(err(format!("the loss is {}", -t.logp_sum)));
                }
                nll -= t.logp_sum;
                let dx = gl.backward(gpu, gmodel, &t, (-weight * gl.scaler.scale as f64) as f32)?;
                drop(t);
                if let (Some(tape), Some(v)) = (&img.tape, vision) {
                    let at = image_start(model, ex.prompt_ids, &row_of)
                        .ok_or_else(|| err("an image was given but the prompt holds no image token"))?;
                    gl.image_backward_from_rows(gpu, v, tape, std::slice::from_ref(&dx), at, c)?;
                }
            }
            Ok((nll * weight, tokens))
        };
    let log = |(loss, tokens): (f64, usize), _: &[usize], d: StepDone| {
        on_step(&crate::train::sft::SftStepLog {
            step: d.step,
            total_steps: d.total,
            epoch: d.epoch,
            loss,
            tokens,
            lr: d.lr,
            grad_norm: d.grad_norm,
            tokens_per_s: tokens as f64 / d.t0.elapsed().as_secs_f64(),
        })
    };
    run_schedule(
        gpu,
        gmodel,
        adapter,
        opt,
        (examples.len(), cfg.batch_size, cfg.epochs, cfg.seed),
        stop_after,
        model.llm.recompute_cheap,
        accumulate,
        log,
    )
}
