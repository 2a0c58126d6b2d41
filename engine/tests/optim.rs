//! AdamW + gradient clipping + cosine warmup schedule against torch.optim.AdamW with transformers'
//! get_cosine_schedule_with_warmup and clip_grad_norm_ (fixture: tools/gen_adamw_fixture.py).

use engine::train::optim::{AdamW, AdamWConfig};
use engine::train::Grads;
use serde_json::Value;
use std::collections::BTreeMap;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[test]
fn adamw_matches_torch() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/optim/adamw.json");
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cfg = AdamWConfig {
        lr: fx["lr"].as_f64().unwrap(),
        weight_decay: fx["weight_decay"].as_f64().unwrap(),
        max_grad_norm: fx["max_grad_norm"].as_f64().unwrap(),
        warmup_steps: fx["warmup"].as_u64().unwrap() as usize,
        total_steps: fx["total"].as_u64().unwrap() as usize,
        ..Default::default()
    };
    let mut master: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    for (k, shape) in fx["shapes"].as_object().unwrap() {
        let shape: Vec<usize> = shape.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        master.insert(k.clone(), (shape, floats(&fx["init"][k])));
    }
    let mut opt = AdamW::new(cfg);
    for (i, step) in fx["steps"].as_array().unwrap().iter().enumerate() {
        let sizes: Vec<(String, usize)> = master.iter().map(|(k, (_, v))| (k.clone(), v.len())).collect();
        let mut grads = Grads::zeros_for_params(&sizes);
        for (k, _) in &sizes {
            grads.param_mut(k).unwrap().copy_from_slice(&floats(&step["grads"][k]));
        }
        let info = opt.step_params(&mut master, &grads).unwrap();
        assert!((info.lr - step["lr"].as_f64().unwrap()).abs() < 1e-12, "step {i}: lr {} vs {}", info.lr, step["lr"]);
        assert!((info.grad_norm - step["grad_norm"].as_f64().unwrap()).abs() < 1e-4, "step {i}: grad norm");
        for (k, (_, v)) in &master {
            let want = floats(&step["params"][k]);
            let d = v.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(d < 2e-6, "step {i} {k}: max |diff| {d}");
        }
    }
}
