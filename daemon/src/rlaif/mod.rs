//! The RLAIF-V loop's stages on top of the store: sample (n answers per prompt from the promoted policy), label
//! (claims, verdicts, scores, pairs with reference log-probs), train (DPO LoRA from the policy) and evaluate
//! (gate the candidate on held-out metrics, promote or reject). Each stage is idempotent and runs on the
//! engine thread (`Engine::run`, by priority) for its model math; the actors and the demo drive them.
//!
//! One file per stage (`sample`, `label`, `train`, `gate`), the model side in `model`, the iteration driver in
//! `iteration`; this file holds the loop's configuration and re-exports the stages as `crate::rlaif::*`.

mod gate;
mod iteration;
mod label;
mod model;
mod sample;
mod train;

pub use gate::{better, evaluate, evaluate_with_labeler, gate_job, run_gate, GateOutcome};
pub use iteration::{advance_sampling, run_iteration, start_iteration, IterationOutcome, SamplingStep, Stage};
pub use label::run_label_job;
pub use model::{
    adapter_sha256, check_stored, dir_files, fetch_checkpoint, is_shapes_tokenizer, write_dir_atomically, Engine,
    InFlight,
};
pub use sample::run_sample_job;
pub use train::{run_training, train_job, Diverged, TrainLease};

