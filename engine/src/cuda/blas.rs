//! cuBLASLt: plans per GEMM shape (cached), and the GEMM entry points the decoder and trainer call.

use super::*;

/// One GEMM's shape in cuBLASLt's (column-major) terms, and the alignment (bytes, up to 256) of its A, B and C
/// pointers: what its plan depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct LtShape {
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
pub(crate) struct LtPlan {
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

pub(crate) fn lt_check(st: lt::cublasStatus_t, what: &str) -> std::result::Result<(), String> {
    if st == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(format!("{what}: {st:?}"))
    }
}

impl LtPlan {
    /// fp16 A, B, C with fp32 compute and scale; the heuristic told the pointers' alignment and the workspace.
    pub(crate) fn new(
        handle: lt::cublasLtHandle_t,
        s: &LtShape,
        workspace: usize,
    ) -> std::result::Result<LtPlan, String> {
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
pub(crate) const MAX_PLANS: usize = 4096;

/// cuBLASLt: a handle, a workspace, and a plan per GEMM shape (descriptors and the heuristic's algorithm, which
/// cudarc's `matmul` would otherwise rebuild and query on every call: ~50 times per layer in a training pass).
pub(crate) struct Lt {
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

/// The alignment of a device address in bytes, capped at 256 (what cuBLASLt's heuristic asks about).
pub(crate) fn align_of(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        (1u64 << ptr.trailing_zeros().min(8)) as u32
    }
}

impl Lt {
    pub(crate) fn new(stream: &Arc<CudaStream>, major: i32) -> Result<Lt> {
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

impl Gpu {
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
        self.linear_view(x, &w.slice(..), y, m, k, n)
    }

    /// `linear_device` with the weight a view (part of a larger buffer: a trained copy's weights).
    pub fn linear_view(
        &self,
        x: &CudaSlice<f16>,
        w: &cudarc::driver::CudaView<f16>,
        y: &mut CudaSlice<f16>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        if x.len() < m * k || w.len() < n * k || y.len() < m * n {
            return Err(err(format!("linear: buffers too small for m {m}, k {k}, n {n}")));
        }
        self.gemm(&x.slice(..), k, false, w, k, true, &mut y.slice_mut(..), n, m, n, k, 1.0, 0.0)
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
        let choice = if m == 1 && k.is_multiple_of(8) && self.gemv.load(std::sync::atomic::Ordering::Relaxed) {
            self.gemv_choice(k, n).unwrap_or(GemvChoice::Gemv(1))
        } else {
            GemvChoice::Blas
        };
        self.matmul_with(choice, x, w, y, m, k, n)
    }

    /// A linear layer on device buffers the way `choice` says: one row through `gemv_m1_f16` with that many warps
    /// per output feature, or cuBLASLt (any rows). What a decode plan (`cuda_llama::DecodePlan`) launches.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_with(
        &self,
        choice: GemvChoice,
        x: &CudaSlice<f16>,
        w: &CudaSlice<f16>,
        y: &mut CudaSlice<f16>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        match choice {
            GemvChoice::Gemv(split) if m == 1 => self.gemv_split_dev(x, w, y, k, n, split),
            GemvChoice::Gemv(split) => Err(err(format!("gemv/{split} takes one row, not {m}"))),
            GemvChoice::Blas => self.linear_device(x, w, y, m, k, n),
        }
    }
}
