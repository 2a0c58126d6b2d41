//! `kernels/optim.cu`: gradient accumulation and norms, AdamW, and the fp16 loss scaler.

use super::*;

/// AdamW hyper-parameters for `Gpu::adamw_dev` (fp32, as the kernel takes them).
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
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

impl Gpu {
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
