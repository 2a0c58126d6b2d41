//! LLaMA (`LlamaForCausalLM`): the decoder alone, keys under `model.`, an untied head under `lm_head`.

use super::{Family, ModelFamily, Part};

pub static FAMILY: Family = Family {
    name: "LLaMA",
    kind: ModelFamily::Llama,
    architectures: &["LlamaForCausalLM"],
    model_types: &["llama"],
    parse: |raw, path| crate::config::parse_llama(raw, None, path).map(crate::config::ModelConfig::Llama),
    parts: &[Part {
        what: "decoder",
        canonical: "language_model.",
        on_disk: &["model."],
        probe: "embed_tokens.weight",
    }],
    lm_head: |_| "lm_head",
    layout_name: |_| "llama",
    layouts_hint: "; a LLaMA checkpoint keeps its decoder under model.* (transformers' LlamaForCausalLM)",
    save_layout: &[0],
    image_processor: |_, _| Ok(None),
};
