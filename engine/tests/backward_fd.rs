//! Every backward in `engine::ops::backward` against central finite differences of a float64 forward.
//!
//! For an op y = f(x) and a random upstream gradient dout, the scalar L = Σ dout · f(x) is computed in f64 and
//! dL/dx_i ≈ (L(x + h e_i) − L(x − h e_i)) / 2h with h = 1e-5 (truncation ~h², rounding ~1e-16/h: both far below
//! the f32 rounding of the analytic side). The analytic f32 gradient must agree within a relative L2 error
//! ‖analytic − numeric‖ / ‖numeric‖ < TOL. Each f64 forward is first checked against the engine's f32 forward,
//! so the gradients are those of the functions the model actually runs.
//!
//! Convention checked too: activation gradients are assigned (buffers pre-filled with NaN must come out clean,
//! and a second call gives the same values), parameter gradients accumulate (a second call doubles them).

use engine::config::{Activation, RopeScaling};
use engine::ops::backward::*;
use engine::ops::{
    apply_activation, attend_dense, layernorm, log_softmax_rows, rmsnorm, silu_mul, Mask, MatmulMode, Rope,
};
use engine::rng::SplitMix64;

/// Relative L2 error allowed between the f32 analytic gradient and the f64 numeric one.
const TOL: f64 = 1e-5;
/// Finite-difference step (f64).
const H: f64 = 1e-5;

fn randn(rng: &mut SplitMix64, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| ((rng.next_f64() * 2.0 - 1.0) as f32) * scale).collect()
}

fn to64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn dot64(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y).sum()
}

/// Central differences of a scalar function of x, every coordinate.
fn fd_grad(x: &[f32], loss: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = to64(x);
    (0..x.len())
        .map(|i| {
            let x0 = xp[i];
            xp[i] = x0 + H;
            let lp = loss(&xp);
            xp[i] = x0 - H;
            let lm = loss(&xp);
            xp[i] = x0;
            (lp - lm) / (2.0 * H)
        })
        .collect()
}

fn rel_l2(analytic: &[f32], numeric: &[f64]) -> f64 {
    assert_eq!(analytic.len(), numeric.len());
    assert!(analytic.iter().all(|v| v.is_finite()), "analytic gradient has non-finite values");
    let diff: f64 = analytic.iter().zip(numeric).map(|(&a, &n)| (a as f64 - n).powi(2)).sum();
    let norm: f64 = numeric.iter().map(|n| n * n).sum();
    (diff / norm.max(1e-300)).sqrt()
}

fn check(what: &str, analytic: &[f32], numeric: &[f64]) {
    let e = rel_l2(analytic, numeric);
    println!("{what:<60} rel L2 err {e:.2e}");
    assert!(e < TOL, "{what}: relative L2 error {e:.3e} >= {TOL:e}");
}

/// Max relative difference of an f32 forward against its f64 reference (scaled by the largest reference value).
fn fwd_err(a: &[f32], b: &[f64]) -> f64 {
    let scale = b.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs()).fold(0.0, f64::max) / scale
}

// ------------------------------------------------------------------------------------------------ f64 forwards

fn rmsnorm_ref(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let dim = w.len();
    let mut out = vec![0f64; x.len()];
    for (o, xr) in out.chunks_mut(dim).zip(x.chunks(dim)) {
        let ms = xr.iter().map(|v| v * v).sum::<f64>() / dim as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        for j in 0..dim {
            o[j] = xr[j] * inv * w[j];
        }
    }
    out
}

fn layernorm_ref(x: &[f64], w: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
    let dim = w.len();
    let mut out = vec![0f64; x.len()];
    for (o, xr) in out.chunks_mut(dim).zip(x.chunks(dim)) {
        let mean = xr.iter().sum::<f64>() / dim as f64;
        let var = xr.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / dim as f64;
        let inv = 1.0 / (var + eps).sqrt();
        for j in 0..dim {
            o[j] = (xr[j] - mean) * inv * w[j] + b[j];
        }
    }
    out
}

fn act_ref(act: Activation, x: f64) -> f64 {
    let sigmoid = |z: f64| 1.0 / (1.0 + (-z).exp());
    match act {
        Activation::Gelu => 0.5 * x * (1.0 + libm::erf(x / 2f64.sqrt())),
        Activation::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        }
        Activation::QuickGelu => x * sigmoid(1.702 * x),
        Activation::Silu => x * sigmoid(x),
    }
}

