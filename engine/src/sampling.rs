//! Next-token choice from logits: repetition penalty, temperature, top-k, top-p (in transformers' order),
//! then a draw with the answer's own generator; temperature 0 is greedy.

use crate::rng::SplitMix64;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 1.0 = off.
    pub top_p: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off; > 1 discourages tokens already in the prompt or the answer (CTRL-style, as transformers).
    pub repetition_penalty: f32,
    pub max_new_tokens: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 0, repetition_penalty: 1.0, max_new_tokens: 512 }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature must be >= 0 (got {})", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1] (got {})", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!("repetition_penalty must be > 0 (got {})", self.repetition_penalty));
        }
        Ok(())
    }
}

/// Index of the largest logit (first one on ties, like torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Token ids ordered by logit, descending, ties in index order (the order of a stable sort by `f32::total_cmp`),
/// computed as one unstable sort of u64 keys (logit's total-order bits inverted, then the index): several times
/// faster than sorting indices through the logits, which matters when n answers sample each step.
pub fn sorted_desc(logits: &[f32]) -> Vec<u32> {
    let mut keys: Vec<u64> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            // f32::total_cmp's key: flip the magnitude bits of negatives, compare as i32; as u32 with the sign bit
            // flipped; inverted for descending order.
            let b = v.to_bits() as i32;
            let k = (b ^ ((((b >> 31) as u32) >> 1) as i32)) as u32 ^ 0x8000_0000;
            ((!k as u64) << 32) | i as u64
        })
        .collect();
    keys.sort_unstable();
    keys.into_iter().map(|k| k as u32).collect()
}

/// Picks the next token. `seen` are the tokens the repetition penalty applies to (prompt + answer so far);
/// `logits` is modified.
pub fn sample(logits: &mut [f32], seen: &[u32], p: &SamplingParams, rng: &mut SplitMix64) -> u32 {
    if p.repetition_penalty != 1.0 {
        let mut done = std::collections::HashSet::new();
        for &t in seen {
            let t = t as usize;
            if t < logits.len() && done.insert(t) {
                let v = logits[t];
                logits[t] = if v < 0.0 { v * p.repetition_penalty } else { v / p.repetition_penalty };
            }
        }
    }
    if p.temperature == 0.0 {
        return argmax(logits);
    }
    let mut idx = sorted_desc(logits);
    if p.top_k > 0 && p.top_k < idx.len() {
        idx.truncate(p.top_k);
    }
    let inv_t = 1.0 / p.temperature as f64;
    let max = logits[idx[0] as usize] as f64;
    let mut probs: Vec<f64> = idx.iter().map(|&i| ((logits[i as usize] as f64 - max) * inv_t).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= total);
    if p.top_p < 1.0 {
        // Keep the smallest prefix whose mass reaches top_p (at least one token).
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, q) in probs.iter().enumerate() {
            cum += q;
            if cum >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.next_f64() * total;
    for (i, q) in probs.iter().enumerate() {
        if u < *q {
            return idx[i];
        }
        u -= q;
    }
    idx[probs.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_desc_is_the_stable_descending_total_order() {
        let mut rng = SplitMix64::new(9);
        // Ties (values on a coarse grid), signed zeros, infinities, a NaN: the order must be exactly the stable
        // sort by total_cmp the sampler always used, or sampled answers would change.
        let mut logits: Vec<f32> = (0..5000).map(|_| ((rng.next_f64() * 40.0 - 20.0).round() / 4.0) as f32).collect();
        logits[7] = -0.0;
        logits[8] = 0.0;
        logits[9] = f32::INFINITY;
        logits[10] = f32::NEG_INFINITY;
        logits[11] = f32::NAN;
        logits[12] = f32::MAX;
        logits[13] = -f32::MIN_POSITIVE;
        let mut want: Vec<u32> = (0..logits.len() as u32).collect();
        want.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        assert_eq!(sorted_desc(&logits), want);
    }
}
