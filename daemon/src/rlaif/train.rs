//! The train stage: DPO on the iteration's (length-balanced) pairs, starting from the policy's adapter, saved
//! under the state directory and recorded as the iteration's candidate.

use super::{adapter_sha256, Engine, LoopConfig};
use crate::store::{self, CheckpointRow, IterationRow};
use crate::worker::Priority;
use anyhow::{bail, Context, Result};
use engine::adapter::LoraSpec;
use engine::feedback::pairs::length_balance;
use engine::image::PixelValues;
use engine::tokenizer::LLAVA_15_TEMPLATE;
use engine::train::dpo::{DpoConfig, TokenPair};
use engine::train::optim::{AdamW, AdamWConfig};
use engine::train::parallel::train_dpo_parallel_with;
use engine::train::trainer::{steps_per_epoch, train_dpo, TrainConfig};
use engine::weights::f32_safetensors_bytes;
use sqlx::PgPool;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tracing::{info, warn};

/// The train job this run holds: its lease is renewed while the run goes on, its saved states go to the
/// database (a trainer that takes the job over resumes from the last one), and the candidate is recorded only
/// while the lease is still this daemon's.
#[derive(Clone, Debug)]
pub struct TrainLease {
    pub job: i64,
    pub owner: String,
    /// host:pid:device, recorded with the saved states.
    pub worker: String,
    /// The job's attempt (1: the first daemon to train it).
    pub attempt: i32,
}

/// A saved training state on its way to the database: its step and its directory's files.
type SavedState = (usize, Vec<(String, Vec<u8>)>);

/// What a saved training state says about its run (trainer_state.json), checked before resuming from it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct LoopTrainState {
    step: usize,
    total_steps: usize,
    pair_ids: Vec<i64>,
    /// The imported pairs (`loop.imported_pairs`) trained on after the iteration's own.
    #[serde(default)]
    imported_pair_ids: Vec<i64>,
    train: TrainConfig,
    optim: AdamWConfig,
    losses: Vec<serde_json::Value>,
    #[serde(default)]
    loss_scale: Option<engine::cuda::LossScaler>,
}

/// A training run's verdict when it did not produce a candidate because of what it trained on (retrying gives
/// the same): the iteration fails at once instead of after `max_attempts`.
#[derive(Debug)]
pub struct Diverged(pub String);

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Diverged {}

