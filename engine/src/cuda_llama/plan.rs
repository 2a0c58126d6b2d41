//! The decode plan: which kernels each projection of a forward pass launches, chosen once when the model loads so
//! that `forward_layers` reads its launches rather than deciding them. A plan holds, for each batch-1 projection,
//! how its product runs alone (a `gemv_m1_f16` split or cuBLASLt) and whether it runs fused with its epilogue (and
//! with how many warps per feature). Untuned (decoders narrower than `TUNE_MIN_HIDDEN`), each projection takes its
//! fused kernel with one warp per feature and, alone, `gemv_m1_f16` with one warp per feature, wherever its shape
//! allows them; `GpuLlama::tune_decode` measures every choice on the device instead.
//!
//! The o projection's weights were also once prefetched into L2 by the attention before it, where the tuner
//! measured that faster; on an H200 at LLaVA-1.5-7B's shape it was slower (26.0 against 24.7 us, BENCHMARKS.md),
//! so the decoder no longer does it (the kernel's `pf` argument stays, tested in `cuda_parity.rs`).

use super::{GpuLlama, Layer};
use crate::config::LlamaConfig;
use crate::cuda::{derr, GemvChoice, Gpu};
use crate::error::Result;
use cudarc::driver::CudaSlice;
use half::f16;
use std::sync::atomic::Ordering;

/// How one projection runs in a batch-1 pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProjPlan {
    /// The product alone (`Gpu::matmul_with`): a `gemv_m1_f16` split, or cuBLASLt (always where k is not a
    /// multiple of 8).
    pub(crate) product: GemvChoice,
    /// Without LoRA: the product with its epilogue in one launch, with this many warps per feature; None: the
    /// product, then the epilogue's own kernel (also where k is not a multiple of 8).
    pub(crate) fused: Option<usize>,
}

/// How each projection of a batch-1 forward pass (a decode step, or a one-token prefill) runs; every other pass
/// takes cuBLASLt and the separate epilogues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DecodePlan {
    /// q/k/v (k: hidden); fused: with RoPE and the cache store (`gemv_qkv_rope_m1_f16`), else `rope_kv_store_f16`.
    pub(crate) qkv: ProjPlan,
    /// o (k: heads * head_dim); fused: with the residual add and RMSNorm (`gemv_add_rmsnorm_m1_f16`), else
    /// `add_rmsnorm_f16`.
    pub(crate) o: ProjPlan,
    /// gate/up (k: hidden); fused: with SwiGLU (`gemv_swiglu_m1_f16`), else `swiglu_f16`.
    pub(crate) gate_up: ProjPlan,
    /// down (k: intermediate); fused: with the residual add and the next RMSNorm (`gemv_add_rmsnorm_m1_f16`), else
    /// `add_rmsnorm_f16`.
    pub(crate) down: ProjPlan,
    /// The head (k: hidden), alone.
    pub(crate) head: GemvChoice,
}

/// What one projection of a pass launches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProjLaunch {
    /// Its fused kernel, with this many warps per feature.
    Fused(usize),
    /// The product (`Gpu::matmul_with`), then the adapter's GEMMs if any, then the epilogue's kernel.
    Separate(GemvChoice),
}

/// The launches of one forward pass: the plan applied to the pass's rows and adapter and the device's switches
/// (`Gpu::fuse`, `Gpu::gemv`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PassLaunches {
    pub(crate) qkv: ProjLaunch,
    pub(crate) o: ProjLaunch,
    pub(crate) gate_up: ProjLaunch,
    pub(crate) down: ProjLaunch,
    pub(crate) head: GemvChoice,
    /// After a separate q/k/v product: RoPE and the cache store in one launch (`rope_kv_store_f16`), or
    /// `rope_strided_f16` then `kv_store_f16`.
    pub(crate) rope_kv_store: bool,
}

impl DecodePlan {
    /// The plan before tuning: every fused kernel and `gemv_m1_f16` with one warp per feature, where k allows.
    pub(crate) fn untuned(cfg: &LlamaConfig) -> DecodePlan {
        let proj = |k: usize| ProjPlan { product: product(k, None), fused: k.is_multiple_of(8).then_some(1) };
        let (c, inter) = (cfg.hidden_size, cfg.intermediate_size);
        DecodePlan {
            // The fused q/k/v kernel has no bias.
            qkv: ProjPlan { fused: proj(c).fused.filter(|_| !cfg.qkv_bias), ..proj(c) },
            o: proj(cfg.num_attention_heads * cfg.head_dim),
            gate_up: proj(c),
            down: proj(inter),
            head: product(c, None),
        }
    }