/// out (tq, heads, hd) = softmax(scale q kᵀ) v with causal mask at positions start.., GQA by head grouping.
#[allow(clippy::too_many_arguments)]
fn attention_ref(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    tq: usize,
    tk: usize,
    start: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    scale: f64,
    causal: bool,
    window: Option<usize>,
) -> Vec<f64> {
    let group = heads / kv_heads;
    let mut out = vec![0f64; tq * heads * hd];
    for i in 0..tq {
        // Keys t with t <= query position (causal) and query position - t < window (transformers' sliding window).
        let keys: Vec<usize> = (0..tk)
            .filter(|&t| !causal || t <= start + i)
            .filter(|&t| window.is_none_or(|w| start + i < t + w))
            .collect();
        for h in 0..heads {
            let kvh = h / group;
            let qh = &q[(i * heads + h) * hd..][..hd];
            let s: Vec<f64> = keys
                .iter()
                .map(|&t| scale * (0..hd).map(|d| qh[d] * k[(t * kv_heads + kvh) * hd + d]).sum::<f64>())
                .collect();
            let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (j, &t) in keys.iter().enumerate() {
                for d in 0..hd {
                    out[(i * heads + h) * hd + d] += e[j] / sum * v[(t * kv_heads + kvh) * hd + d];
                }
            }
        }
    }
    out
}

/// The engine's f32 inverse frequencies and f32 angles (RopeScaling::None), rotation in f64.
fn rope_ref(x: &[f64], heads: usize, hd: usize, positions: &[usize], theta: f64) -> Vec<f64> {
    let half = hd / 2;
    let inv_freq: Vec<f32> = (0..half).map(|i| (1.0 / theta.powf((2 * i) as f64 / hd as f64)) as f32).collect();
    let mut out = x.to_vec();
    for (row, &pos) in out.chunks_mut(heads * hd).zip(positions) {
        for head in row.chunks_mut(hd) {
            for i in 0..half {
                let angle = (pos as f32 * inv_freq[i]) as f64;
                let (c, s) = (angle.cos(), angle.sin());
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * c - b * s;
                head[i + half] = b * c + a * s;
            }
        }
    }
    out
}

fn log_softmax_ref(x: &[f64], vocab: usize) -> Vec<f64> {
    let mut out = x.to_vec();
    for row in out.chunks_mut(vocab) {
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        row.iter_mut().for_each(|v| *v -= lse);
    }
    out
}

fn matmul_ref(x: &[f64], w: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
        }
    }
    y
}

// ------------------------------------------------------------------------------------------------ norms

#[test]
fn rmsnorm_bwd_matches_fd_and_accumulates_dw() {
    let mut rng = SplitMix64::new(11);
    // rows 5: serial path; rows 18: the row-parallel path. dim 37: not a multiple of 16.
    for &(rows, dim) in &[(5usize, 37usize), (18, 21)] {
        let eps = 1e-5;
        let x = randn(&mut rng, rows * dim, 2.0);
        let w = randn(&mut rng, dim, 1.5);
        let dout = randn(&mut rng, rows * dim, 1.0);
        let mut out = vec![0f32; rows * dim];
        rmsnorm(&mut out, &x, &w, eps);
        assert!(fwd_err(&out, &rmsnorm_ref(&to64(&x), &to64(&w), eps)) < 1e-5, "rmsnorm f64 reference");

        let mut dx = vec![f32::NAN; rows * dim];
        let mut dw = vec![0f32; dim];
        rmsnorm_bwd(&mut dx, Some(&mut dw), &dout, &x, &w, eps);
        let w64 = to64(&w);
        let num_dx = fd_grad(&x, |x| dot64(&dout, &rmsnorm_ref(x, &w64, eps)));
        let x64 = to64(&x);
        let num_dw = fd_grad(&w, |w| dot64(&dout, &rmsnorm_ref(&x64, w, eps)));
        check(&format!("rmsnorm dx ({rows},{dim})"), &dx, &num_dx);
        check(&format!("rmsnorm dw ({rows},{dim})"), &dw, &num_dw);

        // second call: dx assigned (unchanged), dw accumulated (doubled)
        let (dx1, dw1) = (dx.clone(), dw.clone());
        rmsnorm_bwd(&mut dx, Some(&mut dw), &dout, &x, &w, eps);
        assert_eq!(dx, dx1, "rmsnorm dx must be assigned");
        assert!(dw.iter().zip(&dw1).all(|(a, b)| *a == 2.0 * b), "rmsnorm dw must accumulate");
        // dw = None gives the same dx
        let mut dx_none = vec![f32::NAN; rows * dim];
        rmsnorm_bwd(&mut dx_none, None, &dout, &x, &w, eps);
        assert_eq!(dx_none, dx1);
    }
}

