//! PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`), applied unmerged so the base
//! weights stay shared and an adapter swap is a pointer swap.

use crate::error::{read_json, EngineError, Result};
use crate::weights::WeightStore;
use regex::Regex;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// One module's low-rank delta: ΔW = scale · B · A.
pub struct LoraPair {
    pub r: usize,
    pub scale: f32,
    /// The tensors' keys in the adapter file (lora_A, lora_B), so gradients and saves keep the file's naming.
    pub keys: (String, String),
    pub a: Vec<f32>, // (r, in)
    pub b: Vec<f32>, // (out, r)
}

#[derive(Deserialize, Debug, Clone)]
pub struct AdapterConfig {
    #[serde(default)]
    pub peft_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub bias: Option<String>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    pub target_modules: Option<serde_json::Value>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
}

pub struct Adapter {
    pub path: PathBuf,
    pub config: AdapterConfig,
    modules: HashMap<String, LoraPair>,
}

/// Which key layout family a model's canonical names come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFamily {
    Llava,
    Llama,
}

/// Maps a module path as it appears in a checkpoint or adapter (any llava-hf layout) to the engine's canonical
/// name: `language_model.layers.N...`, `vision_tower.encoder.layers.N...`, `multi_modal_projector.linear_K`,
/// `lm_head`. Returns None for paths that are not under a known prefix.
pub fn canonical_module(path: &str, family: ModelFamily) -> Option<String> {
    let rules: &[(&str, &str)] = match family {
        ModelFamily::Llava => &[
            ("model.language_model.", "language_model."),
            ("language_model.model.", "language_model."),
            ("language_model.lm_head", "lm_head"),
            ("model.vision_tower.vision_model.", "vision_tower."),
            ("vision_tower.vision_model.", "vision_tower."),
            ("model.vision_tower.", "vision_tower."),
            ("vision_tower.", "vision_tower."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
            ("multi_modal_projector.", "multi_modal_projector."),
            ("lm_head", "lm_head"),
        ],
        ModelFamily::Llama => &[("model.", "language_model."), ("lm_head", "lm_head")],
    };
    rules.iter().find_map(|(from, to)| path.strip_prefix(from).map(|rest| format!("{to}{rest}")))
}

/// peft's pattern rule: a pattern matches a module if the module path ends with it at a `.` boundary.
fn pattern_matches(pattern: &str, module: &str) -> bool {
    match Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$")) {
        Ok(re) => re.is_match(module),
        Err(_) => false,
    }
}

impl Adapter {
    /// Loads a PEFT LoRA directory. `linear_shapes` maps every canonical linear module of the base model to
    /// (in_features, out_features); an adapter with weights for anything else is refused.
    pub fn load(dir: &Path, family: ModelFamily, linear_shapes: &HashMap<String, (usize, usize)>) -> Result<Self> {
        let err = |msg: String| EngineError::Adapter { path: dir.to_path_buf(), msg };
        if !dir.is_dir() {
            return Err(err("is not a directory (expected a PEFT adapter directory with adapter_config.json)".into()));
        }
        let config: AdapterConfig = read_json(&dir.join("adapter_config.json"))?;
        if let Some(t) = &config.peft_type {
            if t != "LORA" {
                return Err(err(format!("peft_type is {t}; only LORA adapters are supported")));
            }
        }
        if config.use_dora {
            return Err(err("use_dora = true (DoRA) is not supported".into()));
        }
        if config.fan_in_fan_out {
            return Err(err("fan_in_fan_out = true is not supported (LLaMA/CLIP linears are not Conv1D)".into()));
        }
        if config.bias.as_deref().unwrap_or("none") != "none" {
            return Err(err(format!("bias = {:?} is not supported; only \"none\"", config.bias)));
        }
        if config.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(err("modules_to_save is not supported (the adapter would replace whole modules)".into()));
        }
        if config.r == 0 {
            return Err(err("r must be > 0".into()));
        }
        let ws = WeightStore::open_dir(dir, "adapter_model")?;
        let file = dir.join("adapter_model.safetensors");

        // Group lora_A / lora_B by module path.
        let mut found: BTreeMap<String, [Option<String>; 2]> = BTreeMap::new();
        for key in ws.keys() {
            let Some(rest) = key.strip_prefix("base_model.model.") else {
                return Err(err(format!("{}: key `{key}` does not start with `base_model.model.` (not a PEFT LoRA file)", file.display())));
            };
            let (module, slot) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
                (m, 0)
            } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
                (m, 1)
            } else {
                return Err(err(format!("{}: key `{key}` is not a lora_A/lora_B weight; only plain LoRA tensors are supported", file.display())));
            };
            found.entry(module.to_string()).or_default()[slot] = Some(key.to_string());
        }
        if found.is_empty() {
            return Err(err(format!("{} holds no LoRA weights", file.display())));
        }
        let mut modules = HashMap::new();
        for (module, [a_key, b_key]) in found {
            let (Some(a_key), Some(b_key)) = (a_key, b_key) else {
                return Err(err(format!("{}: module `{module}` has only one of lora_A/lora_B", file.display())));
            };
            let canonical = canonical_module(&module, family).filter(|c| linear_shapes.contains_key(c)).ok_or_else(|| {
                err(format!("{}: module `{module}` is not a linear layer of this base model (wrong base model?)", file.display()))
            })?;
            let (in_f, out_f) = linear_shapes[&canonical];
            let r = config.rank_pattern.iter().find(|(p, _)| pattern_matches(p, &module)).map(|(_, r)| *r).unwrap_or(config.r);
            let alpha = config.alpha_pattern.iter().find(|(p, _)| pattern_matches(p, &module)).map(|(_, a)| *a).unwrap_or(config.lora_alpha);
            let shaped = |key: &str, want: &[usize]| {
                ws.f32(key, want).map_err(|e| match e {
                    EngineError::Shape { key, got, expected, .. } => err(format!(
                        "{}: `{key}` has shape {got:?}, but this base model needs {expected:?} (r = {r}); \
                         was the adapter trained on a different base model?",
                        file.display()
                    )),
                    other => other,
                })
            };
            let a = shaped(&a_key, &[r, in_f])?;
            let b = shaped(&b_key, &[out_f, r])?;
            let scale = if config.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 } as f32;
            if a.iter().chain(&b).any(|v| !v.is_finite()) {
                return Err(err(format!("{}: module `{module}` has NaN or infinite weights", file.display())));
            }
            modules.insert(canonical, LoraPair { r, scale, keys: (a_key.clone(), b_key.clone()), a, b });
        }
        Ok(Adapter { path: dir.to_path_buf(), config, modules })
    }

    pub fn module(&self, canonical: &str) -> Option<&LoraPair> {
        self.modules.get(canonical)
    }

    /// (canonical name, module) pairs, sorted by name.
    pub fn modules(&self) -> Vec<(&str, &LoraPair)> {
        let mut v: Vec<(&str, &LoraPair)> = self.modules.iter().map(|(k, m)| (k.as_str(), m)).collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }

    /// Canonical names of the modules this adapter changes, sorted.
    pub fn module_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.modules.keys().map(|s| s.as_str()).collect();
        v.sort();
        v
    }
}
