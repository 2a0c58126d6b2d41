//! `kernels/sampling.cu`: the greedy pick on the device.

use super::*;

impl Gpu {
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
}
