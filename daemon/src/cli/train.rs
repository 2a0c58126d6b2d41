//! Training subcommands: `rlaifd grad` (DPO loss and LoRA gradients, the parity contract).

use anyhow::{bail, Context, Result};
use engine::image::PixelValues;
use engine::train::dpo::{dpo_loss_and_grads, TokenPair};
use engine::train::Grads;
use engine::weights::{f32_safetensors_bytes, write_f32_safetensors};
use engine::{LoadOptions, Model};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(clap::Args)]
pub struct GradArgs {
    #[arg(long)]
    model: PathBuf,
    /// The policy: a PEFT LoRA adapter; the reference is the base model without it.
    #[arg(long)]
    adapter: PathBuf,
    /// JSONL, one {"image": path relative to this file, "prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...]} per line.
    #[arg(long)]
    pairs: PathBuf,
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// Output safetensors file: f32 gradients for every tensor of the adapter file, under its key names.
    #[arg(long)]
    out: PathBuf,
}

/// A pair as read from a token-form pairs file.
pub struct TokenPairOwned {
    pub image: Option<PathBuf>,
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
}

fn ids_field(v: &serde_json::Value, key: &str, path: &Path, line: usize) -> Result<Vec<u32>> {
    let arr = v.get(key).and_then(|a| a.as_array());
    let Some(arr) = arr else { bail!("{} line {line}: needs \"{key}\": a list of token ids", path.display()) };
    arr.iter()
        .map(|x| {
            x.as_u64().filter(|&t| t <= u32::MAX as u64).map(|t| t as u32).with_context(|| {
                format!("{} line {line}: \"{key}\" holds {x}, which is not a token id", path.display())
            })
        })
        .collect()
}

pub fn read_token_pairs(path: &Path) -> Result<Vec<TokenPairOwned>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open pairs file {}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("{}: cannot read line {}", path.display(), n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}: not valid JSON", path.display(), n + 1))?;
        let image = match v.get("image") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(dir.join(s)),
            Some(_) => bail!("{} line {}: \"image\" must be a path string", path.display(), n + 1),
        };
        out.push(TokenPairOwned {
            image,
            prompt_ids: ids_field(&v, "prompt_ids", path, n + 1)?,
            chosen_ids: ids_field(&v, "chosen_ids", path, n + 1)?,
            rejected_ids: ids_field(&v, "rejected_ids", path, n + 1)?,
        });
    }
    if out.is_empty() {
        bail!("{} holds no pairs", path.display());
    }
    Ok(out)
}

/// Decodes the image of every line up front (a bad one fails the command before any work), naming the line.
/// The decoded image of each line (None for text-only lines). Lines naming the same file share one decoded copy:
/// SFT data asks several questions about each image.
fn load_images<'a>(
    model: &Model,
    file: &Path,
    paths: impl Iterator<Item = Option<&'a PathBuf>>,
) -> Result<Vec<Option<Arc<PixelValues>>>> {
    let mut seen: std::collections::HashMap<&'a PathBuf, Arc<PixelValues>> = std::collections::HashMap::new();
    paths
        .enumerate()
        .map(|(i, p)| match p {
            Some(path) => {
                if let Some(px) = seen.get(path) {
                    return Ok(Some(px.clone()));
                }
                let px =
                    Arc::new(model.load_image(path).with_context(|| format!("{} line {}", file.display(), i + 1))?);
                seen.insert(path, px.clone());
                Ok(Some(px))
            }
            None => Ok(None),
        })
        .collect()
}

/// Optimizer and batching settings shared by the training commands.
#[derive(clap::Args)]
pub struct OptimArgs {
    /// Examples (pairs) per optimizer step; gradients are accumulated over them.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 0.05)]
    warmup_ratio: f64,
    /// AdamW decoupled weight decay (matrices only).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip the global gradient norm (0 = off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Seed of the data order and of new LoRA weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// LoRA rank of a new adapter.
    #[arg(long, default_value_t = 64)]
    r: usize,
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    /// Also train the multimodal projector in full (saved in the adapter as peft `modules_to_save`).
    #[arg(long)]
    train_projector: bool,
    /// LoRA dropout of a new adapter (an adapter given with --adapter keeps its own).
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f64,
    /// Comma-separated module names for a new adapter (peft target_modules list), e.g. q_proj,v_proj.
    #[arg(long)]
    target_modules: Option<String>,
    /// Trade compute for memory: recompute cheap activations (norm outputs, SwiGLU product) in the backward pass
    /// instead of storing them; on the GPU, each layer's activations from its saved input.
    #[arg(long)]
    recompute: bool,
}

