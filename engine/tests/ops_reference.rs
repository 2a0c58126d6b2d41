//! Every CPU op against a straightforward float64 implementation on fresh random inputs.

use engine::config::{Activation, RopeScaling};
use engine::ops::*;
use engine::rng::SplitMix64;

fn randn(rng: &mut SplitMix64, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| ((rng.next_f64() * 2.0 - 1.0) as f32) * scale).collect()
}

fn max_rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs()).fold(0.0, f64::max) / scale
}

fn matmul_ref(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum();
        }
    }
    y
}

#[test]
fn matmul_matches_f64_on_both_paths() {
    let mut rng = SplitMix64::new(1);
    // m <= 8 exercises the skinny kernel (every group size 1..4 and tails), larger m the gemm path;
    // k not a multiple of 16 exercises the lane tail.
    for &(m, k, n) in &[(1, 37, 5), (2, 64, 130), (3, 100, 65), (5, 768, 33), (8, 33, 200), (9, 50, 70), (64, 257, 129)]
    {
        let x = randn(&mut rng, m * k, 1.0);
        let w = randn(&mut rng, n * k, 1.0);
        let mut y = vec![0f32; m * n];
        matmul_nt(&mut y, &x, &w, m, k, n, MatmulMode::Assign);
        let r = matmul_ref(&x, &w, m, k, n);
        let e = max_rel_err(&y, &r);
        assert!(e < 1e-5, "matmul ({m},{k},{n}) rel err {e}");
        // Accumulate adds onto what is there.
        let mut y2 = vec![1f32; m * n];
        matmul_nt(&mut y2, &x, &w, m, k, n, MatmulMode::Accumulate);
        let r2: Vec<f64> = r.iter().map(|v| v + 1.0).collect();
        assert!(max_rel_err(&y2, &r2) < 1e-5, "accumulate ({m},{k},{n})");
    }
}

#[test]
fn norms_match_f64() {
    let mut rng = SplitMix64::new(2);
    let (rows, dim) = (20, 77);
    let x = randn(&mut rng, rows * dim, 3.0);
    let w = randn(&mut rng, dim, 1.0);
    let b = randn(&mut rng, dim, 1.0);
    let mut out = vec![0f32; rows * dim];
    rmsnorm(&mut out, &x, &w, 1e-6);
    let mut r = vec![0f64; rows * dim];
    for i in 0..rows {
        let row = &x[i * dim..(i + 1) * dim];
        let ms: f64 = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / dim as f64;
        for j in 0..dim {
            r[i * dim + j] = row[j] as f64 / (ms + 1e-6).sqrt() * w[j] as f64;
        }
    }
    assert!(max_rel_err(&out, &r) < 1e-6);
    layernorm(&mut out, &x, &w, &b, 1e-5);
    for i in 0..rows {
        let row = &x[i * dim..(i + 1) * dim];
        let mean: f64 = row.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
        let var: f64 = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / dim as f64;
        for j in 0..dim {
            r[i * dim + j] = (row[j] as f64 - mean) / (var + 1e-5).sqrt() * w[j] as f64 + b[j] as f64;
        }
    }
    assert!(max_rel_err(&out, &r) < 1e-6);
}