use anyhow::{bail, Result};
use engine::feedback::pipeline::FeedbackConfig;
use engine::rng::SplitMix64;
use std::path::Path;

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
    /// Which answers may pair: "rlaif_v" (scores differ; the paper's) or "keep_accepted" (also: the chosen answer
    /// has at least as many accepted claims as the rejected one).
    pub pair_rule: engine::feedback::pipeline::PairRule,
    /// Training prompts sampled per iteration.
    pub prompts_per_iteration: usize,
    /// Train once at least this many pairs exist (after sampling every prompt of the iteration).
    pub pairs_per_iteration: usize,
    /// Pairs imported from a dataset (`rlaifd import --as pairs`) added to each iteration's own pairs for
    /// training: the next this many in import order for each iteration (wrapping around). 0: none.
    pub imported_pairs: usize,
    /// "policy" (the policy at the start of the iteration, RLAIF-V's choice) or "base".
    pub reference: String,
    /// Who verifies claims: "self" (the policy, as RLAIF-V 12B), "base", or a separate labeler model directory
    /// (as RLAIF-V 7B, labeled by a stronger model).
    pub labeler: String,
    /// Who divides answers into claims: "auto" (ShapesWorld's exact objects for a ShapesWorld model, else
    /// "rules"), "shapes", "rules" (sentence, clause and list rules), or "llm" (a model lists each answer's
    /// claims and writes one yes/no question per claim, all answers of a prompt in one batch; RLAIF-V's divide).
    pub extractor: String,
    /// For extractor = "llm": "self" (the policy being trained) or a text or vision-language model directory.
    pub extractor_model: String,
    /// For extractor = "llm": the longest listing (and question) the model may write, in tokens; a listing cut
    /// off there keeps its complete lines.
    pub extractor_max_new_tokens: usize,
    pub beta: f64,
    /// RLAIF-V's length balancing of each iteration's pairs (drop pairs whose chosen answer is much shorter).
    pub length_balance: bool,
    /// Weight of the NLL term on the chosen answer (RPO); 0 is plain DPO.
    pub nll_weight: f64,
    /// The preference loss: "sigmoid" (DPO, RLAIF-V's), "ipo", or "length_normalized" (per-token log-ratios).
    pub loss: engine::train::dpo::DpoLoss,
    /// Label smoothing of the sigmoid loss (conservative DPO); 0 is plain DPO.
    pub label_smoothing: f64,
    pub lr: f64,
    pub epochs: usize,
    pub batch_size: usize,
    pub lora_r: usize,
    pub lora_alpha: f64,
    /// The modules a new adapter puts LoRA on: a regex over whole module paths ("" = every linear layer of the
    /// language model, RLAIF-V's). E.g. `.*(language_model.*_proj|multi_modal_projector.*)` adds the projector.
    pub lora_targets: String,
    /// What DPO trains: "lora" (a LoRA adapter, RLAIF-V's 12B/LoRA recipe) or "full" (every linear layer of the
    /// language model and the projector in full, RLAIF-V's 7B recipe; kept in the checkpoint as peft
    /// `modules_to_save`; the lora_* settings are then unused).
    pub tuning: String,
    /// What the gate measures: "" (ShapesWorld: exact metrics on generated images; other models: the labeler's
    /// estimate on held-out prompts), or a benchmark in its published format, "objhal:FILE" (a COCO instances
    /// file: gate on CHAIR_i with Cover as the floor), "pope:FILE" (a POPE question file: gate on F1) or
    /// "amber:FILE" (an AMBER query file: gate on its CHAIR with Cover as the floor).
    pub gate: String,
    /// The benchmark's images folder ("" = the data file's folder).
    pub gate_images: String,
    /// objhal: a synonyms file ("" = CHAIR's COCO lists).
    pub gate_synonyms: String,
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
    /// Training saves its state (adapter, optimizer moments) to the database every this many steps, so a daemon
    /// that takes over the train job of a dead one resumes from there; 0: only the finished candidate is saved.
    pub save_every: usize,
    /// With several GPUs (`model.devices`), DPO trains on all of them, data-parallel (each step's batch dealt out
    /// over the devices, the LoRA gradients summed with NCCL); false: on the first device only.
    pub data_parallel: bool,
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            n: 10,
            temperature: 0.7,
            top_p: 1.0,
            max_new_tokens: 512,
            pairs_per_prompt: 2,
            pair_rule: engine::feedback::pipeline::PairRule::RlaifV,
            prompts_per_iteration: 64,
            pairs_per_iteration: 32,
            imported_pairs: 0,
            reference: "policy".into(),
            labeler: "self".into(),
            extractor: "auto".into(),
            extractor_model: "self".into(),
            extractor_max_new_tokens: 256,
            beta: 0.1,
            length_balance: true,
            nll_weight: 0.0,
            loss: engine::train::dpo::DpoLoss::Sigmoid,
            label_smoothing: 0.0,
            lr: 5e-4,
            epochs: 2,
            batch_size: 8,
            lora_r: 16,
            lora_alpha: 32.0,
            lora_targets: String::new(),
            tuning: "lora".into(),
            gate: String::new(),
            gate_images: String::new(),
            gate_synonyms: String::new(),
            eval_count: 100,
            eval_seed: 1_000_000,
            promote_margin: 0.005,
            max_cover_drop: 0.1,
            seed: 0,
            lease_s: 600.0,
            max_attempts: 3,
            save_every: 20,
            data_parallel: true,
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
        if self.imported_pairs > 100_000 {
            return bad("imported_pairs", "must be at most 100000 per iteration");
        }
        if !matches!(self.reference.as_str(), "policy" | "base") {
            return bad("reference", "expected \"policy\" or \"base\"");
        }
        if self.labeler.trim().is_empty() {
            return bad("labeler", "expected \"self\", \"base\" or a labeler model directory");
        }
        if !matches!(self.extractor.as_str(), "auto" | "shapes" | "rules" | "llm") {
            return bad("extractor", "expected \"auto\", \"shapes\", \"rules\" or \"llm\"");
        }
        if self.extractor == "llm" && self.extractor_model.trim().is_empty() {
            return bad("extractor_model", "expected \"self\" or a model directory");
        }
        if self.extractor_max_new_tokens == 0 {
            return bad("extractor_max_new_tokens", "must be at least 1");
        }
        if !(self.beta > 0.0 && self.lr > 0.0 && self.lr.is_finite())
            || self.epochs == 0
            || self.batch_size == 0
            || self.lora_r == 0
        {
            return bad("beta/lr/epochs/batch_size/lora_r", "must be positive");
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return bad("label_smoothing", "must be in [0, 0.5)");
        }
        if !(self.nll_weight >= 0.0 && self.nll_weight.is_finite()) {
            return bad("nll_weight", "must be 0 or more");
        }
        if !self.lora_targets.is_empty() {
            if let Err(e) = regex::Regex::new(&self.lora_targets) {
                return bad("lora_targets", &format!("not a regex: {e}"));
            }
        }
        if !matches!(self.tuning.as_str(), "lora" | "full") {
            return bad("tuning", "expected \"lora\" or \"full\"");
        }
        if let Some((_, file)) =
            crate::bench::parse_gate(&self.gate).map_err(|e| anyhow::anyhow!("loop.gate: {e:#}"))?
        {
            if !file.is_file() {
                return bad("gate", &format!("{}: no such file", file.display()));
            }
            if !self.gate_images.is_empty() && !Path::new(&self.gate_images).is_dir() {
                return bad("gate_images", &format!("{}: not a folder", self.gate_images));
            }
            if !self.gate_synonyms.is_empty() && !Path::new(&self.gate_synonyms).is_file() {
                return bad("gate_synonyms", &format!("{}: no such file", self.gate_synonyms));
            }
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

/// A background task stopped when its handle is dropped (a lease keeper must not outlive its job's run).
pub(crate) struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Renews `owner`'s lease on job `job` every third of `lease_s` until the returned handle is dropped (gating runs
/// longer than a lease; a database outage is waited out).
pub(crate) fn renew_lease_while(pool: &sqlx::PgPool, job: i64, owner: &str, lease_s: f64) -> AbortOnDrop {
    let (pool, owner) = (pool.clone(), owner.to_string());
    AbortOnDrop(tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs_f64((lease_s / 3.0).max(0.2)));
        loop {
            tick.tick().await;
            match crate::store::renew_lease(&pool, job, &owner, lease_s).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => tracing::warn!(job, error = %format!("{e:#}"), "cannot renew the lease; retrying"),
            }
        }
    }))
}
