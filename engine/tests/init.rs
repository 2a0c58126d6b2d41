//! Random checkpoints from a config load, run, and have the requested statistics.

use engine::Model;

#[test]
fn random_checkpoint_from_config_loads_and_runs() {
    let dir = std::env::temp_dir().join(format!("rlaifd-init-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = serde_json::json!({
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 66,
        "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
        "text_config": {"model_type": "llama", "vocab_size": 67, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": true},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
    });
    std::fs::write(dir.join("in.json"), cfg.to_string()).unwrap();
    let out = dir.join("model");
    engine::init::init_checkpoint(&dir.join("in.json"), &out, 3, 0.02, &[]).unwrap();
    let m = Model::load(&out).unwrap();
    assert_eq!(m.layout.name, "transformers-4.52");
    let emb = m.get_param("language_model.embed_tokens.weight").unwrap();
    let std = (emb.iter().map(|v| v * v).sum::<f32>() / emb.len() as f32).sqrt();
    assert!((std - 0.02).abs() < 0.002, "std {std}");
    assert!(m.get_param("language_model.norm.weight").unwrap().iter().all(|&v| v == 1.0));
    let px = engine::image::PixelValues::single(vec![0.1; 3 * 32 * 32], 3, 32, 32);
    let lp = m.logprobs(&[1, 66, 5, 7], Some(&px), None).unwrap();
    // Near-uniform predictions from a fresh model: log p ~ -ln(67).
    assert!(lp.iter().all(|v| (v + (67f32).ln()).abs() < 0.5), "{lp:?}");
    // Same seed, same bytes.
    let out2 = dir.join("model2");
    engine::init::init_checkpoint(&dir.join("in.json"), &out2, 3, 0.02, &[]).unwrap();
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(out2.join("model.safetensors")).unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
