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
// Word lists. All lowercase; apostrophes are normalised to ASCII before lookup.

/// Abbreviations after which a period never ends a sentence: they are always followed by more text.
const ABBREV_NEVER_FINAL: &[&str] = &[
    "mr", "mrs", "ms", "dr", "prof", "st", "mt", "vs", "e.g", "i.e", "cf", "approx", "fig", "gen", "lt", "sgt", "capt",
    "rev", "hon", "viz",
];

/// Abbreviations that may also end a sentence ("... cups, plates, etc. The table ..."); the period ends the
/// sentence only when the next word is capitalised.
const ABBREV_MAYBE_FINAL: &[&str] =
    &["etc", "jr", "sr", "inc", "ltd", "co", "corp", "al", "misc", "ft", "in", "cm", "mm"];

/// Words that, found after a clause's first word, show that the clause has its own verb. Auxiliaries cover
/// most image descriptions ("is parked", "are sitting", "has a handle"); the few lexical verbs are the common
/// ones that are rarely also plural nouns.
const CLAUSE_VERBS: &[&str] = &[
    "is", "are", "was", "were", "am", "has", "have", "had", "can", "could", "will", "would", "shall", "should", "may",
    "might", "must", "does", "do", "did", "isn't", "aren't", "wasn't", "weren't", "hasn't", "haven't", "doesn't",
    "don't", "can't", "cannot", "won't", "sits", "lies", "holds", "wears", "appears", "seems", "contains", "hangs",
    "sleeps", "smiles", "leans", "carries", "eats", "swims", "looks", "seem", "appear",
];

/// Words that cannot open an independent clause: relative pronouns, prepositions and conjunctions. A
/// right-hand side starting with one of them ("..., while walking", "..., and with a hat") is a
/// continuation of the left clause, not a second claim.
const NON_SUBJECT_STARTERS: &[&str] = &[
    "which", "who", "whom", "whose", "where", "when", "while", "with", "without", "to", "by", "for", "of", "from",
    "in", "on", "at", "as", "into", "onto", "near", "under", "over", "behind", "beside", "between", "above", "below",
    "next", "then", "also", "and", "or", "but", "nor", "not", "so", "because", "although", "though", "if", "unless",
    "whereas", "during", "after", "before", "since", "until", "like",
];

/// Determiners that open a noun phrase we may copy into a later clause in place of a pronoun.
const DETERMINERS: &[&str] = &[
    "the", "a", "an", "this", "that", "these", "those", "his", "her", "their", "its", "one", "two", "three", "four",
    "five", "six", "seven", "eight", "nine", "ten", "some", "several", "many", "both", "each", "every",
];

/// Pronouns, and other words that look like a subject but do not name anything.
const PRONOUNS: &[&str] =
    &["it", "they", "he", "she", "we", "you", "i", "there", "here", "this", "that", "these", "those", "one"];

/// First-person hedges and speculation: a sentence containing one states the writer's belief or guess, not
/// something a labeler can check in the image. Matched as whole words.
#[rustfmt::skip]
const HEDGE_PHRASES: &[&str] = &[
    "i think", "i believe", "in my opinion", "i feel", "i guess", "i suppose", "i'd say", "i would say",
    "in my view", "it seems to me", "personally", "i'm not sure", "i am not sure", "perhaps", "possibly",
    "probably", "maybe",
];

/// Evaluative adjectives (and a few adverbs) that carry a judgement rather than visual content. Matched as
/// whole words.
#[rustfmt::skip]
const EVALUATIVE_WORDS: &[&str] = &[
    "beautiful", "beautifully", "amazing", "lovely", "stunning", "peaceful", "charming", "wonderful", "nice",
    "pleasant", "serene", "cozy", "cosy", "gorgeous", "breathtaking", "delightful", "picturesque", "magnificent",
    "tranquil", "idyllic", "inviting", "welcoming", "adorable", "cute", "fantastic", "awesome", "impressive",
    "spectacular", "majestic", "whimsical", "heartwarming", "captivating", "enchanting", "relaxing", "soothing",
    "calming", "cheerful", "harmonious",
];

