//! RLAIF-V feedback library: scoring and pairing rules on hand-made cases, length balancing, the yes/no
//! reading of the labeler, batched verification against one-prompt-at-a-time forwards, ShapesWorld claims.

use engine::feedback::claims::{shapes_claims, Claim, ClaimExtractor, RuleExtractor};
use engine::feedback::pairs::{candidate_pairs, keep_accepted, length_balance, pick_pairs, score};
use engine::feedback::verify::{Verdict, YesNoTokens};
use engine::hallucination::mentions;
use engine::tokenizer::TextTokenizer;
use engine::Model;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llava").join(name)
}

#[test]
fn score_counts_rejected_claims_and_answers_without_claims_have_none() {
    assert_eq!(score(&[true, true]), Some(0));
    assert_eq!(score(&[true, false, false]), Some(-2));
    assert_eq!(score(&[]), None);
}

#[test]
fn candidate_pairs_need_a_score_gap_of_one_and_distinct_texts() {
    let texts = ["a", "b", "c", "a ", "d"];
    let scores = [Some(0), Some(-1), Some(0), Some(-2), None];
    let pairs = candidate_pairs(&texts, &scores);
    // 0>1, 0>3, 1>3 (gap 1), 2>1, 2>3; never the unscored answer 4; 0 vs 3 are the same text ("a" / "a ").
    assert_eq!(pairs, vec![(0, 1), (1, 3), (2, 1), (2, 3)]);
    assert!(!pairs.contains(&(0, 3)), "identical texts are never paired");
    assert!(pairs.iter().all(|&(c, r)| c != 4 && r != 4), "answers without claims are never paired");
    assert!(pairs.iter().all(|&(c, r)| scores[c].unwrap() - scores[r].unwrap() >= 1), "chosen has the higher score");
    // Equal scores never pair.
    assert!(candidate_pairs(&["x", "y"], &[Some(-1), Some(-1)]).is_empty());
}

#[test]
fn keep_accepted_drops_the_pairs_that_prefer_saying_less() {
    // Answers: 0 names 3 objects, all right; 1 names 1, right; 2 names 4, one wrong; 3 names 2, one wrong.
    let accepted = [3, 1, 3, 1];
    let scores = [Some(0), Some(0), Some(-1), Some(-1)];
    let cands = candidate_pairs(&["a", "b", "c", "d"], &scores);
    assert_eq!(cands, vec![(0, 2), (0, 3), (1, 2), (1, 3)]);
    // (1, 2) would prefer one right object over three right and one wrong: dropped. The rest say as much or more.
    assert_eq!(keep_accepted(&cands, &accepted), vec![(0, 2), (0, 3), (1, 3)]);
}

#[test]
fn pick_pairs_keeps_at_most_k_and_is_a_function_of_the_seed() {
    let cands: Vec<(usize, usize)> = (0..10).map(|i| (i, i + 10)).collect();
    let a = pick_pairs(&cands, 2, 7);
    assert_eq!(a.len(), 2);
    assert_eq!(a, pick_pairs(&cands, 2, 7), "same seed, same pairs");
    assert!(a.iter().all(|p| cands.contains(p)));
    let draws: std::collections::BTreeSet<Vec<(usize, usize)>> = (0..20).map(|s| pick_pairs(&cands, 2, s)).collect();
    assert!(draws.len() > 5, "different seeds draw different pairs");
    assert_eq!(pick_pairs(&cands[..1], 2, 0), vec![cands[0]], "fewer candidates than k: all kept");
}

