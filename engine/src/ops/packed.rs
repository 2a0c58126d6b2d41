//! Linear-layer weights packed for the CPU matmul, and the matmul itself (AVX-512, AVX2 + FMA, or portable).
//!
//! A weight W (n, k) — `torch.nn.Linear` layout, one row per output feature — is stored as panels of `NR` = 32
//! output features: panel p holds `W[32p + c, t]` at `p * k * 32 + t * 32 + c` (the last panel zero-padded).
//! The kernel walks t once per panel and keeps an (MR x 32) block of y in registers: per t it loads 32
//! weights (two zmm) and broadcasts MR activations, 2*MR FMAs. The same kernel serves prefill (MR = 6 row
//! blocks) and decode (MR = number of answers), so each weight byte is read once per call either way.
//! 16-bit checkpoints stay 16-bit in the panels and are widened in registers; widening is exact, so the
//! result equals the f32 computation on the widened weights.

use super::matmul::MatmulMode;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

/// Output features per panel.
pub const NR: usize = 32;
/// Rows of x per register block in prefill.
const MR_MAX: usize = 6;

pub enum PackedData {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

pub struct PackedMatrix {
    /// Output features (rows of W).
    pub n: usize,
    /// Input features (columns of W).
    pub k: usize,
    data: PackedData,
}

fn panels(n: usize) -> usize {
    n.div_ceil(NR)
}

fn pack<T: Copy + Default + Send + Sync>(w: &[T], n: usize, k: usize) -> Vec<T> {
    assert_eq!(w.len(), n * k, "pack: weight is not (n, k)");
    let mut out = vec![T::default(); panels(n) * k * NR];
    out.par_chunks_mut(k * NR).enumerate().for_each(|(p, panel)| {
        for c in 0..NR.min(n - p * NR) {
            let row = &w[(p * NR + c) * k..(p * NR + c + 1) * k];
            for (t, &v) in row.iter().enumerate() {
                panel[t * NR + c] = v;
            }
        }
    });
    out
}

impl PackedMatrix {
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> Self {
        PackedMatrix { n, k, data: PackedData::F32(pack(w, n, k)) }
    }
    pub fn from_bf16(w: &[bf16], n: usize, k: usize) -> Self {
        PackedMatrix { n, k, data: PackedData::Bf16(pack(w, n, k)) }
    }
    pub fn from_f16(w: &[f16], n: usize, k: usize) -> Self {
        PackedMatrix { n, k, data: PackedData::F16(pack(w, n, k)) }
    }

    pub fn dtype(&self) -> &'static str {
        match self.data {
            PackedData::F32(_) => "f32",
            PackedData::Bf16(_) => "bf16",
            PackedData::F16(_) => "f16",
        }
    }

    /// Row j of W (output feature j) as f32.
    pub fn row_into(&self, j: usize, out: &mut [f32]) {
        assert!(j < self.n && out.len() == self.k);
        let base = (j / NR) * self.k * NR + j % NR;
        match &self.data {
            PackedData::F32(v) => out.iter_mut().enumerate().for_each(|(t, o)| *o = v[base + t * NR]),
            PackedData::Bf16(v) => out.iter_mut().enumerate().for_each(|(t, o)| *o = v[base + t * NR].to_f32()),
            PackedData::F16(v) => out.iter_mut().enumerate().for_each(|(t, o)| *o = v[base + t * NR].to_f32()),
        }
    }

    /// Wᵀ packed the same way (k output features of n inputs), in the same storage type: backward passes
    /// compute dx = dy · W as dy · (Wᵀ)ᵀ with the same kernel.
    pub fn transposed(&self) -> PackedMatrix {
        let (n, k) = (self.n, self.k);
        fn unpack_t<T: Copy + Default + Send + Sync>(v: &[T], n: usize, k: usize) -> Vec<T> {
            // element (j, t) of W sits at panel j/NR, row t, column j%NR; write it at (t, j) of Wᵀ.
            let mut out = vec![T::default(); k * n];
            out.par_chunks_mut(n).enumerate().for_each(|(t, row)| {
                for (j, o) in row.iter_mut().enumerate() {
                    *o = v[(j / NR) * k * NR + t * NR + j % NR];
                }
            });
            out
        }
        match &self.data {
            PackedData::F32(v) => PackedMatrix::from_f32(&unpack_t(v, n, k), k, n),
            PackedData::Bf16(v) => PackedMatrix::from_bf16(&unpack_t(v, n, k), k, n),
            PackedData::F16(v) => PackedMatrix::from_f16(&unpack_t(v, n, k), k, n),
        }
    }

