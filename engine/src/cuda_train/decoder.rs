//! The GPU decoder's training passes: the saved activations of a layer (`LayerTape`), a whole sequence
//! (`SeqTape`: `forward_seq`, `backward`), a shared prompt and the answers attending it (`ChunkTape`,
//! `AnswerTape`: `forward_prompt`, `forward_answer`, `backward_shared`), and one layer's forward and backward
//! passes (`layer_forward_ctx`, `layer_backward`). The CPU trainer has the same passes under the same names
//! (`crate::llama`: `layer_forward`, `layer_backward`, `backward_shared`; `crate::train::passes`).

use super::*;

/// Answer rows whose logits exist at once.
pub(super) const LOGIT_BLOCK: usize = 256;

/// Saved activations of one layer for the backward pass.
pub(super) struct LayerTape {
    pub(super) x_in: CudaSlice<f16>,
    pub(super) h1: CudaSlice<f16>,
    /// After RoPE.
    pub(super) qkv: CudaSlice<f16>,
    pub(super) att: CudaSlice<f16>,
    pub(super) lse: CudaSlice<f32>,
    pub(super) x_mid: CudaSlice<f16>,
    pub(super) h2: CudaSlice<f16>,
    pub(super) gu: CudaSlice<f16>,
    pub(super) act: CudaSlice<f16>,
    /// x A^T of each module (rows, r); None for a projection without LoRA.
    pub(super) t: Vec<Option<CudaSlice<f16>>>,
    /// The dropout seed the forward pass drew its masks with (None: no dropout); the backward redraws them.
    pub(super) drop: Option<u64>,
}

/// A chunk of rows after the layers: a shared prompt, or an answer attending one.
pub(super) struct ChunkTape {
    pub(super) rows: usize,
    pub(super) layers: Vec<LayerTape>,
    /// The rows' positions (RoPE; three per row under multimodal RoPE: `GpuLlama::device_positions`).
    pub(super) pos: CudaSlice<i32>,
    /// RoPE position minus row of the rows after this chunk (Qwen2-VL after an image; 0 otherwise).
    pub(super) shift: isize,
    /// The residual stream after the last layer, and after the final norm.
    pub(super) x_final: CudaSlice<f16>,
    pub(super) hf: CudaSlice<f16>,
}

/// An answer's forward pass after a shared prompt.
pub(super) struct AnswerTape {
    pub(super) chunk: ChunkTape,
    /// The rows that predict the answer's tokens: the prompt's last final-norm row, then the answer's but its last.
    pub(super) pred: CudaSlice<f16>,
    pub(super) labels: CudaSlice<i32>,
    pub(super) lse: CudaSlice<f32>,
    pub(super) logp_sum: f64,
}

/// One sequence's forward pass, kept for its backward.
pub(super) struct SeqTape {
    pub(super) rows: usize,
    pub(super) answer_start: usize,
    /// Every layer's saved activations; empty with activation recomputation, which keeps `inputs` instead.
    pub(super) layers: Vec<LayerTape>,
    /// Each layer's input, with activation recomputation (`GpuLora::recompute`).
    pub(super) inputs: Vec<CudaSlice<f16>>,
    /// Positions 0..rows (RoPE), for recomputing a layer.
    pub(super) pos: CudaSlice<i32>,
    pub(super) x_final: CudaSlice<f16>,
    pub(super) hf: CudaSlice<f16>,
    pub(super) labels: CudaSlice<i32>,
    pub(super) lse: CudaSlice<f32>,
    pub(super) logp_sum: f64,
    /// The forward pass's dropout seed (a recomputed layer draws the same masks).
    pub(super) drop: Option<u64>,
}

impl GpuLora {
    /// The fp16 weight of layer `li`'s fused matrix `g` (`FUSED`: q/k/v, o, gate/up, down) the passes read: this
    /// copy's when it trains the matrix whole (full-parameter training), else the base's.
    pub(super) fn weight<'a>(&'a self, model: &'a GpuLlama, li: usize, g: usize) -> CudaView<'a, f16> {
        let l = &model.layers[li];
        let base = [&l.qkv, &l.o, &l.gate_up, &l.down][g];
        match self.whole_layers.get(li).and_then(|w| w[g]) {
            Some(at) => self.p16.slice(at..at + base.len()),
            None => base.slice(..),
        }
    }

