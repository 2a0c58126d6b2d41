//! The DPO training loop: deterministic shuffling per epoch, reference log-probs precomputed once per pair,
//! gradient accumulation over a batch, AdamW steps, per-step metrics, and exact resume from a saved state.

use crate::adapter::Adapter;
use crate::error::Result;
use crate::llava::Model;
use crate::rng::SplitMix64;
use crate::train::dpo::{pair_forward_backward, reference_logps, DpoConfig, TokenPair};
use crate::train::optim::AdamW;
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

/// Optimizer steps per epoch for `n` pairs.
pub fn steps_per_epoch(n: usize, batch_size: usize) -> usize {
    n.div_ceil(batch_size.max(1))
}

/// The pair order of `epoch`: a Fisher-Yates shuffle seeded by (seed, epoch).
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut idx: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        idx.swap(i, j);
    }
    idx
}

/// The items (indices into `n`) of optimizer step `step`: its slice of its epoch's order (the last batch of an
/// epoch may be short). Shared by every trainer, so a run resumes and crosses devices with the same batches.
pub fn step_batch(n: usize, batch_size: usize, seed: u64, step: usize) -> Vec<usize> {
    let per_epoch = steps_per_epoch(n, batch_size).max(1);
    let bs = batch_size.max(1);
    let order = epoch_order(n, seed, step / per_epoch);
    let b = step % per_epoch;
    order[(b * bs).min(order.len())..((b + 1) * bs).min(order.len())].to_vec()
}

/// The LoRA dropout seed of item `i` at optimizer step `step` of a run seeded `seed`: every trainer (CPU and GPU,
/// DPO and SFT) draws its masks from it, so devices and resumed runs drop the same elements.
pub fn dropout_seed(seed: u64, step: usize, i: usize) -> u64 {
    seed ^ ((step as u64) << 32) ^ i as u64
}

/// Reference log-probs of every pair under `reference` (None = the base model).
pub fn precompute_references(
    model: &Model,
    reference: Option<&Adapter>,
    pairs: &[TokenPair],
) -> Result<Vec<(f64, f64)>> {
    pairs.iter().map(|p| reference_logps(model, reference, p)).collect()
}

/// Runs optimizer steps `opt.step ..` until `stop_after` steps in total (or the schedule's end), calling
/// `on_step` after each. `refs[i]` are pair i's reference log-probs. Runs on the model's backend when it trains
/// this run (`backend::Backend::train_dpo`: the CUDA backend for the loop's adapters), else on the CPU.
#[allow(clippy::too_many_arguments)] // what a run is made of; the trainers' shared loop will take them as one struct
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
    if let Some(b) = model.backend() {
        if let Some(r) = b.train_dpo(model, adapter, pairs, refs, cfg, opt, stop_after, &mut on_step) {
            return r;
        }
    }
    let per_epoch = steps_per_epoch(pairs.len(), cfg.batch_size);
    let total = per_epoch * cfg.epochs;
    let end = stop_after.map_or(total, |s| s.min(total));
    while opt.step < end {
        let t0 = std::time::Instant::now();
        let epoch = opt.step / per_epoch;
        let batch = &step_batch(pairs.len(), cfg.batch_size, cfg.seed, opt.step);
        let mut grads = Grads::zeros_like(adapter);
        let weight = 1.0 / batch.len() as f64;
        let mut m = StepMetrics::default();
        for &i in batch {
            // Dropout masks differ per step and pair, and replay exactly on resume.
            let seed = (adapter.lora_dropout > 0.0).then(|| dropout_seed(cfg.seed, opt.step, i));
            let (l, lp) =
                pair_forward_backward(model, adapter, &pairs[i], refs[i], &cfg.dpo, weight, &mut grads, seed)?;
            m.add(cfg.dpo.beta, l, &lp, weight);
        }
        let info = opt.step(adapter, &grads)?;
        on_step(&m.log(opt.step, total, epoch, info.lr, info.grad_norm, batch.len(), t0));
    }
    Ok(())
}
