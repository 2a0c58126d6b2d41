//! `config.json` of `LlavaForConditionalGeneration` and `LlamaForCausalLM`, with the defaults transformers
//! applies when a field is absent (saved configs often omit fields equal to the default).

use crate::error::{read_json, EngineError, Result};
use serde_json::Value;
use std::path::Path;

/// RoPE frequency scaling, as in transformers' `rope_scaling` / `rope_parameters`.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.x frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Clone, Debug)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    /// Qwen2: biases on q/k/v only (o_proj has none).
    pub qkv_bias: bool,
    /// Qwen2-VL's multimodal RoPE: how many of the head's frequency pairs follow the temporal, height and width
    /// position (`mrope_section`, summing to head_dim / 2); None for 1-D RoPE.
    pub mrope_section: Option<[usize; 3]>,
    /// Sliding-window attention per layer (Mistral's `sliding_window`, Qwen2's `use_sliding_window` from
    /// `max_window_layers` on, or `layer_types`): layer i attends its last `layer_window[i]` positions. Empty, or
    /// None for a layer, is full causal attention; windows as long as the context are dropped when parsed.
    pub layer_window: Vec<Option<usize>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl LlamaConfig {
    /// Layer `li`'s sliding window (None: full causal attention).
    pub fn window(&self, li: usize) -> Option<usize> {
        self.layer_window.get(li).copied().flatten()
    }

    /// Whether any layer attends through a sliding window.
    pub fn has_sliding_window(&self) -> bool {
        self.layer_window.iter().any(Option::is_some)
    }
}

const LAYER_TYPES: &str = "\"full_attention\", \"sliding_attention\"";

/// `sliding_window`: 4096 when absent (Mistral's and Qwen2's default), None when null.
fn sliding_window_field(obj: &serde_json::Map<String, Value>, path: &Path) -> Result<Option<u64>> {
    match obj.get("sliding_window") {
        None => Ok(Some(4096)),
        Some(Value::Null) => Ok(None),
        Some(v) => {
            v.as_u64().filter(|&w| w > 0).map(Some).ok_or_else(|| {
                EngineError::config(path, "text_config.sliding_window must be a positive integer or null")
            })
        }
    }
}

/// The per-layer sliding windows of a decoder config (`obj` is its text config): `window` for the layers `sliding`
/// names, each checked; a window of the whole context or longer is no window at all.
fn layer_windows(
    obj: &serde_json::Map<String, Value>,
    path: &Path,
    window: Option<u64>,
    sliding: impl Fn(usize) -> bool,
) -> Result<Vec<Option<usize>>> {
    let Some(w) = window else { return Ok(Vec::new()) };
    let layers = obj.get("num_hidden_layers").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    let max_pos = obj.get("max_position_embeddings").and_then(|v| v.as_u64()).unwrap_or(u64::MAX);
    if w >= max_pos {
        return Ok(Vec::new());
    }
    // An explicit `layer_types` (what transformers 5 writes) wins over the rule.
    let types = match obj.get("layer_types").filter(|v| !v.is_null()) {
        None => None,
        Some(v) => {
            let list = v.as_array().filter(|a| a.len() == layers).ok_or_else(|| {
                EngineError::config(path, format!("text_config.layer_types must list one type per layer ({layers})"))
            })?;
            let mut out = Vec::with_capacity(layers);
            for t in list {
                let sliding = match t.as_str() {
                    Some("full_attention") => false,
                    Some("sliding_attention") => true,
                    _ => {
                        let why = format!("text_config.layer_types holds {t}; supported: {LAYER_TYPES}");
                        return Err(EngineError::config(path, why));
                    }
                };
                out.push(sliding);
            }
            Some(out)
        }
    };
    Ok((0..layers)
        .map(|i| if types.as_ref().map_or_else(|| sliding(i), |t| t[i]) { Some(w as usize) } else { None })
        .collect())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU (erf form), torch's default `gelu`.
    Gelu,
    /// `gelu_pytorch_tanh` / `gelu_new`: the tanh approximation.
    GeluTanh,
    /// CLIP's x * sigmoid(1.702 x).
    QuickGelu,
    Silu,
}

