//! LLaMA decoder: RMSNorm, RoPE, MHA/GQA/MQA attention with a KV cache, SwiGLU MLP, lm_head (or tied).
//!
//! The GPU decoder (`cuda_llama/`) keeps these names, so one file reads against the other: `forward_layers` runs
//! every layer over some rows, `forward` continues a KV cache, `decode_step` moves n sequences that share a
//! prefix one token each (the GPU's `start_decode` prefills that prefix with `forward`); the training passes below
//! mirror `cuda_train/decoder.rs` the same way.

use crate::adapter::Adapter;
use crate::config::LlamaConfig;
use crate::error::Result;
use crate::family::keys::{decoder_layer, decoder_linears, Keys, EMBED_TOKENS, FINAL_NORM, INPUT_NORM, POST_NORM};
use crate::linear::Linear;
use crate::ops::backward::{attend_dense_bwd, rmsnorm_bwd, silu_mul_bwd};
use crate::ops::{
    add_inplace, attend_dense, attend_rows, rmsnorm, silu_mul, KvSegment, Mask, MatmulMode, PackedMatrix, Rope,
};
use crate::train::Grads;
use crate::weights::WeightStore;
use std::borrow::Cow;
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
    /// Training: drop the cheap activations (the two RMSNorm outputs and silu(g)·u) from the tape and recompute
    /// them in the backward pass, saving (2C + I) floats per position and layer.
    pub recompute_cheap: bool,
}

/// Keys and values of one sequence's cached positions, per layer: (len, kv_heads, head_dim) each.
#[derive(Clone, Default)]
pub struct KvCache {
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    pub len: usize,
    /// RoPE position of cached row i is i + shift for rows appended without explicit positions (multimodal RoPE
    /// puts an image on fewer positions than rows, so the text after it sits at a negative shift, transformers'
    /// `rope_deltas`); 0 otherwise.
    pub shift: isize,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        KvCache { k: vec![Vec::new(); layers], v: vec![Vec::new(); layers], len: 0, shift: 0 }
    }

    /// The RoPE position of the row at index `i` (`shift` applied).
    pub fn position(&self, i: usize) -> usize {
        (i as isize + self.shift).max(0) as usize
    }
}

impl Llama {
    /// `prefix` is where decoder keys live (e.g. `model.language_model.`); `lm_head_key` the head's key
    /// without `.weight`, or None if tied.
    pub fn load(
        ws: &WeightStore,
        prefix: &str,
        lm_head_key: Option<&str>,
        cfg: &LlamaConfig,
        keep_16bit: bool,
    ) -> Result<Self> {
        let c = cfg.hidden_size;
        let hd = cfg.head_dim;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        let (decoder, canonical) = (Keys::new(prefix), Keys::new("language_model."));
        for i in 0..cfg.num_hidden_layers {
            let (kp, name) = (decoder_layer(&decoder, i), decoder_layer(&canonical, i));
            let [q, k, v, o, gate, up, down] = decoder_linears(cfg)
                .map(|(s, fi, fo, b)| Linear::load(ws, &kp.key(s), name.key(s), fi, fo, b, keep_16bit));
            layers.push(LlamaLayer {
                input_norm: ws.f32(&kp.pp(INPUT_NORM).key("weight"), &[c])?,
                q: q?,
                k: k?,
                v: v?,
                o: o?,
                post_norm: ws.f32(&kp.pp(POST_NORM).key("weight"), &[c])?,
                gate: gate?,
                up: up?,
                down: down?,
            });
        }
        let embed = Arc::new(ws.packed(&decoder.pp(EMBED_TOKENS).key("weight"), cfg.vocab_size, c, keep_16bit)?);
        let lm_head = match lm_head_key {
            Some(k) => Linear::load(ws, k, "lm_head".into(), c, cfg.vocab_size, false, keep_16bit)?,
            None => Linear {
                name: "lm_head".into(),
                param: "language_model.embed_tokens".into(),
                in_features: c,
                out_features: cfg.vocab_size,
                weight: embed.clone(),
                bias: None,
                transposed: Default::default(),
            },
        };
        Ok(Llama {
            cfg: cfg.clone(),
            embed,
            layers,
            norm: ws.f32(&decoder.pp(FINAL_NORM).key("weight"), &[c])?,
            lm_head,
            rope: Rope::new(hd, cfg.rope_theta, &cfg.rope_scaling).with_mrope(cfg.mrope_section),
            recompute_cheap: false,
        })
    }

