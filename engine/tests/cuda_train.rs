//! CUDA II end to end: LoRA DPO on the GPU decoder against the CPU backend on a tiny fixture (the loss, both
//! answers' log-probs and every LoRA gradient of the decoder), and a short GPU DPO run whose reward accuracy rises
//! while dynamic loss scaling skips the steps that overflow; activation recomputation changing nothing but memory,
//! and a pair's prompt run once for both answers giving the gradients of two whole sequences; the tensor-core
//! attention kernels giving the scalar kernels' loss and gradients; LoRA dropout drawing the CPU trainer's masks; an
//! adapter on a subset of the projections training only its own modules; full-parameter DPO (whole weights).
//! Prints why and passes where no GPU exists.

use engine::cuda::{AdamW, Gpu, LossScaler};
use engine::cuda_train::{GpuLora, StepReport, PROJECTIONS};
use engine::train::dpo::{pair_forward_backward, reference_logps, DpoConfig, TokenPair};
use engine::train::Grads;
use engine::Model;
use std::path::PathBuf;

mod gpu_common;
use gpu_common::gpu;

const CASE: &str = "l15_4x_f32_gqa_tied_lora";

/// The fixture on both backends: the CPU model and its adapter, the decoder on the GPU and the adapter there.
fn setup(gpu: &Gpu) -> (Model, engine::Adapter, engine::cuda_llama::GpuLlama, GpuLora) {
    let dir: PathBuf = gpu_common::root().join("tests/fixtures/llava").join(CASE);
    let cpu = Model::load(&dir.join("model")).unwrap();
    let adapter = cpu.load_adapter(&dir.join("adapter")).unwrap();
    let dev = engine::cuda_llama::load_dir(gpu, &dir.join("model"), 256).unwrap();
    let lora = GpuLora::from_adapter(gpu, &dev.cfg, &adapter).unwrap();
    (cpu, adapter, dev, lora)
}

fn tokens(rng: &mut engine::rng::SplitMix64, n: usize, vocab: usize, avoid: Option<u32>) -> Vec<u32> {
    std::iter::from_fn(|| Some((3 + rng.next_u64() % (vocab as u64 - 3)) as u32))
        .filter(|&t| Some(t) != avoid)
        .take(n)
        .collect()
}

/// A random pair of the fixture's vocabulary (no image token): prompt of 12 tokens, chosen 8, rejected 6.
fn random_pair(cpu: &Model, seed: u64) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let vocab = cpu.llm.cfg.vocab_size;
    let mut rng = engine::rng::SplitMix64::new(seed);
    let image = cpu.image_token_id();
    (tokens(&mut rng, 12, vocab, image), tokens(&mut rng, 8, vocab, image), tokens(&mut rng, 6, vocab, image))
}

#[test]
fn gpu_dpo_loss_and_lora_gradients_match_the_cpu_backend() {
    let Some(gpu) = gpu() else { return };
    let (cpu, adapter, dev, mut lora) = setup(&gpu);
    let (prompt, chosen, rejected) = random_pair(&cpu, 21);
    let pair = TokenPair { pixels: None, prompt_ids: &prompt, chosen_ids: &chosen, rejected_ids: &rejected };
    let refs = reference_logps(&cpu, None, &pair).unwrap();
    let cfg = DpoConfig { beta: 0.5, ..Default::default() };
    let mut grads = Grads::zeros_like(&adapter);
    let (cpu_loss, cpu_l) = pair_forward_backward(&cpu, &adapter, &pair, refs, &cfg, 1.0, &mut grads, None).unwrap();
    lora.scaler = LossScaler::new(1024.0, 1000);
    let step = lora.dpo_step(&gpu, &dev, &prompt, &chosen, &rejected, refs, &cfg, None).unwrap();
    println!(
        "loss CPU {cpu_loss:.5} GPU {:.5}; log-probs chosen {:.4}/{:.4}, rejected {:.4}/{:.4}",
        step.loss, cpu_l.policy_chosen, step.logps.policy_chosen, cpu_l.policy_rejected, step.logps.policy_rejected
    );
    assert!((step.loss - cpu_loss).abs() <= 1e-2, "DPO loss: GPU {} vs CPU {cpu_loss}", step.loss);
    assert!(
        (step.logps.policy_chosen - cpu_l.policy_chosen).abs() <= 0.1
            && (step.logps.policy_rejected - cpu_l.policy_rejected).abs() <= 0.1,
        "answer log-probs differ"
    );
    // Every LoRA gradient of the decoder (the GPU's are loss-scaled).
    let (total, worst) = gradient_error(&gpu, &dev, &lora, &mut grads, 1024.0);
    println!(
        "LoRA gradients ({} modules): relative L2 error {total:.2e} overall, worst module {} at {:.2e}",
        dev.cfg.num_hidden_layers * 7,
        worst.1,
        worst.0
    );
    assert!(total <= 2e-2, "LoRA gradients: relative L2 error {total}");
    assert!(worst.0 <= 5e-2, "LoRA gradients of {}: relative L2 error {}", worst.1, worst.0);
}

