//! One prompt through RLAIF-V: deconfounded sampling (n answers, identical decoding settings, one recorded
//! seed each, decoded in one batch that shares the image and the prompt), divide (claims), conquer (labeler
//! verdicts), score and candidate pairs. Pair sampling and length balancing are dataset-level and happen after.

use crate::error::Result;
use crate::feedback::claims::{Claim, ClaimExtractor};
use crate::feedback::pairs::{candidate_pairs, pick_pairs, score};
use crate::feedback::verify::{Labeler, Verdict};
use crate::generate::{generate, FinishReason, GenerateRequest};
use crate::image::PixelValues;
use crate::rng::SplitMix64;
use crate::sampling::SamplingParams;
use crate::tokenizer::TextTokenizer;
use crate::{Adapter, Model};
use std::collections::HashMap;

/// Every choice of a labeling run, recorded with its output so the run can be replayed.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FeedbackConfig {
    /// Answers sampled per prompt.
    pub n: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub max_new_tokens: usize,
    /// Pairs kept per prompt (at most).
    pub pairs_per_prompt: usize,
    /// Run seed: prompt i's answers use seeds derived from (seed, i); its pair draw too.
    pub seed: u64,
}

impl Default for FeedbackConfig {
    fn default() -> Self {
        FeedbackConfig { n: 10, temperature: 0.7, top_p: 1.0, max_new_tokens: 512, pairs_per_prompt: 2, seed: 0 }
    }
}

impl FeedbackConfig {
    /// Seed of answer `j` of prompt `prompt_index`.
    pub fn answer_seed(&self, prompt_index: u64, j: usize) -> u64 {
        SplitMix64::new(self.seed ^ prompt_index.wrapping_mul(0x9e37_79b9_7f4a_7c15)).next_u64().wrapping_add(j as u64)
    }

    /// Seed of the pair draw of prompt `prompt_index`.
    pub fn pair_seed(&self, prompt_index: u64) -> u64 {
        SplitMix64::new(self.seed ^ 0x5041_4952 ^ prompt_index.wrapping_mul(0xbf58_476d_1ce4_e5b9)).next_u64()
    }
}

/// One sampled answer with its claims and the labeler's verdicts.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LabeledAnswer {
    pub seed: u64,
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    pub claims: Vec<Claim>,
    pub verdicts: Vec<Verdict>,
    /// −(rejected claims); None without claims.
    pub score: Option<i64>,
}

/// A prompt's labeled answers and the pairs drawn from them (indices into `answers`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct PromptFeedback {
    pub answers: Vec<LabeledAnswer>,
    pub candidates: usize,
    pub pairs: Vec<(usize, usize)>,
}

/// The policy side: model, adapter, tokenizer, template.
pub struct Policy<'a> {
    pub model: &'a Model,
    pub adapter: Option<&'a Adapter>,
    pub tokenizer: &'a TextTokenizer,
    pub template: &'a str,
}

/// Samples, labels, scores and pairs one prompt (`prompt_index` fixes its seeds).
pub fn label_prompt(
    policy: &Policy,
    labeler: &Labeler,
    extractor: &dyn ClaimExtractor,
    pixels: Option<&PixelValues>,
    question: &str,
    prompt_index: u64,
    cfg: &FeedbackConfig,
) -> Result<PromptFeedback> {
    let seeds: Vec<u64> = (0..cfg.n).map(|j| cfg.answer_seed(prompt_index, j)).collect();
    let sampled = sample_answers(policy, pixels, question, &seeds, cfg)?;
    label_answers(labeler, extractor, pixels, question, sampled, cfg.pairs_per_prompt, cfg.pair_seed(prompt_index))
}

