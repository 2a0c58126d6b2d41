//! Backward passes of the CPU ops, each with the same argument order as its forward (outputs' gradients first).
//!
//! Gradient convention, kept by every function here: gradients of PARAMETERS (norm weights and biases, linear
//! weights and biases, embedding tables) ACCUMULATE (`+=`) into the buffer given, so one zeroing per step serves
//! any number of micro-batches; gradients of ACTIVATIONS (inputs of the op) are ASSIGNED (`=`), whatever the
//! buffer held before, unless a function says otherwise (`matmul_nt_bwd_x` takes a `MatmulMode`).
//!
//! Every function is checked against central finite differences of a float64 forward in
//! `engine/tests/backward_fd.rs`.

use crate::config::Activation;
use crate::ops::MatmulMode;
use rayon::prelude::*;

/// Rows per norm call above which rows are split across threads (same threshold as the forward).
const PAR_ROWS: usize = 16;
/// Elementwise ops shorter than this stay on one thread.
const PAR_MIN: usize = 1 << 15;

// ---------------------------------------------------------------------------------------------------------------
// Norms

/// out = x / sqrt(mean(x^2)+eps) * w (rows, dim). dx assign; dw accumulate (skip if None).
///
/// With inv = 1/sqrt(mean(x^2)+eps) and g = dout * w:
/// dx = inv * g - inv^3 / dim * x * Σ_j g_j x_j,   dw += Σ_rows dout * x * inv.
pub fn rmsnorm_bwd(dx: &mut [f32], dw: Option<&mut [f32]>, dout: &[f32], x: &[f32], w: &[f32], eps: f64) {
    let dim = w.len();
    assert!(dim > 0, "rmsnorm_bwd: empty weight");
    assert_eq!(x.len() % dim, 0, "rmsnorm_bwd: x is not (rows, {dim})");
    assert_eq!(dx.len(), x.len(), "rmsnorm_bwd: dx is not the shape of x");
    assert_eq!(dout.len(), x.len(), "rmsnorm_bwd: dout is not the shape of x");
    let rows = x.len() / dim;
    // writes one row of dx, returns the row's inv
    let row = |dxr: &mut [f32], xr: &[f32], dr: &[f32]| -> f64 {
        let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let inv = 1.0 / (ss / dim as f64 + eps).sqrt();
        let gx: f64 = xr.iter().zip(dr).zip(w).map(|((&v, &d), &wj)| (d as f64) * (wj as f64) * (v as f64)).sum();
        let coef = inv * inv * inv * gx / dim as f64;
        for (((o, &v), &d), &wj) in dxr.iter_mut().zip(xr).zip(dr).zip(w) {
            *o = (inv * (d as f64) * (wj as f64) - coef * v as f64) as f32;
        }
        inv
    };
    let invs: Vec<f64> = if rows >= PAR_ROWS {
        dx.par_chunks_mut(dim)
            .zip(x.par_chunks(dim))
            .zip(dout.par_chunks(dim))
            .map(|((o, xr), dr)| row(o, xr, dr))
            .collect()
    } else {
        dx.chunks_mut(dim).zip(x.chunks(dim)).zip(dout.chunks(dim)).map(|((o, xr), dr)| row(o, xr, dr)).collect()
    }; // (rows)
    if let Some(dw) = dw {
        assert_eq!(dw.len(), dim, "rmsnorm_bwd: dw is not (dim)");
        let mut acc = vec![0f64; dim];
        for ((xr, dr), &inv) in x.chunks(dim).zip(dout.chunks(dim)).zip(&invs) {
            for ((a, &v), &d) in acc.iter_mut().zip(xr).zip(dr) {
                *a += (d as f64) * (v as f64) * inv;
            }
        }
        dw.iter_mut().zip(&acc).for_each(|(g, &a)| *g += a as f32);
    }
}

