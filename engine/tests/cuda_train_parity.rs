//! CUDA II: every backward kernel and the optimizer against the CPU backend (`engine::ops::backward`,
//! `engine::ops::Rope`) on fresh random inputs, the inputs rounded to fp16 first so both sides see the same values,
//! outputs poisoned with NaN beforehand. Tolerance: relative L2 error <= 2e-2. AdamW against a float64 reference
//! written here. Where no GPU exists each test prints why and passes; `scripts/gpu-check.sh` runs them on a GPU host.

use engine::config::{Activation, RopeScaling};
use engine::cuda::{AdamW, Gpu};
use engine::ops::backward as bw;
use engine::ops::Rope;
use engine::rng::SplitMix64;

mod gpu_common;
use gpu_common::gpu;

/// Uniform in [-scale, scale), rounded to fp16 (what the device stores).
fn randh(rng: &mut SplitMix64, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| half::f16::from_f32((rng.next_f64() as f32 * 2.0 - 1.0) * scale).to_f32()).collect()
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length");
    assert!(got.iter().all(|v| v.is_finite()), "non-finite output (a poisoned element was not written?)");
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum::<f64>().max(1e-30);
    (num / den).sqrt()
}

fn check(name: &str, got: &[f32], want: &[f32]) {
    let e = rel_l2(got, want);
    println!("{name:<48} rel L2 {e:.2e}");
    assert!(e <= 2e-2, "{name}: relative L2 error {e}");
}

#[test]
fn norm_activation_rope_and_embedding_backward_match_the_cpu_backend() {
    let Some(g) = gpu() else { return };
    let mut rng = SplitMix64::new(11);
    for &(rows, cols) in &[(1usize, 8usize), (7, 96), (33, 4096), (5, 1000)] {
        let x = randh(&mut rng, rows * cols, 2.0);
        let w = randh(&mut rng, cols, 1.5);
        let dout = randh(&mut rng, rows * cols, 1.0);
        let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; cols]);
        bw::rmsnorm_bwd(&mut dx, Some(&mut dw), &dout, &x, &w, 1e-5);
        let (gx, gw) = g.rmsnorm_bwd(&dout, &x, &w, 1e-5).unwrap();
        check(&format!("rmsnorm_bwd_f16 dx {rows}x{cols}"), &gx, &dx);
        check(&format!("rmsnorm_bwd_f16 dw {rows}x{cols}"), &gw, &dw);
        let (mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; cols], vec![0.0; cols]);
        bw::layernorm_bwd(&mut dx, Some(&mut dw), Some(&mut db), &dout, &x, &w, 1e-5);
        let (gx, gw, gb) = g.layernorm_bwd(&dout, &x, &w, 1e-5).unwrap();
        check(&format!("layernorm_bwd_f16 dx {rows}x{cols}"), &gx, &dx);
        check(&format!("layernorm_bwd_f16 dw {rows}x{cols}"), &gw, &dw);
        check(&format!("layernorm_bwd_f16 db {rows}x{cols}"), &gb, &db);
    }
    for &n in &[1usize, 1000, 11008 * 3 + 5] {
        let (gt, up, dout) = (randh(&mut rng, n, 4.0), randh(&mut rng, n, 2.0), randh(&mut rng, n, 1.0));
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        bw::silu_mul_bwd(&mut dg, &mut du, &dout, &gt, &up);
        let (gg, gu) = g.swiglu_bwd(&dout, &gt, &up).unwrap();
        check(&format!("swiglu_bwd_f16 dgate n{n}"), &gg, &dg);
        check(&format!("swiglu_bwd_f16 dup n{n}"), &gu, &du);
        for (kernel, act) in [("gelu_bwd_f16", Activation::Gelu), ("quick_gelu_bwd_f16", Activation::QuickGelu)] {
            let mut dx = vec![0.0; n];
            bw::activation_bwd(&mut dx, &dout, &gt, act);
            check(&format!("{kernel} n{n}"), &g.activation_bwd(kernel, &dout, &gt).unwrap(), &dx);
        }
    }
    for &(tokens, heads, hd) in &[(1usize, 1usize, 8usize), (37, 4, 24), (70, 32, 128)] {
        let rope = Rope::new(hd, 10000.0, &RopeScaling::None);
        let (cos, sin) = rope.tables(512);
        let positions: Vec<usize> = (0..tokens).map(|i| (i * 7 + 3) % 512).collect();
        let dx = randh(&mut rng, tokens * heads * hd, 1.0);
        let mut want = dx.clone();
        rope.apply_backward(&mut want, heads, &positions);
        let pos: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        check(
            &format!("rope_bwd_f16 t{tokens} h{heads} d{hd}"),
            &g.rope_bwd(&dx, &pos, &cos, &sin, heads, hd).unwrap(),
            &want,
        );
    }
    for &(vocab, dim, n) in &[(50usize, 8usize, 1usize), (1000, 96, 300), (32064, 4096, 40)] {
        // Repeated ids add up.
        let ids: Vec<u32> = (0..n).map(|i| ((i * 7919) % vocab.min(60)) as u32).collect();
        let dout = randh(&mut rng, n * dim, 1.0);
        let mut want = vec![0.0; vocab * dim];
        bw::embedding_bwd(&mut want, &dout, &ids, dim);
        let ids32: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        check(
            &format!("embedding_bwd_f32 v{vocab} d{dim} n{n}"),
            &g.embedding_bwd(vocab, dim, &dout, &ids32).unwrap(),
            &want,
        );
    }
}

