//! Training behaviour: the loss variants' derivatives, DPO learning a preference, adapter save/load round
//! trip, and the optimizer schedule.

use engine::adapter::{LoraSpec, TargetModules};
use engine::train::dpo::{pair_loss, DpoConfig, DpoLoss, PairLogps, TokenPair};
use engine::train::optim::{AdamW, AdamWConfig};
use engine::train::trainer::{precompute_references, train_dpo, TrainConfig};
use engine::Model;
use std::path::{Path, PathBuf};

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llava").join(case)
}

#[test]
fn loss_derivatives_match_finite_differences() {
    let base = PairLogps { policy_chosen: -12.3, policy_rejected: -9.1, ref_chosen: -12.0, ref_rejected: -9.8 };
    let configs = [
        DpoConfig { beta: 0.1, loss: DpoLoss::Sigmoid, label_smoothing: 0.0, nll_weight: 0.0 },
        DpoConfig { beta: 0.5, loss: DpoLoss::Sigmoid, label_smoothing: 0.2, nll_weight: 0.0 },
        DpoConfig { beta: 0.3, loss: DpoLoss::Ipo, label_smoothing: 0.0, nll_weight: 0.0 },
        DpoConfig { beta: 0.7, loss: DpoLoss::LengthNormalized, label_smoothing: 0.1, nll_weight: 0.0 },
        DpoConfig { beta: 0.1, loss: DpoLoss::Sigmoid, label_smoothing: 0.0, nll_weight: 0.5 },
    ];
    for cfg in &configs {
        let (_, dc, dr) = pair_loss(cfg, &base, 5, 9);
        let h = 1e-5;
        let f = |pc: f64, pr: f64| pair_loss(cfg, &PairLogps { policy_chosen: pc, policy_rejected: pr, ..base }, 5, 9).0;
        let nc = (f(base.policy_chosen + h, base.policy_rejected) - f(base.policy_chosen - h, base.policy_rejected)) / (2.0 * h);
        let nr = (f(base.policy_chosen, base.policy_rejected + h) - f(base.policy_chosen, base.policy_rejected - h)) / (2.0 * h);
        assert!((dc - nc).abs() < 1e-7 && (dr - nr).abs() < 1e-7, "{cfg:?}: ({dc}, {dr}) vs ({nc}, {nr})");
    }
    // DPO at zero margin is log 2, and IPO is minimised where the log-ratio gap equals 1/(2 beta).
    let zero = PairLogps { policy_chosen: -3.0, policy_rejected: -4.0, ref_chosen: -3.0, ref_rejected: -4.0 };
    assert!((pair_loss(&configs[0], &zero, 1, 1).0 - std::f64::consts::LN_2).abs() < 1e-12);
    let at_target = PairLogps { policy_chosen: -3.0 + 1.0 / 0.6, ..zero };
    assert!(pair_loss(&configs[2], &at_target, 1, 1).0.abs() < 1e-12);
}

#[test]
fn cosine_schedule_with_warmup() {
    let cfg = AdamWConfig { lr: 1.0, warmup_steps: 4, total_steps: 14, ..Default::default() };
    assert_eq!(cfg.lr_at(0), 0.0);
    assert_eq!(cfg.lr_at(3), 0.75);
    assert_eq!(cfg.lr_at(4), 1.0);
    assert!((cfg.lr_at(9) - 0.5).abs() < 1e-12, "half-way through the decay");
    assert!(cfg.lr_at(13) < 0.03 && cfg.lr_at(13) > 0.0);
}

/// Pairs over the tiny word vocabulary where "yes ." is always preferred to "no ." after a question.
fn preference_pairs(model: &Model) -> Vec<(Vec<u32>, Vec<u32>, Vec<u32>)> {
    let tok = engine::tokenizer::TextTokenizer::from_file(&model.dir.join("tokenizer.json")).unwrap();
    let enc = |s: &str, special| tok.encode(s, special).unwrap();
    let questions = ["is there a red circle ?", "is there a blue square ?", "do you see a cat ?", "is it dark ?", "is there a tree ?", "what color is the box ?"];
    questions
        .iter()
        .map(|q| (enc(&format!("USER : {q} ASSISTANT :"), true), enc("yes , it is .", false), enc("no .", false)))
        .collect()
}

