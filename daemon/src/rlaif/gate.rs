//! The evaluate stage: held-out metrics of a checkpoint (exact on ShapesWorld, labeler-estimated otherwise) and
//! the gate that promotes the candidate or rejects it.

use super::{Engine, LoopConfig};
use crate::store::{self, CheckpointRow, IterationRow};
use crate::worker::Priority;
use anyhow::{bail, Context, Result};
use engine::feedback::verify::Labeler;
use engine::tokenizer::LLAVA_15_TEMPLATE;
use sqlx::PgPool;
use std::sync::Arc;

/// Held-out metrics of a checkpoint, as stored with it. ShapesWorld: exact metrics (CHAIR, Cover, POPE) on
/// generated images. Other models: [`evaluate_with_labeler`] on the held-out prompts in the database.
pub async fn evaluate(
    pool: &PgPool,
    engine: &Arc<Engine>,
    cfg: &LoopConfig,
    c: &CheckpointRow,
) -> Result<serde_json::Value> {
    super::fetch_checkpoint(pool, engine, c).await?;
    if let Some((suite, data)) = crate::bench::parse_gate(&cfg.gate)? {
        return evaluate_on_bench(engine, cfg, c, suite, data).await;
    }
    if !engine.shapes {
        return evaluate_with_labeler(pool, engine, cfg, c).await;
    }
    let (e, c, cfg) = (engine.clone(), c.clone(), cfg.clone());
    engine
        .run(Priority::Feedback, move |slice| {
            let adapter = e.adapter(&c)?;
            let report = crate::shapes_eval::evaluate(
                &e.model,
                adapter.as_deref(),
                &e.tok,
                &e.ip,
                cfg.eval_seed,
                cfg.eval_count,
                e.ip.crop_width,
                64,
                |_| slice.yield_to_urgent(),
            )?;
            Ok(report.summary())
        })
        .await
}

/// A checkpoint's metrics on the benchmark of `loop.gate` (greedy answers, the first `eval_count` items), tagged
/// with the gate (`"gate": "objhal:FILE"`) so metrics of another gate are never compared with them.
async fn evaluate_on_bench(
    engine: &Arc<Engine>,
    cfg: &LoopConfig,
    c: &CheckpointRow,
    suite: crate::bench::Suite,
    data: std::path::PathBuf,
) -> Result<serde_json::Value> {
    let images = match cfg.gate_images.as_str() {
        "" => data.parent().map(|p| p.to_path_buf()).unwrap_or_default(),
        dir => dir.into(),
    };
    let (annotations, relation, safe_words) = match suite {
        crate::bench::Suite::Amber => crate::bench::amber_side_files(&data),
        _ => (None, None, None),
    };
    let src = crate::bench::BenchSource {
        data,
        images,
        synonyms: (!cfg.gate_synonyms.is_empty()).then(|| cfg.gate_synonyms.clone().into()),
        captions: None,
        prompt: None,
        limit: Some(cfg.eval_count),
        annotations,
        relation,
        safe_words,
    };
    let (e, c, cfg) = (engine.clone(), c.clone(), cfg.clone());
    let max_new = if suite == crate::bench::Suite::Pope { 16 } else { cfg.max_new_tokens };
    engine
        .run(Priority::Feedback, move |slice| {
            let bench = crate::bench::Bench::load(suite, &src).with_context(|| format!("loop.gate {}", cfg.gate))?;
            let adapter = e.adapter(&c)?;
            let mut m = bench.run(&e.model, adapter.as_deref(), &e.tok, max_new, |_, _, _| {
                slice.yield_to_urgent();
                Ok(())
            })?;
            m["gate"] = serde_json::json!(cfg.gate);
            Ok(m)
        })
        .await
}

