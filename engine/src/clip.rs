//! CLIP ViT vision tower (the part LLaVA uses: embeddings, pre_layrnorm, encoder layers; no post-layernorm).
//!
//! The GPU's tower (`cuda_clip.rs`, training in `cuda_train/image.rs`) keeps these names: `ClipLayer`, and for
//! training `image_layer_forward` / `image_layer_backward` with an `ImageLayerTape` of the same fields.

use crate::adapter::Adapter;
use crate::config::ClipVisionConfig;
use crate::error::{EngineError, Result};
use crate::family::keys::{
    vision_layer, vision_linears, Keys, CLASS_EMBEDDING, LAYER_NORM1, LAYER_NORM2, PATCH_EMBEDDING, POSITION_EMBEDDING,
    PRE_NORM,
};
use crate::linear::Linear;
use crate::ops::backward::{activation_bwd, attend_dense_bwd, layernorm_bwd, matmul_nt_bwd_w};
use crate::ops::{add_inplace, apply_activation, attend_dense, layernorm, matmul_nt, Mask, MatmulMode};
use crate::train::Grads;
use crate::weights::WeightStore;

pub struct ClipLayer {
    ln1_w: Vec<f32>, // (D)
    ln1_b: Vec<f32>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2_w: Vec<f32>,
    ln2_b: Vec<f32>,
    fc1: Linear,
    fc2: Linear,
}

pub struct ClipVision {
    pub cfg: ClipVisionConfig,
    patch_w: Vec<f32>,   // (D, 3 * P * P), the conv kernel flattened as (c, ky, kx)
    class_emb: Vec<f32>, // (D)
    pos_emb: Vec<f32>,   // (N + 1, D)
    pre_ln_w: Vec<f32>,  // (D)
    pre_ln_b: Vec<f32>,
    pub layers: Vec<ClipLayer>,
}

impl ClipVision {
    /// Loads the embeddings and the first `n_layers` encoder layers from keys under `prefix`
    /// (e.g. `vision_tower.vision_model.`).
    pub fn load(
        ws: &WeightStore,
        prefix: &str,
        cfg: &ClipVisionConfig,
        n_layers: usize,
        keep_16bit: bool,
    ) -> Result<Self> {
        let d = cfg.hidden_size;
        let p = cfg.patch_size;
        let n = cfg.num_patches();
        let c = cfg.num_channels;
        let mut layers = Vec::with_capacity(n_layers);
        let (tower, canonical) = (Keys::new(prefix), Keys::new("vision_tower."));
        for i in 0..n_layers {
            let (kp, name) = (vision_layer(&tower, i), vision_layer(&canonical, i));
            let [q, k, v, o, fc1, fc2] = vision_linears(cfg)
                .map(|(s, fi, fo)| Linear::load(ws, &kp.key(s), name.key(s), fi, fo, true, keep_16bit));
            layers.push(ClipLayer {
                ln1_w: ws.f32(&kp.pp(LAYER_NORM1).key("weight"), &[d])?,
                ln1_b: ws.f32(&kp.pp(LAYER_NORM1).key("bias"), &[d])?,
                q: q?,
                k: k?,
                v: v?,
                o: o?,
                ln2_w: ws.f32(&kp.pp(LAYER_NORM2).key("weight"), &[d])?,
                ln2_b: ws.f32(&kp.pp(LAYER_NORM2).key("bias"), &[d])?,
                fc1: fc1?,
                fc2: fc2?,
            });
        }
        Ok(ClipVision {
            cfg: cfg.clone(),
            patch_w: ws.f32(&tower.key(PATCH_EMBEDDING), &[d, c, p, p])?,
            class_emb: ws.f32(&tower.key(CLASS_EMBEDDING), &[d])?,
            pos_emb: ws.f32(&tower.key(POSITION_EMBEDDING), &[n + 1, d])?,
            pre_ln_w: ws.f32(&tower.pp(PRE_NORM).key("weight"), &[d])?,
            pre_ln_b: ws.f32(&tower.pp(PRE_NORM).key("bias"), &[d])?,
            layers,
        })
    }

