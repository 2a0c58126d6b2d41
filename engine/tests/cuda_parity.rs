//! Every CUDA kernel against a float64 CPU reference written here, on fresh random inputs of several shapes
//! (including ones that are not multiples of the block and warp sizes), outputs poisoned with NaN beforehand.
//! Tolerance: relative L2 error <= 1e-2 (fp16 storage, fp32 accumulation). Where no GPU exists the test prints
//! why and passes; `scripts/gpu-check.sh` runs it on a GPU host.

use engine::rng::SplitMix64;

mod gpu_common;
use gpu_common::gpu;

fn randn(rng: &mut SplitMix64, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * scale).collect()
}

/// Relative L2 error of `got` against `want`; NaN anywhere fails.
fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length");
    assert!(got.iter().all(|v| v.is_finite()), "non-finite output (a poisoned element was not written?)");
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum::<f64>().max(1e-30);
    (num / den).sqrt()
}

fn check(name: &str, got: &[f32], want: &[f64]) {
    let e = rel_l2(got, want);
    println!("{name:<40} rel L2 {e:.2e}");
    assert!(e <= 1e-2, "{name}: relative L2 error {e}");
}

/// fp16 rounding of the inputs, as the device sees them.
/// RoPE tables [max_pos, d/2] with theta 10000.
fn rope_tables(d: usize, max_pos: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for p in 0..max_pos {
        for i in 0..d / 2 {
            let a = p as f64 / 10000f64.powf(2.0 * i as f64 / d as f64);
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}

fn h(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| half::f16::from_f32(v).to_f64()).collect()
}

#[test]
fn elementwise_norm_and_embedding_kernels_match_float64() {
    let Some(g) = gpu() else { return };
    let mut rng = SplitMix64::new(1);
    // Rows of a multiple of 8 (the norms' 16-byte loads) and one not (one element at a time).
    for &(rows, cols) in &[(1usize, 64usize), (7, 96), (33, 1000), (5, 4096), (3, 100)] {
        let x = randn(&mut rng, rows * cols, 2.0);
        let w = randn(&mut rng, cols, 1.0);
        let b = randn(&mut rng, cols, 0.5);
        let (xh, wh, bh) = (h(&x), h(&w), h(&b));
        let mut want = Vec::new();
        for r in 0..rows {
            let row = &xh[r * cols..(r + 1) * cols];
            let ms = row.iter().map(|v| v * v).sum::<f64>() / cols as f64;
            want.extend(row.iter().zip(&wh).map(|(v, w)| v / (ms + 1e-6).sqrt() * w));
        }
        check(&format!("rmsnorm_f16 {rows}x{cols}"), &g.rmsnorm(&x, &w, 1e-6).unwrap(), &want);
        let mut want = Vec::new();
        for r in 0..rows {
            let row = &xh[r * cols..(r + 1) * cols];
            let mean = row.iter().sum::<f64>() / cols as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / cols as f64;
            want.extend(row.iter().zip(wh.iter().zip(&bh)).map(|(v, (w, b))| (v - mean) / (var + 1e-5).sqrt() * w + b));
        }
        check(&format!("layernorm_f16 {rows}x{cols}"), &g.layernorm(&x, &w, &b, 1e-5).unwrap(), &want);
        let up = randn(&mut rng, rows * cols, 2.0);
        let want: Vec<f64> = xh.iter().zip(h(&up)).map(|(gt, u)| gt / (1.0 + (-gt).exp()) * u).collect();
        check(&format!("swiglu_f16 {rows}x{cols}"), &g.swiglu(&x, &up, cols).unwrap(), &want);
        let want: Vec<f64> = xh.iter().map(|v| 0.5 * v * (1.0 + libm::erf(v / std::f64::consts::SQRT_2))).collect();
        check(&format!("gelu_f16 {rows}x{cols}"), &g.activation("gelu_f16", &x).unwrap(), &want);
        let want: Vec<f64> = xh.iter().map(|v| v / (1.0 + (-1.702 * v).exp())).collect();
        check(&format!("quick_gelu_f16 {rows}x{cols}"), &g.activation("quick_gelu_f16", &x).unwrap(), &want);
        let want: Vec<f64> = xh.iter().enumerate().map(|(i, v)| v + bh[i % cols]).collect();
        check(&format!("bias_add_f16 {rows}x{cols}"), &g.bias_add(&x, &b).unwrap(), &want);
        let want: Vec<f64> = xh.iter().zip(h(&up)).map(|(a, b)| a + b).collect();
        check(&format!("residual_add_f16 {rows}x{cols}"), &g.residual_add(&x, &up).unwrap(), &want);
        // The decoder's fused residual add + RMSNorm: the sum (rounded to fp16, as stored) and its norm.
        let sum: Vec<f64> = xh.iter().zip(h(&up)).map(|(a, b)| half::f16::from_f64(a + b).to_f64()).collect();
        let mut want = Vec::new();
        for r in 0..rows {
            let row = &sum[r * cols..(r + 1) * cols];
            let ms = row.iter().map(|v| v * v).sum::<f64>() / cols as f64;
            want.extend(row.iter().zip(&wh).map(|(v, w)| v / (ms + 1e-6).sqrt() * w));
        }
        let (got_sum, got) = g.add_rmsnorm(&x, &up, &w, 1e-6).unwrap();
        check(&format!("add_rmsnorm_f16 sum {rows}x{cols}"), &got_sum, &sum);
        check(&format!("add_rmsnorm_f16 {rows}x{cols}"), &got, &want);
        check(&format!("f32_to_f16 {}", x.len()), &g.f32_to_f16(&x).unwrap(), &xh);
        check(&format!("f16_to_f32 {}", x.len()), &g.f16_to_f32(&x).unwrap(), &xh);
        // Embedding: rows of a [vocab, cols] table.
        let vocab = 50;
        let table = randn(&mut rng, vocab * cols, 1.0);
        let ids: Vec<i32> = (0..rows).map(|i| ((i * 7 + 3) % vocab) as i32).collect();
        let th = h(&table);
        let want: Vec<f64> =
            ids.iter().flat_map(|&i| th[i as usize * cols..(i as usize + 1) * cols].to_vec()).collect();
        check(&format!("embedding_gather_f16 {rows}x{cols}"), &g.embedding(&table, cols, &ids).unwrap(), &want);
        let e = g.embedding(&table, cols, &[1, vocab as i32 + 5]).unwrap_err().to_string();
        assert!(e.contains("position 1"), "{e}");
    }
}

/// float64 RoPE of x (tokens, heads, d) with the tables; frequency pair i of token t at position `pos_of(t, i)`.
fn rope_ref(
    xh: &[f64],
    heads: usize,
    d: usize,
    cos: &[f32],
    sin: &[f32],
    pos_of: impl Fn(usize, usize) -> usize,
) -> Vec<f64> {
    let half = d / 2;
    let mut want = xh.to_vec();
    for t in 0..xh.len() / (heads * d) {
        for hh in 0..heads {
            let base = (t * heads + hh) * d;
            for i in 0..half {
                let p = pos_of(t, i);
                let (c, s) = (cos[p * half + i] as f64, sin[p * half + i] as f64);
                let (x1, x2) = (xh[base + i], xh[base + i + half]);
                want[base + i] = x1 * c - x2 * s;
                want[base + i + half] = x2 * c + x1 * s;
            }
        }
    }
    want
}

#[test]
fn rope_lora_and_logprob_kernels_match_float64() {
    let Some(g) = gpu() else { return };
    let mut rng = SplitMix64::new(2);
    for &(tokens, heads, d) in &[(1usize, 1usize, 16usize), (9, 4, 24), (70, 8, 128)] {
        let x = randn(&mut rng, tokens * heads * d, 1.0);
        let (cos, sin) = rope_tables(d, 256);
        let pos: Vec<i32> = (0..tokens).map(|t| (t * 3 + 1) as i32).collect();
        let want = rope_ref(&h(&x), heads, d, &cos, &sin, |t, _| pos[t] as usize);
        check(&format!("rope_f16 {tokens}x{heads}x{d}"), &g.rope(&x, &pos, &cos, &sin, heads, d, None).unwrap(), &want);
    }
    // Qwen2-VL's multimodal RoPE: three positions per token (temporal, height, width), frequency pair i following
    // the first for i < s0, the second for i < s0 + s1, else the third; mrope_section [2, 3, 3] (head_dim 16) and
    // [16, 24, 24] (head_dim 128, Qwen2-VL-7B's).
    for &(tokens, heads, d, sec) in &[(9usize, 3usize, 16usize, [2usize, 3, 3]), (40, 4, 128, [16, 24, 24])] {
        let x = randn(&mut rng, tokens * heads * d, 1.0);
        let (cos, sin) = rope_tables(d, 256);
        let pos: Vec<i32> = (0..tokens * 3).map(|i| ((i * 7 + i / 3) % 200) as i32).collect();
        let component = |i: usize| usize::from(i >= sec[0]) + usize::from(i >= sec[0] + sec[1]);
        let want = rope_ref(&h(&x), heads, d, &cos, &sin, |t, i| pos[t * 3 + component(i)] as usize);
        let got = g.rope(&x, &pos, &cos, &sin, heads, d, Some(sec)).unwrap();
        check(&format!("rope_f16 mrope {sec:?} {tokens}x{heads}x{d}"), &got, &want);
    }
    for &(m, k, n, r) in &[(1usize, 64usize, 64usize, 4usize), (13, 300, 200, 16), (70, 4096, 1024, 64)] {
        let x = randn(&mut rng, m * k, 1.0);
        let a = randn(&mut rng, r * k, 0.05);
        let b = randn(&mut rng, n * r, 0.05);
        let y = randn(&mut rng, m * n, 1.0);
        let (xh, ah, bh, yh) = (h(&x), h(&a), h(&b), h(&y));
        let scale = 2.0f32;
        let mut want = yh.clone();
        for i in 0..m {
            let t: Vec<f64> = (0..r).map(|j| (0..k).map(|c| xh[i * k + c] * ah[j * k + c]).sum()).collect();
            for c in 0..n {
                want[i * n + c] += scale as f64 * (0..r).map(|j| t[j] * bh[c * r + j]).sum::<f64>();
            }
        }
        check(
            &format!("lora_down/up_add_f16 m{m} k{k} n{n} r{r}"),
            &g.lora(&y, &x, &a, &b, k, r, n, scale).unwrap(),
            &want,
        );
    }
    for &(rows, vocab) in &[(1usize, 70usize), (5, 32000), (17, 1000)] {
        let logits = randn(&mut rng, rows * vocab, 8.0);
        let labels: Vec<i32> = (0..rows).map(|i| ((i * 31 + 7) % vocab) as i32).collect();
        let mut want = Vec::new();
        for rr in 0..rows {
            let row: Vec<f64> = logits[rr * vocab..(rr + 1) * vocab].iter().map(|&v| v as f64).collect();
            let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = mx + row.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
            want.push(row[labels[rr] as usize] - lse);
        }
        let (got, _) = g.logprobs(&logits, vocab, &labels).unwrap();
        check(&format!("logprob_gather_f32 {rows}x{vocab}"), &got, &want);
    }
}

#[test]
fn cublaslt_linear_matches_float64() {
    let Some(g) = gpu() else { return };
    let mut rng = SplitMix64::new(4);
    // (m, k, n): decode (one row), a ShapesWorld layer, an odd shape, prefill of a LLaVA-7B projection.
    for &(m, k, n) in &[(1usize, 4096usize, 4096usize), (37, 96, 288), (13, 300, 77), (640, 4096, 1024)] {
        let x = randn(&mut rng, m * k, 1.0);
        let w = randn(&mut rng, n * k, 0.05);
        let (xh, wh) = (h(&x), h(&w));
        let mut want = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = (0..k).map(|c| xh[i * k + c] * wh[j * k + c]).sum();
            }
        }
        check(&format!("cublaslt linear f16 m{m} k{k} n{n}"), &g.linear(&x, &w, k).unwrap(), &want);
    }
}

