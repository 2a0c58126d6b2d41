//! Device selection and the backend dispatch, on any machine: `--device` names parse or are refused with the fix,
//! `auto` falls back to the CPU (saying why) where no GPU is usable while an explicit `cuda` is an error, a model
//! on the CPU backend computes exactly what it computes with no backend set, and the rule that decides which
//! adapters the GPU decoder can apply (the others run on the CPU), and batched generation of several prompts
//! (the LLM claim extractor's) against one prompt at a time.

use engine::adapter::{LoraSpec, TargetModules};
use engine::backend::{select, CpuBackend, DeviceSpec};
use engine::cuda_train::inference_rank;
use engine::generate::{generate, generate_batch, GenerateRequest};
use engine::sampling::SamplingParams;
use engine::Model;
use std::path::PathBuf;
use std::sync::Arc;

fn shapes() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/shapes-base")
}

#[test]
fn auto_falls_back_to_the_cpu_without_a_gpu_and_an_explicit_cuda_is_refused() {
    let model = Model::load(&shapes()).unwrap();
    let (b, what) = select(DeviceSpec::Cpu, &model).unwrap();
    assert_eq!((b.device(), what.as_str()), ("cpu".to_string(), "cpu (asked for)"));
    let gpu_usable = matches!(engine::cuda::Gpu::open(0), Ok(Ok(_)));
    let (b, what) = select(DeviceSpec::Auto, &model).unwrap();
    if gpu_usable {
        assert!(b.device().starts_with("cuda:0"), "{what}");
    } else {
        assert_eq!(b.device(), "cpu");
        assert!(what.starts_with("cpu (no usable GPU: "), "{what}");
        let e = select(DeviceSpec::Cuda(0), &model).err().expect("cuda:0 without a GPU must be refused").to_string();
        assert!(e.contains("cuda:0 cannot be used") && e.contains("--device cpu"), "{e}");
        println!("auto: {what}\ncuda:0: {e}");
    }
    let e = select(DeviceSpec::Cuda(7), &model).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(gpu_usable || e.contains("cuda:7"), "{e}");
}

#[test]
fn a_model_on_the_cpu_backend_computes_what_it_computes_without_one() {
    let plain = Model::load(&shapes()).unwrap();
    let mut on_cpu = Model::load(&shapes()).unwrap();
    on_cpu.set_backend(Arc::new(CpuBackend));
    assert_eq!((plain.device(), on_cpu.device()), ("cpu".to_string(), "cpu".to_string()));
    let tok = engine::tokenizer::TextTokenizer::from_file(&shapes().join("tokenizer.json")).unwrap();
    let ids = tok.encode("USER: Describe the image. ASSISTANT:", true).unwrap();
    let params = SamplingParams { temperature: 0.7, max_new_tokens: 12, ..Default::default() };
    let req = GenerateRequest { ids: &ids, pixels: None, seeds: &[1, 2, 3], params, stop_ids: vec![] };
    let a = generate(&plain, &req, None).unwrap();
    let b = generate(&on_cpu, &req, None).unwrap();
    assert_eq!(a.iter().map(|x| &x.tokens).collect::<Vec<_>>(), b.iter().map(|x| &x.tokens).collect::<Vec<_>>());
    let ans = &a[0].tokens;
    assert_eq!(
        plain.answer_logp(&ids, ans, None, None).unwrap().to_bits(),
        on_cpu.answer_logp(&ids, ans, None, None).unwrap().to_bits()
    );
}

#[test]
fn the_gpu_decoder_takes_lora_on_decoder_projections_only() {
    let model = Model::load(&shapes()).unwrap();
    let cfg = &model.llm.cfg;
    let spec = |targets: TargetModules, save: &[&str]| LoraSpec {
        r: 8,
        lora_alpha: 16.0,
        target_modules: targets,
        modules_to_save: save.iter().map(|s| s.to_string()).collect(),
        ..LoraSpec::default()
    };
    let names = |v: &[&str]| TargetModules::Names(v.iter().map(|s| s.to_string()).collect());
    // The loop's adapter (every decoder projection), and a subset (the rest count as zero).
    let full = model.create_adapter(&spec(LoraSpec::default().target_modules, &[]), 1).unwrap();
    assert_eq!(inference_rank(cfg, &full).unwrap(), (8, 2.0));
    let qv = model.create_adapter(&spec(names(&["q_proj", "v_proj"]), &[]), 1).unwrap();
    assert_eq!(inference_rank(cfg, &qv).unwrap(), (8, 2.0));
    // LoRA on the vision tower and projector is applied by the (CPU) image path: accepted beside the decoder's.
    let all = model.create_adapter(&spec(TargetModules::Regex(r".*(q_proj|fc1|linear_1)".into()), &[]), 1).unwrap();
    assert!(all.module_names().iter().any(|n| n.starts_with("vision_tower.")), "{:?}", all.module_names());
    assert_eq!(inference_rank(cfg, &all).unwrap(), (8, 2.0));
    // Refused, with the reason: LoRA on the lm_head, a replaced decoder parameter, nothing in the decoder.
    let head = model.create_adapter(&spec(names(&["q_proj", "lm_head"]), &[]), 1).unwrap();
    let e = inference_rank(cfg, &head).unwrap_err().to_string();
    assert!(e.contains("lm_head"), "{e}");
    let saved = model.create_adapter(&spec(names(&["q_proj"]), &["lm_head"]), 1).unwrap();
    let e = inference_rank(cfg, &saved).unwrap_err().to_string();
    assert!(e.contains("lm_head") && e.contains("modules_to_save"), "{e}");
    let vision = model.create_adapter(&spec(TargetModules::Regex(r".*vision_tower.*q_proj".into()), &[]), 1).unwrap();
    let e = inference_rank(cfg, &vision).unwrap_err().to_string();
    assert!(e.contains("no LoRA module in the decoder"), "{e}");
}