/// Trains the iteration's candidate with DPO on its pairs (length-balanced), starting from the policy's adapter
/// (or a fresh LoRA on the base), in chunks of `save_every` steps, each chunk's state saved to the database
/// under `lease`; resumes from the last saved state when one exists (a previous holder of the job died). The
/// adapter is saved under the state directory and recorded, with its files, as the iteration's candidate.
/// Idempotent. Ok(None): the lease was lost to another daemon, which carries the run on. With `peers` (this
/// daemon's other GPU engines, `loop.data_parallel`) each chunk trains data-parallel over `engine` and them.
#[allow(clippy::too_many_arguments)]
pub async fn run_training(
    pool: &PgPool,
    engine: &Arc<Engine>,
    peers: &[Arc<Engine>],
    cfg: &LoopConfig,
    it: &IterationRow,
    lease: Option<&TrainLease>,
    mut progress: impl FnMut(usize, usize, f64) + Send + 'static,
) -> Result<Option<CheckpointRow>> {
    if let Some(c) = store::iteration(pool, it.id).await?.candidate_id {
        return store::checkpoint(pool, c).await.map(Some);
    }
    let started = chrono::Utc::now();
    let policy_row = store::checkpoint(pool, it.policy_id).await?;
    super::fetch_checkpoint(pool, engine, &policy_row).await?;
    let pairs = store::iteration_pairs(pool, it.id).await?;
    let imported = store::imported_pairs_for_iteration(pool, it.number, cfg.imported_pairs).await?;
    if pairs.is_empty() && imported.is_empty() {
        bail!("iteration {} has no pairs to train on", it.number);
    }
    let words = |s: &str| s.split_whitespace().count();
    let balance =
        length_balance(&pairs.iter().map(|p| (words(&p.chosen_text), words(&p.rejected_text))).collect::<Vec<_>>());
    let kept: Vec<&store::PairRow> =
        pairs.iter().zip(&balance.keep).filter(|(_, k)| **k || !cfg.length_balance).map(|(p, _)| p).collect();
    let mut encoded: HashMap<String, Vec<u8>> = HashMap::new();
    for sha in kept.iter().map(|p| &p.image_sha256).chain(imported.iter().map(|p| &p.image_sha256)).flatten() {
        if !encoded.contains_key(sha) {
            encoded.insert(sha.clone(), store::image_bytes(pool, sha).await?);
        }
    }
    // Decoding and preprocessing is CPU work: off the async runtime.
    let e = engine.clone();
    let images: HashMap<String, Arc<PixelValues>> = engine
        .run(Priority::Feedback, move |_| {
            encoded.into_iter().map(|(sha, b)| Ok((sha, Arc::new(e.pixels(&b)?)))).collect()
        })
        .await?;
    let eos = *engine.model.llm.cfg.eos_token_ids.first().unwrap_or(&2);
    // (prompt ids, chosen ids, rejected ids, image, reference log-probs)
    type Owned = (Vec<u32>, Vec<u32>, Vec<u32>, Option<Arc<PixelValues>>, (f64, f64));
    let mut owned: Vec<Owned> = Vec::new();
    for p in &kept {
        let prompt_ids = engine.tok.encode_chat(LLAVA_15_TEMPLATE, &p.instruction)?;
        // Stored tokens exclude EOS; answers that ended by themselves get it back for training.
        let ids = |t: &[i32], finish: &str| -> Vec<u32> {
            let mut v: Vec<u32> = t.iter().map(|&x| x as u32).collect();
            if finish == "stop" {
                v.push(eos);
            }
            v
        };
        owned.push((
            prompt_ids,
            ids(&p.chosen_tokens, &p.chosen_finish),
            ids(&p.rejected_tokens, &p.rejected_finish),
            p.image_sha256.as_ref().and_then(|s| images.get(s).cloned()),
            (p.ref_logp_chosen, p.ref_logp_rejected),
        ));
    }
    let pair_ids: Vec<i64> = kept.iter().map(|p| p.id).collect();
    // Imported pairs: text answers, tokenized here and given their reference log-probs under the iteration's
    // reference (as the label stage gives the loop's own pairs); one that does not fit the context is left out.
    let mut imported_ids = Vec::new();
    if !imported.is_empty() {
        let reference_row = store::checkpoint(pool, it.reference_id).await?;
        super::fetch_checkpoint(pool, engine, &reference_row).await?;
        let (e, imgs) = (engine.clone(), images.clone());
        let done: Vec<(i64, Owned)> = engine
            .run(Priority::Feedback, move |_| {
                let ref_adapter = e.adapter(&reference_row)?;
                let ctx = e.model.context_len();
                let mut out = Vec::with_capacity(imported.len());
                for p in &imported {
                    let chat = e.tok.chat_text(LLAVA_15_TEMPLATE, &p.instruction)?;
                    let prompt_ids = e.tok.encode(&chat.text, chat.special)?;
                    let answer = |a: &str| -> Result<Vec<u32>> {
                        let mut ids = e.tok.encode_answer(&chat, &prompt_ids, a)?;
                        ids.push(eos);
                        Ok(ids)
                    };
                    let (chosen, rejected) = (answer(&p.chosen)?, answer(&p.rejected)?);
                    let longest = e.model.prompt_positions(&prompt_ids) + chosen.len().max(rejected.len());
                    if longest > ctx {
                        warn!(
                            pair = p.id,
                            tokens = longest,
                            context = ctx,
                            "an imported pair does not fit the model's context; left out"
                        );
                        continue;
                    }
                    let px = p.image_sha256.as_ref().and_then(|s| imgs.get(s).cloned());
                    let feats = match &px {
                        Some(px) => Some(e.model.image_features(px, ref_adapter.as_deref())?),
                        None => None,
                    };
                    let logp = |a: &[u32]| e.model.answer_logp(&prompt_ids, a, feats.as_ref(), ref_adapter.as_deref());
                    let refs = (logp(&chosen)?, logp(&rejected)?);
                    out.push((p.id, (prompt_ids.clone(), chosen, rejected, px, refs)));
                }
                Ok(out)
            })
            .await?;
        for (id, o) in done {
            imported_ids.push(id);
            owned.push(o);
        }
        info!(
            iteration = it.number,
            own = pair_ids.len(),
            imported = imported_ids.len(),
            "training on imported pairs too"
        );
        if owned.is_empty() {
            bail!("iteration {} has no pairs to train on (no imported pair fits the model's context)", it.number);
        }
    }
    let out_dir = engine.state_dir.join("checkpoints").join(format!("iter-{:04}", it.number));
    let run_dir = engine.state_dir.join("train").join(format!("iter-{:04}", it.number));
    // A saved state of this run in the database (its previous holder died): fetch it to resume from.
    let resume = match lease {
        Some(_) => match store::training_state(pool, it.id).await? {
            Some((step, refs)) => {
                let mut files = Vec::with_capacity(refs.len());
                for f in &refs {
                    files.push((f.name.clone(), store::blob(pool, &f.sha256).await?));
                }
                let dir = run_dir.clone();
                tokio::task::spawn_blocking(move || super::write_dir_atomically(&dir, &files)).await??;
                Some(step)
            }
            None => None,
        },
        None => None,
    };
    // The lease's keeper: renews it, uploads each saved state, and flags a lost lease to the training loop.
    let lost = Arc::new(AtomicBool::new(false));
    let (save_tx, save_rx) = tokio::sync::mpsc::unbounded_channel::<SavedState>();
    let keeper = lease.map(|l| {
        super::AbortOnDrop(tokio::spawn(keep_lease(pool.clone(), l.clone(), it.id, cfg.lease_s, save_rx, lost.clone())))
    });
    let (e, c, peers) = (engine.clone(), cfg.clone(), peers.to_vec());
    let (dir, rdir, ids_for_state, lost_in) = (out_dir.clone(), run_dir.clone(), pair_ids.clone(), lost.clone());
    let imported_for_state = imported_ids.clone();
    let saving = lease.is_some() && cfg.save_every > 0;
    let first_attempt = lease.is_some_and(|l| l.attempt == 1);
    let result = engine.run(Priority::Train, move |slice| {
        let tp: Vec<TokenPair> = owned.iter().map(|(p, ch, rj, px, _)| TokenPair { pixels: px.as_deref(), prompt_ids: p, chosen_ids: ch, rejected_ids: rj }).collect();
        let refs: Vec<(f64, f64)> = owned.iter().map(|o| o.4).collect();
        let tcfg = TrainConfig { dpo: DpoConfig { beta: c.beta, loss: c.loss, label_smoothing: c.label_smoothing, nll_weight: c.nll_weight }, epochs: c.epochs, batch_size: c.batch_size, seed: c.seed };
        let total = steps_per_epoch(tp.len(), c.batch_size) * c.epochs;
        let ocfg = AdamWConfig { lr: c.lr, warmup_steps: (0.05 * total as f64).ceil() as usize, total_steps: total, ..Default::default() };
        let mut opt = AdamW::new(ocfg.clone());
        let mut losses = Vec::new();
        // A saved state of other pairs or settings (the configuration was reloaded meanwhile) is not resumed:
        // the run starts over.
        let saved = match resume {
            Some(step) => {
                let state: LoopTrainState = serde_json::from_slice(&std::fs::read(rdir.join("trainer_state.json")).context("the saved training state has no trainer_state.json")?)
                    .context("the saved training state's trainer_state.json is invalid")?;
                if state.step != step as usize || state.pair_ids != ids_for_state || state.imported_pair_ids != imported_for_state || state.train != tcfg || state.optim != ocfg {
                    warn!(step = state.step, "the saved training state is of other pairs or settings; training from the start");
                    None
                } else {
                    Some(state)
                }
            }
            None => None,
        };
        let resumed_at = saved.as_ref().map(|s| s.step);
        let mut adapter = match saved {
            Some(state) => {
                let store = engine::weights::WeightStore::open_files(&[rdir.join("optimizer.safetensors")])?;
                opt.load_state(state.step, &store)?;
                opt.scaler = state.loss_scale.clone();
                losses = state.losses;
                info!(step = state.step, total, "resuming training from the state saved in the database");
                e.model.load_adapter(&rdir)?
            }
            None => match e.adapter(&policy_row)? {
                Some(a) => e.model.load_adapter(&a.path)?,
                None => {
                    let mut spec = LoraSpec { r: c.lora_r, lora_alpha: c.lora_alpha, ..LoraSpec::default() };
                    if !c.lora_targets.is_empty() {
                        spec.target_modules = engine::adapter::TargetModules::Regex(c.lora_targets.clone());
                    }
                    if c.tuning == "full" {
                        spec = e.model.full_parameter_spec();
                    }
                    e.model.create_adapter(&spec, c.seed ^ it_seed(&dir))?
                }
            },
        };
        // Data-parallel over this daemon's GPUs when every one of them can train the adapter.
        let mut models: Vec<&engine::Model> = vec![&e.model];
        models.extend(peers.iter().map(|p| &p.model));
        let refused = models.iter().map(|m| m.training_placement("DPO", &adapter)).find(|p| !p.on_device());
        if models.len() > 1 {
            match refused {
                None => info!(devices = models.len(), "training data-parallel on {} GPUs", models.len()),
                Some(p) => {
                    warn!(placement = %p, "not every GPU can train this adapter: training on the first device only");
                    models.truncate(1);
                }
            }
        }
        // The GPU trainer holds its device for a whole chunk: work queued for it (a chat request) would wait on
        // the device's lock inside this thread, so requests are served between chunks instead.
        let on_device = e.model.training_placement("DPO", &adapter).on_device();
        while opt.step < total {
            if lost_in.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let chunk_end = if saving { (opt.step + c.save_every).min(total) } else { total };
            let on_step = |log: &engine::train::trainer::StepLog| {
                losses.push(serde_json::json!({ "step": log.step, "loss": log.loss, "reward_accuracy": log.reward_accuracy, "reward_margin": log.reward_margin }));
                progress(log.step, log.total_steps, log.loss);
                // Training runs in slices: serving requests queued meanwhile run between optimizer steps.
                if !on_device {
                    slice.yield_to_urgent();
                }
            };
            if models.len() > 1 {
                // The other devices' engine threads wait for their device while this run holds it: each rank's
                // steps answer their heartbeats (the watchdog's), as the training thread answers its own.
                let vouch = |r: usize| {
                    if let Some(p) = peers.get(r.wrapping_sub(1)) {
                        p.worker.vouch();
                    }
                };
                train_dpo_parallel_with(
                    &models,
                    &mut adapter,
                    &tp,
                    &refs,
                    &tcfg,
                    &mut opt,
                    Some(chunk_end),
                    &vouch,
                    on_step,
                )?;
            } else {
                train_dpo(&e.model, &mut adapter, &tp, &refs, &tcfg, &mut opt, Some(chunk_end), on_step)?;
            }
            if on_device {
                slice.yield_to_urgent();
            }
            if losses.iter().any(|l| !l["loss"].as_f64().is_some_and(f64::is_finite)) {
                return Err(anyhow::Error::new(Diverged("training diverged (non-finite loss); candidate discarded".into())));
            }
            if saving && opt.step < total {
                let state = LoopTrainState { step: opt.step, total_steps: total, pair_ids: ids_for_state.clone(), imported_pair_ids: imported_for_state.clone(), train: tcfg.clone(), optim: ocfg.clone(), losses: losses.clone(), loss_scale: opt.scaler.clone() };
                let optim = f32_safetensors_bytes(&rdir.join("optimizer.safetensors"), &opt.state_tensors())?;
                adapter.save(&rdir, &e.model.dir, &[("optimizer.safetensors", optim), ("trainer_state.json", serde_json::to_vec_pretty(&state)?)])?;
                let _ = save_tx.send((opt.step, super::dir_files(&rdir)?));
                // Crash test: the first trainer stops here, holding the lease, until it is killed.
                if first_attempt {
                    crate::failpoint::stall("train_chunk_saved");
                }
            }
        }
        // A directory left by a crashed attempt of this iteration is an orphan (no row names it): replace it.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove stale {}", dir.display()))?;
        }
        adapter.save(&dir, &e.model.dir, &[])?;
        Ok(Some((total, losses, resumed_at, models.len())))
    })
    .await;
    drop(keeper);
    let Some((steps, losses, resumed_at, devices)) = result? else {
        warn!(iteration = it.number, "lost the train job's lease: another daemon carries the run on");
        return Ok(None);
    };
    crate::failpoint::hit("train_saved");
    let sha = adapter_sha256(&out_dir)?;
    let files = super::dir_files(&out_dir)?;
    let train_cfg = serde_json::json!({ "beta": cfg.beta, "loss": cfg.loss, "label_smoothing": cfg.label_smoothing, "nll_weight": cfg.nll_weight, "lr": cfg.lr, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lora_r": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha, "lora_targets": cfg.lora_targets, "tuning": cfg.tuning, "reference": cfg.reference, "length_balance_r": if cfg.length_balance { Some(balance.r) } else { None }, "pairs_total": pairs.len(), "imported_pairs": imported_ids.len(),
        "resumed_from_step": resumed_at, "devices": devices });
    let path = out_dir.display().to_string();
    let losses = serde_json::Value::Array(losses);
    let cand = store::NewCandidate {
        path: &path,
        sha256: &sha,
        files: &files,
        pair_ids: &pair_ids,
        imported_pair_ids: &imported_ids,
        steps: steps as i32,
        losses: &losses,
        config: &train_cfg,
        started_at: started,
    };
    let row = store::add_candidate(pool, it, &cand, lease.map(|l| (l.job, l.owner.as_str()))).await?;
    if row.is_some() {
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    Ok(row)
}