impl OptimArgs {
    fn modules_to_save(&self, model: &Model) -> Result<Vec<String>> {
        match (self.train_projector, model.config.llava()) {
            (false, _) => Ok(Vec::new()),
            (true, Some(_)) => Ok(vec!["multi_modal_projector".into()]),
            (true, None) => {
                bail!("--train-projector: {} is a text-only model without a projector", model.dir.display())
            }
        }
    }

    fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.lora_dropout) {
            bail!("--lora-dropout must be in [0, 1), got {}", self.lora_dropout);
        }
        Ok(())
    }

    fn adamw(&self, lr: f64, total_steps: usize) -> engine::train::optim::AdamWConfig {
        engine::train::optim::AdamWConfig {
            lr,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            warmup_steps: (self.warmup_ratio * total_steps as f64).ceil() as usize,
            total_steps,
            ..Default::default()
        }
    }

    /// Targets of a new adapter: --target-modules, else `regex`, else every linear layer of the language model.
    fn targets(&self, model: &Model, regex: Option<&String>) -> engine::adapter::TargetModules {
        use engine::adapter::{LoraSpec, TargetModules};
        match (&self.target_modules, regex) {
            (Some(list), _) => {
                TargetModules::Names(list.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
            }
            (None, Some(re)) => TargetModules::Regex(re.clone()),
            // A multimodal model: the language model's linear layers (LoraSpec's default regex).
            (None, None) => match model.image_token_id() {
                Some(_) => LoraSpec::default().target_modules,
                None => TargetModules::Names(
                    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
                        .map(String::from)
                        .to_vec(),
                ),
            },
        }
    }
}

/// The engine's borrowed view of pairs read from a file and their decoded images.
fn borrow_pairs<'a>(pairs: &'a [TokenPairOwned], images: &'a [Option<Arc<PixelValues>>]) -> Vec<TokenPair<'a>> {
    pairs
        .iter()
        .zip(images)
        .map(|(p, img)| TokenPair {
            pixels: img.as_deref(),
            prompt_ids: &p.prompt_ids,
            chosen_ids: &p.chosen_ids,
            rejected_ids: &p.rejected_ids,
        })
        .collect()
}

pub fn cmd_grad(a: GradArgs) -> Result<()> {
    let model = Model::load_with(&a.model, &LoadOptions::default())
        .with_context(|| format!("loading model {}", a.model.display()))?;
    let adapter = model.load_adapter(&a.adapter).with_context(|| format!("loading adapter {}", a.adapter.display()))?;
    let pairs = read_token_pairs(&a.pairs)?;
    let images = load_images(&model, &a.pairs, pairs.iter().map(|p| p.image.as_ref()))?;
    let token_pairs = borrow_pairs(&pairs, &images);
    let mut grads = Grads::zeros_like(&adapter);
    let (loss, per_pair) = dpo_loss_and_grads(&model, &adapter, &token_pairs, a.beta, &mut grads)?;
    write_f32_safetensors(&a.out, &grads.named_tensors(&adapter))?;
    println!("{}", serde_json::json!({ "loss": loss, "pairs": per_pair.len(), "per_pair": per_pair, "out": a.out }));
    Ok(())
}

