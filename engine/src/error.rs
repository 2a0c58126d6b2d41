//! Engine errors. Every variant that a user can cause names the input (file, key) and what was wrong.

use std::path::PathBuf;

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Writing (or creating, renaming, removing) a file failed: a full disk, a read-only or blocked path. The OS
    /// error is part of the message (and not repeated as a source).
    #[error("cannot write {path}: {err}")]
    Write { path: PathBuf, err: std::io::Error },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },

    #[error("{path}: not a valid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },

    #[error("tensor `{key}` not found in {searched}{hint}")]
    MissingTensor { key: String, searched: String, hint: String },

    #[error("{path}: tensor `{key}` has shape {got:?}, expected {expected:?} (from config.json); the checkpoint and its config do not match")]
    Shape { path: PathBuf, key: String, expected: Vec<usize>, got: Vec<usize> },

    #[error("{path}: tensor `{key}` has unsupported dtype {dtype}; supported: F32, F16, BF16")]
    Dtype { path: PathBuf, key: String, dtype: String },

    #[error("adapter {path}: {msg}")]
    Adapter { path: PathBuf, msg: String },

    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },

    #[error(transparent)]
    Image(#[from] crate::image::ImageError),

    #[error("invalid input: {0}")]
    Input(String),

    /// Work stopped at one of its interruption points (`crate::interrupt`): a deadline passed, the client left.
    #[error("{0}")]
    Interrupted(String),

    /// A compute device that cannot be used (the message names it, the reason and the way out).
    #[error("{0}")]
    Device(String),
}

impl EngineError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io { path: path.into(), source }
    }
    pub fn write(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        EngineError::Write { path: path.into(), err }
    }
    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        EngineError::Config { path: path.into(), msg: msg.into() }
    }
}

/// Reads and parses a JSON file, naming the file in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| EngineError::Json { path: path.to_path_buf(), source })
}
