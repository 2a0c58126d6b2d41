//! The daemon's own NVRTC path (embedded sources, common.cuh inlined, header discovery, cudarc) compiles every
//! kernel for sm_80 and sm_90 without a GPU. Uses NVRTC from the pip-wheel venv that `scripts/check-kernels`
//! creates (target/kernels-venv, or RLAIFD_KERNELS_VENV); prints why and passes when that venv is absent.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn rlaifd_compiles_every_kernel_with_nvrtc() {
    let venv = std::env::var("RLAIFD_KERNELS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/kernels-venv")));
    let cu13 = std::fs::read_dir(venv.join("lib")).ok().and_then(|mut d| {
        d.find_map(|e| {
            let p = e.ok()?.path().join("site-packages/nvidia/cu13");
            p.join("lib/libnvrtc.so.13").exists().then_some(p)
        })
    });
    let Some(cu13) = cu13 else {
        println!("SKIPPED: no NVRTC venv at {} (scripts/check-kernels creates it)", venv.display());
        return;
    };
    let o = Command::new(env!("CARGO_BIN_EXE_rlaifd"))
        .args(["kernels", "--arch", "sm_80", "--arch", "sm_90"])
        .env("LD_LIBRARY_PATH", cu13.join("lib"))
        .env("RLAIFD_CUDA_INCLUDE", cu13.join("include"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    println!("{out}");
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(out.lines().filter(|l| l.starts_with("sm_")).count(), 2 * engine::cuda::SOURCES.len());
    let kernels: usize = engine::cuda::SOURCES
        .iter()
        .map(|(f, _)| engine::cuda::kernel_names(&engine::cuda::source(f).unwrap()).len())
        .sum();
    assert!(out.contains(&format!("ok: {} kernels compiled", 2 * kernels)), "{out}");
    // Without NVRTC: a clear error, no panic.
    let o = Command::new(env!("CARGO_BIN_EXE_rlaifd"))
        .args(["kernels"])
        .env("LD_LIBRARY_PATH", "/nonexistent")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() {
        assert!(err.contains("libnvrtc") && !err.contains("panicked"), "{err}");
    }
}
