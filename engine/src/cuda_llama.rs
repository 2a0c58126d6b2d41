//! The LLaMA decoder on the GPU (CUDA, first part): weights uploaded once as fp16 (q/k/v and gate/up fused into
//! one matrix each, so a layer is four GEMMs), a KV cache on the device, every op one of `kernels/*.cu` or a GEMM
//! (the hand-written GEMV for one row, cuBLASLt otherwise), fp32 accumulation throughout. Text tokens
//! or decoder input rows made on the host (`Input::Embeds`: a LLaVA prompt's text embeddings with its image
//! features spliced in), optionally with a LoRA adapter applied unmerged (`GpuLora::for_inference`: two
//! small GEMMs beside each projection). No attention/MLP biases.
//!
//! Decoding n answers to one prompt ([`DecodeSession`]): the prompt is prefilled once into a shared prefix cache;
//! the n sequences then step together, each with its own suffix cache, against that prefix. Every buffer of a step
//! is allocated once per session and the per-step values (token ids, positions, suffix lengths) live in device
//! memory, so the first step is captured as a CUDA graph and replayed for every later step: one launch per token
//! instead of ~350. Where they apply the step uses fused kernels (`Gpu::fuse`, on by default): RoPE with the cache
//! store, and at batch 1 SwiGLU as the gate/up GEMV's epilogue. A decoder of
//! LLaVA's size measures at load which GEMV split (or cuBLASLt) is fastest for each batch-1 projection on this
//! device (`GpuLlama::tune_decode`). `engine/tests/cuda_llama.rs` checks all of it against the CPU backend, and the
//! fused path against the unfused one.

use crate::config::LlamaConfig;
use crate::cuda::{derr, err, Gpu};
use crate::cuda_lora::GpuLora;
use crate::error::Result;
use crate::generate::{Answer, FinishReason, GenerateStats};
use crate::ops::Rope;
use crate::weights::WeightStore;
use cudarc::driver::{CudaGraph, CudaSlice};
use half::f16;

pub(crate) struct Layer {
    pub(crate) input_norm: CudaSlice<f16>,
    /// [(heads + 2 kv_heads) head_dim, hidden]: the q rows, then k, then v.
    pub(crate) qkv: CudaSlice<f16>,
    pub(crate) o: CudaSlice<f16>,
    pub(crate) post_norm: CudaSlice<f16>,
    /// [2 intermediate, hidden]: the gate rows, then up.
    pub(crate) gate_up: CudaSlice<f16>,
    pub(crate) down: CudaSlice<f16>,
}

pub struct GpuLlama {
    pub cfg: LlamaConfig,
    pub(crate) embed: CudaSlice<f16>,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: CudaSlice<f16>,
    /// None: tied to `embed`.
    pub(crate) lm_head: Option<CudaSlice<f16>>,
    pub(crate) cos: CudaSlice<f32>,
    pub(crate) sin: CudaSlice<f32>,
    pub max_positions: usize,
    /// What `tune_decode` measured when the model loaded (empty for decoders narrower than `TUNE_MIN_HIDDEN`).
    pub gemv_tuning: Vec<String>,
    /// Batch-1 steps without LoRA on gate/up: SwiGLU as the gate/up GEMV's epilogue with this many warps per row
    /// (`gemv_swiglu_m1_f16`), or None for the projection then `swiglu_f16` (what `tune_decode` measured faster).
    pub(crate) swiglu_split: Option<usize>,
    /// Batch-1 steps without LoRA on the o and down projections: each projection with the residual add and RMSNorm
    /// after it in the same launch (`gemv_add_rmsnorm_m1_f16`) with this many warps per row, or None for the
    /// projection then `add_rmsnorm_f16` (what `tune_decode` measured faster). [o, down].
    pub(crate) norm_split: [Option<usize>; 2],
    /// Batch-1 steps without LoRA on q/k/v: the q/k/v projection with RoPE and the cache store as its epilogue
    /// (`gemv_qkv_rope_m1_f16`) with this many warps per feature, or None for the projection then
    /// `rope_kv_store_f16` (what `tune_decode` measured faster).
    pub(crate) qkv_split: Option<usize>,
    /// Whether a batch-1 step's attention prefetches the o projection's weights into L2 (with the fused kernels
    /// on): only where `tune_decode` measured attention + o projection faster with it. Off by default: on an H200
    /// at LLaVA-1.5-7B's shape it was slower (26.0 against 24.7 us, BENCHMARKS.md).
    pub(crate) prefetch_o: bool,
}

/// Decoders at least this wide measure their batch-1 projections at load (`GpuLlama::tune_decode`); narrower ones
/// (the test fixtures, ShapesWorld) take `gemv_m1_f16` with a warp per output feature.
pub const TUNE_MIN_HIDDEN: usize = 1024;

/// Keys and values of every layer for up to `capacity` positions, on the device.
pub struct GpuKvCache {
    k: Vec<CudaSlice<f16>>,
    v: Vec<CudaSlice<f16>>,
    pub len: usize,
    pub capacity: usize,
}

/// Every buffer one forward pass over `rows` rows needs, allocated once (a captured graph refers to them).
pub(crate) struct Scratch {
    pub(crate) rows: usize,
    pub(crate) x: CudaSlice<f16>,
    pub(crate) h: CudaSlice<f16>,
    pub(crate) qkv: CudaSlice<f16>,
    pub(crate) att: CudaSlice<f16>,
    pub(crate) tmp: CudaSlice<f16>,
    pub(crate) gu: CudaSlice<f16>,
    pub(crate) act: CudaSlice<f16>,
    pub(crate) logits: CudaSlice<f16>,
    pub(crate) ids: CudaSlice<i32>,
    pub(crate) pos: CudaSlice<i32>,
    pub(crate) flag: CudaSlice<i32>,
    pub(crate) part: CudaSlice<f32>,
    /// x A^T of the LoRA module being applied (rows, r).
    pub(crate) lt: CudaSlice<f16>,
}

