use std::time::Instant;
fn main() {
    let (m, k, n) = (229usize, 768usize, 2048usize);
    let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut y = vec![0f32; m * n];
    for orient in 0..2 {
        let mut best = f64::MAX;
        for _ in 0..20 {
            let t = Instant::now();
            unsafe {
                if orient == 0 {
                    gemm::gemm(m, n, k, y.as_mut_ptr(), 1, n as isize, false, x.as_ptr(), 1, k as isize, w.as_ptr(), k as isize, 1, 1.0, 1.0, false, false, false, gemm::Parallelism::Rayon(0));
                } else {
                    gemm::gemm(n, m, k, y.as_mut_ptr(), n as isize, 1, false, w.as_ptr(), 1, k as isize, x.as_ptr(), k as isize, 1, 1.0, 1.0, false, false, false, gemm::Parallelism::Rayon(0));
                }
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("orient {orient}: {:.1} GFLOPS", 2.0 * (m * n * k) as f64 / best / 1e9);
    }
}
