//! LoRA on the device: the adapter of the decoder's linear layers (and of the image path's) in flat fp32/fp16
//! buffers with their optimizer state (`GpuLora`), built from an `Adapter` and written back to one, and the LoRA
//! product of one projection (`lora_fwd`: y += s (x A^T) B^T, with dropout drawn as the CPU trainer draws it). The
//! decoder (`cuda_llama`) applies it at inference; the trainer (`cuda_train`) adds the backward passes and the
//! optimizer step. Neither of those is imported here. A full-parameter adapter (peft `modules_to_save` of the
//! language model) puts the decoder's whole weights in the same buffers, fused as the decoder fuses them
//! (`FUSED`, `whole_at`): the trainer's passes then read those fp16 copies in place of the base's weights.

use crate::adapter::Adapter;
use crate::config::LlamaConfig;
use crate::cuda::{derr, err, Gpu, LossScaler};
use crate::error::Result;
use cudarc::driver::CudaSlice;
use half::f16;

/// The decoder's linear layers LoRA trains, in slot order.
pub const PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

pub(crate) const Q: usize = 0;

pub(crate) const K: usize = 1;

pub(crate) const V: usize = 2;

pub(crate) const O: usize = 3;

pub(crate) const G: usize = 4;

pub(crate) const U: usize = 5;

pub(crate) const D: usize = 6;

/// The GPU decoder's fused matrices (`cuda_llama::Layer`), each the projections of `PROJECTIONS` it stacks, in
/// row order: q/k/v, o, gate/up, down.
pub(crate) const FUSED: [&[usize]; 4] = [&[Q, K, V], &[O], &[G, U], &[D]];

/// The fused matrix of projection `j` (an index into `FUSED`).
pub(crate) fn fused_group(j: usize) -> usize {
    match j {
        Q | K | V => 0,
        O => 1,
        G | U => 2,
        _ => 3,
    }
}

/// A whole decoder parameter of a full-parameter adapter (peft `modules_to_save` of the language model), by its
/// canonical name: a projection's weight, Qwen2's q/k/v bias, or the head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum WholeAt {
    Weight { layer: usize, j: usize },
    Bias { layer: usize, j: usize },
    Head,
}

/// Where the GPU trainer keeps the decoder parameter `name` (canonical: `language_model.layers.3.mlp.up_proj.weight`,
/// `lm_head.weight`), or why it cannot train it whole: it trains the weights of the seven projections, Qwen2's
/// q/k/v biases and the head; the embeddings and norms stay frozen.
pub(crate) fn whole_at(cfg: &LlamaConfig, name: &str) -> Result<WholeAt> {
    if name == "lm_head.weight" {
        return Ok(WholeAt::Head);
    }
    let refuse = || {
        err(format!(
            "the adapter trains {name} whole (modules_to_save); the GPU trainer trains whole the decoder's projection \
             weights, Qwen2's q/k/v biases and the head only"
        ))
    };
    let rest = name.strip_prefix("language_model.layers.").ok_or_else(refuse)?;
    let (layer, rest) = rest.split_once('.').ok_or_else(refuse)?;
    let layer: usize = layer.parse().map_err(|_| refuse())?;
    let (module, what) = rest.rsplit_once('.').ok_or_else(refuse)?;
    let j = PROJECTIONS.iter().position(|p| *p == module).ok_or_else(refuse)?;
    if layer >= cfg.num_hidden_layers {
        return Err(refuse());
    }
    match what {
        "weight" => Ok(WholeAt::Weight { layer, j }),
        "bias" if cfg.qkv_bias && fused_group(j) == 0 => Ok(WholeAt::Bias { layer, j }),
        _ => Err(refuse()),
    }
}

/// Checks that the GPU trainer can train `adapter`'s whole decoder parameters: each one known (`whole_at`), and the
/// projections the GPU decoder fuses into one matrix (q/k/v, gate/up) trained whole together or not at all.
/// Returns how many values they hold. Needs no GPU.
pub fn whole_decoder_values(cfg: &LlamaConfig, adapter: &Adapter) -> Result<usize> {
    let mut seen = std::collections::HashSet::new();
    let mut n = 0;
    for (name, p) in adapter.saved_params().filter(|(n, _)| !crate::cuda_clip::in_image_path(n)) {
        seen.insert(whole_at(cfg, name)?);
        n += p.values.len();
    }
    for layer in 0..cfg.num_hidden_layers {
        for js in FUSED {
            for bias in [false, true] {
                let at = |j: usize| if bias { WholeAt::Bias { layer, j } } else { WholeAt::Weight { layer, j } };
                let have = js.iter().filter(|&&j| seen.contains(&at(j))).count();
                if have > 0 && have < js.len() {
                    let names: Vec<&str> = js.iter().map(|&j| PROJECTIONS[j]).collect();
                    return Err(err(format!(
                        "layer {layer}: the GPU decoder fuses {} into one matrix, so the GPU trainer trains their {} whole together or not at all; the adapter trains {have} of them",
                        names.join(", "),
                        if bias { "biases" } else { "weights" }
                    )));
                }
            }
        }
    }
    Ok(n)
}

/// The initial loss scale of a run that trains decoder weights whole.
pub(crate) const WHOLE_INITIAL_SCALE: f32 = 1024.0;

/// (in, out) features of projection `j`.
pub(crate) fn projection_shape(cfg: &LlamaConfig, j: usize) -> (usize, usize) {
    let (c, h, kvh, hd, i) =
        (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size);
    match j {
        Q => (c, h * hd),
        K | V => (c, kvh * hd),
        O => (h * hd, c),
        G | U => (c, i),
        _ => (i, c),
    }
}

