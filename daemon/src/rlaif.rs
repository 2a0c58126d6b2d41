//! The RLAIF-V loop's stages on top of the store: sample (n answers per prompt from the promoted policy), label
//! (claims, verdicts, scores, pairs with reference log-probs), train (DPO LoRA from the policy) and evaluate
//! (gate the candidate on held-out metrics, promote or reject). Each stage is idempotent and runs on the
//! engine thread (`Engine::run`, by priority) for its model math; the actors and the demo drive them.

use crate::store::{self, CheckpointRow, IterationRow, Job, NewClaim, NewPair, NewResponse};
use crate::worker::{Priority, Slice, Worker};
use anyhow::{bail, Context, Result};
use engine::adapter::LoraSpec;
use engine::feedback::claims::{ClaimExtractor, RuleExtractor, ShapesExtractor};
use engine::feedback::pairs::length_balance;
use engine::feedback::pipeline::{label_answers, sample_answers, FeedbackConfig, LabeledAnswer, Policy};
use engine::feedback::verify::Labeler;
use engine::generate::FinishReason;
use engine::image::{ImageProcessorConfig, PixelValues};
use engine::rng::SplitMix64;
use engine::tokenizer::{TextTokenizer, LLAVA_15_TEMPLATE};
use engine::train::dpo::{DpoConfig, TokenPair};
use engine::train::optim::{AdamW, AdamWConfig};
use engine::train::trainer::{steps_per_epoch, train_dpo, TrainConfig};
use engine::{Adapter, Model};
use sqlx::PgPool;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Every knob of the loop (the `[loop]` section of the config).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoopConfig {
    /// Answers sampled per prompt.
    pub n: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub max_new_tokens: usize,
    /// Pairs kept per prompt (at most).
    pub pairs_per_prompt: usize,
    /// Training prompts sampled per iteration.
    pub prompts_per_iteration: usize,
    /// Train once at least this many pairs exist (after sampling every prompt of the iteration).
    pub pairs_per_iteration: usize,
    /// "policy" (the policy at the start of the iteration, RLAIF-V's choice) or "base".
    pub reference: String,
    /// Who verifies claims: "self" (the policy, as RLAIF-V 12B), "base", or a separate labeler model directory
    /// (as RLAIF-V 7B, labeled by a stronger model).
    pub labeler: String,
    pub beta: f64,
    /// RLAIF-V's length balancing of each iteration's pairs (drop pairs whose chosen answer is much shorter).
    pub length_balance: bool,
    /// Weight of the NLL term on the chosen answer (RPO); 0 is plain DPO.
    pub nll_weight: f64,
    pub lr: f64,
    pub epochs: usize,
    pub batch_size: usize,
    pub lora_r: usize,
    pub lora_alpha: f64,
    /// Held-out evaluation: images and their seed.
    pub eval_count: usize,
    pub eval_seed: u64,
    /// Promote when CHAIR_i is below the promoted checkpoint's by at least this much (absolute) ...
    pub promote_margin: f64,
    /// ... and Cover is at most this fraction below the base model's (0.1: no more than 10 % lower).
    pub max_cover_drop: f64,
    /// Seed of everything random in the loop (answer seeds, pair draws, adapter init, data order).
    pub seed: u64,
    /// Job lease, seconds; a job whose worker died is retried after it expires.
    pub lease_s: f64,
    /// Attempts before a job is marked failed.
    pub max_attempts: i32,
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            n: 10,
            temperature: 0.7,
            top_p: 1.0,
            max_new_tokens: 512,
            pairs_per_prompt: 2,
            prompts_per_iteration: 64,
            pairs_per_iteration: 32,
            reference: "policy".into(),
            labeler: "self".into(),
            beta: 0.1,
            length_balance: true,
            nll_weight: 0.0,
            lr: 5e-4,
            epochs: 2,
            batch_size: 8,
            lora_r: 16,
            lora_alpha: 32.0,
            eval_count: 100,
            eval_seed: 1_000_000,
            promote_margin: 0.005,
            max_cover_drop: 0.1,
            seed: 0,
            lease_s: 600.0,
            max_attempts: 3,
        }
    }
}

