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
//!
//! Full-parameter training (`LoraSpec::full_parameter`, RLAIF-V's 7B recipe) trains the decoder's projections, Qwen2's
//! q/k/v biases and the head whole: their fp32 masters and fp16 copies sit in the decoder's part of the flat buffers,
//! the passes read those copies instead of the base's weights (`GpuLora::weight`, `GpuLora::head`), and the backward
//! pass adds dW = dy^T x of each fused matrix (and the head's, one block of logits at a time) into the pass's fp16
//! gradients. The base decoder on the device is never written. `engine/tests/cuda_train.rs` checks every whole
//! gradient against the CPU backend, `engine/tests/cuda_backend.rs` a whole run through `train_dpo`.

use crate::adapter::Adapter;
use crate::config::LlamaConfig;
use crate::cuda::{derr, err, to_i32, AdamW, AttnRows, Gpu};
use crate::cuda_llama::{GpuLlama, HostInput, Input};
use crate::cuda_lora::*;
pub use crate::cuda_lora::{decoder_lora_rank, inference_rank, whole_decoder_values, GpuLora, PROJECTIONS};
use crate::error::Result;
use crate::train::dpo::{pair_loss, DpoConfig, PairLogps};
use crate::train::schedule::{Schedule, StepDone, StepRunner};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::f16;

mod decoder;
pub(crate) mod image;
mod ops;
mod steps;

use decoder::*;
use image::*;
use ops::*;

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

