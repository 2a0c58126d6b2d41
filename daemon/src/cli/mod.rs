//! The command-line tools beside `rlaifd serve`: one module per command family.

pub mod bench;
pub mod claims;
pub mod eval;
pub mod gpu;
pub mod infer;
pub mod label;
pub mod shapes;
pub mod train;
