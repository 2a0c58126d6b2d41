//! Shared by the GPU test binaries (cuda_parity, cuda_train_parity, cuda_llama, cuda_train).
#![allow(dead_code)]

use engine::cuda::Gpu;
use std::path::PathBuf;

/// The GPU, or None (with the reason printed, so the test passes visibly skipped) where none is usable; a GPU whose
/// kernels do not build fails the test.
pub fn gpu() -> Option<Gpu> {
    match Gpu::open(0) {
        Ok(Ok(g)) => {
            println!("CUDA device: {} ({})", g.name, g.arch);
            Some(g)
        }
        Ok(Err(why)) => {
            println!("SKIPPED: no GPU: {why}");
            None
        }
        Err(e) => panic!("a GPU is present but the kernels do not build: {e}"),
    }
}

/// The checkout: $RLAIFD_ROOT when the binary runs elsewhere than where it was built (scripts/gpu-check.sh).
pub fn root() -> PathBuf {
    std::env::var("RLAIFD_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."))
}
