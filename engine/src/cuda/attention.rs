//! `kernels/attention.cu`: prefill (flash, and the tensor-core variant), decode (split over chunks) and the
//! backward kernels.

use super::*;
use crate::ops::Mask;

/// The attention kernels' `causal` and `window` arguments of a mask.
fn mask_args(mask: Mask) -> Result<(i32, i32)> {
    Ok(match mask {
        Mask::Full => (0, 0),
        Mask::Causal => (1, 0),
        Mask::Window(w) => (1, to_i32(w.max(1), "window")?),
    })
}

/// Whether `RLAIFD_CUDA_MMA_ATTENTION` leaves the tensor-core attention kernels on (unset or anything but `0`): a
/// switch for GPU hosts that run prebuilt binaries (`scripts/gpu-check.sh`) to fall back to the scalar kernels.
pub(crate) fn mma_attention_allowed() -> bool {
    !matches!(std::env::var("RLAIFD_CUDA_MMA_ATTENTION").as_deref().map(str::trim), Ok("0"))
}

/// Dynamic shared memory of `flash_attn_bwd_dkdv_mma_d{64,128}_f16`: 64 rows each of keys, values, queries and
/// output gradients, `head_dim` + 8 halves per row.
pub(crate) fn dkdv_mma_smem(head_dim: usize) -> usize {
    4 * 64 * (head_dim + 8) * 2
}

/// Where an attention call's q, k and v rows (or their gradients) start on the device and how many elements apart
/// their rows are, so they can be column blocks of one fused QKV buffer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnRows {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub q_stride: usize,
    pub kv_stride: usize,
}

