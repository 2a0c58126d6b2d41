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
use cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
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
    ("logprob.cu", include_str!("../../kernels/logprob.cu")),
    ("lora.cu", include_str!("../../kernels/lora.cu")),
    ("norm.cu", include_str!("../../kernels/norm.cu")),
    ("rope.cu", include_str!("../../kernels/rope.cu")),
];

/// A kernel file's source with `common.cuh` inlined (the embedded sources have no directory to include from).
pub fn source(file: &str) -> Option<String> {
    SOURCES.iter().find(|(f, _)| *f == file).map(|(_, s)| s.replace("#include \"common.cuh\"", COMMON))
}

/// The `extern "C" __global__` kernels a source defines.
pub fn kernel_names(src: &str) -> Vec<String> {
    let re = regex::Regex::new(r#"extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)"#).expect("static regex");
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
        Err("libcuda.so.1 (the NVIDIA driver) was not found: no GPU on this machine, or the driver is not installed".into())
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
pub struct Compiled {
    pub file: &'static str,
    pub kernels: Vec<String>,
    pub ptx: cudarc::nvrtc::Ptx,
}

/// Compiles every kernel file for `arch`. An NVRTC error names the file, its kernels and shows NVRTC's log.
pub fn compile_all(arch: &'static str) -> Result<Vec<Compiled>> {
    nvrtc_status().map_err(err)?;
    let includes = include_dirs();
    if includes.is_empty() {
        return Err(err("cuda_fp16.h was not found: set RLAIFD_CUDA_INCLUDE or CUDA_HOME, or `pip install nvidia-cuda-runtime` (CUDA 13)"));
    }
    let mut out = Vec::new();
    for (file, _) in SOURCES {
        let src = source(file).expect("embedded source");
        let kernels = kernel_names(&src);
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            include_paths: includes.iter().map(|p| p.display().to_string()).collect(),
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
        out.push(Compiled { file, kernels, ptx });
    }
    Ok(out)
}

/// A device with every kernel loaded.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub arch: &'static str,
    pub name: String,
    _modules: Vec<Arc<CudaModule>>,
    funcs: HashMap<String, CudaFunction>,
    blas: CudaBlasLT,
}

pub(crate) fn derr(e: cudarc::driver::DriverError) -> EngineError {
    err(format!("CUDA: {e:?}"))
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
        let stream = ctx.default_stream();
        let blas = CudaBlasLT::new(stream.clone()).map_err(|e| err(format!("cuBLASLt: {e:?}")))?;
        Ok(Ok(Gpu { ctx, stream, arch, name, _modules: modules, funcs, blas }))
    }

    pub(crate) fn f(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs.get(name).ok_or_else(|| err(format!("kernel {name} is not loaded")))
    }

    pub fn upload_f16(&self, x: &[f32]) -> Result<CudaSlice<f16>> {
        let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        self.stream.clone_htod(&h).map_err(derr)
    }

    pub fn download_f16(&self, x: &CudaSlice<f16>) -> Result<Vec<f32>> {
        Ok(self.stream.clone_dtoh(x).map_err(derr)?.into_iter().map(f16::to_f32).collect())
    }

    /// An fp16 buffer filled with NaN, so a kernel that skips an output is caught.
    pub fn poisoned_f16(&self, n: usize) -> Result<CudaSlice<f16>> {
        self.stream.clone_htod(&vec![f16::NAN; n.max(1)]).map_err(derr)
    }

    /// y[m, n] = x[m, k] W[n, k]^T (a linear layer, row-major) on device buffers: cuBLASLt, fp16 in and out,
    /// fp32 compute. cuBLAS is column-major: this is C (n x m) = op(A) B with A = W (k x n, transposed) and
    /// B = x (k x m), which is y in row-major order.
    pub fn linear_device(&self, x: &CudaSlice<f16>, w: &CudaSlice<f16>, y: &mut CudaSlice<f16>, m: usize, k: usize, n: usize) -> Result<()> {
        if x.len() < m * k || w.len() < n * k || y.len() < m * n {
            return Err(err(format!("linear: buffers too small for m {m}, k {k}, n {n}")));
        }
        let cfg = MatmulConfig {
            transa: true,
            transb: false,
            transc: false,
            m: n as u64,
            n: m as u64,
            k: k as u64,
            alpha: 1.0,
            lda: k as i64,
            ldb: k as i64,
            beta: 0.0,
            ldc: n as i64,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        // SAFETY: the buffer sizes were checked against the shapes above.
        unsafe { self.blas.matmul(cfg, w, x, y, None, None) }.map_err(|e| err(format!("cuBLASLt matmul {m}x{k}x{n}: {e:?}")))
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
    pub fn rmsnorm_dev(&self, out: &mut CudaSlice<f16>, x: &CudaSlice<f16>, w: &CudaSlice<f16>, rows: usize, eps: f32) -> Result<()> {
        let c = to_i32(w.len(), "cols")?;
        let mut b = self.stream.launch_builder(self.f("rmsnorm_f16")?);
        b.arg(out).arg(x).arg(w).arg(&c).arg(&eps);
        unsafe { b.launch(LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.map_err(derr)?;
        Ok(())
    }

    /// RoPE in place on x (tokens = pos.len() rows of `heads` x `head_dim`), tables [max_pos, head_dim / 2].
    #[allow(clippy::too_many_arguments)]
    pub fn rope_dev(&self, x: &mut CudaSlice<f16>, pos: &CudaSlice<i32>, cos: &CudaSlice<f32>, sin: &CudaSlice<f32>, tokens: usize, heads: usize, head_dim: usize) -> Result<()> {
        let (t, h, d, stride) = (to_i32(tokens, "tokens")?, to_i32(heads, "heads")?, to_i32(head_dim, "head_dim")?, to_i32(heads * head_dim, "stride")?);
        let mut b = self.stream.launch_builder(self.f("rope_f16")?);
        b.arg(x).arg(pos).arg(cos).arg(sin).arg(&t).arg(&h).arg(&d).arg(&stride);
        unsafe { b.launch(LaunchConfig { grid_dim: (tokens as u32, heads as u32, 1), block_dim: (64, 1, 1), shared_mem_bytes: 0 }) }.map_err(derr)?;
        Ok(())
    }

    /// out = silu(gate) * up over `rows` x `cols`.
    pub fn swiglu_dev(&self, out: &mut CudaSlice<f16>, gate: &CudaSlice<f16>, up: &CudaSlice<f16>, rows: usize, cols: usize) -> Result<()> {
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

    /// out = rows of `table` ([vocab, dim]) for `ids`; an id outside the vocabulary is an error naming it.
    pub fn embedding_dev(&self, out: &mut CudaSlice<f16>, table: &CudaSlice<f16>, dim: usize, ids: &[i32]) -> Result<()> {
        let vocab = table.len() / dim.max(1);
        let di = self.stream.clone_htod(ids).map_err(derr)?;
        let mut e = self.stream.alloc_zeros::<i32>(1).map_err(derr)?;
        let (n, d, v) = (to_i32(ids.len(), "tokens")?, to_i32(dim, "dim")?, to_i32(vocab, "vocab")?);
        let mut b = self.stream.launch_builder(self.f("embedding_gather_f16")?);
        b.arg(out).arg(table).arg(&di).arg(&n).arg(&d).arg(&v).arg(&mut e);
        unsafe { b.launch(LaunchConfig { grid_dim: (ids.len().max(1) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }.map_err(derr)?;
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
    pub fn attention_prefill_dev(&self, out: &mut CudaSlice<f16>, q: &CudaSlice<f16>, k: &CudaSlice<f16>, v: &CudaSlice<f16>, n_q: usize, n_k: usize, heads_q: usize, heads_kv: usize, head_dim: usize, causal: bool) -> Result<()> {
        if head_dim > 128 || heads_kv == 0 || !heads_q.is_multiple_of(heads_kv) {
            return Err(err(format!("attention: head_dim {head_dim} (at most 128), heads {heads_q}/{heads_kv} (a multiple)")));
        }
        let (nq, nk, hq, hk, d) = (to_i32(n_q, "n_q")?, to_i32(n_k, "n_k")?, to_i32(heads_q, "heads")?, to_i32(heads_kv, "heads")?, to_i32(head_dim, "head_dim")?);
        let (qs, ks) = (hq * d, hk * d);
        let scale = 1.0f32 / (head_dim as f32).sqrt();
        let c = i32::from(causal);
        let mut b = self.stream.launch_builder(self.f("flash_attn_prefill_f16")?);
        b.arg(out).arg(q).arg(k).arg(v).arg(&nq).arg(&nk).arg(&hq).arg(&hk).arg(&d).arg(&qs).arg(&ks).arg(&qs).arg(&scale).arg(&c);
        let grid = (n_q.div_ceil(16).max(1) as u32, heads_q as u32, 1);
        unsafe { b.launch(LaunchConfig { grid_dim: grid, block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }.map_err(derr)?;
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

    pub fn layernorm(&self, x: &[f32], w: &[f32], bias: &[f32], eps: f32) -> Result<Vec<f32>> {
        let cols = w.len();
        let rows = x.len() / cols.max(1);
        let (dx, dw, db) = (self.upload_f16(x)?, self.upload_f16(w)?, self.upload_f16(bias)?);
        let mut out = self.poisoned_f16(x.len())?;
        let c = to_i32(cols, "cols")?;
        let mut b = self.stream.launch_builder(self.f("layernorm_f16")?);
        b.arg(&mut out).arg(&dx).arg(&dw).arg(&db).arg(&c).arg(&eps);
        unsafe { b.launch(LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.map_err(derr)?;
        self.download_f16(&out)
    }

    /// RoPE in place on x[tokens, heads, head_dim] at `pos`, with cos/sin tables [max_pos, head_dim/2].
    pub fn rope(&self, x: &[f32], pos: &[i32], cos: &[f32], sin: &[f32], heads: usize, head_dim: usize) -> Result<Vec<f32>> {
        let mut dx = self.upload_f16(x)?;
        let (dp, dc, ds) = (self.stream.clone_htod(pos).map_err(derr)?, self.stream.clone_htod(cos).map_err(derr)?, self.stream.clone_htod(sin).map_err(derr)?);
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
    pub fn attention_prefill(&self, q: &[f32], k: &[f32], v: &[f32], heads_q: usize, heads_kv: usize, head_dim: usize, causal: bool) -> Result<Vec<f32>> {
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
    pub fn attention_decode(&self, q: &[f32], prefix_k: &[f32], prefix_v: &[f32], suffix_k: &[Vec<f32>], suffix_v: &[Vec<f32>], heads_q: usize, heads_kv: usize, head_dim: usize) -> Result<Vec<f32>> {
        if head_dim > 128 || heads_kv == 0 || !heads_q.is_multiple_of(heads_kv) {
            return Err(err(format!("attention: head_dim {head_dim} (at most 128), heads {heads_q}/{heads_kv} (a multiple)")));
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
        let (dq, dpk, dpv, dsk, dsv) = (self.upload_f16(q)?, self.upload_f16(prefix_k)?, self.upload_f16(prefix_v)?, self.upload_f16(&sk)?, self.upload_f16(&sv)?);
        let dl = self.stream.clone_htod(&lens).map_err(derr)?;
        let mut out = self.poisoned_f16(q.len())?;
        let plen = to_i32(prefix_k.len() / row, "prefix length")?;
        let (r, hq, hk, d) = (to_i32(row, "row")?, to_i32(heads_q, "heads")?, to_i32(heads_kv, "heads")?, to_i32(head_dim, "head_dim")?);
        let seq_stride = (max_s * row) as i64;
        let qs = hq * d;
        let scale = 1.0f32 / (head_dim as f32).sqrt();
        let mut b = self.stream.launch_builder(self.f("attn_decode_f16")?);
        b.arg(&mut out).arg(&dq).arg(&dpk).arg(&dpv).arg(&plen).arg(&r).arg(&dsk).arg(&dsv).arg(&dl).arg(&seq_stride).arg(&r).arg(&hq).arg(&hk).arg(&d).arg(&qs).arg(&qs).arg(&scale);
        unsafe { b.launch(LaunchConfig { grid_dim: (bsz as u32, heads_q as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }.map_err(derr)?;
        self.download_f16(&out)
    }

    /// y + scale * (x A^T) B^T with x [m, k], A [r, k], B [n, r], y [m, n].
    #[allow(clippy::too_many_arguments)]
    pub fn lora(&self, y: &[f32], x: &[f32], a: &[f32], b_: &[f32], k: usize, rank: usize, n: usize, scale: f32) -> Result<Vec<f32>> {
        let m = x.len() / k.max(1);
        let (dx, da, db) = (self.upload_f16(x)?, self.upload_f16(a)?, self.upload_f16(b_)?);
        let mut dy = self.upload_f16(y)?;
        let mut t = self.stream.clone_htod(&vec![f32::NAN; m * rank]).map_err(derr)?;
        let (ki, ri, ni) = (to_i32(k, "k")?, to_i32(rank, "rank")?, to_i32(n, "n")?);
        let mut b = self.stream.launch_builder(self.f("lora_down_f16")?);
        b.arg(&mut t).arg(&dx).arg(&da).arg(&ki).arg(&ri).arg(&ki);
        unsafe { b.launch(LaunchConfig { grid_dim: (m as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }.map_err(derr)?;
        let mut b = self.stream.launch_builder(self.f("lora_up_add_f16")?);
        b.arg(&mut dy).arg(&t).arg(&db).arg(&ni).arg(&ri).arg(&scale).arg(&ni);
        unsafe { b.launch(LaunchConfig { grid_dim: (n.div_ceil(128) as u32, m as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: (rank * 4) as u32 }) }.map_err(derr)?;
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
        unsafe { b.launch(LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.map_err(derr)?;
        Ok((self.stream.clone_dtoh(&out).map_err(derr)?, self.stream.clone_dtoh(&lse).map_err(derr)?))
    }
}
