//! Images (content-addressed) and prompts: the training and held-out pool.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Postgres};

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

/// All prompts, on the pool or inside a transaction.
pub async fn count_all_prompts<'e>(ex: impl sqlx::PgExecutor<'e>) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM prompts").fetch_one(ex).await?)
}

/// Held-out prompt ids, oldest first.
pub async fn heldout_prompts(pool: &PgPool, limit: i64) -> Result<Vec<i64>> {
    Ok(sqlx::query_scalar("SELECT id FROM prompts WHERE split = 'heldout' ORDER BY id LIMIT $1")
        .bind(limit)
        .fetch_all(pool)
        .await?)
}