#[test]
fn flash_attention_backward_matches_the_cpu_backend() {
    let Some(g) = gpu() else { return };
    let mut rng = SplitMix64::new(12);
    // (n_q, n_k, heads_q, heads_kv, d, mask): text with and without a cached prefix, GQA, MQA, the vision tower
    // (full), ShapesWorld's and LLaMA's head sizes, a LLaVA-length sequence. Head sizes 64 and 128 run twice: the
    // tensor-core kernels (forward and backward, the default on sm_80+) and the scalar ones; partial 64-row tiles
    // and a prefix offset that is not a tile multiple are included.
    // Sliding windows (Mistral, Qwen2) shorter than a tile and longer, with and without a cached prefix.
    use engine::ops::Mask;
    let shapes = [
        (1usize, 1usize, 1usize, 1usize, 16usize, Mask::Causal),
        (37, 37, 4, 4, 24, Mask::Causal),
        (20, 90, 8, 2, 64, Mask::Causal),
        (65, 65, 4, 4, 64, Mask::Full),
        (48, 48, 4, 1, 128, Mask::Causal),
        (700, 700, 2, 2, 128, Mask::Causal),
        (70, 203, 4, 2, 128, Mask::Causal),
        (130, 130, 2, 2, 64, Mask::Causal),
        (37, 37, 4, 4, 24, Mask::Window(5)),
        (130, 130, 2, 2, 64, Mask::Window(17)),
        (70, 203, 4, 2, 128, Mask::Window(100)),
    ];
    let mma_default = g.mma_attention.load(std::sync::atomic::Ordering::Relaxed);
    let runs = shapes
        .iter()
        .flat_map(|&s| [(s, false), (s, true)])
        .filter(|&((.., d, _), mma)| !mma || (mma_default && (d == 64 || d == 128)));
    for ((n_q, n_k, hq, hkv, d, mask), mma) in runs {
        let q = randh(&mut rng, n_q * hq * d, 1.0);
        let k = randh(&mut rng, n_k * hkv * d, 1.0);
        let v = randh(&mut rng, n_k * hkv * d, 1.0);
        let dout = randh(&mut rng, n_q * hq * d, 1.0);
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        let scale = 1.0 / (d as f32).sqrt();
        bw::attend_dense_bwd(
            &mut dq,
            &mut dk,
            &mut dv,
            &dout,
            &q,
            &k,
            &v,
            n_q,
            n_k,
            n_k - n_q,
            hq,
            hkv,
            d,
            scale,
            mask,
        );
        g.mma_attention.store(mma, std::sync::atomic::Ordering::Relaxed);
        let name = format!("q{n_q} k{n_k} h{hq}/{hkv} d{d} {mask:?}{}", if mma { " (mma)" } else { "" });
        // A launch error names the kernels too (scripts/gpu-check.sh looks for "mma" in a failure).
        let (gq, gk, gv) = g
            .attention_bwd(&q, &k, &v, &dout, hq, hkv, d, mask)
            .unwrap_or_else(|e| panic!("flash_attn_bwd {name}: {e}"));
        check(&format!("flash_attn_bwd dq {name}"), &gq, &dq);
        check(&format!("flash_attn_bwd dk {name}"), &gk, &dk);
        check(&format!("flash_attn_bwd dv {name}"), &gv, &dv);
    }
    g.mma_attention.store(mma_default, std::sync::atomic::Ordering::Relaxed);
}

