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
    },
}

pub fn run(cmd: EvalCmd) -> Result<()> {
    let EvalCmd::Hallucination { model, adapter, seed, count, size, max_new_tokens, json } = cmd;
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
    let report = rlaifd::shapes_eval::evaluate(&m, ad.as_ref(), &tok, &ip, seed, count, size, max_new_tokens, |i| {
        if tty {
            eprint!("\r{i}/{count} images");
            if i == count {
                eprintln!();
            }
        } else if i % 50 == 0 || i == count {
            eprintln!("{i}/{count} images");
        }
    })?;
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