#[test]
fn gemv_kernel_matches_float64() {
    let Some(g) = gpu() else { return };
    let mut rng = SplitMix64::new(5);
    // (k, n): the four projections of a LLaVA-7B decoder layer at batch 1 (q/k/v fused, gate/up fused), a row not
    // a multiple of the 4 x 32 vectors a warp loads per round, a tiny one.
    for &(k, n) in &[(4096usize, 12288usize), (4096, 4096), (4096, 22016), (11008, 4096), (96, 288), (8, 5)] {
        let x = randn(&mut rng, k, 1.0);
        let w = randn(&mut rng, n * k, 0.05);
        let (xh, wh) = (h(&x), h(&w));
        let want: Vec<f64> = (0..n).map(|j| (0..k).map(|c| xh[c] * wh[j * k + c]).sum()).collect();
        let (dx, dw) = (g.upload_f16(&x).unwrap(), g.upload_f16(&w).unwrap());
        // 1, 2, 4 and 8 warps per output feature, each into a poisoned output (the two largest matrices with one
        // warp per feature only: the splits' indexing is the same at every size, and the emulator is slow).
        let splits: &[usize] = if n * k > 20_000_000 { &[1] } else { &[1, 2, 4, 8] };
        for &split in splits {
            let mut y = g.poisoned_f16(n).unwrap();
            g.gemv_split_dev(&dx, &dw, &mut y, k, n, split).unwrap();
            check(&format!("gemv_m1_f16 k{k} n{n} split {split}"), &g.download_f16(&y).unwrap(), &want);
        }
        if k == 96 && n == 288 {
            // The tuner measures the shape and matmul_dev takes its pick: still the same product.
            let lines = g.tune_gemv(&[(k, n, vec![&dw])]).unwrap();
            println!("{}", lines.join("; "));
            assert!(g.gemv_choice(k, n).is_some(), "tune_gemv kept no choice for k{k} n{n}");
            let mut y = g.poisoned_f16(n).unwrap();
            g.matmul_dev(&dx, &dw, &mut y, 1, k, n).unwrap();
            check(
                &format!("matmul_dev ({}) k{k} n{n}", g.gemv_choice(k, n).unwrap()),
                &g.download_f16(&y).unwrap(),
                &want,
            );
        }
    }
    // A row length or split it does not take is an error, not a wrong answer.
    assert!(g.gemv(&[0.0; 12], &[0.0; 24]).is_err(), "k = 12 (not a multiple of 8)");
    let (dx, dw) = (g.upload_f16(&[0.0; 8]).unwrap(), g.upload_f16(&[0.0; 24]).unwrap());
    let mut y = g.poisoned_f16(3).unwrap();
    assert!(g.gemv_split_dev(&dx, &dw, &mut y, 8, 3, 3).is_err(), "split 3");
}

