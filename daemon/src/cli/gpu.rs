//! `rlaifd kernels`, `rlaifd bench-gpu` and `rlaifd bench-gpu-train`: the CUDA kernels compiled through the
//! daemon's NVRTC path, and the GPU decoder and trainer measured on random weights.

use anyhow::{bail, Context, Result};

pub fn cmd_kernels(archs: &[String]) -> Result<()> {
    engine::cuda::nvrtc_status().map_err(anyhow::Error::msg)?;
    let includes = engine::cuda::include_dirs();
    println!("CUDA headers: {}", includes.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
    let mut n = 0;
    for a in archs {
        let cc = a
            .strip_prefix("sm_")
            .and_then(|d| d.parse::<i32>().ok())
            .with_context(|| format!("--arch {a}: expected sm_XY, e.g. sm_90"))?;
        let arch = engine::cuda::arch_name(cc / 10, cc % 10);
        if arch != a {
            bail!("--arch {a}: not an architecture rlaifd targets (sm_70 ... sm_120)");
        }
        for c in engine::cuda::compile_all(arch)? {
            println!("{arch:<7} {:<14} {:>8} bytes of PTX  {}", c.file, c.ptx.to_src().len(), c.kernels.join(" "));
            n += c.kernels.len();
        }
    }
    println!("ok: {n} kernels compiled");
    Ok(())
}

pub fn cmd_bench_gpu_batch(shape: &str, prompt: usize, decode: usize, clients: usize, reps: usize) -> Result<()> {
    if !(1..=1024).contains(&clients) || reps == 0 || decode < 2 || prompt == 0 {
        bail!("bench-gpu-batch: --clients must be 1..=1024, --decode at least 2, --reps and --prompt at least 1");
    }
    let cfg = bench_shape(shape)?;
    let gpu = match engine::cuda::Gpu::open(0)? {
        Ok(g) => g,
        Err(why) => bail!("no GPU: {why}"),
    };
    let r = engine::cuda_bench::bench_batching(&gpu, &cfg, prompt, decode, clients, reps)?;
    let (seq, bat) = (median(&r.sequential_tokens_per_s), median(&r.batched_tokens_per_s));
    println!(
        "{}: {shape} decoder, {clients} requests of {prompt} prompt tokens, {decode} greedy tokens each: one at a time {seq:.1} tokens/s, continuous batch {bat:.1} tokens/s ({:.2}x; batched step {:.2} ms; medians of {})",
        r.device,
        bat / seq,
        median(&r.batched_step_ms),
        r.sequential_tokens_per_s.len()
    );
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

pub fn cmd_bench_gpu(shape: &str, prompt: usize, decode: usize, reps: usize, n: usize) -> Result<()> {
    if n == 0 || n > 16 || reps == 0 || decode == 0 || prompt == 0 {
        bail!("bench-gpu: --n must be 1..=16 and --reps, --decode, --prompt at least 1");
    }
    let cfg = bench_shape(shape)?;
    let gpu = match engine::cuda::Gpu::open(0)? {
        Ok(g) => g,
        Err(why) => bail!("no GPU: {why}"),
    };
    let r = engine::cuda_bench::bench_decode(&gpu, &cfg, prompt, decode, reps, n)?;
    let tps = median(&r.decode_tokens_per_s);
    println!(
        "{}: {shape} decoder, batch 1: prefill {} tokens {:.1} ms (median of {}), decode {:.1} tokens/s (median), copy bandwidth {:.0} GB/s, weights {:.2} GB, roofline {:.1} tokens/s, {:.1} % of it",
        r.device,
        r.prompt_tokens,
        median(&r.prefill_ms),
        r.prefill_ms.len(),
        tps,
        r.copy_gb_per_s,
        r.weight_bytes as f64 / 1e9,
        r.roofline_tokens_per_s,
        100.0 * tps / r.roofline_tokens_per_s
    );
    let tps_dev = median(&r.decode_tokens_per_s_device_argmax);
    println!("  decode with the argmax on the device (temperature 0): {tps_dev:.1} tokens/s (median), {:.1} % of the roofline", 100.0 * tps_dev / r.roofline_tokens_per_s);
    println!(
        "  decode without graph replay: {:.1} tokens/s; through cuBLASLt: {:.1} tokens/s; without the fused kernels: {:.1} tokens/s; n={} sampling after one shared prefill: {:.1} tokens/s (medians)",
        median(&r.decode_tokens_per_s_no_graph),
        median(&r.decode_tokens_per_s_cublaslt),
        median(&r.decode_tokens_per_s_unfused),
        r.n,
        median(&r.n_sampling_tokens_per_s)
    );
    println!(
        "  prefill with the scalar attention kernel (no tensor cores): {:.1} ms (median)",
        median(&r.prefill_ms_scalar_attention)
    );
    for line in &r.gemv_tuning {
        println!("  batch-1 projection, {line}");
    }
    for (op, us) in &r.ops_us {
        println!("  {op:<44} {us:>9.1} us");
    }
    println!("{}", serde_json::to_string(&r)?);
    if shape.starts_with("qwen") {
        println!("  image path: Qwen2-VL's vision transformer runs on the CPU backend (not measured here)");
        return Ok(());
    }
    // The image path before the prefill: vision tower to its feature layer, projector (random weights).
    let (vcfg, layers) = engine::cuda_clip::bench_shape(shape == "tiny");
    let ms = engine::cuda_clip::bench(&gpu, &vcfg, layers, cfg.hidden_size, reps)?;
    println!(
        "  image path ({}x{} image, {layers} vision layers, projector): {:.2} ms (median of {}); {}",
        vcfg.image_size,
        vcfg.image_size,
        median(&ms),
        ms.len(),
        serde_json::json!({ "image_path_ms": ms })
    );
    Ok(())
}

/// The median of a benchmark's repetitions (at least one).
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The decoder shapes the GPU benchmarks run: LLaVA-1.5-7B's language model, Qwen2-VL-7B's (q/k/v biases, multimodal
/// RoPE, GQA 28/4, a 152k vocabulary), a 1.1B LLaMA (full-parameter training), or a tiny one of either kind for a
/// quick check.
fn bench_shape(shape: &str) -> Result<engine::config::LlamaConfig> {
    let (hidden, inter, layers, heads, kv_heads, vocab) = match shape {
        "llava7b" => (4096, 11008, 32, 32, 32, 32064),
        "tiny" => (256, 688, 4, 8, 8, 32064),
        "qwen7b" => (3584, 18944, 28, 28, 4, 152064),
        "qwen-tiny" => (256, 688, 4, 8, 2, 32064),
        // A 1.1B decoder (TinyLlama's shape, LLaVA's vocabulary): full-parameter training fits one GPU.
        "llama1b" => (2048, 5632, 22, 32, 4, 32064),
        other => bail!("--shape {other}: expected llava7b, qwen7b, llama1b, tiny or qwen-tiny"),
    };
    let qwen = shape.starts_with("qwen");
    let head_dim = hidden / heads;
    // Qwen2-VL-7B's mrope_section [16, 24, 24] of 64 frequency pairs, scaled to the head.
    let half = head_dim / 2;
    let mrope = qwen.then(|| [half / 4, half * 3 / 8, half - half / 4 - half * 3 / 8]);
    Ok(engine::config::LlamaConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: if qwen { 1e-6 } else { 1e-5 },
        rope_theta: if qwen { 1_000_000.0 } else { 10000.0 },
        rope_scaling: engine::config::RopeScaling::None,
        max_position_embeddings: if qwen { 32768 } else { 4096 },
        tie_word_embeddings: false,
        attention_bias: false,
        mlp_bias: false,
        qkv_bias: qwen,
        mrope_section: mrope,
        layer_window: Vec::new(),
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    })
}

/// `rlaifd bench-gpu-train --full-parameter`: full-parameter DPO steps (`cuda_bench::bench_train_full`).
pub fn cmd_bench_gpu_train_full(shape: &str, seq: usize, answer: usize, reps: usize, warmup: usize) -> Result<()> {
    if reps == 0 || answer == 0 || answer >= seq {
        bail!("bench-gpu-train: --reps must be at least 1 and --answer between 1 and --seq - 1");
    }
    let cfg = bench_shape(shape)?;
    let gpu = match engine::cuda::Gpu::open(0)? {
        Ok(g) => g,
        Err(why) => bail!("no GPU: {why}"),
    };
    let r = engine::cuda_bench::bench_train_full(&gpu, &cfg, seq, answer, reps, warmup)?;
    let ms = median(&r.dpo_step_ms);
    println!(
        "{}: {shape} decoder, full-parameter DPO ({} values trained whole: every linear layer and the head), sequences of {seq} tokens: DPO step {ms:.1} ms ({:.2} pairs/s, median of {}), peak memory {:.1} GB; {} overflow steps skipped",
        r.device,
        r.trainable_params,
        1e3 / ms,
        r.dpo_step_ms.len(),
        r.dpo_peak_memory_gb,
        r.skipped_steps
    );
    println!(
        "{}",
        serde_json::json!({"device": r.device, "shape": shape, "seq": seq, "answer": answer, "full_parameter": true,
            "trainable_params": r.trainable_params, "dpo_step_ms": ms, "dpo_pairs_per_s": 1e3 / ms,
            "dpo_peak_memory_gb": r.dpo_peak_memory_gb, "skipped_steps": r.skipped_steps})
    );
    Ok(())
}

pub fn cmd_bench_gpu_train(
    shape: &str,
    seq: usize,
    answer: usize,
    rank: usize,
    reps: usize,
    warmup: usize,
) -> Result<()> {
    if reps == 0 || rank == 0 || answer == 0 || answer >= seq {
        bail!("bench-gpu-train: --reps and --rank must be at least 1 and --answer between 1 and --seq - 1");
    }
    let cfg = bench_shape(shape)?;
    let gpu = match engine::cuda::Gpu::open(0)? {
        Ok(g) => g,
        Err(why) => bail!("no GPU: {why}"),
    };
    let r = engine::cuda_bench::bench_train(&gpu, &cfg, seq, answer, rank, reps, warmup)?;
    let ms = median(&r.dpo_step_ms);
    println!(
        "{}: {shape} decoder, LoRA r={rank} on every linear layer ({} trainable parameters), sequences of {seq} tokens: DPO step {ms:.1} ms ({:.2} pairs/s, median of {}), peak memory {:.1} GB; SFT {:.0} tokens/s; {} overflow steps skipped",
        r.device,
        r.trainable_params,
        1e3 / ms,
        r.dpo_step_ms.len(),
        r.dpo_peak_memory_gb,
        median(&r.sft_tokens_per_s),
        r.skipped_steps
    );
    println!(
        "with activation recomputation: DPO step {:.1} ms, peak memory {:.1} GB",
        median(&r.dpo_recompute_step_ms),
        r.dpo_recompute_peak_memory_gb
    );
    println!(
        "as two whole sequences (the prompt not shared): DPO step {:.1} ms, peak memory {:.1} GB",
        median(&r.dpo_whole_step_ms),
        r.dpo_whole_peak_memory_gb
    );
    println!(
        "with the scalar attention kernels (no tensor cores): DPO step {:.1} ms",
        median(&r.dpo_scalar_attention_step_ms)
    );
    println!("{}", serde_json::to_string(&r)?);
    if shape.starts_with("qwen") {
        println!("image path: Qwen2-VL's vision transformer trains on the CPU backend (not measured here)");
        return Ok(());
    }
    // Training the image path too: what its passes add per image (one image per DPO pair).
    let (vision, layers) = engine::cuda_clip::bench_shape(shape == "tiny");
    let img = engine::cuda_bench::bench_image_path(&gpu, &vision, layers, cfg.hidden_size, rank, reps, warmup)?;
    println!(
        "image path trained too (LoRA r={rank} on every linear layer of a {layers}-layer tower of width {} and the projector): forward + backward {:.1} ms per image (median of {})",
        vision.hidden_size,
        median(&img),
        img.len()
    );
    println!("{}", serde_json::json!({ "image_path_train_ms": img }));
    Ok(())
}
