//! The weight keys inside each part, written once: the CPU and GPU loaders, `init-model` and the canonical module
//! names all build their keys here. `Keys` is a prefix that grows the way candle's `VarBuilder::pp` does
//! (`Keys::new("model.language_model.").pp("layers").pp(3).key("input_layernorm.weight")`); the part's own prefix on
//! disk comes from the checkpoint's `KeyLayout`.

use crate::config::{ClipVisionConfig, LlamaConfig, LlavaConfig, ModelConfig, QwenVisionConfig};

/// A key prefix: empty, or ending in '.'.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys(String);

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys(prefix.to_string())
    }

    /// The prefix one level down: `{prefix}{name}.`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Keys {
        Keys(format!("{}{name}.", self.0))
    }

    /// The full key of `name` under this prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.0)
    }

    pub fn prefix(&self) -> &str {
        &self.0
    }
}

// -- LLaMA decoder (under the decoder part's prefix) ---------------------------------------------------------------

pub const EMBED_TOKENS: &str = "embed_tokens";
pub const FINAL_NORM: &str = "norm";
pub const INPUT_NORM: &str = "input_layernorm";
pub const POST_NORM: &str = "post_attention_layernorm";

/// Decoder layer `i`'s prefix under the decoder's.
pub fn decoder_layer(decoder: &Keys, i: usize) -> Keys {
    decoder.pp("layers").pp(i)
}