/// An adapter with LoRA on some projections only (q_proj and v_proj everywhere, down_proj of the first layer: the
/// GPU decoder gives the others no LoRA at all): the DPO loss and the gradients of the modules it has as on the CPU
/// backend, and optimizer steps that train those modules and give the adapter no new one.
#[test]
fn a_subset_adapter_trains_its_own_modules_as_the_cpu_backend() {
    use engine::adapter::{LoraSpec, TargetModules};
    let Some(gpu) = gpu() else { return };
    let (cpu, _, dev, _) = setup(&gpu);
    let spec = LoraSpec {
        r: 4,
        lora_alpha: 8.0,
        target_modules: TargetModules::Regex(r".*language_model.*\.(q_proj|v_proj|layers\.0\.mlp\.down_proj)".into()),
        ..LoraSpec::default()
    };
    let mut adapter = cpu.create_adapter(&spec, 9).unwrap();
    let names: Vec<String> = adapter.module_names().iter().map(|s| s.to_string()).collect();
    assert_eq!(names.len(), 2 * dev.cfg.num_hidden_layers + 1, "{names:?}");
    // B non-zero (peft starts it at zero), so every gradient path carries values.
    let mut rng = engine::rng::SplitMix64::new(4);
    for n in &names {
        adapter.module_mut(n).unwrap().b.iter_mut().for_each(|v| *v = ((rng.next_f64() * 2.0 - 1.0) * 0.05) as f32);
    }
    let mut lora = GpuLora::from_adapter(&gpu, &dev.cfg, &adapter).unwrap();
    let full = GpuLora::from_adapter(
        &gpu,
        &dev.cfg,
        &cpu.load_adapter(&gpu_common::root().join("tests/fixtures/llava").join(CASE).join("adapter")).unwrap(),
    )
    .unwrap();
    println!(
        "trainable parameters: {} for {} modules (the fixture's adapter on every projection: {})",
        lora.param_count(),
        names.len(),
        full.param_count()
    );
    assert!(lora.param_count() < full.param_count() / 2, "the modules the adapter leaves out take memory");
    let (prompt, chosen, rejected) = random_pair(&cpu, 45);
    let pair = TokenPair { pixels: None, prompt_ids: &prompt, chosen_ids: &chosen, rejected_ids: &rejected };
    let refs = reference_logps(&cpu, None, &pair).unwrap();
    let cfg = DpoConfig { beta: 0.5, ..Default::default() };
    let mut grads = Grads::zeros_like(&adapter);
    let (cpu_loss, _) = pair_forward_backward(&cpu, &adapter, &pair, refs, &cfg, 1.0, &mut grads, None).unwrap();
    lora.scaler = LossScaler::new(1024.0, 1000);
    let step = lora.dpo_step(&gpu, &dev, &prompt, &chosen, &rejected, refs, &cfg, None).unwrap();
    let (total, worst) = gradient_error(&gpu, &dev, &lora, &mut grads, 1024.0);
    println!(
        "subset adapter: loss CPU {cpu_loss:.5} GPU {:.5}; LoRA gradients relative L2 {total:.2e}, worst {} {:.2e}",
        step.loss, worst.1, worst.0
    );
    assert!((step.loss - cpu_loss).abs() <= 1e-2, "DPO loss: GPU {} vs CPU {cpu_loss}", step.loss);
    assert!(
        total <= 2e-2 && worst.0 <= 5e-2,
        "LoRA gradients: relative L2 {total} overall, {} worst ({})",
        worst.0,
        worst.1
    );
    // Three optimizer steps: the loss falls, the factors move, and they go back into the adapter's own modules.
    let opt = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    let before: Vec<(Vec<f32>, Vec<f32>)> =
        names.iter().map(|n| adapter.module(n).map(|m| (m.a.clone(), m.b.clone())).unwrap()).collect();
    let mut losses = Vec::new();
    for _ in 0..3 {
        let r = lora.dpo_step(&gpu, &dev, &prompt, &chosen, &rejected, refs, &cfg, Some((&opt, 1.0))).unwrap();
        assert!(r.grad_norm.is_some(), "a step overflowed");
        losses.push(r.loss);
    }
    assert!(losses[2] < losses[0], "the loss did not fall: {losses:?}");
    lora.write_back(&gpu, &mut adapter).unwrap();
    assert_eq!(adapter.module_names(), names, "training changed which modules the adapter has");
    for (n, (a0, b0)) in names.iter().zip(&before) {
        let m = adapter.module(n).unwrap();
        assert!(&m.a != a0 && &m.b != b0, "{n}: not trained");
    }
}

/// LoRA on the image path (the vision tower's q, v, out_proj, fc1 and fc2 and both projector layers) beside the
/// decoder's q and v: an image pair's DPO loss and every LoRA gradient, the image path's included, as the CPU
/// backend computes them; with the prompt shared by both answers, and with LoRA dropout (whole sequences, masks
/// drawn per part as the CPU trainer's). The same with the projector's weights and biases trained in full.
#[test]
fn image_path_lora_gradients_match_the_cpu_backend() {
    use engine::adapter::{LoraSpec, TargetModules};
    let Some(gpu) = gpu() else { return };
    let (cpu, _, dev, _) = setup(&gpu);
    let dir: PathBuf = gpu_common::root().join("tests/fixtures/llava").join(CASE).join("model");
    let vision = engine::cuda_clip::GpuVision::load_dir(&gpu, &dir).unwrap();
    let spec = LoraSpec {
        r: 4,
        lora_alpha: 8.0,
        target_modules: TargetModules::Regex(r".*(q_proj|v_proj|out_proj|fc1|fc2|linear_1|linear_2)".into()),
        ..LoraSpec::default()
    };
    let adapter_a = cpu.create_adapter(&spec, 11).unwrap();
    // And the projector trained in full beside LoRA elsewhere (`--train-projector`: peft modules_to_save).
    let spec_b = LoraSpec {
        target_modules: TargetModules::Regex(r".*(q_proj|v_proj|fc1)".into()),
        modules_to_save: vec!["multi_modal_projector".into()],
        ..spec.clone()
    };
    let adapter_b = cpu.create_adapter(&spec_b, 12).unwrap();
    assert_eq!(adapter_b.saved_params().count(), 4, "the projector's two weights and biases");
    assert!(
        adapter_a.module_names().iter().any(|n| n.starts_with("multi_modal_projector.linear_2")),
        "{:?}",
        adapter_a.module_names()
    );
    for (mut adapter, cases) in [(adapter_a, vec![(0.0, None), (0.2, Some(0xd0u64))]), (adapter_b, vec![(0.0, None)])] {
        check_image_path_pair(&gpu, &cpu, &dev, &vision, &mut adapter, &cases);
    }
}

