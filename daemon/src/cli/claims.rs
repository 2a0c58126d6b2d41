//! `rlaifd claims`: RLAIF-V's divide step on its own. Reads answers (JSONL `{"answer": text}`), writes each with
//! its claims and yes/no questions (`{"answer", "claims": [{"claim", "question"}]}`), and, for lines that carry
//! the exact claims (`"exact": [text, ...]`), measures the extractor against them: object-claim precision,
//! recall and F1 (ShapesWorld's objects, matched one to one) and exact-text claim precision and recall.

use anyhow::{bail, Context, Result};
use engine::feedback::claims::{Claim, ClaimExtractor, ExtractorPrompts, LlmExtractor, RuleExtractor, ShapesExtractor};
use engine::hallucination::mentions;
use engine::tokenizer::TextTokenizer;
use engine::Model;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The largest answers file read (JSONL of model answers; a larger one is a mistake, not a workload).
const MAX_ANSWERS_BYTES: u64 = 256 << 20;
/// The longest answer taken (characters); a longer one is refused with its line number.
const MAX_ANSWER_CHARS: usize = 64 * 1024;

#[derive(clap::Args)]
pub struct ClaimsArgs {
    /// rules (sentence, clause and list rules), shapes (ShapesWorld's exact objects) or llm (--extractor-model
    /// lists the claims and writes the questions).
    #[arg(long)]
    extractor: String,
    /// For --extractor llm: a text or vision-language model directory.
    #[arg(long)]
    extractor_model: Option<PathBuf>,
    /// JSONL answers: {"answer": text} per line, optionally "question" (the prompt) and "exact" (the answer's
    /// exact claims, a list of strings) to measure against.
    #[arg(long)]
    answers: PathBuf,
    /// Where the answers with their claims go (JSONL); standard output when absent.
    #[arg(long)]
    out: Option<PathBuf>,
    /// For --extractor llm: the longest listing or question the model writes, in tokens.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// For --extractor llm: answers divided in one batched generation.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// For --extractor llm: auto (a CUDA GPU when usable), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
}

struct AnswerLine {
    question: String,
    answer: String,
    exact: Option<Vec<String>>,
}

fn read_answers(path: &Path) -> Result<Vec<AnswerLine>> {
    let size = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len();
    if size > MAX_ANSWERS_BYTES {
        bail!(
            "{}: {size} bytes, more than the {} MiB an answers file may hold; split it",
            path.display(),
            MAX_ANSWERS_BYTES >> 20
        );
    }
    let mut out = Vec::new();
    for (_, at, v, _) in crate::cli::train::jsonl_with_images(path)? {
        let answer = match v.get("answer") {
            Some(serde_json::Value::String(s)) => s.clone(),
            _ => bail!("{at}: needs a string field \"answer\""),
        };
        if answer.chars().count() > MAX_ANSWER_CHARS {
            bail!("{at}: the answer is longer than {MAX_ANSWER_CHARS} characters");
        }
        let question = match v.get("question") {
            None | Some(serde_json::Value::Null) => String::new(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(_) => bail!("{at}: \"question\" must be a string"),
        };
        let exact = match v.get("exact") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|i| i.as_str().map(str::to_string))
                    .collect::<Option<Vec<String>>>()
                    .with_context(|| format!("{at}: \"exact\" must be a list of strings"))?,
            ),
            Some(_) => bail!("{at}: \"exact\" must be a list of strings"),
        };
        out.push(AnswerLine { question, answer, exact });
    }
    Ok(out)
}

/// Counts of one answer's claims against its exact ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClaimCounts {
    /// Extracted claims that name at least one ShapesWorld object.
    pub object_claims: usize,
    /// Of those, the ones that name exactly one object of the exact set not matched before.
    pub object_correct: usize,
    /// Distinct objects of the exact claims, and how many of them a right claim found.
    pub exact_objects: usize,
    pub objects_found: usize,
    /// Extracted claims, exact claims, and extracted claims equal to an exact one (case and final period aside).
    pub claims: usize,
    pub exact_claims: usize,
    pub text_matches: usize,
}

impl std::ops::AddAssign for ClaimCounts {
    fn add_assign(&mut self, o: Self) {
        self.object_claims += o.object_claims;
        self.object_correct += o.object_correct;
        self.exact_objects += o.exact_objects;
        self.objects_found += o.objects_found;
        self.claims += o.claims;
        self.exact_claims += o.exact_claims;
        self.text_matches += o.text_matches;
    }
}