impl Activation {
    fn parse(name: &str, path: &Path, field: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "quick_gelu" => Activation::QuickGelu,
            "silu" | "swish" => Activation::Silu,
            other => {
                return Err(EngineError::config(
                    path,
                    format!("{field} = \"{other}\" is not supported; use gelu, gelu_pytorch_tanh, quick_gelu or silu"),
                ))
            }
        })
    }
}

#[derive(Clone, Debug)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl ClipVisionConfig {
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size) * (self.image_size / self.patch_size)
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureSelect {
    /// Drop the CLS token.
    Default,
    /// Keep every token, CLS included.
    Full,
}

#[derive(Clone, Debug)]
pub struct LlavaConfig {
    pub text: LlamaConfig,
    pub vision: ClipVisionConfig,
    pub image_token_id: u32,
    /// Index into CLIP's hidden-state tuple (0 = embeddings after pre_layrnorm); negative counts from the end.
    pub vision_feature_layer: i64,
    pub vision_feature_select_strategy: FeatureSelect,
    pub projector_hidden_act: Activation,
    pub projector_bias: bool,
    /// Original-LLaVA `image_aspect_ratio: "pad"`: pad images to a square before preprocessing.
    pub pad_to_square: bool,
    /// LLaVA-NeXT (`llava_next`): `image_grid_pinpoints` as (height, width), tiles of the tower's size with
    /// their features unpadded and an `image_newline` row end (`crate::image::anyres`). Empty for LLaVA-1.5.
    pub grid_pinpoints: Vec<(usize, usize)>,
}

impl LlavaConfig {
    /// Number of encoder layers to run to reach `vision_feature_layer`.
    pub fn vision_layers_needed(&self) -> usize {
        let n = self.vision.num_hidden_layers as i64;
        let idx =
            if self.vision_feature_layer < 0 { n + 1 + self.vision_feature_layer } else { self.vision_feature_layer };
        idx as usize
    }
    /// How many embedding rows one image becomes in the decoder input: exact for LLaVA-1.5, the most any image
    /// can give for LLaVA-NeXT (its largest grid, nothing cut by unpadding).
    pub fn image_seq_len(&self) -> usize {
        let base = match self.vision_feature_select_strategy {
            FeatureSelect::Default => self.vision.num_patches(),
            FeatureSelect::Full => self.vision.num_patches() + 1,
        };
        let side = self.vision.image_size / self.vision.patch_size;
        let tiles = |(h, w): (usize, usize)| {
            let (gh, gw) = (h / self.vision.image_size, w / self.vision.image_size);
            gh * side * (gw * side + 1)
        };
        base + self.grid_pinpoints.iter().map(|&p| tiles(p)).max().unwrap_or(0)
    }

    /// Whether images are tiled (LLaVA-NeXT's anyres).
    pub fn anyres(&self) -> bool {
        !self.grid_pinpoints.is_empty()
    }
}

/// Qwen2-VL / Qwen2.5-VL's vision transformer (`visual.*`): patch embedding over `temporal_patch_size` frames,
/// 2-D rotary attention, and the merger of `spatial_merge_size`² patches into one decoder row.
#[derive(Clone, Debug)]
pub struct QwenVisionConfig {
    /// Qwen2.5-VL (RMSNorm + SwiGLU blocks, window attention) rather than Qwen2-VL (LayerNorm + MLP).
    pub v2_5: bool,
    pub depth: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub spatial_merge_size: usize,
    /// The merger's output width: the decoder's hidden size.
    pub out_hidden_size: usize,
    pub hidden_act: Activation,
    pub rope_theta: f64,
    /// Qwen2.5-VL: attention windows of this many pixels a side (`window_size`), except in `fullatt_block_indexes`.
    pub window_size: usize,
    pub fullatt_block_indexes: Vec<usize>,
}

