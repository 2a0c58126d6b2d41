//! Model families, looked up by config.json (compare mistral.rs' loader table): one table, `FAMILIES`, maps
//! `architectures` / `model_type` to a family module that declares its config parser, where each part's weights
//! live on disk in every key layout the family has been saved with (`Part`), and the keys inside each part
//! (`keys`), and its image processor. The loaders (CPU and GPU), `init-model`, the adapter's key mapping and `KeyLayout::detect` all read
//! the family's declarations; adding a family is a new module and one row here.
//!
//! LLaVA-1.5 (`llava.rs`), LLaVA-NeXT (`llava_next.rs`), Qwen2-VL and Qwen2.5-VL (`qwen_vl.rs`) and LLaMA
//! (`llama.rs`) are the entries today.

pub mod keys;
pub mod llama;
pub mod llava;
pub mod llava_next;
pub mod qwen_vl;

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::image::ImageProcessorConfig;
use crate::weights::WeightStore;
use serde_json::Value;
use std::path::Path;

/// Which family a model's canonical names come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFamily {
    Llava,
    LlavaNext,
    Qwen2Vl,
    Qwen25Vl,
    Llama,
}

/// One part of a checkpoint (decoder, vision tower, projector): its canonical prefix, the prefixes it has on disk
/// in each of the family's key layouts (tried in order), and a key relative to the prefix that every checkpoint
/// with the part holds.
pub struct Part {
    /// What an error calls it, e.g. "decoder".
    pub what: &'static str,
    /// The engine's canonical prefix, e.g. "language_model.".
    pub canonical: &'static str,
    pub on_disk: &'static [&'static str],
    pub probe: &'static str,
}

/// A model family: what config.json says it is, how to parse it, and where its weights are.
pub struct Family {
    pub name: &'static str,
    pub kind: ModelFamily,
    /// config.json `architectures` entries of this family.
    pub architectures: &'static [&'static str],
    /// config.json `model_type` values of this family.
    pub model_types: &'static [&'static str],
    pub parse: fn(&Value, &Path) -> Result<ModelConfig>,
    /// The decoder, then (multimodal families) the vision tower and the projector.
    pub parts: &'static [Part],
    /// The untied lm_head's key (without `.weight`) in a checkpoint whose decoder lives under `text_prefix`.
    pub lm_head: fn(text_prefix: &str) -> &'static str,
    /// The name of the key layout (e.g. "transformers-4.52") of a checkpoint with these part prefixes.
    pub layout_name: fn(prefixes: &[String]) -> &'static str,
    /// What an error about missing parts adds: the layouts the family knows.
    pub layouts_hint: &'static str,
    /// The key layout rlaifd writes (`init-model`): for each part, the index of its prefix in `on_disk`.
    pub save_layout: &'static [usize],
    /// The image processor of a model directory (config.json parsed as `config`); None for a text-only family.
    pub image_processor: fn(&ModelConfig, &Path) -> Result<Option<ImageProcessorConfig>>,
}

/// Every family rlaifd loads.
pub static FAMILIES: &[&Family] =
    &[&llava::FAMILY, &llava_next::FAMILY, &qwen_vl::QWEN2_5_VL, &qwen_vl::QWEN2_VL, &llama::FAMILY];

