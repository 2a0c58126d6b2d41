//! Host-slice wrappers: upload as fp16, run one kernel, download widened. The parity tests and
//! `scripts/gpu-check.sh` compare them against the CPU backend; the model itself uses the device-buffer launches.

use super::*;

impl Gpu {
    /// `gemv_swiglu_dev` on host data: x [k] against [W_gate | W_up] [2 inter, k].
    pub fn gemv_swiglu(&self, x: &[f32], w: &[f32], split: usize) -> Result<Vec<f32>> {
        let k = x.len();
        let inter = w.len() / (2 * k).max(1);
        let (dx, dw) = (self.upload_f16(x)?, self.upload_f16(w)?);
        let mut y = self.poisoned_f16(inter)?;
        self.gemv_swiglu_dev(&dx, &dw, &mut y, k, inter, split)?;
        self.download_f16(&y)
    }

    /// `gemv_dev` on host data: x [k] against W [n, k].
    pub fn gemv(&self, x: &[f32], w: &[f32]) -> Result<Vec<f32>> {
        let (k, n) = (x.len(), w.len() / x.len().max(1));
        let (dx, dw) = (self.upload_f16(x)?, self.upload_f16(w)?);
        let mut y = self.poisoned_f16(n)?;
        self.gemv_dev(&dx, &dw, &mut y, k, n)?;
        self.download_f16(&y)
    }

    /// `linear_device` on host data.
    pub fn linear(&self, x: &[f32], w: &[f32], k: usize) -> Result<Vec<f32>> {
        let (m, n) = (x.len() / k.max(1), w.len() / k.max(1));
        let (dx, dw) = (self.upload_f16(x)?, self.upload_f16(w)?);
        let mut y = self.poisoned_f16(m * n)?;
        self.linear_device(&dx, &dw, &mut y, m, k, n)?;
        self.download_f16(&y)
    }

    pub fn f32_to_f16(&self, x: &[f32]) -> Result<Vec<f32>> {
        let src = self.stream.clone_htod(x).map_err(derr)?;
        let mut out = self.poisoned_f16(x.len())?;
        let n = x.len() as i64;
        let mut b = self.stream.launch_builder(self.f("f32_to_f16")?);
        b.arg(&mut out).arg(&src).arg(&n);
        unsafe { b.launch(cfg1(x.len(), 256)) }.map_err(derr)?;
        self.download_f16(&out)
    }

    pub fn f16_to_f32(&self, x: &[f32]) -> Result<Vec<f32>> {
        let src = self.upload_f16(x)?;
        let mut out = self.stream.clone_htod(&vec![f32::NAN; x.len().max(1)]).map_err(derr)?;
        let n = x.len() as i64;
        let mut b = self.stream.launch_builder(self.f("f16_to_f32")?);
        b.arg(&mut out).arg(&src).arg(&n);
        unsafe { b.launch(cfg1(x.len(), 256)) }.map_err(derr)?;
        self.stream.clone_dtoh(&out).map_err(derr)
    }

    /// RMSNorm of `rows` rows of `x` by `w`.
    pub fn rmsnorm(&self, x: &[f32], w: &[f32], eps: f32) -> Result<Vec<f32>> {
        let (dx, dw) = (self.upload_f16(x)?, self.upload_f16(w)?);
        let mut out = self.poisoned_f16(x.len())?;
        self.rmsnorm_dev(&mut out, &dx, &dw, x.len() / w.len().max(1), eps)?;
        self.download_f16(&out)
    }

