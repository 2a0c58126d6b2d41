//! GPU benchmarks on random weights (`rlaifd bench-gpu`, `rlaifd bench-gpu-train`): prefill, decode against the
//! memory-bandwidth roofline, n answers sampled together and a per-op breakdown (`bench_decode`); LoRA DPO and SFT
//! steps and peak memory (`bench_train`, `bench_image_path`). Kept out of the model and trainer modules, which they
//! only drive.

use crate::config::LlamaConfig;
use crate::cuda::{derr, err, AdamW, Gpu};
use crate::cuda_llama::*;
use crate::cuda_lora::*;
use crate::error::Result;
use crate::train::dpo::DpoConfig;
use half::f16;

/// What `bench_decode` measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub device: String,
    pub prompt_tokens: usize,
    pub prefill_ms: Vec<f64>,
    /// The prefill with the scalar attention kernel instead of the tensor-core one (`Gpu::mma_attention` off).
    pub prefill_ms_scalar_attention: Vec<f64>,
    pub decode_tokens: usize,
    /// Batch-1 greedy decode: the GEMV kernel, each step replayed as a CUDA graph (the default path).
    pub decode_tokens_per_s: Vec<f64>,
    /// The same with the argmax on the device (`decode_step_greedy`): one id copied back per step, not the logits.
    pub decode_tokens_per_s_device_argmax: Vec<f64>,
    /// The same launching every kernel each step (no graph).
    pub decode_tokens_per_s_no_graph: Vec<f64>,
    /// The same with every linear layer through cuBLASLt (graph).
    pub decode_tokens_per_s_cublaslt: Vec<f64>,
    /// The default path without the fused kernels (RoPE + cache store, SwiGLU in the gate/up GEMV, the residual add
    /// and RMSNorm in the o and down GEMVs).
    pub decode_tokens_per_s_unfused: Vec<f64>,
    /// What the model measured at load to pick each batch-1 projection's kernel (`GpuLlama::tune_decode`).
    pub gemv_tuning: Vec<String>,
    /// n answers sampled together (temperature 0.7) after one shared prefill: n * decode_tokens over the whole
    /// time, prefill included (as transformers' generate with num_return_sequences = n is timed).
    pub n: usize,
    pub n_sampling_tokens_per_s: Vec<f64>,
    /// Device-to-device copy bandwidth, GB/s (bytes read + written per second).
    pub copy_gb_per_s: f64,
    pub weight_bytes: u64,
    /// Decode tokens/s if every step only streamed the weights at `copy_gb_per_s`.
    pub roofline_tokens_per_s: f64,
    /// Microseconds per call of each piece of a decode step (GPU time of 50 back-to-back launches, or host time),
    /// at batch 1 and batch n: where a step's time goes.
    pub ops_us: Vec<(String, f64)>,
}

