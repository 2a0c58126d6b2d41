//! `rlaifd label`: RLAIF-V feedback offline. Samples n answers per prompt from the policy, splits them into
//! claims, has the labeler verify every claim, scores and pairs the answers, balances lengths and writes pairs
//! in the RLAIF-V dataset schema (plus everything behind each pair), ready for `rlaifd train-dpo` or TRL.

use anyhow::{bail, Context, Result};
use engine::feedback::claims::{ClaimExtractor, ExtractorPrompts, LlmExtractor, RuleExtractor, ShapesExtractor};
use engine::feedback::pairs::length_balance;
use engine::feedback::pipeline::{label_prompt, FeedbackConfig, LabeledAnswer, Policy};
use engine::feedback::verify::Labeler;
use engine::tokenizer::{TextTokenizer, LLAVA_15_TEMPLATE, TEXT_TEMPLATE};
use engine::Model;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct LabelArgs {
    /// The policy (a Hugging Face LLaVA or LLaMA directory).
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter on the policy.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// "self" (the policy, adapter included, labels its own answers) or a model directory.
    #[arg(long, default_value = "self")]
    labeler: String,
    /// JSONL prompts {"image": path relative to the file, "question": text}; "image" may be absent for text.
    #[arg(long)]
    prompts: PathBuf,
    /// Output JSONL pairs; OUT.meta.json gets the settings and the summary.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 10)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Pairs kept per prompt (at most).
    #[arg(long, default_value_t = 2)]
    pairs_per_prompt: usize,
    /// Claim extractor: auto (shapes for ShapesWorld models, else rules), shapes, rules, or llm (prompting
    /// --extractor-model).
    #[arg(long, default_value = "auto")]
    extractor: String,
    /// For --extractor llm: "self" (the policy) or a LLaMA/LLaVA directory.
    #[arg(long, default_value = "self")]
    extractor_model: String,
    /// Keep every drawn pair (skip the paper's length balancing).
    #[arg(long)]
    no_length_balance: bool,
    /// Where sampling and labeling run: auto (a CUDA GPU when usable), cpu, cuda or cuda:N. The same seed gives
    /// the same bytes on one device; a GPU samples other (equally likely) answers than the CPU.
    #[arg(long, default_value = "auto")]
    device: String,
}

struct PromptLine {
    image: Option<PathBuf>,
    question: String,
}

fn read_prompts(path: &Path) -> Result<Vec<PromptLine>> {
    let mut out = Vec::new();
    for (_, where_, v, image) in crate::cli::train::jsonl_with_images(path)? {
        let question = match v.get("question").or_else(|| v.get("prompt")) {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.clone(),
            _ => bail!("{where_}: needs a non-empty string field \"question\""),
        };
        out.push(PromptLine { image, question });
    }
    if out.is_empty() {
        bail!("{} holds no prompts", path.display());
    }
    Ok(out)
}

/// `image` as written in the output: relative to the output file's directory when it lies below it, else
/// absolute (train-dpo resolves paths against the pairs file).
fn image_field(image: &Path, out: &Path) -> String {
    let abs = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
    let out_dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    match std::fs::canonicalize(out_dir) {
        Ok(d) => abs.strip_prefix(&d).map(|p| p.to_path_buf()).unwrap_or(abs),
        Err(_) => abs,
    }
    .to_string_lossy()
    .into_owned()
}

fn claims_json(a: &LabeledAnswer) -> serde_json::Value {
    serde_json::Value::Array(
        a.claims
            .iter()
            .zip(&a.verdicts)
            .map(|(c, v)| serde_json::json!({ "claim": c.text, "question": c.question, "p_yes": v.p_yes, "p_no": v.p_no, "accepted": v.accepted }))
            .collect(),
    )
}

