//! PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`), applied unmerged so the base
//! weights stay shared and an adapter swap is a pointer swap.

use crate::error::{read_json, EngineError, Result};
use crate::weights::WeightStore;
use regex::Regex;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// One module's low-rank delta: ΔW = scale · B · A.
#[derive(Clone)]
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
    pub lora_dropout: f64,
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
    /// Dropout on the LoRA input during training (peft's `lora_dropout`); active only while a dropout seed is
    /// set (`set_dropout_seed`), so inference and reference scoring never drop anything.
    pub lora_dropout: f64,
    /// Seed of the current training forward/backward's dropout masks, or `NO_DROPOUT`. Masks are a pure
    /// function of (seed, module, element), so the backward pass regenerates exactly the forward's mask.
    dropout_seed: std::sync::atomic::AtomicU64,
    modules: HashMap<String, LoraPair>,
    /// Whole parameters the adapter replaces (peft `modules_to_save`, e.g. a trainable projector), by
    /// canonical parameter name: (key in the adapter file, values).
    saved: BTreeMap<String, SavedParam>,
}

/// A whole parameter stored in an adapter (peft `modules_to_save`).
#[derive(Clone)]
pub struct SavedParam {
    /// Its key in adapter_model.safetensors.
    pub key: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

const NO_DROPOUT: u64 = u64::MAX;

/// A copy (the data-parallel trainer's ranks each train one; the dropout seed is copied as it stands).
impl Clone for Adapter {
    fn clone(&self) -> Adapter {
        Adapter {
            path: self.path.clone(),
            config: self.config.clone(),
            lora_dropout: self.lora_dropout,
            dropout_seed: std::sync::atomic::AtomicU64::new(
                self.dropout_seed.load(std::sync::atomic::Ordering::Relaxed),
            ),
            modules: self.modules.clone(),
            saved: self.saved.clone(),
        }
    }
}

pub use crate::family::ModelFamily;

/// Maps a module path as it appears in a checkpoint or adapter (any of the family's key layouts) to the engine's
/// canonical name (`Family::canonical_module`).
pub fn canonical_module(path: &str, family: ModelFamily) -> Option<String> {
    crate::family::Family::of(family).canonical_module(path)
}

/// For a non-LoRA adapter key (after `base_model.model.`): the (module path, "weight"|"bias") it saves, if the
/// module is one of `modules_to_save` (peft matches a module when its path ends with the name). peft writes
/// these tensors without its internal `modules_to_save.default.` level; tolerate it anyway.
fn saved_param(rest: &str, to_save: &[String]) -> Option<(String, String)> {
    let rest = rest.replace(".modules_to_save.default.", ".");
    let (module, param) = rest.rsplit_once('.')?;
    if param != "weight" && param != "bias" {
        return None;
    }
    let parts: Vec<&str> = module.split('.').collect();
    let inside = (1..=parts.len()).any(|n| {
        let prefix = parts[..n].join(".");
        to_save.iter().any(|t| prefix == *t || prefix.ends_with(&format!(".{t}")))
    });
    inside.then(|| (module.to_string(), param.to_string()))
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
        let to_save: Vec<String> = config.modules_to_save.clone().unwrap_or_default();
        if config.r == 0 {
            return Err(err("r must be > 0".into()));
        }
        let ws = WeightStore::open_dir(dir, "adapter_model")?;
        let file = dir.join("adapter_model.safetensors");

        // Group lora_A / lora_B by module path; whole tensors of modules_to_save are kept aside.
        let mut found: BTreeMap<String, [Option<String>; 2]> = BTreeMap::new();
        let mut saved = BTreeMap::new();
        for key in ws.keys() {
            let Some(rest) = key.strip_prefix("base_model.model.") else {
                return Err(err(format!(
                    "{}: key `{key}` does not start with `base_model.model.` (not a PEFT LoRA file)",
                    file.display()
                )));
            };
            let (module, slot) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
                (m, 0)
            } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
                (m, 1)
            } else if let Some((module, param)) = saved_param(rest, &to_save) {
                let canonical =
                    canonical_module(&module, family).filter(|c| linear_shapes.contains_key(c)).ok_or_else(|| {
                        err(format!(
                            "{}: `{key}` belongs to module `{module}`, which is not a linear layer of this base model",
                            file.display()
                        ))
                    })?;
                let (in_f, out_f) = linear_shapes[&canonical];
                let want: Vec<usize> = if param == "weight" { vec![out_f, in_f] } else { vec![out_f] };
                let values = ws.f32(key, &want)?;
                saved.insert(format!("{canonical}.{param}"), SavedParam { key: key.to_string(), shape: want, values });
                continue;
            } else {
                return Err(err(format!(
                    "{}: key `{key}` is not a lora_A/lora_B weight nor part of modules_to_save {to_save:?}",
                    file.display()
                )));
            };
            found.entry(module.to_string()).or_default()[slot] = Some(key.to_string());
        }
        for t in &to_save {
            let has = saved.values().any(|p: &SavedParam| {
                p.key
                    .strip_prefix("base_model.model.")
                    .and_then(|rest| saved_param(rest, std::slice::from_ref(t)))
                    .is_some()
            });
            if !has {
                return Err(err(format!(
                    "adapter_config.json lists `{t}` in modules_to_save but {} holds no tensors for it",
                    file.display()
                )));
            }
        }
        if found.is_empty() && saved.is_empty() {
            return Err(err(format!("{} holds no LoRA weights", file.display())));
        }
        let mut modules = HashMap::new();
        for (module, [a_key, b_key]) in found {
            let (Some(a_key), Some(b_key)) = (a_key, b_key) else {
                return Err(err(format!("{}: module `{module}` has only one of lora_A/lora_B", file.display())));
            };
            let canonical =
                canonical_module(&module, family).filter(|c| linear_shapes.contains_key(c)).ok_or_else(|| {
                    err(format!(
                        "{}: module `{module}` is not a linear layer of this base model (wrong base model?)",
                        file.display()
                    ))
                })?;
            let (in_f, out_f) = linear_shapes[&canonical];
            let r = config
                .rank_pattern
                .iter()
                .find(|(p, _)| pattern_matches(p, &module))
                .map(|(_, r)| *r)
                .unwrap_or(config.r);
            let alpha = config
                .alpha_pattern
                .iter()
                .find(|(p, _)| pattern_matches(p, &module))
                .map(|(_, a)| *a)
                .unwrap_or(config.lora_alpha);
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
        let lora_dropout = config.lora_dropout;
        Ok(Adapter { path: dir.to_path_buf(), config, lora_dropout, dropout_seed: NO_DROPOUT.into(), modules, saved })
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

/// Which modules a new adapter targets, as peft's `target_modules`.
#[derive(Clone, Debug)]
pub enum TargetModules {
    /// A module matches if its path equals a name or ends with `.name` (e.g. "q_proj").
    Names(Vec<String>),
    /// A module matches if the regex matches its whole path (e.g. `.*language_model.*\.(q_proj|v_proj)`).
    Regex(String),
}

/// Settings of a new LoRA adapter, as peft's `LoraConfig`.
#[derive(Clone, Debug)]
pub struct LoraSpec {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    /// Modules trained in full beside the LoRA factors (peft `modules_to_save`), e.g. "multi_modal_projector".
    pub modules_to_save: Vec<String>,
}

impl Default for LoraSpec {
    /// RLAIF-V's LoRA: r 64, alpha 16, every linear layer of the language model.
    fn default() -> Self {
        LoraSpec {
            r: 64,
            lora_alpha: 16.0,
            use_rslora: false,
            lora_dropout: 0.0,
            target_modules: TargetModules::Regex(
                r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)".into(),
            ),
            modules_to_save: Vec::new(),
        }
    }
}