/// Words and phrases that speculate about mood or atmosphere ("creates a warm atmosphere", "adds to the
/// ambiance", "a sense of calm").
#[rustfmt::skip]
const ATMOSPHERE_PHRASES: &[&str] = &[
    "atmosphere", "ambiance", "ambience", "vibe", "vibes", "a sense of", "a feeling of",
];

/// Openers of summary sentences, which restate or judge rather than add a fact.
const SUMMARY_OPENERS: &[&str] = &["overall", "in summary", "in conclusion", "all in all", "to summarize"];

/// Connectors at which a compound sentence may be split into two claims, with both sides checked to be
/// full clauses first. Lowercase ASCII, so that offsets found in an ASCII-lowercased copy are valid in the
/// original.
const CLAUSE_CONNECTORS: &[&str] = &["; ", ", and ", ", but ", ", while ", " whereas "];

/// Verbs that [`claim_to_question`] can front to form a yes/no question.
const FRONTABLE_VERBS: &[&str] =
    &["is", "are", "was", "were", "am", "can", "could", "will", "would", "should", "must", "has", "have", "had"];

/// Lines from an extraction LLM that mean "there are no claims".
const NO_CLAIM_LINES: &[&str] = &[
    "none",
    "n/a",
    "na",
    "nil",
    "nothing",
    "no claims",
    "no claim",
    "no facts",
    "no factual claims",
    "there are no claims",
    "there are no factual claims",
];

// ---------------------------------------------------------------------------------------------------------
// Small helpers.

/// Lowercase with typographic apostrophes folded to ASCII, so word lists need only one spelling.
fn fold(text: &str) -> String {
    text.to_lowercase().replace('\u{2019}', "'")
}

/// Whether `phrase` occurs in `hay` (both already folded) as whole words.
fn contains_phrase(hay: &str, phrase: &str) -> bool {
    hay.match_indices(phrase).any(|(start, _)| {
        let end = start + phrase.len();
        let before_ok = hay[..start].chars().next_back().is_none_or(|c| !c.is_alphanumeric());
        let after_ok = hay[end..].chars().next().is_none_or(|c| !c.is_alphanumeric());
        before_ok && after_ok
    })
}

/// A whitespace-separated token reduced to its word: outer punctuation stripped, folded.
fn bare_word(token: &str) -> String {
    fold(token.trim_matches(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '\u{2019}')))
}

/// Byte spans `(start, end)` of at most the first `limit` whitespace-separated tokens of `text`. Callers
/// only look at a clause's opening words, and the limit keeps them O(1) on a pathological run-on clause.
fn token_spans_limited(text: &str, limit: usize) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start = None;
    for (pos, c) in text.char_indices() {
        if spans.len() >= limit {
            return spans;
        }
        match (c.is_whitespace(), start) {
            (true, Some(s)) => {
                spans.push((s, pos));
                start = None;
            }
            (false, None) => start = Some(pos),
            _ => {}
        }
    }
    if let (Some(s), true) = (start, spans.len() < limit) {
        spans.push((s, text.len()));
    }
    spans
}

fn is_quote(c: char) -> bool {
    matches!(c, '"' | '\'' | '`' | '\u{201C}' | '\u{201D}' | '\u{2018}' | '\u{2019}' | '\u{00AB}' | '\u{00BB}')
}

/// Sentence terminators, including the ellipsis character and CJK full-width forms.
fn is_terminator(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '\u{2026}' | '\u{3002}' | '\u{FF01}' | '\u{FF1F}')
}

/// Closing characters that belong to the sentence before a terminator: `He said "stop."` ends after `"`.
fn is_closing(c: char) -> bool {
    matches!(c, '"' | '\'' | ')' | ']' | '\u{201D}' | '\u{2019}' | '\u{00BB}')
}