#[test]
fn the_gpu_trainer_takes_the_loops_adapters_and_leaves_the_rest_to_the_cpu() {
    use engine::cuda_train::gpu_trainable;
    let model = Model::load(&shapes()).unwrap();
    let cfg = &model.llm.cfg;
    let spec = |targets: TargetModules, dropout: f64| LoraSpec {
        r: 8,
        lora_alpha: 16.0,
        lora_dropout: dropout,
        target_modules: targets,
        ..LoraSpec::default()
    };
    // What the loop trains (rlaif/train.rs: LoraSpec::default's targets): the GPU (fresh, paused or resumed alike).
    let loop_adapter = model.create_adapter(&spec(LoraSpec::default().target_modules, 0.0), 1).unwrap();
    assert_eq!(gpu_trainable(cfg, &loop_adapter), None);
    // With LoRA dropout too (the GPU draws the CPU trainer's masks).
    let dropout = model.create_adapter(&spec(LoraSpec::default().target_modules, 0.05), 1).unwrap();
    assert_eq!(gpu_trainable(cfg, &dropout), None);
    // Any subset of the decoder's projections (peft's classic q_proj + v_proj, or some layers only): the GPU.
    let qv = model
        .create_adapter(&spec(TargetModules::Regex(r".*language_model.*\.(q_proj|v_proj)".into()), 0.0), 1)
        .unwrap();
    assert_eq!(gpu_trainable(cfg, &qv), None);
    let one_layer = model
        .create_adapter(&spec(TargetModules::Regex(r".*language_model.*layers\.0\.mlp\..*".into()), 0.0), 1)
        .unwrap();
    assert_eq!(one_layer.module_names().len(), 3, "{:?}", one_layer.module_names());
    assert_eq!(gpu_trainable(cfg, &one_layer), None);
    // The projector trained in full (--train-projector): the GPU (the backend checks its image path can).
    let projector = model
        .create_adapter(
            &LoraSpec {
                modules_to_save: vec!["multi_modal_projector".into()],
                ..spec(LoraSpec::default().target_modules, 0.0)
            },
            1,
        )
        .unwrap();
    assert_eq!(gpu_trainable(cfg, &projector), None);
    // Full-parameter training (every linear layer of the language model, the head and the projector whole): the
    // GPU; the head whole beside LoRA too.
    let full = model.create_adapter(&model.full_parameter_spec(), 1).unwrap();
    assert!(full.module_names().is_empty());
    assert_eq!(gpu_trainable(cfg, &full), None);
    let saved = model
        .create_adapter(
            &LoraSpec { modules_to_save: vec!["lm_head".into()], ..spec(LoraSpec::default().target_modules, 0.0) },
            1,
        )
        .unwrap();
    assert_eq!(gpu_trainable(cfg, &saved), None);
    // Qwen2.5-VL's full-parameter adapter (its decoder with q/k/v biases, and its head): the GPU.
    let qwen = Model::load(&shapes().join("../../tests/fixtures/qwen_vl/qwen25_native_f32_gqa/model")).unwrap();
    let q_full = qwen.create_adapter(&qwen.full_parameter_spec(), 1).unwrap();
    assert!(q_full.saved_params().any(|(n, _)| n.ends_with("q_proj.bias")));
    assert_eq!(gpu_trainable(&qwen.llm.cfg, &q_full), None);
    // q_proj whole without k_proj and v_proj, which the GPU decoder fuses with it: the CPU, with why.
    let q_only = model
        .create_adapter(
            &LoraSpec { modules_to_save: vec!["q_proj".into()], ..spec(TargetModules::Names(Vec::new()), 0.0) },
            1,
        )
        .unwrap();
    let why = gpu_trainable(cfg, &q_only).unwrap_or_default();
    assert!(why.contains("fuses") && why.contains("q_proj"), "{why:?}");
    let none = model.create_adapter(&spec(TargetModules::Regex(r".*vision_tower.*q_proj".into()), 0.0), 1).unwrap();
    assert!(
        gpu_trainable(cfg, &none).unwrap().contains("no LoRA module in the decoder"),
        "{:?}",
        gpu_trainable(cfg, &none)
    );
    let vision = model
        .create_adapter(
            &spec(TargetModules::Regex(r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|fc1)".into()), 0.0),
            1,
        )
        .unwrap();
    // LoRA on the image path's linear layers beside the decoder's: the GPU too (the backend sends it to the CPU
    // where the model's image path is not on the device or cannot apply it: cuda_backend.rs).
    assert_eq!(gpu_trainable(cfg, &vision), None);
    let head =
        model.create_adapter(&spec(TargetModules::Names(vec!["q_proj".into(), "lm_head".into()]), 0.0), 1).unwrap();
    assert!(gpu_trainable(cfg, &head).unwrap().contains("lm_head"), "{:?}", gpu_trainable(cfg, &head));
}

#[test]
fn a_batch_of_prompts_answers_each_prompt_as_generate_does() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    // LLaVA-1.5 (the bundled model), a text-only LLaMA, and a Mistral decoder with a sliding window.
    for dir in [
        shapes(),
        fixtures.join("llava/llama_text_only/model"),
        fixtures.join("llava_next/next_native_f32_mistral_window/model"),
    ] {
        let model = Model::load(&dir).unwrap();
        let vocab = model.llm.cfg.vocab_size as u32;
        let image = model.image_token_id();
        let token = |i: u32| -> u32 {
            let t = 3 + (i * 7919) % (vocab - 3);
            if Some(t) == image {
                t + 1
            } else {
                t
            }
        };
        let shared: Vec<u32> = (0..9).map(token).collect();
        let tails: [Vec<u32>; 4] =
            [vec![token(40)], (41..44).map(token).collect(), (44..50).map(token).collect(), vec![]];
        let mut prompts: Vec<Vec<u32>> = tails.iter().map(|t| [shared.clone(), t.clone()].concat()).collect();
        // A prompt sharing nothing with the others: the batch then has no common beginning.
        prompts.push((60..63).map(token).collect());
        let seeds = [11u64, 12, 13, 14, 15];
        let greedy = SamplingParams { temperature: 0.0, max_new_tokens: 12, ..Default::default() };
        let sampled = SamplingParams {
            temperature: 0.9,
            top_k: 20,
            repetition_penalty: 1.1,
            max_new_tokens: 12,
            ..Default::default()
        };
        for params in [greedy.clone(), sampled] {
            for n in [4, 5] {
                let refs: Vec<&[u32]> = prompts[..n].iter().map(|p| p.as_slice()).collect();
                let batch = generate_batch(&model, &refs, &seeds[..n], &params, None).unwrap();
                assert_eq!(batch.len(), n);
                for i in 0..n {
                    let req = GenerateRequest {
                        ids: &prompts[i],
                        pixels: None,
                        seeds: &seeds[i..i + 1],
                        params: params.clone(),
                        stop_ids: vec![],
                    };
                    let one = generate(&model, &req, None).unwrap().remove(0);
                    let what = format!("{}: prompt {i} of {n}, temperature {}", dir.display(), params.temperature);
                    assert_eq!(batch[i].tokens, one.tokens, "{what}");
                    assert_eq!((batch[i].finish, batch[i].seed), (one.finish, one.seed), "{what}");
                }
            }
        }
        // Bad batches are refused before any work, naming the prompt.
        let refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
        let err = generate_batch(&model, &refs, &seeds[..2], &greedy, None).unwrap_err().to_string();
        assert!(err.contains("5 prompts but 2 seeds"), "{err}");
        let err = generate_batch(&model, &[&shared, &[]], &seeds[..2], &greedy, None).unwrap_err().to_string();
        assert!(err.contains("prompt 1 of the batch is empty"), "{err}");
        if let Some(image) = image {
            let with_image = [shared.clone(), vec![image]].concat();
            let err =
                generate_batch(&model, &[&shared, &with_image], &seeds[..2], &greedy, None).unwrap_err().to_string();
            assert!(err.contains("prompt 1 of the batch holds the image token"), "{err}");
        }
        let long = vec![token(1); model.context_len()];
        let err = generate_batch(&model, &[&shared, &long], &seeds[..2], &greedy, None).unwrap_err().to_string();
        assert!(err.contains("context"), "{err}");
    }
}
