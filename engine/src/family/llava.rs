//! LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP vision tower, a two-layer projector and a LLaMA decoder,
//! in the three key layouts llava-hf checkpoints have on disk: transformers 4.x (`language_model.model.*`,
//! `vision_tower.vision_model.*`), 4.52+ (`model.language_model.*`, `model.vision_tower.vision_model.*`) and 5.x
//! (`model.vision_tower.*` without `vision_model`). The image processor is CLIP's (`crate::image`), read from
//! `preprocessor_config.json`.

use super::{Family, ModelFamily, Part};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::image::ImageProcessorConfig;
use std::path::Path;

/// `DIR/preprocessor_config.json`, or without one CLIP's processor at the tower's resolution; LLaVA's
/// `image_aspect_ratio: "pad"` turns padding to a square on. The processor must produce the tower's input size.
/// For LLaVA-NeXT the tiling (`image_grid_pinpoints`) comes from the processor's file or else config.json, and the
/// two must agree.
pub(super) fn image_processor(config: &ModelConfig, dir: &Path) -> Result<Option<ImageProcessorConfig>> {
    let Some(lc) = config.llava() else { return Ok(None) };
    let pp = dir.join("preprocessor_config.json");
    let mut ip = if pp.is_file() {
        ImageProcessorConfig::from_file(&pp)?
    } else {
        let n = lc.vision.image_size as u32;
        ImageProcessorConfig {
            size: crate::image::ResizeSize::ShortestEdge(n),
            crop_height: n,
            crop_width: n,
            ..Default::default()
        }
    };
    ip.pad_to_square |= lc.pad_to_square;
    let model_pins: Vec<(u32, u32)> = lc.grid_pinpoints.iter().map(|&(h, w)| (h as u32, w as u32)).collect();
    if !lc.anyres() {
        ip.grid_pinpoints.clear();
    } else if ip.grid_pinpoints.is_empty() {
        ip.grid_pinpoints = model_pins;
    } else if ip.grid_pinpoints != model_pins {
        return Err(EngineError::config(
            &pp,
            format!(
                "image_grid_pinpoints {:?} differ from config.json's {:?}; the two must list the same resolutions",
                ip.grid_pinpoints, model_pins
            ),
        ));
    }
    let (h, w) = ip.output_size();
    if h != lc.vision.image_size || w != lc.vision.image_size {
        return Err(EngineError::config(
            &pp,
            format!("produces {h}x{w} images but the vision tower takes {0}x{0}; fix crop_size", lc.vision.image_size),
        ));
    }
    Ok(Some(ip))
}

/// The decoder, the vision tower and the projector in every llava-hf key layout (LLaVA-NeXT's are the same).
pub(super) const PARTS: &[Part] = &[
    Part {
        what: "decoder",
        canonical: "language_model.",
        on_disk: &["language_model.model.", "model.language_model."],
        probe: "embed_tokens.weight",
    },
    Part {
        what: "vision tower",
        canonical: "vision_tower.",
        on_disk: &[
            "vision_tower.vision_model.",
            "model.vision_tower.vision_model.",
            "model.vision_tower.",
            "vision_tower.",
        ],
        probe: "embeddings.patch_embedding.weight",
    },
    Part {
        what: "projector",
        canonical: "multi_modal_projector.",
        on_disk: &["multi_modal_projector.", "model.multi_modal_projector."],
        probe: "linear_1.weight",
    },
];

/// The key layout's name from the parts' prefixes.
pub(super) fn layout_name(p: &[String]) -> &'static str {
    match (p.first().map(String::as_str), p.get(1).map(String::as_str)) {
        (Some("language_model.model."), _) => "transformers-4.x",
        (_, Some("model.vision_tower.vision_model.")) => "transformers-4.52",
        _ => "transformers-5",
    }
}

/// The untied lm_head's key for a decoder under `text`.
pub(super) fn lm_head(text: &str) -> &'static str {
    if text == "language_model.model." {
        "language_model.lm_head"
    } else {
        "lm_head"
    }
}

pub static FAMILY: Family = Family {
    name: "LLaVA-1.5",
    kind: ModelFamily::Llava,
    architectures: &["LlavaForConditionalGeneration"],
    model_types: &["llava"],
    parse: |raw, path| crate::config::parse_llava(raw, path).map(crate::config::ModelConfig::Llava),
    parts: PARTS,
    lm_head,
    layout_name,
    layouts_hint: "; the checkpoint matches none of the llava-hf key layouts (transformers 4.x: \
                   language_model.model.*, 4.52+: model.language_model.*, 5.x: model.vision_tower.* without \
                   vision_model)",
    save_layout: &[1, 1, 1],
    image_processor,
};