impl Gpu {
    /// out [n_q, heads_q, d] = attention of q [n_q, heads_q, d] over the first n_k rows of k/v [.., heads_kv, d];
    /// causal: query i sees keys up to i + n_k - n_q (a cached prefix); a window: only the last w of those.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_prefill_dev(
        &self,
        out: &mut CudaSlice<f16>,
        q: &CudaSlice<f16>,
        k: &CudaSlice<f16>,
        v: &CudaSlice<f16>,
        n_q: usize,
        n_k: usize,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        mask: Mask,
    ) -> Result<()> {
        self.attention_prefill_lse_dev(out, None, q, k, v, n_q, n_k, heads_q, heads_kv, head_dim, mask)
    }

    /// `attention_prefill_dev` that also saves each row's log-sum-exp ([n_q, heads_q], fp32) for the backward pass.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_prefill_lse_dev(
        &self,
        out: &mut CudaSlice<f16>,
        lse: Option<&mut CudaSlice<f32>>,
        q: &CudaSlice<f16>,
        k: &CudaSlice<f16>,
        v: &CudaSlice<f16>,
        n_q: usize,
        n_k: usize,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        mask: Mask,
    ) -> Result<()> {
        self.attention_prefill_strided_dev(
            out,
            lse,
            q,
            heads_q * head_dim,
            k,
            v,
            n_q,
            n_k,
            heads_q,
            heads_kv,
            head_dim,
            mask,
        )
    }

    /// `attention_prefill_lse_dev` with query rows `q_stride` elements apart (q inside a fused QKV buffer).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_prefill_strided_dev(
        &self,
        out: &mut CudaSlice<f16>,
        lse: Option<&mut CudaSlice<f32>>,
        q: &CudaSlice<f16>,
        q_stride: usize,
        k: &CudaSlice<f16>,
        v: &CudaSlice<f16>,
        n_q: usize,
        n_k: usize,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        mask: Mask,
    ) -> Result<()> {
        if n_k < n_q && mask != Mask::Full {
            return Err(err(format!("attention: fewer keys ({n_k}) than queries ({n_q})")));
        }
        let rows = AttnRows {
            q: self.dptr(q, 0),
            k: self.dptr(k, 0),
            v: self.dptr(v, 0),
            q_stride,
            kv_stride: heads_kv * head_dim,
        };
        self.attention_fwd_at(out, lse, rows, n_q, n_k, heads_q, heads_kv, head_dim, mask)
    }

    /// `flash_attn_prefill_f16`, or its tensor-core twin where `mma_attention` allows, on operands given by address
    /// and row stride (`AttnRows`): out [n_q, heads_q, d] and, when given, each row's log-sum-exp. The caller keeps the operands alive and large enough.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_fwd_at(
        &self,
        out: &mut CudaSlice<f16>,
        lse: Option<&mut CudaSlice<f32>>,
        x: AttnRows,
        n_q: usize,
        n_k: usize,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        mask: Mask,
    ) -> Result<()> {
        if head_dim > 128
            || heads_kv == 0
            || !heads_q.is_multiple_of(heads_kv)
            || out.len() < n_q * heads_q * head_dim
            || lse.as_ref().is_some_and(|l| l.len() < n_q * heads_q)
        {
            return Err(err(format!("attention: head_dim {head_dim} (at most 128), heads {heads_q}/{heads_kv} (a multiple), {n_q} output and lse rows")));
        }
        let (nq, nk, hq, hk, d) = (
            to_i32(n_q, "n_q")?,
            to_i32(n_k, "n_k")?,
            to_i32(heads_q, "heads")?,
            to_i32(heads_kv, "heads")?,
            to_i32(head_dim, "head_dim")?,
        );
        let (qs, ks, os) = (to_i32(x.q_stride, "q stride")?, to_i32(x.kv_stride, "kv stride")?, hq * d);
        let scale = 1.0f32 / (head_dim as f32).sqrt();
        let (c, window) = mask_args(mask)?;
        let null = 0u64;
        // The tensor-core kernel: 64 query rows per block, k and v staged with 16-byte loads, q and out by pairs.
        let mma = self.mma_attention.load(std::sync::atomic::Ordering::Relaxed)
            && (head_dim == 64 || head_dim == 128)
            && (x.k | x.v).is_multiple_of(16)
            && x.kv_stride.is_multiple_of(8)
            && (x.q | self.dptr(out, 0)).is_multiple_of(4)
            && x.q_stride.is_multiple_of(2);
        let kernel = match (mma, head_dim) {
            (true, 64) => "flash_attn_mma_d64_f16",
            (true, _) => "flash_attn_mma_d128_f16",
            _ => "flash_attn_prefill_f16",
        };
        let mut b = self.stream.launch_builder(self.f(kernel)?);
        b.arg(out).arg(&x.q).arg(&x.k).arg(&x.v).arg(&nq).arg(&nk).arg(&hq).arg(&hk);
        if !mma {
            b.arg(&d);
        }
        b.arg(&qs).arg(&ks).arg(&os).arg(&scale).arg(&c);
        match lse {
            Some(l) => b.arg(l),
            None => b.arg(&null),
        };
        b.arg(&window);
        let grid = (n_q.div_ceil(if mma { 64 } else { 16 }).max(1) as u32, heads_q as u32, 1);
        unsafe { b.launch(LaunchConfig { grid_dim: grid, block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }
            .map_err(derr)?;
        Ok(())
    }

    /// How `attention_decode_dev` splits `max_total` keys for `bsz` sequences of `heads_q` heads: (chunk, nsplit).
    /// The blocks of all chunks fit on the GPU at once where they can (`decode_blocks_per_sm` times the SMs): each
    /// warp's keys are a latency-bound chain of loads, so a second wave of blocks adds its latency while the total
    /// chain stays as long, and fewer chunks leave less to merge. Each chunk is at least 32 keys (8 per warp: one
    /// round of loads).
    pub fn decode_split(&self, max_total: usize, bsz: usize, heads_q: usize) -> (usize, usize) {
        let slots = self.decode_blocks_per_sm.load(std::sync::atomic::Ordering::Relaxed).max(1) * self.sms;
        let per_seq = (slots / (bsz * heads_q).max(1)).max(1);
        let chunk = max_total.div_ceil(per_seq).max(32);
        (chunk, max_total.div_ceil(chunk).max(1))
    }

    /// Floats of the workspace `attention_decode_dev` needs: the partial states, then a ticket counter per
    /// (sequence, head). It must start zeroed (the counters; each launch leaves them at 0).
    pub fn decode_part_len(&self, max_total: usize, bsz: usize, heads_q: usize, head_dim: usize) -> usize {
        let (_, nsplit) = self.decode_split(max_total, bsz, heads_q);
        if nsplit > 1 {
            bsz * heads_q * (nsplit * (head_dim + 2) + 1)
        } else {
            1
        }
    }

    /// Decode attention on device buffers (flash-decoding): one query per sequence, q rows `q_stride` apart (heads_q
    /// x d each), keys 0..prefix_len from the shared prefix cache (rows of heads_kv * d), then suf_lens[b] keys from
    /// sequence b's suffix cache (sequence b at b * suf_seq_stride); out [bsz, heads_q, d]. `max_total` (prefix_len
    /// plus the suffix capacity) fixes the split, so a captured graph replays for every step; `part` is the
    /// workspace (`decode_part_len`, zeroed when allocated). With `fuse` on, each head's last block merges the
    /// chunks; off, `attn_decode_combine_f16` does. `prefetch`: weights the next op reads (the o projection's),
    /// brought into L2 by the launch's threads after their own loads. `window`: each query sees only its sequence's
    /// last `window` keys (sliding-window attention).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode_dev(
        &self,
        out: &mut CudaSlice<f16>,
        q: &CudaSlice<f16>,
        q_stride: usize,
        pk: &CudaSlice<f16>,
        pv: &CudaSlice<f16>,
        prefix_len: usize,
        sk: &CudaSlice<f16>,
        sv: &CudaSlice<f16>,
        suf_lens: &CudaSlice<i32>,
        suf_seq_stride: usize,
        bsz: usize,
        max_total: usize,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        part: &mut CudaSlice<f32>,
        prefetch: Option<&CudaSlice<f16>>,
        window: Option<usize>,
    ) -> Result<()> {
        if head_dim > 128 || heads_kv == 0 || !heads_q.is_multiple_of(heads_kv) || bsz == 0 || suf_lens.len() < bsz {
            return Err(err(format!(
                "attention: head_dim {head_dim} (at most 128), heads {heads_q}/{heads_kv} (a multiple), batch {bsz}"
            )));
        }
        let (chunk, nsplit) = self.decode_split(max_total, bsz, heads_q);
        if part.len() < self.decode_part_len(max_total, bsz, heads_q, head_dim) {
            return Err(err("attention: decode workspace too small"));
        }
        let row = to_i32(heads_kv * head_dim, "row")?;
        let (pl, hq, hk, d) = (
            to_i32(prefix_len, "prefix length")?,
            to_i32(heads_q, "heads")?,
            to_i32(heads_kv, "heads")?,
            to_i32(head_dim, "head_dim")?,
        );
        let (qs, os, ch, ns) =
            (to_i32(q_stride, "q stride")?, hq * d, to_i32(chunk, "chunk")?, to_i32(nsplit, "splits")?);
        let seq_stride = suf_seq_stride as i64;
        let scale = 1.0f32 / (head_dim as f32).sqrt();
        // The chunks merged by the last block of each head (fused, the default), or by a second launch.
        let here = i32::from(self.fuse.load(std::sync::atomic::Ordering::Relaxed));
        let mut b = self.stream.launch_builder(self.f("attn_decode_f16")?);
        b.arg(&mut *out)
            .arg(q)
            .arg(pk)
            .arg(pv)
            .arg(&pl)
            .arg(&row)
            .arg(sk)
            .arg(sv)
            .arg(suf_lens)
            .arg(&seq_stride)
            .arg(&row)
            .arg(&hq)
            .arg(&hk)
            .arg(&d)
            .arg(&qs)
            .arg(&os)
            .arg(&scale)
            .arg(&mut *part)
            .arg(&ch)
            .arg(&here);
        let (null, pf_bytes) = (0u64, prefetch.map_or(0i64, |w| (w.len() * 2) as i64));
        match prefetch {
            Some(w) => b.arg(w),
            None => b.arg(&null),
        };
        b.arg(&pf_bytes);
        let win = to_i32(window.unwrap_or(0), "window")?;
        b.arg(&win);
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (bsz as u32, heads_q as u32, nsplit as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(derr)?;
        if nsplit > 1 && here == 0 {
            let mut b = self.stream.launch_builder(self.f("attn_decode_combine_f16")?);
            b.arg(out).arg(&*part).arg(&ns).arg(&hq).arg(&d).arg(&os);
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (bsz as u32, heads_q as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map_err(derr)?;
        }
        Ok(())
    }

    /// Attention backward on device buffers: given q, k, v, the forward's output `out` and log-sum-exp `lse`
    /// (`attention_prefill_lse_dev`) and dout, writes dq [n_q, heads_q, d], dk and dv [n_k, heads_kv, d] (GQA:
    /// summed over each group's query heads).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_bwd_dev(
        &self,
        dq: &mut CudaSlice<f16>,
        dk: &mut CudaSlice<f16>,
        dv: &mut CudaSlice<f16>,
        q: &CudaSlice<f16>,
        k: &CudaSlice<f16>,
        v: &CudaSlice<f16>,
        out: &CudaSlice<f16>,
        lse: &CudaSlice<f32>,
        dout: &CudaSlice<f16>,
        n_q: usize,
        n_k: usize,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        mask: Mask,
    ) -> Result<()> {
        let (qs, ks) = (heads_q * head_dim, heads_kv * head_dim);
        let grads =
            AttnRows { q: self.dptr(dq, 0), k: self.dptr(dk, 0), v: self.dptr(dv, 0), q_stride: qs, kv_stride: ks };
        let rows = AttnRows { q: self.dptr(q, 0), k: self.dptr(k, 0), v: self.dptr(v, 0), q_stride: qs, kv_stride: ks };
        self.attention_bwd_at(grads, rows, out, lse, dout, n_q, n_k, heads_q, heads_kv, head_dim, mask)
    }

    /// The attention backward kernels on operands given by address and row stride: dq, dk, dv into `grads` (same
    /// strides as `x`), from the forward's output `out`, its log-sum-exp and dout ([n_q, heads_q, d] rows). The
    /// caller keeps the operands alive and large enough.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_bwd_at(
        &self,
        grads: AttnRows,
        x: AttnRows,
        out: &CudaSlice<f16>,
        lse: &CudaSlice<f32>,
        dout: &CudaSlice<f16>,
        n_q: usize,
        n_k: usize,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        mask: Mask,
    ) -> Result<()> {
        if head_dim > 128
            || heads_kv == 0
            || !heads_q.is_multiple_of(heads_kv)
            || (mask != Mask::Full && n_k < n_q)
            || grads.q_stride != x.q_stride
            || grads.kv_stride != x.kv_stride
        {
            return Err(err(format!("attention backward: head_dim {head_dim} (at most 128), heads {heads_q}/{heads_kv} (a multiple), {n_q} queries over {n_k} keys")));
        }
        if out.len() < n_q * heads_q * head_dim || dout.len() < n_q * heads_q * head_dim || lse.len() < n_q * heads_q {
            return Err(err(format!("attention backward: output, its gradient or lse shorter than {n_q} rows")));
        }
        let (nq, nk, hq, hk, d) = (
            to_i32(n_q, "n_q")?,
            to_i32(n_k, "n_k")?,
            to_i32(heads_q, "heads")?,
            to_i32(heads_kv, "heads")?,
            to_i32(head_dim, "head_dim")?,
        );
        let (qs, ks, os) = (to_i32(x.q_stride, "q stride")?, to_i32(x.kv_stride, "kv stride")?, hq * d);
        let scale = 1.0f32 / (head_dim as f32).sqrt();
        let (c, window) = mask_args(mask)?;
        let mut delta = self.stream.alloc_zeros::<f32>(n_q * heads_q).map_err(derr)?;
        let mut b = self.stream.launch_builder(self.f("attn_bwd_delta_f16")?);
        b.arg(&mut delta).arg(dout).arg(out).arg(&hq).arg(&d).arg(&os);
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (n_q as u32, heads_q as u32, 1),
                block_dim: (32, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(derr)?;
        // The tensor-core kernels: 16-byte loads of q, k, v and dout rows, gradients stored by pairs.
        let dout_ptr = self.dptr(dout, 0);
        let mma = self.mma_attention.load(std::sync::atomic::Ordering::Relaxed)
            && (head_dim == 64 || head_dim == 128)
            && (x.q | x.k | x.v | dout_ptr).is_multiple_of(16)
            && (x.q_stride | x.kv_stride | (heads_q * head_dim)).is_multiple_of(8)
            && (grads.q | grads.k | grads.v).is_multiple_of(4);
        let (dq_kernel, dkdv_kernel) = match (mma, head_dim) {
            (true, 64) => ("flash_attn_bwd_dq_mma_d64_f16", "flash_attn_bwd_dkdv_mma_d64_f16"),
            (true, _) => ("flash_attn_bwd_dq_mma_d128_f16", "flash_attn_bwd_dkdv_mma_d128_f16"),
            _ => ("flash_attn_bwd_dq_f16", "flash_attn_bwd_dkdv_f16"),
        };
        let mut b = self.stream.launch_builder(self.f(dq_kernel)?);
        b.arg(&grads.q)
            .arg(&x.q)
            .arg(&x.k)
            .arg(&x.v)
            .arg(dout)
            .arg(lse)
            .arg(&delta)
            .arg(&nq)
            .arg(&nk)
            .arg(&hq)
            .arg(&hk);
        if !mma {
            b.arg(&d);
        }
        b.arg(&qs).arg(&ks).arg(&os).arg(&scale).arg(&c).arg(&window);
        let rows = if mma { 64 } else { 16 };
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (n_q.div_ceil(rows) as u32, heads_q as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(derr)?;
        let mut b = self.stream.launch_builder(self.f(dkdv_kernel)?);
        b.arg(&grads.k)
            .arg(&grads.v)
            .arg(&x.q)
            .arg(&x.k)
            .arg(&x.v)
            .arg(dout)
            .arg(lse)
            .arg(&delta)
            .arg(&nq)
            .arg(&nk)
            .arg(&hq)
            .arg(&hk);
        if !mma {
            b.arg(&d);
        }
        b.arg(&qs).arg(&ks).arg(&os).arg(&scale).arg(&c).arg(&window);
        let smem = if mma { dkdv_mma_smem(head_dim) as u32 } else { 0 };
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (n_k.div_ceil(rows) as u32, heads_kv as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: smem,
            })
        }
        .map_err(derr)?;
        Ok(())
    }
}
