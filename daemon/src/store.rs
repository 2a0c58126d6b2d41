//! The loop's state in PostgreSQL: prompts, the checkpoint lineage, iterations, leased jobs, responses, claims,
//! pairs, training runs and events. Every write that finishes a stage happens in one transaction with the job's
//! completion, and every insert is guarded by a uniqueness constraint, so a crashed and retried stage neither
//! loses nor duplicates anything.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Postgres, Row, Transaction};

pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Stores an image (PNG/JPEG bytes) once; returns its sha256. The bytes must decode.
/// Stores an image (idempotent: content-addressed); on the pool or inside a transaction (`&mut tx`).
pub async fn insert_image<'a>(db: impl sqlx::Acquire<'a, Database = Postgres>, bytes: &[u8]) -> Result<String> {
    // Decoding (the check that the bytes are an image we can use) is CPU work: off the async runtime.
    let owned = bytes.to_vec();
    let (width, height) = tokio::task::spawn_blocking(move || {
        engine::image::decode_rgb8(&owned, "image").map(|i| (i.width(), i.height()))
    })
    .await
    .context("image decode task")??;
    let mut conn = db.acquire().await?;
    let sha = sha256_hex(bytes);
    sqlx::query(
        "INSERT INTO images (sha256, bytes, width, height) VALUES ($1, $2, $3, $4) ON CONFLICT (sha256) DO NOTHING",
    )
    .bind(&sha)
    .bind(bytes)
    .bind(width as i32)
    .bind(height as i32)
    .execute(&mut *conn)
    .await?;
    Ok(sha)
}

pub async fn image_bytes(pool: &PgPool, sha: &str) -> Result<Vec<u8>> {
    sqlx::query_scalar("SELECT bytes FROM images WHERE sha256 = $1")
        .bind(sha)
        .fetch_optional(pool)
        .await?
        .with_context(|| format!("image {sha} is not in the database"))
}

#[derive(Clone, Debug, PartialEq)]
pub struct NewPrompt {
    pub image_sha256: Option<String>,
    pub instruction: String,
    pub source: String,
    /// "train" or "heldout".
    pub split: String,
    pub ground_truth: Option<serde_json::Value>,
}

/// Inserts a prompt (or finds the identical one); returns its id.
pub async fn insert_prompt<'a>(db: impl sqlx::Acquire<'a, Database = Postgres>, p: &NewPrompt) -> Result<i64> {
    let mut conn = db.acquire().await?;
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO prompts (image_sha256, instruction, source, split, ground_truth) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (image_sha256, instruction, split) DO NOTHING RETURNING id",
    )
    .bind(&p.image_sha256)
    .bind(&p.instruction)
    .bind(&p.source)
    .bind(&p.split)
    .bind(&p.ground_truth)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(id) = id {
        return Ok(id);
    }
    Ok(sqlx::query_scalar(
        "SELECT id FROM prompts WHERE image_sha256 IS NOT DISTINCT FROM $1 AND instruction = $2 AND split = $3",
    )
    .bind(&p.image_sha256)
    .bind(&p.instruction)
    .bind(&p.split)
    .fetch_one(&mut *conn)
    .await?)
}

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct PromptRow {
    pub id: i64,
    pub image_sha256: Option<String>,
    pub instruction: String,
    pub split: String,
    pub ground_truth: Option<serde_json::Value>,
}

