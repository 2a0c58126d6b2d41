//! The committed ShapesWorld base model (assets/shapes-base) and RLAIF-V feedback on it, measured against
//! ShapesWorld's exact ground truth: the model hallucinates in captions at a realistic rate while answering
//! yes/no existence questions well (the gap self-feedback exploits), and `rlaifd label` turns that gap into
//! pairs whose chosen answer really hallucinates less.

use engine::hallucination::mentions;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn base_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/shapes-base")
}

fn rlaifd(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_rlaifd")).args(args).output().expect("run rlaifd");
    assert!(out.status.success(), "rlaifd {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rlaifd-shapesfb-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Held-out metrics of the committed model (200 images of seed 1000000, greedy), computed once.
fn eval_report() -> &'static Value {
    static REPORT: OnceLock<Value> = OnceLock::new();
    REPORT.get_or_init(|| {
        let out = rlaifd(&[
            "eval",
            "hallucination",
            "--model",
            base_model().to_str().unwrap(),
            "--seed",
            "1000000",
            "--count",
            "200",
            "--json",
        ]);
        serde_json::from_slice(&out.stdout).expect("eval prints one JSON object")
    })
}

#[test]
fn committed_base_model_hallucinates_in_captions_but_answers_yes_no_well() {
    let r = eval_report();
    let chair_i = r["caption"]["chair_i"].as_f64().unwrap();
    let acc = r["existence"]["accuracy"].as_f64().unwrap();
    println!(
        "CHAIR_i {chair_i:.3}, CHAIR_s {:.3}, existence accuracy {acc:.3}",
        r["caption"]["chair_s"].as_f64().unwrap()
    );
    assert!((0.15..=0.35).contains(&chair_i), "CHAIR_i {chair_i} outside the 15-35 % band");
    assert!(acc >= 0.90, "yes/no existence accuracy {acc} < 0.90");
    for split in ["random", "popular", "adversarial"] {
        let a = r["pope"][split]["accuracy"].as_f64().unwrap();
        assert!(a >= 0.85, "POPE {split} accuracy {a}");
    }
    assert!(r["caption"]["cover"].as_f64().unwrap() >= 0.8, "captions name most of what is there");
}

/// 40 held-out images, one "Describe the image." prompt each; returns (prompts file, objects by image).
fn prompts(dir: &Path) -> (PathBuf, HashMap<String, Vec<String>>) {
    rlaifd(&["shapes", "gen", "--seed", "777000", "--count", "40", "--out", dir.join("img").to_str().unwrap()]);
    let mut truth = HashMap::new();
    let mut lines = String::new();
    for line in std::fs::read_to_string(dir.join("img/index.jsonl")).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let image = format!("img/{}", v["image"].as_str().unwrap());
        let objects: Vec<String> =
            v["objects"].as_array().unwrap().iter().map(|o| o.as_str().unwrap().to_string()).collect();
        lines.push_str(&serde_json::json!({ "image": image, "question": "Describe the image." }).to_string());
        lines.push('\n');
        truth.insert(image, objects);
    }
    let path = dir.join("prompts.jsonl");
    std::fs::write(&path, lines).unwrap();
    (path, truth)
}

fn label(prompts: &Path, out: &Path, seed: &str) {
    rlaifd(&[
        "label",
        "--model",
        base_model().to_str().unwrap(),
        "--labeler",
        "self",
        "--prompts",
        prompts.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--n",
        "8",
        "--seed",
        seed,
        "--max-new-tokens",
        "48",
    ]);
}

