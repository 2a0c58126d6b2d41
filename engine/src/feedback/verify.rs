//! RLAIF-V's "conquer": the labeler answers each claim's yes/no question, read from its next-token distribution
//! after "<question> Please answer yes or no." (no generation; the suffix is left out for a tokenizer that cannot
//! spell it). A claim is accepted iff
//! p(yes) + p(Yes) > p(no) + p(No), strictly: a tie rejects.

use crate::error::{EngineError, Result};
use crate::image::PixelValues;
use crate::tokenizer::TextTokenizer;
use crate::{Adapter, Model};

/// What is appended to every verification question (the paper's wording).
pub const YES_NO_SUFFIX: &str = " Please answer yes or no.";

/// The vocabulary ids that spell "yes"/"Yes" and "no"/"No", each with and without a leading space (SentencePiece
/// "▁yes", byte-level "Ġyes"), deduplicated, so a lower-casing tokenizer does not count a token twice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct YesNoTokens {
    pub yes: Vec<u32>,
    pub no: Vec<u32>,
}

impl YesNoTokens {
    pub fn from_tokenizer(tok: &TextTokenizer) -> Result<Self> {
        // A token counts when its vocabulary string is the word, bar a leading space marker (so an unknown
        // word that encodes to <unk> never counts).
        let spells = |id: u32, w: &str| {
            tok.token_text(id)
                .is_some_and(|t| t.trim_start_matches([' ', '\u{2581}', '\u{120}']).eq_ignore_ascii_case(w))
        };
        let find = |words: [&str; 2]| -> Vec<u32> {
            let mut ids = Vec::new();
            for w in words {
                for form in [w.to_string(), format!(" {w}"), format!("\u{2581}{w}"), format!("\u{120}{w}")] {
                    if let Some(id) = tok.token_id(&form) {
                        ids.push(id);
                    }
                    // Whatever the tokenizer makes of the form, when that is a single token spelling the word.
                    if let Ok(enc) = tok.encode(&form, false) {
                        if let [id] = enc.as_slice() {
                            if spells(*id, w) {
                                ids.push(*id);
                            }
                        }
                    }
                }
            }
            ids.sort_unstable();
            ids.dedup();
            ids
        };
        let (yes, no) = (find(["yes", "Yes"]), find(["no", "No"]));
        if yes.is_empty() || no.is_empty() {
            return Err(EngineError::Input(format!(
                "{}: no single token spells \"yes\" or \"no\"; a labeler needs both in its vocabulary",
                tok.path.display()
            )));
        }
        if yes.iter().any(|y| no.contains(y)) {
            return Err(EngineError::Input(format!("{}: a token spells both \"yes\" and \"no\"", tok.path.display())));
        }
        Ok(YesNoTokens { yes, no })
    }
}

/// The labeler's reading of one question.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Verdict {
    pub p_yes: f64,
    pub p_no: f64,
    pub accepted: bool,
}

impl Verdict {
    /// From next-token logits (V): softmax mass on the yes and no ids.
    pub fn from_logits(logits: &[f32], yn: &YesNoTokens) -> Verdict {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
        let mass = |ids: &[u32]| {
            ids.iter().filter_map(|&i| logits.get(i as usize)).map(|&l| (l as f64 - max).exp() / z).sum::<f64>()
        };
        let (p_yes, p_no) = (mass(&yn.yes), mass(&yn.no));
        Verdict { p_yes, p_no, accepted: p_yes > p_no }
    }
}

/// A labeler: a model (optionally with an adapter), its tokenizer and chat template.
pub struct Labeler<'a> {
    pub model: &'a Model,
    pub adapter: Option<&'a Adapter>,
    pub tokenizer: &'a TextTokenizer,
    /// Chat template with `{prompt}` (and `<image>` for multimodal prompts).
    pub template: &'a str,
    pub yes_no: YesNoTokens,
    /// `YES_NO_SUFFIX`, or "" when the labeler's tokenizer cannot spell it (a word would become an unknown
    /// token, e.g. ShapesWorld's closed vocabulary), since unknown tokens would only confuse the labeler.
    pub suffix: &'static str,
}

impl<'a> Labeler<'a> {
    pub fn new(
        model: &'a Model,
        adapter: Option<&'a Adapter>,
        tokenizer: &'a TextTokenizer,
        template: &'a str,
    ) -> Result<Self> {
        let unknown =
            |id: &u32| tokenizer.token_text(*id).is_none_or(|t| matches!(t.as_str(), "<unk>" | "[UNK]" | "<|unk|>"));
        let spells_suffix =
            tokenizer.encode(YES_NO_SUFFIX, false).is_ok_and(|ids| !ids.is_empty() && !ids.iter().any(unknown));
        let suffix = if spells_suffix { YES_NO_SUFFIX } else { "" };
        Ok(Labeler { model, adapter, tokenizer, template, yes_no: YesNoTokens::from_tokenizer(tokenizer)?, suffix })
    }

    /// Verdicts on `questions` about one image: the image is encoded once, the common prompt prefix runs once,
    /// and all questions go through the decoder in one batch (one forward pass each, no generation).
    pub fn verify(&self, pixels: Option<&PixelValues>, questions: &[String]) -> Result<Vec<Verdict>> {
        if questions.is_empty() {
            return Ok(Vec::new());
        }
        let feats = match pixels {
            Some(p) => Some(self.model.image_features(p, self.adapter)?),
            None => None,
        };
        let prompts: Vec<Vec<u32>> = questions
            .iter()
            .map(|q| self.tokenizer.encode_chat(self.template, &format!("{q}{}", self.suffix)))
            .collect::<Result<_>>()?;
        // Shared prefix: the longest common one, leaving every prompt at least one token of its own and
        // holding the image token (which cannot sit in a continuation).
        let shortest = prompts.iter().map(Vec::len).min().unwrap_or(0);
        if shortest == 0 {
            return Err(EngineError::Input("a verification prompt encodes to no tokens".into()));
        }
        let mut common = (0..shortest - 1).take_while(|&i| prompts.iter().all(|p| p[i] == prompts[0][i])).count();
        let image = self.model.image_token_id();
        let image_at = |p: &[u32]| image.and_then(|t| p.iter().rposition(|&x| x == t));
        if prompts.iter().any(|p| image_at(p).is_some_and(|at| at >= common)) {
            // Rare (a template with the image after the question): run each prompt whole.
            let mut out = Vec::with_capacity(prompts.len());
            for p in &prompts {
                let (pre, last) = p.split_at(p.len() - 1);
                let l = self.model.branch_logits(pre, &[last], feats.as_ref(), self.adapter)?;
                out.push(Verdict::from_logits(&l[0], &self.yes_no));
            }
            return Ok(out);
        }
        common = common.min(shortest - 1);
        let conts: Vec<&[u32]> = prompts.iter().map(|p| &p[common..]).collect();
        let logits = self.model.branch_logits(&prompts[0][..common], &conts, feats.as_ref(), self.adapter)?;
        Ok(logits.iter().map(|l| Verdict::from_logits(l, &self.yes_no)).collect())
    }
}
