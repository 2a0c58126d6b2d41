//! The CUDA backend (`engine::backend`) against the CPU backend on the bundled ShapesWorld model, the way the
//! daemon uses it: an image prompt (vision tower on the CPU, decoder on the GPU), a LoRA adapter on every decoder
//! projection applied on the device, greedy and sampled generation through `generate::generate`, and reference
//! scoring through `Model::answer_logp`. An adapter the GPU decoder cannot apply runs on the CPU with identical
//! results; one that changes only the image path keeps the decoder on the GPU. DPO on ShapesWorld pairs with
//! images through `train::trainer::train_dpo` runs on the GPU trainer and follows the CPU trainer, also when paused
//! and resumed on either device, and so does an adapter on the decoder's q_proj and v_proj only; so does LoRA SFT
//! with images. Prints why and passes where no GPU exists.

use engine::adapter::{LoraSpec, TargetModules};
use engine::backend::{select, DeviceSpec};
use engine::generate::{generate, FinishReason, GenerateRequest};
use engine::sampling::SamplingParams;
use engine::shapes::{Scene, WorldConfig};
use engine::tokenizer::{apply_template, TextTokenizer, LLAVA_15_TEMPLATE};
use engine::{Adapter, Model};

mod gpu_common;
use gpu_common::{rel_l2, root, shapes_pairs, Pair};

/// The model in `dir` on CUDA device 0, or None (with the reason printed: the test passes skipped) without a GPU.
/// The bundled model `asset` (under assets/) on the CPU and on the GPU, and its tokenizer; None (skipped) without a
/// GPU.
fn both(asset: &str) -> Option<(Model, Model, TextTokenizer)> {
    let dir = root().join("assets").join(asset);
    let cpu = Model::load(&dir).unwrap();
    let dev = on_gpu(&dir)?;
    let tok = TextTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    Some((cpu, dev, tok))
}

fn on_gpu(dir: &std::path::Path) -> Option<Model> {
    let mut dev = Model::load(dir).unwrap();
    match select(DeviceSpec::Cuda(0), &dev) {
        Ok((b, what)) => {
            println!("backend: {what}");
            dev.set_backend(b);
            Some(dev)
        }
        Err(e) => {
            println!("SKIPPED: no GPU: {e}");
            None
        }
    }
}

/// An adapter on every decoder projection with B uniform in ±`b` (peft starts B at zero, which would hide a LoRA
/// bug).
fn adapter(model: &Model, targets: TargetModules, seed: u64, b: f64) -> Adapter {
    let spec = LoraSpec { r: 8, lora_alpha: 16.0, target_modules: targets, ..LoraSpec::default() };
    let mut a = model.create_adapter(&spec, seed).unwrap();
    let names: Vec<String> = a.module_names().iter().map(|s| s.to_string()).collect();
    let mut rng = engine::rng::SplitMix64::new(seed ^ 0xb);
    for n in names {
        let m = a.module_mut(&n).unwrap();
        m.b.iter_mut().for_each(|v| *v = ((rng.next_f64() * 2.0 - 1.0) * b) as f32);
    }
    a
}