/// Where one module's factors sit in the flat parameter buffers: A (r, in) at `a`, B (out, r) at `b`. A
/// projection the adapter leaves out is absent: it has no storage, and its LoRA passes are skipped.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Slot {
    pub(crate) n_in: usize,
    pub(crate) n_out: usize,
    pub(crate) a: usize,
    pub(crate) b: usize,
    pub(crate) present: bool,
}

/// The LoRA adapter of the decoder's linear layers (any subset of the seven projections of each layer), on the
/// device, with its optimizer state.
pub struct GpuLora {
    pub r: usize,
    pub scale: f32,
    pub(crate) slots: Vec<[Slot; 7]>,
    /// LoRA dropout probability while training (peft's `lora_dropout`; from the adapter), and each module's mask
    /// seed offset (`adapter::dropout_base` of its name): a sequence trained with a dropout seed draws the CPU
    /// trainer's masks.
    pub dropout: f64,
    pub(crate) mask_offsets: Vec<[u64; 7]>,
    /// Every parameter in one flat buffer each: fp32 master weights, their fp16 copies (what the passes read),
    /// the accumulated loss-scaled gradients (fp32), AdamW's moments.
    pub(crate) p32: CudaSlice<f32>,
    pub(crate) p16: CudaSlice<f16>,
    pub(crate) g32: CudaSlice<f32>,
    pub(crate) m: CudaSlice<f32>,
    pub(crate) v: CudaSlice<f32>,
    /// One backward pass's fp16 gradients of the decoder's modules, added into `g32` after the pass.
    pub(crate) g16: CudaSlice<f16>,
    /// LoRA modules of the image path (linear layers of the vision tower and the projector) trained beside the
    /// decoder's, by canonical name; their factors follow the decoder's in the flat buffers, from `dec_total`.
    pub(crate) image: Vec<ImageSlot>,
    /// Parameters of the image path's linear layers the adapter replaces and trains in full (peft
    /// `modules_to_save`, e.g. the projector with `--train-projector`), after the LoRA factors; the biases last,
    /// from `no_decay`, as AdamW leaves them without weight decay (as the CPU trainer does vectors).
    pub(crate) image_params: Vec<ImageParam>,
    pub(crate) no_decay: usize,
    pub(crate) dec_total: usize,
    /// One image backward pass's fp16 gradients of those modules (`image` offsets minus `dec_total`).
    pub(crate) g16_img: CudaSlice<f16>,
    /// Full-parameter training: the decoder's matrices this copy trains whole, per layer and fused matrix (`FUSED`),
    /// each at its offset in the flat buffers ([out, in] row-major, stacked as the base's); Qwen2's q/k/v biases
    /// per layer; the head. The passes read their fp16 copies in place of the base's weights. They sit in the
    /// decoder's part of the buffers, after the LoRA factors, the biases last (`whole_bias`: no weight decay).
    pub(crate) whole_layers: Vec<[Option<usize>; 4]>,
    pub(crate) whole_qkv_bias: Vec<Option<usize>>,
    pub(crate) whole_head: Option<usize>,
    /// Each whole parameter by canonical name, for writing back and for the optimizer state.
    pub(crate) whole: Vec<ImageParam>,
    /// The whole parameters' part of the buffers, and their biases' part (the end of it).
    pub(crate) whole_range: std::ops::Range<usize>,
    pub(crate) whole_bias: std::ops::Range<usize>,
    /// A row of ones for the biases' gradients (`column_sums`), kept between passes.
    pub(crate) ones: Option<CudaSlice<f16>>,
    /// Optimizer steps taken (skipped overflow steps excluded).
    pub steps: u32,
    pub scaler: LossScaler,
    /// False for an adapter uploaded for inference only (`for_inference`): no gradient or optimizer buffers.
    pub trainable: bool,
    /// Activation recomputation: a forward pass keeps only each layer's input, and the backward pass runs each
    /// layer again before differentiating it (about one more forward pass of time for a fraction of the memory,
    /// to fit long sequences). Off by default.
    pub recompute: bool,
    /// A DPO pair's prompt runs once for both answers (`dpo_pair_shared`): for a 640-token prompt with 60-token
    /// answers, 760 rows per pass instead of 1400. On by default (the loss and gradients of two whole sequences
    /// within fp16 rounding: `tests/cuda_train.rs`); ignored with `recompute`, which runs whole sequences.
    pub share_prompt: bool,
}

/// A LoRA module of the image path in the flat buffers: A (r, in) at `a`, B (out, r) at `b`, its own rank and
/// scale, and its dropout mask offset (`adapter::dropout_base` of its name).
#[derive(Clone, Debug)]
pub(crate) struct ImageSlot {
    pub(crate) name: String,
    pub(crate) n_in: usize,
    pub(crate) n_out: usize,
    pub(crate) r: usize,
    pub(crate) scale: f32,
    pub(crate) a: usize,
    pub(crate) b: usize,
    pub(crate) mask_offset: u64,
}

/// A weight or bias of an image-path linear layer trained in full: `len` values at `at` of the flat buffers.
#[derive(Clone, Debug)]
pub(crate) struct ImageParam {
    /// Its canonical name (`multi_modal_projector.linear_1.weight`) and its layer's.
    pub(crate) name: String,
    pub(crate) layer: String,
    pub(crate) weight: bool,
    pub(crate) at: usize,
    pub(crate) len: usize,
}

