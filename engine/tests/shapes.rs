//! ShapesWorld generator: deterministic, rendered pixels agree with the declared objects, and the
//! instructions' answers are exact (POPE negatives absent, adversarial ones the co-occurring partners).

use engine::shapes::*;

fn scenes(n: u64) -> Vec<(u64, Scene)> {
    let cfg = WorldConfig::default();
    (0..n).map(|s| (s, Scene::generate(&cfg, s))).collect()
}

#[test]
fn generation_is_deterministic_per_seed() {
    let cfg = WorldConfig::default();
    let a = Scene::generate(&cfg, 42);
    assert_eq!(a, Scene::generate(&cfg, 42));
    assert_eq!(a.render(&cfg, 42).into_raw(), Scene::generate(&cfg, 42).render(&cfg, 42).into_raw());
    let differ = (0..20).filter(|&s| Scene::generate(&cfg, s) != Scene::generate(&cfg, s + 1000)).count();
    assert!(differ >= 18, "different seeds give different scenes");
    assert_eq!(instructions(&a, 42), instructions(&a, 42));
}

#[test]
fn rendered_pixels_agree_with_the_objects() {
    let cfg = WorldConfig::default();
    for (seed, scene) in scenes(200) {
        assert!(!scene.objects.is_empty() && scene.objects.len() <= cfg.max_objects);
        let img = scene.render(&cfg, seed);
        for (i, o) in scene.objects.iter().enumerate() {
            // Every shape covers its centre: that pixel is exactly the object's colour.
            let p = img.get_pixel(o.x as u32, o.y as u32).0;
            let want = COLORS[o.color].1;
            let d: i32 = (0..3).map(|c| (p[c] as i32 - want[c] as i32).abs()).max().unwrap();
            assert!(d <= 2, "seed {seed}: {} centre pixel {p:?} vs {want:?}", o.phrase);
            for q in &scene.objects[i + 1..] {
                let dist = ((o.x - q.x).powi(2) + (o.y - q.y).powi(2)).sqrt();
                assert!(dist > o.r + q.r, "seed {seed}: {} and {} overlap", o.phrase, q.phrase);
            }
        }
        // Pixels outside every object's bounding circle are grey background (with mild noise).
        for (x, y, p) in img.enumerate_pixels() {
            let outside = scene
                .objects
                .iter()
                .all(|o| ((x as f32 + 0.5 - o.x).powi(2) + (y as f32 + 0.5 - o.y).powi(2)).sqrt() > o.r + 1.5);
            if outside {
                let [r, g, b] = p.0;
                assert!(
                    r == g && g == b && (190..=210).contains(&r),
                    "seed {seed}: background pixel ({x},{y}) = {:?}",
                    p.0
                );
            }
        }
        // Each object paints a meaningful area of its own colour (it is visible).
        for o in &scene.objects {
            let want = COLORS[o.color].1;
            let area = img.pixels().filter(|p| (0..3).all(|c| (p.0[c] as i32 - want[c] as i32).abs() <= 2)).count();
            assert!(area as f32 >= 0.5 * o.r * o.r, "seed {seed}: {} covers only {area} pixels", o.phrase);
        }
    }
}

#[test]
fn vocabulary_and_partners() {
    let v = vocabulary();
    assert_eq!(v.len(), COLORS.len() * SHAPES.len());
    let unique: std::collections::HashSet<&String> = v.iter().collect();
    assert_eq!(unique.len(), v.len());
    assert!(v.contains(&"red circle".to_string()));
    for o in 0..v.len() {
        assert_ne!(partner(o), o);
        let (a, b) = (&v[o], &v[partner(o)]);
        assert!(a.split(' ').zip(b.split(' ')).all(|(x, y)| x != y), "{a} and its partner {b} share a colour or shape");
    }
}

#[test]
fn partners_co_occur_more_than_chance() {
    // The co-occurrence that makes adversarial negatives (and noisy-caption hallucinations) realistic.
    let mut with_partner = 0;
    let mut multi = 0;
    let v = vocabulary();
    for (_, s) in scenes(2000) {
        if s.objects.len() < 2 {
            continue;
        }
        multi += 1;
        let idx: Vec<usize> = s.phrases().iter().map(|p| v.iter().position(|q| q == p).unwrap()).collect();
        if idx.iter().any(|&o| idx.contains(&partner(o))) {
            with_partner += 1;
        }
    }
    assert!(with_partner as f64 / multi as f64 > 0.5, "{with_partner}/{multi} multi-object scenes hold a partner pair");
}

