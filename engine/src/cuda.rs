//! CUDA, first part: the hand-written fp16 kernels of `kernels/*.cu` (embedded in the binary), compiled once at
//! start-up with NVRTC for the device's compute capability, and launch wrappers for each of them. Everything is
//! loaded dynamically (cudarc `dynamic-loading`, CUDA 13): a machine without a GPU or CUDA libraries builds and
//! runs the same binary and simply gets `None` from [`Gpu::open`] with the reason. cudarc panics when a library is
//! missing, so every entry point checks presence first.
//!
//! The wrappers take and return host `f32` slices (uploaded as fp16, computed with fp32 accumulation, returned
//! widened): they are what the parity tests and `scripts/gpu-check.sh` compare against the CPU backend. The model
//! running on the device (weights uploaded once, KV caches on the device, cuBLASLt GEMMs) builds on them.
//!
//! Sampling stays on the host: per decode step each answer's logits row (vocabulary x 4 bytes, 128 KB for LLaMA)
//! is copied back and sampled by `crate::sampling`, which keeps one implementation of temperature, top-k, top-p and
//! repetition penalty (bit-identical choices on both backends) at a cost far below one decode step.

use crate::error::{EngineError, Result};
use cudarc::cublaslt::sys as lt;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use half::f16;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const COMMON: &str = include_str!("../../kernels/common.cuh");

/// Every kernel file, embedded.
pub const SOURCES: &[(&str, &str)] = &[
    ("act.cu", include_str!("../../kernels/act.cu")),
    ("attention.cu", include_str!("../../kernels/attention.cu")),
    ("convert.cu", include_str!("../../kernels/convert.cu")),
    ("embedding.cu", include_str!("../../kernels/embedding.cu")),
    ("gemv.cu", include_str!("../../kernels/gemv.cu")),
    ("logprob.cu", include_str!("../../kernels/logprob.cu")),
    ("lora.cu", include_str!("../../kernels/lora.cu")),
    ("norm.cu", include_str!("../../kernels/norm.cu")),
    ("optim.cu", include_str!("../../kernels/optim.cu")),
    ("rope.cu", include_str!("../../kernels/rope.cu")),
    ("sampling.cu", include_str!("../../kernels/sampling.cu")),
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
static COMPILED: std::sync::Mutex<Vec<(&'static str, Vec<Compiled>)>> = std::sync::Mutex::new(Vec::new());

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

/// How a one-row product (a batch-1 decode projection) runs: `gemv_m1_f16` with this many warps per output
/// feature, or cuBLASLt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemvChoice {
    Gemv(usize),
    Blas,
}

impl std::fmt::Display for GemvChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GemvChoice::Gemv(s) => write!(f, "gemv/{s}"),
            GemvChoice::Blas => write!(f, "cublaslt"),
        }
    }
}

/// One GEMM's shape in cuBLASLt's (column-major) terms, and the alignment (bytes, up to 256) of its A, B and C
/// pointers: what its plan depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct LtShape {
    transa: bool,
    transb: bool,
    m: u64,
    n: u64,
    k: u64,
    lda: i64,
    ldb: i64,
    ldc: i64,
    align: [u32; 3],
}

/// A GEMM's descriptors and the algorithm cuBLASLt's heuristic picked for it, made once per shape.
struct LtPlan {
    desc: lt::cublasLtMatmulDesc_t,
    a: lt::cublasLtMatrixLayout_t,
    b: lt::cublasLtMatrixLayout_t,
    c: lt::cublasLtMatrixLayout_t,
    algo: lt::cublasLtMatmulAlgo_t,
}

impl Drop for LtPlan {
    fn drop(&mut self) {
        // SAFETY: made by `LtPlan::new` and destroyed only here.
        unsafe {
            lt::cublasLtMatrixLayoutDestroy(self.a);
            lt::cublasLtMatrixLayoutDestroy(self.b);
            lt::cublasLtMatrixLayoutDestroy(self.c);
            lt::cublasLtMatmulDescDestroy(self.desc);
        }
    }
}

fn lt_check(st: lt::cublasStatus_t, what: &str) -> std::result::Result<(), String> {
    if st == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(format!("{what}: {st:?}"))
    }
}

impl LtPlan {
    /// fp16 A, B, C with fp32 compute and scale; the heuristic told the pointers' alignment and the workspace.
    fn new(handle: lt::cublasLtHandle_t, s: &LtShape, workspace: usize) -> std::result::Result<LtPlan, String> {
        let f16t = lt::cudaDataType_t::CUDA_R_16F;
        // SAFETY: plain descriptor calls on out-pointers; a failure destroys what was made (the Drop of the
        // partially filled plan, whose null handles the destroy functions accept).
        unsafe {
            let mut p = LtPlan {
                desc: std::ptr::null_mut(),
                a: std::ptr::null_mut(),
                b: std::ptr::null_mut(),
                c: std::ptr::null_mut(),
                algo: std::mem::zeroed(),
            };
            lt_check(
                lt::cublasLtMatmulDescCreate(
                    &mut p.desc,
                    lt::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    lt::cudaDataType_t::CUDA_R_32F,
                ),
                "matmul descriptor",
            )?;
            for (attr, t) in [
                (lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, s.transa),
                (lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, s.transb),
            ] {
                let op: i32 = t.into();
                lt_check(
                    lt::cublasLtMatmulDescSetAttribute(p.desc, attr, &op as *const i32 as *const _, 4),
                    "transpose attribute",
                )?;
            }
            let (ar, ac) = if s.transa { (s.k, s.m) } else { (s.m, s.k) };
            let (br, bc) = if s.transb { (s.n, s.k) } else { (s.k, s.n) };
            lt_check(lt::cublasLtMatrixLayoutCreate(&mut p.a, f16t, ar, ac, s.lda), "layout A")?;
            lt_check(lt::cublasLtMatrixLayoutCreate(&mut p.b, f16t, br, bc, s.ldb), "layout B")?;
            lt_check(lt::cublasLtMatrixLayoutCreate(&mut p.c, f16t, s.m, s.n, s.ldc), "layout C")?;
            let mut pref: lt::cublasLtMatmulPreference_t = std::ptr::null_mut();
            lt_check(lt::cublasLtMatmulPreferenceCreate(&mut pref), "preference")?;
            let ws = workspace as u64;
            let mut res = lt_check(
                lt::cublasLtMatmulPreferenceSetAttribute(
                    pref,
                    lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const u64 as *const _,
                    8,
                ),
                "workspace preference",
            );
            for (attr, al) in [
                (lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, s.align[0]),
                (lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, s.align[1]),
                (lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, s.align[2]),
                (lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, s.align[2]),
            ] {
                res = res.and_then(|_| {
                    lt_check(
                        lt::cublasLtMatmulPreferenceSetAttribute(pref, attr, &al as *const u32 as *const _, 4),
                        "alignment preference",
                    )
                });
            }
            let mut heur: lt::cublasLtMatmulHeuristicResult_t = std::mem::zeroed();
            let mut found = 0i32;
            res = res.and_then(|_| {
                lt_check(
                    lt::cublasLtMatmulAlgoGetHeuristic(
                        handle, p.desc, p.a, p.b, p.c, p.c, pref, 1, &mut heur, &mut found,
                    ),
                    "heuristic",
                )
            });
            lt::cublasLtMatmulPreferenceDestroy(pref);
            res?;
            if found == 0 {
                return Err("no cuBLASLt algorithm for this shape".into());
            }
            lt_check(heur.state, "heuristic result")?;
            p.algo = heur.algo;
            Ok(p)
        }
    }
}

/// Plans kept at most (a decoder uses a few dozen shapes per sequence length).
const MAX_PLANS: usize = 4096;

/// cuBLASLt: a handle, a workspace, and a plan per GEMM shape (descriptors and the heuristic's algorithm, which
/// cudarc's `matmul` would otherwise rebuild and query on every call: ~50 times per layer in a training pass).
struct Lt {
    handle: lt::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: std::sync::Mutex<HashMap<LtShape, LtPlan>>,
}

// SAFETY: the handle and plans are used under the plans' lock or read-only (cuBLASLt handles may be shared
// across threads when calls do not overlap on one stream; every call here goes to the device's one stream).
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        if let Ok(mut p) = self.plans.lock() {
            p.clear();
        }
        // SAFETY: created in `Lt::new`, destroyed once.
        unsafe { lt::cublasLtDestroy(self.handle) };
    }
}

/// Whether `RLAIFD_CUDA_MMA_ATTENTION` leaves the tensor-core attention kernels on (unset or anything but `0`): a
/// switch for GPU hosts that run prebuilt binaries (`scripts/gpu-check.sh`) to fall back to the scalar kernels.
fn mma_attention_allowed() -> bool {
    !matches!(std::env::var("RLAIFD_CUDA_MMA_ATTENTION").as_deref().map(str::trim), Ok("0"))
}

/// Dynamic shared memory of `flash_attn_bwd_dkdv_mma_d{64,128}_f16`: 64 rows each of keys, values, queries and
/// output gradients, `head_dim` + 8 halves per row.
fn dkdv_mma_smem(head_dim: usize) -> usize {
    4 * 64 * (head_dim + 8) * 2
}

/// The alignment of a device address in bytes, capped at 256 (what cuBLASLt's heuristic asks about).
fn align_of(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        (1u64 << ptr.trailing_zeros().min(8)) as u32
    }
}

impl Lt {
    fn new(stream: &Arc<CudaStream>, major: i32) -> Result<Lt> {
        let mut handle: lt::cublasLtHandle_t = std::ptr::null_mut();
        // SAFETY: writes a new handle into `handle`.
        lt_check(unsafe { lt::cublasLtCreate(&mut handle) }, "cuBLASLt handle").map_err(err)?;
        // NVIDIA's recommendation: 32 MiB of workspace on Hopper, 4 MiB before.
        let size = if major >= 9 { 32 << 20 } else { 4 << 20 };
        let workspace = match stream.alloc_zeros::<u8>(size) {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: the handle made above, not used anywhere else.
                unsafe { lt::cublasLtDestroy(handle) };
                return Err(derr(e));
            }
        };
        Ok(Lt { handle, workspace, plans: std::sync::Mutex::new(HashMap::new()) })
    }

    /// D = C = alpha op(A) op(B) + beta C (column-major, `shape`), on `stream`, with the shape's cached plan.
    ///
    /// # Safety
    /// The pointers must be device addresses of buffers that hold the operands `shape` describes.
    #[allow(clippy::too_many_arguments)]
    unsafe fn matmul(
        &self,
        stream: &CudaStream,
        mut shape: LtShape,
        a: u64,
        b: u64,
        c: u64,
        alpha: f32,
        beta: f32,
    ) -> std::result::Result<(), String> {
        use cudarc::driver::DevicePtr;
        shape.align = [align_of(a), align_of(b), align_of(c)];
        let mut plans = self.plans.lock().map_err(|_| "the cuBLASLt plan cache is poisoned".to_string())?;
        // Training sequences of every length make new shapes: keep the cache bounded (plans are cheap to remake).
        if plans.len() >= MAX_PLANS && !plans.contains_key(&shape) {
            plans.clear();
        }
        let plan = match plans.entry(shape) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(LtPlan::new(self.handle, &shape, self.workspace.len())?)
            }
        };
        // The workspace's address (cuBLASLt writes to it; this struct owns it and every call is on one stream).
        let (w, _g) = self.workspace.device_ptr(stream);
        lt_check(
            lt::cublasLtMatmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const _,
                a as *const _,
                plan.a,
                b as *const _,
                plan.b,
                &beta as *const f32 as *const _,
                c as *const _,
                plan.c,
                c as *mut _,
                plan.c,
                &plan.algo,
                w as *mut _,
                self.workspace.len(),
                stream.cu_stream() as *mut _,
            ),
            "cublasLtMatmul",
        )
    }
}

/// Where an attention call's q, k and v rows (or their gradients) start on the device and how many elements apart
/// their rows are, so they can be column blocks of one fused QKV buffer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnRows {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub q_stride: usize,
    pub kv_stride: usize,
}