#[derive(clap::Args)]
pub struct TrainDpoArgs {
    #[arg(long)]
    model: PathBuf,
    /// Start from this PEFT adapter (otherwise a fresh LoRA adapter is created with --r/--lora-alpha/--target-*).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// JSONL pairs: token form {"image", "prompt_ids", "chosen_ids", "rejected_ids"} or the RLAIF-V dataset
    /// schema {"image_path", "question", "chosen", "rejected"} (text, tokenized with the model's tokenizer and
    /// chat template; answers end with EOS). Image paths are relative to the pairs file.
    #[arg(long)]
    pairs: PathBuf,
    /// Output PEFT adapter directory (optimizer state and trainer_state.json beside the weights).
    #[arg(long)]
    out: PathBuf,
    /// Continue the run saved in --out (same pairs and settings) from its last step.
    #[arg(long)]
    resume: bool,
    /// Reference model: "start" (the policy at the start: --adapter, or the base for a fresh adapter) or "base".
    #[arg(long, default_value = "start")]
    reference: String,
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// sigmoid (DPO), ipo, or length_normalized.
    #[arg(long, default_value = "sigmoid")]
    loss: String,
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f64,
    /// NLL weight on the chosen answer (RPO); 0 = off.
    #[arg(long, default_value_t = 0.0)]
    nll_weight: f64,
    #[arg(long, default_value_t = 1e-5)]
    lr: f64,
    #[arg(long, default_value_t = 4)]
    epochs: usize,
    #[command(flatten)]
    opt: OptimArgs,
    #[arg(long)]
    use_rslora: bool,
    /// Regex over full module paths (default: every linear layer of the language model).
    #[arg(long)]
    target_regex: Option<String>,
    /// Full-parameter DPO (RLAIF-V's 7B recipe) instead of LoRA: every linear layer of the language model and the
    /// projector trained whole, saved as peft `modules_to_save`; vision tower, embeddings and norms frozen. Trains
    /// on the CPU.
    #[arg(long, conflicts_with_all = ["target_regex", "use_rslora"])]
    full_parameter: bool,
    /// Save a resumable checkpoint every N steps (0 = only at the end).
    #[arg(long, default_value_t = 0)]
    save_every: usize,
    /// Stop after this many optimizer steps in total (the schedule still spans all epochs); for resumable runs.
    #[arg(long)]
    stop_after: Option<usize>,
    /// Where the model math runs: auto (a CUDA GPU when usable), cpu, cuda or cuda:N; or several GPUs, e.g.
    /// cuda:0,cuda:1, to train data-parallel (each step's batch dealt out over them, the gradients summed with
    /// NCCL; the same run as one GPU with the same --batch-size). A run saved on one device resumes on any.
    #[arg(long, default_value = "auto")]
    device: String,
}

/// Pairs in token form; text pairs are tokenized with the model's tokenizer and the chat template.
fn read_any_pairs(path: &Path, model: &Model) -> Result<Vec<TokenPairOwned>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open pairs file {}", path.display()))?;
    let first =
        std::io::BufReader::new(file).lines().map_while(|l| l.ok()).find(|l| !l.trim().is_empty()).unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(&first).with_context(|| format!("{} line 1: not valid JSON", path.display()))?;
    if v.get("prompt_ids").is_some() {
        return read_token_pairs(path);
    }
    let tok = engine::tokenizer::TextTokenizer::from_file(&model.dir.join("tokenizer.json"))?;
    let eos = *model.llm.cfg.eos_token_ids.first().unwrap_or(&2);
    let dir = path.parent().unwrap_or(Path::new("."));
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let where_ = || format!("{} line {}", path.display(), n + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: not valid JSON", where_()))?;
        let field = |k: &str| -> Result<String> {
            v.get(k).and_then(|s| s.as_str()).map(str::to_string).with_context(|| {
                format!(
                    "{}: needs a string field \"{k}\" (RLAIF-V schema: image_path, question, chosen, rejected)",
                    where_()
                )
            })
        };
        let image = v.get("image_path").or_else(|| v.get("image")).and_then(|s| s.as_str()).map(|s| dir.join(s));
        let template =
            if image.is_some() { engine::tokenizer::LLAVA_15_TEMPLATE } else { engine::tokenizer::TEXT_TEMPLATE };
        let chat = tok.chat_text(template, &field("question")?)?;
        let prompt_ids = tok.encode(&chat.text, chat.special)?;
        let answer = |a: String| -> Result<Vec<u32>> {
            let mut ids = tok.encode_answer(&chat, &prompt_ids, &a)?;
            ids.push(eos);
            Ok(ids)
        };
        out.push(TokenPairOwned {
            image,
            chosen_ids: answer(field("chosen")?)?,
            rejected_ids: answer(field("rejected")?)?,
            prompt_ids,
        });
    }
    if out.is_empty() {
        bail!("{} holds no pairs", path.display());
    }
    Ok(out)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TrainerState {
    step: usize,
    total_steps: usize,
    train: engine::train::trainer::TrainConfig,
    optim: engine::train::optim::AdamWConfig,
    reference: String,
    pairs_file: String,
    n_pairs: usize,
    /// Reference log-probs, so a resumed run uses exactly the same ones.
    references: Vec<(f64, f64)>,
    /// The GPU trainer's loss scale and skipped steps (absent for a run that never trained on a GPU).
    #[serde(default)]
    loss_scale: Option<engine::cuda::LossScaler>,
}