#[test]
fn cuda_backend_matches_the_cpu_backend_on_shapesworld_with_an_image_and_lora() {
    let Some((cpu, dev, tok)) = both("shapes-base") else { return };
    let wc = WorldConfig::default();
    let ip = cpu.image_processor.clone().unwrap();
    let lora = adapter(&cpu, LoraSpec::default().target_modules, 3, 0.05);
    // Strong enough to move every log-prob (B in ±0.3 shifts ShapesWorld's per-token log-probs by 3-9 nats), so a
    // LoRA the GPU ignored or misapplied cannot pass the scoring check below.
    let strong = adapter(&cpu, LoraSpec::default().target_modules, 3, 0.3);
    let ids = tok.encode(&apply_template(LLAVA_15_TEMPLATE, "Describe the image."), true).unwrap();
    let mut worst_mean = 0.0f64;
    for seed in 0..4u64 {
        let scene = Scene::generate(&wc, seed);
        let pixels = engine::image::preprocess(&scene.render(&wc, seed), &ip).unwrap();
        for ad in [None, Some(&lora)] {
            // Greedy: the same tokens.
            let params = SamplingParams { temperature: 0.0, max_new_tokens: 24, ..Default::default() };
            let req = GenerateRequest { ids: &ids, pixels: Some(&pixels), seeds: &[0], params, stop_ids: vec![] };
            let want = generate(&cpu, &req, ad).unwrap().remove(0);
            let got = generate(&dev, &req, ad).unwrap().remove(0);
            println!(
                "scene {seed} lora {}: CPU {:?} GPU {:?}",
                ad.is_some(),
                tok.decode(&want.tokens).unwrap(),
                tok.decode(&got.tokens).unwrap()
            );
            assert_eq!(
                (&got.tokens, got.finish),
                (&want.tokens, want.finish),
                "scene {seed}, lora {}: greedy answers differ",
                ad.is_some()
            );
            // Reference scoring of that answer: per-token mean log-prob within 5e-2.
            let feats = cpu.image_features(&pixels, ad).unwrap();
            let lw = cpu.answer_logp(&ids, &want.tokens, Some(&feats), ad).unwrap();
            let lg = dev.answer_logp(&ids, &want.tokens, Some(&feats), ad).unwrap();
            let mean = (lg - lw).abs() / want.tokens.len().max(1) as f64;
            worst_mean = worst_mean.max(mean);
            assert!(mean <= 5e-2, "scene {seed}: answer log-prob {lg} on the GPU, {lw} on the CPU");
            if ad.is_none() {
                let n = want.tokens.len().max(1) as f64;
                let base = cpu.answer_logp(&ids, &want.tokens, Some(&feats), None).unwrap();
                let sw = cpu.answer_logp(&ids, &want.tokens, Some(&feats), Some(&strong)).unwrap();
                let sg = dev.answer_logp(&ids, &want.tokens, Some(&feats), Some(&strong)).unwrap();
                assert!(
                    (sw - base).abs() / n > 0.5,
                    "scene {seed}: the strong adapter barely moves the log-probs ({base} vs {sw})"
                );
                let d = (sg - sw).abs() / n;
                worst_mean = worst_mean.max(d);
                assert!(d <= 5e-2, "scene {seed}, strong adapter: answer log-prob {sg} on the GPU, {sw} on the CPU");
            }
        }
    }
    println!("worst per-token |log-prob difference| {worst_mean:.2e}");
    // Sampling n = 6: every answer ends as the CPU backend's would (stop token unrecorded, or the length cap),
    // and the same seeds give the same answers again.
    let scene = Scene::generate(&wc, 9);
    let pixels = engine::image::preprocess(&scene.render(&wc, 9), &ip).unwrap();
    let params = SamplingParams { temperature: 0.7, max_new_tokens: 20, ..Default::default() };
    let seeds = [11u64, 12, 13, 14, 15, 16];
    let req =
        GenerateRequest { ids: &ids, pixels: Some(&pixels), seeds: &seeds, params: params.clone(), stop_ids: vec![] };
    let a = generate(&dev, &req, Some(&lora)).unwrap();
    let b = generate(&dev, &req, Some(&lora)).unwrap();
    let eos = cpu.llm.cfg.eos_token_ids.clone();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.tokens, y.tokens, "seed {}: sampling is not repeatable", x.seed);
        assert!(!x.tokens.iter().any(|t| eos.contains(t)), "an answer holds the stop token");
        assert!(
            x.finish == FinishReason::Stop || x.tokens.len() == 20,
            "seed {}: {:?} after {} tokens",
            x.seed,
            x.finish,
            x.tokens.len()
        );
    }
    // An adapter with LoRA on the lm_head is not for the GPU decoder: it runs on the CPU, token for token.
    let head = adapter(&cpu, TargetModules::Names(vec!["q_proj".into(), "lm_head".into()]), 5, 0.05);
    assert!(head.module("lm_head").is_some(), "the adapter should carry lm_head: {:?}", head.module_names());
    let req = GenerateRequest { ids: &ids, pixels: Some(&pixels), seeds: &seeds, params, stop_ids: vec![] };
    let want = generate(&cpu, &req, Some(&head)).unwrap();
    let got = generate(&dev, &req, Some(&head)).unwrap();
    assert_eq!(got.iter().map(|a| &a.tokens).collect::<Vec<_>>(), want.iter().map(|a| &a.tokens).collect::<Vec<_>>());
    // An adapter on the decoder and the image path (vision tower and projector) runs wholly on the device: its image
    // features come from the GPU image path (within fp16 rounding of the CPU's, not bit-equal as a CPU fallback's
    // would be), and the greedy answer is the CPU's.
    let both_parts =
        adapter(&cpu, TargetModules::Regex(r".*(q_proj|v_proj|out_proj|fc1|linear_1|down_proj)".into()), 7, 0.05);
    let want = cpu.image_features(&pixels, Some(&both_parts)).unwrap();
    let got = dev.image_features(&pixels, Some(&both_parts)).unwrap();
    let e = rel_l2(&got, &want);
    println!("image features under a vision + decoder adapter through the backend: rel L2 {e:.2e}");
    assert!(e <= 1e-2 && e > 0.0, "image features under the adapter: rel L2 {e} (0 means the CPU computed them)");
    let params = SamplingParams { temperature: 0.0, max_new_tokens: 24, ..Default::default() };
    let req = GenerateRequest { ids: &ids, pixels: Some(&pixels), seeds: &[0], params, stop_ids: vec![] };
    assert_eq!(
        generate(&dev, &req, Some(&both_parts)).unwrap()[0].tokens,
        generate(&cpu, &req, Some(&both_parts)).unwrap()[0].tokens
    );
    // An adapter on the image path only leaves the decoder on the device, without LoRA: the answer's log-prob is
    // within fp16 rounding of the CPU's, not bit-equal as a CPU fallback's would be.
    let vision_only = adapter(&cpu, TargetModules::Regex(r".*(vision_tower.*(q_proj|fc1)|linear_1)".into()), 9, 0.05);
    assert!(
        vision_only.module_names().iter().all(|n| engine::cuda_clip::in_image_path(n)),
        "{:?}",
        vision_only.module_names()
    );
    let want = generate(&cpu, &req, Some(&vision_only)).unwrap().remove(0);
    assert_eq!(
        generate(&dev, &req, Some(&vision_only)).unwrap()[0].tokens,
        want.tokens,
        "an image-path-only adapter: greedy answers differ"
    );
    let feats = cpu.image_features(&pixels, Some(&vision_only)).unwrap();
    let lw = cpu.answer_logp(&ids, &want.tokens, Some(&feats), Some(&vision_only)).unwrap();
    let lg = dev.answer_logp(&ids, &want.tokens, Some(&feats), Some(&vision_only)).unwrap();
    let d = (lg - lw).abs() / want.tokens.len().max(1) as f64;
    println!("image-path-only adapter: answer log-prob CPU {lw:.5} GPU {lg:.5}");
    assert!(
        d <= 5e-2 && lg != lw,
        "an image-path-only adapter: answer log-prob {lg} on the GPU, {lw} on the CPU (equal means the CPU scored it)"
    );
}

/// A DPO run's step logs, its trained adapter, and whether the GPU trainer took any of its steps (it leaves its
/// fp16 loss scale in the optimizer state; the CPU trainer does not).
type Run = (Vec<engine::train::trainer::StepLog>, Adapter, bool);

/// DPO with LoRA on every decoder projection over `pairs`.
fn train(model: &Model, pairs: &[Pair]) -> Run {
    train_paused(model, model, pairs, None, lora_spec(LoraSpec::default().target_modules), (2e-3, 0.0))
}

/// LoRA of rank 8 on `targets`.
fn lora_spec(targets: TargetModules) -> LoraSpec {
    LoraSpec { r: 8, lora_alpha: 16.0, target_modules: targets, ..LoraSpec::default() }
}