impl LoopConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |k: &str, why: &str| -> Result<()> { bail!("loop.{k}: {why}") };
        if self.n < 2 {
            return bad("n", "must be at least 2 (pairs need two answers)");
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad("temperature", "must be > 0 (deconfounded sampling draws distinct answers)");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be in (0, 1]");
        }
        if self.max_new_tokens == 0 || self.prompts_per_iteration == 0 || self.pairs_per_prompt == 0 {
            return bad("max_new_tokens/prompts_per_iteration/pairs_per_prompt", "must be at least 1");
        }
        if !matches!(self.reference.as_str(), "policy" | "base") {
            return bad("reference", "expected \"policy\" or \"base\"");
        }
        if self.labeler.trim().is_empty() {
            return bad("labeler", "expected \"self\", \"base\" or a labeler model directory");
        }
        if !(self.beta > 0.0 && self.lr > 0.0 && self.lr.is_finite())
            || self.epochs == 0
            || self.batch_size == 0
            || self.lora_r == 0
        {
            return bad("beta/lr/epochs/batch_size/lora_r", "must be positive");
        }
        if self.eval_count == 0 {
            return bad("eval_count", "must be at least 1");
        }
        if self.lease_s.is_nan() || self.lease_s < 1.0 || self.max_attempts < 1 {
            return bad("lease_s/max_attempts", "lease at least 1 s, at least 1 attempt");
        }
        Ok(())
    }

    fn feedback(&self) -> FeedbackConfig {
        FeedbackConfig {
            n: self.n,
            temperature: self.temperature,
            top_p: self.top_p,
            max_new_tokens: self.max_new_tokens,
            pairs_per_prompt: self.pairs_per_prompt,
            seed: self.seed,
        }
    }

    /// The answer seeds of a prompt in an iteration: distinct across iterations, so a policy kept for two
    /// iterations still gets fresh samples (and `responses` stays unique per prompt/checkpoint/seed).
    pub fn answer_seeds(&self, iteration: i32, prompt_id: i64) -> Vec<u64> {
        let base = SplitMix64::new(
            self.seed
                ^ (iteration as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ^ (prompt_id as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9),
        )
        .next_u64()
            >> 2;
        (0..self.n as u64).map(|j| base + j).collect()
    }

    fn pair_seed(&self, iteration: i32, prompt_id: i64) -> u64 {
        SplitMix64::new(
            self.seed ^ 0x5041_4952 ^ (iteration as u64).wrapping_mul(0x94d0_49bb_1331_11eb) ^ prompt_id as u64,
        )
        .next_u64()
    }
}

/// The model side: the base model (loaded once, immutable), its tokenizer and image processor, and the adapters
/// of checkpoints (loaded on first use, checked against their recorded sha256).
pub struct Engine {
    pub model: Model,
    pub tok: TextTokenizer,
    pub ip: ImageProcessorConfig,
    pub state_dir: PathBuf,
    /// A separate labeler model (`loop.labeler = DIR`) and its tokenizer.
    pub labeler: Option<(Model, TextTokenizer, PathBuf)>,
    /// The engine thread every model computation runs on, by priority.
    pub worker: Worker,
    /// A ShapesWorld model (its tokenizer is the world's vocabulary): object claims and exact held-out metrics.
    /// Otherwise: rule-based English claims and a labeler-estimated hallucination rate on held-out prompts.
    pub shapes: bool,
    adapters: Mutex<HashMap<i64, Arc<Adapter>>>,
    /// The device the model landed on (a labeler model goes to the same one).
    device: engine::backend::DeviceSpec,
}

/// Whether a tokenizer is ShapesWorld's (its vocabulary is exactly the world's words).
pub fn is_shapes_tokenizer(tok: &TextTokenizer) -> bool {
    engine::shapes::words().iter().all(|w| tok.token_id(w).is_some())
        && tok.vocab_size() == engine::shapes::words().len() + 5
}

/// sha256 of a checkpoint: of its adapter_model.safetensors.
pub fn adapter_sha256(dir: &Path) -> Result<String> {
    let f = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&f).with_context(|| format!("cannot read {}", f.display()))?;
    Ok(store::sha256_hex(&bytes))
}

impl Engine {
    /// Loads the model for the CPU backend.
    pub fn load(model_dir: &Path, state_dir: &Path) -> Result<Engine> {
        Self::load_on(model_dir, state_dir, engine::backend::DeviceSpec::Cpu).map(|(e, _)| e)
    }

    /// Loads the model and puts generation and scoring on `device`. Returns the engine and a line saying which
    /// device was chosen (and, for `auto` without a usable GPU, why not).
    pub fn load_on(
        model_dir: &Path,
        state_dir: &Path,
        device: engine::backend::DeviceSpec,
    ) -> Result<(Engine, String)> {
        let mut model = Model::load(model_dir).with_context(|| format!("loading model {}", model_dir.display()))?;
        let (backend, chosen) =
            engine::backend::select(device, &model).with_context(|| format!("model.device = \"{device}\""))?;
        let on = backend.spec();
        model.set_backend(backend);
        let tok = TextTokenizer::from_file(&model_dir.join("tokenizer.json"))?;
        let ip = model
            .image_processor
            .clone()
            .with_context(|| format!("{} has no vision tower; the loop needs a LLaVA model", model_dir.display()))?;
        std::fs::create_dir_all(state_dir.join("checkpoints"))
            .with_context(|| format!("cannot create {}/checkpoints", state_dir.display()))?;
        let shapes = is_shapes_tokenizer(&tok);
        Ok((
            Engine {
                model,
                tok,
                ip,
                state_dir: state_dir.to_path_buf(),
                labeler: None,
                worker: Worker::start("rlaifd-engine"),
                shapes,
                adapters: Mutex::new(HashMap::new()),
                device: on,
            },
            chosen,
        ))
    }

