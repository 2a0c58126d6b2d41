//! `rlaifd import`: the RLAIF-V dataset as published on the Hugging Face hub (`RLAIF-V-Dataset_000.parquet`, ...;
//! columns `ds_name`, `image` {bytes, path}, `question`, `chosen`, `rejected`, `origin_dataset`, `origin_split`,
//! `idx`, `image_path`) into the prompt pool (`--as prompts`: image + question) or as ready preference pairs
//! (`--as pairs`: the prompt plus `imported_pairs` rows the trainer can mix in, see `loop.imported_pairs`).
//!
//! Files of a gigabyte are streamed: only the needed columns, a few rows at a time. Every row is checked before it
//! is stored (texts bounded, the image's size read from its header before it is decoded), and each file is stored
//! in one transaction: a bad row names the file and row and stores nothing of that file. Everything is
//! content-addressed or unique, so importing a file again (after a crash, or twice) adds nothing twice.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use tracing::info;

use crate::store;

/// A question longer than this is not a prompt (the RLAIF-V questions are a few hundred bytes).
pub const MAX_QUESTION_BYTES: usize = 16 << 10;
/// An answer longer than this is not one (RLAIF-V's longest are a few KiB).
pub const MAX_ANSWER_BYTES: usize = 64 << 10;
/// The most bytes one embedded image may have (as `rlaifd ctl import-prompts` allows per image).
pub const MAX_IMAGE_BYTES: usize = 32 << 20;
/// Rows decoded at a time: with images at their limit this bounds a batch to 16 x 32 MiB.
const BATCH_ROWS: usize = 16;

/// What the rows become.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportAs {
    /// Image + question into the prompt pool; the loop samples and labels its own answers for them.
    Prompts,
    /// The prompt and the row's chosen / rejected answers as an imported pair.
    Pairs,
}

#[derive(Clone, Debug)]
pub struct ImportOptions {
    pub what: ImportAs,
    /// "train" or "heldout".
    pub split: String,
    /// Stop after this many rows in all (the first files first).
    pub limit: Option<usize>,
    /// Refuse images whose header declares a side longer than this (`server.max_image_side`'s default: 4096).
    pub max_image_side: u32,
}

/// What one file added.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ImportReport {
    pub file: String,
    pub rows: usize,
    pub prompts_new: i64,
    pub prompts_existing: i64,
    pub pairs_new: i64,
    pub pairs_existing: i64,
}

/// The dataset's columns: the ones every use needs, the ones pairs need, and provenance kept with a pair.
const PROMPT_COLUMNS: [&str; 2] = ["image", "question"];
const PAIR_COLUMNS: [&str; 2] = ["chosen", "rejected"];
const ORIGIN_COLUMNS: [&str; 5] = ["ds_name", "origin_dataset", "origin_split", "idx", "image_path"];

/// Imports `files` in order, each in one transaction; returns one report per file. An error names the file (and
/// row) and leaves that file's rows unstored; files before it stay imported (their reports are logged).
pub async fn import_rlaifv(pool: &PgPool, files: &[PathBuf], opts: &ImportOptions) -> Result<Vec<ImportReport>> {
    if !matches!(opts.split.as_str(), "train" | "heldout") {
        bail!("--split must be train or heldout, not {:?}", opts.split);
    }
    if files.is_empty() {
        bail!("no files to import (pass the dataset's parquet files, e.g. RLAIF-V-Dataset_000.parquet)");
    }
    let mut reports = Vec::new();
    let mut left = opts.limit.unwrap_or(usize::MAX);
    for f in files {
        if left == 0 {
            break;
        }
        let r = import_file(pool, f, opts, left).await?;
        left -= r.rows;
        info!(
            file = %r.file, rows = r.rows, prompts_new = r.prompts_new, prompts_existing = r.prompts_existing,
            pairs_new = r.pairs_new, pairs_existing = r.pairs_existing, "imported"
        );
        reports.push(r);
    }
    Ok(reports)
}

/// A parquet file checked by kind before the parquet reader sees it: a regular file that starts and ends with
/// parquet's magic.
fn open_parquet(path: &Path) -> Result<File> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut head = [0u8; 4];
    let is_parquet = meta.len() >= 12 && f.read_exact(&mut head).is_ok() && &head == b"PAR1";
    if !is_parquet {
        bail!("{} is not a parquet file (the RLAIF-V dataset's files are RLAIF-V-Dataset_NNN.parquet)", path.display());
    }
    Ok(f)
}

