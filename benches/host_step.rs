//! The host's share of one GPU decode step of a 32064-token vocabulary, the time the GPU waits between two steps
//! when the logits come to the host: widening the fp16 row to f32 one value at a time (`f16::to_f32`, what
//! `Gpu::download_f16` did) and as a slice (`convert_to_f32_slice`, what it does), the greedy scan
//! (`sampling::argmax`, which `GpuLlama::decode_step_greedy` moves to the device), and a temperature draw (T 0.7)
//! by `sampling::sample_fast` beside the draw it replaced (an f64 `exp` per token and one running sum, kept here
//! as the baseline). Median of 7 runs of 200 rows each, in microseconds per row.
//!
//!     cargo bench -p engine --bench host_step

use engine::rng::SplitMix64;
use engine::sampling::{argmax, sample_fast, SamplingParams};
use half::f16;
use half::slice::HalfFloatSliceExt;
use std::hint::black_box;

const VOCAB: usize = 32064;
const ROWS: usize = 200;

fn median_us(mut f: impl FnMut()) -> f64 {
    f();
    let mut runs: Vec<f64> = (0..7)
        .map(|_| {
            let t = std::time::Instant::now();
            for _ in 0..ROWS {
                f();
            }
            t.elapsed().as_secs_f64() * 1e6 / ROWS as f64
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[3]
}

/// The temperature draw `sample_fast` made before (0dba739), without the repetition penalty: the baseline.
fn draw_f64(logits: &mut [f32], temperature: f32, rng: &mut SplitMix64) -> u32 {
    let inv_t = 1.0 / temperature as f64;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut total = 0.0f64;
    for v in logits.iter_mut() {
        let w = ((*v as f64 - max) * inv_t).exp();
        total += w;
        *v = w as f32;
    }
    let mut u = rng.next_f64() * total;
    let mut last = 0;
    for (i, &w) in logits.iter().enumerate() {
        let w = w as f64;
        if w > 0.0 {
            if u < w {
                return i as u32;
            }
            u -= w;
            last = i;
        }
    }
    last as u32
}

fn main() {
    let mut rng = SplitMix64::new(1);
    let row: Vec<f16> = (0..VOCAB).map(|_| f16::from_f32((rng.next_f64() * 20.0 - 10.0) as f32)).collect();
    let per_value = median_us(|| {
        let v: Vec<f32> = black_box(&row).iter().copied().map(f16::to_f32).collect();
        black_box(v);
    });
    let slice = median_us(|| {
        let mut v = vec![0.0f32; VOCAB];
        black_box(&row).convert_to_f32_slice(&mut v);
        black_box(v);
    });
    let mut wide = vec![0.0f32; VOCAB];
    row.convert_to_f32_slice(&mut wide);
    let scan = median_us(|| {
        black_box(argmax(black_box(&wide)));
    });
    let p = SamplingParams { temperature: 0.7, ..Default::default() };
    let mut draw_rng = SplitMix64::new(2);
    let draw = median_us(|| {
        let mut r = wide.clone();
        black_box(sample_fast(&mut r, &[], &p, &mut draw_rng));
    });
    let mut base_rng = SplitMix64::new(2);
    let baseline = median_us(|| {
        let mut r = wide.clone();
        black_box(draw_f64(&mut r, 0.7, &mut base_rng));
    });
    println!("host share of a decode step, vocabulary {VOCAB}, us per row (median of 7 runs of {ROWS} rows):");
    println!("  widen fp16 -> f32, one value at a time  {per_value:8.1}");
    println!("  widen fp16 -> f32, as a slice          {slice:8.1}");
    println!("  greedy scan (sampling::argmax)          {scan:8.1}");
    println!("  temperature draw, T 0.7: sample_fast    {draw:8.1}");
    println!("  the same, f64 exp per token (0dba739)   {baseline:8.1}");
}