/// out = (x-mean)/sqrt(var+eps)*w + b (biased var). dx assign; dw, db accumulate.
///
/// With xhat = (x-mean)*inv and g = dout * w:
/// dx = inv * (g - mean(g) - xhat * mean(g * xhat)),   dw += Σ_rows dout * xhat,   db += Σ_rows dout.
pub fn layernorm_bwd(
    dx: &mut [f32],
    dw: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    eps: f64,
) {
    let dim = w.len();
    assert!(dim > 0, "layernorm_bwd: empty weight");
    assert_eq!(x.len() % dim, 0, "layernorm_bwd: x is not (rows, {dim})");
    assert_eq!(dx.len(), x.len(), "layernorm_bwd: dx is not the shape of x");
    assert_eq!(dout.len(), x.len(), "layernorm_bwd: dout is not the shape of x");
    let rows = x.len() / dim;
    let n = dim as f64;
    // writes one row of dx, returns the row's (mean, inv)
    let row = |dxr: &mut [f32], xr: &[f32], dr: &[f32]| -> (f64, f64) {
        let mean: f64 = xr.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var: f64 = xr.iter().map(|&v| (v as f64 - mean) * (v as f64 - mean)).sum::<f64>() / n;
        let inv = 1.0 / (var + eps).sqrt();
        let (mut g_mean, mut gx_mean) = (0f64, 0f64);
        for ((&v, &d), &wj) in xr.iter().zip(dr).zip(w) {
            let g = (d as f64) * (wj as f64);
            g_mean += g;
            gx_mean += g * (v as f64 - mean) * inv;
        }
        g_mean /= n;
        gx_mean /= n;
        for (((o, &v), &d), &wj) in dxr.iter_mut().zip(xr).zip(dr).zip(w) {
            let xhat = (v as f64 - mean) * inv;
            *o = (inv * ((d as f64) * (wj as f64) - g_mean - xhat * gx_mean)) as f32;
        }
        (mean, inv)
    };
    let stats: Vec<(f64, f64)> = if rows >= PAR_ROWS {
        dx.par_chunks_mut(dim)
            .zip(x.par_chunks(dim))
            .zip(dout.par_chunks(dim))
            .map(|((o, xr), dr)| row(o, xr, dr))
            .collect()
    } else {
        dx.chunks_mut(dim).zip(x.chunks(dim)).zip(dout.chunks(dim)).map(|((o, xr), dr)| row(o, xr, dr)).collect()
    }; // (rows)
    if let Some(dw) = dw {
        assert_eq!(dw.len(), dim, "layernorm_bwd: dw is not (dim)");
        let mut acc = vec![0f64; dim];
        for ((xr, dr), &(mean, inv)) in x.chunks(dim).zip(dout.chunks(dim)).zip(&stats) {
            for ((a, &v), &d) in acc.iter_mut().zip(xr).zip(dr) {
                *a += (d as f64) * (v as f64 - mean) * inv;
            }
        }
        dw.iter_mut().zip(&acc).for_each(|(g, &a)| *g += a as f32);
    }
    if let Some(db) = db {
        assert_eq!(db.len(), dim, "layernorm_bwd: db is not (dim)");
        bias_bwd(db, dout);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Activations

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// d act(x) / dx for the exact functions of `ops::act::activate`.
#[inline]
fn activation_derivative(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Gelu => {
            // 0.5 (1 + erf(x/√2)) + x φ(x), φ the standard normal density
            let cdf = 0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = (-0.5 * x * x).exp() * (0.5 * std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2);
            cdf + x * pdf
        }
        Activation::GeluTanh => {
            let c = (2.0f32 / std::f32::consts::PI).sqrt();
            let t = (c * (x + 0.044715 * x * x * x)).tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
        }
        Activation::QuickGelu => {
            let s = sigmoid(1.702 * x);
            s + 1.702 * x * s * (1.0 - s)
        }
        Activation::Silu => {
            let s = sigmoid(x);
            s * (1.0 + x * (1.0 - s))
        }
    }
}

/// out = act(x) elementwise (x = pre-activation). dx assign.
pub fn activation_bwd(dx: &mut [f32], dout: &[f32], x: &[f32], act: Activation) {
    assert_eq!(dx.len(), x.len(), "activation_bwd: dx is not the shape of x");
    assert_eq!(dout.len(), x.len(), "activation_bwd: dout is not the shape of x");
    let f = |((o, &d), &v): ((&mut f32, &f32), &f32)| *o = d * activation_derivative(act, v);
    if x.len() >= PAR_MIN {
        dx.par_chunks_mut(4096)
            .zip(dout.par_chunks(4096).zip(x.par_chunks(4096)))
            .for_each(|(o, (d, v))| o.iter_mut().zip(d).zip(v).for_each(f));
    } else {
        dx.iter_mut().zip(dout).zip(x).for_each(f);
    }
}

/// out = silu(g) * u. dg, du assign.
pub fn silu_mul_bwd(dg: &mut [f32], du: &mut [f32], dout: &[f32], g: &[f32], u: &[f32]) {
    let n = g.len();
    assert!(
        dg.len() == n && du.len() == n && dout.len() == n && u.len() == n,
        "silu_mul_bwd: buffers differ in length"
    );
    // one chunk of every buffer
    let chunk = |dg: &mut [f32], du: &mut [f32], dout: &[f32], g: &[f32], u: &[f32]| {
        for i in 0..g.len() {
            let s = sigmoid(g[i]);
            du[i] = dout[i] * g[i] * s;
            dg[i] = dout[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
        }
    };
    if n >= PAR_MIN {
        dg.par_chunks_mut(4096)
            .zip(du.par_chunks_mut(4096))
            .zip(dout.par_chunks(4096))
            .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
            .for_each(|(((a, b), d), (gc, uc))| chunk(a, b, d, gc, uc));
    } else {
        chunk(dg, du, dout, g, u);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Attention

/// Raw pointer shared by the per-head tasks; each task writes only columns no other task writes.
struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

/// Backward of engine::ops::attend_dense (same argument meaning): q (tq, heads, hd) at positions start.., k/v (tk, kv_heads, hd);
/// recompute the softmax from q,k (no saved probabilities needed). dq (tq,heads,hd) assign; dk, dv (tk, kv_heads, hd) assign
/// (for GQA/MQA summed over the query heads of a group).
///
/// Per head, with P = softmax(scale·Q·Kᵀ) (masked):
/// dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS = P ∘ (dP − rowsum(P ∘ dP)),  dQ = scale·dS·K,  dK = scale·dSᵀ·Q.
/// Kv groups run in parallel; the heads of one group are folded in parallel into a few (tk, hd) accumulators
/// (one per rayon split, not one per head), which are summed and then written to the group's dk/dv columns.
/// Only the first tk rows of dk and dv are written (k and v may be longer, as in the forward).
#[allow(clippy::too_many_arguments)]
pub fn attend_dense_bwd(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    tq: usize,
    tk: usize,
    start: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
    mask: super::attention::Mask,
) {
    let hd = head_dim;
    assert!(
        kv_heads > 0 && heads.is_multiple_of(kv_heads),
        "attend_dense_bwd: heads {heads} not a multiple of kv_heads {kv_heads}"
    );
    let group = heads / kv_heads;
    let (q_stride, kv_stride) = (heads * hd, kv_heads * hd);
    assert_eq!(q.len(), tq * q_stride, "attend_dense_bwd: q is not (tq, heads, hd)");
    assert_eq!(dq.len(), tq * q_stride, "attend_dense_bwd: dq is not (tq, heads, hd)");
    assert_eq!(dout.len(), tq * q_stride, "attend_dense_bwd: dout is not (tq, heads, hd)");
    assert!(
        k.len() >= tk * kv_stride && v.len() >= tk * kv_stride,
        "attend_dense_bwd: k/v shorter than (tk, kv_heads, hd)"
    );
    assert!(
        dk.len() >= tk * kv_stride && dv.len() >= tk * kv_stride,
        "attend_dense_bwd: dk/dv shorter than (tk, kv_heads, hd)"
    );
    if tq == 0 || tk == 0 || hd == 0 {
        dq.fill(0.0);
        dk[..tk * kv_stride].fill(0.0);
        dv[..tk * kv_stride].fill(0.0);
        return;
    }
    let (dq_ptr, dk_ptr, dv_ptr) = (SharedMut(dq.as_mut_ptr()), SharedMut(dk.as_mut_ptr()), SharedMut(dv.as_mut_ptr()));
    let (dq_ref, dk_ref, dv_ref) = (&dq_ptr, &dk_ptr, &dv_ptr);

    // One query head: writes its dq columns, adds its dK/dV contribution into acc = [dk (tk, hd) | dv (tk, hd)].
    let head_bwd = |h: usize, acc: &mut [f32]| {
        let kvh = h / group;
        let (acc_k, acc_v) = acc.split_at_mut(tk * hd);
        let mut p = vec![0f32; tq * tk]; // (tq, tk) probabilities
        let mut dp = vec![0f32; tq * tk]; // (tq, tk) dP, then dS·scale
                                          // SAFETY (all gemm calls below): strides address q's, dout's and dq's head-h columns and k's and v's
                                          // head-kvh columns within the asserted extents; this task alone writes dq's head-h columns; acc is ours.
                                          // P = softmax(scale · Q_h · K_kvhᵀ), recomputed exactly as in attend_dense (same function).
        super::attention::head_probs(&mut p, q, k, h, kvh, tq, tk, start, heads, kv_heads, hd, scale, mask);
        unsafe {
            // dP = dO_h · V_kvhᵀ   (tq, tk)
            gemm::gemm(
                tq,
                tk,
                hd,
                dp.as_mut_ptr(),
                1,
                tk as isize,
                false,
                dout.as_ptr().add(h * hd),
                1,
                q_stride as isize,
                v.as_ptr().add(kvh * hd),
                kv_stride as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
            // dV += Pᵀ · dO_h   (tk, hd)
            gemm::gemm(
                tk,
                hd,
                tq,
                acc_v.as_mut_ptr(),
                1,
                hd as isize,
                true,
                p.as_ptr(),
                tk as isize,
                1,
                dout.as_ptr().add(h * hd),
                1,
                q_stride as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        // dS = P ∘ (dP − Σ_j P_j dP_j), times scale so that dQ and dK need no further scaling
        for (prow, drow) in p.chunks_exact(tk).zip(dp.chunks_exact_mut(tk)) {
            let dot: f32 = prow.iter().zip(drow.iter()).map(|(&a, &b)| a * b).sum();
            for (d, &pj) in drow.iter_mut().zip(prow) {
                *d = scale * pj * (*d - dot);
            }
        }
        unsafe {
            // dQ_h = dS · K_kvh   (tq, hd), assigned
            gemm::gemm(
                tq,
                hd,
                tk,
                dq_ref.0.add(h * hd),
                1,
                q_stride as isize,
                false,
                dp.as_ptr(),
                1,
                tk as isize,
                k.as_ptr().add(kvh * hd),
                1,
                kv_stride as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
            // dK += dSᵀ · Q_h   (tk, hd)
            gemm::gemm(
                tk,
                hd,
                tq,
                acc_k.as_mut_ptr(),
                1,
                hd as isize,
                true,
                dp.as_ptr(),
                tk as isize,
                1,
                q.as_ptr().add(h * hd),
                1,
                q_stride as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    };

    (0..kv_heads).into_par_iter().for_each(|kvh| {
        let acc = (kvh * group..(kvh + 1) * group)
            .into_par_iter()
            .fold(
                || vec![0f32; 2 * tk * hd],
                |mut acc, h| {
                    head_bwd(h, &mut acc);
                    acc
                },
            )
            .reduce_with(|mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            })
            .expect("a kv group has at least one query head");
        let (acc_k, acc_v) = acc.split_at(tk * hd);
        for t in 0..tk {
            let off = t * kv_stride + kvh * hd;
            // SAFETY: rows t < tk of the kvh columns lie within the asserted dk/dv extents; only this task
            // writes them.
            unsafe {
                std::ptr::copy_nonoverlapping(acc_k.as_ptr().add(t * hd), dk_ref.0.add(off), hd);
                std::ptr::copy_nonoverlapping(acc_v.as_ptr().add(t * hd), dv_ref.0.add(off), hd);
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------------------------
// Output head

/// Given logits (rows, vocab) and one target per row with upstream scalar weight dlogp[r] = dL/d(log_softmax(logits[r])[targets[r]]),
/// write dlogits (rows, vocab) assign = dlogp[r] * (onehot(target) - softmax(logits[r])). Also return the log-probs of the targets (Vec<f32>).
pub fn logprob_gather_fwd_bwd(
    dlogits: &mut [f32],
    logits: &[f32],
    targets: &[u32],
    dlogp: &[f32],
    vocab: usize,
) -> Vec<f32> {
    let rows = targets.len();
    assert_eq!(logits.len(), rows * vocab, "logprob_gather_fwd_bwd: logits is not (rows, vocab)");
    assert_eq!(dlogits.len(), rows * vocab, "logprob_gather_fwd_bwd: dlogits is not (rows, vocab)");
    assert_eq!(dlogp.len(), rows, "logprob_gather_fwd_bwd: dlogp is not (rows)");
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        panic!("logprob_gather_fwd_bwd: target {bad} is outside the vocabulary of {vocab}");
    }
    let mut logp = vec![0f32; rows]; // (rows)
    dlogits
        .par_chunks_mut(vocab.max(1))
        .zip(logits.par_chunks(vocab.max(1)))
        .zip(targets.par_iter().zip(dlogp.par_iter()))
        .zip(logp.par_iter_mut())
        .for_each(|(((drow, row), (&t, &dl)), lp)| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
            let lse = max as f64 + sum.ln();
            *lp = (row[t as usize] as f64 - lse) as f32;
            for (d, &v) in drow.iter_mut().zip(row) {
                *d = -dl * ((v as f64 - lse).exp() as f32);
            }
            drow[t as usize] += dl;
        });
    logp
}

// ---------------------------------------------------------------------------------------------------------------
// Linear layers and embeddings

/// y (m,n) = x (m,k) · wᵀ with w (n,k) row-major. dx (m,k) = dy·w: assign or accumulate per `mode`.
pub fn matmul_nt_bwd_x(dx: &mut [f32], dy: &[f32], w: &[f32], m: usize, k: usize, n: usize, mode: MatmulMode) {
    assert_eq!(dx.len(), m * k, "matmul_nt_bwd_x: dx is not (m, k)");
    assert_eq!(dy.len(), m * n, "matmul_nt_bwd_x: dy is not (m, n)");
    assert_eq!(w.len(), n * k, "matmul_nt_bwd_x: w is not (n, k)");
    if m == 0 || k == 0 {
        return;
    }
    if n == 0 {
        if mode == MatmulMode::Assign {
            dx.fill(0.0);
        }
        return;
    }
    // SAFETY: the asserts above pin every extent. dx (m, k) = dy (m, n) · w (n, k).
    unsafe {
        gemm::gemm(
            m,
            k,
            n,
            dx.as_mut_ptr(),
            1,
            k as isize,
            mode == MatmulMode::Accumulate,
            dy.as_ptr(),
            1,
            n as isize,
            w.as_ptr(),
            1,
            k as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}

/// dw (n,k) += dyᵀ · x. (accumulate)
pub fn matmul_nt_bwd_w(dw: &mut [f32], dy: &[f32], x: &[f32], m: usize, k: usize, n: usize) {
    assert_eq!(dw.len(), n * k, "matmul_nt_bwd_w: dw is not (n, k)");
    assert_eq!(dy.len(), m * n, "matmul_nt_bwd_w: dy is not (m, n)");
    assert_eq!(x.len(), m * k, "matmul_nt_bwd_w: x is not (m, k)");
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // SAFETY: the asserts above pin every extent. dw (n, k) += dyᵀ (n, m) · x (m, k); dyᵀ read by strides.
    unsafe {
        gemm::gemm(
            n,
            k,
            m,
            dw.as_mut_ptr(),
            1,
            k as isize,
            true,
            dy.as_ptr(),
            n as isize,
            1,
            x.as_ptr(),
            1,
            k as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}

/// db (n) += column sums of dy (m,n).
pub fn bias_bwd(db: &mut [f32], dy: &[f32]) {
    let n = db.len();
    if n == 0 {
        return;
    }
    assert_eq!(dy.len() % n, 0, "bias_bwd: dy is not (m, {n})");
    let mut acc = vec![0f64; n];
    for row in dy.chunks_exact(n) {
        acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v as f64);
    }
    db.iter_mut().zip(&acc).for_each(|(g, &a)| *g += a as f32);
}

/// Embedding lookup backward: dtable (vocab, dim) += dout rows scattered by ids.
pub fn embedding_bwd(dtable: &mut [f32], dout: &[f32], ids: &[u32], dim: usize) {
    assert_eq!(dout.len(), ids.len() * dim, "embedding_bwd: dout is not (ids, dim)");
    if dim == 0 {
        return;
    }
    assert_eq!(dtable.len() % dim, 0, "embedding_bwd: dtable is not (vocab, {dim})");
    let vocab = dtable.len() / dim;
    for (&id, row) in ids.iter().zip(dout.chunks_exact(dim)) {
        let id = id as usize;
        assert!(id < vocab, "embedding_bwd: id {id} is outside the table of {vocab} rows");
        dtable[id * dim..(id + 1) * dim].iter_mut().zip(row).for_each(|(g, &v)| *g += v);
    }
}
