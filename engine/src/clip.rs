//! CLIP ViT vision tower (the part LLaVA uses: embeddings, pre_layrnorm, encoder layers; no post-layernorm).

use crate::adapter::Adapter;
use crate::config::ClipVisionConfig;
use crate::error::{EngineError, Result};
use crate::linear::Linear;
use crate::ops::{apply_activation, attend_dense, layernorm, matmul_nt, MatmulMode};
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
    patch_w: Vec<f32>,     // (D, 3 * P * P), the conv kernel flattened as (c, ky, kx)
    class_emb: Vec<f32>,   // (D)
    pos_emb: Vec<f32>,     // (N + 1, D)
    pre_ln_w: Vec<f32>,    // (D)
    pre_ln_b: Vec<f32>,
    pub layers: Vec<ClipLayer>,
}

impl ClipVision {
    /// Loads the embeddings and the first `n_layers` encoder layers from keys under `prefix`
    /// (e.g. `vision_tower.vision_model.`).
    pub fn load(ws: &WeightStore, prefix: &str, cfg: &ClipVisionConfig, n_layers: usize, keep_16bit: bool) -> Result<Self> {
        let d = cfg.hidden_size;
        let p = cfg.patch_size;
        let n = cfg.num_patches();
        let c = cfg.num_channels;
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let kp = format!("{prefix}encoder.layers.{i}.");
            let name = |s: &str| format!("vision_tower.encoder.layers.{i}.{s}");
            let lin = |s: &str, fi, fo| Linear::load(ws, &format!("{kp}{s}"), name(s), fi, fo, true, keep_16bit);
            layers.push(ClipLayer {
                ln1_w: ws.f32(&format!("{kp}layer_norm1.weight"), &[d])?,
                ln1_b: ws.f32(&format!("{kp}layer_norm1.bias"), &[d])?,
                q: lin("self_attn.q_proj", d, d)?,
                k: lin("self_attn.k_proj", d, d)?,
                v: lin("self_attn.v_proj", d, d)?,
                o: lin("self_attn.out_proj", d, d)?,
                ln2_w: ws.f32(&format!("{kp}layer_norm2.weight"), &[d])?,
                ln2_b: ws.f32(&format!("{kp}layer_norm2.bias"), &[d])?,
                fc1: lin("mlp.fc1", d, cfg.intermediate_size)?,
                fc2: lin("mlp.fc2", cfg.intermediate_size, d)?,
            });
        }
        Ok(ClipVision {
            cfg: cfg.clone(),
            patch_w: ws.f32(&format!("{prefix}embeddings.patch_embedding.weight"), &[d, c, p, p])?,
            class_emb: ws.f32(&format!("{prefix}embeddings.class_embedding"), &[d])?,
            pos_emb: ws.f32(&format!("{prefix}embeddings.position_embedding.weight"), &[n + 1, d])?,
            pre_ln_w: ws.f32(&format!("{prefix}pre_layrnorm.weight"), &[d])?,
            pre_ln_b: ws.f32(&format!("{prefix}pre_layrnorm.bias"), &[d])?,
            layers,
        })
    }

    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.fc1, &l.fc2])
    }

    /// Hidden state after `n_layers` encoder layers (0 = the embeddings after pre_layrnorm).
    /// pixels: (3, S, S) CHW. Returns (N + 1, D), CLS first.
    pub fn forward(&self, pixels: &[f32], n_layers: usize, adapter: Option<&Adapter>) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let (d, p, s, c) = (cfg.hidden_size, cfg.patch_size, cfg.image_size, cfg.num_channels);
        if pixels.len() != c * s * s {
            return Err(EngineError::Input(format!(
                "pixel_values has {} values, the vision tower needs {c}x{s}x{s}; check preprocessor_config.json's crop size",
                pixels.len()
            )));
        }
        assert!(n_layers <= self.layers.len(), "vision layers requested beyond those loaded");
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
        let mut x = vec![0f32; t * d]; // (T, D) residual stream
        layernorm(&mut x, &emb, &self.pre_ln_w, &self.pre_ln_b, cfg.layer_norm_eps);

        let heads = cfg.num_attention_heads;
        let hd = cfg.head_dim();
        let scale = (hd as f32).powf(-0.5);
        let mut h = vec![0f32; t * d];
        let mut att = vec![0f32; t * d];
        for layer in &self.layers[..n_layers] {
            layernorm(&mut h, &x, &layer.ln1_w, &layer.ln1_b, cfg.layer_norm_eps);
            let q = layer.q.apply(&h, t, adapter); // (T, D)
            let k = layer.k.apply(&h, t, adapter);
            let v = layer.v.apply(&h, t, adapter);
            attend_dense(&mut att, &q, &k, &v, t, t, 0, heads, heads, hd, scale, false);
            layer.o.forward(&mut x, &att, t, adapter, MatmulMode::Accumulate);
            layernorm(&mut h, &x, &layer.ln2_w, &layer.ln2_b, cfg.layer_norm_eps);
            let mut f = layer.fc1.apply(&h, t, adapter); // (T, I)
            apply_activation(&mut f, cfg.hidden_act);
            layer.fc2.forward(&mut x, &f, t, adapter, MatmulMode::Accumulate);
        }
        Ok(x)
    }
}
