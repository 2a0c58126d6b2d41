//! Text utilities for RLAIF-V's "divide" step: turn a free-form model answer into atomic, self-contained
//! factual claims, and each claim into a yes/no question that a labeler model can answer by looking at the
//! image.
//!
//! RLAIF-V scores a response by asking the labeler about each claim separately, because a labeler judges a
//! short yes/no question far more reliably than a whole paragraph. Two paths produce claims:
//!
//! - a text LLM, prompted with [`CLAIM_EXTRACTION_PROMPT`] and [`QUESTION_PROMPT`]; its free-form output is
//!   read back with [`parse_claim_lines`] and [`parse_question`], which tolerate the usual chatter, headers
//!   and list styles;
//! - rule-based fallbacks, [`split_claims`] and [`claim_to_question`], used when no LLM is configured. They
//!   are heuristics for plain English descriptions, tuned to fail safe: when a rule is unsure it keeps a
//!   sentence whole rather than producing a fragment that is not a claim.
//!
//! Everything here is pure, deterministic and total: any `&str` (empty, emoji, megabytes) gives an answer
//! without panicking, in time linear in the input. Text is only ever sliced at offsets that came from
//! `char_indices` or from matching ASCII bytes, so multi-byte characters are never cut.
//!
//! This file holds the prompts and the public API; `split` the sentence and clause splitting and the
//! subjectivity filters, `words` the word lists and string helpers they share.

mod split;
mod words;

use split::{is_evaluative_clause, is_subjective_sentence, split_clauses, split_sentences};
use words::*;

use std::collections::HashSet;

/// Prompt asking a text LLM to list the factual claims of an answer. `{answer}` is replaced by the answer.
///
/// The output format (one claim per line, each starting with "- ") is what [`parse_claim_lines`] expects,
/// though that parser also accepts the other list styles models drift into.
pub const CLAIM_EXTRACTION_PROMPT: &str = "\
You will be given a description of an image written by an assistant. Break it into atomic factual claims.

Rules:
- Each claim states exactly one fact about what is visible: one object, attribute, count, position, action \
or relation.
- Each claim must make sense on its own: replace pronouns such as \"it\" or \"they\" with the thing they refer to.
- Keep the wording of the description where you can; do not add facts that it does not state.
- Leave out opinions, feelings, guesses, and remarks about mood or atmosphere.
- Write one claim per line, each line starting with \"- \". Write nothing else.
- If the description states no facts, write \"None\".

Description:
{answer}

Claims:
";

/// Prompt asking a text LLM to turn one claim into a yes/no question. `{claim}` is replaced by the claim.
///
/// The question must be answered "yes" exactly when the claim is true, so that a labeler's "yes"
/// probability can be read directly as the probability that the claim is correct.
pub const QUESTION_PROMPT: &str = "\
Rewrite the statement below as one yes/no question about the image. The correct answer to the question must \
be \"yes\" if the statement is true and \"no\" if it is false. Keep every detail of the statement (objects, \
colors, numbers, positions) and add nothing. Reply with the question only, on a single line ending with \"?\".

Statement: {claim}

Question:
";

/// [`CLAIM_EXTRACTION_PROMPT`] with the answer filled in.
pub fn claim_extraction_prompt(answer: &str) -> String {
    CLAIM_EXTRACTION_PROMPT.replace("{answer}", answer.trim())
}

/// [`QUESTION_PROMPT`] with the claim filled in.
pub fn question_prompt(claim: &str) -> String {
    QUESTION_PROMPT.replace("{claim}", claim.trim())
}

// ---------------------------------------------------------------------------------------------------------
// Public API.