/// Upper-cases the first character; the rest is left alone so proper nouns and acronyms survive.
fn capitalize_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Whether a sentence-initial word must keep its capital inside a question: "I", acronyms ("NASA", "TV"),
/// and mixed-case names ("McDonald's"). Ordinary capitalised words cannot be told apart from names without
/// a dictionary, so they are lowercased.
fn keeps_capital(word: &str) -> bool {
    let letters: Vec<char> = word.chars().filter(|c| c.is_alphabetic()).collect();
    if word == "I" || word.starts_with("I'") || word.starts_with("I\u{2019}") {
        return true;
    }
    let all_caps = letters.len() >= 2 && letters.iter().all(|c| c.is_uppercase());
    let inner_capital = letters.iter().skip(1).any(|c| c.is_uppercase());
    all_caps || inner_capital
}

/// Lowercases the first character of `text` unless its first word [`keeps_capital`].
fn lowercase_first_word(text: &str) -> String {
    let first_word = text.split_whitespace().next().unwrap_or("");
    if keeps_capital(first_word) {
        return text.to_string();
    }
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Removes one pair of surrounding quotes, also when a period follows the closing quote (`"A red car".`).
fn strip_surrounding_quotes(text: &str) -> &str {
    let t = text.trim();
    let mut chars = t.chars();
    let (Some(first), Some(last)) = (chars.next(), chars.next_back()) else {
        return t;
    };
    if !is_quote(first) {
        return t;
    }
    let inner_start = first.len_utf8();
    if is_quote(last) {
        return t[inner_start..t.len() - last.len_utf8()].trim();
    }
    if last == '.' {
        let before_period = &t[..t.len() - 1];
        if let Some(q) = before_period.chars().next_back().filter(|&q| is_quote(q) && before_period.len() > 1) {
            let inner_end = before_period.len() - q.len_utf8();
            if inner_end >= inner_start {
                return t[inner_start..inner_end].trim();
            }
        }
    }
    t
}

/// If `line` starts with a list marker ("- ", "* ", "• ", "1. ", "1) ", "(1) "), the text after it.
///
/// A marker must be followed by whitespace (or end the line), so "-5 degrees", "3.5 m" and "**Claims:**" are
/// not mistaken for list items.
fn strip_list_marker(line: &str) -> Option<&str> {
    let t = line.trim_start();
    let first = t.chars().next()?;
    fn after_marker(rest: &str) -> Option<&str> {
        if rest.is_empty() || rest.starts_with(char::is_whitespace) {
            Some(rest.trim_start())
        } else {
            None
        }
    }
    if matches!(first, '-' | '*' | '+' | '\u{2022}' | '\u{00B7}' | '\u{2013}' | '\u{2014}' | '\u{25AA}' | '\u{25E6}') {
        return after_marker(&t[first.len_utf8()..]);
    }
    let (open, body) = if first == '(' { (true, &t[1..]) } else { (false, t) };
    let digits = body.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits > 3 {
        return None;
    }
    let rest = &body[digits..];
    let closer = rest.chars().next()?;
    let valid = if open { closer == ')' } else { closer == '.' || closer == ')' };
    if valid {
        after_marker(&rest[1..])
    } else {
        None
    }
}

/// Strips every leading list marker ("- 1. claim" has two).
fn strip_all_list_markers(line: &str) -> (bool, &str) {
    let mut rest = line.trim();
    let mut found = false;
    while let Some(after) = strip_list_marker(rest) {
        found = true;
        rest = after;
    }
    (found, rest)
}

/// Normalises a claim: trims, drops trailing punctuation, capitalises, and ends it with exactly one period.
/// `None` when nothing claim-like is left: no letter or digit outside list markers ("(2) \"" is not a claim).
fn finish_claim(text: &str) -> Option<String> {
    let t = text
        .trim()
        .trim_end_matches(|c: char| is_terminator(c) || matches!(c, ';' | ',' | ':') || c.is_whitespace())
        .trim_start_matches(|c: char| matches!(c, ',' | ';' | ':') || c.is_whitespace());
    let (_, content) = strip_all_list_markers(t);
    if !content.chars().any(char::is_alphanumeric) {
        return None;
    }
    Some(format!("{}.", capitalize_first(content)))
}

// ---------------------------------------------------------------------------------------------------------
// Sentence splitting.

/// Whether the period that ends `token` is an abbreviation's rather than a sentence's.
///
/// `token` is the text from the start of the word up to (not including) the period; `next_is_upper` says
/// whether the next word starts with a capital, which is the only evidence available for abbreviations that
/// can also end a sentence ("etc.").
fn is_abbreviation(token: &str, next_is_upper: bool, next_is_digit: bool) -> bool {
    let word = token.trim_start_matches(|c: char| !c.is_alphanumeric());
    // Long tokens are never abbreviations; the bound also keeps the check O(1) per period.
    if word.is_empty() || word.len() > 12 {
        return false;
    }
    let mut letters = word.chars();
    if let (Some(only), None) = (letters.next(), letters.next()) {
        // An initial ("J. Smith"); a lone lowercase letter ("option a.") may well end a sentence.
        return only.is_uppercase();
    }
    let lower = word.to_ascii_lowercase();
    if ABBREV_NEVER_FINAL.contains(&lower.as_str()) {
        return true;
    }
    if lower == "no" {
        return next_is_digit; // "No. 5"
    }
    // Dotted initialisms ("U.S", "a.m") behave like "etc.".
    let dotted = lower.contains('.')
        && lower.split('.').all(|part| part.chars().count() == 1 && part.chars().all(char::is_alphabetic));
    if ABBREV_MAYBE_FINAL.contains(&lower.as_str()) || dotted {
        return !next_is_upper;
    }
    false
}

/// Splits one line of text into sentences, each keeping its terminator.
///
/// A sentence ends at a run of `.`, `!`, `?` or `…` (plus closing quotes/brackets) followed by whitespace or
/// the end of the line. Decimals ("3.5") and dotted abbreviations ("e.g.") never split because no
/// whitespace follows their inner periods; a final abbreviation period is checked by [`is_abbreviation`].
fn split_line_sentences(line: &str, out: &mut Vec<String>) {
    let chars: Vec<(usize, char)> = line.char_indices().collect();
    let mut sentence_start = 0;
    let mut word_start = 0;
    let mut i = 0;
    while i < chars.len() {
        let (pos, c) = chars[i];
        if c.is_whitespace() {
            word_start = pos + c.len_utf8();
            i += 1;
            continue;
        }
        if !is_terminator(c) {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < chars.len() && is_terminator(chars[j].1) {
            j += 1;
        }
        let single_period = c == '.' && j == i + 1;
        while j < chars.len() && is_closing(chars[j].1) {
            j += 1;
        }
        let at_boundary = j >= chars.len() || chars[j].1.is_whitespace();
        if at_boundary {
            let end = chars.get(j).map_or(line.len(), |&(p, _)| p);
            let next = chars[j..].iter().map(|&(_, ch)| ch).find(|ch| !ch.is_whitespace());
            let next_is_upper = next.is_some_and(char::is_uppercase);
            let next_is_digit = next.is_some_and(|ch| ch.is_ascii_digit());
            let abbreviation = single_period && is_abbreviation(&line[word_start..pos], next_is_upper, next_is_digit);
            if !abbreviation {
                let sentence = line[sentence_start..end].trim();
                if !sentence.is_empty() {
                    out.push(sentence.to_string());
                }
                sentence_start = end;
            }
        }
        i = j;
    }
    let rest = line[sentence_start..].trim();
    if !rest.is_empty() {
        out.push(rest.to_string());
    }
}

/// Splits text into sentences: every line break ends a sentence, list markers are removed, and each line is
/// split with [`split_line_sentences`].
fn split_sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let (_, content) = strip_all_list_markers(line);
        if !content.is_empty() {
            split_line_sentences(content, &mut out);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------------------
// Clause splitting.

/// Evidence that a piece of text is an independent clause: its first word can be a subject, and a verb
/// follows somewhere after it. Kept as two flags so that a growing merged segment can be updated without
/// rescanning it (which would make a long run-on sentence quadratic).
#[derive(Clone, Copy)]
struct ClauseEvidence {
    subject_first: bool,
    verb_after_first: bool,
}

impl ClauseEvidence {
    fn of(text: &str) -> Self {
        let mut words = text.split_whitespace().map(bare_word).filter(|w| !w.is_empty());
        let subject_first = words
            .next()
            .is_some_and(|w| !NON_SUBJECT_STARTERS.contains(&w.as_str()) && !CLAUSE_VERBS.contains(&w.as_str()));
        let verb_after_first = words.any(|w| CLAUSE_VERBS.contains(&w.as_str()));
        Self { subject_first, verb_after_first }
    }

    fn is_clause(self) -> bool {
        self.subject_first && self.verb_after_first
    }

    /// Evidence for `self`'s text with `appended` text after it: the first word is unchanged, and any verb
    /// in the appended text now follows it.
    fn extended_by(self, appended: &str) -> Self {
        let appended_has_verb = appended.split_whitespace().map(bare_word).any(|w| CLAUSE_VERBS.contains(&w.as_str()));
        Self { subject_first: self.subject_first, verb_after_first: self.verb_after_first || appended_has_verb }
    }
}

/// Whether a noun phrase is plain words (no commas, brackets or other punctuation), so that copying it into
/// another clause cannot drag part of a list or an aside along.
fn is_plain_phrase(phrase: &str) -> bool {
    phrase.chars().all(|c| c.is_alphanumeric() || c == ' ' || c == '-' || c == '\'' || c == '\u{2019}')
}

/// "A dog ..., and it ..." refers back to a known dog: "The dog". Other determiners are kept.
fn definite(phrase: &str) -> String {
    let Some(&(_, first_end)) = token_spans_limited(phrase, 1).first() else {
        return phrase.to_string();
    };
    let first_token = &phrase[..first_end];
    let rest = &phrase[first_end..];
    match fold(first_token).as_str() {
        "a" | "an" if first_token.starts_with(char::is_uppercase) => format!("The{rest}"),
        "a" | "an" => format!("the{rest}"),
        _ => phrase.to_string(),
    }
}

/// Whether `pronoun` can refer to a subject that takes `verb`: "it" needs a singular verb, "they" a plural
/// one; modal verbs ("can") fit both.
fn pronoun_agrees(pronoun: &str, verb: &str) -> bool {
    let singular = matches!(verb, "is" | "was" | "has" | "does" | "isn't" | "wasn't" | "hasn't" | "doesn't")
        || (verb.ends_with('s') && !verb.ends_with("ss"));
    let plural = matches!(verb, "are" | "were" | "have" | "do" | "aren't" | "weren't" | "haven't" | "don't");
    match pronoun {
        "they" => !singular,
        _ => !plural,
    }
}

/// The subject noun phrase of a clause, if it is simple enough to copy in place of a pronoun: a determiner
/// plus up to four words ("The dog", "A small red car" -> "The small red car") or a capitalised name
/// ("John"), directly followed by a verb that agrees with `pronoun`. For an existential clause that is
/// nothing but "There is/are <noun phrase>", the noun phrase ("There is a car, and it is red").
fn simple_subject(clause: &str, pronoun: &str) -> Option<String> {
    let spans = token_spans_limited(clause, 7);
    if spans.len() >= 3 && spans.len() <= 6 && bare_word(&clause[spans[0].0..spans[0].1]) == "there" {
        let verb = bare_word(&clause[spans[1].0..spans[1].1]);
        let phrase = clause[spans[2].0..].trim();
        let determiner = DETERMINERS.contains(&bare_word(&clause[spans[2].0..spans[2].1]).as_str());
        let existential = matches!(verb.as_str(), "is" | "are" | "was" | "were");
        // The phrase must be a bare noun phrase: "There is a car parked" or "There is a dog on it" would copy
        // a participle or a preposition along with the noun.
        let words: Vec<String> = spans[2..].iter().map(|&(a, b)| bare_word(&clause[a..b])).collect();
        let bare_noun_phrase = !words.iter().any(|w| NON_SUBJECT_STARTERS.contains(&w.as_str()))
            && words.last().is_some_and(|w| !w.ends_with("ing") && !w.ends_with("ed"));
        let ok = existential && determiner && spans.len() >= 4 && is_plain_phrase(phrase) && bare_noun_phrase;
        return (ok && pronoun_agrees(pronoun, &verb)).then(|| definite(phrase));
    }
    let verb_index = (1..spans.len().min(6))
        .find(|&k| CLAUSE_VERBS.contains(&bare_word(&clause[spans[k].0..spans[k].1]).as_str()))?;
    let subject_tokens = &spans[..verb_index];
    let subject = &clause[spans[0].0..subject_tokens[verb_index - 1].1];
    if !is_plain_phrase(subject) {
        return None;
    }
    let first_token = &clause[spans[0].0..spans[0].1];
    let first = bare_word(first_token);
    let determiner = DETERMINERS.contains(&first.as_str()) && verb_index >= 2;
    let name = first_token.chars().next().is_some_and(char::is_uppercase)
        && !PRONOUNS.contains(&first.as_str())
        && !NON_SUBJECT_STARTERS.contains(&first.as_str())
        && !DETERMINERS.contains(&first.as_str());
    if !(determiner || name) {
        return None;
    }
    let verb = bare_word(&clause[spans[verb_index].0..spans[verb_index].1]);
    pronoun_agrees(pronoun, &verb).then(|| definite(subject))
}

/// Replaces a leading "it"/"they"/"he"/"she" in `clause` with the simple subject of `previous`, so that the
/// clause can be checked on its own. Returns the clause unchanged when the subject is not simple.
fn resolve_leading_pronoun(clause: &str, previous: &str) -> String {
    let Some(&(start, end)) = token_spans_limited(clause, 1).first() else {
        return clause.to_string();
    };
    let pronoun = fold(&clause[start..end]);
    if !matches!(pronoun.as_str(), "it" | "they" | "he" | "she") {
        return clause.to_string();
    }
    match simple_subject(previous, &pronoun) {
        Some(subject) => format!("{subject}{}", &clause[end..]),
        None => clause.to_string(),
    }
}

/// Splits a compound sentence into clauses at [`CLAUSE_CONNECTORS`] where both sides are full clauses, and
/// makes each right-hand clause self-contained by resolving a leading pronoun.
///
/// "There is a red car and a blue bus" has no connector; "a red car, and a blue bus" has one but its right
/// side has no verb; both stay one claim, which is what the labeler should see (a list of objects is one
/// existence claim per object only if the extractor LLM says so).
fn split_clauses(sentence: &str) -> Vec<String> {
    let lower = sentence.to_ascii_lowercase();
    let bytes = lower.as_bytes();
    // (connector start, connector end) byte offsets; valid char boundaries because connectors are ASCII.
    let mut cuts = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match CLAUSE_CONNECTORS.iter().find(|c| bytes[i..].starts_with(c.as_bytes())) {
            Some(connector) => {
                cuts.push((i, i + connector.len()));
                i += connector.len();
            }
            None => i += 1,
        }
    }
    if cuts.is_empty() {
        return vec![sentence.to_string()];
    }

    let mut clauses: Vec<String> = Vec::new();
    let mut current_start = 0;
    let mut current_end = cuts[0].0;
    let mut evidence = ClauseEvidence::of(&sentence[current_start..current_end]);
    for (k, &(_, cut_end)) in cuts.iter().enumerate() {
        let next_end = cuts.get(k + 1).map_or(sentence.len(), |&(s, _)| s);
        let next = &sentence[cut_end..next_end];
        let next_evidence = ClauseEvidence::of(next);
        if evidence.is_clause() && next_evidence.is_clause() {
            clauses.push(sentence[current_start..current_end].to_string());
            current_start = cut_end;
            evidence = next_evidence;
        } else {
            evidence = evidence.extended_by(next);
        }
        current_end = next_end;
    }
    clauses.push(sentence[current_start..current_end].to_string());

    let mut resolved: Vec<String> = Vec::with_capacity(clauses.len());
    for clause in clauses {
        let clause = clause.trim().trim_end_matches([',', ';']).trim_end();
        let clause = match resolved.last() {
            Some(previous) => resolve_leading_pronoun(clause, previous),
            None => clause.to_string(),
        };
        resolved.push(clause);
    }
    resolved
}

// ---------------------------------------------------------------------------------------------------------
// Subjectivity filters.

/// A whole sentence that states the writer's opinion or guess, or asks something, carries no checkable
/// claim; dropping it whole (rather than clause by clause) keeps "I think the car is red, and ..." from
/// turning a hedge into an assertion.
fn is_subjective_sentence(sentence: &str) -> bool {
    let trimmed = sentence.trim_end_matches(|c: char| is_closing(c) || c.is_whitespace());
    if trimmed.ends_with('?') {
        return true;
    }
    let folded = fold(sentence);
    let start = folded.trim_start_matches(|c: char| !c.is_alphanumeric());
    HEDGE_PHRASES.iter().any(|p| contains_phrase(&folded, p))
        || SUMMARY_OPENERS.iter().any(|p| start.starts_with(p) && contains_phrase(start, p))
}

/// A clause that judges (beautiful, cozy) or speculates about mood carries no visual content a labeler could
/// check; the rest of its sentence may still, so this is applied per clause.
fn is_evaluative_clause(clause: &str) -> bool {
    let folded = fold(clause);
    let evaluative = folded.split(|c: char| !(c.is_alphanumeric() || c == '\'')).any(|w| EVALUATIVE_WORDS.contains(&w));
    evaluative || ATMOSPHERE_PHRASES.iter().any(|p| contains_phrase(&folded, p))
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
    for sentence in split_sentences(answer) {
        if sentence.trim_end().ends_with(':') || is_subjective_sentence(&sentence) {
            continue;
        }
        let body = sentence.trim_end_matches(|c: char| is_terminator(c) || c.is_whitespace());
        for clause in split_clauses(body) {
            if is_evaluative_clause(&clause) {
                continue;
            }
            if let Some(claim) = finish_claim(&clause) {
                claims.push(claim);
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
    format!("Is it true that {}?", lowercase_first_word(body))
}

/// "X <verb> Y" -> "<Verb> X Y?" for the first [`FRONTABLE_VERBS`] verb, when the subject before it is a
/// plain noun phrase. `None` when it is not, so the caller uses the meaning-preserving fallback.
fn front_verb(body: &str, spans: &[(usize, usize)]) -> Option<String> {
    let word = |k: usize| bare_word(&body[spans[k].0..spans[k].1]);
    let verb_index = (1..spans.len().min(9)).find(|&k| FRONTABLE_VERBS.contains(&word(k).as_str()))?;
    let subject = &body[..spans[verb_index - 1].1];
    let rest = body[spans[verb_index].1..].trim();
    let first = word(0);
    let subject_words: Vec<String> = (0..verb_index).map(word).collect();
    let plain_subject = !subject.contains([',', ';', ':', '(', ')'])
        && !NON_SUBJECT_STARTERS.contains(&first.as_str())
        && !matches!(first.as_str(), "there" | "here")
        && !subject_words.iter().any(|w| matches!(w.as_str(), "who" | "which" | "that" | "whose"));
    if !plain_subject || rest.is_empty() {
        return None;
    }
    let subject = lowercase_first_word(subject);
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