/// `--device`: auto, cpu, cuda or cuda:N.
pub(crate) fn parse_device(s: &str) -> Result<engine::backend::DeviceSpec> {
    s.parse().map_err(|e| anyhow::anyhow!("--device: {e}"))
}

/// Puts `model`'s math on `device` (auto: a usable GPU, else the CPU) and says on stderr what it is `doing` on,
/// unless that is the CPU.
pub(crate) fn put_on_device(model: &mut Model, device: engine::backend::DeviceSpec, doing: &str) -> Result<()> {
    let (backend, chosen) = engine::backend::select(device, model)?;
    if backend.spec() != engine::backend::DeviceSpec::Cpu {
        eprintln!("rlaifd: {doing} on {chosen}");
    }
    model.set_backend(backend);
    Ok(())
}

fn save_run(
    out: &Path,
    model: &Model,
    adapter: &engine::Adapter,
    opt: &engine::train::optim::AdamW,
    state: &TrainerState,
) -> Result<()> {
    let optim_bytes = f32_safetensors_bytes(&out.join("optimizer.safetensors"), &opt.state_tensors())?;
    let state_json = serde_json::to_vec_pretty(state)?;
    adapter.save(out, &model.dir, &[("optimizer.safetensors", optim_bytes), ("trainer_state.json", state_json)])?;
    Ok(())
}