/// Why `train_dpo_gpu` and `train_sft_gpu` cannot train `adapter` (the caller then trains on the CPU), or None.
pub fn gpu_trainable(cfg: &LlamaConfig, adapter: &Adapter) -> Option<String> {
    let whole = match whole_decoder_values(cfg, adapter) {
        Ok(n) => n,
        Err(e) => return Some(e.to_string()),
    };
    match decoder_lora_rank(cfg, adapter) {
        Err(e) => return Some(e.to_string()),
        Ok(None) if whole == 0 => return Some("the adapter has no LoRA module in the decoder".into()),
        Ok(_) => {}
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
    train_dpo_gpu_rank(gpu, gmodel, model, adapter, pairs, refs, cfg, opt, stop_after, vision, features, on_step, None)
}

/// `train_dpo_gpu` as one rank of a data-parallel run (`crate::train::parallel`; None: the only one): the rank's
/// share of each batch (`Rank::share`, weighted by 1 / the whole batch's size) through the passes, the
/// accumulated gradients summed over the ranks with NCCL before each optimizer step, the step's metrics summed
/// over the ranks on the host.
#[allow(clippy::too_many_arguments)]
pub fn train_dpo_gpu_rank(
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
    rank: Option<&crate::train::parallel::Rank>,
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
        let mine = match rank {
            Some(r) => r.share(batch),
            None => batch.to_vec(),
        };
        let mut pass = || -> Result<crate::train::trainer::StepMetrics> {
            let mut m = crate::train::trainer::StepMetrics::default();
            for &i in &mine {
                let p = &pairs[i];
                // Dropout seeds as the CPU trainer draws them (train::trainer::train_dpo): per step and pair.
                let seed = (gl.dropout > 0.0).then(|| crate::train::trainer::dropout_seed(cfg.seed, step, i));
                let fixed = if gl.trains_image_path() { None } else { feats.get(p.pixels, features)? };
                let (l, lp) =
                    gl.pair_gradients(gpu, gmodel, model, vision, p, fixed, refs[i], &cfg.dpo, weight, seed)?;
                m.add(cfg.dpo.beta, l, &lp, weight);
            }
            Ok(m)
        };
        let m = pass();
        match rank {
            None => m,
            // Every rank's share of the metrics (sums weighted by 1 / batch size), or the first rank's failure.
            Some(r) => {
                let parts = r.meeting.exchange(r.rank, m.map(|m| m.parts()).map_err(|e| e.to_string()))?;
                Ok(crate::train::trainer::StepMetrics::sum(&parts))
            }
        }
    };
    let log = |m: crate::train::trainer::StepMetrics, batch: &[usize], d: StepDone| {
        on_step(&m.log(d.step, d.total, d.epoch, d.lr, d.grad_norm, batch.len(), d.t0))
    };
    run_schedule(
        gpu,
        gmodel,
        adapter,
        opt,
        Schedule { items: pairs.len(), batch_size: cfg.batch_size, epochs: cfg.epochs, seed: cfg.seed },
        stop_after,
        model.llm.recompute_cheap,
        rank,
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
        let img = self.example_image(gpu, model, vision, p.pixels, fixed, crate::train::dpo::part_seed(seed, 0))?;
        let f = img.features.as_deref();
        // Qwen2-VL: the image's merged grid, for the rows' multimodal RoPE positions.
        let grid = p.pixels.and_then(|px| model.feature_grid(px));
        // The input row where the image's features start (the prompt is both sequences' prefix).
        let mut image_row = None;
        let (l, lp, dxs) = if self.share_prompt && !self.recompute && seed.is_none() {
            // The prompt's rows (image features included) once; each answer's own token rows.
            let (xp, rp) = model.embed_inputs(p.prompt_ids, f)?;
            image_row = image_start(model, p.prompt_ids, &rp);
            let xp = HostInput { rows: xp, placed: model.rope_positions_grid(p.prompt_ids, grid) };
            let (xc, _) = model.embed_inputs(p.chosen_ids, None)?;
            let (xr, _) = model.embed_inputs(p.rejected_ids, None)?;
            self.dpo_pair_shared(
                gpu,
                gmodel,
                xp.input(),
                (Input::Embeds(&xc), p.chosen_ids),
                (Input::Embeds(&xr), p.rejected_ids),
                refs,
                cfg,
                weight,
            )?
        } else {
            let mut rows = |answer: &[u32]| -> Result<(HostInput, usize)> {
                let ids = [p.prompt_ids, answer].concat();
                let (x, r) = model.embed_inputs(&ids, f)?;
                image_row = image_start(model, p.prompt_ids, &r);
                let n = x.len() / c;
                Ok((
                    HostInput { rows: x, placed: model.rope_positions_grid(&ids, grid) },
                    n.saturating_sub(answer.len()),
                ))
            };
            let (xc, sc) = rows(p.chosen_ids)?;
            let (xr, sr) = rows(p.rejected_ids)?;
            self.dpo_pair(
                gpu,
                gmodel,
                (xc.input(), p.chosen_ids, sc),
                (xr.input(), p.rejected_ids, sr),
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
    /// with `drop`'s masks, each tile's tape kept; LLaVA-NeXT's tiles packed as `Model::image_rows` packs them), else
    /// the `fixed` features.
    fn example_image<'f>(
        &self,
        gpu: &Gpu,
        model: &crate::llava::Model,
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
                model.check_tiles(px)?;
                let mut tiles = Vec::with_capacity(px.tiles);
                let mut per_tile = Vec::new();
                for i in 0..px.tiles {
                    // Every tile through the tower under the same masks, as the CPU trainer draws them.
                    let tape = self.image_forward(gpu, v, px.tile(i), drop)?;
                    per_tile.extend(gpu.download_f16(&tape.features)?);
                    tiles.push(tape);
                }
                let anyres = model.config.llava().is_some_and(|l| l.anyres());
                let packing = if anyres { Some(model.anyres_rows(px)?) } else { None };
                let host = match &packing {
                    Some(p) => model.pack_anyres(&per_tile, p)?,
                    None => per_tile,
                };
                Ok(ExampleImage {
                    features: Some(std::borrow::Cow::Owned(host)),
                    tape: Some(ImageTapes { tiles, packing }),
                })
            }
            (Some(_), false) if fixed.is_none() => Err(err("an image without its features")),
            _ => Ok(ExampleImage { features: fixed.map(std::borrow::Cow::Borrowed), tape: None }),
        }
    }

    /// The accumulated (loss-scaled) gradient of the parameter `name` (canonical, e.g.
    /// `multi_modal_projector.linear_1.weight`, `language_model.layers.0.mlp.up_proj.weight`) this copy trains in
    /// full.
    pub fn param_grad(&self, gpu: &Gpu, name: &str) -> Result<Vec<f32>> {
        self.check_trainable()?;
        let pp = self
            .image_params
            .iter()
            .chain(&self.whole)
            .find(|p| p.name == name)
            .ok_or_else(|| err(format!("no parameter {name} trained in full")))?;
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
    tape: Option<ImageTapes>,
}

/// The first input row of the image's features, from the row map `embed_inputs` returned for a sequence that
/// starts with `prompt`; None when the prompt holds no image token.
fn image_start(model: &crate::llava::Model, prompt: &[u32], rows: &[usize]) -> Option<usize> {
    let at = model.image_token_id().and_then(|id| prompt.iter().position(|&t| t == id))?;
    rows.get(at).copied()
}

/// The GPU's steps for `crate::train::schedule::run`: a batch's passes through `accumulate` into the device's
/// accumulators, then the fused AdamW step with loss scaling (`GpuLora::schedule_step`).
struct GpuSteps<'g, F, R> {
    gpu: &'g Gpu,
    gl: GpuLora,
    /// The other ranks of a data-parallel run, whose gradients are summed with these before each step.
    ranks: Option<crate::cuda::nccl::Collective>,
    feats: FeatureCache,
    accumulate: F,
    _metrics: std::marker::PhantomData<R>,
}