#[test]
fn layernorm_bwd_matches_fd_and_accumulates_dw_db() {
    let mut rng = SplitMix64::new(12);
    for &(rows, dim) in &[(4usize, 29usize), (17, 19)] {
        let eps = 1e-5;
        let x: Vec<f32> = randn(&mut rng, rows * dim, 2.0).iter().map(|v| v + 0.7).collect();
        let w = randn(&mut rng, dim, 1.5);
        let b = randn(&mut rng, dim, 1.0);
        let dout = randn(&mut rng, rows * dim, 1.0);
        let mut out = vec![0f32; rows * dim];
        layernorm(&mut out, &x, &w, &b, eps);
        let (x64, w64, b64) = (to64(&x), to64(&w), to64(&b));
        assert!(fwd_err(&out, &layernorm_ref(&x64, &w64, &b64, eps)) < 1e-5, "layernorm f64 reference");

        let mut dx = vec![f32::NAN; rows * dim];
        let mut dw = vec![0f32; dim];
        let mut db = vec![0f32; dim];
        layernorm_bwd(&mut dx, Some(&mut dw), Some(&mut db), &dout, &x, &w, eps);
        check(
            &format!("layernorm dx ({rows},{dim})"),
            &dx,
            &fd_grad(&x, |x| dot64(&dout, &layernorm_ref(x, &w64, &b64, eps))),
        );
        check(
            &format!("layernorm dw ({rows},{dim})"),
            &dw,
            &fd_grad(&w, |w| dot64(&dout, &layernorm_ref(&x64, w, &b64, eps))),
        );
        check(
            &format!("layernorm db ({rows},{dim})"),
            &db,
            &fd_grad(&b, |b| dot64(&dout, &layernorm_ref(&x64, &w64, b, eps))),
        );

        let (dx1, dw1, db1) = (dx.clone(), dw.clone(), db.clone());
        layernorm_bwd(&mut dx, Some(&mut dw), Some(&mut db), &dout, &x, &w, eps);
        assert_eq!(dx, dx1, "layernorm dx must be assigned");
        assert!(dw.iter().zip(&dw1).all(|(a, b)| *a == 2.0 * b), "layernorm dw must accumulate");
        assert!(db.iter().zip(&db1).all(|(a, b)| *a == 2.0 * b), "layernorm db must accumulate");
        let mut dx_none = vec![f32::NAN; rows * dim];
        layernorm_bwd(&mut dx_none, None, None, &dout, &x, &w, eps);
        assert_eq!(dx_none, dx1);
    }
}

// ------------------------------------------------------------------------------------------------ activations

/// Elementwise ops: L is a sum of per-element terms, so the full central difference of L in x_i equals
/// dout_i · (f(x_i + h) − f(x_i − h)) / 2h; computed that way to keep the 40 000-element case cheap.
#[test]
fn activation_bwd_matches_fd_for_all_four() {
    let mut rng = SplitMix64::new(13);
    // 1 001: serial path; 40 000: the parallel path (>= 2^15).
    for &n in &[1001usize, 40_000] {
        let x = randn(&mut rng, n, 6.0);
        let dout = randn(&mut rng, n, 1.0);
        for act in [Activation::Gelu, Activation::GeluTanh, Activation::QuickGelu, Activation::Silu] {
            let mut y = x.clone();
            apply_activation(&mut y, act);
            let r: Vec<f64> = x.iter().map(|&v| act_ref(act, v as f64)).collect();
            assert!(fwd_err(&y, &r) < 1e-5, "{act:?} f64 reference differs from the engine's activation");

            let mut dx = vec![f32::NAN; n];
            activation_bwd(&mut dx, &dout, &x, act);
            let num: Vec<f64> = x
                .iter()
                .zip(&dout)
                .map(|(&v, &d)| d as f64 * (act_ref(act, v as f64 + H) - act_ref(act, v as f64 - H)) / (2.0 * H))
                .collect();
            check(&format!("activation {act:?} dx (n={n})"), &dx, &num);
            let dx1 = dx.clone();
            activation_bwd(&mut dx, &dout, &x, act);
            assert_eq!(dx, dx1, "{act:?} dx must be assigned");
        }
    }
}

