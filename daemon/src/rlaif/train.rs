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
use engine::train::trainer::{steps_per_epoch, train_dpo, TrainConfig};
use sqlx::PgPool;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Trains the iteration's candidate with DPO on its pairs (length-balanced), starting from the policy's adapter
/// (or a fresh LoRA on the base), saves it atomically under the state directory and records it. Idempotent.
pub async fn run_training(
    pool: &PgPool,
    engine: &Arc<Engine>,
    cfg: &LoopConfig,
    it: &IterationRow,
    mut progress: impl FnMut(usize, usize, f64) + Send + 'static,
) -> Result<CheckpointRow> {
    if let Some(c) = store::iteration(pool, it.id).await?.candidate_id {
        return store::checkpoint(pool, c).await;
    }
    let started = chrono::Utc::now();
    let policy_row = store::checkpoint(pool, it.policy_id).await?;
    let pairs = store::iteration_pairs(pool, it.id).await?;
    if pairs.is_empty() {
        bail!("iteration {} has no pairs to train on", it.number);
    }
    let words = |s: &str| s.split_whitespace().count();
    let balance =
        length_balance(&pairs.iter().map(|p| (words(&p.chosen_text), words(&p.rejected_text))).collect::<Vec<_>>());
    let kept: Vec<&store::PairRow> =
        pairs.iter().zip(&balance.keep).filter(|(_, k)| **k || !cfg.length_balance).map(|(p, _)| p).collect();
    let mut encoded: HashMap<String, Vec<u8>> = HashMap::new();
    for p in &kept {
        if let Some(sha) = &p.image_sha256 {
            if !encoded.contains_key(sha) {
                encoded.insert(sha.clone(), store::image_bytes(pool, sha).await?);
            }
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
    let out_dir = engine.state_dir.join("checkpoints").join(format!("iter-{:04}", it.number));
    let (e, c) = (engine.clone(), cfg.clone());
    let dir = out_dir.clone();
    let (steps, losses) = engine.run(Priority::Train, move |slice| {
        let mut adapter = match e.adapter(&policy_row)? {
            Some(a) => e.model.load_adapter(&a.path)?,
            None => {
                let spec = LoraSpec { r: c.lora_r, lora_alpha: c.lora_alpha, ..LoraSpec::default() };
                e.model.create_adapter(&spec, c.seed ^ it_seed(&dir))?
            }
        };
        let tp: Vec<TokenPair> = owned.iter().map(|(p, ch, rj, px, _)| TokenPair { pixels: px.as_deref(), prompt_ids: p, chosen_ids: ch, rejected_ids: rj }).collect();
        let refs: Vec<(f64, f64)> = owned.iter().map(|o| o.4).collect();
        let tcfg = TrainConfig { dpo: DpoConfig { beta: c.beta, nll_weight: c.nll_weight, ..Default::default() }, epochs: c.epochs, batch_size: c.batch_size, seed: c.seed };
        let total = steps_per_epoch(tp.len(), c.batch_size) * c.epochs;
        let mut opt = AdamW::new(AdamWConfig { lr: c.lr, warmup_steps: (0.05 * total as f64).ceil() as usize, total_steps: total, ..Default::default() });
        let mut losses = Vec::new();
        train_dpo(&e.model, &mut adapter, &tp, &refs, &tcfg, &mut opt, None, |log| {
            losses.push(serde_json::json!({ "step": log.step, "loss": log.loss, "reward_accuracy": log.reward_accuracy, "reward_margin": log.reward_margin }));
            progress(log.step, log.total_steps, log.loss);
            // Training runs in slices: serving requests queued meanwhile run between optimizer steps.
            slice.yield_to_urgent();
        })?;
        if losses.iter().any(|l| !l["loss"].as_f64().is_some_and(f64::is_finite)) {
            bail!("training diverged (non-finite loss); candidate discarded");
        }
        // A directory left by a crashed attempt of this iteration is an orphan (no row names it): replace it.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove stale {}", dir.display()))?;
        }
        adapter.save(&dir, &e.model.dir, &[])?;
        Ok((total, losses))
    })
    .await?;
    crate::failpoint::hit("train_saved");
    let sha = adapter_sha256(&out_dir)?;
    let train_cfg = serde_json::json!({ "beta": cfg.beta, "nll_weight": cfg.nll_weight, "lr": cfg.lr, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lora_r": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha, "reference": cfg.reference, "length_balance_r": if cfg.length_balance { Some(balance.r) } else { None }, "pairs_total": pairs.len() });
    store::add_candidate(
        pool,
        it,
        &out_dir.display().to_string(),
        &sha,
        &pair_ids,
        steps as i32,
        &serde_json::Value::Array(losses),
        &train_cfg,
        started,
    )
    .await
}

/// `run_training`, marking the iteration failed (with the reason in `events`) when training fails; the error is
/// returned after it is recorded.
pub async fn train_or_fail(
    pool: &PgPool,
    engine: &Arc<Engine>,
    cfg: &LoopConfig,
    it: &IterationRow,
    progress: impl FnMut(usize, usize, f64) + Send + 'static,
) -> Result<CheckpointRow> {
    match run_training(pool, engine, cfg, it, progress).await {
        Ok(c) => Ok(c),
        Err(e) => {
            store::set_stage(pool, it.id, store::Stage::Failed).await?;
            store::event(
                pool,
                "iteration_failed",
                "trainer",
                serde_json::json!({ "iteration": it.number, "reason": format!("{e:#}") }),
            )
            .await?;
            Err(e)
        }
    }
}

/// The seed of a new adapter's weights, from its directory name (kept: the BENCHMARKS figures were measured with it).
fn it_seed(dir: &Path) -> u64 {
    dir.file_name()
        .and_then(|n| n.to_str())
        .map_or(0, |n| n.bytes().fold(0u64, |h, b| h.wrapping_mul(131).wrapping_add(b as u64)))
}
