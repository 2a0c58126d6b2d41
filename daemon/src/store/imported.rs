//! Feedback data that crosses the database's edge: pairs imported from a published dataset
//! (`rlaifd import --as pairs`), the ones an iteration trains on, and the pages `rlaifd export` writes out.

use anyhow::Result;
use sqlx::{PgPool, Postgres};

/// One imported pair to store: the prompt it answers (already stored) and its provenance.
pub struct NewImportedPair<'a> {
    pub prompt_id: i64,
    pub chosen: &'a str,
    pub rejected: &'a str,
    pub source: &'a str,
    pub origin: serde_json::Value,
}

/// Stores an imported pair once (the same prompt, chosen and rejected text is one pair); true when it is new.
pub async fn insert_imported_pair<'a>(
    db: impl sqlx::Acquire<'a, Database = Postgres>,
    p: &NewImportedPair<'_>,
) -> Result<bool> {
    let mut conn = db.acquire().await?;
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO imported_pairs (prompt_id, chosen, rejected, source, origin) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (prompt_id, chosen, rejected) DO NOTHING RETURNING id",
    )
    .bind(p.prompt_id)
    .bind(p.chosen)
    .bind(p.rejected)
    .bind(p.source)
    .bind(&p.origin)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(id.is_some())
}

/// An imported pair as the trainer reads it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ImportedPairRow {
    pub id: i64,
    pub prompt_id: i64,
    pub image_sha256: Option<String>,
    pub instruction: String,
    pub chosen: String,
    pub rejected: String,
}

/// The `k` imported pairs iteration `number` trains on: a window over the pairs of training prompts in id order,
/// the next `k` for each iteration (wrapping around), so successive iterations see different pairs and any daemon
/// picks the same ones. Empty when `k` is 0 or nothing was imported.
pub async fn imported_pairs_for_iteration(pool: &PgPool, number: i32, k: usize) -> Result<Vec<ImportedPairRow>> {
    if k == 0 {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT ip.id FROM imported_pairs ip JOIN prompts pr ON pr.id = ip.prompt_id WHERE pr.split = 'train' ORDER BY ip.id",
    )
    .fetch_all(pool)
    .await?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let start = (number.max(1) as usize - 1).wrapping_mul(k) % ids.len();
    let picked: Vec<i64> = ids.iter().cycle().skip(start).take(k.min(ids.len())).copied().collect();
    let mut rows: Vec<ImportedPairRow> = sqlx::query_as(
        "SELECT ip.id, ip.prompt_id, pr.image_sha256, pr.instruction, ip.chosen, ip.rejected
         FROM imported_pairs ip JOIN prompts pr ON pr.id = ip.prompt_id WHERE ip.id = ANY($1)",
    )
    .bind(&picked)
    .fetch_all(pool)
    .await?;
    // The window's order (by id from `start`, wrapping), whatever order the database returned.
    let pos: std::collections::HashMap<i64, usize> = picked.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    rows.sort_by_key(|r| pos.get(&r.id).copied().unwrap_or(usize::MAX));
    Ok(rows)
}

pub async fn count_imported_pairs(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM imported_pairs").fetch_one(pool).await?)
}

/// Which pairs `rlaifd export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportPairs {
    /// The loop's own pairs (sampled, labeled, paired by the daemon).
    Loop,
    /// Pairs imported from a dataset.
    Imported,
    /// Both, the loop's first.
    All,
}

/// One exported pair: the prompt (its image by sha256), both answers' text and where the pair came from.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ExportRow {
    /// "loop" or "imported" (with `id` the row's id in `pairs` or `imported_pairs`).
    pub kind: String,
    /// 0 for the loop's pairs, 1 for imported ones: the export's order (with `id`).
    pub ord: i32,
    pub id: i64,
    pub iteration: Option<i32>,
    pub score_gap: Option<i32>,
    pub source: String,
    pub image_sha256: Option<String>,
    pub instruction: String,
    pub chosen: String,
    pub rejected: String,
}

/// One page of the pairs to export, after (`ord`, `id`) = `after`, in (ord, id) order (the loop's pairs, then
/// imported ones), at most `limit` rows: keyset pagination, so an export of any size reads a page at a time.
pub async fn export_page(
    pool: &PgPool,
    which: ExportPairs,
    iteration: Option<i32>,
    after: (i32, i64),
    limit: i64,
) -> Result<Vec<ExportRow>> {
    let loop_q =
        "SELECT 'loop'::text AS kind, 0 AS ord, p.id, i.number AS iteration, p.score_gap, 'loop'::text AS source,
                         pr.image_sha256, pr.instruction, c.text AS chosen, r.text AS rejected
                  FROM pairs p JOIN iterations i ON i.id = p.iteration_id JOIN prompts pr ON pr.id = p.prompt_id
                  JOIN responses c ON c.id = p.chosen_id JOIN responses r ON r.id = p.rejected_id
                  WHERE ($1::int IS NULL OR i.number = $1)";
    let imported_q =
        "SELECT 'imported'::text AS kind, 1 AS ord, ip.id, NULL::int AS iteration, NULL::int AS score_gap, ip.source,
                             pr.image_sha256, pr.instruction, ip.chosen, ip.rejected
                      FROM imported_pairs ip JOIN prompts pr ON pr.id = ip.prompt_id WHERE $1::int IS NULL";
    let inner = match which {
        ExportPairs::Loop => loop_q.to_string(),
        ExportPairs::Imported => imported_q.to_string(),
        ExportPairs::All => format!("{loop_q} UNION ALL {imported_q}"),
    };
    Ok(sqlx::query_as(&format!(
        "SELECT * FROM ({inner}) x WHERE (x.ord, x.id) > ($2, $3) ORDER BY x.ord, x.id LIMIT $4"
    ))
    .bind(iteration)
    .bind(after.0)
    .bind(after.1)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
