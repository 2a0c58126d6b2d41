//! LLaMA decoder: RMSNorm, RoPE, MHA/GQA/MQA attention with a KV cache, SwiGLU MLP, lm_head (or tied).

use crate::adapter::Adapter;
use crate::config::LlamaConfig;
use crate::error::Result;
use crate::linear::Linear;
use crate::ops::{PackedMatrix, attend_dense, attend_rows, rmsnorm, silu_mul, KvSegment, MatmulMode, Rope};
use crate::weights::WeightStore;
use std::sync::Arc;

/// From this many query rows on, attention runs as per-head GEMMs instead of row by row.
const DENSE_MIN_ROWS: usize = 16;

pub struct LlamaLayer {
    input_norm: Vec<f32>, // (C)
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: Vec<f32>, // (C)
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub struct Llama {
    pub cfg: LlamaConfig,
    pub embed: Arc<PackedMatrix>, // (V, C), packed (shared with a tied lm_head)
    pub layers: Vec<LlamaLayer>,
    norm: Vec<f32>, // (C)
    /// Shares `embed` when the embeddings are tied.
    lm_head: Linear,
    rope: Rope,
}

/// Keys and values of one sequence's cached positions, per layer: (len, kv_heads, head_dim) each.
#[derive(Clone, Default)]
pub struct KvCache {
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    pub len: usize,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        KvCache { k: vec![Vec::new(); layers], v: vec![Vec::new(); layers], len: 0 }
    }
}

