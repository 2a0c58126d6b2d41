//! RLAIF-V's "divide": split an answer into atomic claims and turn each into a yes/no question for the labeler.
//! Three extractors behind one trait: ShapesWorld objects (exact), rule-based English, and an LLM prompted to
//! list claims (any causal LM the engine loads, or the policy itself).

use crate::error::{EngineError, Result};
use crate::feedback::text;
use crate::generate::{generate_batch, FinishReason};
use crate::hallucination::mentions;
use crate::sampling::SamplingParams;
use crate::shapes::with_article;
use crate::tokenizer::{TextTokenizer, TEXT_TEMPLATE};
use crate::{Adapter, Model};

/// One atomic claim of an answer and the yes/no question that checks it ("yes" = the claim holds).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Claim {
    pub text: String,
    pub question: String,
}

pub trait ClaimExtractor: Send + Sync {
    /// A short name recorded with every labeling run ("shapes", "rules", "llm:/path").
    fn name(&self) -> String;
    /// The claims of `answer`, given to `question`. An answer without checkable content has none.
    fn extract(&self, question: &str, answer: &str) -> Result<Vec<Claim>>;
    /// The claims of every answer of one prompt, in order. An error fails them all (the model failed, the work
    /// was interrupted); an answer the extractor cannot read gets no claims instead. This default calls
    /// `extract` per answer; the LLM extractor runs all of them in one batch.
    fn extract_all(&self, question: &str, answers: &[&str]) -> Result<Vec<Vec<Claim>>> {
        answers.iter().map(|a| self.extract(question, a)).collect()
    }
}

/// ShapesWorld: every object an answer mentions is a claim ("There is a red circle."), checked with the exact
/// question form the base model was trained on ("Is there a red circle in the image?").
pub struct ShapesExtractor;

impl ClaimExtractor for ShapesExtractor {
    fn name(&self) -> String {
        "shapes".into()
    }

    fn extract(&self, _question: &str, answer: &str) -> Result<Vec<Claim>> {
        Ok(shapes_claims(answer))
    }
}

/// The object claims of a ShapesWorld answer, in vocabulary order.
pub fn shapes_claims(answer: &str) -> Vec<Claim> {
    mentions(answer)
        .into_iter()
        .map(|obj| {
            let a = with_article(&obj);
            Claim { text: format!("There is {a}."), question: format!("Is there {a} in the image?") }
        })
        .collect()
}

/// Rule-based English: sentence and clause splitting with subjective sentences dropped, then a rule-based
/// yes/no rewrite (see `feedback::text`).
pub struct RuleExtractor;

impl ClaimExtractor for RuleExtractor {
    fn name(&self) -> String {
        "rules".into()
    }

    fn extract(&self, _question: &str, answer: &str) -> Result<Vec<Claim>> {
        Ok(text::split_claims(answer)
            .into_iter()
            .map(|c| Claim { question: text::claim_to_question(&c), text: c })
            .collect())
    }
}

/// An LLM lists the claims ("- claim" lines) and rewrites each as a yes/no question, with greedy decoding and
/// our own prompts (`feedback::text`). All answers of a prompt are listed in one batched generation whose common
/// beginning (the instruction) is computed once, then all their claims' questions in a second one
/// (`generate::generate_batch`). The listing is read strictly (`text::read_claim_listing`): an answer whose
/// listing ran out of tokens keeps its complete lines, and one whose output lists nothing readable gets no claims
/// (so it is never paired), not an error. A question the model garbles falls back to the rule-based form.
pub struct LlmExtractor<'a> {
    pub model: &'a Model,
    pub adapter: Option<&'a Adapter>,
    pub tokenizer: &'a TextTokenizer,
    /// Where the model came from, for the record.
    pub source: String,
    pub max_new_tokens: usize,
    /// The two prompts (`ExtractorPrompts::for_model`).
    pub prompts: ExtractorPrompts,
}

/// The prompts of the LLM extractor: `claims` holds `{answer}`, `question` holds `{claim}`. A model fine-tuned to
/// divide (as RLAIF-V fine-tuned its divide model) is asked with the prompts it learned, kept in its directory as
/// `divide_prompt.txt` and `question_prompt.txt`; any other model gets rlaifd's instructions
/// (`text::CLAIM_EXTRACTION_PROMPT`, `text::QUESTION_PROMPT`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtractorPrompts {
    pub claims: String,
    pub question: String,
}

