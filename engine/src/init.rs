//! Fresh random checkpoints from a `config.json` (for training small models from scratch, e.g. ShapesWorld):
//! matrices and embeddings ~ N(0, std²), norm weights 1, biases 0 — transformers' `_init_weights` for LLaMA and
//! LLaVA. Written in the transformers 4.52+ key layout, f32.

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::rng::SplitMix64;
use std::path::Path;

fn normal(rng: &mut SplitMix64, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            // Box-Muller.
            let u1 = rng.next_f64().max(1e-300);
            let u2 = rng.next_f64();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32 * std
        })
        .collect()
}

/// (key, shape, kind) of every tensor of the model; kind: 'w' random, '1' ones, '0' zeros.
fn tensor_specs(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, char)> {
    let t = cfg.text();
    let (c, v, i, hd) = (t.hidden_size, t.vocab_size, t.intermediate_size, t.head_dim);
    let (h, kvh) = (t.num_attention_heads, t.num_key_value_heads);
    let lm = if cfg.llava().is_some() { "model.language_model." } else { "model." };
    let mut out = vec![(format!("{lm}embed_tokens.weight"), vec![v, c], 'w')];
    for l in 0..t.num_hidden_layers {
        let p = format!("{lm}layers.{l}.");
        out.push((format!("{p}input_layernorm.weight"), vec![c], '1'));
        out.push((format!("{p}post_attention_layernorm.weight"), vec![c], '1'));
        for (name, o, inp, bias) in [
            ("self_attn.q_proj", h * hd, c, t.attention_bias),
            ("self_attn.k_proj", kvh * hd, c, t.attention_bias),
            ("self_attn.v_proj", kvh * hd, c, t.attention_bias),
            ("self_attn.o_proj", c, h * hd, t.attention_bias),
            ("mlp.gate_proj", i, c, t.mlp_bias),
            ("mlp.up_proj", i, c, t.mlp_bias),
            ("mlp.down_proj", c, i, t.mlp_bias),
        ] {
            out.push((format!("{p}{name}.weight"), vec![o, inp], 'w'));
            if bias {
                out.push((format!("{p}{name}.bias"), vec![o], '0'));
            }
        }
    }
    out.push((format!("{lm}norm.weight"), vec![c], '1'));
    if !t.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![v, c], 'w'));
    }
    if let Some(lc) = cfg.llava() {
        let vc = &lc.vision;
        let (d, vi, p) = (vc.hidden_size, vc.intermediate_size, vc.patch_size);
        let vp = "model.vision_tower.vision_model.";
        out.push((format!("{vp}embeddings.patch_embedding.weight"), vec![d, vc.num_channels, p, p], 'w'));
        out.push((format!("{vp}embeddings.class_embedding"), vec![d], 'w'));
        out.push((format!("{vp}embeddings.position_embedding.weight"), vec![vc.num_patches() + 1, d], 'w'));
        out.push((format!("{vp}pre_layrnorm.weight"), vec![d], '1'));
        out.push((format!("{vp}pre_layrnorm.bias"), vec![d], '0'));
        for l in 0..vc.num_hidden_layers {
            let q = format!("{vp}encoder.layers.{l}.");
            for ln in ["layer_norm1", "layer_norm2"] {
                out.push((format!("{q}{ln}.weight"), vec![d], '1'));
                out.push((format!("{q}{ln}.bias"), vec![d], '0'));
            }
            for (name, o, inp) in [
                ("self_attn.q_proj", d, d),
                ("self_attn.k_proj", d, d),
                ("self_attn.v_proj", d, d),
                ("self_attn.out_proj", d, d),
                ("mlp.fc1", vi, d),
                ("mlp.fc2", d, vi),
            ] {
                out.push((format!("{q}{name}.weight"), vec![o, inp], 'w'));
                out.push((format!("{q}{name}.bias"), vec![o], '0'));
            }
        }
        out.push((format!("{vp}post_layernorm.weight"), vec![d], '1'));
        out.push((format!("{vp}post_layernorm.bias"), vec![d], '0'));
        let pp = "model.multi_modal_projector.";
        out.push((format!("{pp}linear_1.weight"), vec![c, d], 'w'));
        out.push((format!("{pp}linear_2.weight"), vec![c, c], 'w'));
        if lc.projector_bias {
            out.push((format!("{pp}linear_1.bias"), vec![c], '0'));
            out.push((format!("{pp}linear_2.bias"), vec![c], '0'));
        }
    }
    out
}

/// Writes `out/model.safetensors` with random weights for `config_path` and copies the config (and, when
/// given, tokenizer.json / preprocessor_config.json) beside it. The checkpoint loads with `Model::load`.
pub fn init_checkpoint(config_path: &Path, out: &Path, seed: u64, std: f32, extra_files: &[&Path]) -> Result<()> {
    let cfg = ModelConfig::from_file(config_path)?;
    if !(std > 0.0 && std.is_finite()) {
        return Err(EngineError::Input(format!("init std must be > 0 (got {std})")));
    }
    let mut rng = SplitMix64::new(seed);
    let specs = tensor_specs(&cfg);
    let values: Vec<Vec<f32>> = specs
        .iter()
        .map(|(_, shape, kind)| {
            let n: usize = shape.iter().product();
            match kind {
                'w' => normal(&mut rng, n, std),
                '1' => vec![1.0; n],
                _ => vec![0.0; n],
            }
        })
        .collect();
    std::fs::create_dir_all(out).map_err(|e| EngineError::write(out, e))?;
    let tensors: Vec<(String, Vec<usize>, &[f32])> =
        specs.iter().zip(&values).map(|((k, s, _), v)| (k.clone(), s.clone(), v.as_slice())).collect();
    crate::weights::write_f32_safetensors(&out.join("model.safetensors"), &tensors)?;
    std::fs::copy(config_path, out.join("config.json")).map_err(|e| EngineError::io(config_path, e))?;
    for f in extra_files {
        let name = f.file_name().ok_or_else(|| EngineError::Input(format!("{} is not a file", f.display())))?;
        std::fs::copy(f, out.join(name)).map_err(|e| EngineError::io(*f, e))?;
    }
    Ok(())
}
