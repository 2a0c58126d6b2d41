//! Shared by the GPU test binaries (cuda_parity, cuda_train_parity, cuda_llama, cuda_train, cuda_backend,
//! cuda_parallel).
#![allow(dead_code)]

use engine::cuda::Gpu;
use std::path::PathBuf;

/// The GPU, or None (with the reason printed, so the test passes visibly skipped) where none is usable; a GPU whose
/// kernels do not build fails the test.
pub fn gpu() -> Option<Gpu> {
    match Gpu::open(0) {
        Ok(Ok(g)) => {
            println!("CUDA device: {} ({})", g.name, g.arch);
            Some(g)
        }
        Ok(Err(why)) => {
            println!("SKIPPED: no GPU: {why}");
            None
        }
        Err(e) => panic!("a GPU is present but the kernels do not build: {e}"),
    }
}

/// The checkout: $RLAIFD_ROOT when the binary runs elsewhere than where it was built (scripts/gpu-check.sh).
pub fn root() -> PathBuf {
    std::env::var("RLAIFD_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."))
}

/// A family fixture's ids (`DIR/expected.json`, the image token once), split after the image token and the marker
/// that follows it: (prompt, the rest).
pub fn fixture_prompt(dir: &std::path::Path, image_token: Option<u32>) -> (Vec<u32>, Vec<u32>) {
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let mut ids: Vec<u32> = exp["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let at = ids.iter().position(|&t| Some(t) == image_token).expect("the image token") + 2;
    let rest = ids.split_off(at);
    (ids, rest)
}

/// B of every LoRA module of `adapter` uniform in ±`scale` (peft starts B at zero, which would hide a LoRA bug).
pub fn randomize_b(adapter: &mut engine::Adapter, seed: u64, scale: f64) {
    let mut rng = engine::rng::SplitMix64::new(seed);
    let names: Vec<String> = adapter.module_names().iter().map(|s| s.to_string()).collect();
    for n in names {
        adapter.module_mut(&n).unwrap().b.iter_mut().for_each(|v| *v = ((rng.next_f64() * 2.0 - 1.0) * scale) as f32);
    }
}

/// A scene, its prompt ids, the chosen and the rejected answer ids.
pub type Pair = (engine::shapes::Scene, Vec<u32>, Vec<u32>, Vec<u32>);

/// ShapesWorld preference pairs with images: the true caption over one naming an absent object.
pub fn shapes_pairs(tok: &engine::tokenizer::TextTokenizer, eos: u32, count: usize) -> Vec<Pair> {
    let wc = engine::shapes::WorldConfig::default();
    let prompt = tok
        .encode(&engine::tokenizer::apply_template(engine::tokenizer::LLAVA_15_TEMPLATE, "Describe the image."), true)
        .unwrap();
    let ans = |s: &str| {
        let mut v = tok.encode(s, false).unwrap();
        v.push(eos);
        v
    };
    (0..400u64)
        .filter_map(|seed| {
            let scene = engine::shapes::Scene::generate(&wc, seed);
            let (noisy, added) =
                engine::shapes::noisy_caption(&scene, seed, 1.0, engine::shapes::CaptionOrder::Canonical);
            (!added.is_empty()).then(|| {
                let chosen = ans(&engine::shapes::caption(&scene));
                (scene, prompt.clone(), chosen, ans(&noisy))
            })
        })
        .take(count)
        .collect()
}

/// Relative L2 distance of `got` from `want`.
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(g, w)| (*g as f64 - *w as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}
