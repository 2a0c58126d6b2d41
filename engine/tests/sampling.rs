//! Sampling rules users rely on: greedy is argmax, top-k/top-p never pick outside their set, the same seed
//! replays the same draw, and the draw follows the softmax distribution.

use engine::rng::SplitMix64;
use engine::sampling::{sample, SamplingParams};

fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
    SamplingParams { temperature, top_k, top_p, repetition_penalty: 1.0, max_new_tokens: 1 }
}

#[test]
fn greedy_is_argmax_first_on_ties() {
    let mut rng = SplitMix64::new(0);
    let mut l = vec![0.5, 2.0, -1.0, 2.0];
    assert_eq!(sample(&mut l, &[], &params(0.0, 0, 1.0), &mut rng), 1);
}

#[test]
fn top_k_and_top_p_restrict_the_candidates() {
    let logits: Vec<f32> = vec![3.0, 2.9, 0.0, -1.0, 2.8, -5.0];
    let mut seen = std::collections::HashSet::new();
    for seed in 0..2000 {
        let mut rng = SplitMix64::new(seed);
        let mut l = logits.clone();
        seen.insert(sample(&mut l, &[], &params(1.0, 2, 1.0), &mut rng));
    }
    assert_eq!(seen, [0u32, 1].into_iter().collect());
    // probs ~ [0.37, 0.33, 0.02, 0.007, 0.30, 0.0002]: top_p 0.6 keeps tokens 0 and 1 only.
    let mut seen = std::collections::HashSet::new();
    for seed in 0..2000 {
        let mut rng = SplitMix64::new(seed);
        let mut l = logits.clone();
        seen.insert(sample(&mut l, &[], &params(1.0, 0, 0.6), &mut rng));
    }
    assert_eq!(seen, [0u32, 1].into_iter().collect());
}

#[test]
fn draws_follow_softmax_with_temperature() {
    let logits: Vec<f32> = vec![1.0, 0.0, -1.0];
    let t = 0.7f64;
    let z: f64 = logits.iter().map(|&v| (v as f64 / t).exp()).sum();
    let expect: Vec<f64> = logits.iter().map(|&v| (v as f64 / t).exp() / z).collect();
    let mut counts = [0usize; 3];
    let trials = 20000;
    let mut rng = SplitMix64::new(42);
    for _ in 0..trials {
        let mut l = logits.clone();
        counts[sample(&mut l, &[], &params(0.7, 0, 1.0), &mut rng) as usize] += 1;
    }
    for i in 0..3 {
        let freq = counts[i] as f64 / trials as f64;
        // 5 standard deviations of a binomial proportion.
        let sd = (expect[i] * (1.0 - expect[i]) / trials as f64).sqrt();
        assert!((freq - expect[i]).abs() < 5.0 * sd, "token {i}: {freq} vs {}", expect[i]);
    }
}

#[test]
fn same_seed_same_draws_and_repetition_penalty_applies() {
    let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
    let run = |seed| {
        let mut rng = SplitMix64::new(seed);
        (0..20).map(|_| sample(&mut logits.clone(), &[], &params(1.0, 0, 0.9), &mut rng)).collect::<Vec<_>>()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
    // Penalty 2 halves the positive logit of a seen token: greedy moves away from it.
    let mut l = vec![1.0, 0.9, -3.0];
    let p = SamplingParams { repetition_penalty: 2.0, ..params(0.0, 0, 1.0) };
    assert_eq!(sample(&mut l, &[0], &p, &mut SplitMix64::new(0)), 1);
    assert_eq!(l[0], 0.5);
    let mut l = vec![-1.0, -1.5, -3.0];
    sample(&mut l, &[0], &p, &mut SplitMix64::new(0));
    assert_eq!(l[0], -2.0, "negative logits are multiplied by the penalty");
}
