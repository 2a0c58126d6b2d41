//! The word lists behind the English claim rules (abbreviations, verbs, determiners, hedges, ...) and the small
//! string helpers both the splitter and the public API use: folding, whole-word matching, token spans, quotes,
//! list markers and capitalisation. All lowercase; apostrophes are normalised to ASCII before lookup.

/// Abbreviations after which a period never ends a sentence: they are always followed by more text.
pub(super) const ABBREV_NEVER_FINAL: &[&str] = &[
    "mr", "mrs", "ms", "dr", "prof", "st", "mt", "vs", "e.g", "i.e", "cf", "approx", "fig", "gen", "lt", "sgt", "capt",
    "rev", "hon", "viz",
];

/// Abbreviations that may also end a sentence ("... cups, plates, etc. The table ..."); the period ends the
/// sentence only when the next word is capitalised.
pub(super) const ABBREV_MAYBE_FINAL: &[&str] =
    &["etc", "jr", "sr", "inc", "ltd", "co", "corp", "al", "misc", "ft", "in", "cm", "mm"];

/// Words that, found after a clause's first word, show that the clause has its own verb. Auxiliaries cover
/// most image descriptions ("is parked", "are sitting", "has a handle"); the few lexical verbs are the common
/// ones that are rarely also plural nouns.
pub(super) const CLAUSE_VERBS: &[&str] = &[
    "is", "are", "was", "were", "am", "has", "have", "had", "can", "could", "will", "would", "shall", "should", "may",
    "might", "must", "does", "do", "did", "isn't", "aren't", "wasn't", "weren't", "hasn't", "haven't", "doesn't",
    "don't", "can't", "cannot", "won't", "sits", "lies", "holds", "wears", "appears", "seems", "contains", "hangs",
    "sleeps", "smiles", "leans", "carries", "eats", "swims", "looks", "seem", "appear",
];

/// Third-person lexical verbs that [`claim_to_question`](super::claim_to_question) turns into "Does X <verb>
/// ...?" and that mark a phrase as a clause rather than a list item. Words that are as often plural nouns
/// ("lines", "plays", "watches") are left out.
#[rustfmt::skip]
pub(super) const LEXICAL_VERBS: &[&str] = &[
    "sits", "lies", "holds", "wears", "contains", "hangs", "sleeps", "smiles", "leans", "carries", "eats", "swims",
    "stands", "grazes", "reads", "surrounds", "fills", "reaches", "touches", "floats", "grows", "extends",
    "overlooks", "looks", "appears", "seems", "waits", "jumps", "stretches", "crosses", "dominates", "occupies",
    "supports", "shows", "features", "depicts", "displays", "includes",
];

/// Verbs with which an answer says what the image shows.
pub(super) const IMAGE_VERBS: &[&str] =
    &["shows", "show", "depicts", "features", "displays", "presents", "captures", "contains", "includes", "has", "see"];

/// Nouns that name the image itself.
pub(super) const IMAGE_NOUNS: &[&str] =
    &["image", "picture", "photo", "photograph", "scene", "shot", "snapshot", "frame", "painting", "illustration"];

/// First words of a noun phrase that name more than one thing.
#[rustfmt::skip]
pub(super) const PLURAL_DETERMINERS: &[&str] = &[
    "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "several", "some", "many", "multiple",
    "few", "numerous", "various", "both", "these", "those",
];

/// After "looks", "seems", "feels" or "appears", a word that marks an impression rather than something seen
/// ("It looks very comfortable").
pub(super) const IMPRESSION_INTENSIFIERS: &[&str] =
    &["very", "quite", "so", "really", "rather", "pretty", "extremely", "incredibly", "too", "fairly", "truly"];

/// Words that cannot open an independent clause: relative pronouns, prepositions and conjunctions. A
/// right-hand side starting with one of them ("..., while walking", "..., and with a hat") is a
/// continuation of the left clause, not a second claim.
pub(super) const NON_SUBJECT_STARTERS: &[&str] = &[
    "which", "who", "whom", "whose", "where", "when", "while", "with", "without", "to", "by", "for", "of", "from",
    "in", "on", "at", "as", "into", "onto", "near", "under", "over", "behind", "beside", "between", "above", "below",
    "next", "then", "also", "and", "or", "but", "nor", "not", "so", "because", "although", "though", "if", "unless",
    "whereas", "during", "after", "before", "since", "until", "like",
];

/// Determiners that open a noun phrase we may copy into a later clause in place of a pronoun.
pub(super) const DETERMINERS: &[&str] = &[
    "the", "a", "an", "this", "that", "these", "those", "his", "her", "their", "its", "one", "two", "three", "four",
    "five", "six", "seven", "eight", "nine", "ten", "some", "several", "many", "both", "each", "every",
];

/// Pronouns, and other words that look like a subject but do not name anything.
pub(super) const PRONOUNS: &[&str] =
    &["it", "they", "he", "she", "we", "you", "i", "there", "here", "this", "that", "these", "those", "one"];