async fn import_file(pool: &PgPool, path: &Path, opts: &ImportOptions, limit: usize) -> Result<ImportReport> {
    let shown = path.display().to_string();
    let file = open_parquet(path)?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{shown}: cannot read the parquet metadata"))?;
    let schema = builder.schema().clone();
    let have: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let mut needed: Vec<&str> = PROMPT_COLUMNS.to_vec();
    if opts.what == ImportAs::Pairs {
        needed.extend(PAIR_COLUMNS);
    }
    for c in &needed {
        if !have.contains(c) {
            bail!(
                "{shown}: no column {c:?} (--as {} needs {}); the file's columns are {}",
                if opts.what == ImportAs::Pairs { "pairs" } else { "prompts" },
                needed.join(", "),
                have.join(", ")
            );
        }
    }
    for c in needed.iter().chain(ORIGIN_COLUMNS.iter()).filter(|c| have.contains(c)) {
        let dt = schema.field_with_name(c)?.data_type();
        let ok = match *c {
            "image" => image_type_ok(dt),
            "idx" => is_text(dt) || dt.is_integer(),
            _ => is_text(dt),
        };
        if !ok {
            bail!("{shown}: column {c:?} has type {dt}, not the RLAIF-V dataset's (text; image: struct of bytes and path)");
        }
    }
    let roots: Vec<usize> = schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| needed.contains(&f.name().as_str()) || ORIGIN_COLUMNS.contains(&f.name().as_str()))
        .map(|(i, _)| i)
        .collect();
    let total = builder.metadata().file_metadata().num_rows().max(0) as usize;
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(BATCH_ROWS)
        .build()
        .with_context(|| format!("{shown}: cannot read its row groups"))?;
    let source = format!("rlaif-v:{}", path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    let mut report = ImportReport { file: shown.clone(), ..Default::default() };
    let mut tx = pool.begin().await?;
    let prompts_before = store::count_all_prompts(&mut *tx).await?;
    let (started, mut last_log) = (Instant::now(), Instant::now());
    let mut stored_images = std::collections::HashSet::new();
    'batches: for batch in reader {
        let batch = batch.with_context(|| format!("{shown}: cannot decode rows after row {}", report.rows))?;
        for i in 0..batch.num_rows() {
            if report.rows >= limit {
                break 'batches;
            }
            let n = report.rows;
            let row = read_row(&batch, i, opts.what).with_context(|| format!("{shown} row {n}"))?;
            let sha = match row.image {
                Some(bytes) => {
                    let what = format!("{shown} row {n}: image");
                    let (w, h) = engine::image::header_dimensions(&bytes, &what)?;
                    if w.max(h) > opts.max_image_side {
                        bail!("{what} is {w}x{h}; its longer side passes the limit of {} pixels", opts.max_image_side);
                    }
                    // RLAIF-V asks several questions of each image: decode and store each image once.
                    let sha = store::sha256_hex(&bytes);
                    if !stored_images.contains(&sha) {
                        store::insert_image(&mut *tx, &bytes).await.with_context(|| what.clone())?;
                        stored_images.insert(sha.clone());
                    }
                    Some(sha)
                }
                None => None,
            };
            let prompt_id = store::insert_prompt(
                &mut *tx,
                &store::NewPrompt {
                    image_sha256: sha,
                    instruction: row.question,
                    source: source.clone(),
                    split: opts.split.clone(),
                    ground_truth: None,
                },
            )
            .await?;
            if let (Some(chosen), Some(rejected)) = (&row.chosen, &row.rejected) {
                let mut origin = row.origin;
                origin.insert("file".into(), Value::from(shown.clone()));
                origin.insert("row".into(), Value::from(n));
                let new = store::insert_imported_pair(
                    &mut *tx,
                    &store::NewImportedPair {
                        prompt_id,
                        chosen,
                        rejected,
                        source: &source,
                        origin: Value::Object(origin.into_iter().collect()),
                    },
                )
                .await?;
                if new {
                    report.pairs_new += 1;
                } else {
                    report.pairs_existing += 1;
                }
            }
            report.rows += 1;
            if last_log.elapsed().as_secs() >= 10 {
                last_log = Instant::now();
                let rate = report.rows as f64 / started.elapsed().as_secs_f64().max(1e-9);
                info!(file = %shown, rows = report.rows, of = total.min(limit), rows_per_s = format!("{rate:.0}"), "importing");
            }
        }
    }
    let prompts_after = store::count_all_prompts(&mut *tx).await?;
    tx.commit().await?;
    report.prompts_new = prompts_after - prompts_before;
    report.prompts_existing = report.rows as i64 - report.prompts_new;
    if report.rows == 0 {
        bail!("{shown} holds no rows");
    }
    Ok(report)
}

/// One row, checked.
struct Row {
    image: Option<Vec<u8>>,
    question: String,
    chosen: Option<String>,
    rejected: Option<String>,
    origin: BTreeMap<String, Value>,
}