/// A device with every kernel loaded.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub arch: &'static str,
    pub name: String,
    _modules: Vec<Arc<CudaModule>>,
    funcs: HashMap<String, CudaFunction>,
    blas: Lt,
    /// Whether `matmul_dev` takes the hand-written GEMV for decode-sized products (default on; `bench-gpu` turns
    /// it off to measure cuBLASLt alone).
    pub gemv: std::sync::atomic::AtomicBool,
    /// How `matmul_dev` computes a one-row product of each (k, n) shape `tune_gemv` measured; other shapes take
    /// `gemv_m1_f16` with one warp per output feature.
    gemv_plan: std::sync::Mutex<HashMap<(usize, usize), GemvChoice>>,
    /// Whether the decoder uses the fused kernels where they apply: RoPE + cache store, decode attention's chunks
    /// merged by each head's last block, and at batch 1 SwiGLU as the gate/up GEMV's epilogue and the residual
    /// add + RMSNorm in the o and down GEMVs (default on; `bench-gpu` also measures without them).
    pub fuse: std::sync::atomic::AtomicBool,
    /// Whether attention uses the tensor-core kernels (`flash_attn_mma_d{64,128}_f16` forward,
    /// `flash_attn_bwd_{dq,dkdv}_mma_d{64,128}_f16` backward) where they apply: head size 64 or 128, 16-byte
    /// aligned rows, sm_80 or later (the default there, unless `RLAIFD_CUDA_MMA_ATTENTION=0`).
    pub mma_attention: std::sync::atomic::AtomicBool,
    sms: usize,
    /// Blocks of `attn_decode_f16` one SM holds at once (the driver's occupancy for 128 threads, at load; 8 if it
    /// cannot tell): `decode_split` fits the chunks of all heads into one wave of them. Tests change it to reach
    /// other splits.
    pub decode_blocks_per_sm: std::sync::atomic::AtomicUsize,
    /// The ticket counter of `gemv_add_rmsnorm_m1_f16` (0 between launches: its last block resets it). One is
    /// enough: the launches of the one stream run one after another.
    ticket: CudaSlice<u32>,
}

pub(crate) fn derr(e: cudarc::driver::DriverError) -> EngineError {
    err(format!("CUDA: {e:?}"))
}

