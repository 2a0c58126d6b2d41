//! The model's own chat template (tokenizer_config.json, chat_template.json or chat_template.jinja beside
//! tokenizer.json), rendered as transformers' `apply_chat_template` renders one user turn with the generation
//! prompt: the image part first for multimodal models, Python string methods (`.strip()`), `raise_exception`,
//! `bos_token`; ids encoded without adding special tokens. Without a template, LLaVA-1.5's format as before; a
//! template that does not parse is an error naming its file.

use engine::tokenizer::{TextTokenizer, LLAVA_15_TEMPLATE, TEXT_TEMPLATE};
use std::path::{Path, PathBuf};

const QWEN_STYLE: &str = "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('a conversation starts with the user') }}{% endif %}\
{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n\
{% if message['content'] is string %}{{ message['content'].strip() }}{% else %}{% for part in message['content'] %}\
{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'].strip() }}{% endif %}{% endfor %}{% endif %}\
<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

fn model_dir(tag: &str, files: &[(&str, String)]) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen_vl/qwen25_native_f32_gqa/model");
    let dir = std::env::temp_dir().join(format!("rlaifd-chat-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["tokenizer.json", "preprocessor_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir
}

#[test]
fn the_models_chat_template_wraps_the_prompt() {
    let cfg = serde_json::json!({"chat_template": QWEN_STYLE, "bos_token": {"content": "<s>"}, "eos_token": "</s>"});
    let dir = model_dir("qwen", &[("tokenizer_config.json", cfg.to_string())]);
    let tok = TextTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    assert!(tok.has_chat_template());
    let t = tok.chat_text(LLAVA_15_TEMPLATE, "  a red circle ").unwrap();
    assert_eq!(t.text, "<s><|im_start|>user\n<image>a red circle<|im_end|>\n<|im_start|>assistant\n");
    assert!(!t.special && t.answer_sep.is_empty());
    let no_image = tok.chat_text(TEXT_TEMPLATE, "a red circle").unwrap();
    assert_eq!(no_image.text, "<s><|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n");
    // Encoded as rendered: one BOS (the template's), the image token once.
    let ids = tok.encode_chat(LLAVA_15_TEMPLATE, "a red circle").unwrap();
    let (bos, image) = (tok.token_id("<s>").unwrap(), tok.token_id("<image>").unwrap());
    assert_eq!(ids.iter().filter(|&&i| i == bos).count(), 1, "{ids:?}");
    assert_eq!(ids[0], bos);
    assert_eq!(ids.iter().filter(|&&i| i == image).count(), 1, "{ids:?}");
    // chat_template.jinja takes precedence over tokenizer_config.json (transformers 5 saves it there).
    std::fs::write(dir.join("chat_template.jinja"), "[{{ messages[0]['content'][-1]['text'] }}]").unwrap();
    let tok = TextTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    assert_eq!(tok.chat_text(LLAVA_15_TEMPLATE, "x").unwrap().text, "[x]");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn without_a_template_the_llava_format_is_used() {
    let dir = model_dir("plain", &[]);
    let tok = TextTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    assert!(!tok.has_chat_template());
    let t = tok.chat_text(LLAVA_15_TEMPLATE, "a red circle").unwrap();
    assert_eq!(t.text, "USER: <image>\na red circle ASSISTANT:");
    assert!(t.special && t.answer_sep == " ");
    assert_eq!(tok.encode_chat(LLAVA_15_TEMPLATE, "a red circle").unwrap(), tok.encode(&t.text, true).unwrap());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_broken_template_is_an_error_naming_its_file() {
    let cfg = serde_json::json!({"chat_template": "{% for m in messages %}{{ m['content'] }"});
    let dir = model_dir("broken", &[("tokenizer_config.json", cfg.to_string())]);
    let e = TextTokenizer::from_file(&dir.join("tokenizer.json")).err().expect("refused").to_string();
    assert!(e.contains("tokenizer_config.json") && e.contains("does not parse"), "{e}");
    // A template that raises names the file and carries its message.
    let cfg = serde_json::json!({"chat_template": "{{ raise_exception('only system turns') }}"});
    let dir2 = model_dir("raises", &[("tokenizer_config.json", cfg.to_string())]);
    let tok = TextTokenizer::from_file(&dir2.join("tokenizer.json")).unwrap();
    let e = tok.encode_chat(LLAVA_15_TEMPLATE, "x").unwrap_err().to_string();
    assert!(e.contains("only system turns") && e.contains("tokenizer_config.json"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&dir2).ok();
}

/// Templates in the families' styles (ChatML with image parts, [INST] blocks with a namespace, header ids with a
/// default system turn and `| trim`), each rendered by transformers' own `apply_chat_template` for one user turn
/// (tests/fixtures/chat/cases.json, tools/gen_chat_fixtures.sh): rlaifd renders the same text for a multimodal
/// model with and without an image and for a text model, prompts with outer spaces and inner newlines included.
#[test]
fn chat_templates_render_as_transformers_apply_chat_template() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/chat/cases.json");
    let all: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures).unwrap()).unwrap();
    let cases = all["cases"].as_array().unwrap();
    assert!(cases.len() >= 27, "the chat fixtures");
    for (i, case) in cases.iter().enumerate() {
        let name = case["template"].as_str().unwrap();
        let template = all["templates"][name].as_str().unwrap();
        let cfg = serde_json::json!({"chat_template": template, "bos_token": all["bos_token"], "eos_token": all["eos_token"]});
        let dir = model_dir(&format!("tf{i}"), &[("tokenizer_config.json", cfg.to_string())]);
        if !case["multimodal"].as_bool().unwrap() {
            std::fs::remove_file(dir.join("preprocessor_config.json")).unwrap();
        }
        let tok = TextTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
        let fallback = if case["image"].as_bool().unwrap() { LLAVA_15_TEMPLATE } else { TEXT_TEMPLATE };
        let prompt = case["prompt"].as_str().unwrap();
        let got = tok.chat_text(fallback, prompt).unwrap().text;
        assert_eq!(got, case["expected"].as_str().unwrap(), "{name} (case {i}: {case})");
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn a_conversation_renders_every_turn_with_the_template_or_the_llava_format() {
    use engine::tokenizer::{Role, Turn};
    let turn = |role, text: &str, image| Turn { role, text: text.to_string(), image };
    let convo = [
        turn(Role::System, "Be brief.", false),
        turn(Role::User, "What is here?", false),
        turn(Role::Assistant, "A circle.", false),
        turn(Role::User, "And its colour?", true),
    ];
    let cfg = serde_json::json!({"chat_template": QWEN_STYLE, "bos_token": {"content": "<s>"}, "eos_token": "</s>"});
    let dir = model_dir("convo", &[("tokenizer_config.json", cfg.to_string())]);
    let tok = TextTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let want = "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is here?<|im_end|>\n\
<|im_start|>assistant\nA circle.<|im_end|>\n<|im_start|>user\n<image>And its colour?<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(tok.encode_conversation(&convo).unwrap(), tok.encode(want, false).unwrap());
    // One user turn is what encode_chat gives.
    let one = [turn(Role::User, "a red circle", true)];
    assert_eq!(tok.encode_conversation(&one).unwrap(), tok.encode_chat(LLAVA_15_TEMPLATE, "a red circle").unwrap());
    // Without a template: LLaVA-1.5's v1 conversation format.
    let plain = model_dir("convo-plain", &[]);
    let tok = TextTokenizer::from_file(&plain.join("tokenizer.json")).unwrap();
    let want = "Be brief. USER: What is here? ASSISTANT: A circle.</s>USER: <image>\nAnd its colour? ASSISTANT:";
    assert_eq!(tok.encode_conversation(&convo).unwrap(), tok.encode(want, true).unwrap());
    let one = [turn(Role::User, "a red circle", false)];
    assert_eq!(tok.encode_conversation(&one).unwrap(), tok.encode_chat(TEXT_TEMPLATE, "a red circle").unwrap());
    // A conversation must end with the user.
    let e = tok.encode_conversation(&convo[..3]).unwrap_err().to_string();
    assert!(e.contains("must end with a user turn"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&plain).ok();
}