#[test]
fn length_balance_picks_the_cutoff_that_closes_the_gap() {
    // Chosen answers are shorter in most pairs: (chosen, rejected) words.
    let lens = [(10, 20), (18, 20), (20, 20), (9, 10), (30, 25), (5, 20)];
    let b = length_balance(&lens);
    let gap = |c: f64, r: f64| (c - r).abs();
    assert!(gap(b.mean_chosen_after, b.mean_rejected_after) < gap(b.mean_chosen_before, b.mean_rejected_before));
    // Check the choice by brute force over the same grid.
    let mut best = f64::INFINITY;
    for step in 0..50 {
        let r = step as f64 * 0.02;
        let kept: Vec<_> = lens.iter().filter(|&&(c, j)| (j as f64 - c as f64) <= r * j as f64).collect();
        if kept.is_empty() {
            continue;
        }
        let n = kept.len() as f64;
        let g = gap(kept.iter().map(|p| p.0 as f64).sum::<f64>() / n, kept.iter().map(|p| p.1 as f64).sum::<f64>() / n);
        best = best.min(g);
    }
    assert!((gap(b.mean_chosen_after, b.mean_rejected_after) - best).abs() < 1e-9);
    for (p, k) in lens.iter().zip(&b.keep) {
        assert_eq!(*k, (p.1 as f64 - p.0 as f64) <= b.r * p.1 as f64, "keep rule at r = {}", b.r);
    }
    // Already balanced data keeps everything (the largest r wins ties).
    let even = length_balance(&[(10, 10), (12, 8), (8, 12)]);
    assert!(even.keep.iter().all(|k| *k));
}

#[test]
fn verdicts_read_yes_and_no_mass_and_ties_reject() {
    let yn = YesNoTokens { yes: vec![1, 2], no: vec![3] };
    // p(yes) = p1 + p2 vs p(no) = p3.
    let v = Verdict::from_logits(&[0.0, 1.0, 1.0, 1.5], &yn);
    assert!(v.accepted, "{v:?}");
    assert!((v.p_yes - 2.0 * 1f64.exp() / (1.0 + 2.0 * 1f64.exp() + 1.5f64.exp())).abs() < 1e-6);
    let tie = Verdict::from_logits(&[0.0, 0.0, f32::NEG_INFINITY, 0.0], &YesNoTokens { yes: vec![1], no: vec![3] });
    assert_eq!(tie.p_yes, tie.p_no);
    assert!(!tie.accepted, "a tie rejects the claim");
}