/// First-person hedges and speculation: a sentence containing one states the writer's belief or guess, not
/// something a labeler can check in the image. Matched as whole words.
#[rustfmt::skip]
pub(super) const HEDGE_PHRASES: &[&str] = &[
    "i think", "i believe", "in my opinion", "i feel", "i guess", "i suppose", "i'd say", "i would say",
    "in my view", "it seems to me", "personally", "i'm not sure", "i am not sure", "perhaps", "possibly",
    "probably", "maybe", "might", "might be", "could be", "may be", "there may",
];

/// Evaluative adjectives (and a few adverbs) that carry a judgement rather than visual content. Matched as
/// whole words.
#[rustfmt::skip]
pub(super) const EVALUATIVE_WORDS: &[&str] = &[
    "beautiful", "beautifully", "amazing", "lovely", "stunning", "peaceful", "charming", "wonderful", "nice",
    "pleasant", "serene", "cozy", "cosy", "gorgeous", "breathtaking", "delightful", "picturesque", "magnificent",
    "tranquil", "idyllic", "inviting", "welcoming", "adorable", "cute", "fantastic", "awesome", "impressive",
    "spectacular", "majestic", "whimsical", "heartwarming", "captivating", "enchanting", "relaxing", "soothing",
    "calming", "cheerful", "harmonious", "comfortable", "elegant", "stylish", "appealing", "attractive",
    "interesting", "lively", "vibrant", "delicious", "appetizing", "tasty", "fun", "enjoyable", "joyful",
    "playful", "friendly", "pleasing", "fascinating", "remarkable", "striking", "perfect",
];

/// Words and phrases that speculate about mood or atmosphere ("creates a warm atmosphere", "adds to the
/// ambiance", "a sense of calm").
#[rustfmt::skip]
pub(super) const ATMOSPHERE_PHRASES: &[&str] = &[
    "atmosphere", "ambiance", "ambience", "vibe", "vibes", "a sense of", "a feeling of",
];

/// Openers of summary sentences, which restate or judge rather than add a fact.
pub(super) const SUMMARY_OPENERS: &[&str] = &["overall", "in summary", "in conclusion", "all in all", "to summarize"];

/// Connectors at which a compound sentence may be split into two claims, with both sides checked to be
/// full clauses first. Lowercase ASCII, so that offsets found in an ASCII-lowercased copy are valid in the
/// original.
pub(super) const CLAUSE_CONNECTORS: &[&str] = &["; ", ", and ", ", but ", ", while ", " whereas "];

/// Verbs that [`claim_to_question`] can front to form a yes/no question.
pub(super) const FRONTABLE_VERBS: &[&str] =
    &["is", "are", "was", "were", "am", "can", "could", "will", "would", "should", "must", "has", "have", "had"];

/// Lines from an extraction LLM that mean "there are no claims".
pub(super) const NO_CLAIM_LINES: &[&str] = &[
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
pub(super) fn fold(text: &str) -> String {
    text.to_lowercase().replace('\u{2019}', "'")
}

/// Whether `phrase` occurs in `hay` (both already folded) as whole words.
pub(super) fn contains_phrase(hay: &str, phrase: &str) -> bool {
    hay.match_indices(phrase).any(|(start, _)| {
        let end = start + phrase.len();
        let before_ok = hay[..start].chars().next_back().is_none_or(|c| !c.is_alphanumeric());
        let after_ok = hay[end..].chars().next().is_none_or(|c| !c.is_alphanumeric());
        before_ok && after_ok
    })
}

/// A whitespace-separated token reduced to its word: outer punctuation stripped, folded.
pub(super) fn bare_word(token: &str) -> String {
    fold(token.trim_matches(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '\u{2019}')))
}

/// Byte spans `(start, end)` of at most the first `limit` whitespace-separated tokens of `text`. Callers
/// only look at a clause's opening words, and the limit keeps them O(1) on a pathological run-on clause.
pub(super) fn token_spans_limited(text: &str, limit: usize) -> Vec<(usize, usize)> {
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
pub(super) fn is_terminator(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '\u{2026}' | '\u{3002}' | '\u{FF01}' | '\u{FF1F}')
}

/// Closing characters that belong to the sentence before a terminator: `He said "stop."` ends after `"`.
pub(super) fn is_closing(c: char) -> bool {
    matches!(c, '"' | '\'' | ')' | ']' | '\u{201D}' | '\u{2019}' | '\u{00BB}')
}

/// Upper-cases the first character; the rest is left alone so proper nouns and acronyms survive.
pub(super) fn capitalize_first(text: &str) -> String {
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
pub(super) fn lowercase_first_word(text: &str) -> String {
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
pub(super) fn strip_surrounding_quotes(text: &str) -> &str {
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
pub(super) fn strip_all_list_markers(line: &str) -> (bool, &str) {
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
pub(super) fn finish_claim(text: &str) -> Option<String> {
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
