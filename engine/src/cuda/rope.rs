//! `kernels/rope.cu`: rotary embeddings, with the KV-cache store fused, forward and backward.

use super::*;

impl Gpu {
    /// RoPE in place on x (tokens = pos.len() rows of `heads` x `head_dim`), tables [max_pos, head_dim / 2].
    #[allow(clippy::too_many_arguments)]
    pub fn rope_dev(
        &self,
        x: &mut CudaSlice<f16>,
        pos: &CudaSlice<i32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        self.rope_strided_dev(x, pos, cos, sin, tokens, heads, head_dim, heads * head_dim, None)
    }

    /// RoPE on the first `heads` heads of rows `stride` elements apart (q and k of a fused QKV buffer in one launch).
    /// With `sections`, Qwen2-VL's multimodal RoPE: `pos` holds three positions per row (temporal, height, width; a
    /// text row repeats its position), and `sections` frequency pairs follow each (`mrope_section`).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_strided_dev(
        &self,
        x: &mut CudaSlice<f16>,
        pos: &CudaSlice<i32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        stride: usize,
        sections: Option<[usize; 3]>,
    ) -> Result<()> {
        self.rope_launch("rope_f16", x, pos, cos, sin, tokens, heads, head_dim, stride, sections)
    }

    /// Launches `rope_f16` or `rope_bwd_f16` (same arguments) on `tokens` rows; `sections`: three positions per row.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rope_launch(
        &self,
        kernel: &str,
        x: &mut CudaSlice<f16>,
        pos: &CudaSlice<i32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        stride: usize,
        sections: Option<[usize; 3]>,
    ) -> Result<()> {
        let width = if sections.is_some() { 3 } else { 1 };
        let half = head_dim / 2;
        if pos.len() < tokens * width
            || x.len() < tokens.saturating_sub(1) * stride + heads * head_dim
            || sections.is_some_and(|s| s.iter().sum::<usize>() > half)
        {
            return Err(err(format!(
                "rope: {tokens} rows of {heads} x {head_dim} (stride {stride}, {width} positions each) exceed the \
                 buffers, or sections {sections:?} exceed the head"
            )));
        }
        let (s0, s1) = sections.map_or((half, half), |s| (s[0], s[0] + s[1]));
        let (t, h, d, st, pw, a, b1) = (
            to_i32(tokens, "tokens")?,
            to_i32(heads, "heads")?,
            to_i32(head_dim, "head_dim")?,
            to_i32(stride, "stride")?,
            width as i32,
            to_i32(s0, "section")?,
            to_i32(s1, "section")?,
        );
        let mut b = self.stream.launch_builder(self.f(kernel)?);
        b.arg(x).arg(pos).arg(cos).arg(sin).arg(&t).arg(&h).arg(&d).arg(&st).arg(&pw).arg(&a).arg(&b1);
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (tokens as u32, heads as u32, 1),
                block_dim: (64, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(derr)?;
        Ok(())
    }

    /// RoPE on the q and k heads of a fused QKV buffer (rows of `qkv_stride`: q heads, k heads, v heads) and the
    /// store of k and v into the caches, in one kernel (`rope_kv_store_f16`): what `rope_strided_dev` over the q and
    /// k heads followed by `kv_store_dev` do, with the same destinations (`lens` per sequence, else `start`).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_kv_store_dev(
        &self,
        qkv: &mut CudaSlice<f16>,
        kc: &mut CudaSlice<f16>,
        vc: &mut CudaSlice<f16>,
        pos: &CudaSlice<i32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        rows: usize,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        qkv_stride: usize,
        seq_stride: usize,
        lens: Option<&CudaSlice<i32>>,
        start: usize,
    ) -> Result<()> {
        let w = heads_kv * head_dim;
        let need = match lens {
            Some(_) => rows * seq_stride.max(w),
            None => (start + rows) * w,
        };
        if rows == 0
            || kc.len() < need
            || vc.len() < need
            || qkv.len() < rows * qkv_stride
            || qkv_stride < (heads_q + 2 * heads_kv) * head_dim
            || pos.len() < rows
        {
            return Err(err(format!("rope + kv store: {rows} rows at position {start} do not fit the buffers")));
        }
        let (hq, hk, d, qs, st, s0) = (
            to_i32(heads_q, "heads")?,
            to_i32(heads_kv, "heads")?,
            to_i32(head_dim, "head_dim")?,
            to_i32(qkv_stride, "stride")?,
            seq_stride as i64,
            to_i32(start, "start")?,
        );
        let null = 0u64;
        let mut b = self.stream.launch_builder(self.f("rope_kv_store_f16")?);
        b.arg(qkv).arg(kc).arg(vc).arg(pos).arg(cos).arg(sin).arg(&hq).arg(&hk).arg(&d).arg(&qs).arg(&st);
        match lens {
            Some(l) => b.arg(l),
            None => b.arg(&null),
        };
        b.arg(&s0);
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (rows as u32, (heads_q + heads_kv) as u32, 1),
                block_dim: (64, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(derr)?;
        Ok(())
    }

    /// `rope_kv_store_dev` on host data, one sequence appended at `start` of caches of `capacity` rows: returns
    /// (qkv after RoPE, key cache, value cache), next to what `rope_strided_dev` + `kv_store_dev` give (parity).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    pub fn rope_kv_store_pair(
        &self,
        qkv: &[f32],
        pos: &[i32],
        cos: &[f32],
        sin: &[f32],
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        start: usize,
        capacity: usize,
    ) -> Result<[(Vec<f32>, Vec<f32>, Vec<f32>); 2]> {
        let stride = (heads_q + 2 * heads_kv) * head_dim;
        let rows = pos.len();
        let w = heads_kv * head_dim;
        let (dp, dc, ds) = (
            self.stream.clone_htod(pos).map_err(derr)?,
            self.stream.clone_htod(cos).map_err(derr)?,
            self.stream.clone_htod(sin).map_err(derr)?,
        );
        let mut out = Vec::new();
        for fused in [true, false] {
            let mut dq = self.upload_f16(qkv)?;
            let (mut kc, mut vc) = (self.poisoned_f16(capacity * w)?, self.poisoned_f16(capacity * w)?);
            if fused {
                self.rope_kv_store_dev(
                    &mut dq, &mut kc, &mut vc, &dp, &dc, &ds, rows, heads_q, heads_kv, head_dim, stride, 0, None, start,
                )?;
            } else {
                self.rope_strided_dev(&mut dq, &dp, &dc, &ds, rows, heads_q + heads_kv, head_dim, stride, None)?;
                self.kv_store_dev(
                    &mut kc,
                    &mut vc,
                    &dq,
                    rows,
                    w,
                    stride,
                    heads_q * head_dim,
                    (heads_q + heads_kv) * head_dim,
                    0,
                    None,
                    start,
                )?;
            }
            out.push((self.download_f16(&dq)?, self.download_f16(&kc)?, self.download_f16(&vc)?));
        }
        let unfused = out.pop().ok_or_else(|| err("rope_kv_store_pair"))?;
        let fused = out.pop().ok_or_else(|| err("rope_kv_store_pair"))?;
        Ok([fused, unfused])
    }

    /// Stores the keys and values of a fused QKV buffer (`rows` rows of `qkv_stride`: k at `k_off`, v at `v_off`,
    /// `w` elements each) into caches `kc`/`vc`: with `lens`, row r is sequence r's newest token, stored at position
    /// lens[r] - 1 of sequence r (sequences `seq_stride` apart); without, row r goes to position start + r.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_store_dev(
        &self,
        kc: &mut CudaSlice<f16>,
        vc: &mut CudaSlice<f16>,
        qkv: &CudaSlice<f16>,
        rows: usize,
        w: usize,
        qkv_stride: usize,
        k_off: usize,
        v_off: usize,
        seq_stride: usize,
        lens: Option<&CudaSlice<i32>>,
        start: usize,
    ) -> Result<()> {
        let need = match lens {
            Some(_) => rows * seq_stride.max(w),
            None => (start + rows) * w,
        };
        if kc.len() < need || vc.len() < need || qkv.len() < rows * qkv_stride {
            return Err(err(format!("kv store: {rows} rows at position {start} do not fit the cache")));
        }
        let (r, wi, qs, ko, vo, st, s0) = (
            to_i32(rows, "rows")?,
            to_i32(w, "row")?,
            to_i32(qkv_stride, "stride")?,
            to_i32(k_off, "k offset")?,
            to_i32(v_off, "v offset")?,
            seq_stride as i64,
            to_i32(start, "start")?,
        );
        let null = 0u64;
        let mut b = self.stream.launch_builder(self.f("kv_store_f16")?);
        b.arg(kc).arg(vc).arg(qkv).arg(&r).arg(&wi).arg(&qs).arg(&ko).arg(&vo).arg(&st);
        match lens {
            Some(l) => b.arg(l),
            None => b.arg(&null),
        };
        b.arg(&s0);
        unsafe { b.launch(cfg1(rows * w, 256)) }.map_err(derr)?;
        Ok(())
    }

    /// Backward of `rope_dev`, in place on the gradient (`sections`: three positions per row, as
    /// `rope_strided_dev`).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_bwd_dev(
        &self,
        dx: &mut CudaSlice<f16>,
        pos: &CudaSlice<i32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        sections: Option<[usize; 3]>,
    ) -> Result<()> {
        self.rope_launch("rope_bwd_f16", dx, pos, cos, sin, tokens, heads, head_dim, heads * head_dim, sections)
    }
}