/// Decode and prefill speed of a random-weight decoder of `cfg`'s shape: `reps` times (after one warm-up), a
/// prefill of `prompt` tokens then `decode` greedy steps at batch 1 (each copying its logits row to the host, as
/// sampling with a temperature does) with graph replay, with the argmax on the device instead, without graph
/// replay, through cuBLASLt and without the fused kernels; then `n` sampled answers sharing the prefill;
/// plus the device's copy bandwidth for the roofline and a per-op breakdown.
pub fn bench_decode(
    gpu: &Gpu,
    cfg: &LlamaConfig,
    prompt: usize,
    decode: usize,
    reps: usize,
    n: usize,
) -> Result<BenchReport> {
    use std::sync::atomic::Ordering;
    let model = GpuLlama::random(gpu, cfg, prompt + decode + 1, 1)?;
    let sync = || gpu.stream.synchronize().map_err(derr);
    // Copy bandwidth: 1 GiB buffers, a warm-up copy, then 5 timed copies.
    let len = 1usize << 29;
    let src = gpu.stream.alloc_zeros::<f16>(len).map_err(derr)?;
    let mut dst = gpu.stream.alloc_zeros::<f16>(len).map_err(derr)?;
    gpu.stream.memcpy_dtod(&src, &mut dst).map_err(derr)?;
    sync()?;
    let t = std::time::Instant::now();
    for _ in 0..5 {
        gpu.stream.memcpy_dtod(&src, &mut dst).map_err(derr)?;
    }
    sync()?;
    let copy_gb_per_s = 5.0 * 2.0 * (len * 2) as f64 / t.elapsed().as_secs_f64() / 1e9;
    drop((src, dst));
    let ids: Vec<u32> = (0..prompt).map(|i| (1 + i * 7919 % (cfg.vocab_size - 1)) as u32).collect();
    let (mut prefill_ms, mut tps, mut tps_plain, mut tps_blas, mut tps_n, mut tps_unfused) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut prefill_scalar, mut tps_device) = (Vec::new(), Vec::new());
    let mma_default = gpu.mma_attention.load(Ordering::Relaxed);
    // A prefill alone with the scalar attention kernel (ms).
    let prefill_without_mma = || -> Result<f64> {
        gpu.mma_attention.store(false, Ordering::Relaxed);
        let r = (|| {
            sync()?;
            let t = std::time::Instant::now();
            let _ = model.start_decode(gpu, &ids, 1, 1)?;
            sync()?;
            Ok(t.elapsed().as_secs_f64() * 1e3)
        })();
        gpu.mma_attention.store(mma_default, Ordering::Relaxed);
        r
    };
    // Greedy batch-1 decoding; returns tokens/s of the decode steps (prefill excluded) and the prefill time.
    let greedy = |graph: bool| -> Result<(f64, f64)> {
        sync()?;
        let t = std::time::Instant::now();
        let (mut sess, mut logits) = model.start_decode(gpu, &ids, 1, decode)?;
        let pf = t.elapsed().as_secs_f64() * 1e3;
        sess.use_graph = graph;
        let t = std::time::Instant::now();
        for _ in 0..decode {
            let tok = crate::sampling::argmax(&logits);
            logits = model.decode_step(gpu, &mut sess, &[tok])?;
        }
        if let Some(e) = &sess.graph_error {
            eprintln!("bench: {e}");
        }
        Ok((decode as f64 / t.elapsed().as_secs_f64(), pf))
    };
    // The same with the argmax on the device (`decode_step_greedy`, what sampling at temperature 0 does): only
    // the pick comes back each step.
    let greedy_device = || -> Result<f64> {
        sync()?;
        let (mut sess, logits) = model.start_decode(gpu, &ids, 1, decode)?;
        let first = [crate::sampling::argmax(&logits)];
        let t = std::time::Instant::now();
        for step in 0..decode {
            model.decode_step_greedy(gpu, &mut sess, if step == 0 { Some(&first) } else { None }, None)?;
        }
        Ok(decode as f64 / t.elapsed().as_secs_f64())
    };
    let params = crate::sampling::SamplingParams { temperature: 0.7, max_new_tokens: decode, ..Default::default() };
    let seeds: Vec<u64> = (0..n as u64).collect();
    for rep in 0..reps.max(1) + 1 {
        let (fast, pf) = greedy(true)?;
        let on_device = greedy_device()?;
        let (plain, _) = greedy(false)?;
        gpu.gemv.store(false, Ordering::Relaxed);
        let blas = greedy(true);
        gpu.gemv.store(true, Ordering::Relaxed);
        let (blas, _) = blas?;
        gpu.fuse.store(false, Ordering::Relaxed);
        let unfused = greedy(true);
        gpu.fuse.store(true, Ordering::Relaxed);
        let (unfused, _) = unfused?;
        let pf_scalar = prefill_without_mma()?;
        sync()?;
        let t = std::time::Instant::now();
        let answers = model.generate_n(gpu, &ids, &seeds, &params, &[])?;
        let tokens: usize = answers.iter().map(|a| a.len()).sum();
        let secs = t.elapsed().as_secs_f64();
        // The first repetition warms up (module loading, allocator, cuBLASLt heuristics) and is dropped.
        if rep > 0 {
            prefill_ms.push(pf);
            prefill_scalar.push(pf_scalar);
            tps.push(fast);
            tps_device.push(on_device);
            tps_plain.push(plain);
            tps_blas.push(blas);
            tps_unfused.push(unfused);
            tps_n.push(tokens as f64 / secs);
        }
    }
    let ops_us = op_breakdown(gpu, &model, prompt + decode, n)?;
    let weight_bytes = model.weight_bytes();
    Ok(BenchReport {
        device: gpu.name.clone(),
        prompt_tokens: prompt,
        prefill_ms,
        prefill_ms_scalar_attention: prefill_scalar,
        decode_tokens: decode,
        decode_tokens_per_s: tps,
        decode_tokens_per_s_device_argmax: tps_device,
        decode_tokens_per_s_no_graph: tps_plain,
        decode_tokens_per_s_cublaslt: tps_blas,
        decode_tokens_per_s_unfused: tps_unfused,
        gemv_tuning: model.gemv_tuning.clone(),
        n,
        n_sampling_tokens_per_s: tps_n,
        copy_gb_per_s,
        weight_bytes,
        roofline_tokens_per_s: copy_gb_per_s * 1e9 / weight_bytes as f64,
        ops_us,
    })
}