/// Words of a spatial relation: a claim naming two objects with one of them is one fact, not a list.
const RELATION_WORDS: &[&str] = &["above", "below", "left of", "right of", "next to", "beside", "near", "between"];

/// Scores one answer's extracted claims against its exact claims. An object claim is right when it names exactly
/// one object (an atomic claim) and that object is among the exact claims' objects, or
/// when it is a spatial relation between objects of the exact claims (which also finds them): a list left whole
/// ("a red circle and a blue square") counts once, wrong, and its objects stay unfound.
pub fn count_claims(claims: &[Claim], exact: &[String]) -> ClaimCounts {
    let norm = |s: &str| s.trim().trim_end_matches('.').trim().to_lowercase();
    let all: std::collections::BTreeSet<String> = exact.iter().flat_map(|e| mentions(e)).collect();
    let mut want = all.clone();
    let exact_objects = want.len();
    let (mut object_claims, mut object_correct) = (0, 0);
    for c in claims {
        let named = mentions(&c.text);
        if named.is_empty() {
            continue;
        }
        object_claims += 1;
        let relation = RELATION_WORDS.iter().any(|w| c.text.to_lowercase().contains(w));
        if named.len() == 1 {
            // About an object the answer names (its existence, or a colour said again): right; found once.
            if named.iter().next().is_some_and(|o| all.contains(o)) {
                object_correct += 1;
                want.retain(|w| !named.contains(w));
            }
        } else if relation && named.is_subset(&all) {
            // One relation between named objects is one fact; it also says both are there.
            object_correct += 1;
            for o in &named {
                want.remove(o);
            }
        }
    }
    let mut exact_left: Vec<String> = exact.iter().map(|e| norm(e)).collect();
    let mut text_matches = 0;
    for c in claims {
        if let Some(k) = exact_left.iter().position(|e| *e == norm(&c.text)) {
            exact_left.swap_remove(k);
            text_matches += 1;
        }
    }
    ClaimCounts {
        object_claims,
        object_correct,
        exact_objects,
        objects_found: exact_objects - want.len(),
        claims: claims.len(),
        exact_claims: exact.len(),
        text_matches,
    }
}

/// Precision, recall and F1 of the totals, as JSON (null where a ratio has no denominator).
pub fn claim_scores(t: &ClaimCounts) -> serde_json::Value {
    let ratio = |a: usize, b: usize| if b == 0 { None } else { Some(a as f64 / b as f64) };
    let f1 = |p: Option<f64>, r: Option<f64>| match (p, r) {
        (Some(p), Some(r)) if p + r > 0.0 => Some(2.0 * p * r / (p + r)),
        (Some(_), Some(_)) => Some(0.0),
        // No claims at all against exact ones: nothing found.
        (None, Some(_)) => Some(0.0),
        _ => None,
    };
    let (op, or) = (ratio(t.object_correct, t.object_claims), ratio(t.objects_found, t.exact_objects));
    let (cp, cr) = (ratio(t.text_matches, t.claims), ratio(t.text_matches, t.exact_claims));
    serde_json::json!({
        "object_precision": op, "object_recall": or, "object_f1": f1(op, or),
        "claim_precision": cp, "claim_recall": cr, "claim_f1": f1(cp, cr),
        "object_claims": t.object_claims, "exact_objects": t.exact_objects,
        "claims": t.claims, "exact_claims": t.exact_claims,
    })
}

