//! Data-parallel DPO over several GPUs of one host: one rank per device, each with its own copy of the base
//! weights, the adapter and the optimizer state. Every optimizer step's batch (the schedule's, as one device would
//! take it) is dealt out pair by pair: rank r takes the batch's pairs r, r + world, ... and adds their gradients,
//! weighted by 1 / the whole batch's size, into its accumulators; NCCL then sums the accumulators over the ranks
//! (`cuda::nccl::Collective`), so every rank takes the same AdamW step from the same gradient, the one a single
//! device would have summed (up to the order of the fp32 additions). The loss scale decides on the summed
//! gradient, so an overflow on one rank skips the step on all.
//!
//! The ranks of this process also meet on the host once per step (`Meeting`): each hands over its share of the
//! step's metrics (loss, rewards: all sums weighted by 1 / batch size, so they add up) or its error. A rank that
//! fails makes every other rank fail at the next meeting instead of waiting forever inside a collective.

use crate::adapter::Adapter;
use crate::error::{EngineError, Result};
use crate::llava::Model;
use crate::train::dpo::TokenPair;
use crate::train::optim::AdamW;
use crate::train::trainer::{StepLog, TrainConfig};
use std::sync::{Arc, Condvar, Mutex};

/// Where the ranks of one process meet between steps: each hands in a vector (metrics) or an error, and gets
/// everyone's vectors back once all arrived, or the first error.
pub struct Meeting {
    world: usize,
    state: Mutex<MeetState>,
    cv: Condvar,
}

struct MeetState {
    /// Meetings completed.
    round: u64,
    slots: Vec<Option<Vec<f64>>>,
    arrived: usize,
    /// Everyone's vectors of the last completed meeting.
    done: Arc<Vec<Vec<f64>>>,
    /// The first failure; every meeting after it fails.
    failed: Option<String>,
}

impl Meeting {
    pub fn new(world: usize) -> Meeting {
        Meeting {
            world,
            state: Mutex::new(MeetState {
                round: 0,
                slots: vec![None; world],
                arrived: 0,
                done: Arc::new(Vec::new()),
                failed: None,
            }),
            cv: Condvar::new(),
        }
    }

    /// Hands in `rank`'s part (or its failure) and waits for every other rank's: all parts, in rank order, or why
    /// some rank failed.
    pub fn exchange(&self, rank: usize, part: std::result::Result<Vec<f64>, String>) -> Result<Arc<Vec<Vec<f64>>>> {
        let mut s = self.state.lock().map_err(|_| EngineError::Device("a training rank panicked".into()))?;
        if let Some(f) = &s.failed {
            return Err(EngineError::Device(f.clone()));
        }
        let part = match part {
            Ok(p) => p,
            Err(e) => {
                let why = format!("data-parallel rank {rank} failed: {e}");
                s.failed = Some(why.clone());
                self.cv.notify_all();
                return Err(EngineError::Device(why));
            }
        };
        s.slots[rank] = Some(part);
        s.arrived += 1;
        let round = s.round;
        if s.arrived == self.world {
            let parts: Vec<Vec<f64>> = s.slots.iter_mut().map(|p| p.take().unwrap_or_default()).collect();
            s.done = Arc::new(parts);
            s.arrived = 0;
            s.round += 1;
            self.cv.notify_all();
            return Ok(s.done.clone());
        }
        while s.round == round && s.failed.is_none() {
            s = self.cv.wait(s).map_err(|_| EngineError::Device("a training rank panicked".into()))?;
        }
        // A completed round's parts stay until this rank hands in its next part (no round completes without it).
        match (&s.failed, s.round != round) {
            (_, true) => Ok(s.done.clone()),
            (Some(f), false) => Err(EngineError::Device(f.clone())),
            (None, false) => unreachable!("woken with neither a new round nor a failure"),
        }
    }

    /// `rank` leaves with an error outside a meeting (its setup or a collective failed): the others fail at their
    /// next meeting, or now if they wait in one.
    pub fn abandon(&self, rank: usize, why: &str) {
        if let Ok(mut s) = self.state.lock() {
            if s.failed.is_none() {
                s.failed = Some(format!("data-parallel rank {rank} failed: {why}"));
            }
            self.cv.notify_all();
        }
    }
}

/// One rank's place in a data-parallel run: its number, the number of ranks, the group's NCCL id and the host
/// meeting of the ranks of this process.
#[derive(Clone)]
pub struct Rank {
    pub rank: usize,
    pub world: usize,
    pub group: crate::cuda::nccl::GroupId,
    pub meeting: Arc<Meeting>,
}

