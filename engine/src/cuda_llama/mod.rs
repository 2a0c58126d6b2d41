//! The LLaMA decoder on the GPU (CUDA, first part): weights uploaded once as fp16 (q/k/v and gate/up fused into
//! one matrix each, so a layer is four GEMMs), a KV cache on the device, every op one of `kernels/*.cu` or a GEMM
//! (the hand-written GEMV for one row, cuBLASLt otherwise), fp32 accumulation throughout. Text tokens
//! or decoder input rows made on the host (`Input::Embeds`: a LLaVA prompt's text embeddings with its image
//! features spliced in), optionally with a LoRA adapter applied unmerged (`GpuLora::for_inference`: two
//! small GEMMs beside each projection). Qwen2's q/k/v biases, no other attention/MLP biases; Qwen2-VL's multimodal
//! RoPE (a prefill's rows carry three positions each: `Input::Placed`) and the shifted text positions after its image.
//!
//! Decoding n answers to one prompt ([`DecodeSession`], `decode.rs`): the prompt is prefilled once into a shared
//! prefix cache; the n sequences then step together, each with its own suffix cache, against that prefix. Every
//! buffer of a step is allocated once per session and the per-step values (token ids, positions, suffix lengths)
//! live in device memory, so the first step is captured as a CUDA graph and replayed for every later step: one
//! launch per token instead of ~350. Where they apply the step uses fused kernels (`Gpu::fuse`, on by default):
//! RoPE with the cache store, and at batch 1 the q/k/v, o, gate/up and down GEMVs with their epilogues. Which
//! kernel each batch-1 projection takes is the model's `DecodePlan` (`plan.rs`), fixed at load: a decoder of
//! LLaVA's size measures there which GEMV split (or cuBLASLt), and which fused kernel, is fastest on this device
//! (`GpuLlama::tune_decode`). Loading (`load.rs`) uploads the weights. `engine/tests/cuda_llama.rs` checks all of
//! it against the CPU backend, and the fused path against the unfused one.

mod batch;
mod decode;
mod load;
mod plan;

pub use batch::{kv_bytes_per_position, GpuRows};
pub use decode::{DecodeSession, GpuSuffixCache};
pub use load::{from_model, load_dir};
pub(crate) use plan::proj_add_rmsnorm_m1;
use plan::{DecodePlan, ProjLaunch};

use crate::config::LlamaConfig;
use crate::cuda::{derr, err, Gpu};
use crate::cuda_lora::GpuLora;
use crate::error::Result;
use cudarc::driver::CudaSlice;
use half::f16;

pub(crate) struct Layer {
    pub(crate) input_norm: CudaSlice<f16>,
    /// [(heads + 2 kv_heads) head_dim, hidden]: the q rows, then k, then v.
    pub(crate) qkv: CudaSlice<f16>,
    /// Qwen2's q/k/v biases, in the rows of `qkv`.
    pub(crate) qkv_bias: Option<CudaSlice<f16>>,
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
    /// How each batch-1 projection of a decode step runs (fused with its epilogue or not, the GEMV split or
    /// cuBLASLt): chosen once at load, by `tune_decode` for decoders of LLaVA's size; `forward_layers` reads it.
    pub(crate) plan: DecodePlan,
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
    /// Each row's RoPE position, or with `pos_width` 3 its three multimodal ones (temporal, height, width).
    pub(crate) pos: CudaSlice<i32>,
    pub(crate) pos_width: usize,
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
    /// Decoder input rows of a prompt starting the sequence, at the RoPE positions `Model::rope_positions` gives
    /// (Qwen2-VL's multimodal positions for image rows: `ops::rope::mrope_position`), and the `shift` of the rows
    /// that follow (position = row + shift).
    Placed { rows: &'a [f32], positions: &'a [usize], shift: isize },
}

/// Decoder input rows made on the host, and their RoPE positions and the shift after them when they are not the
/// row indices (`Model::rope_positions`: Qwen2-VL with an image).
pub struct HostInput {
    pub rows: Vec<f32>,
    pub placed: Option<(Vec<usize>, isize)>,
}

impl HostInput {
    /// The rows as a forward pass's input: `Input::Placed` at their positions, else `Input::Embeds`.
    pub fn input(&self) -> Input<'_> {
        match &self.placed {
            Some((positions, shift)) => Input::Placed { rows: &self.rows, positions, shift: *shift },
            None => Input::Embeds(&self.rows),
        }
    }
}