impl Family {
    /// The family config.json (as parsed JSON) declares, by `architectures` first, else by `model_type`.
    pub fn for_config(raw: &Value) -> Option<&'static Family> {
        let archs: Vec<&str> = raw
            .get("architectures")
            .and_then(|a| a.as_array())
            .map(|a| a.iter().filter_map(|s| s.as_str()).collect())
            .unwrap_or_default();
        let model_type = raw.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
        FAMILIES
            .iter()
            .find(|f| archs.iter().any(|a| f.architectures.contains(a)))
            .or_else(|| FAMILIES.iter().find(|f| f.model_types.contains(&model_type)))
            .copied()
    }

    pub fn of(kind: ModelFamily) -> &'static Family {
        FAMILIES.iter().find(|f| f.kind == kind).copied().unwrap_or(&llama::FAMILY)
    }

    /// Parses config.json `raw` (read from `path`) with its family's parser; an unknown family is an error naming
    /// what config.json said and every family supported.
    pub fn parse_config(raw: &Value, path: &Path) -> Result<ModelConfig> {
        if !raw.is_object() {
            return Err(EngineError::config(path, "config.json must be a JSON object"));
        }
        match Family::for_config(raw) {
            Some(f) => (f.parse)(raw, path),
            None => {
                let supported: Vec<String> = FAMILIES
                    .iter()
                    .map(|f| format!("{} (model_type {})", f.architectures.join(" / "), f.model_types.join(" / ")))
                    .collect();
                Err(EngineError::config(
                    path,
                    format!(
                        "unknown architecture (architectures = {}, model_type = {:?}); supported: {}",
                        raw.get("architectures").cloned().unwrap_or(Value::Null),
                        raw.get("model_type").and_then(|v| v.as_str()).unwrap_or(""),
                        supported.join(", ")
                    ),
                ))
            }
        }
    }

    /// Maps a module path as it appears in a checkpoint or adapter (any of the family's key layouts) to the
    /// engine's canonical name (`language_model.layers.N...`, `vision_tower.encoder.layers.N...`,
    /// `multi_modal_projector.linear_K`, `lm_head`); None for a path under no known prefix.
    pub fn canonical_module(&self, path: &str) -> Option<String> {
        let heads = self.parts.first().map_or(&[][..], |p| p.on_disk);
        let mut lm_heads = heads.iter().map(|t| (self.lm_head)(t));
        if let Some(rest) = lm_heads.find_map(|h| path.strip_prefix(h)) {
            return Some(format!("lm_head{rest}"));
        }
        // The longest matching prefix: one part's prefix may start another's (Qwen's "model." and "model.visual.").
        self.parts
            .iter()
            .flat_map(|p| p.on_disk.iter().map(move |d| (*d, p.canonical)))
            .filter(|(from, _)| path.starts_with(from))
            .max_by_key(|(from, _)| from.len())
            .map(|(from, to)| format!("{to}{}", &path[from.len()..]))
    }
}

/// Where each part's keys live in one checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyLayout {
    /// e.g. "transformers-4.x", "transformers-4.52", "transformers-5", "llama"
    pub name: &'static str,
    pub text: String,
    pub lm_head: String,
    pub vision: String,
    pub projector: String,
}

impl KeyLayout {
    /// The layout rlaifd writes new checkpoints of `family` in (`Family::save_layout`).
    pub fn for_saving(family: &Family) -> KeyLayout {
        let prefixes: Vec<String> = family
            .parts
            .iter()
            .zip(family.save_layout)
            .map(|(p, &i)| p.on_disk.get(i).copied().unwrap_or_default().to_string())
            .collect();
        KeyLayout::from_prefixes(family, prefixes)
    }

    fn from_prefixes(family: &Family, prefixes: Vec<String>) -> KeyLayout {
        let part = |i: usize| prefixes.get(i).cloned().unwrap_or_default();
        KeyLayout {
            name: (family.layout_name)(&prefixes),
            lm_head: (family.lm_head)(&part(0)).into(),
            text: part(0),
            vision: part(1),
            projector: part(2),
        }
    }

    /// Finds each of `family`'s parts in `ws` on its own (key layouts differ in every prefix, and some saves mix
    /// them); an error names the parts found nowhere and the layouts the family knows.
    pub fn detect(ws: &WeightStore, family: &Family) -> Result<KeyLayout> {
        let found: Vec<Option<String>> = family
            .parts
            .iter()
            .map(|p| p.on_disk.iter().find(|d| ws.contains(&format!("{d}{}", p.probe))).map(|d| d.to_string()))
            .collect();
        if found.iter().any(Option::is_none) {
            let missing: Vec<String> = family
                .parts
                .iter()
                .zip(&found)
                .filter(|(_, f)| f.is_none())
                .map(|(p, _)| format!("{} (…{})", p.what, p.probe))
                .collect();
            return Err(EngineError::MissingTensor {
                key: missing.join(", "),
                searched: ws.source().to_string(),
                hint: family.layouts_hint.into(),
            });
        }
        Ok(KeyLayout::from_prefixes(family, found.into_iter().flatten().collect()))
    }
}