/// Renews `lease` every third of `lease_s` and stores each saved state the training loop sends; sets `lost` when
/// the lease is gone. A database outage is waited out (the lease may expire meanwhile; the candidate is then
/// refused when it is recorded).
async fn keep_lease(
    pool: PgPool,
    lease: TrainLease,
    iteration_id: i64,
    lease_s: f64,
    mut saves: tokio::sync::mpsc::UnboundedReceiver<SavedState>,
    lost: Arc<AtomicBool>,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs_f64((lease_s / 3.0).max(0.2)));
    loop {
        tokio::select! {
            _ = tick.tick() => match store::renew_lease(&pool, lease.job, &lease.owner, lease_s).await {
                Ok(true) => {}
                Ok(false) => { lost.store(true, Ordering::SeqCst); return; }
                Err(e) => warn!(error = %format!("{e:#}"), "cannot renew the train job's lease; retrying"),
            },
            m = saves.recv() => {
                let Some((step, files)) = m else { return };
                match store::save_training_state(&pool, lease.job, &lease.owner, iteration_id, step, &lease.worker, &files).await {
                    Ok(true) => tracing::debug!(step, "training state saved to the database"),
                    Ok(false) => { lost.store(true, Ordering::SeqCst); return; }
                    Err(e) => warn!(step, error = %format!("{e:#}"), "cannot save the training state to the database; the next save retries"),
                }
            }
        }
    }
}