fn read_pairs(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn label_writes_replayable_pairs_whose_claims_are_the_mentions_and_feeds_train_dpo() {
    let d = tmp("label");
    let (prompts, truth) = prompts(&d);
    let out = d.join("pairs.jsonl");
    label(&prompts, &out, "5");
    let pairs = read_pairs(&out);
    assert!(pairs.len() >= 5, "only {} pairs from 40 prompts", pairs.len());
    for p in &pairs {
        // The RLAIF-V schema, joined to what produced each pair.
        for k in [
            "image_path",
            "question",
            "chosen",
            "rejected",
            "ref_chosen_logps",
            "ref_rejected_logps",
            "chosen_seed",
            "rejected_seed",
        ] {
            assert!(!p[k].is_null(), "pair lacks {k}: {p}");
        }
        assert!(truth.contains_key(p["image_path"].as_str().unwrap()), "image_path relative to the pairs file");
        let (c, r) = (p["chosen"].as_str().unwrap(), p["rejected"].as_str().unwrap());
        assert_ne!(c.trim(), r.trim());
        // Score = -(rejected claims), chosen higher by at least one.
        for (text, claims, score) in
            [(c, &p["chosen_claims"], &p["chosen_score"]), (r, &p["rejected_claims"], &p["rejected_score"])]
        {
            let claims = claims.as_array().unwrap();
            let claimed: BTreeSet<String> =
                claims.iter().map(|x| mentions(x["claim"].as_str().unwrap()).into_iter().next().unwrap()).collect();
            assert_eq!(claimed, mentions(text), "the claims of {text:?} are exactly its object mentions");
            let rejected = claims.iter().filter(|x| !x["accepted"].as_bool().unwrap()).count() as i64;
            assert_eq!(score.as_i64().unwrap(), -rejected);
            for x in claims {
                let (py, pn) = (x["p_yes"].as_f64().unwrap(), x["p_no"].as_f64().unwrap());
                assert_eq!(x["accepted"].as_bool().unwrap(), py > pn);
            }
        }
        assert!(p["chosen_score"].as_i64().unwrap() > p["rejected_score"].as_i64().unwrap());
    }
    let per_prompt = pairs.iter().fold(HashMap::<i64, usize>::new(), |mut m, p| {
        *m.entry(p["prompt_index"].as_i64().unwrap()).or_default() += 1;
        m
    });
    assert!(per_prompt.values().all(|&n| n <= 2), "at most 2 pairs per prompt");

    // Length balancing narrows the gap between chosen and rejected lengths; the settings are recorded.
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(d.join("pairs.jsonl.meta.json")).unwrap()).unwrap();
    let lb = &meta["summary"]["length_balance"];
    let gap = |a: &str, b: &str| (lb[a].as_f64().unwrap() - lb[b].as_f64().unwrap()).abs();
    assert!(
        gap("mean_words_chosen_after", "mean_words_rejected_after")
            <= gap("mean_words_chosen_before", "mean_words_rejected_before")
    );
    assert_eq!(meta["config"]["seed"], 5);
    assert_eq!(meta["extractor"], "shapes");
    // The device is recorded (auto: the CPU on a machine without a CUDA driver).
    let device = meta["device"].as_str().unwrap_or_default();
    assert!(
        device == "cpu" || (device.starts_with("cuda:") && engine::cuda::driver_status().is_ok()),
        "device {device:?}"
    );

    // Same seed, same pairs, byte for byte; another seed draws other answers.
    let again = d.join("again.jsonl");
    label(&prompts, &again, "5");
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());
    let other = d.join("other.jsonl");
    label(&prompts, &other, "6");
    assert_ne!(std::fs::read(&out).unwrap(), std::fs::read(&other).unwrap());

    // The pairs feed train-dpo directly.
    let adapter = d.join("adapter");
    rlaifd(&[
        "train-dpo",
        "--model",
        base_model().to_str().unwrap(),
        "--pairs",
        out.to_str().unwrap(),
        "--out",
        adapter.to_str().unwrap(),
        "--epochs",
        "1",
        "--r",
        "4",
        "--stop-after",
        "2",
    ]);
    assert!(adapter.join("adapter_model.safetensors").is_file());
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn label_pairs_prefer_answers_that_hallucinate_less() {
    let d = tmp("label-quality");
    let (prompts, truth) = prompts(&d);
    let out = d.join("pairs.jsonl");
    // The RLAIF-V 7B recipe: a stronger labeler than the policy (assets/shapes-labeler; self-labeling is
    // measured in its README: the base model believes its own shape confusions).
    let labeler = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/shapes-labeler");
    rlaifd(&[
        "label",
        "--model",
        base_model().to_str().unwrap(),
        "--labeler",
        labeler.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--n",
        "8",
        "--seed",
        "5",
        "--max-new-tokens",
        "48",
    ]);
    let pairs = read_pairs(&out);
    let hallucinated = |text: &str, objs: &[String]| mentions(text).iter().filter(|m| !objs.contains(m)).count();
    let (mut better, mut verdicts, mut correct) = (0, 0, 0);
    for p in &pairs {
        let objs = &truth[p["image_path"].as_str().unwrap()];
        let (c, r) = (p["chosen"].as_str().unwrap(), p["rejected"].as_str().unwrap());
        better += usize::from(hallucinated(c, objs) < hallucinated(r, objs));
        for claims in [&p["chosen_claims"], &p["rejected_claims"]] {
            for x in claims.as_array().unwrap() {
                let obj = mentions(x["claim"].as_str().unwrap()).into_iter().next().unwrap();
                verdicts += 1;
                correct += usize::from(x["accepted"].as_bool().unwrap() == objs.contains(&obj));
            }
        }
    }
    let share = better as f64 / pairs.len().max(1) as f64;
    let verdict_acc = correct as f64 / verdicts.max(1) as f64;
    let yes_no_acc = eval_report()["existence"]["accuracy"].as_f64().unwrap();
    let out = rlaifd(&[
        "eval",
        "hallucination",
        "--model",
        labeler.to_str().unwrap(),
        "--seed",
        "1000000",
        "--count",
        "200",
        "--json",
    ]);
    let labeler_yes_no: f64 =
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["existence"]["accuracy"].as_f64().unwrap();
    println!("{} pairs, chosen hallucinates less in {:.1} %, verdict accuracy {verdict_acc:.3} (policy yes/no accuracy {yes_no_acc:.3}, labeler's {labeler_yes_no:.3})", pairs.len(), 100.0 * share);
    assert!(pairs.len() >= 10, "only {} pairs from 40 prompts", pairs.len());
    assert!(share >= 0.9, "chosen hallucinates less in only {:.1} % of pairs", 100.0 * share);
    // Verdicts on the policy's claims are at least as accurate as the policy's yes/no answers on POPE questions,
    // and within 2 points (the sample size) of the labeler's own.
    assert!(verdict_acc >= yes_no_acc, "verdict accuracy {verdict_acc} vs the policy's yes/no accuracy {yes_no_acc}");
    assert!(
        verdict_acc >= labeler_yes_no - 0.02,
        "verdict accuracy {verdict_acc} vs the labeler's yes/no accuracy {labeler_yes_no}"
    );
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn label_rejects_bad_input_naming_it_and_writes_nothing() {
    let d = tmp("bad");
    let model = base_model();
    let out = d.join("pairs.jsonl");
    let run = |prompts: &str, extra: &[&str]| {
        let p = d.join("p.jsonl");
        std::fs::write(&p, prompts).unwrap();
        let mut args = vec![
            "label",
            "--model",
            model.to_str().unwrap(),
            "--prompts",
            p.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = Command::new(env!("CARGO_BIN_EXE_rlaifd")).args(&args).output().unwrap();
        assert!(!o.status.success(), "{prompts:?} {extra:?} was accepted");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = run("{\"image\": \"x.png\"}\n", &[]);
    assert!(e.contains("p.jsonl line 1") && e.contains("question"), "{e}");
    let e = run("\n{\"question\": \"Describe the image.\"}\nnot json\n", &[]);
    assert!(e.contains("line 3") && e.contains("not valid JSON"), "{e}");
    let e = run("{\"image\": \"missing.png\", \"question\": \"Describe the image.\"}\n", &[]);
    assert!(e.contains("missing.png"), "{e}");
    let e = run("{\"question\": \"q\"}\n", &["--n", "1"]);
    assert!(e.contains("--n"), "{e}");
    let e = run("{\"question\": \"q\"}\n", &["--extractor", "magic"]);
    assert!(e.contains("--extractor magic"), "{e}");
    assert!(!out.exists(), "a failed run leaves no output");
    std::fs::remove_dir_all(&d).ok();
}
