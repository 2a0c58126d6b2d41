//! Throughput of the model's matmul shapes: packed kernel (f32 and bf16 panels) vs the `gemm` crate, cold
//! weights (12 layers' worth), median of 7.
//!   cargo run --release -p engine --example matmul_shapes
use engine::ops::{matmul_nt, MatmulMode, PackedMatrix};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    for &m in &[229usize, 1, 8] {
        for &(k, n) in &[(768usize, 768usize), (768, 2048), (2048, 768), (512, 2048)] {
            let layers = 12;
            let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
            let ws: Vec<Vec<f32>> =
                (0..layers).map(|l| (0..n * k).map(|i| ((i + l) % 5) as f32 * 0.1).collect()).collect();
            let ps: Vec<PackedMatrix> = ws.iter().map(|w| PackedMatrix::from_f32(w, n, k)).collect();
            let bs: Vec<PackedMatrix> = ws
                .iter()
                .map(|w| PackedMatrix::from_bf16(&w.iter().map(|&v| half::bf16::from_f32(v)).collect::<Vec<_>>(), n, k))
                .collect();
            let mut y = vec![0f32; m * n];
            let flops = 2.0 * (m * n * k * layers) as f64;
            let mut t_gemm = vec![];
            let mut t_packed = vec![];
            let mut t_bf16 = vec![];
            for _ in 0..7 {
                let t = Instant::now();
                for w in &ws {
                    matmul_nt(&mut y, &x, w, m, k, n, MatmulMode::Assign);
                }
                t_gemm.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                for p in &ps {
                    p.matmul(&mut y, &x, m, MatmulMode::Assign);
                }
                t_packed.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                for p in &bs {
                    p.matmul(&mut y, &x, m, MatmulMode::Assign);
                }
                t_bf16.push(t.elapsed().as_secs_f64());
            }
            let (g, p, b) = (median(t_gemm), median(t_packed), median(t_bf16));
            let bytes = (n * k * layers * 4) as f64;
            println!(
                "m {m:>3} k {k:>4} n {n:>4}: gemm crate {:6.1} GFLOPS {:5.1} GB/s | packed f32 {:6.1} GFLOPS {:5.1} GB/s | packed bf16 {:6.1} GFLOPS {:5.1} GB/s(f32-eq)",
                flops / g / 1e9, bytes / g / 1e9, flops / p / 1e9, bytes / p / 1e9, flops / b / 1e9, bytes / b / 1e9
            );
        }
    }
}