#[derive(Clone, Debug)]
pub struct QwenVlConfig {
    pub text: LlamaConfig,
    pub vision: QwenVisionConfig,
    pub image_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
}

#[derive(Clone, Debug)]
pub enum ModelConfig {
    Llava(LlavaConfig),
    Llama(LlamaConfig),
    QwenVl(QwenVlConfig),
}

impl ModelConfig {
    pub fn text(&self) -> &LlamaConfig {
        match self {
            ModelConfig::Llava(c) => &c.text,
            ModelConfig::Llama(c) => c,
            ModelConfig::QwenVl(c) => &c.text,
        }
    }
    pub fn llava(&self) -> Option<&LlavaConfig> {
        match self {
            ModelConfig::Llava(c) => Some(c),
            _ => None,
        }
    }
    pub fn qwen_vl(&self) -> Option<&QwenVlConfig> {
        match self {
            ModelConfig::QwenVl(c) => Some(c),
            _ => None,
        }
    }
    /// The token that stands for the image in input ids (once; the engine expands it), for models with a vision
    /// tower.
    pub fn image_token_id(&self) -> Option<u32> {
        match self {
            ModelConfig::Llava(c) => Some(c.image_token_id),
            ModelConfig::QwenVl(c) => Some(c.image_token_id),
            ModelConfig::Llama(_) => None,
        }
    }

    /// Reads `DIR/config.json` (or a config file path).
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: Value = read_json(path)?;
        Self::from_value(&raw, path)
    }

    /// Parses config.json with the parser of the family it declares (`crate::family::FAMILIES`).
    pub fn from_value(raw: &Value, path: &Path) -> Result<Self> {
        crate::family::Family::parse_config(raw, path)
    }

    /// The family this config belongs to.
    pub fn family(&self) -> crate::family::ModelFamily {
        match self {
            ModelConfig::Llava(c) if c.anyres() => crate::family::ModelFamily::LlavaNext,
            ModelConfig::Llava(_) => crate::family::ModelFamily::Llava,
            ModelConfig::Llama(_) => crate::family::ModelFamily::Llama,
            ModelConfig::QwenVl(c) if c.vision.v2_5 => crate::family::ModelFamily::Qwen25Vl,
            ModelConfig::QwenVl(_) => crate::family::ModelFamily::Qwen2Vl,
        }
    }
}

// -- field helpers ------------------------------------------------------------------------------------------

struct Fields<'a> {
    obj: Option<&'a serde_json::Map<String, Value>>,
    path: &'a Path,
    section: &'a str,
}

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.and_then(|o| o.get(key)).filter(|v| !v.is_null())
    }
    fn err(&self, key: &str, want: &str) -> EngineError {
        EngineError::config(self.path, format!("{}{key} must be {want}", self.section))
    }
    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| self.err(key, "a non-negative integer")),
        }
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| self.err(key, "a non-negative integer")),
        }
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.err(key, "a number")),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(key, "true or false")),
        }
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.err(key, "true or false")),
        }
    }
    fn str_or(&self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| self.err(key, "a string")),
        }
    }
    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.get(key) {
            None => Ok(vec![]),
            Some(Value::Number(n)) => {
                n.as_u64().map(|x| vec![x as u32]).ok_or_else(|| self.err(key, "a token id or a list of ids"))
            }
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_u64().map(|x| x as u32).ok_or_else(|| self.err(key, "a token id or a list of ids")))
                .collect(),
            Some(_) => Err(self.err(key, "a token id or a list of ids")),
        }
    }
}

fn positive(path: &Path, section: &str, key: &str, v: usize) -> Result<usize> {
    if v == 0 {
        return Err(EngineError::config(path, format!("{section}{key} must be > 0")));
    }
    Ok(v)
}

