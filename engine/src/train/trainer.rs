//! The DPO training loop: deterministic shuffling per epoch, reference log-probs precomputed once per pair,
//! gradient accumulation over a batch, AdamW steps, per-step metrics, and exact resume from a saved state.

use crate::adapter::Adapter;
use crate::error::{EngineError, Result};
use crate::llava::Model;
use crate::train::dpo::{pair_forward_backward, reference_logps, DpoConfig, TokenPair};
use crate::train::optim::AdamW;
use crate::train::schedule::{self, Schedule, StepRunner};
use crate::train::Grads;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub dpo: DpoConfig,
    pub epochs: usize,
    /// Pairs per optimizer step (gradients accumulated over them).
    pub batch_size: usize,
    /// Seed of the pair order.
    pub seed: u64,
}

/// Metrics of one optimizer step (RLAIF-V / TRL names: rewards are β·(π − π_ref)).
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepLog {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: usize,
    pub loss: f64,
    pub reward_accuracy: f64,
    pub reward_margin: f64,
    pub chosen_reward: f64,
    pub rejected_reward: f64,
    pub logp_chosen: f64,
    pub logp_rejected: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub pairs_per_s: f64,
}

/// The batch averages of one step's metrics, added pair by pair (shared by the CPU and the GPU trainer).
#[derive(Default)]
pub(crate) struct StepMetrics {
    loss: f64,
    acc: f64,
    margin: f64,
    chosen: f64,
    rejected: f64,
    logp_chosen: f64,
    logp_rejected: f64,
}

impl StepMetrics {
    /// The sums, for the data-parallel ranks' meeting (`train::parallel::Meeting`).
    pub(crate) fn parts(&self) -> Vec<f64> {
        vec![self.loss, self.acc, self.margin, self.chosen, self.rejected, self.logp_chosen, self.logp_rejected]
    }

    /// The whole batch's metrics from every rank's `parts` (each a sum weighted by 1 / the whole batch's size).
    pub(crate) fn sum(parts: &[Vec<f64>]) -> StepMetrics {
        let mut t = [0.0f64; 7];
        for p in parts {
            t.iter_mut().zip(p).for_each(|(t, v)| *t += v);
        }
        let [loss, acc, margin, chosen, rejected, logp_chosen, logp_rejected] = t;
        StepMetrics { loss, acc, margin, chosen, rejected, logp_chosen, logp_rejected }
    }

    /// Adds one pair's loss and log-probs with `weight` (1 / batch size).
    pub(crate) fn add(&mut self, beta: f64, loss: f64, lp: &crate::train::dpo::PairLogps, weight: f64) {
        let chosen_reward = beta * (lp.policy_chosen - lp.ref_chosen);
        let rejected_reward = beta * (lp.policy_rejected - lp.ref_rejected);
        self.loss += loss * weight;
        self.acc += if chosen_reward > rejected_reward { weight } else { 0.0 };
        self.margin += (chosen_reward - rejected_reward) * weight;
        self.chosen += chosen_reward * weight;
        self.rejected += rejected_reward * weight;
        self.logp_chosen += lp.policy_chosen * weight;
        self.logp_rejected += lp.policy_rejected * weight;
    }

    /// The step's log: `step` (1-based) of `total_steps`, `pairs` pairs since `t0`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn log(
        &self,
        step: usize,
        total_steps: usize,
        epoch: usize,
        lr: f64,
        grad_norm: f64,
        pairs: usize,
        t0: std::time::Instant,
    ) -> StepLog {
        StepLog {
            step,
            total_steps,
            epoch,
            loss: self.loss,
            reward_accuracy: self.acc,
            reward_margin: self.margin,
            chosen_reward: self.chosen,
            rejected_reward: self.rejected,
            logp_chosen: self.logp_chosen,
            logp_rejected: self.logp_rejected,
            lr,
            grad_norm,
            pairs_per_s: pairs as f64 / t0.elapsed().as_secs_f64(),
        }
    }
}

pub use crate::train::schedule::{dropout_seed, epoch_order, step_batch, steps_per_epoch};

/// Reference log-probs of every pair under `reference` (None = the base model).
pub fn precompute_references(
    model: &Model,
    reference: Option<&Adapter>,
    pairs: &[TokenPair],
) -> Result<Vec<(f64, f64)>> {
    pairs.iter().map(|p| reference_logps(model, reference, p)).collect()
}

/// The CPU's DPO steps: each pair's passes (`pair_forward_backward`) into host gradients, then `AdamW::step`.
struct DpoSteps<'a, 'p> {
    model: &'a Model,
    adapter: &'a mut Adapter,
    pairs: &'a [TokenPair<'p>],
    refs: &'a [(f64, f64)],
    cfg: &'a TrainConfig,
    grads: Option<Grads>,
}

impl StepRunner for DpoSteps<'_, '_> {
    type Metrics = StepMetrics;

    fn accumulate(&mut self, batch: &[usize], step: usize) -> Result<StepMetrics> {
        let mut grads = Grads::zeros_like(self.adapter);
        let weight = 1.0 / batch.len() as f64;
        let mut m = StepMetrics::default();
        for &i in batch {
            // Dropout masks differ per step and pair, and replay exactly on resume.
            let seed = (self.adapter.lora_dropout > 0.0).then(|| dropout_seed(self.cfg.seed, step, i));
            let (p, refs) = (&self.pairs[i], self.refs[i]);
            let (l, lp) =
                pair_forward_backward(self.model, self.adapter, p, refs, &self.cfg.dpo, weight, &mut grads, seed)?;
            m.add(self.cfg.dpo.beta, l, &lp, weight);
        }
        self.grads = Some(grads);
        Ok(m)
    }

    fn optimizer_step(&mut self, opt: &mut AdamW) -> Result<(f64, f64)> {
        let grads = self.grads.take().unwrap_or_else(|| Grads::zeros_like(self.adapter));
        let info = opt.step(self.adapter, &grads)?;
        Ok((info.lr, info.grad_norm))
    }
}

/// Runs optimizer steps `opt.step ..` until `stop_after` steps in total (or the schedule's end), calling
/// `on_step` after each. `refs[i]` are pair i's reference log-probs. Where it runs is decided once, from the
/// model's backend (`Model::training_placement`): on its device when that trains this adapter, else on the CPU.
#[allow(clippy::too_many_arguments)] // what a run is made of
pub fn train_dpo(
    model: &Model,
    adapter: &mut Adapter,
    pairs: &[TokenPair],
    refs: &[(f64, f64)],
    cfg: &TrainConfig,
    opt: &mut AdamW,
    stop_after: Option<usize>,
    mut on_step: impl FnMut(&StepLog),
) -> Result<()> {
    if pairs.len() != refs.len() {
        return Err(EngineError::Input(format!("{} pairs but {} reference log-prob pairs", pairs.len(), refs.len())));
    }
    if model.training_placement("DPO", adapter).on_device() {
        return model.backend().train_dpo(model, adapter, pairs, refs, cfg, opt, stop_after, &mut on_step);
    }
    let schedule = Schedule { items: pairs.len(), batch_size: cfg.batch_size, epochs: cfg.epochs, seed: cfg.seed };
    let mut steps = DpoSteps { model, adapter, pairs, refs, cfg, grads: None };
    schedule::run(&mut steps, opt, &schedule, stop_after, |m, batch, d| {
        on_step(&m.log(d.step, d.total, d.epoch, d.lr, d.grad_norm, batch.len(), d.t0))
    })
}
