//! The LLaVA image path on the GPU: the CLIP vision tower up to the feature layer, then the projector, in fp16
//! with fp32 accumulation, as `clip::ClipVision::forward` + `llava::Model::image_features` compute it on the CPU.
//! The patch embedding is a GEMM over the image's patches (im2col on the host, as the CPU backend does), attention
//! is the flash prefill kernel without the causal mask, every linear layer a cuBLASLt GEMM plus a bias kernel.
//! An adapter's changes to the image path (`GpuVisionAdapter`: LoRA on the tower's and the projector's linear
//! layers, applied unmerged, and the weights and biases of linear layers it replaces, peft `modules_to_save`) apply
//! here too; an adapter that changes anything else there runs its image path on the CPU (`backend::CudaBackend`).
//! `engine/tests/cuda_backend.rs` checks the features against the CPU backend, with and without such an adapter.
//! Training the image path (its activations kept, its backward pass) is `cuda_train::GpuLora::image_forward` and
//! `image_backward`.

use crate::config::{Activation, ClipVisionConfig, FeatureSelect};
use crate::cuda::{cfg1, derr, err, to_i32, Gpu};
use crate::error::Result;
use crate::family::keys::{
    projector_linears, vision_layer, vision_linears, Keys, CLASS_EMBEDDING, LAYER_NORM1, LAYER_NORM2, PATCH_EMBEDDING,
    POSITION_EMBEDDING, PRE_NORM,
};
use crate::weights::WeightStore;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::f16;

/// A linear layer on the device: weight (out, in), bias (out) or none; `name` is its canonical name (the CPU
/// backend's `Linear::name`, e.g. `vision_tower.encoder.layers.0.self_attn.q_proj`), which adapters key it by.
pub(crate) struct Lin {
    pub(crate) name: String,
    pub(crate) w: CudaSlice<f16>,
    pub(crate) b: Option<CudaSlice<f16>>,
    pub(crate) n_in: usize,
    pub(crate) n_out: usize,
}

/// One linear layer's changes under an adapter: LoRA factors A (r, in) and B (out, r) with their scale, and the
/// weight or bias the adapter replaces.
#[derive(Default)]
struct LinAdapter {
    lora: Option<(CudaSlice<f16>, CudaSlice<f16>, usize, f32)>,
    w: Option<CudaSlice<f16>>,
    b: Option<CudaSlice<f16>>,
}

/// What a PEFT adapter changes in the image path, on the device (`GpuVision::features` applies it), by linear layer.
pub struct GpuVisionAdapter {
    lins: std::collections::HashMap<String, LinAdapter>,
}

impl GpuVisionAdapter {
    /// Why the GPU image path cannot apply what `adapter` changes in it (LoRA or a replaced parameter on anything but
    /// its linear layers, a shape that does not fit), or None. The caller then computes the features on the CPU.
    pub fn unsupported(vision: &GpuVision, adapter: &crate::adapter::Adapter) -> Option<String> {
        let lin = |name: &str| vision.linears().find(|l| l.name == name);
        for (name, m) in adapter.modules().into_iter().filter(|(n, _)| vision.feeds_features(n)) {
            let Some(l) = lin(name) else {
                return Some(format!("the GPU image path has no linear layer {name} for the adapter's LoRA"));
            };
            if m.a.len() != m.r * l.n_in || m.b.len() != l.n_out * m.r {
                return Some(format!(
                    "{name}: LoRA factors of {} and {} values do not fit a {}x{} layer at rank {}",
                    m.a.len(),
                    m.b.len(),
                    l.n_out,
                    l.n_in,
                    m.r
                ));
            }
        }
        for (name, p) in adapter.saved_params().filter(|(n, _)| vision.feeds_features(n)) {
            let (layer, what) = name.rsplit_once('.').unwrap_or((name, ""));
            let fits = match lin(layer) {
                Some(l) => {
                    (what == "weight" && p.values.len() == l.n_out * l.n_in)
                        || (what == "bias" && p.values.len() == l.n_out)
                }
                None => false,
            };
            if !fits {
                return Some(format!(
                    "the GPU image path cannot apply the replaced parameter {name} ({} values)",
                    p.values.len()
                ));
            }
        }
        None
    }