/// `train` of the adapter `spec` makes (AdamW's learning rate and weight decay `(lr, decay)`), paused after `pause` steps on `first`: the
/// adapter and the optimizer state (moments, step, loss scale) saved to disk as `rlaifd train-dpo` saves them,
/// loaded back, and the run finished on `second`.
fn train_paused(
    first: &Model,
    second: &Model,
    pairs: &[Pair],
    pause: Option<usize>,
    spec: LoraSpec,
    (lr, decay): (f64, f64),
) -> Run {
    use engine::train::{
        dpo::TokenPair,
        optim::{AdamW, AdamWConfig},
        trainer::{precompute_references, train_dpo, TrainConfig},
    };
    let wc = WorldConfig::default();
    let ip = first.image_processor.clone().unwrap();
    let pixels: Vec<_> = pairs
        .iter()
        .enumerate()
        .map(|(i, (s, ..))| engine::image::preprocess(&s.render(&wc, i as u64), &ip).unwrap())
        .collect();
    let tp: Vec<TokenPair> = pairs
        .iter()
        .zip(&pixels)
        .map(|((_, p, c, r), px)| TokenPair { pixels: Some(px), prompt_ids: p, chosen_ids: c, rejected_ids: r })
        .collect();
    let refs = precompute_references(first, None, &tp).unwrap();
    let mut adapter = first.create_adapter(&spec, 17).unwrap();
    let cfg = TrainConfig { dpo: Default::default(), epochs: 4, batch_size: 4, seed: 5 };
    let total = engine::train::trainer::steps_per_epoch(tp.len(), cfg.batch_size) * cfg.epochs;
    let ocfg = AdamWConfig { lr, total_steps: total, weight_decay: decay, ..Default::default() };
    let mut opt = AdamW::new(ocfg.clone());
    let mut logs = Vec::new();
    if let Some(k) = pause {
        train_dpo(first, &mut adapter, &tp, &refs, &cfg, &mut opt, Some(k), |l| logs.push(l.clone())).unwrap();
        assert_eq!((opt.step, logs.len()), (k, k), "the run did not stop after {k} steps");
        let dir = std::env::temp_dir().join(format!("rlaifd-paused-{}-{k}", std::process::id()));
        let state =
            engine::weights::f32_safetensors_bytes(&dir.join("optimizer.safetensors"), &opt.state_tensors()).unwrap();
        let scaler = serde_json::to_vec(&opt.scaler).unwrap();
        adapter.save(&dir, &first.dir, &[("optimizer.safetensors", state), ("scaler.json", scaler)]).unwrap();
        adapter = second.load_adapter(&dir).unwrap();
        opt = AdamW::new(ocfg);
        opt.load_state(k, &engine::weights::WeightStore::open_files(&[dir.join("optimizer.safetensors")]).unwrap())
            .unwrap();
        opt.scaler = serde_json::from_slice(&std::fs::read(dir.join("scaler.json")).unwrap()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
    train_dpo(second, &mut adapter, &tp, &refs, &cfg, &mut opt, None, |l| logs.push(l.clone())).unwrap();
    (logs, adapter, opt.scaler.is_some())
}

/// Relative L2 distance of `b`'s factors from `a`'s.
fn adapter_distance(a: &Adapter, b: &Adapter) -> f64 {
    let (mut want, mut got) = (Vec::new(), Vec::new());
    for (name, m) in a.modules() {
        let o = b.module(name).unwrap();
        want.extend(m.a.iter().chain(&m.b));
        got.extend(o.a.iter().chain(&o.b));
    }
    rel_l2(&got, &want)
}

#[test]
fn gpu_dpo_on_shapesworld_images_tracks_the_cpu_trainer_and_learns_the_pairs() {
    let Some((cpu, dev, tok)) = both("shapes-base") else { return };
    let pairs = shapes_pairs(&tok, cpu.llm.cfg.eos_token_ids[0], 8);
    let (want, _, cpu_only) = train(&cpu, &pairs);
    let (got, trained, on_gpu) = train(&dev, &pairs);
    assert!(on_gpu && !cpu_only, "the GPU trainer did not take the loop's adapter (GPU {on_gpu}, CPU {cpu_only})");
    for (w, g) in want.iter().zip(&got) {
        println!(
            "step {}: loss CPU {:.4} GPU {:.4}, reward accuracy {:.2} / {:.2}, grad norm {:.3} / {:.3}",
            w.step, w.loss, g.loss, w.reward_accuracy, g.reward_accuracy, w.grad_norm, g.grad_norm
        );
    }
    assert_eq!(got.len(), want.len());
    // The first step sees the same adapter on both: its log-probs (images included) agree, per token.
    let per_token = (got[0].logp_chosen - want[0].logp_chosen).abs() / pairs[0].2.len() as f64;
    assert!(
        per_token <= 5e-2,
        "first step: log-prob of chosen {} on the GPU, {} on the CPU",
        got[0].logp_chosen,
        want[0].logp_chosen
    );
    // The loss follows the CPU trainer's over the first steps, and both learn the pairs.
    for k in 0..3 {
        assert!(
            (got[k].loss - want[k].loss).abs() <= 0.02 + 0.05 * want[k].loss,
            "step {}: loss {} on the GPU, {} on the CPU",
            k + 1,
            got[k].loss,
            want[k].loss
        );
    }
    let last = got.last().unwrap();
    assert!(
        last.loss < got[0].loss - 0.1 && last.reward_accuracy >= 0.75,
        "the GPU run did not learn the pairs: {:?}",
        last
    );
    assert!(got.iter().all(|l| l.grad_norm.is_finite()), "a step overflowed in fp16 and was skipped");
    // The trained factors came back from the device.
    assert!(
        trained.modules().iter().any(|(_, m)| m.b.iter().any(|&v| v != 0.0)),
        "the adapter's B factors are still zero"
    );
}

/// peft's classic LoRA, q_proj and v_proj only (of the decoder), trains on the GPU trainer too, follows the CPU
/// trainer and keeps to those modules.
#[test]
fn gpu_dpo_of_a_q_and_v_adapter_tracks_the_cpu_trainer() {
    let Some((cpu, dev, tok)) = both("shapes-base") else { return };
    let pairs = shapes_pairs(&tok, cpu.llm.cfg.eos_token_ids[0], 8);
    // The decoder's q_proj and v_proj (peft's names alone would also pick the vision tower's q_proj and v_proj).
    let pairs = &pairs[..4];
    let qv = || TargetModules::Regex(r".*language_model.*\.(q_proj|v_proj)".into());
    let (want, a_cpu, _) = train_paused(&cpu, &cpu, pairs, None, lora_spec(qv()), (2e-3, 0.0));
    let (got, a_gpu, on_gpu) = train_paused(&dev, &dev, pairs, None, lora_spec(qv()), (2e-3, 0.0));
    assert!(on_gpu, "the q+v adapter trained on the CPU");
    for (w, g) in want.iter().zip(&got) {
        println!(
            "q+v step {}: loss CPU {:.4} GPU {:.4}, reward accuracy {:.2} / {:.2}",
            w.step, w.loss, g.loss, w.reward_accuracy, g.reward_accuracy
        );
    }
    assert_eq!(got.len(), want.len());
    for k in 0..3 {
        assert!(
            (got[k].loss - want[k].loss).abs() <= 0.02 + 0.05 * want[k].loss,
            "step {}: loss {} on the GPU, {} on the CPU",
            k + 1,
            got[k].loss,
            want[k].loss
        );
    }
    assert!(got.last().unwrap().loss < got[0].loss, "the GPU run did not learn: {:?}", got.last());
    let names = a_cpu.module_names();
    assert!(!names.is_empty() && names.iter().all(|n| n.ends_with("q_proj") || n.ends_with("v_proj")), "{names:?}");
    assert_eq!(a_gpu.module_names(), names, "the GPU run changed which modules the adapter has");
    let d = adapter_distance(&a_cpu, &a_gpu);
    println!("q+v adapter trained on the GPU vs the CPU: relative L2 {d:.2e}");
    assert!(d <= 5e-2, "q+v adapter: relative L2 {d} from the CPU run");
}

/// LoRA on the image path too (the vision tower's q_proj, v_proj and fc1, the projector's two layers) trains on the
/// GPU trainer, each image's features computed under the current LoRA on the device and the gradient carried
/// back from the decoder's image rows: it follows the CPU trainer, and the image path's factors move as the CPU's
/// do. So does the projector trained in full (`--train-projector`) beside LoRA, with weight decay on its weights
/// and none on its biases as on the CPU, and full-parameter training (every linear layer of the decoder, the head
/// and the projector whole).
#[test]
fn gpu_dpo_trains_the_image_path_as_the_cpu_trainer() {
    let Some((cpu, dev, tok)) = both("shapes-base") else { return };
    // 4 pairs, one step per epoch: 4 steps per run (four runs; the CPU ones dominate the time on cuemu).
    let pairs = shapes_pairs(&tok, cpu.llm.cfg.eos_token_ids[0], 4);
    let lora = lora_spec(TargetModules::Regex(r".*(q_proj|v_proj|fc1|linear_1|linear_2)".into()));
    let projector = LoraSpec {
        modules_to_save: vec!["multi_modal_projector".into()],
        ..lora_spec(TargetModules::Regex(r".*(q_proj|v_proj)".into()))
    };
    // Full-parameter DPO (RLAIF-V's 7B recipe, `loop.tuning = "full"`): the decoder's linear layers, the head and
    // the projector whole, no LoRA.
    let full = cpu.full_parameter_spec();
    for (what, spec, lr, decay) in [
        ("image-path LoRA", lora, 2e-3, 0.0),
        ("projector in full", projector, 2e-3, 0.1),
        ("full-parameter", full, 1e-4, 0.1),
    ] {
        let (want, a_cpu, _) = train_paused(&cpu, &cpu, &pairs, None, spec.clone(), (lr, decay));
        let (got, a_gpu, on_gpu) = train_paused(&dev, &dev, &pairs, None, spec.clone(), (lr, decay));
        assert!(on_gpu, "{what}: trained on the CPU");
        for (w, g) in want.iter().zip(&got) {
            println!(
                "{what}, step {}: loss CPU {:.4} GPU {:.4}, grad norm {:.4} / {:.4}",
                w.step, w.loss, g.loss, w.grad_norm, g.grad_norm
            );
        }
        assert_eq!(got.len(), want.len());
        for k in 0..3 {
            assert!(
                (got[k].loss - want[k].loss).abs() <= 0.02 + 0.05 * want[k].loss,
                "{what}, step {}: loss {} on the GPU, {} on the CPU",
                k + 1,
                got[k].loss,
                want[k].loss
            );
            assert!(
                (got[k].grad_norm - want[k].grad_norm).abs() <= 0.05 * want[k].grad_norm + 1e-3,
                "{what}, step {}: grad norm {} on the GPU, {} on the CPU",
                k + 1,
                got[k].grad_norm,
                want[k].grad_norm
            );
        }
        // The image path's trained values: moved from where they started, and to where the CPU trainer moved them.
        let init = cpu.create_adapter(&spec, 17).unwrap();
        let (mut start, mut want_f, mut got_f) = (Vec::new(), Vec::new(), Vec::new());
        for (name, m) in a_cpu.modules().into_iter().filter(|(n, _)| engine::cuda_clip::in_image_path(n)) {
            let (g, i) = (a_gpu.module(name).unwrap(), init.module(name).unwrap());
            want_f.extend(m.a.iter().chain(&m.b));
            got_f.extend(g.a.iter().chain(&g.b));
            start.extend(i.a.iter().chain(&i.b));
        }
        for (name, p) in a_cpu.saved_params() {
            let find = |a: &Adapter| a.saved_params().find(|(n, _)| *n == name).map(|(_, p)| p.values.clone()).unwrap();
            want_f.extend(&p.values);
            got_f.extend(find(&a_gpu));
            start.extend(find(&init));
        }
        assert!(!want_f.is_empty(), "{what}: nothing of the image path trained");
        let (moved, off) = (rel_l2(&want_f, &start), rel_l2(&got_f, &want_f));
        println!("{what}: the CPU run moved the trained values (image path, whole weights) by rel L2 {moved:.2e}; the GPU run ends {off:.2e} from it");
        assert!(moved > 1e-3, "{what}: the image path barely trained ({moved:.2e})");
        assert!(
            off <= 0.1 * moved,
            "{what}: the GPU trained the image path to {off:.2e} from the CPU run (which moved it {moved:.2e})"
        );
    }
}

#[test]
fn labeler_verdicts_on_the_gpu_match_the_cpu_backend() {
    use engine::feedback::verify::{Labeler, YES_NO_SUFFIX};
    let Some((cpu, dev, tok)) = both("shapes-labeler") else { return };
    let wc = WorldConfig::default();
    let ip = cpu.image_processor.clone().unwrap();
    let (mut worst, mut questions_total) = (0.0f64, 0usize);
    for seed in 0..6u64 {
        let scene = Scene::generate(&wc, seed);
        let pixels = engine::image::preprocess(&scene.render(&wc, seed), &ip).unwrap();
        let questions: Vec<String> = engine::shapes::labeler_examples(&scene, seed)
            .into_iter()
            .map(|(_, q, _)| q.trim_end_matches(YES_NO_SUFFIX).to_string())
            .collect();
        let want =
            Labeler::new(&cpu, None, &tok, LLAVA_15_TEMPLATE).unwrap().verify(Some(&pixels), &questions).unwrap();
        let got = Labeler::new(&dev, None, &tok, LLAVA_15_TEMPLATE).unwrap().verify(Some(&pixels), &questions).unwrap();
        assert_eq!(got.len(), want.len());
        for ((q, w), g) in questions.iter().zip(&want).zip(&got) {
            let d = (w.p_yes - g.p_yes).abs().max((w.p_no - g.p_no).abs());
            worst = worst.max(d);
            assert!(
                d <= 2e-2,
                "{q}: p(yes) {} / p(no) {} on the GPU, {} / {} on the CPU",
                g.p_yes,
                g.p_no,
                w.p_yes,
                w.p_no
            );
            if (w.p_yes - w.p_no).abs() > 0.05 {
                assert_eq!(g.accepted, w.accepted, "{q}: the verdict flips");
            }
        }
        questions_total += questions.len();
    }
    println!("{questions_total} questions, worst |p difference| {worst:.2e}");
}

#[test]
fn gpu_image_path_matches_the_cpu_vision_tower_and_projector() {
    let Some(gpu) = gpu_common::gpu() else { return };
    let fixtures = root().join("tests/fixtures/llava");
    let mut dirs = vec![root().join("assets/shapes-base"), root().join("assets/shapes-labeler")];
    // Every fixture layout (transformers 4.x/4.52/5, sharded, f16/bf16/f32, both feature selections).
    let mut cases: Vec<_> = std::fs::read_dir(&fixtures)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("model"))
        .filter(|d| d.join("config.json").is_file())
        .collect();
    cases.sort();
    dirs.extend(cases);
    for dir in dirs {
        let cpu = Model::load(&dir).unwrap();
        if cpu.config.llava().is_none() {
            continue;
        }
        let vision = engine::cuda_clip::GpuVision::load_dir(&gpu, &dir).unwrap();
        let ip = cpu.image_processor.clone().unwrap();
        let (s, _) = ip.output_size();
        let mut rng = engine::rng::SplitMix64::new(3);
        // Random normalised pixels: every patch and channel differs, unlike a rendered scene's flat colours.
        let pixels: Vec<f32> = (0..3 * s * s).map(|_| (rng.next_f64() * 4.0 - 2.0) as f32).collect();
        let px = engine::image::PixelValues::single(pixels.clone(), 3, s, s);
        let want = cpu.image_features(&px, None).unwrap();
        let got = vision.features(&gpu, &pixels, None).unwrap();
        let rel = rel_l2(&got, &want);
        println!("{}: image features ({} values) rel L2 {rel:.2e}", dir.display(), want.len());
        assert!(rel <= 1e-2, "{}: rel L2 {rel}", dir.display());
        assert!(vision.features(&gpu, &pixels[1..], None).is_err(), "a wrong pixel count must be refused");
        // Under an adapter with LoRA on the tower's attention and MLP and on the projector, the projector's second
        // layer replaced (peft modules_to_save): applied on the device as the CPU backend applies it.
        let spec = LoraSpec {
            r: 4,
            lora_alpha: 8.0,
            target_modules: TargetModules::Regex(r".*(vision_tower.*(q_proj|v_proj|out_proj|fc1|fc2)|linear_1)".into()),
            modules_to_save: vec!["linear_2".into()],
            ..LoraSpec::default()
        };
        let mut ad = cpu.create_adapter(&spec, 5).unwrap();
        let names: Vec<String> = ad.module_names().iter().map(|s| s.to_string()).collect();
        for n in &names {
            ad.module_mut(n).unwrap().b.iter_mut().for_each(|v| *v = ((rng.next_f64() * 2.0 - 1.0) * 0.1) as f32);
        }
        for (_, p) in ad.saved_params_mut() {
            p.values.iter_mut().for_each(|v| *v *= 1.0 + ((rng.next_f64() - 0.5) * 0.5) as f32);
        }
        assert_eq!(engine::cuda_clip::GpuVisionAdapter::unsupported(&vision, &ad), None, "{}", dir.display());
        let va = engine::cuda_clip::GpuVisionAdapter::upload(&gpu, &vision, &ad)
            .unwrap()
            .expect("the adapter changes the image path");
        let want_ad = cpu.image_features(&px, Some(&ad)).unwrap();
        let got_ad = vision.features(&gpu, &pixels, Some(&va)).unwrap();
        let (rel_ad, moved) = (rel_l2(&got_ad, &want_ad), rel_l2(&want, &want_ad));
        println!("{}: with a vision/projector adapter ({} LoRA modules, projector layer replaced) rel L2 {rel_ad:.2e} (the adapter moves the features by {moved:.2e})", dir.display(), names.len());
        assert!(
            rel_ad <= 1e-2 && moved >= 10.0 * rel_ad,
            "{}: rel L2 {rel_ad} under the adapter, which moves the features by {moved}",
            dir.display()
        );
    }
}

#[test]
fn a_gpu_dpo_run_paused_and_saved_resumes_on_the_gpu_or_the_cpu_where_it_stopped() {
    let Some((cpu, dev, tok)) = both("shapes-base") else { return };
    let pairs = shapes_pairs(&tok, cpu.llm.cfg.eos_token_ids[0], 8);
    // 8 steps in one go on the GPU, against 3 steps, a save and a reload, then 5 more on the GPU.
    let (straight, a_straight, _) = train(&dev, &pairs);
    let (paused, a_paused, _) =
        train_paused(&dev, &dev, &pairs, Some(3), lora_spec(LoraSpec::default().target_modules), (2e-3, 0.0));
    assert_eq!(paused.len(), straight.len());
    for (s, p) in straight.iter().zip(&paused) {
        println!(
            "step {}: loss in one go {:.6}, paused at 3 {:.6}; grad norm {:.5} / {:.5}",
            s.step, s.loss, p.loss, s.grad_norm, p.grad_norm
        );
        assert_eq!((s.step, s.lr), (p.step, p.lr));
        // The same computation on the same device: only the fp32 round trip of the masters through the file
        // (exact) and the device's reduction order can differ.
        assert!(
            (s.loss - p.loss).abs() <= 1e-4 && (s.grad_norm - p.grad_norm).abs() <= 1e-3 * s.grad_norm.max(1e-3),
            "step {}: {s:?} vs {p:?}",
            s.step
        );
    }
    let d = adapter_distance(&a_straight, &a_paused);
    println!("trained factors, in one go vs paused and resumed on the GPU: relative L2 {d:.2e}");
    assert!(d <= 1e-4, "resuming on the GPU changed the trained factors by {d:.2e}");
    // 3 steps on the GPU, resumed on the CPU: the CPU trainer continues with the GPU's moments and step count, and
    // ends where a whole CPU run ends (within the devices' difference: fp16 vs f32).
    let (want, a_cpu, _) = train(&cpu, &pairs);
    let (crossed, a_crossed, _) =
        train_paused(&dev, &cpu, &pairs, Some(3), lora_spec(LoraSpec::default().target_modules), (2e-3, 0.0));
    for (w, c) in want.iter().zip(&crossed) {
        println!("step {}: loss CPU {:.4}, GPU then CPU {:.4}", w.step, w.loss, c.loss);
        assert!(
            (w.loss - c.loss).abs() <= 0.02 + 0.05 * w.loss,
            "step {}: {} (GPU then CPU) vs {} (CPU)",
            w.step,
            c.loss,
            w.loss
        );
    }
    let d_cross = adapter_distance(&a_cpu, &a_crossed);
    let d_devices = adapter_distance(&a_cpu, &a_straight);
    println!("trained factors vs the CPU run: GPU then CPU {d_cross:.2e}, GPU only {d_devices:.2e}");
    // Lost moments or a restarted bias correction would move the factors far more than fp16 rounding does.
    assert!(
        d_cross <= 2.0 * d_devices + 1e-3,
        "GPU then CPU is {d_cross:.2e} from the CPU run, the GPU run {d_devices:.2e}"
    );
}

/// LoRA SFT on the ShapesWorld captions of `pairs` (the chosen answers), with images; returns the step logs.
fn sft(model: &mut Model, pairs: &[Pair]) -> Vec<engine::train::sft::SftStepLog> {
    use engine::train::{
        optim::{AdamW, AdamWConfig},
        sft::{train_sft, SftConfig, SftExample, SftTarget},
    };
    let wc = WorldConfig::default();
    let ip = model.image_processor.clone().unwrap();
    let pixels: Vec<_> = pairs
        .iter()
        .enumerate()
        .map(|(i, (s, ..))| engine::image::preprocess(&s.render(&wc, i as u64), &ip).unwrap())
        .collect();
    let ex: Vec<SftExample> = pairs
        .iter()
        .zip(&pixels)
        .map(|((_, p, c, _), px)| SftExample { pixels: Some(px), prompt_ids: p, answer_ids: c })
        .collect();
    // LoRA on every decoder projection, and on the image path (the tower's fc1, the projector's second layer).
    let mut adapter = model
        .create_adapter(
            &lora_spec(TargetModules::Regex(
                r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|.*(fc1|linear_2)"
                    .into(),
            )),
            23,
        )
        .unwrap();
    assert!(adapter.module_names().iter().any(|n| n.starts_with("vision_tower.")), "{:?}", adapter.module_names());
    let cfg = SftConfig { epochs: 3, batch_size: 4, seed: 2 };
    let total = engine::train::trainer::steps_per_epoch(ex.len(), cfg.batch_size) * cfg.epochs;
    let mut opt = AdamW::new(AdamWConfig { lr: 2e-3, total_steps: total, ..Default::default() });
    // A loss scale small enough that no step overflows, so the runs take the same steps.
    opt.scaler = Some(engine::cuda::LossScaler::new(256.0, 1000));
    let mut logs = Vec::new();
    train_sft(model, SftTarget::Lora(&mut adapter), &ex, &cfg, &mut opt, None, |l| logs.push(l.clone())).unwrap();
    logs
}

/// LoRA SFT with images on the GPU trainer (LoRA on the decoder and on the image path) follows the CPU trainer.
#[test]
fn gpu_lora_sft_on_shapesworld_images_tracks_the_cpu_trainer() {
    let Some((mut cpu, mut dev, tok)) = both("shapes-base") else { return };
    let pairs = shapes_pairs(&tok, cpu.llm.cfg.eos_token_ids[0], 8);
    let want = sft(&mut cpu, &pairs);
    let got = sft(&mut dev, &pairs);
    assert_eq!(got.len(), want.len());
    // A CPU fallback would repeat the CPU run's losses bit for bit.
    assert!(
        got.iter().zip(&want).any(|(g, w)| g.loss != w.loss),
        "the SFT run with image-path LoRA trained on the CPU"
    );
    for (w, g) in want.iter().zip(&got) {
        println!(
            "SFT step {}: loss CPU {:.5} GPU {:.5}, grad norm {:.4} / {:.4}, {} tokens",
            w.step, w.loss, g.loss, w.grad_norm, g.grad_norm, g.tokens
        );
        assert_eq!((w.tokens, w.lr), (g.tokens, g.lr), "step {}: a different batch or schedule", w.step);
        // Per-token losses (nats) and gradient norms within fp16 rounding of the CPU trainer's.
        assert!((w.loss - g.loss).abs() <= 2e-2, "step {}: loss {} on the GPU, {} on the CPU", w.step, g.loss, w.loss);
        assert!(
            (w.grad_norm - g.grad_norm).abs() <= 2e-2 * w.grad_norm + 1e-3,
            "step {}: grad norm {} on the GPU, {} on the CPU",
            w.step,
            g.grad_norm,
            w.grad_norm
        );
    }
}

/// LLaVA-NeXT on the CUDA backend: every anyres tile through the GPU image path, packed as on the CPU (unpadding,
/// `image_newline`), then the decoder on the device; log-probs follow the CPU backend within fp16 rounding.
#[test]
fn llava_next_tiles_on_the_gpu_match_the_cpu_backend() {
    let fixtures = root().join("tests/fixtures/llava_next");
    let mut dirs: Vec<_> = std::fs::read_dir(&fixtures)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|d| d.join("model/config.json").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 5, "the LLaVA-NeXT fixtures");
    for dir in dirs {
        let cpu = Model::load(&dir.join("model")).unwrap();
        let Some(dev) = on_gpu(&dir.join("model")) else { return };
        let px = cpu.load_image(&dir.join("image.png")).unwrap();
        assert!(px.tiles > 1, "{}: an anyres image has tiles", dir.display());
        let want = cpu.image_features(&px, None).unwrap();
        let got = dev.image_features(&px, None).unwrap();
        let rel = rel_l2(&got, &want);
        let (prompt, answer) = gpu_common::fixture_prompt(&dir, cpu.image_token_id());
        let (prompt, answer) = (&prompt[..], &answer[..]);
        let lp_cpu = cpu.answer_logp(prompt, answer, Some(&want), None).unwrap();
        let lp_dev = dev.answer_logp(prompt, answer, Some(&got), None).unwrap();
        let worst = (lp_cpu - lp_dev).abs() / answer.len() as f64;
        println!(
            "{}: {} tiles, features rel L2 {rel:.2e}, answer log-prob per token differs by {worst:.2e}",
            dir.display(),
            px.tiles
        );
        assert!(rel <= 1e-2, "{}: features rel L2 {rel}", dir.display());
        // 1e-2 leaves a margin of 10x over the worst seen on cuemu (8.3e-4); a window the GPU ignored gives 8e-2.
        assert!(worst <= 1e-2, "{}: log-probs differ by {worst}", dir.display());
    }
}