/// Deconfounded sampling: one answer per seed, identical decoding settings, decoded in one batch that shares the
/// image and the prompt. The answers come back unlabeled (no claims, no verdicts, no score).
pub fn sample_answers(
    policy: &Policy,
    pixels: Option<&PixelValues>,
    question: &str,
    seeds: &[u64],
    cfg: &FeedbackConfig,
) -> Result<Vec<LabeledAnswer>> {
    let ids = policy.tokenizer.encode_chat(policy.template, question)?;
    let params = SamplingParams {
        temperature: cfg.temperature,
        top_p: cfg.top_p,
        max_new_tokens: cfg.max_new_tokens,
        ..Default::default()
    };
    let req = GenerateRequest { ids: &ids, pixels, seeds, params, stop_ids: vec![] };
    let sampled = generate(policy.model, &req, policy.adapter)?;
    let mut answers = Vec::with_capacity(sampled.len());
    for a in sampled {
        let text = policy.tokenizer.decode(&a.tokens)?;
        answers.push(LabeledAnswer {
            seed: a.seed,
            text,
            tokens: a.tokens,
            finish: a.finish,
            claims: Vec::new(),
            verdicts: Vec::new(),
            score: None,
        });
    }
    Ok(answers)
}

/// Which scored answers may pair (`label_answers_with`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairRule {
    /// RLAIF-V's: any two answers whose scores (−rejected claims) differ by at least 1.
    #[default]
    RlaifV,
    /// RLAIF-V's, and the chosen answer has at least as many accepted claims as the rejected one: no pair prefers
    /// an answer for saying less, so DPO learns to say the right things rather than fewer things.
    KeepAccepted,
}

/// Divide and conquer on one prompt's answers: claims, the labeler's verdict on each distinct question (asked
/// once per prompt), scores, candidate pairs and at most `k` pairs drawn with `pair_seed`.
pub fn label_answers(
    labeler: &Labeler,
    extractor: &dyn ClaimExtractor,
    pixels: Option<&PixelValues>,
    question: &str,
    answers: Vec<LabeledAnswer>,
    k: usize,
    pair_seed: u64,
) -> Result<PromptFeedback> {
    label_answers_with(labeler, extractor, pixels, question, answers, k, pair_seed, PairRule::RlaifV)
}

/// `label_answers` with the pairing `rule`.
#[allow(clippy::too_many_arguments)]
pub fn label_answers_with(
    labeler: &Labeler,
    extractor: &dyn ClaimExtractor,
    pixels: Option<&PixelValues>,
    question: &str,
    mut answers: Vec<LabeledAnswer>,
    k: usize,
    pair_seed: u64,
    rule: PairRule,
) -> Result<PromptFeedback> {
    // An answer holding the image token can be neither verified nor scored against the reference (a prompt takes
    // the image once, an answer never): it gets no claims, so no score, and is never paired.
    let image = labeler.model.image_token_id();
    let unusable: Vec<bool> = answers.iter().map(|a| image.is_some_and(|t| a.tokens.contains(&t))).collect();
    let usable: Vec<usize> = (0..answers.len()).filter(|&i| !unusable[i]).collect();
    let texts: Vec<&str> = usable.iter().map(|&i| answers[i].text.as_str()).collect();
    let extracted = extractor.extract_all(question, &texts)?;
    for (&i, claims) in usable.iter().zip(extracted) {
        answers[i].claims = claims;
    }
    let mut distinct: Vec<String> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    for c in answers.iter().flat_map(|a| &a.claims) {
        if !at.contains_key(&c.question) {
            at.insert(c.question.clone(), distinct.len());
            distinct.push(c.question.clone());
        }
    }
    let verdicts = labeler.verify(pixels, &distinct)?;
    for a in &mut answers {
        a.verdicts = a.claims.iter().map(|c| verdicts[at[&c.question]]).collect();
        let accepted: Vec<bool> = a.verdicts.iter().map(|v| v.accepted).collect();
        a.score = score(&accepted);
    }
    let texts: Vec<&str> = answers.iter().map(|a| a.text.as_str()).collect();
    let scores: Vec<Option<i64>> = answers.iter().map(|a| a.score).collect();
    let mut cands = candidate_pairs(&texts, &scores);
    if rule == PairRule::KeepAccepted {
        let accepted: Vec<usize> = answers.iter().map(|a| a.verdicts.iter().filter(|v| v.accepted).count()).collect();
        cands = crate::feedback::pairs::keep_accepted(&cands, &accepted);
    }
    let pairs = pick_pairs(&cands, k, pair_seed);
    Ok(PromptFeedback { answers, candidates: cands.len(), pairs })
}