    /// Uploads `adapter`'s LoRA modules on the tower's and the projector's linear layers and the linear layers'
    /// parameters it replaces (what `unsupported` accepts); None when it changes nothing there.
    pub fn upload(
        gpu: &Gpu,
        vision: &GpuVision,
        adapter: &crate::adapter::Adapter,
    ) -> Result<Option<GpuVisionAdapter>> {
        if let Some(why) = Self::unsupported(vision, adapter) {
            return Err(err(why));
        }
        let mut lins: std::collections::HashMap<String, LinAdapter> = std::collections::HashMap::new();
        for (name, m) in adapter.modules().into_iter().filter(|(n, _)| vision.feeds_features(n)) {
            lins.entry(name.to_string()).or_default().lora =
                Some((gpu.upload_f16(&m.a)?, gpu.upload_f16(&m.b)?, m.r, m.scale));
        }
        for (name, p) in adapter.saved_params().filter(|(n, _)| vision.feeds_features(n)) {
            let (layer, what) = name.rsplit_once('.').unwrap_or((name, ""));
            let e = lins.entry(layer.to_string()).or_default();
            let v = Some(gpu.upload_f16(&p.values)?);
            if what == "weight" {
                e.w = v;
            } else {
                e.b = v;
            }
        }
        Ok((!lins.is_empty()).then_some(GpuVisionAdapter { lins }))
    }
}

/// The canonical-name prefixes of the image path: the vision tower and the projector.
pub const IMAGE_PATH: &[&str] = &["vision_tower.", "multi_modal_projector."];

/// Whether canonical name `name` is in the image path (`IMAGE_PATH`).
pub fn in_image_path(name: &str) -> bool {
    IMAGE_PATH.iter().any(|p| name.starts_with(p))
}

impl GpuVision {
    /// Whether `name` is in the image path and changes the features: not in a tower layer after the one the
    /// features are read from (those layers are not run).
    pub(crate) fn feeds_features(&self, name: &str) -> bool {
        let layer = name
            .strip_prefix("vision_tower.encoder.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        in_image_path(name) && layer.is_none_or(|i| i < self.layers.len())
    }
}

pub(crate) struct ClipLayer {
    pub(crate) ln1: (CudaSlice<f16>, CudaSlice<f16>),
    pub(crate) q: Lin,
    pub(crate) k: Lin,
    pub(crate) v: Lin,
    pub(crate) o: Lin,
    pub(crate) ln2: (CudaSlice<f16>, CudaSlice<f16>),
    pub(crate) fc1: Lin,
    pub(crate) fc2: Lin,
}

/// The vision tower (the layers LLaVA reads) and the projector of a LLaVA model, on the device.
pub struct GpuVision {
    pub(crate) cfg: ClipVisionConfig,
    pub(crate) select: FeatureSelect,
    /// (D, C·P·P), the conv kernel flattened as (c, ky, kx) like the im2col rows.
    patch: CudaSlice<f16>,
    /// (T, D): the position embeddings, with the class embedding added to row 0 (the class token's patch row is 0).
    pos_class: CudaSlice<f16>,
    pre_ln: (CudaSlice<f16>, CudaSlice<f16>),
    pub(crate) layers: Vec<ClipLayer>,
    pub(crate) proj1: Lin,
    pub(crate) proj_act: Activation,
    pub(crate) proj2: Lin,
}

pub(crate) fn act_kernel(a: Activation) -> Option<&'static str> {
    match a {
        Activation::Gelu => Some("gelu_f16"),
        Activation::QuickGelu => Some("quick_gelu_f16"),
        Activation::GeluTanh | Activation::Silu => None,
    }
}

impl GpuVision {
    /// Uploads the image path of the LLaVA model in `dir` (its config, weights and key layout); tests and tools. The
    /// daemon's backend uploads from the weights its `Model` opened (`load`).
    pub fn load_dir(gpu: &Gpu, dir: &std::path::Path) -> Result<GpuVision> {
        let config = crate::config::ModelConfig::from_file(&dir.join("config.json"))?;
        let ws = WeightStore::open_dir(dir, "model")?;
        let layout = crate::family::KeyLayout::detect(&ws, crate::family::Family::of(config.family()))?;
        GpuVision::load(gpu, &ws, &layout, &config)
    }

