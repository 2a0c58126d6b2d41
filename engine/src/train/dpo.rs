//! DPO on LLaVA: sequence log-probs of chosen and rejected answers under the policy (base + adapter) and the
//! reference, the loss, and its gradient w.r.t. every LoRA tensor.

use crate::adapter::Adapter;
use crate::error::{EngineError, Result};
use crate::image::PixelValues;
use crate::llava::{ImageTape, Model};
use crate::train::LoraGrads;

/// One preference pair in token form; the prompt holds the image token once when there is an image.
pub struct TokenPair<'a> {
    pub pixels: Option<&'a PixelValues>,
    pub prompt_ids: &'a [u32],
    pub chosen_ids: &'a [u32],
    pub rejected_ids: &'a [u32],
}

/// Summed answer log-probs of one pair.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PairLogps {
    pub policy_chosen: f64,
    pub policy_rejected: f64,
    pub ref_chosen: f64,
    pub ref_rejected: f64,
}

/// -log σ(β · ((π_c − r_c) − (π_r − r_r))) and its derivatives w.r.t. π_c and π_r.
pub fn dpo_sigmoid_loss(l: &PairLogps, beta: f64) -> (f64, f64, f64) {
    let z = beta * ((l.policy_chosen - l.ref_chosen) - (l.policy_rejected - l.ref_rejected));
    // -log σ(z) = softplus(-z), computed stably.
    let loss = if z > 0.0 { (-z).exp().ln_1p() } else { -z + z.exp().ln_1p() };
    let sig_neg = 1.0 / (1.0 + z.exp()); // σ(-z) = -d loss / d z
    (loss, -beta * sig_neg, beta * sig_neg)
}

/// Mean DPO loss over `pairs` and its gradient, accumulated into `grads` (which the caller zeroes).
/// The reference is the base model with the adapter disabled.
pub fn dpo_loss_and_grads(model: &Model, adapter: &Adapter, pairs: &[TokenPair], beta: f64, grads: &mut LoraGrads) -> Result<(f64, Vec<PairLogps>)> {
    if pairs.is_empty() {
        return Err(EngineError::Input("no preference pairs".into()));
    }
    let inv_n = 1.0 / pairs.len() as f64;
    let mut total = 0.0;
    let mut all = Vec::with_capacity(pairs.len());
    for (i, p) in pairs.iter().enumerate() {
        if p.chosen_ids.is_empty() || p.rejected_ids.is_empty() {
            return Err(EngineError::Input(format!("pair {i}: chosen and rejected answers must not be empty")));
        }
        // Reference log-probs: no adapter, no tape.
        let ref_feats = match p.pixels {
            Some(px) => Some(model.image_features(px, None)?),
            None => None,
        };
        let ref_c = model.answer_logp(p.prompt_ids, p.chosen_ids, ref_feats.as_deref(), None)?;
        let ref_r = model.answer_logp(p.prompt_ids, p.rejected_ids, ref_feats.as_deref(), None)?;
        // Policy with tapes.
        let img: Option<ImageTape> = match p.pixels {
            Some(px) => Some(model.image_forward_train(px, Some(adapter))?),
            None => None,
        };
        let feats = img.as_ref().map(|t| t.features.as_slice());
        let sc = model.score_train(p.prompt_ids, p.chosen_ids, feats, Some(adapter))?;
        let sr = model.score_train(p.prompt_ids, p.rejected_ids, feats, Some(adapter))?;
        let l = PairLogps { policy_chosen: sc.logp_sum(), policy_rejected: sr.logp_sum(), ref_chosen: ref_c, ref_rejected: ref_r };
        let (loss, d_pc, d_pr) = dpo_sigmoid_loss(&l, beta);
        total += loss * inv_n;
        all.push(l);
        let d_embed_c = model.score_backward(&sc, (d_pc * inv_n) as f32, Some(adapter), Some(grads))?;
        let d_embed_r = model.score_backward(&sr, (d_pr * inv_n) as f32, Some(adapter), Some(grads))?;
        if let Some(t) = &img {
            let mut d_feats = sc.image_rows_grad(&d_embed_c);
            for (a, b) in d_feats.iter_mut().zip(sr.image_rows_grad(&d_embed_r)) {
                *a += b;
            }
            model.image_backward_train(t, d_feats, Some(adapter), Some(grads));
        }
    }
    Ok((total, all))
}
