//! Exact hallucination metrics for ShapesWorld answers (no judge model): CHAIR and coverage for captions,
//! POPE-style and AMBER-style scores for yes/no existence questions.

use crate::shapes::{COLORS, SHAPES};
use std::collections::BTreeSet;

fn words(text: &str) -> Vec<String> {
    text.to_lowercase().split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_string).collect()
}

fn color_of(w: &str) -> Option<&'static str> {
    COLORS.iter().map(|(c, _)| *c).find(|c| *c == w)
}

/// "circle", "circles", "cross", "crosses" -> the shape.
fn shape_of(w: &str) -> Option<&'static str> {
    SHAPES.iter().copied().find(|s| w == *s || w == format!("{s}s") || w == format!("{s}es"))
}

/// The distinct objects an answer mentions, as vocabulary phrases ("red circle"). Handles articles and
/// numbers ("two red circles"), plurals, and the order "a circle that is red" / "a circle which is red".
pub fn mentions(text: &str) -> BTreeSet<String> {
    let w = words(text);
    let mut out = BTreeSet::new();
    for i in 0..w.len() {
        if let (Some(c), Some(s)) = (color_of(&w[i]), w.get(i + 1).and_then(|n| shape_of(n))) {
            out.insert(format!("{c} {s}"));
        }
        if let Some(s) = shape_of(&w[i]) {
            let rest: Vec<&str> = w.iter().skip(i + 1).take(3).map(|x| x.as_str()).collect();
            if let [rel, verb, col, ..] = rest.as_slice() {
                if (*rel == "that" || *rel == "which") && (*verb == "is" || *verb == "are") {
                    if let Some(c) = color_of(col) {
                        out.insert(format!("{c} {s}"));
                    }
                }
            }
        }
    }
    out
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CaptionMetrics {
    pub answers: usize,
    /// Answers with at least one hallucinated object / answers.
    pub chair_s: f64,
    /// Hallucinated object mentions / all object mentions (distinct objects per answer).
    pub chair_i: f64,
    /// Ground-truth objects mentioned / ground-truth objects.
    pub cover: f64,
    /// Mean answer length in words.
    pub mean_length: f64,
}

/// CHAIR_s, CHAIR_i, Cover and length over (answer, ground-truth objects) pairs.
pub fn caption_metrics<'a>(items: impl IntoIterator<Item = (&'a str, &'a [String])>) -> CaptionMetrics {
    caption_metrics_by(items, mentions)
}

/// `caption_metrics` with `find` giving the objects an answer names (ShapesWorld's `mentions`, or a benchmark's
/// synonym lists).
pub fn caption_metrics_by<'a>(
    items: impl IntoIterator<Item = (&'a str, &'a [String])>,
    find: impl Fn(&str) -> BTreeSet<String>,
) -> CaptionMetrics {
    let (mut answers, mut bad_answers, mut mentioned, mut hallucinated, mut gt, mut covered, mut len) =
        (0, 0, 0, 0, 0, 0, 0);
    for (text, truth) in items {
        let m = find(text);
        let h = m.iter().filter(|o| !truth.contains(o)).count();
        answers += 1;
        bad_answers += usize::from(h > 0);
        mentioned += m.len();
        hallucinated += h;
        gt += truth.len();
        covered += truth.iter().filter(|t| m.contains(*t)).count();
        len += words(text).len();
    }
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    CaptionMetrics {
        answers,
        chair_s: ratio(bad_answers, answers),
        chair_i: ratio(hallucinated, mentioned),
        cover: ratio(covered, gt),
        mean_length: ratio(len, answers),
    }
}

/// A yes/no reading of an answer: "yes"/"no" as its first word, else the first yes/no word in it; None when
/// it has neither.
pub fn yes_no(text: &str) -> Option<bool> {
    words(text).iter().find_map(|w| match w.as_str() {
        "yes" => Some(true),
        "no" | "not" => Some(false),
        _ => None,
    })
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BinaryMetrics {
    pub n: usize,
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Share of answers read as "yes" (POPE reports it to expose yes-bias).
    pub yes_ratio: f64,
}

/// Scores predictions against labels with `positive` as the positive class (POPE: yes; AMBER: no). An
/// answer that is neither yes nor no counts as the negative of `positive` (a miss), as POPE's parser does.
pub fn binary_metrics(items: &[(Option<bool>, bool)], positive: bool) -> BinaryMetrics {
    let (mut tp, mut fp, mut tn, mut fneg, mut yes) = (0, 0, 0, 0, 0);
    for &(pred, label) in items {
        let p = pred.unwrap_or(!positive) == positive;
        let l = label == positive;
        yes += usize::from(pred == Some(true));
        match (p, l) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, false) => tn += 1,
            (false, true) => fneg += 1,
        }
    }
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let (precision, recall) = (ratio(tp, tp + fp), ratio(tp, tp + fneg));
    BinaryMetrics {
        n: items.len(),
        accuracy: ratio(tp + tn, items.len()),
        precision,
        recall,
        f1: if precision + recall == 0.0 { 0.0 } else { 2.0 * precision * recall / (precision + recall) },
        yes_ratio: ratio(yes, items.len()),
    }
}