    /// Uploads the image path of a LLaVA model from its open weights `ws` in key layout `layout`.
    pub fn load(
        gpu: &Gpu,
        ws: &WeightStore,
        layout: &crate::family::KeyLayout,
        config: &crate::config::ModelConfig,
    ) -> Result<GpuVision> {
        let lc = config.llava().ok_or_else(|| err("the model has no vision tower"))?.clone();
        let cfg = lc.vision.clone();
        for a in [cfg.hidden_act, lc.projector_hidden_act] {
            if act_kernel(a).is_none() {
                return Err(err(format!("the GPU image path has no kernel for the activation {a:?}")));
            }
        }
        if cfg.head_dim() > 128 || !cfg.head_dim().is_multiple_of(2) {
            return Err(err(format!(
                "the GPU attention takes an even head_dim of at most 128 (the vision tower has {})",
                cfg.head_dim()
            )));
        }
        let (d, p, c, n) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels, cfg.num_patches());
        let up = |key: &str, shape: &[usize]| -> Result<CudaSlice<f16>> { gpu.upload_f16(&ws.f32(key, shape)?) };
        let lin = |key: &Keys, name: String, n_in: usize, n_out: usize, bias: bool| -> Result<Lin> {
            Ok(Lin {
                name,
                w: up(&key.key("weight"), &[n_out, n_in])?,
                b: if bias { Some(up(&key.key("bias"), &[n_out])?) } else { None },
                n_in,
                n_out,
            })
        };
        let ln = |k: &Keys| -> Result<(CudaSlice<f16>, CudaSlice<f16>)> {
            Ok((up(&k.key("weight"), &[d])?, up(&k.key("bias"), &[d])?))
        };
        let (vp, canonical) = (Keys::new(&layout.vision), Keys::new("vision_tower."));
        let mut layers = Vec::new();
        for i in 0..lc.vision_layers_needed() {
            let (kp, name) = (vision_layer(&vp, i), vision_layer(&canonical, i));
            let [q, k, v, o, fc1, fc2] =
                vision_linears(&cfg).map(|(s, n_in, n_out)| lin(&kp.pp(s), name.key(s), n_in, n_out, true));
            layers.push(ClipLayer {
                ln1: ln(&kp.pp(LAYER_NORM1))?,
                q: q?,
                k: k?,
                v: v?,
                o: o?,
                ln2: ln(&kp.pp(LAYER_NORM2))?,
                fc1: fc1?,
                fc2: fc2?,
            });
        }
        let mut pos = ws.f32(&vp.key(POSITION_EMBEDDING), &[n + 1, d])?;
        let class = ws.f32(&vp.key(CLASS_EMBEDDING), &[d])?;
        pos[..d].iter_mut().zip(&class).for_each(|(p, c)| *p += c);
        let (pp, pcanon) = (Keys::new(&layout.projector), Keys::new("multi_modal_projector."));
        let [proj1, proj2] = projector_linears(&lc)
            .map(|(s, n_in, n_out)| lin(&pp.pp(s), pcanon.key(s), n_in, n_out, lc.projector_bias));
        Ok(GpuVision {
            patch: up(&vp.key(PATCH_EMBEDDING), &[d, c, p, p])?,
            pos_class: gpu.upload_f16(&pos)?,
            pre_ln: ln(&vp.pp(PRE_NORM))?,
            layers,
            proj1: proj1?,
            proj_act: lc.projector_hidden_act,
            proj2: proj2?,
            select: lc.vision_feature_select_strategy,
            cfg,
        })
    }

    /// An image path of `cfg`'s shape (`n_layers` encoder layers, the CLS row dropped, a GELU projector with biases
    /// to `text_hidden`) with random weights generated on the device (benchmarks): matrices uniform with standard
    /// deviation 0.02, norm weights 1, biases 0.
    pub fn random(
        gpu: &Gpu,
        cfg: &ClipVisionConfig,
        n_layers: usize,
        text_hidden: usize,
        seed: u64,
    ) -> Result<GpuVision> {
        let (d, p, c, n, i) =
            (cfg.hidden_size, cfg.patch_size, cfg.num_channels, cfg.num_patches(), cfg.intermediate_size);
        let mut k = 0u64;
        let mut fill = |len: usize, scale: f32, offset: f32| -> Result<CudaSlice<f16>> {
            k += 1;
            gpu.fill_uniform(len, scale, offset, seed.wrapping_mul(0x9e37_79b9).wrapping_add(k))
        };
        let w = 0.02f32 * 3f32.sqrt();
        let mut lin = |n_in: usize, n_out: usize| -> Result<Lin> {
            Ok(Lin {
                name: String::new(),
                w: fill(n_out * n_in, w, 0.0)?,
                b: Some(fill(n_out, 0.0, 0.0)?),
                n_in,
                n_out,
            })
        };
        let mut layers = Vec::new();
        for _ in 0..n_layers {
            layers.push(ClipLayer {
                q: lin(d, d)?,
                k: lin(d, d)?,
                v: lin(d, d)?,
                o: lin(d, d)?,
                fc1: lin(d, i)?,
                fc2: lin(i, d)?,
                ln1: (gpu.fill_uniform(d, 0.0, 1.0, 1)?, gpu.fill_uniform(d, 0.0, 0.0, 1)?),
                ln2: (gpu.fill_uniform(d, 0.0, 1.0, 1)?, gpu.fill_uniform(d, 0.0, 0.0, 1)?),
            });
        }
        let proj1 = lin(d, text_hidden)?;
        let proj2 = lin(text_hidden, text_hidden)?;
        Ok(GpuVision {
            cfg: cfg.clone(),
            select: FeatureSelect::Default,
            patch: gpu.fill_uniform(d * c * p * p, w, 0.0, seed ^ 1)?,
            pos_class: gpu.fill_uniform((n + 1) * d, w, 0.0, seed ^ 2)?,
            pre_ln: (gpu.fill_uniform(d, 0.0, 1.0, 1)?, gpu.fill_uniform(d, 0.0, 0.0, 1)?),
            layers,
            proj1,
            proj_act: Activation::Gelu,
            proj2,
        })
    }

    /// Every linear layer: the tower's, then the projector's.
    fn linears(&self) -> impl Iterator<Item = &Lin> {
        self.layers.iter().flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.fc1, &l.fc2]).chain([&self.proj1, &self.proj2])
    }

    /// Projected image features (N_img, C) of preprocessed pixels (3, S, S), as `Model::image_features` computes
    /// them under the adapter `ad` uploads (None: no adapter).
    pub fn features(&self, gpu: &Gpu, pixels: &[f32], ad: Option<&GpuVisionAdapter>) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let d = cfg.hidden_size;
        let (mut x, t) = self.embed(gpu, pixels)?;
        let st = &gpu.stream;
        let a = |n: usize| st.alloc_zeros::<f16>(n).map_err(derr);
        let eps = cfg.layer_norm_eps as f32;
        let (mut h, mut q, mut k, mut v, mut att, mut tmp) =
            (a(t * d)?, a(t * d)?, a(t * d)?, a(t * d)?, a(t * d)?, a(t * d)?);
        let mut f = a(t * cfg.intermediate_size)?;
        let heads = cfg.num_attention_heads;
        let act = act_kernel(cfg.hidden_act).ok_or_else(|| err("vision activation"))?;
        for l in &self.layers {
            layernorm_dev(gpu, &mut h, &x, &l.ln1, t, d, eps)?;
            linear(gpu, &l.q, &h, &mut q, t, ad)?;
            linear(gpu, &l.k, &h, &mut k, t, ad)?;
            linear(gpu, &l.v, &h, &mut v, t, ad)?;
            gpu.attention_prefill_strided_dev(
                &mut att,
                None,
                &q,
                d,
                &k,
                &v,
                t,
                t,
                heads,
                heads,
                cfg.head_dim(),
                crate::ops::Mask::Full,
            )?;
            linear(gpu, &l.o, &att, &mut tmp, t, ad)?;
            gpu.residual_add_dev(&mut x, &tmp, t * d)?;
            layernorm_dev(gpu, &mut h, &x, &l.ln2, t, d, eps)?;
            linear(gpu, &l.fc1, &h, &mut f, t, ad)?;
            activation_dev(gpu, act, &mut f, t * cfg.intermediate_size)?;
            linear(gpu, &l.fc2, &f, &mut tmp, t, ad)?;
            gpu.residual_add_dev(&mut x, &tmp, t * d)?;
        }
        let (first, rows) = self.selected(t);
        let mut sel = a(rows * d)?;
        st.memcpy_dtod(&x.slice(first * d..t * d), &mut sel.slice_mut(..)).map_err(derr)?;
        let ct = self.proj1.n_out;
        let mut p1 = a(rows * ct)?;
        linear(gpu, &self.proj1, &sel, &mut p1, rows, ad)?;
        activation_dev(gpu, act_kernel(self.proj_act).ok_or_else(|| err("projector activation"))?, &mut p1, rows * ct)?;
        let mut p2 = a(rows * ct)?;
        linear(gpu, &self.proj2, &p1, &mut p2, rows, ad)?;
        gpu.download_f16(&p2)
    }

    /// The first row and the number of rows of the tower's output the projector reads (of `t` rows).
    pub(crate) fn selected(&self, t: usize) -> (usize, usize) {
        match self.select {
            FeatureSelect::Default => (1, t - 1),
            FeatureSelect::Full => (0, t),
        }
    }

    /// The input of the tower's first layer (T, D) for preprocessed pixels (3, S, S): patch embedding, position
    /// and class embeddings, the pre-layernorm; and T.
    pub(crate) fn embed(&self, gpu: &Gpu, pixels: &[f32]) -> Result<(CudaSlice<f16>, usize)> {
        let cfg = &self.cfg;
        let (d, p, s, ch) = (cfg.hidden_size, cfg.patch_size, cfg.image_size, cfg.num_channels);
        if pixels.len() != ch * s * s {
            return Err(err(format!("pixel_values has {} values, the vision tower needs {ch}x{s}x{s}", pixels.len())));
        }
        if let Some(at) = pixels.iter().position(|v| !v.is_finite()) {
            return Err(err(format!("pixel value {at} is {}", pixels[at])));
        }
        let g = s / p;
        let t = g * g + 1;
        let kdim = ch * p * p;
        // im2col with a zero row for the class token: (T, C·P·P).
        let mut cols = vec![0f32; t * kdim];
        for gy in 0..g {
            for gx in 0..g {
                let row = &mut cols[(1 + gy * g + gx) * kdim..(2 + gy * g + gx) * kdim];
                for c in 0..ch {
                    for ky in 0..p {
                        let src = c * s * s + (gy * p + ky) * s + gx * p;
                        row[(c * p + ky) * p..(c * p + ky) * p + p].copy_from_slice(&pixels[src..src + p]);
                    }
                }
            }
        }
        let st = &gpu.stream;
        let a = |n: usize| st.alloc_zeros::<f16>(n).map_err(derr);
        let dcols = gpu.upload_f16(&cols)?;
        let mut emb = a(t * d)?;
        gpu.linear_device(&dcols, &self.patch, &mut emb, t, kdim, d)?;
        gpu.residual_add_dev(&mut emb, &self.pos_class, t * d)?;
        let mut x = a(t * d)?;
        layernorm_dev(gpu, &mut x, &emb, &self.pre_ln, t, d, cfg.layer_norm_eps as f32)?;
        Ok((x, t))
    }
}

