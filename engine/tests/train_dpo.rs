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
        let f =
            |pc: f64, pr: f64| pair_loss(cfg, &PairLogps { policy_chosen: pc, policy_rejected: pr, ..base }, 5, 9).0;
        let nc = (f(base.policy_chosen + h, base.policy_rejected) - f(base.policy_chosen - h, base.policy_rejected))
            / (2.0 * h);
        let nr = (f(base.policy_chosen, base.policy_rejected + h) - f(base.policy_chosen, base.policy_rejected - h))
            / (2.0 * h);
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
    let questions = [
        "is there a red circle ?",
        "is there a blue square ?",
        "do you see a cat ?",
        "is it dark ?",
        "is there a tree ?",
        "what color is the box ?",
    ];
    questions
        .iter()
        .map(|q| (enc(&format!("USER : {q} ASSISTANT :"), true), enc("yes , it is .", false), enc("no .", false)))
        .collect()
}

#[test]
fn dpo_learns_a_preference_and_the_adapter_round_trips() {
    let model = Model::load(&fixture("llama_text_only").join("model")).unwrap();
    let owned = preference_pairs(&model);
    let pairs: Vec<TokenPair> = owned
        .iter()
        .map(|(p, c, r)| TokenPair { pixels: None, prompt_ids: p, chosen_ids: c, rejected_ids: r })
        .collect();
    let spec = LoraSpec {
        r: 4,
        lora_alpha: 8.0,
        target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into(), "down_proj".into()]),
        ..Default::default()
    };
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
    println!(
        "loss {:.4} -> {:.4}, margin {:.4} -> {:.4}",
        first.loss, last_epoch[1].loss, first.reward_margin, last_epoch[1].reward_margin
    );

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
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
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

#[test]
fn lora_dropout_gradients_match_finite_differences() {
    use engine::train::dpo::pair_forward_backward;
    use engine::train::Grads;
    let grad_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/grad/llama_text_only");
    let model = Model::load(&fixture("llama_text_only").join("model")).unwrap();
    let mut adapter = model.load_adapter(&grad_dir.join("adapter")).unwrap();
    let owned = preference_pairs(&model);
    let (p, c, r) = &owned[0];
    let pair = TokenPair { pixels: None, prompt_ids: p, chosen_ids: c, rejected_ids: r };
    let refs = precompute_references(&model, None, std::slice::from_ref(&pair)).unwrap()[0];
    let cfg = DpoConfig { beta: 0.5, ..Default::default() };
    let loss_with = |ad: &engine::Adapter, seed: Option<u64>| {
        let mut g = Grads::zeros_like(ad);
        let (l, _) = pair_forward_backward(&model, ad, &pair, refs, &cfg, 1.0, &mut g, seed).unwrap();
        (l, g)
    };
    let (l_plain, _) = loss_with(&adapter, None);
    adapter.lora_dropout = 0.3;
    let (l_none, _) = loss_with(&adapter, None);
    assert_eq!(l_plain, l_none, "no seed, no dropout");
    let seed = Some(42);
    let (l0, grads) = loss_with(&adapter, seed);
    assert_ne!(l0, l_plain, "dropout changes the loss");
    assert_eq!(loss_with(&adapter, seed).0, l0, "same seed, same masks");
    // Finite differences through the dropped-out branch, in layer 0 (its gradient also flows back through
    // layer 1's masked LoRA input) and layer 1.
    let tensors: Vec<(String, Vec<f32>)> =
        grads.named_tensors(&adapter).into_iter().map(|(k, _, v)| (k, v.to_vec())).collect();
    let mut checked = 0;
    for (name, module) in [
        ("language_model.layers.0.self_attn.q_proj", true),
        ("language_model.layers.0.mlp.up_proj", false),
        ("language_model.layers.1.mlp.down_proj", true),
    ] {
        let (ka, kb) = adapter.module(name).unwrap().keys.clone();
        let key = if module { kb } else { ka };
        let g = &tensors.iter().find(|(k, _)| *k == key).unwrap().1;
        let idx = g.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap().0;
        let h = 1e-3f32;
        let bump = |ad: &mut engine::Adapter, d: f32| {
            let m = ad.module_mut(name).unwrap();
            if module {
                m.b[idx] += d
            } else {
                m.a[idx] += d
            }
        };
        bump(&mut adapter, h);
        let lp = loss_with(&adapter, seed).0;
        bump(&mut adapter, -2.0 * h);
        let lm = loss_with(&adapter, seed).0;
        bump(&mut adapter, h);
        let numeric = (lp - lm) / (2.0 * h as f64);
        let rel = (numeric - g[idx] as f64).abs() / numeric.abs().max(1e-6);
        println!("{key}[{idx}]: analytic {} numeric {numeric} (rel {rel:.1e})", g[idx]);
        assert!(rel < 1e-3, "{key}: analytic {} vs numeric {numeric}", g[idx]);
        checked += 1;
    }
    assert_eq!(checked, 3);
}

