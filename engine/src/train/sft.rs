//! Supervised fine-tuning: cross-entropy on answer tokens with the prompt masked (token-level mean over the
//! batch), for a LoRA adapter or for every base parameter (full fine-tuning, e.g. training the ShapesWorld base
//! model from scratch).

use crate::adapter::Adapter;
use crate::error::{EngineError, Result};
use crate::image::PixelValues;
use crate::llava::Model;
use crate::train::dpo::{part_seed, DropoutGuard};
use crate::train::optim::AdamW;
use crate::train::schedule::{self, dropout_seed, Schedule, StepRunner};
use crate::train::Grads;
use std::collections::BTreeMap;

/// One example: prompt (image token once when there is an image) and the answer to learn.
pub struct SftExample<'a> {
    pub pixels: Option<&'a PixelValues>,
    pub prompt_ids: &'a [u32],
    pub answer_ids: &'a [u32],
}

/// Adds the gradient of `weight` · Σ_answer −log p to `grads`; returns Σ −log p over the answer tokens.
/// `dropout_seed` turns the adapter's LoRA dropout on for this example (see `pair_forward_backward`).
pub fn sft_forward_backward(
    model: &Model,
    adapter: Option<&Adapter>,
    ex: &SftExample,
    weight: f64,
    grads: &mut Grads,
    dropout_seed: Option<u64>,
) -> Result<f64> {
    if ex.answer_ids.is_empty() {
        return Err(EngineError::Input("an SFT example needs a non-empty answer".into()));
    }
    let _guard = adapter.map(DropoutGuard);
    let (s_img, s_seq) = (part_seed(dropout_seed, 0), part_seed(dropout_seed, 1));
    let set = |s: Option<u64>| {
        if let Some(a) = adapter {
            a.set_dropout_seed(s);
        }
    };
    set(s_img);
    let img = match ex.pixels {
        Some(px) => Some(model.image_forward(px, adapter)?),
        None => None,
    };
    let feats = img.as_ref().map(|t| &t.features);
    set(s_seq);
    let seq = model.score_train(ex.prompt_ids, ex.answer_ids, feats, adapter)?;
    let nll = -seq.logp_sum();
    if !nll.is_finite() {
        return Err(EngineError::Input(format!("the loss is {nll}")));
    }
    let d_embeds = model.score_backward(&seq, -weight as f32, adapter, Some(grads))?;
    if let Some(t) = &img {
        set(s_img);
        model.image_backward(t, seq.image_rows_grad(&d_embeds), adapter, Some(grads));
    }
    Ok(nll)
}