    /// Whether positions may carry three components (Qwen2-VL's multimodal RoPE).
    pub fn rope_is_mrope(&self) -> bool {
        self.rope.is_mrope()
    }

    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers
            .iter()
            .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down])
            .chain(std::iter::once(&self.lm_head))
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
    pub fn forward_layers<F>(
        &self,
        x: &mut [f32],
        rows: usize,
        positions: &[usize],
        adapter: Option<&Adapter>,
        mut attend: F,
    ) where
        F: FnMut(usize, &[f32], &[f32], &[f32], &mut [f32]),
    {
        let cfg = &self.cfg;
        let c = cfg.hidden_size;
        let (heads, kvh, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let mut h = vec![0f32; rows * c]; // (R, C)
        let mut att = vec![0f32; rows * heads * hd]; // (R, H, hd)
        for (li, layer) in self.layers.iter().enumerate() {
            crate::interrupt::beat();
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

    /// Causal forward of x (rows, C) continuing `cache` (rows cache.len .., at RoPE positions shifted by
    /// `cache.shift`); appends to the cache.
    pub fn forward(&self, x: &mut [f32], rows: usize, cache: &mut KvCache, adapter: Option<&Adapter>) {
        let start = cache.len;
        let positions: Vec<usize> = (start..start + rows).map(|i| cache.position(i)).collect();
        self.forward_at(x, rows, &positions, cache, adapter)
    }

    /// `forward` with each row's RoPE position given (`crate::ops::rope::mrope_position` for image rows under
    /// multimodal RoPE).
    pub fn forward_at(
        &self,
        x: &mut [f32],
        rows: usize,
        positions: &[usize],
        cache: &mut KvCache,
        adapter: Option<&Adapter>,
    ) {
        let cfg = &self.cfg;
        let (heads, kvh, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let start = cache.len;
        let scale = (hd as f32).powf(-0.5);
        self.forward_layers(x, rows, positions, adapter, |li, q, k, v, out| {
            cache.k[li].extend_from_slice(k);
            cache.v[li].extend_from_slice(v);
            if rows >= DENSE_MIN_ROWS {
                attend_dense(
                    out,
                    q,
                    &cache.k[li],
                    &cache.v[li],
                    rows,
                    start + rows,
                    start,
                    heads,
                    kvh,
                    hd,
                    scale,
                    Mask::causal(cfg.window(li)),
                );
            } else {
                let seg = KvSegment { k: &cache.k[li], v: &cache.v[li], len: start + rows };
                attend_rows(out, q, heads, kvh, hd, scale, cfg.window(li), |r| (vec![seg], start + r + 1));
            }
        });
        cache.len += rows;
    }

    /// Causal forward of one sequence's own rows x (rows, C) after a `prefix` it shares with other sequences and
    /// its own `suffix` so far: the rows sit at positions prefix.len + suffix.len .. and are appended to `suffix`.
    /// The prefill of a prompt's tail in a batch of prompts with a common beginning (`generate::generate_batch`).
    pub fn forward_suffix(
        &self,
        x: &mut [f32],
        rows: usize,
        prefix: &KvCache,
        suffix: &mut KvCache,
        adapter: Option<&Adapter>,
    ) {
        let cfg = &self.cfg;
        let (heads, kvh, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let start = suffix.len;
        let positions: Vec<usize> = (0..rows).map(|r| prefix.position(prefix.len + start + r)).collect();
        let scale = (hd as f32).powf(-0.5);
        self.forward_layers(x, rows, &positions, adapter, |li, q, k, v, out| {
            suffix.k[li].extend_from_slice(k);
            suffix.v[li].extend_from_slice(v);
            let pre = KvSegment { k: &prefix.k[li], v: &prefix.v[li], len: prefix.len };
            let own = KvSegment { k: &suffix.k[li], v: &suffix.v[li], len: start + rows };
            attend_rows(out, q, heads, kvh, hd, scale, cfg.window(li), |r| {
                (vec![pre, own], prefix.len + start + r + 1)
            });
        });
        suffix.len += rows;
    }

    /// One decode step for several sequences that share `prefix` and each have their own `suffixes[r]` (of any
    /// lengths: row r sits at position prefix.len + suffixes[r].len). x: (rows, C) embeddings of each sequence's
    /// newest token.
    pub fn decode_step(
        &self,
        x: &mut [f32],
        prefix: &KvCache,
        suffixes: &mut [&mut KvCache],
        adapter: Option<&Adapter>,
    ) {
        let prefixes = vec![prefix; suffixes.len()];
        self.decode_step_multi(x, &prefixes, suffixes, adapter);
    }

    /// `decode_step` for rows that continue different prompts: row r attends to `prefixes[r]` and
    /// `suffixes[r]` (continuous batching puts the answers of several requests in one step). Each row's math is
    /// the same whatever the other rows are (the matmuls keep one accumulation order per row), so an answer does
    /// not depend on what it was batched with.
    pub fn decode_step_multi(
        &self,
        x: &mut [f32],
        prefixes: &[&KvCache],
        suffixes: &mut [&mut KvCache],
        adapter: Option<&Adapter>,
    ) {
        let rows = suffixes.len();
        assert_eq!(prefixes.len(), rows, "decode_step_multi: one prefix per row");
        let cfg = &self.cfg;
        let (heads, kvh, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let positions: Vec<usize> = suffixes.iter().zip(prefixes).map(|(s, p)| p.position(p.len + s.len)).collect();
        let scale = (hd as f32).powf(-0.5);
        let width = kvh * hd;
        self.forward_layers(x, rows, &positions, adapter, |li, q, k, v, out| {
            for (r, s) in suffixes.iter_mut().enumerate() {
                s.k[li].extend_from_slice(&k[r * width..(r + 1) * width]);
                s.v[li].extend_from_slice(&v[r * width..(r + 1) * width]);
            }
            let sufs: Vec<KvSegment> =
                suffixes.iter().map(|s| KvSegment { k: &s.k[li], v: &s.v[li], len: s.k[li].len() / width }).collect();
            attend_rows(out, q, heads, kvh, hd, scale, cfg.window(li), |r| {
                let p = prefixes[r];
                let pre = KvSegment { k: &p.k[li], v: &p.v[li], len: p.len };
                (vec![pre, sufs[r]], p.len + sufs[r].len)
            });
        });
        for s in suffixes.iter_mut() {
            s.len += 1;
        }
    }

    /// Several independent continuations ("branches") of one shared `prefix`, in one batch: x (rows, C) holds
    /// the rows of every branch back to back, `lens[j]` rows for branch j. Row i of a branch sits at position
    /// prefix.len + i and attends to the prefix and rows 0..=i of its own branch. Nothing is cached; x is
    /// overwritten with the last layer's output. Used to ask many questions about one image in one pass.
    pub fn forward_branches(&self, x: &mut [f32], lens: &[usize], prefix: &KvCache, adapter: Option<&Adapter>) {
        let cfg = &self.cfg;
        let (heads, kvh, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let rows: usize = lens.iter().sum();
        // (branch start row, local index) of every row.
        let mut owner = Vec::with_capacity(rows);
        let mut start = 0;
        for &l in lens {
            owner.extend((0..l).map(|i| (start, i)));
            start += l;
        }
        let positions: Vec<usize> = owner.iter().map(|&(_, i)| prefix.position(prefix.len + i)).collect();
        let scale = (hd as f32).powf(-0.5);
        let width = kvh * hd;
        self.forward_layers(x, rows, &positions, adapter, |li, q, k, v, out| {
            let pre = KvSegment { k: &prefix.k[li], v: &prefix.v[li], len: prefix.len };
            attend_rows(out, q, heads, kvh, hd, scale, cfg.window(li), |r| {
                let (b, i) = owner[r];
                let own = KvSegment { k: &k[b * width..], v: &v[b * width..], len: i + 1 };
                (vec![pre, own], prefix.len + i + 1)
            });
        });
    }

    /// Final norm + lm_head on x (rows, C). Returns logits (rows, V).
    pub fn logits(&self, x: &[f32], rows: usize, adapter: Option<&Adapter>) -> Vec<f32> {
        let c = self.cfg.hidden_size;
        let mut h = vec![0f32; rows * c];
        rmsnorm(&mut h, x, &self.norm, self.cfg.rms_norm_eps);
        self.lm_head.apply(&h, rows, adapter)
    }
}

// -- training: forward with saved activations, and its backward -------------------------------------------
//
// The same passes and names as the GPU trainer (`cuda_train.rs`): `layer_forward` / `layer_backward` per layer,
// a `ChunkTape` per run of rows (a whole sequence, a shared prompt, or an answer attending a prompt's keys and
// values), and `backward_shared` running both answers of a DPO pair and their prompt back together.

/// Activations of one decoder layer kept for the backward pass (`rows` rows each).
pub struct LayerTape {
    x_in: Vec<f32>,  // (T, C) layer input
    h1: Vec<f32>,    // (T, C) input_layernorm(x_in); empty with `recompute_cheap`
    q: Vec<f32>,     // (T, H, hd) after RoPE
    k: Vec<f32>,     // (T, KVH, hd) after RoPE
    v: Vec<f32>,     // (T, KVH, hd)
    att: Vec<f32>,   // (T, H, hd) attention output
    x_mid: Vec<f32>, // (T, C) after the attention residual
    h2: Vec<f32>,    // (T, C) post_attention_layernorm(x_mid); empty with `recompute_cheap`
    g: Vec<f32>,     // (T, I) gate_proj(h2)
    u: Vec<f32>,     // (T, I) up_proj(h2)
    act: Vec<f32>,   // (T, I) silu(g) * u; empty with `recompute_cheap`
}

/// A chunk of rows after the layers, at positions `start .. start + rows`: a whole sequence (start 0), a shared
/// prompt, or an answer that attended a prompt's keys and values first.
pub struct ChunkTape {
    pub rows: usize,
    pub start: usize,
    /// Each row's RoPE position: `start ..` unless given (`forward_chunk_at`, multimodal RoPE).
    positions: Vec<usize>,
    /// The RoPE shift of rows that continue this chunk (`KvCache::shift`).
    shift: isize,
    layers: Vec<LayerTape>,
    /// (T, C) output of the last layer (input of the final norm).
    pub x_final: Vec<f32>,
}

impl ChunkTape {
    fn positions(&self) -> Vec<usize> {
        self.positions.clone()
    }
}

/// Keys (or values) of a context's rows followed by a chunk's own: (P + T, KVH, hd).
fn concat(ctx: &[f32], own: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(ctx.len() + own.len());
    out.extend_from_slice(ctx);
    out.extend_from_slice(own);
    out
}

impl Llama {
    /// Forward over x (T, C) embeddings keeping activations: a whole sequence (`ctx` None, positions 0..T) or
    /// rows that follow `ctx` (a prompt's tape) and attend its keys and values first.
    pub fn forward_chunk(&self, x: Vec<f32>, ctx: Option<&ChunkTape>, adapter: Option<&Adapter>) -> ChunkTape {
        self.forward_chunk_at(x, ctx, None, adapter)
    }

    /// `forward_chunk` with each row's RoPE position and the shift of the rows after it given (a prompt with an
    /// image under multimodal RoPE, `llava::Model::rope_positions`); None: the rows follow `ctx` (its shift kept).
    pub fn forward_chunk_at(
        &self,
        x: Vec<f32>,
        ctx: Option<&ChunkTape>,
        at: Option<(Vec<usize>, isize)>,
        adapter: Option<&Adapter>,
    ) -> ChunkTape {
        let rows = x.len() / self.cfg.hidden_size;
        let start = ctx.map_or(0, |c| c.start + c.rows);
        let (positions, shift) = match at {
            Some((p, s)) if p.len() == rows => (p, s),
            _ => {
                let shift = ctx.map_or(0, |c| c.shift);
                ((start..start + rows).map(|i| (i as isize + shift).max(0) as usize).collect(), shift)
            }
        };
        let mut layers = Vec::with_capacity(self.layers.len());
        let mut x = x;
        for li in 0..self.layers.len() {
            crate::interrupt::beat();
            layers.push(self.layer_forward(li, &mut x, &positions, ctx.map(|c| &c.layers[li]), adapter));
        }
        ChunkTape { rows, start, positions, shift, layers, x_final: x }
    }

    /// Layer `li`'s forward pass over `x` (T, C) at `positions`, in place, returning what its backward needs.
    /// With `ctx` the rows attend the context's keys and values (its tape at this layer) before their own.
    fn layer_forward(
        &self,
        li: usize,
        x: &mut Vec<f32>,
        positions: &[usize],
        ctx: Option<&LayerTape>,
        adapter: Option<&Adapter>,
    ) -> LayerTape {
        let cfg = &self.cfg;
        let layer = &self.layers[li];
        let c = cfg.hidden_size;
        let rows = positions.len();
        let (heads, kvh, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let scale = (hd as f32).powf(-0.5);
        let mut h1 = vec![0f32; rows * c];
        rmsnorm(&mut h1, x, &layer.input_norm, cfg.rms_norm_eps);
        let mut q = layer.q.apply(&h1, rows, adapter);
        let mut k = layer.k.apply(&h1, rows, adapter);
        let v = layer.v.apply(&h1, rows, adapter);
        self.rope.apply(&mut q, heads, positions);
        self.rope.apply(&mut k, kvh, positions);
        let mut att = vec![0f32; rows * heads * hd];
        let mask = Mask::causal(cfg.window(li));
        match ctx {
            None => attend_dense(&mut att, &q, &k, &v, rows, rows, 0, heads, kvh, hd, scale, mask),
            Some(p) => {
                let pr = p.k.len() / (kvh * hd);
                let (kc, vc) = (concat(&p.k, &k), concat(&p.v, &v));
                attend_dense(&mut att, &q, &kc, &vc, rows, pr + rows, pr, heads, kvh, hd, scale, mask);
            }
        }
        let mut x_mid = x.clone();
        layer.o.forward(&mut x_mid, &att, rows, adapter, MatmulMode::Accumulate);
        let mut h2 = vec![0f32; rows * c];
        rmsnorm(&mut h2, &x_mid, &layer.post_norm, cfg.rms_norm_eps);
        let g = layer.gate.apply(&h2, rows, adapter);
        let u = layer.up.apply(&h2, rows, adapter);
        let mut act = g.clone();
        silu_mul(&mut act, &u);
        let mut x_out = x_mid.clone();
        layer.down.forward(&mut x_out, &act, rows, adapter, MatmulMode::Accumulate);
        let (h1, h2, act) = if self.recompute_cheap { (Vec::new(), Vec::new(), Vec::new()) } else { (h1, h2, act) };
        LayerTape { x_in: std::mem::replace(x, x_out), h1, q, k, v, att, x_mid, h2, g, u, act }
    }

    /// Backward of a whole-sequence `forward_chunk`: given d x_final (T, C), returns d embeddings (T, C); LoRA
    /// gradients accumulate into `grads`.
    pub fn backward(
        &self,
        tape: &ChunkTape,
        d_final: Vec<f32>,
        adapter: Option<&Adapter>,
        mut grads: Option<&mut Grads>,
    ) -> Vec<f32> {
        let positions = tape.positions();
        let mut dx = d_final; // (T, C): gradient w.r.t. the current layer's output, then its input
        for li in (0..self.layers.len()).rev() {
            crate::interrupt::beat();
            self.layer_backward(li, &tape.layers[li], &mut dx, &positions, None, None, adapter, grads.as_deref_mut());
        }
        dx
    }

    /// Backward of a prompt's `forward_chunk` and of the answers that attended it, layer by layer from the top:
    /// each answer's layer first (its gradients of the prompt's keys and values summed), then the prompt's.
    /// `d_prompt` and each answer's d x_final come in; returns the d embeddings of the prompt and of each answer.
    pub fn backward_shared(
        &self,
        prompt: &ChunkTape,
        d_prompt: Vec<f32>,
        answers: Vec<(&ChunkTape, Vec<f32>)>,
        adapter: Option<&Adapter>,
        mut grads: Option<&mut Grads>,
    ) -> (Vec<f32>, Vec<Vec<f32>>) {
        let cfg = &self.cfg;
        let kv = prompt.rows * cfg.num_key_value_heads * cfg.head_dim;
        let p_pos = prompt.positions();
        let a_pos: Vec<Vec<usize>> = answers.iter().map(|(t, _)| t.positions()).collect();
        let (tapes, mut dxs): (Vec<&ChunkTape>, Vec<Vec<f32>>) = answers.into_iter().unzip();
        let mut dp = d_prompt;
        for li in (0..self.layers.len()).rev() {
            crate::interrupt::beat();
            let (mut dk, mut dv) = (vec![0f32; kv], vec![0f32; kv]);
            for ((t, dx), pos) in tapes.iter().zip(dxs.iter_mut()).zip(&a_pos) {
                let ctx = Some((&prompt.layers[li], dk.as_mut_slice(), dv.as_mut_slice()));
                self.layer_backward(li, &t.layers[li], dx, pos, ctx, None, adapter, grads.as_deref_mut());
            }
            let extra = Some((dk.as_slice(), dv.as_slice()));
            self.layer_backward(li, &prompt.layers[li], &mut dp, &p_pos, None, extra, adapter, grads.as_deref_mut());
        }
        (dp, dxs)
    }

    /// Layer `li`'s backward pass for rows at `positions`: from `dx` (the gradient of the layer's output) to the
    /// gradient of its input, in place; LoRA and norm gradients accumulate into `grads`. With `ctx` the rows
    /// attended a context's keys and values first, and the gradients of those are added into its (dk, dv).
    /// `extra` (dk, dv) is added to this layer's own key and value gradients (a prompt's share from the answers
    /// that attended it).
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        li: usize,
        t: &LayerTape,
        dx: &mut Vec<f32>,
        positions: &[usize],
        ctx: Option<(&LayerTape, &mut [f32], &mut [f32])>,
        extra: Option<(&[f32], &[f32])>,
        adapter: Option<&Adapter>,
        mut grads: Option<&mut Grads>,
    ) {
        let cfg = &self.cfg;
        let layer = &self.layers[li];
        let c = cfg.hidden_size;
        let rows = positions.len();
        let (heads, kvh, hd, isz) =
            (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size);
        let scale = (hd as f32).powf(-0.5);
        // Recompute what the tape dropped (see `recompute_cheap`).
        let (h1, h2, act) = if t.h1.is_empty() {
            let mut h1 = vec![0f32; rows * c];
            rmsnorm(&mut h1, &t.x_in, &layer.input_norm, cfg.rms_norm_eps);
            let mut h2 = vec![0f32; rows * c];
            rmsnorm(&mut h2, &t.x_mid, &layer.post_norm, cfg.rms_norm_eps);
            let mut act = t.g.clone();
            silu_mul(&mut act, &t.u);
            (Cow::Owned(h1), Cow::Owned(h2), Cow::Owned(act))
        } else {
            (Cow::Borrowed(&t.h1), Cow::Borrowed(&t.h2), Cow::Borrowed(&t.act))
        };
        // x_out = x_mid + down(act)
        let mut da = vec![0f32; rows * isz];
        layer.down.backward(&mut da, dx, &act, rows, adapter, grads.as_deref_mut(), MatmulMode::Assign);
        let mut dg = vec![0f32; rows * isz];
        let mut du = vec![0f32; rows * isz];
        silu_mul_bwd(&mut dg, &mut du, &da, &t.g, &t.u);
        let mut dh2 = vec![0f32; rows * c];
        layer.gate.backward(&mut dh2, &dg, &h2, rows, adapter, grads.as_deref_mut(), MatmulMode::Assign);
        layer.up.backward(&mut dh2, &du, &h2, rows, adapter, grads.as_deref_mut(), MatmulMode::Accumulate);
        let mut dx_mid = vec![0f32; rows * c];
        let dw = grads
            .as_deref_mut()
            .and_then(|g| g.param_mut(&format!("language_model.layers.{li}.post_attention_layernorm.weight")));
        rmsnorm_bwd(&mut dx_mid, dw.map(|v| v.as_mut_slice()), &dh2, &t.x_mid, &layer.post_norm, cfg.rms_norm_eps);
        add_inplace(&mut dx_mid, dx); // residual
                                      // x_mid = x_in + o(att)
        let mut datt = vec![0f32; rows * heads * hd];
        layer.o.backward(&mut datt, &dx_mid, &t.att, rows, adapter, grads.as_deref_mut(), MatmulMode::Assign);
        let mut dq = vec![0f32; rows * heads * hd];
        let kv = rows * kvh * hd;
        let mask = Mask::causal(cfg.window(li));
        let (mut dk, mut dv) = match ctx {
            None => {
                let (mut dk, mut dv) = (vec![0f32; kv], vec![0f32; kv]);
                attend_dense_bwd(
                    &mut dq, &mut dk, &mut dv, &datt, &t.q, &t.k, &t.v, rows, rows, 0, heads, kvh, hd, scale, mask,
                );
                (dk, dv)
            }
            Some((p, dk_ctx, dv_ctx)) => {
                let pr = p.k.len() / (kvh * hd);
                let (kc, vc) = (concat(&p.k, &t.k), concat(&p.v, &t.v));
                let (mut dkc, mut dvc) = (vec![0f32; kc.len()], vec![0f32; vc.len()]);
                attend_dense_bwd(
                    &mut dq,
                    &mut dkc,
                    &mut dvc,
                    &datt,
                    &t.q,
                    &kc,
                    &vc,
                    rows,
                    pr + rows,
                    pr,
                    heads,
                    kvh,
                    hd,
                    scale,
                    mask,
                );
                let split = pr * kvh * hd;
                add_inplace(dk_ctx, &dkc[..split]);
                add_inplace(dv_ctx, &dvc[..split]);
                (dkc.split_off(split), dvc.split_off(split))
            }
        };
        if let Some((ek, ev)) = extra {
            add_inplace(&mut dk, ek);
            add_inplace(&mut dv, ev);
        }
        self.rope.apply_backward(&mut dq, heads, positions);
        self.rope.apply_backward(&mut dk, kvh, positions);
        let mut dh1 = vec![0f32; rows * c];
        layer.q.backward(&mut dh1, &dq, &h1, rows, adapter, grads.as_deref_mut(), MatmulMode::Assign);
        layer.k.backward(&mut dh1, &dk, &h1, rows, adapter, grads.as_deref_mut(), MatmulMode::Accumulate);
        layer.v.backward(&mut dh1, &dv, &h1, rows, adapter, grads.as_deref_mut(), MatmulMode::Accumulate);
        let mut dx_in = vec![0f32; rows * c];
        let dw = grads.and_then(|g| g.param_mut(&format!("language_model.layers.{li}.input_layernorm.weight")));
        rmsnorm_bwd(&mut dx_in, dw.map(|v| v.as_mut_slice()), &dh1, &t.x_in, &layer.input_norm, cfg.rms_norm_eps);
        add_inplace(&mut dx_in, &dx_mid);
        *dx = dx_in;
    }

    /// Final norm + lm_head on hidden rows `sel` (R, C) (the rows that predict the answer); returns the logits
    /// (R, V).
    pub fn head_forward(&self, sel: &[f32], adapter: Option<&Adapter>) -> Vec<f32> {
        let rows = sel.len() / self.cfg.hidden_size;
        let mut normed = vec![0f32; sel.len()];
        rmsnorm(&mut normed, sel, &self.norm, self.cfg.rms_norm_eps);
        self.lm_head.apply(&normed, rows, adapter)
    }

    /// Backward of `head_forward`: d logits (R, V) -> d sel (R, C).
    pub fn head_backward(
        &self,
        sel: &[f32],
        dlogits: &[f32],
        adapter: Option<&Adapter>,
        mut grads: Option<&mut Grads>,
    ) -> Vec<f32> {
        let c = self.cfg.hidden_size;
        let r = sel.len() / c;
        let mut normed = vec![0f32; sel.len()];
        rmsnorm(&mut normed, sel, &self.norm, self.cfg.rms_norm_eps);
        let mut dn = vec![0f32; r * c];
        self.lm_head.backward(&mut dn, dlogits, &normed, r, adapter, grads.as_deref_mut(), MatmulMode::Assign);
        let mut dsel = vec![0f32; r * c];
        let dw = grads.and_then(|g| g.param_mut("language_model.norm.weight"));
        rmsnorm_bwd(&mut dsel, dw.map(|v| v.as_mut_slice()), &dn, sel, &self.norm, self.cfg.rms_norm_eps);
        dsel
    }
}
impl Llama {
    fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(|l| [&mut l.q, &mut l.k, &mut l.v, &mut l.o, &mut l.gate, &mut l.up, &mut l.down])
            .chain(std::iter::once(&mut self.lm_head))
    }

    fn norm_mut(&mut self, name: &str) -> Option<&mut Vec<f32>> {
        if name == "language_model.norm.weight" {
            return Some(&mut self.norm);
        }
        let rest = name.strip_prefix("language_model.layers.")?;
        let (i, what) = rest.split_once('.')?;
        let layer = self.layers.get_mut(i.parse::<usize>().ok()?)?;
        match what {
            "input_layernorm.weight" => Some(&mut layer.input_norm),
            "post_attention_layernorm.weight" => Some(&mut layer.post_norm),
            _ => None,
        }
    }

    /// Every parameter of the decoder by canonical name (`language_model.…`, `lm_head.weight`) and shape.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let cfg = &self.cfg;
        let (c, v) = (cfg.hidden_size, cfg.vocab_size);
        let mut out = vec![("language_model.embed_tokens.weight".to_string(), vec![v, c])];
        for (i, l) in self.layers.iter().enumerate() {
            out.push((format!("language_model.layers.{i}.input_layernorm.weight"), vec![c]));
            out.push((format!("language_model.layers.{i}.post_attention_layernorm.weight"), vec![c]));
            for lin in [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down] {
                out.push((format!("{}.weight", lin.name), vec![lin.out_features, lin.in_features]));
                if let Some(b) = &lin.bias {
                    out.push((format!("{}.bias", lin.name), vec![b.len()]));
                }
            }
        }
        out.push(("language_model.norm.weight".to_string(), vec![c]));
        if self.lm_head.param == "lm_head" {
            out.push(("lm_head.weight".to_string(), vec![v, c]));
        }
        out
    }

    /// A parameter's current values (f32), by canonical name.
    pub fn get_param(&self, name: &str) -> Option<Vec<f32>> {
        if name == "language_model.embed_tokens.weight" {
            return Some(self.embed.unpack_f32());
        }
        if let Some(v) = self.linears().find_map(|lin| lin.get_param(name)) {
            return Some(v);
        }
        // Norms: borrow-free lookup through a clone of the matching buffer.
        let c = self.cfg.hidden_size;
        if name == "language_model.norm.weight" {
            return Some(self.norm.clone());
        }
        let rest = name.strip_prefix("language_model.layers.")?;
        let (i, what) = rest.split_once('.')?;
        let layer = self.layers.get(i.parse::<usize>().ok()?)?;
        let v = match what {
            "input_layernorm.weight" => &layer.input_norm,
            "post_attention_layernorm.weight" => &layer.post_norm,
            _ => return None,
        };
        debug_assert_eq!(v.len(), c);
        Some(v.clone())
    }

    /// Overwrites a parameter (full fine-tuning). Returns false for an unknown name.
    pub fn set_param(&mut self, name: &str, values: &[f32]) -> bool {
        if name == "language_model.embed_tokens.weight" {
            self.embed = Arc::new(PackedMatrix::from_f32(values, self.cfg.vocab_size, self.cfg.hidden_size));
            if self.lm_head.param != "lm_head" {
                // Tied: the head is the embedding table.
                self.lm_head.weight = self.embed.clone();
                self.lm_head.transposed = Default::default();
            }
            return true;
        }
        if let Some(v) = self.norm_mut(name) {
            v.copy_from_slice(values);
            return true;
        }
        self.linears_mut().any(|lin| lin.set_param(name, values))
    }
}
