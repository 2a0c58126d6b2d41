//! Files that travel between daemons through the database, content-addressed: a checkpoint's adapter files
//! (`checkpoint_files`) and the last saved state of a training run (`training_state`). No daemon needs another's
//! filesystem. A blob is named by the sha256 of its bytes; the name is computed when it is stored and checked
//! again when it is fetched, so a file that changed in transit or at rest is refused, never served.

use super::events::event;
use super::jobs::hold_lease;
use anyhow::{bail, Context, Result};
use sqlx::{PgPool, Postgres, Row, Transaction};

/// The largest file stored (PostgreSQL's bytea holds at most 1 GiB; a LoRA adapter of a 7B model at r = 16 is
/// about 80 MB in f32).
pub const MAX_BLOB_BYTES: usize = 1 << 30;

/// One named file of a directory, by content.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct FileRef {
    pub name: String,
    pub sha256: String,
}

/// Whether `name` is a plain file name (what the schema allows: no separators, no leading dot).
pub fn safe_file_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Stores `bytes` (a no-op when the same content is stored already; a stored copy damaged at rest is replaced)
/// and returns its sha256.
pub async fn put_blob(tx: &mut Transaction<'_, Postgres>, bytes: &[u8]) -> Result<String> {
    if bytes.len() > MAX_BLOB_BYTES {
        bail!("a file of {} bytes is over the {} bytes one database blob holds", bytes.len(), MAX_BLOB_BYTES);
    }
    let sha = super::sha256_hex(bytes);
    sqlx::query("INSERT INTO blobs (sha256, bytes, size) VALUES ($1, $2, $3) ON CONFLICT (sha256)
         DO UPDATE SET bytes = EXCLUDED.bytes, size = EXCLUDED.size WHERE encode(sha256(blobs.bytes), 'hex') <> blobs.sha256")
        .bind(&sha)
        .bind(bytes)
        .bind(bytes.len() as i64)
        .execute(&mut **tx)
        .await?;
    Ok(sha)
}

/// The bytes of blob `sha256`, checked against their name.
pub async fn blob(pool: &PgPool, sha256: &str) -> Result<Vec<u8>> {
    let bytes: Vec<u8> = sqlx::query_scalar("SELECT bytes FROM blobs WHERE sha256 = $1")
        .bind(sha256)
        .fetch_optional(pool)
        .await?
        .with_context(|| format!("blob {sha256} is not in the database"))?;
    let got = super::sha256_hex(&bytes);
    if got != sha256 {
        bail!("blob {sha256} read back with sha256 {got}: the database copy is damaged");
    }
    Ok(bytes)
}

/// Stores a checkpoint's files and names them as its own (in the caller's transaction).
pub async fn put_checkpoint_files(
    tx: &mut Transaction<'_, Postgres>,
    checkpoint_id: i64,
    files: &[(String, Vec<u8>)],
) -> Result<()> {
    for (name, bytes) in files {
        if !safe_file_name(name) {
            bail!("checkpoint file name {name:?} is not a plain file name");
        }
        let sha = put_blob(tx, bytes).await?;
        sqlx::query(
            "INSERT INTO checkpoint_files (checkpoint_id, name, sha256) VALUES ($1, $2, $3)
             ON CONFLICT (checkpoint_id, name) DO UPDATE SET sha256 = EXCLUDED.sha256",
        )
        .bind(checkpoint_id)
        .bind(name)
        .bind(&sha)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Stores the files of an existing checkpoint (one that predates the blob table: its daemon uploads it).
pub async fn upload_checkpoint_files(pool: &PgPool, checkpoint_id: i64, files: &[(String, Vec<u8>)]) -> Result<()> {
    let mut tx = pool.begin().await?;
    put_checkpoint_files(&mut tx, checkpoint_id, files).await?;
    tx.commit().await?;
    Ok(())
}

/// The files stored for a checkpoint (empty when none are).
pub async fn checkpoint_files(pool: &PgPool, checkpoint_id: i64) -> Result<Vec<FileRef>> {
    Ok(sqlx::query_as("SELECT name, sha256 FROM checkpoint_files WHERE checkpoint_id = $1 ORDER BY name")
        .bind(checkpoint_id)
        .fetch_all(pool)
        .await?)
}

/// What is wrong with a checkpoint's stored files, checked inside the database (nothing is transferred): none
/// stored, no adapter_model.safetensors with sha256 `want`, or a blob whose bytes no longer match its name.
/// Empty: every daemon can fetch it.
pub async fn stored_file_problems(pool: &PgPool, checkpoint_id: i64, want: &str) -> Result<Vec<String>> {
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT f.name, f.sha256, encode(sha256(b.bytes), 'hex') FROM checkpoint_files f LEFT JOIN blobs b ON b.sha256 = f.sha256
         WHERE f.checkpoint_id = $1 ORDER BY f.name",
    )
    .bind(checkpoint_id)
    .fetch_all(pool)
    .await?;
    if rows.is_empty() {
        return Ok(vec!["no files stored in the database".into()]);
    }
    let mut problems = Vec::new();
    if !rows.iter().any(|(n, s, _)| n == "adapter_model.safetensors" && s == want) {
        problems.push(format!("no stored adapter_model.safetensors with sha256 {want}"));
    }
    for (name, sha, actual) in &rows {
        match actual {
            None => problems.push(format!("{name}: blob {sha} is missing")),
            Some(a) if a != sha => problems.push(format!("{name}: the stored bytes have sha256 {a}, not {sha}")),
            _ => {}
        }
    }
    Ok(problems)
}

/// Trained checkpoints whose files are not in the database.
pub async fn checkpoints_without_files(pool: &PgPool) -> Result<Vec<super::CheckpointRow>> {
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT c.id FROM checkpoints c WHERE c.kind = 'lora' AND NOT EXISTS (SELECT 1 FROM checkpoint_files f WHERE f.checkpoint_id = c.id) ORDER BY c.id",
    )
    .fetch_all(pool)
    .await?;
    let mut rows = Vec::with_capacity(ids.len());
    for id in ids {
        rows.push(super::checkpoint(pool, id).await?);
    }
    Ok(rows)
}

/// The last saved state of an iteration's training run: (step, files).
pub async fn training_state(pool: &PgPool, iteration_id: i64) -> Result<Option<(i32, Vec<FileRef>)>> {
    let Some(step): Option<i32> = sqlx::query_scalar("SELECT step FROM training_state WHERE iteration_id = $1")
        .bind(iteration_id)
        .fetch_optional(pool)
        .await?
    else {
        return Ok(None);
    };
    let files = sqlx::query_as("SELECT name, sha256 FROM training_state_files WHERE iteration_id = $1 ORDER BY name")
        .bind(iteration_id)
        .fetch_all(pool)
        .await?;
    Ok(Some((step, files)))
}

/// Replaces an iteration's saved training state with `files` at `step`, if `owner` still holds train job `job`.
/// Returns false (nothing stored) when the lease was lost. Blobs no longer named by anything are dropped.
pub async fn save_training_state(
    pool: &PgPool,
    job: i64,
    owner: &str,
    iteration_id: i64,
    step: usize,
    worker: &str,
    files: &[(String, Vec<u8>)],
) -> Result<bool> {
    let mut tx = pool.begin().await?;
    if !hold_lease(&mut tx, job, owner).await? {
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO training_state (iteration_id, step, worker) VALUES ($1, $2, $3)
         ON CONFLICT (iteration_id) DO UPDATE SET step = EXCLUDED.step, worker = EXCLUDED.worker, saved_at = now()",
    )
    .bind(iteration_id)
    .bind(step as i32)
    .bind(worker)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM training_state_files WHERE iteration_id = $1")
        .bind(iteration_id)
        .execute(&mut *tx)
        .await?;
    for (name, bytes) in files {
        if !safe_file_name(name) {
            bail!("training state file name {name:?} is not a plain file name");
        }
        let sha = put_blob(&mut tx, bytes).await?;
        sqlx::query("INSERT INTO training_state_files (iteration_id, name, sha256) VALUES ($1, $2, $3)")
            .bind(iteration_id)
            .bind(name)
            .bind(&sha)
            .execute(&mut *tx)
            .await?;
    }
    drop_unreferenced(&mut tx).await?;
    event(&mut *tx, "training_saved", worker, serde_json::json!({ "iteration_id": iteration_id, "step": step }))
        .await?;
    tx.commit().await?;
    Ok(true)
}

/// Drops an iteration's saved training state (its candidate is recorded) in the caller's transaction.
pub async fn drop_training_state(tx: &mut Transaction<'_, Postgres>, iteration_id: i64) -> Result<()> {
    sqlx::query("DELETE FROM training_state WHERE iteration_id = $1").bind(iteration_id).execute(&mut **tx).await?;
    drop_unreferenced(tx).await
}

/// Deletes blobs no checkpoint and no saved training state names.
async fn drop_unreferenced(tx: &mut Transaction<'_, Postgres>) -> Result<()> {
    sqlx::query(
        "DELETE FROM blobs b WHERE NOT EXISTS (SELECT 1 FROM checkpoint_files f WHERE f.sha256 = b.sha256)
           AND NOT EXISTS (SELECT 1 FROM training_state_files t WHERE t.sha256 = b.sha256)",
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Bytes stored in blobs: (count, total bytes).
pub async fn blob_totals(pool: &PgPool) -> Result<(i64, i64)> {
    let r =
        sqlx::query("SELECT count(*) AS n, COALESCE(sum(size), 0)::bigint AS bytes FROM blobs").fetch_one(pool).await?;
    Ok((r.get("n"), r.get("bytes")))
}
