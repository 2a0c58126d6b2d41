//! The command-line tools beside `rlaifd serve`: one module per command family.

pub mod bench;
pub mod claims;
pub mod dataset;
pub mod eval;
pub mod gpu;
pub mod infer;
pub mod label;
pub mod shapes;
pub mod train;

/// Runs a command's async body on a multi-threaded runtime (the database commands).
pub fn async_main(f: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    use anyhow::Context;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(f)
}
