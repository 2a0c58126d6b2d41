//! Rule-based splitting of an answer: into sentences (without breaking abbreviations or decimals), sentences into
//! independent clauses (with a leading pronoun resolved to the previous clause's subject), and the filters that
//! drop subjective sentences and evaluative clauses.

use super::words::*;

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
pub(super) fn split_sentences(text: &str) -> Vec<String> {
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
pub(super) fn resolve_leading_pronoun(clause: &str, previous: &str) -> String {
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

/// Whether a claim's subject is a bare pronoun or a reference back ("It is red.", "They are sleeping.", "The
/// other is chasing it."): it cannot be checked on its own.
pub(super) fn opens_with_pronoun(claim: &str) -> bool {
    let Some(&(start, end)) = token_spans_limited(claim, 1).first() else {
        return false;
    };
    let first = fold(&claim[start..end]);
    if matches!(first.as_str(), "it" | "they" | "he" | "she" | "its" | "their" | "his" | "her") {
        return true;
    }
    // "The other is chasing it.", "One of them is red."
    let two: Vec<String> = token_spans_limited(claim, 3).iter().map(|&(a, b)| bare_word(&claim[a..b])).collect();
    matches!(two.get(..2), Some([a, b]) if (a == "the" && matches!(b.as_str(), "other" | "others" | "latter" | "former"))
        || (a == "one" && b == "of"))
}

/// Splits a compound sentence into clauses at [`CLAUSE_CONNECTORS`] where both sides are full clauses, and
/// makes each right-hand clause self-contained by resolving a leading pronoun.
///
/// "There is a red car and a blue bus" has no connector; "a red car, and a blue bus" has one but its right
/// side has no verb; both stay one claim, which is what the labeler should see (a list of objects is one
/// existence claim per object only if the extractor LLM says so).
pub(super) fn split_clauses(sentence: &str) -> Vec<String> {
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
// Lists.

/// Whether a list item is a bare phrase: a few words, no verb, not opening with a preposition, conjunction,
/// relative word or pronoun ("a refrigerator", "blue jeans", "white"; not "which is red" or "the dog sleeps").
fn is_list_item(item: &str) -> bool {
    let words: Vec<String> = item.split_whitespace().take(7).map(bare_word).collect();
    let Some(first) = words.first() else { return false };
    words.len() <= 6
        && item.split_whitespace().nth(6).is_none()
        && !NON_SUBJECT_STARTERS.contains(&first.as_str())
        && !PRONOUNS.contains(&first.as_str())
        && !words.iter().any(|w| CLAUSE_VERBS.contains(&w.as_str()) || LEXICAL_VERBS.contains(&w.as_str()))
        && item.chars().any(char::is_alphanumeric)
}

/// Whether a noun phrase names more than one thing ("two cups", "several chairs", "plates"), for "There are".
pub(super) fn is_plural_phrase(phrase: &str) -> bool {
    let words: Vec<String> = phrase.split_whitespace().map(bare_word).collect();
    let Some(first) = words.first() else { return false };
    if matches!(first.as_str(), "a" | "an" | "one" | "the" | "this" | "that" | "each" | "every") {
        return first == "the" && words.last().is_some_and(|w| w.ends_with('s') && !w.ends_with("ss"));
    }
    PLURAL_DETERMINERS.contains(&first.as_str())
        || first.chars().all(|c| c.is_ascii_digit())
        || words.last().is_some_and(|w| w.ends_with('s') && !w.ends_with("ss") && !w.ends_with("us"))
}

/// Where the object of a clause's verb starts: the byte offset of the first word after the first verb (or
/// after "there is/are"). `None` when the clause has no verb among its first words.
fn object_start(clause: &str) -> Option<usize> {
    let spans = token_spans_limited(clause, 10);
    let verb = (1..spans.len()).find(|&k| {
        let w = bare_word(&clause[spans[k].0..spans[k].1]);
        CLAUSE_VERBS.contains(&w.as_str()) || LEXICAL_VERBS.contains(&w.as_str()) || IMAGE_VERBS.contains(&w.as_str())
    })?;
    // "is holding a cup": skip a participle right after an auxiliary.
    let mut at = verb + 1;
    if let Some(&(a, b)) = spans.get(at) {
        if bare_word(&clause[a..b]).ends_with("ing") && spans.len() > at + 1 {
            at += 1;
        }
    }
    spans.get(at).map(|&(a, _)| a)
}

/// Whether the text before a list names the image or says "there is/are": its items are then existence claims
/// ("The image shows a cat, a dog, and a bird" -> "There is a cat.", ...).
fn is_existential_lead(lead: &str) -> bool {
    let folded = fold(lead.trim());
    let words: Vec<&str> = folded.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
    let Some(last) = words.last() else { return false };
    let names_image = words.iter().any(|w| IMAGE_NOUNS.contains(w));
    (matches!(*last, "is" | "are") && words.len() >= 2 && words[words.len() - 2] == "there")
        || (IMAGE_VERBS.contains(last) && names_image)
        || folded.ends_with("i see")
        || folded.ends_with("can see")
}

/// A list in a clause, one claim per item: "The table has a vase, a book, and a lamp." -> "The table has a
/// vase.", "The table has a book.", "The table has a lamp."; after an image or "there is" lead, each item is an
/// existence claim with "There is" or "There are" as it needs. Items are separated by ", ", with "and" before
/// the last one (a plain "X and Y" counts too) and must all be bare phrases ([`is_list_item`]); anything
/// else stays one claim. Linear in the clause.
pub(super) fn split_list(clause: &str) -> Vec<String> {
    let whole = || vec![clause.to_string()];
    let Some(start) = object_start(clause) else { return whole() };
    let (lead, body) = clause.split_at(start);
    // "between a box and a bag" is one relation, not two objects.
    if body.split_whitespace().next().is_some_and(|w| NON_SUBJECT_STARTERS.contains(&bare_word(w).as_str())) {
        return whole();
    }
    // Items: split at ", " and at the last " and " ("red or orange" is one claim with two possibilities, not two
    // claims, so "or" never splits).
    let mut items: Vec<&str> = body.split(", ").collect();
    let last = items.pop().unwrap_or_default();
    let folded_last = last.to_ascii_lowercase();
    let tail: Vec<&str> = if let Some(rest) = folded_last.strip_prefix("and ") {
        vec![&last[last.len() - rest.len()..]]
    } else if let Some(at) = folded_last.rfind(" and ") {
        vec![&last[..at], &last[at + 5..]]
    } else {
        vec![last]
    };
    items.extend(tail);
    let existential = is_existential_lead(lead);
    let there = |item: &str| {
        let verb = if is_plural_phrase(item) { "are" } else { "is" };
        format!("There {verb} {item}")
    };
    // "The image shows a dog" says there is a dog; the object, not the image, is what a later "it" means.
    let single = items.len() < 2 || items.last().is_some_and(|i| bare_word(i) == "etc");
    if single {
        let one = body.split(", ").count() == 1;
        let names_image = existential && !fold(lead).trim_start().starts_with("there");
        // "There is also a dog" says there is a dog.
        let also = body.strip_prefix("also ").filter(|_| existential && one);
        return match also {
            Some(rest) => vec![there(rest.trim())],
            None if names_image && one => vec![there(body.trim())],
            None => whole(),
        };
    }
    if !items[1..].iter().all(|i| is_list_item(i)) || items[0].trim().is_empty() {
        return whole();
    }
    items
        .iter()
        .map(|item| {
            let item = item.trim();
            if existential {
                there(item)
            } else {
                format!("{}{item}", lead)
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------
// Subjectivity filters.

/// A whole sentence that states the writer's opinion or guess, or asks something, carries no checkable
/// claim; dropping it whole (rather than clause by clause) keeps "I think the car is red, and ..." from
/// turning a hedge into an assertion.
pub(super) fn is_subjective_sentence(sentence: &str) -> bool {
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
pub(super) fn is_evaluative_clause(clause: &str) -> bool {
    let folded = fold(clause);
    let words: Vec<&str> =
        folded.split(|c: char| !(c.is_alphanumeric() || c == '\'')).filter(|w| !w.is_empty()).collect();
    let evaluative = words.iter().any(|w| EVALUATIVE_WORDS.contains(w));
    // "looks very comfortable", "seems quite old": an impression, not something seen.
    let impression = words.windows(2).any(|p| {
        matches!(p[0], "looks" | "look" | "seems" | "seem" | "feels" | "feel" | "appears" | "appear")
            && IMPRESSION_INTENSIFIERS.contains(&p[1])
    });
    evaluative || impression || ATMOSPHERE_PHRASES.iter().any(|p| contains_phrase(&folded, p))
}