/// y (rows, out) = x (rows, in) W^T + b + scale (x A^T) B^T, with what the adapter `ad` changes in this layer (its
/// weight or bias replaced, its LoRA factors), as the CPU backend's `Linear::forward`.
fn linear(
    gpu: &Gpu,
    l: &Lin,
    x: &CudaSlice<f16>,
    y: &mut CudaSlice<f16>,
    rows: usize,
    ad: Option<&GpuVisionAdapter>,
) -> Result<()> {
    let la = ad.and_then(|a| a.lins.get(&l.name));
    gpu.linear_device(x, la.and_then(|a| a.w.as_ref()).unwrap_or(&l.w), y, rows, l.n_in, l.n_out)?;
    if let Some(b) = la.and_then(|a| a.b.as_ref()).or(l.b.as_ref()) {
        bias_add(gpu, y, &b.slice(..), rows, l.n_out)?;
    }
    if let Some((a, b, r, scale)) = la.and_then(|a| a.lora.as_ref()) {
        let mut t = gpu.stream.alloc_zeros::<f16>(rows * r).map_err(derr)?;
        gpu.gemm(
            &x.slice(..),
            l.n_in,
            false,
            &a.slice(..),
            l.n_in,
            true,
            &mut t.slice_mut(..),
            *r,
            rows,
            *r,
            l.n_in,
            1.0,
            0.0,
        )?;
        gpu.gemm(
            &t.slice(..),
            *r,
            false,
            &b.slice(..),
            *r,
            true,
            &mut y.slice_mut(..),
            l.n_out,
            rows,
            l.n_out,
            *r,
            *scale,
            1.0,
        )?;
    }
    Ok(())
}