/// The launch of a `gemv.cu` kernel that puts `warps` warps to work: blocks of 8 warps (256 threads).
fn gemv_cfg(warps: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (warps.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

pub(crate) fn cfg1(n: usize, block: u32) -> LaunchConfig {
    let blocks = n.div_ceil(block as usize).clamp(1, 65_535 * 8) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

pub(crate) fn to_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| err(format!("{what} = {v} does not fit the kernels' 32-bit indices")))
}

impl Gpu {
    /// Opens device `ordinal` and compiles the kernels for it. Ok(None) with the reason when there is no usable
    /// GPU (no driver, no device); Err when a GPU exists but the kernels cannot be built.
    pub fn open(ordinal: usize) -> Result<std::result::Result<Gpu, String>> {
        if let Err(why) = driver_status() {
            return Ok(Err(why));
        }
        if let Err(why) = nvrtc_status() {
            return Ok(Err(why));
        }
        if let Err(why) = cublaslt_status() {
            return Ok(Err(why));
        }
        let ctx = match CudaContext::new(ordinal) {
            Ok(c) => c,
            Err(e) => return Ok(Err(format!("no CUDA device {ordinal}: {e:?}"))),
        };
        let (major, minor) = ctx.compute_capability().map_err(derr)?;
        let arch = arch_name(major, minor);
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let mut modules = Vec::new();
        let mut funcs = HashMap::new();
        for c in compile_all(arch)? {
            let m = ctx.load_module(c.ptx).map_err(derr)?;
            for k in &c.kernels {
                let f = m.load_function(k).map_err(|e| err(format!("kernels/{}: cannot load {k}: {e:?}", c.file)))?;
                funcs.insert(k.clone(), f);
            }
            modules.push(m);
        }
        if major >= 8 {
            // The tensor-core dK/dV kernel stages 64 keys, values, queries and output gradients: 68 KiB at head
            // size 128, past the 48 KiB a launch gets without asking.
            if let Some(f) = funcs.get("flash_attn_bwd_dkdv_mma_d128_f16") {
                f.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    dkdv_mma_smem(128) as i32,
                )
                .map_err(derr)?;
            }
        }
        // One non-blocking stream for everything (the legacy default stream cannot be captured into a CUDA graph).
        // SAFETY: all work of this context goes through that one stream, so cudarc's cross-stream event tracking
        // is not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(derr)?;
        // Keep freed device memory in the pool instead of returning it at every synchronisation (allocations stay
        // cheap between decode steps and training passes; like a framework's caching allocator).
        let pool = Self::mem_pool(&ctx)?;
        let mut keep = u64::MAX;
        // SAFETY: a valid pool of this device and a u64 attribute value, as the driver API specifies.
        unsafe {
            cudarc::driver::sys::cuMemPoolSetAttribute(
                pool,
                cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut keep as *mut u64 as *mut _,
            )
        }
        .result()
        .map_err(derr)?;
        let blas = Lt::new(&stream, major)?;
        let sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(derr)?
            .max(1) as usize;
        let ticket = stream.alloc_zeros::<u32>(1).map_err(derr)?;
        let per_sm = funcs
            .get("attn_decode_f16")
            .and_then(|f| f.occupancy_max_active_blocks_per_multiprocessor(128, 0, None).ok())
            .filter(|&n| n > 0)
            .map_or(8, |n| n.min(32) as usize);
        let decode_blocks_per_sm = std::sync::atomic::AtomicUsize::new(per_sm);
        Ok(Ok(Gpu {
            ctx,
            stream,
            arch,
            name,
            _modules: modules,
            funcs,
            blas,
            gemv: std::sync::atomic::AtomicBool::new(true),
            gemv_plan: Default::default(),
            fuse: std::sync::atomic::AtomicBool::new(true),
            mma_attention: std::sync::atomic::AtomicBool::new(major >= 8 && mma_attention_allowed()),
            sms,
            decode_blocks_per_sm,
            ticket,
        }))
    }

    fn mem_pool(ctx: &CudaContext) -> Result<cudarc::driver::sys::CUmemoryPool> {
        let mut pool = std::ptr::null_mut();
        ctx.bind_to_thread().map_err(derr)?;
        // SAFETY: writes the device's default pool handle into `pool`.
        unsafe { cudarc::driver::sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }.result().map_err(derr)?;
        Ok(pool)
    }

    /// The most device memory allocated at once since the last `reset_peak_memory` (bytes; every buffer of this
    /// crate comes from the device's default pool), like torch.cuda.max_memory_allocated.
    pub fn peak_memory(&self) -> Result<u64> {
        let pool = Self::mem_pool(&self.ctx)?;
        let mut v = 0u64;
        // SAFETY: reads a u64 attribute of a valid pool.
        unsafe {
            cudarc::driver::sys::cuMemPoolGetAttribute(
                pool,
                cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut v as *mut u64 as *mut _,
            )
        }
        .result()
        .map_err(derr)?;
        Ok(v)
    }

    pub fn reset_peak_memory(&self) -> Result<()> {
        self.stream.synchronize().map_err(derr)?;
        let pool = Self::mem_pool(&self.ctx)?;
        let mut zero = 0u64;
        // SAFETY: resets the high-water mark of a valid pool (the attribute takes 0).
        unsafe {
            cudarc::driver::sys::cuMemPoolSetAttribute(
                pool,
                cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut zero as *mut u64 as *mut _,
            )
        }
        .result()
        .map_err(derr)
    }

    /// The device address of a buffer plus `offset` elements, for kernels that take a sub-matrix (a column block of
    /// a fused buffer). The caller keeps the buffer alive and in bounds for the launch.
    pub(crate) fn dptr<T>(&self, s: &CudaSlice<T>, offset: usize) -> u64 {
        use cudarc::driver::DevicePtr;
        let (p, _guard) = s.device_ptr(&self.stream);
        p + (offset * std::mem::size_of::<T>()) as u64
    }

    /// C = alpha op(A) op(B) + beta C on row-major fp16 matrices (fp32 compute), with leading dimensions, so column
    /// blocks of wider buffers work: op(A) is m x k (A stored m x k, or k x m when `ta`), op(B) is k x n (B stored
    /// k x n, or n x k when `tb`), C is m x n. cuBLASLt is column-major: this is C^T = op(B)^T op(A)^T.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        a: &cudarc::driver::CudaView<f16>,
        lda: usize,
        ta: bool,
        b: &cudarc::driver::CudaView<f16>,
        ldb: usize,
        tb: bool,
        c: &mut cudarc::driver::CudaViewMut<f16>,
        ldc: usize,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let a_need = if ta { (k - 1) * lda + m } else { (m - 1) * lda + k };
        let b_need = if tb { (n - 1) * ldb + k } else { (k - 1) * ldb + n };
        if m == 0 || n == 0 || k == 0 || a.len() < a_need || b.len() < b_need || c.len() < (m - 1) * ldc + n {
            return Err(err(format!("gemm {m}x{k}x{n}: a sub-matrix exceeds its buffer")));
        }
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let (pa, _ga) = a.device_ptr(&self.stream);
        let (pb, _gb) = b.device_ptr(&self.stream);
        let (pc, _gc) = c.device_ptr_mut(&self.stream);
        let shape = LtShape {
            transa: tb,
            transb: ta,
            m: n as u64,
            n: m as u64,
            k: k as u64,
            lda: ldb as i64,
            ldb: lda as i64,
            ldc: ldc as i64,
            align: [0; 3],
        };
        // SAFETY: every operand's extent was checked against its view above.
        unsafe { self.blas.matmul(&self.stream, shape, pb, pa, pc, alpha, beta) }
            .map_err(|e| err(format!("cuBLASLt gemm {m}x{k}x{n}: {e}")))
    }

    pub(crate) fn f(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs.get(name).ok_or_else(|| err(format!("kernel {name} is not loaded")))
    }

    pub fn upload_f16(&self, x: &[f32]) -> Result<CudaSlice<f16>> {
        let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        self.stream.clone_htod(&h).map_err(derr)
    }

    pub fn download_f16(&self, x: &CudaSlice<f16>) -> Result<Vec<f32>> {
        use half::slice::HalfFloatSliceExt;
        let h = self.stream.clone_dtoh(x).map_err(derr)?;
        // The slice conversion (F16C, several values per instruction where the CPU has it): a decode step's
        // logits row (32064 values) widens in about 5 us instead of the 38 us of one value at a time.
        let mut out = vec![0.0f32; h.len()];
        h.convert_to_f32_slice(&mut out);
        Ok(out)
    }

    /// An fp16 buffer filled with NaN, so a kernel that skips an output is caught.
    pub fn poisoned_f16(&self, n: usize) -> Result<CudaSlice<f16>> {
        self.stream.clone_htod(&vec![f16::NAN; n.max(1)]).map_err(derr)
    }

    /// y[m, n] = x[m, k] W[n, k]^T (a linear layer, row-major) on device buffers: cuBLASLt, fp16 in and out,
    /// fp32 compute. cuBLAS is column-major: this is C (n x m) = op(A) B with A = W (k x n, transposed) and
    /// B = x (k x m), which is y in row-major order.
    pub fn linear_device(
        &self,
        x: &CudaSlice<f16>,
        w: &CudaSlice<f16>,
        y: &mut CudaSlice<f16>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        if x.len() < m * k || w.len() < n * k || y.len() < m * n {
            return Err(err(format!("linear: buffers too small for m {m}, k {k}, n {n}")));
        }
        self.gemm(&x.slice(..), k, false, &w.slice(..), k, true, &mut y.slice_mut(..), n, m, n, k, 1.0, 0.0)
    }

    /// y[n] = x[k] W[n, k]^T with the hand-written GEMV (`kernels/gemv.cu`): one row, k a multiple of 8, one warp
    /// per output feature.
    pub fn gemv_dev(
        &self,
        x: &CudaSlice<f16>,
        w: &CudaSlice<f16>,
        y: &mut CudaSlice<f16>,
        k: usize,
        n: usize,
    ) -> Result<()> {
        self.gemv_split_dev(x, w, y, k, n, 1)
    }

    /// `gemv_dev` with `split` warps per output feature (1, 2, 4 or 8), each summing every split-th stretch of the
    /// row.
    pub fn gemv_split_dev(
        &self,
        x: &CudaSlice<f16>,
        w: &CudaSlice<f16>,
        y: &mut CudaSlice<f16>,
        k: usize,
        n: usize,
        split: usize,
    ) -> Result<()> {
        if !k.is_multiple_of(8) || ![1, 2, 4, 8].contains(&split) || x.len() < k || w.len() < n * k || y.len() < n {
            return Err(err(format!("gemv_m1_f16: k {k} (a multiple of 8), split {split} (1, 2, 4 or 8), n {n} or buffer sizes out of range")));
        }
        let (ki, ni, si) = (to_i32(k, "k")?, to_i32(n, "n")?, split as i32);
        let mut b = self.stream.launch_builder(self.f("gemv_m1_f16")?);
        b.arg(y).arg(x).arg(w).arg(&ki).arg(&ni).arg(&si);
        unsafe { b.launch(gemv_cfg(n * split)) }.map_err(derr)?;
        Ok(())
    }

    /// t = x W^T for one row (`split` warps per output feature, as `gemv_split_dev`), then the residual add and
    /// RMSNorm that follow it in a decoder: h += t, out = h / sqrt(mean(h^2) + eps) * norm_w, all in one launch
    /// (`gemv_add_rmsnorm_m1_f16`: its last block does the add and the norm). The values of `gemv_split_dev` then
    /// `add_rmsnorm_dev`, the sum of squares added in another order.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_add_rmsnorm_dev(
        &self,
        out: &mut CudaSlice<f16>,
        h: &mut CudaSlice<f16>,
        t: &mut CudaSlice<f16>,
        norm_w: &CudaSlice<f16>,
        x: &CudaSlice<f16>,
        w: &CudaSlice<f16>,
        k: usize,
        n: usize,
        split: usize,
        eps: f32,
    ) -> Result<()> {
        if !k.is_multiple_of(8)
            || ![1, 2, 4, 8].contains(&split)
            || x.len() < k
            || w.len() < n * k
            || [t.len(), h.len(), out.len(), norm_w.len()].iter().any(|&l| l < n)
        {
            return Err(err(format!("gemv_add_rmsnorm_m1_f16: k {k} (a multiple of 8), split {split} (1, 2, 4 or 8), n {n} or buffer sizes out of range")));
        }
        let (ki, ni, si) = (to_i32(k, "k")?, to_i32(n, "n")?, split as i32);
        let mut b = self.stream.launch_builder(self.f("gemv_add_rmsnorm_m1_f16")?);
        b.arg(out).arg(h).arg(t).arg(norm_w).arg(x).arg(w).arg(&ki).arg(&ni).arg(&si).arg(&eps).arg(&self.ticket);
        unsafe { b.launch(gemv_cfg(n * split)) }.map_err(derr)?;
        Ok(())
    }

    /// act[inter] = silu(x W_gate^T) * (x W_up^T) for one row, w = [W_gate | W_up] ([2 inter, k], a fused gate/up
    /// projection): `gemv_swiglu_m1_f16`, the gate/up GEMV with SwiGLU as its epilogue (the values `matmul_dev` +
    /// `swiglu_fused_dev` give). `split` warps per row (1, 2 or 4), k a multiple of 8.
    pub fn gemv_swiglu_dev(
        &self,
        x: &CudaSlice<f16>,
        w: &CudaSlice<f16>,
        act: &mut CudaSlice<f16>,
        k: usize,
        inter: usize,
        split: usize,
    ) -> Result<()> {
        if !k.is_multiple_of(8)
            || ![1, 2, 4].contains(&split)
            || x.len() < k
            || w.len() < 2 * inter * k
            || act.len() < inter
        {
            return Err(err(format!("gemv_swiglu_m1_f16: k {k} (a multiple of 8), split {split} (1, 2 or 4), inter {inter} or buffer sizes out of range")));
        }
        let (ki, ii, si) = (to_i32(k, "k")?, to_i32(inter, "inter")?, split as i32);
        let mut b = self.stream.launch_builder(self.f("gemv_swiglu_m1_f16")?);
        b.arg(act).arg(x).arg(w).arg(&ki).arg(&ii).arg(&si);
        unsafe { b.launch(gemv_cfg(2 * inter * split)) }.map_err(derr)?;
        Ok(())
    }

    /// `gemv_swiglu_dev` on host data: x [k] against [W_gate | W_up] [2 inter, k].
    pub fn gemv_swiglu(&self, x: &[f32], w: &[f32], split: usize) -> Result<Vec<f32>> {
        let k = x.len();
        let inter = w.len() / (2 * k).max(1);
        let (dx, dw) = (self.upload_f16(x)?, self.upload_f16(w)?);
        let mut y = self.poisoned_f16(inter)?;
        self.gemv_swiglu_dev(&dx, &dw, &mut y, k, inter, split)?;
        self.download_f16(&y)
    }

    /// A linear layer on device buffers. One row (a batch-1 decode step: bandwidth-bound) goes through the GEMV
    /// kernel, or cuBLASLt where `tune_gemv` found it faster for the shape; more rows through cuBLASLt (from two
    /// rows on it matches the weight stream as well; BENCHMARKS.md).
    pub fn matmul_dev(
        &self,
        x: &CudaSlice<f16>,
        w: &CudaSlice<f16>,
        y: &mut CudaSlice<f16>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        if m == 1 && k.is_multiple_of(8) && self.gemv.load(std::sync::atomic::Ordering::Relaxed) {
            match self.gemv_choice(k, n) {
                Some(GemvChoice::Blas) => self.linear_device(x, w, y, m, k, n),
                Some(GemvChoice::Gemv(split)) => self.gemv_split_dev(x, w, y, k, n, split),
                None => self.gemv_dev(x, w, y, k, n),
            }
        } else {
            self.linear_device(x, w, y, m, k, n)
        }
    }

    /// How a one-row product of shape (k, n) runs, if `tune_gemv` measured it.
    pub fn gemv_choice(&self, k: usize, n: usize) -> Option<GemvChoice> {
        self.gemv_plan.lock().ok()?.get(&(k, n)).copied()
    }

    /// GPU time per call of `op(0..calls)` (us): a warm-up pass, then the median of 3 timed passes over the calls.
    pub fn time_passes(&self, calls: usize, op: &mut dyn FnMut(usize) -> Result<()>) -> Result<f64> {
        let mut pass = || -> Result<f64> {
            self.stream.synchronize().map_err(derr)?;
            let t = std::time::Instant::now();
            for i in 0..calls {
                op(i)?;
            }
            self.stream.synchronize().map_err(derr)?;
            Ok(t.elapsed().as_secs_f64() * 1e6 / calls.max(1) as f64)
        };
        pass()?;
        let mut t = [pass()?, pass()?, pass()?];
        t.sort_by(f64::total_cmp);
        Ok(t[1])
    }

    /// Measures, for each one-row product shape (k, n) with its weight matrices (a decoder's layers: together
    /// larger than the L2 cache, as a decode step reads them), `gemv_m1_f16` with 1, 2, 4 and 8 warps per output
    /// feature and cuBLASLt, and keeps the fastest for `matmul_dev`. Returns one line per shape: the times (us per
    /// product, median of 3 passes over the matrices after a warm-up pass) and the pick.
    pub fn tune_gemv(&self, shapes: &[(usize, usize, Vec<&CudaSlice<f16>>)]) -> Result<Vec<String>> {
        let mut lines = Vec::new();
        for (k, n, ws) in shapes {
            let (k, n) = (*k, *n);
            if ws.is_empty() || !k.is_multiple_of(8) {
                continue;
            }
            let x = self.stream.alloc_zeros::<f16>(k).map_err(derr)?;
            let mut y = self.stream.alloc_zeros::<f16>(n).map_err(derr)?;
            let mut best: Option<(GemvChoice, f64)> = None;
            let mut times = Vec::new();
            for choice in
                [GemvChoice::Gemv(1), GemvChoice::Gemv(2), GemvChoice::Gemv(4), GemvChoice::Gemv(8), GemvChoice::Blas]
            {
                let us = self.time_passes(ws.len(), &mut |i| match choice {
                    GemvChoice::Gemv(split) => self.gemv_split_dev(&x, ws[i], &mut y, k, n, split),
                    GemvChoice::Blas => self.linear_device(&x, ws[i], &mut y, 1, k, n),
                })?;
                times.push(format!("{choice} {us:.1}"));
                if best.is_none_or(|(_, b)| us < b) {
                    best = Some((choice, us));
                }
            }
            if let Some((choice, _)) = best {
                self.gemv_plan.lock().map_err(|_| err("the GEMV plan is poisoned"))?.insert((k, n), choice);
                lines.push(format!("k {k} n {n}: {} us -> {choice}", times.join(", ")));
            }
        }
        Ok(lines)
    }

    /// `len` values offset + scale * u, u uniform in [-1, 1), generated on the device from `seed` (random weights
    /// for benchmarks: `fill_uniform_f16`).
    pub fn fill_uniform(&self, len: usize, scale: f32, offset: f32, seed: u64) -> Result<CudaSlice<f16>> {
        let mut t = self.stream.alloc_zeros::<f16>(len.max(1)).map_err(derr)?;
        let l = len as i64;
        let mut b = self.stream.launch_builder(self.f("fill_uniform_f16")?);
        b.arg(&mut t).arg(&l).arg(&seed).arg(&scale).arg(&offset);
        unsafe { b.launch(cfg1(len, 256)) }.map_err(derr)?;
        Ok(t)
    }

    /// `gemv_dev` on host data: x [k] against W [n, k].
    pub fn gemv(&self, x: &[f32], w: &[f32]) -> Result<Vec<f32>> {
        let (k, n) = (x.len(), w.len() / x.len().max(1));
        let (dx, dw) = (self.upload_f16(x)?, self.upload_f16(w)?);
        let mut y = self.poisoned_f16(n)?;
        self.gemv_dev(&dx, &dw, &mut y, k, n)?;
        self.download_f16(&y)
    }

    /// `linear_device` on host data.
    pub fn linear(&self, x: &[f32], w: &[f32], k: usize) -> Result<Vec<f32>> {
        let (m, n) = (x.len() / k.max(1), w.len() / k.max(1));
        let (dx, dw) = (self.upload_f16(x)?, self.upload_f16(w)?);
        let mut y = self.poisoned_f16(m * n)?;
        self.linear_device(&dx, &dw, &mut y, m, k, n)?;
        self.download_f16(&y)
    }

    pub fn f32_to_f16(&self, x: &[f32]) -> Result<Vec<f32>> {
        let src = self.stream.clone_htod(x).map_err(derr)?;
        let mut out = self.poisoned_f16(x.len())?;
        let n = x.len() as i64;
        let mut b = self.stream.launch_builder(self.f("f32_to_f16")?);
        b.arg(&mut out).arg(&src).arg(&n);
        unsafe { b.launch(cfg1(x.len(), 256)) }.map_err(derr)?;
        self.download_f16(&out)
    }

    pub fn f16_to_f32(&self, x: &[f32]) -> Result<Vec<f32>> {
        let src = self.upload_f16(x)?;
        let mut out = self.stream.clone_htod(&vec![f32::NAN; x.len().max(1)]).map_err(derr)?;
        let n = x.len() as i64;
        let mut b = self.stream.launch_builder(self.f("f16_to_f32")?);
        b.arg(&mut out).arg(&src).arg(&n);
        unsafe { b.launch(cfg1(x.len(), 256)) }.map_err(derr)?;
        self.stream.clone_dtoh(&out).map_err(derr)
    }

    // -- launches on device buffers (the decoder uses these; the host wrappers below upload, call, download) --

    /// out = RMSNorm of `rows` rows of x by w (w.len() columns).
    pub fn rmsnorm_dev(
        &self,
        out: &mut CudaSlice<f16>,
        x: &CudaSlice<f16>,
        w: &CudaSlice<f16>,
        rows: usize,
        eps: f32,
    ) -> Result<()> {
        let c = to_i32(w.len(), "cols")?;
        let mut b = self.stream.launch_builder(self.f("rmsnorm_f16")?);
        b.arg(out).arg(x).arg(w).arg(&c).arg(&eps);
        unsafe {
            b.launch(LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 })
        }
        .map_err(derr)?;
        Ok(())
    }

    /// RoPE in place on x (tokens = pos.len() rows of `heads` x `head_dim`), tables [max_pos, head_dim / 2].
    #[allow(clippy::too_many_arguments)]
    pub fn rope_dev(
        &self,
        x: &mut CudaSlice<f16>,
        pos: &CudaSlice<i32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        self.rope_strided_dev(x, pos, cos, sin, tokens, heads, head_dim, heads * head_dim)
    }

    /// RoPE on the first `heads` heads of rows `stride` elements apart (q and k of a fused QKV buffer in one launch).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_strided_dev(
        &self,
        x: &mut CudaSlice<f16>,
        pos: &CudaSlice<i32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        stride: usize,
    ) -> Result<()> {
        if pos.len() < tokens || x.len() < tokens.saturating_sub(1) * stride + heads * head_dim {
            return Err(err(format!(
                "rope: {tokens} rows of {heads} x {head_dim} (stride {stride}) exceed the buffers"
            )));
        }
        let (t, h, d, st) = (
            to_i32(tokens, "tokens")?,
            to_i32(heads, "heads")?,
            to_i32(head_dim, "head_dim")?,
            to_i32(stride, "stride")?,
        );
        let mut b = self.stream.launch_builder(self.f("rope_f16")?);
        b.arg(x).arg(pos).arg(cos).arg(sin).arg(&t).arg(&h).arg(&d).arg(&st);
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (tokens as u32, heads as u32, 1),
                block_dim: (64, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(derr)?;
        Ok(())
    }

    /// x += r (in place), then out = RMSNorm of x by w, over `rows` rows (`add_rmsnorm_f16`).
    pub fn add_rmsnorm_dev(
        &self,
        out: &mut CudaSlice<f16>,
        x: &mut CudaSlice<f16>,
        r: &CudaSlice<f16>,
        w: &CudaSlice<f16>,
        rows: usize,
        eps: f32,
    ) -> Result<()> {
        let c = to_i32(w.len(), "cols")?;
        let mut b = self.stream.launch_builder(self.f("add_rmsnorm_f16")?);
        b.arg(out).arg(x).arg(r).arg(w).arg(&c).arg(&eps);
        // 1024 threads: at decode batch sizes there are only a few rows, so each row's latency is what counts.
        unsafe {
            b.launch(LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 })
        }
        .map_err(derr)?;
        Ok(())
    }

    /// out = silu(gate) * up where gu holds `rows` rows of [gate (cols) | up (cols)] (a fused gate/up projection).
    pub fn swiglu_fused_dev(
        &self,
        out: &mut CudaSlice<f16>,
        gu: &CudaSlice<f16>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        if gu.len() < rows * 2 * cols || out.len() < rows * cols {
            return Err(err("swiglu: buffers too small"));
        }
        let (r, c, st) = (rows as i64, to_i32(cols, "cols")?, to_i32(2 * cols, "stride")?);
        let up = gu.slice(cols..);
        let mut b = self.stream.launch_builder(self.f("swiglu_f16")?);
        b.arg(out).arg(gu).arg(&up).arg(&r).arg(&c).arg(&st);
        unsafe { b.launch(cfg1(rows * cols, 256)) }.map_err(derr)?;
        Ok(())
    }

    /// out = table rows for device ids (already checked against the vocabulary on the host); `flag` is a scratch
    /// int the kernel may set. Capturable in a CUDA graph (no host round trip).
    pub fn embedding_ids_dev(
        &self,
        out: &mut CudaSlice<f16>,
        table: &CudaSlice<f16>,
        dim: usize,
        ids: &CudaSlice<i32>,
        n: usize,
        flag: &mut CudaSlice<i32>,
    ) -> Result<()> {
        let vocab = table.len() / dim.max(1);
        let (nn, d, v) = (to_i32(n, "tokens")?, to_i32(dim, "dim")?, to_i32(vocab, "vocab")?);
        let mut b = self.stream.launch_builder(self.f("embedding_gather_f16")?);
        b.arg(out).arg(table).arg(ids).arg(&nn).arg(&d).arg(&v).arg(flag);
        unsafe {
            b.launch(LaunchConfig { grid_dim: (n.max(1) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 })
        }
        .map_err(derr)?;
        Ok(())
    }

    /// out = silu(gate) * up over `rows` x `cols`.
    pub fn swiglu_dev(
        &self,
        out: &mut CudaSlice<f16>,
        gate: &CudaSlice<f16>,
        up: &CudaSlice<f16>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let (r, c) = (rows as i64, to_i32(cols, "cols")?);
        let mut b = self.stream.launch_builder(self.f("swiglu_f16")?);
        b.arg(out).arg(gate).arg(up).arg(&r).arg(&c).arg(&c);
        unsafe { b.launch(cfg1(rows * cols, 256)) }.map_err(derr)?;
        Ok(())
    }

    /// y += x over n elements.
    pub fn residual_add_dev(&self, y: &mut CudaSlice<f16>, x: &CudaSlice<f16>, n: usize) -> Result<()> {
        let nn = n as i64;
        let mut b = self.stream.launch_builder(self.f("residual_add_f16")?);
        b.arg(y).arg(x).arg(&nn);
        unsafe { b.launch(cfg1(n, 256)) }.map_err(derr)?;
        Ok(())
    }

    /// out[..n] = x with LoRA dropout (`kernels/lora.cu`: the CPU backend's mask for mask seed `base`, drop
    /// probability `p`, kept elements scaled by 1 / (1 - p)).
    pub fn lora_dropout_dev(
        &self,
        out: &mut CudaSlice<f16>,
        x: &CudaSlice<f16>,
        n: usize,
        base: u64,
        p: f64,
    ) -> Result<()> {
        self.dropout_launch("lora_dropout_f16", out, x, n, base, p)
    }

    /// dx[..n] += dxl through the mask of `lora_dropout_dev` with the same `base` and `p`.
    pub fn lora_dropout_bwd_add_dev(
        &self,
        dx: &mut CudaSlice<f16>,
        dxl: &CudaSlice<f16>,
        n: usize,
        base: u64,
        p: f64,
    ) -> Result<()> {
        self.dropout_launch("lora_dropout_bwd_add_f16", dx, dxl, n, base, p)
    }

    /// One of the two dropout kernels (same arguments: out, in, n, mask seed, threshold, keep scale).
    fn dropout_launch(
        &self,
        kernel: &str,
        out: &mut CudaSlice<f16>,
        x: &CudaSlice<f16>,
        n: usize,
        base: u64,
        p: f64,
    ) -> Result<()> {
        let (nn, thr, keep) = (n as i64, dropout_threshold(p), (1.0 / (1.0 - p)) as f32);
        let mut b = self.stream.launch_builder(self.f(kernel)?);
        b.arg(out).arg(x).arg(&nn).arg(&base).arg(&thr).arg(&keep);
        unsafe { b.launch(cfg1(n, 256)) }.map_err(derr)?;
        Ok(())
    }

    /// out = rows of `table` ([vocab, dim]) for `ids`; an id outside the vocabulary is an error naming it.
    pub fn embedding_dev(
        &self,
        out: &mut CudaSlice<f16>,
        table: &CudaSlice<f16>,
        dim: usize,
        ids: &[i32],
    ) -> Result<()> {
        let vocab = table.len() / dim.max(1);
        let di = self.stream.clone_htod(ids).map_err(derr)?;
        let mut e = self.stream.alloc_zeros::<i32>(1).map_err(derr)?;
        let (n, d, v) = (to_i32(ids.len(), "tokens")?, to_i32(dim, "dim")?, to_i32(vocab, "vocab")?);
        let mut b = self.stream.launch_builder(self.f("embedding_gather_f16")?);
        b.arg(out).arg(table).arg(&di).arg(&n).arg(&d).arg(&v).arg(&mut e);
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (ids.len().max(1) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(derr)?;
        let flag = self.stream.clone_dtoh(&e).map_err(derr)?[0];
        if flag > 0 {
            let at = (flag - 1) as usize;
            return Err(err(format!("token id {} at position {at} is outside the vocabulary of {vocab}", ids[at])));
        }
        Ok(())
    }

    /// out [n_q, heads_q, d] = attention of q [n_q, heads_q, d] over the first n_k rows of k/v [.., heads_kv, d];
    /// causal: query i sees keys up to i + n_k - n_q (a cached prefix).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_prefill_dev(
        &self,
        out: &mut CudaSlice<f16>,
        q: &CudaSlice<f16>,
        k: &CudaSlice<f16>,
        v: &CudaSlice<f16>,
        n_q: usize,
        n_k: usize,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        causal: bool,
    ) -> Result<()> {
        self.attention_prefill_lse_dev(out, None, q, k, v, n_q, n_k, heads_q, heads_kv, head_dim, causal)
    }

    /// `attention_prefill_dev` that also saves each row's log-sum-exp ([n_q, heads_q], fp32) for the backward pass.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_prefill_lse_dev(
        &self,
        out: &mut CudaSlice<f16>,
        lse: Option<&mut CudaSlice<f32>>,
        q: &CudaSlice<f16>,
        k: &CudaSlice<f16>,
        v: &CudaSlice<f16>,
        n_q: usize,
        n_k: usize,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        causal: bool,
    ) -> Result<()> {
        self.attention_prefill_strided_dev(
            out,
            lse,
            q,
            heads_q * head_dim,
            k,
            v,
            n_q,
            n_k,
            heads_q,
            heads_kv,
            head_dim,
            causal,
        )
    }

    /// `attention_prefill_lse_dev` with query rows `q_stride` elements apart (q inside a fused QKV buffer).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_prefill_strided_dev(
        &self,
        out: &mut CudaSlice<f16>,
        lse: Option<&mut CudaSlice<f32>>,
        q: &CudaSlice<f16>,
        q_stride: usize,
        k: &CudaSlice<f16>,
        v: &CudaSlice<f16>,
        n_q: usize,
        n_k: usize,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        causal: bool,
    ) -> Result<()> {
        if n_k < n_q && causal {
            return Err(err(format!("attention: fewer keys ({n_k}) than queries ({n_q})")));
        }
        let rows = AttnRows {
            q: self.dptr(q, 0),
            k: self.dptr(k, 0),
            v: self.dptr(v, 0),
            q_stride,
            kv_stride: heads_kv * head_dim,
        };
        self.attention_fwd_at(out, lse, rows, n_q, n_k, heads_q, heads_kv, head_dim, causal)
    }

    /// `flash_attn_prefill_f16`, or its tensor-core twin where `mma_attention` allows, on operands given by address
    /// and row stride (`AttnRows`): out [n_q, heads_q, d] and, when given, each row's log-sum-exp. The caller keeps the operands alive and large enough.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_fwd_at(
        &self,
        out: &mut CudaSlice<f16>,
        lse: Option<&mut CudaSlice<f32>>,
        x: AttnRows,
        n_q: usize,
        n_k: usize,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        causal: bool,
    ) -> Result<()> {
        if head_dim > 128
            || heads_kv == 0
            || !heads_q.is_multiple_of(heads_kv)
            || out.len() < n_q * heads_q * head_dim
            || lse.as_ref().is_some_and(|l| l.len() < n_q * heads_q)
        {
            return Err(err(format!("attention: head_dim {head_dim} (at most 128), heads {heads_q}/{heads_kv} (a multiple), {n_q} output and lse rows")));
        }
        let (nq, nk, hq, hk, d) = (
            to_i32(n_q, "n_q")?,
            to_i32(n_k, "n_k")?,
            to_i32(heads_q, "heads")?,
            to_i32(heads_kv, "heads")?,
            to_i32(head_dim, "head_dim")?,
        );
        let (qs, ks, os) = (to_i32(x.q_stride, "q stride")?, to_i32(x.kv_stride, "kv stride")?, hq * d);
        let scale = 1.0f32 / (head_dim as f32).sqrt();
        let c = i32::from(causal);
        let null = 0u64;
        // The tensor-core kernel: 64 query rows per block, k and v staged with 16-byte loads, q and out by pairs.
        let mma = self.mma_attention.load(std::sync::atomic::Ordering::Relaxed)
            && (head_dim == 64 || head_dim == 128)
            && (x.k | x.v).is_multiple_of(16)
            && x.kv_stride.is_multiple_of(8)
            && (x.q | self.dptr(out, 0)).is_multiple_of(4)
            && x.q_stride.is_multiple_of(2);
        let kernel = match (mma, head_dim) {
            (true, 64) => "flash_attn_mma_d64_f16",
            (true, _) => "flash_attn_mma_d128_f16",
            _ => "flash_attn_prefill_f16",
        };
        let mut b = self.stream.launch_builder(self.f(kernel)?);
        b.arg(out).arg(&x.q).arg(&x.k).arg(&x.v).arg(&nq).arg(&nk).arg(&hq).arg(&hk);
        if !mma {
            b.arg(&d);
        }
        b.arg(&qs).arg(&ks).arg(&os).arg(&scale).arg(&c);
        match lse {
            Some(l) => b.arg(l),
            None => b.arg(&null),
        };
        let grid = (n_q.div_ceil(if mma { 64 } else { 16 }).max(1) as u32, heads_q as u32, 1);
        unsafe { b.launch(LaunchConfig { grid_dim: grid, block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }
            .map_err(derr)?;
        Ok(())
    }

    /// How `attention_decode_dev` splits `max_total` keys for `bsz` sequences of `heads_q` heads: (chunk, nsplit).
    /// The blocks of all chunks fit on the GPU at once where they can (`decode_blocks_per_sm` times the SMs): each
    /// warp's keys are a latency-bound chain of loads, so a second wave of blocks adds its latency while the total
    /// chain stays as long, and fewer chunks leave less to merge. Each chunk is at least 32 keys (8 per warp: one
    /// round of loads).
    pub fn decode_split(&self, max_total: usize, bsz: usize, heads_q: usize) -> (usize, usize) {
        let slots = self.decode_blocks_per_sm.load(std::sync::atomic::Ordering::Relaxed).max(1) * self.sms;
        let per_seq = (slots / (bsz * heads_q).max(1)).max(1);
        let chunk = max_total.div_ceil(per_seq).max(32);
        (chunk, max_total.div_ceil(chunk).max(1))
    }

    /// Floats of the workspace `attention_decode_dev` needs: the partial states, then a ticket counter per
    /// (sequence, head). It must start zeroed (the counters; each launch leaves them at 0).
    pub fn decode_part_len(&self, max_total: usize, bsz: usize, heads_q: usize, head_dim: usize) -> usize {
        let (_, nsplit) = self.decode_split(max_total, bsz, heads_q);
        if nsplit > 1 {
            bsz * heads_q * (nsplit * (head_dim + 2) + 1)
        } else {
            1
        }
    }

    /// Decode attention on device buffers (flash-decoding): one query per sequence, q rows `q_stride` apart (heads_q
    /// x d each), keys 0..prefix_len from the shared prefix cache (rows of heads_kv * d), then suf_lens[b] keys from
    /// sequence b's suffix cache (sequence b at b * suf_seq_stride); out [bsz, heads_q, d]. `max_total` (prefix_len
    /// plus the suffix capacity) fixes the split, so a captured graph replays for every step; `part` is the
    /// workspace (`decode_part_len`, zeroed when allocated). With `fuse` on, each head's last block merges the
    /// chunks; off, `attn_decode_combine_f16` does. `prefetch`: weights the next op reads (the o projection's),
    /// brought into L2 by the launch's threads after their own loads.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode_dev(
        &self,
        out: &mut CudaSlice<f16>,
        q: &CudaSlice<f16>,
        q_stride: usize,
        pk: &CudaSlice<f16>,
        pv: &CudaSlice<f16>,
        prefix_len: usize,
        sk: &CudaSlice<f16>,
        sv: &CudaSlice<f16>,
        suf_lens: &CudaSlice<i32>,
        suf_seq_stride: usize,
        bsz: usize,
        max_total: usize,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        part: &mut CudaSlice<f32>,
        prefetch: Option<&CudaSlice<f16>>,
    ) -> Result<()> {
        if head_dim > 128 || heads_kv == 0 || !heads_q.is_multiple_of(heads_kv) || bsz == 0 || suf_lens.len() < bsz {
            return Err(err(format!(
                "attention: head_dim {head_dim} (at most 128), heads {heads_q}/{heads_kv} (a multiple), batch {bsz}"
            )));
        }
        let (chunk, nsplit) = self.decode_split(max_total, bsz, heads_q);
        if part.len() < self.decode_part_len(max_total, bsz, heads_q, head_dim) {
            return Err(err("attention: decode workspace too small"));
        }
        let row = to_i32(heads_kv * head_dim, "row")?;
        let (pl, hq, hk, d) = (
            to_i32(prefix_len, "prefix length")?,
            to_i32(heads_q, "heads")?,
            to_i32(heads_kv, "heads")?,
            to_i32(head_dim, "head_dim")?,
        );
        let (qs, os, ch, ns) =
            (to_i32(q_stride, "q stride")?, hq * d, to_i32(chunk, "chunk")?, to_i32(nsplit, "splits")?);
        let seq_stride = suf_seq_stride as i64;
        let scale = 1.0f32 / (head_dim as f32).sqrt();
        // The chunks merged by the last block of each head (fused, the default), or by a second launch.
        let here = i32::from(self.fuse.load(std::sync::atomic::Ordering::Relaxed));
        let mut b = self.stream.launch_builder(self.f("attn_decode_f16")?);
        b.arg(&mut *out)
            .arg(q)
            .arg(pk)
            .arg(pv)
            .arg(&pl)
            .arg(&row)
            .arg(sk)
            .arg(sv)
            .arg(suf_lens)
            .arg(&seq_stride)
            .arg(&row)
            .arg(&hq)
            .arg(&hk)
            .arg(&d)
            .arg(&qs)
            .arg(&os)
            .arg(&scale)
            .arg(&mut *part)
            .arg(&ch)
            .arg(&here);
        let (null, pf_bytes) = (0u64, prefetch.map_or(0i64, |w| (w.len() * 2) as i64));
        match prefetch {
            Some(w) => b.arg(w),
            None => b.arg(&null),
        };
        b.arg(&pf_bytes);
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (bsz as u32, heads_q as u32, nsplit as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(derr)?;
        if nsplit > 1 && here == 0 {
            let mut b = self.stream.launch_builder(self.f("attn_decode_combine_f16")?);
            b.arg(out).arg(&*part).arg(&ns).arg(&hq).arg(&d).arg(&os);
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (bsz as u32, heads_q as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map_err(derr)?;
        }
        Ok(())
    }

    /// RoPE on the q and k heads of a fused QKV buffer (rows of `qkv_stride`: q heads, k heads, v heads) and the
    /// store of k and v into the caches, in one kernel (`rope_kv_store_f16`): what `rope_strided_dev` over the q and
    /// k heads followed by `kv_store_dev` do, with the same destinations (`lens` per sequence, else `start`).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_kv_store_dev(
        &self,
        qkv: &mut CudaSlice<f16>,
        kc: &mut CudaSlice<f16>,
        vc: &mut CudaSlice<f16>,
        pos: &CudaSlice<i32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        rows: usize,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        qkv_stride: usize,
        seq_stride: usize,
        lens: Option<&CudaSlice<i32>>,
        start: usize,
    ) -> Result<()> {
        let w = heads_kv * head_dim;
        let need = match lens {
            Some(_) => rows * seq_stride.max(w),
            None => (start + rows) * w,
        };
        if rows == 0
            || kc.len() < need
            || vc.len() < need
            || qkv.len() < rows * qkv_stride
            || qkv_stride < (heads_q + 2 * heads_kv) * head_dim
            || pos.len() < rows
        {
            return Err(err(format!("rope + kv store: {rows} rows at position {start} do not fit the buffers")));
        }
        let (hq, hk, d, qs, st, s0) = (
            to_i32(heads_q, "heads")?,
            to_i32(heads_kv, "heads")?,
            to_i32(head_dim, "head_dim")?,
            to_i32(qkv_stride, "stride")?,
            seq_stride as i64,
            to_i32(start, "start")?,
        );
        let null = 0u64;
        let mut b = self.stream.launch_builder(self.f("rope_kv_store_f16")?);
        b.arg(qkv).arg(kc).arg(vc).arg(pos).arg(cos).arg(sin).arg(&hq).arg(&hk).arg(&d).arg(&qs).arg(&st);
        match lens {
            Some(l) => b.arg(l),
            None => b.arg(&null),
        };
        b.arg(&s0);
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (rows as u32, (heads_q + heads_kv) as u32, 1),
                block_dim: (64, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(derr)?;
        Ok(())
    }

    /// One row through the fused q/k/v projection (`split` warps per feature: 1, 2 or 4) with RoPE and the cache
    /// store as its epilogue (`gemv_qkv_rope_m1_f16`): what `gemv_split_dev` into `qkv` followed by
    /// `rope_kv_store_dev` (one row) give, the same fp16 numbers. The cache row: `lens[0] - 1` (a decode step;
    /// `seq_stride`, the cache's rows times heads_kv * head_dim, only bounds the check) or `start`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_qkv_rope_dev(
        &self,
        qkv: &mut CudaSlice<f16>,
        kc: &mut CudaSlice<f16>,
        vc: &mut CudaSlice<f16>,
        x: &CudaSlice<f16>,
        w: &CudaSlice<f16>,
        k: usize,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        split: usize,
        pos: &CudaSlice<i32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        seq_stride: usize,
        lens: Option<&CudaSlice<i32>>,
        start: usize,
    ) -> Result<()> {
        let (f, kvw) = ((heads_q + 2 * heads_kv) * head_dim, heads_kv * head_dim);
        let need = match lens {
            Some(_) => seq_stride.max(kvw),
            None => (start + 1) * kvw,
        };
        if !k.is_multiple_of(8)
            || ![1, 2, 4].contains(&split)
            || !head_dim.is_multiple_of(2)
            || x.len() < k
            || w.len() < f * k
            || qkv.len() < f
            || kc.len() < need
            || vc.len() < need
            || pos.is_empty()
        {
            return Err(err(format!("gemv_qkv_rope_m1_f16: k {k} (a multiple of 8), split {split} (1, 2 or 4), head_dim {head_dim} (even), heads {heads_q}/{heads_kv}, cache row {start} or buffer sizes out of range")));
        }
        let (ki, hq, hk, d, si, s0) = (
            to_i32(k, "k")?,
            to_i32(heads_q, "heads")?,
            to_i32(heads_kv, "heads")?,
            to_i32(head_dim, "head_dim")?,
            split as i32,
            to_i32(start, "start")?,
        );
        let null = 0u64;
        let mut b = self.stream.launch_builder(self.f("gemv_qkv_rope_m1_f16")?);
        b.arg(qkv).arg(kc).arg(vc).arg(x).arg(w).arg(&ki).arg(&hq).arg(&hk).arg(&d).arg(&si).arg(pos).arg(cos).arg(sin);
        match lens {
            Some(l) => b.arg(l),
            None => b.arg(&null),
        };
        b.arg(&s0);
        unsafe { b.launch(gemv_cfg(f * split)) }.map_err(derr)?;
        Ok(())
    }

    /// `rope_kv_store_dev` on host data, one sequence appended at `start` of caches of `capacity` rows: returns
    /// (qkv after RoPE, key cache, value cache), next to what `rope_strided_dev` + `kv_store_dev` give (parity).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    pub fn rope_kv_store_pair(
        &self,
        qkv: &[f32],
        pos: &[i32],
        cos: &[f32],
        sin: &[f32],
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        start: usize,
        capacity: usize,
    ) -> Result<[(Vec<f32>, Vec<f32>, Vec<f32>); 2]> {
        let stride = (heads_q + 2 * heads_kv) * head_dim;
        let rows = pos.len();
        let w = heads_kv * head_dim;
        let (dp, dc, ds) = (
            self.stream.clone_htod(pos).map_err(derr)?,
            self.stream.clone_htod(cos).map_err(derr)?,
            self.stream.clone_htod(sin).map_err(derr)?,
        );
        let mut out = Vec::new();
        for fused in [true, false] {
            let mut dq = self.upload_f16(qkv)?;
            let (mut kc, mut vc) = (self.poisoned_f16(capacity * w)?, self.poisoned_f16(capacity * w)?);
            if fused {
                self.rope_kv_store_dev(
                    &mut dq, &mut kc, &mut vc, &dp, &dc, &ds, rows, heads_q, heads_kv, head_dim, stride, 0, None, start,
                )?;
            } else {
                self.rope_strided_dev(&mut dq, &dp, &dc, &ds, rows, heads_q + heads_kv, head_dim, stride)?;
                self.kv_store_dev(
                    &mut kc,
                    &mut vc,
                    &dq,
                    rows,
                    w,
                    stride,
                    heads_q * head_dim,
                    (heads_q + heads_kv) * head_dim,
                    0,
                    None,
                    start,
                )?;
            }
            out.push((self.download_f16(&dq)?, self.download_f16(&kc)?, self.download_f16(&vc)?));
        }
        let unfused = out.pop().ok_or_else(|| err("rope_kv_store_pair"))?;
        let fused = out.pop().ok_or_else(|| err("rope_kv_store_pair"))?;
        Ok([fused, unfused])
    }

    /// Stores the keys and values of a fused QKV buffer (`rows` rows of `qkv_stride`: k at `k_off`, v at `v_off`,
    /// `w` elements each) into caches `kc`/`vc`: with `lens`, row r is sequence r's newest token, stored at position
    /// lens[r] - 1 of sequence r (sequences `seq_stride` apart); without, row r goes to position start + r.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_store_dev(
        &self,
        kc: &mut CudaSlice<f16>,
        vc: &mut CudaSlice<f16>,
        qkv: &CudaSlice<f16>,
        rows: usize,
        w: usize,
        qkv_stride: usize,
        k_off: usize,
        v_off: usize,
        seq_stride: usize,
        lens: Option<&CudaSlice<i32>>,
        start: usize,
    ) -> Result<()> {
        let need = match lens {
            Some(_) => rows * seq_stride.max(w),
            None => (start + rows) * w,
        };
        if kc.len() < need || vc.len() < need || qkv.len() < rows * qkv_stride {
            return Err(err(format!("kv store: {rows} rows at position {start} do not fit the cache")));
        }
        let (r, wi, qs, ko, vo, st, s0) = (
            to_i32(rows, "rows")?,
            to_i32(w, "row")?,
            to_i32(qkv_stride, "stride")?,
            to_i32(k_off, "k offset")?,
            to_i32(v_off, "v offset")?,
            seq_stride as i64,
            to_i32(start, "start")?,
        );
        let null = 0u64;
        let mut b = self.stream.launch_builder(self.f("kv_store_f16")?);
        b.arg(kc).arg(vc).arg(qkv).arg(&r).arg(&wi).arg(&qs).arg(&ko).arg(&vo).arg(&st);
        match lens {
            Some(l) => b.arg(l),
            None => b.arg(&null),
        };
        b.arg(&s0);
        unsafe { b.launch(cfg1(rows * w, 256)) }.map_err(derr)?;
        Ok(())
    }

    /// Greedy choice on the device: `ids[r]` = the index of the largest logit of row r of `logits` (rows x vocab),
    /// as `sampling::argmax` picks it on the row widened to f32. With `advance`, (pos, lens), each row's position
    /// and sequence length also grow by one: the next decode step's, so a captured step can feed itself.
    pub fn argmax_step_dev(
        &self,
        ids: &mut CudaSlice<i32>,
        logits: &CudaSlice<f16>,
        rows: usize,
        vocab: usize,
        advance: Option<(&mut CudaSlice<i32>, &mut CudaSlice<i32>)>,
    ) -> Result<()> {
        if rows == 0
            || vocab == 0
            || ids.len() < rows
            || logits.len() < rows * vocab
            || advance.as_ref().is_some_and(|(p, l)| p.len() < rows || l.len() < rows)
        {
            return Err(err(format!("argmax: buffers too small for {rows} rows of {vocab} logits")));
        }
        let v = to_i32(vocab, "vocab")?;
        let null = 0u64;
        let mut b = self.stream.launch_builder(self.f("argmax_step_f16")?);
        b.arg(&mut *ids).arg(logits).arg(&v);
        match advance {
            Some((p, l)) => b.arg(p).arg(l),
            None => b.arg(&null).arg(&null),
        };
        unsafe {
            b.launch(LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 })
        }
        .map_err(derr)?;
        Ok(())
    }

    // -- host wrappers: upload as fp16, run, download widened (parity tests) --

    /// RMSNorm of `rows` rows of `x` by `w`.
    pub fn rmsnorm(&self, x: &[f32], w: &[f32], eps: f32) -> Result<Vec<f32>> {
        let (dx, dw) = (self.upload_f16(x)?, self.upload_f16(w)?);
        let mut out = self.poisoned_f16(x.len())?;
        self.rmsnorm_dev(&mut out, &dx, &dw, x.len() / w.len().max(1), eps)?;
        self.download_f16(&out)
    }

    /// x + r and the RMSNorm of it by w (`add_rmsnorm_f16`): (sum, normed).
    pub fn add_rmsnorm(&self, x: &[f32], r: &[f32], w: &[f32], eps: f32) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut dx, dr, dw) = (self.upload_f16(x)?, self.upload_f16(r)?, self.upload_f16(w)?);
        let mut out = self.poisoned_f16(x.len())?;
        self.add_rmsnorm_dev(&mut out, &mut dx, &dr, &dw, x.len() / w.len().max(1), eps)?;
        Ok((self.download_f16(&dx)?, self.download_f16(&out)?))
    }

    pub fn layernorm(&self, x: &[f32], w: &[f32], bias: &[f32], eps: f32) -> Result<Vec<f32>> {
        let cols = w.len();
        let rows = x.len() / cols.max(1);
        let (dx, dw, db) = (self.upload_f16(x)?, self.upload_f16(w)?, self.upload_f16(bias)?);
        let mut out = self.poisoned_f16(x.len())?;
        let c = to_i32(cols, "cols")?;
        let mut b = self.stream.launch_builder(self.f("layernorm_f16")?);
        b.arg(&mut out).arg(&dx).arg(&dw).arg(&db).arg(&c).arg(&eps);
        unsafe {
            b.launch(LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 })
        }
        .map_err(derr)?;
        self.download_f16(&out)
    }

    /// RoPE in place on x[tokens, heads, head_dim] at `pos`, with cos/sin tables [max_pos, head_dim/2].
    pub fn rope(
        &self,
        x: &[f32],
        pos: &[i32],
        cos: &[f32],
        sin: &[f32],
        heads: usize,
        head_dim: usize,
    ) -> Result<Vec<f32>> {
        let mut dx = self.upload_f16(x)?;
        let (dp, dc, ds) = (
            self.stream.clone_htod(pos).map_err(derr)?,
            self.stream.clone_htod(cos).map_err(derr)?,
            self.stream.clone_htod(sin).map_err(derr)?,
        );
        self.rope_dev(&mut dx, &dp, &dc, &ds, pos.len(), heads, head_dim)?;
        self.download_f16(&dx)
    }

    /// silu(gate) * up, elementwise over `rows` x `cols`.
    pub fn swiglu(&self, gate: &[f32], up: &[f32], cols: usize) -> Result<Vec<f32>> {
        let (dg, du) = (self.upload_f16(gate)?, self.upload_f16(up)?);
        let mut out = self.poisoned_f16(gate.len())?;
        self.swiglu_dev(&mut out, &dg, &du, gate.len() / cols.max(1), cols)?;
        self.download_f16(&out)
    }

    /// "gelu_f16" or "quick_gelu_f16", in place.
    pub fn activation(&self, kernel: &str, x: &[f32]) -> Result<Vec<f32>> {
        let mut dx = self.upload_f16(x)?;
        let n = x.len() as i64;
        let mut b = self.stream.launch_builder(self.f(kernel)?);
        b.arg(&mut dx).arg(&n);
        unsafe { b.launch(cfg1(x.len(), 256)) }.map_err(derr)?;
        self.download_f16(&dx)
    }

    pub fn bias_add(&self, x: &[f32], bias: &[f32]) -> Result<Vec<f32>> {
        let mut dx = self.upload_f16(x)?;
        let db = self.upload_f16(bias)?;
        let (r, c) = ((x.len() / bias.len().max(1)) as i64, to_i32(bias.len(), "cols")?);
        let mut b = self.stream.launch_builder(self.f("bias_add_f16")?);
        b.arg(&mut dx).arg(&db).arg(&r).arg(&c);
        unsafe { b.launch(cfg1(x.len(), 256)) }.map_err(derr)?;
        self.download_f16(&dx)
    }

    pub fn residual_add(&self, y: &[f32], x: &[f32]) -> Result<Vec<f32>> {
        let mut dy = self.upload_f16(y)?;
        let dx = self.upload_f16(x)?;
        self.residual_add_dev(&mut dy, &dx, y.len())?;
        self.download_f16(&dy)
    }

    /// Rows of `table` ([vocab, dim]) for `ids`; an id outside the vocabulary is an error naming its position.
    pub fn embedding(&self, table: &[f32], dim: usize, ids: &[i32]) -> Result<Vec<f32>> {
        let dt = self.upload_f16(table)?;
        let mut out = self.poisoned_f16(ids.len() * dim)?;
        self.embedding_dev(&mut out, &dt, dim, ids)?;
        self.download_f16(&out)
    }

    /// Attention prefill: q [n_q, heads_q, d], k/v [n_k, heads_kv, d] -> [n_q, heads_q, d].
    #[allow(clippy::too_many_arguments)]
    pub fn attention_prefill(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        causal: bool,
    ) -> Result<Vec<f32>> {
        let n_q = q.len() / (heads_q * head_dim).max(1);
        let n_k = k.len() / (heads_kv * head_dim).max(1);
        let (dq, dk, dv) = (self.upload_f16(q)?, self.upload_f16(k)?, self.upload_f16(v)?);
        let mut out = self.poisoned_f16(q.len())?;
        self.attention_prefill_dev(&mut out, &dq, &dk, &dv, n_q, n_k, heads_q, heads_kv, head_dim, causal)?;
        self.download_f16(&out)
    }

    /// Decode attention: one query per sequence (q [B, heads_q, d]) over a shared prefix cache ([P, heads_kv, d])
    /// and each sequence's suffix cache (suffix[b] holds suf_len[b] rows of [heads_kv, d]).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode(
        &self,
        q: &[f32],
        prefix_k: &[f32],
        prefix_v: &[f32],
        suffix_k: &[Vec<f32>],
        suffix_v: &[Vec<f32>],
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
    ) -> Result<Vec<f32>> {
        if head_dim > 128 || heads_kv == 0 || !heads_q.is_multiple_of(heads_kv) {
            return Err(err(format!(
                "attention: head_dim {head_dim} (at most 128), heads {heads_q}/{heads_kv} (a multiple)"
            )));
        }
        let bsz = suffix_k.len();
        let row = heads_kv * head_dim;
        let max_s = suffix_k.iter().map(|s| s.len() / row).max().unwrap_or(0).max(1);
        let mut sk = vec![0.0f32; bsz * max_s * row];
        let mut sv = sk.clone();
        let mut lens = Vec::new();
        for b in 0..bsz {
            sk[b * max_s * row..b * max_s * row + suffix_k[b].len()].copy_from_slice(&suffix_k[b]);
            sv[b * max_s * row..b * max_s * row + suffix_v[b].len()].copy_from_slice(&suffix_v[b]);
            lens.push(to_i32(suffix_k[b].len() / row, "suffix length")?);
        }
        let (dq, dpk, dpv, dsk, dsv) = (
            self.upload_f16(q)?,
            self.upload_f16(prefix_k)?,
            self.upload_f16(prefix_v)?,
            self.upload_f16(&sk)?,
            self.upload_f16(&sv)?,
        );
        let dl = self.stream.clone_htod(&lens).map_err(derr)?;
        let mut out = self.poisoned_f16(q.len())?;
        let plen = prefix_k.len() / row;
        let max_total = plen + lens.iter().copied().max().unwrap_or(0) as usize;
        let mut part =
            self.stream.alloc_zeros::<f32>(self.decode_part_len(max_total, bsz, heads_q, head_dim)).map_err(derr)?;
        self.attention_decode_dev(
            &mut out,
            &dq,
            heads_q * head_dim,
            &dpk,
            &dpv,
            plen,
            &dsk,
            &dsv,
            &dl,
            max_s * row,
            bsz,
            max_total,
            heads_q,
            heads_kv,
            head_dim,
            &mut part,
            None,
        )?;
        self.download_f16(&out)
    }

    /// y + scale * (x A^T) B^T with x [m, k], A [r, k], B [n, r], y [m, n].
    #[allow(clippy::too_many_arguments)]
    pub fn lora(
        &self,
        y: &[f32],
        x: &[f32],
        a: &[f32],
        b_: &[f32],
        k: usize,
        rank: usize,
        n: usize,
        scale: f32,
    ) -> Result<Vec<f32>> {
        let m = x.len() / k.max(1);
        let (dx, da, db) = (self.upload_f16(x)?, self.upload_f16(a)?, self.upload_f16(b_)?);
        let mut dy = self.upload_f16(y)?;
        let mut t = self.stream.clone_htod(&vec![f32::NAN; m * rank]).map_err(derr)?;
        let (ki, ri, ni) = (to_i32(k, "k")?, to_i32(rank, "rank")?, to_i32(n, "n")?);
        let mut b = self.stream.launch_builder(self.f("lora_down_f16")?);
        b.arg(&mut t).arg(&dx).arg(&da).arg(&ki).arg(&ri).arg(&ki);
        unsafe { b.launch(LaunchConfig { grid_dim: (m as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }
            .map_err(derr)?;
        let mut b = self.stream.launch_builder(self.f("lora_up_add_f16")?);
        b.arg(&mut dy).arg(&t).arg(&db).arg(&ni).arg(&ri).arg(&scale).arg(&ni);
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (n.div_ceil(128) as u32, m as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: (rank * 4) as u32,
            })
        }
        .map_err(derr)?;
        self.download_f16(&dy)
    }

    /// log p(labels[r]) under the softmax of logits row r ([rows, vocab], f32), and each row's logsumexp.
    pub fn logprobs(&self, logits: &[f32], vocab: usize, labels: &[i32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let rows = labels.len();
        let dl = self.stream.clone_htod(logits).map_err(derr)?;
        let dy = self.stream.clone_htod(labels).map_err(derr)?;
        let mut out = self.stream.clone_htod(&vec![f32::NAN; rows.max(1)]).map_err(derr)?;
        let mut lse = self.stream.clone_htod(&vec![f32::NAN; rows.max(1)]).map_err(derr)?;
        let v = to_i32(vocab, "vocab")?;
        let mut b = self.stream.launch_builder(self.f("logprob_gather_f32")?);
        b.arg(&mut out).arg(&mut lse).arg(&dl).arg(&dy).arg(&v);
        unsafe {
            b.launch(LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 })
        }
        .map_err(derr)?;
        Ok((self.stream.clone_dtoh(&out).map_err(derr)?, self.stream.clone_dtoh(&lse).map_err(derr)?))
    }

    // -- training (CUDA II): backward kernels and the optimizer --

    fn f32_buf(&self, n: usize, fill: f32) -> Result<CudaSlice<f32>> {
        self.stream.clone_htod(&vec![fill; n.max(1)]).map_err(derr)
    }

    /// Backward of `rmsnorm_dev`: dx (fp16), and dw accumulated into `dw` (fp32) when given.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_bwd_dev(
        &self,
        dx: &mut CudaSlice<f16>,
        dw: Option<&mut CudaSlice<f32>>,
        dout: &CudaSlice<f16>,
        x: &CudaSlice<f16>,
        w: &CudaSlice<f16>,
        rows: usize,
        eps: f32,
    ) -> Result<()> {
        let c = to_i32(w.len(), "cols")?;
        let null = 0u64;
        let mut b = self.stream.launch_builder(self.f("rmsnorm_bwd_f16")?);
        b.arg(dx);
        match dw {
            Some(d) => b.arg(d),
            None => b.arg(&null),
        };
        b.arg(dout).arg(x).arg(w).arg(&c).arg(&eps);
        unsafe {
            b.launch(LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 })
        }
        .map_err(derr)?;
        Ok(())
    }

    /// Host wrapper: (dx, dw) of RMSNorm.
    pub fn rmsnorm_bwd(&self, dout: &[f32], x: &[f32], w: &[f32], eps: f32) -> Result<(Vec<f32>, Vec<f32>)> {
        let (dd, dx_, dw_) = (self.upload_f16(dout)?, self.upload_f16(x)?, self.upload_f16(w)?);
        let mut dx = self.poisoned_f16(x.len())?;
        let mut dw = self.f32_buf(w.len(), 0.0)?;
        self.rmsnorm_bwd_dev(&mut dx, Some(&mut dw), &dd, &dx_, &dw_, x.len() / w.len().max(1), eps)?;
        Ok((self.download_f16(&dx)?, self.stream.clone_dtoh(&dw).map_err(derr)?))
    }

    /// Host wrapper: (dx, dw, db) of LayerNorm.
    pub fn layernorm_bwd(
        &self,
        dout: &[f32],
        x: &[f32],
        w: &[f32],
        eps: f32,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let cols = w.len();
        let (dd, dx_, dw_) = (self.upload_f16(dout)?, self.upload_f16(x)?, self.upload_f16(w)?);
        let mut dx = self.poisoned_f16(x.len())?;
        let (mut dw, mut db) = (self.f32_buf(cols, 0.0)?, self.f32_buf(cols, 0.0)?);
        let c = to_i32(cols, "cols")?;
        let mut b = self.stream.launch_builder(self.f("layernorm_bwd_f16")?);
        b.arg(&mut dx).arg(&mut dw).arg(&mut db).arg(&dd).arg(&dx_).arg(&dw_).arg(&c).arg(&eps);
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: ((x.len() / cols.max(1)) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(derr)?;
        Ok((
            self.download_f16(&dx)?,
            self.stream.clone_dtoh(&dw).map_err(derr)?,
            self.stream.clone_dtoh(&db).map_err(derr)?,
        ))
    }

    /// Backward of `swiglu_dev` over n elements: (dgate, dup).
    pub fn swiglu_bwd_dev(
        &self,
        dg: &mut CudaSlice<f16>,
        du: &mut CudaSlice<f16>,
        dout: &CudaSlice<f16>,
        g: &CudaSlice<f16>,
        u: &CudaSlice<f16>,
        n: usize,
    ) -> Result<()> {
        let nn = n as i64;
        let mut b = self.stream.launch_builder(self.f("swiglu_bwd_f16")?);
        b.arg(dg).arg(du).arg(dout).arg(g).arg(u).arg(&nn);
        unsafe { b.launch(cfg1(n, 256)) }.map_err(derr)?;
        Ok(())
    }

    pub fn swiglu_bwd(&self, dout: &[f32], g: &[f32], u: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let (dd, dg_, du_) = (self.upload_f16(dout)?, self.upload_f16(g)?, self.upload_f16(u)?);
        let (mut dg, mut du) = (self.poisoned_f16(g.len())?, self.poisoned_f16(g.len())?);
        self.swiglu_bwd_dev(&mut dg, &mut du, &dd, &dg_, &du_, g.len())?;
        Ok((self.download_f16(&dg)?, self.download_f16(&du)?))
    }

    /// "gelu_bwd_f16" or "quick_gelu_bwd_f16": dx from dout and the saved pre-activation x.
    pub fn activation_bwd(&self, kernel: &str, dout: &[f32], x: &[f32]) -> Result<Vec<f32>> {
        let (dd, dx_) = (self.upload_f16(dout)?, self.upload_f16(x)?);
        let mut dx = self.poisoned_f16(x.len())?;
        self.activation_bwd_dev(kernel, &mut dx, &dd, &dx_, x.len())?;
        self.download_f16(&dx)
    }

    /// `activation_bwd` on the device over the first `n` values.
    pub fn activation_bwd_dev(
        &self,
        kernel: &str,
        dx: &mut CudaSlice<f16>,
        dout: &CudaSlice<f16>,
        x: &CudaSlice<f16>,
        n: usize,
    ) -> Result<()> {
        if dx.len() < n || dout.len() < n || x.len() < n {
            return Err(err(format!(
                "{kernel}: {n} values asked of buffers of {}, {} and {}",
                dx.len(),
                dout.len(),
                x.len()
            )));
        }
        let nn = n as i64;
        let mut b = self.stream.launch_builder(self.f(kernel)?);
        b.arg(dx).arg(dout).arg(x).arg(&nn);
        unsafe { b.launch(cfg1(n, 256)) }.map_err(derr)?;
        Ok(())
    }

    /// dx (rows, cols) of LayerNorm with weight `w` from dout and the saved input x (no weight or bias gradient).
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_bwd_dx_dev(
        &self,
        dx: &mut CudaSlice<f16>,
        dout: &CudaSlice<f16>,
        x: &CudaSlice<f16>,
        w: &CudaSlice<f16>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        if w.len() != cols || [dx.len(), dout.len(), x.len()].iter().any(|&l| l < rows * cols) {
            return Err(err(format!("layernorm backward: buffers too small for {rows}x{cols}")));
        }
        let c = to_i32(cols, "cols")?;
        let null = 0u64;
        let mut b = self.stream.launch_builder(self.f("layernorm_bwd_f16")?);
        b.arg(dx).arg(&null).arg(&null).arg(dout).arg(x).arg(w).arg(&c).arg(&eps);
        unsafe {
            b.launch(LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 })
        }
        .map_err(derr)?;
        Ok(())
    }

    /// Backward of `rope_dev`, in place on the gradient.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_bwd_dev(
        &self,
        dx: &mut CudaSlice<f16>,
        pos: &CudaSlice<i32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let (t, h, d, stride) = (
            to_i32(tokens, "tokens")?,
            to_i32(heads, "heads")?,
            to_i32(head_dim, "head_dim")?,
            to_i32(heads * head_dim, "stride")?,
        );
        let mut b = self.stream.launch_builder(self.f("rope_bwd_f16")?);
        b.arg(dx).arg(pos).arg(cos).arg(sin).arg(&t).arg(&h).arg(&d).arg(&stride);
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (tokens as u32, heads as u32, 1),
                block_dim: (64, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(derr)?;
        Ok(())
    }

    pub fn rope_bwd(
        &self,
        dx: &[f32],
        pos: &[i32],
        cos: &[f32],
        sin: &[f32],
        heads: usize,
        head_dim: usize,
    ) -> Result<Vec<f32>> {
        let mut d = self.upload_f16(dx)?;
        let (dp, dc, ds) = (
            self.stream.clone_htod(pos).map_err(derr)?,
            self.stream.clone_htod(cos).map_err(derr)?,
            self.stream.clone_htod(sin).map_err(derr)?,
        );
        self.rope_bwd_dev(&mut d, &dp, &dc, &ds, pos.len(), heads, head_dim)?;
        self.download_f16(&d)
    }

    /// Embedding backward: dtable ([vocab, dim], fp32) with the rows of `dout` added at `ids`.
    pub fn embedding_bwd(&self, vocab: usize, dim: usize, dout: &[f32], ids: &[i32]) -> Result<Vec<f32>> {
        let dd = self.upload_f16(dout)?;
        let di = self.stream.clone_htod(ids).map_err(derr)?;
        let mut dt = self.f32_buf(vocab * dim, 0.0)?;
        let (n, d, v) = (to_i32(ids.len(), "tokens")?, to_i32(dim, "dim")?, to_i32(vocab, "vocab")?);
        let mut b = self.stream.launch_builder(self.f("embedding_bwd_f32")?);
        b.arg(&mut dt).arg(&dd).arg(&di).arg(&n).arg(&d).arg(&v);
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (ids.len().max(1) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(derr)?;
        self.stream.clone_dtoh(&dt).map_err(derr)
    }

    /// Attention backward on device buffers: given q, k, v, the forward's output `out` and log-sum-exp `lse`
    /// (`attention_prefill_lse_dev`) and dout, writes dq [n_q, heads_q, d], dk and dv [n_k, heads_kv, d] (GQA:
    /// summed over each group's query heads).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_bwd_dev(
        &self,
        dq: &mut CudaSlice<f16>,
        dk: &mut CudaSlice<f16>,
        dv: &mut CudaSlice<f16>,
        q: &CudaSlice<f16>,
        k: &CudaSlice<f16>,
        v: &CudaSlice<f16>,
        out: &CudaSlice<f16>,
        lse: &CudaSlice<f32>,
        dout: &CudaSlice<f16>,
        n_q: usize,
        n_k: usize,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        causal: bool,
    ) -> Result<()> {
        let (qs, ks) = (heads_q * head_dim, heads_kv * head_dim);
        let grads =
            AttnRows { q: self.dptr(dq, 0), k: self.dptr(dk, 0), v: self.dptr(dv, 0), q_stride: qs, kv_stride: ks };
        let rows = AttnRows { q: self.dptr(q, 0), k: self.dptr(k, 0), v: self.dptr(v, 0), q_stride: qs, kv_stride: ks };
        self.attention_bwd_at(grads, rows, out, lse, dout, n_q, n_k, heads_q, heads_kv, head_dim, causal)
    }

    /// The attention backward kernels on operands given by address and row stride: dq, dk, dv into `grads` (same
    /// strides as `x`), from the forward's output `out`, its log-sum-exp and dout ([n_q, heads_q, d] rows). The
    /// caller keeps the operands alive and large enough.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_bwd_at(
        &self,
        grads: AttnRows,
        x: AttnRows,
        out: &CudaSlice<f16>,
        lse: &CudaSlice<f32>,
        dout: &CudaSlice<f16>,
        n_q: usize,
        n_k: usize,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        causal: bool,
    ) -> Result<()> {
        if head_dim > 128
            || heads_kv == 0
            || !heads_q.is_multiple_of(heads_kv)
            || (causal && n_k < n_q)
            || grads.q_stride != x.q_stride
            || grads.kv_stride != x.kv_stride
        {
            return Err(err(format!("attention backward: head_dim {head_dim} (at most 128), heads {heads_q}/{heads_kv} (a multiple), {n_q} queries over {n_k} keys")));
        }
        if out.len() < n_q * heads_q * head_dim || dout.len() < n_q * heads_q * head_dim || lse.len() < n_q * heads_q {
            return Err(err(format!("attention backward: output, its gradient or lse shorter than {n_q} rows")));
        }
        let (nq, nk, hq, hk, d) = (
            to_i32(n_q, "n_q")?,
            to_i32(n_k, "n_k")?,
            to_i32(heads_q, "heads")?,
            to_i32(heads_kv, "heads")?,
            to_i32(head_dim, "head_dim")?,
        );
        let (qs, ks, os) = (to_i32(x.q_stride, "q stride")?, to_i32(x.kv_stride, "kv stride")?, hq * d);
        let scale = 1.0f32 / (head_dim as f32).sqrt();
        let c = i32::from(causal);
        let mut delta = self.stream.alloc_zeros::<f32>(n_q * heads_q).map_err(derr)?;
        let mut b = self.stream.launch_builder(self.f("attn_bwd_delta_f16")?);
        b.arg(&mut delta).arg(dout).arg(out).arg(&hq).arg(&d).arg(&os);
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (n_q as u32, heads_q as u32, 1),
                block_dim: (32, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(derr)?;
        // The tensor-core kernels: 16-byte loads of q, k, v and dout rows, gradients stored by pairs.
        let dout_ptr = self.dptr(dout, 0);
        let mma = self.mma_attention.load(std::sync::atomic::Ordering::Relaxed)
            && (head_dim == 64 || head_dim == 128)
            && (x.q | x.k | x.v | dout_ptr).is_multiple_of(16)
            && (x.q_stride | x.kv_stride | (heads_q * head_dim)).is_multiple_of(8)
            && (grads.q | grads.k | grads.v).is_multiple_of(4);
        let (dq_kernel, dkdv_kernel) = match (mma, head_dim) {
            (true, 64) => ("flash_attn_bwd_dq_mma_d64_f16", "flash_attn_bwd_dkdv_mma_d64_f16"),
            (true, _) => ("flash_attn_bwd_dq_mma_d128_f16", "flash_attn_bwd_dkdv_mma_d128_f16"),
            _ => ("flash_attn_bwd_dq_f16", "flash_attn_bwd_dkdv_f16"),
        };
        let mut b = self.stream.launch_builder(self.f(dq_kernel)?);
        b.arg(&grads.q)
            .arg(&x.q)
            .arg(&x.k)
            .arg(&x.v)
            .arg(dout)
            .arg(lse)
            .arg(&delta)
            .arg(&nq)
            .arg(&nk)
            .arg(&hq)
            .arg(&hk);
        if !mma {
            b.arg(&d);
        }
        b.arg(&qs).arg(&ks).arg(&os).arg(&scale).arg(&c);
        let rows = if mma { 64 } else { 16 };
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (n_q.div_ceil(rows) as u32, heads_q as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(derr)?;
        let mut b = self.stream.launch_builder(self.f(dkdv_kernel)?);
        b.arg(&grads.k)
            .arg(&grads.v)
            .arg(&x.q)
            .arg(&x.k)
            .arg(&x.v)
            .arg(dout)
            .arg(lse)
            .arg(&delta)
            .arg(&nq)
            .arg(&nk)
            .arg(&hq)
            .arg(&hk);
        if !mma {
            b.arg(&d);
        }
        b.arg(&qs).arg(&ks).arg(&os).arg(&scale).arg(&c);
        let smem = if mma { dkdv_mma_smem(head_dim) as u32 } else { 0 };
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (n_k.div_ceil(rows) as u32, heads_kv as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: smem,
            })
        }
        .map_err(derr)?;
        Ok(())
    }

    /// Host wrapper: the forward (saving lse), then (dq, dk, dv).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_bwd(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dout: &[f32],
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        causal: bool,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let n_q = q.len() / (heads_q * head_dim).max(1);
        let n_k = k.len() / (heads_kv * head_dim).max(1);
        let (dq_, dk_, dv_, dd) =
            (self.upload_f16(q)?, self.upload_f16(k)?, self.upload_f16(v)?, self.upload_f16(dout)?);
        let mut out = self.poisoned_f16(q.len())?;
        let mut lse = self.f32_buf(n_q * heads_q, f32::NAN)?;
        self.attention_prefill_lse_dev(
            &mut out,
            Some(&mut lse),
            &dq_,
            &dk_,
            &dv_,
            n_q,
            n_k,
            heads_q,
            heads_kv,
            head_dim,
            causal,
        )?;
        let (mut dq, mut dk, mut dv) =
            (self.poisoned_f16(q.len())?, self.poisoned_f16(k.len())?, self.poisoned_f16(v.len())?);
        self.attention_bwd_dev(
            &mut dq, &mut dk, &mut dv, &dq_, &dk_, &dv_, &out, &lse, &dd, n_q, n_k, heads_q, heads_kv, head_dim, causal,
        )?;
        Ok((self.download_f16(&dq)?, self.download_f16(&dk)?, self.download_f16(&dv)?))
    }

    /// Log-probs of `labels` under fp16 logits rows ([rows, vocab]) and, in place, their gradient for upstream
    /// weights `dlogp` (`logprob_gather_f16` then `logprob_bwd_f16`): returns (logp, dlogits).
    pub fn logprob_fwd_bwd_f16(
        &self,
        logits: &[f32],
        vocab: usize,
        labels: &[i32],
        dlogp: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let rows = labels.len();
        let mut dl = self.upload_f16(logits)?;
        let (dy, dw) = (self.stream.clone_htod(labels).map_err(derr)?, self.stream.clone_htod(dlogp).map_err(derr)?);
        let (mut out, mut lse) = (self.f32_buf(rows, f32::NAN)?, self.f32_buf(rows, f32::NAN)?);
        let v = to_i32(vocab, "vocab")?;
        let cfg = LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut b = self.stream.launch_builder(self.f("logprob_gather_f16")?);
        b.arg(&mut out).arg(&mut lse).arg(&dl).arg(&dy).arg(&v);
        unsafe { b.launch(cfg) }.map_err(derr)?;
        let mut b = self.stream.launch_builder(self.f("logprob_bwd_f16")?);
        b.arg(&mut dl).arg(&lse).arg(&dy).arg(&dw).arg(&v);
        unsafe { b.launch(cfg) }.map_err(derr)?;
        Ok((self.stream.clone_dtoh(&out).map_err(derr)?, self.download_f16(&dl)?))
    }

    /// Sum of squares (fp64) of a device fp32 buffer: non-finite when any element is (the overflow check).
    pub fn sumsq_dev(&self, g: &CudaSlice<f32>) -> Result<f64> {
        let mut acc = self.stream.alloc_zeros::<f64>(1).map_err(derr)?;
        let n = g.len() as i64;
        let mut b = self.stream.launch_builder(self.f("grad_sumsq_f32")?);
        b.arg(&mut acc).arg(g).arg(&n);
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (g.len().div_ceil(256).clamp(1, 1024) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(derr)?;
        Ok(self.stream.clone_dtoh(&acc).map_err(derr)?[0])
    }

    /// acc[offset..offset + g.len()] += g.
    pub fn grad_accumulate_at(&self, acc: &mut CudaSlice<f32>, offset: usize, g: &CudaSlice<f16>) -> Result<()> {
        if offset + g.len() > acc.len() {
            return Err(err(format!(
                "gradient accumulation: {} values at {offset} of an accumulator of {}",
                g.len(),
                acc.len()
            )));
        }
        let n = g.len() as i64;
        let mut view = acc.slice_mut(offset..offset + g.len());
        let mut b = self.stream.launch_builder(self.f("grad_accumulate_f32")?);
        b.arg(&mut view).arg(g).arg(&n);
        unsafe { b.launch(cfg1(g.len(), 256)) }.map_err(derr)?;
        Ok(())
    }

    /// acc += g (fp16 gradient into the fp32 accumulator).
    pub fn grad_accumulate_dev(&self, acc: &mut CudaSlice<f32>, g: &CudaSlice<f16>) -> Result<()> {
        let n = acc.len().min(g.len()) as i64;
        let mut b = self.stream.launch_builder(self.f("grad_accumulate_f32")?);
        b.arg(acc).arg(g).arg(&n);
        unsafe { b.launch(cfg1(n as usize, 256)) }.map_err(derr)?;
        Ok(())
    }

    /// One AdamW step (see `kernels/optim.cu`) on fp32 master weights, moments and gradient (zeroed after); the
    /// fp16 copy is refreshed when given. `step` is 1-based (bias correction); `gscale` = clip factor / loss scale.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_dev(
        &self,
        p: &mut CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        g: &mut CudaSlice<f32>,
        p16: Option<&mut CudaSlice<f16>>,
        cfg: &AdamW,
        step: u32,
        gscale: f32,
    ) -> Result<()> {
        let n = p.len();
        self.adamw_range(p, m, v, g, p16, 0..n, cfg, step, gscale)
    }

    /// `adamw_dev` on the elements `range` of the buffers only (e.g. parameters without weight decay).
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_range(
        &self,
        p: &mut CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        g: &mut CudaSlice<f32>,
        p16: Option<&mut CudaSlice<f16>>,
        range: std::ops::Range<usize>,
        cfg: &AdamW,
        step: u32,
        gscale: f32,
    ) -> Result<()> {
        let len = p.len();
        if m.len() != len || v.len() != len || g.len() != len || p16.as_ref().is_some_and(|h| h.len() != len) {
            return Err(err("adamw: parameter, moment and gradient buffers differ in length"));
        }
        if range.start > range.end || range.end > len {
            return Err(err(format!("adamw: elements {range:?} of {len}")));
        }
        let n = range.len();
        if n == 0 {
            return Ok(());
        }
        let (bc1, bc2) = (1.0 - cfg.beta1.powi(step as i32), 1.0 - cfg.beta2.powi(step as i32));
        let nn = n as i64;
        let null = 0u64;
        let (mut p, mut m, mut v, mut g) = (
            p.slice_mut(range.clone()),
            m.slice_mut(range.clone()),
            v.slice_mut(range.clone()),
            g.slice_mut(range.clone()),
        );
        let mut h = p16.map(|h| h.slice_mut(range));
        let mut b = self.stream.launch_builder(self.f("adamw_f32")?);
        b.arg(&mut p).arg(&mut m).arg(&mut v).arg(&mut g);
        match h.as_mut() {
            Some(h) => b.arg(h),
            None => b.arg(&null),
        };
        b.arg(&nn)
            .arg(&cfg.lr)
            .arg(&cfg.beta1)
            .arg(&cfg.beta2)
            .arg(&cfg.eps)
            .arg(&cfg.weight_decay)
            .arg(&bc1)
            .arg(&bc2)
            .arg(&gscale);
        unsafe { b.launch(cfg1(n, 256)) }.map_err(derr)?;
        Ok(())
    }
}

