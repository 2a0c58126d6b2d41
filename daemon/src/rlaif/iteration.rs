//! One iteration end to end: start it, drain its sample and label jobs, move it to training once it has enough
//! pairs, train, gate. Each step reads where the iteration stands from the database, so a rerun resumes it.

use super::{gate_job, run_label_job, run_sample_job, train_job, Engine, LoopConfig};
use crate::store::{self, IterationRow};
use anyhow::{bail, Context, Result};
use sqlx::PgPool;
use std::sync::Arc;

/// Runs sample and label jobs of the iteration until none is open (jobs other workers hold are waited for).
async fn drain_jobs(
    pool: &PgPool,
    engine: &Arc<Engine>,
    cfg: &LoopConfig,
    it: &IterationRow,
    owner: &str,
    progress: &Arc<dyn Fn(Stage, usize, usize) + Send + Sync>,
) -> Result<()> {
    loop {
        let mut worked = false;
        for kind in [store::JobKind::Sample, store::JobKind::Label] {
            for job in store::claim_jobs(pool, kind, owner, 1, cfg.lease_s).await? {
                worked = true;
                let r = if kind == store::JobKind::Sample {
                    run_sample_job(pool, engine, cfg, &job, owner).await
                } else {
                    run_label_job(pool, engine, cfg, &job, owner).await
                };
                if let Err(e) = r {
                    store::fail_job(pool, &job, &format!("{e:#}"), cfg.max_attempts).await?;
                }
            }
        }
        let (open, done, _failed) = store::job_counts(pool, it.id).await?;
        progress(Stage::Sample, done as usize, ((open + done) as usize).max(1));
        if open == 0 {
            return Ok(());
        }
        if !worked {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

/// What [`advance_sampling`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplingStep {
    /// Sample or label jobs are still open: nothing to do yet.
    Open,
    /// Too few pairs: sample jobs for more prompts were queued.
    MorePrompts,
    /// Enough pairs (or no prompts left): the iteration moved to training.
    Training,
}

/// Moves an iteration in the sampling stage on once its jobs are done: to training when it has
/// `pairs_per_iteration` pairs (or no unused prompts are left), else queues more prompts. An iteration that ends
/// with no pairs at all is marked failed (an error).
pub async fn advance_sampling(pool: &PgPool, cfg: &LoopConfig, it: &IterationRow) -> Result<SamplingStep> {
    let (open, _, _) = store::job_counts(pool, it.id).await?;
    if open > 0 {
        return Ok(SamplingStep::Open);
    }
    // Too few pairs (answers that all scored the same make none): sample more prompts while any are left.
    let pairs = store::iteration_pairs(pool, it.id).await?.len();
    if pairs < cfg.pairs_per_iteration {
        let more = store::unused_train_prompts(pool, cfg.prompts_per_iteration as i64).await?;
        if !more.is_empty() {
            store::add_sample_jobs(pool, it.id, &more).await?;
            return Ok(SamplingStep::MorePrompts);
        }
    }
    // Imported pairs (`loop.imported_pairs`) are enough to train on when the iteration made none of its own.
    let has_imported =
        pairs == 0 && !store::imported_pairs_for_iteration(pool, it.number, cfg.imported_pairs).await?.is_empty();
    if pairs == 0 && !has_imported {
        store::set_stage(pool, it.id, store::Stage::Failed).await?;
        store::event(
            pool,
            "iteration_failed",
            "trainer",
            serde_json::json!({ "iteration": it.number, "reason": "no pairs" }),
        )
        .await?;
        bail!("iteration {}: labeling produced no pairs", it.number);
    }
    store::start_training(pool, it.id).await?;
    Ok(SamplingStep::Training)
}

/// Starts the next iteration from the promoted checkpoint on `prompts_per_iteration` unused training prompts
/// (the open one is returned if there is one).
pub async fn start_iteration(pool: &PgPool, cfg: &LoopConfig) -> Result<IterationRow> {
    if let Some(it) = store::open_iteration(pool).await? {
        return Ok(it);
    }
    let prompts = store::unused_train_prompts(pool, cfg.prompts_per_iteration as i64).await?;
    if prompts.is_empty() {
        bail!("no unused training prompts left (import more prompts or generate them)");
    }
    let config = serde_json::to_value(cfg)?;
    store::start_iteration(pool, &config, &prompts, cfg.reference == "base").await
}

/// Where an iteration stands, for progress display.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Sample,
    Label,
    Train,
    Evaluate,
}

/// What one finished iteration did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct IterationOutcome {
    pub iteration: i32,
    pub candidate: i64,
    pub promoted: bool,
    pub metrics: serde_json::Value,
    pub pairs: usize,
}

/// Runs the open iteration (or starts the next one) to its end: sample and label every prompt (one job at a
/// time, each stored with its job's completion), train the candidate, gate it. A rerun after a crash picks up
/// where the database says the iteration stands.
pub async fn run_iteration(
    pool: &PgPool,
    engine: &Arc<Engine>,
    cfg: &LoopConfig,
    owner: &str,
    progress: Arc<dyn Fn(Stage, usize, usize) + Send + Sync>,
) -> Result<IterationOutcome> {
    let it = start_iteration(pool, cfg).await?;
    if it.stage == store::Stage::Sampling {
        loop {
            drain_jobs(pool, engine, cfg, &it, owner, &progress).await?;
            match advance_sampling(pool, cfg, &it).await? {
                SamplingStep::Training => break,
                SamplingStep::MorePrompts | SamplingStep::Open => continue,
            }
        }
    }
    // Train and gate through their jobs, as the daemons do (another process may hold one: wait for it).
    loop {
        let now = store::iteration(pool, it.id).await?;
        match now.stage {
            store::Stage::Training => {
                let p = progress.clone();
                if !train_job(pool, engine, &[], cfg, owner, owner, move |s, t, _| p(Stage::Train, s, t)).await? {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
            store::Stage::Evaluating => {
                progress(Stage::Evaluate, 0, 1);
                if gate_job(pool, engine, cfg, owner, owner).await?.is_none() {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
            store::Stage::Done => break,
            store::Stage::Failed => {
                let why: Option<String> = store::iteration_failure(pool, now.number).await?;
                bail!("iteration {} failed: {}", now.number, why.unwrap_or_else(|| "see events".into()));
            }
            store::Stage::Sampling => bail!("iteration {} went back to sampling", now.number),
        }
    }
    progress(Stage::Evaluate, 1, 1);
    let now = store::iteration(pool, it.id).await?;
    let cand = store::checkpoint(pool, now.candidate_id.context("a done iteration without a candidate")?).await?;
    let pairs = store::iteration_pairs(pool, it.id).await?.len();
    let promoted = cand.status == store::CheckpointStatus::Promoted;
    Ok(IterationOutcome {
        iteration: it.number,
        candidate: cand.id,
        promoted,
        metrics: cand.metrics.unwrap_or_default(),
        pairs,
    })
}
