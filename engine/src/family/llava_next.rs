//! LLaVA-NeXT / LLaVA-1.6 (`LlavaNextForConditionalGeneration`): LLaVA-1.5's CLIP tower, projector and decoder
//! keys, plus anyres images: the image is tiled at the best of `image_grid_pinpoints` (`crate::image::anyres`),
//! every tile and a downscaled base image go through the tower, and the tiles' features are unpadded to the
//! image's aspect ratio with a learned `image_newline` row end (`llava::Model::pack_anyres`). Key layouts are
//! llava-hf's (4.x with `image_newline` at top level, 4.52+ and 5.x under `model.`).

use super::llava::{image_processor, layout_name, lm_head, PARTS};
use super::{Family, ModelFamily};

/// Where `image_newline` is in a checkpoint whose projector lives under `projector_prefix`.
pub fn image_newline_key(projector_prefix: &str) -> &'static str {
    if projector_prefix.starts_with("model.") {
        "model.image_newline"
    } else {
        "image_newline"
    }
}

pub static FAMILY: Family = Family {
    name: "LLaVA-NeXT",
    kind: ModelFamily::LlavaNext,
    architectures: &["LlavaNextForConditionalGeneration"],
    model_types: &["llava_next"],
    parse: |raw, path| crate::config::parse_llava_next(raw, path).map(crate::config::ModelConfig::Llava),
    parts: PARTS,
    lm_head,
    layout_name,
    layouts_hint: "; the checkpoint matches none of the llava-hf key layouts (transformers 4.x: \
                   language_model.model.*, 4.52+: model.language_model.*, 5.x: model.vision_tower.* without \
                   vision_model)",
    save_layout: &[1, 1, 1],
    image_processor,
};
