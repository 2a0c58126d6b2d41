//! Row-wise log-softmax.

use rayon::prelude::*;

/// x (rows, n) = log_softmax(x) along each row, in place.
pub fn log_softmax_rows(x: &mut [f32], n: usize) {
    x.par_chunks_mut(n).for_each(|row| {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
        let lse = max as f64 + sum.ln();
        for v in row.iter_mut() {
            *v = (*v as f64 - lse) as f32;
        }
    });
}