pub fn cmd_train_dpo(a: TrainDpoArgs) -> Result<()> {
    use engine::adapter::LoraSpec;
    use engine::train::dpo::{DpoConfig, DpoLoss};
    use engine::train::optim::AdamW;
    use engine::train::parallel::train_dpo_parallel;
    use engine::train::trainer::{precompute_references, steps_per_epoch, TrainConfig};
    use std::io::IsTerminal;

    let devices: Vec<engine::backend::DeviceSpec> =
        a.device.split(',').map(|d| parse_device(d.trim())).collect::<Result<_>>()?;
    if devices.len() > 1 && !devices.iter().all(|d| matches!(d, engine::backend::DeviceSpec::Cuda(_))) {
        bail!("--device {}: data-parallel training takes GPUs only, named cuda:N (e.g. cuda:0,cuda:1)", a.device);
    }
    if devices.len() > engine::backend::MAX_DEVICES {
        bail!("--device: at most {} devices", engine::backend::MAX_DEVICES);
    }
    let load = |device| -> Result<Model> {
        let mut model = Model::load(&a.model).with_context(|| format!("loading model {}", a.model.display()))?;
        model.llm.recompute_cheap = a.opt.recompute;
        put_on_device(&mut model, device, "training")?;
        Ok(model)
    };
    let model = load(devices[0])?;
    // The other ranks of a data-parallel run: a copy of the model on each further GPU.
    let ranks: Vec<Model> = devices[1..].iter().map(|&d| load(d)).collect::<Result<_>>()?;
    let loss = match a.loss.as_str() {
        "sigmoid" => DpoLoss::Sigmoid,
        "ipo" => DpoLoss::Ipo,
        "length_normalized" => DpoLoss::LengthNormalized,
        other => bail!("--loss {other}: expected sigmoid, ipo or length_normalized"),
    };
    if a.opt.batch_size == 0 || a.epochs == 0 {
        bail!("--batch-size and --epochs must be at least 1");
    }
    a.opt.validate()?;
    let pairs = read_any_pairs(&a.pairs, &model)?;
    let images = load_images(&model, &a.pairs, pairs.iter().map(|p| p.image.as_ref()))?;
    let token_pairs = borrow_pairs(&pairs, &images);
    let train_cfg = TrainConfig {
        dpo: DpoConfig { beta: a.beta, loss, label_smoothing: a.label_smoothing, nll_weight: a.nll_weight },
        epochs: a.epochs,
        batch_size: a.opt.batch_size,
        seed: a.opt.seed,
    };
    let total = steps_per_epoch(token_pairs.len(), a.opt.batch_size) * a.epochs;
    let optim_cfg = a.opt.adamw(a.lr, total);

    let (mut adapter, mut opt, refs, reference) = if a.resume {
        let state: TrainerState =
            serde_json::from_slice(&std::fs::read(a.out.join("trainer_state.json")).with_context(|| {
                format!("--resume: {} has no trainer_state.json (not a run saved by rlaifd train-dpo)", a.out.display())
            })?)
            .with_context(|| format!("{}: invalid trainer_state.json", a.out.display()))?;
        if state.n_pairs != token_pairs.len() || state.train != train_cfg || state.optim != optim_cfg {
            bail!(
                "--resume: the pairs or settings differ from the saved run in {} (it used {} pairs, {:?})",
                a.out.display(),
                state.n_pairs,
                state.train
            );
        }
        let adapter = model.load_adapter(&a.out)?;
        let mut opt = AdamW::new(optim_cfg.clone());
        let store = engine::weights::WeightStore::open_files(&[a.out.join("optimizer.safetensors")])?;
        opt.load_state(state.step, &store)?;
        opt.scaler = state.loss_scale.clone();
        eprintln!("resuming {} at step {}/{}", a.out.display(), state.step, state.total_steps);
        (adapter, opt, state.references, state.reference)
    } else {
        let start = match &a.adapter {
            Some(dir) => Some(model.load_adapter(dir).with_context(|| format!("loading adapter {}", dir.display()))?),
            None => None,
        };
        let reference = match a.reference.as_str() {
            "base" | "start" => a.reference.clone(),
            other => bail!("--reference {other}: expected start or base"),
        };
        eprintln!("computing reference log-probs for {} pairs ({})", token_pairs.len(), reference);
        let refs =
            precompute_references(&model, if reference == "start" { start.as_ref() } else { None }, &token_pairs)?;
        let adapter = match start {
            Some(ad) => ad,
            None => {
                let targets = a.opt.targets(&model, a.target_regex.as_ref());
                let spec = LoraSpec {
                    r: a.opt.r,
                    lora_alpha: a.opt.lora_alpha,
                    use_rslora: a.use_rslora,
                    lora_dropout: a.opt.lora_dropout,
                    target_modules: targets,
                    modules_to_save: a.opt.modules_to_save(&model)?,
                };
                let spec = if a.full_parameter { model.full_parameter_spec() } else { spec };
                model.create_adapter(&spec, a.opt.seed)?
            }
        };
        (adapter, AdamW::new(optim_cfg.clone()), refs, reference)
    };

    let tty = std::io::stderr().is_terminal();
    let mut state = TrainerState {
        step: opt.step,
        total_steps: total,
        train: train_cfg.clone(),
        optim: optim_cfg,
        reference,
        pairs_file: a.pairs.display().to_string(),
        n_pairs: token_pairs.len(),
        references: refs.clone(),
        loss_scale: opt.scaler.clone(),
    };
    let end = a.stop_after.map_or(total, |s| s.min(total));
    // Train in chunks between checkpoints so a crash loses at most `save_every` steps.
    while opt.step < end {
        let chunk_end = if a.save_every > 0 { (opt.step + a.save_every).min(end) } else { end };
        let models: Vec<&Model> = std::iter::once(&model).chain(&ranks).collect();
        train_dpo_parallel(&models, &mut adapter, &token_pairs, &refs, &train_cfg, &mut opt, Some(chunk_end), |log| {
            println!("{}", serde_json::to_string(log).unwrap_or_default());
            let msg = format!(
                "step {}/{} loss {:.4} acc {:.2} margin {:.4} lr {:.2e} {:.1} pairs/s",
                log.step, log.total_steps, log.loss, log.reward_accuracy, log.reward_margin, log.lr, log.pairs_per_s
            );
            if tty {
                eprint!("\r{msg}   ");
            } else {
                eprintln!("{msg}");
            }
        })?;
        state.step = opt.step;
        state.loss_scale = opt.scaler.clone();
        save_run(&a.out, &model, &adapter, &opt, &state)?;
    }
    if tty {
        eprintln!();
    }
    eprintln!("saved {} (step {}/{})", a.out.display(), opt.step, total);
    Ok(())
}

