//! Full fine-tuning gradients (every parameter: embeddings, norms, attention, MLP, lm_head or tied head,
//! projector, the whole CLIP tower down to the patch embedding) of the SFT loss against PyTorch autograd
//! (fixtures from tools/gen_sft_fixtures.py): loss within 1e-5 relative, each tensor within 1e-3 relative L2.

use engine::adapter::canonical_module;
use engine::train::sft::{sft_forward_backward, SftExample};
use engine::train::Grads;
use engine::weights::WeightStore;
use engine::Model;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

#[test]
fn sft_loss_and_full_parameter_gradients_match_pytorch() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sft");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("sft fixtures")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("expected.json").is_file())
        .collect();
    cases.sort();
    assert!(cases.len() >= 3);
    for dir in cases {
        let exp: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let name = exp["case"].as_str().unwrap().to_string();
        let model = Model::load(&dir.join(exp["model_dir"].as_str().unwrap())).unwrap();
        let lines: Vec<Value> = std::fs::read_to_string(dir.join("data.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let pixels: Vec<_> =
            lines.iter().map(|l| l["image"].as_str().map(|p| model.load_image(&dir.join(p)).unwrap())).collect();
        let owned: Vec<(Vec<u32>, Vec<u32>)> =
            lines.iter().map(|l| (ids(&l["prompt_ids"]), ids(&l["answer_ids"]))).collect();
        let n_tokens: usize = owned.iter().map(|(_, a)| a.len()).sum();
        assert_eq!(n_tokens as u64, exp["n_tokens"].as_u64().unwrap());
        let sizes: Vec<(String, usize)> =
            model.param_shapes().into_iter().map(|(n, s)| (n, s.iter().product())).collect();
        let mut grads = Grads::zeros_for_params(&sizes);
        let weight = 1.0 / n_tokens as f64;
        let mut loss = 0.0;
        for ((p, a), px) in owned.iter().zip(&pixels) {
            let ex = SftExample { pixels: px.as_ref(), prompt_ids: p, answer_ids: a };
            loss += weight * sft_forward_backward(&model, None, &ex, weight, &mut grads, None).unwrap();
        }
        let want_loss = exp["loss"].as_f64().unwrap();
        assert!(((loss - want_loss) / want_loss).abs() < 1e-5, "{name}: loss {loss} vs {want_loss}");

        let analytically_zero: Vec<String> = exp["analytically_zero_grad_keys"]
            .as_array()
            .map(|a| a.iter().filter_map(|k| k.as_str().map(String::from)).collect())
            .unwrap_or_default();
        let want = WeightStore::open_files(&[dir.join("grads.safetensors")]).unwrap();
        let (mut worst, mut checked) = (0f64, 0);
        for key in want.keys() {
            let w = want.f32_any_shape(key).unwrap();
            let canonical =
                canonical_module(key, model.family()).unwrap_or_else(|| panic!("{name}: {key} has no canonical name"));
            let norm: f64 = w.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
            let Some(g) = grads.param(&canonical) else {
                // Parameters the engine does not hold (vision layers past the feature layer, post_layernorm)
                // cannot influence the loss: transformers' gradient must be zero.
                assert_eq!(norm, 0.0, "{name}: {key} is not trained by rlaifd but has gradient norm {norm}");
                continue;
            };
            let diff: f64 = w.iter().zip(g).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>().sqrt();
            if analytically_zero.iter().any(|k| k == key) || norm == 0.0 {
                // e.g. CLIP's k_proj bias: softmax is shift-invariant, so only rounding noise remains.
                assert!(diff < 1e-5, "{name}: {key} should be ~0, differs by {diff}");
                continue;
            }
            checked += 1;
            worst = worst.max(diff / norm);
            assert!(diff / norm <= 1e-3, "{name}: {key} relative L2 error {}", diff / norm);
        }
        println!("{name:<30} loss {loss:.7} (torch {want_loss:.7}); {checked} non-zero tensors, worst relative L2 {worst:.2e}");
    }
}
