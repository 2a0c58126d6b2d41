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

/// A weight matrix as stored in memory. 16-bit checkpoints stay 16-bit (half the bytes to stream per decode
/// step) and are widened to f32 inside the kernels; widening is exact, so results equal the f32 path.
pub enum WeightBuf {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
    F16(Vec<half::f16>),
}

impl WeightBuf {
    pub fn len(&self) -> usize {
        match self {
            WeightBuf::F32(v) => v.len(),
            WeightBuf::Bf16(v) => v.len(),
            WeightBuf::F16(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> &'static str {
        match self {
            WeightBuf::F32(_) => "f32",
            WeightBuf::Bf16(_) => "bf16",
            WeightBuf::F16(_) => "f16",
        }
    }
    /// Writes elements [start, start + out.len()) as f32.
    pub fn widen_into(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            WeightBuf::F32(v) => out.copy_from_slice(&v[start..end]),
            WeightBuf::Bf16(v) => v[start..end].convert_to_f32_slice(out),
            WeightBuf::F16(v) => v[start..end].convert_to_f32_slice(out),
        }
    }
    /// The whole matrix as f32 (a copy for 16-bit storage).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.len()];
        self.widen_into(0, &mut out);
        out
    }
}

use half::slice::HalfFloatSliceExt;

/// y (m, n) = x (m, k) · wᵀ for any stored weight type.
pub fn matmul_nt_w(y: &mut [f32], x: &[f32], w: &WeightBuf, m: usize, k: usize, n: usize, mode: MatmulMode) {
    match w {
        WeightBuf::F32(v) => matmul_nt(y, x, v, m, k, n, mode),
        _ => {
            assert_eq!(x.len(), m * k, "matmul_nt_w: x is not (m, k)");
            assert_eq!(w.len(), n * k, "matmul_nt_w: w is not (n, k)");
            assert_eq!(y.len(), m * n, "matmul_nt_w: y is not (m, n)");
            if m == 0 || n == 0 || k == 0 {
                if mode == MatmulMode::Assign {
                    y.fill(0.0);
                }
                return;
            }
            if m <= SKINNY_MAX_ROWS {
                skinny(y, x, w, m, k, n, mode);
            } else {
                // Widen a block of weight rows at a time (stays in cache), GEMM it into y's columns.
                const BLOCK: usize = 256;
                let mut scratch = vec![0f32; BLOCK.min(n) * k];
                let mut j0 = 0;
                while j0 < n {
                    let nb = BLOCK.min(n - j0);
                    let wb = &mut scratch[..nb * k];
                    w.widen_into(j0 * k, wb);
                    // SAFETY: y columns j0..j0+nb of an (m, n) row-major matrix; wb is (nb, k).
                    unsafe {
                        gemm::gemm(
                            m, nb, k,
                            y.as_mut_ptr().add(j0), 1, n as isize, mode == MatmulMode::Accumulate,
                            x.as_ptr(), 1, k as isize,
                            wb.as_ptr(), k as isize, 1,
                            1.0, 1.0, false, false, false, gemm::Parallelism::Rayon(0),
                        );
                    }
                    j0 += nb;
                }
            }
        }
    }
}

/// Source of weight rows as f32 slices (widening 16-bit rows into a per-task scratch row).
trait Rows: Sync {
    fn row<'a>(&'a self, j: usize, k: usize, scratch: &'a mut [f32]) -> &'a [f32];
}

impl Rows for [f32] {
    #[inline(always)]
    fn row<'a>(&'a self, j: usize, k: usize, _: &'a mut [f32]) -> &'a [f32] {
        &self[j * k..(j + 1) * k]
    }
}

impl Rows for WeightBuf {
    #[inline(always)]
    fn row<'a>(&'a self, j: usize, k: usize, scratch: &'a mut [f32]) -> &'a [f32] {
        match self {
            WeightBuf::F32(v) => &v[j * k..(j + 1) * k],
            _ => {
                self.widen_into(j * k, &mut scratch[..k]);
                &scratch[..k]
            }
        }
    }
}

fn skinny<W: Rows + ?Sized>(y: &mut [f32], x: &[f32], w: &W, m: usize, k: usize, n: usize, mode: MatmulMode) {
    let kernel = pick_kernel();
    // Each task computes a block of output columns for all m rows into (block, m) scratch, so tasks never
    // write to the same cache lines; results are scattered into y afterwards.
    let mut yt = vec![0f32; n * m]; // (n, m)
    yt.par_chunks_mut(SKINNY_BLOCK * m).enumerate().for_each(|(b, out)| {
        let mut scratch = vec![0f32; k];
        for jj in 0..out.len() / m {
            let wr = w.row(b * SKINNY_BLOCK + jj, k, &mut scratch);
            kernel(&mut out[jj * m..(jj + 1) * m], x, wr, m, k);
        }
    });
    for i in 0..m {
        let yr = &mut y[i * n..(i + 1) * n];
        match mode {
            MatmulMode::Assign => yr.iter_mut().enumerate().for_each(|(j, v)| *v = yt[j * m + i]),
            MatmulMode::Accumulate => yr.iter_mut().enumerate().for_each(|(j, v)| *v += yt[j * m + i]),
        }
    }
}

/// out (m): out[i] = dot(w_row, x[i]).
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
    |o, x, w, m, k| skinny_row::<false>(o, x, w, m, k)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,fma")]
unsafe fn skinny_avx512(out: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize) {
    skinny_row::<true>(out, x, w, m, k)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn skinny_avx2(out: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize) {
    skinny_row::<true>(out, x, w, m, k)
}

/// One weight row against all m input rows, four at a time.
#[inline(always)]
fn skinny_row<const FMA: bool>(o: &mut [f32], x: &[f32], wr: &[f32], m: usize, k: usize) {
    let mut i = 0;
    while i < m {
        let xr = |t: usize| &x[(i + t) * k..(i + t + 1) * k];
        match m - i {
            1 => {
                o[i] = dot_n::<1, FMA>(wr, [xr(0)])[0];
                i += 1;
            }
            2 => {
                o[i..i + 2].copy_from_slice(&dot_n::<2, FMA>(wr, [xr(0), xr(1)]));
                i += 2;
            }
            3 => {
                o[i..i + 3].copy_from_slice(&dot_n::<3, FMA>(wr, [xr(0), xr(1), xr(2)]));
                i += 3;
            }
            _ => {
                o[i..i + 4].copy_from_slice(&dot_n::<4, FMA>(wr, [xr(0), xr(1), xr(2), xr(3)]));
                i += 4;
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