impl LoraSpec {
    /// Full-parameter training in adapter form (RLAIF-V's 7B recipe trains the language model in full): no LoRA
    /// factors; every linear layer of the language model (its head included, unless tied to the embeddings) and
    /// the projector (LLaVA's `multi_modal_projector`, Qwen2.5-VL's `merger`) are trained whole and saved as peft
    /// `modules_to_save`. The vision tower, the token embeddings and the norms stay frozen.
    pub fn full_parameter() -> Self {
        LoraSpec {
            target_modules: TargetModules::Names(Vec::new()),
            modules_to_save: ["language_model", "lm_head", "multi_modal_projector", "merger"]
                .map(String::from)
                .to_vec(),
            ..LoraSpec::default()
        }
    }
}

/// The module path peft sees for a canonical module of a model with this key layout (`layout` is
/// `KeyLayout::name`; transformers 5 models, whatever their on-disk layout, use the 5.x in-memory names).
pub fn peft_module_path(canonical: &str, family: ModelFamily, layout: &str, vision_prefix: &str) -> String {
    let old = layout == "transformers-4.x" && vision_prefix == "vision_tower.vision_model.";
    let (lm, head, vis, proj) = match (family, old, layout) {
        (ModelFamily::Llama, _, _) => ("model.", "lm_head", "", ""),
        (ModelFamily::Qwen2Vl | ModelFamily::Qwen25Vl, _, _) => {
            ("model.language_model.", "lm_head", "model.visual.", "")
        }
        (_, true, _) => {
            ("language_model.model.", "language_model.lm_head", "vision_tower.vision_model.", "multi_modal_projector.")
        }
        (_, false, "transformers-4.52") => {
            ("model.language_model.", "lm_head", "model.vision_tower.vision_model.", "model.multi_modal_projector.")
        }
        _ => ("model.language_model.", "lm_head", "model.vision_tower.", "model.multi_modal_projector."),
    };
    if canonical == "lm_head" {
        head.to_string()
    } else if let Some(rest) = canonical.strip_prefix("language_model.") {
        format!("{lm}{rest}")
    } else if let Some(rest) = canonical.strip_prefix("vision_tower.") {
        format!("{vis}{rest}")
    } else if let Some(rest) = canonical.strip_prefix("multi_modal_projector.") {
        format!("{proj}{rest}")
    } else if let Some(rest) = canonical.strip_prefix("visual.") {
        format!("{vis}{rest}")
    } else {
        canonical.to_string()
    }
}