fn read_row(batch: &RecordBatch, i: usize, what: ImportAs) -> Result<Row> {
    let col = |name: &str| batch.column_by_name(name);
    let text = |name: &str, max: usize| -> Result<Option<String>> {
        let Some(c) = col(name) else { return Ok(None) };
        match string_at(c.as_ref(), i) {
            None => Ok(None),
            Some(s) if s.len() > max => bail!("{name:?} is {} bytes, more than the limit of {max}", s.len()),
            Some(s) => Ok(Some(s.to_string())),
        }
    };
    // LLaVA-style data may carry the image placeholder in the text; the chat template places the image itself.
    let question = text("question", MAX_QUESTION_BYTES)?.map(|q| q.replace("<image>", "").trim().to_string());
    let question = question.filter(|q| !q.is_empty()).context("\"question\" is empty or missing")?;
    let image = match col("image") {
        Some(c) => image_at(c.as_ref(), i)?,
        None => None,
    };
    let (mut chosen, mut rejected) = (None, None);
    if what == ImportAs::Pairs {
        let c = text("chosen", MAX_ANSWER_BYTES)?.filter(|s| !s.trim().is_empty());
        let r = text("rejected", MAX_ANSWER_BYTES)?.filter(|s| !s.trim().is_empty());
        let (c, r) = (c.context("\"chosen\" is empty or missing")?, r.context("\"rejected\" is empty or missing")?);
        if c == r {
            bail!("\"chosen\" and \"rejected\" are the same text (not a preference)");
        }
        (chosen, rejected) = (Some(c), Some(r));
    }
    let mut origin = BTreeMap::new();
    for name in ORIGIN_COLUMNS {
        if let Some(c) = col(name) {
            let v = match string_at(c.as_ref(), i) {
                Some(s) => Value::from(s.chars().take(1024).collect::<String>()),
                None => integer_at(c.as_ref(), i).map(Value::from).unwrap_or(Value::Null),
            };
            if !v.is_null() {
                origin.insert(name.to_string(), v);
            }
        }
    }
    Ok(Row { image, question, chosen, rejected, origin })
}

fn is_text(dt: &DataType) -> bool {
    matches!(dt, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

fn is_binary(dt: &DataType) -> bool {
    matches!(dt, DataType::Binary | DataType::LargeBinary | DataType::BinaryView)
}

/// `datasets`' Image feature is a struct {bytes: binary, path: string}; raw binary is accepted too.
fn image_type_ok(dt: &DataType) -> bool {
    match dt {
        DataType::Struct(fields) => fields.iter().any(|f| f.name() == "bytes" && is_binary(f.data_type())),
        other => is_binary(other),
    }
}

fn string_at(c: &dyn Array, i: usize) -> Option<&str> {
    if c.is_null(i) {
        return None;
    }
    match c.data_type() {
        DataType::Utf8 => Some(c.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => Some(c.as_string::<i64>().value(i)),
        DataType::Utf8View => Some(c.as_string_view().value(i)),
        _ => None,
    }
}

fn binary_at(c: &dyn Array, i: usize) -> Option<&[u8]> {
    if c.is_null(i) {
        return None;
    }
    match c.data_type() {
        DataType::Binary => Some(c.as_binary::<i32>().value(i)),
        DataType::LargeBinary => Some(c.as_binary::<i64>().value(i)),
        DataType::BinaryView => Some(c.as_binary_view().value(i)),
        _ => None,
    }
}

fn integer_at(c: &dyn Array, i: usize) -> Option<i64> {
    if c.is_null(i) {
        return None;
    }
    use arrow_array::types::{Int32Type, Int64Type, UInt32Type, UInt64Type};
    match c.data_type() {
        DataType::Int64 => Some(c.as_primitive::<Int64Type>().value(i)),
        DataType::Int32 => Some(c.as_primitive::<Int32Type>().value(i) as i64),
        DataType::UInt32 => Some(c.as_primitive::<UInt32Type>().value(i) as i64),
        DataType::UInt64 => i64::try_from(c.as_primitive::<UInt64Type>().value(i)).ok(),
        _ => None,
    }
}

/// The row's embedded image bytes (bounded); an image given only by path is refused, the published files embed
/// every image.
fn image_at(c: &dyn Array, i: usize) -> Result<Option<Vec<u8>>> {
    if c.is_null(i) {
        bail!("\"image\" is empty (the published files embed every image)");
    }
    let (bytes, path) = match c.data_type() {
        DataType::Struct(_) => {
            let s = c.as_struct();
            let bytes = s.column_by_name("bytes").and_then(|b| binary_at(b.as_ref(), i));
            let path = s.column_by_name("path").and_then(|p| string_at(p.as_ref(), i));
            (bytes, path)
        }
        _ => (binary_at(c, i), None),
    };
    match bytes {
        Some(b) if b.len() > MAX_IMAGE_BYTES => {
            bail!("the image is {} bytes, more than the limit of {MAX_IMAGE_BYTES}", b.len())
        }
        Some(b) if !b.is_empty() => Ok(Some(b.to_vec())),
        _ => bail!(
            "the image is not embedded{} (rlaifd imports the published files, which embed every image)",
            path.map(|p| format!(" (only its path {p:?})")).unwrap_or_default()
        ),
    }
}