fn parse_rope(f: &Fields, path: &Path) -> Result<(f64, RopeScaling)> {
    // transformers 5 folds rope_theta and rope_scaling into `rope_parameters`.
    let params = f.get("rope_parameters").or_else(|| f.get("rope_scaling"));
    let mut theta = f.f64_or("rope_theta", 10000.0)?;
    let scaling = match params {
        None => RopeScaling::None,
        Some(p) => {
            let p = p.as_object().ok_or_else(|| f.err("rope_scaling", "an object"))?;
            let pf = Fields { obj: Some(p), path, section: "rope_scaling." };
            if let Some(t) = pf.get("rope_theta") {
                theta = t.as_f64().ok_or_else(|| pf.err("rope_theta", "a number"))?;
            }
            let kind = pf.get("rope_type").or_else(|| pf.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
            match kind {
                "default" => RopeScaling::None,
                "linear" => RopeScaling::Linear { factor: pf.f64_or("factor", 1.0)? },
                "llama3" => RopeScaling::Llama3 {
                    factor: pf.f64_or("factor", 8.0)?,
                    low_freq_factor: pf.f64_or("low_freq_factor", 1.0)?,
                    high_freq_factor: pf.f64_or("high_freq_factor", 4.0)?,
                    original_max_position_embeddings: pf.f64_or("original_max_position_embeddings", 8192.0)?,
                },
                other => {
                    return Err(EngineError::config(
                        path,
                        format!("rope type \"{other}\" is not supported; supported: default, linear, llama3"),
                    ))
                }
            }
        }
    };
    Ok((theta, scaling))
}

/// `top` is the enclosing LLaVA config, consulted for fields that newer transformers keep at top level.
pub(crate) fn parse_llama(raw: &Value, top: Option<&Value>, path: &Path) -> Result<LlamaConfig> {
    let section = if top.is_some() { "text_config." } else { "" };
    let f = Fields { obj: raw.as_object(), path, section };
    let t = Fields { obj: top.and_then(|t| t.as_object()), path, section: "" };
    let hidden_size = positive(path, section, "hidden_size", f.usize_or("hidden_size", 4096)?)?;
    let num_attention_heads = positive(path, section, "num_attention_heads", f.usize_or("num_attention_heads", 32)?)?;
    let num_key_value_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
    if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
        return Err(EngineError::config(
            path,
            format!("{section}num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"),
        ));
    }
    let head_dim = match f.opt_usize("head_dim")? {
        Some(h) => h,
        None => {
            if hidden_size % num_attention_heads != 0 {
                return Err(EngineError::config(
                    path,
                    format!("{section}hidden_size must be divisible by num_attention_heads"),
                ));
            }
            hidden_size / num_attention_heads
        }
    };
    if head_dim % 2 != 0 {
        return Err(EngineError::config(path, format!("{section}head_dim ({head_dim}) must be even for RoPE")));
    }
    let act = f.str_or("hidden_act", "silu")?;
    if act != "silu" {
        return Err(EngineError::config(
            path,
            format!("{section}hidden_act = \"{act}\" is not supported for LLaMA; expected silu"),
        ));
    }
    let (rope_theta, rope_scaling) = parse_rope(&f, path)?;
    // Tied embeddings: text_config's flag, else the top-level flag (transformers 5 keeps it there).
    let tie_word_embeddings = match f.opt_bool("tie_word_embeddings")? {
        Some(b) => b,
        None => t.opt_bool("tie_word_embeddings")?.unwrap_or(false),
    };
    let mut eos_token_ids = f.token_ids("eos_token_id")?;
    if eos_token_ids.is_empty() {
        eos_token_ids = t.token_ids("eos_token_id")?;
    }
    if eos_token_ids.is_empty() {
        eos_token_ids = vec![2];
    }
    let bos = f.token_ids("bos_token_id")?.first().copied();
    Ok(LlamaConfig {
        vocab_size: positive(path, section, "vocab_size", f.usize_or("vocab_size", 32000)?)?,
        hidden_size,
        intermediate_size: positive(path, section, "intermediate_size", f.usize_or("intermediate_size", 11008)?)?,
        num_hidden_layers: f.usize_or("num_hidden_layers", 32)?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)?,
        rope_theta,
        rope_scaling,
        max_position_embeddings: f.usize_or("max_position_embeddings", 2048)?,
        tie_word_embeddings,
        attention_bias: f.bool_or("attention_bias", false)?,
        mlp_bias: f.bool_or("mlp_bias", false)?,
        qkv_bias: false,
        mrope_section: None,
        layer_window: Vec::new(),
        bos_token_id: bos.or(Some(1)),
        eos_token_ids,
    })
}