impl<F, R> StepRunner for GpuSteps<'_, F, R>
where
    F: FnMut(&mut GpuLora, &mut FeatureCache, &[usize], usize) -> Result<R>,
{
    type Metrics = R;

    fn accumulate(&mut self, batch: &[usize], step: usize) -> Result<R> {
        (self.accumulate)(&mut self.gl, &mut self.feats, batch, step)
    }

    fn optimizer_step(&mut self, opt: &mut crate::train::optim::AdamW) -> Result<(f64, f64)> {
        if let Some(c) = &mut self.ranks {
            // Every rank then holds the whole batch's gradients, bit for bit the same, and takes the same step.
            c.sum_f32(&mut self.gl.g32)?;
        }
        self.gl.schedule_step(self.gpu, opt)
    }
}

/// Both GPU trainers' run over the shared loop (`crate::train::schedule::run`): the adapter uploaded with `opt`'s
/// state, the steps from `opt.step` until `stop_after` steps in total (or the schedule's end), each batch's
/// gradients from `accumulate(gpu copy, image features, batch, step)` and `log` after each step; then the trained
/// factors and the optimizer state go back into `adapter` and `opt`. `recompute` (the model's `recompute_cheap`,
/// `--recompute`) turns on `GpuLora::recompute`. Returns the number of steps skipped on fp16 overflow.
#[allow(clippy::too_many_arguments)]
fn run_schedule<R>(
    gpu: &Gpu,
    gmodel: &GpuLlama,
    adapter: &mut Adapter,
    opt: &mut crate::train::optim::AdamW,
    schedule: Schedule,
    stop_after: Option<usize>,
    recompute: bool,
    rank: Option<&crate::train::parallel::Rank>,
    accumulate: impl FnMut(&mut GpuLora, &mut FeatureCache, &[usize], usize) -> Result<R>,
    log: impl FnMut(R, &[usize], StepDone),
) -> Result<u64> {
    let setup = || -> Result<GpuLora> {
        let mut gl = GpuLora::from_adapter(gpu, &gmodel.cfg, adapter)?;
        gl.recompute = recompute;
        gl.load_optimizer(gpu, adapter, opt)?;
        Ok(gl)
    };
    let gl = setup();
    let ranks = match rank {
        None => None,
        Some(r) => {
            // Every rank set up before any joins the NCCL group (joining waits for all of them).
            r.meeting.exchange(r.rank, gl.as_ref().map(|_| Vec::new()).map_err(|e| e.to_string()))?;
            Some(crate::cuda::nccl::Collective::join(gpu, &r.group, r.rank, r.world)?)
        }
    };
    let gl = gl?;
    let skipped_before = gl.scaler.skipped;
    let mut steps =
        GpuSteps { gpu, gl, ranks, feats: FeatureCache::default(), accumulate, _metrics: std::marker::PhantomData };
    crate::train::schedule::run(&mut steps, opt, &schedule, stop_after, log)?;
    let gl = steps.gl;
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
                let img =
                    gl.example_image(gpu, model, vision, ex.pixels, fixed, crate::train::dpo::part_seed(seed, 0))?;
                let f = img.features.as_deref();
                let ids = [ex.prompt_ids, ex.answer_ids].concat();
                let (x, row_of) = model.embed_inputs(&ids, f)?;
                let rows = x.len() / c;
                let grid = ex.pixels.and_then(|px| model.feature_grid(px));
                let x = HostInput { rows: x, placed: model.rope_positions_grid(&ids, grid) };
                let t = gl.forward_seq(
                    gpu,
                    gmodel,
                    x.input(),
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
        Schedule { items: examples.len(), batch_size: cfg.batch_size, epochs: cfg.epochs, seed: cfg.seed },
        stop_after,
        model.llm.recompute_cheap,
        None,
        accumulate,
        log,
    )
}
