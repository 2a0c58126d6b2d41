//! The audit log.

use anyhow::Result;
use sqlx::PgPool;

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

/// Why the last iteration failed (its `iteration_failed` event).
pub async fn last_failure_reason(pool: &PgPool) -> Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT detail->>'reason' FROM events WHERE kind = 'iteration_failed' ORDER BY id DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await?
    .flatten())
}

/// Why iteration `number` failed (its `iteration_failed` event), if it did.
pub async fn iteration_failure(pool: &sqlx::PgPool, number: i32) -> anyhow::Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT detail->>'reason' FROM events WHERE kind = 'iteration_failed' AND (detail->>'iteration')::int = $1 ORDER BY id DESC LIMIT 1",
    )
    .bind(number)
    .fetch_optional(pool)
    .await?
    .flatten())
}
