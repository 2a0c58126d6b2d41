//! CPU backend: the ops every model is written with. Buffers are row-major f32 slices; shapes in comments.
//! Forward ops here, their backward in `backward.rs`; each is checked against float64 (reference forwards in
//! `tests/ops_reference.rs`, finite differences in `tests/backward_fd.rs`).

pub mod act;
pub mod attention;
pub mod backward;
pub mod matmul;
pub mod norm;
pub mod packed;
pub mod rope;
pub mod softmax;

pub use act::{apply_activation, silu_mul};
pub use attention::{attend_dense, attend_rows, KvSegment, Mask};
pub use matmul::{matmul_nt, MatmulMode};
pub use norm::{layernorm, rmsnorm};
pub use packed::PackedMatrix;
pub use rope::Rope;
pub use softmax::log_softmax_rows;

/// y += x, elementwise.
pub fn add_inplace(y: &mut [f32], x: &[f32]) {
    debug_assert_eq!(y.len(), x.len());
    for (a, b) in y.iter_mut().zip(x) {
        *a += *b;
    }
}

/// y (rows, n) += bias (n) broadcast over rows.
pub fn add_bias(y: &mut [f32], bias: &[f32]) {
    for row in y.chunks_exact_mut(bias.len()) {
        add_inplace(row, bias);
    }
}
