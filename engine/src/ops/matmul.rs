//! y (m, n) = x (m, k) · wᵀ with w (n, k) row-major, the layout of `torch.nn.Linear.weight`.
//!
//! Two paths: the `gemm` crate (AVX-512/AVX2 kernels, rayon) for m above `SKINNY_MAX_ROWS`, and a
//! memory-bound "skinny" kernel for decode steps (m = number of answers in flight), which streams each weight
//! row once and dots it with every input row while the row is hot in L1.

use rayon::prelude::*;

/// Rows of x up to which the skinny kernel is used.
pub const SKINNY_MAX_ROWS: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulMode {
    /// y = x · wᵀ
    Assign,
    /// y += x · wᵀ
    Accumulate,
}

pub fn matmul_nt(y: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize, mode: MatmulMode) {
    assert_eq!(x.len(), m * k, "matmul_nt: x is not (m, k)");
    assert_eq!(w.len(), n * k, "matmul_nt: w is not (n, k)");
    assert_eq!(y.len(), m * n, "matmul_nt: y is not (m, n)");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if mode == MatmulMode::Assign {
            y.fill(0.0);
        }
        return;
    }
    if m <= SKINNY_MAX_ROWS {
        skinny(y, x, w, m, k, n, mode);
    } else {
        // SAFETY: the asserts above pin every extent; strides describe row-major x, y and transposed w.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                y.as_mut_ptr(),
                1,
                n as isize,
                mode == MatmulMode::Accumulate,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
        }
    }
}

/// Weight rows per rayon task in the skinny kernel.
const SKINNY_BLOCK: usize = 64;

fn skinny(y: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize, mode: MatmulMode) {
    let kernel = pick_kernel();
    // Each task computes a block of output columns for all m rows into (block, m) scratch, so tasks never
    // write to the same cache lines; results are scattered into y afterwards.
    let mut yt = vec![0f32; n * m]; // (n, m)
    yt.par_chunks_mut(SKINNY_BLOCK * m).zip(w.par_chunks(SKINNY_BLOCK * k)).for_each(|(out, wb)| kernel(out, x, wb, m, k));
    for i in 0..m {
        let yr = &mut y[i * n..(i + 1) * n];
        match mode {
            MatmulMode::Assign => yr.iter_mut().enumerate().for_each(|(j, v)| *v = yt[j * m + i]),
            MatmulMode::Accumulate => yr.iter_mut().enumerate().for_each(|(j, v)| *v += yt[j * m + i]),
        }
    }
}

type SkinnyFn = fn(&mut [f32], &[f32], &[f32], usize, usize);

fn pick_kernel() -> SkinnyFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return |o, x, w, m, k| unsafe { skinny_avx512(o, x, w, m, k) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return |o, x, w, m, k| unsafe { skinny_avx2(o, x, w, m, k) };
        }
    }
    |o, x, w, m, k| skinny_generic::<false>(o, x, w, m, k)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,fma")]
unsafe fn skinny_avx512(out: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize) {
    skinny_generic::<true>(out, x, w, m, k)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn skinny_avx2(out: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize) {
    skinny_generic::<true>(out, x, w, m, k)
}

/// out (rows_w, m): out[j, i] = dot(w[j], x[i]).
#[inline(always)]
fn skinny_generic<const FMA: bool>(out: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize) {
    for (j, wr) in w.chunks_exact(k).enumerate() {
        let o = &mut out[j * m..(j + 1) * m];
        let mut i = 0;
        while i < m {
            match m - i {
                1 => {
                    let r = dot_n::<1, FMA>(wr, [&x[i * k..(i + 1) * k]]);
                    o[i] = r[0];
                    i += 1;
                }
                2 => {
                    let r = dot_n::<2, FMA>(wr, [&x[i * k..(i + 1) * k], &x[(i + 1) * k..(i + 2) * k]]);
                    o[i..i + 2].copy_from_slice(&r);
                    i += 2;
                }
                3 => {
                    let r = dot_n::<3, FMA>(
                        wr,
                        [&x[i * k..(i + 1) * k], &x[(i + 1) * k..(i + 2) * k], &x[(i + 2) * k..(i + 3) * k]],
                    );
                    o[i..i + 3].copy_from_slice(&r);
                    i += 3;
                }
                _ => {
                    let r = dot_n::<4, FMA>(
                        wr,
                        [
                            &x[i * k..(i + 1) * k],
                            &x[(i + 1) * k..(i + 2) * k],
                            &x[(i + 2) * k..(i + 3) * k],
                            &x[(i + 3) * k..(i + 4) * k],
                        ],
                    );
                    o[i..i + 4].copy_from_slice(&r);
                    i += 4;
                }
            }
        }
    }
}

const LANES: usize = 16;

/// R dot products of `w` with each of `xs`, 16 independent lanes each (vectorizes to one zmm / two ymm).
#[inline(always)]
fn dot_n<const R: usize, const FMA: bool>(w: &[f32], xs: [&[f32]; R]) -> [f32; R] {
    let k = w.len();
    let full = k / LANES * LANES;
    let mut acc = [[0f32; LANES]; R];
    let mut c = 0;
    while c < full {
        let wc: &[f32; LANES] = w[c..c + LANES].try_into().expect("lane chunk");
        for r in 0..R {
            let xc: &[f32; LANES] = xs[r][c..c + LANES].try_into().expect("lane chunk");
            for l in 0..LANES {
                acc[r][l] = if FMA { xc[l].mul_add(wc[l], acc[r][l]) } else { acc[r][l] + xc[l] * wc[l] };
            }
        }
        c += LANES;
    }
    let mut res = [0f32; R];
    for r in 0..R {
        let mut tail = 0f32;
        for t in full..k {
            tail += xs[r][t] * w[t];
        }
        // Pairwise lane reduction.
        let mut a = acc[r];
        let mut width = LANES / 2;
        while width > 0 {
            for l in 0..width {
                a[l] += a[l + width];
            }
            width /= 2;
        }
        res[r] = a[0] + tail;
    }
    res
}

/// Dot product of two equal-length slices (used by attention), vectorized the same way.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_n::<1, false>(a, [b])[0]
}
