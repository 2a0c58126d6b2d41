//! Leased jobs: claimed with FOR UPDATE SKIP LOCKED, held by a lease, released or failed.

use super::events::event;
use super::kinds::JobKind;
use anyhow::{Context, Result};
use sqlx::{PgPool, Postgres, Row, Transaction};

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Job {
    pub id: i64,
    pub iteration_id: i64,
    pub kind: JobKind,
    pub prompt_id: i64,
    pub attempts: i32,
}

/// Claims up to `limit` open sample or label jobs of `kind` (pending, or running with an expired lease) for `owner`
/// for `lease_s` seconds. Concurrent claimers never get the same job (FOR UPDATE SKIP LOCKED).
pub async fn claim_jobs(pool: &PgPool, kind: JobKind, owner: &str, limit: i64, lease_s: f64) -> Result<Vec<Job>> {
    claim_jobs_as(pool, kind, owner, owner, limit, lease_s).await
}

/// `claim_jobs`, recording `worker` (host:pid:device) as the one that took them.
pub async fn claim_jobs_as(
    pool: &PgPool,
    kind: JobKind,
    owner: &str,
    worker: &str,
    limit: i64,
    lease_s: f64,
) -> Result<Vec<Job>> {
    if matches!(kind, JobKind::Train | JobKind::Gate) {
        anyhow::bail!("{kind} jobs have no prompt: claim them with claim_stage_job");
    }
    Ok(sqlx::query_as(&format!("{CLAIM} RETURNING id, iteration_id, kind, prompt_id, attempts"))
        .bind(kind)
        .bind(owner)
        .bind(limit)
        .bind(lease_s)
        .bind(worker)
        .fetch_all(pool)
        .await?)
}

/// Takes open jobs of a kind ($1) for an owner ($2): at most $3, leased for $4 seconds, recording the worker ($5).
const CLAIM: &str = "UPDATE jobs SET status = 'running', lease_owner = $2, lease_until = now() + make_interval(secs => $4),
        attempts = attempts + 1, worker = $5, started_at = now()
     WHERE id IN (SELECT id FROM jobs WHERE kind = $1 AND (status = 'pending' OR (status = 'running' AND lease_until < now()))
                  ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED)";

/// An iteration's train or gate job (one of each per iteration).
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct StageJob {
    pub id: i64,
    pub iteration_id: i64,
    pub kind: JobKind,
    pub attempts: i32,
}

