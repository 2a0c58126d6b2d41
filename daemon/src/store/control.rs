//! Operator requests kept in the database (`loop_control`): whether the loop is paused and whether an iteration
//! was asked for, so a restarted daemon, and every daemon on the same database, sees them.

use anyhow::Result;
use sqlx::PgPool;

pub async fn loop_paused(pool: &PgPool) -> Result<bool> {
    Ok(sqlx::query_scalar("SELECT paused FROM loop_control").fetch_one(pool).await?)
}

/// Pauses or resumes the loop.
pub async fn set_loop_paused(pool: &PgPool, paused: bool) -> Result<()> {
    sqlx::query("UPDATE loop_control SET paused = $1, updated_at = now()").bind(paused).execute(pool).await?;
    Ok(())
}

/// Asks for an iteration (taken by `take_iterate_request`).
pub async fn request_iteration(pool: &PgPool) -> Result<()> {
    sqlx::query("UPDATE loop_control SET iterate_requested = true, updated_at = now()").execute(pool).await?;
    Ok(())
}

/// Takes a pending iteration request: true for exactly one caller per request, across daemons.
pub async fn take_iterate_request(pool: &PgPool) -> Result<bool> {
    let taken: Option<bool> = sqlx::query_scalar(
        "UPDATE loop_control SET iterate_requested = false, updated_at = now() WHERE iterate_requested RETURNING true",
    )
    .fetch_optional(pool)
    .await?;
    Ok(taken.is_some())
}