/// `image_path_lora_gradients_match_the_cpu_backend` for one adapter and its (dropout, dropout seed) cases.
fn check_image_path_pair(
    gpu: &Gpu,
    cpu: &Model,
    dev: &engine::cuda_llama::GpuLlama,
    vision: &engine::cuda_clip::GpuVision,
    adapter: &mut engine::Adapter,
    cases: &[(f64, Option<u64>)],
) {
    let names: Vec<String> = adapter.module_names().iter().map(|s| s.to_string()).collect();
    let image: Vec<&String> = names.iter().filter(|n| engine::cuda_clip::in_image_path(n)).collect();
    assert!(image.iter().any(|n| n.starts_with("vision_tower.encoder.layers.0.")), "{image:?}");
    let mut rng = engine::rng::SplitMix64::new(6);
    for n in &names {
        adapter.module_mut(n).unwrap().b.iter_mut().for_each(|v| *v = ((rng.next_f64() * 2.0 - 1.0) * 0.1) as f32);
    }
    // An image of random pixels and a prompt holding the image token once.
    let side = cpu.config.llava().unwrap().vision.image_size;
    let pixels = engine::image::PixelValues::single(
        (0..3 * side * side).map(|_| (rng.next_f64() * 4.0 - 2.0) as f32).collect(),
        3,
        side,
        side,
    );
    let (mut prompt, chosen, rejected) = random_pair(cpu, 57);
    prompt.insert(3, cpu.image_token_id().unwrap());
    let pair = TokenPair { pixels: Some(&pixels), prompt_ids: &prompt, chosen_ids: &chosen, rejected_ids: &rejected };
    let refs = reference_logps(cpu, None, &pair).unwrap();
    let cfg = DpoConfig { beta: 0.5, ..Default::default() };
    let vision_layers = cpu.config.llava().unwrap().vision_layers_needed();
    assert!(
        vision_layers < cpu.config.llava().unwrap().vision.num_hidden_layers,
        "the fixture reads its features from the last tower layer"
    );
    for &(dropout, seed) in cases {
        adapter.lora_dropout = dropout;
        let mut grads = Grads::zeros_like(adapter);
        let (cpu_loss, _) = pair_forward_backward(cpu, adapter, &pair, refs, &cfg, 1.0, &mut grads, seed).unwrap();
        let mut lora = GpuLora::from_adapter(gpu, &dev.cfg, adapter).unwrap();
        assert!(lora.trains_image_path());
        lora.scaler = LossScaler::new(1024.0, 1000);
        let (loss, _) = lora.pair_gradients(gpu, dev, cpu, Some(vision), &pair, None, refs, &cfg, 1.0, seed).unwrap();
        let (total, worst) = gradient_error(gpu, dev, &lora, &mut grads, 1024.0);
        let (mut num, mut den, mut worst_img) = (0.0f64, 0.0f64, (0.0f64, String::new()));
        for n in &image {
            let want = grads.module_mut(n).unwrap();
            let (ga, gb) = lora.image_grads(gpu, n).unwrap();
            let (mut n1, mut d1) = (0.0f64, 0.0f64);
            for (g, w) in ga.iter().chain(&gb).zip(want.da.iter().chain(&want.db)) {
                let g = *g as f64 / 1024.0;
                assert!(g.is_finite(), "{n}: non-finite gradient");
                n1 += (g - *w as f64).powi(2);
                d1 += (*w as f64).powi(2);
            }
            // Tower layers after the one the features come from get no gradient on either device.
            let feeds = !n.starts_with(&format!("vision_tower.encoder.layers.{}.", vision_layers));
            assert_eq!(d1 > 0.0, feeds, "{n}: CPU gradient norm^2 {d1}");
            if !feeds {
                assert_eq!(n1, 0.0, "{n}: a gradient on the GPU for a layer the features do not come from");
            }
            num += n1;
            den += d1;
            if (n1 / d1).sqrt() > worst_img.0 {
                worst_img = ((n1 / d1).sqrt(), n.to_string());
            }
        }
        let img_total = (num / den).sqrt();
        let (mut pn, mut pd) = (0.0f64, 0.0f64);
        for (name, _) in adapter.saved_params() {
            let want = grads.param(name).unwrap_or_else(|| panic!("CPU grads have no {name}"));
            let got = lora.param_grad(gpu, name).unwrap();
            assert_eq!(got.len(), want.len(), "{name}");
            for (g, w) in got.iter().zip(want) {
                pn += (*g as f64 / 1024.0 - *w as f64).powi(2);
                pd += (*w as f64).powi(2);
            }
        }
        let saved = if pd > 0.0 { (pn / pd).sqrt() } else { 0.0 };
        if pd > 0.0 {
            println!(
                "projector trained in full: gradients rel L2 {saved:.2e} ({} tensors)",
                adapter.saved_params().count()
            );
        }
        assert!(saved <= 2e-2, "dropout {dropout}: gradients of the projector's weights and biases: rel L2 {saved}");
        println!("image-path LoRA, dropout {dropout}: loss CPU {cpu_loss:.5} GPU {loss:.5}; decoder gradients rel L2 {total:.2e} (worst {} {:.2e}); image path {img_total:.2e} (worst {} {:.2e})", worst.1, worst.0, worst_img.1, worst_img.0);
        assert!((loss - cpu_loss).abs() <= 1e-2, "dropout {dropout}: DPO loss GPU {loss} vs CPU {cpu_loss}");
        assert!(
            total <= 2e-2 && worst.0 <= 5e-2,
            "dropout {dropout}: decoder LoRA gradients rel L2 {total}, worst {worst:?}"
        );
        assert!(
            img_total <= 2e-2 && worst_img.0 <= 5e-2,
            "dropout {dropout}: image-path LoRA gradients rel L2 {img_total}, worst {worst_img:?}"
        );
    }
}

/// Relative L2 error of the GPU's accumulated LoRA gradients (loss-scaled by `scale`) against the CPU's `grads`:
/// overall, and the worst module's (error, name).
fn gradient_error(
    gpu: &Gpu,
    dev: &engine::cuda_llama::GpuLlama,
    lora: &GpuLora,
    grads: &mut Grads,
    scale: f64,
) -> (f64, (f64, String)) {
    let (mut num, mut den, mut worst) = (0.0f64, 0.0f64, (0.0f64, String::new()));
    for l in 0..dev.cfg.num_hidden_layers {
        for (j, proj) in PROJECTIONS.iter().enumerate() {
            let name = format!("language_model.layers.{l}.{proj}");
            // The GPU copy has LoRA exactly where the adapter has it.
            assert_eq!(lora.has_module(l, j), grads.module_mut(&name).is_some(), "{name}: LoRA on one side only");
            if !lora.has_module(l, j) {
                assert!(lora.grads(gpu, l, j).is_err(), "{name}: gradients of a module the adapter does not have");
                continue;
            }
            let want = grads.module_mut(&name).unwrap_or_else(|| panic!("CPU grads have no {name}"));
            let (ga, gb) = lora.grads(gpu, l, j).unwrap();
            let (mut n1, mut d1) = (0.0f64, 0.0f64);
            for (g, w) in ga.iter().chain(&gb).zip(want.da.iter().chain(&want.db)) {
                let g = *g as f64 / scale;
                assert!(g.is_finite(), "{name}: non-finite gradient");
                n1 += (g - *w as f64).powi(2);
                d1 += (*w as f64).powi(2);
            }
            num += n1;
            den += d1;
            let e = (n1 / d1.max(1e-30)).sqrt();
            if e > worst.0 {
                worst = (e, name.clone());
            }
        }
    }
    ((num / den).sqrt(), worst)
}