#[test]
fn logprob_backward_and_adamw_match_references() {
    let Some(g) = gpu() else { return };
    let mut rng = SplitMix64::new(13);
    for &(rows, vocab) in &[(1usize, 10usize), (17, 1000), (64, 32064)] {
        let logits = randh(&mut rng, rows * vocab, 8.0);
        let labels: Vec<u32> = (0..rows).map(|r| ((r * 7919 + 11) % vocab) as u32).collect();
        let dlogp: Vec<f32> = (0..rows).map(|r| if r % 3 == 0 { -0.75 } else { 0.4 + r as f32 * 0.01 }).collect();
        let mut want_d = vec![0.0; logits.len()];
        let want_lp = bw::logprob_gather_fwd_bwd(&mut want_d, &logits, &labels, &dlogp, vocab);
        let l32: Vec<i32> = labels.iter().map(|&l| l as i32).collect();
        let (lp, d) = g.logprob_fwd_bwd_f16(&logits, vocab, &l32, &dlogp).unwrap();
        let lp_err = lp.iter().zip(&want_lp).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        println!("logprob_gather_f16 rows {rows} vocab {vocab}: max |log-prob error| {lp_err:.2e}");
        assert!(lp_err <= 2e-3, "log-probs differ by {lp_err}");
        check(&format!("logprob_bwd_f16 rows {rows} vocab {vocab}"), &d, &want_d);
    }
    // AdamW: 3 steps on fp32 masters against float64, gradients scaled by 1024 and unscaled by gscale.
    let n = 10_000;
    let cfg = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    let p0: Vec<f32> = (0..n).map(|_| rng.next_f64() as f32 - 0.5).collect();
    let (mut p, mut m, mut v) = (stream(&g, &p0), stream(&g, &vec![0.0; n]), stream(&g, &vec![0.0; n]));
    let mut p16 = g.upload_f16(&vec![0.0; n]).unwrap();
    let (mut rp, mut rm, mut rv): (Vec<f64>, Vec<f64>, Vec<f64>) =
        (p0.iter().map(|&x| x as f64).collect(), vec![0.0; n], vec![0.0; n]);
    for step in 1..=3u32 {
        let grad: Vec<f32> = (0..n).map(|_| (rng.next_f64() as f32 - 0.5) * 1024.0).collect();
        let mut dg = stream(&g, &grad);
        let gscale = 0.5 / 1024.0;
        g.adamw_dev(&mut p, &mut m, &mut v, &mut dg, Some(&mut p16), &cfg, step, gscale).unwrap();
        let (b1, b2) = (cfg.beta1 as f64, cfg.beta2 as f64);
        let (bc1, bc2) = (1.0 - b1.powi(step as i32), 1.0 - b2.powi(step as i32));
        for i in 0..n {
            let gi = grad[i] as f64 * gscale as f64;
            rm[i] = b1 * rm[i] + (1.0 - b1) * gi;
            rv[i] = b2 * rv[i] + (1.0 - b2) * gi * gi;
            rp[i] -= cfg.lr as f64
                * (rm[i] / bc1 / ((rv[i] / bc2).sqrt() + cfg.eps as f64) + cfg.weight_decay as f64 * rp[i]);
        }
        let zeroed = g.stream.clone_dtoh(&dg).unwrap();
        assert!(zeroed.iter().all(|&x| x == 0.0), "the gradient is zeroed after the step");
    }
    let got_p = g.stream.clone_dtoh(&p).unwrap();
    let max_err = got_p.iter().zip(&rp).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
    println!("adamw_f32 3 steps, {n} parameters: max |parameter error| {max_err:.2e}");
    assert!(max_err <= 1e-6, "AdamW parameters differ by {max_err}");
    let half = g.download_f16(&p16).unwrap();
    assert!(half.iter().zip(&got_p).all(|(h, p)| (h - p).abs() <= 1e-3), "the fp16 copy follows the master weights");
    // The overflow check: finite sums match float64; one inf makes it non-finite.
    let x: Vec<f32> = (0..100_000).map(|i| ((i % 97) as f32 - 48.0) * 0.01).collect();
    let want: f64 = x.iter().map(|&a| (a as f64).powi(2)).sum();
    let got = g.sumsq_dev(&stream(&g, &x)).unwrap();
    assert!((got - want).abs() / want <= 1e-5, "sum of squares {got} vs {want}");
    let mut y = x.clone();
    y[77_777] = f32::INFINITY;
    assert!(!g.sumsq_dev(&stream(&g, &y)).unwrap().is_finite(), "an inf gradient is detected");
}

