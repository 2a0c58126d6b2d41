//! Exact hallucination metrics of a model on freshly generated ShapesWorld images (`rlaifd eval hallucination`,
//! and the checkpointer's gate on ShapesWorld).

use anyhow::Result;
use engine::generate::{generate, GenerateRequest};
use engine::hallucination::{binary_metrics, caption_metrics, yes_no, BinaryMetrics, CaptionMetrics};
use engine::image::ImageProcessorConfig;
use engine::sampling::SamplingParams;
use engine::shapes::{instructions, Scene, WorldConfig};
use engine::tokenizer::{TextTokenizer, LLAVA_15_TEMPLATE};
use engine::{Adapter, Model};

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub images: usize,
    pub caption: CaptionMetrics,
    pub pope: std::collections::BTreeMap<String, BinaryMetrics>,
    /// Every existence question (present objects and all three negative splits), "yes" positive.
    pub existence: BinaryMetrics,
    pub amber_f1: f64,
}

impl Report {
    /// The flat metrics stored with a checkpoint (and read by the SQL views).
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "chair_i": self.caption.chair_i,
            "chair_s": self.caption.chair_s,
            "cover": self.caption.cover,
            "mean_length": self.caption.mean_length,
            "existence_accuracy": self.existence.accuracy,
            "pope_f1": self.existence.f1,
            "amber_f1": self.amber_f1,
            "images": self.images,
        })
    }
}

