//! `kernels/lora.cu`: LoRA dropout masks drawn as the CPU trainer draws them.

use super::*;

/// The integer form of the CPU's dropout test `u < p` for u = k / 2^53 (k the top 53 bits of a SplitMix64
/// output): k < ceil(p * 2^53), exact because scaling by 2^53 is.
pub fn dropout_threshold(p: f64) -> u64 {
    (p.clamp(0.0, 1.0) * (1u64 << 53) as f64).ceil() as u64
}

impl Gpu {
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
    pub(crate) fn dropout_launch(
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
}