/// With LoRA dropout the GPU trainer draws the CPU trainer's masks: the same loss and LoRA gradients for the same
/// dropout seed, and gradients far off for another seed (so the comparison sees the masks).
#[test]
fn gpu_dpo_with_lora_dropout_matches_the_cpu_trainer_mask_for_mask() {
    let Some(gpu) = gpu() else { return };
    let (cpu, mut adapter, dev, _) = setup(&gpu);
    adapter.lora_dropout = 0.3;
    let (prompt, chosen, rejected) = random_pair(&cpu, 33);
    let pair = TokenPair { pixels: None, prompt_ids: &prompt, chosen_ids: &chosen, rejected_ids: &rejected };
    let refs = reference_logps(&cpu, None, &pair).unwrap();
    let cfg = DpoConfig { beta: 0.5, ..Default::default() };
    let mut grads = Grads::zeros_like(&adapter);
    let seed = 0x5eed;
    let (cpu_loss, _) = pair_forward_backward(&cpu, &adapter, &pair, refs, &cfg, 1.0, &mut grads, Some(seed)).unwrap();
    let mut errors = Vec::new();
    for s in [seed, seed + 1] {
        let mut lora = GpuLora::from_adapter(&gpu, &dev.cfg, &adapter).unwrap();
        assert_eq!(lora.dropout, 0.3, "the GPU copy lost the adapter's dropout");
        lora.scaler = LossScaler::new(1024.0, 1000);
        let step = lora.dpo_step_dropout(&gpu, &dev, &prompt, &chosen, &rejected, refs, &cfg, None, Some(s)).unwrap();
        let (total, worst) = gradient_error(&gpu, &dev, &lora, &mut grads, 1024.0);
        println!("dropout seed {s:#x}: loss CPU (seed {seed:#x}) {cpu_loss:.5} GPU {:.5}; LoRA gradients relative L2 {total:.2e}, worst {} {:.2e}", step.loss, worst.1, worst.0);
        errors.push((step.loss, total, worst.0));
    }
    let (loss, total, worst) = errors[0];
    assert!((loss - cpu_loss).abs() <= 1e-2, "DPO loss with dropout: GPU {loss} vs CPU {cpu_loss}");
    assert!(total <= 2e-2 && worst <= 5e-2, "LoRA gradients with dropout: relative L2 {total} overall, {worst} worst");
    assert!(
        errors[1].1 >= 10.0 * total && errors[1].1 >= 0.1,
        "another seed's masks give gradients as close to the CPU's ({:.2e}): the masks are not compared",
        errors[1].1
    );
}

#[test]
fn a_short_gpu_dpo_run_raises_reward_accuracy_and_skips_overflowing_steps() {
    let Some(gpu) = gpu() else { return };
    let (_, _, dev, mut lora) = setup(&gpu);
    let vocab = dev.cfg.vocab_size;
    let mut rng = engine::rng::SplitMix64::new(22);
    let pairs: Vec<(Vec<u32>, Vec<u32>, Vec<u32>)> = (0..4)
        .map(|_| (tokens(&mut rng, 8, vocab, None), tokens(&mut rng, 5, vocab, None), tokens(&mut rng, 5, vocab, None)))
        .collect();
    // The reference is the adapter before training.
    let refs: Vec<(f64, f64)> = pairs
        .iter()
        .map(|(p, c, r)| (lora.answer_logp(&gpu, &dev, p, c).unwrap(), lora.answer_logp(&gpu, &dev, p, r).unwrap()))
        .collect();
    let cfg = DpoConfig { beta: 0.5, ..Default::default() };
    let opt = AdamW { lr: 5e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    // Start with a loss scale far too large: the first steps overflow fp16 and must be skipped, the scale lowered.
    lora.scaler = LossScaler::new(16_777_216.0, 1000);
    let accuracy = |lora: &GpuLora| -> (f64, f64) {
        let (mut right, mut loss) = (0, 0.0);
        for ((p, c, r), &(rc, rr)) in pairs.iter().zip(&refs) {
            let margin =
                (lora.answer_logp(&gpu, &dev, p, c).unwrap() - rc) - (lora.answer_logp(&gpu, &dev, p, r).unwrap() - rr);
            right += usize::from(margin > 0.0);
            loss += (1.0 + (-cfg.beta * margin).exp()).ln() / pairs.len() as f64;
        }
        (right as f64 / pairs.len() as f64, loss)
    };
    let (acc0, loss0) = accuracy(&lora);
    for step in 0..60 {
        let (p, c, r) = &pairs[step % pairs.len()];
        lora.dpo_step(&gpu, &dev, p, c, r, refs[step % pairs.len()], &cfg, Some((&opt, 1.0))).unwrap();
    }
    let (acc1, loss1) = accuracy(&lora);
    println!("GPU DPO, 60 steps over 4 pairs: reward accuracy {acc0:.2} -> {acc1:.2}, loss {loss0:.4} -> {loss1:.4}; {} steps skipped on overflow, loss scale now {}", lora.scaler.skipped, lora.scaler.scale);
    assert!(lora.scaler.skipped >= 1, "the oversized loss scale never overflowed");
    assert!(lora.scaler.scale < 16_777_216.0, "the loss scale was not lowered");
    assert!(lora.steps >= 30, "only {} of 60 optimizer steps were taken", lora.steps);
    assert_eq!(acc1, 1.0, "reward accuracy after training: {acc1}");
    assert!(loss1 < loss0 - 0.1, "the DPO loss did not fall: {loss0} -> {loss1}");
}

/// One DPO step (gradients kept, no optimizer step) on a random pair of the fixture, twice: with one copy of the
/// adapter set up by `first` and another by `second`. Returns both reports, both adapters and the decoder.
#[allow(clippy::type_complexity)]
fn two_ways(
    gpu: &Gpu,
    seed: u64,
    rejected_len: usize,
    first: impl FnOnce(&mut GpuLora),
    second: impl FnOnce(&mut GpuLora),
) -> ((StepReport, StepReport), (GpuLora, GpuLora), engine::cuda_llama::GpuLlama) {
    let (cpu, _, dev, mut plain) = setup(gpu);
    let (_, _, _, mut other) = setup(gpu);
    first(&mut plain);
    second(&mut other);
    let vocab = cpu.llm.cfg.vocab_size;
    let mut rng = engine::rng::SplitMix64::new(seed);
    let image = cpu.image_token_id();
    let (prompt, chosen, rejected) = (
        tokens(&mut rng, 30, vocab, image),
        tokens(&mut rng, 9, vocab, image),
        tokens(&mut rng, rejected_len, vocab, image),
    );
    let cfg = DpoConfig { beta: 0.5, ..Default::default() };
    plain.scaler = LossScaler::new(1024.0, 1000);
    other.scaler = LossScaler::new(1024.0, 1000);
    let a = plain.dpo_step(gpu, &dev, &prompt, &chosen, &rejected, (-20.0, -18.0), &cfg, None).unwrap();
    let b = other.dpo_step(gpu, &dev, &prompt, &chosen, &rejected, (-20.0, -18.0), &cfg, None).unwrap();
    ((a, b), (plain, other), dev)
}

#[test]
fn activation_recomputation_gives_the_same_loss_and_gradients() {
    let Some(gpu) = gpu() else { return };
    // Recomputation runs whole sequences (it ignores `share_prompt`): compare it with whole sequences.
    let whole = |l: &mut GpuLora| l.share_prompt = false;
    let ((a, b), (plain, recompute), dev) = two_ways(&gpu, 5, 7, whole, |l| {
        whole(l);
        l.recompute = true;
    });
    // The same kernels on the same inputs in the same order: identical, bit for bit.
    assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "loss {} vs {}", a.loss, b.loss);
    for l in 0..dev.cfg.num_hidden_layers {
        for (j, proj) in PROJECTIONS.iter().enumerate() {
            assert_eq!(plain.grads(&gpu, l, j).unwrap(), recompute.grads(&gpu, l, j).unwrap(), "layer {l} {proj}");
        }
    }
    println!(
        "activation recomputation: loss {} and all {} LoRA gradients identical",
        a.loss,
        dev.cfg.num_hidden_layers * 7
    );
}

