//! The label stage: the stored answers of a prompt split into claims, each claim verified by the labeler, the
//! answers scored and paired, and each pair given its reference log-probs.

use super::sample::prompt_pixels;
use super::{Engine, LoopConfig};
use crate::store::{self, Job, NewClaim, NewPair};
use crate::worker::Priority;
use anyhow::{bail, Result};
use engine::feedback::pipeline::{label_answers_with, LabeledAnswer};
use engine::feedback::verify::Labeler;
use engine::generate::FinishReason;
use engine::tokenizer::LLAVA_15_TEMPLATE;
use sqlx::PgPool;
use std::sync::Arc;

/// Labels one claimed label job: claims and verdicts for the prompt's answers, scores, pairs with reference
/// log-probs. Returns whether its result was stored.
pub async fn run_label_job(
    pool: &PgPool,
    engine: &Arc<Engine>,
    cfg: &LoopConfig,
    job: &Job,
    owner: &str,
) -> Result<bool> {
    let it = store::iteration(pool, job.iteration_id).await?;
    let policy_row = store::checkpoint(pool, it.policy_id).await?;
    let reference_row = store::checkpoint(pool, it.reference_id).await?;
    let labeler_row = if cfg.labeler == "self" { policy_row.clone() } else { store::base(pool).await? };
    super::fetch_checkpoint(pool, engine, &labeler_row).await?;
    super::fetch_checkpoint(pool, engine, &reference_row).await?;
    if !matches!(cfg.labeler.as_str(), "self" | "base") && engine.labeler.is_none() {
        bail!("loop.labeler = {:?} names a model directory, but the engine was loaded without it", cfg.labeler);
    }
    let prompt = store::prompt(pool, job.prompt_id).await?;
    let pixels = prompt_pixels(pool, engine, &prompt).await?;
    let seeds = cfg.answer_seeds(it.number, prompt.id);
    let stored = store::responses(pool, prompt.id, it.policy_id, &seeds).await?;
    if stored.len() != seeds.len() {
        bail!(
            "prompt {}: {} of {} answers are stored for checkpoint {}",
            prompt.id,
            stored.len(),
            seeds.len(),
            it.policy_id
        );
    }
    let answers: Vec<LabeledAnswer> = stored
        .iter()
        .map(|r| LabeledAnswer {
            seed: r.seed as u64,
            text: r.text.clone(),
            tokens: r.tokens.iter().map(|&t| t as u32).collect(),
            finish: if r.finish == "stop" { FinishReason::Stop } else { FinishReason::Length },
            claims: Vec::new(),
            verdicts: Vec::new(),
            score: None,
        })
        .collect();
    let ids: Vec<i64> = stored.iter().map(|r| r.id).collect();
    let (e, question, k, pair_seed, rule, loop_cfg) = (
        engine.clone(),
        prompt.instruction.clone(),
        cfg.pairs_per_prompt,
        cfg.pair_seed(it.number, prompt.id),
        cfg.pair_rule,
        cfg.clone(),
    );
    if cfg.extractor == "llm" && cfg.extractor_model == "self" {
        super::fetch_checkpoint(pool, engine, &policy_row).await?;
    }
    let labeler_name = match cfg.labeler.as_str() {
        "self" => format!("self:{}", policy_row.id),
        "base" => "base".to_string(),
        dir => format!("model:{dir}"),
    };
    let (labeled, pairs, extractor_name) = engine
        .run(Priority::Feedback, move |_| {
            let lab_adapter = match &e.labeler {
                Some(_) => None,
                None => e.adapter(&labeler_row)?,
            };
            let labeler = match &e.labeler {
                Some((m, tok, _)) => Labeler::new(m, None, tok, LLAVA_15_TEMPLATE)?,
                None => Labeler::new(&e.model, lab_adapter.as_deref(), &e.tok, LLAVA_15_TEMPLATE)?,
            };
            let policy_adapter = if loop_cfg.extractor == "llm" { e.adapter(&policy_row)? } else { None };
            let extractor = e.extractor(&loop_cfg, policy_adapter.as_deref())?;
            let fb = label_answers_with(
                &labeler,
                extractor.as_ref(),
                pixels.as_deref(),
                &question,
                answers,
                k,
                pair_seed,
                rule,
            )?;
            let ref_adapter = e.adapter(&reference_row)?;
            let prompt_ids = e.tok.encode_chat(LLAVA_15_TEMPLATE, &question)?;
            let feats = match &pixels {
                Some(px) => Some(e.model.image_features(px, ref_adapter.as_deref())?),
                None => None,
            };
            let eos = *e.model.llm.cfg.eos_token_ids.first().unwrap_or(&2);
            let logp = |a: &LabeledAnswer| -> Result<f64> {
                Ok(e.model.answer_logp(&prompt_ids, &answer_ids(a, eos), feats.as_ref(), ref_adapter.as_deref())?)
            };
            let mut pairs = Vec::new();
            for &(c, r) in &fb.pairs {
                let (ca, ra) = (&fb.answers[c], &fb.answers[r]);
                let gap = ca.score.unwrap_or(0) - ra.score.unwrap_or(0);
                pairs.push(NewPair {
                    chosen_id: ids[c],
                    rejected_id: ids[r],
                    score_gap: gap,
                    ref_logp_chosen: logp(ca)?,
                    ref_logp_rejected: logp(ra)?,
                });
            }
            let labeled: Vec<(i64, Option<i64>, Vec<NewClaim>)> = fb
                .answers
                .iter()
                .zip(&ids)
                .map(|(a, &id)| {
                    let claims = a
                        .claims
                        .iter()
                        .zip(&a.verdicts)
                        .map(|(c, v)| NewClaim {
                            claim: c.text.clone(),
                            question: c.question.clone(),
                            p_yes: v.p_yes,
                            p_no: v.p_no,
                            accepted: v.accepted,
                        })
                        .collect();
                    (id, a.score, claims)
                })
                .collect();
            Ok((labeled, pairs, extractor.name()))
        })
        .await?;
    store::finish_label(pool, job, owner, &labeler_name, &extractor_name, it.reference_id, &labeled, &pairs).await
}

/// The answer's training ids: its tokens, plus EOS when it ended by itself.
fn answer_ids(a: &LabeledAnswer, eos: u32) -> Vec<u32> {
    let mut ids = a.tokens.clone();
    if a.finish == FinishReason::Stop {
        ids.push(eos);
    }
    ids
}
