//! One unit of each actor's work: claim a sample or label job and run it, start or advance an iteration and
//! train its candidate, gate a candidate and keep the served generation on the promoted checkpoint.

use super::supervisor::Role;
use crate::config::Config;
use crate::rlaif::{self, SamplingStep};
use crate::serve::Daemon;
use crate::store::{self, JobKind, Stage};
use anyhow::Result;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tracing::{error, info, warn, Instrument};

/// One unit of an actor's work. Ok(true): it did something (run again at once); Ok(false): nothing to do.
pub(crate) async fn step(role: Role, engine: usize, d: &Arc<Daemon>) -> Result<bool> {
    let cfg = d.config();
    // Pause lives in the database: another daemon's `pause`, or one from before a restart, holds here too.
    d.paused.store(store::loop_paused(&d.pool).await?, Ordering::SeqCst);
    match role {
        Role::Checkpointer => checkpointer_step(d, &cfg).await,
        _ if d.paused.load(Ordering::SeqCst) || d.draining.load(Ordering::SeqCst) => Ok(false),
        Role::Sampler | Role::Labeler => {
            let kind = if role == Role::Sampler { JobKind::Sample } else { JobKind::Label };
            let (eng, worker) = match (d.engines.get(engine), d.workers.get(engine)) {
                (Some(e), Some(w)) => (e, w),
                _ => (&d.engine, &d.worker),
            };
            let owner = d.owner_of(engine);
            let Some(job) =
                store::claim_jobs_as(&d.pool, kind, &owner, worker, 1, cfg.loop_.lease_s).await?.into_iter().next()
            else {
                return Ok(false);
            };
            let span = tracing::info_span!(
                "job",
                kind = kind.as_str(),
                id = job.id,
                prompt = job.prompt_id,
                iteration = job.iteration_id
            );
            let r = async {
                if kind == JobKind::Sample {
                    rlaif::run_sample_job(&d.pool, eng, &cfg.loop_, &job, &owner).await
                } else {
                    rlaif::run_label_job(&d.pool, eng, &cfg.loop_, &job, &owner).await
                }
            }
            .instrument(span)
            .await;
            if let Err(e) = r {
                warn!(job = job.id, error = %format!("{e:#}"), "job failed");
                store::fail_job(&d.pool, &job, &format!("{e:#}"), cfg.loop_.max_attempts).await?;
            }
            Ok(true)
        }
        Role::Trainer => trainer_step(d, &cfg).await,
    }
}

/// Starts iterations (automatically or on `iterate`), moves sampling on, trains candidates.
async fn trainer_step(d: &Arc<Daemon>, cfg: &Config) -> Result<bool> {
    let pool = &d.pool;
    let Some(it) = store::open_iteration(pool).await? else {
        let finished = store::finished_iterations(pool).await? as u64;
        let requested = store::take_iterate_request(pool).await?;
        let auto = cfg.daemon.auto_iterate && (cfg.daemon.max_iterations == 0 || finished < cfg.daemon.max_iterations);
        if !(requested || auto) {
            return Ok(false);
        }
        top_up_prompts(d, cfg).await?;
        let it = rlaif::start_iteration(pool, &cfg.loop_).await?;
        info!(iteration = it.number, policy = it.policy_id, "iteration started");
        return Ok(true);
    };
    match it.stage {
        Stage::Sampling => match rlaif::advance_sampling(pool, &cfg.loop_, &it).await? {
            SamplingStep::Open => Ok(false),
            SamplingStep::MorePrompts => Ok(true),
            SamplingStep::Training => Ok(true),
        },
        Stage::Training => {
            let n = it.number;
            let span = tracing::info_span!("train", iteration = n);
            let peers = if cfg.loop_.data_parallel { d.gpu_peers() } else { Vec::new() };
            rlaif::train_job(pool, &d.engine, &peers, &cfg.loop_, &d.owner, &d.worker, move |s, t, loss| {
                if s == t || s % 10 == 0 {
                    info!(iteration = n, step = s, steps = t, loss, "training");
                }
            })
            .instrument(span)
            .await
        }
        _ => Ok(false),
    }
}

/// Keeps enough unused training prompts for the next iteration when the daemon generates its own (ShapesWorld).
async fn top_up_prompts(d: &Arc<Daemon>, cfg: &Config) -> Result<()> {
    if cfg.daemon.prompt_source != "shapes" {
        return Ok(());
    }
    let unused = store::count_unused_train_prompts(&d.pool).await? as usize;
    let want = 2 * cfg.loop_.prompts_per_iteration;
    if unused < want {
        let total = store::count_prompts(&d.pool, "train").await? as usize;
        crate::demo::ensure_shapes_prompts(&d.pool, cfg.loop_.seed, total + want - unused, d.engine.ip.crop_width)
            .await?;
    }
    Ok(())
}

/// Keeps the served generation on the promoted checkpoint (whoever promoted it: this daemon, `rlaifd ctl
/// promote`, or another daemon on the same database) when this daemon serves, and gates candidates when it gates.
async fn checkpointer_step(d: &Arc<Daemon>, cfg: &Config) -> Result<bool> {
    let pool = &d.pool;
    if cfg.daemon.has_role("serve") {
        if let Some(p) = store::promoted(pool).await? {
            if p.id != d.serving().checkpoint.id && d.swap_due(p.id) {
                match d.hot_swap(&p).await {
                    Ok(_) => {
                        d.swap_done();
                        return Ok(true);
                    }
                    Err(e) => {
                        // This host cannot fetch or load it (the database's copy is missing, the disk is full ...):
                        // keep serving what we have and retry later. Its status is the gate's verdict, not ours.
                        let reason = format!("{e:#}");
                        let retry_s = d.swap_failed(p.id);
                        error!(checkpoint = p.id, error = %reason, retry_s, "cannot serve the promoted checkpoint yet; still serving the previous one");
                        store::event(pool, "swap_failed", &d.worker, serde_json::json!({ "checkpoint": p.id, "serving": d.serving().checkpoint.id, "error": reason, "retry_s": retry_s })).await?;
                    }
                }
            }
        }
    }
    if !cfg.daemon.has_role("gate") || d.paused.load(Ordering::SeqCst) || d.draining.load(Ordering::SeqCst) {
        return Ok(false);
    }
    let span = tracing::info_span!("gate");
    match rlaif::gate_job(pool, &d.engine, &cfg.loop_, &d.owner, &d.worker).instrument(span).await? {
        None => Ok(false),
        Some(None) => Ok(true),
        Some(Some(o)) => {
            info!(
                iteration = o.iteration,
                promoted = o.promoted,
                chair_i = o.metrics["chair_i"].as_f64(),
                cover = o.metrics["cover"].as_f64(),
                "candidate gated"
            );
            Ok(true)
        }
    }
}
