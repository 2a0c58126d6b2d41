//! Qwen2-VL and Qwen2.5-VL parity with transformers on the committed tiny fixtures (tools/gen_qwen_fixtures.py):
//! pixel values exactly as `Qwen2VLImageProcessorPil` gives them (smart_resize up and down, patches in the
//! merger's order), the image's row count, log-probs within 1e-4 (the vision transformer with 2-D rotary and
//! window attention, the merger, the Qwen2 decoder with q/k/v biases and multimodal RoPE), and transformers'
//! greedy tokens, for both key layouts, GQA/MQA/MHA and tied embeddings.

use engine::generate::{generate, GenerateRequest};
use engine::sampling::SamplingParams;
use engine::weights::WeightStore;
use engine::Model;
use serde_json::Value;
use std::path::{Path, PathBuf};

const LOGPROB_TOL: f32 = 1e-4;

mod fixture_cases;

fn fixtures() -> PathBuf {
    fixture_cases::fixtures("qwen_vl")
}

fn cases() -> Vec<(String, PathBuf, Value)> {
    fixture_cases::cases("qwen_vl", 5)
}

use fixture_cases::ids;

#[test]
fn qwen_pixel_values_match_transformers_exactly() {
    for (name, dir, exp) in cases() {
        let model = Model::load(&dir.join("model")).unwrap_or_else(|e| panic!("{name}: load failed: {e}"));
        let px = model.load_image(&dir.join("image.png")).expect("image");
        let want = WeightStore::open_files(&[dir.join("expected.safetensors")]).expect("expected.safetensors");
        let want = want.f32_any_shape("pixel_values").expect("pixel_values");
        let grid: Vec<usize> =
            exp["image_grid_thw"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(px.grid, Some([grid[0], grid[1], grid[2]]), "{name}: patch grid");
        assert_eq!(px.data.len(), want.len(), "{name}: pixel count");
        let bad = px.data.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(bad.is_none(), "{name}: pixel value {bad:?} differs ({:?})", bad.map(|i| (px.data[i], want[i])));
    }
}

#[test]
fn qwen_logprobs_match_transformers() {
    for (name, dir, exp) in cases() {
        let model = Model::load(&dir.join("model")).unwrap_or_else(|e| panic!("{name}: load failed: {e}"));
        let px = model.load_image(&dir.join("image.png")).expect("image");
        let feats = model.image_features(&px, None).expect("features");
        let n = feats.len() / model.llm.cfg.hidden_size;
        assert_eq!(n as u64, exp["n_image_features"].as_u64().unwrap(), "{name}: image rows");
        let want: Vec<f32> = exp["logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let got = model.logprobs(&ids(&exp["ids"]), Some(&px), None).expect("logprobs");
        assert_eq!(got.len(), want.len(), "{name}: scored tokens");
        let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        eprintln!("{name}: worst log-prob difference {d:.2e} ({} tokens, {n} image rows)", got.len());
        assert!(d <= LOGPROB_TOL, "{name}: log-probs differ from transformers by {d}");
    }
}

/// Decoding continues the multimodal positions after the image (transformers' rope deltas): the engine's greedy
/// answer is transformers' `generate`.
#[test]
fn qwen_greedy_tokens_match_transformers() {
    for (name, dir, exp) in cases() {
        let model = Model::load(&dir.join("model")).unwrap_or_else(|e| panic!("{name}: load failed: {e}"));
        let px = model.load_image(&dir.join("image.png")).expect("image");
        let want = ids(&exp["greedy"]);
        let params = SamplingParams { temperature: 0.0, max_new_tokens: want.len(), ..Default::default() };
        let prompt = ids(&exp["prompt"]);
        let req = GenerateRequest { ids: &prompt, pixels: Some(&px), seeds: &[1, 2], params, stop_ids: vec![u32::MAX] };
        let got = generate(&model, &req, None).expect("generate");
        for a in &got {
            assert_eq!(a.tokens, want, "{name}: greedy tokens (seed {})", a.seed);
        }
    }
}

#[test]
fn qwen_pixels_without_a_patch_grid_are_refused() {
    let (name, dir, _) = cases().remove(0);
    let model = Model::load(&dir.join("model")).unwrap_or_else(|e| panic!("{name}: load failed: {e}"));
    let mut px = model.load_image(&dir.join("image.png")).expect("image");
    px.grid = None;
    let e = model.image_features(&px, None).unwrap_err().to_string();
    assert!(e.contains("patch grid"), "{e}");
    let mut px = model.load_image(&dir.join("image.png")).expect("image");
    px.grid = Some([1, 6, 6]);
    let e = model.image_features(&px, None).unwrap_err().to_string();
    assert!(e.contains("6x6"), "{e}");
}

/// The training passes put the image rows on their multimodal positions too: a whole sequence (`score_train`,
/// SFT and dropout runs) and a prompt shared by its answers (`forward_prompt` / `forward_answer`, DPO) score an
/// answer as inference does (`answer_logp`, checked against transformers above), with and without an adapter; the
/// taped vision transformer (LoRA in it) gives inference's features.
#[test]
fn qwen_training_passes_score_as_inference_does() {
    // Also with a sliding window on the second layer, which the answer rows see through the cached prompt.
    for case in ["qwen25_native_f32_gqa", "qwen25_native_f32_window"] {
        training_passes_score_as_inference(&fixtures().join(case));
    }
    // With LoRA in the vision transformer too, the image path keeps a tape and scores as inference does.
    let tall = fixtures().join("qwen25_native_f32_tall");
    let model = Model::load(&tall.join("model")).expect("model");
    let vis = model.load_adapter(&tall.join("adapter")).expect("vision adapter");
    let px = model.load_image(&tall.join("image.png")).expect("image");
    let tape = model.image_forward(&px, Some(&vis)).expect("image_forward");
    let want = model.image_features(&px, Some(&vis)).unwrap();
    assert_eq!(tape.features.rows, want.rows, "the taped image path gives inference's features");
    assert_eq!(tape.features.grid, want.grid);
}

fn training_passes_score_as_inference(fx: &std::path::Path) {
    let model = Model::load(&fx.join("model")).expect("model");
    let adapter = model.load_adapter(&fx.join("adapter")).expect("adapter");
    let px = model.load_image(&fx.join("image.png")).expect("image");
    let exp: Value = serde_json::from_str(&std::fs::read_to_string(fx.join("expected.json")).unwrap()).unwrap();
    let all = ids(&exp["ids"]);
    let (prompt, answer) = all.split_at(9);
    for ad in [None, Some(&adapter)] {
        let tape = model.image_forward(&px, ad).expect("image_forward");
        let want = model.answer_logp(prompt, answer, Some(&model.image_features(&px, ad).unwrap()), ad).unwrap();
        let whole = model.score_train(prompt, answer, Some(&tape.features), ad).expect("score_train").logp_sum();
        let pt = model.forward_prompt(prompt, Some(&tape.features), ad).expect("forward_prompt");
        let shared = model.forward_answer(&pt, answer, ad).expect("forward_answer").logp_sum();
        for (what, got) in [("score_train", whole), ("forward_prompt + forward_answer", shared)] {
            let case = fx.display();
            assert!(
                (got - want).abs() < 1e-4,
                "{case}: {what} (adapter {}): {got} vs answer_logp {want}",
                ad.is_some()
            );
        }
    }
}

/// Qwen2's sliding window: only with `use_sliding_window`, on the layers from `max_window_layers` on, or on those
/// `layer_types` names (which transformers 5 writes); a malformed `layer_types` is a clear error.
#[test]
fn qwen_sliding_windows_follow_max_window_layers_and_layer_types() {
    let src = fixtures().join("qwen25_native_f32_window/model/config.json");
    let base: Value = serde_json::from_str(&std::fs::read_to_string(&src).unwrap()).unwrap();
    let dir = std::env::temp_dir().join(format!("rlaifd-qwen-window-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.json");
    let parse = |edit: &dyn Fn(&mut Value)| {
        let mut cfg = base.clone();
        edit(&mut cfg["text_config"]);
        std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
        engine::config::ModelConfig::from_file(&path).map(|c| c.text().layer_window.clone()).map_err(|e| e.to_string())
    };
    assert_eq!(parse(&|_| {}), Ok(vec![None, Some(6)]), "as saved: layer_types [full, sliding]");
    let no_types = |t: &mut Value| {
        t.as_object_mut().unwrap().remove("layer_types");
    };
    assert_eq!(parse(&|t| no_types(t)), Ok(vec![None, Some(6)]), "max_window_layers = 1");
    assert_eq!(
        parse(&|t| {
            no_types(t);
            t["max_window_layers"] = Value::from(0);
        }),
        Ok(vec![Some(6), Some(6)])
    );
    assert_eq!(parse(&|t| t["use_sliding_window"] = Value::from(false)), Ok(vec![]), "use_sliding_window off");
    let e = parse(&|t| t["layer_types"] = serde_json::json!(["full_attention"])).unwrap_err();
    assert!(e.contains("layer_types must list one type per layer (2)"), "{e}");
    let e = parse(&|t| t["layer_types"] = serde_json::json!(["full_attention", "chunked_attention"])).unwrap_err();
    assert!(e.contains("\"chunked_attention\"") && e.contains("sliding_attention"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `init-model` writes every tensor transformers saves for these configs, with the same shapes and key names
/// (both versions; tied and untied heads), and the result loads and scores.
#[test]
fn init_model_writes_the_checkpoint_transformers_saves() {
    for (name, dir, exp) in cases().into_iter().filter(|(_, _, e)| e["layout"] == "native") {
        let model_dir = dir.join("model");
        let out = std::env::temp_dir().join(format!("rlaifd-qwen-init-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let extra = [model_dir.join("tokenizer.json"), model_dir.join("preprocessor_config.json")];
        let extra: Vec<&Path> = extra.iter().map(|p| p.as_path()).collect();
        engine::init::init_checkpoint(&model_dir.join("config.json"), &out, 7, 0.02, &extra).expect("init-model");
        let want = WeightStore::open_dir(&model_dir, "model").unwrap();
        let got = WeightStore::open_dir(&out, "model").unwrap();
        let mut wk: Vec<&str> = want.keys().collect();
        let mut gk: Vec<&str> = got.keys().collect();
        wk.sort();
        gk.sort();
        assert_eq!(gk, wk, "{name}: keys");
        for k in wk {
            assert_eq!(got.shape(k), want.shape(k), "{name}: {k}");
        }
        let model = Model::load(&out).unwrap_or_else(|e| panic!("{name}: {e}"));
        let px = model.load_image(&dir.join("image.png")).unwrap();
        let lp = model.logprobs(&ids(&exp["ids"]), Some(&px), None).unwrap();
        assert!(lp.iter().all(|v| v.is_finite()), "{name}");
        std::fs::remove_dir_all(&out).ok();
    }
}