pub fn cmd_claims(a: ClaimsArgs) -> Result<()> {
    let lines = read_answers(&a.answers)?;
    let loaded = match (a.extractor.as_str(), &a.extractor_model) {
        ("llm", Some(dir)) => {
            let mut m = Model::load(dir).with_context(|| format!("loading --extractor-model {}", dir.display()))?;
            let spec: engine::backend::DeviceSpec =
                a.device.parse().map_err(|e: String| anyhow::anyhow!("--device: {e}"))?;
            let (backend, chosen) = engine::backend::select(spec, &m)?;
            eprintln!("rlaifd claims: extractor model on {chosen}");
            m.set_backend(backend);
            let t = TextTokenizer::from_file(&dir.join("tokenizer.json"))
                .with_context(|| format!("loading the tokenizer of {}", dir.display()))?;
            Some((m, t, ExtractorPrompts::for_model(dir)?))
        }
        ("llm", None) => bail!("--extractor llm needs --extractor-model DIR (a text or vision-language model)"),
        ("rules" | "shapes", Some(_)) => bail!("--extractor-model is for --extractor llm"),
        ("rules" | "shapes", None) => None,
        (other, _) => bail!("--extractor {other}: expected rules, shapes or llm"),
    };
    let extractor: Box<dyn ClaimExtractor + '_> = match (&loaded, a.extractor.as_str()) {
        (Some((model, tokenizer, prompts)), _) => Box::new(LlmExtractor {
            model,
            adapter: None,
            tokenizer,
            prompts: prompts.clone(),
            source: a.extractor_model.as_ref().map(|d| d.display().to_string()).unwrap_or_default(),
            max_new_tokens: a.max_new_tokens,
        }),
        (None, "shapes") => Box::new(ShapesExtractor),
        (None, _) => Box::new(RuleExtractor),
    };
    let mut out: Box<dyn Write> = match &a.out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let t0 = std::time::Instant::now();
    let mut totals = ClaimCounts::default();
    let mut measured = 0usize;
    let batch = if loaded.is_some() { a.batch.max(1) } else { usize::MAX };
    let mut done = 0usize;
    for chunk in lines.chunks(batch.min(lines.len().max(1))) {
        let texts: Vec<&str> = chunk.iter().map(|l| l.answer.as_str()).collect();
        // The prompt is the same for a chunk only by accident; the extractors read the answer alone.
        let question = chunk.first().map(|l| l.question.as_str()).unwrap_or("");
        let claims = extractor.extract_all(question, &texts)?;
        for (line, cs) in chunk.iter().zip(&claims) {
            let items: Vec<serde_json::Value> =
                cs.iter().map(|c| serde_json::json!({ "claim": c.text, "question": c.question })).collect();
            let mut row = serde_json::json!({ "answer": line.answer, "claims": items });
            if let Some(exact) = &line.exact {
                totals += count_claims(cs, exact);
                measured += 1;
                row["exact"] = serde_json::json!(exact);
            }
            writeln!(out, "{row}").context("cannot write the claims")?;
        }
        done += chunk.len();
        if loaded.is_some() {
            eprintln!("rlaifd claims: {done}/{} answers, {:.1} s", lines.len(), t0.elapsed().as_secs_f64());
        }
    }
    out.flush().context("cannot write the claims")?;
    let mut summary = serde_json::json!({
        "extractor": extractor.name(), "answers": lines.len(), "measured": measured,
        "seconds": t0.elapsed().as_secs_f64(),
    });
    if measured > 0 {
        if let (Some(s), Some(m)) = (summary.as_object_mut(), claim_scores(&totals).as_object()) {
            s.extend(m.clone());
        }
    }
    eprintln!("{summary}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(t: &str) -> Claim {
        Claim { text: t.into(), question: String::new() }
    }

    #[test]
    fn object_claims_must_be_atomic_and_right() {
        let exact = ["There is a red circle.".to_string(), "There is a blue square.".to_string()];
        // A list left whole: one object claim, not atomic, both objects unfound.
        let c = count_claims(&[claim("There is a red circle and a blue square.")], &exact);
        assert_eq!((c.object_claims, c.object_correct, c.exact_objects), (1, 0, 2));
        // Split right, plus a claim about an object the answer did not name and one with no object.
        let c = count_claims(
            &[
                claim("There is a red circle."),
                claim("There is a blue square."),
                claim("There is a green cross."),
                claim("The sky is clear."),
            ],
            &exact,
        );
        assert_eq!((c.object_claims, c.object_correct, c.exact_objects, c.text_matches), (3, 2, 2, 2));
        // A relation between two named objects is one right claim and finds both.
        let c = count_claims(&[claim("The red circle is above the blue square.")], &exact);
        assert_eq!((c.object_claims, c.object_correct), (1, 1));
        assert_eq!(claim_scores(&c)["object_recall"], 1.0);
        // Two claims about one object are both right; the object is found once.
        let c = count_claims(&[claim("There is a red circle."), claim("The red circle is red.")], &exact);
        assert_eq!((c.object_claims, c.object_correct), (2, 2));
        let s = claim_scores(&c);
        assert_eq!(s["object_precision"], 1.0);
        assert_eq!(s["object_recall"], 0.5);
        assert!(claim_scores(&ClaimCounts::default())["object_f1"].is_null());
    }
}
