//! `rlaifd`: the command-line entry point.

use clap::{Parser, Subcommand};
use cli::{async_main, bench, claims, dataset, eval, gpu, infer, label, shapes, train};
use std::path::{Path, PathBuf};

mod cli;

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
    Logprobs(infer::LogprobsArgs),
    /// Sample answers for an image + prompt (or a JSONL batch of them).
    Generate(infer::GenerateArgs),
    /// DPO loss of token-form pairs and its gradient w.r.t. every LoRA tensor of --adapter.
    Grad(train::GradArgs),
    /// Train a LoRA adapter with DPO on preference pairs.
    TrainDpo(train::TrainDpoArgs),
    /// Supervised fine-tuning (LoRA, or every parameter with --full) on prompt/answer examples.
    TrainSft(train::TrainSftArgs),
    /// RLAIF-V feedback offline: sample n answers per prompt, verify their claims with a labeler, write
    /// preference pairs (RLAIF-V dataset schema plus scores, claims and verdicts).
    Label(label::LabelArgs),
    /// RLAIF-V's divide step on its own: split answers (JSONL {"answer": text}) into claims with yes/no
    /// questions, and measure the extractor against exact claims where a line has them.
    Claims(claims::ClaimsArgs),
    /// Import the RLAIF-V dataset as published (its parquet files) into the prompt pool or as ready pairs.
    Import(dataset::ImportArgs),
    /// Export the database's preference pairs as a dataset TRL's DPOTrainer loads (parquet: images, prompt,
    /// chosen, rejected).
    Export(dataset::ExportArgs),
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
    Eval(eval::EvalCmd),
    /// ShapesWorld: generate images with exact ground truth, print the object vocabulary.
    #[command(subcommand)]
    Shapes(shapes::ShapesCmd),
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
        /// llava7b (hidden 4096, 32 layers, vocabulary 32064), qwen7b (Qwen2-VL-7B's decoder: hidden 3584, 28
        /// layers, GQA 28/4, q/k/v biases, multimodal RoPE, vocabulary 152064), or tiny / qwen-tiny (quick checks).
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
    /// GPU continuous batching against one request at a time: `--clients` distinct prompts on a random-weight
    /// decoder (LLaVA-1.5-7B's language model by default), greedy, answer tokens per second of each way; see
    /// scripts/gpu-check.sh.
    BenchGpuBatch {
        /// llava7b, qwen7b, tiny or qwen-tiny (as bench-gpu).
        #[arg(long, default_value = "llava7b")]
        shape: String,
        #[arg(long, default_value_t = 640)]
        prompt: usize,
        #[arg(long, default_value_t = 128)]
        decode: usize,
        /// Concurrent requests (one answer each).
        #[arg(long, default_value_t = 32)]
        clients: usize,
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// GPU training speed: DPO (one pair per step) and SFT steps of a LoRA adapter on every linear layer of a
    /// random-weight LLaMA decoder (LLaVA-1.5-7B's language model by default), with peak device memory; see
    /// scripts/gpu-check.sh and benches/gpu_peer_dpo.py.
    BenchGpuTrain {
        /// llava7b, qwen7b, llama1b, tiny or qwen-tiny (as bench-gpu).
        #[arg(long, default_value = "llava7b")]
        shape: String,
        /// Time full-parameter DPO (every linear layer and the head trained whole) instead of LoRA; a 7B decoder
        /// needs about 125 GiB for it, so take --shape llama1b or a tiny one.
        #[arg(long)]
        full_parameter: bool,
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

fn main() {
    let cli = Cli::parse();
    if let Some(t) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(t.max(1)).build_global() {
            eprintln!("rlaifd: cannot set thread count: {e}");
        }
    }
    if !matches!(cli.cmd, Command::Serve(_) | Command::Demo(_)) {
        // The engine logs with `tracing` (where a run goes, a fallback to the CPU); the daemon sets its own
        // subscriber from its configuration, every other command logs to stderr (RUST_LOG filters).
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let _ =
            tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).without_time().try_init();
    }
    let res = match cli.cmd {
        Command::Logprobs(a) => infer::cmd_logprobs(a),
        Command::Generate(a) => infer::cmd_generate(a),
        Command::Bench(a) => bench::run(a),
        Command::Shapes(c) => shapes::run(c),
        Command::Eval(c) => eval::run(c),
        Command::InitModel { config, out, seed, std, copy } => {
            let files: Vec<&Path> = copy.iter().map(|p| p.as_path()).collect();
            engine::init::init_checkpoint(&config, &out, seed, std, &files).map_err(anyhow::Error::from)
        }
        Command::Grad(a) => train::cmd_grad(a),
        Command::TrainDpo(a) => train::cmd_train_dpo(a),
        Command::TrainSft(a) => train::cmd_train_sft(a),
        Command::Label(a) => label::cmd_label(a),
        Command::Claims(a) => claims::cmd_claims(a),
        Command::Import(a) => dataset::cmd_import(a),
        Command::Export(a) => dataset::cmd_export(a),
        Command::Demo(a) => rlaifd::demo::run(a),
        Command::Serve(a) => rlaifd::serve::run(a),
        Command::Kernels { arch } => gpu::cmd_kernels(&arch),
        Command::BenchGpu { shape, prompt, decode, reps, n } => gpu::cmd_bench_gpu(&shape, prompt, decode, reps, n),
        Command::BenchGpuBatch { shape, prompt, decode, clients, reps } => {
            gpu::cmd_bench_gpu_batch(&shape, prompt, decode, clients, reps)
        }
        Command::BenchGpuTrain { shape, full_parameter: true, seq, answer, reps, warmup, .. } => {
            gpu::cmd_bench_gpu_train_full(&shape, seq, answer, reps, warmup)
        }
        Command::BenchGpuTrain { shape, seq, answer, rank, reps, warmup, .. } => {
            gpu::cmd_bench_gpu_train(&shape, seq, answer, rank, reps, warmup)
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