    /// W as a plain (n, k) f32 matrix.
    pub fn unpack_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        out.par_chunks_mut(self.k).enumerate().for_each(|(j, row)| self.row_into(j, row));
        out
    }

    /// y (m, n) = x (m, k) · Wᵀ  (`Accumulate`: y += ...).
    pub fn matmul(&self, y: &mut [f32], x: &[f32], m: usize, mode: MatmulMode) {
        self.matmul_with(Kernel::pick(), y, x, m, mode)
    }

    /// The same with the portable kernel, for tests on machines that have the fast one.
    #[doc(hidden)]
    pub fn matmul_portable(&self, y: &mut [f32], x: &[f32], m: usize, mode: MatmulMode) {
        self.matmul_with(Kernel::Portable, y, x, m, mode)
    }

    fn matmul_with(&self, kernel: Kernel, y: &mut [f32], x: &[f32], m: usize, mode: MatmulMode) {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), m * k, "packed matmul: x is not (m, k)");
        assert_eq!(y.len(), m * n, "packed matmul: y is not (m, n)");
        if m == 0 || n == 0 {
            return;
        }
        let acc = mode == MatmulMode::Accumulate;
        let y_addr = y.as_mut_ptr() as usize;
        // Split the panels across threads; every task writes its own columns of y.
        let tasks = rayon::current_num_threads().max(1) * 4;
        let per_task = panels(n).div_ceil(tasks).max(1);
        // With many rows (prefill) a 16-bit panel is widened once into f32 scratch and reused by every row
        // block; with few rows (decode) it is widened in registers, so only 16-bit bytes cross memory.
        let widen_panel = m > 4 * MR_MAX && !matches!(self.data, PackedData::F32(_));
        (0..panels(n)).into_par_iter().with_min_len(per_task).for_each_init(
            || if widen_panel { vec![0f32; k * NR] } else { Vec::new() },
            |scratch, p| {
                let cols = NR.min(n - p * NR);
                if widen_panel {
                    let range = p * k * NR..(p + 1) * k * NR;
                    match &self.data {
                        // bf16 -> f32 is a 16-bit shift; this loop vectorizes, unlike the generic slice helper.
                        PackedData::Bf16(v) => scratch
                            .iter_mut()
                            .zip(&v[range])
                            .for_each(|(o, b)| *o = f32::from_bits((b.to_bits() as u32) << 16)),
                        PackedData::F16(v) => v[range].convert_to_f32_slice(scratch),
                        PackedData::F32(_) => unreachable!("f32 panels are used in place"),
                    }
                }
                let mut i = 0;
                while i < m {
                    let mr = MR_MAX.min(m - i);
                    // SAFETY: rows i..i+mr of x and y exist; panel p holds k * NR elements; columns
                    // p*NR..p*NR+cols of y belong to this task only.
                    unsafe {
                        let yp = (y_addr as *mut f32).add(i * n + p * NR);
                        let xp = x.as_ptr().add(i * k);
                        match &self.data {
                            _ if widen_panel => kernel.f32(mr, xp, k, scratch.as_ptr(), yp, n, cols, acc),
                            PackedData::F32(v) => kernel.f32(mr, xp, k, v.as_ptr().add(p * k * NR), yp, n, cols, acc),
                            PackedData::Bf16(v) => kernel.bf16(mr, xp, k, v.as_ptr().add(p * k * NR), yp, n, cols, acc),
                            PackedData::F16(v) => kernel.f16(mr, xp, k, v.as_ptr().add(p * k * NR), yp, n, cols, acc),
                        }
                    }
                    i += mr;
                }
            },
        );
    }
}

#[derive(Clone, Copy)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// AVX2 + FMA (+ F16C for 16-bit panels): CPUs without AVX-512, e.g. AMD Zen 2/3.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

macro_rules! dispatch_mr {
    ($f:ident, $mr:expr, $($arg:expr),*) => {
        match $mr {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            _ => $f::<6>($($arg),*),
        }
    };
}