#[test]
fn sharing_the_prompt_of_a_pair_gives_the_same_loss_and_gradients() {
    let Some(gpu) = gpu() else { return };
    // A one-token rejected answer: predicted by the prompt's last row alone. The shared prompt is the default.
    let ((a, b), (plain, shared), dev) = two_ways(
        &gpu,
        8,
        1,
        |l| l.share_prompt = false,
        |l| assert!(l.share_prompt, "sharing the prompt is the default"),
    );
    println!(
        "shared prompt: loss {:.6} vs {:.6}; log-probs chosen {:.4}/{:.4}, rejected {:.4}/{:.4}",
        b.loss, a.loss, b.logps.policy_chosen, a.logps.policy_chosen, b.logps.policy_rejected, a.logps.policy_rejected
    );
    assert!((a.loss - b.loss).abs() <= 1e-3, "loss {} shared vs {} whole", b.loss, a.loss);
    assert!(
        (a.logps.policy_chosen - b.logps.policy_chosen).abs() <= 2e-2
            && (a.logps.policy_rejected - b.logps.policy_rejected).abs() <= 2e-2,
        "answer log-probs differ"
    );
    let (mut num, mut den, mut worst) = (0.0f64, 0.0f64, 0.0f64);
    for l in 0..dev.cfg.num_hidden_layers {
        for (j, proj) in PROJECTIONS.iter().enumerate() {
            let (wa, wb) = plain.grads(&gpu, l, j).unwrap();
            let (ga, gb) = shared.grads(&gpu, l, j).unwrap();
            let (mut n1, mut d1) = (0.0f64, 0.0f64);
            for (g, w) in ga.iter().chain(&gb).zip(wa.iter().chain(&wb)) {
                assert!(g.is_finite(), "layer {l} {proj}: non-finite gradient");
                n1 += ((g - w) as f64).powi(2);
                d1 += (*w as f64).powi(2);
            }
            num += n1;
            den += d1;
            worst = worst.max((n1 / d1.max(1e-30)).sqrt());
        }
    }
    let total = (num / den).sqrt();
    println!("shared prompt: LoRA gradients relative L2 {total:.2e} overall, worst module {worst:.2e} (a one-token rejected answer included)");
    assert!(total <= 1e-2 && worst <= 3e-2, "LoRA gradients differ: {total} overall, {worst} worst");
}

