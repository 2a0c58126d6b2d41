//! `rlaifd logprobs` and `rlaifd generate`: a checkpoint (and adapter) scored or sampled from the command line.

use anyhow::{bail, Context, Result};
use clap::Args;
use engine::generate::{generate, GenerateRequest};
use engine::sampling::SamplingParams;
use engine::tokenizer::{apply_template, TextTokenizer, LLAVA_15_TEMPLATE, TEXT_TEMPLATE};
use engine::{Adapter, Model};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct ModelArgs {
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
        let device = crate::cli::train::parse_device(&self.device)?;
        let opts = engine::LoadOptions { keep_16bit: !self.f32_weights };
        let mut model =
            Model::load_with(&self.model, &opts).with_context(|| format!("loading model {}", self.model.display()))?;
        crate::cli::train::put_on_device(&mut model, device, "generating")?;
        let adapter = match &self.adapter {
            Some(dir) => Some(model.load_adapter(dir).with_context(|| format!("loading adapter {}", dir.display()))?),
            None => None,
        };
        Ok((model, adapter))
    }
}

#[derive(Args)]
pub struct LogprobsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Image file (PNG, JPEG, WebP, GIF or BMP); required when the ids hold the image token.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Comma-separated token ids, the image token exactly once.
    #[arg(long, value_delimiter = ',', required = true, allow_hyphen_values = true)]
    input_ids: Vec<String>,
}

#[derive(Args)]
pub struct GenerateArgs {
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

pub fn cmd_logprobs(a: LogprobsArgs) -> Result<()> {
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

pub fn cmd_generate(a: GenerateArgs) -> Result<()> {
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
        // --template overrides; else the model's own chat template, or LLaVA-1.5's format.
        let ids = match &a.template {
            Some(t) => tok.encode(&apply_template(t, &job.prompt), true)?,
            None => {
                tok.encode_chat(if job.image.is_some() { LLAVA_15_TEMPLATE } else { TEXT_TEMPLATE }, &job.prompt)?
            }
        };
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