    /// Patch + class + position embeddings before pre_layrnorm: returns (im2col patches (N, 3·P·P),
    /// embeddings (N + 1, D)).
    fn embeddings(&self, pixels: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let cfg = &self.cfg;
        let (d, p, s, c) = (cfg.hidden_size, cfg.patch_size, cfg.image_size, cfg.num_channels);
        if pixels.len() != c * s * s {
            return Err(EngineError::Input(format!(
                "pixel_values has {} values, the vision tower needs {c}x{s}x{s}; check preprocessor_config.json's crop size",
                pixels.len()
            )));
        }
        let g = s / p;
        let n = g * g;
        let t = n + 1;
        // im2col: (N, 3 * P * P) with the same (c, ky, kx) order as the conv kernel
        let kdim = c * p * p;
        let mut cols = vec![0f32; n * kdim];
        for gy in 0..g {
            for gx in 0..g {
                let row = &mut cols[(gy * g + gx) * kdim..(gy * g + gx + 1) * kdim];
                for ch in 0..c {
                    for ky in 0..p {
                        let src = ch * s * s + (gy * p + ky) * s + gx * p;
                        row[(ch * p + ky) * p..(ch * p + ky) * p + p].copy_from_slice(&pixels[src..src + p]);
                    }
                }
            }
        }
        let mut emb = vec![0f32; t * d]; // (T, D)
        emb[..d].copy_from_slice(&self.class_emb);
        matmul_nt(&mut emb[d..], &cols, &self.patch_w, n, kdim, d, MatmulMode::Assign);
        crate::ops::add_inplace(&mut emb, &self.pos_emb);
        Ok((cols, emb))
    }

    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.fc1, &l.fc2])
    }

    /// Hidden state after `n_layers` encoder layers (0 = the embeddings after pre_layrnorm).
    /// pixels: (3, S, S) CHW. Returns (N + 1, D), CLS first.
    pub fn forward(&self, pixels: &[f32], n_layers: usize, adapter: Option<&Adapter>) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        assert!(n_layers <= self.layers.len(), "vision layers requested beyond those loaded");
        let (_, emb) = self.embeddings(pixels)?;
        let d = cfg.hidden_size;
        let t = emb.len() / d;
        let mut x = vec![0f32; t * d]; // (T, D) residual stream
        layernorm(&mut x, &emb, &self.pre_ln_w, &self.pre_ln_b, cfg.layer_norm_eps);

        let heads = cfg.num_attention_heads;
        let hd = cfg.head_dim();
        let scale = (hd as f32).powf(-0.5);
        let mut h = vec![0f32; t * d];
        let mut att = vec![0f32; t * d];
        for layer in &self.layers[..n_layers] {
            crate::interrupt::beat();
            layernorm(&mut h, &x, &layer.ln1_w, &layer.ln1_b, cfg.layer_norm_eps);
            let q = layer.q.apply(&h, t, adapter); // (T, D)
            let k = layer.k.apply(&h, t, adapter);
            let v = layer.v.apply(&h, t, adapter);
            attend_dense(&mut att, &q, &k, &v, t, t, 0, heads, heads, hd, scale, Mask::Full);
            layer.o.forward(&mut x, &att, t, adapter, MatmulMode::Accumulate);
            layernorm(&mut h, &x, &layer.ln2_w, &layer.ln2_b, cfg.layer_norm_eps);
            let mut f = layer.fc1.apply(&h, t, adapter); // (T, I)
            apply_activation(&mut f, cfg.hidden_act);
            layer.fc2.forward(&mut x, &f, t, adapter, MatmulMode::Accumulate);
        }
        Ok(x)
    }
}

// -- training: forward with saved activations, and its backward -------------------------------------------

/// Activations of one encoder layer kept for the backward pass: the GPU trainer's `ImageLayerTape`
/// (`cuda_train/image.rs`), field for field.
pub struct ImageLayerTape {
    x_in: Vec<f32>,  // (T, D) layer input
    h1: Vec<f32>,    // (T, D) layer_norm1(x_in)
    q: Vec<f32>,     // (T, D)
    k: Vec<f32>,     // (T, D)
    v: Vec<f32>,     // (T, D)
    att: Vec<f32>,   // (T, D)
    x_mid: Vec<f32>, // (T, D) after the attention residual
    h2: Vec<f32>,    // (T, D) layer_norm2(x_mid)
    fpre: Vec<f32>,  // (T, I) fc1(h2), before the activation
    fact: Vec<f32>,  // (T, I) act(fpre)
}