fn parse_clip(raw: Option<&Value>, path: &Path) -> Result<ClipVisionConfig> {
    // Absent vision_config: LlavaConfig's default is CLIP ViT-L/14 at 336 px.
    let (dh, di, dl, dheads, dimg, dpatch) =
        if raw.is_none() { (1024, 4096, 24, 16, 336, 14) } else { (768, 3072, 12, 12, 224, 32) };
    let section = "vision_config.";
    let f = Fields { obj: raw.and_then(|r| r.as_object()), path, section };
    let mt = f.str_or("model_type", "clip_vision_model")?;
    if mt != "clip_vision_model" && mt != "clip" {
        return Err(EngineError::config(
            path,
            format!("vision_config.model_type = \"{mt}\" is not supported; expected clip_vision_model"),
        ));
    }
    let cfg = ClipVisionConfig {
        hidden_size: positive(path, section, "hidden_size", f.usize_or("hidden_size", dh)?)?,
        intermediate_size: positive(path, section, "intermediate_size", f.usize_or("intermediate_size", di)?)?,
        num_hidden_layers: f.usize_or("num_hidden_layers", dl)?,
        num_attention_heads: positive(
            path,
            section,
            "num_attention_heads",
            f.usize_or("num_attention_heads", dheads)?,
        )?,
        num_channels: positive(path, section, "num_channels", f.usize_or("num_channels", 3)?)?,
        image_size: positive(path, section, "image_size", f.usize_or("image_size", dimg)?)?,
        patch_size: positive(path, section, "patch_size", f.usize_or("patch_size", dpatch)?)?,
        hidden_act: Activation::parse(f.str_or("hidden_act", "quick_gelu")?, path, "vision_config.hidden_act")?,
        layer_norm_eps: f.f64_or("layer_norm_eps", 1e-5)?,
    };
    if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
        return Err(EngineError::config(path, "vision_config.hidden_size must be divisible by num_attention_heads"));
    }
    if !cfg.image_size.is_multiple_of(cfg.patch_size) {
        return Err(EngineError::config(path, "vision_config.image_size must be a multiple of patch_size"));
    }
    if cfg.num_channels != 3 {
        return Err(EngineError::config(path, "vision_config.num_channels must be 3 (RGB)"));
    }
    Ok(cfg)
}