impl Kernel {
    fn pick() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512;
            }
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn f32(
        self,
        mr: usize,
        x: *const f32,
        k: usize,
        w: *const f32,
        y: *mut f32,
        ldy: usize,
        cols: usize,
        acc: bool,
    ) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => dispatch_mr!(avx512_f32, mr, x, k, w, y, ldy, cols, acc),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => dispatch_mr!(avx2_f32, mr, x, k, w, y, ldy, cols, acc),
            Kernel::Portable => dispatch_mr!(portable_f32, mr, x, k, w, y, ldy, cols, acc),
        }
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn bf16(
        self,
        mr: usize,
        x: *const f32,
        k: usize,
        w: *const bf16,
        y: *mut f32,
        ldy: usize,
        cols: usize,
        acc: bool,
    ) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => dispatch_mr!(avx512_bf16, mr, x, k, w, y, ldy, cols, acc),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => dispatch_mr!(avx2_bf16, mr, x, k, w, y, ldy, cols, acc),
            Kernel::Portable => dispatch_mr!(portable_bf16, mr, x, k, w, y, ldy, cols, acc),
        }
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn f16(
        self,
        mr: usize,
        x: *const f32,
        k: usize,
        w: *const f16,
        y: *mut f32,
        ldy: usize,
        cols: usize,
        acc: bool,
    ) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => dispatch_mr!(avx512_f16, mr, x, k, w, y, ldy, cols, acc),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => dispatch_mr!(avx2_f16, mr, x, k, w, y, ldy, cols, acc),
            Kernel::Portable => dispatch_mr!(portable_f16, mr, x, k, w, y, ldy, cols, acc),
        }
    }
}

trait Widen: Copy {
    fn widen(self) -> f32;
}
impl Widen for f32 {
    fn widen(self) -> f32 {
        self
    }
}
impl Widen for bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
}
impl Widen for f16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// Reference kernel for CPUs without AVX2 (and the definition of what the fast kernels compute).
#[allow(clippy::too_many_arguments)]
// Index loops over the register tile read as the kernel they are (and vectorize as such).
#[allow(clippy::needless_range_loop)]
unsafe fn portable<const MR: usize, E: Widen>(
    x: *const f32,
    k: usize,
    w: *const E,
    y: *mut f32,
    ldy: usize,
    cols: usize,
    acc: bool,
) {
    let mut a = [[0f32; NR]; MR];
    for t in 0..k {
        let mut wt = [0f32; NR];
        for c in 0..NR {
            wt[c] = (*w.add(t * NR + c)).widen();
        }
        for r in 0..MR {
            let xv = *x.add(r * k + t);
            for c in 0..NR {
                a[r][c] += xv * wt[c];
            }
        }
    }
    for r in 0..MR {
        for c in 0..cols {
            let dst = y.add(r * ldy + c);
            *dst = if acc { *dst + a[r][c] } else { a[r][c] };
        }
    }
}

macro_rules! portable_for {
    ($name:ident, $elem:ty) => {
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name<const MR: usize>(
            x: *const f32,
            k: usize,
            w: *const $elem,
            y: *mut f32,
            ldy: usize,
            cols: usize,
            acc: bool,
        ) {
            portable::<MR, $elem>(x, k, w, y, ldy, cols, acc)
        }
    };
}
portable_for!(portable_f32, f32);
portable_for!(portable_bf16, bf16);
portable_for!(portable_f16, f16);

#[cfg(target_arch = "x86_64")]
macro_rules! avx512_kernel {
    ($name:ident, $elem:ty, $load:ident) => {
        #[target_feature(enable = "avx512f")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name<const MR: usize>(
            x: *const f32,
            k: usize,
            w: *const $elem,
            y: *mut f32,
            ldy: usize,
            cols: usize,
            acc: bool,
        ) {
            use std::arch::x86_64::*;
            let mut lo = [_mm512_setzero_ps(); MR];
            let mut hi = [_mm512_setzero_ps(); MR];
            for t in 0..k {
                let (w0, w1) = $load(w.add(t * NR));
                for r in 0..MR {
                    let xv = _mm512_set1_ps(*x.add(r * k + t));
                    lo[r] = _mm512_fmadd_ps(xv, w0, lo[r]);
                    hi[r] = _mm512_fmadd_ps(xv, w1, hi[r]);
                }
            }
            store_block::<MR>(&lo, &hi, y, ldy, cols, acc);
        }
    };
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load_f32(p: *const f32) -> (std::arch::x86_64::__m512, std::arch::x86_64::__m512) {
    use std::arch::x86_64::*;
    (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load_bf16(p: *const bf16) -> (std::arch::x86_64::__m512, std::arch::x86_64::__m512) {
    use std::arch::x86_64::*;
    // bf16 -> f32 is the 16 bits moved to the top of the word.
    let a = _mm256_loadu_si256(p as *const __m256i);
    let b = _mm256_loadu_si256(p.add(16) as *const __m256i);
    (
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(a))),
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(b))),
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load_f16(p: *const f16) -> (std::arch::x86_64::__m512, std::arch::x86_64::__m512) {
    use std::arch::x86_64::*;
    let a = _mm256_loadu_si256(p as *const __m256i);
    let b = _mm256_loadu_si256(p.add(16) as *const __m256i);
    (_mm512_cvtph_ps(a), _mm512_cvtph_ps(b))
}