/// An image-path LoRA module's initial values for `GpuLora::build_with`.
pub(crate) struct ImageInit {
    pub(crate) name: String,
    pub(crate) r: usize,
    pub(crate) scale: f32,
    pub(crate) a: Vec<f32>,
    pub(crate) b: Vec<f32>,
}

/// Where one LoRA module's factors sit in a flat fp16 buffer (A (r, in) at `a`, B (out, r) at `b`), its rank and
/// scale.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geom {
    pub(crate) a: usize,
    pub(crate) b: usize,
    pub(crate) n_in: usize,
    pub(crate) n_out: usize,
    pub(crate) r: usize,
    pub(crate) scale: f32,
}

/// out[..n] = beta out + the column sums of `dy` (rows, n): a bias's gradient, as a GEMM with a row of ones. The
/// ones stay in `ones` (grown when a pass has more rows), so a pass does not upload them per layer.
#[allow(clippy::too_many_arguments)]
pub(crate) fn column_sums(
    gpu: &Gpu,
    ones: &mut Option<CudaSlice<f16>>,
    dy: &CudaSlice<f16>,
    rows: usize,
    n: usize,
    out: &mut cudarc::driver::CudaViewMut<f16>,
    beta: f32,
) -> Result<()> {
    if ones.as_ref().is_none_or(|o| o.len() < rows) {
        *ones = Some(gpu.upload_f16(&vec![1.0f32; rows])?);
    }
    let o = ones.as_ref().ok_or_else(|| err("no row of ones"))?;
    gpu.gemm(&o.slice(..rows), rows, false, &dy.slice(..), n, false, out, n, 1, n, rows, 1.0, beta)
}

/// `x` (n values) after LoRA dropout with `mask` = (seed, probability); None without dropout.
pub(crate) fn dropped(
    gpu: &Gpu,
    x: &CudaSlice<f16>,
    n: usize,
    mask: Option<(u64, f64)>,
) -> Result<Option<CudaSlice<f16>>> {
    let Some((seed, p)) = mask else { return Ok(None) };
    let mut xl = gpu.stream.alloc_zeros::<f16>(n).map_err(derr)?;
    gpu.lora_dropout_dev(&mut xl, x, n, seed, p)?;
    Ok(Some(xl))
}

/// y[:, y_off..y_off + out] += scale (x A^T) B^T for `rows` rows (y rows `ldy` apart), x dropped out under `mask`;
/// t = x A^T (rows, r) is kept for the backward.
#[allow(clippy::too_many_arguments)]
pub(crate) fn lora_apply(
    gpu: &Gpu,
    p16: &CudaSlice<f16>,
    g: Geom,
    x: &CudaSlice<f16>,
    t: &mut CudaSlice<f16>,
    y: &mut CudaSlice<f16>,
    y_off: usize,
    ldy: usize,
    rows: usize,
    mask: Option<(u64, f64)>,
) -> Result<()> {
    let xd = dropped(gpu, x, rows * g.n_in, mask)?;
    let x = xd.as_ref().unwrap_or(x);
    gpu.gemm(
        &x.slice(..),
        g.n_in,
        false,
        &p16.slice(g.a..g.a + g.r * g.n_in),
        g.n_in,
        true,
        &mut t.slice_mut(..),
        g.r,
        rows,
        g.r,
        g.n_in,
        1.0,
        0.0,
    )?;
    gpu.gemm(
        &t.slice(..),
        g.r,
        false,
        &p16.slice(g.b..g.b + g.n_out * g.r),
        g.r,
        true,
        &mut y.slice_mut(y_off..),
        ldy,
        rows,
        g.n_out,
        g.r,
        g.scale,
        1.0,
    )
}

/// Backward of `lora_apply` from dy (columns dy_off.. of rows ldy apart): dB = s dy^T t and dA = (s dy B)^T x_dropped
/// written into `grad` at the factors' places less `base` (beta: 0 overwrites, 1 adds), and the LoRA path's input
/// gradient (s dy B) A added into dx when given, through the dropout mask the forward drew.
#[allow(clippy::too_many_arguments)]
pub(crate) fn lora_grads(
    gpu: &Gpu,
    p16: &CudaSlice<f16>,
    grad: &mut CudaSlice<f16>,
    base: usize,
    g: Geom,
    x: &CudaSlice<f16>,
    t: &CudaSlice<f16>,
    dy: &CudaSlice<f16>,
    dy_off: usize,
    ldy: usize,
    dx: Option<&mut CudaSlice<f16>>,
    rows: usize,
    beta: f32,
    mask: Option<(u64, f64)>,
) -> Result<()> {
    let (r, s) = (g.r, g.scale);
    let xd = dropped(gpu, x, rows * g.n_in, mask)?;
    let x = xd.as_ref().unwrap_or(x);
    let (ga, gb) = (g.a - base, g.b - base);
    let mut dt = gpu.stream.alloc_zeros::<f16>(rows * r).map_err(derr)?;
    gpu.gemm(
        &dy.slice(dy_off..),
        ldy,
        true,
        &t.slice(..),
        r,
        false,
        &mut grad.slice_mut(gb..gb + g.n_out * r),
        r,
        g.n_out,
        r,
        rows,
        s,
        beta,
    )?;
    gpu.gemm(
        &dy.slice(dy_off..),
        ldy,
        false,
        &p16.slice(g.b..g.b + g.n_out * r),
        r,
        false,
        &mut dt.slice_mut(..),
        r,
        rows,
        r,
        g.n_out,
        s,
        0.0,
    )?;
    gpu.gemm(
        &dt.slice(..),
        r,
        true,
        &x.slice(..),
        g.n_in,
        false,
        &mut grad.slice_mut(ga..ga + r * g.n_in),
        g.n_in,
        r,
        g.n_in,
        rows,
        1.0,
        beta,
    )?;
    let Some(dx) = dx else { return Ok(()) };
    let a = p16.slice(g.a..g.a + r * g.n_in);
    let Some((seed, p)) = mask else {
        return gpu.gemm(
            &dt.slice(..),
            r,
            false,
            &a,
            g.n_in,
            false,
            &mut dx.slice_mut(..),
            g.n_in,
            rows,
            g.n_in,
            r,
            1.0,
            1.0,
        );
    };
    // d x_dropped = dt A, then through the mask into dx.
    let n = rows * g.n_in;
    let mut dxl = gpu.stream.alloc_zeros::<f16>(n).map_err(derr)?;
    gpu.gemm(&dt.slice(..), r, false, &a, g.n_in, false, &mut dxl.slice_mut(..), g.n_in, rows, g.n_in, r, 1.0, 0.0)?;
    gpu.lora_dropout_bwd_add_dev(dx, &dxl, n, seed, p)
}