/// Runs the iteration's train job if this daemon can claim it: trains (or resumes) the candidate under the job's
/// lease. A failure returns the job to the queue for any daemon to retry; after `max_attempts` (at once for a
/// diverged run) the job and the iteration are marked failed. Returns whether a job was claimed.
#[allow(clippy::too_many_arguments)]
pub async fn train_job(
    pool: &PgPool,
    engine: &Arc<Engine>,
    peers: &[Arc<Engine>],
    cfg: &LoopConfig,
    owner: &str,
    worker: &str,
    progress: impl FnMut(usize, usize, f64) + Send + 'static,
) -> Result<bool> {
    let Some(job) = store::claim_stage_job(pool, store::JobKind::Train, owner, worker, cfg.lease_s).await? else {
        return Ok(false);
    };
    let it = store::iteration(pool, job.iteration_id).await?;
    if it.stage != store::Stage::Training {
        // Trained already (a holder that finished after its lease expired): nothing left to do.
        store::abandon_stage_job(pool, &job, "the iteration is past training").await?;
        return Ok(true);
    }
    if job.attempts > 1 {
        info!(iteration = it.number, attempt = job.attempts, "taking over the iteration's training");
    }
    let lease = TrainLease { job: job.id, owner: owner.to_string(), worker: worker.to_string(), attempt: job.attempts };
    match run_training(pool, engine, peers, cfg, &it, Some(&lease), progress).await {
        Ok(_) => Ok(true),
        Err(e) => {
            let reason = format!("{e:#}");
            let diverged = e.downcast_ref::<Diverged>().is_some();
            let max = if diverged { 1 } else { cfg.max_attempts };
            warn!(iteration = it.number, attempt = job.attempts, error = %reason, "training failed");
            store::fail_stage_job(pool, &job, owner, &reason, max).await?;
            Ok(true)
        }
    }
}

/// The seed of a new adapter's weights, from its directory name (kept: the BENCHMARKS figures were measured with it).
fn it_seed(dir: &Path) -> u64 {
    dir.file_name()
        .and_then(|n| n.to_str())
        .map_or(0, |n| n.bytes().fold(0u64, |h, b| h.wrapping_mul(131).wrapping_add(b as u64)))
}
