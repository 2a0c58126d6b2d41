//! The kernels' sources (embedded), NVRTC compilation once per architecture, and whether the driver, NVRTC and
//! cuBLASLt can be loaded on this machine.

use super::*;

pub(crate) const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// Every kernel file, embedded.
pub const SOURCES: &[(&str, &str)] = &[
    ("act.cu", include_str!("../../../kernels/act.cu")),
    ("attention.cu", include_str!("../../../kernels/attention.cu")),
    ("convert.cu", include_str!("../../../kernels/convert.cu")),
    ("embedding.cu", include_str!("../../../kernels/embedding.cu")),
    ("gemv.cu", include_str!("../../../kernels/gemv.cu")),
    ("logprob.cu", include_str!("../../../kernels/logprob.cu")),
    ("lora.cu", include_str!("../../../kernels/lora.cu")),
    ("norm.cu", include_str!("../../../kernels/norm.cu")),
    ("optim.cu", include_str!("../../../kernels/optim.cu")),
    ("rope.cu", include_str!("../../../kernels/rope.cu")),
    ("sampling.cu", include_str!("../../../kernels/sampling.cu")),
];

/// A kernel file's source with `common.cuh` inlined (the embedded sources have no directory to include from).
pub fn source(file: &str) -> Option<String> {
    SOURCES.iter().find(|(f, _)| *f == file).map(|(_, s)| s.replace("#include \"common.cuh\"", COMMON))
}

/// The `extern "C" __global__` kernels a source defines.
pub fn kernel_names(src: &str) -> Vec<String> {
    let re = regex::Regex::new(r#"extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)"#)
        .expect("static regex");
    re.captures_iter(src).map(|c| c[1].to_string()).collect()
}

pub(crate) fn err(msg: impl Into<String>) -> EngineError {
    EngineError::Input(msg.into())
}

/// Whether NVRTC can be loaded (Err: why not).
pub fn nvrtc_status() -> std::result::Result<(), String> {
    // SAFETY: only tries to dlopen the library by its known names.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err("libnvrtc (CUDA 13) was not found: install the CUDA toolkit or `pip install nvidia-cuda-nvrtc`, and put its lib directory on LD_LIBRARY_PATH".into())
    }
}

/// Whether the CUDA driver can be loaded (Err: why not).
pub fn driver_status() -> std::result::Result<(), String> {
    // SAFETY: as above.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err("libcuda.so.1 (the NVIDIA driver) was not found: no GPU on this machine, or the driver is not installed"
            .into())
    }
}

/// How many CUDA devices the driver reports (0 without a driver, or when it cannot be initialized).
pub fn device_count() -> usize {
    if driver_status().is_err() {
        return 0;
    }
    cudarc::driver::CudaContext::device_count().map(|n| n.max(0) as usize).unwrap_or(0)
}

/// Whether cuBLASLt (the GEMMs) can be loaded (Err: why not).
pub fn cublaslt_status() -> std::result::Result<(), String> {
    // SAFETY: as above.
    if unsafe { cudarc::cublaslt::sys::is_culib_present() } {
        Ok(())
    } else {
        Err("libcublasLt (CUDA 13) was not found: install the CUDA toolkit or `pip install nvidia-cublas`, and put its lib directory on LD_LIBRARY_PATH".into())
    }
}

