//! RLAIF-V's "divide": split an answer into atomic claims and turn each into a yes/no question for the labeler.
//! Three extractors behind one trait: ShapesWorld objects (exact), rule-based English, and an LLM prompted to
//! list claims (any causal LM the engine loads, or the policy itself).

use crate::error::{EngineError, Result};
use crate::feedback::text;
use crate::generate::{generate, GenerateRequest};
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
/// our own prompts (`feedback::text`). Lines it cannot parse fall back to the rule-based forms.
pub struct LlmExtractor<'a> {
    pub model: &'a Model,
    pub adapter: Option<&'a Adapter>,
    pub tokenizer: &'a TextTokenizer,
    /// Where the model came from, for the record.
    pub source: String,
    pub max_new_tokens: usize,
}

impl LlmExtractor<'_> {
    fn complete(&self, prompt: &str) -> Result<String> {
        let ids = self.tokenizer.encode_chat(TEXT_TEMPLATE, prompt)?;
        let params = SamplingParams { temperature: 0.0, max_new_tokens: self.max_new_tokens, ..Default::default() };
        let req = GenerateRequest { ids: &ids, pixels: None, seeds: &[0], params, stop_ids: vec![] };
        let out = generate(self.model, &req, self.adapter)?;
        let first = out.first().ok_or_else(|| EngineError::Input("the extractor model produced no answer".into()))?;
        self.tokenizer.decode(&first.tokens)
    }
}

impl ClaimExtractor for LlmExtractor<'_> {
    fn name(&self) -> String {
        format!("llm:{}", self.source)
    }

    fn extract(&self, _question: &str, answer: &str) -> Result<Vec<Claim>> {
        if answer.trim().is_empty() {
            return Ok(Vec::new());
        }
        let listed = self.complete(&text::claim_extraction_prompt(answer))?;
        let mut out = Vec::new();
        for claim in text::parse_claim_lines(&listed) {
            let q = self.complete(&text::question_prompt(&claim))?;
            let question = text::parse_question(&q).unwrap_or_else(|| text::claim_to_question(&claim));
            out.push(Claim { text: claim, question });
        }
        Ok(out)
    }
}