/// The one rank and scale of an adapter's decoder modules, or why the GPU decoder cannot apply it (see
/// `GpuLora::for_inference`). Needs no GPU, so the CPU-only tests check it.
pub fn inference_rank(cfg: &LlamaConfig, adapter: &Adapter) -> Result<(usize, f32)> {
    if let Some((p, _)) = adapter
        .saved_params()
        .find(|(p, _)| !p.starts_with("vision_tower.") && !p.starts_with("multi_modal_projector."))
    {
        return Err(err(format!("the adapter replaces {p} (modules_to_save); the GPU decoder applies LoRA only")));
    }
    decoder_lora_rank(cfg, adapter)?.ok_or_else(|| err("the adapter has no LoRA module in the decoder"))
}

/// The one rank and scale of an adapter's LoRA modules in the decoder (None: it has none), or why the GPU decoder
/// cannot apply them; its whole parameters are not looked at.
pub fn decoder_lora_rank(cfg: &LlamaConfig, adapter: &Adapter) -> Result<Option<(usize, f32)>> {
    let mut rank: Option<(usize, f32, String)> = None;
    for (name, m) in adapter.modules() {
        if name.starts_with("vision_tower.") || name.starts_with("multi_modal_projector.") {
            continue;
        }
        let known = (0..cfg.num_hidden_layers)
            .any(|l| PROJECTIONS.iter().any(|p| name == format!("language_model.layers.{l}.{p}")));
        if !known {
            return Err(err(format!("the adapter has LoRA on {name}; the GPU decoder applies it only to the seven projections of the decoder layers")));
        }
        match &rank {
            None => rank = Some((m.r, m.scale, name.to_string())),
            Some((r, s, first)) if (*r, *s) != (m.r, m.scale) => {
                return Err(err(format!("{name}: rank {} and scale {} differ from {first}'s ({r}, {s}); the GPU decoder needs one rank and scale", m.r, m.scale)))
            }
            Some(_) => {}
        }
    }
    Ok(rank.map(|(r, s, _)| (r, s)))
}

impl GpuLora {
    pub(crate) fn build(
        gpu: &Gpu,
        cfg: &LlamaConfig,
        r: usize,
        scale: f32,
        values: impl FnMut(usize, usize, Slot) -> Result<(Vec<f32>, Vec<f32>)>,
    ) -> Result<GpuLora> {
        Self::build_with(gpu, cfg, r, scale, true, |_, _| true, values, Vec::new(), Vec::new(), Vec::new())
    }

