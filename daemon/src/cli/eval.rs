//! `rlaifd eval hallucination`: exact hallucination metrics of a model on freshly generated ShapesWorld images.

use anyhow::{Context, Result};
use engine::tokenizer::TextTokenizer;
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
        /// Image side in pixels (default: the model's input size, its preprocessor's crop).
        #[arg(long)]
        size: Option<u32>,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        #[arg(long)]
        json: bool,
        /// Self-feedback at inference: caption metrics of the best of N sampled captions by the length-normalised
        /// implicit reward (the adapter against --reference), for each N of a list such as 1,2,4,8,16 (N = 1: one
        /// sample). Existence questions are not asked.
        #[arg(long, value_delimiter = ',')]
        best_of: Vec<usize>,
        /// Sampling temperature of --best-of.
        #[arg(long, default_value_t = 0.7)]
        temperature: f32,
        /// The reference adapter of the implicit reward (default: the base model).
        #[arg(long)]
        reference: Option<PathBuf>,
        /// β of the implicit reward (scales every reward alike: it changes no choice).
        #[arg(long, default_value_t = 0.1)]
        beta: f64,
        /// Which implicit reward ranks the captions: "mean" (RLAIF-V's: per token, end-of-sequence included),
        /// "mean-content" (per word, the end-of-sequence token left out) or "sum" (DPO's, not normalised).
        #[arg(long, default_value = "mean")]
        reward: engine::feedback::reward::RewardKind,
        /// Seed of the sampled captions.
        #[arg(long, default_value_t = 0)]
        sample_seed: u64,
        /// With --best-of: an SVG of CHAIR_i and Cover against N.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// With --best-of: every sampled caption, its reward and its hallucinated objects, as JSON lines.
        #[arg(long)]
        dump: Option<PathBuf>,
    },
    /// A hallucination benchmark in its published format, on data you supply (greedy decoding). objhal: Object
    /// HalBench / CHAIR over a COCO instances_*.json (--data) and its images (--images), described with the
    /// benchmark's eight prompts (image k gets prompt k mod 8); pope: a POPE question file (JSON lines
    /// {"image", "text", "label"}); amber: AMBER's query file with its annotations; mmhal: MMHal-Bench's
    /// questions, rated by a judge model.
    Bench(BenchArgs),
}