impl Adapter {
    /// A fresh adapter as peft creates one: A kaiming-uniform (bound 1/sqrt(in_features)), B zero, so it starts
    /// as the identity. `modules` maps canonical name -> (peft module path, in, out) for every linear layer;
    /// `base_param` gives a base parameter's values (for `modules_to_save` copies).
    pub fn create(
        spec: &LoraSpec,
        modules: &[(String, String, usize, usize)],
        seed: u64,
        base_param: &dyn Fn(&str) -> Option<Vec<f32>>,
    ) -> Result<Self> {
        let bad = |msg: String| EngineError::Input(msg);
        if spec.r == 0 {
            return Err(bad("LoRA r must be > 0".into()));
        }
        let regex = match &spec.target_modules {
            TargetModules::Regex(r) => {
                Some(Regex::new(&format!("^(?:{r})$")).map_err(|e| bad(format!("target modules regex `{r}`: {e}")))?)
            }
            TargetModules::Names(_) => None,
        };
        let matches = |path: &str| match (&spec.target_modules, &regex) {
            (TargetModules::Names(names), _) => names.iter().any(|n| path == n || path.ends_with(&format!(".{n}"))),
            (_, Some(re)) => re.is_match(path),
            _ => false,
        };
        let scale =
            if spec.use_rslora { spec.lora_alpha / (spec.r as f64).sqrt() } else { spec.lora_alpha / spec.r as f64 }
                as f32;
        let mut rng = crate::rng::SplitMix64::new(seed);
        let mut sorted: Vec<&(String, String, usize, usize)> = modules.iter().collect();
        sorted.sort_by(|a, b| a.1.cmp(&b.1));
        let mut out = HashMap::new();
        for (canonical, path, inf, outf) in sorted {
            if !matches(path) {
                continue;
            }
            let bound = 1.0 / (*inf as f64).sqrt();
            let a = (0..spec.r * inf).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect();
            let keys =
                (format!("base_model.model.{path}.lora_A.weight"), format!("base_model.model.{path}.lora_B.weight"));
            out.insert(canonical.clone(), LoraPair { r: spec.r, scale, keys, a, b: vec![0.0; outf * spec.r] });
        }
        let mut saved = BTreeMap::new();
        for (canonical, path, inf, outf) in modules {
            for param in ["weight", "bias"] {
                if saved_param(&format!("{path}.{param}"), &spec.modules_to_save).is_none() {
                    continue;
                }
                if let Some(values) = base_param(&format!("{canonical}.{param}")) {
                    let shape = if param == "weight" { vec![*outf, *inf] } else { vec![*outf] };
                    // Current peft (transformers 5) maps old LoRA key names itself but not whole saved modules,
                    // so these keys always use the in-memory names of transformers 5.
                    let old = ["language_model.", "vision_tower.", "multi_modal_projector."]
                        .iter()
                        .any(|p| path.starts_with(p));
                    let path = if old {
                        peft_module_path(canonical, ModelFamily::Llava, "transformers-5", "model.vision_tower.")
                    } else {
                        path.clone()
                    };
                    saved.insert(
                        format!("{canonical}.{param}"),
                        SavedParam { key: format!("base_model.model.{path}.{param}"), shape, values },
                    );
                }
            }
        }
        if !spec.modules_to_save.is_empty() && saved.is_empty() {
            return Err(bad(format!("modules to save {:?} match no linear layer of the model", spec.modules_to_save)));
        }
        // No LoRA targets at all (an empty list) is full-parameter training in adapter form: whole parameters only.
        let whole_only = matches!(&spec.target_modules, TargetModules::Names(n) if n.is_empty()) && !saved.is_empty();
        if out.is_empty() && !whole_only {
            return Err(bad(format!("target modules {:?} match no linear layer of the model", spec.target_modules)));
        }
        // The config lists only the names that matched a layer (loading refuses a name without tensors).
        let to_save: Vec<String> = spec
            .modules_to_save
            .iter()
            .filter(|t| {
                let t = std::slice::from_ref(*t);
                saved.values().any(|p| saved_param(p.key.trim_start_matches("base_model.model."), t).is_some())
            })
            .cloned()
            .collect();
        let target = match &spec.target_modules {
            TargetModules::Names(n) => serde_json::json!(n),
            TargetModules::Regex(r) => serde_json::json!(r),
        };
        let config = AdapterConfig {
            lora_dropout: spec.lora_dropout,
            peft_type: Some("LORA".into()),
            r: spec.r,
            lora_alpha: spec.lora_alpha,
            use_rslora: spec.use_rslora,
            use_dora: false,
            fan_in_fan_out: false,
            bias: Some("none".into()),
            modules_to_save: (!to_save.is_empty()).then_some(to_save),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            target_modules: Some(target),
            base_model_name_or_path: None,
        };
        Ok(Adapter {
            path: PathBuf::new(),
            config,
            lora_dropout: spec.lora_dropout,
            dropout_seed: NO_DROPOUT.into(),
            modules: out,
            saved,
        })
    }