/// What a forward pass starts from.
#[derive(Clone, Copy)]
pub enum Input<'a> {
    /// Token ids, looked up in the embedding table on the device.
    Ids(&'a [u32]),
    /// Decoder input rows (rows, hidden) made on the host: a LLaVA prompt's text embeddings with the image
    /// features in place of the image token (`llava::Model::embed_inputs`).
    Embeds(&'a [f32]),
}

/// How a forward pass attends.
enum Attend<'a> {
    /// `rows` new tokens of one sequence appended to `cache` at position `start`.
    Prefill { cache: &'a mut GpuKvCache, start: usize },
    /// One new token for each of `rows` sequences: the shared `prefix` plus each sequence's suffix.
    Decode { prefix: &'a GpuKvCache, suffix: &'a mut GpuSuffixCache },
}

/// The n answers of one prompt decoding together: each sequence's own keys and values after the shared prefix,
/// `capacity` positions per sequence, and their current lengths (on the device: `lens`).
pub struct GpuSuffixCache {
    k: Vec<CudaSlice<f16>>,
    v: Vec<CudaSlice<f16>>,
    lens: CudaSlice<i32>,
    pub bsz: usize,
    pub len: usize,
    pub capacity: usize,
}

/// n sequences decoding together after one shared prefill (see the module documentation).
pub struct DecodeSession {
    prefix: GpuKvCache,
    suffix: GpuSuffixCache,
    scratch: Scratch,
    graph: Option<CudaGraph>,
    /// The greedy step (`decode_step_greedy`: the logits step plus the device's argmax), captured on its first use.
    greedy_graph: Option<CudaGraph>,
    /// Whether the device's ids, positions and lengths already hold the next step's inputs: the last step was a
    /// greedy one, which leaves its picks there.
    device_fed: bool,
    /// Capture the first step as a CUDA graph and replay it (default); false launches every kernel each step.
    pub use_graph: bool,
    /// Why graph replay was turned off, if capture failed.
    pub graph_error: Option<String>,
    /// The adapter the session decodes with (its address; 0: none): a captured graph holds its buffers.
    lora_key: usize,
}

fn lora_key(lora: Option<&GpuLora>) -> usize {
    lora.map_or(0, |l| l as *const GpuLora as usize)
}

impl DecodeSession {
    pub fn bsz(&self) -> usize {
        self.suffix.bsz
    }

    /// Tokens decoded per sequence so far.
    pub fn len(&self) -> usize {
        self.suffix.len
    }

    pub fn is_empty(&self) -> bool {
        self.suffix.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.suffix.capacity
    }
}

impl GpuLlama {
    /// Uploads the decoder of `ws` (keys under `prefix`, lm_head at `lm_head_key`, or tied when None) as fp16.
    pub fn load(
        gpu: &Gpu,
        ws: &WeightStore,
        prefix: &str,
        lm_head_key: Option<&str>,
        cfg: &LlamaConfig,
        max_positions: usize,
    ) -> Result<GpuLlama> {
        if cfg.attention_bias || cfg.mlp_bias {
            return Err(err("the CUDA decoder does not support attention or MLP biases yet"));
        }
        check_shape(cfg)?;
        let c = cfg.hidden_size;
        let (h, kvh, hd, i) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size);
        let up = |key: String, shape: &[usize]| -> Result<CudaSlice<f16>> { gpu.upload_f16(&ws.f32(&key, shape)?) };
        let cat = |keys: &[(String, usize)]| -> Result<CudaSlice<f16>> {
            let mut all = Vec::new();
            for (key, rows) in keys {
                all.extend(ws.f32(key, &[*rows, c])?);
            }
            gpu.upload_f16(&all)
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let kp = format!("{prefix}layers.{l}.");
            layers.push(Layer {
                input_norm: up(format!("{kp}input_layernorm.weight"), &[c])?,
                qkv: cat(&[
                    (format!("{kp}self_attn.q_proj.weight"), h * hd),
                    (format!("{kp}self_attn.k_proj.weight"), kvh * hd),
                    (format!("{kp}self_attn.v_proj.weight"), kvh * hd),
                ])?,
                o: up(format!("{kp}self_attn.o_proj.weight"), &[c, h * hd])?,
                post_norm: up(format!("{kp}post_attention_layernorm.weight"), &[c])?,
                gate_up: cat(&[(format!("{kp}mlp.gate_proj.weight"), i), (format!("{kp}mlp.up_proj.weight"), i)])?,
                down: up(format!("{kp}mlp.down_proj.weight"), &[c, i])?,
            });
        }
        let embed = up(format!("{prefix}embed_tokens.weight"), &[cfg.vocab_size, c])?;
        let lm_head = match lm_head_key {
            Some(k) => Some(up(format!("{k}.weight"), &[cfg.vocab_size, c])?),
            None => None,
        };
        let norm = up(format!("{prefix}norm.weight"), &[c])?;
        Self::assemble(gpu, cfg, embed, layers, norm, lm_head, max_positions)
    }

    fn assemble(
        gpu: &Gpu,
        cfg: &LlamaConfig,
        embed: CudaSlice<f16>,
        layers: Vec<Layer>,
        norm: CudaSlice<f16>,
        lm_head: Option<CudaSlice<f16>>,
        max_positions: usize,
    ) -> Result<GpuLlama> {
        let (cos, sin) = Rope::new(cfg.head_dim, cfg.rope_theta, &cfg.rope_scaling).tables(max_positions);
        let mut model = GpuLlama {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            cos: gpu.stream.clone_htod(&cos).map_err(derr)?,
            sin: gpu.stream.clone_htod(&sin).map_err(derr)?,
            max_positions,
            gemv_tuning: Vec::new(),
            swiglu_split: Some(1),
            norm_split: [Some(1); 2],
            qkv_split: Some(1),
            prefetch_o: false,
        };
        if cfg.hidden_size >= TUNE_MIN_HIDDEN {
            model.gemv_tuning = model.tune_decode(gpu)?;
        }
        Ok(model)
    }

    /// Measures how each batch-1 decode projection (q/k/v, o, gate/up, down, the head) runs fastest on this device
    /// (`Gpu::tune_gemv`, over every layer's matrix), then whether gate/up with SwiGLU as its epilogue beats the
    /// projection so chosen followed by `swiglu_f16`, whether q/k/v with RoPE and the cache store in the same
    /// launch beats the projection followed by `rope_kv_store_f16`, and whether the o and down projections with the
    /// residual add and RMSNorm in the same launch beat the projection followed by `add_rmsnorm_f16`; keeps all
    /// for the decode steps: tens of milliseconds once, before any decode step is captured as a graph.
    pub fn tune_decode(&mut self, gpu: &Gpu) -> Result<Vec<String>> {
        let cfg = &self.cfg;
        let (c, h, kvh, hd, inter) =
            (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size);
        let all = |f: fn(&Layer) -> &CudaSlice<f16>| self.layers.iter().map(f).collect::<Vec<_>>();
        let mut lines = gpu.tune_gemv(&[
            (c, (h + 2 * kvh) * hd, all(|l| &l.qkv)),
            (h * hd, c, all(|l| &l.o)),
            (c, 2 * inter, all(|l| &l.gate_up)),
            (inter, c, all(|l| &l.down)),
            (c, cfg.vocab_size, vec![self.head()]),
        ])?;
        if !c.is_multiple_of(8) {
            self.swiglu_split = None;
            self.norm_split = [None; 2];
            self.qkv_split = None;
            return Ok(lines);
        }
        let x = gpu.stream.alloc_zeros::<f16>(c).map_err(derr)?;
        let mut gu = gpu.stream.alloc_zeros::<f16>(2 * inter).map_err(derr)?;
        let mut act = gpu.stream.alloc_zeros::<f16>(inter).map_err(derr)?;
        let (layers, n) = (&self.layers, self.layers.len());
        let (best, line) = pick_fused(gpu, n, "gate/up + SwiGLU", "epilogue", &mut |split, i| match split {
            Some(split) => gpu.gemv_swiglu_dev(&x, &layers[i].gate_up, &mut act, c, inter, split),
            None => {
                gpu.matmul_dev(&x, &layers[i].gate_up, &mut gu, 1, c, 2 * inter)?;
                gpu.swiglu_fused_dev(&mut act, &gu, 1, inter)
            }
        })?;
        self.swiglu_split = best;
        lines.push(line);
        // The q/k/v projection with RoPE and the cache store: the projection as tuned above followed by
        // `rope_kv_store_f16`, against both in one launch.
        let nqkv = (h + 2 * kvh) * hd;
        let mut qkv = gpu.stream.alloc_zeros::<f16>(nqkv).map_err(derr)?;
        let (mut kc, mut vc) = (
            gpu.stream.alloc_zeros::<f16>(kvh * hd).map_err(derr)?,
            gpu.stream.alloc_zeros::<f16>(kvh * hd).map_err(derr)?,
        );
        let pos = gpu.stream.alloc_zeros::<i32>(1).map_err(derr)?;
        let (cos, sin) = (&self.cos, &self.sin);
        let (best, line) =
            pick_fused(gpu, n, "q/k/v + RoPE + cache store", "one launch", &mut |split, i| match split {
                Some(split) => gpu.gemv_qkv_rope_dev(
                    &mut qkv,
                    &mut kc,
                    &mut vc,
                    &x,
                    &layers[i].qkv,
                    c,
                    h,
                    kvh,
                    hd,
                    split,
                    &pos,
                    cos,
                    sin,
                    0,
                    None,
                    0,
                ),
                None => {
                    gpu.matmul_dev(&x, &layers[i].qkv, &mut qkv, 1, c, nqkv)?;
                    gpu.rope_kv_store_dev(&mut qkv, &mut kc, &mut vc, &pos, cos, sin, 1, h, kvh, hd, nqkv, 0, None, 0)
                }
            })?;
        self.qkv_split = best;
        lines.push(line);
        // The o and down projections with the residual add + RMSNorm after them: the projection as tuned above
        // followed by `add_rmsnorm_f16`, against both in one launch.
        let eps = self.cfg.rms_norm_eps as f32;
        let (mut out, mut res, mut t) = (
            gpu.stream.alloc_zeros::<f16>(c).map_err(derr)?,
            gpu.stream.alloc_zeros::<f16>(c).map_err(derr)?,
            gpu.stream.alloc_zeros::<f16>(c).map_err(derr)?,
        );
        for (which, name, k) in [(0usize, "o + add + RMSNorm", h * hd), (1, "down + add + RMSNorm", inter)] {
            let input = gpu.stream.alloc_zeros::<f16>(k).map_err(derr)?;
            let w = |i: usize| if which == 0 { &layers[i].o } else { &layers[i].down };
            let (best, line) = pick_fused(gpu, n, name, "one launch", &mut |split, i| {
                proj_add_rmsnorm_m1(
                    gpu,
                    &mut out,
                    &mut res,
                    &mut t,
                    &layers[i].post_norm,
                    &input,
                    w(i),
                    k,
                    c,
                    split,
                    eps,
                )
            })?;
            self.norm_split[which] = best;
            lines.push(line);
        }
        // The o projection's weights prefetched into L2 by the attention before it (whose blocks wait on chains of
        // loads, leaving memory bandwidth unused): attention over 512 keys, then the o projection as tuned above,
        // with and without.
        let keys = 512;
        let (kc, vc) = (
            gpu.stream.alloc_zeros::<f16>(keys * kvh * hd).map_err(derr)?,
            gpu.stream.alloc_zeros::<f16>(keys * kvh * hd).map_err(derr)?,
        );
        let lens = gpu.stream.alloc_zeros::<i32>(1).map_err(derr)?;
        let mut part = gpu.stream.alloc_zeros::<f32>(gpu.decode_part_len(keys, 1, h, hd)).map_err(derr)?;
        let mut att = gpu.stream.alloc_zeros::<f16>(h * hd).map_err(derr)?;
        let o_split = self.norm_split[0];
        let mut pair = |prefetch: bool, i: usize| -> Result<()> {
            let l = &layers[i];
            gpu.attention_decode_dev(
                &mut att,
                &qkv,
                nqkv,
                &kc,
                &vc,
                keys,
                &kc,
                &vc,
                &lens,
                0,
                1,
                keys,
                h,
                kvh,
                hd,
                &mut part,
                prefetch.then_some(&l.o),
            )?;
            proj_add_rmsnorm_m1(gpu, &mut out, &mut res, &mut t, &l.post_norm, &att, &l.o, h * hd, c, o_split, eps)
        };
        let without = gpu.time_passes(n, &mut |i| pair(false, i))?;
        let with = gpu.time_passes(n, &mut |i| pair(true, i))?;
        self.prefetch_o = with < without;
        lines.push(format!(
            "attention {keys} keys + o projection: {without:.1} us, prefetching o {with:.1} us -> {}",
            if self.prefetch_o { "prefetch" } else { "no prefetch" }
        ));
        Ok(lines)
    }

    /// A decoder of `cfg`'s shape with random weights generated on the device (benchmarks): matrices uniform with
    /// standard deviation 0.02, norm weights 1.
    pub fn random(gpu: &Gpu, cfg: &LlamaConfig, max_positions: usize, seed: u64) -> Result<GpuLlama> {
        check_shape(cfg)?;
        let c = cfg.hidden_size;
        let (h, kvh, hd, i) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size);
        let mut n = 0u64;
        let mut fill = |len: usize, scale: f32, offset: f32| -> Result<CudaSlice<f16>> {
            n += 1;
            gpu.fill_uniform(len, scale, offset, seed.wrapping_mul(0x9e37_79b9).wrapping_add(n))
        };
        let w = 0.02f32 * 3f32.sqrt();
        let mut layers = Vec::new();
        for _ in 0..cfg.num_hidden_layers {
            layers.push(Layer {
                input_norm: fill(c, 0.0, 1.0)?,
                qkv: fill((h + 2 * kvh) * hd * c, w, 0.0)?,
                o: fill(c * h * hd, w, 0.0)?,
                post_norm: fill(c, 0.0, 1.0)?,
                gate_up: fill(2 * i * c, w, 0.0)?,
                down: fill(c * i, w, 0.0)?,
            });
        }
        let embed = fill(cfg.vocab_size * c, w, 0.0)?;
        let lm_head = Some(fill(cfg.vocab_size * c, w, 0.0)?);
        let norm = fill(c, 0.0, 1.0)?;
        Self::assemble(gpu, cfg, embed, layers, norm, lm_head, max_positions)
    }

    /// Bytes of weights one decode step reads (every matrix once, the embedding row aside).
    pub fn weight_bytes(&self) -> u64 {
        let c = &self.cfg;
        let per_layer = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim * c.hidden_size
            + c.num_attention_heads * c.head_dim * c.hidden_size
            + 3 * c.intermediate_size * c.hidden_size
            + 2 * c.hidden_size;
        2 * (per_layer * c.num_hidden_layers + c.vocab_size * c.hidden_size + c.hidden_size) as u64
    }

    pub fn new_cache(&self, gpu: &Gpu, capacity: usize) -> Result<GpuKvCache> {
        let w = self.cfg.num_key_value_heads * self.cfg.head_dim;
        let mut k = Vec::new();
        let mut v = Vec::new();
        for _ in 0..self.cfg.num_hidden_layers {
            k.push(gpu.stream.alloc_zeros::<f16>(capacity.max(1) * w).map_err(derr)?);
            v.push(gpu.stream.alloc_zeros::<f16>(capacity.max(1) * w).map_err(derr)?);
        }
        Ok(GpuKvCache { k, v, len: 0, capacity })
    }

    fn new_suffix_cache(&self, gpu: &Gpu, bsz: usize, capacity: usize) -> Result<GpuSuffixCache> {
        let w = self.cfg.num_key_value_heads * self.cfg.head_dim;
        let mut k = Vec::new();
        let mut v = Vec::new();
        for _ in 0..self.cfg.num_hidden_layers {
            k.push(gpu.stream.alloc_zeros::<f16>(bsz * capacity.max(1) * w).map_err(derr)?);
            v.push(gpu.stream.alloc_zeros::<f16>(bsz * capacity.max(1) * w).map_err(derr)?);
        }
        Ok(GpuSuffixCache { k, v, lens: gpu.stream.alloc_zeros::<i32>(bsz).map_err(derr)?, bsz, len: 0, capacity })
    }

    pub(crate) fn scratch(
        &self,
        gpu: &Gpu,
        rows: usize,
        logit_rows: usize,
        part_len: usize,
        lora_r: usize,
    ) -> Result<Scratch> {
        let cfg = &self.cfg;
        let (c, h, kvh, hd, i) =
            (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size);
        let s = &gpu.stream;
        let a = |n: usize| s.alloc_zeros::<f16>(n.max(1)).map_err(derr);
        Ok(Scratch {
            rows,
            x: a(rows * c)?,
            h: a(rows * c)?,
            qkv: a(rows * (h + 2 * kvh) * hd)?,
            att: a(rows * h * hd)?,
            tmp: a(rows * c)?,
            gu: a(rows * 2 * i)?,
            act: a(rows * i)?,
            logits: a(logit_rows * cfg.vocab_size)?,
            ids: s.alloc_zeros::<i32>(rows.max(1)).map_err(derr)?,
            pos: s.alloc_zeros::<i32>(rows.max(1)).map_err(derr)?,
            flag: s.alloc_zeros::<i32>(1).map_err(derr)?,
            part: s.alloc_zeros::<f32>(part_len.max(1)).map_err(derr)?,
            lt: a(rows * lora_r)?,
        })
    }

    fn check_ids(&self, ids: &[u32]) -> Result<Vec<i32>> {
        let vocab = self.cfg.vocab_size;
        ids.iter()
            .enumerate()
            .map(|(at, &t)| {
                if (t as usize) < vocab {
                    Ok(t as i32)
                } else {
                    Err(err(format!("token id {t} at position {at} is outside the vocabulary of {vocab}")))
                }
            })
            .collect()
    }

    /// Enqueues one forward pass over `s.rows` rows whose ids (or, when `gather` is false, input rows: `s.x`) and
    /// positions are already in `s.ids`/`s.pos`; leaves the final-norm output in `s.h`. Launches only: no
    /// allocation, copy or synchronisation (graph-capturable).
    fn enqueue_layers(
        &self,
        gpu: &Gpu,
        s: &mut Scratch,
        mode: &mut Attend,
        gather: bool,
        lora: Option<&GpuLora>,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let rows = s.rows;
        let (c, h, kvh, hd, inter) =
            (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size);
        let (w, nqkv) = (kvh * hd, (h + 2 * kvh) * hd);
        let eps = cfg.rms_norm_eps as f32;
        if gather {
            gpu.embedding_ids_dev(&mut s.x, &self.embed, c, &s.ids, rows, &mut s.flag)?;
        }
        // The first layer's input norm (no layers: the final norm); every later norm comes with the residual add
        // after a projection.
        gpu.rmsnorm_dev(&mut s.h, &s.x, self.layers.first().map_or(&self.norm, |l| &l.input_norm), rows, eps)?;
        // At batch 1 without LoRA on it, a projection followed by the residual add and a norm is one launch (unless
        // `tune_decode` found the pair faster).
        let fuse = gpu.fuse.load(std::sync::atomic::Ordering::Relaxed);
        let gemv = gpu.gemv.load(std::sync::atomic::Ordering::Relaxed);
        let norm_split = |which: usize, k: usize| {
            if fuse && gemv && rows == 1 && lora.is_none() && k.is_multiple_of(8) {
                self.norm_split[which]
            } else {
                None
            }
        };
        let qkv_split =
            if fuse && gemv && rows == 1 && lora.is_none() && c.is_multiple_of(8) { self.qkv_split } else { None };
        let prefetch_o = fuse && rows == 1 && self.prefetch_o;
        for (li, l) in self.layers.iter().enumerate() {
            // The q/k/v projection, RoPE on q and k, and k and v into this layer's cache: the prefill cache at
            // `start`, or each decoding sequence's suffix cache at its length. At batch 1 without LoRA on q/k/v,
            // one launch (unless `tune_decode` found the pair faster).
            let (kc, vc, seq_stride, lens, start) = match mode {
                Attend::Prefill { cache, start } => (&mut cache.k[li], &mut cache.v[li], 0, None, *start),
                Attend::Decode { suffix, .. } => {
                    (&mut suffix.k[li], &mut suffix.v[li], suffix.capacity * w, Some(&suffix.lens), 0)
                }
            };
            if let Some(split) = qkv_split {
                gpu.gemv_qkv_rope_dev(
                    &mut s.qkv, kc, vc, &s.h, &l.qkv, c, h, kvh, hd, split, &s.pos, &self.cos, &self.sin, seq_stride,
                    lens, start,
                )?;
            } else {
                gpu.matmul_dev(&s.h, &l.qkv, &mut s.qkv, rows, c, nqkv)?;
                if let Some(a) = lora {
                    for (j, off) in [(0, 0), (1, h * hd), (2, (h + kvh) * hd)] {
                        a.lora_fwd(gpu, li, j, &s.h, Some(&mut s.lt), &mut s.qkv, off, nqkv, rows, None)?;
                    }
                }
                if fuse {
                    gpu.rope_kv_store_dev(
                        &mut s.qkv, kc, vc, &s.pos, &self.cos, &self.sin, rows, h, kvh, hd, nqkv, seq_stride, lens,
                        start,
                    )?;
                } else {
                    gpu.rope_strided_dev(&mut s.qkv, &s.pos, &self.cos, &self.sin, rows, h + kvh, hd, nqkv)?;
                    gpu.kv_store_dev(kc, vc, &s.qkv, rows, w, nqkv, h * hd, (h + kvh) * hd, seq_stride, lens, start)?;
                }
            }
            match mode {
                Attend::Prefill { cache, start } => {
                    let start = *start;
                    if rows == 1 {
                        // One new token: flash-decoding over the cache (the prefill kernel would give the GPU one
                        // block per head); the cache is the "prefix", with an empty suffix.
                        gpu.attention_decode_dev(
                            &mut s.att,
                            &s.qkv,
                            nqkv,
                            &cache.k[li],
                            &cache.v[li],
                            start + 1,
                            &cache.k[li],
                            &cache.v[li],
                            &s.flag,
                            0,
                            1,
                            start + 1,
                            h,
                            kvh,
                            hd,
                            &mut s.part,
                            prefetch_o.then_some(&l.o),
                        )?;
                    } else {
                        gpu.attention_prefill_strided_dev(
                            &mut s.att,
                            None,
                            &s.qkv,
                            nqkv,
                            &cache.k[li],
                            &cache.v[li],
                            rows,
                            start + rows,
                            h,
                            kvh,
                            hd,
                            true,
                        )?;
                    }
                }
                Attend::Decode { prefix, suffix } => {
                    gpu.attention_decode_dev(
                        &mut s.att,
                        &s.qkv,
                        nqkv,
                        &prefix.k[li],
                        &prefix.v[li],
                        prefix.len,
                        &suffix.k[li],
                        &suffix.v[li],
                        &suffix.lens,
                        suffix.capacity * w,
                        rows,
                        prefix.len + suffix.capacity,
                        h,
                        kvh,
                        hd,
                        &mut s.part,
                        prefetch_o.then_some(&l.o),
                    )?;
                }
            }
            match norm_split(0, h * hd) {
                Some(split) => gpu.gemv_add_rmsnorm_dev(
                    &mut s.h,
                    &mut s.x,
                    &mut s.tmp,
                    &l.post_norm,
                    &s.att,
                    &l.o,
                    h * hd,
                    c,
                    split,
                    eps,
                )?,
                None => {
                    gpu.matmul_dev(&s.att, &l.o, &mut s.tmp, rows, h * hd, c)?;
                    if let Some(a) = lora {
                        a.lora_fwd(gpu, li, 3, &s.att, Some(&mut s.lt), &mut s.tmp, 0, c, rows, None)?;
                    }
                    gpu.add_rmsnorm_dev(&mut s.h, &mut s.x, &s.tmp, &l.post_norm, rows, eps)?;
                }
            }
            // Batch 1 without LoRA on gate/up (which adds into their output): SwiGLU as the GEMV's epilogue, unless
            // `tune_decode` found the separate pair faster.
            match self.swiglu_split {
                Some(split) if fuse && gemv && rows == 1 && lora.is_none() && c.is_multiple_of(8) => {
                    gpu.gemv_swiglu_dev(&s.h, &l.gate_up, &mut s.act, c, inter, split)?;
                }
                _ => {
                    gpu.matmul_dev(&s.h, &l.gate_up, &mut s.gu, rows, c, 2 * inter)?;
                    if let Some(a) = lora {
                        a.lora_fwd(gpu, li, 4, &s.h, Some(&mut s.lt), &mut s.gu, 0, 2 * inter, rows, None)?;
                        a.lora_fwd(gpu, li, 5, &s.h, Some(&mut s.lt), &mut s.gu, inter, 2 * inter, rows, None)?;
                    }
                    gpu.swiglu_fused_dev(&mut s.act, &s.gu, rows, inter)?;
                }
            }
            // The residual add, then the next layer's input norm (after the last layer: the final norm).
            let next_norm = self.layers.get(li + 1).map_or(&self.norm, |n| &n.input_norm);
            match norm_split(1, inter) {
                Some(split) => gpu.gemv_add_rmsnorm_dev(
                    &mut s.h, &mut s.x, &mut s.tmp, next_norm, &s.act, &l.down, inter, c, split, eps,
                )?,
                None => {
                    gpu.matmul_dev(&s.act, &l.down, &mut s.tmp, rows, inter, c)?;
                    if let Some(a) = lora {
                        a.lora_fwd(gpu, li, 6, &s.act, Some(&mut s.lt), &mut s.tmp, 0, c, rows, None)?;
                    }
                    gpu.add_rmsnorm_dev(&mut s.h, &mut s.x, &s.tmp, next_norm, rows, eps)?;
                }
            }
        }
        Ok(())
    }

    pub(crate) fn head(&self) -> &CudaSlice<f16> {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Runs `ids` (positions cache.len ..) through the decoder, appending to the cache; returns the logits of
    /// every row, (rows, vocab), widened to f32.
    pub fn forward(&self, gpu: &Gpu, ids: &[u32], cache: &mut GpuKvCache) -> Result<Vec<f32>> {
        self.forward_input(gpu, Input::Ids(ids), cache, Some(0), None)
    }

    /// `forward` returning the logits of the last row only (vocab): what prefill and decoding need.
    pub fn forward_last(&self, gpu: &Gpu, ids: &[u32], cache: &mut GpuKvCache) -> Result<Vec<f32>> {
        self.forward_input(gpu, Input::Ids(ids), cache, None, None)
    }

    /// Runs `input` (positions cache.len ..) through the decoder under `lora`, appending to the cache. Returns the
    /// logits of rows `from..` ((rows - from, vocab), widened to f32), or of the last row only when `from` is None.
    pub fn forward_input(
        &self,
        gpu: &Gpu,
        input: Input,
        cache: &mut GpuKvCache,
        from: Option<usize>,
        lora: Option<&GpuLora>,
    ) -> Result<Vec<f32>> {
        let (c, vocab) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let rows = self.input_rows(input)?;
        let start = cache.len;
        if rows == 0 || start + rows > cache.capacity || start + rows > self.max_positions {
            return Err(err(format!(
                "forward: {rows} rows at position {start} exceed the cache ({}) or the RoPE table ({})",
                cache.capacity, self.max_positions
            )));
        }
        let first = from.unwrap_or(rows - 1);
        if first >= rows {
            return Err(err(format!("forward: logits from row {first} of {rows}")));
        }
        let part = gpu.decode_part_len(start + 1, 1, self.cfg.num_attention_heads, self.cfg.head_dim);
        let mut s = self.scratch(gpu, rows, rows - first, part, lora.map_or(1, |l| l.r))?;
        self.load_input(gpu, input, &mut s)?;
        let pos: Vec<i32> = (start..start + rows).map(|p| p as i32).collect();
        gpu.stream.memcpy_htod(&pos, &mut s.pos).map_err(derr)?;
        self.enqueue_layers(gpu, &mut s, &mut Attend::Prefill { cache, start }, matches!(input, Input::Ids(_)), lora)?;
        cache.len += rows;
        let n = rows - first;
        gpu.gemm(
            &s.h.slice(first * c..),
            c,
            false,
            &self.head().slice(..),
            c,
            true,
            &mut s.logits.slice_mut(..),
            vocab,
            n,
            vocab,
            c,
            1.0,
            0.0,
        )?;
        gpu.download_f16(&s.logits)
    }

    fn input_rows(&self, input: Input) -> Result<usize> {
        let c = self.cfg.hidden_size;
        match input {
            Input::Ids(ids) => Ok(ids.len()),
            Input::Embeds(x) if x.len().is_multiple_of(c) => Ok(x.len() / c),
            Input::Embeds(x) => {
                Err(err(format!("decoder input of {} values is not a whole number of rows of {c}", x.len())))
            }
        }
    }

    /// Puts the ids (checked against the vocabulary) or the input rows (as fp16) of `input` into `s`.
    fn load_input(&self, gpu: &Gpu, input: Input, s: &mut Scratch) -> Result<()> {
        match input {
            Input::Ids(ids) => {
                let id32 = self.check_ids(ids)?;
                gpu.stream.memcpy_htod(&id32, &mut s.ids).map_err(derr)
            }
            Input::Embeds(x) => {
                if let Some(at) = x.iter().position(|v| !v.is_finite()) {
                    return Err(err(format!("decoder input value {at} is {}", x[at])));
                }
                let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
                gpu.stream.memcpy_htod(&h, &mut s.x).map_err(derr)
            }
        }
    }

    /// Prefills `prompt` once and prepares `bsz` sequences of up to `max_new` tokens each to decode against it.
    /// Returns the session and the prompt's last logits row (from which each sequence samples its first token).
    pub fn start_decode(
        &self,
        gpu: &Gpu,
        prompt: &[u32],
        bsz: usize,
        max_new: usize,
    ) -> Result<(DecodeSession, Vec<f32>)> {
        self.start_decode_input(gpu, Input::Ids(prompt), bsz, max_new, None)
    }

    /// `start_decode` from any input, under `lora` (every step of the session must pass the same adapter).
    pub fn start_decode_input(
        &self,
        gpu: &Gpu,
        prompt: Input,
        bsz: usize,
        max_new: usize,
        lora: Option<&GpuLora>,
    ) -> Result<(DecodeSession, Vec<f32>)> {
        let len = self.input_rows(prompt)?;
        if bsz == 0 || bsz > 1024 || len == 0 || len + max_new > self.max_positions {
            return Err(err(format!(
                "decode: {bsz} sequences of a {len}-position prompt plus {max_new} new tokens (at most {} positions)",
                self.max_positions
            )));
        }
        let mut prefix = self.new_cache(gpu, len)?;
        let first = self.forward_input(gpu, prompt, &mut prefix, None, lora)?;
        let suffix = self.new_suffix_cache(gpu, bsz, max_new)?;
        let part = gpu.decode_part_len(len + max_new, bsz, self.cfg.num_attention_heads, self.cfg.head_dim);
        let scratch = self.scratch(gpu, bsz, bsz, part, lora.map_or(1, |l| l.r))?;
        Ok((
            DecodeSession {
                prefix,
                suffix,
                scratch,
                graph: None,
                greedy_graph: None,
                device_fed: false,
                use_graph: true,
                graph_error: None,
                lora_key: lora_key(lora),
            },
            first,
        ))
    }

    /// One step of every sequence of `sess`: `tokens[b]` is sequence b's newest token; returns the next-token logits
    /// of every sequence, (bsz, vocab).
    pub fn decode_step(&self, gpu: &Gpu, sess: &mut DecodeSession, tokens: &[u32]) -> Result<Vec<f32>> {
        self.decode_step_lora(gpu, sess, tokens, None)
    }

    /// `decode_step` under the adapter the session was started with.
    pub fn decode_step_lora(
        &self,
        gpu: &Gpu,
        sess: &mut DecodeSession,
        tokens: &[u32],
        lora: Option<&GpuLora>,
    ) -> Result<Vec<f32>> {
        self.step(gpu, sess, Some(tokens), false, lora)?;
        gpu.download_f16(&sess.scratch.logits)
    }

    /// One greedy step of every sequence of `sess` with the choice made on the device (`argmax_step_f16`): only
    /// the picks come back to the host, not the logits. `tokens[b]` is sequence b's newest token, or None to feed
    /// each sequence the token the previous greedy step picked for it (nothing is uploaded then). Returns each
    /// sequence's pick: `sampling::argmax` of its next-token logits, what `decode_step` would let the host pick.
    pub fn decode_step_greedy(
        &self,
        gpu: &Gpu,
        sess: &mut DecodeSession,
        tokens: Option<&[u32]>,
        lora: Option<&GpuLora>,
    ) -> Result<Vec<u32>> {
        self.step(gpu, sess, tokens, true, lora)?;
        let picks = gpu.stream.clone_dtoh(&sess.scratch.ids).map_err(derr)?;
        Ok(picks[..sess.suffix.bsz].iter().map(|&t| t as u32).collect())
    }

    /// Runs one decode step of `sess` (its captured graph, capturing it on first use): feeds `tokens` (uploaded
    /// with the step's positions), or with None what a greedy step left on the device; `greedy` adds the device's
    /// argmax, which leaves the picks, positions and lengths of the next step in place.
    fn step(
        &self,
        gpu: &Gpu,
        sess: &mut DecodeSession,
        tokens: Option<&[u32]>,
        greedy: bool,
        lora: Option<&GpuLora>,
    ) -> Result<()> {
        if lora_key(lora) != sess.lora_key {
            return Err(err("decode: a step must use the adapter its session was started with"));
        }
        let bsz = sess.suffix.bsz;
        if tokens.is_some_and(|t| t.len() != bsz) || sess.suffix.len >= sess.suffix.capacity {
            return Err(err(format!(
                "decode: {} tokens for {bsz} sequences, {} of {} positions used",
                tokens.map_or(0, |t| t.len()),
                sess.suffix.len,
                sess.suffix.capacity
            )));
        }
        let s = &gpu.stream;
        match tokens {
            Some(tokens) => {
                let id32 = self.check_ids(tokens)?;
                s.memcpy_htod(&id32, &mut sess.scratch.ids).map_err(derr)?;
                s.memcpy_htod(&vec![(sess.prefix.len + sess.suffix.len) as i32; bsz], &mut sess.scratch.pos)
                    .map_err(derr)?;
                s.memcpy_htod(&vec![(sess.suffix.len + 1) as i32; bsz], &mut sess.suffix.lens).map_err(derr)?;
            }
            None if !sess.device_fed => {
                return Err(err("decode: a step without tokens must follow a greedy step (it feeds that step's picks)"))
            }
            None => {}
        }
        let (c, vocab) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let DecodeSession { prefix, suffix, scratch, graph, greedy_graph, device_fed, use_graph, graph_error, .. } =
            sess;
        let enqueue = |scratch: &mut Scratch, suffix: &mut GpuSuffixCache| -> Result<()> {
            self.enqueue_layers(
                gpu,
                scratch,
                &mut Attend::Decode { prefix: &*prefix, suffix: &mut *suffix },
                true,
                lora,
            )?;
            gpu.matmul_dev(&scratch.h, self.head(), &mut scratch.logits, bsz, c, vocab)?;
            if greedy {
                gpu.argmax_step_dev(
                    &mut scratch.ids,
                    &scratch.logits,
                    bsz,
                    vocab,
                    Some((&mut scratch.pos, &mut suffix.lens)),
                )?;
            }
            Ok(())
        };
        let graph = if greedy { greedy_graph } else { graph };
        if graph.is_none() && *use_graph {
            s.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(derr)?;
            let enq = enqueue(scratch, suffix);
            let captured = s.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
            match (enq, captured) {
                (Ok(()), Ok(Some(g))) => *graph = Some(g),
                // Nothing captured ran: fall back to launching the kernels (and say why).
                (enq, captured) => {
                    *use_graph = false;
                    *graph_error = Some(format!(
                        "CUDA graph capture of a decode step failed ({enq:?}, {:?}); launching kernels directly",
                        captured.map(|g| g.is_some())
                    ));
                }
            }
        }
        // From here the step runs: a failure leaves the device state unknown, so the next step must upload.
        *device_fed = false;
        match graph {
            Some(g) if *use_graph => g.launch().map_err(derr)?,
            _ => enqueue(scratch, suffix)?,
        }
        suffix.len += 1;
        *device_fed = greedy;
        Ok(())
    }

    /// n answers to one prompt (ids only; see `sample_answers`): each answer's tokens, a stop token excluded.
    pub fn generate_n(
        &self,
        gpu: &Gpu,
        prompt: &[u32],
        seeds: &[u64],
        params: &crate::sampling::SamplingParams,
        stop_ids: &[u32],
    ) -> Result<Vec<Vec<u32>>> {
        Ok(self
            .sample_answers(gpu, Input::Ids(prompt), prompt, seeds, params, stop_ids, None)?
            .0
            .into_iter()
            .map(|a| a.tokens)
            .collect())
    }

    /// n answers to one prompt under `lora`: the prompt is prefilled once, then the n sequences decode together
    /// against that shared prefix (`DecodeSession`), each drawn on the host with its own seed
    /// (`sampling::sample_fast`, the n rows in parallel; the repetition penalty sees `prompt_ids` and the answer),
    /// or, greedy without a repetition penalty, picked on the device (`decode_step_greedy`: the same tokens).
    /// An answer ends at a token of `stop` (not recorded: `FinishReason::Stop`) or at `max_new_tokens`, as on the
    /// CPU backend. Returns the answers and where the time went (the prefill timed from the call).
    #[allow(clippy::too_many_arguments)]
    pub fn sample_answers(
        &self,
        gpu: &Gpu,
        prompt: Input,
        prompt_ids: &[u32],
        seeds: &[u64],
        params: &crate::sampling::SamplingParams,
        stop: &[u32],
        lora: Option<&GpuLora>,
    ) -> Result<(Vec<Answer>, GenerateStats)> {
        use rayon::prelude::*;
        let t0 = std::time::Instant::now();
        let mut stats = GenerateStats::default();
        let n = seeds.len();
        let max_new = params.max_new_tokens;
        let mut answers: Vec<Answer> =
            seeds.iter().map(|&seed| Answer { seed, tokens: Vec::new(), finish: FinishReason::Length }).collect();
        if n == 0 || max_new == 0 {
            return Ok((answers, stats));
        }
        stats.prompt_positions = self.input_rows(prompt)?;
        let (mut sess, first) = self.start_decode_input(gpu, prompt, n, max_new, lora)?;
        stats.prefill_s = t0.elapsed().as_secs_f64();
        let t1 = std::time::Instant::now();
        let v = self.cfg.vocab_size;
        let mut rngs: Vec<crate::rng::SplitMix64> = seeds.iter().map(|&s| crate::rng::SplitMix64::new(s)).collect();
        let mut seen: Vec<Vec<u32>> = vec![prompt_ids.to_vec(); n];
        let mut next: Vec<u32> = rngs
            .par_iter_mut()
            .zip(seen.par_iter())
            .map(|(rng, s)| crate::sampling::sample_fast(&mut first.clone(), s, params, rng))
            .collect();
        let mut active = vec![true; n];
        // Greedy without a repetition penalty is the argmax of the logits: chosen on the device, so each step
        // copies n ids to the host instead of n rows of logits.
        let greedy = params.temperature == 0.0 && params.repetition_penalty == 1.0;
        loop {
            for i in 0..n {
                if !active[i] {
                    continue;
                }
                let tok = next[i];
                if stop.contains(&tok) {
                    answers[i].finish = FinishReason::Stop;
                    active[i] = false;
                    continue;
                }
                answers[i].tokens.push(tok);
                seen[i].push(tok);
                if answers[i].tokens.len() >= max_new {
                    active[i] = false;
                }
            }
            let live = active.iter().filter(|&&a| a).count();
            if live == 0 {
                break;
            }
            crate::interrupt::check()?;
            stats.decode_steps += 1;
            stats.decode_tokens += live;
            // Every sequence steps (the batch shape stays fixed for the captured graph): each feeds its newest draw
            // (a finished one its stop token or last token, a valid id either way) and a finished row is ignored.
            if greedy {
                // The picks stay on the device for the next step; only they come back.
                let fed = sess.device_fed;
                let picks = self.decode_step_greedy(gpu, &mut sess, if fed { None } else { Some(&next) }, lora)?;
                for ((t, p), &live) in next.iter_mut().zip(picks).zip(&active) {
                    if live {
                        *t = p;
                    }
                }
                continue;
            }
            let mut logits = self.decode_step_lora(gpu, &mut sess, &next, lora)?;
            next.par_iter_mut()
                .zip(rngs.par_iter_mut())
                .zip(logits.par_chunks_mut(v))
                .zip(seen.par_iter())
                .zip(active.par_iter())
                .for_each(|((((t, rng), row), s), &live)| {
                    if live {
                        *t = crate::sampling::sample_fast(row, s, params, rng);
                    }
                });
        }
        stats.decode_s = t1.elapsed().as_secs_f64();
        Ok((answers, stats))
    }
}

