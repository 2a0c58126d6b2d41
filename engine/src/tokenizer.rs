//! `tokenizer.json` through the `tokenizers` crate, plus the chat template that wraps a prompt: the model's own
//! (`chat_template.jinja`, `chat_template.json` or `tokenizer_config.json` beside tokenizer.json, rendered with
//! minijinja as transformers' `apply_chat_template` renders it), else LLaVA-1.5's conversation format.

use crate::error::{EngineError, Result};
use std::path::{Path, PathBuf};

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    pub path: PathBuf,
    /// The model's Jinja chat template, when its directory has one.
    chat: Option<ChatTemplate>,
}

/// Largest chat template accepted (the hub's largest are a few KiB).
const MAX_TEMPLATE_BYTES: u64 = 256 * 1024;

/// A prompt wrapped in a chat template (`TextTokenizer::chat_text`).
pub struct ChatText {
    pub text: String,
    pub special: bool,
    pub answer_sep: &'static str,
}

/// A Hugging Face chat template and the special tokens it may print.
struct ChatTemplate {
    env: minijinja::Environment<'static>,
    /// Where it came from, for errors.
    source: PathBuf,
    bos: String,
    eos: String,
    /// A multimodal model's messages carry a list of parts ({"type": "image"}, {"type": "text"}); a text model's
    /// a string.
    multimodal: bool,
}

impl ChatTemplate {
    /// The template of the model directory `dir`, if it has one; a template that does not parse is an error
    /// naming its file.
    fn load(dir: &Path) -> Result<Option<ChatTemplate>> {
        let read = |p: &Path| -> Result<String> {
            let len = std::fs::metadata(p).map_err(|e| EngineError::io(p, e))?.len();
            if len > MAX_TEMPLATE_BYTES {
                return Err(EngineError::config(
                    p,
                    format!("{len} bytes, more than a chat template's {MAX_TEMPLATE_BYTES}"),
                ));
            }
            std::fs::read_to_string(p).map_err(|e| EngineError::io(p, e))
        };
        let json = |p: &Path| -> Result<Option<serde_json::Value>> {
            if !p.is_file() {
                return Ok(None);
            }
            let text = read(p)?;
            serde_json::from_str(&text).map(Some).map_err(|e| EngineError::config(p, format!("invalid JSON: {e}")))
        };
        let tok_cfg_path = dir.join("tokenizer_config.json");
        let tok_cfg = json(&tok_cfg_path)?;
        // A template string, or a list of named templates of which "default" is the one to use.
        let pick = |v: &serde_json::Value| -> Option<String> {
            match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Array(list) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
                _ => None,
            }
        };
        let jinja = dir.join("chat_template.jinja");
        let tj = dir.join("chat_template.json");
        let (source, text) = if jinja.is_file() {
            (jinja.clone(), read(&jinja)?)
        } else if let Some(t) = json(&tj)?.and_then(|v| v.get("chat_template").and_then(pick)) {
            (tj, t)
        } else if let Some(t) = tok_cfg.as_ref().and_then(|v| v.get("chat_template").and_then(pick)) {
            (tok_cfg_path.clone(), t)
        } else {
            return Ok(None);
        };
        let special = |key: &str| -> String {
            let v = tok_cfg.as_ref().and_then(|c| c.get(key));
            match v {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(o) => o.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_string(),
                None => String::new(),
            }
        };
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", text)
            .map_err(|e| EngineError::config(&source, format!("the chat template does not parse: {e}")))?;
        Ok(Some(ChatTemplate {
            env,
            source,
            bos: special("bos_token"),
            eos: special("eos_token"),
            multimodal: dir.join("preprocessor_config.json").is_file(),
        }))
    }

    /// One user turn (`prompt`, after the image when `image`) and the assistant's opening.
    fn render(&self, prompt: &str, image: bool) -> Result<String> {
        self.render_turns(&[Turn { role: Role::User, text: prompt.to_string(), image }])
    }

    /// A conversation and the assistant's opening. A multimodal model's turns are lists of parts (the image
    /// first), a text model's strings; the developer role is rendered as "system", the role templates know.
    fn render_turns(&self, turns: &[Turn]) -> Result<String> {
        let messages: Vec<serde_json::Value> = turns
            .iter()
            .map(|t| {
                let content = if self.multimodal {
                    let mut parts = Vec::new();
                    if t.image {
                        parts.push(serde_json::json!({"type": "image"}));
                    }
                    parts.push(serde_json::json!({"type": "text", "text": t.text}));
                    serde_json::Value::Array(parts)
                } else {
                    serde_json::Value::from(t.text.as_str())
                };
                serde_json::json!({"role": t.role.template_name(), "content": content})
            })
            .collect();
        let tmpl = self.env.get_template("chat").map_err(|e| EngineError::config(&self.source, e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => minijinja::Value::from_serialize(&messages),
            add_generation_prompt => true,
            bos_token => self.bos.clone(),
            eos_token => self.eos.clone(),
        })
        .map_err(|e| EngineError::config(&self.source, format!("rendering the chat template failed: {e}")))
    }
}

