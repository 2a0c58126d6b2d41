//! DPO on LLaVA: sequence log-probs of chosen and rejected answers under the policy (base + adapter) and the
//! reference, the loss, and its gradient w.r.t. every LoRA tensor.

use crate::adapter::Adapter;
use crate::error::{EngineError, Result};
use crate::image::PixelValues;
use crate::llava::Model;
use crate::train::passes::ImageTape;
use crate::train::Grads;

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

/// Which preference loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLoss {
    /// DPO: −log σ(β·h), h = (π_c − r_c) − (π_r − r_r); with label smoothing ε (robust / conservative DPO):
    /// −(1−ε)·log σ(β·h) − ε·log σ(−β·h).
    Sigmoid,
    /// IPO: (h − 1/(2β))².
    Ipo,
    /// Length-normalised DPO: h uses per-token averages, (π_c − r_c)/|c| − (π_r − r_r)/|r|.
    LengthNormalized,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DpoConfig {
    pub beta: f64,
    pub loss: DpoLoss,
    pub label_smoothing: f64,
    /// Weight of the NLL term on the chosen answer (RPO), per token: −w·π_c/|c|. 0 = off (RLAIF-V default).
    pub nll_weight: f64,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig { beta: 0.1, loss: DpoLoss::Sigmoid, label_smoothing: 0.0, nll_weight: 0.0 }
    }
}

fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Loss of one pair and its derivatives w.r.t. π_c and π_r (summed answer log-probs under the policy).
pub fn pair_loss(cfg: &DpoConfig, l: &PairLogps, len_c: usize, len_r: usize) -> (f64, f64, f64) {
    let (lc, lr) = (len_c.max(1) as f64, len_r.max(1) as f64);
    let (dc, dr) = (l.policy_chosen - l.ref_chosen, l.policy_rejected - l.ref_rejected);
    let b = cfg.beta;
    let (mut loss, mut d_pc, d_pr) = match cfg.loss {
        DpoLoss::Sigmoid | DpoLoss::LengthNormalized => {
            let (wc, wr) = if cfg.loss == DpoLoss::LengthNormalized { (1.0 / lc, 1.0 / lr) } else { (1.0, 1.0) };
            let z = b * (dc * wc - dr * wr);
            let e = cfg.label_smoothing;
            let loss = (1.0 - e) * softplus(-z) + e * softplus(z);
            let dz = -(1.0 - e) * sigmoid(-z) + e * sigmoid(z);
            (loss, dz * b * wc, -dz * b * wr)
        }
        DpoLoss::Ipo => {
            let h = dc - dr;
            let target = 1.0 / (2.0 * b);
            ((h - target).powi(2), 2.0 * (h - target), -2.0 * (h - target))
        }
    };
    if cfg.nll_weight != 0.0 {
        loss += -cfg.nll_weight * l.policy_chosen / lc;
        d_pc += -cfg.nll_weight / lc;
    }
    (loss, d_pc, d_pr)
}

/// Reference log-probs (π_ref of chosen, rejected) of a pair: the base model with `reference` (None = no adapter).
pub fn reference_logps(model: &Model, reference: Option<&Adapter>, p: &TokenPair) -> Result<(f64, f64)> {
    let feats = match p.pixels {
        Some(px) => Some(model.image_features(px, reference)?),
        None => None,
    };
    let c = model.answer_logp(p.prompt_ids, p.chosen_ids, feats.as_ref(), reference)?;
    let r = model.answer_logp(p.prompt_ids, p.rejected_ids, feats.as_ref(), reference)?;
    Ok((c, r))
}

/// Turns an adapter's dropout off when dropped, whatever path leaves the training step.
pub(crate) struct DropoutGuard<'a>(pub &'a Adapter);

impl Drop for DropoutGuard<'_> {
    fn drop(&mut self) {
        self.0.set_dropout_seed(None);
    }
}

/// Seed of the dropout masks of part `k` (image, chosen, rejected, ...) of a training example.
pub(crate) fn part_seed(seed: Option<u64>, k: u64) -> Option<u64> {
    seed.map(|s| crate::rng::SplitMix64::new(s ^ k.wrapping_mul(0xD1B5_4A32_D192_ED03)).next_u64())
}