pub async fn prompt(pool: &PgPool, id: i64) -> Result<PromptRow> {
    sqlx::query_as("SELECT id, image_sha256, instruction, split, ground_truth FROM prompts WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?
        .with_context(|| format!("prompt {id} does not exist"))
}

/// Training prompts no iteration has sampled yet, oldest first.
pub async fn unused_train_prompts(pool: &PgPool, limit: i64) -> Result<Vec<i64>> {
    Ok(sqlx::query_scalar(
        "SELECT p.id FROM prompts p WHERE p.split = 'train'
           AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.prompt_id = p.id AND j.kind = 'sample')
         ORDER BY p.id LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

pub async fn count_unused_train_prompts(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM prompts p WHERE p.split = 'train' AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.prompt_id = p.id AND j.kind = 'sample')").fetch_one(pool).await?)
}

pub async fn count_prompts(pool: &PgPool, split: &str) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM prompts WHERE split = $1").bind(split).fetch_one(pool).await?)
}

#[derive(Clone, Debug, PartialEq, sqlx::FromRow, serde::Serialize)]
pub struct CheckpointRow {
    pub id: i64,
    pub parent_id: Option<i64>,
    pub iteration: i32,
    pub kind: String,
    pub path: String,
    pub sha256: Option<String>,
    pub status: String,
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
            let status = if any_promoted.is_some() { "retired" } else { "promoted" };
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

/// Appends to the audit log (on the pool, or inside a transaction with `&mut *tx`).
pub async fn event<'e>(
    ex: impl sqlx::PgExecutor<'e>,
    kind: &str,
    actor: &str,
    detail: serde_json::Value,
) -> Result<()> {
    sqlx::query("INSERT INTO events (kind, actor, detail) VALUES ($1, $2, $3)")
        .bind(kind)
        .bind(actor)
        .bind(detail)
        .execute(ex)
        .await?;
    Ok(())
}

#[derive(Clone, Debug, PartialEq, sqlx::FromRow, serde::Serialize)]
pub struct IterationRow {
    pub id: i64,
    pub number: i32,
    pub policy_id: i64,
    pub reference_id: i64,
    pub stage: String,
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

pub async fn set_stage(pool: &PgPool, iteration_id: i64, stage: &str) -> Result<()> {
    let done = matches!(stage, "done" | "failed");
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

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Job {
    pub id: i64,
    pub iteration_id: i64,
    pub kind: String,
    pub prompt_id: i64,
    pub attempts: i32,
}

/// Claims up to `limit` open jobs of `kind` (pending, or running with an expired lease) for `owner` for
/// `lease_s` seconds. Concurrent claimers never get the same job (FOR UPDATE SKIP LOCKED).
pub async fn claim_jobs(pool: &PgPool, kind: &str, owner: &str, limit: i64, lease_s: f64) -> Result<Vec<Job>> {
    Ok(sqlx::query_as(
        "UPDATE jobs SET status = 'running', lease_owner = $2, lease_until = now() + make_interval(secs => $4), attempts = attempts + 1
         WHERE id IN (SELECT id FROM jobs WHERE kind = $1 AND (status = 'pending' OR (status = 'running' AND lease_until < now()))
                      ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED)
         RETURNING id, iteration_id, kind, prompt_id, attempts",
    )
    .bind(kind)
    .bind(owner)
    .bind(limit)
    .bind(lease_s)
    .fetch_all(pool)
    .await?)
}

/// Locks `job` in `tx` and checks `owner` still holds its lease; a job done meanwhile (by another worker whose
/// lease outlived ours) makes the caller drop its result.
async fn hold_lease(tx: &mut Transaction<'_, Postgres>, job: i64, owner: &str) -> Result<bool> {
    let row = sqlx::query("SELECT status, lease_owner FROM jobs WHERE id = $1 FOR UPDATE")
        .bind(job)
        .fetch_optional(&mut **tx)
        .await?
        .with_context(|| format!("job {job} vanished"))?;
    let status: String = row.get("status");
    let holder: Option<String> = row.get("lease_owner");
    Ok(status == "running" && holder.as_deref() == Some(owner))
}

/// Returns `owner`'s running jobs to the queue: a worker restarting under the same name calls this, since
/// whatever it held before it stopped is abandoned. Returns how many jobs were released.
pub async fn release_leases(pool: &PgPool, owner: &str) -> Result<u64> {
    let n = sqlx::query("UPDATE jobs SET status = 'pending', lease_owner = NULL, lease_until = NULL WHERE status = 'running' AND lease_owner = $1").bind(owner).execute(pool).await?.rows_affected();
    if n > 0 {
        event(pool, "leases_released", owner, serde_json::json!({ "jobs": n })).await?;
    }
    Ok(n)
}

/// Returns `owner`'s running jobs of `kind` to the queue: an actor restarted after an error calls this for its
/// own kind (it held at most the job whose failure could not be recorded). Returns how many were released.
pub async fn release_kind_leases(pool: &PgPool, owner: &str, kind: &str) -> Result<u64> {
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
    event(pool, "job_failed", &job.kind, serde_json::json!({ "job": job.id, "prompt": job.prompt_id, "attempt": job.attempts, "error": error, "requeued": status == "pending" })).await
}

/// One sampled answer as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct NewResponse {
    pub seed: u64,
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish: String,
}

/// Finishes a sample job: its answers (one per seed), a label job for the prompt, the job marked done, all in one
/// transaction. Returns false (and stores nothing) when the lease was lost.
pub async fn finish_sample(
    pool: &PgPool,
    job: &Job,
    owner: &str,
    checkpoint_id: i64,
    decoding: &serde_json::Value,
    answers: &[NewResponse],
) -> Result<bool> {
    let mut tx = pool.begin().await?;
    if !hold_lease(&mut tx, job.id, owner).await? {
        return Ok(false);
    }
    for a in answers {
        let tokens: Vec<i32> = a.tokens.iter().map(|&t| t as i32).collect();
        sqlx::query(
            "INSERT INTO responses (prompt_id, checkpoint_id, seed, decoding, text, tokens, n_tokens, finish) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (prompt_id, checkpoint_id, seed) DO NOTHING",
        )
        .bind(job.prompt_id)
        .bind(checkpoint_id)
        .bind(a.seed as i64)
        .bind(decoding)
        .bind(&a.text)
        .bind(&tokens)
        .bind(tokens.len() as i32)
        .bind(&a.finish)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("INSERT INTO jobs (iteration_id, kind, prompt_id) VALUES ($1, 'label', $2) ON CONFLICT DO NOTHING")
        .bind(job.iteration_id)
        .bind(job.prompt_id)
        .execute(&mut *tx)
        .await?;
    // Crash test: abort with the answers inserted and the transaction still open.
    crate::failpoint::hit("sample_tx");
    sqlx::query("UPDATE jobs SET status = 'done', finished_at = now(), lease_until = NULL WHERE id = $1")
        .bind(job.id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ResponseRow {
    pub id: i64,
    pub seed: i64,
    pub text: String,
    pub tokens: Vec<i32>,
    pub finish: String,
}

/// The answers `checkpoint_id` gave to `prompt_id` with the seeds in `seeds`, in seed order.
pub async fn responses(pool: &PgPool, prompt_id: i64, checkpoint_id: i64, seeds: &[u64]) -> Result<Vec<ResponseRow>> {
    let seeds: Vec<i64> = seeds.iter().map(|&s| s as i64).collect();
    Ok(sqlx::query_as(
        "SELECT r.id, r.seed, r.text, r.tokens, r.finish FROM responses r JOIN unnest($3::bigint[]) WITH ORDINALITY AS s(seed, ord) ON s.seed = r.seed
         WHERE r.prompt_id = $1 AND r.checkpoint_id = $2 ORDER BY s.ord",
    )
    .bind(prompt_id)
    .bind(checkpoint_id)
    .bind(&seeds)
    .fetch_all(pool)
    .await?)
}

#[derive(Clone, Debug, PartialEq)]
pub struct NewClaim {
    pub claim: String,
    pub question: String,
    pub p_yes: f64,
    pub p_no: f64,
    pub accepted: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NewPair {
    pub chosen_id: i64,
    pub rejected_id: i64,
    pub score_gap: i64,
    pub ref_logp_chosen: f64,
    pub ref_logp_rejected: f64,
}

/// Finishes a label job: claims and verdicts per response (`labeled[i]` = (response id, score, claims)), the
/// pairs, the job marked done, in one transaction. Returns false (storing nothing) when the lease was lost.
pub async fn finish_label(
    pool: &PgPool,
    job: &Job,
    owner: &str,
    labeler: &str,
    ref_checkpoint_id: i64,
    labeled: &[(i64, Option<i64>, Vec<NewClaim>)],
    pairs: &[NewPair],
) -> Result<bool> {
    let mut tx = pool.begin().await?;
    if !hold_lease(&mut tx, job.id, owner).await? {
        return Ok(false);
    }
    for (response, score, claims) in labeled {
        sqlx::query("UPDATE responses SET score = $2 WHERE id = $1")
            .bind(response)
            .bind(score.map(|s| s as i32))
            .execute(&mut *tx)
            .await?;
        for (idx, c) in claims.iter().enumerate() {
            sqlx::query(
                "INSERT INTO claims (response_id, idx, claim, question, p_yes, p_no, accepted, labeler) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (response_id, idx) DO NOTHING",
            )
            .bind(response)
            .bind(idx as i32)
            .bind(&c.claim)
            .bind(&c.question)
            .bind(c.p_yes as f32)
            .bind(c.p_no as f32)
            .bind(c.accepted)
            .bind(labeler)
            .execute(&mut *tx)
            .await?;
        }
    }
    for p in pairs {
        sqlx::query(
            "INSERT INTO pairs (iteration_id, prompt_id, chosen_id, rejected_id, score_gap, ref_checkpoint_id, ref_logp_chosen, ref_logp_rejected)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (chosen_id, rejected_id) DO NOTHING",
        )
        .bind(job.iteration_id)
        .bind(job.prompt_id)
        .bind(p.chosen_id)
        .bind(p.rejected_id)
        .bind(p.score_gap as i32)
        .bind(ref_checkpoint_id)
        .bind(p.ref_logp_chosen)
        .bind(p.ref_logp_rejected)
        .execute(&mut *tx)
        .await?;
    }
    // Crash test: abort with the claims, scores and pairs written and the transaction still open.
    crate::failpoint::hit("label_tx");
    sqlx::query("UPDATE jobs SET status = 'done', finished_at = now(), lease_until = NULL WHERE id = $1")
        .bind(job.id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

/// (pending or running, done, failed) jobs of an iteration.
pub async fn job_counts(pool: &PgPool, iteration_id: i64) -> Result<(i64, i64, i64)> {
    let r = sqlx::query(
        "SELECT count(*) FILTER (WHERE status IN ('pending', 'running')) AS open, count(*) FILTER (WHERE status = 'done') AS done,
                count(*) FILTER (WHERE status = 'failed') AS failed FROM jobs WHERE iteration_id = $1",
    )
    .bind(iteration_id)
    .fetch_one(pool)
    .await?;
    Ok((r.get("open"), r.get("done"), r.get("failed")))
}

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct PairRow {
    pub id: i64,
    pub prompt_id: i64,
    pub image_sha256: Option<String>,
    pub instruction: String,
    pub chosen_tokens: Vec<i32>,
    pub rejected_tokens: Vec<i32>,
    pub chosen_text: String,
    pub rejected_text: String,
    pub chosen_finish: String,
    pub rejected_finish: String,
    pub ref_logp_chosen: f64,
    pub ref_logp_rejected: f64,
}

/// The pairs of an iteration, by id.
pub async fn iteration_pairs(pool: &PgPool, iteration_id: i64) -> Result<Vec<PairRow>> {
    Ok(sqlx::query_as(
        "SELECT p.id, p.prompt_id, pr.image_sha256, pr.instruction, c.tokens AS chosen_tokens, r.tokens AS rejected_tokens,
                c.text AS chosen_text, r.text AS rejected_text, c.finish AS chosen_finish, r.finish AS rejected_finish, p.ref_logp_chosen, p.ref_logp_rejected
         FROM pairs p JOIN prompts pr ON pr.id = p.prompt_id JOIN responses c ON c.id = p.chosen_id JOIN responses r ON r.id = p.rejected_id
         WHERE p.iteration_id = $1 ORDER BY p.id",
    )
    .bind(iteration_id)
    .fetch_all(pool)
    .await?)
}

/// Records a trained candidate and its training run (one transaction). Idempotent per iteration: a second call
/// returns the first candidate.
#[allow(clippy::too_many_arguments)]
pub async fn add_candidate(
    pool: &PgPool,
    it: &IterationRow,
    path: &str,
    sha256: &str,
    pair_ids: &[i64],
    steps: i32,
    losses: &serde_json::Value,
    config: &serde_json::Value,
    started_at: chrono::DateTime<chrono::Utc>,
) -> Result<CheckpointRow> {
    let mut tx = pool.begin().await?;
    let current: Option<i64> = sqlx::query_scalar("SELECT candidate_id FROM iterations WHERE id = $1 FOR UPDATE")
        .bind(it.id)
        .fetch_one(&mut *tx)
        .await?;
    if let Some(c) = current {
        tx.commit().await?;
        return checkpoint(pool, c).await;
    }
    let row: CheckpointRow = sqlx::query_as(&format!(
        "INSERT INTO checkpoints (parent_id, iteration, kind, path, sha256, status) VALUES ($1, $2, 'lora', $3, $4, 'candidate') RETURNING {CHECKPOINT_COLS}"
    ))
    .bind(it.policy_id)
    .bind(it.number)
    .bind(path)
    .bind(sha256)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO training_runs (iteration_id, checkpoint_id, pair_ids, steps, losses, config, started_at) VALUES ($1, $2, $3, $4, $5, $6, $7)")
        .bind(it.id)
        .bind(row.id)
        .bind(pair_ids)
        .bind(steps)
        .bind(losses)
        .bind(config)
        .bind(started_at)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE iterations SET candidate_id = $2, stage = 'evaluating' WHERE id = $1")
        .bind(it.id)
        .bind(row.id)
        .execute(&mut *tx)
        .await?;
    event(&mut *tx, "candidate_saved", "checkpointer", serde_json::json!({ "checkpoint": row.id, "iteration": it.number, "path": path, "sha256": sha256, "pairs": pair_ids.len() })).await?;
    tx.commit().await?;
    Ok(row)
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
    let mut tx = pool.begin().await?;
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM checkpoints WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(status) = status else { bail!("checkpoint {id} does not exist") };
    if promote {
        sqlx::query("UPDATE checkpoints SET status = 'retired' WHERE status = 'promoted' AND id <> $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    let new_status = if promote {
        "promoted"
    } else if status == "candidate" {
        "rejected"
    } else {
        status.as_str()
    };
    sqlx::query("UPDATE checkpoints SET status = $2, metrics = $3, decided_at = now() WHERE id = $1")
        .bind(id)
        .bind(new_status)
        .bind(metrics)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE iterations SET stage = 'done', finished_at = now() WHERE candidate_id = $1 AND stage = 'evaluating'",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    event(
        &mut *tx,
        if promote { "promoted" } else { "rejected" },
        actor,
        serde_json::json!({ "checkpoint": id, "reason": reason, "metrics": metrics }),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}