impl Rank {
    /// The ranks of a run on `world` devices of this process.
    pub fn all(world: usize) -> Result<Vec<Rank>> {
        let group = crate::cuda::nccl::GroupId::new()?;
        let meeting = Arc::new(Meeting::new(world));
        Ok((0..world).map(|rank| Rank { rank, world, group, meeting: meeting.clone() }).collect())
    }

    /// This rank's share of a step's batch: its pairs r, r + world, ...
    pub fn share(&self, batch: &[usize]) -> Vec<usize> {
        batch.iter().copied().skip(self.rank).step_by(self.world.max(1)).collect()
    }
}

/// `trainer::train_dpo` over `models`, one rank per model, each on its own GPU (a model per device, as the
/// daemon's engines hold them): the same schedule, batches, learning rates and clipping as one device with the
/// same batch size, the trained factors and the optimizer state written back into `adapter` and `opt` (rank 0's,
/// which every rank holds alike), `on_step` called by rank 0 with the whole batch's metrics. One model trains as
/// `train_dpo` does.
#[allow(clippy::too_many_arguments)]
pub fn train_dpo_parallel(
    models: &[&Model],
    adapter: &mut Adapter,
    pairs: &[TokenPair],
    refs: &[(f64, f64)],
    cfg: &TrainConfig,
    opt: &mut AdamW,
    stop_after: Option<usize>,
    on_step: impl FnMut(&StepLog),
) -> Result<()> {
    train_dpo_parallel_with(models, adapter, pairs, refs, cfg, opt, stop_after, &|_| {}, on_step)
}

/// `train_dpo_parallel`, calling `rank_step(r)` on rank r's thread after each of its optimizer steps (r >= 1; rank
/// 0 calls `on_step`): the daemon answers each device's engine heartbeats with it.
#[allow(clippy::too_many_arguments)]
pub fn train_dpo_parallel_with(
    models: &[&Model],
    adapter: &mut Adapter,
    pairs: &[TokenPair],
    refs: &[(f64, f64)],
    cfg: &TrainConfig,
    opt: &mut AdamW,
    stop_after: Option<usize>,
    rank_step: &(dyn Fn(usize) + Sync),
    mut on_step: impl FnMut(&StepLog),
) -> Result<()> {
    match models {
        [] => return Err(EngineError::Input("data-parallel training needs at least one model".into())),
        [one] => return crate::train::trainer::train_dpo(one, adapter, pairs, refs, cfg, opt, stop_after, on_step),
        _ => {}
    }
    if pairs.len() != refs.len() {
        return Err(EngineError::Input(format!("{} pairs but {} reference log-prob pairs", pairs.len(), refs.len())));
    }
    let mut seen = Vec::new();
    for (i, m) in models.iter().enumerate() {
        match m.training_placement("DPO", adapter) {
            crate::backend::Placement::Device(_) => {}
            crate::backend::Placement::Cpu(why) => {
                return Err(EngineError::Device(format!(
                    "data-parallel DPO trains on GPUs only: rank {i} runs on {}{}",
                    m.backend().device(),
                    why.map(|w| format!(", which cannot train this adapter ({w})")).unwrap_or_default()
                )))
            }
        }
        let spec = m.backend().spec();
        if seen.contains(&spec) {
            return Err(EngineError::Input(format!("{spec:?} is named twice: each rank needs a device of its own")));
        }
        seen.push(spec);
    }
    crate::cuda::nccl::nccl_status().map_err(EngineError::Device)?;
    let ranks = Rank::all(models.len())?;
    std::thread::scope(|s| {
        let others: Vec<_> = ranks[1..]
            .iter()
            .zip(&models[1..])
            .map(|(rank, m)| {
                let (mut a, mut o) = (adapter.clone(), opt.clone());
                std::thread::Builder::new()
                    .name(format!("dpo-rank-{}", rank.rank))
                    .spawn_scoped(s, move || {
                        let r = rank.rank;
                        m.backend().train_dpo_rank(m, &mut a, pairs, refs, cfg, &mut o, stop_after, rank, &mut |_| {
                            rank_step(r)
                        })
                    })
                    .map_err(|e| {
                        let why = format!("cannot start a training thread: {e}");
                        rank.meeting.abandon(rank.rank, &why);
                        EngineError::Device(why)
                    })
            })
            .collect();
        let mut first = models[0].backend().train_dpo_rank(
            models[0],
            adapter,
            pairs,
            refs,
            cfg,
            opt,
            stop_after,
            &ranks[0],
            &mut on_step,
        );
        if first.is_err() {
            ranks[0].meeting.abandon(0, "rank 0 stopped");
        }
        for h in others {
            let r = match h {
                Ok(h) => h.join().unwrap_or_else(|_| Err(EngineError::Device("a training rank panicked".into()))),
                Err(e) => Err(e),
            };
            if let (Ok(()), Err(e)) = (&first, r) {
                first = Err(e);
            }
        }
        first
    })
}
