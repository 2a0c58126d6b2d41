//! Qwen2-VL / Qwen2.5-VL's vision transformer on the CPU: a linear patch embedding of each flattened
//! `3 × temporal_patch_size × patch_size²` patch, blocks of 2-D rotary self-attention (the first quarter of each
//! head's frequencies follows the patch's row, the second its column) and an MLP, then the merger: a norm, every
//! `spatial_merge_size²` neighbouring patches concatenated, and a GELU MLP to the decoder's width.
//!
//! Qwen2-VL: LayerNorm blocks, an fc1/fc2 MLP (quick-GELU), every block attends over the whole image.
//! Qwen2.5-VL: RMSNorm blocks, a SwiGLU MLP with biases, and window attention: the merged units are reordered
//! window by window (`window_size` pixels a side), blocks attend within a window except those in
//! `fullatt_block_indexes`, and the merger's output is put back in raster order.

use crate::adapter::Adapter;
use crate::config::{Activation, QwenVisionConfig};
use crate::error::{EngineError, Result};
use crate::family::keys::{
    qwen_block, qwen_block_linears, qwen_merger_linears, Keys, QWEN_BLOCK_NORMS, QWEN_MERGER_NORM, QWEN_PATCH_EMBED,
};
use crate::linear::Linear;
use crate::ops::{apply_activation, attend_dense, layernorm, matmul_nt, rmsnorm, silu_mul, MatmulMode};
use crate::weights::WeightStore;

const NORM_EPS: f64 = 1e-6;

enum Mlp {
    /// Qwen2.5-VL: down(act(gate(x)) · up(x)).
    Gated { gate: Linear, up: Linear, down: Linear },
    /// Qwen2-VL: fc2(act(fc1(x))).
    Plain { fc1: Linear, fc2: Linear },
}

/// A norm's weight, and its bias for LayerNorm (Qwen2-VL); RMSNorm (Qwen2.5-VL) has none.
struct Norm {
    w: Vec<f32>,
    b: Option<Vec<f32>>,
}

impl Norm {
    fn load(ws: &WeightStore, keys: &Keys, d: usize, layer_norm: bool) -> Result<Norm> {
        Ok(Norm {
            w: ws.f32(&keys.key("weight"), &[d])?,
            b: if layer_norm { Some(ws.f32(&keys.key("bias"), &[d])?) } else { None },
        })
    }

    fn apply(&self, out: &mut [f32], x: &[f32]) {
        match &self.b {
            Some(b) => layernorm(out, x, &self.w, b, NORM_EPS),
            None => rmsnorm(out, x, &self.w, NORM_EPS),
        }
    }
}

pub struct QwenBlock {
    norm1: Norm,
    norm2: Norm,
    qkv: Linear,
    proj: Linear,
    mlp: Mlp,
}

pub struct QwenVision {
    pub cfg: QwenVisionConfig,
    /// (D, 3 · T · P · P): the Conv3d whose stride is its kernel, as a matrix.
    patch_w: Vec<f32>,
    blocks: Vec<QwenBlock>,
    merger_norm: Norm,
    merger_1: Linear,
    merger_2: Linear,
    /// head_dim / 4 inverse frequencies, shared by the row and the column halves.
    inv_freq: Vec<f32>,
}