#[test]
fn device_argmax_picks_what_the_host_picks() {
    let Some(g) = gpu() else { return };
    let mut rng = SplitMix64::new(21);
    // Vocabularies a multiple of 8 (the kernel's 16-byte loads) and not (one logit at a time).
    for &(rows, vocab) in &[(1usize, 32064usize), (3, 1000), (2, 7), (2, 1501)] {
        let mut x = randn(&mut rng, rows * vocab, 4.0);
        if vocab == 32064 {
            // A tie that one thread of the kernel scans in two of its 16-byte loads (1024 threads x 8 logits apart).
            x[3] = 60.0;
            x[3 + 8192] = 60.0;
        }
        if vocab == 1000 {
            // Row 0: a three-way tie for the largest (the first wins; 17 and 18 are in one 16-byte load, the
            // second of a pair after the first of the next, 400 in another thread's) and a NaN before it; row 1: a
            // NaN first logit (the host keeps index 0: nothing compares greater); row 2: every logit -inf (index 0).
            x[17] = 50.0;
            x[18] = 50.0;
            x[400] = 50.0;
            x[3] = f32::NAN;
            x[vocab] = f32::NAN;
            x[2 * vocab..3 * vocab].fill(f32::NEG_INFINITY);
        }
        // The host sees the fp16 logits widened, as decode_step hands them over.
        let xh: Vec<f32> = x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        let want: Vec<i32> = xh.chunks(vocab).map(|r| engine::sampling::argmax(r) as i32).collect();
        let logits = g.upload_f16(&x).unwrap();
        let mut ids = g.stream.clone_htod(&vec![-1i32; rows]).unwrap();
        let mut pos = g.stream.clone_htod(&(0..rows as i32).map(|r| 10 * r).collect::<Vec<_>>()).unwrap();
        let mut lens = g.stream.clone_htod(&vec![5i32; rows]).unwrap();
        g.argmax_step_dev(&mut ids, &logits, rows, vocab, Some((&mut pos, &mut lens))).unwrap();
        assert_eq!(g.stream.clone_dtoh(&ids).unwrap(), want, "argmax of {rows} rows of {vocab}");
        assert_eq!(
            g.stream.clone_dtoh(&pos).unwrap(),
            (0..rows as i32).map(|r| 10 * r + 1).collect::<Vec<_>>(),
            "positions advance by one"
        );
        assert_eq!(g.stream.clone_dtoh(&lens).unwrap(), vec![6; rows], "lengths advance by one");
        let mut again = g.stream.clone_htod(&vec![-1i32; rows]).unwrap();
        g.argmax_step_dev(&mut again, &logits, rows, vocab, None).unwrap();
        assert_eq!(g.stream.clone_dtoh(&again).unwrap(), want, "without advancing");
        if vocab == 1000 {
            assert_eq!(&want, &[17, 0, 0], "the edge cases are the ones meant");
        }
        if vocab == 32064 {
            assert_eq!(&want, &[3], "the tie is the largest");
        }
    }
    let logits = g.upload_f16(&[0.0; 6]).unwrap();
    let mut ids = g.stream.clone_htod(&[0i32; 2]).unwrap();
    assert!(g.argmax_step_dev(&mut ids, &logits, 2, 4, None).is_err(), "8 logits asked of a buffer of 6");
}

