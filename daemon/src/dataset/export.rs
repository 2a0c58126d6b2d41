//! `rlaifd export`: the database's preference pairs as a dataset TRL's `DPOTrainer` trains a vision model on.
//!
//! One parquet file in the conversational preference format TRL documents for vision models (the layout of
//! `HuggingFaceH4/rlaif-v_formatted`): `images` (a list of images, the prompt's one or none), `prompt` (one user
//! message: an image part then the question), `chosen` and `rejected` (one assistant message each), plus where
//! each pair came from (`kind` "loop" or "imported", `pair_id`, `iteration`, `score_gap`, `source`). The schema's
//! `huggingface` metadata names the features, so `datasets` decodes `images` as `Image` and the messages as
//! lists of dicts. Pairs are read a page at a time and written a row group at a time; the file appears under its
//! name only when complete.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow_array::{ArrayRef, BinaryArray, Int32Array, Int64Array, ListArray, RecordBatch, StringArray, StructArray};
use arrow_buffer::OffsetBuffer;
use arrow_schema::{DataType, Field, Fields, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;
use tracing::info;

use crate::store::{self, ExportPairs, ExportRow};

/// Pairs read from the database and written as one row group at a time.
const PAGE_ROWS: i64 = 64;

#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub which: ExportPairs,
    /// Only the loop's pairs of this iteration.
    pub iteration: Option<i32>,
    /// At most this many pairs.
    pub limit: Option<usize>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ExportReport {
    pub file: String,
    pub pairs: usize,
    pub loop_pairs: usize,
    pub imported_pairs: usize,
    pub images: usize,
}

fn text_field(name: &str) -> Field {
    Field::new(name, DataType::Utf8, true)
}

/// A message's parts: {"text": str|null, "type": "image"|"text"}.
fn part_fields() -> Fields {
    Fields::from(vec![text_field("text"), text_field("type")])
}

/// A message: {"content": [part], "role": str}.
fn message_fields() -> Fields {
    let content = DataType::List(Arc::new(Field::new("item", DataType::Struct(part_fields()), true)));
    Fields::from(vec![Field::new("content", content, true), text_field("role")])
}

/// `datasets`' Image storage: {"bytes": binary, "path": str}.
fn image_fields() -> Fields {
    Fields::from(vec![Field::new("bytes", DataType::Binary, true), text_field("path")])
}

fn list_of(fields: Fields) -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Struct(fields), true)))
}

/// The features as `datasets` writes them into the schema's `huggingface` metadata.
fn hf_features() -> serde_json::Value {
    let s = json!({ "dtype": "string", "_type": "Value" });
    let message = json!([{ "content": [{ "text": s, "type": s }], "role": s }]);
    json!({ "info": { "features": {
        "images": [{ "_type": "Image" }],
        "prompt": message,
        "chosen": message,
        "rejected": message,
        "kind": s,
        "pair_id": { "dtype": "int64", "_type": "Value" },
        "iteration": { "dtype": "int32", "_type": "Value" },
        "score_gap": { "dtype": "int32", "_type": "Value" },
        "source": s,
    } } })
}

fn schema() -> Schema {
    let meta: std::collections::HashMap<String, String> =
        [("huggingface".to_string(), hf_features().to_string())].into_iter().collect();
    Schema::new_with_metadata(
        vec![
            Field::new("images", list_of(image_fields()), true),
            Field::new("prompt", list_of(message_fields()), true),
            Field::new("chosen", list_of(message_fields()), true),
            Field::new("rejected", list_of(message_fields()), true),
            text_field("kind"),
            Field::new("pair_id", DataType::Int64, true),
            Field::new("iteration", DataType::Int32, true),
            Field::new("score_gap", DataType::Int32, true),
            text_field("source"),
        ],
        meta,
    )
}

/// A message part: (type, text); the image part has no text.
type Part<'a> = (&'a str, Option<&'a str>);
/// A message: (role, parts).
type Message<'a> = (&'a str, Vec<Part<'a>>);