    /// Layer `li`'s q/k/v biases (Qwen2): this copy's when it trains them, else the base's (None: the model has none).
    fn qkv_bias<'a>(&'a self, model: &'a GpuLlama, li: usize) -> Option<CudaView<'a, f16>> {
        let base = model.layers[li].qkv_bias.as_ref()?;
        Some(match self.whole_qkv_bias.get(li).copied().flatten() {
            Some(at) => self.p16.slice(at..at + base.len()),
            None => base.slice(..),
        })
    }

    /// The head's weight the passes read: this copy's when it trains the head whole, else the base's.
    pub(super) fn head<'a>(&'a self, model: &'a GpuLlama) -> CudaView<'a, f16> {
        let base = model.head();
        match self.whole_head {
            Some(at) => self.p16.slice(at..at + base.len()),
            None => base.slice(..),
        }
    }

    /// The head's weight the passes read (`head`) and, when this copy trains it whole, the pass's gradient of it.
    fn head_and_grad<'a>(&'a mut self, model: &'a GpuLlama) -> (CudaView<'a, f16>, Option<CudaViewMut<'a, f16>>) {
        let base = model.head();
        match self.whole_head {
            Some(at) => (self.p16.slice(at..at + base.len()), Some(self.g16.slice_mut(at..at + base.len()))),
            None => (base.slice(..), None),
        }
    }

    /// Zeroes one backward pass's gradients of the whole decoder parameters (each chunk of the pass then adds its
    /// share).
    fn zero_whole_grads(&mut self, gpu: &Gpu) -> Result<()> {
        if self.whole_range.is_empty() {
            return Ok(());
        }
        gpu.stream.memset_zeros(&mut self.g16.slice_mut(self.whole_range.clone())).map_err(derr)
    }

    /// Adds dW = dy^T x (`rows` rows; dy of `n_out` columns, x of `n_in`) into the pass's gradient of layer `li`'s
    /// fused matrix `g`, when this copy trains it whole.
    #[allow(clippy::too_many_arguments)]
    fn whole_grad(
        &mut self,
        gpu: &Gpu,
        li: usize,
        g: usize,
        dy: &CudaSlice<f16>,
        x: &CudaSlice<f16>,
        rows: usize,
        n_out: usize,
        n_in: usize,
    ) -> Result<()> {
        let Some(at) = self.whole_layers.get(li).and_then(|w| w[g]) else { return Ok(()) };
        let dw = &mut self.g16.slice_mut(at..at + n_out * n_in);
        gpu.gemm(&dy.slice(..), n_out, true, &x.slice(..), n_in, false, dw, n_in, n_out, n_in, rows, 1.0, 1.0)
    }

    /// Adds the column sums of `dqkv` into the pass's gradient of layer `li`'s q/k/v biases, when this copy trains
    /// them.
    fn whole_bias_grad(&mut self, gpu: &Gpu, li: usize, dqkv: &CudaSlice<f16>, rows: usize, n: usize) -> Result<()> {
        let Some(at) = self.whole_qkv_bias.get(li).copied().flatten() else { return Ok(()) };
        column_sums(gpu, &mut self.ones, dqkv, rows, n, &mut self.g16.slice_mut(at..at + n), 1.0)
    }

    /// Backward of `lora_fwd`: given dy (columns dy_off.. of rows ldy apart), writes dA and dB into `g16` (added
    /// with `acc`) and adds the LoRA path's input gradient into dx; with the forward's dropout seed, through the
    /// same masks. Nothing for a projection without LoRA.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn lora_bwd(
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
    pub(super) fn forward(&self, gpu: &Gpu, model: &GpuLlama, ids: &[u32], answer_start: usize) -> Result<SeqTape> {
        self.forward_seq(gpu, model, Input::Ids(ids), ids.get(answer_start..).unwrap_or_default(), answer_start, None)
    }

    /// `forward` of any input (`Input::Embeds`: rows made on the host, e.g. with image features) whose rows
    /// `answer_start..` are the answer tokens `answer`, with LoRA dropout masks drawn from `drop` (None: none).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_seq(
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
        let dpos = s.clone_htod(&seq_positions(model, seq, 0, rows)?.0).map_err(derr)?;
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
        let (labels, lse, logp_sum) = head_forward(gpu, model, &self.head(model), &hf, answer_start - 1, answer)?;
        Ok(SeqTape { rows, answer_start, layers, inputs, pos: dpos, x_final: x, hf, labels, lse, logp_sum, drop })
    }

    /// The rows of `seq` on the device (ids looked up in the embedding table, or host rows uploaded), checked.
    pub(super) fn input_rows(&self, gpu: &Gpu, model: &GpuLlama, seq: Input) -> Result<(CudaSlice<f16>, usize)> {
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
            Input::Embeds(e) | Input::Placed { rows: e, .. } => {
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
    pub(super) fn forward_prompt(&self, gpu: &Gpu, model: &GpuLlama, seq: Input) -> Result<ChunkTape> {
        let (mut x, rows) = self.input_rows(gpu, model, seq)?;
        if rows == 0 || rows >= model.max_positions {
            return Err(err(format!("a prompt of {rows} positions (needs 1 to {})", model.max_positions - 1)));
        }
        let (pos, shift) = seq_positions(model, seq, 0, rows)?;
        let mut tape = self.forward_chunk(gpu, model, &mut x, rows, &pos, None)?;
        tape.shift = shift;
        Ok(tape)
    }

    /// `rows` rows at the device positions `pos` (`seq_positions`) through every layer (attending `ctx`'s rows
    /// first when given), then the final norm.
    pub(super) fn forward_chunk(
        &self,
        gpu: &Gpu,
        model: &GpuLlama,
        x: &mut CudaSlice<f16>,
        rows: usize,
        pos: &[i32],
        ctx: Option<&ChunkTape>,
    ) -> Result<ChunkTape> {
        let c = model.cfg.hidden_size;
        let s = &gpu.stream;
        let dpos = s.clone_htod(pos).map_err(derr)?;
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
        Ok(ChunkTape { rows, layers, pos: dpos, shift: 0, x_final: x.try_clone().map_err(derr)?, hf })
    }

    /// An answer after a shared prompt: its rows through every layer attending the prompt, and the log-probs of its
    /// tokens (the first predicted by the prompt's last row, each later one by the answer row before it).
    pub(super) fn forward_answer(
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
        // The answer's rows continue the prompt's positions (after Qwen2-VL's image: shifted).
        let start = usize::try_from(prompt.rows as isize + prompt.shift)
            .map_err(|_| err("an answer before position 0 (the prompt's RoPE shift)"))?;
        let (pos, _) = seq_positions(model, Input::Embeds(&[]), start, rows)?;
        let chunk = self.forward_chunk(gpu, model, &mut x, rows, &pos, Some(prompt))?;
        let s = &gpu.stream;
        let a = |n: usize| s.alloc_zeros::<f16>(n).map_err(derr);
        let mut pred = a(rows * c)?;
        let p = prompt.rows;
        s.memcpy_dtod(&prompt.hf.slice((p - 1) * c..p * c), &mut pred.slice_mut(..c)).map_err(derr)?;
        if rows > 1 {
            s.memcpy_dtod(&chunk.hf.slice(..(rows - 1) * c), &mut pred.slice_mut(c..)).map_err(derr)?;
        }
        let (labels, lse, logp_sum) = head_forward(gpu, model, &self.head(model), &pred, 0, answer)?;
        Ok(AnswerTape { chunk, pred, labels, lse, logp_sum })
    }

    /// The backward pass of a prompt and its two answers (`dlogp`: each answer's derivative per token log-prob,
    /// loss-scaled): the answers' head rows and layers, the prompt getting its last row's share of both heads and,
    /// at every layer, the gradients of the keys and values the answers attended; LoRA gradients of all three
    /// added into the accumulators. The same gradients as two whole sequences, from one pass over the prompt.
    /// Returns the gradient of the prompt's input rows (loss-scaled).
    pub(super) fn backward_shared(
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
        self.zero_whole_grads(gpu)?;
        let (head, mut dhead) = self.head_and_grad(model);
        for (at, dlogp) in answers {
            let rows = at.chunk.rows;
            let mut dpred = a(rows * c)?;
            head_backward(gpu, model, &head, dhead.as_mut(), &at.pred, 0, &at.labels, &at.lse, dlogp, &mut dpred)?;
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
    pub(super) fn dpo_pair_shared(
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
    pub(super) fn layer_forward(
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
    pub(super) fn layer_forward_ctx(
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
        gpu.linear_view(&h1, &self.weight(model, li, 0), &mut qkv, rows, c, nqkv)?;
        if let Some(b) = self.qkv_bias(model, li) {
            crate::cuda_clip::bias_add(gpu, &mut qkv, &b, rows, nqkv)?;
        }
        let mut t = Vec::with_capacity(7);
        for j in 0..7 {
            t.push(if self.has_module(li, j) { Some(a(rows * self.r)?) } else { None });
        }
        for (j, off) in [(Q, 0), (K, h * hd), (V, (h + kvh) * hd)] {
            self.lora_fwd(gpu, li, j, &h1, t[j].as_mut(), &mut qkv, off, nqkv, rows, drop)?;
        }
        gpu.rope_strided_dev(&mut qkv, dpos, &model.cos, &model.sin, rows, h + kvh, hd, nqkv, cfg.mrope_section)?;
        let mut att = a(rows * h * hd)?;
        let mut lse = s.alloc_zeros::<f32>(rows * h).map_err(derr)?;
        let mask = crate::ops::Mask::causal(cfg.window(li));
        match ctx {
            None => attention_fwd(gpu, cfg, &qkv, &mut att, &mut lse, rows, mask)?,
            Some(cq) => {
                let p = cq.len() / nqkv;
                let mut cat = a((p + rows) * nqkv)?;
                s.memcpy_dtod(&cq.slice(..p * nqkv), &mut cat.slice_mut(..p * nqkv)).map_err(derr)?;
                s.memcpy_dtod(&qkv.slice(..rows * nqkv), &mut cat.slice_mut(p * nqkv..)).map_err(derr)?;
                attention_fwd_at(gpu, cfg, &cat, p, rows, p + rows, &mut att, &mut lse, mask)?;
            }
        }
        let mut tmp = a(rows * c)?;
        gpu.linear_view(&att, &self.weight(model, li, 1), &mut tmp, rows, h * hd, c)?;
        self.lora_fwd(gpu, li, O, &att, t[O].as_mut(), &mut tmp, 0, c, rows, drop)?;
        gpu.residual_add_dev(x, &tmp, rows * c)?;
        let x_mid = x.try_clone().map_err(derr)?;
        let mut h2 = a(rows * c)?;
        gpu.rmsnorm_dev(&mut h2, x, &l.post_norm, rows, eps)?;
        let mut gu = a(rows * 2 * inter)?;
        gpu.linear_view(&h2, &self.weight(model, li, 2), &mut gu, rows, c, 2 * inter)?;
        self.lora_fwd(gpu, li, G, &h2, t[G].as_mut(), &mut gu, 0, 2 * inter, rows, drop)?;
        self.lora_fwd(gpu, li, U, &h2, t[U].as_mut(), &mut gu, inter, 2 * inter, rows, drop)?;
        let mut act = a(rows * inter)?;
        gpu.swiglu_fused_dev(&mut act, &gu, rows, inter)?;
        gpu.linear_view(&act, &self.weight(model, li, 3), &mut tmp, rows, inter, c)?;
        self.lora_fwd(gpu, li, D, &act, t[D].as_mut(), &mut tmp, 0, c, rows, drop)?;
        gpu.residual_add_dev(x, &tmp, rows * c)?;
        Ok(LayerTape { x_in, h1, qkv, att, lse, x_mid, h2, gu, act, t, drop })
    }

    /// The backward pass of `tape` for a loss whose derivative with respect to each answer token's log-prob is
    /// `dlogp` (already multiplied by the loss scale); the LoRA gradients are added into the fp32 accumulators.
    /// Returns the gradient of the input rows (rows, hidden; loss-scaled).
    pub(super) fn backward(
        &mut self,
        gpu: &Gpu,
        model: &GpuLlama,
        tape: &SeqTape,
        dlogp: f32,
    ) -> Result<CudaSlice<f16>> {
        let cfg = &model.cfg;
        let rows = tape.rows;
        let c = cfg.hidden_size;
        let eps = cfg.rms_norm_eps as f32;
        let s = gpu.stream.clone();
        let a = |n: usize| s.alloc_zeros::<f16>(n).map_err(derr);
        // The head, one block of answer rows at a time: recompute the logits, turn them into their gradient in
        // place, and multiply back into the hidden rows.
        let mut dhf = a(rows * c)?;
        self.zero_whole_grads(gpu)?;
        let (head, mut dhead) = self.head_and_grad(model);
        let first = tape.answer_start - 1;
        head_backward(gpu, model, &head, dhead.as_mut(), &tape.hf, first, &tape.labels, &tape.lse, dlogp, &mut dhf)?;
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
    pub(super) fn layer_backward(
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
        self.whole_grad(gpu, li, 3, dx, &lt.act, rows, c, inter)?;
        gpu.gemm(
            &dx.slice(..),
            c,
            false,
            &self.weight(model, li, 3),
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
        self.whole_grad(gpu, li, 2, &dgu, &lt.h2, rows, 2 * inter, c)?;
        gpu.gemm(
            &dgu.slice(..),
            2 * inter,
            false,
            &self.weight(model, li, 2),
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
        self.whole_grad(gpu, li, 1, dx, &lt.att, rows, c, h * hd)?;
        gpu.gemm(
            &dx.slice(..),
            c,
            false,
            &self.weight(model, li, 1),
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
        let mask = crate::ops::Mask::causal(cfg.window(li));
        let mut dqkv = match ctx {
            None => {
                let mut dqkv = a(rows * nqkv)?;
                attention_bwd(gpu, cfg, lt, &datt, &mut dqkv, rows, mask)?;
                dqkv
            }
            Some((ctx_qkv, dctx)) => {
                // Keys and values: the context's rows, then these; the queries are these rows.
                let p = ctx_qkv.len() / nqkv;
                let mut cat = a((p + rows) * nqkv)?;
                s.memcpy_dtod(&ctx_qkv.slice(..p * nqkv), &mut cat.slice_mut(..p * nqkv)).map_err(derr)?;
                s.memcpy_dtod(&lt.qkv.slice(..rows * nqkv), &mut cat.slice_mut(p * nqkv..)).map_err(derr)?;
                let mut dcat = a((p + rows) * nqkv)?;
                attention_bwd_at(gpu, cfg, &cat, &mut dcat, p, rows, p + rows, &lt.att, &lt.lse, &datt, mask)?;
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
        self.whole_grad(gpu, li, 0, &dqkv, &lt.h1, rows, nqkv, c)?;
        self.whole_bias_grad(gpu, li, &dqkv, rows, nqkv)?;
        gpu.gemm(
            &dqkv.slice(..),
            nqkv,
            false,
            &self.weight(model, li, 0),
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
}

/// The device positions (`GpuLlama::device_positions`) of `rows` rows of `seq`: those an `Input::Placed` gives
/// (Qwen2-VL's multimodal RoPE) and its shift, else `start..` and no shift.
pub(super) fn seq_positions(model: &GpuLlama, seq: Input, start: usize, rows: usize) -> Result<(Vec<i32>, isize)> {
    match seq {
        Input::Placed { positions, shift, .. } if positions.len() == rows && start == 0 => {
            Ok((model.device_positions(positions)?.0, shift))
        }
        Input::Placed { positions, .. } => {
            Err(err(format!("{} positions for {rows} training rows from {start}", positions.len())))
        }
        _ => Ok((model.device_positions(&(start..start + rows).collect::<Vec<_>>())?.0, 0)),
    }
}
