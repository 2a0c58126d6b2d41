//! Feedback data in the formats people exchange it in: `rlaifd import` reads the RLAIF-V dataset as published
//! (its parquet files, images embedded) into the prompt pool or as ready pairs, and `rlaifd export` writes the
//! database's pairs as a dataset TRL's `DPOTrainer` trains a vision model on (parquet that Hugging Face `datasets`
//! loads with its image and chat-message types). Both go through the arrow / parquet crates.

pub mod export;
pub mod import;

pub use export::{export_pairs, ExportOptions, ExportReport};
pub use import::{import_rlaifv, ImportAs, ImportOptions, ImportReport};