#[test]
fn dpo_learns_a_preference_and_the_adapter_round_trips() {
    let model = Model::load(&fixture("llama_text_only").join("model")).unwrap();
    let owned = preference_pairs(&model);
    let pairs: Vec<TokenPair> = owned.iter().map(|(p, c, r)| TokenPair { pixels: None, prompt_ids: p, chosen_ids: c, rejected_ids: r }).collect();
    let spec = LoraSpec { r: 4, lora_alpha: 8.0, use_rslora: false, lora_dropout: 0.0, target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into(), "down_proj".into()]) };
    let mut adapter = model.create_adapter(&spec, 1).unwrap();
    assert_eq!(adapter.module_names().len(), 6, "q/v/down in 2 layers");
    let refs = precompute_references(&model, None, &pairs).unwrap();
    let cfg = TrainConfig { dpo: DpoConfig::default(), epochs: 15, batch_size: 3, seed: 3 };
    let mut opt = AdamW::new(AdamWConfig { lr: 3e-3, warmup_steps: 2, total_steps: 30, ..Default::default() });
    let mut logs = Vec::new();
    train_dpo(&model, &mut adapter, &pairs, &refs, &cfg, &mut opt, None, |l| logs.push(l.clone())).unwrap();
    assert_eq!(logs.len(), 30);
    let first = &logs[0];
    let last_epoch = &logs[logs.len() - 2..];
    // A fresh adapter is the identity: zero margin (up to the rounding between the cached inference path that
    // scored the reference and the training path), loss log 2.
    assert!((first.loss - std::f64::consts::LN_2).abs() < 1e-6 && first.reward_margin.abs() < 1e-5, "{first:?}");
    for l in last_epoch {
        assert_eq!(l.reward_accuracy, 1.0, "{l:?}");
        assert!(l.reward_margin > 0.5 && l.loss < 0.45, "{l:?}");
    }
    println!("loss {:.4} -> {:.4}, margin {:.4} -> {:.4}", first.loss, last_epoch[1].loss, first.reward_margin, last_epoch[1].reward_margin);

    // Save as a PEFT directory and load it back: same tensors, same log-probs.
    let dir = std::env::temp_dir().join(format!("rlaifd-train-dpo-{}", std::process::id()));
    adapter.save(&dir, &model.dir, &[]).unwrap();
    let loaded = model.load_adapter(&dir).unwrap();
    let ids: Vec<u32> = owned[0].0.iter().chain(&owned[0].1).copied().collect();
    let a = model.logprobs(&ids, None, Some(&adapter)).unwrap();
    let b = model.logprobs(&ids, None, Some(&loaded)).unwrap();
    assert_eq!(a, b);
    let base = model.logprobs(&ids, None, None).unwrap();
    assert!(a.iter().zip(&base).any(|(x, y)| (x - y).abs() > 1e-3), "training changed nothing");
    let cfg_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["peft_type"], "LORA");
    assert_eq!(cfg_json["r"], 4);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn new_adapters_follow_peft_naming_and_init() {
    // 4.x checkpoint -> old naming; the regex only hits the language model.
    let model = Model::load(&fixture("l15_4x_f32_gqa_tied_lora").join("model")).unwrap();
    let spec = LoraSpec { r: 8, ..Default::default() };
    let ad = model.create_adapter(&spec, 7).unwrap();
    let mods = ad.modules();
    assert_eq!(mods.len(), 14, "7 projections x 2 layers");
    for (name, m) in &mods {
        assert!(name.starts_with("language_model.layers."), "{name}");
        assert!(m.keys.0.starts_with("base_model.model.language_model.model.layers."), "{}", m.keys.0);
        assert!(m.b.iter().all(|&v| v == 0.0), "B starts at zero");
        let fan_in = m.a.len() / m.r;
        let bound = 1.0 / (fan_in as f32).sqrt();
        assert!(m.a.iter().all(|v| v.abs() <= bound) && m.a.iter().any(|v| v.abs() > 0.5 * bound), "kaiming-uniform A");
    }
    // Names list: "q_proj" also matches the CLIP attention, as peft does.
    let spec = LoraSpec { r: 2, target_modules: TargetModules::Names(vec!["q_proj".into()]), ..Default::default() };
    let ad = model.create_adapter(&spec, 7).unwrap();
    let names = ad.module_names();
    assert_eq!(names.len(), 2 + 3, "2 decoder layers + 3 vision layers");
    let v = ad.modules().into_iter().find(|(n, _)| n.starts_with("vision_tower.")).unwrap().1.keys.0.clone();
    assert!(v.starts_with("base_model.model.vision_tower.vision_model.encoder.layers."), "{v}");
    // A 4.52 checkpoint gets the new naming.
    let model = Model::load(&fixture("l15_452_f16_mqa_sharded_lora").join("model")).unwrap();
    let ad = model.create_adapter(&LoraSpec { r: 2, ..Default::default() }, 7).unwrap();
    assert!(ad.modules()[0].1.keys.0.starts_with("base_model.model.model.language_model.layers."));
    // Targets that match nothing are an error naming them.
    let spec = LoraSpec { r: 2, target_modules: TargetModules::Names(vec!["qkv".into()]), ..Default::default() };
    let err = model.create_adapter(&spec, 7).err().expect("no match").to_string();
    assert!(err.contains("qkv") && err.contains("match no linear layer"), "{err}");
}
