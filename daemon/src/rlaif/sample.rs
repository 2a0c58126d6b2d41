//! The sample stage: n answers per prompt from the iteration's policy, with one recorded seed each.

use super::{Engine, LoopConfig};
use crate::store::{self, Job, NewResponse};
use crate::worker::Priority;
use anyhow::Result;
use engine::feedback::pipeline::{sample_answers, Policy};
use engine::generate::FinishReason;
use engine::image::PixelValues;
use engine::tokenizer::LLAVA_15_TEMPLATE;
use sqlx::PgPool;
use std::sync::Arc;

pub(super) async fn prompt_pixels(
    pool: &PgPool,
    engine: &Arc<Engine>,
    p: &store::PromptRow,
) -> Result<Option<Arc<PixelValues>>> {
    match &p.image_sha256 {
        Some(sha) => {
            let bytes = store::image_bytes(pool, sha).await?;
            let e = engine.clone();
            Ok(Some(Arc::new(engine.run(Priority::Feedback, move |_| e.pixels(&bytes)).await?)))
        }
        None => Ok(None),
    }
}

fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// Samples one claimed sample job. Returns whether its result was stored (false: the lease was lost).
pub async fn run_sample_job(
    pool: &PgPool,
    engine: &Arc<Engine>,
    cfg: &LoopConfig,
    job: &Job,
    owner: &str,
) -> Result<bool> {
    let it = store::iteration(pool, job.iteration_id).await?;
    let policy_row = store::checkpoint(pool, it.policy_id).await?;
    let prompt = store::prompt(pool, job.prompt_id).await?;
    let pixels = prompt_pixels(pool, engine, &prompt).await?;
    let seeds = cfg.answer_seeds(it.number, prompt.id);
    super::fetch_checkpoint(pool, engine, &policy_row).await?;
    let (e, fcfg, question) = (engine.clone(), cfg.feedback(), prompt.instruction.clone());
    let answers = engine
        .run(Priority::Feedback, move |_| {
            let adapter = e.adapter(&policy_row)?;
            let policy =
                Policy { model: &e.model, adapter: adapter.as_deref(), tokenizer: &e.tok, template: LLAVA_15_TEMPLATE };
            Ok(sample_answers(&policy, pixels.as_deref(), &question, &seeds, &fcfg)?)
        })
        .await?;
    let rows: Vec<NewResponse> = answers
        .into_iter()
        .map(|a| NewResponse { seed: a.seed, text: a.text, tokens: a.tokens, finish: finish_name(a.finish).into() })
        .collect();
    let decoding =
        serde_json::json!({ "temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens });
    store::finish_sample(pool, job, owner, it.policy_id, &decoding, &rows).await
}
