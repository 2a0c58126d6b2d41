//! `rlaifd eval hallucination`: exact hallucination metrics of a model on freshly generated ShapesWorld images.

use anyhow::{Context, Result};
use engine::generate::{generate, GenerateRequest};
use engine::hallucination::{binary_metrics, caption_metrics, yes_no, BinaryMetrics, CaptionMetrics};
use engine::sampling::SamplingParams;
use engine::shapes::{instructions, Scene, WorldConfig};
use engine::tokenizer::{apply_template, TextTokenizer, LLAVA_15_TEMPLATE};
use engine::Model;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum EvalCmd {
    /// CHAIR/Cover on "Describe the image." captions and POPE/AMBER on yes/no existence questions, over COUNT
    /// held-out ShapesWorld images of SEED (greedy decoding).
    Hallucination {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long, default_value_t = 1_000_000)]
        seed: u64,
        #[arg(long, default_value_t = 200)]
        count: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = 64)]
        size: u32,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(serde::Serialize)]
struct Report {
    images: usize,
    caption: CaptionMetrics,
    pope: std::collections::BTreeMap<String, BinaryMetrics>,
    /// Every existence question (present objects and all three negative splits), "yes" positive.
    existence: BinaryMetrics,
    amber_f1: f64,
}

pub fn run(cmd: EvalCmd) -> Result<()> {
    let EvalCmd::Hallucination { model, adapter, seed, count, size, max_new_tokens, json } = cmd;
    let m = Model::load(&model).with_context(|| format!("loading model {}", model.display()))?;
    let ad = match &adapter {
        Some(d) => Some(m.load_adapter(d).with_context(|| format!("loading adapter {}", d.display()))?),
        None => None,
    };
    let ip = m.image_processor.clone().with_context(|| format!("{} is a text-only model; hallucination eval needs images", model.display()))?;
    let tok = TextTokenizer::from_file(&m.dir.join("tokenizer.json"))?;
    let cfg = WorldConfig { size, ..Default::default() };
    let ask = |pixels: &engine::image::PixelValues, prompt: &str, max: usize| -> Result<String> {
        let ids = tok.encode(&apply_template(LLAVA_15_TEMPLATE, prompt), true)?;
        let params = SamplingParams { temperature: 0.0, max_new_tokens: max, ..Default::default() };
        let req = GenerateRequest { ids: &ids, pixels: Some(pixels), seeds: &[0], params, stop_ids: vec![] };
        let a = generate(&m, &req, ad.as_ref())?;
        Ok(tok.decode(&a[0].tokens)?)
    };
    let mut captions: Vec<(String, Vec<String>)> = Vec::new();
    let mut yn: Vec<(&'static str, Option<bool>, bool)> = Vec::new();
    let tty = std::io::stderr().is_terminal();
    for i in 0..count {
        let s = engine::rng::SplitMix64::new(seed.wrapping_add(i as u64)).next_u64();
        let scene = Scene::generate(&cfg, s);
        let pixels = engine::image::preprocess(&scene.render(&cfg, s), &ip)?;
        captions.push((ask(&pixels, "Describe the image.", max_new_tokens)?, scene.phrases()));
        for q in instructions(&scene, s).into_iter().filter(|q| q.kind == "existence") {
            let answer = ask(&pixels, &q.prompt, 4)?;
            yn.push((q.split.unwrap_or("present"), yes_no(&answer), q.answer == "yes"));
        }
        if tty {
            eprint!("\r{}/{count} images", i + 1);
        } else if (i + 1) % 50 == 0 || i + 1 == count {
            eprintln!("{}/{count} images", i + 1);
        }
    }
    if tty {
        eprintln!();
    }
    let caption = caption_metrics(captions.iter().map(|(a, t)| (a.as_str(), t.as_slice())));
    let mut pope = std::collections::BTreeMap::new();
    for split in ["random", "popular", "adversarial"] {
        // Each POPE split: the questions about present objects plus that split's negatives.
        let items: Vec<(Option<bool>, bool)> = yn.iter().filter(|(s, _, _)| *s == "present" || *s == split).map(|&(_, p, l)| (p, l)).collect();
        pope.insert(split.to_string(), binary_metrics(&items, true));
    }
    let all: Vec<(Option<bool>, bool)> = yn.iter().map(|&(_, p, l)| (p, l)).collect();
    let report = Report { images: count, caption, pope, existence: binary_metrics(&all, true), amber_f1: binary_metrics(&all, false).f1 };
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let c = &report.caption;
        println!("ShapesWorld hallucination, {} held-out images (seed {seed})", report.images);
        println!("captions  CHAIR_s {:.1} %  CHAIR_i {:.1} %  Cover {:.1} %  mean length {:.1} words", 100.0 * c.chair_s, 100.0 * c.chair_i, 100.0 * c.cover, c.mean_length);
        println!("{:<12} {:>8} {:>9} {:>7} {:>7} {:>9}", "POPE split", "accuracy", "precision", "recall", "F1", "yes-ratio");
        for (split, b) in &report.pope {
            println!("{:<12} {:>8.3} {:>9.3} {:>7.3} {:>7.3} {:>9.3}", split, b.accuracy, b.precision, b.recall, b.f1, b.yes_ratio);
        }
        let e = &report.existence;
        println!("{:<12} {:>8.3} {:>9.3} {:>7.3} {:>7.3} {:>9.3}", "all", e.accuracy, e.precision, e.recall, e.f1, e.yes_ratio);
        println!("AMBER discriminative F1 (\"no\" positive): {:.3}", report.amber_f1);
    }
    Ok(())
}
