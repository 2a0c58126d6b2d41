//! Qwen2-VL (`Qwen2VLForConditionalGeneration`) and Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): a vision
//! transformer over dynamic-resolution patches with a patch merger (`crate::qwen_vit`), and the Qwen2 decoder
//! (LLaMA's blocks with q/k/v biases and multimodal RoPE, `crate::llama`). Key layouts: the hub's and what
//! transformers 5 `save_pretrained` writes (`model.*`, `visual.*`, `lm_head`), and transformers' in-memory naming
//! since 4.52 (`model.language_model.*`, `model.visual.*`). The image processor is `Qwen2VLImageProcessor`
//! (`crate::image::qwen_processor`).

use super::{Family, ModelFamily, Part};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::image::ImageProcessorConfig;
use std::path::Path;

const PARTS: &[Part] = &[
    Part {
        what: "decoder",
        canonical: "language_model.",
        // The longer prefix first: "model." is a prefix of it.
        on_disk: &["model.language_model.", "model."],
        probe: "embed_tokens.weight",
    },
    Part {
        what: "vision transformer",
        canonical: "visual.",
        on_disk: &["model.visual.", "visual."],
        probe: "patch_embed.proj.weight",
    },
];

fn image_processor(config: &ModelConfig, dir: &Path) -> Result<Option<ImageProcessorConfig>> {
    let Some(qc) = config.qwen_vl() else { return Ok(None) };
    let v = &qc.vision;
    let pp = dir.join("preprocessor_config.json");
    let tower = (v.patch_size as u32, v.spatial_merge_size as u32, v.temporal_patch_size as u32);
    Ok(Some(crate::image::qwen_processor(pp.is_file().then_some(pp.as_path()), tower)?))
}

fn layout_name(p: &[String]) -> &'static str {
    match p.first().map(String::as_str) {
        Some("model.language_model.") => "transformers-4.52",
        _ => "qwen-hub",
    }
}

const LAYOUTS_HINT: &str = "; the checkpoint matches none of the Qwen2-VL key layouts (the hub's and transformers 5's \
                            save: model.*, visual.*; transformers 4.52+ in memory: model.language_model.*, \
                            model.visual.*)";

pub static QWEN2_5_VL: Family = Family {
    name: "Qwen2.5-VL",
    kind: ModelFamily::Qwen25Vl,
    architectures: &["Qwen2_5_VLForConditionalGeneration"],
    model_types: &["qwen2_5_vl"],
    parse: |raw, path| crate::config::parse_qwen_vl(raw, path, true).map(ModelConfig::QwenVl),
    parts: PARTS,
    lm_head: |_| "lm_head",
    layout_name,
    layouts_hint: LAYOUTS_HINT,
    save_layout: &[1, 1],
    image_processor,
};

pub static QWEN2_VL: Family = Family {
    name: "Qwen2-VL",
    kind: ModelFamily::Qwen2Vl,
    architectures: &["Qwen2VLForConditionalGeneration"],
    model_types: &["qwen2_vl"],
    parse: |raw, path| crate::config::parse_qwen_vl(raw, path, false).map(ModelConfig::QwenVl),
    parts: PARTS,
    lm_head: |_| "lm_head",
    layout_name,
    layouts_hint: LAYOUTS_HINT,
    save_layout: &[1, 1],
    image_processor,
};