pub(crate) fn parse_llava(raw: &Value, path: &Path) -> Result<LlavaConfig> {
    let f = Fields { obj: raw.as_object(), path, section: "" };
    let mut text_raw = f.get("text_config").cloned().unwrap_or(Value::Object(Default::default()));
    let mut windows = Vec::new();
    match text_raw.get("model_type").and_then(|v| v.as_str()) {
        None | Some("llama") => {}
        Some("mistral") => (text_raw, windows) = mistral_as_llama(text_raw, path)?,
        Some(mt) => {
            return Err(EngineError::config(
                path,
                format!("text_config.model_type = \"{mt}\" is not supported; expected llama or mistral"),
            ))
        }
    }
    let mut text = parse_llama(&text_raw, Some(raw), path)?;
    text.layer_window = windows;
    let vision = parse_clip(f.get("vision_config"), path)?;
    let image_token_id = match f.opt_usize("image_token_id")? {
        Some(v) => v,
        None => f.usize_or("image_token_index", 32000)?,
    } as u32;
    let vision_feature_layer = match f.get("vision_feature_layer") {
        None => -2,
        Some(v) => v.as_i64().ok_or_else(|| {
            EngineError::config(path, "vision_feature_layer must be one integer (lists of layers are not supported)")
        })?,
    };
    let n = vision.num_hidden_layers as i64;
    if vision_feature_layer > n || vision_feature_layer < -(n + 1) {
        return Err(EngineError::config(
            path,
            format!("vision_feature_layer = {vision_feature_layer} is out of range for a vision tower with {n} layers (valid: -{} ..= {n})", n + 1),
        ));
    }
    let strategy = match f.str_or("vision_feature_select_strategy", "default")? {
        "default" => FeatureSelect::Default,
        "full" => FeatureSelect::Full,
        other => {
            return Err(EngineError::config(
                path,
                format!("vision_feature_select_strategy = \"{other}\"; expected \"default\" or \"full\""),
            ))
        }
    };
    Ok(LlavaConfig {
        text,
        vision,
        image_token_id,
        vision_feature_layer,
        vision_feature_select_strategy: strategy,
        projector_hidden_act: Activation::parse(
            f.str_or("projector_hidden_act", "gelu")?,
            path,
            "projector_hidden_act",
        )?,
        projector_bias: f.bool_or("multimodal_projector_bias", true)?,
        pad_to_square: f.str_or("image_aspect_ratio", "")? == "pad",
        grid_pinpoints: Vec::new(),
    })
}

/// A Mistral text config as the LLaMA decoder it is (no biases, SwiGLU, RMSNorm, RoPE), with MistralConfig's
/// defaults for absent fields, and its sliding window on every layer (`sliding_window`, 4096 when absent; null
/// for none, as LLaVA-NeXT's Mistral-7B-Instruct-v0.2 has it).
fn mistral_as_llama(mut raw: Value, path: &Path) -> Result<(Value, Vec<Option<usize>>)> {
    let Some(obj) = raw.as_object_mut() else {
        return Err(EngineError::config(path, "text_config must be an object"));
    };
    for (k, v) in [
        ("vocab_size", 32000u64),
        ("hidden_size", 4096),
        ("intermediate_size", 14336),
        ("num_hidden_layers", 32),
        ("num_attention_heads", 32),
        ("num_key_value_heads", 8),
        ("max_position_embeddings", 131072),
    ] {
        obj.entry(k).or_insert(Value::from(v));
    }
    let window = sliding_window_field(obj, path)?;
    // Mistral has no per-layer types: every layer slides.
    obj.remove("layer_types");
    let windows = layer_windows(obj, path, window, |_| true)?;
    Ok((raw, windows))
}

/// LLaVA-NeXT's config.json: LLaVA's fields plus `image_grid_pinpoints` (transformers' default when absent).
pub(crate) fn parse_llava_next(raw: &Value, path: &Path) -> Result<LlavaConfig> {
    let mut c = parse_llava(raw, path)?;
    c.grid_pinpoints = match raw.get("image_grid_pinpoints").filter(|v| !v.is_null()) {
        None => vec![(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)],
        Some(v) => crate::image::parse_pinpoints(v)
            .map_err(|e| EngineError::config(path, e))?
            .into_iter()
            .map(|(h, w)| (h as usize, w as usize))
            .collect(),
    };
    let tile = c.vision.image_size;
    if let Some(&(h, w)) = c.grid_pinpoints.iter().find(|&&(h, w)| h == 0 || w == 0 || h % tile != 0 || w % tile != 0) {
        return Err(EngineError::config(
            path,
            format!("image_grid_pinpoints entry [{h}, {w}] is not a whole number of {tile}-pixel tiles (vision_config.image_size)"),
        ));
    }
    if c.vision_feature_select_strategy != FeatureSelect::Default {
        return Err(EngineError::config(
            path,
            "LLaVA-NeXT tiles need vision_feature_select_strategy = \"default\" (a square grid of patch features)",
        ));
    }
    Ok(c)
}