#[test]
fn trainable_projector_is_saved_as_modules_to_save_and_gets_correct_gradients() {
    use engine::train::dpo::pair_forward_backward;
    use engine::train::Grads;
    let case = fixture("l15_452_f16_mqa_sharded_lora");
    let model = Model::load(&case.join("model")).unwrap();
    let spec = LoraSpec { r: 2, modules_to_save: vec!["multi_modal_projector".into()], ..Default::default() };
    let mut adapter = model.create_adapter(&spec, 3).unwrap();
    let saved: Vec<(String, String)> = adapter.saved_params().map(|(n, p)| (n.to_string(), p.key.clone())).collect();
    assert_eq!(saved.len(), 4, "linear_1/linear_2 weight and bias: {saved:?}");
    assert!(
        saved.iter().all(|(_, k)| k.starts_with("base_model.model.model.multi_modal_projector.linear_")),
        "{saved:?}"
    );
    // A fresh adapter (B = 0, projector = base copy) is the identity.
    let px = model.load_image(&case.join("image.png")).unwrap();
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("expected.json")).unwrap()).unwrap();
    let ids: Vec<u32> = exp["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let base = model.logprobs(&ids, Some(&px), None).unwrap();
    let fresh = model.logprobs(&ids, Some(&px), Some(&adapter)).unwrap();
    assert!(base.iter().zip(&fresh).all(|(a, b)| (a - b).abs() < 1e-5));

    // Finite differences on a projector weight element through the DPO loss.
    let tok = engine::tokenizer::TextTokenizer::from_file(&model.dir.join("tokenizer.json")).unwrap();
    let mut prompt = tok.encode("USER :", true).unwrap();
    prompt.push(model.image_token_id().unwrap());
    prompt.extend(tok.encode("is there a red circle ? ASSISTANT :", false).unwrap());
    let (c, r) = (tok.encode("yes , a red circle .", false).unwrap(), tok.encode("no .", false).unwrap());
    let pair = TokenPair { pixels: Some(&px), prompt_ids: &prompt, chosen_ids: &c, rejected_ids: &r };
    // Give B some weight so the policy differs from the reference.
    for name in adapter.module_names().iter().map(|s| s.to_string()).collect::<Vec<_>>() {
        let m = adapter.module_mut(&name).unwrap();
        m.b.iter_mut().enumerate().for_each(|(i, v)| *v = ((i % 7) as f32 - 3.0) * 0.05);
    }
    let refs = precompute_references(&model, None, std::slice::from_ref(&pair)).unwrap()[0];
    let cfg = DpoConfig::default();
    let loss = |ad: &engine::Adapter| {
        let mut g = Grads::zeros_like(ad);
        let (l, _) = pair_forward_backward(&model, ad, &pair, refs, &cfg, 1.0, &mut g, None).unwrap();
        (l, g)
    };
    let (_, g) = loss(&adapter);
    let gw = g.param("multi_modal_projector.linear_1.weight").unwrap().to_vec();
    let idx = gw.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap().0;
    let h = 1e-3;
    let bump = |ad: &mut engine::Adapter, d: f32| {
        let p = ad.saved_params_mut().find(|(n, _)| *n == "multi_modal_projector.linear_1.weight").unwrap().1;
        p.values[idx] += d;
    };
    bump(&mut adapter, h);
    let lp = loss(&adapter).0;
    bump(&mut adapter, -2.0 * h);
    let lm = loss(&adapter).0;
    bump(&mut adapter, h);
    let numeric = (lp - lm) / (2.0 * h as f64);
    assert!(
        (numeric - gw[idx] as f64).abs() < 1e-3 * numeric.abs().max(1e-3),
        "projector grad {} vs numeric {numeric}",
        gw[idx]
    );

    // Train a little; the projector moves; save and reload give the same outputs.
    let refs_all = vec![refs];
    let tcfg = TrainConfig { dpo: cfg, epochs: 3, batch_size: 1, seed: 0 };
    let mut opt = AdamW::new(AdamWConfig { lr: 1e-2, total_steps: 3, ..Default::default() });
    let before = adapter.saved_param("multi_modal_projector.linear_2.weight").unwrap().to_vec();
    train_dpo(&model, &mut adapter, std::slice::from_ref(&pair), &refs_all, &tcfg, &mut opt, None, |_| {}).unwrap();
    assert_ne!(before, adapter.saved_param("multi_modal_projector.linear_2.weight").unwrap());
    let dir = std::env::temp_dir().join(format!("rlaifd-projector-{}", std::process::id()));
    adapter.save(&dir, &model.dir, &[]).unwrap();
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["modules_to_save"], serde_json::json!(["multi_modal_projector"]));
    let loaded = model.load_adapter(&dir).unwrap();
    assert_eq!(
        model.logprobs(&ids, Some(&px), Some(&adapter)).unwrap(),
        model.logprobs(&ids, Some(&px), Some(&loaded)).unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Full-parameter DPO (`LoraSpec::full_parameter`, `train-dpo --full-parameter`, `loop.tuning = "full"`): every
/// linear layer of the language model and the projector is trained whole, nothing of the vision tower; the
/// gradient of each kind of layer matches a central finite difference of the DPO loss along the gradient itself
/// (|g| = dL/dt of L(w + t g/|g|)); training moves the policy toward the chosen answer; the checkpoint reloads.
#[test]
fn full_parameter_dpo_trains_every_language_model_linear_with_correct_gradients() {
    use engine::train::dpo::pair_forward_backward;
    use engine::train::Grads;
    let case = fixture("l15_452_f16_mqa_sharded_lora");
    let model = Model::load(&case.join("model")).unwrap();
    let mut adapter = model.create_adapter(&model.full_parameter_spec(), 5).unwrap();
    assert!(adapter.module_names().is_empty(), "no LoRA factors: {:?}", adapter.module_names());
    let saved: Vec<String> = adapter.saved_params().map(|(n, _)| n.to_string()).collect();
    let layers = model.config.text().num_hidden_layers;
    for l in 0..layers {
        for proj in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            let name = format!("language_model.layers.{l}.{proj}.weight");
            assert!(saved.contains(&name), "{name} is not trained: {saved:?}");
        }
    }
    for name in ["multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.bias"] {
        assert!(saved.contains(&name.to_string()), "{name} is not trained: {saved:?}");
    }
    assert!(!saved.iter().any(|n| n.starts_with("vision_tower.")), "the vision tower stays frozen: {saved:?}");

    let px = model.load_image(&case.join("image.png")).unwrap();
    let tok = engine::tokenizer::TextTokenizer::from_file(&model.dir.join("tokenizer.json")).unwrap();
    let mut prompt = tok.encode("USER :", true).unwrap();
    prompt.push(model.image_token_id().unwrap());
    prompt.extend(tok.encode("is there a red circle ? ASSISTANT :", false).unwrap());
    let (c, r) = (tok.encode("yes , a red circle .", false).unwrap(), tok.encode("no .", false).unwrap());
    let pair = TokenPair { pixels: Some(&px), prompt_ids: &prompt, chosen_ids: &c, rejected_ids: &r };
    let refs = precompute_references(&model, None, std::slice::from_ref(&pair)).unwrap()[0];
    // A fresh full adapter is the base model: its log-probs equal the reference's.
    let fresh = engine::train::dpo::reference_logps(&model, Some(&adapter), &pair).unwrap();
    assert!((fresh.0 - refs.0).abs() < 1e-4 && (fresh.1 - refs.1).abs() < 1e-4, "{fresh:?} vs {refs:?}");

    let cfg = DpoConfig { nll_weight: 1.0, ..DpoConfig::default() };
    let loss = |ad: &engine::Adapter| {
        let mut g = Grads::zeros_like(ad);
        let (l, _) = pair_forward_backward(&model, ad, &pair, refs, &cfg, 1.0, &mut g, None).unwrap();
        (l, g)
    };
    let (_, g) = loss(&adapter);
    let last = layers - 1;
    for name in [
        "language_model.layers.0.self_attn.q_proj.weight".to_string(),
        format!("language_model.layers.{last}.self_attn.v_proj.weight"),
        format!("language_model.layers.{last}.mlp.down_proj.weight"),
        "multi_modal_projector.linear_1.weight".to_string(),
    ] {
        let gw = g.param(&name).unwrap().to_vec();
        let norm = gw.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        assert!(norm > 1e-6, "{name}: no gradient");
        let h = 1e-2;
        let moved = |t: f64| {
            let mut ad = adapter.clone();
            let p = ad.saved_params_mut().find(|(n, _)| *n == name).unwrap().1;
            p.values.iter_mut().zip(&gw).for_each(|(w, gi)| *w += (t * *gi as f64 / norm) as f32);
            loss(&ad).0
        };
        let numeric = (moved(h) - moved(-h)) / (2.0 * h);
        assert!((numeric - norm).abs() < 2e-2 * norm, "{name}: |g| {norm} vs finite difference {numeric}");
    }

    // Training raises the chosen answer's margin over the rejected one; the checkpoint reloads exactly.
    let tcfg = TrainConfig { dpo: cfg, epochs: 5, batch_size: 1, seed: 0 };
    let mut opt = AdamW::new(AdamWConfig { lr: 1e-3, total_steps: 5, ..Default::default() });
    let mut margins = Vec::new();
    train_dpo(&model, &mut adapter, std::slice::from_ref(&pair), &[refs], &tcfg, &mut opt, None, |s| {
        margins.push(s.reward_margin)
    })
    .unwrap();
    let after = engine::train::dpo::reference_logps(&model, Some(&adapter), &pair).unwrap();
    assert!(
        (after.0 - refs.0) - (after.1 - refs.1) > 0.5,
        "the policy should prefer the chosen answer after training: {after:?} vs reference {refs:?} (margins {margins:?})"
    );
    let dir = std::env::temp_dir().join(format!("rlaifd-full-{}", std::process::id()));
    adapter.save(&dir, &model.dir, &[]).unwrap();
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["target_modules"], serde_json::json!([]));
    let loaded = model.load_adapter(&dir).unwrap();
    assert!(loaded.module_names().is_empty());
    let ids: Vec<u32> = prompt.iter().chain(&c).copied().collect();
    assert_eq!(
        model.logprobs(&ids, Some(&px), Some(&adapter)).unwrap(),
        model.logprobs(&ids, Some(&px), Some(&loaded)).unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