#[test]
fn yes_no_tokens_come_from_the_tokenizer_without_double_counting() {
    let dir = std::env::temp_dir().join(format!("rlaifd-yn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    engine::shapes::build_tokenizer().unwrap().save(&path, false).unwrap();
    let tok = TextTokenizer::from_file(&path).unwrap();
    let yn = YesNoTokens::from_tokenizer(&tok).unwrap();
    // ShapesWorld lower-cases: "Yes" and " yes" are the same token as "yes".
    assert_eq!(yn.yes, vec![tok.token_id("yes").unwrap()]);
    assert_eq!(yn.no, vec![tok.token_id("no").unwrap()]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn batched_branch_logits_match_one_prompt_at_a_time() {
    // Several continuations of different lengths after a shared image prefix, against a full prefill of each.
    for case in ["l15_4x_f32_gqa_tied_lora", "l15_452_f16_mqa_sharded_lora"] {
        let m = Model::load(&fixture(case).join("model")).unwrap();
        let img = m.load_image(&fixture(case).join("image.png")).unwrap();
        let feats = m.image_features(&img, None).unwrap();
        let image = m.image_token_id().unwrap();
        let prefix = vec![1, 5, image, 7, 8];
        let conts: Vec<Vec<u32>> = vec![vec![9], vec![10, 11, 12], vec![13, 14], vec![9, 9, 9, 9, 9]];
        let refs: Vec<&[u32]> = conts.iter().map(|c| c.as_slice()).collect();
        let got = m.branch_logits(&prefix, &refs, Some(&feats), None).unwrap();
        for (c, g) in conts.iter().zip(&got) {
            let full: Vec<u32> = prefix.iter().chain(c).copied().collect();
            let (_, want) = m.prefill(&full, Some(&feats), None).unwrap();
            let err = want.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 1e-4, "{case}: continuation {c:?} differs by {err}");
        }
        assert!(m.branch_logits(&prefix, &[&[][..]], Some(&feats), None).is_err(), "empty continuation");
        assert!(
            m.branch_logits(&prefix, &[&[image][..]], Some(&feats), None).is_err(),
            "image token in a continuation"
        );
    }
}

#[test]
fn shapes_claims_are_exactly_the_mentioned_objects() {
    for text in [
        "There is a red circle, a blue square and an orange cross.",
        "two green triangles and a circle that is purple",
        "The image is empty.",
        "There is a red circle and a red circle.",
    ] {
        let claims = shapes_claims(text);
        let objs: Vec<String> = mentions(text).into_iter().collect();
        assert_eq!(claims.len(), objs.len(), "{text}");
        for (c, o) in claims.iter().zip(&objs) {
            assert!(c.text.contains(o.as_str()) && c.question.contains(o.as_str()), "{c:?} vs {o}");
            assert!(c.question.starts_with("Is there ") && c.question.ends_with(" in the image?"));
            assert_eq!(mentions(&c.question).into_iter().collect::<Vec<_>>(), vec![o.clone()]);
        }
    }
    assert_eq!(shapes_claims("There is an orange cross.")[0].question, "Is there an orange cross in the image?");
}

#[test]
fn rule_extractor_gives_questions_for_general_english() {
    let claims = RuleExtractor.extract("Describe the image.", "The dog is brown. I think it looks lovely.").unwrap();
    assert!(!claims.is_empty());
    assert!(claims.iter().all(|c| c.question.ends_with('?')), "{claims:?}");
    assert!(claims.iter().all(|c| !c.text.to_lowercase().contains("lovely")), "opinions are dropped: {claims:?}");
}

#[test]
fn labeler_verdicts_equal_one_question_at_a_time() {
    use engine::feedback::verify::Labeler;
    use engine::tokenizer::{apply_template, LLAVA_15_TEMPLATE};
    let case = fixture("l15_4x_f32_gqa_tied_lora");
    let m = Model::load(&case.join("model")).unwrap();
    let tok = TextTokenizer::from_file(&case.join("model/tokenizer.json")).unwrap();
    let img = m.load_image(&case.join("image.png")).unwrap();
    let adapter = m.load_adapter(&case.join("adapter")).unwrap();
    let labeler = Labeler::new(&m, Some(&adapter), &tok, LLAVA_15_TEMPLATE).unwrap();
    let questions: Vec<String> =
        ["is the box red ?", "is there a circle ?", "what color is the box ?"].iter().map(|s| s.to_string()).collect();
    let got = labeler.verify(Some(&img), &questions).unwrap();
    let feats = m.image_features(&img, Some(&adapter)).unwrap();
    for (q, v) in questions.iter().zip(&got) {
        let ids = tok.encode(&apply_template(LLAVA_15_TEMPLATE, &format!("{q}{}", labeler.suffix)), true).unwrap();
        let (_, logits) = m.prefill(&ids, Some(&feats), Some(&adapter)).unwrap();
        let want = Verdict::from_logits(&logits, &labeler.yes_no);
        assert!((want.p_yes - v.p_yes).abs() < 1e-5 && (want.p_no - v.p_no).abs() < 1e-5, "{q}: {v:?} vs {want:?}");
        assert_eq!(want.accepted, v.accepted);
    }
    assert!(labeler.verify(Some(&img), &[]).unwrap().is_empty());
    // The fixture's word-level vocabulary cannot spell "answer": the suffix is left out rather than fed as <unk>.
    assert_eq!(labeler.suffix, "");
}

#[test]
fn llm_extractor_runs_a_text_model_and_is_deterministic() {
    use engine::feedback::claims::LlmExtractor;
    let case = fixture("llama_text_only");
    let m = Model::load(&case.join("model")).unwrap();
    let tok = TextTokenizer::from_file(&case.join("model/tokenizer.json")).unwrap();
    let ex = LlmExtractor {
        model: &m,
        adapter: None,
        tokenizer: &tok,
        source: "fixture".into(),
        max_new_tokens: 12,
        prompts: Default::default(),
    };
    let a = ex.extract("describe", "the box is red . the ball is blue .").unwrap();
    assert_eq!(a, ex.extract("describe", "the box is red . the ball is blue .").unwrap(), "greedy: same claims");
    assert!(a.iter().all(|c| c.question.ends_with('?')), "{a:?}");
    assert!(ex.extract("describe", "   ").unwrap().is_empty());
    assert_eq!(ex.name(), "llm:fixture");
    // All answers of a prompt in one batch give what each gives alone; a blank answer has no claims.
    let answers =
        ["the box is red . the ball is blue .", "", "the ball is red .", "the box is red . the ball is blue ."];
    let batch = ex.extract_all("describe", &answers).unwrap();
    let alone: Vec<Vec<Claim>> = answers.iter().map(|a| ex.extract("describe", a).unwrap()).collect();
    assert_eq!(batch, alone);
    assert!(batch[1].is_empty());
    // A listing cut off after one token has no complete line: no claims, and no error.
    let short = LlmExtractor { max_new_tokens: 1, ..ex };
    assert!(short.extract_all("describe", &answers).unwrap().iter().all(|c| c.is_empty()));
}

#[test]
fn labeler_keeps_the_yes_no_suffix_when_the_tokenizer_can_spell_it() {
    use engine::feedback::verify::{Labeler, YES_NO_SUFFIX};
    use tokenizers::models::wordlevel::WordLevel;
    let words = ["<unk>", "please", "answer", "yes", "or", "no", "."];
    let vocab: std::collections::HashMap<String, u32> =
        words.iter().enumerate().map(|(i, w)| (w.to_string(), i as u32)).collect();
    let mut t = tokenizers::Tokenizer::new(
        WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token("<unk>".into()).build().unwrap(),
    );
    t.with_normalizer(Some(tokenizers::normalizers::utils::Lowercase));
    t.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
    let dir = std::env::temp_dir().join(format!("rlaifd-suffix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    t.save(&path, false).unwrap();
    let tok = TextTokenizer::from_file(&path).unwrap();
    let m = Model::load(&fixture("l15_4x_f32_gqa_tied_lora").join("model")).unwrap();
    let labeler = Labeler::new(&m, None, &tok, "{prompt}").unwrap();
    assert_eq!(labeler.suffix, YES_NO_SUFFIX);
    std::fs::remove_dir_all(&dir).ok();
}

/// A sampled answer that holds the image token (a policy can emit it) is left unlabeled and never paired, so the
/// prompt's other answers still make pairs and no reference scoring of it is attempted.
#[test]
fn an_answer_holding_the_image_token_is_never_paired() {
    use engine::feedback::claims::ShapesExtractor;
    use engine::feedback::pipeline::{label_answers, LabeledAnswer};
    use engine::feedback::verify::Labeler;
    use engine::generate::FinishReason;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/shapes-base");
    let m = Model::load(&dir).unwrap();
    let tok = TextTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let image = m.image_token_id().unwrap();
    let px = m.load_image(&fixture("l15_4x_f32_gqa_tied_lora").join("image.png")).unwrap();
    let labeler = Labeler::new(&m, None, &tok, engine::tokenizer::LLAVA_15_TEMPLATE).unwrap();
    let answer = |text: &str, extra: Option<u32>| {
        let mut tokens = tok.encode(text, false).unwrap();
        tokens.extend(extra);
        LabeledAnswer {
            seed: 0,
            text: text.into(),
            tokens,
            finish: FinishReason::Stop,
            claims: Vec::new(),
            verdicts: Vec::new(),
            score: None,
        }
    };
    let answers = vec![
        answer("there is a red circle .", None),
        answer("there is a green square and a blue triangle .", Some(image)),
        answer("there is a yellow star and a purple cross .", None),
        answer("there is a red circle and a green square .", None),
    ];
    let fb = label_answers(&labeler, &ShapesExtractor, Some(&px), "describe the image .", answers, 6, 0).unwrap();
    assert!(fb.answers[1].claims.is_empty() && fb.answers[1].score.is_none(), "{:?}", fb.answers[1]);
    assert!(fb.pairs.iter().all(|&(c, r)| c != 1 && r != 1), "{:?}", fb.pairs);
    assert!(fb.answers.iter().enumerate().filter(|(i, _)| *i != 1).all(|(_, a)| a.score.is_some()));
}
