//! The GPU trainer's steps as tests and benchmarks drive them: one DPO pair or SFT example's passes and an
//! optimizer step (fused AdamW with loss scaling and clipping).

use super::*;

impl GpuLora {
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
                // Biases trained in full (the decoder's, then the image path's): no weight decay (the CPU
                // trainer's AdamW decays matrices only).
                let plain = AdamW { weight_decay: 0.0, ..*opt };
                let wb = self.whole_bias.clone();
                for (range, cfg) in [(0..wb.start, opt), (wb.clone(), &plain), (wb.end..nd, opt), (nd..total, &plain)] {
                    gpu.adamw_range(
                        &mut self.p32,
                        &mut self.m,
                        &mut self.v,
                        &mut self.g32,
                        Some(&mut self.p16),
                        range,
                        cfg,
                        self.steps,
                        factor,
                    )?;
                }
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
    pub(super) fn dpo_pair(
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