/// The tower's part of the image path's tape (the projector's part is `train::passes::ImageTape`).
pub struct TowerTape {
    pub tokens: usize,
    cols: Vec<f32>, // (N, 3·P·P) im2col patches
    emb: Vec<f32>,  // (T, D) embeddings before pre_layrnorm
    layers: Vec<ImageLayerTape>,
    /// (T, D) hidden state after the last layer run (what LLaVA takes its features from).
    pub hidden: Vec<f32>,
}

/// LayerNorm backward with its weight/bias gradients taken from `grads` under `{name}.weight` / `{name}.bias`.
#[allow(clippy::too_many_arguments)]
fn ln_backward(
    grads: &mut Option<&mut Grads>,
    name: &str,
    dx: &mut [f32],
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    eps: f64,
) {
    let (wn, bn) = (format!("{name}.weight"), format!("{name}.bias"));
    let mut dw = grads.as_deref_mut().and_then(|g| g.take_param(&wn));
    let mut db = grads.as_deref_mut().and_then(|g| g.take_param(&bn));
    layernorm_bwd(dx, dw.as_deref_mut(), db.as_deref_mut(), dout, x, w, eps);
    if let Some(g) = grads.as_deref_mut() {
        if let Some(v) = dw {
            g.put_param(wn, v);
        }
        if let Some(v) = db {
            g.put_param(bn, v);
        }
    }
}

impl ClipVision {
    /// `forward` keeping activations for `tower_backward`.
    pub fn tower_forward(&self, pixels: &[f32], n_layers: usize, adapter: Option<&Adapter>) -> Result<TowerTape> {
        let cfg = &self.cfg;
        let (cols, emb) = self.embeddings(pixels)?;
        let d = cfg.hidden_size;
        let t = emb.len() / d;
        let mut x = vec![0f32; t * d];
        layernorm(&mut x, &emb, &self.pre_ln_w, &self.pre_ln_b, cfg.layer_norm_eps);
        let mut layers = Vec::with_capacity(n_layers);
        for layer in &self.layers[..n_layers] {
            crate::interrupt::beat();
            let (tape, out) = self.image_layer_forward(layer, x, t, adapter);
            layers.push(tape);
            x = out;
        }
        Ok(TowerTape { tokens: t, cols, emb, layers, hidden: x })
    }

    /// One encoder layer on x_in (T, D): returns its tape and its output.
    fn image_layer_forward(
        &self,
        layer: &ClipLayer,
        x_in: Vec<f32>,
        t: usize,
        adapter: Option<&Adapter>,
    ) -> (ImageLayerTape, Vec<f32>) {
        let cfg = &self.cfg;
        let d = cfg.hidden_size;
        let (heads, hd) = (cfg.num_attention_heads, cfg.head_dim());
        let scale = (hd as f32).powf(-0.5);
        let mut h1 = vec![0f32; t * d];
        layernorm(&mut h1, &x_in, &layer.ln1_w, &layer.ln1_b, cfg.layer_norm_eps);
        let q = layer.q.apply(&h1, t, adapter);
        let k = layer.k.apply(&h1, t, adapter);
        let v = layer.v.apply(&h1, t, adapter);
        let mut att = vec![0f32; t * d];
        attend_dense(&mut att, &q, &k, &v, t, t, 0, heads, heads, hd, scale, Mask::Full);
        let mut x_mid = x_in.clone();
        layer.o.forward(&mut x_mid, &att, t, adapter, MatmulMode::Accumulate);
        let mut h2 = vec![0f32; t * d];
        layernorm(&mut h2, &x_mid, &layer.ln2_w, &layer.ln2_b, cfg.layer_norm_eps);
        let fpre = layer.fc1.apply(&h2, t, adapter);
        let mut fact = fpre.clone();
        apply_activation(&mut fact, cfg.hidden_act);
        let mut out = x_mid.clone();
        layer.fc2.forward(&mut out, &fact, t, adapter, MatmulMode::Accumulate);
        (ImageLayerTape { x_in, h1, q, k, v, att, x_mid, h2, fpre, fact }, out)
    }