#[derive(clap::Args)]
pub struct TrainSftArgs {
    #[arg(long)]
    model: PathBuf,
    /// JSONL examples: token form {"image", "prompt_ids", "answer_ids"} or text {"image", "prompt", "answer"}
    /// (wrapped in the chat template, answer ends with EOS). Image paths are relative to the file.
    #[arg(long)]
    data: PathBuf,
    /// Held-out examples (same format): their loss is printed before training and after every epoch.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Output: a PEFT adapter directory, or with --full a Hugging Face model directory.
    #[arg(long)]
    out: PathBuf,
    /// Train every parameter of the model instead of a LoRA adapter.
    #[arg(long)]
    full: bool,
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    #[command(flatten)]
    opt: OptimArgs,
    /// Save a resumable checkpoint every N steps (0 = at epoch ends only).
    #[arg(long, default_value_t = 0)]
    save_every: usize,
    /// Stop after this many optimizer steps in total (the schedule still spans all epochs).
    #[arg(long)]
    stop_after: Option<usize>,
    /// Continue the run saved in --out (same data and settings) from its last step.
    #[arg(long)]
    resume: bool,
    /// Where a LoRA run's model math runs: auto (a CUDA GPU when usable), cpu, cuda or cuda:N (a run saved on one
    /// device resumes on either). --full trains on the CPU.
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SftState {
    step: usize,
    total_steps: usize,
    full: bool,
    sft: engine::train::sft::SftConfig,
    optim: engine::train::optim::AdamWConfig,
    data_file: String,
    n_examples: usize,
    /// The GPU trainer's loss scale and skipped steps (absent for a run that never trained on a GPU).
    #[serde(default)]
    loss_scale: Option<engine::cuda::LossScaler>,
}

/// One line of a JSONL file: its number, its text, its JSON and its image path (resolved against the file).
pub(crate) type JsonlLine = (usize, String, serde_json::Value, Option<PathBuf>);
/// One SFT example: image path, prompt ids, answer ids.
type SftLine = (Option<PathBuf>, Vec<u32>, Vec<u32>);
type Pixels = Arc<PixelValues>;

/// The non-empty lines of a JSONL file, parsed: (1-based line, "FILE line N", value, image path relative to the
/// file if any, from "image" or "image_path"). Errors name the file and line.
pub(crate) fn jsonl_with_images(path: &Path) -> Result<Vec<JsonlLine>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let where_ = format!("{} line {}", path.display(), n + 1);
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{where_}: not valid JSON"))?;
        let image = match v.get("image").or_else(|| v.get("image_path")) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(dir.join(s)),
            Some(_) => bail!("{where_}: \"image\" must be a path string"),
        };
        out.push((n + 1, where_, v, image));
    }
    Ok(out)
}