/// Mean −log p per answer token over `examples` (no gradients): the held-out loss.
pub fn sft_eval_loss(model: &Model, adapter: Option<&Adapter>, examples: &[SftExample]) -> Result<f64> {
    let (mut nll, mut n) = (0.0, 0usize);
    for ex in examples {
        let feats = match ex.pixels {
            Some(px) => Some(model.image_features(px, adapter)?),
            None => None,
        };
        nll -= model.answer_logp(ex.prompt_ids, ex.answer_ids, feats.as_ref(), adapter)?;
        n += ex.answer_ids.len();
    }
    Ok(nll / n.max(1) as f64)
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SftConfig {
    pub epochs: usize,
    /// Examples per optimizer step.
    pub batch_size: usize,
    pub seed: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct SftStepLog {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: usize,
    /// Mean −log p per answer token of this batch (before the step).
    pub loss: f64,
    pub tokens: usize,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
}

/// What SFT trains.
pub enum SftTarget<'a> {
    Lora(&'a mut Adapter),
    /// Every base parameter; f32 master weights live in the trainer and are written back after each step.
    Full,
}

/// The CPU's SFT steps: each example's passes (`sft_forward_backward`) into host gradients, then `AdamW::step` on
/// the adapter or `AdamW::step_params` on the f32 master weights (written back into the model after each step).
struct SftSteps<'a, 'e> {
    model: &'a mut Model,
    target: SftTarget<'a>,
    examples: &'a [SftExample<'e>],
    cfg: &'a SftConfig,
    params: Vec<(String, Vec<usize>)>,
    master: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    grads: Option<Grads>,
}

impl StepRunner for SftSteps<'_, '_> {
    /// (mean −log p per answer token, answer tokens) of the batch.
    type Metrics = (f64, usize);

    fn accumulate(&mut self, batch: &[usize], step: usize) -> Result<(f64, usize)> {
        let tokens: usize = batch.iter().map(|&i| self.examples[i].answer_ids.len()).sum();
        let weight = 1.0 / tokens.max(1) as f64;
        let (model, examples, seed): (&Model, _, _) = (self.model, self.examples, self.cfg.seed);
        let (nll, grads) = match &self.target {
            SftTarget::Lora(adapter) => {
                let shared: &Adapter = adapter;
                let dropout = shared.lora_dropout > 0.0;
                batch_grads(
                    batch,
                    !dropout,
                    || Grads::zeros_like(shared),
                    |i, g| {
                        let seed = dropout.then(|| dropout_seed(seed, step, i));
                        sft_forward_backward(model, Some(shared), &examples[i], weight, g, seed)
                    },
                )?
            }
            SftTarget::Full => {
                let sizes: Vec<(String, usize)> =
                    self.params.iter().map(|(n, s)| (n.clone(), s.iter().product())).collect();
                batch_grads(
                    batch,
                    true,
                    || Grads::zeros_for_params(&sizes),
                    |i, g| sft_forward_backward(model, None, &examples[i], weight, g, None),
                )?
            }
        };
        self.grads = Some(grads);
        Ok((nll * weight, tokens))
    }

    fn optimizer_step(&mut self, opt: &mut AdamW) -> Result<(f64, f64)> {
        let grads = self.grads.take().ok_or_else(|| EngineError::Input("an optimizer step without a batch".into()))?;
        let info = match &mut self.target {
            SftTarget::Lora(adapter) => opt.step(adapter, &grads)?,
            SftTarget::Full => {
                let info = opt.step_params(&mut self.master, &grads)?;
                for (name, (_, v)) in &self.master {
                    self.model.set_param(name, v);
                }
                info
            }
        };
        Ok((info.lr, info.grad_norm))
    }
}

/// Runs optimizer steps until `stop_after` (or the end of the schedule), calling `on_step` after each. Where it
/// runs is decided once: a LoRA target on the model's device when that trains this adapter
/// (`Model::training_placement`), else (and full fine-tuning always) on the CPU.
pub fn train_sft(
    model: &mut Model,
    mut target: SftTarget,
    examples: &[SftExample],
    cfg: &SftConfig,
    opt: &mut AdamW,
    stop_after: Option<usize>,
    mut on_step: impl FnMut(&SftStepLog),
) -> Result<()> {
    if let SftTarget::Lora(adapter) = &mut target {
        if model.training_placement("SFT", adapter).on_device() {
            let m: &Model = model;
            return m.backend().train_sft(m, adapter, examples, cfg, opt, stop_after, &mut on_step);
        }
    }
    let schedule = Schedule { items: examples.len(), batch_size: cfg.batch_size, epochs: cfg.epochs, seed: cfg.seed };
    let params: Vec<(String, Vec<usize>)> = model.param_shapes();
    let mut master: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    if matches!(target, SftTarget::Full) {
        for (name, shape) in &params {
            let v = model.get_param(name).ok_or_else(|| EngineError::Input(format!("parameter {name} not found")))?;
            master.insert(name.clone(), (shape.clone(), v));
        }
    }
    let mut steps = SftSteps { model, target, examples, cfg, params, master, grads: None };
    schedule::run(&mut steps, opt, &schedule, stop_after, |(loss, tokens), _, d| {
        on_step(&SftStepLog {
            step: d.step,
            total_steps: d.total,
            epoch: d.epoch,
            loss,
            tokens,
            lr: d.lr,
            grad_norm: d.grad_norm,
            tokens_per_s: tokens as f64 / d.t0.elapsed().as_secs_f64(),
        })
    })
}

/// Sum over `batch` of `one(example index, grads)`: each example's gradient is computed into its own buffer and
/// the buffers are added in batch order, so the result does not depend on the thread count. With `parallel`,
/// rayon runs as many examples at once as it has threads (examples share the model read-only; LoRA dropout
/// keeps its seed on the adapter, so callers pass false when dropout is on).
fn batch_grads(
    batch: &[usize],
    parallel: bool,
    zeros: impl Fn() -> Grads + Sync,
    one: impl Fn(usize, &mut Grads) -> Result<f64> + Sync,
) -> Result<(f64, Grads)> {
    use rayon::prelude::*;
    let mut acc = zeros();
    let width = if parallel { rayon::current_num_threads().clamp(1, batch.len().max(1)) } else { 1 };
    let mut bufs: Vec<Grads> = (0..width).map(|_| zeros()).collect();
    let mut total = 0.0;
    for wave in batch.chunks(width) {
        let losses: Vec<Result<f64>> = if width > 1 {
            bufs.par_iter_mut().zip(wave.par_iter()).map(|(g, &i)| one(i, g)).collect()
        } else {
            bufs.iter_mut().zip(wave).map(|(g, &i)| one(i, g)).collect()
        };
        for (loss, g) in losses.into_iter().zip(bufs.iter_mut()) {
            total += loss?;
            acc.absorb(g);
        }
    }
    Ok((total, acc))
}