impl QwenVision {
    /// The tower under `prefix` (e.g. `visual.`); linear layers get canonical names under `visual.`.
    pub fn load(ws: &WeightStore, prefix: &str, cfg: &QwenVisionConfig, keep_16bit: bool) -> Result<QwenVision> {
        let d = cfg.hidden_size;
        let (on_disk, canonical) = (Keys::new(prefix), Keys::new("visual."));
        let ln = !cfg.v2_5;
        let mut blocks = Vec::with_capacity(cfg.depth);
        for b in 0..cfg.depth {
            let (kp, name) = (qwen_block(&on_disk, b), qwen_block(&canonical, b));
            let mut lin = std::collections::HashMap::new();
            for (m, fi, fo) in qwen_block_linears(cfg) {
                lin.insert(m, Linear::load(ws, &kp.key(m), name.key(m), fi, fo, true, keep_16bit)?);
            }
            let mut take =
                |m: &str| lin.remove(m).ok_or_else(|| EngineError::Input(format!("Qwen vision block {b} has no {m}")));
            let (qkv, proj) = (take("attn.qkv")?, take("attn.proj")?);
            let mlp = if cfg.v2_5 {
                Mlp::Gated { gate: take("mlp.gate_proj")?, up: take("mlp.up_proj")?, down: take("mlp.down_proj")? }
            } else {
                Mlp::Plain { fc1: take("mlp.fc1")?, fc2: take("mlp.fc2")? }
            };
            let [n1, n2] = QWEN_BLOCK_NORMS.map(|n| Norm::load(ws, &kp.pp(n), d, ln));
            blocks.push(QwenBlock { norm1: n1?, norm2: n2?, qkv, proj, mlp });
        }
        let (t, ps) = (cfg.temporal_patch_size, cfg.patch_size);
        let hd = d / cfg.num_heads;
        let quarter = hd / 4;
        let inv_freq =
            (0..quarter).map(|j| (1.0 / cfg.rope_theta.powf((2 * j) as f64 / (hd / 2) as f64)) as f32).collect();
        let [m1, m2] = qwen_merger_linears(cfg)
            .map(|(m, fi, fo)| Linear::load(ws, &on_disk.key(m), canonical.key(m), fi, fo, true, keep_16bit));
        Ok(QwenVision {
            cfg: cfg.clone(),
            patch_w: ws.f32(&on_disk.key(QWEN_PATCH_EMBED), &[d, cfg.in_channels, t, ps, ps])?,
            blocks,
            merger_norm: Norm::load(ws, &on_disk.pp(QWEN_MERGER_NORM), d, ln)?,
            merger_1: m1?,
            merger_2: m2?,
            inv_freq,
        })
    }

    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.blocks
            .iter()
            .flat_map(|b| {
                let mlp: Vec<&Linear> = match &b.mlp {
                    Mlp::Gated { gate, up, down } => vec![gate, up, down],
                    Mlp::Plain { fc1, fc2 } => vec![fc1, fc2],
                };
                [&b.qkv, &b.proj].into_iter().chain(mlp)
            })
            .chain([&self.merger_1, &self.merger_2])
    }

    /// The decoder rows of an image: `patches` (grid t·h·w rows of 3·T·P·P values, in the processor's order)
    /// become (t · h/m · w/m, out_hidden_size) rows in raster order of the merged grid.
    pub fn forward(&self, patches: &[f32], grid: [usize; 3], adapter: Option<&Adapter>) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let [gt, gh, gw] = grid;
        let (p, m, d) = (cfg.patch_size, cfg.spatial_merge_size, cfg.hidden_size);
        let k = 3 * cfg.temporal_patch_size * p * p;
        let n = gt * gh * gw;
        if n == 0 || gh % m != 0 || gw % m != 0 || patches.len() != n * k {
            return Err(EngineError::Input(format!(
                "pixel values of {} values for a {gt}x{gh}x{gw} patch grid; the vision transformer takes rows of {k} \
                 values and a grid whose sides are multiples of {m}",
                patches.len()
            )));
        }
        let unit = m * m;
        let (lh, lw) = (gh / m, gw / m);
        // Patch positions (row, column) in the processor's order: merged unit by unit, raster inside.
        let mut pos: Vec<(usize, usize)> = Vec::with_capacity(n);
        for _ in 0..gt {
            for by in 0..lh {
                for bx in 0..lw {
                    for iy in 0..m {
                        for ix in 0..m {
                            pos.push((by * m + iy, bx * m + ix));
                        }
                    }
                }
            }
        }
        // Window order of the merged units (Qwen2.5-VL) and each window's length in patches.
        let (order, windows) = self.windows(gt, lh, lw);
        let mut x = vec![0f32; n * d];
        matmul_nt(&mut x, patches, &self.patch_w, n, k, d, MatmulMode::Assign);
        let permute = |v: &[f32], width: usize| -> Vec<f32> {
            let mut out = Vec::with_capacity(v.len());
            for &u in &order {
                out.extend_from_slice(&v[u * unit * width..(u + 1) * unit * width]);
            }
            out
        };
        let mut x = permute(&x, d);
        let pos: Vec<(usize, usize)> =
            order.iter().flat_map(|&u| pos[u * unit..(u + 1) * unit].iter().copied()).collect();
        let (cos, sin) = self.rotary(&pos);
        let whole = vec![n];
        let (heads, hd) = (cfg.num_heads, d / cfg.num_heads);
        let mut h = vec![0f32; n * d];
        for (bi, b) in self.blocks.iter().enumerate() {
            crate::interrupt::beat();
            let segments = if cfg.v2_5 && !cfg.fullatt_block_indexes.contains(&bi) { &windows } else { &whole };
            b.norm1.apply(&mut h, &x);
            let qkv = b.qkv.apply(&h, n, adapter); // (N, 3, H, hd)
            let (mut q, mut kk, mut v) = (vec![0f32; n * d], vec![0f32; n * d], vec![0f32; n * d]);
            for r in 0..n {
                let row = &qkv[r * 3 * d..(r + 1) * 3 * d];
                q[r * d..(r + 1) * d].copy_from_slice(&row[..d]);
                kk[r * d..(r + 1) * d].copy_from_slice(&row[d..2 * d]);
                v[r * d..(r + 1) * d].copy_from_slice(&row[2 * d..]);
            }
            rotate(&mut q, &cos, &sin, heads, hd);
            rotate(&mut kk, &cos, &sin, heads, hd);
            let mut att = vec![0f32; n * d];
            let scale = (hd as f32).powf(-0.5);
            let mut start = 0;
            for &len in segments.iter() {
                let s = start * d..(start + len) * d;
                attend_dense(
                    &mut att[s.clone()],
                    &q[s.clone()],
                    &kk[s.clone()],
                    &v[s],
                    len,
                    len,
                    0,
                    heads,
                    heads,
                    hd,
                    scale,
                    false,
                );
                start += len;
            }
            b.proj.forward(&mut x, &att, n, adapter, MatmulMode::Accumulate);
            b.norm2.apply(&mut h, &x);
            match &b.mlp {
                Mlp::Gated { gate, up, down } => {
                    let mut g = gate.apply(&h, n, adapter);
                    let u = up.apply(&h, n, adapter);
                    if cfg.hidden_act == Activation::Silu {
                        silu_mul(&mut g, &u);
                    } else {
                        apply_activation(&mut g, cfg.hidden_act);
                        g.iter_mut().zip(&u).for_each(|(a, b)| *a *= b);
                    }
                    down.forward(&mut x, &g, n, adapter, MatmulMode::Accumulate);
                }
                Mlp::Plain { fc1, fc2 } => {
                    let mut a = fc1.apply(&h, n, adapter);
                    apply_activation(&mut a, cfg.hidden_act);
                    fc2.forward(&mut x, &a, n, adapter, MatmulMode::Accumulate);
                }
            }
        }
        // The merger: norm, m² patches side by side, Linear, GELU, Linear.
        self.merger_norm.apply(&mut h, &x);
        let units = n / unit;
        let mut y = self.merger_1.apply(&h, units, adapter);
        apply_activation(&mut y, Activation::Gelu);
        let y = self.merger_2.apply(&y, units, adapter);
        // Back to raster order.
        let c = cfg.out_hidden_size;
        let mut out = vec![0f32; units * c];
        for (i, &u) in order.iter().enumerate() {
            out[u * c..(u + 1) * c].copy_from_slice(&y[i * c..(i + 1) * c]);
        }
        Ok(out)
    }

    /// The merged units in attention order and the windows' lengths in patches: Qwen2.5-VL groups the units
    /// window by window (`window_size` / merge / patch units a side, raster inside and across windows, frame by
    /// frame); Qwen2-VL keeps raster order in one window per frame.
    fn windows(&self, gt: usize, lh: usize, lw: usize) -> (Vec<usize>, Vec<usize>) {
        let cfg = &self.cfg;
        let unit = cfg.spatial_merge_size * cfg.spatial_merge_size;
        if !cfg.v2_5 {
            return ((0..gt * lh * lw).collect(), vec![lh * lw * unit; gt]);
        }
        let side = cfg.window_size / cfg.spatial_merge_size / cfg.patch_size;
        let (mut order, mut lens) = (Vec::with_capacity(gt * lh * lw), Vec::new());
        for f in 0..gt {
            for wy in (0..lh).step_by(side) {
                for wx in (0..lw).step_by(side) {
                    let before = order.len();
                    for y in wy..(wy + side).min(lh) {
                        for x in wx..(wx + side).min(lw) {
                            order.push(f * lh * lw + y * lw + x);
                        }
                    }
                    lens.push((order.len() - before) * unit);
                }
            }
        }
        (order, lens)
    }

    /// cos and sin (rows, head_dim / 2) of each patch's rotation: row angles, then column angles.
    fn rotary(&self, pos: &[(usize, usize)]) -> (Vec<f32>, Vec<f32>) {
        let q = self.inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(pos.len() * 2 * q), Vec::with_capacity(pos.len() * 2 * q));
        for &(r, c) in pos {
            for (p, f) in [(r, &self.inv_freq), (c, &self.inv_freq)] {
                for &fr in f.iter() {
                    // f32 angle like transformers, then an accurate cos/sin of it.
                    let a = (p as f32 * fr) as f64;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        (cos, sin)
    }
}

/// Rotate-half RoPE of x (rows, heads, hd) with per-row angles (rows, hd / 2).
fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32], heads: usize, hd: usize) {
    let half = hd / 2;
    for (r, row) in x.chunks_exact_mut(heads * hd).enumerate() {
        let (c, s) = (&cos[r * half..(r + 1) * half], &sin[r * half..(r + 1) * half]);
        for head in row.chunks_exact_mut(hd) {
            for i in 0..half {
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * c[i] - b * s[i];
                head[i + half] = b * c[i] + a * s[i];
            }
        }
    }
}