impl Default for ExtractorPrompts {
    fn default() -> Self {
        ExtractorPrompts { claims: text::CLAIM_EXTRACTION_PROMPT.into(), question: text::QUESTION_PROMPT.into() }
    }
}

/// The longest prompt file read from a model directory.
const MAX_PROMPT_FILE_BYTES: u64 = 16 * 1024;

impl ExtractorPrompts {
    /// The prompts of the model in `dir`: its `divide_prompt.txt` / `question_prompt.txt` where present (each must
    /// hold its placeholder), rlaifd's otherwise.
    pub fn for_model(dir: &std::path::Path) -> Result<Self> {
        let mut p = ExtractorPrompts::default();
        for (file, key, slot) in
            [("divide_prompt.txt", "{answer}", &mut p.claims), ("question_prompt.txt", "{claim}", &mut p.question)]
        {
            let path = dir.join(file);
            let Ok(meta) = std::fs::metadata(&path) else { continue };
            let bad = |why: String| EngineError::Input(format!("{}: {why}", path.display()));
            if meta.len() > MAX_PROMPT_FILE_BYTES {
                return Err(bad(format!("{} bytes; a prompt file holds at most {MAX_PROMPT_FILE_BYTES}", meta.len())));
            }
            let t = std::fs::read_to_string(&path).map_err(|e| bad(format!("cannot read it as text: {e}")))?;
            if !t.contains(key) {
                return Err(bad(format!("the prompt must hold {key}, where the text goes")));
            }
            *slot = t.trim_end_matches('\n').to_string();
        }
        Ok(p)
    }
}

impl LlmExtractor<'_> {
    /// Greedy completions of `prompts`, one batch.
    fn complete_all(&self, prompts: &[String]) -> Result<Vec<(String, FinishReason)>> {
        let ids: Vec<Vec<u32>> =
            prompts.iter().map(|p| self.tokenizer.encode_chat(TEXT_TEMPLATE, p)).collect::<Result<_>>()?;
        let refs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
        let seeds = vec![0u64; prompts.len()];
        let params = SamplingParams { temperature: 0.0, max_new_tokens: self.max_new_tokens, ..Default::default() };
        let out = generate_batch(self.model, &refs, &seeds, &params, self.adapter)?;
        out.into_iter().map(|a| Ok((self.tokenizer.decode(&a.tokens)?, a.finish))).collect()
    }
}

impl ClaimExtractor for LlmExtractor<'_> {
    fn name(&self) -> String {
        format!("llm:{}", self.source)
    }

    fn extract(&self, question: &str, answer: &str) -> Result<Vec<Claim>> {
        let mut all = self.extract_all(question, &[answer])?;
        Ok(all.pop().unwrap_or_default())
    }

    fn extract_all(&self, _question: &str, answers: &[&str]) -> Result<Vec<Vec<Claim>>> {
        let todo: Vec<usize> = (0..answers.len()).filter(|&i| !answers[i].trim().is_empty()).collect();
        let prompts: Vec<String> =
            todo.iter().map(|&i| self.prompts.claims.replace("{answer}", answers[i].trim())).collect();
        let listed = if prompts.is_empty() { Vec::new() } else { self.complete_all(&prompts)? };
        let mut claims: Vec<Vec<String>> = vec![Vec::new(); answers.len()];
        for (&i, (out, finish)) in todo.iter().zip(&listed) {
            claims[i] = text::read_claim_listing(out, *finish == FinishReason::Length);
        }
        // One question per distinct claim, all in one batch.
        let mut distinct: Vec<&str> = Vec::new();
        let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for c in claims.iter().flatten() {
            index.entry(c.as_str()).or_insert_with(|| {
                distinct.push(c);
                distinct.len() - 1
            });
        }
        let prompts: Vec<String> =
            distinct.iter().map(|c| self.prompts.question.replace("{claim}", c.trim())).collect();
        let asked = if prompts.is_empty() { Vec::new() } else { self.complete_all(&prompts)? };
        let question_of = |claim: &str| -> String {
            index
                .get(claim)
                .and_then(|&k| text::parse_question(&asked[k].0))
                .unwrap_or_else(|| text::claim_to_question(claim))
        };
        Ok(claims
            .iter()
            .map(|cs| cs.iter().map(|c| Claim { text: c.clone(), question: question_of(c) }).collect())
            .collect())
    }
}