#[test]
fn instructions_have_exact_answers() {
    let v = vocabulary();
    let mut splits = std::collections::HashMap::new();
    for (seed, scene) in scenes(300) {
        let phrases = scene.phrases();
        let ins = instructions(&scene, seed);
        let cap = &ins[0];
        assert_eq!(cap.kind, "caption");
        assert!(CAPTION_PROMPTS.contains(&cap.prompt.as_str()));
        for p in &phrases {
            assert!(cap.answer.contains(p.as_str()), "caption {:?} misses {p}", cap.answer);
        }
        for i in ins.iter().filter(|i| i.kind == "existence") {
            let obj = i
                .prompt
                .trim_start_matches("Is there ")
                .trim_start_matches("an ")
                .trim_start_matches("a ")
                .trim_end_matches(" in the image?")
                .to_string();
            assert!(v.contains(&obj));
            let present = phrases.contains(&obj);
            assert_eq!(i.answer, if present { "yes" } else { "no" }, "{}", i.prompt);
            let split = i.split.unwrap();
            *splits.entry(split).or_insert(0) += 1;
            if split == "adversarial" {
                let o = v.iter().position(|q| *q == obj).unwrap();
                assert!(
                    phrases.iter().any(|p| partner(v.iter().position(|q| q == p).unwrap()) == o),
                    "adversarial negative {obj} is no partner"
                );
            }
        }
        let count = ins.iter().find(|i| i.kind == "count").unwrap();
        let words = ["zero", "one", "two", "three", "four", "five"];
        assert_eq!(count.answer, words[phrases.len()]);
        if let Some(a) = ins.iter().find(|i| i.kind == "attribute") {
            let shape = a.prompt.trim_start_matches("What color is the ").trim_end_matches('?');
            assert!(phrases.contains(&format!("{} {shape}", a.answer)), "{} -> {}", a.prompt, a.answer);
        }
    }
    for s in ["present", "random", "popular", "adversarial"] {
        assert!(splits.get(s).copied().unwrap_or(0) > 50, "split {s}: {splits:?}");
    }
    assert!(CAPTION_PROMPTS.contains(&"Describe the image."));
}

