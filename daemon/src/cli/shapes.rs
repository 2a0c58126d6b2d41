//! `rlaifd shapes ...`: the ShapesWorld generator.

use anyhow::{Context, Result};
use engine::shapes::{instructions, labeler_examples, sft_examples, vocabulary, CaptionOrder, Scene, WorldConfig};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(clap::Subcommand)]
pub enum ShapesCmd {
    /// Write COUNT images (PNG) and DIR/index.jsonl ({"image", "objects"} per line), plus DIR/questions.jsonl
    /// (the instructions of each image with exact answers).
    Gen {
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        out: PathBuf,
        /// Image side in pixels.
        #[arg(long, default_value_t = 64)]
        size: u32,
        #[arg(long, default_value_t = 4)]
        max_objects: usize,
    },
    /// Write COUNT images, DIR/index.jsonl and DIR/sft.jsonl: training examples for a base model
    /// ({"image", "prompt", "answer", "kind"}) whose captions carry co-occurrence noise (they sometimes name an
    /// absent partner of a present object) while yes/no, count and attribute answers are exact.
    Sft {
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        out: PathBuf,
        /// Probability that a caption names the absent partner of a strongly co-occurring object (weak ones get a
        /// fifth of it); 0 gives clean captions.
        #[arg(long, default_value_t = 0.7)]
        caption_noise: f64,
        /// The order captions list objects in: canonical (vocabulary order) or reading (rows, left to right).
        #[arg(long, default_value = "canonical")]
        caption_order: String,
        /// Image side in pixels.
        #[arg(long, default_value_t = 64)]
        size: u32,
        #[arg(long, default_value_t = 4)]
        max_objects: usize,
        /// What to write: "base" (captions, yes/no, count and attribute questions), "labeler" (only the
        /// labeler's yes/no question, balanced, with the absent objects a captioner confuses) or "divide" (text
        /// only: free-form answers with the listing of their exact claims, and each claim's question; the divide
        /// model's data, `tools/train_shapes_divide.sh`).
        #[arg(long, default_value = "base")]
        mix: String,
    },
    /// Write COUNT images and the benchmark files `rlaifd eval bench` reads, in their published formats, with
    /// ShapesWorld's objects as the categories: instances.json (COCO instances: images, annotations, categories),
    /// synonyms.txt (one category a line), pope_random.json, pope_popular.json and pope_adversarial.json (POPE's
    /// question lines: the present objects' questions and that split's negatives), amber_query.json,
    /// annotations.json and relation.json (AMBER's), mmhal.json (MMHal-Bench's layout, the first 8 images). Same
    /// images as
    /// `rlaifd eval hallucination --seed S --count N`.
    Bench {
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        out: PathBuf,
        /// Image side in pixels.
        #[arg(long, default_value_t = 64)]
        size: u32,
    },
    /// Write COUNT free-form answers about generated scenes with their exact claims, DIR/divide.jsonl
    /// ({"image", "answer", "exact"} per line, images beside it): lists, pronouns, relations, hedges and opinions,
    /// to measure claim extractors (`rlaifd claims --answers DIR/divide.jsonl`).
    Divide {
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        out: PathBuf,
        /// Image side in pixels.
        #[arg(long, default_value_t = 64)]
        size: u32,
    },
    /// Print the JSON list of every object phrase.
    Vocab,
    /// Write ShapesWorld's word-level tokenizer.json (--divide: the divide model's, with its prompt files
    /// divide_prompt.txt and question_prompt.txt beside it).
    Tokenizer {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        divide: bool,
    },
}