/// Directories holding the CUDA headers the kernels include (`cuda_fp16.h`): $RLAIFD_CUDA_INCLUDE, $CUDA_HOME,
/// $CUDA_PATH, /usr/local/cuda, and the layouts of NVIDIA's pip wheels (`nvidia/cu13/include`,
/// `nvidia/cuda_runtime/include`) in the active virtualenv, conda env, user and system site-packages.
pub fn include_dirs() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(p) = std::env::var("RLAIFD_CUDA_INCLUDE") {
        roots.extend(std::env::split_paths(&p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(p) = std::env::var(var) {
            roots.push(Path::new(&p).join("include"));
        }
    }
    roots.push("/usr/local/cuda/include".into());
    let mut prefixes: Vec<PathBuf> = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Ok(p) = std::env::var(var) {
            prefixes.push(Path::new(&p).join("lib"));
        }
    }
    if let Ok(h) = std::env::var("HOME") {
        prefixes.push(Path::new(&h).join(".local/lib"));
    }
    prefixes.extend(["/usr/local/lib", "/usr/lib", "/opt/conda/lib"].map(PathBuf::from));
    for pre in prefixes {
        let Ok(entries) = std::fs::read_dir(&pre) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !name.starts_with("python3") {
                continue;
            }
            for sp in ["site-packages", "dist-packages"] {
                for sub in ["nvidia/cu13/include", "nvidia/cuda_runtime/include"] {
                    roots.push(e.path().join(sp).join(sub));
                }
            }
        }
    }
    let mut seen = Vec::new();
    for r in roots {
        if r.join("cuda_fp16.h").is_file() && !seen.contains(&r) {
            seen.push(r);
        }
    }
    seen
}

/// The NVRTC architecture name of a compute capability.
pub fn arch_name(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (7, 0) => "sm_70",
        (7, 5) => "sm_75",
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 7) => "sm_87",
        (8, 9) => "sm_89",
        (9, 0) => "sm_90",
        (10, 0) => "sm_100",
        (10, 3) => "sm_103",
        (12, 0) => "sm_120",
        (m, _) if m >= 12 => "sm_120",
        (m, _) if m >= 10 => "sm_100",
        (9, _) => "sm_90",
        _ => "sm_80",
    }
}

/// One compiled kernel file.
#[derive(Clone)]
pub struct Compiled {
    pub file: &'static str,
    pub kernels: Vec<String>,
    pub ptx: cudarc::nvrtc::Ptx,
}

/// What `compile_all` made in this process, per architecture: every `Gpu::open` after the first (a test binary
/// opens the device once per test) loads the same PTX instead of compiling again.
pub(crate) static COMPILED: std::sync::Mutex<Vec<(&'static str, Vec<Compiled>)>> = std::sync::Mutex::new(Vec::new());

/// Compiles every kernel file for `arch`, the files in parallel, once per process and architecture. An NVRTC error
/// names the file, its kernels and shows NVRTC's log.
pub fn compile_all(arch: &'static str) -> Result<Vec<Compiled>> {
    let mut done = COMPILED.lock().map_err(|_| err("the compiled-kernel cache is poisoned"))?;
    if let Some((_, c)) = done.iter().find(|(a, _)| *a == arch) {
        return Ok(c.clone());
    }
    nvrtc_status().map_err(err)?;
    let includes = include_dirs();
    if includes.is_empty() {
        return Err(err("cuda_fp16.h was not found: set RLAIFD_CUDA_INCLUDE or CUDA_HOME, or `pip install nvidia-cuda-runtime` (CUDA 13)"));
    }
    let include_paths: Vec<String> = includes.iter().map(|p| p.display().to_string()).collect();
    let compile = |file: &'static str| -> Result<Compiled> {
        let src = source(file).ok_or_else(|| err(format!("kernels/{file}: no such embedded source")))?;
        let kernels = kernel_names(&src);
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            include_paths: include_paths.clone(),
            options: vec!["--std=c++17".into()],
            name: Some(file.to_string()),
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(&src, opts).map_err(|e| {
            let log = match &e {
                cudarc::nvrtc::CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
                other => format!("{other:?}"),
            };
            err(format!("NVRTC could not compile kernels/{file} (kernels {}) for {arch}:\n{log}", kernels.join(", ")))
        })?;
        Ok(Compiled { file, kernels, ptx })
    };
    // NVRTC programs are independent: one thread per file (start-up time is the slowest file, not the sum).
    let out = std::thread::scope(|s| {
        let handles: Vec<_> = SOURCES.iter().map(|&(file, _)| s.spawn(move || compile(file))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(err("an NVRTC compile thread panicked"))))
            .collect::<Result<Vec<_>>>()
    })?;
    done.push((arch, out.clone()));
    Ok(out)
}