pub fn run(cmd: EvalCmd) -> Result<()> {
    let EvalCmd::Hallucination {
        model,
        adapter,
        seed,
        count,
        size,
        max_new_tokens,
        json,
        best_of,
        temperature,
        reference,
        beta,
        reward,
        sample_seed,
        plot,
        dump,
    } = cmd
    else {
        let EvalCmd::Bench(a) = cmd else { unreachable!("EvalCmd has two commands") };
        return bench(a);
    };
    let m = Model::load(&model).with_context(|| format!("loading model {}", model.display()))?;
    let ad = match &adapter {
        Some(d) => Some(m.load_adapter(d).with_context(|| format!("loading adapter {}", d.display()))?),
        None => None,
    };
    let ip = m
        .image_processor
        .clone()
        .with_context(|| format!("{} is a text-only model; hallucination eval needs images", model.display()))?;
    let tok = TextTokenizer::from_file(&m.dir.join("tokenizer.json"))?;
    let size = size.unwrap_or(ip.crop_width);
    if !(16..=1024).contains(&size) {
        anyhow::bail!("--size must be between 16 and 1024 pixels (got {size})");
    }
    let tty = std::io::stderr().is_terminal();
    let progress = |i: usize| {
        if tty {
            eprint!("\r{i}/{count} images");
            if i == count {
                eprintln!();
            }
        } else if i.is_multiple_of(50) || i == count {
            eprintln!("{i}/{count} images");
        }
    };
    if !best_of.is_empty() {
        if best_of.iter().any(|&n| n == 0 || n > 64) {
            anyhow::bail!("--best-of: every N must be from 1 to 64 (got {best_of:?})");
        }
        if !(temperature > 0.0 && temperature.is_finite()) {
            anyhow::bail!("--temperature must be above 0 for --best-of (got {temperature})");
        }
        let reference = match &reference {
            Some(d) => Some(m.load_adapter(d).with_context(|| format!("loading reference adapter {}", d.display()))?),
            None => None,
        };
        let mut dump_file = match &dump {
            Some(p) => Some(std::io::BufWriter::new(
                std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
            )),
            None => None,
        };
        let curve = rlaifd::shapes_eval::best_of_curve(
            &m,
            ad.as_ref(),
            reference.as_ref(),
            &tok,
            &ip,
            seed,
            count,
            size,
            max_new_tokens,
            &best_of,
            temperature,
            beta,
            reward,
            sample_seed,
            dump_file.as_mut().map(|f| f as &mut dyn std::io::Write),
            progress,
        )?;
        if json {
            let rows: Vec<serde_json::Value> = curve
                .iter()
                .map(|(n, c)| serde_json::json!({ "best_of": n, "temperature": temperature, "reward": reward, "caption": c }))
                .collect();
            println!("{}", serde_json::to_string(&rows)?);
        } else {
            println!(
                "Best-of-N captions at temperature {temperature} by the {} implicit reward, {count} held-out images (seed {seed})",
                serde_json::to_value(reward)?.as_str().unwrap_or("mean")
            );
            println!("{:>4} {:>9} {:>9} {:>8} {:>8}", "N", "CHAIR_s %", "CHAIR_i %", "Cover %", "words");
            for (n, c) in &curve {
                println!(
                    "{n:>4} {:>9.1} {:>9.1} {:>8.1} {:>8.1}",
                    100.0 * c.chair_s,
                    100.0 * c.chair_i,
                    100.0 * c.cover,
                    c.mean_length
                );
            }
        }
        if let Some(path) = plot {
            let pts: Vec<(usize, f64, f64)> = curve.iter().map(|(n, c)| (*n, c.chair_i, c.cover)).collect();
            rlaifd::demo::write_best_of_plot(&path, &pts, temperature)?;
            eprintln!("wrote {}", path.display());
        }
        return Ok(());
    }
    if plot.is_some() || dump.is_some() {
        anyhow::bail!("--plot and --dump are of the --best-of curve: give --best-of too");
    }
    let report =
        rlaifd::shapes_eval::evaluate(&m, ad.as_ref(), &tok, &ip, seed, count, size, max_new_tokens, progress)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let c = &report.caption;
        println!("ShapesWorld hallucination, {} held-out images (seed {seed})", report.images);
        println!(
            "captions  CHAIR_s {:.1} %  CHAIR_i {:.1} %  Cover {:.1} %  mean length {:.1} words",
            100.0 * c.chair_s,
            100.0 * c.chair_i,
            100.0 * c.cover,
            c.mean_length
        );
        println!(
            "{:<12} {:>8} {:>9} {:>7} {:>7} {:>9}",
            "POPE split", "accuracy", "precision", "recall", "F1", "yes-ratio"
        );
        for (split, b) in &report.pope {
            println!(
                "{:<12} {:>8.3} {:>9.3} {:>7.3} {:>7.3} {:>9.3}",
                split, b.accuracy, b.precision, b.recall, b.f1, b.yes_ratio
            );
        }
        let e = &report.existence;
        println!(
            "{:<12} {:>8.3} {:>9.3} {:>7.3} {:>7.3} {:>9.3}",
            "all", e.accuracy, e.precision, e.recall, e.f1, e.yes_ratio
        );
        println!("AMBER discriminative F1 (\"no\" positive): {:.3}", report.amber_f1);
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct BenchArgs {
    #[arg(long, value_enum)]
    pub suite: rlaifd::bench::Suite,
    /// The benchmark's data file.
    #[arg(long)]
    pub data: PathBuf,
    /// The folder the data file's image names are relative to.
    #[arg(long)]
    pub images: PathBuf,
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// objhal: category synonyms, one category a line, comma-separated names, the first being the
    /// category's name in the instances file (default: CHAIR's COCO lists, assets/bench/coco_synonyms.txt).
    #[arg(long)]
    pub synonyms: Option<PathBuf>,
    /// objhal: a COCO captions_*.json whose captions add to each image's ground truth (as CHAIR does).
    #[arg(long)]
    pub captions: Option<PathBuf>,
    /// Replaces the suite's own prompts (objhal's descriptions); for pope, appended after each question.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Evaluate the first N images (objhal) or questions (pope) only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Longest answer (default: 512 for objhal, 16 for pope).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Print one JSON object with the metrics under their usual names.
    #[arg(long)]
    pub json: bool,
    /// Write every answer (image, prompt, answer) as JSON lines.
    #[arg(long)]
    pub answers: Option<PathBuf>,
    /// amber: its annotations.json, relation.json and safe_words.txt (default: found next to --data or in
    /// the folder above it, as AMBER's repository keeps them).
    #[arg(long)]
    pub annotations: Option<PathBuf>,
    #[arg(long)]
    pub relation: Option<PathBuf>,
    #[arg(long)]
    pub safe_words: Option<PathBuf>,
    /// mmhal: the judge, a model rlaifd loads (text or vision-language; it reads the image's listed contents,
    /// the standard answer and the answer, and rates it 0-6: `rlaifd::bench::mmhal_judge_prompt`).
    #[arg(long)]
    pub judge: Option<PathBuf>,
}

/// `rlaifd eval bench`: every answer greedy, metrics printed (or one JSON object), answers written on request.
fn bench(a: BenchArgs) -> Result<()> {
    let (json, answers_to) = (a.json, a.answers.clone());
    use rlaifd::bench::{Bench, BenchSource, Suite};
    let src = BenchSource {
        data: a.data.clone(),
        images: a.images,
        synonyms: a.synonyms,
        captions: a.captions,
        prompt: a.prompt,
        limit: a.limit,
        annotations: None,
        relation: None,
        safe_words: None,
    };
    let src = match a.suite {
        Suite::Amber => {
            let found = rlaifd::bench::amber_side_files(&a.data);
            BenchSource {
                annotations: a.annotations.clone().or(found.0),
                relation: a.relation.clone().or(found.1),
                safe_words: a.safe_words.clone().or(found.2),
                ..src
            }
        }
        _ if a.annotations.is_some() || a.relation.is_some() || a.safe_words.is_some() => {
            anyhow::bail!("--annotations, --relation and --safe-words are AMBER's (--suite amber)")
        }
        _ => src,
    };
    let max_new = a.max_new_tokens.unwrap_or(if a.suite == Suite::Pope { 16 } else { 512 });
    if max_new == 0 || max_new > 4096 {
        anyhow::bail!("--max-new-tokens must be from 1 to 4096 (got {max_new})");
    }
    if (a.suite == Suite::Mmhal) != a.judge.is_some() {
        anyhow::bail!(
            "--judge DIR goes with --suite mmhal (MMHal-Bench's answers are rated by a judge model), and only there"
        );
    }
    let b = Bench::load(a.suite, &src)?;
    let m = Model::load(&a.model).with_context(|| format!("loading model {}", a.model.display()))?;
    if m.image_token_id().is_none() {
        anyhow::bail!("{} is a text-only model; the benchmarks need a vision-language model", a.model.display());
    }
    let ad = match &a.adapter {
        Some(d) => Some(m.load_adapter(d).with_context(|| format!("loading adapter {}", d.display()))?),
        None => None,
    };
    let tok = TextTokenizer::from_file(&m.dir.join("tokenizer.json"))?;
    let mut log = match &answers_to {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => None,
    };
    let tty = std::io::stderr().is_terminal();
    let n = b.items.len();
    let note = |k: usize| {
        let i = k + 1;
        if tty {
            eprint!("\r{i}/{n}");
            if i == n {
                eprintln!();
            }
        } else if i.is_multiple_of(100) || i == n {
            eprintln!("{i}/{n}");
        }
    };
    if let Some(dir) = &a.judge {
        let jm = Model::load(dir).with_context(|| format!("loading the judge {}", dir.display()))?;
        let jt = TextTokenizer::from_file(&jm.dir.join("tokenizer.json"))?;
        let report = b.run_judged(&m, ad.as_ref(), &tok, max_new, (&jm, &jt), |k, item, answer, verdict, rating| {
            if let Some(w) = log.as_mut() {
                use std::io::Write;
                writeln!(w, "{}", serde_json::json!({ "image": item.name, "question": item.prompt, "answer": answer, "judge": verdict, "rating": rating }))?;
            }
            note(k);
            Ok(())
        })?;
        if let Some(mut w) = log {
            use std::io::Write;
            w.flush()?;
        }
        println!("{}", if json { report.to_string() } else { serde_json::to_string_pretty(&report)? });
        return Ok(());
    }
    let report = b.run(&m, ad.as_ref(), &tok, max_new, |k, item, answer| {
        if let Some(w) = log.as_mut() {
            use std::io::Write;
            let yn = |y: bool| if y { "yes" } else { "no" };
            let line = match &item.truth {
                rlaifd::bench::Truth::Objects(o) => serde_json::json!({ "image": item.name, "prompt": item.prompt,
                    "answer": answer, "objects": b.mentions(answer), "truth": o }),
                rlaifd::bench::Truth::Label(l) => serde_json::json!({ "image": item.name, "prompt": item.prompt,
                    "answer": answer, "read_as": yn(rlaifd::bench::pope_answer(answer)), "label": yn(*l) }),
                rlaifd::bench::Truth::Generative { truth, hallu } => serde_json::json!({ "image": item.name,
                    "prompt": item.prompt, "answer": answer, "objects": b.mentions(answer), "truth": truth, "hallu": hallu }),
                rlaifd::bench::Truth::Discriminative { kind, yes } => serde_json::json!({ "image": item.name,
                    "prompt": item.prompt, "answer": answer, "type": kind, "truth": yn(*yes) }),
                rlaifd::bench::Truth::Judged { .. } => serde_json::json!({ "image": item.name, "answer": answer }),
            };
            writeln!(w, "{line}")?;
        }
        note(k);
        Ok(())
    })?;
    if let Some(mut w) = log {
        use std::io::Write;
        w.flush()?;
    }
    if json {
        println!("{report}");
    } else {
        let name = match a.suite {
            Suite::Objhal => "Object HalBench (CHAIR)",
            Suite::Pope => "POPE",
            Suite::Amber => "AMBER",
            Suite::Mmhal => "MMHal-Bench",
        };
        println!("{name} on {}", a.data.display());
        if let Some(o) = report.as_object() {
            for (k, v) in o.iter().filter(|(k, _)| *k != "suite") {
                match v.as_f64() {
                    Some(x) if v.is_f64() => println!("  {k:<12} {x:.4}"),
                    _ => println!("  {k:<12} {v}"),
                }
            }
        }
    }
    Ok(())
}