    /// x + r and the RMSNorm of it by w (`add_rmsnorm_f16`): (sum, normed).
    pub fn add_rmsnorm(&self, x: &[f32], r: &[f32], w: &[f32], eps: f32) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut dx, dr, dw) = (self.upload_f16(x)?, self.upload_f16(r)?, self.upload_f16(w)?);
        let mut out = self.poisoned_f16(x.len())?;
        self.add_rmsnorm_dev(&mut out, &mut dx, &dr, &dw, x.len() / w.len().max(1), eps)?;
        Ok((self.download_f16(&dx)?, self.download_f16(&out)?))
    }

    pub fn layernorm(&self, x: &[f32], w: &[f32], bias: &[f32], eps: f32) -> Result<Vec<f32>> {
        let cols = w.len();
        let rows = x.len() / cols.max(1);
        let (dx, dw, db) = (self.upload_f16(x)?, self.upload_f16(w)?, self.upload_f16(bias)?);
        let mut out = self.poisoned_f16(x.len())?;
        let c = to_i32(cols, "cols")?;
        let mut b = self.stream.launch_builder(self.f("layernorm_f16")?);
        b.arg(&mut out).arg(&dx).arg(&dw).arg(&db).arg(&c).arg(&eps);
        unsafe {
            b.launch(LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 })
        }
        .map_err(derr)?;
        self.download_f16(&out)
    }

    /// RoPE in place on x[tokens, heads, head_dim] at `pos`, with cos/sin tables [max_pos, head_dim/2]; with
    /// `sections`, Qwen2-VL's multimodal RoPE (three positions per token in `pos`).
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: &[f32],
        pos: &[i32],
        cos: &[f32],
        sin: &[f32],
        heads: usize,
        head_dim: usize,
        sections: Option<[usize; 3]>,
    ) -> Result<Vec<f32>> {
        let mut dx = self.upload_f16(x)?;
        let (dp, dc, ds) = (
            self.stream.clone_htod(pos).map_err(derr)?,
            self.stream.clone_htod(cos).map_err(derr)?,
            self.stream.clone_htod(sin).map_err(derr)?,
        );
        let tokens = pos.len() / if sections.is_some() { 3 } else { 1 };
        self.rope_strided_dev(&mut dx, &dp, &dc, &ds, tokens, heads, head_dim, heads * head_dim, sections)?;
        self.download_f16(&dx)
    }

    /// silu(gate) * up, elementwise over `rows` x `cols`.
    pub fn swiglu(&self, gate: &[f32], up: &[f32], cols: usize) -> Result<Vec<f32>> {
        let (dg, du) = (self.upload_f16(gate)?, self.upload_f16(up)?);
        let mut out = self.poisoned_f16(gate.len())?;
        self.swiglu_dev(&mut out, &dg, &du, gate.len() / cols.max(1), cols)?;
        self.download_f16(&out)
    }

    /// "gelu_f16" or "quick_gelu_f16", in place.
    pub fn activation(&self, kernel: &str, x: &[f32]) -> Result<Vec<f32>> {
        let mut dx = self.upload_f16(x)?;
        let n = x.len() as i64;
        let mut b = self.stream.launch_builder(self.f(kernel)?);
        b.arg(&mut dx).arg(&n);
        unsafe { b.launch(cfg1(x.len(), 256)) }.map_err(derr)?;
        self.download_f16(&dx)
    }

    pub fn bias_add(&self, x: &[f32], bias: &[f32]) -> Result<Vec<f32>> {
        let mut dx = self.upload_f16(x)?;
        let db = self.upload_f16(bias)?;
        let (r, c) = ((x.len() / bias.len().max(1)) as i64, to_i32(bias.len(), "cols")?);
        let mut b = self.stream.launch_builder(self.f("bias_add_f16")?);
        b.arg(&mut dx).arg(&db).arg(&r).arg(&c);
        unsafe { b.launch(cfg1(x.len(), 256)) }.map_err(derr)?;
        self.download_f16(&dx)
    }

    pub fn residual_add(&self, y: &[f32], x: &[f32]) -> Result<Vec<f32>> {
        let mut dy = self.upload_f16(y)?;
        let dx = self.upload_f16(x)?;
        self.residual_add_dev(&mut dy, &dx, y.len())?;
        self.download_f16(&dy)
    }

    /// Rows of `table` ([vocab, dim]) for `ids`; an id outside the vocabulary is an error naming its position.
    pub fn embedding(&self, table: &[f32], dim: usize, ids: &[i32]) -> Result<Vec<f32>> {
        let dt = self.upload_f16(table)?;
        let mut out = self.poisoned_f16(ids.len() * dim)?;
        self.embedding_dev(&mut out, &dt, dim, ids)?;
        self.download_f16(&out)
    }

    /// Attention prefill: q [n_q, heads_q, d], k/v [n_k, heads_kv, d] -> [n_q, heads_q, d].
    #[allow(clippy::too_many_arguments)]
    pub fn attention_prefill(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        mask: crate::ops::Mask,
    ) -> Result<Vec<f32>> {
        let n_q = q.len() / (heads_q * head_dim).max(1);
        let n_k = k.len() / (heads_kv * head_dim).max(1);
        let (dq, dk, dv) = (self.upload_f16(q)?, self.upload_f16(k)?, self.upload_f16(v)?);
        let mut out = self.poisoned_f16(q.len())?;
        self.attention_prefill_dev(&mut out, &dq, &dk, &dv, n_q, n_k, heads_q, heads_kv, head_dim, mask)?;
        self.download_f16(&out)
    }

    /// Decode attention: one query per sequence (q [B, heads_q, d]) over a shared prefix cache ([P, heads_kv, d])
    /// and each sequence's suffix cache (suffix[b] holds suf_len[b] rows of [heads_kv, d]); with `window`, over the
    /// last `window` keys of each sequence only.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode(
        &self,
        q: &[f32],
        prefix_k: &[f32],
        prefix_v: &[f32],
        suffix_k: &[Vec<f32>],
        suffix_v: &[Vec<f32>],
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        window: Option<usize>,
    ) -> Result<Vec<f32>> {
        if head_dim > 128 || heads_kv == 0 || !heads_q.is_multiple_of(heads_kv) {
            return Err(err(format!(
                "attention: head_dim {head_dim} (at most 128), heads {heads_q}/{heads_kv} (a multiple)"
            )));
        }
        let bsz = suffix_k.len();
        let row = heads_kv * head_dim;
        let max_s = suffix_k.iter().map(|s| s.len() / row).max().unwrap_or(0).max(1);
        let mut sk = vec![0.0f32; bsz * max_s * row];
        let mut sv = sk.clone();
        let mut lens = Vec::new();
        for b in 0..bsz {
            sk[b * max_s * row..b * max_s * row + suffix_k[b].len()].copy_from_slice(&suffix_k[b]);
            sv[b * max_s * row..b * max_s * row + suffix_v[b].len()].copy_from_slice(&suffix_v[b]);
            lens.push(to_i32(suffix_k[b].len() / row, "suffix length")?);
        }
        let (dq, dpk, dpv, dsk, dsv) = (
            self.upload_f16(q)?,
            self.upload_f16(prefix_k)?,
            self.upload_f16(prefix_v)?,
            self.upload_f16(&sk)?,
            self.upload_f16(&sv)?,
        );
        let dl = self.stream.clone_htod(&lens).map_err(derr)?;
        let mut out = self.poisoned_f16(q.len())?;
        let plen = prefix_k.len() / row;
        let max_total = plen + lens.iter().copied().max().unwrap_or(0) as usize;
        let mut part =
            self.stream.alloc_zeros::<f32>(self.decode_part_len(max_total, bsz, heads_q, head_dim)).map_err(derr)?;
        self.attention_decode_dev(
            &mut out,
            &dq,
            heads_q * head_dim,
            &dpk,
            &dpv,
            plen,
            &dsk,
            &dsv,
            &dl,
            max_s * row,
            bsz,
            max_total,
            heads_q,
            heads_kv,
            head_dim,
            &mut part,
            None,
            window,
        )?;
        self.download_f16(&out)
    }

    /// y + scale * (x A^T) B^T with x [m, k], A [r, k], B [n, r], y [m, n].
    #[allow(clippy::too_many_arguments)]
    pub fn lora(
        &self,
        y: &[f32],
        x: &[f32],
        a: &[f32],
        b_: &[f32],
        k: usize,
        rank: usize,
        n: usize,
        scale: f32,
    ) -> Result<Vec<f32>> {
        let m = x.len() / k.max(1);
        let (dx, da, db) = (self.upload_f16(x)?, self.upload_f16(a)?, self.upload_f16(b_)?);
        let mut dy = self.upload_f16(y)?;
        let mut t = self.stream.clone_htod(&vec![f32::NAN; m * rank]).map_err(derr)?;
        let (ki, ri, ni) = (to_i32(k, "k")?, to_i32(rank, "rank")?, to_i32(n, "n")?);
        let mut b = self.stream.launch_builder(self.f("lora_down_f16")?);
        b.arg(&mut t).arg(&dx).arg(&da).arg(&ki).arg(&ri).arg(&ki);
        unsafe { b.launch(LaunchConfig { grid_dim: (m as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }
            .map_err(derr)?;
        let mut b = self.stream.launch_builder(self.f("lora_up_add_f16")?);
        b.arg(&mut dy).arg(&t).arg(&db).arg(&ni).arg(&ri).arg(&scale).arg(&ni);
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (n.div_ceil(128) as u32, m as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: (rank * 4) as u32,
            })
        }
        .map_err(derr)?;
        self.download_f16(&dy)
    }

    /// log p(labels[r]) under the softmax of logits row r ([rows, vocab], f32), and each row's logsumexp.
    pub fn logprobs(&self, logits: &[f32], vocab: usize, labels: &[i32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let rows = labels.len();
        let dl = self.stream.clone_htod(logits).map_err(derr)?;
        let dy = self.stream.clone_htod(labels).map_err(derr)?;
        let mut out = self.stream.clone_htod(&vec![f32::NAN; rows.max(1)]).map_err(derr)?;
        let mut lse = self.stream.clone_htod(&vec![f32::NAN; rows.max(1)]).map_err(derr)?;
        let v = to_i32(vocab, "vocab")?;
        let mut b = self.stream.launch_builder(self.f("logprob_gather_f32")?);
        b.arg(&mut out).arg(&mut lse).arg(&dl).arg(&dy).arg(&v);
        unsafe {
            b.launch(LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 })
        }
        .map_err(derr)?;
        Ok((self.stream.clone_dtoh(&out).map_err(derr)?, self.stream.clone_dtoh(&lse).map_err(derr)?))
    }

    /// Host wrapper: (dx, dw) of RMSNorm.
    pub fn rmsnorm_bwd(&self, dout: &[f32], x: &[f32], w: &[f32], eps: f32) -> Result<(Vec<f32>, Vec<f32>)> {
        let (dd, dx_, dw_) = (self.upload_f16(dout)?, self.upload_f16(x)?, self.upload_f16(w)?);
        let mut dx = self.poisoned_f16(x.len())?;
        let mut dw = self.f32_buf(w.len(), 0.0)?;
        self.rmsnorm_bwd_dev(&mut dx, Some(&mut dw), &dd, &dx_, &dw_, x.len() / w.len().max(1), eps)?;
        Ok((self.download_f16(&dx)?, self.stream.clone_dtoh(&dw).map_err(derr)?))
    }

    /// Host wrapper: (dx, dw, db) of LayerNorm.
    pub fn layernorm_bwd(
        &self,
        dout: &[f32],
        x: &[f32],
        w: &[f32],
        eps: f32,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let cols = w.len();
        let (dd, dx_, dw_) = (self.upload_f16(dout)?, self.upload_f16(x)?, self.upload_f16(w)?);
        let mut dx = self.poisoned_f16(x.len())?;
        let (mut dw, mut db) = (self.f32_buf(cols, 0.0)?, self.f32_buf(cols, 0.0)?);
        let c = to_i32(cols, "cols")?;
        let mut b = self.stream.launch_builder(self.f("layernorm_bwd_f16")?);
        b.arg(&mut dx).arg(&mut dw).arg(&mut db).arg(&dd).arg(&dx_).arg(&dw_).arg(&c).arg(&eps);
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: ((x.len() / cols.max(1)) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(derr)?;
        Ok((
            self.download_f16(&dx)?,
            self.stream.clone_dtoh(&dw).map_err(derr)?,
            self.stream.clone_dtoh(&db).map_err(derr)?,
        ))
    }

    pub fn swiglu_bwd(&self, dout: &[f32], g: &[f32], u: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let (dd, dg_, du_) = (self.upload_f16(dout)?, self.upload_f16(g)?, self.upload_f16(u)?);
        let (mut dg, mut du) = (self.poisoned_f16(g.len())?, self.poisoned_f16(g.len())?);
        self.swiglu_bwd_dev(&mut dg, &mut du, &dd, &dg_, &du_, g.len())?;
        Ok((self.download_f16(&dg)?, self.download_f16(&du)?))
    }

    /// "gelu_bwd_f16" or "quick_gelu_bwd_f16": dx from dout and the saved pre-activation x.
    pub fn activation_bwd(&self, kernel: &str, dout: &[f32], x: &[f32]) -> Result<Vec<f32>> {
        let (dd, dx_) = (self.upload_f16(dout)?, self.upload_f16(x)?);
        let mut dx = self.poisoned_f16(x.len())?;
        self.activation_bwd_dev(kernel, &mut dx, &dd, &dx_, x.len())?;
        self.download_f16(&dx)
    }

    pub fn rope_bwd(
        &self,
        dx: &[f32],
        pos: &[i32],
        cos: &[f32],
        sin: &[f32],
        heads: usize,
        head_dim: usize,
    ) -> Result<Vec<f32>> {
        let mut d = self.upload_f16(dx)?;
        let (dp, dc, ds) = (
            self.stream.clone_htod(pos).map_err(derr)?,
            self.stream.clone_htod(cos).map_err(derr)?,
            self.stream.clone_htod(sin).map_err(derr)?,
        );
        self.rope_bwd_dev(&mut d, &dp, &dc, &ds, pos.len(), heads, head_dim, None)?;
        self.download_f16(&d)
    }

    /// Embedding backward: dtable ([vocab, dim], fp32) with the rows of `dout` added at `ids`.
    pub fn embedding_bwd(&self, vocab: usize, dim: usize, dout: &[f32], ids: &[i32]) -> Result<Vec<f32>> {
        let dd = self.upload_f16(dout)?;
        let di = self.stream.clone_htod(ids).map_err(derr)?;
        let mut dt = self.f32_buf(vocab * dim, 0.0)?;
        let (n, d, v) = (to_i32(ids.len(), "tokens")?, to_i32(dim, "dim")?, to_i32(vocab, "vocab")?);
        let mut b = self.stream.launch_builder(self.f("embedding_bwd_f32")?);
        b.arg(&mut dt).arg(&dd).arg(&di).arg(&n).arg(&d).arg(&v);
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (ids.len().max(1) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(derr)?;
        self.stream.clone_dtoh(&dt).map_err(derr)
    }

    /// Host wrapper: the forward (saving lse), then (dq, dk, dv).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_bwd(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dout: &[f32],
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        mask: crate::ops::Mask,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let n_q = q.len() / (heads_q * head_dim).max(1);
        let n_k = k.len() / (heads_kv * head_dim).max(1);
        let (dq_, dk_, dv_, dd) =
            (self.upload_f16(q)?, self.upload_f16(k)?, self.upload_f16(v)?, self.upload_f16(dout)?);
        let mut out = self.poisoned_f16(q.len())?;
        let mut lse = self.f32_buf(n_q * heads_q, f32::NAN)?;
        self.attention_prefill_lse_dev(
            &mut out,
            Some(&mut lse),
            &dq_,
            &dk_,
            &dv_,
            n_q,
            n_k,
            heads_q,
            heads_kv,
            head_dim,
            mask,
        )?;
        let (mut dq, mut dk, mut dv) =
            (self.poisoned_f16(q.len())?, self.poisoned_f16(k.len())?, self.poisoned_f16(v.len())?);
        self.attention_bwd_dev(
            &mut dq, &mut dk, &mut dv, &dq_, &dk_, &dv_, &out, &lse, &dd, n_q, n_k, heads_q, heads_kv, head_dim, mask,
        )?;
        Ok((self.download_f16(&dq)?, self.download_f16(&dk)?, self.download_f16(&dv)?))
    }
}