#[test]
fn qkv_gemv_with_rope_and_the_cache_store_gives_the_pairs_numbers() {
    let Some(g) = gpu() else { return };
    let mut rng = SplitMix64::new(9);
    let bits = |d: &cudarc::driver::CudaSlice<half::f16>| {
        g.stream.clone_dtoh(d).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    // (k, heads_q, heads_kv, head_dim): MHA at LLaVA-7B's head size, GQA, MQA with a head size not a multiple of 4.
    for &(k, hq, hkv, d) in &[(256usize, 4usize, 4usize, 128usize), (96, 6, 2, 16), (64, 4, 1, 18)] {
        let f = (hq + 2 * hkv) * d;
        let kvw = hkv * d;
        let (cap, at) = (6usize, 4usize);
        let (cos, sin) = rope_tables(d, 16);
        let (x, w) = (randn(&mut rng, k, 1.0), randn(&mut rng, f * k, 0.05));
        let (xh, wh) = (h(&x), h(&w));
        let (dx, dw) = (g.upload_f16(&x).unwrap(), g.upload_f16(&w).unwrap());
        let (dcos, dsin) = (g.stream.clone_htod(&cos).unwrap(), g.stream.clone_htod(&sin).unwrap());
        let pos = g.stream.clone_htod(&[11i32]).unwrap();
        // float64 of the rotated q heads (from the projection rounded to fp16, as stored).
        let y: Vec<f64> =
            (0..f).map(|j| half::f16::from_f64((0..k).map(|c| xh[c] * wh[j * k + c]).sum::<f64>()).to_f64()).collect();
        let mut want_q = vec![0.0; hq * d];
        for hh in 0..hq {
            for i in 0..d / 2 {
                let (c, s_) = (cos[11 * d / 2 + i] as f64, sin[11 * d / 2 + i] as f64);
                let (x1, x2) = (y[hh * d + i], y[hh * d + i + d / 2]);
                want_q[hh * d + i] = x1 * c - x2 * s_;
                want_q[hh * d + i + d / 2] = x2 * c + x1 * s_;
            }
        }
        for split in [1usize, 2, 4] {
            // A decode step (cache row lens[0] - 1) and a one-row prefill (cache row `start`).
            for decode in [true, false] {
                let lens = g.stream.clone_htod(&[at as i32 + 1]).unwrap();
                let lens_arg = if decode { Some(&lens) } else { None };
                let run = |fused: bool| {
                    let (mut qkv, mut kc, mut vc) = (
                        g.poisoned_f16(f).unwrap(),
                        g.poisoned_f16(cap * kvw).unwrap(),
                        g.poisoned_f16(cap * kvw).unwrap(),
                    );
                    if fused {
                        g.gemv_qkv_rope_dev(
                            &mut qkv,
                            &mut kc,
                            &mut vc,
                            &dx,
                            &dw,
                            k,
                            hq,
                            hkv,
                            d,
                            split,
                            &pos,
                            &dcos,
                            &dsin,
                            cap * kvw,
                            lens_arg,
                            at,
                        )
                        .unwrap();
                    } else {
                        g.gemv_split_dev(&dx, &dw, &mut qkv, k, f, split).unwrap();
                        g.rope_kv_store_dev(
                            &mut qkv,
                            &mut kc,
                            &mut vc,
                            &pos,
                            &dcos,
                            &dsin,
                            1,
                            hq,
                            hkv,
                            d,
                            f,
                            cap * kvw,
                            lens_arg,
                            at,
                        )
                        .unwrap();
                    }
                    (bits(&qkv), bits(&kc), bits(&vc))
                };
                let (fused, pair) = (run(true), run(false));
                let name = format!(
                    "gemv_qkv_rope_m1_f16 k{k} heads {hq}/{hkv} d{d} split {split} ({})",
                    if decode { "decode" } else { "prefill" }
                );
                assert_eq!(fused.0, pair.0, "{name}: q/k/v after RoPE differ from gemv_m1_f16 + rope_kv_store_f16");
                // Only the cache row the step writes is defined (the rest is poison in both).
                let row = at * kvw..(at + 1) * kvw;
                assert_eq!(fused.1[row.clone()], pair.1[row.clone()], "{name}: stored keys differ");
                assert_eq!(fused.2[row.clone()], pair.2[row], "{name}: stored values differ");
                let q: Vec<f32> = fused.0[..hq * d].iter().map(|&b| half::f16::from_bits(b).to_f32()).collect();
                check(&name, &q, &want_q);
            }
        }
    }
    let (dx, dw) = (g.upload_f16(&[0.0; 8]).unwrap(), g.upload_f16(&[0.0; 8 * 12]).unwrap());
    let (mut qkv, mut kc, mut vc) =
        (g.poisoned_f16(12).unwrap(), g.poisoned_f16(4).unwrap(), g.poisoned_f16(4).unwrap());
    let (pos, t) = (g.stream.clone_htod(&[0i32]).unwrap(), g.stream.clone_htod(&[1.0f32; 4]).unwrap());
    assert!(
        g.gemv_qkv_rope_dev(&mut qkv, &mut kc, &mut vc, &dx, &dw, 8, 2, 1, 4, 8, &pos, &t, &t, 4, None, 0).is_err(),
        "split 8"
    );
    assert!(
        g.gemv_qkv_rope_dev(&mut qkv, &mut kc, &mut vc, &dx, &dw, 8, 2, 1, 4, 1, &pos, &t, &t, 4, None, 1).is_err(),
        "cache row 1 of a one-row cache"
    );
}

#[test]
fn gemv_with_the_residual_add_and_rmsnorm_matches_float64_and_the_pair() {
    let Some(g) = gpu() else { return };
    let mut rng = SplitMix64::new(8);
    let eps = 1e-5f32;
    let bits = |d: &cudarc::driver::CudaSlice<half::f16>| {
        g.stream.clone_dtoh(d).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    // (k, n): LLaVA-7B's o projection, ShapesWorld-sized, a tiny one with n not a multiple of a block's features.
    for &(k, n, splits) in
        &[(4096usize, 4096usize, &[1usize, 2][..]), (96, 288, &[1, 2, 4, 8][..]), (8, 5, &[1, 2, 4, 8][..])]
    {
        for &split in splits {
            // Twice each: the launch's ticket counter must be back at 0 for the next launch.
            for round in 0..2 {
                let (x, w, res, nw) = (
                    randn(&mut rng, k, 1.0),
                    randn(&mut rng, n * k, 0.05),
                    randn(&mut rng, n, 1.0),
                    randn(&mut rng, n, 1.0),
                );
                let (xh, wh, rh, nh) = (h(&x), h(&w), h(&res), h(&nw));
                // float64, with the kernel's two fp16 roundings: the projection as stored, the residual sum.
                let t: Vec<f64> = (0..n).map(|j| (0..k).map(|c| xh[c] * wh[j * k + c]).sum::<f64>()).collect();
                let hn: Vec<f64> =
                    (0..n).map(|j| half::f16::from_f64(rh[j] + half::f16::from_f64(t[j]).to_f64()).to_f64()).collect();
                let inv = 1.0 / (hn.iter().map(|v| v * v).sum::<f64>() / n as f64 + eps as f64).sqrt();
                let want: Vec<f64> = (0..n).map(|j| hn[j] * inv * nh[j]).collect();
                let (dx, dw, dn) = (g.upload_f16(&x).unwrap(), g.upload_f16(&w).unwrap(), g.upload_f16(&nw).unwrap());
                let (mut dh, mut dt, mut dout) =
                    (g.upload_f16(&res).unwrap(), g.poisoned_f16(n).unwrap(), g.poisoned_f16(n).unwrap());
                g.gemv_add_rmsnorm_dev(&mut dout, &mut dh, &mut dt, &dn, &dx, &dw, k, n, split, eps).unwrap();
                let name = format!("gemv_add_rmsnorm_m1_f16 k{k} n{n} split {split} (launch {})", round + 1);
                check(&name, &g.download_f16(&dout).unwrap(), &want);
                check(&format!("{name}: residual stream"), &g.download_f16(&dh).unwrap(), &hn);
                // The pair it replaces: gemv_m1_f16, then add_rmsnorm_f16. The projection and the residual stream are
                // the same fp16 numbers; the norm differs only by the order its sum of squares is added in.
                let (mut ph, mut pt, mut pout) =
                    (g.upload_f16(&res).unwrap(), g.poisoned_f16(n).unwrap(), g.poisoned_f16(n).unwrap());
                g.gemv_split_dev(&dx, &dw, &mut pt, k, n, split).unwrap();
                g.add_rmsnorm_dev(&mut pout, &mut ph, &pt, &dn, 1, eps).unwrap();
                assert_eq!(bits(&dt), bits(&pt), "{name}: the projection differs from gemv_m1_f16's");
                assert_eq!(bits(&dh), bits(&ph), "{name}: the residual stream differs from add_rmsnorm_f16's");
                let (a, b) = (g.download_f16(&dout).unwrap(), g.download_f16(&pout).unwrap());
                let scale = b.iter().map(|v| v.abs()).fold(1e-3f32, f32::max);
                let worst = a.iter().zip(&b).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
                assert!(
                    worst <= 2e-3 * scale,
                    "{name}: the norm differs from add_rmsnorm_f16's by {worst} (largest {scale})"
                );
            }
        }
    }
    let (dx, dw, dn) =
        (g.upload_f16(&[0.0; 12]).unwrap(), g.upload_f16(&[0.0; 36]).unwrap(), g.upload_f16(&[1.0; 3]).unwrap());
    let (mut dh, mut dt, mut dout) =
        (g.poisoned_f16(3).unwrap(), g.poisoned_f16(3).unwrap(), g.poisoned_f16(3).unwrap());
    assert!(
        g.gemv_add_rmsnorm_dev(&mut dout, &mut dh, &mut dt, &dn, &dx, &dw, 12, 3, 1, eps).is_err(),
        "k = 12 (not a multiple of 8)"
    );
    assert!(g.gemv_add_rmsnorm_dev(&mut dout, &mut dh, &mut dt, &dn, &dx, &dw, 8, 3, 3, eps).is_err(), "split 3");
}

#[test]
fn fused_decode_kernels_match_float64_and_their_unfused_pairs() {
    let Some(g) = gpu() else { return };
    let mut rng = SplitMix64::new(6);
    // SwiGLU as the gate/up GEMV's epilogue: (k, inter) of LLaVA-7B's MLP (one warp per row), a mid-sized one,
    // ShapesWorld's and a tiny one (1, 2 and 4 warps per row).
    for &(k, inter, splits) in &[
        (4096usize, 11008usize, &[1usize][..]),
        (512, 1376, &[1, 2, 4][..]),
        (96, 256, &[1, 2, 4][..]),
        (8, 5, &[1, 2, 4][..]),
    ] {
        let x = randn(&mut rng, k, 1.0);
        let w = randn(&mut rng, 2 * inter * k, 0.05);
        let (xh, wh) = (h(&x), h(&w));
        let dot = |r: usize| -> f64 { (0..k).map(|c| xh[c] * wh[r * k + c]).sum() };
        let want: Vec<f64> = (0..inter).map(|c| dot(c) / (1.0 + (-dot(c)).exp()) * dot(inter + c)).collect();
        // The unfused pair: gemv_m1_f16 into [gate | up], then swiglu_f16.
        let gu = g.gemv(&x, &w).unwrap();
        let unfused = g.swiglu(&gu[..inter], &gu[inter..], inter).unwrap();
        for &split in splits {
            let got = g.gemv_swiglu(&x, &w, split).unwrap();
            check(&format!("gemv_swiglu_m1_f16 k{k} inter{inter} split {split}"), &got, &want);
            let worst = got.iter().zip(&unfused).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            let scale = unfused.iter().map(|v| v.abs()).fold(1e-3f32, f32::max);
            println!("gemv_swiglu_m1_f16 k{k} inter{inter} split {split}: max |fused - unfused| {worst:e} (largest |value| {scale:e})");
            assert!(worst <= 5e-3 * scale, "k{k} inter{inter} split {split}: fused differs from unfused by {worst}");
        }
    }
    assert!(g.gemv_swiglu(&[0.0; 8], &[0.0; 16], 8).is_err(), "split 8");
    // RoPE + cache store in one kernel against rope_f16 then kv_store_f16: the same fp16 values, bit for bit.
    for &(rows, hq, hkv, d, start) in
        &[(1usize, 4usize, 4usize, 24usize, 0usize), (9, 8, 2, 128, 5), (3, 32, 32, 128, 700)]
    {
        let stride = (hq + 2 * hkv) * d;
        let qkv = randn(&mut rng, rows * stride, 1.0);
        let (cos, sin) = rope_tables(d, start + rows + 1);
        let pos: Vec<i32> = (start..start + rows).map(|p| p as i32).collect();
        let [fused, unfused] = g.rope_kv_store_pair(&qkv, &pos, &cos, &sin, hq, hkv, d, start, start + rows).unwrap();
        let w = hkv * d;
        let (a, b) = (&fused, &unfused);
        assert!(
            a.0.iter().zip(&b.0).all(|(x, y)| x.to_bits() == y.to_bits()),
            "rope_kv_store_f16 {rows}x{hq}/{hkv}x{d}: q/k after RoPE differ"
        );
        for (name, x, y) in [("keys", &a.1, &b.1), ("values", &a.2, &b.2)] {
            // Rows before `start` are poison in both; the stored rows must be equal.
            assert!(
                x[start * w..].iter().zip(&y[start * w..]).all(|(p, q)| p.to_bits() == q.to_bits()),
                "rope_kv_store_f16 {rows}x{hq}/{hkv}x{d}: stored {name} differ"
            );
        }
        println!(
            "rope_kv_store_f16 {rows} rows, heads {hq}/{hkv}, d {d}, at {start}: identical to rope_f16 + kv_store_f16"
        );
    }
}

/// float64 attention of one query row against keys 0..=limit.
fn attend(q: &[f64], ks: &[&[f64]], vs: &[&[f64]], d: usize) -> Vec<f64> {
    let scale = 1.0 / (d as f64).sqrt();
    let s: Vec<f64> = ks.iter().map(|k| q.iter().zip(k.iter()).map(|(a, b)| a * b).sum::<f64>() * scale).collect();
    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let p: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
    let z: f64 = p.iter().sum();
    (0..d).map(|i| p.iter().zip(vs).map(|(pj, v)| pj * v[i]).sum::<f64>() / z).collect()
}

#[test]
fn attention_kernels_match_float64() {
    let Some(g) = gpu() else { return };
    let mut rng = SplitMix64::new(3);
    // (n_q, n_k, heads_q, heads_kv, d, causal): text (causal, with and without a cached prefix), vision (full), GQA,
    // MQA, head sizes of ShapesWorld (24), CLIP-L (64) and LLaMA (128).
    // Head sizes 64 and 128 run twice: the tensor-core kernels (flash_attn_mma_d*_f16, the default on sm_80+) and
    // the scalar one; partial tiles of 64 rows and keys, a prefix offset that is not a tile multiple, and a query
    // block whose first rows see no key of a tile are included.
    // Sliding windows (Mistral, Qwen2): shorter than a tile, and long ones whose first tiles the block skips, with
    // and without a cached prefix.
    let shapes = [
        (1usize, 1usize, 1usize, 1usize, 16usize, true, None),
        (37, 37, 4, 4, 24, true, None),
        (20, 90, 8, 2, 64, true, None),
        (577, 577, 4, 4, 64, false, None),
        (64, 640, 8, 1, 128, true, None),
        (130, 130, 2, 2, 64, true, None),
        (70, 203, 4, 2, 128, true, None),
        (1, 1, 2, 1, 128, true, None),
        (150, 100, 2, 2, 128, false, None),
        (37, 37, 4, 4, 24, true, Some(5usize)),
        (130, 130, 2, 2, 64, true, Some(17)),
        (70, 203, 4, 2, 128, true, Some(100)),
        (200, 200, 2, 1, 128, true, Some(64)),
    ];
    let mma_default = g.mma_attention.load(std::sync::atomic::Ordering::Relaxed);
    let runs = shapes
        .iter()
        .flat_map(|&s| [(s, false), (s, true)])
        .filter(|&((.., d, _, _), mma)| !mma || (mma_default && (d == 64 || d == 128)));
    for ((n_q, n_k, hq, hkv, d, causal, window), mma) in runs {
        let q = randn(&mut rng, n_q * hq * d, 1.0);
        let k = randn(&mut rng, n_k * hkv * d, 1.0);
        let v = randn(&mut rng, n_k * hkv * d, 1.0);
        let (qh, kh, vh) = (h(&q), h(&k), h(&v));
        let mut want = vec![0.0; q.len()];
        let offset = n_k - n_q;
        for i in 0..n_q {
            for hh in 0..hq {
                let kvh = hh / (hq / hkv);
                let limit = if causal { i + offset } else { n_k - 1 };
                let first = window.map_or(0, |w| (limit + 1).saturating_sub(w));
                let ks: Vec<&[f64]> =
                    (first..=limit).map(|j| &kh[(j * hkv + kvh) * d..(j * hkv + kvh + 1) * d]).collect();
                let vs: Vec<&[f64]> =
                    (first..=limit).map(|j| &vh[(j * hkv + kvh) * d..(j * hkv + kvh + 1) * d]).collect();
                let o = attend(&qh[(i * hq + hh) * d..(i * hq + hh + 1) * d], &ks, &vs, d);
                want[(i * hq + hh) * d..(i * hq + hh + 1) * d].copy_from_slice(&o);
            }
        }
        g.mma_attention.store(mma, std::sync::atomic::Ordering::Relaxed);
        let kernel = if mma { format!("flash_attn_mma_d{d}_f16") } else { "flash_attn_prefill_f16".into() };
        // A launch error names the kernel too (scripts/gpu-check.sh looks for "mma" in a failure).
        let mask = match (causal, window) {
            (false, _) => engine::ops::Mask::Full,
            (true, w) => engine::ops::Mask::causal(w),
        };
        let got = g.attention_prefill(&q, &k, &v, hq, hkv, d, mask).unwrap_or_else(|e| panic!("{kernel}: {e}"));
        check(&format!("{kernel} q{n_q} k{n_k} h{hq}/{hkv} d{d} {mask:?}"), &got, &want);
    }
    g.mma_attention.store(mma_default, std::sync::atomic::Ordering::Relaxed);
    // Decode: n sequences share a prefix (image + prompt) and each has its own suffix of another length.
    // One sequence over a long cache (split across many blocks), ten answers over a LLaVA-sized prefix, GQA, and a
    // head size not a multiple of 4 (the kernel's element-wise loads instead of 8-byte ones), and a cache long
    // enough for more than 128 chunks of 32 keys.
    // With a sliding window: one reaching into the prefix, one (10 keys) inside some sequences' suffixes, one longer
    // than every sequence, and one leaving most of a long cache's chunks empty.
    let mut most_chunks = 0;
    for &(bsz, prefix, hq, hkv, d, window) in &[
        (1usize, 5usize, 1usize, 1usize, 16usize, None),
        (1, 700, 32, 32, 128, None),
        (10, 600, 8, 8, 128, None),
        (4, 33, 4, 2, 24, None),
        (3, 45, 6, 3, 18, None),
        (1, 4500, 1, 1, 16, None),
        (10, 600, 8, 8, 128, Some(100usize)),
        (4, 33, 4, 2, 24, Some(10)),
        (3, 45, 6, 3, 18, Some(1000)),
        (1, 4500, 1, 1, 16, Some(70)),
    ] {
        let row = hkv * d;
        let pk = randn(&mut rng, prefix * row, 1.0);
        let pv = randn(&mut rng, prefix * row, 1.0);
        let sk: Vec<Vec<f32>> = (0..bsz).map(|b| randn(&mut rng, (b * 7 % 40 + 1) * row, 1.0)).collect();
        let sv: Vec<Vec<f32>> = sk.iter().map(|s| randn(&mut rng, s.len(), 1.0)).collect();
        let q = randn(&mut rng, bsz * hq * d, 1.0);
        let (qh, pkh, pvh) = (h(&q), h(&pk), h(&pv));
        let mut want = vec![0.0; q.len()];
        for b in 0..bsz {
            let (skh, svh) = (h(&sk[b]), h(&sv[b]));
            let n_s = sk[b].len() / row;
            for hh in 0..hq {
                let kvh = hh / (hq / hkv);
                let mut ks: Vec<&[f64]> =
                    (0..prefix).map(|j| &pkh[j * row + kvh * d..j * row + (kvh + 1) * d]).collect();
                let mut vs: Vec<&[f64]> =
                    (0..prefix).map(|j| &pvh[j * row + kvh * d..j * row + (kvh + 1) * d]).collect();
                ks.extend((0..n_s).map(|j| &skh[j * row + kvh * d..j * row + (kvh + 1) * d]));
                vs.extend((0..n_s).map(|j| &svh[j * row + kvh * d..j * row + (kvh + 1) * d]));
                // The window: the sequence's last `w` keys (its newest token among them).
                let first = window.map_or(0, |w| ks.len().saturating_sub(w));
                let o = attend(&qh[(b * hq + hh) * d..(b * hq + hh + 1) * d], &ks[first..], &vs[first..], d);
                want[(b * hq + hh) * d..(b * hq + hh + 1) * d].copy_from_slice(&o);
            }
        }
        // As the GPU splits the keys (one wave of blocks), then into many more chunks, past the 128 the merge
        // takes in one tile.
        let per_sm = g.decode_blocks_per_sm.load(std::sync::atomic::Ordering::Relaxed);
        for blocks in [per_sm, 64] {
            g.decode_blocks_per_sm.store(blocks, std::sync::atomic::Ordering::Relaxed);
            let nsplit = g.decode_split(prefix + sk.iter().map(|s| s.len() / row).max().unwrap_or(0), bsz, hq).1;
            most_chunks = most_chunks.max(nsplit);
            let got = g.attention_decode(&q, &pk, &pv, &sk, &sv, hq, hkv, d, window).unwrap();
            let tag =
                format!("attn_decode_f16 b{bsz} prefix{prefix} h{hq}/{hkv} d{d} window {window:?}, {nsplit} chunks");
            check(&tag, &got, &want);
            // The chunks merged by a second launch (attn_decode_combine_f16) instead of each head's last block:
            // the same arithmetic, so the same numbers.
            g.fuse.store(false, std::sync::atomic::Ordering::Relaxed);
            let separate = g.attention_decode(&q, &pk, &pv, &sk, &sv, hq, hkv, d, window);
            g.fuse.store(true, std::sync::atomic::Ordering::Relaxed);
            let separate = separate.unwrap();
            assert!(got.iter().zip(&separate).all(|(a, b)| a.to_bits() == b.to_bits()), "attn_decode_f16 b{bsz} prefix{prefix} {nsplit} chunks: merged in the last block vs by attn_decode_combine_f16");
        }
        g.decode_blocks_per_sm.store(per_sm, std::sync::atomic::Ordering::Relaxed);
    }
    assert!(most_chunks > 128, "no case split the keys into more than 128 chunks (the merge's second tile)");
}

#[test]
fn decode_attention_reuses_its_workspace_launch_after_launch() {
    // A decode session keeps one workspace for every layer and step: the per-head ticket counters the last block
    // uses must be back at 0 after each launch, or the next launch would merge nothing.
    let Some(g) = gpu() else { return };
    let mut rng = SplitMix64::new(31);
    let (bsz, prefix, cap, hq, hkv, d) = (2usize, 100usize, 10usize, 4usize, 4usize, 32usize);
    let row = hkv * d;
    let max_total = prefix + cap;
    assert!(g.decode_split(max_total, bsz, hq).1 > 1, "the shape must split the keys");
    let up = |v: Vec<f32>| g.upload_f16(&v).unwrap();
    let (q, pk, pv) = (
        up(randn(&mut rng, bsz * hq * d, 1.0)),
        up(randn(&mut rng, prefix * row, 1.0)),
        up(randn(&mut rng, prefix * row, 1.0)),
    );
    let (sk, sv) = (up(randn(&mut rng, bsz * cap * row, 1.0)), up(randn(&mut rng, bsz * cap * row, 1.0)));
    let lens = g.stream.clone_htod(&[3i32, 7]).unwrap();
    let mut part = g.stream.alloc_zeros::<f32>(g.decode_part_len(max_total, bsz, hq, d)).unwrap();
    let mut runs = Vec::new();
    // Launches 2 and 5 also prefetch a buffer into L2 (the o projection's weights in a decode step): a hint that
    // changes no number (on cuemu, a read of every line, checked against the buffer's bounds).
    let weights = up(randn(&mut rng, 3 * 4096 + 5, 1.0));
    for (fused, prefetch) in [(true, false), (true, true), (true, false), (false, false), (true, true)] {
        g.fuse.store(fused, std::sync::atomic::Ordering::Relaxed);
        let mut out = g.poisoned_f16(bsz * hq * d).unwrap();
        let r = g.attention_decode_dev(
            &mut out,
            &q,
            hq * d,
            &pk,
            &pv,
            prefix,
            &sk,
            &sv,
            &lens,
            cap * row,
            bsz,
            max_total,
            hq,
            hkv,
            d,
            &mut part,
            prefetch.then_some(&weights),
            None,
        );
        g.fuse.store(true, std::sync::atomic::Ordering::Relaxed);
        r.unwrap();
        runs.push(g.stream.clone_dtoh(&out).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }
    assert!(runs[0].iter().all(|&b| !half::f16::from_bits(b).is_nan()), "every output written");
    for (i, r) in runs.iter().enumerate().skip(1) {
        assert_eq!(r, &runs[0], "launch {} on the same workspace gives other numbers (launch 4 merges with attn_decode_combine_f16; 2 and 5 prefetch)", i + 1);
    }
}

#[test]
fn embedded_kernel_sources_define_the_expected_kernels() {
    // Runs everywhere: the registry holds every file of kernels/ and every kernel carries its dtype.
    let root = gpu_common::root();
    let files: Vec<String> = std::fs::read_dir(root.join("kernels"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
        .filter(|f| f.ends_with(".cu"))
        .collect();
    for f in &files {
        assert!(
            engine::cuda::SOURCES.iter().any(|(n, _)| n == f),
            "kernels/{f} is not embedded in engine::cuda::SOURCES"
        );
    }
    let mut all = Vec::new();
    for (f, _) in engine::cuda::SOURCES {
        let src = engine::cuda::source(f).unwrap();
        assert!(!src.contains("#include \"common.cuh\""), "common.cuh is inlined");
        let names = engine::cuda::kernel_names(&src);
        assert!(!names.is_empty(), "{f} defines no kernel");
        all.extend(names);
    }
    for k in [
        "embedding_gather_f16",
        "rmsnorm_f16",
        "layernorm_f16",
        "rope_f16",
        "flash_attn_prefill_f16",
        "attn_decode_f16",
        "attn_decode_combine_f16",
        "kv_store_f16",
        "add_rmsnorm_f16",
        "flash_attn_bwd_dq_f16",
        "flash_attn_bwd_dkdv_f16",
        "attn_bwd_delta_f16",
        "rmsnorm_bwd_f16",
        "layernorm_bwd_f16",
        "swiglu_bwd_f16",
        "gelu_bwd_f16",
        "quick_gelu_bwd_f16",
        "rope_bwd_f16",
        "embedding_bwd_f32",
        "logprob_gather_f16",
        "logprob_bwd_f16",
        "adamw_f32",
        "grad_sumsq_f32",
        "grad_accumulate_f32",
        "gemv_m1_f16",
        "gemv_swiglu_m1_f16",
        "rope_kv_store_f16",
        "swiglu_f16",
        "gelu_f16",
        "quick_gelu_f16",
        "bias_add_f16",
        "residual_add_f16",
        "lora_down_f16",
        "lora_up_add_f16",
        "logprob_gather_f32",
        "f32_to_f16",
        "f16_to_f32",
        "argmax_step_f16",
        "gemv_add_rmsnorm_m1_f16",
        "gemv_qkv_rope_m1_f16",
    ] {
        assert!(all.iter().any(|n| n == k), "kernel {k} is missing");
    }
    assert_eq!(engine::cuda::arch_name(9, 0), "sm_90");
    assert_eq!(engine::cuda::arch_name(8, 0), "sm_80");
}
