//! The one training loop of every trainer: DPO and SFT, on the CPU and on a GPU. A run's schedule (items, batch
//! size, epochs, seed) fixes the batches of every optimizer step (`step_batch`) and the LoRA dropout seed of every
//! item (`dropout_seed`), so a run resumes exactly from a saved optimizer state and crosses devices with the same
//! batches. What differs between trainers is behind `StepRunner`: how one batch's gradients are accumulated and
//! how the optimizer step is taken (the CPU's `AdamW` on host tensors, or the GPU's fused kernels with loss
//! scaling).

use crate::error::Result;
use crate::rng::SplitMix64;
use crate::train::optim::AdamW;

/// What fixes a run's batches: `items` examples (pairs, SFT examples) in batches of `batch_size` for `epochs`
/// epochs, shuffled per epoch from `seed`.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub items: usize,
    pub batch_size: usize,
    pub epochs: usize,
    pub seed: u64,
}

impl Schedule {
    pub fn steps_per_epoch(&self) -> usize {
        steps_per_epoch(self.items, self.batch_size)
    }

    pub fn total_steps(&self) -> usize {
        self.steps_per_epoch() * self.epochs
    }
}

/// One optimizer step `run` took.
pub struct StepDone {
    /// Steps done, this one included.
    pub step: usize,
    pub total: usize,
    pub epoch: usize,
    pub lr: f64,
    /// The gradient norm before clipping; NaN for a step skipped on fp16 overflow.
    pub grad_norm: f64,
    /// When the step started (its batch's passes included).
    pub t0: std::time::Instant,
}

/// A trainer's device-specific part: the gradients of one batch, then one optimizer step over them.
pub trait StepRunner {
    /// What a batch's passes measured (loss, log-probs, tokens), handed to the step's log.
    type Metrics;
    /// Accumulates the gradients of the items `batch` (indices into the run's items) at optimizer step `step`
    /// (0-based: the dropout seeds depend on it).
    fn accumulate(&mut self, batch: &[usize], step: usize) -> Result<Self::Metrics>;
    /// Takes the optimizer step `opt.step` with the accumulated gradients, advances `opt.step` and clears the
    /// gradients. Returns (learning rate, gradient norm before clipping; NaN for a skipped step).
    fn optimizer_step(&mut self, opt: &mut AdamW) -> Result<(f64, f64)>;
}

/// Runs optimizer steps `opt.step ..` until `stop_after` steps in total (or the schedule's end), calling `log` after
/// each with the batch's metrics, its items and the step.
pub fn run<R: StepRunner>(
    runner: &mut R,
    opt: &mut AdamW,
    schedule: &Schedule,
    stop_after: Option<usize>,
    mut log: impl FnMut(R::Metrics, &[usize], StepDone),
) -> Result<()> {
    let per_epoch = schedule.steps_per_epoch();
    let total = schedule.total_steps();
    let end = stop_after.map_or(total, |s| s.min(total));
    while opt.step < end {
        let t0 = std::time::Instant::now();
        let epoch = opt.step / per_epoch;
        let batch = step_batch(schedule.items, schedule.batch_size, schedule.seed, opt.step);
        let metrics = runner.accumulate(&batch, opt.step)?;
        let (lr, grad_norm) = runner.optimizer_step(opt)?;
        log(metrics, &batch, StepDone { step: opt.step, total, epoch, lr, grad_norm, t0 });
    }
    Ok(())
}

/// Optimizer steps per epoch for `n` items.
pub fn steps_per_epoch(n: usize, batch_size: usize) -> usize {
    n.div_ceil(batch_size.max(1))
}

/// The item order of `epoch`: a Fisher-Yates shuffle seeded by (seed, epoch).
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
/// epoch may be short).
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
