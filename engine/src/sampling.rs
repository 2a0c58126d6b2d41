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

/// CTRL-style repetition penalty (as transformers): each token of `seen`, once, has its logit divided by
/// `penalty` when positive and multiplied by it when negative. 1.0 leaves the logits alone.
fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut done = std::collections::HashSet::new();
    for &t in seen {
        let t = t as usize;
        if t < logits.len() && done.insert(t) {
            let v = logits[t];
            logits[t] = if v < 0.0 { v * penalty } else { v / penalty };
        }
    }
}

/// Picks the next token. `seen` are the tokens the repetition penalty applies to (prompt + answer so far);
/// `logits` is modified.
pub fn sample(logits: &mut [f32], seen: &[u32], p: &SamplingParams, rng: &mut SplitMix64) -> u32 {
    apply_repetition_penalty(logits, seen, p.repetition_penalty);
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

/// e^x for x <= 0 in f32, about 1e-7 relative error; 0 below -87.3 (where f32 runs out of normal numbers), for
/// -inf and for NaN. Branch-free, so a loop over a slice vectorizes, unlike the libm call of `f32::exp`:
/// x = n ln 2 + r with |r| <= ln 2 / 2 (n rounded by the 1.5 * 2^23 trick), e^r by its Taylor polynomial to
/// degree 7 (error below 1e-8 there), times 2^n put into the exponent bits.
#[inline(always)]
// Comparisons, not f32::clamp/max/min (whose NaN rules cost the vectorized loop extra instructions).
#[allow(clippy::manual_clamp)]
pub fn exp_nonpositive_f32(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting it rounds to an integer
    let keep = x >= -87.3; // false for NaN
    let x = if x < -87.3 {
        -87.3
    } else if x > 0.0 {
        0.0
    } else {
        x
    };
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    // n as an integer: the low bits of t's mantissa (no float-to-int conversion).
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    // ln 2 in two parts, so n * LN2_HI is exact for |n| <= 128.
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let y = p * f32::from_bits(((ni + 127) as u32) << 23);
    if keep {
        y
    } else {
        0.0
    }
}

/// Tokens per block of `sample_fast`'s draw: the draw finds the block by the blocks' sums, then the token in it.
const DRAW_BLOCK: usize = 256;

/// `sample`'s distribution without its sort, for the GPU backend (where a host step per token is time the device
/// sits idle): with top_k and top_p off, the draw walks the probabilities in vocabulary order instead of a sort of
/// the vocabulary. The weights exp((logit - max) / T) are computed in f32 (`exp_nonpositive_f32`, vectorized;
/// about 1e-7 relative to the exact value) and summed in f64 per block of 256 tokens; the draw picks a block by
/// those sums, then the token in it. Each token keeps the same probability as under `sample` to within that
/// rounding, but a given draw can land on a different token, so the same seed gives other (equally likely)
/// answers than `sample`; still the same answers every time. With top_k or top_p on, temperature 0, or no finite
/// logit, it is `sample`.
pub fn sample_fast(logits: &mut [f32], seen: &[u32], p: &SamplingParams, rng: &mut SplitMix64) -> u32 {
    if p.temperature == 0.0 || p.top_k > 0 || p.top_p < 1.0 || logits.is_empty() {
        return sample(logits, seen, p, rng);
    }
    apply_repetition_penalty(logits, seen, p.repetition_penalty);
    // The largest logit, NaN ignored (8 running maxima: independent comparisons).
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut it = logits.chunks_exact(8);
    for c in &mut it {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = it.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    if !max.is_finite() {
        // The penalty is applied already.
        return sample(logits, &[], p, rng);
    }
    let inv_t = 1.0 / p.temperature;
    // The weight replaces the logit (f32 is plenty for a probability relative to the largest).
    for v in logits.iter_mut() {
        *v = exp_nonpositive_f32((*v - max) * inv_t);
    }
    let sums: Vec<f64> = logits
        .chunks(DRAW_BLOCK)
        .map(|b| {
            // Four running sums, so the additions need not wait on each other.
            let mut acc = [0.0f64; 4];
            let mut it = b.chunks_exact(4);
            for q in &mut it {
                for (a, &w) in acc.iter_mut().zip(q) {
                    *a += w as f64;
                }
            }
            let tail: f64 = it.remainder().iter().map(|&w| w as f64).sum();
            (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
        })
        .collect();
    let total: f64 = sums.iter().sum();
    let mut u = rng.next_f64() * total;
    // The block holding the draw (the last block with weight if rounding leaves u past the end), then the token:
    // past the block's end the last token with weight in it.
    let mut at = sums.iter().rposition(|&s| s > 0.0).unwrap_or(0);
    for (i, &s) in sums.iter().enumerate() {
        if u < s {
            at = i;
            break;
        }
        u -= s;
    }
    let base = at * DRAW_BLOCK;
    let mut last = base;
    for (i, &w) in logits[base..(base + DRAW_BLOCK).min(logits.len())].iter().enumerate() {
        let w = w as f64;
        if w > 0.0 {
            if u < w {
                return (base + i) as u32;
            }
            u -= w;
            last = base + i;
        }
    }
    last as u32
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

    #[test]
    fn exp_nonpositive_f32_is_within_2e7_of_the_exact_value() {
        // Every 1/1000 on [-87, 0], against f64 exp.
        let mut worst = 0.0f64;
        for i in 0..=87_000 {
            let x = -(i as f64) / 1000.0;
            let got = exp_nonpositive_f32(x as f32) as f64;
            let want = (x as f32 as f64).exp();
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2e-7, "worst relative error {worst:e}");
        assert_eq!(exp_nonpositive_f32(0.0), 1.0);
        // A masked (-inf) or broken (NaN) logit never gets drawn.
        for x in [-87.4f32, -1000.0, f32::NEG_INFINITY, f32::NAN] {
            assert_eq!(exp_nonpositive_f32(x), 0.0, "{x}");
        }
    }

    #[test]
    fn sample_fast_draws_each_token_with_its_softmax_probability() {
        // 8 tokens, temperature 0.7: 200000 draws; every frequency within 4 standard deviations of the softmax.
        let logits = [1.0f32, 0.5, -0.3, 2.0, 2.0, -5.0, 0.0, 1.5];
        let p = SamplingParams { temperature: 0.7, ..Default::default() };
        let w: Vec<f64> = logits.iter().map(|&l| ((l as f64 - 2.0) / 0.7).exp()).collect();
        let z: f64 = w.iter().sum();
        let mut rng = SplitMix64::new(11);
        let n = 200_000;
        let mut counts = [0usize; 8];
        for _ in 0..n {
            counts[sample_fast(&mut logits.clone(), &[], &p, &mut rng) as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let q = w[i] / z;
            let sd = (n as f64 * q * (1.0 - q)).sqrt();
            assert!(
                (c as f64 - n as f64 * q).abs() <= 4.0 * sd + 1.0,
                "token {i}: {c} draws, expected {:.0}",
                n as f64 * q
            );
        }
        // The repetition penalty applies as in `sample`: a penalised favourite is drawn less often.
        let pen = SamplingParams { temperature: 0.7, repetition_penalty: 3.0, ..Default::default() };
        let mut rng = SplitMix64::new(12);
        let hits = (0..20_000).filter(|_| sample_fast(&mut logits.clone(), &[3, 3], &pen, &mut rng) == 3).count();
        let wp: Vec<f64> =
            logits.iter().enumerate().map(|(i, &l)| if i == 3 { l as f64 / 3.0 } else { l as f64 }).collect();
        let mx = wp.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let zp: f64 = wp.iter().map(|&l| ((l - mx) / 0.7).exp()).sum();
        let q = ((wp[3] - mx) / 0.7).exp() / zp;
        assert!(
            (hits as f64 / 20_000.0 - q).abs() < 0.02,
            "penalised token drawn {hits} times of 20000, expected {q:.3}"
        );
        // Greedy, top-k and top-p are `sample` exactly; the same seed gives the same token.
        for q in [
            SamplingParams { temperature: 0.0, ..Default::default() },
            SamplingParams { temperature: 0.9, top_k: 3, ..Default::default() },
            SamplingParams { temperature: 0.9, top_p: 0.8, ..Default::default() },
        ] {
            for seed in 0..50 {
                let a = sample_fast(&mut logits.clone(), &[], &q, &mut SplitMix64::new(seed));
                let b = sample(&mut logits.clone(), &[], &q, &mut SplitMix64::new(seed));
                assert_eq!(a, b, "{q:?} seed {seed}");
            }
        }
        let again = |seed| sample_fast(&mut logits.clone(), &[], &p, &mut SplitMix64::new(seed));
        assert!((0..50).all(|s| again(s) == again(s)));
        // A vocabulary of several draw blocks (256 tokens each) with the mass in five tokens of different blocks,
        // the first and last among them, and the rest masked (-inf) or NaN: the five at their softmax
        // probabilities, never a masked or NaN one.
        let mut big = vec![f32::NEG_INFINITY; 2000];
        let live = [(0usize, 1.0f32), (300, 0.2), (777, 1.5), (1500, -0.5), (1999, 0.9)];
        for &(i, l) in &live {
            big[i] = l;
        }
        big[1000] = f32::NAN;
        let w: Vec<f64> = live.iter().map(|&(_, l)| ((l as f64 - 1.5) / 0.7).exp()).collect();
        let z: f64 = w.iter().sum();
        let mut rng = SplitMix64::new(13);
        let n = 100_000;
        let mut counts = std::collections::HashMap::new();
        for _ in 0..n {
            *counts.entry(sample_fast(&mut big.clone(), &[], &p, &mut rng) as usize).or_insert(0usize) += 1;
        }
        assert!(counts.keys().all(|t| live.iter().any(|&(i, _)| i == *t)), "drew a masked or NaN token: {counts:?}");
        for (k, &(i, _)) in live.iter().enumerate() {
            let (c, q) = (counts.get(&i).copied().unwrap_or(0), w[k] / z);
            let sd = (n as f64 * q * (1.0 - q)).sqrt();
            assert!(
                (c as f64 - n as f64 * q).abs() <= 4.0 * sd + 1.0,
                "token {i}: {c} draws, expected {:.0}",
                n as f64 * q
            );
        }
    }
}
