//! `kernels/logprob.cu`: answer log-probabilities and their gradient in one pass.

use super::*;

impl Gpu {
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
}
