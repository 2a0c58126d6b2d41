//! Iterations: started from the promoted checkpoint, moved through their stages.

use super::events::event;
use super::kinds::Stage;
use anyhow::{Context, Result};
use sqlx::PgPool;

#[derive(Clone, Debug, PartialEq, sqlx::FromRow, serde::Serialize)]
pub struct IterationRow {
    pub id: i64,
    pub number: i32,
    pub policy_id: i64,
    pub reference_id: i64,
    pub stage: Stage,
    pub candidate_id: Option<i64>,
    pub config: serde_json::Value,
}

const ITERATION_COLS: &str = "id, number, policy_id, reference_id, stage, candidate_id, config";

/// The iteration still in progress (not done or failed), if any.
pub async fn open_iteration(pool: &PgPool) -> Result<Option<IterationRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {ITERATION_COLS} FROM iterations WHERE stage NOT IN ('done', 'failed') ORDER BY number LIMIT 1"
    ))
    .fetch_optional(pool)
    .await?)
}

pub async fn iteration(pool: &PgPool, id: i64) -> Result<IterationRow> {
    sqlx::query_as(&format!("SELECT {ITERATION_COLS} FROM iterations WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?
        .with_context(|| format!("iteration {id} does not exist"))
}

pub async fn finished_iterations(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM iterations WHERE stage = 'done'").fetch_one(pool).await?)
}

/// Starts the next iteration from the promoted checkpoint with sample jobs for `prompt_ids`, unless one is open
/// (then that one is returned: starting is idempotent).
pub async fn start_iteration(
    pool: &PgPool,
    config: &serde_json::Value,
    prompt_ids: &[i64],
    reference_is_base: bool,
) -> Result<IterationRow> {
    let mut tx = pool.begin().await?;
    sqlx::query("LOCK TABLE iterations IN SHARE ROW EXCLUSIVE MODE").execute(&mut *tx).await?;
    let open: Option<IterationRow> = sqlx::query_as(&format!(
        "SELECT {ITERATION_COLS} FROM iterations WHERE stage NOT IN ('done', 'failed') ORDER BY number LIMIT 1"
    ))
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(it) = open {
        tx.commit().await?;
        return Ok(it);
    }
    let policy: i64 = sqlx::query_scalar("SELECT id FROM checkpoints WHERE status = 'promoted'")
        .fetch_optional(&mut *tx)
        .await?
        .context("no promoted checkpoint to sample from")?;
    let reference = if reference_is_base {
        sqlx::query_scalar("SELECT id FROM checkpoints WHERE kind = 'base' ORDER BY id LIMIT 1")
            .fetch_one(&mut *tx)
            .await?
    } else {
        policy
    };
    let number: i32 =
        sqlx::query_scalar("SELECT COALESCE(max(number), 0) + 1 FROM iterations").fetch_one(&mut *tx).await?;
    let it: IterationRow = sqlx::query_as(&format!(
        "INSERT INTO iterations (number, policy_id, reference_id, stage, config) VALUES ($1, $2, $3, 'sampling', $4) RETURNING {ITERATION_COLS}"
    ))
    .bind(number)
    .bind(policy)
    .bind(reference)
    .bind(config)
    .fetch_one(&mut *tx)
    .await?;
    for &p in prompt_ids {
        sqlx::query(
            "INSERT INTO jobs (iteration_id, kind, prompt_id) VALUES ($1, 'sample', $2) ON CONFLICT DO NOTHING",
        )
        .bind(it.id)
        .bind(p)
        .execute(&mut *tx)
        .await?;
    }
    event(&mut *tx, "iteration_started", "trainer", serde_json::json!({ "iteration": number, "policy": policy, "reference": reference, "prompts": prompt_ids.len() })).await?;
    tx.commit().await?;
    Ok(it)
}

/// Adds sample jobs for more prompts to an open iteration (a prompt already queued is skipped).
pub async fn add_sample_jobs(pool: &PgPool, iteration_id: i64, prompt_ids: &[i64]) -> Result<()> {
    let mut tx = pool.begin().await?;
    for &p in prompt_ids {
        sqlx::query(
            "INSERT INTO jobs (iteration_id, kind, prompt_id) VALUES ($1, 'sample', $2) ON CONFLICT DO NOTHING",
        )
        .bind(iteration_id)
        .bind(p)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Moves an iteration to training and queues its train job (one transaction).
pub async fn start_training(pool: &PgPool, iteration_id: i64) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("UPDATE iterations SET stage = 'training' WHERE id = $1 AND stage = 'sampling'")
        .bind(iteration_id)
        .execute(&mut *tx)
        .await?;
    super::jobs::ensure_stage_job(&mut *tx, iteration_id, super::JobKind::Train).await?;
    tx.commit().await?;
    Ok(())
}

pub async fn set_stage(pool: &PgPool, iteration_id: i64, stage: Stage) -> Result<()> {
    let done = matches!(stage, Stage::Done | Stage::Failed);
    sqlx::query(
        "UPDATE iterations SET stage = $2, finished_at = CASE WHEN $3 THEN now() ELSE finished_at END WHERE id = $1",
    )
    .bind(iteration_id)
    .bind(stage)
    .bind(done)
    .execute(pool)
    .await?;
    Ok(())
}

// -- what status, /metrics and the demo read -----------------------------------------------------------------

/// The newest iteration's number and stage.
pub async fn last_iteration(pool: &PgPool) -> Result<Option<(i32, String)>> {
    Ok(sqlx::query_as("SELECT number, stage FROM iterations ORDER BY number DESC LIMIT 1").fetch_optional(pool).await?)
}

/// The highest iteration number (None before the first).
pub async fn max_iteration(pool: &PgPool) -> Result<Option<i32>> {
    Ok(sqlx::query_scalar("SELECT max(number) FROM iterations").fetch_one(pool).await?)
}

pub async fn count_failed_iterations(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM iterations WHERE stage = 'failed'").fetch_one(pool).await?)
}