#[test]
fn silu_mul_bwd_matches_fd() {
    let mut rng = SplitMix64::new(14);
    for &n in &[777usize, 40_000] {
        let g = randn(&mut rng, n, 6.0);
        let u = randn(&mut rng, n, 2.0);
        let dout = randn(&mut rng, n, 1.0);
        let mut y = g.clone();
        silu_mul(&mut y, &u);
        let r: Vec<f64> = g.iter().zip(&u).map(|(&a, &b)| act_ref(Activation::Silu, a as f64) * b as f64).collect();
        assert!(fwd_err(&y, &r) < 1e-5);

        let mut dg = vec![f32::NAN; n];
        let mut du = vec![f32::NAN; n];
        silu_mul_bwd(&mut dg, &mut du, &dout, &g, &u);
        let silu = |z: f64| act_ref(Activation::Silu, z);
        let num_dg: Vec<f64> = (0..n)
            .map(|i| dout[i] as f64 * u[i] as f64 * (silu(g[i] as f64 + H) - silu(g[i] as f64 - H)) / (2.0 * H))
            .collect();
        let num_du: Vec<f64> = (0..n)
            .map(|i| dout[i] as f64 * silu(g[i] as f64) * ((u[i] as f64 + H) - (u[i] as f64 - H)) / (2.0 * H))
            .collect();
        check(&format!("silu_mul dg (n={n})"), &dg, &num_dg);
        check(&format!("silu_mul du (n={n})"), &du, &num_du);
        let (dg1, du1) = (dg.clone(), du.clone());
        silu_mul_bwd(&mut dg, &mut du, &dout, &g, &u);
        assert!(dg == dg1 && du == du1, "silu_mul grads must be assigned");
    }
}

// ------------------------------------------------------------------------------------------------ attention

#[test]
fn attend_dense_bwd_matches_fd() {
    let mut rng = SplitMix64::new(15);
    // (heads, kv_heads, hd, tq, tk, start, causal): MHA, GQA, MQA; causal with start > 0 (and start = 0);
    // non-causal with tk != tq (cross attention / vision tower); sliding windows shorter than the context (Mistral,
    // Qwen2), with and without cached positions; head dims not multiples of 16.
    let cases = [
        (4usize, 4usize, 7usize, 5usize, 8usize, 3usize, true, None),
        (4, 2, 5, 5, 8, 3, true, None),
        (6, 1, 9, 4, 9, 5, true, None),
        (4, 2, 6, 6, 6, 0, true, None),
        (4, 4, 5, 6, 9, 0, false, None),
        (6, 2, 7, 5, 7, 0, false, None),
        (3, 1, 19, 4, 5, 0, false, None),
        (4, 2, 6, 7, 7, 0, true, Some(3usize)),
        (4, 1, 5, 5, 9, 4, true, Some(2)),
        (2, 2, 8, 6, 6, 0, true, Some(1)),
    ];
    for &(heads, kv_heads, hd, tq, tk, start, causal, window) in &cases {
        let mask = if causal { Mask::causal(window) } else { Mask::Full };
        let scale = 1.0 / (hd as f32).sqrt();
        let q = randn(&mut rng, tq * heads * hd, 1.5);
        let k = randn(&mut rng, tk * kv_heads * hd, 1.5);
        let v = randn(&mut rng, tk * kv_heads * hd, 1.0);
        let dout = randn(&mut rng, tq * heads * hd, 1.0);
        let (q64, k64, v64) = (to64(&q), to64(&k), to64(&v));
        let s64 = scale as f64;
        let fwd = |q: &[f64], k: &[f64], v: &[f64]| {
            attention_ref(q, k, v, tq, tk, start, heads, kv_heads, hd, s64, causal, window)
        };

        let mut out = vec![0f32; tq * heads * hd];
        attend_dense(&mut out, &q, &k, &v, tq, tk, start, heads, kv_heads, hd, scale, mask);
        assert!(fwd_err(&out, &fwd(&q64, &k64, &v64)) < 1e-5, "attention f64 reference differs from attend_dense");

        let mut dq = vec![f32::NAN; q.len()];
        let mut dk = vec![f32::NAN; k.len()];
        let mut dv = vec![f32::NAN; v.len()];
        attend_dense_bwd(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, tq, tk, start, heads, kv_heads, hd, scale, mask);
        let tag = format!("h{heads} kvh{kv_heads} hd{hd} tq{tq} tk{tk} start{start} {mask:?}");
        check(&format!("attention dq {tag}"), &dq, &fd_grad(&q, |q| dot64(&dout, &fwd(q, &k64, &v64))));
        check(&format!("attention dk {tag}"), &dk, &fd_grad(&k, |k| dot64(&dout, &fwd(&q64, k, &v64))));
        check(&format!("attention dv {tag}"), &dv, &fd_grad(&v, |v| dot64(&dout, &fwd(&q64, &k64, v))));

        let (dq1, dk1, dv1) = (dq.clone(), dk.clone(), dv.clone());
        attend_dense_bwd(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, tq, tk, start, heads, kv_heads, hd, scale, mask);
        assert!(dq == dq1 && dk == dk1 && dv == dv1, "attention grads must be assigned ({tag})");
    }
}