#[test]
fn activations_match_f64() {
    // The Taylor-series erf below loses precision past |x| ~ 4, so the range stays within it.
    let xs: Vec<f32> = (-200..=200).map(|i| i as f32 * 0.02).collect();
    let erf_ref = |x: f64| {
        // erf by its Taylor series, plenty accurate for |x| <= 8 / sqrt(2) in f64 with enough terms.
        let mut sum = 0.0;
        let mut term = x;
        let mut n = 0;
        while n < 200 {
            sum += term / (2 * n + 1) as f64;
            n += 1;
            term *= -x * x / n as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    };
    for (act, f) in [
        (
            Activation::Gelu,
            Box::new(move |x: f64| 0.5 * x * (1.0 + erf_ref(x / 2f64.sqrt()))) as Box<dyn Fn(f64) -> f64>,
        ),
        (Activation::QuickGelu, Box::new(|x: f64| x / (1.0 + (-1.702 * x).exp()))),
        (Activation::Silu, Box::new(|x: f64| x / (1.0 + (-x).exp()))),
        (
            Activation::GeluTanh,
            Box::new(|x: f64| {
                0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
            }),
        ),
    ] {
        let mut y = xs.clone();
        apply_activation(&mut y, act);
        let r: Vec<f64> = xs.iter().map(|&x| f(x as f64)).collect();
        let e = y.iter().zip(&r).map(|(&a, &b)| (a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(e < 2e-6, "{act:?} abs err {e}");
    }
}

#[test]
fn causal_gqa_attention_matches_f64() {
    let mut rng = SplitMix64::new(3);
    let (t, heads, kvh, hd) = (11, 6, 2, 8);
    let q = randn(&mut rng, t * heads * hd, 1.0);
    let k = randn(&mut rng, t * kvh * hd, 1.0);
    let v = randn(&mut rng, t * kvh * hd, 1.0);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; t * heads * hd];
    let seg = KvSegment { k: &k, v: &v, len: t };
    attend_rows(&mut out, &q, heads, kvh, hd, scale, None, |r| (vec![seg], r + 1));
    let mut r = vec![0f64; t * heads * hd];
    for i in 0..t {
        for h in 0..heads {
            let g = h / (heads / kvh);
            let s: Vec<f64> = (0..=i)
                .map(|j| {
                    (0..hd).map(|d| q[(i * heads + h) * hd + d] as f64 * k[(j * kvh + g) * hd + d] as f64).sum::<f64>()
                        * scale as f64
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            for d in 0..hd {
                r[(i * heads + h) * hd + d] =
                    (0..=i).map(|j| (s[j] - m).exp() / z * v[(j * kvh + g) * hd + d] as f64).sum();
            }
        }
    }
    assert!(max_rel_err(&out, &r) < 1e-5);

    // The same rows split into a prefix segment and a suffix segment give the same result.
    let split = 4;
    let pre = KvSegment { k: &k[..split * kvh * hd], v: &v[..split * kvh * hd], len: split };
    let suf = KvSegment { k: &k[split * kvh * hd..], v: &v[split * kvh * hd..], len: t - split };
    let mut out2 = vec![0f32; t * heads * hd];
    attend_rows(&mut out2, &q, heads, kvh, hd, scale, None, |r| (vec![pre, suf], r + 1));
    assert!(max_rel_err(&out2, &r) < 1e-5);
}

#[test]
fn rope_matches_f64_rotation() {
    let mut rng = SplitMix64::new(4);
    let (heads, hd) = (3, 16);
    let positions = [0usize, 1, 7, 100, 2047];
    let x = randn(&mut rng, positions.len() * heads * hd, 1.0);
    for (theta, scaling) in [
        (10000.0, RopeScaling::None),
        (500000.0, RopeScaling::Linear { factor: 4.0 }),
        (
            500000.0,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64.0,
            },
        ),
    ] {
        let rope = Rope::new(hd, theta, &scaling);
        let mut y = x.clone();
        rope.apply(&mut y, heads, &positions);
        for (pi, &pos) in positions.iter().enumerate() {
            for h in 0..heads {
                for i in 0..hd / 2 {
                    let mut f = 1.0 / theta.powf(2.0 * i as f64 / hd as f64);
                    match scaling {
                        RopeScaling::None => {}
                        RopeScaling::Linear { factor } => f /= factor,
                        RopeScaling::Llama3 {
                            factor,
                            low_freq_factor: lo,
                            high_freq_factor: hi,
                            original_max_position_embeddings: old,
                        } => {
                            let wl = 2.0 * std::f64::consts::PI / f;
                            if wl > old / lo {
                                f /= factor;
                            } else if wl >= old / hi {
                                let s = (old / wl - lo) / (hi - lo);
                                f = (1.0 - s) * f / factor + s * f;
                            }
                        }
                    }
                    let a = pos as f64 * f;
                    let base = (pi * heads + h) * hd;
                    let (x0, x1) = (x[base + i] as f64, x[base + i + hd / 2] as f64);
                    let e0 = x0 * a.cos() - x1 * a.sin();
                    let e1 = x1 * a.cos() + x0 * a.sin();
                    // f32 angles at position 2047 carry ~1e-4 absolute phase error, as in transformers.
                    assert!((y[base + i] as f64 - e0).abs() < 5e-4, "{scaling:?} pos {pos}");
                    assert!((y[base + i + hd / 2] as f64 - e1).abs() < 5e-4);
                }
            }
        }
    }
}

#[test]
fn log_softmax_matches_f64() {
    let mut rng = SplitMix64::new(5);
    let n = 1000;
    let x = randn(&mut rng, 3 * n, 30.0);
    let mut y = x.clone();
    log_softmax_rows(&mut y, n);
    for r in 0..3 {
        let row = &x[r * n..(r + 1) * n];
        let m = row.iter().map(|&v| v as f64).fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        for j in 0..n {
            assert!((y[r * n + j] as f64 - (row[j] as f64 - lse)).abs() < 1e-5);
        }
    }
}

#[test]
fn dense_attention_equals_row_attention() {
    let mut rng = SplitMix64::new(6);
    let (heads, kvh, hd) = (4, 2, 8);
    // A continuation chunk: 5 cached positions, then 20 new queries; a full (non-causal) case; sliding windows
    // reaching into the cached positions and not.
    let (start, tq) = (5, 20);
    let tk = start + tq;
    let q = randn(&mut rng, tq * heads * hd, 1.0);
    let k = randn(&mut rng, tk * kvh * hd, 1.0);
    let v = randn(&mut rng, tk * kvh * hd, 1.0);
    let scale = 0.3;
    for mask in [Mask::Causal, Mask::Full, Mask::Window(4), Mask::Window(9), Mask::Window(tk)] {
        let mut a = vec![0f32; tq * heads * hd];
        let mut b = vec![0f32; tq * heads * hd];
        attend_dense(&mut a, &q, &k, &v, tq, tk, start, heads, kvh, hd, scale, mask);
        let seg = KvSegment { k: &k, v: &v, len: tk };
        let window = match mask {
            Mask::Window(w) => Some(w),
            _ => None,
        };
        let causal = mask != Mask::Full;
        attend_rows(&mut b, &q, heads, kvh, hd, scale, window, |r| {
            (vec![seg], if causal { start + r + 1 } else { tk })
        });
        let e = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(e < 1e-5, "{mask:?}: {e}");
    }
}

#[test]
fn packed_matmul_matches_f64_for_every_dtype_and_kernel() {
    let mut rng = SplitMix64::new(7);
    // n not a multiple of 32 (partial last panel), m covering every row-block size and several blocks, and
    // both 16-bit paths (widened in registers for m <= 24, widened once per panel above).
    for &(m, k, n) in
        &[(1, 40, 7), (2, 64, 33), (5, 100, 64), (6, 17, 95), (7, 130, 40), (13, 64, 100), (25, 33, 64), (40, 96, 70)]
    {
        let x = randn(&mut rng, m * k, 1.0);
        let w = randn(&mut rng, n * k, 1.0);
        let wb: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let wh: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
        let cases = [
            (PackedMatrix::from_f32(&w, n, k), w.clone()),
            (PackedMatrix::from_bf16(&wb, n, k), wb.iter().map(|v| v.to_f32()).collect::<Vec<_>>()),
            (PackedMatrix::from_f16(&wh, n, k), wh.iter().map(|v| v.to_f32()).collect::<Vec<_>>()),
        ];
        for (pm, wf) in &cases {
            assert_eq!(&pm.unpack_f32(), wf, "unpack round trip ({})", pm.dtype());
            let r = matmul_ref(&x, wf, m, k, n);
            for portable in [false, true] {
                let mut y = vec![0f32; m * n];
                let mut y2 = vec![1f32; m * n];
                if portable {
                    pm.matmul_portable(&mut y, &x, m, MatmulMode::Assign);
                    pm.matmul_portable(&mut y2, &x, m, MatmulMode::Accumulate);
                } else {
                    pm.matmul(&mut y, &x, m, MatmulMode::Assign);
                    pm.matmul(&mut y2, &x, m, MatmulMode::Accumulate);
                }
                let e = max_rel_err(&y, &r);
                assert!(e < 1e-5, "packed {} portable={portable} ({m},{k},{n}): {e}", pm.dtype());
                let r2: Vec<f64> = r.iter().map(|v| v + 1.0).collect();
                assert!(max_rel_err(&y2, &r2) < 1e-5, "accumulate {} portable={portable}", pm.dtype());
            }
        }
    }
}

#[test]
fn packed_transpose_computes_dy_times_w() {
    let mut rng = SplitMix64::new(8);
    let (m, k, n) = (9, 70, 45);
    let w = randn(&mut rng, n * k, 1.0);
    let dy = randn(&mut rng, m * n, 1.0);
    let wb: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
    for (pm, wf) in [
        (PackedMatrix::from_f32(&w, n, k), w.clone()),
        (PackedMatrix::from_bf16(&wb, n, k), wb.iter().map(|v| v.to_f32()).collect()),
    ] {
        let t = pm.transposed();
        assert_eq!((t.n, t.k, t.dtype()), (k, n, pm.dtype()));
        let mut dx = vec![0f32; m * k];
        t.matmul(&mut dx, &dy, m, MatmulMode::Assign);
        // dx = dy (m, n) · W (n, k)
        let mut r = vec![0f64; m * k];
        for i in 0..m {
            for c in 0..k {
                r[i * k + c] = (0..n).map(|j| dy[i * n + j] as f64 * wf[j * k + c] as f64).sum();
            }
        }
        assert!(max_rel_err(&dx, &r) < 1e-5);
    }
}
