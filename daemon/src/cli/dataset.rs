//! `rlaifd import` and `rlaifd export`: feedback datasets in and out of the database (`rlaifd::dataset`).

use std::path::PathBuf;

use anyhow::Result;
use rlaifd::dataset::{self, ImportAs};
use rlaifd::store::ExportPairs;

#[derive(clap::Args)]
pub struct ImportArgs {
    /// The RLAIF-V dataset's parquet files as published (RLAIF-V-Dataset_000.parquet ...), imported in order.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// prompts: image + question into the prompt pool; pairs: the prompt and its chosen / rejected answers as a
    /// ready pair (`loop.imported_pairs` mixes them into training; `rlaifd export --pairs imported` writes them).
    #[arg(long = "as", value_enum, default_value = "prompts")]
    what: ImportAs,
    /// The prompts' split: train (the loop samples them) or heldout (the labeler gate evaluates on them).
    #[arg(long, default_value = "train")]
    split: String,
    /// Import at most this many rows in all.
    #[arg(long)]
    limit: Option<usize>,
    /// Refuse an image whose header declares a longer side (pixels).
    #[arg(long, default_value_t = 4096)]
    max_image_side: u32,
    /// PostgreSQL URL (default: $DATABASE_URL, else postgres://postgres@127.0.0.1:5432/rlaifd).
    #[arg(long)]
    database_url: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Which {
    Loop,
    Imported,
    All,
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The parquet file to write (TRL's vision preference format: images, prompt, chosen, rejected).
    #[arg(long)]
    out: PathBuf,
    /// loop: the pairs the loop built; imported: pairs from `rlaifd import --as pairs`; all: both.
    #[arg(long, value_enum, default_value = "loop")]
    pairs: Which,
    /// Only the loop's pairs of this iteration (its number).
    #[arg(long)]
    iteration: Option<i32>,
    /// At most this many pairs.
    #[arg(long)]
    limit: Option<usize>,
    /// PostgreSQL URL (default: $DATABASE_URL, else postgres://postgres@127.0.0.1:5432/rlaifd).
    #[arg(long)]
    database_url: Option<String>,
}

pub fn cmd_import(a: ImportArgs) -> Result<()> {
    super::async_main(async move {
        let url = a.database_url.unwrap_or_else(rlaifd::db::url_from_env);
        let pool = rlaifd::db::open(&url, 2).await?;
        let opts =
            dataset::ImportOptions { what: a.what, split: a.split, limit: a.limit, max_image_side: a.max_image_side };
        for r in dataset::import_rlaifv(&pool, &a.files, &opts).await? {
            println!("{}", serde_json::to_string(&r)?);
        }
        Ok(())
    })
}

pub fn cmd_export(a: ExportArgs) -> Result<()> {
    super::async_main(async move {
        let url = a.database_url.unwrap_or_else(rlaifd::db::url_from_env);
        let pool = rlaifd::db::open(&url, 2).await?;
        let which = match a.pairs {
            Which::Loop => ExportPairs::Loop,
            Which::Imported => ExportPairs::Imported,
            Which::All => ExportPairs::All,
        };
        let opts = dataset::ExportOptions { which, iteration: a.iteration, limit: a.limit };
        let r = dataset::export_pairs(&pool, &a.out, &opts).await?;
        println!("{}", serde_json::to_string(&r)?);
        Ok(())
    })
}