#[test]
fn tokenizer_covers_every_prompt_and_answer() {
    let tok = build_tokenizer().unwrap();
    let dir = std::env::temp_dir().join(format!("rlaifd-shapes-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    tok.save(&path, true).unwrap();
    let t = engine::tokenizer::TextTokenizer::from_file(&path).unwrap();
    let image = t.token_id("<image>").unwrap();
    assert_eq!(image as usize, words().len() + 4, "<image> is the last id");
    let ids = t
        .encode(&engine::tokenizer::apply_template(engine::tokenizer::LLAVA_15_TEMPLATE, "Describe the image."), true)
        .unwrap();
    assert_eq!(ids[0], 1, "BOS first");
    assert_eq!(ids.iter().filter(|&&i| i == image).count(), 1);
    for (seed, scene) in scenes(200) {
        for i in instructions(&scene, seed) {
            for text in [&i.prompt, &i.answer] {
                let ids = t.encode(text, false).unwrap();
                assert!(!ids.contains(&0), "unknown word in {text:?}");
                assert_eq!(
                    t.decode(&ids).unwrap(),
                    text.to_lowercase().replace('.', " .").replace('?', " ?").replace(',', " ,").trim(),
                    "round trip"
                );
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn noisy_captions_only_add_absent_partners_and_yes_no_answers_stay_exact() {
    use engine::shapes::{caption, noisy_caption, partner, sft_examples, CaptionOrder};
    let v = vocabulary();
    let (mut noisy, mut total, mut with_suffix, mut existence) = (0, 0, 0, 0);
    for (seed, scene) in scenes(1000) {
        let phrases = scene.phrases();
        assert_eq!(
            noisy_caption(&scene, seed, 0.0, CaptionOrder::Canonical).0,
            caption(&scene),
            "no noise: the clean caption"
        );
        let (text, added) = noisy_caption(&scene, seed, 0.7, CaptionOrder::Canonical);
        assert_eq!(
            (text.clone(), added.clone()),
            noisy_caption(&scene, seed, 0.7, CaptionOrder::Canonical),
            "deterministic per seed"
        );
        // Canonical order lists the same names as reading order, sorted by vocabulary index.
        let (reading, added_r) = noisy_caption(&scene, seed, 0.7, CaptionOrder::Reading);
        assert_eq!(added, added_r);
        assert_eq!(engine::hallucination::mentions(&reading), engine::hallucination::mentions(&text));
        let idx: Vec<usize> = text
            .trim_start_matches("There is ")
            .trim_end_matches('.')
            .replace(" and ", ", ")
            .split(", ")
            .map(|n| v.iter().position(|q| n.ends_with(q.as_str())).unwrap())
            .collect();
        assert!(idx.windows(2).all(|w| w[0] < w[1]), "{text} is not in vocabulary order");
        let mentioned = engine::hallucination::mentions(&text);
        for p in &phrases {
            assert!(mentioned.contains(p), "caption {text:?} misses {p}");
        }
        for a in &added {
            assert!(!phrases.contains(a), "{a} is present, not a hallucination");
            let partners: Vec<&String> =
                phrases.iter().map(|p| &v[partner(v.iter().position(|q| q == p).unwrap())]).collect();
            assert!(partners.contains(&a), "{a} is not the partner of a present object in {phrases:?}");
            assert!(mentioned.contains(a));
        }
        assert_eq!(mentioned.len(), phrases.len() + added.len());
        noisy += usize::from(!added.is_empty());
        total += 1;
        let (mut same_color, mut same_shape) = (false, false);
        for (kind, prompt, answer) in sft_examples(&scene, seed, 0.7, CaptionOrder::Canonical) {
            match kind {
                "caption" => assert_eq!(answer, text),
                "existence" => {
                    let obj = engine::hallucination::mentions(&prompt).into_iter().next().unwrap();
                    assert_eq!(answer, if phrases.contains(&obj) { "yes" } else { "no" }, "{prompt}");
                    let (c, s) = obj.split_once(' ').unwrap();
                    let absent = !phrases.contains(&obj);
                    same_color |= absent && phrases.iter().any(|p| p.starts_with(&format!("{c} ")));
                    same_shape |= absent && phrases.iter().any(|p| p.ends_with(&format!(" {s}")));
                    with_suffix += usize::from(prompt.ends_with(engine::feedback::verify::YES_NO_SUFFIX));
                    existence += 1;
                }
                _ => {}
            }
        }
        // Hard negatives: an absent object sharing a present colour, one sharing a present shape (when any is absent).
        assert!(same_color && same_shape, "seed {seed}: no hard negatives for {phrases:?}");
    }
    // Noise 0.7 on strongly co-occurring objects, 0.14 on the others: a realistic minority of captions.
    let share = noisy as f64 / total as f64;
    assert!((0.2..0.6).contains(&share), "{share} of captions hallucinate");
    // Half the existence questions carry the labeler's suffix, so the model answers the labeler as it answers users.
    let suffixed = with_suffix as f64 / existence as f64;
    assert!((0.45..0.55).contains(&suffixed), "{suffixed} of existence questions carry the suffix");
}

#[test]
fn objects_sit_in_distinct_grid_cells_and_captions_read_in_rows() {
    let cfg = WorldConfig::default();
    let cell = cfg.size as f32 / cfg.grid as f32;
    for (seed, scene) in scenes(300) {
        let cells: Vec<(u32, u32)> = scene.objects.iter().map(|o| ((o.x / cell) as u32, (o.y / cell) as u32)).collect();
        for (i, o) in scene.objects.iter().enumerate() {
            let (cx, cy) = cells[i];
            assert!(
                o.x - o.r >= cx as f32 * cell && o.x + o.r <= (cx + 1) as f32 * cell,
                "seed {seed}: {} leaves its cell",
                o.phrase
            );
            assert!(
                o.y - o.r >= cy as f32 * cell && o.y + o.r <= (cy + 1) as f32 * cell,
                "seed {seed}: {} leaves its cell",
                o.phrase
            );
            assert!(!cells[..i].contains(&cells[i]), "seed {seed}: two objects share a cell");
        }
        let order: Vec<(u32, u32)> =
            engine::shapes::reading_order(&scene).iter().map(|o| ((o.y / cell) as u32, (o.x / cell) as u32)).collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "seed {seed}: reading order {order:?}");
    }
}

#[test]
fn labeler_examples_are_balanced_exact_and_ask_about_the_confusions() {
    let (mut yes, mut no, mut same_color, mut binding, mut scenes_n) = (0, 0, 0, 0, 0);
    for (seed, scene) in scenes(500) {
        let phrases = scene.phrases();
        let ex = labeler_examples(&scene, seed);
        assert_eq!(ex, labeler_examples(&scene, seed), "deterministic per seed");
        let mut negatives = Vec::new();
        for (kind, prompt, answer) in ex {
            assert_eq!(kind, "existence");
            assert!(
                prompt.ends_with(engine::feedback::verify::YES_NO_SUFFIX),
                "{prompt}: the labeler's exact question"
            );
            let obj = engine::hallucination::mentions(&prompt).into_iter().next().unwrap();
            assert_eq!(answer, if phrases.contains(&obj) { "yes" } else { "no" }, "{prompt} in {phrases:?}");
            if answer == "yes" {
                yes += 1;
            } else {
                assert!(!negatives.contains(&obj), "{obj} asked twice");
                negatives.push(obj.clone());
                no += 1;
                let (c, s) = obj.split_once(' ').unwrap();
                let col = phrases.iter().any(|p| p.starts_with(&format!("{c} ")));
                same_color += usize::from(col);
                binding += usize::from(col && phrases.iter().any(|p| p.ends_with(&format!(" {s}"))));
            }
        }
        scenes_n += usize::from(!phrases.is_empty());
    }
    assert!(scenes_n > 400);
    // Two yes per present object, up to two no: about balanced.
    assert!((no as f64) > 0.85 * yes as f64 && no <= yes, "{yes} yes, {no} no");
    // Most negatives share a present object's colour; some are binding errors (a present colour on a present shape).
    assert!(same_color as f64 > 0.6 * no as f64, "{same_color} of {no} negatives share a present colour");
    assert!(binding as f64 > 0.1 * no as f64, "{binding} of {no} negatives are binding errors");
}

/// The divide model's tokenizer spells every prompt and listing of its data without an unknown word and keeps a
/// listing's line breaks, and a listing decoded from token ids reads back (`feedback::text::read_claim_listing`)
/// as exactly the exact claims: what the model is trained to write is what the loop takes from it.
#[test]
fn divide_data_tokenizes_and_its_listings_read_back_as_the_exact_claims() {
    let dir = std::env::temp_dir().join(format!("rlaifd-shapes-divide-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    build_divide_tokenizer().unwrap().save(&path, true).unwrap();
    let t = engine::tokenizer::TextTokenizer::from_file(&path).unwrap();
    let newline = t.token_id("\n").expect("a line break token");
    assert_eq!(t.token_id("<image>").unwrap(), newline + 1, "<image> stays last");
    let (mut lists, mut pronouns, mut hedges, mut cut) = (0, 0, 0, 0);
    for (seed, scene) in scenes(300) {
        let (answer, exact) = divide_example(&scene, seed);
        lists += usize::from(answer.contains(" and "));
        pronouns += usize::from(answer.contains("It is"));
        hedges += usize::from(["might", "think", "Perhaps"].iter().any(|h| answer.contains(h)));
        let examples = divide_sft_examples(&scene, seed);
        let (caption, caption_exact) = divide_caption_example(&scene, seed);
        assert_eq!(examples.iter().filter(|e| e.0 == "divide").count(), 2);
        assert!(examples.iter().any(|e| e.1.ends_with(&caption)), "the captioner's form is in the data");
        let truncated = !caption.ends_with('.');
        cut += usize::from(truncated);
        for c in &caption_exact {
            let object = c.trim_start_matches("There is ").trim_start_matches("a ").trim_start_matches("an ");
            assert!(caption.contains(object.trim_end_matches('.')), "{caption:?} names {c:?} in full");
        }
        let mut expected_exact: Vec<&String> = exact.iter().collect();
        for (kind, prompt, target) in &examples {
            if *kind == "divide" && prompt.ends_with(&caption) && caption != answer {
                expected_exact = caption_exact.iter().collect();
            } else if *kind == "divide" {
                expected_exact = exact.iter().collect();
            }
            for text in [prompt, target] {
                let ids = t.encode(text, false).unwrap();
                assert!(!ids.contains(&0), "unknown word in {text:?}");
            }
            if *kind == "divide" {
                let ids = t.encode(target, false).unwrap();
                let lines = expected_exact.len().saturating_sub(1);
                assert_eq!(ids.iter().filter(|&&i| i == newline).count(), lines, "{target:?}");
                let listed = engine::feedback::text::read_claim_listing(&t.decode(&ids).unwrap(), false);
                let norm = |s: &str| s.to_lowercase().replace(" .", ".");
                assert_eq!(
                    listed.iter().map(|c| norm(c)).collect::<Vec<_>>(),
                    expected_exact.iter().map(|c| norm(c)).collect::<Vec<_>>(),
                    "{prompt:?}"
                );
            } else {
                let q = engine::feedback::text::parse_question(&t.decode(&t.encode(target, false).unwrap()).unwrap());
                assert!(q.is_some_and(|q| q.ends_with('?')), "{target:?}");
            }
        }
    }
    assert!(lists > 100 && pronouns > 30 && hedges > 100, "lists {lists}, pronouns {pronouns}, hedges {hedges}");
    assert!((60..140).contains(&cut), "about a third of the captions are cut off: {cut} of 300");
    let _ = std::fs::remove_dir_all(&dir);
}
