//! Fresh random checkpoints from a `config.json` (for training small models from scratch, e.g. ShapesWorld):
//! matrices and embeddings ~ N(0, std²), norm weights 1, biases 0 — transformers' `_init_weights` for LLaMA and
//! LLaVA. Written in the family's saving layout (`Family::save_layout`: transformers 4.52+ for LLaVA), f32, its
//! keys from `family::keys`.

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::family::keys::Init;
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

/// Writes `out/model.safetensors` with random weights for `config_path` and copies the config (and, when
/// given, tokenizer.json / preprocessor_config.json) beside it. The checkpoint loads with `Model::load`.
pub fn init_checkpoint(config_path: &Path, out: &Path, seed: u64, std: f32, extra_files: &[&Path]) -> Result<()> {
    let cfg = ModelConfig::from_file(config_path)?;
    if !(std > 0.0 && std.is_finite()) {
        return Err(EngineError::Input(format!("init std must be > 0 (got {std})")));
    }
    let mut rng = SplitMix64::new(seed);
    let family = crate::family::Family::of(cfg.family());
    let l = crate::family::KeyLayout::for_saving(family);
    let specs = crate::family::keys::tensors(&cfg, &l.text, &l.lm_head, &l.vision, &l.projector);
    let values: Vec<Vec<f32>> = specs
        .iter()
        .map(|(_, shape, kind)| {
            let n: usize = shape.iter().product();
            match kind {
                Init::Normal => normal(&mut rng, n, std),
                Init::Ones => vec![1.0; n],
                Init::Zeros => vec![0.0; n],
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
