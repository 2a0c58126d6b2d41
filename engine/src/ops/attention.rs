//! Scaled dot-product attention over key/value segments (prompt prefix shared by many answers, plus each
//! answer's own suffix), with GQA/MQA by head grouping.

use super::matmul::dot;
use rayon::prelude::*;

/// A run of cached positions: k and v are (len, kv_heads, head_dim).
#[derive(Clone, Copy)]
pub struct KvSegment<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub len: usize,
}

/// For each query row r: out[r] (heads, hd) = softmax(q[r] · Kᵀ · scale) · V over the first `visible(r)`
/// positions of the concatenated segments `segments(r)`.
pub fn attend_rows<'a, S>(out: &mut [f32], q: &[f32], heads: usize, kv_heads: usize, head_dim: usize, scale: f32, segments: S)
where
    S: Fn(usize) -> (Vec<KvSegment<'a>>, usize) + Sync,
{
    let width = heads * head_dim;
    let group = heads / kv_heads;
    out.par_chunks_mut(width).zip(q.par_chunks(width)).enumerate().for_each(|(r, (o, qr))| {
        let (segs, visible) = segments(r);
        let mut scores = vec![0f32; visible];
        for h in 0..heads {
            let kvh = h / group;
            let qh = &qr[h * head_dim..(h + 1) * head_dim];
            // scores over all visible positions, segment by segment
            let mut p = 0;
            for s in &segs {
                for t in 0..s.len.min(visible - p) {
                    let off = (t * kv_heads + kvh) * head_dim;
                    scores[p + t] = dot(qh, &s.k[off..off + head_dim]) * scale;
                }
                p += s.len.min(visible - p);
                if p == visible {
                    break;
                }
            }
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            let oh = &mut o[h * head_dim..(h + 1) * head_dim];
            oh.fill(0.0);
            let mut p = 0;
            for s in &segs {
                for t in 0..s.len.min(visible - p) {
                    let off = (t * kv_heads + kvh) * head_dim;
                    let wgt = scores[p + t] * inv;
                    for (a, &b) in oh.iter_mut().zip(&s.v[off..off + head_dim]) {
                        *a += wgt * b;
                    }
                }
                p += s.len.min(visible - p);
                if p == visible {
                    break;
                }
            }
        }
    });
}