/// GPU time per call of each op of one decoder layer (and the head, and host sampling) at batch 1 and `n`.
fn op_breakdown(gpu: &Gpu, model: &GpuLlama, keys: usize, n: usize) -> Result<Vec<(String, f64)>> {
    use std::sync::atomic::Ordering;
    let cfg = &model.cfg;
    let (c, h, kvh, hd, inter, vocab) = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
        cfg.vocab_size,
    );
    let nqkv = (h + 2 * kvh) * hd;
    let l = &model.layers[0];
    let mut out = Vec::new();
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?;
        gpu.stream.synchronize().map_err(derr)?;
        let t = std::time::Instant::now();
        for _ in 0..50 {
            f()?;
        }
        gpu.stream.synchronize().map_err(derr)?;
        Ok(t.elapsed().as_secs_f64() * 1e6 / 50.0)
    };
    for m in [1usize, n] {
        let mut s = model.scratch(gpu, m, m, gpu.decode_part_len(keys, m, h, hd), 1)?;
        let kc = gpu.stream.alloc_zeros::<f16>(m * keys * kvh * hd).map_err(derr)?;
        let lens = gpu.stream.clone_htod(&vec![1i32; m]).map_err(derr)?;
        for (name, w, k, nn) in [
            ("qkv", &l.qkv, c, nqkv),
            ("o", &l.o, h * hd, c),
            ("gate_up", &l.gate_up, c, 2 * inter),
            ("down", &l.down, inter, c),
            ("lm_head", model.head(), c, vocab),
        ] {
            let x = gpu.stream.alloc_zeros::<f16>(m * k).map_err(derr)?;
            let mut y = gpu.stream.alloc_zeros::<f16>(m * nn).map_err(derr)?;
            if m == 1 {
                let pick = gpu.gemv_choice(k, nn).unwrap_or(crate::cuda::GemvChoice::Gemv(1));
                let us = time(&mut || gpu.matmul_dev(&x, w, &mut y, m, k, nn))?;
                out.push((format!("{pick} {name} m{m} ({:.0} GB/s)", (nn * k * 2) as f64 / us / 1e3), us));
            }
            gpu.gemv.store(false, Ordering::Relaxed);
            let us = time(&mut || gpu.matmul_dev(&x, w, &mut y, m, k, nn));
            gpu.gemv.store(true, Ordering::Relaxed);
            let us = us?;
            out.push((format!("cublaslt {name} m{m} ({:.0} GB/s)", (nn * k * 2) as f64 / us / 1e3), us));
        }
        let Scratch { h: hb, x, tmp, qkv, att, gu, act, pos, part, .. } = &mut s;
        out.push((format!("add_rmsnorm m{m}"), time(&mut || gpu.add_rmsnorm_dev(hb, x, tmp, &l.post_norm, m, 1e-5))?));
        out.push((
            format!("rope q+k m{m}"),
            time(&mut || gpu.rope_strided_dev(qkv, pos, &model.cos, &model.sin, m, h + kvh, hd, nqkv, None))?,
        ));
        let (mut kc2, mut vc2) = (kc.clone(), kc.clone());
        out.push((
            format!("kv_store m{m}"),
            time(&mut || {
                gpu.kv_store_dev(
                    &mut kc2,
                    &mut vc2,
                    qkv,
                    m,
                    kvh * hd,
                    nqkv,
                    h * hd,
                    (h + kvh) * hd,
                    keys * kvh * hd,
                    Some(&lens),
                    0,
                )
            })?,
        ));
        let (chunk, nsplit) = gpu.decode_split(keys, m, h);
        let per_sm = gpu.decode_blocks_per_sm.load(Ordering::Relaxed);
        out.push((
            format!("attn_decode {keys} keys m{m} ({nsplit} chunks of {chunk}: {per_sm} blocks per SM)"),
            time(&mut || {
                gpu.attention_decode_dev(
                    att,
                    qkv,
                    nqkv,
                    &kc,
                    &kc,
                    keys - 1,
                    &kc,
                    &kc,
                    &lens,
                    0,
                    m,
                    keys,
                    h,
                    kvh,
                    hd,
                    part,
                    None,
                    None,
                )
            })?,
        ));
        // The same split into chunks for 16 blocks per SM (more than fit at once where the kernel's occupancy is
        // lower), with a workspace of its own.
        gpu.decode_blocks_per_sm.store(16, Ordering::Relaxed);
        let (chunk16, nsplit16) = gpu.decode_split(keys, m, h);
        let us =
            gpu.stream.alloc_zeros::<f32>(gpu.decode_part_len(keys, m, h, hd)).map_err(derr).and_then(|mut part16| {
                time(&mut || {
                    gpu.attention_decode_dev(
                        att,
                        qkv,
                        nqkv,
                        &kc,
                        &kc,
                        keys - 1,
                        &kc,
                        &kc,
                        &lens,
                        0,
                        m,
                        keys,
                        h,
                        kvh,
                        hd,
                        &mut part16,
                        None,
                        None,
                    )
                })
            });
        gpu.decode_blocks_per_sm.store(per_sm, Ordering::Relaxed);
        out.push((format!("attn_decode {keys} keys m{m} ({nsplit16} chunks of {chunk16}: 16 blocks per SM)"), us?));
        // The same with the chunks merged by a second launch (attn_decode_combine_f16), as without the fused kernels.
        gpu.fuse.store(false, Ordering::Relaxed);
        let us = time(&mut || {
            gpu.attention_decode_dev(
                att,
                qkv,
                nqkv,
                &kc,
                &kc,
                keys - 1,
                &kc,
                &kc,
                &lens,
                0,
                m,
                keys,
                h,
                kvh,
                hd,
                part,
                None,
                None,
            )
        });
        gpu.fuse.store(true, Ordering::Relaxed);
        out.push((format!("attn_decode {keys} keys m{m}, merged by a 2nd launch"), us?));
        out.push((format!("swiglu m{m}"), time(&mut || gpu.swiglu_fused_dev(act, gu, m, inter))?));
        out.push((
            format!("fused rope + kv_store m{m}"),
            time(&mut || {
                gpu.rope_kv_store_dev(
                    qkv,
                    &mut kc2,
                    &mut vc2,
                    pos,
                    &model.cos,
                    &model.sin,
                    m,
                    h,
                    kvh,
                    hd,
                    nqkv,
                    keys * kvh * hd,
                    Some(&lens),
                    0,
                )
            })?,
        ));
        if m == 1 {
            // q/k/v with RoPE and the cache store in one launch, as the tuner kept it (or one warp per feature).
            let split = model.plan.qkv.fused.unwrap_or(1);
            let (mut kc3, mut vc3) = (kc.clone(), kc.clone());
            let us = time(&mut || {
                gpu.gemv_qkv_rope_dev(
                    qkv,
                    &mut kc3,
                    &mut vc3,
                    hb,
                    &l.qkv,
                    c,
                    h,
                    kvh,
                    hd,
                    split,
                    pos,
                    &model.cos,
                    &model.sin,
                    keys * kvh * hd,
                    Some(&lens),
                    0,
                )
            })?;
            out.push((format!("qkv gemv/{split} + RoPE + cache store, one launch m1"), us));
            // The o and down projections with the residual add + RMSNorm in one launch, as the tuner kept them (or
            // with one warp per row where it kept the pair), against that pair.
            for (plan, name, w, k) in [(&model.plan.o, "o", &l.o, h * hd), (&model.plan.down, "down", &l.down, inter)] {
                let split = plan.fused.unwrap_or(1);
                let xin = gpu.stream.alloc_zeros::<f16>(k).map_err(derr)?;
                let mut t = gpu.stream.alloc_zeros::<f16>(c).map_err(derr)?;
                let us = time(&mut || {
                    proj_add_rmsnorm_m1(gpu, hb, x, &mut t, &l.post_norm, &xin, w, k, c, Some(split), 1e-5)
                })?;
                out.push((format!("{name} gemv/{split} + add + RMSNorm, one launch m1"), us));
                let us =
                    time(&mut || proj_add_rmsnorm_m1(gpu, hb, x, &mut t, &l.post_norm, &xin, w, k, c, None, 1e-5))?;
                out.push((format!("{name} projection, then add_rmsnorm m1"), us));
            }
            let split = model.plan.gate_up.fused.unwrap_or(1);
            let us = time(&mut || gpu.gemv_swiglu_dev(hb, &l.gate_up, act, c, inter, split))?;
            out.push((
                format!(
                    "gate_up gemv/{split} + swiglu epilogue m1 ({:.0} GB/s)",
                    (2 * inter * c * 2) as f64 / us / 1e3
                ),
                us,
            ));
        }
        // Host: sampling m rows of the vocabulary in parallel (temperature 0.7), as generate_n does.
        let params = crate::sampling::SamplingParams { temperature: 0.7, ..Default::default() };
        let mut rng = crate::rng::SplitMix64::new(3);
        let rows: Vec<Vec<f32>> = (0..m).map(|_| (0..vocab).map(|_| rng.next_f64() as f32 * 10.0).collect()).collect();
        let t = std::time::Instant::now();
        for _ in 0..10 {
            use rayon::prelude::*;
            let _: Vec<u32> = rows
                .par_iter()
                .enumerate()
                .map(|(i, r)| {
                    crate::sampling::sample_fast(
                        &mut r.clone(),
                        &[],
                        &params,
                        &mut crate::rng::SplitMix64::new(i as u64),
                    )
                })
                .collect();
        }
        out.push((format!("host sample m{m} rows"), t.elapsed().as_secs_f64() * 1e6 / 10.0));
        if n == 1 {
            break;
        }
    }
    Ok(out)
}