    /// Backward of `tower_forward` from d hidden (T, D). With only LoRA to train it stops at the lowest layer
    /// holding a LoRA module; with vision parameters in `grads` (full fine-tuning) it runs down to the patch
    /// embedding. Gradients accumulate into `grads`.
    pub fn tower_backward(
        &self,
        tape: &TowerTape,
        d_hidden: Vec<f32>,
        adapter: Option<&Adapter>,
        mut grads: Option<&mut Grads>,
    ) {
        let full = grads.as_deref().is_some_and(|g| g.trains_params_under("vision_tower."));
        let lowest = if full {
            Some(0)
        } else {
            adapter.and_then(|ad| {
                (0..tape.layers.len()).find(|&i| {
                    let l = &self.layers[i];
                    [&l.q, &l.k, &l.v, &l.o, &l.fc1, &l.fc2].iter().any(|lin| ad.module(&lin.name).is_some())
                })
            })
        };
        let Some(lowest) = lowest else { return };
        let cfg = &self.cfg;
        let d = cfg.hidden_size;
        let t = tape.tokens;
        let mut dx = d_hidden;
        for (i, (layer, tp)) in self.layers.iter().zip(&tape.layers).enumerate().rev() {
            crate::interrupt::beat();
            if i < lowest {
                break;
            }
            dx = self.image_layer_backward(i, layer, tp, &dx, t, adapter, &mut grads);
        }
        if !full {
            return;
        }
        // pre_layrnorm, then the embeddings: class token, positions, patch projection.
        let mut demb = vec![0f32; t * d];
        ln_backward(
            &mut grads,
            "vision_tower.pre_layrnorm",
            &mut demb,
            &dx,
            &tape.emb,
            &self.pre_ln_w,
            cfg.layer_norm_eps,
        );
        let Some(g) = grads else { return };
        if let Some(pe) = g.param_mut("vision_tower.embeddings.position_embedding.weight") {
            add_inplace(pe, &demb);
        }
        if let Some(ce) = g.param_mut("vision_tower.embeddings.class_embedding") {
            add_inplace(ce, &demb[..d]);
        }
        if let Some(pw) = g.param_mut("vision_tower.embeddings.patch_embedding.weight") {
            let kdim = tape.cols.len() / (t - 1);
            matmul_nt_bwd_w(pw, &demb[d..], &tape.cols, t - 1, kdim, d);
        }
    }

    /// Backward of `image_layer_forward` for layer `i` from d out (T, D): returns d x_in; LoRA (and, under full
    /// fine-tuning, the layer's own) gradients accumulate into `grads`.
    #[allow(clippy::too_many_arguments)]
    fn image_layer_backward(
        &self,
        i: usize,
        layer: &ClipLayer,
        tp: &ImageLayerTape,
        dx: &[f32],
        t: usize,
        adapter: Option<&Adapter>,
        grads: &mut Option<&mut Grads>,
    ) -> Vec<f32> {
        let cfg = &self.cfg;
        let d = cfg.hidden_size;
        let (heads, hd, isz) = (cfg.num_attention_heads, cfg.head_dim(), cfg.intermediate_size);
        let scale = (hd as f32).powf(-0.5);
        let ln = |k: &str| format!("vision_tower.encoder.layers.{i}.{k}");
        // MLP: out = x_mid + fc2(act(fc1(ln2(x_mid)))).
        let mut dfact = vec![0f32; t * isz];
        layer.fc2.backward(&mut dfact, dx, &tp.fact, t, adapter, grads.as_deref_mut(), MatmulMode::Assign);
        let mut dfpre = vec![0f32; t * isz];
        activation_bwd(&mut dfpre, &dfact, &tp.fpre, cfg.hidden_act);
        let mut dh2 = vec![0f32; t * d];
        layer.fc1.backward(&mut dh2, &dfpre, &tp.h2, t, adapter, grads.as_deref_mut(), MatmulMode::Assign);
        let mut dx_mid = vec![0f32; t * d];
        ln_backward(grads, &ln("layer_norm2"), &mut dx_mid, &dh2, &tp.x_mid, &layer.ln2_w, cfg.layer_norm_eps);
        add_inplace(&mut dx_mid, dx);
        // Attention: x_mid = x_in + out_proj(attention(q, k, v of ln1(x_in))), no mask.
        let mut datt = vec![0f32; t * d];
        layer.o.backward(&mut datt, &dx_mid, &tp.att, t, adapter, grads.as_deref_mut(), MatmulMode::Assign);
        let (mut dq, mut dk, mut dv) = (vec![0f32; t * d], vec![0f32; t * d], vec![0f32; t * d]);
        attend_dense_bwd(
            &mut dq,
            &mut dk,
            &mut dv,
            &datt,
            &tp.q,
            &tp.k,
            &tp.v,
            t,
            t,
            0,
            heads,
            heads,
            hd,
            scale,
            Mask::Full,
        );
        let mut dh1 = vec![0f32; t * d];
        layer.q.backward(&mut dh1, &dq, &tp.h1, t, adapter, grads.as_deref_mut(), MatmulMode::Assign);
        layer.k.backward(&mut dh1, &dk, &tp.h1, t, adapter, grads.as_deref_mut(), MatmulMode::Accumulate);
        layer.v.backward(&mut dh1, &dv, &tp.h1, t, adapter, grads.as_deref_mut(), MatmulMode::Accumulate);
        let mut dx_in = vec![0f32; t * d];
        ln_backward(grads, &ln("layer_norm1"), &mut dx_in, &dh1, &tp.x_in, &layer.ln1_w, cfg.layer_norm_eps);
        add_inplace(&mut dx_in, &dx_mid);
        dx_in
    }
}