    /// The flat buffers for rank `r`: projection (l, j) has LoRA where `present(l, j)`, its initial factors (A, B)
    /// from `values`.
    /// `image`: LoRA modules of the image path trained beside them (after the decoder's in the buffers);
    /// `params`: (canonical name, values) of image-path linear layers' weights and biases trained in full;
    /// `whole`: the same of the decoder's parameters trained in full (`whole_at` names them).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn build_with(
        gpu: &Gpu,
        cfg: &LlamaConfig,
        r: usize,
        scale: f32,
        trainable: bool,
        present: impl Fn(usize, usize) -> bool,
        mut values: impl FnMut(usize, usize, Slot) -> Result<(Vec<f32>, Vec<f32>)>,
        image: Vec<ImageInit>,
        mut params: Vec<(String, Vec<f32>)>,
        whole: Vec<(String, Vec<f32>)>,
    ) -> Result<GpuLora> {
        if r == 0 {
            return Err(err("LoRA rank must be at least 1"));
        }
        let mut slots = Vec::with_capacity(cfg.num_hidden_layers);
        let mut total = 0usize;
        for l in 0..cfg.num_hidden_layers {
            let mut layer = [Slot { n_in: 0, n_out: 0, a: 0, b: 0, present: false }; 7];
            for (j, slot) in layer.iter_mut().enumerate() {
                let (n_in, n_out) = projection_shape(cfg, j);
                let present = present(l, j);
                *slot = Slot { n_in, n_out, a: total, b: total + r * n_in, present };
                if present {
                    total += r * (n_in + n_out);
                }
            }
            slots.push(layer);
        }
        if total == 0 && whole.is_empty() {
            return Err(err("the adapter has no LoRA module in the decoder"));
        }
        // The decoder's whole parameters: each fused matrix's projections stacked as the base's, then the head,
        // then the biases.
        let whole_start = total;
        let any_whole = !whole.is_empty();
        let mut by_place = std::collections::HashMap::new();
        for (name, v) in whole {
            by_place.insert(whole_at(cfg, &name)?, (name, v));
        }
        let mut whole_values: Vec<(usize, Vec<f32>)> = Vec::new();
        let mut whole_params = Vec::new();
        let mut place = |at: WholeAt, len: usize, total: &mut usize| -> Result<Option<usize>> {
            let Some((name, v)) = by_place.remove(&at) else { return Ok(None) };
            if v.len() != len {
                return Err(err(format!("{name}: {} values, the decoder's layer has {len}", v.len())));
            }
            let (layer, weight) = match name.rsplit_once('.') {
                Some((l, w)) => (l.to_string(), w == "weight"),
                None => (name.clone(), true),
            };
            whole_params.push(ImageParam { name, layer, weight, at: *total, len });
            whole_values.push((*total, v));
            *total += len;
            Ok(Some(*total - len))
        };
        let mut whole_layers = Vec::new();
        let mut whole_qkv_bias = Vec::new();
        let mut whole_head = None;
        if any_whole {
            for layer in 0..cfg.num_hidden_layers {
                let mut groups = [None; 4];
                for (g, js) in FUSED.iter().enumerate() {
                    for (k, &j) in js.iter().enumerate() {
                        let (n_in, n_out) = projection_shape(cfg, j);
                        let at = place(WholeAt::Weight { layer, j }, n_in * n_out, &mut total)?;
                        match (k, at) {
                            (0, Some(at)) => groups[g] = Some(at),
                            (0, None) => break,
                            (_, Some(_)) => {}
                            (_, None) => {
                                return Err(err(format!(
                                    "layer {layer}: {} is not trained whole beside the projections fused with it",
                                    PROJECTIONS[j]
                                )))
                            }
                        }
                    }
                }
                whole_layers.push(groups);
            }
            whole_head = place(WholeAt::Head, cfg.vocab_size * cfg.hidden_size, &mut total)?;
        }
        let bias_start = total;
        if any_whole {
            for layer in 0..cfg.num_hidden_layers {
                let mut first = None;
                for &j in FUSED[0] {
                    let at = place(WholeAt::Bias { layer, j }, projection_shape(cfg, j).1, &mut total)?;
                    first = first.or(at);
                }
                whole_qkv_bias.push(first);
            }
        }
        if let Some((name, _)) = by_place.values().next() {
            return Err(err(format!("{name} is not trained whole beside the projections fused with it")));
        }
        let whole_range = whole_start..total;
        let whole_bias = bias_start..total;
        let dec_total = total;
        let mut image_slots = Vec::with_capacity(image.len());
        for m in &image {
            if m.r == 0 || m.a.is_empty() || !m.a.len().is_multiple_of(m.r) || !m.b.len().is_multiple_of(m.r) {
                return Err(err(format!(
                    "{}: LoRA factors of {} and {} values do not fit rank {}",
                    m.name,
                    m.a.len(),
                    m.b.len(),
                    m.r
                )));
            }
            let (n_in, n_out) = (m.a.len() / m.r, m.b.len() / m.r);
            image_slots.push(ImageSlot {
                name: m.name.clone(),
                n_in,
                n_out,
                r: m.r,
                scale: m.scale,
                a: total,
                b: total + m.a.len(),
                mask_offset: crate::adapter::dropout_base(0, &m.name),
            });
            total += m.a.len() + m.b.len();
        }
        // Weights, then biases (no weight decay) at the end.
        params.sort_by_key(|(name, _)| name.ends_with(".bias"));
        let mut image_params = Vec::with_capacity(params.len());
        let mut no_decay = None;
        for (name, v) in &params {
            let (layer, what) =
                name.rsplit_once('.').ok_or_else(|| err(format!("{name}: not a parameter of a layer")))?;
            if what != "weight" && what != "bias" {
                return Err(err(format!("{name}: the GPU trainer trains weights and biases of linear layers only")));
            }
            if what == "bias" {
                no_decay.get_or_insert(total);
            }
            image_params.push(ImageParam {
                name: name.clone(),
                layer: layer.to_string(),
                weight: what == "weight",
                at: total,
                len: v.len(),
            });
            total += v.len();
        }
        let no_decay = no_decay.unwrap_or(total);
        let mut host = vec![0.0f32; total];
        for (sl, m) in image_slots.iter().zip(&image) {
            host[sl.a..sl.a + m.a.len()].copy_from_slice(&m.a);
            host[sl.b..sl.b + m.b.len()].copy_from_slice(&m.b);
        }
        for (pp, (_, v)) in image_params.iter().zip(&params) {
            host[pp.at..pp.at + pp.len].copy_from_slice(v);
        }
        for (at, v) in &whole_values {
            host[*at..*at + v.len()].copy_from_slice(v);
        }
        for (l, layer) in slots.iter().enumerate() {
            for (j, sl) in layer.iter().enumerate().filter(|(_, sl)| sl.present) {
                let (a, b) = values(l, j, *sl)?;
                if a.len() != r * sl.n_in || b.len() != sl.n_out * r {
                    return Err(err(format!(
                        "LoRA layer {l} {}: A has {} values and B {} (expected {} and {})",
                        PROJECTIONS[j],
                        a.len(),
                        b.len(),
                        r * sl.n_in,
                        sl.n_out * r
                    )));
                }
                host[sl.a..sl.a + a.len()].copy_from_slice(&a);
                host[sl.b..sl.b + b.len()].copy_from_slice(&b);
            }
        }
        let s = &gpu.stream;
        // Inference needs only the fp16 factors (and the masters, for `factors`): one element stands in for the
        // gradient and moment buffers.
        let state = if trainable { total } else { 1 };
        let zeros = || s.alloc_zeros::<f32>(state).map_err(derr);
        let mask_offsets = (0..cfg.num_hidden_layers)
            .map(|l| {
                std::array::from_fn(|j| {
                    crate::adapter::dropout_base(0, &format!("language_model.layers.{l}.{}", PROJECTIONS[j]))
                })
            })
            .collect();
        Ok(GpuLora {
            r,
            scale,
            slots,
            dropout: 0.0,
            mask_offsets,
            p32: s.clone_htod(&host).map_err(derr)?,
            p16: gpu.upload_f16(&host)?,
            g32: zeros()?,
            m: zeros()?,
            v: zeros()?,
            g16: s.alloc_zeros::<f16>(if trainable { dec_total } else { 1 }).map_err(derr)?,
            g16_img: s.alloc_zeros::<f16>(if trainable { (total - dec_total).max(1) } else { 1 }).map_err(derr)?,
            image: image_slots,
            image_params,
            no_decay,
            dec_total,
            whole_layers,
            whole_qkv_bias,
            whole_head,
            whole: whole_params,
            whole_range,
            whole_bias,
            ones: None,
            steps: 0,
            // Whole weights' gradients (dW = dy^T x, summed over every row) are far larger than LoRA's: a
            // full-parameter run starting at 65536 skips its first steps on overflow until the scale halves down to
            // about this (the tests' fixtures overflow at 32768).
            scaler: LossScaler::new(if any_whole { WHOLE_INITIAL_SCALE } else { 65536.0 }, 2000),
            trainable,
            recompute: false,
            share_prompt: true,
        })
    }

    /// Random factors (benchmarks): A uniform in ±1/sqrt(in) as peft initialises it, B uniform in ±0.01 (peft
    /// starts B at 0; non-zero here so every gradient path carries values). Scale alpha / r.
    pub fn random(gpu: &Gpu, cfg: &LlamaConfig, r: usize, alpha: f32, seed: u64) -> Result<GpuLora> {
        let mut rng = crate::rng::SplitMix64::new(seed);
        Self::build(gpu, cfg, r, alpha / r as f32, |_, _, sl| {
            let bound = 1.0 / (sl.n_in as f64).sqrt();
            let a = (0..r * sl.n_in).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect();
            let b = (0..sl.n_out * r).map(|_| ((rng.next_f64() * 2.0 - 1.0) * 0.01) as f32).collect();
            Ok((a, b))
        })
    }

    /// A PEFT adapter, for training: its decoder modules (any subset of the seven projections of each layer, the
    /// ones left out have no LoRA and stay without it; one rank and scale, `inference_rank` says what else the GPU
    /// decoder refuses), and what it trains of the image path (LoRA on its linear layers, their weights and biases
    /// in full), trained with a `cuda_clip::GpuVision` that can apply them (`GpuVisionAdapter::unsupported`).
    pub fn from_adapter(gpu: &Gpu, cfg: &LlamaConfig, adapter: &Adapter) -> Result<GpuLora> {
        let mut gl = Self::from_adapter_with(gpu, cfg, adapter, true)?;
        gl.dropout = adapter.lora_dropout;
        Ok(gl)
    }

    /// The decoder modules of a PEFT adapter for inference (`cuda_llama` forward passes), as `from_adapter` takes
    /// them but without gradient or optimizer buffers. Err (with the reason) for what the GPU decoder cannot
    /// apply: LoRA on the lm_head or the embeddings, ranks or scales that differ. Whole decoder parameters the
    /// adapter replaces (`modules_to_save`) are left to a copy of the decoder (`GpuLlama::with_whole`), and modules
    /// of the vision tower and the projector to the image path.
    pub fn for_inference(gpu: &Gpu, cfg: &LlamaConfig, adapter: &Adapter) -> Result<GpuLora> {
        Self::from_adapter_with(gpu, cfg, adapter, false)
    }

    pub(crate) fn from_adapter_with(
        gpu: &Gpu,
        cfg: &LlamaConfig,
        adapter: &Adapter,
        trainable: bool,
    ) -> Result<GpuLora> {
        // Inference applies LoRA only; training also takes whole decoder parameters (full-parameter training), with
        // or without LoRA beside them.
        let (r, scale) = match trainable {
            // Whole decoder parameters are the decoder copy's (`GpuLlama::with_whole`), not this upload's.
            false => {
                decoder_lora_rank(cfg, adapter)?.ok_or_else(|| err("the adapter has no LoRA module in the decoder"))?
            }
            true => match decoder_lora_rank(cfg, adapter)? {
                Some(rs) => rs,
                None if adapter.saved_params().any(|(n, _)| !crate::cuda_clip::in_image_path(n)) => (1, 0.0),
                None => return Err(err("the adapter has no LoRA module in the decoder")),
            },
        };
        let whole = match trainable {
            true => adapter
                .saved_params()
                .filter(|(n, _)| !crate::cuda_clip::in_image_path(n))
                .map(|(n, p)| (n.to_string(), p.values.clone()))
                .collect(),
            false => Vec::new(),
        };
        let module = |l: usize, j: usize| adapter.module(&format!("language_model.layers.{l}.{}", PROJECTIONS[j]));
        // Training takes the image path's LoRA modules too (`GpuLora::image_forward`); inference leaves them to the
        // image path's own upload (`cuda_clip::GpuVisionAdapter`).
        let (image, params) = match trainable {
            true => (
                adapter
                    .modules()
                    .into_iter()
                    .filter(|(n, _)| crate::cuda_clip::in_image_path(n))
                    .map(|(n, m)| ImageInit {
                        name: n.to_string(),
                        r: m.r,
                        scale: m.scale,
                        a: m.a.clone(),
                        b: m.b.clone(),
                    })
                    .collect(),
                adapter
                    .saved_params()
                    .filter(|(n, _)| crate::cuda_clip::in_image_path(n))
                    .map(|(n, p)| (n.to_string(), p.values.clone()))
                    .collect(),
            ),
            false => (Vec::new(), Vec::new()),
        };
        Self::build_with(
            gpu,
            cfg,
            r,
            scale,
            trainable,
            |l, j| module(l, j).is_some(),
            |l, j, _| {
                let m = module(l, j)
                    .ok_or_else(|| err(format!("the adapter lost language_model.layers.{l}.{}", PROJECTIONS[j])))?;
                Ok((m.a.clone(), m.b.clone()))
            },
            image,
            params,
            whole,
        )
    }

    /// Whether this copy trains anything of the image path (so each image's features are computed under it, and
    /// the gradients flow back from the decoder's input rows).
    pub fn trains_image_path(&self) -> bool {
        !self.image.is_empty() || !self.image_params.is_empty()
    }

    /// Whether layer `l`'s projection `j` has LoRA.
    pub fn has_module(&self, l: usize, j: usize) -> bool {
        self.slots.get(l).and_then(|x| x.get(j)).is_some_and(|sl| sl.present)
    }

    pub(crate) fn check_trainable(&self) -> Result<()> {
        if self.trainable {
            Ok(())
        } else {
            Err(err(
                "this adapter was uploaded for inference only (GpuLora::for_inference); it has no gradient buffers",
            ))
        }
    }

    /// Trainable parameters.
    pub fn param_count(&self) -> usize {
        self.p32.len()
    }

    /// Layer `l`'s projection `j`, or an error naming it when it has no LoRA.
    pub(crate) fn slot(&self, l: usize, j: usize) -> Result<Slot> {
        match self.slots.get(l).and_then(|x| x.get(j)) {
            Some(sl) if sl.present => Ok(*sl),
            _ => Err(err(format!("no LoRA module at layer {l}, slot {j}"))),
        }
    }

    /// The accumulated (loss-scaled) gradients of layer `l`, projection `j` (index into `PROJECTIONS`): (dA, dB).
    pub fn grads(&self, gpu: &Gpu, l: usize, j: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        self.check_trainable()?;
        let sl = self.slot(l, j)?;
        let all = gpu.stream.clone_dtoh(&self.g32).map_err(derr)?;
        Ok((all[sl.a..sl.a + self.r * sl.n_in].to_vec(), all[sl.b..sl.b + sl.n_out * self.r].to_vec()))
    }

    /// The current factors of layer `l`, projection `j`: (A, B) from the fp32 masters.
    pub fn factors(&self, gpu: &Gpu, l: usize, j: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let sl = self.slot(l, j)?;
        let all = gpu.stream.clone_dtoh(&self.p32).map_err(derr)?;
        Ok((all[sl.a..sl.a + self.r * sl.n_in].to_vec(), all[sl.b..sl.b + sl.n_out * self.r].to_vec()))
    }

    /// Where layer `l`'s projection `j` sits in the flat buffers.
    pub(crate) fn geom(&self, l: usize, j: usize) -> Geom {
        let sl = self.slots[l][j];
        Geom { a: sl.a, b: sl.b, n_in: sl.n_in, n_out: sl.n_out, r: self.r, scale: self.scale }
    }

    /// The dropout mask of layer `l`'s projection `j` for a sequence drawn with seed `drop` (None: no dropout).
    pub(crate) fn mask(&self, l: usize, j: usize, drop: Option<u64>) -> Option<(u64, f64)> {
        drop.filter(|_| self.dropout > 0.0).map(|seed| (seed ^ self.mask_offsets[l][j], self.dropout))
    }

    /// y[:, y_off..y_off + out] += scale * (x A^T) B^T for `rows` rows (y rows `ldy` apart); t = x A^T is kept.
    /// With a dropout seed `drop`, x is the module's dropped-out input (its mask drawn as the CPU trainer's).
    /// Nothing for a projection without LoRA (`t` may then be None).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn lora_fwd(
        &self,
        gpu: &Gpu,
        l: usize,
        j: usize,
        x: &CudaSlice<f16>,
        t: Option<&mut CudaSlice<f16>>,
        y: &mut CudaSlice<f16>,
        y_off: usize,
        ldy: usize,
        rows: usize,
        drop: Option<u64>,
    ) -> Result<()> {
        if !self.slots[l][j].present {
            return Ok(());
        }
        let t = t.ok_or_else(|| err(format!("no buffer for x A^T of LoRA layer {l} {}", PROJECTIONS[j])))?;
        lora_apply(gpu, &self.p16, self.geom(l, j), x, t, y, y_off, ldy, rows, self.mask(l, j, drop))
    }

    /// Writes the current factors (the fp32 masters) into `adapter`'s decoder modules, which must be the ones
    /// this adapter was built from (`from_adapter`).
    pub fn write_back(&self, gpu: &Gpu, adapter: &mut Adapter) -> Result<()> {
        let all = gpu.stream.clone_dtoh(&self.p32).map_err(derr)?;
        for (l, layer) in self.slots.iter().enumerate() {
            for (j, sl) in layer.iter().enumerate().filter(|(_, sl)| sl.present) {
                let name = format!("language_model.layers.{l}.{}", PROJECTIONS[j]);
                let m = adapter.module_mut(&name).ok_or_else(|| err(format!("the adapter has no module {name}")))?;
                if m.a.len() != self.r * sl.n_in || m.b.len() != sl.n_out * self.r {
                    return Err(err(format!("{name}: the adapter's factors do not have this GPU copy's shape")));
                }
                m.a.copy_from_slice(&all[sl.a..sl.a + self.r * sl.n_in]);
                m.b.copy_from_slice(&all[sl.b..sl.b + sl.n_out * self.r]);
            }
        }
        for sl in &self.image {
            let m =
                adapter.module_mut(&sl.name).ok_or_else(|| err(format!("the adapter has no module {}", sl.name)))?;
            if m.a.len() != sl.r * sl.n_in || m.b.len() != sl.n_out * sl.r {
                return Err(err(format!("{}: the adapter's factors do not have this GPU copy's shape", sl.name)));
            }
            m.a.copy_from_slice(&all[sl.a..sl.a + sl.r * sl.n_in]);
            m.b.copy_from_slice(&all[sl.b..sl.b + sl.n_out * sl.r]);
        }
        for pp in self.image_params.iter().chain(&self.whole) {
            let (_, p) = adapter
                .saved_params_mut()
                .find(|(n, _)| *n == pp.name)
                .ok_or_else(|| err(format!("the adapter does not train {}", pp.name)))?;
            if p.values.len() != pp.len {
                return Err(err(format!("{}: the adapter's values do not have this GPU copy's shape", pp.name)));
            }
            p.values.copy_from_slice(&all[pp.at..pp.at + pp.len]);
        }
        Ok(())
    }

    /// Continues the optimizer state of `opt` for `adapter` (the adapter this copy was built from): its AdamW
    /// moments (by the adapter's tensor names; zero for a tensor not updated yet), its update count and its loss
    /// scale, so a run paused on either device goes on here exactly where it stopped.
    pub fn load_optimizer(&mut self, gpu: &Gpu, adapter: &Adapter, opt: &crate::train::optim::AdamW) -> Result<()> {
        self.check_trainable()?;
        let total = self.p32.len();
        let (mut m, mut v) = (vec![0.0f32; total], vec![0.0f32; total]);
        for (name, key, at) in self.tensors(adapter)? {
            if let Some((mk, vk)) = opt.moments(&key) {
                if mk.len() != at.len() || vk.len() != at.len() {
                    return Err(err(format!(
                        "optimizer state for {key} ({name}) has {} values, the tensor {}",
                        mk.len(),
                        at.len()
                    )));
                }
                m[at.clone()].copy_from_slice(mk);
                v[at].copy_from_slice(vk);
            }
        }
        self.m = gpu.stream.clone_htod(&m).map_err(derr)?;
        self.v = gpu.stream.clone_htod(&v).map_err(derr)?;
        self.steps = opt.updates() as u32;
        if let Some(s) = &opt.scaler {
            self.scaler = s.clone();
        }
        Ok(())
    }

    /// Hands the optimizer state back to `opt` (the inverse of `load_optimizer`): the moments under the adapter's
    /// tensor names and the loss scale; `opt.step` is the caller's.
    pub fn store_optimizer(&self, gpu: &Gpu, adapter: &Adapter, opt: &mut crate::train::optim::AdamW) -> Result<()> {
        self.check_trainable()?;
        let m = gpu.stream.clone_dtoh(&self.m).map_err(derr)?;
        let v = gpu.stream.clone_dtoh(&self.v).map_err(derr)?;
        for (_, key, at) in self.tensors(adapter)? {
            opt.set_moments(&key, m[at.clone()].to_vec(), v[at].to_vec());
        }
        opt.scaler = Some(self.scaler.clone());
        Ok(())
    }

    /// Every LoRA factor as (module name, its tensor name in `adapter`'s file, its place in the flat buffers).
    pub(crate) fn tensors(&self, adapter: &Adapter) -> Result<Vec<(String, String, std::ops::Range<usize>)>> {
        let mut out = Vec::with_capacity(self.slots.len() * 14);
        for (l, layer) in self.slots.iter().enumerate() {
            for (j, sl) in layer.iter().enumerate().filter(|(_, sl)| sl.present) {
                let name = format!("language_model.layers.{l}.{}", PROJECTIONS[j]);
                let m = adapter.module(&name).ok_or_else(|| err(format!("the adapter has no module {name}")))?;
                out.push((name.clone(), m.keys.0.clone(), sl.a..sl.a + self.r * sl.n_in));
                out.push((name, m.keys.1.clone(), sl.b..sl.b + sl.n_out * self.r));
            }
        }
        for sl in &self.image {
            let m = adapter.module(&sl.name).ok_or_else(|| err(format!("the adapter has no module {}", sl.name)))?;
            out.push((sl.name.clone(), m.keys.0.clone(), sl.a..sl.a + sl.r * sl.n_in));
            out.push((sl.name.clone(), m.keys.1.clone(), sl.b..sl.b + sl.n_out * sl.r));
        }
        for pp in self.image_params.iter().chain(&self.whole) {
            let (_, p) = adapter
                .saved_params()
                .find(|(n, _)| *n == pp.name)
                .ok_or_else(|| err(format!("the adapter does not train {}", pp.name)))?;
            out.push((pp.name.clone(), p.key.clone(), pp.at..pp.at + pp.len));
        }
        Ok(out)
    }
}