/// Rule-based claim splitting of a model answer, for use when no extraction LLM is configured.
///
/// Sentences are split at `.`/`!`/`?` and line breaks (list markers removed) without breaking abbreviations
/// or decimals; compound sentences are split into clauses where both sides have their own subject and verb,
/// with a leading pronoun on the right replaced by the left clause's simple subject; questions, hedged or
/// opinionated sentences and evaluative or atmosphere clauses are dropped, as are lead-in fragments ending
/// with ':' ("The image shows:"). Each claim is trimmed, capitalised and ends with a period.
///
/// ```
/// use engine::feedback::text::split_claims;
/// assert_eq!(
///     split_claims("The dog is brown, and it is sleeping. It looks so peaceful!"),
///     vec!["The dog is brown.", "The dog is sleeping."]
/// );
/// ```
pub fn split_claims(answer: &str) -> Vec<String> {
    let mut claims = Vec::new();
    // The last clause kept, for a pronoun that opens the next sentence.
    let mut previous: Option<String> = None;
    for sentence in split_sentences(answer) {
        if sentence.trim_end().ends_with(':') || is_subjective_sentence(&sentence) {
            continue;
        }
        let body = sentence.trim_end_matches(|c: char| is_terminator(c) || c.is_whitespace());
        for (k, clause) in split_clauses(body).into_iter().enumerate() {
            if is_evaluative_clause(&clause) {
                continue;
            }
            let clause = match (&previous, k) {
                (Some(p), 0) => split::resolve_leading_pronoun(&clause, p),
                _ => clause,
            };
            // "It is red." with nothing it can stand for cannot be checked on its own.
            if split::opens_with_pronoun(&clause) {
                continue;
            }
            for item in split::split_list(&clause) {
                if let Some(claim) = finish_claim(&item) {
                    claims.push(claim);
                    previous = Some(item);
                }
            }
        }
    }
    claims
}

/// Whether an LLM output line is a header or lead-in rather than an item: "Claims:", "### Facts",
/// "**Here are the claims:**".
fn is_header_line(line: &str) -> bool {
    let t = line.trim();
    t.starts_with('#') || t.trim_end_matches(|c: char| matches!(c, '*' | '_') || c.is_whitespace()).ends_with(':')
}

/// Whether an item says that there is nothing to list ("None", "N/A", "No claims.").
fn is_no_claim_line(item: &str) -> bool {
    let folded = fold(item);
    let core = folded.trim_matches(|c: char| !c.is_alphanumeric() && c != '/');
    NO_CLAIM_LINES.contains(&core)
}

/// Reads the claims out of an extraction LLM's output (see [`CLAIM_EXTRACTION_PROMPT`]).
///
/// Models rarely follow the format exactly, so any common list marker is accepted ("- ", "* ", "• ",
/// "1. ", "1) ", "(1) "). When at least one line has a marker, unmarked lines are taken to be chatter ("Sure!
/// Here you go") and ignored; when none has, the whole output is split into sentences instead (of two words
/// or more, which skips "Sure."). Headers, "None"-style lines and questions are skipped, surrounding quotes
/// removed, and duplicates dropped case-insensitively, keeping the first. Each claim ends with a period.
pub fn parse_claim_lines(output: &str) -> Vec<String> {
    let lines: Vec<(bool, &str)> = output
        .lines()
        .map(|line| line.trim())
        .filter(|line| !line.is_empty() && !is_header_line(line))
        .map(strip_all_list_markers)
        .collect();
    let any_marker = lines.iter().any(|&(marked, _)| marked);

    let items: Vec<String> = if any_marker {
        lines.iter().filter(|&&(marked, _)| marked).map(|&(_, item)| item.to_string()).collect()
    } else {
        let kept: Vec<&str> = lines.iter().map(|&(_, line)| line).filter(|l| !is_no_claim_line(l)).collect();
        split_sentences(&kept.join("\n")).into_iter().filter(|s| s.split_whitespace().count() >= 2).collect()
    };

    let mut seen = HashSet::new();
    let mut claims = Vec::new();
    for item in &items {
        let item = strip_surrounding_quotes(item.trim_matches(|c: char| matches!(c, '*' | '_') || c.is_whitespace()));
        if item.is_empty() || is_header_line(item) || is_no_claim_line(item) {
            continue;
        }
        if item.trim_end_matches(|c: char| is_closing(c) || c.is_whitespace()).ends_with('?') {
            continue;
        }
        let Some(claim) = finish_claim(item) else { continue };
        if seen.insert(fold(&claim)) {
            claims.push(claim);
        }
    }
    claims
}