/// Qwen2-VL / Qwen2.5-VL with the decoder on the GPU (q/k/v biases, multimodal RoPE positions for the image rows,
/// shifted text positions after them) and the vision transformer on the CPU: the ShapesWorld decoder in Qwen form
/// gives the CPU backend's greedy answers, and on every random Qwen fixture (both versions, GQA/MQA, tied heads,
/// sliding windows on some layers)
/// the answer's log-prob, with and without the fixture's LoRA adapter (on the GPU decoder where it is decoder-only,
/// else on the CPU), and the branch logits follow the CPU.
#[test]
fn qwen_decoders_on_the_gpu_match_the_cpu_backend() {
    let fixtures = root().join("tests/fixtures/qwen_vl");
    let demo = fixtures.join("shapes_qwen25");
    let cpu = Model::load(&demo).unwrap();
    let Some(dev) = on_gpu(&demo) else { return };
    let tok = TextTokenizer::from_file(&demo.join("tokenizer.json")).unwrap();
    let ids = tok.encode_chat(LLAVA_15_TEMPLATE, "Describe the image.").unwrap();
    let wc = WorldConfig::default();
    let ip = cpu.image_processor.clone().unwrap();
    let params = SamplingParams { temperature: 0.0, max_new_tokens: 16, ..Default::default() };
    let mut scenes = Vec::new();
    for seed in 0..3u64 {
        let scene = Scene::generate(&wc, seed);
        let pixels = engine::image::preprocess(&scene.render(&wc, seed), &ip).unwrap();
        let req = GenerateRequest {
            ids: &ids,
            pixels: Some(&pixels),
            seeds: &[0, 1],
            params: params.clone(),
            stop_ids: vec![],
        };
        let want = generate(&cpu, &req, None).unwrap();
        let got = generate(&dev, &req, None).unwrap();
        println!("qwen scene {seed}: CPU {:?} GPU {:?}", want[0].tokens, got[0].tokens);
        for (w, g) in want.iter().zip(&got) {
            assert_eq!((&g.tokens, g.finish), (&w.tokens, w.finish), "scene {seed}: greedy answers differ");
        }
        scenes.push((pixels, want[0].tokens.clone()));
    }
    // The three requests in one continuous batch on the GPU, joining a step apart: the text after each image
    // decodes at its own shifted multimodal RoPE positions, and the greedy answers stay the CPU's.
    let mut batch = engine::batch::Batch::new(&dev, None, 8).unwrap();
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); scenes.len()];
    let mut of = std::collections::HashMap::new();
    for (i, (pixels, _)) in scenes.iter().enumerate() {
        let request =
            GenerateRequest { ids: &ids, pixels: Some(pixels), seeds: &[0], params: params.clone(), stop_ids: vec![] };
        let (id, events) = batch.admit(&dev, &engine::batch::BatchRequest { request, logprobs: None }).unwrap();
        of.insert(id, i);
        got[i].extend(events.iter().filter_map(|e| e.token));
        for e in batch.step(&dev).unwrap() {
            got[of[&e.request]].extend(e.token);
        }
    }
    while !batch.is_empty() {
        for e in batch.step(&dev).unwrap() {
            got[of[&e.request]].extend(e.token);
        }
    }
    for (i, (g, (_, want))) in got.iter().zip(&scenes).enumerate() {
        assert_eq!(g, want, "qwen scene {i}: the GPU batch's greedy answer differs from the CPU's");
    }
    let mut dirs: Vec<_> = std::fs::read_dir(&fixtures)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|d| d.join("expected.json").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 5, "the Qwen fixtures");
    let mut worst = 0.0f64;
    for dir in dirs {
        let cpu = Model::load(&dir.join("model")).unwrap();
        let dev = on_gpu(&dir.join("model")).expect("the GPU opened above");
        let px = cpu.load_image(&dir.join("image.png")).unwrap();
        let feats = cpu.image_features(&px, None).unwrap();
        let (prompt, answer) = gpu_common::fixture_prompt(&dir, cpu.image_token_id());
        let (prompt, answer) = (&prompt[..], &answer[..]);
        let adapter = dir.join("adapter").is_dir().then(|| cpu.load_adapter(&dir.join("adapter")).unwrap());
        for ad in std::iter::once(None).chain(adapter.as_ref().map(Some)) {
            let f = cpu.image_features(&px, ad).unwrap();
            let lp_cpu = cpu.answer_logp(prompt, answer, Some(&f), ad).unwrap();
            let lp_dev = dev.answer_logp(prompt, answer, Some(&f), ad).unwrap();
            let d = (lp_cpu - lp_dev).abs() / answer.len() as f64;
            println!("{}: adapter {}: answer log-prob per token differs by {d:.2e}", dir.display(), ad.is_some());
            // 1e-2: 6x the worst seen on cuemu (1.6e-3); mis-placed image rows or an ignored window give 8e-2 and more.
            assert!(d <= 1e-2, "{}: log-probs {lp_dev} on the GPU, {lp_cpu} on the CPU", dir.display());
            worst = worst.max(d);
        }
        // Several continuations of the prompt (the labeler's questions): their last logits.
        let conts: Vec<&[u32]> = vec![&answer[..1], &answer[..3], &answer[1..4]];
        let want = cpu.branch_logits(prompt, &conts, Some(&feats), None).unwrap();
        let got = dev.branch_logits(prompt, &conts, Some(&feats), None).unwrap();
        for (w, g) in want.iter().zip(&got) {
            let e = w.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(e <= 5e-2, "{}: branch logits differ by {e}", dir.display());
        }
    }
    println!("qwen fixtures: worst per-token |log-prob difference| {worst:.2e}");
}