/// Grouped k/v give the same gradients as the same k/v repeated per query head (kv_heads == heads), with dk/dv
/// of a group equal to the sum over its heads. Real sizes (T = 300, hd = 64, 12 heads), timed.
#[test]
fn attend_dense_bwd_grouped_matches_repeated_kv() {
    let mut rng = SplitMix64::new(16);
    let (heads, hd, t) = (12usize, 64usize, 300usize);
    let scale = 1.0 / (hd as f32).sqrt();
    for &(kv_heads, causal) in &[(4usize, true), (1, true), (3, false), (12, true)] {
        let group = heads / kv_heads;
        // causal: a 40-position prefix already cached, tq = t - 40 queries at positions 40..
        let (tq, tk, start) = if causal { (t - 40, t, 40) } else { (t, t, 0) };
        let mask = if causal { Mask::Causal } else { Mask::Full };
        let q = randn(&mut rng, tq * heads * hd, 1.5);
        let k = randn(&mut rng, tk * kv_heads * hd, 1.5);
        let v = randn(&mut rng, tk * kv_heads * hd, 1.0);
        let dout = randn(&mut rng, tq * heads * hd, 1.0);
        let repeat = |x: &[f32]| -> Vec<f32> {
            let mut r = vec![0f32; tk * heads * hd];
            for p in 0..tk {
                for h in 0..heads {
                    r[(p * heads + h) * hd..][..hd].copy_from_slice(&x[(p * kv_heads + h / group) * hd..][..hd]);
                }
            }
            r
        };
        let (k_rep, v_rep) = (repeat(&k), repeat(&v));

        let mut dq = vec![f32::NAN; q.len()];
        let mut dk = vec![f32::NAN; k.len()];
        let mut dv = vec![f32::NAN; v.len()];
        let mut out = vec![0f32; q.len()];
        let t0 = std::time::Instant::now();
        attend_dense(&mut out, &q, &k, &v, tq, tk, start, heads, kv_heads, hd, scale, mask);
        let fwd_time = t0.elapsed();
        let t0 = std::time::Instant::now();
        attend_dense_bwd(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, tq, tk, start, heads, kv_heads, hd, scale, mask);
        let bwd_time = t0.elapsed();

        let mut dq_r = vec![f32::NAN; q.len()];
        let mut dk_r = vec![f32::NAN; k_rep.len()];
        let mut dv_r = vec![f32::NAN; v_rep.len()];
        attend_dense_bwd(
            &mut dq_r, &mut dk_r, &mut dv_r, &dout, &q, &k_rep, &v_rep, tq, tk, start, heads, heads, hd, scale, mask,
        );
        let fold = |d: &[f32]| -> Vec<f64> {
            let mut r = vec![0f64; tk * kv_heads * hd];
            for p in 0..tk {
                for h in 0..heads {
                    for j in 0..hd {
                        r[(p * kv_heads + h / group) * hd + j] += d[(p * heads + h) * hd + j] as f64;
                    }
                }
            }
            r
        };
        let tag = format!("kvh{kv_heads} causal={causal} tq{tq} tk{tk}");
        check(&format!("grouped vs repeated dq {tag}"), &dq, &to64(&dq_r));
        check(&format!("grouped vs repeated dk {tag}"), &dk, &fold(&dk_r));
        check(&format!("grouped vs repeated dv {tag}"), &dv, &fold(&dv_r));
        println!("attention h{heads} {tag} hd{hd}: forward {fwd_time:?}, backward {bwd_time:?}");
    }
}