    /// Loads the labeler `loop.labeler` names when it is a model directory ("self" and "base" need nothing).
    pub fn with_labeler(mut self, labeler: &str) -> Result<Engine> {
        if matches!(labeler, "self" | "base") {
            return Ok(self);
        }
        let dir = PathBuf::from(labeler);
        let mut model = Model::load(&dir).with_context(|| format!("loading the labeler loop.labeler = {labeler:?}"))?;
        let (backend, _) = engine::backend::select(self.device, &model)
            .with_context(|| format!("putting the labeler {labeler} on {}", self.device))?;
        model.set_backend(backend);
        let tok = TextTokenizer::from_file(&dir.join("tokenizer.json"))
            .with_context(|| format!("loading the labeler's tokenizer from {labeler}"))?;
        self.labeler = Some((model, tok, dir));
        Ok(self)
    }

    /// Runs `f` on the engine thread at `prio`.
    pub async fn run<T: Send + 'static>(
        &self,
        prio: Priority,
        f: impl FnOnce(&Slice) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.worker.run(prio, f).await
    }

    /// The adapter of a checkpoint (None for the base). A file whose sha256 differs from the row is refused.
    pub fn adapter(&self, c: &CheckpointRow) -> Result<Option<Arc<Adapter>>> {
        if c.kind == store::CheckpointKind::Base {
            return Ok(None);
        }
        if let Some(a) = self.adapters.lock().map_err(|_| anyhow::anyhow!("adapter cache poisoned"))?.get(&c.id) {
            return Ok(Some(a.clone()));
        }
        let dir = Path::new(&c.path);
        let sha = adapter_sha256(dir)?;
        if c.sha256.as_deref() != Some(sha.as_str()) {
            bail!("checkpoint {} at {}: adapter_model.safetensors has sha256 {sha}, the database recorded {:?}; refusing to load it", c.id, c.path, c.sha256);
        }
        let a = Arc::new(
            self.model.load_adapter(dir).with_context(|| format!("loading checkpoint {} from {}", c.id, c.path))?,
        );
        self.adapters.lock().map_err(|_| anyhow::anyhow!("adapter cache poisoned"))?.insert(c.id, a.clone());
        Ok(Some(a))
    }

    pub fn pixels(&self, bytes: &[u8]) -> Result<PixelValues> {
        let img = engine::image::decode_rgb8(bytes, "stored image")?;
        Ok(engine::image::preprocess(&img, &self.ip)?)
    }
}

async fn prompt_pixels(pool: &PgPool, engine: &Arc<Engine>, p: &store::PromptRow) -> Result<Option<Arc<PixelValues>>> {
    match &p.image_sha256 {
        Some(sha) => {
            let bytes = store::image_bytes(pool, sha).await?;
            let e = engine.clone();
            Ok(Some(Arc::new(engine.run(Priority::Feedback, move |_| e.pixels(&bytes)).await?)))
        }
        None => Ok(None),
    }
}

fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// Samples one claimed sample job. Returns whether its result was stored (false: the lease was lost).
pub async fn run_sample_job(
    pool: &PgPool,
    engine: &Arc<Engine>,
    cfg: &LoopConfig,
    job: &Job,
    owner: &str,
) -> Result<bool> {
    let it = store::iteration(pool, job.iteration_id).await?;
    let policy_row = store::checkpoint(pool, it.policy_id).await?;
    let prompt = store::prompt(pool, job.prompt_id).await?;
    let pixels = prompt_pixels(pool, engine, &prompt).await?;
    let seeds = cfg.answer_seeds(it.number, prompt.id);
    let (e, fcfg, question) = (engine.clone(), cfg.feedback(), prompt.instruction.clone());
    let answers = engine
        .run(Priority::Feedback, move |_| {
            let adapter = e.adapter(&policy_row)?;
            let policy =
                Policy { model: &e.model, adapter: adapter.as_deref(), tokenizer: &e.tok, template: LLAVA_15_TEMPLATE };
            Ok(sample_answers(&policy, pixels.as_deref(), &question, &seeds, &fcfg)?)
        })
        .await?;
    let rows: Vec<NewResponse> = answers
        .into_iter()
        .map(|a| NewResponse { seed: a.seed, text: a.text, tokens: a.tokens, finish: finish_name(a.finish).into() })
        .collect();
    let decoding =
        serde_json::json!({ "temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens });
    store::finish_sample(pool, job, owner, it.policy_id, &decoding, &rows).await
}

/// Labels one claimed label job: claims and verdicts for the prompt's answers, scores, pairs with reference
/// log-probs. Returns whether its result was stored.
pub async fn run_label_job(
    pool: &PgPool,
    engine: &Arc<Engine>,
    cfg: &LoopConfig,
    job: &Job,
    owner: &str,
) -> Result<bool> {
    let it = store::iteration(pool, job.iteration_id).await?;
    let policy_row = store::checkpoint(pool, it.policy_id).await?;
    let reference_row = store::checkpoint(pool, it.reference_id).await?;
    let labeler_row = if cfg.labeler == "self" { policy_row.clone() } else { store::base(pool).await? };
    if !matches!(cfg.labeler.as_str(), "self" | "base") && engine.labeler.is_none() {
        bail!("loop.labeler = {:?} names a model directory, but the engine was loaded without it", cfg.labeler);
    }
    let prompt = store::prompt(pool, job.prompt_id).await?;
    let pixels = prompt_pixels(pool, engine, &prompt).await?;
    let seeds = cfg.answer_seeds(it.number, prompt.id);
    let stored = store::responses(pool, prompt.id, it.policy_id, &seeds).await?;
    if stored.len() != seeds.len() {
        bail!(
            "prompt {}: {} of {} answers are stored for checkpoint {}",
            prompt.id,
            stored.len(),
            seeds.len(),
            it.policy_id
        );
    }
    let answers: Vec<LabeledAnswer> = stored
        .iter()
        .map(|r| LabeledAnswer {
            seed: r.seed as u64,
            text: r.text.clone(),
            tokens: r.tokens.iter().map(|&t| t as u32).collect(),
            finish: if r.finish == "stop" { FinishReason::Stop } else { FinishReason::Length },
            claims: Vec::new(),
            verdicts: Vec::new(),
            score: None,
        })
        .collect();
    let ids: Vec<i64> = stored.iter().map(|r| r.id).collect();
    let (e, question, k, pair_seed) =
        (engine.clone(), prompt.instruction.clone(), cfg.pairs_per_prompt, cfg.pair_seed(it.number, prompt.id));
    let labeler_name = match cfg.labeler.as_str() {
        "self" => format!("self:{}", policy_row.id),
        "base" => "base".to_string(),
        dir => format!("model:{dir}"),
    };
    let (labeled, pairs) = engine
        .run(Priority::Feedback, move |_| {
            let lab_adapter = match &e.labeler {
                Some(_) => None,
                None => e.adapter(&labeler_row)?,
            };
            let labeler = match &e.labeler {
                Some((m, tok, _)) => Labeler::new(m, None, tok, LLAVA_15_TEMPLATE)?,
                None => Labeler::new(&e.model, lab_adapter.as_deref(), &e.tok, LLAVA_15_TEMPLATE)?,
            };
            let extractor: &dyn ClaimExtractor = if e.shapes { &ShapesExtractor } else { &RuleExtractor };
            let fb = label_answers(&labeler, extractor, pixels.as_deref(), &question, answers, k, pair_seed)?;
            let ref_adapter = e.adapter(&reference_row)?;
            let prompt_ids = e.tok.encode(&engine::tokenizer::apply_template(LLAVA_15_TEMPLATE, &question), true)?;
            let feats = match &pixels {
                Some(px) => Some(e.model.image_features(px, ref_adapter.as_deref())?),
                None => None,
            };
            let eos = *e.model.llm.cfg.eos_token_ids.first().unwrap_or(&2);
            let logp = |a: &LabeledAnswer| -> Result<f64> {
                Ok(e.model.answer_logp(&prompt_ids, &answer_ids(a, eos), feats.as_deref(), ref_adapter.as_deref())?)
            };
            let mut pairs = Vec::new();
            for &(c, r) in &fb.pairs {
                let (ca, ra) = (&fb.answers[c], &fb.answers[r]);
                let gap = ca.score.unwrap_or(0) - ra.score.unwrap_or(0);
                pairs.push(NewPair {
                    chosen_id: ids[c],
                    rejected_id: ids[r],
                    score_gap: gap,
                    ref_logp_chosen: logp(ca)?,
                    ref_logp_rejected: logp(ra)?,
                });
            }
            let labeled: Vec<(i64, Option<i64>, Vec<NewClaim>)> = fb
                .answers
                .iter()
                .zip(&ids)
                .map(|(a, &id)| {
                    let claims = a
                        .claims
                        .iter()
                        .zip(&a.verdicts)
                        .map(|(c, v)| NewClaim {
                            claim: c.text.clone(),
                            question: c.question.clone(),
                            p_yes: v.p_yes,
                            p_no: v.p_no,
                            accepted: v.accepted,
                        })
                        .collect();
                    (id, a.score, claims)
                })
                .collect();
            Ok((labeled, pairs))
        })
        .await?;
    store::finish_label(pool, job, owner, &labeler_name, it.reference_id, &labeled, &pairs).await
}

/// The answer's training ids: its tokens, plus EOS when it ended by itself.
fn answer_ids(a: &LabeledAnswer, eos: u32) -> Vec<u32> {
    let mut ids = a.tokens.clone();
    if a.finish == FinishReason::Stop {
        ids.push(eos);
    }
    ids
}

/// Trains the iteration's candidate with DPO on its pairs (length-balanced), starting from the policy's adapter
/// (or a fresh LoRA on the base), saves it atomically under the state directory and records it. Idempotent.
pub async fn run_training(
    pool: &PgPool,
    engine: &Arc<Engine>,
    cfg: &LoopConfig,
    it: &IterationRow,
    mut progress: impl FnMut(usize, usize, f64) + Send + 'static,
) -> Result<CheckpointRow> {
    if let Some(c) = store::iteration(pool, it.id).await?.candidate_id {
        return store::checkpoint(pool, c).await;
    }
    let started = chrono::Utc::now();
    let policy_row = store::checkpoint(pool, it.policy_id).await?;
    let pairs = store::iteration_pairs(pool, it.id).await?;
    if pairs.is_empty() {
        bail!("iteration {} has no pairs to train on", it.number);
    }
    let words = |s: &str| s.split_whitespace().count();
    let balance =
        length_balance(&pairs.iter().map(|p| (words(&p.chosen_text), words(&p.rejected_text))).collect::<Vec<_>>());
    let kept: Vec<&store::PairRow> =
        pairs.iter().zip(&balance.keep).filter(|(_, k)| **k || !cfg.length_balance).map(|(p, _)| p).collect();
    let mut encoded: HashMap<String, Vec<u8>> = HashMap::new();
    for p in &kept {
        if let Some(sha) = &p.image_sha256 {
            if !encoded.contains_key(sha) {
                encoded.insert(sha.clone(), store::image_bytes(pool, sha).await?);
            }
        }
    }
    // Decoding and preprocessing is CPU work: off the async runtime.
    let e = engine.clone();
    let images: HashMap<String, Arc<PixelValues>> = engine
        .run(Priority::Feedback, move |_| {
            encoded.into_iter().map(|(sha, b)| Ok((sha, Arc::new(e.pixels(&b)?)))).collect()
        })
        .await?;
    let eos = *engine.model.llm.cfg.eos_token_ids.first().unwrap_or(&2);
    // (prompt ids, chosen ids, rejected ids, image, reference log-probs)
    type Owned = (Vec<u32>, Vec<u32>, Vec<u32>, Option<Arc<PixelValues>>, (f64, f64));
    let mut owned: Vec<Owned> = Vec::new();
    for p in &kept {
        let prompt_ids =
            engine.tok.encode(&engine::tokenizer::apply_template(LLAVA_15_TEMPLATE, &p.instruction), true)?;
        // Stored tokens exclude EOS; answers that ended by themselves get it back for training.
        let ids = |t: &[i32], finish: &str| -> Vec<u32> {
            let mut v: Vec<u32> = t.iter().map(|&x| x as u32).collect();
            if finish == "stop" {
                v.push(eos);
            }
            v
        };
        owned.push((
            prompt_ids,
            ids(&p.chosen_tokens, &p.chosen_finish),
            ids(&p.rejected_tokens, &p.rejected_finish),
            p.image_sha256.as_ref().and_then(|s| images.get(s).cloned()),
            (p.ref_logp_chosen, p.ref_logp_rejected),
        ));
    }
    let pair_ids: Vec<i64> = kept.iter().map(|p| p.id).collect();
    let out_dir = engine.state_dir.join("checkpoints").join(format!("iter-{:04}", it.number));
    let (e, c) = (engine.clone(), cfg.clone());
    let dir = out_dir.clone();
    let (steps, losses) = engine.run(Priority::Train, move |slice| {
        let mut adapter = match e.adapter(&policy_row)? {
            Some(a) => e.model.load_adapter(&a.path)?,
            None => {
                let spec = LoraSpec { r: c.lora_r, lora_alpha: c.lora_alpha, ..LoraSpec::default() };
                e.model.create_adapter(&spec, c.seed ^ it_seed(&dir))?
            }
        };
        let tp: Vec<TokenPair> = owned.iter().map(|(p, ch, rj, px, _)| TokenPair { pixels: px.as_deref(), prompt_ids: p, chosen_ids: ch, rejected_ids: rj }).collect();
        let refs: Vec<(f64, f64)> = owned.iter().map(|o| o.4).collect();
        let tcfg = TrainConfig { dpo: DpoConfig { beta: c.beta, nll_weight: c.nll_weight, ..Default::default() }, epochs: c.epochs, batch_size: c.batch_size, seed: c.seed };
        let total = steps_per_epoch(tp.len(), c.batch_size) * c.epochs;
        let mut opt = AdamW::new(AdamWConfig { lr: c.lr, warmup_steps: (0.05 * total as f64).ceil() as usize, total_steps: total, ..Default::default() });
        let mut losses = Vec::new();
        train_dpo(&e.model, &mut adapter, &tp, &refs, &tcfg, &mut opt, None, |log| {
            losses.push(serde_json::json!({ "step": log.step, "loss": log.loss, "reward_accuracy": log.reward_accuracy, "reward_margin": log.reward_margin }));
            progress(log.step, log.total_steps, log.loss);
            // Training runs in slices: serving requests queued meanwhile run between optimizer steps.
            slice.yield_to_urgent();
        })?;
        if losses.iter().any(|l| !l["loss"].as_f64().is_some_and(f64::is_finite)) {
            bail!("training diverged (non-finite loss); candidate discarded");
        }
        // A directory left by a crashed attempt of this iteration is an orphan (no row names it): replace it.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove stale {}", dir.display()))?;
        }
        adapter.save(&dir, &e.model.dir, &[])?;
        Ok((total, losses))
    })
    .await?;
    crate::failpoint::hit("train_saved");
    let sha = adapter_sha256(&out_dir)?;
    let train_cfg = serde_json::json!({ "beta": cfg.beta, "nll_weight": cfg.nll_weight, "lr": cfg.lr, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lora_r": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha, "reference": cfg.reference, "length_balance_r": if cfg.length_balance { Some(balance.r) } else { None }, "pairs_total": pairs.len() });
    store::add_candidate(
        pool,
        it,
        &out_dir.display().to_string(),
        &sha,
        &pair_ids,
        steps as i32,
        &serde_json::Value::Array(losses),
        &train_cfg,
        started,
    )
    .await
}

/// `run_training`, marking the iteration failed (with the reason in `events`) when training fails; the error is
/// returned after it is recorded.
pub async fn train_or_fail(
    pool: &PgPool,
    engine: &Arc<Engine>,
    cfg: &LoopConfig,
    it: &IterationRow,
    progress: impl FnMut(usize, usize, f64) + Send + 'static,
) -> Result<CheckpointRow> {
    match run_training(pool, engine, cfg, it, progress).await {
        Ok(c) => Ok(c),
        Err(e) => {
            store::set_stage(pool, it.id, store::Stage::Failed).await?;
            store::event(
                pool,
                "iteration_failed",
                "trainer",
                serde_json::json!({ "iteration": it.number, "reason": format!("{e:#}") }),
            )
            .await?;
            Err(e)
        }
    }
}

/// The seed of a new adapter's weights, from its directory name (kept: the BENCHMARKS figures were measured with it).
fn it_seed(dir: &Path) -> u64 {
    dir.file_name()
        .and_then(|n| n.to_str())
        .map_or(0, |n| n.bytes().fold(0u64, |h, b| h.wrapping_mul(131).wrapping_add(b as u64)))
}

/// Held-out metrics of a checkpoint, as stored with it. ShapesWorld: exact metrics (CHAIR, Cover, POPE) on
/// generated images. Other models: [`evaluate_with_labeler`] on the held-out prompts in the database.
pub async fn evaluate(
    pool: &PgPool,
    engine: &Arc<Engine>,
    cfg: &LoopConfig,
    c: &CheckpointRow,
) -> Result<serde_json::Value> {
    if !engine.shapes {
        return evaluate_with_labeler(pool, engine, cfg, c).await;
    }
    let (e, c, cfg) = (engine.clone(), c.clone(), cfg.clone());
    engine
        .run(Priority::Feedback, move |slice| {
            let adapter = e.adapter(&c)?;
            let report = crate::shapes_eval::evaluate(
                &e.model,
                adapter.as_deref(),
                &e.tok,
                &e.ip,
                cfg.eval_seed,
                cfg.eval_count,
                e.ip.crop_width,
                64,
                |_| slice.yield_to_urgent(),
            )?;
            Ok(report.summary())
        })
        .await
}

/// The labeler-estimated hallucination rate of a checkpoint (models without ground truth): its greedy answers
/// to the first `eval_count` held-out prompts, split into claims, each verified by a fixed judge — the labeler
/// model when `loop.labeler` names one, else the base model (never the candidate itself, which would grade its
/// own beliefs). `hallucination_rate` = rejected claims / claims; `claims_per_answer` measures how much the
/// answers say (the gate's informativeness floor, as Cover is for ShapesWorld).
pub async fn evaluate_with_labeler(
    pool: &PgPool,
    engine: &Arc<Engine>,
    cfg: &LoopConfig,
    c: &CheckpointRow,
) -> Result<serde_json::Value> {
    let ids = store::heldout_prompts(pool, cfg.eval_count as i64).await?;
    if ids.is_empty() {
        bail!("no held-out prompts to evaluate checkpoint {} on: import some with split \"heldout\" (rlaifd ctl import-prompts)", c.id);
    }
    let mut prompts = Vec::new();
    for id in ids {
        let p = store::prompt(pool, id).await?;
        let bytes = match &p.image_sha256 {
            Some(sha) => Some(store::image_bytes(pool, sha).await?),
            None => None,
        };
        prompts.push((p.instruction, bytes));
    }
    let (e, c, max_new) = (engine.clone(), c.clone(), cfg.max_new_tokens);
    engine
        .run(Priority::Feedback, move |slice| {
            let adapter = e.adapter(&c)?;
            let (judge_model, judge_tok) = match &e.labeler {
                Some((m, t, _)) => (m, t),
                None => (&e.model, &e.tok),
            };
            let judge = Labeler::new(judge_model, None, judge_tok, LLAVA_15_TEMPLATE)?;
            let (mut claims, mut rejected, mut answers) = (0usize, 0usize, 0usize);
            for (question, bytes) in &prompts {
                let pixels = match bytes {
                    Some(b) => Some(e.pixels(b)?),
                    None => None,
                };
                let template = if pixels.is_some() { LLAVA_15_TEMPLATE } else { engine::tokenizer::TEXT_TEMPLATE };
                let ids = e.tok.encode(&engine::tokenizer::apply_template(template, question), true)?;
                let params = engine::sampling::SamplingParams { temperature: 0.0, max_new_tokens: max_new, ..Default::default() };
                let req = engine::generate::GenerateRequest { ids: &ids, pixels: pixels.as_ref(), seeds: &[0], params, stop_ids: vec![] };
                let answer = engine::generate::generate(&e.model, &req, adapter.as_deref())?;
                let text = e.tok.decode(&answer[0].tokens)?;
                let found = RuleExtractor.extract(question, &text)?;
                let verdicts = judge.verify(pixels.as_ref(), &found.iter().map(|x| x.question.clone()).collect::<Vec<_>>())?;
                answers += 1;
                claims += found.len();
                rejected += verdicts.iter().filter(|v| !v.accepted).count();
                slice.yield_to_urgent();
            }
            let rate = if claims == 0 { f64::NAN } else { rejected as f64 / claims as f64 };
            Ok(serde_json::json!({ "kind": "labeler", "hallucination_rate": if rate.is_finite() { serde_json::json!(rate) } else { serde_json::Value::Null },
                "claims_per_answer": claims as f64 / answers.max(1) as f64, "answers": answers, "claims": claims, "rejected": rejected }))
        })
        .await
}

/// Whether `candidate` metrics beat `current` ones: CHAIR_i lower by the margin, and Cover no more than
/// `max_cover_drop` (relative) below the base model's (`base`), so Cover cannot erode step by step.
pub fn better(
    cfg: &LoopConfig,
    candidate: &serde_json::Value,
    current: &serde_json::Value,
    base: &serde_json::Value,
) -> (bool, String) {
    let get = |m: &serde_json::Value, k: &str| m.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
    // ShapesWorld's exact metrics, or the labeler-estimated ones of other models.
    let (hk, ck) = if candidate.get("chair_i").is_some() {
        ("chair_i", "cover")
    } else {
        ("hallucination_rate", "claims_per_answer")
    };
    let (ci, cc) = (get(candidate, hk), get(candidate, ck));
    let pi = get(current, hk);
    let floor = get(base, ck) * (1.0 - cfg.max_cover_drop);
    if !(ci.is_finite() && cc.is_finite()) {
        return (false, format!("candidate metrics {hk}/{ck} are missing or not finite"));
    }
    if !pi.is_finite() {
        return (true, "the current checkpoint has no metrics".into());
    }
    if ci > pi - cfg.promote_margin {
        return (false, format!("{hk} {ci:.4} is not below {pi:.4} by the margin {}", cfg.promote_margin));
    }
    if floor.is_finite() && cc < floor {
        return (
            false,
            format!("{ck} {cc:.4} is below {floor:.4} ({} % under the base model's)", 100.0 * cfg.max_cover_drop),
        );
    }
    (true, format!("{hk} {pi:.4} -> {ci:.4}, {ck} {cc:.4} (floor {floor:.4})"))
}

/// Evaluates the iteration's candidate against the promoted checkpoint and promotes or rejects it.
pub async fn run_gate(
    pool: &PgPool,
    engine: &Arc<Engine>,
    cfg: &LoopConfig,
    it: &IterationRow,
) -> Result<(bool, serde_json::Value)> {
    let it = store::iteration(pool, it.id).await?;
    let cand = store::checkpoint(pool, it.candidate_id.context("the iteration has no candidate yet")?).await?;
    let metrics = evaluate(pool, engine, cfg, &cand).await?;
    let current = store::promoted(pool).await?.context("no promoted checkpoint")?;
    let current_metrics = match &current.metrics {
        Some(m) if m.get("chair_i").is_some() || m.get("hallucination_rate").is_some() => m.clone(),
        _ => {
            let m = evaluate(pool, engine, cfg, &current).await?;
            store::set_metrics(pool, current.id, &m).await?;
            m
        }
    };
    let base = store::base(pool).await?;
    let base_metrics =
        if base.id == current.id { current_metrics.clone() } else { base.metrics.clone().unwrap_or_default() };
    let (promote, reason) = better(cfg, &metrics, &current_metrics, &base_metrics);
    store::decide(pool, cand.id, promote, &metrics, &reason, "checkpointer").await?;
    if promote {
        crate::failpoint::hit("decided");
    }
    Ok((promote, metrics))
}

/// Runs sample and label jobs of the iteration until none is open (jobs other workers hold are waited for).
async fn drain_jobs(
    pool: &PgPool,
    engine: &Arc<Engine>,
    cfg: &LoopConfig,
    it: &IterationRow,
    owner: &str,
    progress: &Arc<dyn Fn(Stage, usize, usize) + Send + Sync>,
) -> Result<()> {
    loop {
        let mut worked = false;
        for kind in [store::JobKind::Sample, store::JobKind::Label] {
            for job in store::claim_jobs(pool, kind, owner, 1, cfg.lease_s).await? {
                worked = true;
                let r = if kind == store::JobKind::Sample {
                    run_sample_job(pool, engine, cfg, &job, owner).await
                } else {
                    run_label_job(pool, engine, cfg, &job, owner).await
                };
                if let Err(e) = r {
                    store::fail_job(pool, &job, &format!("{e:#}"), cfg.max_attempts).await?;
                }
            }
        }
        let (open, done, _failed) = store::job_counts(pool, it.id).await?;
        progress(Stage::Sample, done as usize, ((open + done) as usize).max(1));
        if open == 0 {
            return Ok(());
        }
        if !worked {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

/// What [`advance_sampling`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplingStep {
    /// Sample or label jobs are still open: nothing to do yet.
    Open,
    /// Too few pairs: sample jobs for more prompts were queued.
    MorePrompts,
    /// Enough pairs (or no prompts left): the iteration moved to training.
    Training,
}

/// Moves an iteration in the sampling stage on once its jobs are done: to training when it has
/// `pairs_per_iteration` pairs (or no unused prompts are left), else queues more prompts. An iteration that ends
/// with no pairs at all is marked failed (an error).
pub async fn advance_sampling(pool: &PgPool, cfg: &LoopConfig, it: &IterationRow) -> Result<SamplingStep> {
    let (open, _, _) = store::job_counts(pool, it.id).await?;
    if open > 0 {
        return Ok(SamplingStep::Open);
    }
    // Too few pairs (answers that all scored the same make none): sample more prompts while any are left.
    let pairs = store::iteration_pairs(pool, it.id).await?.len();
    if pairs < cfg.pairs_per_iteration {
        let more = store::unused_train_prompts(pool, cfg.prompts_per_iteration as i64).await?;
        if !more.is_empty() {
            store::add_sample_jobs(pool, it.id, &more).await?;
            return Ok(SamplingStep::MorePrompts);
        }
    }
    if pairs == 0 {
        store::set_stage(pool, it.id, store::Stage::Failed).await?;
        store::event(
            pool,
            "iteration_failed",
            "trainer",
            serde_json::json!({ "iteration": it.number, "reason": "no pairs" }),
        )
        .await?;
        bail!("iteration {}: labeling produced no pairs", it.number);
    }
    store::set_stage(pool, it.id, store::Stage::Training).await?;
    Ok(SamplingStep::Training)
}

/// Starts the next iteration from the promoted checkpoint on `prompts_per_iteration` unused training prompts
/// (the open one is returned if there is one).
pub async fn start_iteration(pool: &PgPool, cfg: &LoopConfig) -> Result<IterationRow> {
    if let Some(it) = store::open_iteration(pool).await? {
        return Ok(it);
    }
    let prompts = store::unused_train_prompts(pool, cfg.prompts_per_iteration as i64).await?;
    if prompts.is_empty() {
        bail!("no unused training prompts left (import more prompts or generate them)");
    }
    let config = serde_json::to_value(cfg)?;
    store::start_iteration(pool, &config, &prompts, cfg.reference == "base").await
}

/// Where an iteration stands, for progress display.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Sample,
    Label,
    Train,
    Evaluate,
}

/// What one finished iteration did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct IterationOutcome {
    pub iteration: i32,
    pub candidate: i64,
    pub promoted: bool,
    pub metrics: serde_json::Value,
    pub pairs: usize,
}

/// Runs the open iteration (or starts the next one) to its end: sample and label every prompt (one job at a
/// time, each stored with its job's completion), train the candidate, gate it. A rerun after a crash picks up
/// where the database says the iteration stands.
pub async fn run_iteration(
    pool: &PgPool,
    engine: &Arc<Engine>,
    cfg: &LoopConfig,
    owner: &str,
    progress: Arc<dyn Fn(Stage, usize, usize) + Send + Sync>,
) -> Result<IterationOutcome> {
    let it = start_iteration(pool, cfg).await?;
    if it.stage == store::Stage::Sampling {
        loop {
            drain_jobs(pool, engine, cfg, &it, owner, &progress).await?;
            match advance_sampling(pool, cfg, &it).await? {
                SamplingStep::Training => break,
                SamplingStep::MorePrompts | SamplingStep::Open => continue,
            }
        }
    }
    let p = progress.clone();
    let cand = train_or_fail(pool, engine, cfg, &it, move |s, t, _| p(Stage::Train, s, t)).await?;
    progress(Stage::Evaluate, 0, 1);
    let (promoted, metrics) = run_gate(pool, engine, cfg, &it).await?;
    progress(Stage::Evaluate, 1, 1);
    let pairs = store::iteration_pairs(pool, it.id).await?.len();
    Ok(IterationOutcome { iteration: it.number, candidate: cand.id, promoted, metrics, pairs })
}