/// Continuous batching on the GPU (`engine::batch::Batch` on `cuda_llama::GpuRows`; Qwen2.5-VL's shifted positions
/// in `qwen_decoders_on_the_gpu_match_the_cpu_backend`): requests with images and
/// without, under a LoRA adapter, join a batch of 4 rows as rows free up (so later answers reuse the slots of
/// finished ones, and an idle slot sits below a busy one), each with its own sampling settings. Greedy answers are
/// the CPU backend's token for token; every reported log-probability sum is the CPU's `answer_logp` within 5e-2
/// per token; sampled answers come out the same when the batch runs again; a request for more answers than the
/// rows hold is refused and changes nothing.
/// A request of the batching test: prompt, image (an index), seeds, settings.
type Case<'a> = (&'a [u32], Option<usize>, Vec<u64>, SamplingParams);
/// An answer as the batch wrote it: tokens, summed log-probability, how it ended.
type Written = (Vec<u32>, f64, Option<FinishReason>);

#[test]
fn requests_joining_a_gpu_batch_get_the_cpu_backends_answers() {
    use engine::batch::{Batch, BatchRequest};
    use std::collections::BTreeMap;
    use std::sync::Arc;
    let Some((cpu, dev, tok)) = both("shapes-base") else { return };
    let wc = WorldConfig::default();
    let ip = cpu.image_processor.clone().unwrap();
    let lora = Arc::new(adapter(&cpu, LoraSpec::default().target_modules, 4, 0.05));
    let ids = tok.encode(&apply_template(LLAVA_15_TEMPLATE, "Describe the image."), true).unwrap();
    let text = tok.encode(&apply_template(LLAVA_15_TEMPLATE, "Name a shape."), true).unwrap();
    let text: Vec<u32> = text.into_iter().filter(|&t| Some(t) != cpu.image_token_id()).collect();
    let pixels: Vec<_> = (0..3u64)
        .map(|s| engine::image::preprocess(&Scene::generate(&wc, 20 + s).render(&wc, 20 + s), &ip).unwrap())
        .collect();
    let greedy = |n| SamplingParams { temperature: 0.0, max_new_tokens: n, ..Default::default() };
    let sampled = SamplingParams { temperature: 0.8, top_k: 20, max_new_tokens: 16, ..Default::default() };
    // (prompt, image, seeds, settings), admitted in order whenever the batch has rows free for them.
    let cases: Vec<Case> = vec![
        (&ids, Some(0), vec![0], greedy(6)),
        (&ids, Some(1), vec![0], greedy(24)),
        (&text, None, vec![0], greedy(12)),
        (&ids, Some(2), vec![7, 8], sampled.clone()),
        (&ids, Some(0), vec![9], sampled.clone()),
        (&text, None, vec![0], greedy(20)),
    ];
    let run = || {
        let mut batch = Batch::new(&dev, Some(lora.clone()), 4).unwrap();
        assert!(batch.device().starts_with("cuda"), "{}", batch.device());
        assert_eq!(batch.capacity(), Some(4));
        let mut got: BTreeMap<(usize, usize), Written> = BTreeMap::new();
        let mut case_of = BTreeMap::new();
        let (mut next, mut peak, mut steps) = (0, 0, 0);
        loop {
            while next < cases.len() && batch.active_answers() + cases[next].2.len() <= 4 {
                let (p, img, seeds, params) = &cases[next];
                let request = GenerateRequest {
                    ids: p,
                    pixels: img.map(|i| &pixels[i]),
                    seeds,
                    params: params.clone(),
                    stop_ids: vec![],
                };
                let (id, events) = batch.admit(&dev, &BatchRequest { request, logprobs: Some(2) }).unwrap();
                case_of.insert(id, next);
                for e in events {
                    let g = got.entry((next, e.answer)).or_default();
                    g.0.extend(e.token);
                    g.1 += e.logprob.map_or(0.0, |l| l.logprob as f64);
                    g.2 = g.2.or(e.finish);
                }
                next += 1;
            }
            peak = peak.max(batch.active_answers());
            if batch.is_empty() {
                assert_eq!(next, cases.len(), "the batch emptied with requests left");
                break;
            }
            if steps == 3 {
                // More answers than rows: refused, and the batch goes on as it was.
                let seeds = [1u64, 2, 3, 4, 5];
                let request =
                    GenerateRequest { ids: &text, pixels: None, seeds: &seeds, params: greedy(4), stop_ids: vec![] };
                let before = batch.active_answers();
                let e = batch.admit(&dev, &BatchRequest { request, logprobs: None }).unwrap_err().to_string();
                assert!(e.contains("room for"), "{e}");
                assert_eq!(batch.active_answers(), before);
            }
            for e in batch.step(&dev).unwrap() {
                let g = got.entry((case_of[&e.request], e.answer)).or_default();
                assert!(g.2.is_none(), "an event after the answer finished");
                g.0.extend(e.token);
                g.1 += e.logprob.map_or(0.0, |l| l.logprob as f64);
                g.2 = g.2.or(e.finish);
            }
            steps += 1;
        }
        assert_eq!(peak, 4, "the batch never filled its rows");
        got
    };
    let got = run();
    let mut worst = 0.0f64;
    for (i, (p, img, seeds, params)) in cases.iter().enumerate() {
        let px = img.map(|i| &pixels[i]);
        let feats = px.map(|x| cpu.image_features(x, Some(&*lora)).unwrap());
        for (j, _) in seeds.iter().enumerate() {
            let (tokens, lp, finish) = &got[&(i, j)];
            let finish = finish.expect("every answer finished");
            if params.temperature == 0.0 {
                let req = GenerateRequest { ids: p, pixels: px, seeds: &[0], params: params.clone(), stop_ids: vec![] };
                let want = generate(&cpu, &req, Some(&*lora)).unwrap().remove(0);
                println!(
                    "batch case {i}: GPU {:?} CPU {:?}",
                    tok.decode(tokens).unwrap(),
                    tok.decode(&want.tokens).unwrap()
                );
                assert_eq!((tokens, finish), (&want.tokens, want.finish), "case {i}: greedy answers differ");
            } else {
                assert!(
                    finish == FinishReason::Stop || tokens.len() == params.max_new_tokens,
                    "case {i}.{j}: {finish:?}"
                );
            }
            if tokens.is_empty() {
                continue;
            }
            let reference = cpu.answer_logp(p, tokens, feats.as_ref(), Some(&*lora)).unwrap();
            let d = (lp - reference).abs() / tokens.len() as f64;
            worst = worst.max(d);
            assert!(
                d <= 5e-2,
                "case {i}.{j}: summed logprobs {lp} on the GPU batch, answer_logp {reference} on the CPU"
            );
        }
    }
    println!("batch: worst per-token |log-prob difference| against the CPU {worst:.2e}");
    assert_eq!(run(), got, "the same requests in the same order gave other answers");
}