/// Queues the train or gate job of an iteration (a no-op when it exists).
pub async fn ensure_stage_job<'e>(
    ex: impl sqlx::Executor<'e, Database = Postgres>,
    iteration_id: i64,
    kind: JobKind,
) -> Result<()> {
    sqlx::query("INSERT INTO jobs (iteration_id, kind) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(iteration_id)
        .bind(kind)
        .execute(ex)
        .await?;
    Ok(())
}

/// Claims the open train or gate job of `kind`, if any (pending, or running under an expired lease: its holder
/// died or lost the database), for `owner` as `worker`, leased for `lease_s` seconds.
pub async fn claim_stage_job(
    pool: &PgPool,
    kind: JobKind,
    owner: &str,
    worker: &str,
    lease_s: f64,
) -> Result<Option<StageJob>> {
    Ok(sqlx::query_as(&format!("{CLAIM} RETURNING id, iteration_id, kind, attempts"))
        .bind(kind)
        .bind(owner)
        .bind(1i64)
        .bind(lease_s)
        .bind(worker)
        .fetch_optional(pool)
        .await?)
}

/// Extends `owner`'s lease on job `id` by `lease_s` seconds. False: the lease is gone (expired and taken by
/// another worker, or the job was finished or requeued) and the holder must stop.
pub async fn renew_lease(pool: &PgPool, id: i64, owner: &str, lease_s: f64) -> Result<bool> {
    let n = sqlx::query(
        "UPDATE jobs SET lease_until = now() + make_interval(secs => $3) WHERE id = $1 AND status = 'running' AND lease_owner = $2",
    )
    .bind(id)
    .bind(owner)
    .bind(lease_s)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Checks `owner` holds job `id` and marks it done, inside `tx` (the transaction that stores its result).
/// False: the lease was lost; the caller rolls back.
pub(super) async fn finish_held(tx: &mut Transaction<'_, Postgres>, id: i64, owner: &str) -> Result<bool> {
    if !hold_lease(tx, id, owner).await? {
        return Ok(false);
    }
    sqlx::query("UPDATE jobs SET status = 'done', finished_at = now(), lease_until = NULL WHERE id = $1")
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(true)
}

/// Returns a train or gate job to the queue after a failure, or, after `max_attempts`, marks it and its
/// iteration failed with the reason in `events` (one transaction). Returns whether it failed for good.
pub async fn fail_stage_job(
    pool: &PgPool,
    job: &StageJob,
    owner: &str,
    error: &str,
    max_attempts: i32,
) -> Result<bool> {
    let final_ = job.attempts >= max_attempts;
    let mut tx = pool.begin().await?;
    if !hold_lease(&mut tx, job.id, owner).await? {
        return Ok(false);
    }
    let worker: Option<String> = sqlx::query_scalar(
        "UPDATE jobs SET status = $2, error = $3, lease_owner = NULL, lease_until = NULL WHERE id = $1 RETURNING worker",
    )
    .bind(job.id)
    .bind(if final_ { "failed" } else { "pending" })
    .bind(error)
    .fetch_one(&mut *tx)
    .await?;
    event(&mut *tx, "job_failed", job.kind.as_str(), serde_json::json!({ "job": job.id, "iteration_id": job.iteration_id, "attempt": job.attempts, "error": error, "requeued": !final_, "worker": worker })).await?;
    if final_ {
        let number: i32 = sqlx::query_scalar(
            "UPDATE iterations SET stage = 'failed', finished_at = now() WHERE id = $1 RETURNING number",
        )
        .bind(job.iteration_id)
        .fetch_one(&mut *tx)
        .await?;
        let actor = if job.kind == JobKind::Train { "trainer" } else { "checkpointer" };
        event(
            &mut *tx,
            "iteration_failed",
            actor,
            serde_json::json!({ "iteration": number, "reason": error, "worker": worker }),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(final_)
}

/// Closes a train or gate job whose iteration has moved past its stage (nothing is left to do): failed, with
/// `why`; the iteration is untouched.
pub async fn abandon_stage_job(pool: &PgPool, job: &StageJob, why: &str) -> Result<()> {
    sqlx::query("UPDATE jobs SET status = 'failed', error = $2, lease_owner = NULL, lease_until = NULL WHERE id = $1")
        .bind(job.id)
        .bind(why)
        .execute(pool)
        .await?;
    Ok(())
}

/// Locks `job` in `tx` and checks `owner` still holds its lease; a job done meanwhile (by another worker whose
/// lease outlived ours) makes the caller drop its result.
pub(super) async fn hold_lease(tx: &mut Transaction<'_, Postgres>, job: i64, owner: &str) -> Result<bool> {
    let row = sqlx::query("SELECT status, lease_owner FROM jobs WHERE id = $1 FOR UPDATE")
        .bind(job)
        .fetch_optional(&mut **tx)
        .await?
        .with_context(|| format!("job {job} vanished"))?;
    let status: String = row.get("status");
    let holder: Option<String> = row.get("lease_owner");
    Ok(status == "running" && holder.as_deref() == Some(owner))
}

/// Returns `owner`'s running jobs to the queue (and those of its engines, `owner#N`): a worker restarting under
/// the same name calls this, since whatever it held before it stopped is abandoned. Returns how many jobs were
/// released.
pub async fn release_leases(pool: &PgPool, owner: &str) -> Result<u64> {
    let n = sqlx::query("UPDATE jobs SET status = 'pending', lease_owner = NULL, lease_until = NULL WHERE status = 'running' AND (lease_owner = $1 OR starts_with(lease_owner, $1 || '#'))").bind(owner).execute(pool).await?.rows_affected();
    if n > 0 {
        event(pool, "leases_released", owner, serde_json::json!({ "jobs": n })).await?;
    }
    Ok(n)
}

/// Returns `owner`'s running jobs of `kind` to the queue: an actor restarted after an error calls this for its
/// own kind (it held at most the job whose failure could not be recorded). Returns how many were released.
pub async fn release_kind_leases(pool: &PgPool, owner: &str, kind: JobKind) -> Result<u64> {
    let n = sqlx::query("UPDATE jobs SET status = 'pending', lease_owner = NULL, lease_until = NULL WHERE status = 'running' AND lease_owner = $1 AND kind = $2")
        .bind(owner)
        .bind(kind)
        .execute(pool)
        .await?
        .rows_affected();
    if n > 0 {
        event(pool, "leases_released", owner, serde_json::json!({ "jobs": n, "kind": kind })).await?;
    }
    Ok(n)
}

/// Marks a job failed (after too many attempts) or returns it to the queue, recording the error.
pub async fn fail_job(pool: &PgPool, job: &Job, error: &str, max_attempts: i32) -> Result<()> {
    let status = if job.attempts >= max_attempts { "failed" } else { "pending" };
    sqlx::query("UPDATE jobs SET status = $2, error = $3, lease_owner = NULL, lease_until = NULL WHERE id = $1")
        .bind(job.id)
        .bind(status)
        .bind(error)
        .execute(pool)
        .await?;
    event(pool, "job_failed", job.kind.as_str(), serde_json::json!({ "job": job.id, "prompt": job.prompt_id, "attempt": job.attempts, "error": error, "requeued": status == "pending" })).await
}

/// (pending or running, done, failed) sample and label jobs of an iteration.
pub async fn job_counts(pool: &PgPool, iteration_id: i64) -> Result<(i64, i64, i64)> {
    let r = sqlx::query(
        "SELECT count(*) FILTER (WHERE status IN ('pending', 'running')) AS open, count(*) FILTER (WHERE status = 'done') AS done,
                count(*) FILTER (WHERE status = 'failed') AS failed FROM jobs WHERE iteration_id = $1 AND kind IN ('sample', 'label')",
    )
    .bind(iteration_id)
    .fetch_one(pool)
    .await?;
    Ok((r.get("open"), r.get("done"), r.get("failed")))
}

/// Jobs per (kind, status); `open_only`: pending and running ones.
pub async fn jobs_by_kind_and_status(pool: &PgPool, open_only: bool) -> Result<Vec<(String, String, i64)>> {
    let filter = if open_only { "WHERE status IN ('pending', 'running')" } else { "" };
    Ok(sqlx::query_as(&format!(
        "SELECT kind, status, count(*) FROM jobs {filter} GROUP BY kind, status ORDER BY kind, status"
    ))
    .fetch_all(pool)
    .await?)
}