fn read_sft(path: &Path, model: &Model) -> Result<Vec<SftLine>> {
    let mut tok: Option<engine::tokenizer::TextTokenizer> = None;
    let eos = *model.llm.cfg.eos_token_ids.first().unwrap_or(&2);
    let mut out = Vec::new();
    for (line, where_, v, image) in jsonl_with_images(path)? {
        if v.get("prompt_ids").is_some() {
            out.push((image, ids_field(&v, "prompt_ids", path, line)?, ids_field(&v, "answer_ids", path, line)?));
            continue;
        }
        let prompt = v.get("prompt").or_else(|| v.get("question")).and_then(|s| s.as_str());
        let answer = v.get("answer").and_then(|s| s.as_str());
        let (Some(prompt), Some(answer)) = (prompt, answer) else {
            bail!("{where_}: needs \"prompt_ids\"/\"answer_ids\" or text fields \"prompt\" and \"answer\"")
        };
        if tok.is_none() {
            tok = Some(engine::tokenizer::TextTokenizer::from_file(&model.dir.join("tokenizer.json"))?);
        }
        let tok = tok.as_ref().expect("tokenizer loaded above");
        let template =
            if image.is_some() { engine::tokenizer::LLAVA_15_TEMPLATE } else { engine::tokenizer::TEXT_TEMPLATE };
        let chat = tok.chat_text(template, prompt)?;
        let prompt_ids = tok.encode(&chat.text, chat.special)?;
        let full = tok.encode(&format!("{}{}{answer}", chat.text, chat.answer_sep), chat.special)?;
        let mut answer_ids =
            if full.starts_with(&prompt_ids) { full[prompt_ids.len()..].to_vec() } else { tok.encode(answer, false)? };
        answer_ids.push(eos);
        out.push((image, prompt_ids, answer_ids));
    }
    if out.is_empty() {
        bail!("{} holds no examples", path.display());
    }
    Ok(out)
}

