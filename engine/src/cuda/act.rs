//! `kernels/act.cu`: SwiGLU and the other activations, residual adds, forward and backward.

use super::*;

impl Gpu {
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
}
