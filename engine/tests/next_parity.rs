//! LLaVA-NeXT parity with transformers on the committed tiny fixtures (tools/gen_next_fixtures.py): anyres
//! pixel values exactly as `LlavaNextImageProcessorPil` gives them (best resolution, resize, padding, tiles), the
//! packed feature count (unpadding, `image_newline`) and log-probs within 1e-4, for every key layout, GQA/MQA,
//! tied embeddings, LLaMA-3 RoPE scaling and a Mistral decoder (no sliding window) covered there.

use engine::weights::WeightStore;
use engine::Model;
use serde_json::Value;
use std::path::PathBuf;

const LOGPROB_TOL: f32 = 1e-4;

mod fixture_cases;

fn fixtures() -> PathBuf {
    fixture_cases::fixtures("llava_next")
}

fn cases() -> Vec<(String, PathBuf, Value)> {
    fixture_cases::cases("llava_next", 5)
}

#[test]
fn anyres_pixel_values_match_transformers_exactly() {
    for (name, dir, exp) in cases() {
        let model = Model::load(&dir.join("model")).unwrap_or_else(|e| panic!("{name}: load failed: {e}"));
        let px = model.load_image(&dir.join("image.png")).expect("image");
        let want = WeightStore::open_files(&[dir.join("expected.safetensors")]).expect("expected.safetensors");
        let want = want.f32_any_shape("pixel_values").expect("pixel_values");
        assert_eq!(px.tiles as u64, exp["tiles"].as_u64().unwrap(), "{name}: tile count");
        let size: Vec<usize> =
            exp["image_size"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(px.original, (size[0], size[1]), "{name}: original size");
        assert_eq!(px.data.len(), want.len(), "{name}: pixel count");
        let bad = px.data.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(bad.is_none(), "{name}: pixel value {bad:?} differs ({:?})", bad.map(|i| (px.data[i], want[i])));
    }
}

#[test]
fn anyres_logprobs_match_transformers() {
    for (name, dir, exp) in cases() {
        let model = Model::load(&dir.join("model")).unwrap_or_else(|e| panic!("{name}: load failed: {e}"));
        let px = model.load_image(&dir.join("image.png")).expect("image");
        let feats = model.image_features(&px, None).expect("features");
        let n = feats.len() / model.llm.cfg.hidden_size;
        assert_eq!(n as u64, exp["n_image_features"].as_u64().unwrap(), "{name}: packed image feature count");
        let ids: Vec<u32> = exp["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let want: Vec<f32> = exp["logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let got = model.logprobs(&ids, Some(&px), None).expect("logprobs");
        assert_eq!(got.len(), want.len(), "{name}: scored tokens");
        let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        eprintln!("{name}: worst log-prob difference {d:.2e} ({} tokens, {n} image rows)", got.len());
        assert!(d <= LOGPROB_TOL, "{name}: log-probs differ from transformers by {d}");
    }
}

#[test]
fn a_tile_count_that_does_not_fit_the_image_is_refused() {
    let (name, dir, _) = cases().remove(0);
    let model = Model::load(&dir.join("model")).unwrap_or_else(|e| panic!("{name}: load failed: {e}"));
    let mut px = model.load_image(&dir.join("image.png")).expect("image");
    px.original = (px.original.0 * 7, px.original.1);
    let e = model.image_features(&px, None).unwrap_err().to_string();
    assert!(e.contains("tile grid"), "{e}");
}

/// Mistral's `sliding_window` applies to every layer; a window as long as the context is no window, and a window
/// that is not a positive integer is a clear error naming the field.
#[test]
fn mistral_sliding_windows_parse_per_layer() {
    let src = fixtures().join("next_native_f32_mistral/model/config.json");
    let base: Value = serde_json::from_str(&std::fs::read_to_string(&src).unwrap()).unwrap();
    let dir = std::env::temp_dir().join(format!("rlaifd-next-window-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.json");
    let parse = |window: Value| {
        let mut cfg = base.clone();
        cfg["text_config"]["sliding_window"] = window;
        std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
        engine::config::ModelConfig::from_file(&path).map(|c| c.text().layer_window.clone()).map_err(|e| e.to_string())
    };
    assert_eq!(parse(Value::from(16)), Ok(vec![Some(16), Some(16)]));
    assert_eq!(parse(Value::Null), Ok(vec![]), "null: full causal attention");
    assert_eq!(parse(Value::from(512)), Ok(vec![]), "a window of the whole 512-position context binds nothing");
    for bad in [Value::from(0), Value::from("4096"), Value::from(-3)] {
        let e = parse(bad.clone()).expect_err("a bad window must not load");
        assert!(e.contains("text_config.sliding_window must be a positive integer or null"), "{bad}: {e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// With a sliding window, scoring an answer after a cached prompt (training's forward_prompt + forward_answer,
/// whose answer rows see the window's part of the prompt) gives the whole-sequence log-prob.
#[test]
fn a_windowed_answer_after_a_cached_prompt_scores_as_the_whole_sequence() {
    let fx = fixtures().join("next_native_f32_mistral_window");
    let model = Model::load(&fx.join("model")).expect("model");
    assert_eq!(model.config.text().layer_window, vec![Some(7), Some(7)]);
    let adapter = model.load_adapter(&fx.join("adapter")).expect("adapter");
    let px = model.load_image(&fx.join("image.png")).expect("image");
    let exp: Value = serde_json::from_str(&std::fs::read_to_string(fx.join("expected.json")).unwrap()).unwrap();
    let all: Vec<u32> = exp["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let (prompt, answer) = all.split_at(6);
    for ad in [None, Some(&adapter)] {
        let feats = model.image_features(&px, ad).unwrap();
        let want = model.answer_logp(prompt, answer, Some(&feats), ad).unwrap();
        let pt = model.forward_prompt(prompt, Some(&feats), ad).expect("forward_prompt");
        let got = model.forward_answer(&pt, answer, ad).expect("forward_answer").logp_sum();
        assert!((got - want).abs() < 1e-4, "adapter {}: {got} vs answer_logp {want}", ad.is_some());
    }
}