/// The labeler-estimated hallucination rate of a checkpoint (models without ground truth): its greedy answers
/// to the first `eval_count` held-out prompts, split into claims, each verified by a fixed judge — the labeler
/// model when `loop.labeler` names one, else the base model (never the candidate itself, which would grade its
/// own beliefs). `hallucination_rate` = rejected claims / claims; `claims_per_answer` measures how much the
/// answers say (the gate's informativeness floor, as Cover is for ShapesWorld).
pub async fn evaluate_with_labeler(
    pool: &PgPool,
    engine: &Arc<Engine>,
    cfg: &LoopConfig,
    c: &CheckpointRow,
) -> Result<serde_json::Value> {
    let ids = store::heldout_prompts(pool, cfg.eval_count as i64).await?;
    if ids.is_empty() {
        bail!("no held-out prompts to evaluate checkpoint {} on: import some with split \"heldout\" (rlaifd ctl import-prompts)", c.id);
    }
    let mut prompts = Vec::new();
    for id in ids {
        let p = store::prompt(pool, id).await?;
        let bytes = match &p.image_sha256 {
            Some(sha) => Some(store::image_bytes(pool, sha).await?),
            None => None,
        };
        prompts.push((p.instruction, bytes));
    }
    let (e, c, max_new, loop_cfg) = (engine.clone(), c.clone(), cfg.max_new_tokens, cfg.clone());
    engine
        .run(Priority::Feedback, move |slice| {
            let adapter = e.adapter(&c)?;
            // The loop's extractor divides every checkpoint's answers alike: "self" is the base model here, so a
            // candidate never divides its own answers for its own gate.
            let extractor = e.extractor(&loop_cfg, None)?;
            let (judge_model, judge_tok) = match &e.labeler {
                Some((m, t, _)) => (m, t),
                None => (&e.model, &e.tok),
            };
            let judge = Labeler::new(judge_model, None, judge_tok, LLAVA_15_TEMPLATE)?;
            let (mut claims, mut rejected, mut answers) = (0usize, 0usize, 0usize);
            for (question, bytes) in &prompts {
                let pixels = match bytes {
                    Some(b) => Some(e.pixels(b)?),
                    None => None,
                };
                let template = if pixels.is_some() { LLAVA_15_TEMPLATE } else { engine::tokenizer::TEXT_TEMPLATE };
                let ids = e.tok.encode_chat(template, question)?;
                let params = engine::sampling::SamplingParams { temperature: 0.0, max_new_tokens: max_new, ..Default::default() };
                let req = engine::generate::GenerateRequest { ids: &ids, pixels: pixels.as_ref(), seeds: &[0], params, stop_ids: vec![] };
                let answer = engine::generate::generate(&e.model, &req, adapter.as_deref())?;
                let text = e.tok.decode(&answer[0].tokens)?;
                let found = extractor.extract(question, &text)?;
                let verdicts = judge.verify(pixels.as_ref(), &found.iter().map(|x| x.question.clone()).collect::<Vec<_>>())?;
                answers += 1;
                claims += found.len();
                rejected += verdicts.iter().filter(|v| !v.accepted).count();
                slice.yield_to_urgent();
            }
            let rate = if claims == 0 { f64::NAN } else { rejected as f64 / claims as f64 };
            Ok(serde_json::json!({ "kind": "labeler", "hallucination_rate": if rate.is_finite() { serde_json::json!(rate) } else { serde_json::Value::Null },
                "claims_per_answer": claims as f64 / answers.max(1) as f64, "answers": answers, "claims": claims, "rejected": rejected }))
        })
        .await
}

/// Whether `candidate` metrics beat `current` ones: CHAIR_i lower by the margin, and Cover no more than
/// `max_cover_drop` (relative) below the base model's (`base`), so Cover cannot erode step by step.
pub fn better(
    cfg: &LoopConfig,
    candidate: &serde_json::Value,
    current: &serde_json::Value,
    base: &serde_json::Value,
) -> (bool, String) {
    let get = |m: &serde_json::Value, k: &str| m.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
    // POPE (a benchmark gate): F1 must rise by the margin; there is no informativeness floor.
    if candidate.get("suite").and_then(|s| s.as_str()) == Some("pope") {
        let (cf, pf) = (get(candidate, "f1"), get(current, "f1"));
        if !cf.is_finite() {
            return (false, "candidate metric f1 is missing or not finite".into());
        }
        if !pf.is_finite() {
            return (true, "the current checkpoint has no metrics".into());
        }
        if cf < pf + cfg.promote_margin {
            return (false, format!("POPE f1 {cf:.4} is not above {pf:.4} by the margin {}", cfg.promote_margin));
        }
        return (true, format!("POPE f1 {pf:.4} -> {cf:.4}"));
    }
    // ShapesWorld's exact metrics or Object HalBench's CHAIR, or the labeler-estimated ones of other models.
    let (hk, ck) = if candidate.get("chair_i").is_some() {
        ("chair_i", "cover")
    } else {
        ("hallucination_rate", "claims_per_answer")
    };
    let (ci, cc) = (get(candidate, hk), get(candidate, ck));
    let pi = get(current, hk);
    let floor = get(base, ck) * (1.0 - cfg.max_cover_drop);
    if !(ci.is_finite() && cc.is_finite()) {
        return (false, format!("candidate metrics {hk}/{ck} are missing or not finite"));
    }
    if !pi.is_finite() {
        return (true, "the current checkpoint has no metrics".into());
    }
    if ci > pi - cfg.promote_margin {
        return (false, format!("{hk} {ci:.4} is not below {pi:.4} by the margin {}", cfg.promote_margin));
    }
    if floor.is_finite() && cc < floor {
        return (
            false,
            format!("{ck} {cc:.4} is below {floor:.4} ({} % under the base model's)", 100.0 * cfg.max_cover_drop),
        );
    }
    (true, format!("{hk} {pi:.4} -> {ci:.4}, {ck} {cc:.4} (floor {floor:.4})"))
}

