//! CUDA, first part: the hand-written fp16 kernels of `kernels/*.cu` (embedded in the binary), compiled once at
//! start-up with NVRTC for the device's compute capability, and launch wrappers for each of them. Everything is
//! loaded dynamically (cudarc `dynamic-loading`, CUDA 13): a machine without a GPU or CUDA libraries builds and
//! runs the same binary and simply gets `None` from [`Gpu::open`] with the reason. cudarc panics when a library is
//! missing, so every entry point checks presence first.
//!
//! One file per kernel family, mirroring `kernels/*.cu` (`act`, `attention`, `convert`, `embedding`, `gemv`,
//! `logprob`, `lora`, `norm`, `optim`, `rope`, `sampling`): each holds its kernels' launches on device buffers, with
//! their launch geometry. `device` compiles and loads the kernels, `blas` plans the cuBLASLt GEMMs, `tune` picks the
//! GEMV per shape; this file holds the device itself (`Gpu`). `testing` has the host-slice wrappers (upload as fp16,
//! compute with fp32 accumulation, download widened) that the parity tests and `scripts/gpu-check.sh` compare
//! against the CPU backend. The model running on the device (`crate::cuda_llama`, `crate::cuda_clip`,
//! `crate::cuda_train`: weights uploaded once, KV caches on the device) builds on the launches.
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

mod act;
mod attention;
mod blas;
mod convert;
mod device;
mod embedding;
mod gemv;
mod logprob;
mod lora;
pub mod nccl;
mod norm;
mod optim;
mod rope;
mod sampling;
pub mod testing;
mod tune;

pub(crate) use attention::AttnRows;
use attention::{dkdv_mma_smem, mma_attention_allowed};
use blas::Lt;
pub(crate) use device::err;
pub use device::{
    arch_name, compile_all, cublaslt_status, device_count, driver_status, include_dirs, kernel_names, nvrtc_status,
    source, Compiled, SOURCES,
};
pub use lora::dropout_threshold;
pub use optim::{AdamW, LossScaler};
pub use tune::GemvChoice;

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

    pub(crate) fn mem_pool(ctx: &CudaContext) -> Result<cudarc::driver::sys::CUmemoryPool> {
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

    pub(crate) fn f32_buf(&self, n: usize, fill: f32) -> Result<CudaSlice<f32>> {
        self.stream.clone_htod(&vec![fill; n.max(1)]).map_err(derr)
    }
}