/// A decoder layer's linear layers in the order q, k, v, o, gate, up, down: (module under the layer, in
/// features, out features, bias).
pub fn decoder_linears(cfg: &LlamaConfig) -> [(&'static str, usize, usize, bool); 7] {
    let (c, hd, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (h, kvh, ab, mb) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.attention_bias, cfg.mlp_bias);
    let qkv = ab || cfg.qkv_bias;
    [
        ("self_attn.q_proj", c, h * hd, qkv),
        ("self_attn.k_proj", c, kvh * hd, qkv),
        ("self_attn.v_proj", c, kvh * hd, qkv),
        ("self_attn.o_proj", h * hd, c, ab),
        ("mlp.gate_proj", c, i, mb),
        ("mlp.up_proj", c, i, mb),
        ("mlp.down_proj", i, c, mb),
    ]
}

// -- CLIP vision tower (under the vision part's prefix) ----------------------------------------------------------

pub const PATCH_EMBEDDING: &str = "embeddings.patch_embedding.weight";
pub const CLASS_EMBEDDING: &str = "embeddings.class_embedding";
pub const POSITION_EMBEDDING: &str = "embeddings.position_embedding.weight";
pub const PRE_NORM: &str = "pre_layrnorm";
pub const POST_LAYERNORM: &str = "post_layernorm";
pub const LAYER_NORM1: &str = "layer_norm1";
pub const LAYER_NORM2: &str = "layer_norm2";

/// Vision layer `i`'s prefix under the tower's.
pub fn vision_layer(tower: &Keys, i: usize) -> Keys {
    tower.pp("encoder").pp("layers").pp(i)
}

/// A vision layer's linear layers in the order q, k, v, out, fc1, fc2 (all with bias): (module under the layer,
/// in features, out features).
pub fn vision_linears(cfg: &ClipVisionConfig) -> [(&'static str, usize, usize); 6] {
    let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
    [
        ("self_attn.q_proj", d, d),
        ("self_attn.k_proj", d, d),
        ("self_attn.v_proj", d, d),
        ("self_attn.out_proj", d, d),
        ("mlp.fc1", d, i),
        ("mlp.fc2", i, d),
    ]
}

// -- projector (under the projector part's prefix) ---------------------------------------------------------------

/// The projector's two linear layers: (module, in features, out features).
pub fn projector_linears(lc: &LlavaConfig) -> [(&'static str, usize, usize); 2] {
    let (d, c) = (lc.vision.hidden_size, lc.text.hidden_size);
    [("linear_1", d, c), ("linear_2", c, c)]
}

// -- Qwen2-VL / Qwen2.5-VL vision transformer (under the vision part's prefix) ------------------------------------

/// The patch embedding: a Conv3d (D, 3, T, P, P) without bias.
pub const QWEN_PATCH_EMBED: &str = "patch_embed.proj.weight";
/// The merger's norm (RMSNorm for 2.5, LayerNorm with a bias for 2).
pub const QWEN_MERGER_NORM: &str = "merger.ln_q";
/// A block's two norms, before attention and before the MLP.
pub const QWEN_BLOCK_NORMS: [&str; 2] = ["norm1", "norm2"];

/// Block `i`'s prefix under the vision transformer's.
pub fn qwen_block(vision: &Keys, i: usize) -> Keys {
    vision.pp("blocks").pp(i)
}

/// A block's linear layers (module under the block, in features, out features), every one with a bias:
/// attention's fused q/k/v and output projection, then Qwen2.5's gated MLP or Qwen2's fc1/fc2.
pub fn qwen_block_linears(cfg: &QwenVisionConfig) -> Vec<(&'static str, usize, usize)> {
    let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
    let mut out = vec![("attn.qkv", d, 3 * d), ("attn.proj", d, d)];
    if cfg.v2_5 {
        out.extend([("mlp.gate_proj", d, i), ("mlp.up_proj", d, i), ("mlp.down_proj", i, d)]);
    } else {
        out.extend([("mlp.fc1", d, i), ("mlp.fc2", i, d)]);
    }
    out
}

/// The merger's two linear layers (with biases): `spatial_merge_size`² patches side by side, then the decoder's
/// width.
pub fn qwen_merger_linears(cfg: &QwenVisionConfig) -> [(&'static str, usize, usize); 2] {
    let merged = cfg.hidden_size * cfg.spatial_merge_size * cfg.spatial_merge_size;
    [("merger.mlp.0", merged, merged), ("merger.mlp.2", merged, cfg.out_hidden_size)]
}

/// How `init-model` fills a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// ~ N(0, std²)
    Normal,
    Ones,
    Zeros,
}

/// Every tensor of a model (key, shape, initialisation) in the key layout whose part prefixes are `text`,
/// `vision` and `projector` (the untied lm_head under `lm_head`).
pub fn tensors(
    cfg: &ModelConfig,
    text: &str,
    lm_head: &str,
    vision: &str,
    projector: &str,
) -> Vec<(String, Vec<usize>, Init)> {
    let t = cfg.text();
    let (c, v) = (t.hidden_size, t.vocab_size);
    let lm = Keys::new(text);
    let mut out = vec![(lm.key(&format!("{EMBED_TOKENS}.weight")), vec![v, c], Init::Normal)];
    for l in 0..t.num_hidden_layers {
        let p = decoder_layer(&lm, l);
        out.push((p.pp(INPUT_NORM).key("weight"), vec![c], Init::Ones));
        out.push((p.pp(POST_NORM).key("weight"), vec![c], Init::Ones));
        for (name, inp, o, bias) in decoder_linears(t) {
            out.push((p.pp(name).key("weight"), vec![o, inp], Init::Normal));
            if bias {
                out.push((p.pp(name).key("bias"), vec![o], Init::Zeros));
            }
        }
    }
    out.push((lm.pp(FINAL_NORM).key("weight"), vec![c], Init::Ones));
    if !t.tie_word_embeddings {
        out.push((format!("{lm_head}.weight"), vec![v, c], Init::Normal));
    }
    if let Some(lc) = cfg.llava() {
        let vc = &lc.vision;
        let (d, p) = (vc.hidden_size, vc.patch_size);
        let vp = Keys::new(vision);
        out.push((vp.key(PATCH_EMBEDDING), vec![d, vc.num_channels, p, p], Init::Normal));
        out.push((vp.key(CLASS_EMBEDDING), vec![d], Init::Normal));
        out.push((vp.key(POSITION_EMBEDDING), vec![vc.num_patches() + 1, d], Init::Normal));
        out.push((vp.pp(PRE_NORM).key("weight"), vec![d], Init::Ones));
        out.push((vp.pp(PRE_NORM).key("bias"), vec![d], Init::Zeros));
        for l in 0..vc.num_hidden_layers {
            let q = vision_layer(&vp, l);
            for ln in [LAYER_NORM1, LAYER_NORM2] {
                out.push((q.pp(ln).key("weight"), vec![d], Init::Ones));
                out.push((q.pp(ln).key("bias"), vec![d], Init::Zeros));
            }
            for (name, inp, o) in vision_linears(vc) {
                out.push((q.pp(name).key("weight"), vec![o, inp], Init::Normal));
                out.push((q.pp(name).key("bias"), vec![o], Init::Zeros));
            }
        }
        out.push((vp.pp(POST_LAYERNORM).key("weight"), vec![d], Init::Ones));
        out.push((vp.pp(POST_LAYERNORM).key("bias"), vec![d], Init::Zeros));
        let pp = Keys::new(projector);
        for (name, inp, o) in projector_linears(lc) {
            out.push((pp.pp(name).key("weight"), vec![o, inp], Init::Normal));
        }
        if lc.projector_bias {
            for (name, _, o) in projector_linears(lc) {
                out.push((pp.pp(name).key("bias"), vec![o], Init::Zeros));
            }
        }
        if lc.anyres() {
            // LLaVA-NeXT's row end, as transformers draws it: randn(hidden) / sqrt(hidden) (here at `std`).
            out.push((super::llava_next::image_newline_key(projector).to_string(), vec![c], Init::Normal));
        }
    }
    if let Some(qc) = cfg.qwen_vl() {
        let vc = &qc.vision;
        let (d, p, t) = (vc.hidden_size, vc.patch_size, vc.temporal_patch_size);
        let vp = Keys::new(vision);
        out.push((vp.key(QWEN_PATCH_EMBED), vec![d, vc.in_channels, t, p, p], Init::Normal));
        let norm = |out: &mut Vec<(String, Vec<usize>, Init)>, k: Keys| {
            out.push((k.key("weight"), vec![d], Init::Ones));
            if !vc.v2_5 {
                out.push((k.key("bias"), vec![d], Init::Zeros));
            }
        };
        for b in 0..vc.depth {
            let q = qwen_block(&vp, b);
            for n in QWEN_BLOCK_NORMS {
                norm(&mut out, q.pp(n));
            }
            for (name, inp, o) in qwen_block_linears(vc) {
                out.push((q.pp(name).key("weight"), vec![o, inp], Init::Normal));
                out.push((q.pp(name).key("bias"), vec![o], Init::Zeros));
            }
        }
        norm(&mut out, vp.pp(QWEN_MERGER_NORM));
        for (name, inp, o) in qwen_merger_linears(vc) {
            out.push((vp.pp(name).key("weight"), vec![o, inp], Init::Normal));
            out.push((vp.pp(name).key("bias"), vec![o], Init::Zeros));
        }
    }
    out
}