pub fn cmd_label(a: LabelArgs) -> Result<()> {
    if a.n < 2 {
        bail!("--n must be at least 2 to form pairs (got {})", a.n);
    }
    let device = crate::cli::train::parse_device(&a.device)?;
    let on = |mut m: Model| -> Result<Model> {
        let (b, _) = engine::backend::select(device, &m)?;
        m.set_backend(b);
        Ok(m)
    };
    let model = on(Model::load(&a.model).with_context(|| format!("loading model {}", a.model.display()))?)?;
    if model.backend().spec() != engine::backend::DeviceSpec::Cpu {
        eprintln!("rlaifd label: on {}", model.device());
    }
    let adapter = match &a.adapter {
        Some(d) => Some(model.load_adapter(d).with_context(|| format!("loading adapter {}", d.display()))?),
        None => None,
    };
    let tok = TextTokenizer::from_file(&model.dir.join("tokenizer.json"))?;
    let prompts = read_prompts(&a.prompts)?;
    let has_images = prompts.iter().any(|p| p.image.is_some());
    if has_images && model.image_processor.is_none() {
        bail!("{} is a text-only model but {} has images", a.model.display(), a.prompts.display());
    }
    let template = |m: &Model| if m.image_processor.is_some() { LLAVA_15_TEMPLATE } else { TEXT_TEMPLATE };
    let policy = Policy { model: &model, adapter: adapter.as_ref(), tokenizer: &tok, template: template(&model) };

    let other_labeler = match a.labeler.as_str() {
        "self" => None,
        dir => {
            let m = on(Model::load(Path::new(dir))
                .with_context(|| format!("loading labeler {dir} (--labeler takes \"self\" or a model directory)"))?)?;
            if has_images && m.image_processor.is_none() {
                bail!("labeler {dir} is text-only but the prompts have images: it must see them to verify claims");
            }
            let t = TextTokenizer::from_file(&m.dir.join("tokenizer.json"))?;
            Some((m, t))
        }
    };
    let labeler = match &other_labeler {
        None => Labeler::new(&model, adapter.as_ref(), &tok, policy.template)?,
        Some((m, t)) => Labeler::new(m, None, t, template(m))?,
    };

    let extractor_model = if a.extractor == "llm" && a.extractor_model != "self" {
        let dir = &a.extractor_model;
        let m = Model::load(Path::new(dir)).with_context(|| format!("loading extractor model {dir}"))?;
        let t = TextTokenizer::from_file(&m.dir.join("tokenizer.json"))?;
        let p = ExtractorPrompts::for_model(Path::new(dir))?;
        Some((m, t, p))
    } else {
        None
    };
    let extractor: Box<dyn ClaimExtractor + '_> = match a.extractor.as_str() {
        "auto" if rlaifd::rlaif::is_shapes_tokenizer(&tok) => Box::new(ShapesExtractor),
        "auto" | "rules" => Box::new(RuleExtractor),
        "shapes" => Box::new(ShapesExtractor),
        "llm" => match &extractor_model {
            None => Box::new(LlmExtractor {
                model: &model,
                adapter: adapter.as_ref(),
                tokenizer: &tok,
                source: "self".into(),
                max_new_tokens: 256,
                prompts: ExtractorPrompts::default(),
            }),
            Some((m, t, p)) => Box::new(LlmExtractor {
                model: m,
                adapter: None,
                tokenizer: t,
                source: a.extractor_model.clone(),
                max_new_tokens: 256,
                prompts: p.clone(),
            }),
        },
        other => bail!("--extractor {other}: expected auto, shapes, rules or llm"),
    };

    let cfg = FeedbackConfig {
        n: a.n,
        temperature: a.temperature,
        top_p: a.top_p,
        max_new_tokens: a.max_new_tokens,
        pairs_per_prompt: a.pairs_per_prompt,
        seed: a.seed,
    };
    let params = engine::sampling::SamplingParams {
        temperature: cfg.temperature,
        top_p: cfg.top_p,
        max_new_tokens: cfg.max_new_tokens,
        ..Default::default()
    };
    params.validate().map_err(|e| anyhow::anyhow!("sampling settings: {e}"))?;

    let tty = std::io::stderr().is_terminal();
    let t0 = std::time::Instant::now();
    let (mut answers, mut claims, mut rejected, mut candidates, mut unscored) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    // Reference log-probs (the policy at labeling time), once per pair with the image encoded once per prompt;
    // named as TRL's precomputed columns.
    let eos = *model.llm.cfg.eos_token_ids.first().unwrap_or(&2);
    // (prompt index, chosen, rejected, reference log-probs of both).
    let mut drawn: Vec<(usize, LabeledAnswer, LabeledAnswer, (f64, f64))> = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let pixels = match &p.image {
            Some(path) => {
                Some(model.load_image(path).with_context(|| format!("{} prompt {}", a.prompts.display(), i + 1))?)
            }
            None => None,
        };
        let fb = label_prompt(&policy, &labeler, extractor.as_ref(), pixels.as_ref(), &p.question, i as u64, &cfg)?;
        answers += fb.answers.len();
        claims += fb.answers.iter().map(|x| x.claims.len()).sum::<usize>();
        rejected += fb.answers.iter().flat_map(|x| &x.verdicts).filter(|v| !v.accepted).count();
        unscored += fb.answers.iter().filter(|x| x.score.is_none()).count();
        candidates += fb.candidates;
        if !fb.pairs.is_empty() {
            let prompt_ids = tok.encode_chat(policy.template, &p.question)?;
            let feats = match &pixels {
                Some(px) => Some(model.image_features(px, adapter.as_ref())?),
                None => None,
            };
            let logp = |ans: &LabeledAnswer| -> Result<f64> {
                let mut ids = ans.tokens.clone();
                if ans.finish == engine::generate::FinishReason::Stop {
                    ids.push(eos);
                }
                Ok(model.answer_logp(&prompt_ids, &ids, feats.as_ref(), adapter.as_ref())?)
            };
            for &(c, r) in &fb.pairs {
                let refs = (logp(&fb.answers[c])?, logp(&fb.answers[r])?);
                drawn.push((i, fb.answers[c].clone(), fb.answers[r].clone(), refs));
            }
        }
        let done = i + 1;
        if tty {
            let eta = t0.elapsed().as_secs_f64() / done as f64 * (prompts.len() - done) as f64;
            eprint!("\r{done}/{} prompts, {} pairs drawn, ETA {eta:.0} s   ", prompts.len(), drawn.len());
        } else if done % 10 == 0 || done == prompts.len() {
            eprintln!("{done}/{} prompts, {} pairs drawn", prompts.len(), drawn.len());
        }
    }
    if tty {
        eprintln!();
    }
    let words = |s: &str| s.split_whitespace().count();
    let lens: Vec<(usize, usize)> = drawn.iter().map(|(_, c, r, _)| (words(&c.text), words(&r.text))).collect();
    let balance = length_balance(&lens);
    let keep = if a.no_length_balance { vec![true; drawn.len()] } else { balance.keep.clone() };

    let mut lines = Vec::new();
    let mut kept = 0usize;
    for ((i, c, r, refs), k) in drawn.iter().zip(&keep) {
        if !k {
            continue;
        }
        let p = &prompts[*i];
        let mut line = serde_json::json!({
            "question": p.question,
            "chosen": c.text,
            "rejected": r.text,
            "chosen_score": c.score,
            "rejected_score": r.score,
            "chosen_seed": c.seed,
            "rejected_seed": r.seed,
            "chosen_claims": claims_json(c),
            "rejected_claims": claims_json(r),
            "ref_chosen_logps": refs.0,
            "ref_rejected_logps": refs.1,
            "prompt_index": i,
        });
        if let Some(img) = &p.image {
            line["image_path"] = serde_json::Value::String(image_field(img, &a.out));
        }
        writeln!(lines, "{line}")?;
        kept += 1;
    }
    let summary = serde_json::json!({
        "prompts": prompts.len(),
        "answers": answers,
        "answers_without_claims": unscored,
        "claims_per_answer": claims as f64 / answers.max(1) as f64,
        "claim_rejection_rate": rejected as f64 / claims.max(1) as f64,
        "candidate_pairs": candidates,
        "pairs_drawn": drawn.len(),
        "pairs_kept": kept,
        "length_balance": if a.no_length_balance { serde_json::Value::Null } else { serde_json::json!({
            "r": balance.r,
            "mean_words_chosen_before": balance.mean_chosen_before,
            "mean_words_rejected_before": balance.mean_rejected_before,
            "mean_words_chosen_after": balance.mean_chosen_after,
            "mean_words_rejected_after": balance.mean_rejected_after,
        })},
        "seconds": t0.elapsed().as_secs_f64(),
    });
    let meta = serde_json::json!({
        "model": a.model, "adapter": a.adapter, "device": model.device(), "labeler": a.labeler, "extractor": extractor.name(),
        "prompts_file": a.prompts, "config": cfg, "summary": summary,
    });
    write_atomic(&a.out, &lines)?;
    let mut meta_path = a.out.clone().into_os_string();
    meta_path.push(".meta.json");
    write_atomic(Path::new(&meta_path), &serde_json::to_vec_pretty(&meta)?)?;
    eprintln!(
        "{} prompts, {answers} answers, {:.2} claims/answer, {:.1} % of claims rejected, {candidates} candidate pairs, {} drawn, {kept} kept{}",
        prompts.len(),
        claims as f64 / answers.max(1) as f64,
        100.0 * rejected as f64 / claims.max(1) as f64,
        drawn.len(),
        if a.no_length_balance { String::new() } else { format!(" after length balancing (r = {:.2})", balance.r) },
    );
    println!("{summary}");
    Ok(())
}

/// Writes a file through a temporary sibling and a rename, so a crash never leaves half a file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}
