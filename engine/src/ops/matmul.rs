//! y (m, n) = x (m, k) · wᵀ with w (n, k) row-major, the layout of `torch.nn.Linear.weight`.
//!
//! Plain f32 matrices through the `gemm` crate (AVX-512/AVX2, rayon): LoRA factors, the patch embedding,
//! attention. The model's linear layers use the packed kernel in `packed.rs` instead.

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
    // SAFETY: the asserts above pin every extent.
    unsafe { gemm_xwt(y.as_mut_ptr(), n, x, w.as_ptr(), m, k, n, mode) };
}

/// y[i * y_row_stride + j] (+)= Σ_t x[i, t] · w[j, t] for i < m, j < n, as the GEMM yᵀ = w · xᵀ: the weight
/// is the left operand, which measured ~7 % faster with the `gemm` crate than x · wᵀ on this layout.
///
/// # Safety
/// `y` must address an m x n block with row stride `y_row_stride`; `w` must hold n x k values.
#[allow(clippy::too_many_arguments)] // the GEMM's own operands and sizes, as BLAS spells them
unsafe fn gemm_xwt(
    y: *mut f32,
    y_row_stride: usize,
    x: &[f32],
    w: *const f32,
    m: usize,
    k: usize,
    n: usize,
    mode: MatmulMode,
) {
    gemm::gemm(
        n,
        m,
        k,
        y,
        y_row_stride as isize,
        1,
        mode == MatmulMode::Accumulate,
        w,
        1,
        k as isize,
        x.as_ptr(),
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