impl ClipVision {
    fn plain_params(&self) -> Vec<(String, Vec<usize>, &Vec<f32>)> {
        let cfg = &self.cfg;
        let (d, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
        let mut out = vec![
            ("vision_tower.embeddings.patch_embedding.weight".to_string(), vec![d, c, p, p], &self.patch_w),
            ("vision_tower.embeddings.class_embedding".to_string(), vec![d], &self.class_emb),
            (
                "vision_tower.embeddings.position_embedding.weight".to_string(),
                vec![cfg.num_patches() + 1, d],
                &self.pos_emb,
            ),
            ("vision_tower.pre_layrnorm.weight".to_string(), vec![d], &self.pre_ln_w),
            ("vision_tower.pre_layrnorm.bias".to_string(), vec![d], &self.pre_ln_b),
        ];
        for (i, l) in self.layers.iter().enumerate() {
            let n = |k: &str| format!("vision_tower.encoder.layers.{i}.{k}");
            out.push((n("layer_norm1.weight"), vec![d], &l.ln1_w));
            out.push((n("layer_norm1.bias"), vec![d], &l.ln1_b));
            out.push((n("layer_norm2.weight"), vec![d], &l.ln2_w));
            out.push((n("layer_norm2.bias"), vec![d], &l.ln2_b));
        }
        out
    }

    fn plain_mut(&mut self, name: &str) -> Option<&mut Vec<f32>> {
        match name {
            "vision_tower.embeddings.patch_embedding.weight" => return Some(&mut self.patch_w),
            "vision_tower.embeddings.class_embedding" => return Some(&mut self.class_emb),
            "vision_tower.embeddings.position_embedding.weight" => return Some(&mut self.pos_emb),
            "vision_tower.pre_layrnorm.weight" => return Some(&mut self.pre_ln_w),
            "vision_tower.pre_layrnorm.bias" => return Some(&mut self.pre_ln_b),
            _ => {}
        }
        let rest = name.strip_prefix("vision_tower.encoder.layers.")?;
        let (i, what) = rest.split_once('.')?;
        let l = self.layers.get_mut(i.parse::<usize>().ok()?)?;
        match what {
            "layer_norm1.weight" => Some(&mut l.ln1_w),
            "layer_norm1.bias" => Some(&mut l.ln1_b),
            "layer_norm2.weight" => Some(&mut l.ln2_w),
            "layer_norm2.bias" => Some(&mut l.ln2_b),
            _ => None,
        }
    }

    /// Every parameter of the loaded vision tower by canonical name (`vision_tower.…`) and shape.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out: Vec<(String, Vec<usize>)> = self.plain_params().into_iter().map(|(n, s, _)| (n, s)).collect();
        for lin in self.linears() {
            out.push((format!("{}.weight", lin.name), vec![lin.out_features, lin.in_features]));
            out.push((format!("{}.bias", lin.name), vec![lin.out_features]));
        }
        out
    }

    pub fn get_param(&self, name: &str) -> Option<Vec<f32>> {
        if let Some((_, _, v)) = self.plain_params().into_iter().find(|(n, _, _)| n == name) {
            return Some(v.clone());
        }
        self.linears().find_map(|lin| lin.get_param(name))
    }

    pub fn set_param(&mut self, name: &str, values: &[f32]) -> bool {
        if let Some(v) = self.plain_mut(name) {
            v.copy_from_slice(values);
            return true;
        }
        self.layers
            .iter_mut()
            .flat_map(|l| [&mut l.q, &mut l.k, &mut l.v, &mut l.o, &mut l.fc1, &mut l.fc2])
            .any(|lin| lin.set_param(name, values))
    }
}