/// AdamW hyper-parameters for `Gpu::adamw_dev` (fp32, as the kernel takes them).
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

/// The integer form of the CPU's dropout test `u < p` for u = k / 2^53 (k the top 53 bits of a SplitMix64
/// output): k < ceil(p * 2^53), exact because scaling by 2^53 is.
pub fn dropout_threshold(p: f64) -> u64 {
    (p.clamp(0.0, 1.0) * (1u64 << 53) as f64).ceil() as u64
}

/// Dynamic loss scaling for fp16 training: the loss is multiplied by `scale` before the backward pass; a step whose
/// gradients overflow (non-finite) is skipped and the scale halved; after `growth_interval` good steps in a row the
/// scale doubles (up to 2^24). Saved with the optimizer state (`train::optim::AdamW::scaler`), so a paused run
/// resumes with the scale it had.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    pub scale: f32,
    pub growth_interval: u32,
    good_steps: u32,
    pub skipped: u64,
}

impl LossScaler {
    pub fn new(initial: f32, growth_interval: u32) -> LossScaler {
        LossScaler { scale: initial, growth_interval: growth_interval.max(1), good_steps: 0, skipped: 0 }
    }

    /// Given the sum of squares of the scaled gradients (`Gpu::sumsq_dev`): None when they overflowed (the step
    /// must be skipped; the scale is halved), else Some((unscaled gradient norm, factor)), the factor AdamW
    /// multiplies the scaled gradients by: unscale, then clip the global norm to `max_norm` (0 = no clipping).
    /// A run of `growth_interval` good steps doubles the scale for the next step.
    pub fn step(&mut self, scaled_sumsq: f64, max_norm: f64) -> Option<(f64, f32)> {
        if !scaled_sumsq.is_finite() {
            self.scale = (self.scale / 2.0).max(1.0);
            self.good_steps = 0;
            self.skipped += 1;
            return None;
        }
        let norm = scaled_sumsq.sqrt() / self.scale as f64;
        let clip = if max_norm > 0.0 && norm > max_norm { max_norm / (norm + 1e-6) } else { 1.0 };
        let factor = (clip / self.scale as f64) as f32;
        self.good_steps += 1;
        if self.good_steps >= self.growth_interval {
            self.scale = (self.scale * 2.0).min(16_777_216.0);
            self.good_steps = 0;
        }
        Some((norm, factor))
    }
}

