//! Metric formulas on hand-made cases, with the published definitions: CHAIR_i = hallucinated mentions / all
//! mentions, CHAIR_s = answers with >= 1 hallucinated object / answers.

use engine::hallucination::*;

fn v(xs: &[&str]) -> Vec<String> {
    xs.iter().map(|s| s.to_string()).collect()
}

#[test]
fn mention_parsing_handles_plurals_articles_numbers_and_order() {
    let m = mentions("There are two Red circles, a blue square and a cross that is green. No yellow.");
    assert_eq!(m.into_iter().collect::<Vec<_>>(), v(&["blue square", "green cross", "red circle"]));
    assert_eq!(mentions("three orange crosses and the purple triangles").len(), 2);
    assert!(mentions("a red thing and a circle").is_empty(), "colour and shape must go together");
    assert_eq!(mentions("a red circle, another red circle").len(), 1, "distinct objects");
}

#[test]
fn chair_and_cover_follow_the_published_definitions() {
    let gt1 = v(&["red circle", "blue square"]);
    let gt2 = v(&["green cross"]);
    let gt3 = v(&["yellow diamond", "purple triangle"]);
    let items: Vec<(&str, &[String])> = vec![
        // 2 mentions, 0 hallucinated, covers 2/2
        ("There is a red circle and a blue square.", &gt1),
        // 2 mentions, 1 hallucinated (orange diamond), covers 1/1
        ("A green cross and an orange diamond.", &gt2),
        // 3 mentions, 2 hallucinated, covers 1/2
        ("A yellow diamond, a red circle and a green square.", &gt3),
    ];
    let m = caption_metrics(items);
    assert_eq!(m.answers, 3);
    assert!((m.chair_i - 3.0 / 7.0).abs() < 1e-12, "{m:?}");
    assert!((m.chair_s - 2.0 / 3.0).abs() < 1e-12);
    assert!((m.cover - 4.0 / 5.0).abs() < 1e-12);
    assert!((m.mean_length - (9.0 + 7.0 + 10.0) / 3.0).abs() < 1e-12, "{}", m.mean_length);
}

#[test]
fn pope_and_amber_scores() {
    assert_eq!(yes_no("Yes, there is."), Some(true));
    assert_eq!(yes_no("no"), Some(false));
    assert_eq!(yes_no("There is not."), Some(false));
    assert_eq!(yes_no("a red circle"), None);
    // labels: 3 yes, 3 no. predictions: yes yes no | yes no (unparsed)
    let items = [
        (Some(true), true),
        (Some(true), true),
        (Some(false), true),
        (Some(true), false),
        (Some(false), false),
        (None, false),
    ];
    let pope = binary_metrics(&items, true);
    // tp 2, fn 1, fp 1, tn 2 (the unparsed answer counts as "no")
    assert!((pope.accuracy - 4.0 / 6.0).abs() < 1e-12);
    assert!((pope.precision - 2.0 / 3.0).abs() < 1e-12);
    assert!((pope.recall - 2.0 / 3.0).abs() < 1e-12);
    assert!((pope.f1 - 2.0 / 3.0).abs() < 1e-12);
    assert!((pope.yes_ratio - 3.0 / 6.0).abs() < 1e-12);
    // AMBER: "no" is the positive class. tp = said no & is no: 1 (+ the unparsed one counts as a miss) ...
    let amber = binary_metrics(&items, false);
    // positives (label no): 3; predicted no among them: 1 (index 4); unparsed -> "yes" here -> miss.
    // predicted no overall: index 2 (label yes, fp) and 4 (tp).
    assert!((amber.precision - 0.5).abs() < 1e-12 && (amber.recall - 1.0 / 3.0).abs() < 1e-12, "{amber:?}");
    assert!((amber.f1 - 0.4).abs() < 1e-12);
}
