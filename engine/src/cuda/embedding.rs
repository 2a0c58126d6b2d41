//! `kernels/embedding.cu`: token embedding lookups.

use super::*;

impl Gpu {
    /// out = table rows for device ids (already checked against the vocabulary on the host); `flag` is a scratch
    /// int the kernel may set. Capturable in a CUDA graph (no host round trip).
    pub fn embedding_ids_dev(
        &self,
        out: &mut CudaSlice<f16>,
        table: &CudaSlice<f16>,
        dim: usize,
        ids: &CudaSlice<i32>,
        n: usize,
        flag: &mut CudaSlice<i32>,
    ) -> Result<()> {
        let vocab = table.len() / dim.max(1);
        let (nn, d, v) = (to_i32(n, "tokens")?, to_i32(dim, "dim")?, to_i32(vocab, "vocab")?);
        let mut b = self.stream.launch_builder(self.f("embedding_gather_f16")?);
        b.arg(out).arg(table).arg(ids).arg(&nn).arg(&d).arg(&v).arg(flag);
        unsafe {
            b.launch(LaunchConfig { grid_dim: (n.max(1) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 })
        }
        .map_err(derr)?;
        Ok(())
    }

    /// out = rows of `table` ([vocab, dim]) for `ids`; an id outside the vocabulary is an error naming it.
    pub fn embedding_dev(
        &self,
        out: &mut CudaSlice<f16>,
        table: &CudaSlice<f16>,
        dim: usize,
        ids: &[i32],
    ) -> Result<()> {
        let vocab = table.len() / dim.max(1);
        let di = self.stream.clone_htod(ids).map_err(derr)?;
        let mut e = self.stream.alloc_zeros::<i32>(1).map_err(derr)?;
        let (n, d, v) = (to_i32(ids.len(), "tokens")?, to_i32(dim, "dim")?, to_i32(vocab, "vocab")?);
        let mut b = self.stream.launch_builder(self.f("embedding_gather_f16")?);
        b.arg(out).arg(table).arg(&di).arg(&n).arg(&d).arg(&v).arg(&mut e);
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (ids.len().max(1) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(derr)?;
        let flag = self.stream.clone_dtoh(&e).map_err(derr)?[0];
        if flag > 0 {
            let at = (flag - 1) as usize;
            return Err(err(format!("token id {} at position {at} is outside the vocabulary of {vocab}", ids[at])));
        }
        Ok(())
    }
}
