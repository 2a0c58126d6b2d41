//! `rlaifd`: the command-line entry point.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use engine::generate::{generate, GenerateRequest};
use engine::sampling::SamplingParams;
use engine::tokenizer::{apply_template, TextTokenizer, LLAVA_15_TEMPLATE, TEXT_TEMPLATE};
use engine::{Adapter, Model};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

mod bench;
mod eval_cli;
mod label_cli;
mod shapes_cli;
mod train_cli;

#[derive(Parser)]
#[command(name = "rlaifd", version, about = "Continuous RLAIF-V self-alignment for LLaVA-family models")]
struct Cli {
    /// Worker threads for model math (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print log p(token | prefix, image) for every scored position of --input-ids, as JSON.
    Logprobs(LogprobsArgs),
    /// Sample answers for an image + prompt (or a JSONL batch of them).
    Generate(GenerateArgs),
    /// DPO loss of token-form pairs and its gradient w.r.t. every LoRA tensor of --adapter.
    Grad(train_cli::GradArgs),
    /// Train a LoRA adapter with DPO on preference pairs.
    TrainDpo(train_cli::TrainDpoArgs),
    /// Supervised fine-tuning (LoRA, or every parameter with --full) on prompt/answer examples.
    TrainSft(train_cli::TrainSftArgs),
    /// RLAIF-V feedback offline: sample n answers per prompt, verify their claims with a labeler, write
    /// preference pairs (RLAIF-V dataset schema plus scores, claims and verdicts).
    Label(label_cli::LabelArgs),
    /// Write a randomly initialised checkpoint for a config.json (to train small models from scratch).
    InitModel {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Standard deviation of the random matrices (transformers' initializer_range).
        #[arg(long, default_value_t = 0.02)]
        std: f32,
        /// Files copied beside the weights (tokenizer.json, preprocessor_config.json, ...).
        #[arg(long)]
        copy: Vec<PathBuf>,
    },
    /// Evaluate a model: exact hallucination metrics on held-out ShapesWorld images.
    #[command(subcommand)]
    Eval(eval_cli::EvalCmd),
    /// ShapesWorld: generate images with exact ground truth, print the object vocabulary.
    #[command(subcommand)]
    Shapes(shapes_cli::ShapesCmd),
    /// Measure prefill and decode tokens/s on random inputs (see benches/llava_cpu.sh).
    Bench(bench::BenchArgs),
    /// Run the RLAIF-V loop on the embedded default (bundled ShapesWorld model labeling itself, generated
    /// prompts, PostgreSQL) for K iterations; print the lineage and a JSON summary.
    Demo(rlaifd::demo::DemoArgs),
    /// Run the daemon: the RLAIF-V loop's actors, the OpenAI-compatible HTTP server and the control socket
    /// (configuration: config/default.toml < /etc/rlaifd/rlaifd.toml or --config < RLAIFD__SECTION__KEY).
    Serve(rlaifd::serve::ServeArgs),
    /// Send a command to a running daemon's control socket and print the JSON reply.
    Ctl(rlaifd::control::CtlArgs),
    /// Compile every CUDA kernel with NVRTC (through the same code the daemon uses at start-up; no GPU needed)
    /// and print one row per kernel file.
    Kernels {
        /// Target architectures (sm_80, sm_90, ...).
        #[arg(long, default_values = ["sm_80", "sm_90"])]
        arch: Vec<String>,
    },
    /// GPU decode and prefill speed of a random-weight LLaMA decoder at batch 1 (LLaVA-1.5-7B's language model by
    /// default), with the device's copy bandwidth and the memory-bandwidth roofline; see scripts/gpu-check.sh.
    BenchGpu {
        /// llava7b (hidden 4096, 32 layers, vocabulary 32064) or tiny (for a quick check).
        #[arg(long, default_value = "llava7b")]
        shape: String,
        /// Prompt tokens (LLaVA-1.5: 576 image tokens + about 64 of text).
        #[arg(long, default_value_t = 640)]
        prompt: usize,
        #[arg(long, default_value_t = 128)]
        decode: usize,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Answers sampled together after one shared prefill (the n-answer row).
        #[arg(long, default_value_t = 10)]
        n: usize,
    },
    /// GPU training speed: DPO (one pair per step) and SFT steps of a LoRA adapter on every linear layer of a
    /// random-weight LLaMA decoder (LLaVA-1.5-7B's language model by default), with peak device memory; see
    /// scripts/gpu-check.sh and benches/gpu_peer_dpo.py.
    BenchGpuTrain {
        /// llava7b or tiny.
        #[arg(long, default_value = "llava7b")]
        shape: String,
        /// Tokens per sequence (LLaVA-1.5: 576 image positions + prompt + answer).
        #[arg(long, default_value_t = 700)]
        seq: usize,
        /// Answer tokens (the log-probs DPO compares).
        #[arg(long, default_value_t = 60)]
        answer: usize,
        #[arg(long, default_value_t = 64)]
        rank: usize,
        #[arg(long, default_value_t = 5)]
        reps: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
    },
    /// Apply the database (also done at start-up by every command that uses the database).
    Migrate {
        /// PostgreSQL URL (default: $DATABASE_URL, else postgres://postgres@127.0.0.1:5432/rlaifd).
        #[arg(long)]
        database_url: Option<String>,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json, preprocessor_config.json).
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Widen 16-bit checkpoint weights to f32 at load instead of keeping them 16-bit (same results, 2x memory).
    #[arg(long)]
    f32_weights: bool,
    /// Where generation runs: auto (a CUDA GPU when usable), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
}

impl ModelArgs {
    fn load(&self) -> Result<(Model, Option<Adapter>)> {
        let device = train_cli::parse_device(&self.device)?;
        let opts = engine::LoadOptions { keep_16bit: !self.f32_weights };
        let mut model =
            Model::load_with(&self.model, &opts).with_context(|| format!("loading model {}", self.model.display()))?;
        train_cli::put_on_device(&mut model, device, "generating")?;
        let adapter = match &self.adapter {
            Some(dir) => Some(model.load_adapter(dir).with_context(|| format!("loading adapter {}", dir.display()))?),
            None => None,
        };
        Ok((model, adapter))
    }
}

#[derive(Args)]
struct LogprobsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Image file (PNG or JPEG); required when the ids hold the image token.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Comma-separated token ids, the image token exactly once.
    #[arg(long, value_delimiter = ',', required = true, allow_hyphen_values = true)]
    input_ids: Vec<String>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Image file for a single prompt.
    #[arg(long, requires = "prompt", conflicts_with = "batch")]
    image: Option<PathBuf>,
    /// User prompt, wrapped in the chat template.
    #[arg(long)]
    prompt: Option<String>,
    /// JSONL file, one {"image": path relative to this file, "prompt": text} per line.
    #[arg(long, conflicts_with = "prompt")]
    batch: Option<PathBuf>,
    /// Answers per prompt (sampled in one batch sharing the prompt's prefix).
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Seed of the first answer; answer i uses seed + i.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Chat template; `{prompt}` is replaced by the prompt (default: LLaVA-1.5's).
    #[arg(long)]
    template: Option<String>,
    /// One JSON line per input instead of plain text.
    #[arg(long)]
    json: bool,
    /// Self-feedback (RLAIF-V): sample N answers from the policy (--adapter) and return the one with the highest
    /// length-normalised implicit reward (beta/|y|)·Σ[log πθ − log πref]; the reference is the base model or
    /// --reference-adapter.
    #[arg(long, conflicts_with = "n")]
    best_of: Option<usize>,
    /// DPO beta of the implicit reward (only scales it; the pick does not depend on it).
    #[arg(long, default_value_t = 0.1, requires = "best_of")]
    beta: f64,
    /// Reference adapter for --best-of (default: the base model without adapter).
    #[arg(long, requires = "best_of")]
    reference_adapter: Option<PathBuf>,
}

fn cmd_kernels(archs: &[String]) -> Result<()> {
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

fn cmd_bench_gpu(shape: &str, prompt: usize, decode: usize, reps: usize, n: usize) -> Result<()> {
    if n == 0 || n > 16 || reps == 0 || decode == 0 || prompt == 0 {
        bail!("bench-gpu: --n must be 1..=16 and --reps, --decode, --prompt at least 1");
    }
    let cfg = bench_shape(shape)?;
    let gpu = match engine::cuda::Gpu::open(0)? {
        Ok(g) => g,
        Err(why) => bail!("no GPU: {why}"),
    };
    let r = engine::cuda_llama::bench(&gpu, &cfg, prompt, decode, reps, n)?;
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

/// The decoder shapes the GPU benchmarks run: LLaVA-1.5-7B's language model, or a tiny one for a quick check.
fn bench_shape(shape: &str) -> Result<engine::config::LlamaConfig> {
    let (hidden, inter, layers, heads) = match shape {
        "llava7b" => (4096, 11008, 32, 32),
        "tiny" => (256, 688, 4, 8),
        other => bail!("--shape {other}: expected llava7b or tiny"),
    };
    Ok(engine::config::LlamaConfig {
        vocab_size: 32064,
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: heads,
        head_dim: hidden / heads,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: engine::config::RopeScaling::None,
        max_position_embeddings: 4096,
        tie_word_embeddings: false,
        attention_bias: false,
        mlp_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    })
}

fn cmd_bench_gpu_train(shape: &str, seq: usize, answer: usize, rank: usize, reps: usize, warmup: usize) -> Result<()> {
    if reps == 0 || rank == 0 || answer == 0 || answer >= seq {
        bail!("bench-gpu-train: --reps and --rank must be at least 1 and --answer between 1 and --seq - 1");
    }
    let cfg = bench_shape(shape)?;
    let gpu = match engine::cuda::Gpu::open(0)? {
        Ok(g) => g,
        Err(why) => bail!("no GPU: {why}"),
    };
    let r = engine::cuda_train::bench(&gpu, &cfg, seq, answer, rank, reps, warmup)?;
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
    // Training the image path too: what its passes add per image (one image per DPO pair).
    let (vision, layers) = engine::cuda_clip::bench_shape(shape == "tiny");
    let img = engine::cuda_train::bench_image_path(&gpu, &vision, layers, cfg.hidden_size, rank, reps, warmup)?;
    println!(
        "image path trained too (LoRA r={rank} on every linear layer of a {layers}-layer tower of width {} and the projector): forward + backward {:.1} ms per image (median of {})",
        vision.hidden_size,
        median(&img),
        img.len()
    );
    println!("{}", serde_json::json!({ "image_path_train_ms": img }));
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    if let Some(t) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(t.max(1)).build_global() {
            eprintln!("rlaifd: cannot set thread count: {e}");
        }
    }
    let res = match cli.cmd {
        Command::Logprobs(a) => cmd_logprobs(a),
        Command::Generate(a) => cmd_generate(a),
        Command::Bench(a) => bench::run(a),
        Command::Shapes(c) => shapes_cli::run(c),
        Command::Eval(c) => eval_cli::run(c),
        Command::InitModel { config, out, seed, std, copy } => {
            let files: Vec<&Path> = copy.iter().map(|p| p.as_path()).collect();
            engine::init::init_checkpoint(&config, &out, seed, std, &files).map_err(anyhow::Error::from)
        }
        Command::Grad(a) => train_cli::cmd_grad(a),
        Command::TrainDpo(a) => train_cli::cmd_train_dpo(a),
        Command::TrainSft(a) => train_cli::cmd_train_sft(a),
        Command::Label(a) => label_cli::cmd_label(a),
        Command::Demo(a) => rlaifd::demo::run(a),
        Command::Serve(a) => rlaifd::serve::run(a),
        Command::Kernels { arch } => cmd_kernels(&arch),
        Command::BenchGpu { shape, prompt, decode, reps, n } => cmd_bench_gpu(&shape, prompt, decode, reps, n),
        Command::BenchGpuTrain { shape, seq, answer, rank, reps, warmup } => {
            cmd_bench_gpu_train(&shape, seq, answer, rank, reps, warmup)
        }
        Command::Ctl(a) => rlaifd::control::ctl(a),
        Command::Migrate { database_url } => async_main(async move {
            let url = database_url.unwrap_or_else(rlaifd::db::url_from_env);
            rlaifd::db::open(&url, 1).await?;
            eprintln!("{}: migrations applied", rlaifd::db::redacted(&url));
            Ok(())
        }),
    };
    if let Err(e) = res {
        eprintln!("rlaifd: error: {}", error_chain(&e));
        std::process::exit(1);
    }
}

fn async_main(f: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(f)
}

/// `{e:#}` without repeats: engine errors already show their cause in their own message, so a cause whose text
/// is already printed is skipped.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

fn parse_ids(raw: &[String]) -> Result<Vec<u32>> {
    raw.iter()
        .enumerate()
        .map(|(i, s)| {
            s.trim()
                .parse::<u32>()
                .with_context(|| format!("--input-ids: item {i} (`{s}`) is not a token id (a non-negative integer)"))
        })
        .collect()
}

fn cmd_logprobs(a: LogprobsArgs) -> Result<()> {
    let ids = parse_ids(&a.input_ids)?;
    let (model, adapter) = a.model.load()?;
    let pixels = match &a.image {
        Some(p) => Some(model.load_image(p)?),
        None => None,
    };
    let lp = model.logprobs(&ids, pixels.as_ref(), adapter.as_ref())?;
    println!("{}", serde_json::json!({ "logprobs": lp }));
    Ok(())
}

struct Job {
    image: Option<PathBuf>,
    image_field: Option<String>,
    prompt: String,
}

fn read_batch(path: &Path) -> Result<Vec<Job>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open batch file {}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut jobs = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("{}: cannot read line {}", path.display(), n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}: not valid JSON", path.display(), n + 1))?;
        let prompt = v.get("prompt").and_then(|p| p.as_str());
        let Some(prompt) = prompt else { bail!("{} line {}: needs a string field \"prompt\"", path.display(), n + 1) };
        let image_field = match v.get("image") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(_) => bail!("{} line {}: \"image\" must be a path string", path.display(), n + 1),
        };
        jobs.push(Job { image: image_field.as_ref().map(|s| dir.join(s)), image_field, prompt: prompt.to_string() });
    }
    Ok(jobs)
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let jobs = match (&a.batch, &a.prompt) {
        (Some(b), _) => read_batch(b)?,
        (None, Some(p)) => vec![Job {
            image: a.image.clone(),
            image_field: a.image.as_ref().map(|p| p.display().to_string()),
            prompt: p.clone(),
        }],
        (None, None) => bail!("give --prompt (with --image for a LLaVA model) or --batch FILE.jsonl"),
    };
    if a.n == 0 {
        bail!("--n must be at least 1");
    }
    let (model, adapter) = a.model.load()?;
    let tok = TextTokenizer::from_file(&a.model.model.join("tokenizer.json"))?;
    let params = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        repetition_penalty: a.repetition_penalty,
        max_new_tokens: a.max_new_tokens,
    };
    params.validate().map_err(|e| anyhow::anyhow!(e))?;
    let count = match a.best_of {
        Some(0) => bail!("--best-of must be at least 1"),
        Some(n) => {
            if a.model.adapter.is_none() {
                bail!("--best-of ranks answers by the implicit reward of a DPO-trained adapter: give --adapter");
            }
            n
        }
        None => a.n,
    };
    let reference = match &a.reference_adapter {
        Some(d) => Some(model.load_adapter(d).with_context(|| format!("loading reference adapter {}", d.display()))?),
        None => None,
    };
    let seeds: Vec<u64> = (0..count as u64).map(|i| a.seed.wrapping_add(i)).collect();
    if let Some(id) = model.image_token_id() {
        if let Some(tid) = tok.token_id("<image>") {
            if tid != id {
                bail!("tokenizer.json maps <image> to {tid} but config.json's image token is {id}");
            }
        }
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // Decode every image before generating anything, so a bad input fails the whole command up front
    // instead of after some answers were printed.
    let mut pixels_per_job = Vec::with_capacity(jobs.len());
    for (n, job) in jobs.iter().enumerate() {
        pixels_per_job.push(match &job.image {
            Some(p) => Some(model.load_image(p).with_context(|| match &a.batch {
                Some(b) => format!("{} line {}", b.display(), n + 1),
                None => "--image".to_string(),
            })?),
            None => None,
        });
    }
    for (job, pixels) in jobs.iter().zip(&pixels_per_job) {
        let template = a.template.clone().unwrap_or_else(|| {
            if job.image.is_some() {
                LLAVA_15_TEMPLATE.to_string()
            } else {
                TEXT_TEMPLATE.to_string()
            }
        });
        let ids = tok.encode(&apply_template(&template, &job.prompt), true)?;
        let req = GenerateRequest {
            ids: &ids,
            pixels: pixels.as_ref(),
            seeds: &seeds,
            params: params.clone(),
            stop_ids: vec![],
        };
        let (answers, best_of) = match a.best_of {
            None => (generate(&model, &req, adapter.as_ref())?, None),
            Some(_) => {
                let b =
                    engine::feedback::reward::best_of_n(&model, adapter.as_ref(), reference.as_ref(), &req, a.beta)?;
                let texts: Vec<String> =
                    b.answers.iter().map(|ans| tok.decode(&ans.tokens)).collect::<Result<_, _>>()?;
                let info =
                    serde_json::json!({ "candidates": texts, "seeds": seeds, "rewards": b.rewards, "best": b.best });
                (vec![b.answers[b.best].clone()], Some(info))
            }
        };
        let seeds_out: Vec<u64> = answers.iter().map(|x| x.seed).collect();
        let texts: Vec<String> = answers.iter().map(|ans| tok.decode(&ans.tokens)).collect::<Result<_, _>>()?;
        if a.json {
            let line = serde_json::json!({
                "image": job.image_field,
                "prompt": job.prompt,
                "answers": texts,
                "seeds": seeds_out,
                "finish": answers.iter().map(|a| a.finish).collect::<Vec<_>>(),
            });
            let mut line = line;
            if let Some(info) = best_of {
                line["best_of"] = info;
            }
            writeln!(out, "{line}")?;
        } else {
            for t in &texts {
                writeln!(out, "{}", t.trim())?;
            }
        }
    }
    Ok(())
}
