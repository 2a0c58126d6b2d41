//! `kernels/convert.cu`: device buffers filled or converted.

use super::*;

impl Gpu {
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
}