/// The claims of an extraction LLM's listing, read as the loop uses them: [`parse_claim_lines`], with the
/// cut-off last line dropped when the listing ran out of tokens (`truncated`), and only self-contained factual
/// claims kept: output without a single list line is taken as not following the prompt (no claims); a claim
/// opening with "it", "they", "he" or "she" takes the simple subject of the claim before it
/// when there is one and is dropped otherwise, and opinions, hedges and atmosphere remarks are dropped. A
/// listing with nothing readable gives no claims.
pub fn read_claim_listing(output: &str, truncated: bool) -> Vec<String> {
    let complete = if truncated {
        match output.rfind('\n') {
            Some(end) => &output[..end],
            None => return Vec::new(),
        }
    } else {
        output
    };
    // The prompt asks for "- " lines; output with no list line at all did not follow it.
    if !complete.lines().any(|line| strip_all_list_markers(line).0) {
        return Vec::new();
    }
    let mut kept: Vec<String> = Vec::new();
    for claim in parse_claim_lines(complete) {
        if is_subjective_sentence(&claim) || is_evaluative_clause(&claim) {
            continue;
        }
        let claim = match kept.last() {
            Some(previous) => {
                let resolved =
                    split::resolve_leading_pronoun(claim.trim_end_matches('.'), previous.trim_end_matches('.'));
                finish_claim(&resolved).unwrap_or(resolved)
            }
            None => claim,
        };
        if split::opens_with_pronoun(&claim) {
            continue;
        }
        if !kept.iter().any(|k| fold(k) == fold(&claim)) {
            kept.push(claim);
        }
    }
    kept
}

/// Reads the question out of a question LLM's output (see [`QUESTION_PROMPT`]): the first line that ends
/// with '?' once list markers, "Question:"-style labels, markdown emphasis and quotes are removed. `None`
/// when no line is a question, so the caller can fall back to [`claim_to_question`].
pub fn parse_question(output: &str) -> Option<String> {
    let emphasis = |c: char| matches!(c, '*' | '_') || c.is_whitespace();
    for line in output.lines() {
        let (_, line) = strip_all_list_markers(line);
        let mut t = line.trim_matches(emphasis);
        // "Question: ...", "**Q:** ...", "Sure! Here is the question: ...".
        if let Some(colon) = t.find(':') {
            let label = fold(t[..colon].trim_matches(|c: char| emphasis(c) || c == '#'));
            if label.len() <= 80 && (label.contains("question") || label == "q") {
                t = t[colon + 1..].trim_matches(emphasis);
            }
        }
        let t = strip_surrounding_quotes(t);
        if t.ends_with('?') && t.chars().any(char::is_alphanumeric) {
            return Some(capitalize_first(t));
        }
    }
    None
}

/// Rule-based yes/no question for a simple English claim, for use when no question LLM is configured. The
/// question is built so that "yes" means the claim is true:
///
/// - "There is/are X" -> "Is/Are there X?";
/// - "X is/are/was/were/can/... Y" -> "Is/Are/Was/Were/Can/... X Y?";
/// - "X has Y" -> "Does X have Y?", "X have Y" -> "Do X have Y?" ("has been" stays "Has X been ...?");
/// - anything else (lexical verbs, leading prepositional phrases, relative clauses in the subject) ->
///   "Is it true that <claim>?", which is clumsy but never changes the meaning.
///
/// The subject's first word is lowercased unless it is "I", an acronym or a mixed-case name; ordinary
/// capitalised names ("John") cannot be recognised without a dictionary and are lowercased too. A claim with
/// no letters or digits gives an empty string.
pub fn claim_to_question(claim: &str) -> String {
    // A claim handed over straight from an LLM line may still carry its marker, emphasis or quotes. Trailing
    // punctuation goes first, as in `finish_claim`, so that "1." stays a (strange) claim, not a bare marker.
    let trailing = |c: char| is_terminator(c) || matches!(c, ';' | ',' | ':') || c.is_whitespace();
    let (_, unmarked) = strip_all_list_markers(claim.trim().trim_end_matches(trailing));
    let body = strip_surrounding_quotes(unmarked.trim_matches(|c: char| matches!(c, '*' | '_') || c.is_whitespace()))
        .trim_end_matches(trailing);
    if !body.chars().any(char::is_alphanumeric) {
        return String::new();
    }
    let spans = token_spans_limited(body, 12);
    let word = |k: usize| bare_word(&body[spans[k].0..spans[k].1]);
    let after = |k: usize| body[spans[k].1..].trim();

    // "There is/are X" and "There's X".
    if !spans.is_empty() {
        let first = word(0);
        if first == "there's" && spans.len() >= 2 {
            return format!("Is there {}?", after(0));
        }
        if first == "there" && spans.len() >= 3 {
            let verb = word(1);
            if matches!(verb.as_str(), "is" | "are" | "was" | "were") {
                return format!("{} there {}?", capitalize_first(&verb), after(1));
            }
        }
    }

    if let Some(question) = front_verb(body, &spans) {
        return question;
    }
    if let Some(question) = do_support(body, &spans) {
        return question;
    }
    format!("Is it true that {}?", lowercase_first_word(body))
}

