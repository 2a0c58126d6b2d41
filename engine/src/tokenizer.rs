//! `tokenizer.json` through the `tokenizers` crate, plus the chat template that wraps a prompt.

use crate::error::{EngineError, Result};
use std::path::{Path, PathBuf};

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    pub path: PathBuf,
}

/// LLaVA-1.5's conversation format; `{prompt}` is replaced by the user's text.
pub const LLAVA_15_TEMPLATE: &str = "USER: <image>\n{prompt} ASSISTANT:";
/// The same without an image, for text-only models.
pub const TEXT_TEMPLATE: &str = "USER: {prompt} ASSISTANT:";

pub fn apply_template(template: &str, prompt: &str) -> String {
    template.replace("{prompt}", prompt)
}

impl TextTokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(EngineError::Tokenizer {
                path: path.into(),
                msg: "file not found (the model directory needs tokenizer.json)".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| EngineError::Tokenizer { path: path.into(), msg: e.to_string() })?;
        Ok(TextTokenizer { inner, path: path.into() })
    }

    /// Token ids of `text`; `special` adds BOS etc. as the tokenizer's post-processor says.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, special)
            .map_err(|e| EngineError::Tokenizer { path: self.path.clone(), msg: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| EngineError::Tokenizer { path: self.path.clone(), msg: e.to_string() })
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary string of `id` (e.g. "▁yes").
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