/// One message per row.
fn messages(rows: &[Message<'_>]) -> Result<ArrayRef> {
    let parts: Vec<&Part<'_>> = rows.iter().flat_map(|(_, p)| p).collect();
    let part_struct = StructArray::try_new(
        part_fields(),
        vec![
            Arc::new(parts.iter().map(|p| p.1).collect::<StringArray>()) as ArrayRef,
            Arc::new(parts.iter().map(|p| Some(p.0)).collect::<StringArray>()) as ArrayRef,
        ],
        None,
    )?;
    let content = ListArray::try_new(
        Arc::new(Field::new("item", DataType::Struct(part_fields()), true)),
        OffsetBuffer::from_lengths(rows.iter().map(|(_, p)| p.len())),
        Arc::new(part_struct),
        None,
    )?;
    let message = StructArray::try_new(
        message_fields(),
        vec![Arc::new(content) as ArrayRef, Arc::new(rows.iter().map(|r| Some(r.0)).collect::<StringArray>())],
        None,
    )?;
    Ok(Arc::new(ListArray::try_new(
        Arc::new(Field::new("item", DataType::Struct(message_fields()), true)),
        OffsetBuffer::from_lengths(rows.iter().map(|_| 1)),
        Arc::new(message),
        None,
    )?))
}

fn batch(rows: &[ExportRow], images: &[Option<Vec<u8>>]) -> Result<RecordBatch> {
    let with_image: Vec<&[u8]> = images.iter().flatten().map(|b| b.as_slice()).collect();
    let image_struct = StructArray::try_new(
        image_fields(),
        vec![
            Arc::new(BinaryArray::from_vec(with_image.clone())) as ArrayRef,
            Arc::new(StringArray::from(vec![None::<&str>; with_image.len()])) as ArrayRef,
        ],
        None,
    )?;
    let images_col = ListArray::try_new(
        Arc::new(Field::new("item", DataType::Struct(image_fields()), true)),
        OffsetBuffer::from_lengths(images.iter().map(|b| usize::from(b.is_some()))),
        Arc::new(image_struct),
        None,
    )?;
    let prompt: Vec<Message<'_>> = rows
        .iter()
        .zip(images)
        .map(|(r, img)| {
            let mut parts = Vec::new();
            if img.is_some() {
                parts.push(("image", None));
            }
            parts.push(("text", Some(r.instruction.as_str())));
            ("user", parts)
        })
        .collect();
    let answer = |f: fn(&ExportRow) -> &str| -> Vec<Message<'_>> {
        rows.iter().map(|r| ("assistant", vec![("text", Some(f(r)))])).collect()
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(images_col),
        messages(&prompt)?,
        messages(&answer(|r| r.chosen.as_str()))?,
        messages(&answer(|r| r.rejected.as_str()))?,
        Arc::new(rows.iter().map(|r| Some(r.kind.as_str())).collect::<StringArray>()),
        Arc::new(rows.iter().map(|r| Some(r.id)).collect::<Int64Array>()),
        Arc::new(rows.iter().map(|r| r.iteration).collect::<Int32Array>()),
        Arc::new(rows.iter().map(|r| r.score_gap).collect::<Int32Array>()),
        Arc::new(rows.iter().map(|r| Some(r.source.as_str())).collect::<StringArray>()),
    ];
    Ok(RecordBatch::try_new(Arc::new(schema()), columns)?)
}

/// Writes the pairs `opts` selects to `out` (parquet; replaced atomically when it exists). No pairs is an error
/// that says what was selected.
pub async fn export_pairs(pool: &PgPool, out: &Path, opts: &ExportOptions) -> Result<ExportReport> {
    if out.is_dir() {
        bail!("--out {} is a directory; name the parquet file to write", out.display());
    }
    if opts.iteration.is_some() && opts.which != ExportPairs::Loop {
        bail!("--iteration selects the loop's pairs of one iteration; use it with --pairs loop");
    }
    let tmp = out.with_file_name(format!(
        ".{}.partial",
        out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "export".into())
    ));
    let file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let props = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
    let mut writer = ArrowWriter::try_new(file, Arc::new(schema()), Some(props))?;
    let mut report = ExportReport { file: out.display().to_string(), ..Default::default() };
    let mut after = (-1i32, 0i64);
    let limit = opts.limit.unwrap_or(usize::MAX);
    let result: Result<()> = async {
        while report.pairs < limit {
            let want = PAGE_ROWS.min(i64::try_from(limit - report.pairs).unwrap_or(i64::MAX));
            let rows = store::export_page(pool, opts.which, opts.iteration, after, want).await?;
            let Some(last) = rows.last() else { break };
            after = (last.ord, last.id);
            let mut images = Vec::with_capacity(rows.len());
            for r in &rows {
                images.push(match &r.image_sha256 {
                    Some(sha) => Some(store::image_bytes(pool, sha).await?),
                    None => None,
                });
            }
            writer.write(&batch(&rows, &images)?)?;
            writer.flush()?;
            report.pairs += rows.len();
            report.loop_pairs += rows.iter().filter(|r| r.kind == "loop").count();
            report.imported_pairs += rows.iter().filter(|r| r.kind == "imported").count();
            report.images += images.iter().filter(|i| i.is_some()).count();
            info!(pairs = report.pairs, "exporting");
        }
        Ok(())
    }
    .await;
    let closed = result.and_then(|_| Ok(writer.into_inner()?.sync_all()?));
    if let Err(e) = closed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if report.pairs == 0 {
        let _ = std::fs::remove_file(&tmp);
        let which = match opts.which {
            ExportPairs::Loop => "pairs from the loop",
            ExportPairs::Imported => "imported pairs",
            ExportPairs::All => "pairs",
        };
        bail!(
            "the database holds no {which}{} to export",
            opts.iteration.map(|n| format!(" of iteration {n}")).unwrap_or_default()
        );
    }
    std::fs::rename(&tmp, out).with_context(|| format!("cannot move {} to {}", tmp.display(), out.display()))?;
    Ok(report)
}