// ------------------------------------------------------------------------------------------------ rope

#[test]
fn rope_apply_backward_matches_fd_and_is_the_transpose() {
    let mut rng = SplitMix64::new(17);
    let (heads, hd, theta) = (3usize, 10usize, 10000.0f64);
    let positions = [0usize, 5, 17, 1000, 4095];
    let rows = positions.len();
    let rope = Rope::new(hd, theta, &RopeScaling::None);
    let x = randn(&mut rng, rows * heads * hd, 1.0);
    let dout = randn(&mut rng, rows * heads * hd, 1.0);

    let mut y = x.clone();
    rope.apply(&mut y, heads, &positions);
    assert!(fwd_err(&y, &rope_ref(&to64(&x), heads, hd, &positions, theta)) < 1e-5, "rope f64 reference");

    let mut dx = dout.clone();
    rope.apply_backward(&mut dx, heads, &positions);
    check("rope dx", &dx, &fd_grad(&x, |x| dot64(&dout, &rope_ref(x, heads, hd, &positions, theta))));
    // <apply(x), dout> == <x, apply_backward(dout)>
    let lhs: f64 = y.iter().zip(&dout).map(|(&a, &b)| a as f64 * b as f64).sum();
    let rhs: f64 = x.iter().zip(&dx).map(|(&a, &b)| a as f64 * b as f64).sum();
    assert!((lhs - rhs).abs() < 1e-5 * lhs.abs().max(1.0), "rope backward is not the transpose: {lhs} vs {rhs}");
    // and it undoes the rotation
    let mut back = y.clone();
    rope.apply_backward(&mut back, heads, &positions);
    assert!(fwd_err(&back, &to64(&x)) < 1e-5, "apply_backward(apply(x)) != x");
}

// ------------------------------------------------------------------------------------------------ output head

#[test]
fn logprob_gather_fwd_bwd_matches_fd() {
    let mut rng = SplitMix64::new(18);
    let (rows, vocab) = (6usize, 53usize);
    let logits = randn(&mut rng, rows * vocab, 4.0);
    let targets: Vec<u32> = (0..rows).map(|_| (rng.next_u64() % vocab as u64) as u32).collect();
    let dlogp = randn(&mut rng, rows, 1.0);
    let mut dlogits = vec![f32::NAN; rows * vocab];
    let logp = logprob_gather_fwd_bwd(&mut dlogits, &logits, &targets, &dlogp, vocab);

    let gather = |x: &[f64]| -> Vec<f64> {
        let ls = log_softmax_ref(x, vocab);
        targets.iter().enumerate().map(|(r, &t)| ls[r * vocab + t as usize]).collect()
    };
    let mut ls32 = logits.clone();
    log_softmax_rows(&mut ls32, vocab);
    let engine_logp: Vec<f32> = targets.iter().enumerate().map(|(r, &t)| ls32[r * vocab + t as usize]).collect();
    let ref_logp = gather(&to64(&logits));
    assert!(fwd_err(&logp, &ref_logp) < 1e-5, "log-probs differ from f64");
    assert!(fwd_err(&engine_logp, &ref_logp) < 1e-5, "log_softmax_rows differs from f64");
    check("logprob_gather dlogits", &dlogits, &fd_grad(&logits, |x| dot64(&dlogp, &gather(x))));
    let d1 = dlogits.clone();
    logprob_gather_fwd_bwd(&mut dlogits, &logits, &targets, &dlogp, vocab);
    assert_eq!(dlogits, d1, "dlogits must be assigned");
}