/// What `bench_train` measured: DPO and SFT steps of a LoRA adapter on a random-weight decoder.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainBenchReport {
    pub device: String,
    pub seq: usize,
    pub answer: usize,
    pub rank: usize,
    pub trainable_params: usize,
    /// One pair (chosen + rejected sequences of `seq` tokens), optimizer step included.
    pub dpo_step_ms: Vec<f64>,
    /// Device memory allocated at the peak of a DPO step (weights, adapter, optimizer state, activations).
    pub dpo_peak_memory_gb: f64,
    /// One sequence of `seq` tokens, optimizer step included.
    pub sft_tokens_per_s: Vec<f64>,
    /// The DPO step again with activation recomputation (`GpuLora::recompute`): time and peak memory.
    pub dpo_recompute_step_ms: Vec<f64>,
    pub dpo_recompute_peak_memory_gb: f64,
    /// The DPO step again as two whole sequences (`GpuLora::share_prompt` off; the default runs the prompt once).
    pub dpo_whole_step_ms: Vec<f64>,
    pub dpo_whole_peak_memory_gb: f64,
    /// The default DPO step with the scalar attention kernels instead of the tensor-core ones.
    pub dpo_scalar_attention_step_ms: Vec<f64>,
    pub skipped_steps: u64,
}