/// How a forward pass attends.
enum Attend<'a> {
    /// `rows` new tokens of one sequence appended to `cache` at position `start`.
    Prefill { cache: &'a mut GpuKvCache, start: usize },
    /// One new token for each of `rows` sequences: the shared `prefix` plus each sequence's suffix.
    Decode { prefix: &'a GpuKvCache, suffix: &'a mut GpuSuffixCache },
}

impl GpuLlama {
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
            // Room for three positions per row under multimodal RoPE.
            pos: s.alloc_zeros::<i32>(rows.max(1) * if cfg.mrope_section.is_some() { 3 } else { 1 }).map_err(derr)?,
            pos_width: 1,
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
    /// positions are already in `s.ids`/`s.pos`; leaves the final-norm output in `s.h`. Which kernels each
    /// projection launches is the model's `DecodePlan` for this pass. Launches only: no allocation, copy or
    /// synchronisation (graph-capturable).
    fn forward_layers(
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
        let plan = self.plan.launches(gpu, rows, lora.is_some());
        if gather {
            gpu.embedding_ids_dev(&mut s.x, &self.embed, c, &s.ids, rows, &mut s.flag)?;
        }
        // The first layer's input norm (no layers: the final norm); every later norm comes with the residual add
        // after a projection.
        gpu.rmsnorm_dev(&mut s.h, &s.x, self.layers.first().map_or(&self.norm, |l| &l.input_norm), rows, eps)?;
        for (li, l) in self.layers.iter().enumerate() {
            // The q/k/v projection, RoPE on q and k, and k and v into this layer's cache: the prefill cache at
            // `start`, or each decoding sequence's suffix cache at its length.
            let (kc, vc, seq_stride, lens, start) = match mode {
                Attend::Prefill { cache, start } => (&mut cache.k[li], &mut cache.v[li], 0, None, *start),
                Attend::Decode { suffix, .. } => {
                    (&mut suffix.k[li], &mut suffix.v[li], suffix.capacity * w, Some(&suffix.lens), 0)
                }
            };
            // Multimodal RoPE positions (three per row) take the separate RoPE kernel; so does a biased q/k/v.
            let sections = if s.pos_width == 3 { cfg.mrope_section } else { None };
            let qkv_launch = match (plan.qkv, sections) {
                (ProjLaunch::Fused(_), Some(_)) => ProjLaunch::Separate(crate::cuda::GemvChoice::Blas),
                (p, _) => p,
            };
            match qkv_launch {
                ProjLaunch::Fused(split) => gpu.gemv_qkv_rope_dev(
                    &mut s.qkv, kc, vc, &s.h, &l.qkv, c, h, kvh, hd, split, &s.pos, &self.cos, &self.sin, seq_stride,
                    lens, start,
                )?,
                ProjLaunch::Separate(product) => {
                    gpu.matmul_with(product, &s.h, &l.qkv, &mut s.qkv, rows, c, nqkv)?;
                    if let Some(b) = &l.qkv_bias {
                        crate::cuda_clip::bias_add(gpu, &mut s.qkv, &b.slice(..), rows, nqkv)?;
                    }
                    if let Some(a) = lora {
                        for (j, off) in [(0, 0), (1, h * hd), (2, (h + kvh) * hd)] {
                            a.lora_fwd(gpu, li, j, &s.h, Some(&mut s.lt), &mut s.qkv, off, nqkv, rows, None)?;
                        }
                    }
                    if plan.rope_kv_store && sections.is_none() {
                        gpu.rope_kv_store_dev(
                            &mut s.qkv, kc, vc, &s.pos, &self.cos, &self.sin, rows, h, kvh, hd, nqkv, seq_stride, lens,
                            start,
                        )?;
                    } else {
                        gpu.rope_strided_dev(
                            &mut s.qkv,
                            &s.pos,
                            &self.cos,
                            &self.sin,
                            rows,
                            h + kvh,
                            hd,
                            nqkv,
                            sections,
                        )?;
                        gpu.kv_store_dev(
                            kc,
                            vc,
                            &s.qkv,
                            rows,
                            w,
                            nqkv,
                            h * hd,
                            (h + kvh) * hd,
                            seq_stride,
                            lens,
                            start,
                        )?;
                    }
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
                            None,
                            cfg.window(li),
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
                            crate::ops::Mask::causal(cfg.window(li)),
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
                        None,
                        cfg.window(li),
                    )?;
                }
            }
            // The o projection, the residual add, then the post-attention norm.
            match plan.o {
                ProjLaunch::Fused(split) => gpu.gemv_add_rmsnorm_dev(
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
                ProjLaunch::Separate(product) => {
                    gpu.matmul_with(product, &s.att, &l.o, &mut s.tmp, rows, h * hd, c)?;
                    if let Some(a) = lora {
                        a.lora_fwd(gpu, li, 3, &s.att, Some(&mut s.lt), &mut s.tmp, 0, c, rows, None)?;
                    }
                    gpu.add_rmsnorm_dev(&mut s.h, &mut s.x, &s.tmp, &l.post_norm, rows, eps)?;
                }
            }
            // The gate/up projection, then SwiGLU.
            match plan.gate_up {
                ProjLaunch::Fused(split) => gpu.gemv_swiglu_dev(&s.h, &l.gate_up, &mut s.act, c, inter, split)?,
                ProjLaunch::Separate(product) => {
                    gpu.matmul_with(product, &s.h, &l.gate_up, &mut s.gu, rows, c, 2 * inter)?;
                    if let Some(a) = lora {
                        a.lora_fwd(gpu, li, 4, &s.h, Some(&mut s.lt), &mut s.gu, 0, 2 * inter, rows, None)?;
                        a.lora_fwd(gpu, li, 5, &s.h, Some(&mut s.lt), &mut s.gu, inter, 2 * inter, rows, None)?;
                    }
                    gpu.swiglu_fused_dev(&mut s.act, &s.gu, rows, inter)?;
                }
            }
            // The down projection, the residual add, then the next layer's input norm (after the last layer: the
            // final norm).
            let next_norm = self.layers.get(li + 1).map_or(&self.norm, |n| &n.input_norm);
            match plan.down {
                ProjLaunch::Fused(split) => gpu.gemv_add_rmsnorm_dev(
                    &mut s.h, &mut s.x, &mut s.tmp, next_norm, &s.act, &l.down, inter, c, split, eps,
                )?,
                ProjLaunch::Separate(product) => {
                    gpu.matmul_with(product, &s.act, &l.down, &mut s.tmp, rows, inter, c)?;
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
        let default: Vec<usize>;
        let positions = match input {
            Input::Placed { positions, .. } if positions.len() == rows && start == 0 => positions,
            Input::Placed { positions, .. } => {
                return Err(err(format!("forward: {} positions for {rows} rows at {start}", positions.len())))
            }
            _ => {
                default = (start..start + rows).collect();
                &default
            }
        };
        let (pos, width) = self.device_positions(positions)?;
        s.pos_width = width;
        gpu.stream.memcpy_htod(&pos, &mut s.pos).map_err(derr)?;
        self.forward_layers(gpu, &mut s, &mut Attend::Prefill { cache, start }, matches!(input, Input::Ids(_)), lora)?;
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

    /// The device's form of RoPE positions: one i32 per row, or under multimodal RoPE three (a text row's
    /// position repeated), each inside the cos/sin tables.
    pub(crate) fn device_positions(&self, positions: &[usize]) -> Result<(Vec<i32>, usize)> {
        let width = if self.cfg.mrope_section.is_some() { 3 } else { 1 };
        let mut out = Vec::with_capacity(positions.len() * width);
        for &p in positions {
            let comps = crate::ops::rope::components(p);
            if width == 1 && comps != [p; 3] {
                return Err(err("a multimodal RoPE position for a decoder without mrope_section"));
            }
            for &c in &comps[..width] {
                if c >= self.max_positions {
                    return Err(err(format!("RoPE position {c} is outside the table of {}", self.max_positions)));
                }
                out.push(c as i32);
            }
        }
        Ok((out, width))
    }

    fn input_rows(&self, input: Input) -> Result<usize> {
        let c = self.cfg.hidden_size;
        match input {
            Input::Ids(ids) => Ok(ids.len()),
            Input::Embeds(x) | Input::Placed { rows: x, .. } if x.len().is_multiple_of(c) => Ok(x.len() / c),
            Input::Embeds(x) | Input::Placed { rows: x, .. } => {
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
            Input::Embeds(x) | Input::Placed { rows: x, .. } => {
                if let Some(at) = x.iter().position(|v| !v.is_finite()) {
                    return Err(err(format!("decoder input value {at} is {}", x[at])));
                }
                let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
                gpu.stream.memcpy_htod(&h, &mut s.x).map_err(derr)
            }
        }
    }
}