#[cfg(target_arch = "x86_64")]
avx512_kernel!(avx512_f32, f32, load_f32);
#[cfg(target_arch = "x86_64")]
avx512_kernel!(avx512_bf16, bf16, load_bf16);
#[cfg(target_arch = "x86_64")]
avx512_kernel!(avx512_f16, f16, load_f16);

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_block<const MR: usize>(
    lo: &[std::arch::x86_64::__m512; MR],
    hi: &[std::arch::x86_64::__m512; MR],
    y: *mut f32,
    ldy: usize,
    cols: usize,
    acc: bool,
) {
    use std::arch::x86_64::*;
    // Masks for the valid columns of each half (the last panel may be partial).
    let m0: __mmask16 = if cols >= 16 { 0xFFFF } else { ((1u32 << cols) - 1) as __mmask16 };
    let m1: __mmask16 = if cols >= 32 {
        0xFFFF
    } else if cols <= 16 {
        0
    } else {
        ((1u32 << (cols - 16)) - 1) as __mmask16
    };
    for r in 0..MR {
        let p0 = y.add(r * ldy);
        let p1 = p0.add(16);
        let (mut v0, mut v1) = (lo[r], hi[r]);
        if acc {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, p0));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, p1));
        }
        _mm512_mask_storeu_ps(p0, m0, v0);
        _mm512_mask_storeu_ps(p1, m1, v1);
    }
}

// -- AVX2 + FMA: a panel's 32 columns in two passes of 16 (two ymm), MR x 2 accumulators each, so the 16 ymm
// registers hold the block (12 accumulators, 2 weights, 1 broadcast at MR = 6).

#[cfg(target_arch = "x86_64")]
macro_rules! avx2_kernel {
    ($name:ident, $elem:ty, $load:ident) => {
        #[target_feature(enable = "avx2,fma,f16c")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name<const MR: usize>(
            x: *const f32,
            k: usize,
            w: *const $elem,
            y: *mut f32,
            ldy: usize,
            cols: usize,
            acc: bool,
        ) {
            use std::arch::x86_64::*;
            for half in 0..2 {
                let c0 = half * 16;
                if c0 >= cols {
                    break;
                }
                let mut lo = [_mm256_setzero_ps(); MR];
                let mut hi = [_mm256_setzero_ps(); MR];
                for t in 0..k {
                    let (w0, w1) = $load(w.add(t * NR + c0));
                    for r in 0..MR {
                        let xv = _mm256_set1_ps(*x.add(r * k + t));
                        lo[r] = _mm256_fmadd_ps(xv, w0, lo[r]);
                        hi[r] = _mm256_fmadd_ps(xv, w1, hi[r]);
                    }
                }
                let n = (cols - c0).min(16);
                for r in 0..MR {
                    let mut out = [0f32; 16];
                    _mm256_storeu_ps(out.as_mut_ptr(), lo[r]);
                    _mm256_storeu_ps(out.as_mut_ptr().add(8), hi[r]);
                    let dst = y.add(r * ldy + c0);
                    for (c, v) in out.iter().take(n).enumerate() {
                        let d = dst.add(c);
                        *d = if acc { *d + v } else { *v };
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8_f32(p: *const f32) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
    use std::arch::x86_64::*;
    (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8_bf16(p: *const bf16) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
    use std::arch::x86_64::*;
    // bf16 -> f32 is the 16 bits moved to the top of the word.
    let a = _mm_loadu_si128(p as *const __m128i);
    let b = _mm_loadu_si128(p.add(8) as *const __m128i);
    (
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(a))),
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(b))),
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8_f16(p: *const f16) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
    use std::arch::x86_64::*;
    let a = _mm_loadu_si128(p as *const __m128i);
    let b = _mm_loadu_si128(p.add(8) as *const __m128i);
    (_mm256_cvtph_ps(a), _mm256_cvtph_ps(b))
}

#[cfg(target_arch = "x86_64")]
avx2_kernel!(avx2_f32, f32, load8_f32);
#[cfg(target_arch = "x86_64")]
avx2_kernel!(avx2_bf16, bf16, load8_bf16);
#[cfg(target_arch = "x86_64")]
avx2_kernel!(avx2_f16, f16, load8_f16);