/// Qwen2-VL / Qwen2.5-VL's config.json (`v2_5` for the latter): the Qwen2 decoder from `text_config` (or, as the
/// hub's configs have it, from the top level), the vision transformer from `vision_config`, and the vision
/// tokens. Older configs spell the multimodal RoPE `rope_scaling: {"type": "mrope", "mrope_section": [...]}`.
pub(crate) fn parse_qwen_vl(raw: &Value, path: &Path, v2_5: bool) -> Result<QwenVlConfig> {
    let f = Fields { obj: raw.as_object(), path, section: "" };
    let nested = f.get("text_config").is_some();
    let mut text_raw = f.get("text_config").cloned().unwrap_or_else(|| raw.clone());
    let Some(obj) = text_raw.as_object_mut() else {
        return Err(EngineError::config(path, "text_config must be an object"));
    };
    // The Qwen2 decoder's defaults (Qwen2-VL-7B), and the multimodal RoPE's sections.
    for (k, v) in [
        ("vocab_size", 152064u64),
        ("hidden_size", 3584),
        ("intermediate_size", 18944),
        ("num_hidden_layers", 28),
        ("num_attention_heads", 28),
        ("num_key_value_heads", 4),
        ("max_position_embeddings", 32768),
    ] {
        obj.entry(k).or_insert(Value::from(v));
    }
    obj.entry("rope_theta").or_insert(Value::from(1_000_000.0));
    let mut mrope: Option<Value> = None;
    for key in ["rope_parameters", "rope_scaling"] {
        if let Some(p) = obj.get_mut(key).and_then(|p| p.as_object_mut()) {
            if let Some(m) = p.remove("mrope_section") {
                mrope = Some(m);
            }
            if p.get("type").or_else(|| p.get("rope_type")).and_then(|t| t.as_str()) == Some("mrope") {
                p.remove("type");
                p.insert("rope_type".into(), Value::from("default"));
            }
        }
    }
    // Qwen2's sliding window: only with use_sliding_window, on the layers from max_window_layers on (or those
    // `layer_types` names).
    let window = if obj.get("use_sliding_window").and_then(|v| v.as_bool()) == Some(true) {
        sliding_window_field(obj, path)?
    } else {
        None
    };
    let from = obj.get("max_window_layers").and_then(|v| v.as_u64()).unwrap_or(80) as usize;
    let windows = layer_windows(obj, path, window, |i| i >= from)?;
    let act = obj.get("hidden_act").and_then(|v| v.as_str()).unwrap_or("silu");
    if act != "silu" {
        return Err(EngineError::config(
            path,
            format!("text_config.hidden_act = \"{act}\"; Qwen2's decoder uses silu"),
        ));
    }
    let mut text = parse_llama(&text_raw, if nested { Some(raw) } else { None }, path)?;
    text.qkv_bias = true;
    text.layer_window = windows;
    let half = text.head_dim / 2;
    let section: Vec<usize> = match &mrope {
        None => vec![half / 4, (half - half / 4) / 2, half - half / 4 - (half - half / 4) / 2],
        Some(v) => v
            .as_array()
            .filter(|a| a.len() == 3)
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| EngineError::config(path, "mrope_section must be a list of 3 non-negative integers"))?,
    };
    if section.iter().sum::<usize>() != half {
        return Err(EngineError::config(
            path,
            format!("mrope_section {section:?} must sum to head_dim / 2 = {half} (the frequency pairs of one head)"),
        ));
    }
    text.mrope_section = Some([section[0], section[1], section[2]]);

    let vraw = f.get("vision_config");
    let v = Fields { obj: vraw.and_then(|r| r.as_object()), path, section: "vision_config." };
    let (hidden_key, default_hidden) = if v2_5 { ("hidden_size", 1280) } else { ("embed_dim", 1280) };
    let hidden_size = positive(path, "vision_config.", hidden_key, v.usize_or(hidden_key, default_hidden)?)?;
    let num_heads = positive(path, "vision_config.", "num_heads", v.usize_or("num_heads", 16)?)?;
    let intermediate_size = if v2_5 {
        v.usize_or("intermediate_size", 3420)?
    } else {
        let ratio = v.f64_or("mlp_ratio", 4.0)?;
        (hidden_size as f64 * ratio) as usize
    };
    let out_hidden_size = if v2_5 {
        v.usize_or("out_hidden_size", text.hidden_size)?
    } else {
        v.usize_or("hidden_size", text.hidden_size)?
    };
    if out_hidden_size != text.hidden_size {
        return Err(EngineError::config(
            path,
            format!(
                "the vision merger's output ({out_hidden_size}) must match the decoder's hidden_size ({})",
                text.hidden_size
            ),
        ));
    }
    let theta = match v.get("rope_parameters").and_then(|p| p.get("rope_theta")) {
        Some(t) => t.as_f64().ok_or_else(|| v.err("rope_parameters.rope_theta", "a number"))?,
        None => 10000.0,
    };
    let fullatt = match v.get("fullatt_block_indexes") {
        None => vec![7, 15, 23, 31],
        Some(list) => list
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| v.err("fullatt_block_indexes", "a list of block indexes"))?,
    };
    let vision = QwenVisionConfig {
        v2_5,
        depth: v.usize_or("depth", 32)?,
        hidden_size,
        intermediate_size: positive(path, "vision_config.", "intermediate_size", intermediate_size)?,
        num_heads,
        in_channels: v.usize_or("in_channels", 3)?,
        patch_size: positive(path, "vision_config.", "patch_size", v.usize_or("patch_size", 14)?)?,
        temporal_patch_size: positive(
            path,
            "vision_config.",
            "temporal_patch_size",
            v.usize_or("temporal_patch_size", 2)?,
        )?,
        spatial_merge_size: positive(
            path,
            "vision_config.",
            "spatial_merge_size",
            v.usize_or("spatial_merge_size", 2)?,
        )?,
        out_hidden_size,
        hidden_act: Activation::parse(
            v.str_or("hidden_act", if v2_5 { "silu" } else { "quick_gelu" })?,
            path,
            "vision_config.hidden_act",
        )?,
        rope_theta: theta,
        window_size: if v2_5 { v.usize_or("window_size", 112)? } else { 0 },
        fullatt_block_indexes: if v2_5 { fullatt } else { Vec::new() },
    };
    if vision.in_channels != 3 {
        return Err(EngineError::config(path, "vision_config.in_channels must be 3 (RGB)"));
    }
    let vhd = vision.hidden_size / vision.num_heads;
    if !vision.hidden_size.is_multiple_of(vision.num_heads) || !vhd.is_multiple_of(4) {
        return Err(EngineError::config(
            path,
            "vision_config: the head size (hidden size / num_heads) must be a multiple of 4 for the 2-D rotary embedding",
        ));
    }
    if v2_5 {
        let unit = vision.spatial_merge_size * vision.patch_size;
        if vision.window_size < unit || !vision.window_size.is_multiple_of(unit) {
            return Err(EngineError::config(
                path,
                format!(
                    "vision_config.window_size = {} must be a multiple of spatial_merge_size x patch_size = {unit}",
                    vision.window_size
                ),
            ));
        }
    }
    let token = |key: &str, default: usize| -> Result<u32> { Ok(f.usize_or(key, default)? as u32) };
    Ok(QwenVlConfig {
        text,
        vision,
        image_token_id: token("image_token_id", 151655)?,
        vision_start_token_id: token("vision_start_token_id", 151652)?,
        vision_end_token_id: token("vision_end_token_id", 151653)?,
    })
}
