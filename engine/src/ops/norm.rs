//! RMSNorm (LLaMA) and LayerNorm (CLIP), row-wise, computed in f32 with f64 accumulation.

use rayon::prelude::*;

const PAR_ROWS: usize = 16;

/// out (rows, dim) = x / sqrt(mean(x^2) + eps) * weight
pub fn rmsnorm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f64) {
    let dim = weight.len();
    let row = |(o, xr): (&mut [f32], &[f32])| {
        let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let inv = (1.0 / (ss / dim as f64 + eps).sqrt()) as f32;
        for ((o, &v), &w) in o.iter_mut().zip(xr).zip(weight) {
            *o = w * (v * inv);
        }
    };
    if x.len() / dim >= PAR_ROWS {
        out.par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(row);
    } else {
        out.chunks_mut(dim).zip(x.chunks(dim)).for_each(row);
    }
}

/// out (rows, dim) = (x - mean) / sqrt(var + eps) * weight + bias   (biased variance, like torch)
pub fn layernorm(out: &mut [f32], x: &[f32], weight: &[f32], bias: &[f32], eps: f64) {
    let dim = weight.len();
    let row = |(o, xr): (&mut [f32], &[f32])| {
        let mean: f64 = xr.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
        let var: f64 = xr.iter().map(|&v| (v as f64 - mean) * (v as f64 - mean)).sum::<f64>() / dim as f64;
        let inv = 1.0 / (var + eps).sqrt();
        for (((o, &v), &w), &b) in o.iter_mut().zip(xr).zip(weight).zip(bias) {
            *o = (((v as f64 - mean) * inv) as f32) * w + b;
        }
    };
    if x.len() / dim >= PAR_ROWS {
        out.par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(row);
    } else {
        out.chunks_mut(dim).zip(x.chunks(dim)).for_each(row);
    }
}
