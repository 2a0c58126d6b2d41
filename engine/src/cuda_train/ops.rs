//! The launches the training passes share: the head's log-probs and their gradient one block of rows at a
//! time, attention forward and backward (whole sequences and rows after a context), RoPE's and SwiGLU's
//! backward.

use super::*;
use crate::ops::Mask;

/// An answer's tokens must be ids of the vocabulary (they index the logits).
pub(super) fn check_labels(cfg: &LlamaConfig, answer: &[u32]) -> Result<()> {
    match answer.iter().enumerate().find(|(_, &t)| t as usize >= cfg.vocab_size) {
        Some((at, t)) => Err(err(format!("answer token {t} at {at} is outside the vocabulary of {}", cfg.vocab_size))),
        None => Ok(()),
    }
}

/// The log-probs of `answer` under the head: rows `first..` of the final-norm output `hf` each predict the next
/// answer token, one block of rows at a time (the softmax over the vocabulary never exists for more rows). Returns
/// the labels and each row's log-sum-exp on the device (for `head_backward`) and the summed log-prob. `head` is the
/// head's weight (vocab, hidden): the base's, or the one a full-parameter run trains.
pub(super) fn head_forward(
    gpu: &Gpu,
    model: &GpuLlama,
    head: &CudaView<f16>,
    hf: &CudaSlice<f16>,
    first: usize,
    answer: &[u32],
) -> Result<(CudaSlice<i32>, CudaSlice<f32>, f64)> {
    let (c, vocab) = (model.cfg.hidden_size, model.cfg.vocab_size);
    let n = answer.len();
    let s = &gpu.stream;
    let labels = s.clone_htod(&answer.iter().map(|&t| t as i32).collect::<Vec<i32>>()).map_err(derr)?;
    let logp = s.alloc_zeros::<f32>(n).map_err(derr)?;
    let lse = s.alloc_zeros::<f32>(n).map_err(derr)?;
    let mut logits = s.alloc_zeros::<f16>(LOGIT_BLOCK.min(n) * vocab).map_err(derr)?;
    let v32 = to_i32(vocab, "vocab")?;
    for b0 in (0..n).step_by(LOGIT_BLOCK) {
        let nb = LOGIT_BLOCK.min(n - b0);
        gpu.gemm(
            &hf.slice((first + b0) * c..),
            c,
            false,
            head,
            c,
            true,
            &mut logits.slice_mut(..),
            vocab,
            nb,
            vocab,
            c,
            1.0,
            0.0,
        )?;
        let (po, lo, yo) = (gpu.dptr(&logp, b0), gpu.dptr(&lse, b0), gpu.dptr(&labels, b0));
        let mut b = s.launch_builder(gpu.f("logprob_gather_f16")?);
        b.arg(&po).arg(&lo).arg(&logits).arg(&yo).arg(&v32);
        unsafe { b.launch(LaunchConfig { grid_dim: (nb as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }
            .map_err(derr)?;
    }
    let logp_sum = s.clone_dtoh(&logp).map_err(derr)?.iter().map(|&v| v as f64).sum();
    Ok((labels, lse, logp_sum))
}

/// Backward of `head_forward` for a loss whose derivative with respect to each token's log-prob is `dlogp`: the
/// logits recomputed a block at a time, turned into their gradient in place, and multiplied back into rows
/// `first..` of `dhf` (assigned); with `dhead`, the gradient of the head's weight `head` is added into it (a
/// full-parameter run: dW = dlogits^T hf).
#[allow(clippy::too_many_arguments)]
pub(super) fn head_backward(
    gpu: &Gpu,
    model: &GpuLlama,
    head: &CudaView<f16>,
    mut dhead: Option<&mut CudaViewMut<f16>>,
    hf: &CudaSlice<f16>,
    first: usize,
    labels: &CudaSlice<i32>,
    lse: &CudaSlice<f32>,
    dlogp: f32,
    dhf: &mut CudaSlice<f16>,
) -> Result<()> {
    let (c, vocab) = (model.cfg.hidden_size, model.cfg.vocab_size);
    let n = labels.len();
    let s = &gpu.stream;
    let dl = s.clone_htod(&vec![dlogp; n]).map_err(derr)?;
    let mut logits = s.alloc_zeros::<f16>(LOGIT_BLOCK.min(n) * vocab).map_err(derr)?;
    let v32 = to_i32(vocab, "vocab")?;
    for b0 in (0..n).step_by(LOGIT_BLOCK) {
        let nb = LOGIT_BLOCK.min(n - b0);
        let row = (first + b0) * c;
        gpu.gemm(&hf.slice(row..), c, false, head, c, true, &mut logits.slice_mut(..), vocab, nb, vocab, c, 1.0, 0.0)?;
        let (lo, yo, wo) = (gpu.dptr(lse, b0), gpu.dptr(labels, b0), gpu.dptr(&dl, b0));
        let mut b = s.launch_builder(gpu.f("logprob_bwd_f16")?);
        b.arg(&mut logits).arg(&lo).arg(&yo).arg(&wo).arg(&v32);
        unsafe { b.launch(LaunchConfig { grid_dim: (nb as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }
            .map_err(derr)?;
        gpu.gemm(
            &logits.slice(..),
            vocab,
            false,
            head,
            c,
            false,
            &mut dhf.slice_mut(row..),
            c,
            nb,
            c,
            vocab,
            1.0,
            0.0,
        )?;
        if let Some(dw) = dhead.as_mut() {
            gpu.gemm(&logits.slice(..), vocab, true, &hf.slice(row..), c, false, dw, c, vocab, c, nb, 1.0, 1.0)?;
        }
    }
    Ok(())
}

/// Causal (`mask`: with its window) attention of a fused QKV buffer (after RoPE) into `att`, saving each row's
/// log-sum-exp.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_fwd(
    gpu: &Gpu,
    cfg: &LlamaConfig,
    qkv: &CudaSlice<f16>,
    att: &mut CudaSlice<f16>,
    lse: &mut CudaSlice<f32>,
    rows: usize,
    mask: Mask,
) -> Result<()> {
    attention_fwd_at(gpu, cfg, qkv, 0, rows, rows, att, lse, mask)
}

/// Causal attention (`mask`: with its window) of the `n_q` query rows of `qkv` from row `q_row` on, over its first
/// `n_k` rows' keys and values (the queries are the last `n_q` positions of the `n_k`).
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_fwd_at(
    gpu: &Gpu,
    cfg: &LlamaConfig,
    qkv: &CudaSlice<f16>,
    q_row: usize,
    n_q: usize,
    n_k: usize,
    att: &mut CudaSlice<f16>,
    lse: &mut CudaSlice<f32>,
    mask: Mask,
) -> Result<()> {
    let (h, kvh, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let nqkv = (h + 2 * kvh) * hd;
    if qkv.len() < n_k * nqkv || q_row + n_q > n_k {
        return Err(err(format!("attention: {n_q} queries from row {q_row} over {n_k} keys exceed the buffers")));
    }
    gpu.attention_fwd_at(att, Some(lse), fused_rows(gpu, cfg, qkv, q_row), n_q, n_k, h, kvh, hd, mask)
}

/// q (from row `q_row`), k and v (from row 0) of a fused QKV buffer.
pub(super) fn fused_rows(gpu: &Gpu, cfg: &LlamaConfig, qkv: &CudaSlice<f16>, q_row: usize) -> AttnRows {
    let (h, kvh, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let nqkv = (h + 2 * kvh) * hd;
    AttnRows {
        q: gpu.dptr(qkv, q_row * nqkv),
        k: gpu.dptr(qkv, h * hd),
        v: gpu.dptr(qkv, (h + kvh) * hd),
        q_stride: nqkv,
        kv_stride: nqkv,
    }
}

/// Backward of `attention_fwd`: dq, dk, dv written into the fused `dqkv` (before RoPE's backward).
pub(super) fn attention_bwd(
    gpu: &Gpu,
    cfg: &LlamaConfig,
    lt: &LayerTape,
    datt: &CudaSlice<f16>,
    dqkv: &mut CudaSlice<f16>,
    rows: usize,
    mask: Mask,
) -> Result<()> {
    attention_bwd_at(gpu, cfg, &lt.qkv, dqkv, 0, rows, rows, &lt.att, &lt.lse, datt, mask)
}

/// Backward of `attention_fwd_at`: dq of the `n_q` query rows (into `dqkv` from row `q_row`) and dk, dv of all `n_k`
/// key rows (into `dqkv`'s k and v columns from row 0), given the forward's output `att` and log-sum-exp.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_bwd_at(
    gpu: &Gpu,
    cfg: &LlamaConfig,
    qkv: &CudaSlice<f16>,
    dqkv: &mut CudaSlice<f16>,
    q_row: usize,
    n_q: usize,
    n_k: usize,
    att: &CudaSlice<f16>,
    lse: &CudaSlice<f32>,
    datt: &CudaSlice<f16>,
    mask: Mask,
) -> Result<()> {
    let (h, kvh, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let nqkv = (h + 2 * kvh) * hd;
    if qkv.len() < n_k * nqkv || dqkv.len() < n_k * nqkv || q_row + n_q > n_k {
        return Err(err(format!(
            "attention backward: {n_q} queries from row {q_row} over {n_k} keys exceed the buffers"
        )));
    }
    gpu.attention_bwd_at(
        fused_rows(gpu, cfg, dqkv, q_row),
        fused_rows(gpu, cfg, qkv, q_row),
        att,
        lse,
        datt,
        n_q,
        n_k,
        h,
        kvh,
        hd,
        mask,
    )
}

/// RoPE's backward on the q and k columns of a fused dqkv.
pub(super) fn rope_bwd(
    gpu: &Gpu,
    model: &GpuLlama,
    dqkv: &mut CudaSlice<f16>,
    dpos: &CudaSlice<i32>,
    rows: usize,
) -> Result<()> {
    let cfg = &model.cfg;
    let (h, kvh, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let sections = cfg.mrope_section;
    gpu.rope_launch("rope_bwd_f16", dqkv, dpos, &model.cos, &model.sin, rows, h + kvh, hd, (h + 2 * kvh) * hd, sections)
}

/// SwiGLU's backward into the fused gate/up gradient.
pub(super) fn swiglu_bwd(
    gpu: &Gpu,
    dgu: &mut CudaSlice<f16>,
    dout: &CudaSlice<f16>,
    gu: &CudaSlice<f16>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let (r, c) = (rows as i64, to_i32(cols, "cols")?);
    let mut b = gpu.stream.launch_builder(gpu.f("swiglu_bwd_fused_f16")?);
    b.arg(dgu).arg(dout).arg(gu).arg(&r).arg(&c);
    unsafe { b.launch(crate::cuda::cfg1(rows * cols, 256)) }.map_err(derr)?;
    Ok(())
}
