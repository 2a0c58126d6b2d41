//! What a stage stores when its job finishes: answers (sample jobs), claims, verdicts and pairs (label jobs).

use super::jobs::{hold_lease, Job};
use anyhow::Result;
use sqlx::PgPool;

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

/// Finishes a label job: claims and verdicts per response (`labeled[i]` = (response id, score, claims)), with the
/// labeler and the extractor that produced them, the pairs, the job marked done, in one transaction. Returns false (storing nothing) when the lease was lost.
#[allow(clippy::too_many_arguments)]
pub async fn finish_label(
    pool: &PgPool,
    job: &Job,
    owner: &str,
    labeler: &str,
    extractor: &str,
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
                "INSERT INTO claims (response_id, idx, claim, question, p_yes, p_no, accepted, labeler, extractor) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
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
            .bind(extractor)
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

/// The pairs of an iteration, by prompt and then by id: the same order whichever workers labeled which prompts
/// (one label job inserts a prompt's pairs in one transaction), so training sees the same data order.
pub async fn iteration_pairs(pool: &PgPool, iteration_id: i64) -> Result<Vec<PairRow>> {
    Ok(sqlx::query_as(
        "SELECT p.id, p.prompt_id, pr.image_sha256, pr.instruction, c.tokens AS chosen_tokens, r.tokens AS rejected_tokens,
                c.text AS chosen_text, r.text AS rejected_text, c.finish AS chosen_finish, r.finish AS rejected_finish, p.ref_logp_chosen, p.ref_logp_rejected
         FROM pairs p JOIN prompts pr ON pr.id = p.prompt_id JOIN responses c ON c.id = p.chosen_id JOIN responses r ON r.id = p.rejected_id
         WHERE p.iteration_id = $1 ORDER BY p.prompt_id, p.id",
    )
    .bind(iteration_id)
    .fetch_all(pool)
    .await?)
}

pub async fn count_pairs(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM pairs").fetch_one(pool).await?)
}