impl Llama {
    /// `prefix` is where decoder keys live (e.g. `model.language_model.`); `lm_head_key` the head's key
    /// without `.weight`, or None if tied.
    pub fn load(ws: &WeightStore, prefix: &str, lm_head_key: Option<&str>, cfg: &LlamaConfig, keep_16bit: bool) -> Result<Self> {
        let c = cfg.hidden_size;
        let hd = cfg.head_dim;
        let (h, kvh, i_sz) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let kp = format!("{prefix}layers.{i}.");
            let name = |s: &str| format!("language_model.layers.{i}.{s}");
            let lin = |s: &str, fi, fo, b| Linear::load(ws, &format!("{kp}{s}"), name(s), fi, fo, b, keep_16bit);
            layers.push(LlamaLayer {
                input_norm: ws.f32(&format!("{kp}input_layernorm.weight"), &[c])?,
                q: lin("self_attn.q_proj", c, h * hd, cfg.attention_bias)?,
                k: lin("self_attn.k_proj", c, kvh * hd, cfg.attention_bias)?,
                v: lin("self_attn.v_proj", c, kvh * hd, cfg.attention_bias)?,
                o: lin("self_attn.o_proj", h * hd, c, cfg.attention_bias)?,
                post_norm: ws.f32(&format!("{kp}post_attention_layernorm.weight"), &[c])?,
                gate: lin("mlp.gate_proj", c, i_sz, cfg.mlp_bias)?,
                up: lin("mlp.up_proj", c, i_sz, cfg.mlp_bias)?,
                down: lin("mlp.down_proj", i_sz, c, cfg.mlp_bias)?,
            });
        }
        let embed = Arc::new(ws.packed(&format!("{prefix}embed_tokens.weight"), cfg.vocab_size, c, keep_16bit)?);
        let lm_head = match lm_head_key {
            Some(k) => Linear::load(ws, k, "lm_head".into(), c, cfg.vocab_size, false, keep_16bit)?,
            None => Linear { name: "lm_head".into(), in_features: c, out_features: cfg.vocab_size, weight: embed.clone(), bias: None },
        };
        Ok(Llama {
            cfg: cfg.clone(),
            embed,
            layers,
            norm: ws.f32(&format!("{prefix}norm.weight"), &[c])?,
            lm_head,
            rope: Rope::new(hd, cfg.rope_theta, &cfg.rope_scaling),
        })
    }

    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]).chain(std::iter::once(&self.lm_head))
    }

    /// Appends the embedding rows of `ids` to `out` (rows, C).
    pub fn embed_into(&self, out: &mut Vec<f32>, ids: &[u32]) {
        let c = self.cfg.hidden_size;
        for &id in ids {
            let at = out.len();
            out.resize(at + c, 0.0);
            self.embed.row_into(id as usize, &mut out[at..]);
        }
    }

    /// Runs every decoder layer on x (rows, C) in place. Row r sits at position `positions[r]`;
    /// `attend(layer, q, k, v, out)` gets the rotated q (rows, H, hd) and k, v (rows, KVH, hd) of this
    /// step, must store k/v wherever the caller caches them and write the attention output (rows, H, hd).
    pub fn run_layers<F>(&self, x: &mut [f32], rows: usize, positions: &[usize], adapter: Option<&Adapter>, mut attend: F)
    where
        F: FnMut(usize, &[f32], &[f32], &[f32], &mut [f32]),
    {
        let cfg = &self.cfg;
        let c = cfg.hidden_size;
        let (heads, kvh, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let mut h = vec![0f32; rows * c]; // (R, C)
        let mut att = vec![0f32; rows * heads * hd]; // (R, H, hd)
        for (li, layer) in self.layers.iter().enumerate() {
            rmsnorm(&mut h, x, &layer.input_norm, cfg.rms_norm_eps);
            let mut q = layer.q.apply(&h, rows, adapter); // (R, H, hd)
            let mut k = layer.k.apply(&h, rows, adapter); // (R, KVH, hd)
            let v = layer.v.apply(&h, rows, adapter); // (R, KVH, hd)
            self.rope.apply(&mut q, heads, positions);
            self.rope.apply(&mut k, kvh, positions);
            attend(li, &q, &k, &v, &mut att);
            layer.o.forward(x, &att, rows, adapter, MatmulMode::Accumulate);
            rmsnorm(&mut h, x, &layer.post_norm, cfg.rms_norm_eps);
            let mut g = layer.gate.apply(&h, rows, adapter); // (R, I)
            let u = layer.up.apply(&h, rows, adapter); // (R, I)
            silu_mul(&mut g, &u);
            layer.down.forward(x, &g, rows, adapter, MatmulMode::Accumulate);
        }
    }

    /// Causal forward of x (rows, C) continuing `cache` (positions cache.len ..); appends to the cache.
    pub fn forward_cached(&self, x: &mut [f32], rows: usize, cache: &mut KvCache, adapter: Option<&Adapter>) {
        let cfg = &self.cfg;
        let (heads, kvh, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let start = cache.len;
        let positions: Vec<usize> = (start..start + rows).collect();
        let scale = (hd as f32).powf(-0.5);
        self.run_layers(x, rows, &positions, adapter, |li, q, k, v, out| {
            cache.k[li].extend_from_slice(k);
            cache.v[li].extend_from_slice(v);
            if rows >= DENSE_MIN_ROWS {
                attend_dense(out, q, &cache.k[li], &cache.v[li], rows, start + rows, start, heads, kvh, hd, scale, true);
            } else {
                let seg = KvSegment { k: &cache.k[li], v: &cache.v[li], len: start + rows };
                attend_rows(out, q, heads, kvh, hd, scale, |r| (vec![seg], start + r + 1));
            }
        });
        cache.len += rows;
    }

    /// One decode step for several sequences that share `prefix` and each have their own `suffixes[r]`
    /// (all suffixes the same length). x: (rows, C) embeddings of each sequence's newest token.
    pub fn forward_shared_prefix(&self, x: &mut [f32], prefix: &KvCache, suffixes: &mut [&mut KvCache], adapter: Option<&Adapter>) {
        let rows = suffixes.len();
        let cfg = &self.cfg;
        let (heads, kvh, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let pos = prefix.len + suffixes.first().map_or(0, |s| s.len);
        let positions = vec![pos; rows];
        let scale = (hd as f32).powf(-0.5);
        let width = kvh * hd;
        self.run_layers(x, rows, &positions, adapter, |li, q, k, v, out| {
            for (r, s) in suffixes.iter_mut().enumerate() {
                s.k[li].extend_from_slice(&k[r * width..(r + 1) * width]);
                s.v[li].extend_from_slice(&v[r * width..(r + 1) * width]);
            }
            let pre = KvSegment { k: &prefix.k[li], v: &prefix.v[li], len: prefix.len };
            let sufs: Vec<KvSegment> =
                suffixes.iter().map(|s| KvSegment { k: &s.k[li], v: &s.v[li], len: s.k[li].len() / width }).collect();
            attend_rows(out, q, heads, kvh, hd, scale, |r| (vec![pre, sufs[r]], prefix.len + sufs[r].len));
        });
        for s in suffixes.iter_mut() {
            s.len += 1;
        }
    }

    /// Final norm + lm_head on x (rows, C). Returns logits (rows, V).
    pub fn logits(&self, x: &[f32], rows: usize, adapter: Option<&Adapter>) -> Vec<f32> {
        let c = self.cfg.hidden_size;
        let mut h = vec![0f32; rows * c];
        rmsnorm(&mut h, x, &self.norm, self.cfg.rms_norm_eps);
        self.lm_head.apply(&h, rows, adapter)
    }
}
