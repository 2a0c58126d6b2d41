//! Self-feedback at inference (RLAIF-V, CVPR version): a DPO-trained policy is its own reward model. The
//! length-normalised implicit reward r(y) = (β / |y|) · Σ_t [log πθ(y_t | x, y<t) − log πref(y_t | x, y<t)]
//! ranks N sampled answers and the best is returned.

use crate::error::{EngineError, Result};
use crate::generate::{generate, Answer, FinishReason, GenerateRequest};
use crate::{Adapter, Model};

/// r(y) for one answer (`answer` ids without EOS). The policy is base + `policy`, the reference base +
/// `reference` (None: the base model alone). The image features of each side are passed in so they are
/// computed once for all N answers.
#[allow(clippy::too_many_arguments)]
pub fn implicit_reward(
    model: &Model,
    policy: Option<&Adapter>,
    reference: Option<&Adapter>,
    prompt: &[u32],
    answer: &[u32],
    policy_feats: Option<&crate::llava::ImageFeatures>,
    reference_feats: Option<&crate::llava::ImageFeatures>,
    beta: f64,
) -> Result<f64> {
    if answer.is_empty() {
        // Nothing to compare (max_new_tokens 0); an empty answer never wins against a non-empty one.
        return Ok(f64::NEG_INFINITY);
    }
    let lp = model.answer_logp(prompt, answer, policy_feats, policy)?;
    let lr = model.answer_logp(prompt, answer, reference_feats, reference)?;
    Ok(beta * (lp - lr) / answer.len() as f64)
}

/// N answers, their rewards and the index of the best (first on ties).
#[derive(Clone, Debug)]
pub struct BestOf {
    pub answers: Vec<Answer>,
    pub rewards: Vec<f64>,
    pub best: usize,
}

/// Samples `req.seeds.len()` answers from the policy and picks the one with the highest implicit reward.
pub fn best_of_n(
    model: &Model,
    policy: Option<&Adapter>,
    reference: Option<&Adapter>,
    req: &GenerateRequest,
    beta: f64,
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
    let rewards: Vec<f64> = answers
        .iter()
        .map(|a| {
            let mut ids = a.tokens.clone();
            if let (FinishReason::Stop, Some(e)) = (a.finish, eos) {
                ids.push(e);
            }
            implicit_reward(model, policy, reference, req.ids, &ids, pf.as_ref(), rf.as_ref(), beta)
        })
        .collect::<Result<_>>()?;
    let best = rewards.iter().enumerate().fold(0, |b, (i, r)| if *r > rewards[b] { i } else { b });
    Ok(BestOf { answers, rewards, best })
}
