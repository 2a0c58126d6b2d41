//! `kernels/gemv.cu`: one-row products (decode), alone and fused with their neighbours (RMSNorm, SwiGLU, RoPE).

use super::*;

/// The launch of a `gemv.cu` kernel that puts `warps` warps to work: blocks of 8 warps (256 threads).
pub(crate) fn gemv_cfg(warps: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (warps.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

impl Gpu {
    /// y[n] = x[k] W[n, k]^T with the hand-written GEMV (`kernels/gemv.cu`): one row, k a multiple of 8, one warp
    /// per output feature.
    pub fn gemv_dev(
        &self,
        x: &CudaSlice<f16>,
        w: &CudaSlice<f16>,
        y: &mut CudaSlice<f16>,
        k: usize,
        n: usize,
    ) -> Result<()> {
        self.gemv_split_dev(x, w, y, k, n, 1)
    }

    /// `gemv_dev` with `split` warps per output feature (1, 2, 4 or 8), each summing every split-th stretch of the
    /// row.
    pub fn gemv_split_dev(
        &self,
        x: &CudaSlice<f16>,
        w: &CudaSlice<f16>,
        y: &mut CudaSlice<f16>,
        k: usize,
        n: usize,
        split: usize,
    ) -> Result<()> {
        if !k.is_multiple_of(8) || ![1, 2, 4, 8].contains(&split) || x.len() < k || w.len() < n * k || y.len() < n {
            return Err(err(format!("gemv_m1_f16: k {k} (a multiple of 8), split {split} (1, 2, 4 or 8), n {n} or buffer sizes out of range")));
        }
        let (ki, ni, si) = (to_i32(k, "k")?, to_i32(n, "n")?, split as i32);
        let mut b = self.stream.launch_builder(self.f("gemv_m1_f16")?);
        b.arg(y).arg(x).arg(w).arg(&ki).arg(&ni).arg(&si);
        unsafe { b.launch(gemv_cfg(n * split)) }.map_err(derr)?;
        Ok(())
    }

    /// t = x W^T for one row (`split` warps per output feature, as `gemv_split_dev`), then the residual add and
    /// RMSNorm that follow it in a decoder: h += t, out = h / sqrt(mean(h^2) + eps) * norm_w, all in one launch
    /// (`gemv_add_rmsnorm_m1_f16`: its last block does the add and the norm). The values of `gemv_split_dev` then
    /// `add_rmsnorm_dev`, the sum of squares added in another order.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_add_rmsnorm_dev(
        &self,
        out: &mut CudaSlice<f16>,
        h: &mut CudaSlice<f16>,
        t: &mut CudaSlice<f16>,
        norm_w: &CudaSlice<f16>,
        x: &CudaSlice<f16>,
        w: &CudaSlice<f16>,
        k: usize,
        n: usize,
        split: usize,
        eps: f32,
    ) -> Result<()> {
        if !k.is_multiple_of(8)
            || ![1, 2, 4, 8].contains(&split)
            || x.len() < k
            || w.len() < n * k
            || [t.len(), h.len(), out.len(), norm_w.len()].iter().any(|&l| l < n)
        {
            return Err(err(format!("gemv_add_rmsnorm_m1_f16: k {k} (a multiple of 8), split {split} (1, 2, 4 or 8), n {n} or buffer sizes out of range")));
        }
        let (ki, ni, si) = (to_i32(k, "k")?, to_i32(n, "n")?, split as i32);
        let mut b = self.stream.launch_builder(self.f("gemv_add_rmsnorm_m1_f16")?);
        b.arg(out).arg(h).arg(t).arg(norm_w).arg(x).arg(w).arg(&ki).arg(&ni).arg(&si).arg(&eps).arg(&self.ticket);
        unsafe { b.launch(gemv_cfg(n * split)) }.map_err(derr)?;
        Ok(())
    }

    /// act[inter] = silu(x W_gate^T) * (x W_up^T) for one row, w = [W_gate | W_up] ([2 inter, k], a fused gate/up
    /// projection): `gemv_swiglu_m1_f16`, the gate/up GEMV with SwiGLU as its epilogue (the values `matmul_dev` +
    /// `swiglu_fused_dev` give). `split` warps per row (1, 2 or 4), k a multiple of 8.
    pub fn gemv_swiglu_dev(
        &self,
        x: &CudaSlice<f16>,
        w: &CudaSlice<f16>,
        act: &mut CudaSlice<f16>,
        k: usize,
        inter: usize,
        split: usize,
    ) -> Result<()> {
        if !k.is_multiple_of(8)
            || ![1, 2, 4].contains(&split)
            || x.len() < k
            || w.len() < 2 * inter * k
            || act.len() < inter
        {
            return Err(err(format!("gemv_swiglu_m1_f16: k {k} (a multiple of 8), split {split} (1, 2 or 4), inter {inter} or buffer sizes out of range")));
        }
        let (ki, ii, si) = (to_i32(k, "k")?, to_i32(inter, "inter")?, split as i32);
        let mut b = self.stream.launch_builder(self.f("gemv_swiglu_m1_f16")?);
        b.arg(act).arg(x).arg(w).arg(&ki).arg(&ii).arg(&si);
        unsafe { b.launch(gemv_cfg(2 * inter * split)) }.map_err(derr)?;
        Ok(())
    }

    /// One row through the fused q/k/v projection (`split` warps per feature: 1, 2 or 4) with RoPE and the cache
    /// store as its epilogue (`gemv_qkv_rope_m1_f16`): what `gemv_split_dev` into `qkv` followed by
    /// `rope_kv_store_dev` (one row) give, the same fp16 numbers. The cache row: `lens[0] - 1` (a decode step;
    /// `seq_stride`, the cache's rows times heads_kv * head_dim, only bounds the check) or `start`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_qkv_rope_dev(
        &self,
        qkv: &mut CudaSlice<f16>,
        kc: &mut CudaSlice<f16>,
        vc: &mut CudaSlice<f16>,
        x: &CudaSlice<f16>,
        w: &CudaSlice<f16>,
        k: usize,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        split: usize,
        pos: &CudaSlice<i32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        seq_stride: usize,
        lens: Option<&CudaSlice<i32>>,
        start: usize,
    ) -> Result<()> {
        let (f, kvw) = ((heads_q + 2 * heads_kv) * head_dim, heads_kv * head_dim);
        let need = match lens {
            Some(_) => seq_stride.max(kvw),
            None => (start + 1) * kvw,
        };
        if !k.is_multiple_of(8)
            || ![1, 2, 4].contains(&split)
            || !head_dim.is_multiple_of(2)
            || x.len() < k
            || w.len() < f * k
            || qkv.len() < f
            || kc.len() < need
            || vc.len() < need
            || pos.is_empty()
        {
            return Err(err(format!("gemv_qkv_rope_m1_f16: k {k} (a multiple of 8), split {split} (1, 2 or 4), head_dim {head_dim} (even), heads {heads_q}/{heads_kv}, cache row {start} or buffer sizes out of range")));
        }
        let (ki, hq, hk, d, si, s0) = (
            to_i32(k, "k")?,
            to_i32(heads_q, "heads")?,
            to_i32(heads_kv, "heads")?,
            to_i32(head_dim, "head_dim")?,
            split as i32,
            to_i32(start, "start")?,
        );
        let null = 0u64;
        let mut b = self.stream.launch_builder(self.f("gemv_qkv_rope_m1_f16")?);
        b.arg(qkv).arg(kc).arg(vc).arg(x).arg(w).arg(&ki).arg(&hq).arg(&hk).arg(&d).arg(&si).arg(pos).arg(cos).arg(sin);
        match lens {
            Some(l) => b.arg(l),
            None => b.arg(&null),
        };
        b.arg(&s0);
        unsafe { b.launch(gemv_cfg(f * split)) }.map_err(derr)?;
        Ok(())
    }
}
