//! Host sampling time per row (what each decode step spends per answer on the host): `sampling::sample` (the CPU
//! backend's: sorts the vocabulary) against `sampling::sample_fast` (the GPU backend's: one pass in vocabulary
//! order), side by side in one run, temperature 0.7, no top-k/top-p, one thread.
//! `cargo run --release -p engine --example sampling_bench [VOCAB] [ROWS]` (default 32000 and 1000).

use engine::rng::SplitMix64;
use engine::sampling::{sample, sample_fast, SamplingParams};
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (vocab, rows) = (args.first().copied().unwrap_or(32000), args.get(1).copied().unwrap_or(1000));
    let mut rng = SplitMix64::new(1);
    // Logits like a language model's: roughly normal with scale 3, plus a few strong candidates.
    let data: Vec<Vec<f32>> = (0..rows)
        .map(|_| {
            (0..vocab)
                .map(|j| {
                    ((0..4).map(|_| rng.next_f64() - 0.5).sum::<f64>() * 3.0 + if j % 997 == 0 { 8.0 } else { 0.0 })
                        as f32
                })
                .collect()
        })
        .collect();
    let p = SamplingParams { temperature: 0.7, ..Default::default() };
    let median = |f: &dyn Fn(&mut [f32], &mut SplitMix64) -> u32| -> f64 {
        let mut times: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                for (i, l) in data.iter().enumerate() {
                    std::hint::black_box(f(&mut l.clone(), &mut SplitMix64::new(i as u64)));
                }
                t.elapsed().as_secs_f64() * 1e3 / rows as f64
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[2]
    };
    let slow = median(&|l, r| sample(l, &[], &p, r));
    let fast = median(&|l, r| sample_fast(l, &[], &p, r));
    println!(
        "vocab {vocab}, {rows} rows, median of 5 runs: sample {slow:.3} ms/row, sample_fast {fast:.3} ms/row ({:.1}x)",
        slow / fast
    );
}