/// A full-parameter checkpoint (`loop.tuning = "full"`: every linear layer of the decoder, the head and the projector
/// whole) is served on the device from a copy of the decoder holding its weights: its greedy answers are the CPU
/// backend's and its answer log-probs within fp16 rounding of the CPU's (not bit-equal, as a CPU fallback's would
/// be), a continuous batch under it runs on the device, and the base decoder beside it is unchanged.
#[test]
fn a_full_parameter_checkpoint_is_served_on_the_gpu_as_on_the_cpu() {
    let Some((cpu, dev, tok)) = both("shapes-base") else { return };
    let wc = WorldConfig::default();
    let ip = cpu.image_processor.clone().unwrap();
    let mut full = cpu.create_adapter(&cpu.full_parameter_spec(), 3).unwrap();
    assert!(full.module_names().is_empty());
    // Every whole weight moved off the base's, so serving the base's weights by mistake cannot pass.
    let mut rng = engine::rng::SplitMix64::new(12);
    for (_, p) in full.saved_params_mut() {
        p.values.iter_mut().for_each(|v| *v += ((rng.next_f64() * 2.0 - 1.0) * 0.03) as f32);
    }
    let full = std::sync::Arc::new(full);
    let ids = tok.encode(&apply_template(LLAVA_15_TEMPLATE, "Describe the image."), true).unwrap();
    let params = SamplingParams { temperature: 0.0, max_new_tokens: 24, ..Default::default() };
    let (mut moved, mut worst) = (0.0f64, 0.0f64);
    for seed in 0..3u64 {
        let scene = Scene::generate(&wc, seed);
        let pixels = engine::image::preprocess(&scene.render(&wc, seed), &ip).unwrap();
        let req =
            GenerateRequest { ids: &ids, pixels: Some(&pixels), seeds: &[0], params: params.clone(), stop_ids: vec![] };
        let want = generate(&cpu, &req, Some(&*full)).unwrap().remove(0);
        let got = generate(&dev, &req, Some(&*full)).unwrap().remove(0);
        println!(
            "scene {seed}: CPU {:?} GPU {:?}",
            tok.decode(&want.tokens).unwrap(),
            tok.decode(&got.tokens).unwrap()
        );
        assert_eq!((&got.tokens, got.finish), (&want.tokens, want.finish), "scene {seed}: greedy answers differ");
        let feats = cpu.image_features(&pixels, Some(&*full)).unwrap();
        let n = want.tokens.len().max(1) as f64;
        let lw = cpu.answer_logp(&ids, &want.tokens, Some(&feats), Some(&*full)).unwrap();
        let lg = dev.answer_logp(&ids, &want.tokens, Some(&feats), Some(&*full)).unwrap();
        let base = cpu.answer_logp(&ids, &want.tokens, Some(&feats), None).unwrap();
        let base_dev = dev.answer_logp(&ids, &want.tokens, Some(&feats), None).unwrap();
        moved = moved.max((lw - base).abs() / n);
        worst = worst.max((lg - lw).abs() / n);
        assert!(lg != lw, "scene {seed}: the GPU's log-prob is the CPU's to the bit (a CPU fallback)");
        assert!((lg - lw).abs() / n <= 5e-2, "scene {seed}: answer log-prob {lg} on the GPU, {lw} on the CPU");
        assert!((base_dev - base).abs() / n <= 5e-2, "scene {seed}: the base decoder changed: {base_dev} vs {base}");
    }
    println!("full-parameter checkpoint: per-token log-prob moved {moved:.3} from the base; GPU vs CPU {worst:.2e}");
    // The base's weights served by mistake would be `moved` off.
    assert!(moved > 0.02 && worst <= 0.1 * moved, "log-probs moved {moved} from the base, GPU vs CPU {worst}");
    let batch = engine::batch::Batch::new(&dev, Some(full.clone()), 4).unwrap();
    assert!(!batch.device().contains("cpu"), "the batch under the checkpoint runs on {}", batch.device());
}