#[cfg(test)]
mod tests {
    use super::LossScaler;

    #[test]
    fn loss_scaler_skips_overflow_lowers_then_grows_and_unscales_with_the_scale_of_the_step() {
        let mut s = LossScaler::new(65536.0, 3);
        // Overflow: skipped, scale halved.
        assert_eq!(s.step(f64::INFINITY, 1.0), None);
        assert_eq!(s.step(f64::NAN, 1.0), None);
        assert_eq!((s.scale, s.skipped), (16384.0, 2));
        // A good step: gradient norm 0.5 after unscaling, below the clip: factor = 1 / scale.
        let sumsq = (0.5f64 * 16384.0).powi(2);
        let (norm, f) = s.step(sumsq, 1.0).unwrap();
        assert!((norm - 0.5).abs() < 1e-12 && (f - 1.0 / 16384.0).abs() < 1e-12, "{norm} {f}");
        // Above the clip: norm 4 is clipped to 1.
        let (norm, f) = s.step((4.0f64 * 16384.0).powi(2), 1.0).unwrap();
        assert!((norm - 4.0).abs() < 1e-9 && ((f as f64) * 4.0 * 16384.0 - 1.0).abs() < 1e-5, "{norm} {f}");
        // The third good step in a row doubles the scale, but this step is still unscaled by the old one.
        let (_, f) = s.step(1.0, 0.0).unwrap();
        assert_eq!(f, 1.0 / 16384.0);
        assert_eq!(s.scale, 32768.0);
        // Never below 1.
        let mut t = LossScaler::new(2.0, 10);
        for _ in 0..5 {
            assert_eq!(t.step(f64::INFINITY, 1.0), None);
        }
        assert_eq!(t.scale, 1.0);
    }
}