/// y (rows, cols) += b on every row.
pub(crate) fn bias_add(
    gpu: &Gpu,
    y: &mut CudaSlice<f16>,
    b: &cudarc::driver::CudaView<f16>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    if b.len() < cols || y.len() < rows * cols {
        return Err(err(format!("bias add: a bias of {} for {rows}x{cols}", b.len())));
    }
    let (r, c) = (rows as i64, to_i32(cols, "cols")?);
    let mut lb = gpu.stream.launch_builder(gpu.f("bias_add_f16")?);
    lb.arg(y).arg(b).arg(&r).arg(&c);
    unsafe { lb.launch(cfg1(rows * cols, 256)) }.map_err(derr)?;
    Ok(())
}

/// out (rows, cols) = LayerNorm(x) with (weight, bias).
pub(crate) fn layernorm_dev(
    gpu: &Gpu,
    out: &mut CudaSlice<f16>,
    x: &CudaSlice<f16>,
    wb: &(CudaSlice<f16>, CudaSlice<f16>),
    rows: usize,
    cols: usize,
    eps: f32,
) -> Result<()> {
    let c = to_i32(cols, "cols")?;
    let mut b = gpu.stream.launch_builder(gpu.f("layernorm_f16")?);
    b.arg(out).arg(x).arg(&wb.0).arg(&wb.1).arg(&c).arg(&eps);
    unsafe { b.launch(LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }
        .map_err(derr)?;
    Ok(())
}

/// An elementwise activation kernel in place over `n` values.
pub(crate) fn activation_dev(gpu: &Gpu, kernel: &str, x: &mut CudaSlice<f16>, n: usize) -> Result<()> {
    let nn = n as i64;
    let mut b = gpu.stream.launch_builder(gpu.f(kernel)?);
    b.arg(x).arg(&nn);
    unsafe { b.launch(cfg1(n, 256)) }.map_err(derr)?;
    Ok(())
}

/// LLaVA-1.5's image path: CLIP ViT-L/14 at 336 pixels (1024 wide, 24 layers, 16 heads, quick_gelu), of which the
/// features come from layer 23 (`vision_feature_layer` -2), then the projector to `text_hidden`; or a tiny one.
pub fn bench_shape(tiny: bool) -> (ClipVisionConfig, usize) {
    let (hidden, inter, layers, heads, image, patch) =
        if tiny { (128, 512, 4, 4, 64, 16) } else { (1024, 4096, 24, 16, 336, 14) };
    let cfg = ClipVisionConfig {
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_channels: 3,
        image_size: image,
        patch_size: patch,
        hidden_act: Activation::QuickGelu,
        layer_norm_eps: 1e-5,
    };
    (cfg, layers - 1)
}

/// Milliseconds per image of the image path (`features`, upload and download included) of a random-weight tower of
/// `cfg`'s shape with `n_layers` layers: `reps` runs after one warm-up.
pub fn bench(gpu: &Gpu, cfg: &ClipVisionConfig, n_layers: usize, text_hidden: usize, reps: usize) -> Result<Vec<f64>> {
    let v = GpuVision::random(gpu, cfg, n_layers, text_hidden, 5)?;
    let s = cfg.image_size;
    let mut rng = crate::rng::SplitMix64::new(9);
    let pixels: Vec<f32> = (0..cfg.num_channels * s * s).map(|_| (rng.next_f64() * 4.0 - 2.0) as f32).collect();
    let mut out = Vec::new();
    for rep in 0..reps + 1 {
        gpu.stream.synchronize().map_err(derr)?;
        let t = std::time::Instant::now();
        let f = v.features(gpu, &pixels, None)?;
        if rep > 0 {
            out.push(t.elapsed().as_secs_f64() * 1e3);
        }
        if f.len() != cfg.num_patches() * text_hidden {
            return Err(err(format!("image path bench: {} features", f.len())));
        }
    }
    Ok(out)
}
