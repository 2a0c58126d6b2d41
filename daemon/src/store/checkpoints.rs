//! The checkpoint lineage: the base row, candidates, decisions (promote, reject, roll back) in one transaction
//! each, and the lineage of a checkpoint.

use super::events::event;
use super::iterations::IterationRow;
use super::kinds::{CheckpointKind, CheckpointStatus};
use anyhow::{bail, Context, Result};
use sqlx::{PgPool, Postgres, Transaction};

#[derive(Clone, Debug, PartialEq, sqlx::FromRow, serde::Serialize)]
pub struct CheckpointRow {
    pub id: i64,
    pub parent_id: Option<i64>,
    pub iteration: i32,
    pub kind: CheckpointKind,
    pub path: String,
    pub sha256: Option<String>,
    pub status: CheckpointStatus,
    pub metrics: Option<serde_json::Value>,
}

const CHECKPOINT_COLS: &str = "id, parent_id, iteration, kind, path, sha256, status, metrics";

pub async fn checkpoint(pool: &PgPool, id: i64) -> Result<CheckpointRow> {
    sqlx::query_as(&format!("SELECT {CHECKPOINT_COLS} FROM checkpoints WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?
        .with_context(|| format!("checkpoint {id} does not exist"))
}

/// The base model's row (the lineage's root).
pub async fn base(pool: &PgPool) -> Result<CheckpointRow> {
    sqlx::query_as(&format!("SELECT {CHECKPOINT_COLS} FROM checkpoints WHERE kind = 'base' ORDER BY id LIMIT 1"))
        .fetch_optional(pool)
        .await?
        .context("no base checkpoint registered")
}

pub async fn promoted(pool: &PgPool) -> Result<Option<CheckpointRow>> {
    Ok(sqlx::query_as(&format!("SELECT {CHECKPOINT_COLS} FROM checkpoints WHERE status = 'promoted'"))
        .fetch_optional(pool)
        .await?)
}

pub async fn checkpoints(pool: &PgPool) -> Result<Vec<CheckpointRow>> {
    Ok(sqlx::query_as(&format!("SELECT {CHECKPOINT_COLS} FROM checkpoints ORDER BY id")).fetch_all(pool).await?)
}

/// The base model's row (created promoted on first use; the model directory is the path).
pub async fn ensure_base(pool: &PgPool, path: &str, metrics: Option<&serde_json::Value>) -> Result<CheckpointRow> {
    let mut tx = pool.begin().await?;
    sqlx::query("LOCK TABLE checkpoints IN SHARE ROW EXCLUSIVE MODE").execute(&mut *tx).await?;
    let existing: Option<CheckpointRow> =
        sqlx::query_as(&format!("SELECT {CHECKPOINT_COLS} FROM checkpoints WHERE kind = 'base' AND path = $1"))
            .bind(path)
            .fetch_optional(&mut *tx)
            .await?;
    let row = match existing {
        Some(r) => r,
        None => {
            let any_promoted: Option<i64> = sqlx::query_scalar("SELECT id FROM checkpoints WHERE status = 'promoted'")
                .fetch_optional(&mut *tx)
                .await?;
            let status = if any_promoted.is_some() { CheckpointStatus::Retired } else { CheckpointStatus::Promoted };
            let r: CheckpointRow = sqlx::query_as(&format!(
                "INSERT INTO checkpoints (parent_id, iteration, kind, path, status, metrics, decided_at) VALUES (NULL, 0, 'base', $1, $2, $3, now()) RETURNING {CHECKPOINT_COLS}"
            ))
            .bind(path)
            .bind(status)
            .bind(metrics)
            .fetch_one(&mut *tx)
            .await?;
            event(
                &mut *tx,
                "base_registered",
                "checkpointer",
                serde_json::json!({ "checkpoint": r.id, "path": path, "status": status }),
            )
            .await?;
            r
        }
    };
    tx.commit().await?;
    Ok(row)
}

pub async fn set_metrics(pool: &PgPool, id: i64, metrics: &serde_json::Value) -> Result<()> {
    sqlx::query("UPDATE checkpoints SET metrics = $2 WHERE id = $1").bind(id).bind(metrics).execute(pool).await?;
    Ok(())
}

/// What a training run produced: its adapter directory's files and how it got there.
pub struct NewCandidate<'a> {
    /// Where the trainer saved it (informational: other daemons fetch the files from the database).
    pub path: &'a str,
    /// sha256 of adapter_model.safetensors.
    pub sha256: &'a str,
    /// The adapter directory's files (name, bytes), stored content-addressed with the row.
    pub files: &'a [(String, Vec<u8>)],
    pub pair_ids: &'a [i64],
    /// The imported pairs it trained on too (`loop.imported_pairs`).
    pub imported_pair_ids: &'a [i64],
    pub steps: i32,
    pub losses: &'a serde_json::Value,
    pub config: &'a serde_json::Value,
    pub started_at: chrono::DateTime<chrono::Utc>,
}

/// Records a trained candidate, its files and its training run, and queues its gate job (one transaction).
/// Idempotent per iteration: a second call returns the first candidate. `lease`: the train job (id, owner) this
/// run held; when it was lost (another daemon took the job over) nothing is recorded and None is returned.
pub async fn add_candidate(
    pool: &PgPool,
    it: &IterationRow,
    c: &NewCandidate<'_>,
    lease: Option<(i64, &str)>,
) -> Result<Option<CheckpointRow>> {
    let mut tx = pool.begin().await?;
    let current: Option<i64> = sqlx::query_scalar("SELECT candidate_id FROM iterations WHERE id = $1 FOR UPDATE")
        .bind(it.id)
        .fetch_one(&mut *tx)
        .await?;
    if let Some(id) = current {
        tx.commit().await?;
        return checkpoint(pool, id).await.map(Some);
    }
    if let Some((job, owner)) = lease {
        if !super::jobs::finish_held(&mut tx, job, owner).await? {
            return Ok(None);
        }
    }
    let row: CheckpointRow = sqlx::query_as(&format!(
        "INSERT INTO checkpoints (parent_id, iteration, kind, path, sha256, status) VALUES ($1, $2, 'lora', $3, $4, 'candidate') RETURNING {CHECKPOINT_COLS}"
    ))
    .bind(it.policy_id)
    .bind(it.number)
    .bind(c.path)
    .bind(c.sha256)
    .fetch_one(&mut *tx)
    .await?;
    super::blobs::put_checkpoint_files(&mut tx, row.id, c.files).await?;
    super::blobs::drop_training_state(&mut tx, it.id).await?;
    sqlx::query("INSERT INTO training_runs (iteration_id, checkpoint_id, pair_ids, steps, losses, config, started_at, imported_pair_ids) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
        .bind(it.id)
        .bind(row.id)
        .bind(c.pair_ids)
        .bind(c.steps)
        .bind(c.losses)
        .bind(c.config)
        .bind(c.started_at)
        .bind(c.imported_pair_ids)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE iterations SET candidate_id = $2, stage = 'evaluating' WHERE id = $1")
        .bind(it.id)
        .bind(row.id)
        .execute(&mut *tx)
        .await?;
    super::jobs::ensure_stage_job(&mut *tx, it.id, super::JobKind::Gate).await?;
    event(&mut *tx, "candidate_saved", "checkpointer", serde_json::json!({ "checkpoint": row.id, "iteration": it.number, "path": c.path, "sha256": c.sha256, "pairs": c.pair_ids.len(), "imported_pairs": c.imported_pair_ids.len() })).await?;
    tx.commit().await?;
    Ok(Some(row))
}

/// Promotes `id` (the previously promoted checkpoint is retired) or rejects it, records its metrics and why,
/// and closes its iteration, in one transaction.
pub async fn decide(
    pool: &PgPool,
    id: i64,
    promote: bool,
    metrics: &serde_json::Value,
    reason: &str,
    actor: &str,
) -> Result<()> {
    decide_leased(pool, id, promote, metrics, reason, actor, None).await.map(|_| ())
}

/// `decide`, finishing gate job `lease` (id, owner) in the same transaction. False: the lease was lost (another
/// daemon took the gate over) and nothing was decided.
pub async fn decide_leased(
    pool: &PgPool,
    id: i64,
    promote: bool,
    metrics: &serde_json::Value,
    reason: &str,
    actor: &str,
    lease: Option<(i64, &str)>,
) -> Result<bool> {
    let mut tx = pool.begin().await?;
    if let Some((job, owner)) = lease {
        if !super::jobs::finish_held(&mut tx, job, owner).await? {
            return Ok(false);
        }
    }
    decide_in(&mut tx, id, promote, metrics, reason, actor).await?;
    tx.commit().await?;
    Ok(true)
}

async fn decide_in(
    tx: &mut Transaction<'_, Postgres>,
    id: i64,
    promote: bool,
    metrics: &serde_json::Value,
    reason: &str,
    actor: &str,
) -> Result<()> {
    let status: Option<CheckpointStatus> =
        sqlx::query_scalar("SELECT status FROM checkpoints WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
    let Some(status) = status else { bail!("checkpoint {id} does not exist") };
    if promote {
        sqlx::query("UPDATE checkpoints SET status = 'retired' WHERE status = 'promoted' AND id <> $1")
            .bind(id)
            .execute(&mut **tx)
            .await?;
    }
    let new_status = match (promote, status) {
        (true, _) => CheckpointStatus::Promoted,
        (false, CheckpointStatus::Candidate) => CheckpointStatus::Rejected,
        (false, other) => other,
    };
    sqlx::query("UPDATE checkpoints SET status = $2, metrics = $3, decided_at = now() WHERE id = $1")
        .bind(id)
        .bind(new_status)
        .bind(metrics)
        .execute(&mut **tx)
        .await?;
    sqlx::query(
        "UPDATE iterations SET stage = 'done', finished_at = now() WHERE candidate_id = $1 AND stage = 'evaluating'",
    )
    .bind(id)
    .execute(&mut **tx)
    .await?;
    event(
        &mut **tx,
        if promote { "promoted" } else { "rejected" },
        actor,
        serde_json::json!({ "checkpoint": id, "reason": reason, "metrics": metrics }),
    )
    .await?;
    Ok(())
}

/// Checkpoint ids from the base to `id`.
pub async fn lineage(pool: &PgPool, id: i64) -> Result<Vec<i64>> {
    let ids: Vec<i64> = sqlx::query_scalar(
        "WITH RECURSIVE up(id, parent_id, depth) AS (SELECT id, parent_id, 0 FROM checkpoints WHERE id = $1
         UNION ALL SELECT c.id, c.parent_id, up.depth + 1 FROM checkpoints c JOIN up ON c.id = up.parent_id)
         SELECT id FROM up ORDER BY depth DESC",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    Ok(ids)
}

/// The checkpoint decided last: id, status, metrics.
pub async fn last_decision(pool: &PgPool) -> Result<Option<(i64, String, Option<serde_json::Value>)>> {
    Ok(sqlx::query_as(
        "SELECT id, status, metrics FROM checkpoints WHERE decided_at IS NOT NULL ORDER BY decided_at DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await?)
}

/// Trained checkpoints decided after checkpoint `after`: id, iteration, status, metrics, pairs it trained on.
pub async fn decided_since(
    pool: &PgPool,
    after: i64,
) -> Result<Vec<(i64, i32, String, Option<serde_json::Value>, i64)>> {
    Ok(sqlx::query_as(
        "SELECT c.id, c.iteration, c.status, c.metrics, (SELECT count(*) FROM pairs p JOIN iterations i ON i.id = p.iteration_id WHERE i.candidate_id = c.id)
         FROM checkpoints c WHERE c.kind = 'lora' AND c.decided_at IS NOT NULL AND c.id > $1 ORDER BY c.id",
    )
    .bind(after)
    .fetch_all(pool)
    .await?)
}