/// A LLaMA shape whose heads are `head_dim` wide (the fixtures' are narrower), for the tensor-core attention paths.
fn wide_heads(head_dim: usize) -> engine::config::LlamaConfig {
    engine::config::LlamaConfig {
        vocab_size: 512,
        hidden_size: 4 * head_dim,
        intermediate_size: 256,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: engine::config::RopeScaling::None,
        max_position_embeddings: 512,
        tie_word_embeddings: false,
        attention_bias: false,
        mlp_bias: false,
        qkv_bias: false,
        mrope_section: None,
        layer_window: Vec::new(),
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

#[test]
fn tensor_core_attention_gives_the_scalar_kernels_dpo_loss_and_gradients() {
    let Some(gpu) = gpu() else { return };
    if !gpu.mma_attention.load(std::sync::atomic::Ordering::Relaxed) {
        println!("SKIPPED: tensor-core attention is off on {} (it needs sm_80 or later, and RLAIFD_CUDA_MMA_ATTENTION unset or not 0)", gpu.name);
        return;
    }
    // Head sizes 64 (CLIP) and 128 (LLaMA), GQA; q, k and v inside the fused QKV buffer; the prompt shared by both
    // answers (the default, at 64) and whole sequences (at 128); a prompt longer than one 64-row tile.
    for (head_dim, share) in [(64, true), (128, false)] {
        let cfg = wide_heads(head_dim);
        let model = engine::cuda_llama::GpuLlama::random(&gpu, &cfg, 256, 3).unwrap();
        let mut rng = engine::rng::SplitMix64::new(head_dim as u64);
        let (prompt, chosen, rejected) = (
            tokens(&mut rng, 100, cfg.vocab_size, None),
            tokens(&mut rng, 30, cfg.vocab_size, None),
            tokens(&mut rng, 23, cfg.vocab_size, None),
        );
        let dpo = DpoConfig { beta: 0.5, ..Default::default() };
        let run = |mma: bool| {
            gpu.mma_attention.store(mma, std::sync::atomic::Ordering::Relaxed);
            let mut lora = GpuLora::random(&gpu, &cfg, 8, 16.0, 5).unwrap();
            lora.share_prompt = share;
            lora.scaler = LossScaler::new(1024.0, 1000);
            let rep = lora.dpo_step(&gpu, &model, &prompt, &chosen, &rejected, (-190.0, -150.0), &dpo, None).unwrap();
            (rep, lora)
        };
        let (a, plain) = run(false);
        let (b, mma) = run(true);
        gpu.mma_attention.store(true, std::sync::atomic::Ordering::Relaxed);
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for l in 0..cfg.num_hidden_layers {
            for (j, proj) in PROJECTIONS.iter().enumerate() {
                let (wa, wb) = plain.grads(&gpu, l, j).unwrap();
                let (ga, gb) = mma.grads(&gpu, l, j).unwrap();
                for (g, w) in ga.iter().chain(&gb).zip(wa.iter().chain(&wb)) {
                    assert!(g.is_finite(), "head size {head_dim}, layer {l} {proj}: non-finite gradient");
                    num += ((g - w) as f64).powi(2);
                    den += (*w as f64).powi(2);
                }
            }
        }
        let rel = (num / den).sqrt();
        println!(
            "head size {head_dim}, shared prompt {share}: loss {:.6} (mma) vs {:.6} (scalar); log-probs chosen {:.4}/{:.4}; LoRA gradients relative L2 {rel:.2e}",
            b.loss, a.loss, b.logps.policy_chosen, a.logps.policy_chosen
        );
        assert!(
            (a.loss - b.loss).abs() <= 1e-3 * a.loss.abs().max(1.0),
            "loss {} with tensor cores vs {}",
            b.loss,
            a.loss
        );
        assert!(
            (a.logps.policy_chosen - b.logps.policy_chosen).abs() <= 2e-2
                && (a.logps.policy_rejected - b.logps.policy_rejected).abs() <= 2e-2,
            "answer log-probs differ"
        );
        assert!(rel <= 1e-2, "LoRA gradients differ: relative L2 {rel}");
    }
}

/// Qwen2.5-VL's and Qwen2-VL's decoders on the GPU trainer (q/k/v biases, multimodal RoPE positions for the image
/// rows and the shifted text positions after them, the RoPE backward through both), and sliding-window decoders
/// (Qwen2's on its later layers, LLaVA-NeXT-Mistral's on all): a DPO pair with the fixture's image gives the CPU
/// trainer's loss and LoRA gradients, with the prompt run once for both answers and with whole sequences.
#[test]
fn qwen_and_sliding_window_lora_gradients_on_the_gpu_match_the_cpu_backend() {
    use engine::adapter::{LoraSpec, TargetModules};
    let Some(gpu) = gpu() else { return };
    for case in [
        "qwen_vl/qwen25_native_f32_gqa",
        "qwen_vl/qwen2_452_f32_wide",
        "qwen_vl/qwen25_native_f32_window",
        "llava_next/next_native_f32_mistral_window",
    ] {
        let dir: PathBuf = gpu_common::root().join("tests/fixtures").join(case);
        let cpu = Model::load(&dir.join("model")).unwrap();
        let dev = engine::cuda_llama::load_dir(&gpu, &dir.join("model"), 256).unwrap();
        // LoRA on every decoder projection, B non-zero so every module has a gradient through the others.
        let spec = LoraSpec {
            r: 4,
            lora_alpha: 8.0,
            target_modules: TargetModules::Regex(r".*language_model.*_proj".into()),
            ..LoraSpec::default()
        };
        let mut adapter = cpu.create_adapter(&spec, 5).unwrap();
        assert_eq!(adapter.module_names().len(), 7 * cpu.llm.cfg.num_hidden_layers, "{case}");
        gpu_common::randomize_b(&mut adapter, 9, 0.1);
        let mut rng = engine::rng::SplitMix64::new(9);
        assert_eq!(engine::cuda_train::gpu_trainable(&dev.cfg, &adapter), None, "{case}");
        let px = cpu.load_image(&dir.join("image.png")).unwrap();
        let feats = cpu.image_features(&px, None).unwrap();
        let (prompt, chosen) = gpu_common::fixture_prompt(&dir, cpu.image_token_id());
        let rejected = tokens(&mut rng, 5, cpu.llm.cfg.vocab_size.min(60), cpu.image_token_id());
        let pair = TokenPair { pixels: Some(&px), prompt_ids: &prompt, chosen_ids: &chosen, rejected_ids: &rejected };
        let refs = reference_logps(&cpu, None, &pair).unwrap();
        let cfg = DpoConfig { beta: 0.5, ..Default::default() };
        let mut grads = Grads::zeros_like(&adapter);
        let (cpu_loss, _) = pair_forward_backward(&cpu, &adapter, &pair, refs, &cfg, 1.0, &mut grads, None).unwrap();
        for share in [true, false] {
            let mut lora = GpuLora::from_adapter(&gpu, &dev.cfg, &adapter).unwrap();
            lora.share_prompt = share;
            lora.scaler = LossScaler::new(1024.0, 1000);
            let (loss, _) =
                lora.pair_gradients(&gpu, &dev, &cpu, None, &pair, Some(&feats.rows), refs, &cfg, 1.0, None).unwrap();
            let (total, worst) = gradient_error(&gpu, &dev, &lora, &mut grads, 1024.0);
            println!(
                "{case} (shared prompt {share}): loss CPU {cpu_loss:.5} GPU {loss:.5}; LoRA gradients rel L2 {total:.2e}, worst {} {:.2e}",
                worst.1, worst.0
            );
            assert!((loss - cpu_loss).abs() <= 1e-2, "{case}: DPO loss GPU {loss} vs CPU {cpu_loss}");
            // 3x to 5x the errors seen on cuemu (2.9e-3 / 5.0e-3); the RoPE backward without the multimodal
            // sections gives 1.6e-2 / 5.6e-2.
            assert!(total <= 1e-2 && worst.0 <= 2e-2, "{case}: LoRA gradients rel L2 {total}, worst {worst:?}");
        }
    }
}

/// LLaVA-NeXT's tiled images on the GPU trainer: LoRA on the CLIP tower and the projector runs every tile (the base
/// image and the grid's tiles) through the tower on the device, packs their features as inference does
/// (unpadding, `image_newline` rows), and sends the decoder's gradient back to the tile rows they came from: the
/// DPO loss and the decoder's and the image path's LoRA gradients follow the CPU trainer.
#[test]
fn llava_next_tiles_train_their_image_path_on_the_gpu_as_the_cpu_backend() {
    use engine::adapter::{LoraSpec, TargetModules};
    let Some(gpu) = gpu() else { return };
    for case in ["next_native_f32_gqa", "next_native_f32_tall3"] {
        let dir: PathBuf = gpu_common::root().join("tests/fixtures/llava_next").join(case);
        let cpu = Model::load(&dir.join("model")).unwrap();
        let dev = engine::cuda_llama::load_dir(&gpu, &dir.join("model"), 512).unwrap();
        let vision = engine::cuda_clip::GpuVision::load_dir(&gpu, &dir.join("model")).unwrap();
        let spec = LoraSpec {
            r: 4,
            lora_alpha: 8.0,
            target_modules: TargetModules::Regex(r".*(q_proj|v_proj|fc1|linear_1|linear_2)".into()),
            ..LoraSpec::default()
        };
        let mut adapter = cpu.create_adapter(&spec, 13).unwrap();
        gpu_common::randomize_b(&mut adapter, 14, 0.1);
        let mut rng = engine::rng::SplitMix64::new(14);
        let names: Vec<String> = adapter.module_names().iter().map(|s| s.to_string()).collect();
        let image: Vec<&String> = names.iter().filter(|n| engine::cuda_clip::in_image_path(n)).collect();
        assert!(image.iter().any(|n| n.starts_with("vision_tower.")), "{image:?}");
        let px = cpu.load_image(&dir.join("image.png")).unwrap();
        assert!(px.tiles > 2, "{case}: an image of several tiles");
        let (prompt, chosen) = gpu_common::fixture_prompt(&dir, cpu.image_token_id());
        let rejected = tokens(&mut rng, 5, cpu.llm.cfg.vocab_size.min(60), cpu.image_token_id());
        let pair = TokenPair { pixels: Some(&px), prompt_ids: &prompt, chosen_ids: &chosen, rejected_ids: &rejected };
        let refs = reference_logps(&cpu, None, &pair).unwrap();
        let cfg = DpoConfig { beta: 0.5, ..Default::default() };
        let mut grads = Grads::zeros_like(&adapter);
        let (cpu_loss, _) = pair_forward_backward(&cpu, &adapter, &pair, refs, &cfg, 1.0, &mut grads, None).unwrap();
        let mut lora = GpuLora::from_adapter(&gpu, &dev.cfg, &adapter).unwrap();
        assert!(lora.trains_image_path());
        lora.scaler = LossScaler::new(1024.0, 1000);
        let (loss, _) =
            lora.pair_gradients(&gpu, &dev, &cpu, Some(&vision), &pair, None, refs, &cfg, 1.0, None).unwrap();
        let (total, worst) = gradient_error(&gpu, &dev, &lora, &mut grads, 1024.0);
        let (mut num, mut den, mut worst_img) = (0.0f64, 0.0f64, (0.0f64, String::new()));
        for n in &image {
            let want = grads.module_mut(n).unwrap();
            let (ga, gb) = lora.image_grads(&gpu, n).unwrap();
            let (mut n1, mut d1) = (0.0f64, 0.0f64);
            for (g, w) in ga.iter().chain(&gb).zip(want.da.iter().chain(&want.db)) {
                let g = *g as f64 / 1024.0;
                assert!(g.is_finite(), "{n}: non-finite gradient");
                n1 += (g - *w as f64).powi(2);
                d1 += (*w as f64).powi(2);
            }
            num += n1;
            den += d1;
            if d1 > 0.0 && (n1 / d1).sqrt() > worst_img.0 {
                worst_img = ((n1 / d1).sqrt(), n.to_string());
            }
        }
        let img_total = (num / den).sqrt();
        println!(
            "{case} ({} tiles): loss CPU {cpu_loss:.5} GPU {loss:.5}; decoder LoRA gradients rel L2 {total:.2e} (worst {} {:.2e}); image path {img_total:.2e} (worst {} {:.2e})",
            px.tiles, worst.1, worst.0, worst_img.1, worst_img.0
        );
        assert!((loss - cpu_loss).abs() <= 1e-2, "{case}: DPO loss GPU {loss} vs CPU {cpu_loss}");
        assert!(total <= 2e-2 && worst.0 <= 5e-2, "{case}: decoder LoRA gradients rel L2 {total}, worst {worst:?}");
        assert!(img_total <= 2e-2 && worst_img.0 <= 5e-2, "{case}: image-path gradients {img_total}, {worst_img:?}");
    }
}

/// Full-parameter DPO (`Model::full_parameter_spec`: every linear layer of the language model and the head trained
/// whole, RLAIF-V's 7B recipe) on the GPU trainer: a pair's loss and the gradient of every whole weight (the fused
/// q/k/v and gate/up matrices, o, down, the head where it is not tied, Qwen2's q/k/v biases) as the CPU backend
/// computes them, with the prompt shared and not; then optimizer steps lower the loss, the trained weights go back
/// into the adapter, and the CPU backend gives the GPU's loss under them (the GPU passes read the trained weights,
/// not the base's, which stay as they were).
#[test]
fn full_parameter_dpo_on_the_gpu_matches_the_cpu_backend() {
    use engine::adapter::LoraSpec;
    let Some(gpu) = gpu() else { return };
    let (mut heads, mut biases) = (0, 0);
    for case in ["llava/l15_4x_f32_gqa_tied_lora", "qwen_vl/qwen25_native_f32_gqa"] {
        let dir: PathBuf = gpu_common::root().join("tests/fixtures").join(case);
        let cpu = Model::load(&dir.join("model")).unwrap();
        let dev = engine::cuda_llama::load_dir(&gpu, &dir.join("model"), 256).unwrap();
        // The decoder and the head whole (the projector's whole weights are covered by the image-path test).
        let spec =
            LoraSpec { modules_to_save: vec!["language_model".into(), "lm_head".into()], ..cpu.full_parameter_spec() };
        let mut adapter = cpu.create_adapter(&spec, 3).unwrap();
        assert!(adapter.module_names().is_empty(), "{case}: full-parameter training has no LoRA");
        let names: Vec<String> = adapter.saved_params().map(|(n, _)| n.to_string()).collect();
        let per_layer = 7 + if dev.cfg.qkv_bias { 3 } else { 0 };
        let head = names.iter().any(|n| n == "lm_head.weight");
        assert_eq!(names.len(), per_layer * dev.cfg.num_hidden_layers + head as usize, "{case}: {names:?}");
        heads += head as usize;
        biases += dev.cfg.qkv_bias as usize;
        assert_eq!(engine::cuda_train::gpu_trainable(&dev.cfg, &adapter), None, "{case}");
        let (prompt, chosen, rejected) = random_pair(&cpu, 33);
        let pair = TokenPair { pixels: None, prompt_ids: &prompt, chosen_ids: &chosen, rejected_ids: &rejected };
        let refs = reference_logps(&cpu, None, &pair).unwrap();
        let cfg = DpoConfig { beta: 0.5, ..Default::default() };
        // The reference is the base; move the policy off it first so the loss's gradient is not symmetric.
        let mut lora = GpuLora::from_adapter(&gpu, &dev.cfg, &adapter).unwrap();
        lora.scaler = LossScaler::new(1024.0, 1000);
        let opt = AdamW { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
        let first = lora.dpo_step(&gpu, &dev, &prompt, &chosen, &rejected, refs, &cfg, Some((&opt, 1.0))).unwrap();
        assert!(first.grad_norm.is_some(), "{case}: the first step overflowed");
        lora.write_back(&gpu, &mut adapter).unwrap();
        let mut grads = Grads::zeros_like(&adapter);
        let (cpu_loss, _) = pair_forward_backward(&cpu, &adapter, &pair, refs, &cfg, 1.0, &mut grads, None).unwrap();
        for share in [true, false] {
            let mut lora = GpuLora::from_adapter(&gpu, &dev.cfg, &adapter).unwrap();
            lora.share_prompt = share;
            lora.scaler = LossScaler::new(1024.0, 1000);
            let (loss, _) = lora.pair_gradients(&gpu, &dev, &cpu, None, &pair, None, refs, &cfg, 1.0, None).unwrap();
            let (mut num, mut den, mut worst) = (0.0f64, 0.0f64, (0.0f64, String::new()));
            for name in &names {
                let want = grads.param(name).unwrap_or_else(|| panic!("CPU grads have no {name}"));
                let got = lora.param_grad(&gpu, name).unwrap();
                assert_eq!(got.len(), want.len(), "{name}");
                let (mut n1, mut d1) = (0.0f64, 0.0f64);
                for (g, w) in got.iter().zip(want) {
                    let g = *g as f64 / 1024.0;
                    assert!(g.is_finite(), "{case} {name}: non-finite gradient");
                    n1 += (g - *w as f64).powi(2);
                    d1 += (*w as f64).powi(2);
                }
                assert!(d1 > 0.0, "{case} {name}: no gradient on the CPU");
                num += n1;
                den += d1;
                if (n1 / d1).sqrt() > worst.0 {
                    worst = ((n1 / d1).sqrt(), name.clone());
                }
            }
            let total = (num / den).sqrt();
            println!(
                "{case} full-parameter (shared prompt {share}): loss CPU {cpu_loss:.5} GPU {loss:.5}; {} whole tensors, gradients rel L2 {total:.2e}, worst {} {:.2e}",
                names.len(),
                worst.1,
                worst.0
            );
            assert!((loss - cpu_loss).abs() <= 1e-2, "{case}: DPO loss GPU {loss} vs CPU {cpu_loss}");
            assert!(total <= 2e-2 && worst.0 <= 5e-2, "{case}: whole-weight gradients rel L2 {total}, worst {worst:?}");
        }
        // Optimizer steps: the loss falls; the weights written back give the CPU the GPU's loss.
        let before: Vec<Vec<f32>> = adapter.saved_params().map(|(_, p)| p.values.clone()).collect();
        let mut losses = Vec::new();
        for _ in 0..3 {
            let r = lora.dpo_step(&gpu, &dev, &prompt, &chosen, &rejected, refs, &cfg, Some((&opt, 1.0))).unwrap();
            assert!(r.grad_norm.is_some(), "{case}: a step overflowed");
            losses.push(r.loss);
        }
        assert!(losses[2] < losses[0], "{case}: the loss did not fall: {losses:?}");
        let now = lora.dpo_step(&gpu, &dev, &prompt, &chosen, &rejected, refs, &cfg, None).unwrap();
        lora.write_back(&gpu, &mut adapter).unwrap();
        for ((name, p), b) in adapter.saved_params().zip(&before) {
            assert!(&p.values != b, "{case} {name}: not trained");
        }
        let mut grads = Grads::zeros_like(&adapter);
        let (cpu_now, _) = pair_forward_backward(&cpu, &adapter, &pair, refs, &cfg, 1.0, &mut grads, None).unwrap();
        println!("{case}: losses {losses:?}, then GPU {:.5} CPU {cpu_now:.5} under the trained weights", now.loss);
        assert!((now.loss - cpu_now).abs() <= 1e-2, "{case}: after training GPU {} vs CPU {cpu_now}", now.loss);
        // The base on the device is untouched: a fresh copy of the untrained adapter gives the first loss again.
        let fresh = cpu.create_adapter(&spec, 3).unwrap();
        let mut again = GpuLora::from_adapter(&gpu, &dev.cfg, &fresh).unwrap();
        let (l0, _) = again.pair_gradients(&gpu, &dev, &cpu, None, &pair, None, refs, &cfg, 1.0, None).unwrap();
        let mut grads = Grads::zeros_like(&fresh);
        let (cpu0, _) = pair_forward_backward(&cpu, &fresh, &pair, refs, &cfg, 1.0, &mut grads, None).unwrap();
        assert!((l0 - cpu0).abs() <= 1e-2, "{case}: the base changed: loss {l0} under its own weights, CPU {cpu0}");
    }
    assert!(heads > 0 && biases > 0, "the cases cover an untied head ({heads}) and q/k/v biases ({biases})");
}
