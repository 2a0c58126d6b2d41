//! Training subcommands: `rlaifd grad` (DPO loss and LoRA gradients, the parity contract).

use anyhow::{bail, Context, Result};
use engine::image::PixelValues;
use engine::train::dpo::{dpo_loss_and_grads, TokenPair};
use engine::train::LoraGrads;
use engine::weights::write_f32_safetensors;
use engine::{LoadOptions, Model};
use std::io::BufRead;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct GradArgs {
    #[arg(long)]
    model: PathBuf,
    /// The policy: a PEFT LoRA adapter; the reference is the base model without it.
    #[arg(long)]
    adapter: PathBuf,
    /// JSONL, one {"image": path relative to this file, "prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...]} per line.
    #[arg(long)]
    pairs: PathBuf,
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// Output safetensors file: f32 gradients for every tensor of the adapter file, under its key names.
    #[arg(long)]
    out: PathBuf,
}

/// A pair as read from a token-form pairs file.
pub struct TokenPairOwned {
    pub image: Option<PathBuf>,
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
}

fn ids_field(v: &serde_json::Value, key: &str, path: &Path, line: usize) -> Result<Vec<u32>> {
    let arr = v.get(key).and_then(|a| a.as_array());
    let Some(arr) = arr else { bail!("{} line {line}: needs \"{key}\": a list of token ids", path.display()) };
    arr.iter()
        .map(|x| {
            x.as_u64().filter(|&t| t <= u32::MAX as u64).map(|t| t as u32).with_context(|| {
                format!("{} line {line}: \"{key}\" holds {x}, which is not a token id", path.display())
            })
        })
        .collect()
}

pub fn read_token_pairs(path: &Path) -> Result<Vec<TokenPairOwned>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open pairs file {}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("{}: cannot read line {}", path.display(), n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("{} line {}: not valid JSON", path.display(), n + 1))?;
        let image = match v.get("image") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(dir.join(s)),
            Some(_) => bail!("{} line {}: \"image\" must be a path string", path.display(), n + 1),
        };
        out.push(TokenPairOwned {
            image,
            prompt_ids: ids_field(&v, "prompt_ids", path, n + 1)?,
            chosen_ids: ids_field(&v, "chosen_ids", path, n + 1)?,
            rejected_ids: ids_field(&v, "rejected_ids", path, n + 1)?,
        });
    }
    if out.is_empty() {
        bail!("{} holds no pairs", path.display());
    }
    Ok(out)
}

pub fn cmd_grad(a: GradArgs) -> Result<()> {
    let model = Model::load_with(&a.model, &LoadOptions::default()).with_context(|| format!("loading model {}", a.model.display()))?;
    let adapter = model.load_adapter(&a.adapter).with_context(|| format!("loading adapter {}", a.adapter.display()))?;
    let pairs = read_token_pairs(&a.pairs)?;
    let images: Vec<Option<PixelValues>> = pairs
        .iter()
        .enumerate()
        .map(|(i, p)| match &p.image {
            Some(path) => model.load_image(path).map(Some).with_context(|| format!("{} line {}", a.pairs.display(), i + 1)),
            None => Ok(None),
        })
        .collect::<Result<_>>()?;
    let token_pairs: Vec<TokenPair> = pairs
        .iter()
        .zip(&images)
        .map(|(p, img)| TokenPair { pixels: img.as_ref(), prompt_ids: &p.prompt_ids, chosen_ids: &p.chosen_ids, rejected_ids: &p.rejected_ids })
        .collect();
    let mut grads = LoraGrads::zeros_like(&adapter);
    let (loss, per_pair) = dpo_loss_and_grads(&model, &adapter, &token_pairs, a.beta, &mut grads)?;
    write_f32_safetensors(&a.out, &grads.named_tensors(&adapter))?;
    println!("{}", serde_json::json!({ "loss": loss, "pairs": per_pair.len(), "per_pair": per_pair, "out": a.out }));
    Ok(())
}