/// Who says a turn of a conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    fn template_name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One turn of a conversation (`TextTokenizer::encode_conversation`); `image`: the request's image goes at the
/// start of this (user) turn.
#[derive(Clone, Debug, PartialEq)]
pub struct Turn {
    pub role: Role,
    pub text: String,
    pub image: bool,
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
        let chat = match path.parent() {
            Some(dir) => ChatTemplate::load(dir)?,
            None => None,
        };
        Ok(TextTokenizer { inner, path: path.into(), chat })
    }

    /// Whether the model directory has its own chat template (else `encode_chat` uses the fallback).
    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    /// The ids of one user turn holding `prompt`: the model's own chat template when it has one (the image, if
    /// `fallback` has `<image>`, before the text; encoded without adding special tokens, as transformers'
    /// `apply_chat_template` does, since the template writes them), else `fallback` (a `{prompt}` template such
    /// as `LLAVA_15_TEMPLATE`) encoded with the tokenizer's special tokens.
    pub fn encode_chat(&self, fallback: &str, prompt: &str) -> Result<Vec<u32>> {
        let t = self.chat_text(fallback, prompt)?;
        self.encode(&t.text, t.special)
    }

    /// The ids of a conversation ending with a user turn, followed by the assistant's opening: the model's chat
    /// template when it has one, else LLaVA-1.5's conversation format (`SYSTEM USER: <image>\nQ ASSISTANT: A</s>USER:
    /// Q2 ASSISTANT:`, the image in the turn that holds it). One user turn alone gives what `encode_chat` gives.
    pub fn encode_conversation(&self, turns: &[Turn]) -> Result<Vec<u32>> {
        match turns.last() {
            Some(t) if t.role == Role::User => {}
            _ => return Err(EngineError::Input("a conversation must end with a user turn".into())),
        }
        match &self.chat {
            Some(c) => self.encode(&c.render_turns(turns)?, false),
            None => {
                let mut s = String::new();
                for t in turns {
                    match t.role {
                        Role::System => {
                            s.push_str(&t.text);
                            s.push(' ');
                        }
                        Role::User => {
                            s.push_str("USER: ");
                            if t.image {
                                s.push_str("<image>\n");
                            }
                            s.push_str(&t.text);
                            s.push(' ');
                        }
                        Role::Assistant => {
                            s.push_str("ASSISTANT: ");
                            s.push_str(&t.text);
                            s.push_str("</s>");
                        }
                    }
                }
                s.push_str("ASSISTANT:");
                self.encode(&s, true)
            }
        }
    }

    /// The text `encode_chat` encodes, whether to add the tokenizer's special tokens to it, and what goes between
    /// it and an answer written after it (a space after LLaVA's "ASSISTANT:", nothing after a chat template's
    /// assistant header).
    pub fn chat_text(&self, fallback: &str, prompt: &str) -> Result<ChatText> {
        Ok(match &self.chat {
            Some(c) => {
                ChatText { text: c.render(prompt, fallback.contains("<image>"))?, special: false, answer_sep: "" }
            }
            None => ChatText { text: apply_template(fallback, prompt), special: true, answer_sep: " " },
        })
    }

    /// The ids of `answer` written after a user turn (`chat`, encoded as `prompt_ids`): prompt and answer are
    /// tokenized together, as training data is, and what follows the prompt's ids is kept (the answer alone when
    /// the tokenizer merges across the boundary). Without EOS.
    pub fn encode_answer(&self, chat: &ChatText, prompt_ids: &[u32], answer: &str) -> Result<Vec<u32>> {
        let full = self.encode(&format!("{}{}{answer}", chat.text, chat.answer_sep), chat.special)?;
        match full.strip_prefix(prompt_ids) {
            Some(rest) => Ok(rest.to_vec()),
            None => self.encode(answer, false),
        }
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