// ------------------------------------------------------------------------------------------------ linear, bias, embedding

#[test]
fn matmul_nt_bwd_matches_fd_and_modes() {
    let mut rng = SplitMix64::new(19);
    for &(m, k, n) in &[(7usize, 19usize, 13usize), (33, 70, 45), (1, 5, 3)] {
        let x = randn(&mut rng, m * k, 1.0);
        let w = randn(&mut rng, n * k, 1.0);
        let dy = randn(&mut rng, m * n, 1.0);
        let (x64, w64) = (to64(&x), to64(&w));

        let mut dx = vec![f32::NAN; m * k];
        matmul_nt_bwd_x(&mut dx, &dy, &w, m, k, n, MatmulMode::Assign);
        check(&format!("matmul dx ({m},{k},{n})"), &dx, &fd_grad(&x, |x| dot64(&dy, &matmul_ref(x, &w64, m, k, n))));
        let mut dw = vec![0f32; n * k];
        matmul_nt_bwd_w(&mut dw, &dy, &x, m, k, n);
        check(&format!("matmul dw ({m},{k},{n})"), &dw, &fd_grad(&w, |w| dot64(&dy, &matmul_ref(&x64, w, m, k, n))));

        // Accumulate mode adds onto dx; dw always accumulates.
        let dx1 = dx.clone();
        matmul_nt_bwd_x(&mut dx, &dy, &w, m, k, n, MatmulMode::Accumulate);
        assert!(dx.iter().zip(&dx1).all(|(a, b)| (a - 2.0 * b).abs() <= 1e-6 * b.abs().max(1.0)), "dx accumulate");
        matmul_nt_bwd_x(&mut dx, &dy, &w, m, k, n, MatmulMode::Assign);
        assert_eq!(dx, dx1, "dx assign");
        let dw1 = dw.clone();
        matmul_nt_bwd_w(&mut dw, &dy, &x, m, k, n);
        assert!(dw.iter().zip(&dw1).all(|(a, b)| (a - 2.0 * b).abs() <= 1e-6 * b.abs().max(1.0)), "dw must accumulate");
    }
}

#[test]
fn bias_and_embedding_bwd_match_fd_and_accumulate() {
    let mut rng = SplitMix64::new(20);
    let (m, n) = (9usize, 23usize);
    let x = randn(&mut rng, m * n, 1.0);
    let b = randn(&mut rng, n, 1.0);
    let dy = randn(&mut rng, m * n, 1.0);
    let x64 = to64(&x);
    let add_bias = |b: &[f64]| -> Vec<f64> { x64.iter().enumerate().map(|(i, v)| v + b[i % n]).collect() };
    let mut db = vec![0f32; n];
    bias_bwd(&mut db, &dy);
    check("bias db", &db, &fd_grad(&b, |b| dot64(&dy, &add_bias(b))));
    let db1 = db.clone();
    bias_bwd(&mut db, &dy);
    assert!(db.iter().zip(&db1).all(|(a, b)| *a == 2.0 * b), "db must accumulate");

    let (vocab, dim) = (11usize, 17usize);
    let table = randn(&mut rng, vocab * dim, 1.0);
    let ids: Vec<u32> = vec![3, 0, 10, 3, 7, 3, 0]; // repeats must add up
    let dout = randn(&mut rng, ids.len() * dim, 1.0);
    let lookup =
        |t: &[f64]| -> Vec<f64> { ids.iter().flat_map(|&id| t[id as usize * dim..][..dim].to_vec()).collect() };
    let mut dtable = vec![0f32; vocab * dim];
    embedding_bwd(&mut dtable, &dout, &ids, dim);
    check("embedding dtable", &dtable, &fd_grad(&table, |t| dot64(&dout, &lookup(t))));
    let dt1 = dtable.clone();
    embedding_bwd(&mut dtable, &dout, &ids, dim);
    assert!(
        dtable.iter().zip(&dt1).all(|(a, b)| (a - 2.0 * b).abs() <= 1e-6 * b.abs().max(1.0)),
        "dtable must accumulate"
    );
}
