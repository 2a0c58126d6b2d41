//! Scaled dot-product attention over key/value segments (prompt prefix shared by many answers, plus each
//! answer's own suffix), with GQA/MQA by head grouping.

use rayon::prelude::*;

/// Dot product with 16 independent partial sums (vectorizes; fixed order, so results are reproducible).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Which keys a query sees. Query row i of a block starting at position `start` sits at position start + i.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mask {
    /// Every key (vision towers).
    Full,
    /// Keys at positions up to the query's own.
    Causal,
    /// Causal, and only the last `w` positions (the query's own included): Mistral's and Qwen2's sliding window,
    /// transformers' `kv_idx > q_idx - sliding_window`.
    Window(usize),
}

impl Mask {
    /// The causal mask of a decoder layer with an optional sliding window.
    pub fn causal(window: Option<usize>) -> Mask {
        window.map_or(Mask::Causal, Mask::Window)
    }

    /// The key positions `lo..hi` a query at position `pos` sees among `tk` keys.
    #[inline]
    pub fn visible(self, pos: usize, tk: usize) -> std::ops::Range<usize> {
        match self {
            Mask::Full => 0..tk,
            Mask::Causal => 0..(pos + 1).min(tk),
            Mask::Window(w) => {
                let hi = (pos + 1).min(tk);
                (pos + 1).saturating_sub(w).min(hi)..hi
            }
        }
    }
}

/// A run of cached positions: k and v are (len, kv_heads, head_dim).
#[derive(Clone, Copy)]
pub struct KvSegment<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub len: usize,
}

/// For each query row r: out[r] (heads, hd) = softmax(q[r] · Kᵀ · scale) · V over the first `visible(r)`
/// positions of the concatenated segments `segments(r)` (the query is the last of them), or with a sliding
/// `window` over the last `window` of those.
#[allow(clippy::too_many_arguments)]
pub fn attend_rows<'a, S>(
    out: &mut [f32],
    q: &[f32],
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
    window: Option<usize>,
    segments: S,
) where
    S: Fn(usize) -> (Vec<KvSegment<'a>>, usize) + Sync,
{
    let width = heads * head_dim;
    let group = heads / kv_heads;
    out.par_chunks_mut(width).zip(q.par_chunks(width)).enumerate().for_each(|(r, (o, qr))| {
        let (segs, visible) = segments(r);
        let first = window.map_or(0, |w| visible.saturating_sub(w));
        let mut scores = vec![0f32; visible];
        for h in 0..heads {
            let kvh = h / group;
            let qh = &qr[h * head_dim..(h + 1) * head_dim];
            // scores over the visible positions, segment by segment (those before the window are never read)
            let mut p = 0;
            for s in &segs {
                let n = s.len.min(visible - p);
                for t in first.saturating_sub(p).min(n)..n {
                    let off = (t * kv_heads + kvh) * head_dim;
                    scores[p + t] = dot(qh, &s.k[off..off + head_dim]) * scale;
                }
                p += n;
                if p == visible {
                    break;
                }
            }
            let max = scores[first..].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in scores[first..].iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            let oh = &mut o[h * head_dim..(h + 1) * head_dim];
            oh.fill(0.0);
            let mut p = 0;
            for s in &segs {
                let n = s.len.min(visible - p);
                for t in first.saturating_sub(p).min(n)..n {
                    let off = (t * kv_heads + kvh) * head_dim;
                    let wgt = scores[p + t] * inv;
                    for (a, &b) in oh.iter_mut().zip(&s.v[off..off + head_dim]) {
                        *a += wgt * b;
                    }
                }
                p += n;
                if p == visible {
                    break;
                }
            }
        }
    });
}

/// P (tq, tk) = softmax(scale · Q_h · K_kvhᵀ) of one query head (masked entries are 0).
/// Shared by `attend_dense` and its backward, which recomputes P exactly this way.
#[allow(clippy::too_many_arguments)]
pub(crate) fn head_probs(
    p: &mut [f32],
    q: &[f32],
    k: &[f32],
    h: usize,
    kvh: usize,
    tq: usize,
    tk: usize,
    start: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    scale: f32,
    mask: Mask,
) {
    assert!(
        p.len() == tq * tk
            && q.len() >= tq * heads * hd
            && k.len() >= tk * kv_heads * hd
            && h < heads
            && kvh < kv_heads
    );
    // SAFETY: strides address q's head-h columns and k's head-kvh columns within the asserted extents.
    unsafe {
        gemm::gemm(
            tq,
            tk,
            hd,
            p.as_mut_ptr(),
            1,
            tk as isize,
            false,
            q.as_ptr().add(h * hd),
            1,
            (heads * hd) as isize,
            k.as_ptr().add(kvh * hd),
            (kv_heads * hd) as isize,
            1,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    for (i, row) in p.chunks_exact_mut(tk).enumerate() {
        let seen = mask.visible(start + i, tk);
        let max = row[seen.clone()].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for x in row[seen.clone()].iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        row[seen.clone()].iter_mut().for_each(|x| *x *= inv);
        row[..seen.start].fill(0.0);
        row[seen.end..].fill(0.0);
    }
}

/// Raw output pointer shared by the per-head tasks; each task writes only its own head's columns.
struct SharedOut(*mut f32);
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// Many queries at once (prefill, vision tower): per head, S = Q·Kᵀ and O = P·V as GEMMs, heads in parallel.
/// q: (Tq, H, hd) at positions `start ..`; k, v: (Tk, KVH, hd) at positions 0 .. Tk, Tk = start + Tq when
/// causal or windowed. out: (Tq, H, hd).
#[allow(clippy::too_many_arguments)]
pub fn attend_dense(
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    tq: usize,
    tk: usize,
    start: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
    mask: Mask,
) {
    let (hd, group) = (head_dim, heads / kv_heads);
    assert_eq!(q.len(), tq * heads * hd);
    assert_eq!(out.len(), tq * heads * hd);
    assert!(k.len() >= tk * kv_heads * hd && v.len() >= tk * kv_heads * hd);
    let out_ptr = SharedOut(out.as_mut_ptr());
    let out_ref = &out_ptr;
    (0..heads).into_par_iter().for_each(|h| {
        let kvh = h / group;
        let mut s = vec![0f32; tq * tk]; // (Tq, Tk)
        head_probs(&mut s, q, k, h, kvh, tq, tk, start, heads, kv_heads, hd, scale, mask);
        // SAFETY: v's head-kvh columns lie within the asserted extents; `out` columns of head h are written by
        // this task only.
        unsafe {
            gemm::gemm(
                tq,
                hd,
                tk,
                out_ref.0.add(h * hd),
                1,
                (heads * hd) as isize,
                false,
                s.as_ptr(),
                1,
                tk as isize,
                v.as_ptr().add(kvh * hd),
                1,
                (kv_heads * hd) as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
}