/// Milliseconds per image of the image path's training passes (`GpuLora::image_forward` and `image_backward`
/// from a random features gradient, no optimizer step) with LoRA of rank `rank` on every linear layer of a
/// random-weight tower of `vision`'s shape (`n_layers` layers) and of the projector to `text_hidden`: `reps`
/// timed after `warmup`. What training the image path adds to a DPO pair (one image per pair).
pub fn bench_image_path(
    gpu: &Gpu,
    vision: &crate::config::ClipVisionConfig,
    n_layers: usize,
    text_hidden: usize,
    rank: usize,
    reps: usize,
    warmup: usize,
) -> Result<Vec<f64>> {
    let v = crate::cuda_clip::GpuVision::random(gpu, vision, n_layers, text_hidden, 5)?;
    // A one-layer decoder stands in (the flat buffers start with the decoder's modules); the image path's modules
    // follow, A as peft initialises it, B non-zero so every gradient path carries values.
    let dec = LlamaConfig {
        vocab_size: 32,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 1,
        num_attention_heads: 1,
        num_key_value_heads: 1,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: crate::config::RopeScaling::None,
        max_position_embeddings: 64,
        tie_word_embeddings: false,
        attention_bias: false,
        mlp_bias: false,
        qkv_bias: false,
        mrope_section: None,
        layer_window: Vec::new(),
        bos_token_id: None,
        eos_token_ids: vec![],
    };
    let mut rng = crate::rng::SplitMix64::new(3);
    let mut uniform =
        |n: usize, bound: f64| -> Vec<f32> { (0..n).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect() };
    let image = v
        .layers
        .iter()
        .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.fc1, &l.fc2])
        .chain([&v.proj1, &v.proj2])
        .enumerate()
        .map(|(i, lin)| ImageInit {
            name: format!("bench.{i}"),
            r: rank,
            scale: 2.0,
            a: uniform(rank * lin.n_in, 1.0 / (lin.n_in as f64).sqrt()),
            b: uniform(lin.n_out * rank, 0.01),
        })
        .collect::<Vec<_>>();
    let names: Vec<String> = image.iter().map(|m| m.name.clone()).collect();
    let mut gl = GpuLora::build_with(
        gpu,
        &dec,
        rank,
        2.0,
        true,
        |_, _| true,
        |_, _, sl| Ok((vec![0.0; rank * sl.n_in], vec![0.0; sl.n_out * rank])),
        image,
        Vec::new(),
        Vec::new(),
    )?;
    // The random tower's layers are unnamed: name them as the slots.
    let mut v = v;
    for (lin, name) in v
        .layers
        .iter_mut()
        .flat_map(|l| [&mut l.q, &mut l.k, &mut l.v, &mut l.o, &mut l.fc1, &mut l.fc2])
        .chain([&mut v.proj1, &mut v.proj2])
        .zip(&names)
    {
        lin.name = name.clone();
    }
    let s = vision.image_size;
    let pixels: Vec<f32> = uniform(vision.num_channels * s * s, 2.0);
    let dfeat = gpu.upload_f16(&uniform(vision.num_patches() * text_hidden, 1e-3))?;
    let mut out = Vec::new();
    for rep in 0..warmup + reps {
        gpu.stream.synchronize().map_err(derr)?;
        let t = std::time::Instant::now();
        let tape = gl.image_forward(gpu, &v, &pixels, None)?;
        gl.image_backward(gpu, &v, &tape, &dfeat)?;
        gpu.stream.synchronize().map_err(derr)?;
        if rep >= warmup {
            out.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let g = gpu.stream.clone_dtoh(&gl.g32).map_err(derr)?;
    if g.iter().any(|x| !x.is_finite()) || g.iter().all(|&x| x == 0.0) {
        return Err(err("image path bench: the gradients are not finite or all zero"));
    }
    Ok(out)
}

/// The training benchmarks' AdamW.
const BENCH_ADAMW: AdamW = AdamW { lr: 1e-5, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };

/// A random-weight decoder of a benchmark's shape and one DPO pair for it: a prompt and two answers of fixed
/// pseudo-random tokens.
struct DpoBench {
    model: GpuLlama,
    prompt: Vec<u32>,
    chosen: Vec<u32>,
    rejected: Vec<u32>,
}

impl DpoBench {
    /// Sequences of `seq` tokens with answers of `answer` tokens.
    fn new(gpu: &Gpu, cfg: &LlamaConfig, seq: usize, answer: usize) -> Result<DpoBench> {
        if answer == 0 || answer >= seq {
            return Err(err(format!("answer length {answer} must be between 1 and the sequence length {seq} - 1")));
        }
        let v = cfg.vocab_size as u64;
        let tok = |i: usize, k: u64| (1 + (i as u64 * 7919 + k * 104_729) % (v - 1)) as u32;
        Ok(DpoBench {
            model: GpuLlama::random(gpu, cfg, seq + 1, 1)?,
            prompt: (0..seq - answer).map(|i| tok(i, 0)).collect(),
            chosen: (0..answer).map(|i| tok(i, 1)).collect(),
            rejected: (0..answer).map(|i| tok(i, 2)).collect(),
        })
    }

    /// `reps` timed DPO steps of `lora` after `warmup` (ms each), and the peak memory over all of them (GB).
    fn time_steps(&self, gpu: &Gpu, lora: &mut GpuLora, reps: usize, warmup: usize) -> Result<(Vec<f64>, f64)> {
        let dpo = DpoConfig { beta: 0.1, ..Default::default() };
        let sync = || gpu.stream.synchronize().map_err(derr);
        gpu.reset_peak_memory()?;
        let mut ms = Vec::new();
        for rep in 0..warmup + reps {
            sync()?;
            let t = std::time::Instant::now();
            let (p, c, r) = (&self.prompt, &self.chosen, &self.rejected);
            lora.dpo_step(gpu, &self.model, p, c, r, (-150.0, -160.0), &dpo, Some((&BENCH_ADAMW, 1.0)))?;
            sync()?;
            if rep >= warmup {
                ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok((ms, gpu.peak_memory()? as f64 / 1e9))
    }
}

/// Times `reps` DPO steps (after `warmup`) and as many SFT steps of a rank-`rank` adapter on every linear layer of
/// a random-weight decoder of `cfg`'s shape, sequences of `seq` tokens with answers of `answer` tokens.
pub fn bench_train(
    gpu: &Gpu,
    cfg: &LlamaConfig,
    seq: usize,
    answer: usize,
    rank: usize,
    reps: usize,
    warmup: usize,
) -> Result<TrainBenchReport> {
    let b = DpoBench::new(gpu, cfg, seq, answer)?;
    let mut lora = GpuLora::random(gpu, cfg, rank, 2.0 * rank as f32, 2)?;
    let (model, prompt, chosen, opt) = (&b.model, &b.prompt, &b.chosen, BENCH_ADAMW);
    let sync = || gpu.stream.synchronize().map_err(derr);
    let dpo_steps = |lora: &mut GpuLora| b.time_steps(gpu, lora, reps, warmup);
    let (dpo_ms, peak) = dpo_steps(&mut lora)?;
    let mut sft = Vec::new();
    for rep in 0..warmup + reps {
        sync()?;
        let t = std::time::Instant::now();
        lora.sft_step(gpu, model, prompt, chosen, Some((&opt, 1.0)))?;
        sync()?;
        if rep >= warmup {
            sft.push(seq as f64 / t.elapsed().as_secs_f64());
        }
    }
    lora.recompute = true;
    let (re_ms, re_peak) = dpo_steps(&mut lora)?;
    lora.recompute = false;
    lora.share_prompt = false;
    let (wh_ms, wh_peak) = dpo_steps(&mut lora)?;
    lora.share_prompt = true;
    let mma_default = gpu.mma_attention.load(std::sync::atomic::Ordering::Relaxed);
    gpu.mma_attention.store(false, std::sync::atomic::Ordering::Relaxed);
    let scalar = dpo_steps(&mut lora);
    gpu.mma_attention.store(mma_default, std::sync::atomic::Ordering::Relaxed);
    let (sc_ms, _) = scalar?;
    Ok(TrainBenchReport {
        device: gpu.name.clone(),
        seq,
        answer,
        rank,
        trainable_params: lora.param_count(),
        dpo_step_ms: dpo_ms,
        dpo_peak_memory_gb: peak,
        sft_tokens_per_s: sft,
        dpo_recompute_step_ms: re_ms,
        dpo_recompute_peak_memory_gb: re_peak,
        dpo_whole_step_ms: wh_ms,
        dpo_whole_peak_memory_gb: wh_peak,
        dpo_scalar_attention_step_ms: sc_ms,
        skipped_steps: lora.scaler.skipped,
    })
}

/// What `bench_batching` measured: `clients` requests of `prompt` tokens, `decode` greedy tokens each.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BatchBenchReport {
    pub device: String,
    pub clients: usize,
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    /// One request after another, each prefilled and decoded at batch 1 (`DecodeSession`, graph replay, the
    /// logits row copied to the host each step): answer tokens per second over the whole run, prefills included.
    pub sequential_tokens_per_s: Vec<f64>,
    /// All requests in one continuous batch (`GpuRows`): each prefilled into its slot, then every slot stepped
    /// together (graph replay, every row's logits copied to the host each step): the same measure.
    pub batched_tokens_per_s: Vec<f64>,
    /// Milliseconds per batched decode step (all clients), per repetition: the median step.
    pub batched_step_ms: Vec<f64>,
}

/// Continuous batching against one request at a time on a random-weight decoder of `cfg`'s shape: `clients`
/// distinct prompts of `prompt` tokens, `decode` greedy tokens each (picked on the host from the copied logits, as
/// the server samples), `reps` times after one warm-up.
pub fn bench_batching(
    gpu: &Gpu,
    cfg: &LlamaConfig,
    prompt: usize,
    decode: usize,
    clients: usize,
    reps: usize,
) -> Result<BatchBenchReport> {
    let positions = prompt + decode + 1;
    let model = GpuLlama::random(gpu, cfg, positions, 1)?;
    let sync = || gpu.stream.synchronize().map_err(derr);
    let vocab = cfg.vocab_size;
    let prompts: Vec<Vec<u32>> =
        (0..clients).map(|c| (0..prompt).map(|i| (1 + (i + 31 * c) * 7919 % (vocab - 1)) as u32).collect()).collect();
    let sequential = || -> Result<f64> {
        sync()?;
        let t = std::time::Instant::now();
        for ids in &prompts {
            let (mut sess, mut logits) = model.start_decode(gpu, ids, 1, decode)?;
            for _ in 1..decode {
                let tok = crate::sampling::argmax(&logits);
                logits = model.decode_step(gpu, &mut sess, &[tok])?;
            }
        }
        sync()?;
        Ok((clients * decode) as f64 / t.elapsed().as_secs_f64())
    };
    let mut rows = model.new_rows(gpu, clients, positions, None)?;
    let mut batched = || -> Result<(f64, f64)> {
        sync()?;
        let t = std::time::Instant::now();
        let mut next = Vec::with_capacity(clients);
        for (slot, ids) in prompts.iter().enumerate() {
            rows.release(slot);
            let (cache, shift, last) = model.rows_prefill(gpu, Input::Ids(ids), None)?;
            model.rows_fill(gpu, &mut rows, slot, &cache, shift)?;
            next.push((slot, crate::sampling::argmax(&last)));
        }
        let mut steps = Vec::with_capacity(decode);
        for _ in 1..decode {
            let s = std::time::Instant::now();
            let logits = model.rows_step(gpu, &mut rows, &next, None)?;
            for (n, row) in next.iter_mut().zip(logits.chunks(vocab)) {
                n.1 = crate::sampling::argmax(row);
            }
            steps.push(s.elapsed().as_secs_f64() * 1e3);
        }
        sync()?;
        let tps = (clients * decode) as f64 / t.elapsed().as_secs_f64();
        steps.sort_by(f64::total_cmp);
        Ok((tps, steps.get(steps.len() / 2).copied().unwrap_or(0.0)))
    };
    let (mut seq, mut bat, mut step_ms) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..reps.max(1) + 1 {
        let s = sequential()?;
        let (b, ms) = batched()?;
        // The first repetition warms up (module loading, allocator, cuBLASLt heuristics, graph capture).
        if rep > 0 {
            seq.push(s);
            bat.push(b);
            step_ms.push(ms);
        }
    }
    if let Some(e) = &rows.graph_error {
        eprintln!("bench: {e}");
    }
    Ok(BatchBenchReport {
        device: gpu.name.clone(),
        clients,
        prompt_tokens: prompt,
        decode_tokens: decode,
        sequential_tokens_per_s: seq,
        batched_tokens_per_s: bat,
        batched_step_ms: step_ms,
    })
}

/// What `bench_train_full` measured.
#[derive(Clone, Debug)]
pub struct FullTrainBenchReport {
    pub device: String,
    pub seq: usize,
    pub answer: usize,
    /// Values trained whole: every projection of every layer (Qwen2's q/k/v biases too) and the head.
    pub trainable_params: usize,
    pub dpo_step_ms: Vec<f64>,
    pub dpo_peak_memory_gb: f64,
    pub skipped_steps: u64,
}

/// Times `reps` full-parameter DPO steps (after `warmup`) of a random-weight decoder of `cfg`'s shape: every linear
/// layer of the decoder and the head trained whole (fp32 masters, gradients and AdamW moments, fp16 copies the
/// passes read), sequences of `seq` tokens with answers of `answer` tokens, the prompt shared by both answers.
pub fn bench_train_full(
    gpu: &Gpu,
    cfg: &LlamaConfig,
    seq: usize,
    answer: usize,
    reps: usize,
    warmup: usize,
) -> Result<FullTrainBenchReport> {
    let b = DpoBench::new(gpu, cfg, seq, answer)?;
    // Whole weights uniform with standard deviation 0.02 (as `GpuLlama::random`'s), biases 0.
    let mut rng = crate::rng::SplitMix64::new(3);
    let w = 0.02 * 3f64.sqrt();
    let mut whole = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        for (j, p) in PROJECTIONS.iter().enumerate() {
            let (n_in, n_out) = projection_shape(cfg, j);
            let v = (0..n_in * n_out).map(|_| ((rng.next_f64() * 2.0 - 1.0) * w) as f32).collect();
            whole.push((format!("language_model.layers.{l}.{p}.weight"), v));
            if cfg.qkv_bias && fused_group(j) == 0 {
                whole.push((format!("language_model.layers.{l}.{p}.bias"), vec![0.0; n_out]));
            }
        }
    }
    let head = (0..cfg.vocab_size * cfg.hidden_size).map(|_| ((rng.next_f64() * 2.0 - 1.0) * w) as f32).collect();
    whole.push(("lm_head.weight".to_string(), head));
    let mut gl = GpuLora::build_with(
        gpu,
        cfg,
        1,
        0.0,
        true,
        |_, _| false,
        |_, _, _| Err(err("no LoRA in a full-parameter run")),
        Vec::new(),
        Vec::new(),
        whole,
    )?;
    let (ms, peak) = b.time_steps(gpu, &mut gl, reps, warmup)?;
    Ok(FullTrainBenchReport {
        device: gpu.name.clone(),
        seq,
        answer,
        trainable_params: gl.param_count(),
        dpo_step_ms: ms,
        dpo_peak_memory_gb: peak,
        skipped_steps: gl.scaler.skipped,
    })
}