    /// The launches of a pass over `rows` rows, with or without an adapter (which adds into the products'
    /// outputs, so it rules out every fused kernel), under the device's current switches. Only a batch-1 pass with
    /// `Gpu::gemv` on takes the plan's products; only one with `Gpu::fuse` on too and no adapter its fused kernels.
    pub(crate) fn launches(&self, gpu: &Gpu, rows: usize, lora: bool) -> PassLaunches {
        let fuse = gpu.fuse.load(Ordering::Relaxed);
        let one_row = rows == 1 && gpu.gemv.load(Ordering::Relaxed);
        let product = |choice: GemvChoice| if one_row { choice } else { GemvChoice::Blas };
        let launch = |p: &ProjPlan| match p.fused {
            Some(split) if one_row && fuse && !lora => ProjLaunch::Fused(split),
            _ => ProjLaunch::Separate(product(p.product)),
        };
        PassLaunches {
            qkv: launch(&self.qkv),
            o: launch(&self.o),
            gate_up: launch(&self.gate_up),
            down: launch(&self.down),
            head: product(self.head),
            rope_kv_store: fuse,
        }
    }
}

/// How a one-row product with k inputs runs alone, given what the tuner measured for its shape (None: not
/// measured, one warp per feature): `gemv_m1_f16` reads k in 16-byte vectors, so k must be a multiple of 8.
fn product(k: usize, tuned: Option<GemvChoice>) -> GemvChoice {
    if k.is_multiple_of(8) {
        tuned.unwrap_or(GemvChoice::Gemv(1))
    } else {
        GemvChoice::Blas
    }
}

impl GpuLlama {
    /// Measures how each batch-1 decode projection (q/k/v, o, gate/up, down, the head) runs fastest on this device
    /// (`Gpu::tune_gemv`, over every layer's matrix), then whether gate/up with SwiGLU as its epilogue beats the
    /// projection so chosen followed by `swiglu_f16`, whether q/k/v with RoPE and the cache store in the same
    /// launch beats the projection followed by `rope_kv_store_f16`, and whether the o and down projections with the
    /// residual add and RMSNorm in the same launch beat the projection followed by `add_rmsnorm_f16`; keeps
    /// all in the model's `DecodePlan`: tens of milliseconds once, before any decode step is captured as a graph.
    /// Returns one line per measurement.
    pub fn tune_decode(&mut self, gpu: &Gpu) -> Result<Vec<String>> {
        let cfg = &self.cfg;
        let (c, h, kvh, hd, inter) =
            (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size);
        let all = |f: fn(&Layer) -> &CudaSlice<f16>| self.layers.iter().map(f).collect::<Vec<_>>();
        let (nqkv, vocab) = ((h + 2 * kvh) * hd, cfg.vocab_size);
        let mut lines = gpu.tune_gemv(&[
            (c, nqkv, all(|l| &l.qkv)),
            (h * hd, c, all(|l| &l.o)),
            (c, 2 * inter, all(|l| &l.gate_up)),
            (inter, c, all(|l| &l.down)),
            (c, vocab, vec![self.head()]),
        ])?;
        let plan = &mut self.plan;
        plan.qkv.product = product(c, gpu.gemv_choice(c, nqkv));
        plan.o.product = product(h * hd, gpu.gemv_choice(h * hd, c));
        plan.gate_up.product = product(c, gpu.gemv_choice(c, 2 * inter));
        plan.down.product = product(inter, gpu.gemv_choice(inter, c));
        plan.head = product(c, gpu.gemv_choice(c, vocab));
        if !c.is_multiple_of(8) {
            for p in [&mut plan.qkv, &mut plan.o, &mut plan.gate_up, &mut plan.down] {
                p.fused = None;
            }
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
        self.plan.gate_up.fused = best;
        lines.push(line);
        // The q/k/v projection with RoPE and the cache store: the projection as tuned above followed by
        // `rope_kv_store_f16`, against both in one launch.
        let mut qkv = gpu.stream.alloc_zeros::<f16>(nqkv).map_err(derr)?;
        let (mut kc, mut vc) = (
            gpu.stream.alloc_zeros::<f16>(kvh * hd).map_err(derr)?,
            gpu.stream.alloc_zeros::<f16>(kvh * hd).map_err(derr)?,
        );
        let pos = gpu.stream.alloc_zeros::<i32>(1).map_err(derr)?;
        let (cos, sin) = (&self.cos, &self.sin);
        let cfg_qkv_bias = self.cfg.qkv_bias;
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
        // The fused kernel has no bias (Qwen2's q/k/v biases): there the projection and its bias stay separate.
        self.plan.qkv.fused = best.filter(|_| !cfg_qkv_bias);
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
            if which == 0 {
                self.plan.o.fused = best;
            } else {
                self.plan.down.fused = best;
            }
            lines.push(line);
        }
        Ok(lines)
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