/// Evaluates the iteration's candidate against the promoted checkpoint and promotes or rejects it; with `lease`
/// (the gate job's id and owner) only while the job is still held. Ok(None): the lease was lost and another
/// daemon gates the candidate.
pub async fn run_gate(
    pool: &PgPool,
    engine: &Arc<Engine>,
    cfg: &LoopConfig,
    it: &IterationRow,
    lease: Option<(i64, &str)>,
) -> Result<Option<(bool, serde_json::Value)>> {
    let it = store::iteration(pool, it.id).await?;
    let cand = store::checkpoint(pool, it.candidate_id.context("the iteration has no candidate yet")?).await?;
    let metrics = evaluate(pool, engine, cfg, &cand).await?;
    let current = store::promoted(pool).await?.context("no promoted checkpoint")?;
    // Metrics are compared only with metrics of the same gate: a checkpoint measured otherwise (before loop.gate
    // changed) is measured again, and the new figures are stored with it.
    let same_gate = |m: &serde_json::Value| m.get("gate") == metrics.get("gate");
    let current_metrics = match &current.metrics {
        Some(m)
            if (m.get("chair_i").is_some() || m.get("hallucination_rate").is_some() || m.get("f1").is_some())
                && same_gate(m) =>
        {
            m.clone()
        }
        _ => {
            let m = evaluate(pool, engine, cfg, &current).await?;
            store::set_metrics(pool, current.id, &m).await?;
            m
        }
    };
    let base = store::base(pool).await?;
    let base_metrics = match &base.metrics {
        _ if base.id == current.id => current_metrics.clone(),
        Some(m) if same_gate(m) => m.clone(),
        _ => {
            let m = evaluate(pool, engine, cfg, &base).await?;
            store::set_metrics(pool, base.id, &m).await?;
            m
        }
    };
    let (promote, reason) = better(cfg, &metrics, &current_metrics, &base_metrics);
    if !store::decide_leased(pool, cand.id, promote, &metrics, &reason, "checkpointer", lease).await? {
        return Ok(None);
    }
    if promote {
        crate::failpoint::hit("decided");
    }
    Ok(Some((promote, metrics)))
}

/// What one gate job decided: the iteration, whether its candidate was promoted, and its metrics.
#[derive(Clone, Debug)]
pub struct GateOutcome {
    pub iteration: i32,
    pub promoted: bool,
    pub metrics: serde_json::Value,
}

/// Runs the iteration's gate job if this daemon can claim it (exactly one daemon gates a candidate), renewing
/// its lease meanwhile. A failure returns the job to the queue; after `max_attempts` it and the iteration are
/// marked failed (the candidate keeps its status: a failure to evaluate says nothing about it). Ok(None): no
/// gate job was open.
pub async fn gate_job(
    pool: &PgPool,
    engine: &Arc<Engine>,
    cfg: &LoopConfig,
    owner: &str,
    worker: &str,
) -> Result<Option<Option<GateOutcome>>> {
    let Some(job) = store::claim_stage_job(pool, store::JobKind::Gate, owner, worker, cfg.lease_s).await? else {
        return Ok(None);
    };
    let it = store::iteration(pool, job.iteration_id).await?;
    if it.stage != store::Stage::Evaluating {
        store::abandon_stage_job(pool, &job, "the iteration is past evaluation").await?;
        return Ok(Some(None));
    }
    let keeper = super::renew_lease_while(pool, job.id, owner, cfg.lease_s);
    let r = run_gate(pool, engine, cfg, &it, Some((job.id, owner))).await;
    drop(keeper);
    match r {
        Ok(Some((promoted, metrics))) => Ok(Some(Some(GateOutcome { iteration: it.number, promoted, metrics }))),
        Ok(None) => Ok(Some(None)),
        Err(e) => {
            let reason = format!("{e:#}");
            tracing::warn!(iteration = it.number, attempt = job.attempts, error = %reason, "gating failed");
            store::fail_stage_job(pool, &job, owner, &reason, cfg.max_attempts).await?;
            Ok(Some(None))
        }
    }
}