/// Greedy "Describe the image." captions (CHAIR/Cover) and yes/no existence answers (POPE splits, AMBER F1) on
/// COUNT images of SEED at SIZE pixels. `progress(i)` after image i (1-based).
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    m: &Model,
    ad: Option<&Adapter>,
    tok: &TextTokenizer,
    ip: &ImageProcessorConfig,
    seed: u64,
    count: usize,
    size: u32,
    max_new_tokens: usize,
    mut progress: impl FnMut(usize),
) -> Result<Report> {
    let cfg = WorldConfig { size, ..Default::default() };
    let ask = |pixels: &engine::image::PixelValues, prompt: &str, max: usize| -> Result<String> {
        let ids = tok.encode_chat(LLAVA_15_TEMPLATE, prompt)?;
        let params = SamplingParams { temperature: 0.0, max_new_tokens: max, ..Default::default() };
        let req = GenerateRequest { ids: &ids, pixels: Some(pixels), seeds: &[0], params, stop_ids: vec![] };
        let a = generate(m, &req, ad)?;
        Ok(tok.decode(&a[0].tokens)?)
    };
    let mut captions: Vec<(String, Vec<String>)> = Vec::new();
    let mut yn: Vec<(&'static str, Option<bool>, bool)> = Vec::new();
    for i in 0..count {
        let s = engine::rng::SplitMix64::new(seed.wrapping_add(i as u64)).next_u64();
        let scene = Scene::generate(&cfg, s);
        let pixels = engine::image::preprocess(&scene.render(&cfg, s), ip)?;
        captions.push((ask(&pixels, "Describe the image.", max_new_tokens)?, scene.phrases()));
        for q in instructions(&scene, s).into_iter().filter(|q| q.kind == "existence") {
            let answer = ask(&pixels, &q.prompt, 4)?;
            yn.push((q.split.unwrap_or("present"), yes_no(&answer), q.answer == "yes"));
        }
        progress(i + 1);
    }
    let caption = caption_metrics(captions.iter().map(|(a, t)| (a.as_str(), t.as_slice())));
    let mut pope = std::collections::BTreeMap::new();
    for split in ["random", "popular", "adversarial"] {
        // Each POPE split: the questions about present objects plus that split's negatives.
        let items: Vec<(Option<bool>, bool)> =
            yn.iter().filter(|(s, _, _)| *s == "present" || *s == split).map(|&(_, p, l)| (p, l)).collect();
        pope.insert(split.to_string(), binary_metrics(&items, true));
    }
    let all: Vec<(Option<bool>, bool)> = yn.iter().map(|&(_, p, l)| (p, l)).collect();
    Ok(Report {
        images: count,
        caption,
        pope,
        existence: binary_metrics(&all, true),
        amber_f1: binary_metrics(&all, false).f1,
    })
}

/// Self-feedback at inference on the held-out images: for each image, the largest N of `ns` answers to "Describe
/// the image." sampled at `temperature` (seeds from `sample_seed` and the image, so the first k answers are the
/// same whatever N), each scored by an implicit reward (`engine::feedback::reward`: `ad`
/// against `reference`, None = the base model, with `beta`, as `reward` says); for every N of `ns`, the caption metrics of the best of
/// the first N. N = 1 is a single sample at that temperature. `progress(i)` after image i (1-based).
#[allow(clippy::too_many_arguments)]
pub fn best_of_curve(
    m: &Model,
    ad: Option<&Adapter>,
    reference: Option<&Adapter>,
    tok: &TextTokenizer,
    ip: &ImageProcessorConfig,
    seed: u64,
    count: usize,
    size: u32,
    max_new_tokens: usize,
    ns: &[usize],
    temperature: f32,
    beta: f64,
    reward: engine::feedback::reward::RewardKind,
    sample_seed: u64,
    mut dump: Option<&mut dyn std::io::Write>,
    mut progress: impl FnMut(usize),
) -> Result<Vec<(usize, CaptionMetrics)>> {
    let most = ns.iter().copied().max().unwrap_or(0);
    if most == 0 || ns.contains(&0) {
        anyhow::bail!("best-of N needs every N to be at least 1");
    }
    let cfg = WorldConfig { size, ..Default::default() };
    let ids = tok.encode_chat(LLAVA_15_TEMPLATE, "Describe the image.")?;
    // Per N: (caption, the image's objects) of every image.
    let mut picked: Vec<Vec<(String, Vec<String>)>> = vec![Vec::new(); ns.len()];
    for i in 0..count {
        let s = engine::rng::SplitMix64::new(seed.wrapping_add(i as u64)).next_u64();
        let scene = Scene::generate(&cfg, s);
        let pixels = engine::image::preprocess(&scene.render(&cfg, s), ip)?;
        let first = engine::rng::SplitMix64::new(sample_seed ^ s).next_u64();
        let seeds: Vec<u64> = (0..most as u64).map(|k| first.wrapping_add(k)).collect();
        let params = SamplingParams { temperature, max_new_tokens, ..Default::default() };
        let req = GenerateRequest { ids: &ids, pixels: Some(&pixels), seeds: &seeds, params, stop_ids: vec![] };
        let all = engine::feedback::reward::best_of_n_by(m, ad, reference, &req, beta, reward, dump.is_some())?;
        if let Some(w) = dump.as_mut() {
            // Every sampled caption with its reward and its objects against the image's: to see what the reward
            // ranks.
            let truth = scene.phrases();
            let answers: Vec<serde_json::Value> = all
                .answers
                .iter()
                .zip(all.rewards.iter().zip(&all.parts))
                .map(|(a, (r, parts))| -> Result<serde_json::Value> {
                    let text = tok.decode(&a.tokens)?;
                    let named = engine::hallucination::mentions(&text);
                    let wrong = named.iter().filter(|o| !truth.contains(o)).count();
                    Ok(serde_json::json!({ "text": text, "reward": r, "parts": parts, "objects": named.len(), "hallucinated": wrong }))
                })
                .collect::<Result<_>>()?;
            writeln!(w, "{}", serde_json::json!({ "image": i, "truth": truth, "answers": answers }))?;
        }
        for (slot, &n) in picked.iter_mut().zip(ns) {
            // The best of the first n (the first on ties, as best_of_n picks).
            let best = (0..n).fold(0, |b, k| if all.rewards[k] > all.rewards[b] { k } else { b });
            slot.push((tok.decode(&all.answers[best].tokens)?, scene.phrases()));
        }
        progress(i + 1);
    }
    Ok(ns
        .iter()
        .zip(&picked)
        .map(|(&n, caps)| (n, caption_metrics(caps.iter().map(|(a, t)| (a.as_str(), t.as_slice())))))
        .collect())
}