/// Times a batch-1 pair of launches (`op(None, layer)`) against the kernel that fuses them with 1, 2 and 4 warps per
/// feature (`op(Some(split), layer)`), each over all `layers` layers (`Gpu::time_passes`). Returns the fastest
/// split, or None where the pair won, and the line `tune_decode` reports ("label: times -> pick").
fn pick_fused(
    gpu: &Gpu,
    layers: usize,
    label: &str,
    tag: &str,
    op: &mut dyn FnMut(Option<usize>, usize) -> Result<()>,
) -> Result<(Option<usize>, String)> {
    let separate = gpu.time_passes(layers, &mut |i| op(None, i))?;
    let (mut best, mut best_us, mut times) = (None, separate, vec![format!("separate {separate:.1}")]);
    for split in [1usize, 2, 4] {
        let us = gpu.time_passes(layers, &mut |i| op(Some(split), i))?;
        times.push(format!("{tag}/{split} {us:.1}"));
        if us < best_us {
            (best, best_us) = (Some(split), us);
        }
    }
    Ok((
        best,
        format!(
            "{label}: {} us -> {}",
            times.join(", "),
            best.map_or("separate".to_string(), |s| format!("{tag}/{s}"))
        ),
    ))
}

/// One row's o or down projection (x (k) by w (n, k) into t), then the residual add into h and the RMSNorm into
/// out: in one launch with `split` warps per row (`gemv_add_rmsnorm_m1_f16`), or (None) the projection as
/// `matmul_dev` runs it, then `add_rmsnorm_f16`. The tuner's and the per-op breakdown's unit of work.
#[allow(clippy::too_many_arguments)]
pub(crate) fn proj_add_rmsnorm_m1(
    gpu: &Gpu,
    out: &mut CudaSlice<f16>,
    h: &mut CudaSlice<f16>,
    t: &mut CudaSlice<f16>,
    norm_w: &CudaSlice<f16>,
    x: &CudaSlice<f16>,
    w: &CudaSlice<f16>,
    k: usize,
    n: usize,
    split: Option<usize>,
    eps: f32,
) -> Result<()> {
    match split {
        Some(split) => gpu.gemv_add_rmsnorm_dev(out, h, t, norm_w, x, w, k, n, split, eps),
        None => {
            gpu.matmul_dev(x, w, t, 1, k, n)?;
            gpu.add_rmsnorm_dev(out, h, t, norm_w, 1, eps)
        }
    }
}

fn check_shape(cfg: &LlamaConfig) -> Result<()> {
    if cfg.head_dim > 128
        || !cfg.head_dim.is_multiple_of(2)
        || cfg.num_key_value_heads == 0
        || !cfg.num_attention_heads.is_multiple_of(cfg.num_key_value_heads)
    {
        return Err(err(format!("the CUDA attention kernels take an even head_dim of at most 128 and heads a multiple of kv heads (got head_dim {}, heads {}/{})", cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads)));
    }
    Ok(())
}

/// Loads the decoder of a Hugging Face LLaMA/LLaVA directory onto the GPU.
pub fn load_dir(gpu: &Gpu, dir: &std::path::Path, max_positions: usize) -> Result<GpuLlama> {
    let config = crate::config::ModelConfig::from_file(&dir.join("config.json"))?;
    let ws = WeightStore::open_dir(dir, "model")?;
    let layout = crate::family::KeyLayout::detect(&ws, crate::family::Family::of(config.family()))?;
    let text = config.text();
    let lm_head = if text.tie_word_embeddings { None } else { Some(layout.lm_head.as_str()) };
    GpuLlama::load(gpu, &ws, &layout.text, lm_head, text, max_positions)
}