/// Forward and backward of one pair under the policy `adapter`, the loss scaled by `weight` (1 / batch size).
/// Returns the unscaled loss and the pair's log-probs; LoRA gradients accumulate into `grads`. With
/// `dropout_seed`, the adapter's LoRA dropout is applied with masks derived from it (the backward regenerates
/// them); without, no dropout.
#[allow(clippy::too_many_arguments)]
pub fn pair_forward_backward(
    model: &Model,
    adapter: &Adapter,
    p: &TokenPair,
    refs: (f64, f64),
    cfg: &DpoConfig,
    weight: f64,
    grads: &mut Grads,
    dropout_seed: Option<u64>,
) -> Result<(f64, PairLogps)> {
    if p.chosen_ids.is_empty() || p.rejected_ids.is_empty() {
        return Err(EngineError::Input("chosen and rejected answers must not be empty".into()));
    }
    let _guard = DropoutGuard(adapter);
    let (s_img, s_c, s_r) = (part_seed(dropout_seed, 0), part_seed(dropout_seed, 1), part_seed(dropout_seed, 2));
    adapter.set_dropout_seed(s_img);
    let img: Option<ImageTape> = match p.pixels {
        Some(px) => Some(model.image_forward(px, Some(adapter))?),
        None => None,
    };
    let feats = img.as_ref().map(|t| &t.features);
    // The pair's log-probs, loss and its derivatives w.r.t. the two policy log-probs; a non-finite loss is an error.
    let loss_of = |chosen: f64, rejected: f64| -> Result<(PairLogps, f64, f64, f64)> {
        let l =
            PairLogps { policy_chosen: chosen, policy_rejected: rejected, ref_chosen: refs.0, ref_rejected: refs.1 };
        let (loss, d_pc, d_pr) = pair_loss(cfg, &l, p.chosen_ids.len(), p.rejected_ids.len());
        if !loss.is_finite() {
            return Err(EngineError::Input(format!("the loss is {loss} (log-probs {l:?})")));
        }
        Ok((l, loss, d_pc, d_pr))
    };
    let (loss, l, d_feats) = if dropout_seed.is_none() {
        // The prompt (image rows included) runs once; both answers attend its keys and values (as on the GPU).
        let pt = model.forward_prompt(p.prompt_ids, feats, Some(adapter))?;
        let tc = model.forward_answer(&pt, p.chosen_ids, Some(adapter))?;
        let tr = model.forward_answer(&pt, p.rejected_ids, Some(adapter))?;
        let (l, loss, d_pc, d_pr) = loss_of(tc.logp_sum(), tr.logp_sum())?;
        let answers = [(&tc, (d_pc * weight) as f32), (&tr, (d_pr * weight) as f32)];
        let d_embeds = model.backward_shared(&pt, &answers, Some(adapter), Some(grads))?;
        (loss, l, img.as_ref().map(|_| pt.image_rows_grad(&d_embeds)))
    } else {
        // Each answer draws its own dropout masks, over its prompt's rows too: two whole sequences.
        adapter.set_dropout_seed(s_c);
        let sc = model.score_train(p.prompt_ids, p.chosen_ids, feats, Some(adapter))?;
        adapter.set_dropout_seed(s_r);
        let sr = model.score_train(p.prompt_ids, p.rejected_ids, feats, Some(adapter))?;
        let (l, loss, d_pc, d_pr) = loss_of(sc.logp_sum(), sr.logp_sum())?;
        adapter.set_dropout_seed(s_c);
        let d_embed_c = model.score_backward(&sc, (d_pc * weight) as f32, Some(adapter), Some(grads))?;
        adapter.set_dropout_seed(s_r);
        let d_embed_r = model.score_backward(&sr, (d_pr * weight) as f32, Some(adapter), Some(grads))?;
        let d_feats = img.as_ref().map(|_| {
            let mut d = sc.image_rows_grad(&d_embed_c);
            for (a, b) in d.iter_mut().zip(sr.image_rows_grad(&d_embed_r)) {
                *a += b;
            }
            d
        });
        (loss, l, d_feats)
    };
    if let (Some(t), Some(d)) = (&img, d_feats) {
        adapter.set_dropout_seed(s_img);
        model.image_backward(t, d, Some(adapter), Some(grads));
    }
    Ok((loss, l))
}

/// Mean DPO (sigmoid) loss over `pairs` and its gradient, accumulated into `grads` (which the caller zeroes).
/// The reference is the base model with the adapter disabled. This is `rlaifd grad`'s contract.
pub fn dpo_loss_and_grads(
    model: &Model,
    adapter: &Adapter,
    pairs: &[TokenPair],
    beta: f64,
    grads: &mut Grads,
) -> Result<(f64, Vec<PairLogps>)> {
    if pairs.is_empty() {
        return Err(EngineError::Input("no preference pairs".into()));
    }
    let cfg = DpoConfig { beta, ..Default::default() };
    let weight = 1.0 / pairs.len() as f64;
    let mut total = 0.0;
    let mut all = Vec::with_capacity(pairs.len());
    for (i, p) in pairs.iter().enumerate() {
        let refs = reference_logps(model, None, p).map_err(|e| EngineError::Input(format!("pair {i}: {e}")))?;
        let (loss, l) = pair_forward_backward(model, adapter, p, refs, &cfg, weight, grads, None)
            .map_err(|e| EngineError::Input(format!("pair {i}: {e}")))?;
        total += loss * weight;
        all.push(l);
    }
    Ok((total, all))
}