    /// Turns LoRA dropout on with masks drawn from `seed` (None: off). Training sets a seed per sequence.
    pub fn set_dropout_seed(&self, seed: Option<u64>) {
        let v = seed.map(|s| if s == NO_DROPOUT { s - 1 } else { s }).unwrap_or(NO_DROPOUT);
        self.dropout_seed.store(v, std::sync::atomic::Ordering::Relaxed);
    }

    /// x with LoRA dropout applied for module `name` (kept elements scaled by 1/(1-p)), or None when dropout is
    /// off. The mask depends only on (seed, name, element index).
    pub fn dropout_input(&self, name: &str, x: &[f32]) -> Option<Vec<f32>> {
        let seed = self.dropout_seed.load(std::sync::atomic::Ordering::Relaxed);
        if seed == NO_DROPOUT || self.lora_dropout <= 0.0 {
            return None;
        }
        let p = self.lora_dropout;
        let keep = (1.0 / (1.0 - p)) as f32;
        let base = dropout_base(seed, name);
        Some(
            x.iter()
                .enumerate()
                .map(|(i, &v)| {
                    let mut r = crate::rng::SplitMix64::new(base ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    if r.next_f64() < p {
                        0.0
                    } else {
                        v * keep
                    }
                })
                .collect(),
        )
    }

    /// The adapter's replacement for base parameter `param` (e.g. `multi_modal_projector.linear_1.weight`).
    pub fn saved_param(&self, param: &str) -> Option<&[f32]> {
        self.saved.get(param).map(|p| p.values.as_slice())
    }

    /// Every parameter the adapter replaces, by canonical name.
    pub fn saved_params(&self) -> impl Iterator<Item = (&str, &SavedParam)> {
        self.saved.iter().map(|(n, p)| (n.as_str(), p))
    }

    pub fn saved_params_mut(&mut self) -> impl Iterator<Item = (&str, &mut SavedParam)> {
        self.saved.iter_mut().map(|(n, p)| (n.as_str(), p))
    }

    pub fn module_mut(&mut self, canonical: &str) -> Option<&mut LoraPair> {
        self.modules.get_mut(canonical)
    }

    /// Writes a PEFT directory (adapter_config.json + adapter_model.safetensors, f32) atomically: into a
    /// temporary sibling directory, fsync'd, then renamed over `dir`. `extra` files (e.g. optimizer state) are
    /// written into the same directory before the rename. `base_model` is recorded in the config.
    pub fn save(&self, dir: &Path, base_model: &Path, extra: &[(&str, Vec<u8>)]) -> Result<()> {
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| EngineError::write(parent, e))?;
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("adapter");
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        // Temporary directories of this name left by a process that died mid-save (any pid) are garbage: one
        // writer saves a given name at a time.
        let stale = format!(".{name}.tmp-");
        if let Ok(entries) = std::fs::read_dir(parent) {
            for e in entries.flatten() {
                if e.file_name().to_str().is_some_and(|f| f.starts_with(&stale)) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        std::fs::create_dir_all(&tmp).map_err(|e| EngineError::write(&tmp, e))?;
        let result = (|| -> Result<()> {
            let mut cfg = serde_json::json!({
                "peft_type": "LORA",
                "task_type": null,
                "r": self.config.r,
                "lora_alpha": self.config.lora_alpha,
                "lora_dropout": self.config.lora_dropout,
                "use_rslora": self.config.use_rslora,
                "use_dora": false,
                "fan_in_fan_out": false,
                "bias": "none",
                "init_lora_weights": true,
                "inference_mode": true,
                "modules_to_save": self.config.modules_to_save,
                "rank_pattern": {},
                "alpha_pattern": {},
                "target_modules": self.config.target_modules,
                "base_model_name_or_path": base_model.display().to_string(),
            });
            if self.modules.values().any(|m| m.r != self.config.r) {
                cfg["rank_pattern"] = serde_json::json!(self.config.rank_pattern);
                cfg["alpha_pattern"] = serde_json::json!(self.config.alpha_pattern);
            }
            let text = serde_json::to_string_pretty(&cfg).map_err(|e| EngineError::Input(e.to_string()))?;
            write_synced(&tmp.join("adapter_config.json"), text.as_bytes())?;
            crate::failpoint::hit("adapter_save");
            let mut tensors = Vec::new();
            for (_, m) in self.modules() {
                let inf = m.a.len() / m.r;
                let outf = m.b.len() / m.r;
                tensors.push((m.keys.0.clone(), vec![m.r, inf], m.a.as_slice()));
                tensors.push((m.keys.1.clone(), vec![outf, m.r], m.b.as_slice()));
            }
            for p in self.saved.values() {
                tensors.push((p.key.clone(), p.shape.clone(), p.values.as_slice()));
            }
            crate::weights::write_f32_safetensors(&tmp.join("adapter_model.safetensors"), &tensors)?;
            for (file, bytes) in extra {
                write_synced(&tmp.join(file), bytes)?;
            }
            if dir.exists() {
                std::fs::remove_dir_all(dir).map_err(|e| EngineError::write(dir, e))?;
            }
            std::fs::rename(&tmp, dir).map_err(|e| EngineError::write(dir, e))?;
            if let Ok(d) = std::fs::File::open(parent) {
                let _ = d.sync_all();
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| EngineError::write(path, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| EngineError::write(path, e))
}

/// The seed of module `name`'s dropout mask under a sequence's dropout seed: the FNV-1a hash of the name separates
/// the modules' masks. Element i of the module's input is dropped when the first SplitMix64 output seeded with
/// `dropout_base(seed, name) ^ i * 0x9E3779B97F4A7C15` gives u < p (`Adapter::dropout_input`; the GPU trainer's
/// `lora_dropout_f16` draws the same masks).
pub fn dropout_base(seed: u64, name: &str) -> u64 {
    seed ^ name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}
