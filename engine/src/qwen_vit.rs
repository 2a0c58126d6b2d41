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
use crate::ops::backward::{activation_bwd, attend_dense_bwd, layernorm_bwd, rmsnorm_bwd, silu_mul_bwd};
use crate::ops::{add_inplace, apply_activation, attend_dense, layernorm, matmul_nt, rmsnorm, Mask, MatmulMode};
use crate::train::Grads;
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
    /// dx (assigned) from d out; the norm's own weights are not trained.
    fn backward(&self, dx: &mut [f32], dout: &[f32], x: &[f32]) {
        match &self.b {
            Some(_) => layernorm_bwd(dx, None, None, dout, x, &self.w, NORM_EPS),
            None => rmsnorm_bwd(dx, None, dout, x, &self.w, NORM_EPS),
        }
    }

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

/// What one block's backward needs (rows in attention order).
pub struct QwenBlockTape {
    x_in: Vec<f32>,
    h1: Vec<f32>,
    q: Vec<f32>, // after RoPE
    k: Vec<f32>, // after RoPE
    v: Vec<f32>,
    att: Vec<f32>,
    x_mid: Vec<f32>,
    h2: Vec<f32>,
    /// gate_proj (Qwen2.5) or fc1 (Qwen2) output, before the activation.
    pre: Vec<f32>,
    /// up_proj output (Qwen2.5); empty for Qwen2.
    up: Vec<f32>,
    /// The input of down_proj / fc2.
    act: Vec<f32>,
    segments: Vec<usize>,
}