fn stream(g: &Gpu, x: &[f32]) -> cudarc::driver::CudaSlice<f32> {
    g.stream.clone_htod(x).unwrap()
}

/// LoRA dropout's masks on the device are the CPU trainer's (`Adapter::dropout_input`) element for element, forward
/// and backward; so the GPU and CPU trainers drop the same inputs.
#[test]
fn lora_dropout_masks_match_the_cpu_trainer_exactly() {
    let Some(g) = gpu() else { return };
    let model = engine::Model::load(&gpu_common::root().join("assets/shapes-base")).unwrap();
    let mut adapter =
        model.create_adapter(&engine::adapter::LoraSpec { r: 4, lora_alpha: 8.0, ..Default::default() }, 1).unwrap();
    let mut rng = SplitMix64::new(5);
    for (p, seed, name, n) in [
        (0.1, 7u64, "language_model.layers.0.self_attn.q_proj", 4099usize),
        (0.5, u64::MAX - 3, "language_model.layers.1.mlp.down_proj", 70_000),
    ] {
        adapter.lora_dropout = p;
        adapter.set_dropout_seed(Some(seed));
        let x = randh(&mut rng, n, 3.0);
        let want: Vec<f32> =
            adapter.dropout_input(name, &x).unwrap().iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        let base = engine::adapter::dropout_base(seed, name);
        let dx_ = g.upload_f16(&x).unwrap();
        let mut out = g.upload_f16(&vec![f32::NAN; n]).unwrap();
        g.lora_dropout_dev(&mut out, &dx_, n, base, p).unwrap();
        let got = g.download_f16(&out).unwrap();
        let differ = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        let dropped = want.iter().zip(&x).filter(|(w, x)| **w == 0.0 && **x != 0.0).count() as f64 / n as f64;
        println!(
            "lora_dropout_f16 p={p} n={n}: {differ} of {n} elements differ from the CPU's; {:.3} dropped",
            dropped
        );
        assert_eq!(differ, 0, "p={p}: the device's dropout differs from the CPU trainer's in {differ} elements");
        assert!((dropped - p).abs() < 0.02, "dropped fraction {dropped} for p={p}");
        // Backward: dx += dxl through the same mask (the CPU's: dxl * dropout_input(ones)).
        let (d0, dl) = (randh(&mut rng, n, 1.0), randh(&mut rng, n, 1.0));
        let mask = adapter.dropout_input(name, &vec![1.0; n]).unwrap();
        let want: Vec<f32> =
            d0.iter().zip(&dl).zip(&mask).map(|((a, b), m)| half::f16::from_f32(a + b * m).to_f32()).collect();
        let mut dx = g.upload_f16(&d0).unwrap();
        g.lora_dropout_bwd_add_dev(&mut dx, &g.upload_f16(&dl).unwrap(), n, base, p).unwrap();
        check(&format!("lora_dropout_bwd_add_f16 p={p} n={n}"), &g.download_f16(&dx).unwrap(), &want);
        adapter.set_dropout_seed(None);
    }
}
