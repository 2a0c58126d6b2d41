//! Self-feedback at inference (RLAIF-V, CVPR version): a DPO-trained policy is its own reward model. The
//! length-normalised implicit reward r(y) = (β / |y|) · Σ_t [log πθ(y_t | x, y<t) − log πref(y_t | x, y<t)]
//! ranks N sampled answers and the best is returned.

use crate::error::{EngineError, Result};
use crate::generate::{generate, Answer, FinishReason, GenerateRequest};
use crate::{Adapter, Model};

/// How an answer's log-ratios become its reward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RewardKind {
    /// RLAIF-V's: β / |y| · Σ over the answer's tokens, its end-of-sequence token included.
    #[default]
    Mean,
    /// The same average over the answer's words only: the end-of-sequence token's log-ratio is left out. A policy
    /// trained toward shorter chosen answers raises that one token most, which the plain average rewards.
    MeanContent,
    /// β · Σ (DPO's own reward, not normalised by length).
    Sum,
}

impl std::str::FromStr for RewardKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "mean" => Ok(RewardKind::Mean),
            "mean-content" => Ok(RewardKind::MeanContent),
            "sum" => Ok(RewardKind::Sum),
            other => Err(format!("unknown reward `{other}`: expected mean, mean-content or sum")),
        }
    }
}

/// The pieces every reward is made of, for one answer: log πθ − log πref summed over its tokens (its end-of-sequence
/// token included when it stopped), that token's share of it when it was split off (`None`: not measured), and its
/// word count.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct RewardParts {
    pub total: f64,
    pub eos: Option<f64>,
    pub words: usize,
    pub stopped: bool,
}

impl RewardParts {
    pub fn reward(&self, kind: RewardKind, beta: f64) -> f64 {
        let tokens = self.words + self.stopped as usize;
        if tokens == 0 {
            return f64::NEG_INFINITY;
        }
        match kind {
            RewardKind::Mean => beta * self.total / tokens as f64,
            RewardKind::MeanContent if self.words == 0 => f64::NEG_INFINITY,
            RewardKind::MeanContent => beta * (self.total - self.eos.unwrap_or(0.0)) / self.words as f64,
            RewardKind::Sum => beta * self.total,
        }
    }
}

/// N answers, their rewards and the index of the best (first on ties).
#[derive(Clone, Debug)]
pub struct BestOf {
    pub answers: Vec<Answer>,
    pub rewards: Vec<f64>,
    pub parts: Vec<RewardParts>,
    pub best: usize,
}

/// Samples `req.seeds.len()` answers from the policy and picks the one with the highest implicit reward
/// (RLAIF-V's length-normalised one).
pub fn best_of_n(
    model: &Model,
    policy: Option<&Adapter>,
    reference: Option<&Adapter>,
    req: &GenerateRequest,
    beta: f64,
) -> Result<BestOf> {
    best_of_n_by(model, policy, reference, req, beta, RewardKind::Mean, false)
}

/// `best_of_n` with the reward `kind`; `split_eos` also measures the end-of-sequence token's own log-ratio (one more
/// scoring pass per side; `MeanContent` needs it anyway).
pub fn best_of_n_by(
    model: &Model,
    policy: Option<&Adapter>,
    reference: Option<&Adapter>,
    req: &GenerateRequest,
    beta: f64,
    kind: RewardKind,
    split_eos: bool,
) -> Result<BestOf> {
    if req.seeds.is_empty() {
        return Err(EngineError::Input("best-of-N needs N >= 1".into()));
    }
    let answers = generate(model, req, policy)?;
    let (pf, rf) = match req.pixels {
        Some(px) => (Some(model.image_features(px, policy)?), Some(model.image_features(px, reference)?)),
        None => (None, None),
    };
    // Scored as DPO trains: an answer that stopped includes its end-of-sequence token.
    let eos = req.stop_ids.first().or(model.llm.cfg.eos_token_ids.first()).copied();
    let ratio = |ids: &[u32]| -> Result<f64> {
        if ids.is_empty() {
            return Ok(0.0);
        }
        let lp = model.answer_logp(req.ids, ids, pf.as_ref(), policy)?;
        let lr = model.answer_logp(req.ids, ids, rf.as_ref(), reference)?;
        Ok(lp - lr)
    };
    let parts: Vec<RewardParts> = answers
        .iter()
        .map(|a| {
            let split = split_eos || kind == RewardKind::MeanContent;
            let words = a.tokens.len();
            match (a.finish, eos) {
                (FinishReason::Stop, Some(e)) => {
                    let mut ids = a.tokens.clone();
                    ids.push(e);
                    let total = ratio(&ids)?;
                    let eos = if split { Some(total - ratio(&a.tokens)?) } else { None };
                    Ok(RewardParts { total, eos, words, stopped: true })
                }
                _ => Ok(RewardParts { total: ratio(&a.tokens)?, eos: split.then_some(0.0), words, stopped: false }),
            }
        })
        .collect::<Result<_>>()?;
    let rewards: Vec<f64> = parts.iter().map(|p| p.reward(kind, beta)).collect();
    let best = rewards.iter().enumerate().fold(0, |b, (i, r)| if *r > rewards[b] { i } else { b });
    Ok(BestOf { answers, rewards, parts, best })
}
