//! `kernels/norm.cu`: RMSNorm (with the residual add) and LayerNorm, forward and backward.

use super::*;

impl Gpu {
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
}