/// The subject before the verb at `verb_index`, when it is a plain noun phrase (no punctuation, no relative
/// clause, not opening with a preposition or "there") and something follows the verb.
fn plain_subject<'a>(body: &'a str, spans: &[(usize, usize)], verb_index: usize) -> Option<&'a str> {
    let word = |k: usize| bare_word(&body[spans[k].0..spans[k].1]);
    let subject = &body[..spans[verb_index - 1].1];
    let first = word(0);
    let plain = !subject.contains([',', ';', ':', '(', ')'])
        && !NON_SUBJECT_STARTERS.contains(&first.as_str())
        && !matches!(first.as_str(), "there" | "here")
        && !(0..verb_index).any(|k| matches!(word(k).as_str(), "who" | "which" | "that" | "whose"));
    (plain && !body[spans[verb_index].1..].trim().is_empty()).then_some(subject)
}

/// The base form of a third-person verb: "holds" -> "hold", "watches" -> "watch", "carries" -> "carry",
/// "lies" -> "lie".
fn base_form(verb: &str) -> String {
    if let Some(stem) = verb.strip_suffix("ies") {
        return if stem.len() <= 1 { format!("{stem}ie") } else { format!("{stem}y") };
    }
    if let Some(stem) = verb.strip_suffix("es") {
        if ["ch", "sh", "ss", "x", "z", "o"].iter().any(|e| stem.ends_with(e)) {
            return stem.to_string();
        }
    }
    verb.strip_suffix('s').unwrap_or(verb).to_string()
}

/// Claims with a third-person lexical verb: "A man holds an umbrella" -> "Does a man hold an umbrella?", and
/// "The image shows two cats" -> "Are there two cats in the image?".
fn do_support(body: &str, spans: &[(usize, usize)]) -> Option<String> {
    let word = |k: usize| bare_word(&body[spans[k].0..spans[k].1]);
    let verb_index = (1..spans.len().min(7)).find(|&k| LEXICAL_VERBS.contains(&word(k).as_str()))?;
    let subject = plain_subject(body, spans, verb_index)?;
    if (0..verb_index).any(|k| FRONTABLE_VERBS.contains(&word(k).as_str())) {
        return None;
    }
    let rest = body[spans[verb_index].1..].trim();
    let verb = word(verb_index);
    let names_image = (0..verb_index).any(|k| IMAGE_NOUNS.contains(&word(k).as_str()));
    if names_image && IMAGE_VERBS.contains(&verb.as_str()) {
        let be = if split::is_plural_phrase(rest) { "Are" } else { "Is" };
        return Some(format!("{be} there {rest} in the image?"));
    }
    Some(format!("Does {} {} {rest}?", lowercase_first_word(subject), base_form(&verb)))
}

/// "X <verb> Y" -> "<Verb> X Y?" for the first [`FRONTABLE_VERBS`] verb, when the subject before it is a
/// plain noun phrase. `None` when it is not, so the caller uses the meaning-preserving fallback.
fn front_verb(body: &str, spans: &[(usize, usize)]) -> Option<String> {
    let word = |k: usize| bare_word(&body[spans[k].0..spans[k].1]);
    let verb_index = (1..spans.len().min(9)).find(|&k| FRONTABLE_VERBS.contains(&word(k).as_str()))?;
    let rest = body[spans[verb_index].1..].trim();
    let subject = lowercase_first_word(plain_subject(body, spans, verb_index)?);
    let verb = word(verb_index);
    let next = spans.get(verb_index + 1).map(|_| word(verb_index + 1)).unwrap_or_default();
    let auxiliary_use = matches!(next.as_str(), "been" | "got");
    Some(match verb.as_str() {
        "has" if !auxiliary_use => format!("Does {subject} have {rest}?"),
        "have" if !auxiliary_use => format!("Do {subject} have {rest}?"),
        "had" if !auxiliary_use => format!("Did {subject} have {rest}?"),
        _ => format!("{} {subject} {rest}?", capitalize_first(&verb)),
    })
}
