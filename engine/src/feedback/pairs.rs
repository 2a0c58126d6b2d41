//! RLAIF-V's scoring and pairing: score = −(rejected claims); within a prompt every pair whose scores differ by
//! at least 1 is a candidate (higher score = chosen), at most k per prompt are drawn with a recorded seed, and
//! length balancing drops pairs whose chosen answer is much shorter than the rejected one.

use crate::rng::SplitMix64;

/// −(number of rejected claims), or None for an answer with no claims (never paired: nothing was checked).
pub fn score(accepted: &[bool]) -> Option<i64> {
    if accepted.is_empty() {
        None
    } else {
        Some(-(accepted.iter().filter(|a| !**a).count() as i64))
    }
}

/// Every (chosen, rejected) index pair of one prompt's answers whose scores differ by >= 1, in a fixed order
/// (chosen index, then rejected index). Answers without a score are skipped; a pair whose two texts are
/// identical after trimming is dropped, and so is a second pair with the same two texts.
pub fn candidate_pairs(texts: &[&str], scores: &[Option<i64>]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, si) in scores.iter().enumerate() {
        for (j, sj) in scores.iter().enumerate() {
            let (Some(a), Some(b)) = (si, sj) else { continue };
            if a - b < 1 || texts[i].trim() == texts[j].trim() {
                continue;
            }
            if out.iter().any(|&(c, r)| texts[c].trim() == texts[i].trim() && texts[r].trim() == texts[j].trim()) {
                continue;
            }
            out.push((i, j));
        }
    }
    out
}

/// The candidate pairs whose chosen answer has at least as many accepted claims (`accepted[i]` for answer i) as
/// the rejected one (`PairRule::KeepAccepted`): a pair never prefers an answer for saying less.
pub fn keep_accepted(candidates: &[(usize, usize)], accepted: &[usize]) -> Vec<(usize, usize)> {
    candidates.iter().copied().filter(|&(c, r)| accepted[c] >= accepted[r]).collect()
}

/// At most `k` of `candidates`, drawn without replacement by `seed` (the same seed gives the same pairs), in
/// their candidate order.
pub fn pick_pairs(candidates: &[(usize, usize)], k: usize, seed: u64) -> Vec<(usize, usize)> {
    if candidates.len() <= k {
        return candidates.to_vec();
    }
    let mut rng = SplitMix64::new(seed);
    let mut idx: Vec<usize> = (0..candidates.len()).collect();
    // Partial Fisher-Yates: the first k slots.
    for i in 0..k {
        let j = i + (rng.next_u64() % (idx.len() - i) as u64) as usize;
        idx.swap(i, j);
    }
    let mut picked: Vec<usize> = idx[..k].to_vec();
    picked.sort_unstable();
    picked.into_iter().map(|i| candidates[i]).collect()
}

/// The outcome of length balancing.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LengthBalance {
    /// The cut-off: a pair is dropped when rejected_len − chosen_len > r · rejected_len.
    pub r: f64,
    /// Which pairs are kept.
    pub keep: Vec<bool>,
    pub mean_chosen_before: f64,
    pub mean_rejected_before: f64,
    pub mean_chosen_after: f64,
    pub mean_rejected_after: f64,
}

/// Picks r on the grid 0, 0.02, ..., 0.98 that makes the mean chosen and rejected lengths of the kept pairs
/// closest (ties: the larger r, which keeps more pairs); cut-offs that keep nothing are not considered.
/// `lens` are (chosen, rejected) lengths, e.g. in words.
pub fn length_balance(lens: &[(usize, usize)]) -> LengthBalance {
    let mean = |v: &[(usize, usize)], keep: &[bool]| -> (f64, f64) {
        let kept: Vec<&(usize, usize)> = v.iter().zip(keep).filter(|(_, k)| **k).map(|(p, _)| p).collect();
        if kept.is_empty() {
            return (0.0, 0.0);
        }
        let n = kept.len() as f64;
        (kept.iter().map(|p| p.0 as f64).sum::<f64>() / n, kept.iter().map(|p| p.1 as f64).sum::<f64>() / n)
    };
    let all = vec![true; lens.len()];
    let (cb, rb) = mean(lens, &all);
    let mut best: Option<(f64, f64, Vec<bool>)> = None;
    for step in 0..50 {
        let r = step as f64 * 0.02;
        let keep: Vec<bool> = lens.iter().map(|&(c, rej)| (rej as f64 - c as f64) <= r * rej as f64).collect();
        if !keep.iter().any(|k| *k) {
            continue;
        }
        let (c, rej) = mean(lens, &keep);
        let gap = (c - rej).abs();
        // Later r wins ties (<=): it keeps at least as many pairs.
        if best.as_ref().is_none_or(|(g, _, _)| gap <= *g + 1e-12) {
            best = Some((gap, r, keep));
        }
    }
    let (r, keep) = match best {
        Some((_, r, keep)) => (r, keep),
        None => (0.98, all),
    };
    let (ca, ra) = mean(lens, &keep);
    LengthBalance {
        r,
        keep,
        mean_chosen_before: cb,
        mean_rejected_before: rb,
        mean_chosen_after: ca,
        mean_rejected_after: ra,
    }
}