pub fn cmd_train_sft(a: TrainSftArgs) -> Result<()> {
    use engine::adapter::LoraSpec;
    use engine::train::optim::AdamW;
    use engine::train::sft::{sft_eval_loss, train_sft, SftConfig, SftExample, SftTarget};
    use engine::train::trainer::steps_per_epoch;

    let device = parse_device(&a.device)?;
    if a.full && matches!(device, engine::backend::DeviceSpec::Cuda(_)) {
        bail!("--full trains every parameter on the CPU (the GPU trainer trains LoRA adapters): use --device cpu or auto, or drop --full");
    }
    let mut model = Model::load(&a.model).with_context(|| format!("loading model {}", a.model.display()))?;
    model.llm.recompute_cheap = a.opt.recompute;
    if a.opt.batch_size == 0 || a.epochs == 0 {
        bail!("--batch-size and --epochs must be at least 1");
    }
    a.opt.validate()?;
    let load = |path: &Path, model: &Model| -> Result<(Vec<SftLine>, Vec<Option<Pixels>>)> {
        let data = read_sft(path, model)?;
        let images = load_images(model, path, data.iter().map(|(img, _, _)| img.as_ref()))?;
        Ok((data, images))
    };
    let (train, train_px) = load(&a.data, &model)?;
    let eval = match &a.eval {
        Some(p) => Some(load(p, &model)?),
        None => None,
    };
    fn examples<'a>(
        d: &'a [(Option<PathBuf>, Vec<u32>, Vec<u32>)],
        px: &'a [Option<Arc<PixelValues>>],
    ) -> Vec<SftExample<'a>> {
        d.iter()
            .zip(px)
            .map(|((_, p, ans), img)| SftExample { pixels: img.as_deref(), prompt_ids: p, answer_ids: ans })
            .collect()
    }
    let total = steps_per_epoch(train.len(), a.opt.batch_size) * a.epochs;
    let optim_cfg = a.opt.adamw(a.lr, total);
    let mut opt = AdamW::new(optim_cfg.clone());
    let cfg = SftConfig { epochs: a.epochs, batch_size: a.opt.batch_size, seed: a.opt.seed };
    let mut adapter = if a.resume {
        let state: SftState =
            serde_json::from_slice(&std::fs::read(a.out.join("trainer_state.json")).with_context(|| {
                format!("--resume: {} has no trainer_state.json (not a run saved by rlaifd train-sft)", a.out.display())
            })?)
            .with_context(|| format!("{}: invalid trainer_state.json", a.out.display()))?;
        if state.n_examples != train.len() || state.sft != cfg || state.optim != optim_cfg || state.full != a.full {
            bail!("--resume: the data or settings differ from the saved run in {}", a.out.display());
        }
        let store = engine::weights::WeightStore::open_files(&[a.out.join("optimizer.safetensors")])?;
        opt.load_state(state.step, &store)?;
        opt.scaler = state.loss_scale.clone();
        eprintln!("resuming {} at step {}/{}", a.out.display(), state.step, state.total_steps);
        if a.full {
            // The saved checkpoint holds the trained weights.
            model = Model::load(&a.out).with_context(|| format!("loading {}", a.out.display()))?;
            model.llm.recompute_cheap = a.opt.recompute;
            None
        } else {
            Some(model.load_adapter(&a.out)?)
        }
    } else if a.full {
        None
    } else {
        let targets = a.opt.targets(&model, None);
        Some(model.create_adapter(
            &LoraSpec {
                r: a.opt.r,
                lora_alpha: a.opt.lora_alpha,
                use_rslora: false,
                lora_dropout: a.opt.lora_dropout,
                target_modules: targets,
                modules_to_save: a.opt.modules_to_save(&model)?,
            },
            a.opt.seed,
        )?)
    };
    if !a.full {
        // Full fine-tuning changes the model's own weights, which a device backend holds a copy of: CPU only.
        put_on_device(&mut model, device, "training")?;
    }
    let per_epoch = steps_per_epoch(train.len(), a.opt.batch_size);
    let report_eval = |model: &Model, adapter: Option<&engine::Adapter>, after: usize| -> Result<()> {
        if let Some((d, px)) = &eval {
            let loss = sft_eval_loss(model, adapter, &examples(d, px))?;
            println!("{}", serde_json::json!({ "eval_loss": loss, "after_step": after }));
            eprintln!("held-out loss after step {after}: {loss:.4}");
        }
        Ok(())
    };
    if opt.step == 0 {
        report_eval(&model, adapter.as_ref(), 0)?;
    }
    let train_ex = examples(&train, &train_px);
    let end = a.stop_after.map_or(total, |s| s.min(total));
    let base_dir = a.model.clone();
    while opt.step < end {
        // Train to the next epoch end or save point, whichever comes first.
        let mut chunk_end = ((opt.step / per_epoch) + 1) * per_epoch;
        if let Some(saves) = opt.step.checked_div(a.save_every) {
            chunk_end = chunk_end.min((saves + 1) * a.save_every);
        }
        let chunk_end = chunk_end.min(end);
        let target = match adapter.as_mut() {
            Some(ad) => SftTarget::Lora(ad),
            None => SftTarget::Full,
        };
        train_sft(&mut model, target, &train_ex, &cfg, &mut opt, Some(chunk_end), |log| {
            println!("{}", serde_json::to_string(log).unwrap_or_default());
            eprintln!(
                "step {}/{} loss {:.4} lr {:.2e} {:.0} tokens/s",
                log.step, log.total_steps, log.loss, log.lr, log.tokens_per_s
            );
        })?;
        if opt.step.is_multiple_of(per_epoch) {
            report_eval(&model, adapter.as_ref(), opt.step)?;
        }
        let state = SftState {
            step: opt.step,
            total_steps: total,
            full: a.full,
            sft: cfg.clone(),
            optim: optim_cfg.clone(),
            data_file: a.data.display().to_string(),
            n_examples: train.len(),
            loss_scale: opt.scaler.clone(),
        };
        let optim_bytes = f32_safetensors_bytes(&a.out.join("optimizer.safetensors"), &opt.state_tensors())?;
        let extra =
            [("optimizer.safetensors", optim_bytes), ("trainer_state.json", serde_json::to_vec_pretty(&state)?)];
        match &adapter {
            Some(ad) => ad.save(&a.out, &base_dir, &extra)?,
            None => model.save_checkpoint(&a.out, &extra)?,
        }
    }
    eprintln!("saved {}", a.out.display());
    Ok(())
}
