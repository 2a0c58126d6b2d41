//! DPO loss and LoRA gradients against transformers + peft autograd (fixtures from tools/gen_grad_fixtures.py):
//! loss within 1e-5 relative, every adapter tensor's gradient within 1e-3 relative L2 error (zero gradients of
//! modules the loss does not reach must come out exactly zero).

use engine::train::dpo::{dpo_loss_and_grads, TokenPair};
use engine::train::Grads;
use engine::weights::WeightStore;
use engine::Model;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn grad_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/grad")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

#[test]
fn dpo_loss_and_lora_gradients_match_peft() {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(grad_fixtures())
        .expect("grad fixtures")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("expected.json").is_file())
        .collect();
    cases.sort();
    assert!(cases.len() >= 3, "expected at least 3 gradient fixtures, found {}", cases.len());
    for dir in cases {
        let exp: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let name = exp["case"].as_str().unwrap().to_string();
        let model = Model::load(&dir.join(exp["model_dir"].as_str().unwrap())).unwrap();
        let adapter = model.load_adapter(&dir.join(exp["adapter_dir"].as_str().unwrap())).unwrap();
        let lines: Vec<Value> = std::fs::read_to_string(dir.join("pairs.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let pixels: Vec<_> =
            lines.iter().map(|l| l["image"].as_str().map(|p| model.load_image(&dir.join(p)).unwrap())).collect();
        let owned: Vec<(Vec<u32>, Vec<u32>, Vec<u32>)> =
            lines.iter().map(|l| (ids(&l["prompt_ids"]), ids(&l["chosen_ids"]), ids(&l["rejected_ids"]))).collect();
        let pairs: Vec<TokenPair> = owned
            .iter()
            .zip(&pixels)
            .map(|((p, c, r), px)| TokenPair { pixels: px.as_ref(), prompt_ids: p, chosen_ids: c, rejected_ids: r })
            .collect();
        let beta = exp["beta"].as_f64().unwrap();
        let mut grads = Grads::zeros_like(&adapter);
        let (loss, _) = dpo_loss_and_grads(&model, &adapter, &pairs, beta, &mut grads).unwrap();
        let want_loss = exp["loss"].as_f64().unwrap();
        assert!(((loss - want_loss) / want_loss).abs() < 1e-5, "{name}: loss {loss} vs {want_loss}");

        let want = WeightStore::open_files(&[dir.join("grads.safetensors")]).unwrap();
        let got = grads.named_tensors(&adapter);
        assert_eq!(got.len(), want.keys().count(), "{name}: gradient tensor count");
        let mut worst = 0f64;
        for (key, shape, g) in &got {
            assert_eq!(want.shape(key), Some(shape.as_slice()), "{name}: {key} shape");
            let w = want.f32_any_shape(key).unwrap();
            let norm: f64 = w.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
            let diff: f64 = w.iter().zip(g.iter()).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>().sqrt();
            if norm == 0.0 {
                assert_eq!(diff, 0.0, "{name}: {key} should have a zero gradient");
            } else {
                worst = worst.max(diff / norm);
                assert!(diff / norm <= 1e-3, "{name}: {key} relative L2 error {}", diff / norm);
            }
        }
        println!(
            "{name:<32} loss {loss:.7} (peft {want_loss:.7}), {} tensors, worst relative L2 {worst:.2e}",
            got.len()
        );
    }
}

#[test]
fn recomputing_cheap_activations_gives_identical_gradients() {
    let dir = grad_fixtures().join("l15_4x_f32_gqa_tied_lora");
    let exp: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let mut model = Model::load(&dir.join(exp["model_dir"].as_str().unwrap())).unwrap();
    let line: Value =
        serde_json::from_str(std::fs::read_to_string(dir.join("pairs.jsonl")).unwrap().lines().next().unwrap())
            .unwrap();
    let px = model.load_image(&dir.join(line["image"].as_str().unwrap())).unwrap();
    let (p, c, r) = (ids(&line["prompt_ids"]), ids(&line["chosen_ids"]), ids(&line["rejected_ids"]));
    let mut run = |recompute: bool| {
        model.llm.recompute_cheap = recompute;
        let pair = TokenPair { pixels: Some(&px), prompt_ids: &p, chosen_ids: &c, rejected_ids: &r };
        let adapter = model.load_adapter(&dir.join(exp["adapter_dir"].as_str().unwrap())).unwrap();
        let mut g = Grads::zeros_like(&adapter);
        let (loss, _) = dpo_loss_and_grads(&model, &adapter, &[pair], 0.1, &mut g).unwrap();
        (loss, g.named_tensors(&adapter).into_iter().map(|(k, _, v)| (k, v.to_vec())).collect::<Vec<_>>())
    };
    let (a, b) = (run(false), run(true));
    assert_eq!(a.0, b.0);
    assert_eq!(a.1, b.1, "recomputation must be bit-identical");
}