/// `QwenVision::forward_train`'s record for `backward`.
pub struct QwenVisionTape {
    order: Vec<usize>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    blocks: Vec<QwenBlockTape>,
    x_final: Vec<f32>,
    h_merge: Vec<f32>,
    y1: Vec<f32>,
    a1: Vec<f32>,
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
        self.run(patches, grid, adapter, false).map(|(out, _)| out)
    }

    /// `forward` keeping what `backward` needs (LoRA training through the vision transformer).
    pub fn forward_train(
        &self,
        patches: &[f32],
        grid: [usize; 3],
        adapter: Option<&Adapter>,
    ) -> Result<(Vec<f32>, QwenVisionTape)> {
        let (out, tape) = self.run(patches, grid, adapter, true)?;
        Ok((out, tape.ok_or_else(|| EngineError::Input("the vision transformer kept no tape".into()))?))
    }

    fn run(
        &self,
        patches: &[f32],
        grid: [usize; 3],
        adapter: Option<&Adapter>,
        keep: bool,
    ) -> Result<(Vec<f32>, Option<QwenVisionTape>)> {
        let cfg = &self.cfg;
        let [gt, gh, gw] = grid;
        let (p, m, d) = (cfg.patch_size, cfg.spatial_merge_size, cfg.hidden_size);
        let k = 3 * cfg.temporal_patch_size * p * p;
        let n = gt * gh * gw;
        if n == 0 || !gh.is_multiple_of(m) || !gw.is_multiple_of(m) || patches.len() != n * k {
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
        let mut x: Vec<f32> = order.iter().flat_map(|&u| x[u * unit * d..(u + 1) * unit * d].iter().copied()).collect();
        let pos: Vec<(usize, usize)> =
            order.iter().flat_map(|&u| pos[u * unit..(u + 1) * unit].iter().copied()).collect();
        let (cos, sin) = self.rotary(&pos);
        let whole = vec![n];
        let mut tapes = Vec::new();
        for (bi, b) in self.blocks.iter().enumerate() {
            crate::interrupt::beat();
            let segments = if cfg.v2_5 && !cfg.fullatt_block_indexes.contains(&bi) { &windows } else { &whole };
            let t = self.block_forward(b, &mut x, &cos, &sin, segments, adapter, keep);
            tapes.extend(t);
        }
        // The merger: norm, m² patches side by side, Linear, GELU, Linear.
        let mut h = vec![0f32; n * d];
        self.merger_norm.apply(&mut h, &x);
        let units = n / unit;
        let y1 = self.merger_1.apply(&h, units, adapter);
        let mut a1 = y1.clone();
        apply_activation(&mut a1, Activation::Gelu);
        let y = self.merger_2.apply(&a1, units, adapter);
        // Back to raster order.
        let c = cfg.out_hidden_size;
        let mut out = vec![0f32; units * c];
        for (i, &u) in order.iter().enumerate() {
            out[u * c..(u + 1) * c].copy_from_slice(&y[i * c..(i + 1) * c]);
        }
        let tape = keep.then_some(QwenVisionTape { order, cos, sin, blocks: tapes, x_final: x, h_merge: h, y1, a1 });
        Ok((out, tape))
    }

    /// One block over x (N, D) in attention order, in place; with `keep`, what its backward needs.
    #[allow(clippy::too_many_arguments)]
    fn block_forward(
        &self,
        b: &QwenBlock,
        x: &mut [f32],
        cos: &[f32],
        sin: &[f32],
        segments: &[usize],
        adapter: Option<&Adapter>,
        keep: bool,
    ) -> Option<QwenBlockTape> {
        let cfg = &self.cfg;
        let d = cfg.hidden_size;
        let n = x.len() / d;
        let (heads, hd) = (cfg.num_heads, d / cfg.num_heads);
        let mut h1 = vec![0f32; n * d];
        b.norm1.apply(&mut h1, x);
        let qkv = b.qkv.apply(&h1, n, adapter); // (N, 3, H, hd)
        let (mut q, mut k, mut v) = (vec![0f32; n * d], vec![0f32; n * d], vec![0f32; n * d]);
        for r in 0..n {
            let row = &qkv[r * 3 * d..(r + 1) * 3 * d];
            q[r * d..(r + 1) * d].copy_from_slice(&row[..d]);
            k[r * d..(r + 1) * d].copy_from_slice(&row[d..2 * d]);
            v[r * d..(r + 1) * d].copy_from_slice(&row[2 * d..]);
        }
        rotate(&mut q, cos, sin, heads, hd, 1.0);
        rotate(&mut k, cos, sin, heads, hd, 1.0);
        let mut att = vec![0f32; n * d];
        let scale = (hd as f32).powf(-0.5);
        for (s, len) in segment_ranges(segments, d) {
            attend_dense(
                &mut att[s.clone()],
                &q[s.clone()],
                &k[s.clone()],
                &v[s],
                len,
                len,
                0,
                heads,
                heads,
                hd,
                scale,
                Mask::Full,
            );
        }
        let x_in = keep.then(|| x.to_vec());
        b.proj.forward(x, &att, n, adapter, MatmulMode::Accumulate);
        let x_mid = keep.then(|| x.to_vec());
        let mut h2 = vec![0f32; n * d];
        b.norm2.apply(&mut h2, x);
        let (pre, up, act) = match &b.mlp {
            Mlp::Gated { gate, up, down } => {
                let g = gate.apply(&h2, n, adapter);
                let u = up.apply(&h2, n, adapter);
                let mut a = g.clone();
                apply_activation(&mut a, cfg.hidden_act);
                a.iter_mut().zip(&u).for_each(|(a, u)| *a *= u);
                down.forward(x, &a, n, adapter, MatmulMode::Accumulate);
                (g, u, a)
            }
            Mlp::Plain { fc1, fc2 } => {
                let pre = fc1.apply(&h2, n, adapter);
                let mut a = pre.clone();
                apply_activation(&mut a, cfg.hidden_act);
                fc2.forward(x, &a, n, adapter, MatmulMode::Accumulate);
                (pre, Vec::new(), a)
            }
        };
        Some(QwenBlockTape {
            x_in: x_in?,
            h1,
            q,
            k,
            v,
            att,
            x_mid: x_mid?,
            h2,
            pre,
            up,
            act,
            segments: segments.to_vec(),
        })
    }

    /// Backward of `forward_train` from d features (rows in raster order, out_hidden_size): LoRA gradients of
    /// the blocks' and the merger's linear layers accumulate into `grads` (the patch embedding and the norms are
    /// not trained).
    pub fn backward(
        &self,
        tape: &QwenVisionTape,
        d_out: &[f32],
        adapter: Option<&Adapter>,
        mut grads: Option<&mut Grads>,
    ) {
        let cfg = &self.cfg;
        let (d, c) = (cfg.hidden_size, cfg.out_hidden_size);
        let units = tape.order.len();
        let n = tape.x_final.len() / d;
        let merged = self.merger_1.in_features;
        let mut dy = vec![0f32; units * c];
        for (i, &u) in tape.order.iter().enumerate() {
            dy[i * c..(i + 1) * c].copy_from_slice(&d_out[u * c..(u + 1) * c]);
        }
        let mut da = vec![0f32; units * merged];
        self.merger_2.backward(&mut da, &dy, &tape.a1, units, adapter, grads.as_deref_mut(), MatmulMode::Assign);
        let mut dy1 = vec![0f32; units * merged];
        activation_bwd(&mut dy1, &da, &tape.y1, Activation::Gelu);
        let mut dh = vec![0f32; n * d];
        self.merger_1.backward(&mut dh, &dy1, &tape.h_merge, units, adapter, grads.as_deref_mut(), MatmulMode::Assign);
        let mut dx = vec![0f32; n * d];
        self.merger_norm.backward(&mut dx, &dh, &tape.x_final);
        for (b, bt) in self.blocks.iter().zip(&tape.blocks).rev() {
            crate::interrupt::beat();
            self.block_backward(b, bt, &mut dx, &tape.cos, &tape.sin, adapter, grads.as_deref_mut());
        }
    }

    /// Backward of one block: `dx` (N, D), the gradient of its output, becomes the gradient of its input.
    #[allow(clippy::too_many_arguments)]
    fn block_backward(
        &self,
        b: &QwenBlock,
        t: &QwenBlockTape,
        dx: &mut Vec<f32>,
        cos: &[f32],
        sin: &[f32],
        adapter: Option<&Adapter>,
        mut grads: Option<&mut Grads>,
    ) {
        let cfg = &self.cfg;
        let d = cfg.hidden_size;
        let n = dx.len() / d;
        let (heads, hd) = (cfg.num_heads, d / cfg.num_heads);
        let mut dh2 = vec![0f32; n * d];
        match &b.mlp {
            Mlp::Gated { gate, up, down } => {
                let i = gate.out_features;
                let mut dact = vec![0f32; n * i];
                down.backward(&mut dact, dx, &t.act, n, adapter, grads.as_deref_mut(), MatmulMode::Assign);
                let (mut dg, mut du) = (vec![0f32; n * i], vec![0f32; n * i]);
                if cfg.hidden_act == Activation::Silu {
                    silu_mul_bwd(&mut dg, &mut du, &dact, &t.pre, &t.up);
                } else {
                    let mut f = t.pre.clone();
                    apply_activation(&mut f, cfg.hidden_act);
                    let dfu: Vec<f32> = dact.iter().zip(&t.up).map(|(a, u)| a * u).collect();
                    activation_bwd(&mut dg, &dfu, &t.pre, cfg.hidden_act);
                    du.iter_mut().zip(dact.iter().zip(&f)).for_each(|(o, (a, f))| *o = a * f);
                }
                gate.backward(&mut dh2, &dg, &t.h2, n, adapter, grads.as_deref_mut(), MatmulMode::Assign);
                up.backward(&mut dh2, &du, &t.h2, n, adapter, grads.as_deref_mut(), MatmulMode::Accumulate);
            }
            Mlp::Plain { fc1, fc2 } => {
                let i = fc1.out_features;
                let mut dact = vec![0f32; n * i];
                fc2.backward(&mut dact, dx, &t.act, n, adapter, grads.as_deref_mut(), MatmulMode::Assign);
                let mut dpre = vec![0f32; n * i];
                activation_bwd(&mut dpre, &dact, &t.pre, cfg.hidden_act);
                fc1.backward(&mut dh2, &dpre, &t.h2, n, adapter, grads.as_deref_mut(), MatmulMode::Assign);
            }
        }
        let mut dmid = vec![0f32; n * d];
        b.norm2.backward(&mut dmid, &dh2, &t.x_mid);
        add_inplace(&mut dmid, dx); // d x_mid = the residual's + the MLP branch's
        let mut datt = vec![0f32; n * d];
        b.proj.backward(&mut datt, &dmid, &t.att, n, adapter, grads.as_deref_mut(), MatmulMode::Assign);
        let (mut dq, mut dk, mut dv) = (vec![0f32; n * d], vec![0f32; n * d], vec![0f32; n * d]);
        let scale = (hd as f32).powf(-0.5);
        for (s, len) in segment_ranges(&t.segments, d) {
            let (q, k, v) = (&t.q[s.clone()], &t.k[s.clone()], &t.v[s.clone()]);
            let (dk, dv) = (&mut dk[s.clone()], &mut dv[s.clone()]);
            attend_dense_bwd(
                &mut dq[s.clone()],
                dk,
                dv,
                &datt[s],
                q,
                k,
                v,
                len,
                len,
                0,
                heads,
                heads,
                hd,
                scale,
                Mask::Full,
            );
        }
        rotate(&mut dq, cos, sin, heads, hd, -1.0);
        rotate(&mut dk, cos, sin, heads, hd, -1.0);
        let mut dqkv = vec![0f32; n * 3 * d];
        for r in 0..n {
            let row = &mut dqkv[r * 3 * d..(r + 1) * 3 * d];
            row[..d].copy_from_slice(&dq[r * d..(r + 1) * d]);
            row[d..2 * d].copy_from_slice(&dk[r * d..(r + 1) * d]);
            row[2 * d..].copy_from_slice(&dv[r * d..(r + 1) * d]);
        }
        let mut dh1 = vec![0f32; n * d];
        b.qkv.backward(&mut dh1, &dqkv, &t.h1, n, adapter, grads, MatmulMode::Assign);
        let mut din = vec![0f32; n * d];
        b.norm1.backward(&mut din, &dh1, &t.x_in);
        add_inplace(&mut din, &dmid);
        *dx = din;
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

/// Rotate-half RoPE of x (rows, heads, hd) with per-row angles (rows, hd / 2), by `sign` times them (-1: the
/// backward, the rotation being orthogonal).
fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32], heads: usize, hd: usize, sign: f32) {
    let half = hd / 2;
    for (r, row) in x.chunks_exact_mut(heads * hd).enumerate() {
        let (c, s) = (&cos[r * half..(r + 1) * half], &sin[r * half..(r + 1) * half]);
        for head in row.chunks_exact_mut(hd) {
            for i in 0..half {
                let (a, b, sn) = (head[i], head[i + half], sign * s[i]);
                head[i] = a * c[i] - b * sn;
                head[i + half] = b * c[i] + a * sn;
            }
        }
    }
}

/// The element range and row count of each attention segment (a window, or the whole image) of rows `d` wide.
fn segment_ranges(segments: &[usize], d: usize) -> impl Iterator<Item = (std::ops::Range<usize>, usize)> + '_ {
    segments.iter().scan(0usize, move |start, &len| {
        let r = *start * d..(*start + len) * d;
        *start += len;
        Some((r, len))
    })
}
