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

#[test]
fn a_mistral_sliding_window_shorter_than_the_context_is_a_clear_error() {
    let src = fixtures().join("next_native_f32_mistral/model/config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&src).unwrap()).unwrap();
    cfg["text_config"]["sliding_window"] = Value::from(16);
    let dir = std::env::temp_dir().join(format!("rlaifd-next-window-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let e = engine::config::ModelConfig::from_file(&path).unwrap_err().to_string();
    std::fs::remove_dir_all(&dir).ok();
    assert!(e.contains("sliding_window = 16") && e.contains("not supported yet"), "{e}");
}