pub fn run(cmd: ShapesCmd) -> Result<()> {
    match cmd {
        ShapesCmd::Tokenizer { out, divide } => {
            let tok = if divide { engine::shapes::build_divide_tokenizer() } else { engine::shapes::build_tokenizer() };
            let tok = tok.map_err(|e| anyhow::anyhow!("building the tokenizer: {e}"))?;
            tok.save(&out, true).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
            if divide {
                let dir = out.parent().unwrap_or(Path::new("."));
                for (file, prompt) in [
                    ("divide_prompt.txt", engine::shapes::DIVIDE_PROMPT),
                    ("question_prompt.txt", engine::shapes::DIVIDE_QUESTION_PROMPT),
                ] {
                    std::fs::write(dir.join(file), format!("{prompt}\n"))
                        .with_context(|| format!("cannot write {}", dir.join(file).display()))?;
                }
            }
            Ok(())
        }
        ShapesCmd::Divide { seed, count, out, size } => {
            let mut lines = Vec::new();
            write_scenes(seed, count, &out, size, 4, |file, scene, s| {
                let (answer, exact) = engine::shapes::divide_example(scene, s);
                lines.push(serde_json::json!({ "image": file, "answer": answer, "exact": exact }).to_string());
                Ok(())
            })?;
            let path = out.join("divide.jsonl");
            std::fs::write(&path, lines.join("\n") + "\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("{}: {} answers with their exact claims", path.display(), lines.len());
            Ok(())
        }
        ShapesCmd::Bench { seed, count, out, size } => {
            let vocab = vocabulary();
            let categories: Vec<serde_json::Value> = vocab
                .iter()
                .enumerate()
                .map(|(i, v)| serde_json::json!({ "id": i + 1, "name": v, "supercategory": "shape" }))
                .collect();
            let (mut images, mut annotations) = (Vec::new(), Vec::new());
            let mut pope: std::collections::BTreeMap<&str, Vec<u8>> =
                ["random", "popular", "adversarial"].into_iter().map(|k| (k, Vec::new())).collect();
            let mut qid = 0usize;
            // AMBER: a generative query per image first (ids 1..=count), then the existence questions.
            let (mut amber_gen, mut amber_disc, mut mmhal) = (Vec::new(), Vec::new(), Vec::new());
            write_scenes(seed, count, &out, size, 4, |file, scene, s| {
                let present = scene.phrases();
                let hallu: Vec<String> = present
                    .iter()
                    .filter_map(|p| vocab.iter().position(|v| v == p))
                    .map(|o| vocab[engine::shapes::partner(o)].clone())
                    .filter(|p| !present.contains(p))
                    .collect();
                if mmhal.len() < 8 {
                    // MMHal-Bench's entry layout; the image is found by the last part of image_src.
                    mmhal.push(serde_json::json!({ "question_type": "object", "question_topic": "shapes",
                        "image_id": file.trim_end_matches(".png"), "image_src": format!("https://example.invalid/shapes/{file}"),
                        "image_content": present, "question": "What is in this picture?",
                        "gt_answer": engine::shapes::caption(scene), "model_answer": "" }));
                }
                amber_gen.push((
                    file.to_string(),
                    serde_json::json!({ "type": "generative", "truth": present, "hallu": hallu }),
                ));
                for q in instructions(scene, s).into_iter().filter(|q| q.kind == "existence") {
                    amber_disc.push((
                        file.to_string(),
                        q.prompt.clone(),
                        serde_json::json!({ "type": "discriminative-hallucination", "truth": q.answer }),
                    ));
                }
                let id = images.len() + 1;
                images.push(serde_json::json!({ "id": id, "file_name": file, "width": size, "height": size }));
                for phrase in scene.phrases() {
                    let cat = vocab.iter().position(|v| *v == phrase).map(|c| c + 1);
                    annotations
                        .push(serde_json::json!({ "id": annotations.len() + 1, "image_id": id, "category_id": cat }));
                }
                for q in instructions(scene, s).into_iter().filter(|q| q.kind == "existence") {
                    let splits: Vec<&str> = match q.split {
                        Some("present") | None => vec!["random", "popular", "adversarial"],
                        Some(split) => vec![split],
                    };
                    for split in splits {
                        qid += 1;
                        let line = serde_json::json!({ "question_id": qid, "image": file, "text": q.prompt, "label": q.answer });
                        writeln!(pope.get_mut(split).expect("a POPE split"), "{line}")?;
                    }
                }
                Ok(())
            })?;
            let instances =
                serde_json::json!({ "images": images, "annotations": annotations, "categories": categories });
            let write = |name: &str, bytes: &[u8]| -> Result<()> {
                std::fs::write(out.join(name), bytes).with_context(|| format!("cannot write {}/{name}", out.display()))
            };
            write("instances.json", serde_json::to_string(&instances)?.as_bytes())?;
            let synonyms: String = vocab.iter().map(|v| format!("{v}\n")).collect();
            write("synonyms.txt", format!("# ShapesWorld's objects, one category a line\n{synonyms}").as_bytes())?;
            for (split, lines) in &pope {
                write(&format!("pope_{split}.json"), lines)?;
            }
            let (mut queries, mut annotations) = (Vec::new(), Vec::new());
            for (file, ann) in amber_gen {
                let id = queries.len() + 1;
                queries.push(serde_json::json!({ "id": id, "image": file, "query": "Describe the image." }));
                annotations.push(
                    serde_json::json!({ "id": id, "type": ann["type"], "truth": ann["truth"], "hallu": ann["hallu"] }),
                );
            }
            for (file, question, ann) in amber_disc {
                let id = queries.len() + 1;
                queries.push(serde_json::json!({ "id": id, "image": file, "query": question }));
                annotations.push(serde_json::json!({ "id": id, "type": ann["type"], "truth": ann["truth"] }));
            }
            write("amber_query.json", serde_json::to_string(&queries)?.as_bytes())?;
            write("annotations.json", serde_json::to_string(&annotations)?.as_bytes())?;
            let relation: serde_json::Map<String, serde_json::Value> =
                vocab.iter().map(|v| (v.clone(), serde_json::json!([]))).collect();
            write("relation.json", serde_json::to_string(&relation)?.as_bytes())?;
            write("mmhal.json", serde_json::to_string_pretty(&mmhal)?.as_bytes())?;
            Ok(())
        }
        ShapesCmd::Vocab => {
            println!("{}", serde_json::to_string(&vocabulary())?);
            Ok(())
        }
        ShapesCmd::Gen { seed, count, out, size, max_objects } => {
            let mut questions = Vec::new();
            write_scenes(seed, count, &out, size, max_objects, |file, scene, s| {
                writeln!(
                    questions,
                    "{}",
                    serde_json::json!({ "image": file, "instructions": instructions(scene, s) })
                )?;
                Ok(())
            })?;
            std::fs::write(out.join("questions.jsonl"), questions)
                .with_context(|| format!("cannot write {}/questions.jsonl", out.display()))?;
            Ok(())
        }
        ShapesCmd::Sft { seed, count, out, caption_noise, caption_order, size, max_objects, mix } => {
            if !matches!(mix.as_str(), "base" | "labeler" | "divide") {
                anyhow::bail!("--mix {mix}: expected base, labeler or divide");
            }
            let caption_order = match caption_order.as_str() {
                "canonical" => CaptionOrder::Canonical,
                "reading" => CaptionOrder::Reading,
                other => anyhow::bail!("--caption-order {other}: expected canonical or reading"),
            };
            if !(0.0..=1.0).contains(&caption_noise) {
                anyhow::bail!("--caption-noise must be a probability in [0, 1] (got {caption_noise})");
            }
            let mut lines = Vec::new();
            let mut n = 0usize;
            write_scenes(seed, count, &out, size, max_objects, |file, scene, s| {
                let examples = match mix.as_str() {
                    "labeler" => labeler_examples(scene, s),
                    "divide" => engine::shapes::divide_sft_examples(scene, s),
                    _ => sft_examples(scene, s, caption_noise, caption_order),
                };
                for (kind, prompt, answer) in examples {
                    // The divide model reads text only: its lines name no image.
                    let line = if mix == "divide" {
                        serde_json::json!({ "prompt": prompt, "answer": answer, "kind": kind })
                    } else {
                        serde_json::json!({ "image": file, "prompt": prompt, "answer": answer, "kind": kind })
                    };
                    writeln!(lines, "{line}")?;
                    n += 1;
                }
                Ok(())
            })?;
            std::fs::write(out.join("sft.jsonl"), lines)
                .with_context(|| format!("cannot write {}/sft.jsonl", out.display()))?;
            eprintln!("wrote {n} examples to {}/sft.jsonl", out.display());
            Ok(())
        }
    }
}

/// Renders COUNT scenes of SEED into DIR (PNG) with DIR/index.jsonl, calling `each(file, scene, scene_seed)`.
/// Image i of seed S is the same whatever COUNT is.
fn write_scenes(
    seed: u64,
    count: usize,
    out: &Path,
    size: u32,
    max_objects: usize,
    mut each: impl FnMut(&str, &Scene, u64) -> Result<()>,
) -> Result<()> {
    if !(16..=1024).contains(&size) {
        anyhow::bail!("--size must be between 16 and 1024 pixels (got {size})");
    }
    if max_objects == 0 {
        anyhow::bail!("--max-objects must be at least 1");
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let cfg = WorldConfig { size, max_objects, ..Default::default() };
    let mut index = Vec::new();
    for i in 0..count {
        let s = engine::rng::SplitMix64::new(seed.wrapping_add(i as u64)).next_u64();
        let scene = Scene::generate(&cfg, s);
        let file = format!("{i:06}.png");
        scene
            .render(&cfg, s)
            .save(out.join(&file))
            .with_context(|| format!("cannot write {}", out.join(&file).display()))?;
        writeln!(index, "{}", serde_json::json!({ "image": file, "objects": scene.phrases() }))?;
        each(&file, &scene, s)?;
        if count >= 1000 && (i + 1) % 1000 == 0 {
            eprintln!("{}/{count} images", i + 1);
        }
    }
    std::fs::write(out.join("index.jsonl"), index)
        .with_context(|| format!("cannot write {}/index.jsonl", out.display()))?;
    eprintln!("wrote {count} images to {}", out.display());
    Ok(())
}
