//! `rlaifd grad` and `rlaifd train-dpo` as outside callers use them.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The checkout: $RLAIFD_ROOT when the binary runs elsewhere than where it was built (scripts/gpu-check.sh).
fn root() -> PathBuf {
    std::env::var("RLAIFD_ROOT").map(PathBuf::from).unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rlaifd-train-cli-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> (bool, String, String) {
    // $RLAIFD_BIN: the rlaifd binary beside this test's on a GPU host (scripts/gpu-check.sh).
    let bin = std::env::var("RLAIFD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_rlaifd").to_string());
    let out = Command::new(bin).args(args).output().expect("run rlaifd");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn grad_prints_loss_and_writes_gradients_under_adapter_keys() {
    let case = root().join("tests/fixtures/grad/l15_4x_f32_gqa_tied_lora");
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("expected.json")).unwrap()).unwrap();
    let out = tmp("grad").join("grads.safetensors");
    let (ok, stdout, stderr) = run(&[
        "grad",
        "--model",
        case.join(exp["model_dir"].as_str().unwrap()).to_str().unwrap(),
        "--adapter",
        case.join(exp["adapter_dir"].as_str().unwrap()).to_str().unwrap(),
        "--pairs",
        case.join("pairs.jsonl").to_str().unwrap(),
        "--beta",
        &exp["beta"].to_string(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let loss = v["loss"].as_f64().unwrap();
    assert!((loss - exp["loss"].as_f64().unwrap()).abs() < 1e-5, "{loss}");
    let got = engine::weights::WeightStore::open_files(std::slice::from_ref(&out)).unwrap();
    let want = engine::weights::WeightStore::open_files(&[case.join("grads.safetensors")]).unwrap();
    let mut keys: Vec<&str> = want.keys().collect();
    keys.sort();
    let mut got_keys: Vec<&str> = got.keys().collect();
    got_keys.sort();
    assert_eq!(keys, got_keys, "gradient file must hold exactly the adapter's tensor names");
    for k in keys {
        let (a, b) = (got.f32_any_shape(k).unwrap(), want.f32_any_shape(k).unwrap());
        let norm: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
        let diff: f32 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt();
        assert!(diff <= 1e-3 * norm.max(1e-12) || (norm == 0.0 && diff == 0.0), "{k}: {diff} vs norm {norm}");
    }
}

fn train_args<'a>(model: &'a str, pairs: &'a str, out: &'a str) -> Vec<&'a str> {
    train_args_on("cpu", model, pairs, out)
}

fn train_args_on<'a>(device: &'a str, model: &'a str, pairs: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train-dpo",
        "--model",
        model,
        "--pairs",
        pairs,
        "--out",
        out,
        "--epochs",
        "4",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--r",
        "4",
        "--lora-alpha",
        "8",
        "--warmup-ratio",
        "0.25",
        "--seed",
        "5",
        "--device",
        device,
    ]
}

/// Every tensor of a safetensors file, by name.
fn tensors(path: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let store = engine::weights::WeightStore::open_files(&[path.to_path_buf()]).unwrap();
    store.keys().map(|k| (k.to_string(), store.f32_any_shape(k).unwrap())).collect()
}

/// Relative L2 distance between the same tensors of two safetensors files.
fn distance(a: &Path, b: &Path) -> f64 {
    let (ta, tb) = (tensors(a), tensors(b));
    assert!(!ta.is_empty(), "{} holds no tensors", a.display());
    assert_eq!(
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>(),
        "{} and {} hold different tensors",
        a.display(),
        b.display()
    );
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (k, x) in &ta {
        for (u, v) in x.iter().zip(&tb[k]) {
            d += (*u as f64 - *v as f64).powi(2);
            n += (*u as f64).powi(2);
        }
    }
    (d / n.max(1e-30)).sqrt()
}

/// A `rlaifd train-*` run (`args(device, out)`, `steps` optimizer steps) on the GPU: it trains there (not on the
/// CPU fallback), records the loss scale, and a run paused after `pause` steps resumes on the GPU where it stopped
/// or crosses to the CPU with its moments, step count and loss scale. `weights` names the trained file. Prints why
/// and passes where no GPU exists (scripts/emu-check runs it on cuemu).
fn gpu_run_pauses_and_resumes(
    d: &Path,
    args: &dyn Fn(&str, &str) -> Vec<String>,
    steps: usize,
    pause: usize,
    weights: &str,
) {
    let dir = |name: &str| d.join(name).to_str().unwrap().to_string();
    let (gpu, gpu_split, cpu, crossed) = (dir("gpu"), dir("gpu-split"), dir("cpu"), dir("crossed"));
    let go = |device: &str, out: &str, extra: &[&str]| {
        let mut v = args(device, out);
        v.extend(extra.iter().map(|s| s.to_string()));
        let (ok, stdout, stderr) = run(&v.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        (ok, stdout.lines().filter(|l| l.contains("\"step\"")).count(), stderr)
    };
    let (ok, n, stderr) = go("cuda", &gpu, &[]);
    if !ok && stderr.contains("cannot be used") {
        println!("SKIPPED: no GPU: {}", stderr.trim());
        return;
    }
    assert!(ok, "{stderr}");
    println!("{}", stderr.lines().find(|l| l.contains("training on")).unwrap_or("?"));
    assert!(
        stderr.contains("training on cuda:0") && !stderr.contains("training on the CPU"),
        "not trained on the GPU: {stderr}"
    );
    assert_eq!(n, steps, "one JSON log line per step");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Path::new(&gpu).join("trainer_state.json")).unwrap()).unwrap();
    assert!(
        state["loss_scale"]["scale"].as_f64().unwrap_or(0.0) >= 1.0,
        "trainer_state.json lacks the loss scale: {state}"
    );
    // Paused on the GPU, resumed on the GPU.
    let (ok, n, stderr) = go("cuda", &gpu_split, &["--stop-after", &pause.to_string()]);
    assert!(ok && n == pause, "{stderr}");
    let (ok, n, stderr) = go("cuda", &gpu_split, &["--resume"]);
    assert!(ok && n == steps - pause, "{stderr}");
    let f = |d: &str, name: &str| Path::new(d).join(name);
    let (dw, dm) = (
        distance(&f(&gpu, weights), &f(&gpu_split, weights)),
        distance(&f(&gpu, "optimizer.safetensors"), &f(&gpu_split, "optimizer.safetensors")),
    );
    println!("GPU in one go vs paused and resumed on the GPU: weights {dw:.2e}, moments {dm:.2e} (relative L2)");
    assert!(dw <= 1e-3 && dm <= 1e-3, "resuming on the GPU changed the run: weights {dw:.2e}, moments {dm:.2e}");
    // Paused on the GPU, resumed on the CPU: ends near a whole CPU run.
    let (ok, _, stderr) = go("cpu", &cpu, &[]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = go("cuda", &crossed, &["--stop-after", &pause.to_string()]);
    assert!(ok, "{stderr}");
    let (ok, n, stderr) = go("cpu", &crossed, &["--resume"]);
    assert!(ok && n == steps - pause, "{stderr}");
    let (cross, devices) =
        (distance(&f(&cpu, weights), &f(&crossed, weights)), distance(&f(&cpu, weights), &f(&gpu, weights)));
    println!("trained weights vs a CPU run: GPU then CPU {cross:.2e}, GPU only {devices:.2e}");
    // fp16 rounding in the first steps moves the weights by about 1e-3 (cuemu: 4e-4 for DPO, 9e-4 for SFT); losing
    // the moments at the crossing moves them by 1e-2 or more (measured on cuemu by dropping them: 1.0e-2 and 1.9e-2).
    // The GPU-only run may skip an overflowing step the CPU takes, so it is printed, not compared.
    assert!(cross <= 4e-3, "GPU then CPU ends {cross:.2e} from the CPU run (the GPU run {devices:.2e})");
}

#[test]
fn train_dpo_on_the_gpu_pauses_and_resumes_on_the_gpu_or_the_cpu() {
    let model = root().join("tests/fixtures/llava/llama_text_only/model");
    let pairs = root().join("tests/fixtures/grad/llama_text_only/pairs.jsonl");
    let d = tmp("gpu-resume");
    let (m, p) = (model.to_str().unwrap(), pairs.to_str().unwrap());
    let args = |device: &str, out: &str| train_args_on(device, m, p, out).into_iter().map(String::from).collect();
    gpu_run_pauses_and_resumes(&d, &args, 8, 3, "adapter_model.safetensors");
    // --recompute (each layer run again in the backward pass, whole sequences) trains the same weights.
    if d.join("gpu").is_dir() {
        let re = d.join("recompute");
        let mut v = train_args_on("cuda", m, p, re.to_str().unwrap());
        v.push("--recompute");
        let (ok, _, stderr) = run(&v);
        assert!(ok, "{stderr}");
        let w = "adapter_model.safetensors";
        let e = distance(&d.join("gpu").join(w), &re.join(w));
        println!("GPU with --recompute vs without: weights {e:.2e} (relative L2)");
        assert!(e <= 1e-3, "--recompute changed the trained weights by {e:.2e}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// `--device cuda:0,cuda:1` trains data-parallel (each batch dealt out over the two GPUs, the gradients summed
/// with NCCL): the same steps and weights as one GPU with the same --batch-size; a CPU in the list is refused
/// naming the flag. Skipped (printed) without two GPUs; `scripts/emu-check` runs it on two cuemu devices.
#[test]
fn train_dpo_on_two_gpus_trains_what_one_gpu_trains_on_the_gpu() {
    let model = root().join("tests/fixtures/llava/llama_text_only/model");
    let pairs = root().join("tests/fixtures/grad/llama_text_only/pairs.jsonl");
    let d = tmp("gpu-parallel");
    let (m, p) = (model.to_str().unwrap(), pairs.to_str().unwrap());
    let (one, two) = (d.join("one"), d.join("two"));
    let (ok, _, stderr) = run(&train_args_on("cuda:0,cuda:1", m, p, two.to_str().unwrap()));
    if !ok && (stderr.contains("cannot be used") || stderr.contains("NCCL")) {
        println!("SKIPPED: no GPU: two GPUs and NCCL needed: {}", stderr.trim());
        return;
    }
    assert!(ok, "{stderr}");
    assert!(stderr.contains("training on cuda:1"), "the second GPU was not used: {stderr}");
    let (ok, _, stderr) = run(&train_args_on("cuda:0", m, p, one.to_str().unwrap()));
    assert!(ok, "{stderr}");
    let w = "adapter_model.safetensors";
    let e = distance(&one.join(w), &two.join(w));
    println!("two GPUs vs one: weights {e:.2e} (relative L2)");
    assert!(e <= 1e-4, "two GPUs trained weights {e:.2e} from one GPU's");
    let (ok, _, stderr) = run(&train_args_on("cuda:0,cpu", m, p, d.join("mixed").to_str().unwrap()));
    assert!(!ok && stderr.contains("--device cuda:0,cpu") && stderr.contains("GPUs only"), "{stderr}");
    let _ = std::fs::remove_dir_all(&d);
}

/// The image path trained on the GPU from the CLI: LoRA named peft-style (`q_proj,v_proj,fc1` also picks the vision
/// tower's) and `--train-projector` (its weights and biases saved as `modules_to_save`), on a LLaVA fixture with
/// image pairs; pausing and resuming on either device carries the moments of every one of them.
#[test]
fn train_dpo_of_the_image_path_on_the_gpu_pauses_and_resumes_on_the_gpu_or_the_cpu() {
    let model = root().join("tests/fixtures/llava/l15_4x_f32_gqa_tied_lora/model");
    let pairs = root().join("tests/fixtures/grad/l15_4x_f32_gqa_tied_lora/pairs.jsonl");
    let d = tmp("gpu-image-path");
    let (m, p) = (model.to_str().unwrap(), pairs.to_str().unwrap());
    let args = |device: &str, out: &str| {
        let mut v: Vec<String> = train_args_on(device, m, p, out).into_iter().map(String::from).collect();
        v.extend(["--target-modules", "q_proj,v_proj,fc1", "--train-projector"].map(String::from));
        v
    };
    gpu_run_pauses_and_resumes(&d, &args, 8, 3, "adapter_model.safetensors");
    if d.join("gpu").is_dir() {
        let t = tensors(&d.join("gpu").join("adapter_model.safetensors"));
        let (vision, projector) = (
            t.keys().filter(|k| k.contains("vision_tower") && k.contains("lora_")).count(),
            t.keys().filter(|k| k.contains("multi_modal_projector")).count(),
        );
        assert!(
            vision > 0 && projector == 4,
            "the adapter should hold vision-tower LoRA and the projector's 4 tensors: {:?}",
            t.keys().collect::<Vec<_>>()
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn train_dpo_resume_gives_the_same_weights_as_an_uninterrupted_run() {
    let model = root().join("tests/fixtures/llava/llama_text_only/model");
    let pairs = root().join("tests/fixtures/grad/llama_text_only/pairs.jsonl");
    let d = tmp("resume");
    let (straight, split) = (d.join("straight"), d.join("split"));
    let (m, p) = (model.to_str().unwrap(), pairs.to_str().unwrap());
    let (ok, stdout, stderr) = run(&train_args(m, p, straight.to_str().unwrap()));
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 8, "one JSON log line per step (3 pairs / batch 2 = 2 steps x 4 epochs)");
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    for key in ["loss", "reward_accuracy", "reward_margin", "logp_chosen", "logp_rejected", "lr", "grad_norm"] {
        assert!(last[key].is_number(), "log line lacks {key}: {last}");
    }
    // Interrupted after 3 steps, then resumed.
    let mut args = train_args(m, p, split.to_str().unwrap());
    args.extend(["--stop-after", "3"]);
    let (ok, stdout, stderr) = run(&args);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 3);
    let mut args = train_args(m, p, split.to_str().unwrap());
    args.push("--resume");
    let (ok, stdout, stderr) = run(&args);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 5, "steps 4..8");
    for f in ["adapter_model.safetensors", "optimizer.safetensors"] {
        assert_eq!(
            std::fs::read(straight.join(f)).unwrap(),
            std::fs::read(split.join(f)).unwrap(),
            "{f} differs after resume"
        );
    }
    // Resuming with other settings is refused and changes nothing.
    let before = std::fs::read(split.join("adapter_model.safetensors")).unwrap();
    let mut args = train_args(m, p, split.to_str().unwrap());
    args.extend(["--resume", "--beta", "0.3"]);
    let (ok, _, stderr) = run(&args);
    assert!(!ok && stderr.contains("differ"), "{stderr}");
    assert_eq!(before, std::fs::read(split.join("adapter_model.safetensors")).unwrap());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn train_dpo_reads_the_rlaif_v_text_schema_with_images() {
    let case = root().join("tests/fixtures/llava/l15_452_f16_mqa_sharded_lora");
    let d = tmp("text");
    std::fs::copy(case.join("image.png"), d.join("img.png")).unwrap();
    let lines = [
        r#"{"image_path": "img.png", "question": "is there a red circle ?", "chosen": "yes , there is a red circle .", "rejected": "no ."}"#,
        r#"{"image_path": "img.png", "question": "what color is the box ?", "chosen": "the box is blue .", "rejected": "it is a red dog ."}"#,
    ];
    std::fs::write(d.join("pairs.jsonl"), lines.join("\n")).unwrap();
    let out = d.join("adapter");
    let (ok, stdout, stderr) = run(&[
        "train-dpo",
        "--model",
        case.join("model").to_str().unwrap(),
        "--pairs",
        d.join("pairs.jsonl").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "2",
        "--batch-size",
        "2",
        "--r",
        "4",
        "--lr",
        "1e-3",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 2);
    // The saved adapter loads and changes the model.
    let model = engine::Model::load(&case.join("model")).unwrap();
    let ad = model.load_adapter(&out).unwrap();
    assert!(!ad.module_names().is_empty());
    // A broken line is named and nothing is written.
    std::fs::write(d.join("bad.jsonl"), format!("{}\n{{\"image_path\": \"img.png\", \"question\": 3}}\n", lines[0]))
        .unwrap();
    let out2 = d.join("adapter2");
    let (ok, stdout, stderr) = run(&[
        "train-dpo",
        "--model",
        case.join("model").to_str().unwrap(),
        "--pairs",
        d.join("bad.jsonl").to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert!(!ok && stdout.is_empty() && stderr.contains("bad.jsonl line 2") && stderr.contains("question"), "{stderr}");
    assert!(!out2.exists());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn train_sft_full_writes_a_checkpoint_and_reports_held_out_loss() {
    let case = root().join("tests/fixtures/llava/llama_text_only");
    let d = tmp("sft");
    let train: Vec<String> =
        ["is there a red circle ?", "is there a blue square ?", "do you see a cat ?", "is it dark ?"]
            .iter()
            .map(|q| format!(r#"{{"prompt": "{q}", "answer": "yes , it is ."}}"#))
            .collect();
    std::fs::write(d.join("train.jsonl"), train.join("\n")).unwrap();
    std::fs::write(d.join("eval.jsonl"), r#"{"prompt": "is there a tree ?", "answer": "yes , it is ."}"#).unwrap();
    let out = d.join("model");
    let (ok, stdout, stderr) = run(&[
        "train-sft",
        "--model",
        case.join("model").to_str().unwrap(),
        "--data",
        d.join("train.jsonl").to_str().unwrap(),
        "--eval",
        d.join("eval.jsonl").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--full",
        "--epochs",
        "6",
        "--batch-size",
        "2",
        "--lr",
        "3e-3",
    ]);
    assert!(ok, "{stderr}");
    let evals: Vec<f64> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["eval_loss"].as_f64())
        .collect();
    assert_eq!(evals.len(), 7, "before training and after each epoch");
    assert!(evals[6] < 0.5 * evals[0], "held-out loss {evals:?}");
    // The output is a loadable checkpoint with the tokenizer and config beside the weights.
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let m = engine::Model::load(&out).unwrap();
    assert_eq!(m.layout.name, "llama");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn train_sft_resume_matches_an_uninterrupted_run_for_lora_and_full() {
    let case = root().join("tests/fixtures/llava/llama_text_only");
    let d = tmp("sft-resume");
    let (m, data) = (case.join("model"), sft_data(&d));
    for (mode, weights) in [("lora", "adapter_model.safetensors"), ("full", "model.safetensors")] {
        let (straight, split) = (d.join(format!("{mode}-straight")), d.join(format!("{mode}-split")));
        let args = |out: &Path| -> Vec<String> {
            let mut v: Vec<String> = [
                "train-sft",
                "--model",
                m.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            v.extend(
                ["--epochs", "3", "--batch-size", "2", "--lr", "2e-3", "--r", "4", "--seed", "9", "--device", "cpu"]
                    .map(String::from),
            );
            if mode == "full" {
                v.push("--full".into());
            }
            v
        };
        let run_v = |v: Vec<String>| run(&v.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        let (ok, _, stderr) = run_v(args(&straight));
        assert!(ok, "{stderr}");
        let mut v = args(&split);
        v.extend(["--stop-after", "4"].map(String::from));
        let (ok, stdout, stderr) = run_v(v);
        assert!(ok, "{stderr}");
        assert_eq!(stdout.lines().filter(|l| l.contains("\"step\"")).count(), 4);
        let mut v = args(&split);
        v.push("--resume".into());
        let (ok, stdout, stderr) = run_v(v);
        assert!(ok, "{stderr}");
        assert_eq!(stdout.lines().filter(|l| l.contains("\"step\"")).count(), 5, "steps 5..9 of 3 epochs x 3 steps");
        for f in [weights, "optimizer.safetensors"] {
            assert_eq!(
                std::fs::read(straight.join(f)).unwrap(),
                std::fs::read(split.join(f)).unwrap(),
                "{mode}: {f} differs after resume"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// The SFT examples of `train_sft_resume_matches_an_uninterrupted_run_for_lora_and_full`, written into `d`.
fn sft_data(d: &Path) -> PathBuf {
    let train: Vec<String> = [
        "is there a red circle ?",
        "is there a blue square ?",
        "do you see a cat ?",
        "is it dark ?",
        "is there a tree ?",
    ]
    .iter()
    .map(|q| format!(r#"{{"prompt": "{q}", "answer": "no , it is not ."}}"#))
    .collect();
    std::fs::write(d.join("train.jsonl"), train.join("\n")).unwrap();
    d.join("train.jsonl")
}

#[test]
fn train_sft_with_lora_on_the_gpu_pauses_and_resumes_on_the_gpu_or_the_cpu() {
    let model = root().join("tests/fixtures/llava/llama_text_only/model");
    let d = tmp("sft-gpu-resume");
    let data = sft_data(&d);
    let (m, data) = (model.to_str().unwrap().to_string(), data.to_str().unwrap().to_string());
    let args = |device: &str, out: &str| -> Vec<String> {
        [
            "train-sft",
            "--model",
            &m,
            "--data",
            &data,
            "--out",
            out,
            "--epochs",
            "3",
            "--batch-size",
            "2",
            "--lr",
            "2e-3",
            "--r",
            "4",
            "--seed",
            "9",
            "--device",
            device,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    gpu_run_pauses_and_resumes(&d, &args, 9, 4, "adapter_model.safetensors");
    // Full fine-tuning changes the weights a GPU backend keeps a copy of: refused on the GPU, with the way out.
    let (ok, _, stderr) = run(&[
        "train-sft",
        "--model",
        &m,
        "--data",
        &data,
        "--out",
        d.join("full").to_str().unwrap(),
        "--full",
        "--device",
        "cuda",
    ]);
    assert!(!ok && stderr.contains("--full") && stderr.contains("--device cpu"), "{stderr}");
    let _ = std::fs::remove_dir_all(&d);
}

/// `train-dpo --full-parameter` (RLAIF-V's full-parameter recipe): no LoRA factors, every linear layer of the
/// decoder trained whole and saved as `modules_to_save`; the run moves the model, and a paused run resumes to the
/// same bytes as an uninterrupted one (the moments of the whole weights are in the saved state).
#[test]
fn train_dpo_full_parameter_trains_whole_layers_and_resumes_exactly() {
    let model = root().join("tests/fixtures/llava/llama_text_only/model");
    let pairs = root().join("tests/fixtures/grad/llama_text_only/pairs.jsonl");
    let d = tmp("full");
    let (straight, split) = (d.join("straight"), d.join("split"));
    let (m, p) = (model.to_str().unwrap(), pairs.to_str().unwrap());
    let full = |out: &Path, extra: &[&str]| {
        let mut args = train_args(m, p, out.to_str().unwrap());
        args.push("--full-parameter");
        args.extend(extra);
        run(&args)
    };
    let (ok, stdout, stderr) = full(&straight, &[]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 8);
    let engine_model = engine::Model::load(&model).unwrap();
    let ad = engine_model.load_adapter(&straight).unwrap();
    assert!(ad.module_names().is_empty(), "no LoRA factors: {:?}", ad.module_names());
    let layers = engine_model.config.text().num_hidden_layers;
    let whole: Vec<&str> = ad.saved_params().map(|(n, _)| n).collect();
    assert!(whole.len() >= 7 * layers, "every projection of every layer is trained whole: {whole:?}");
    let ids: Vec<u32> = (1..12).collect();
    assert_ne!(engine_model.logprobs(&ids, None, None).unwrap(), engine_model.logprobs(&ids, None, Some(&ad)).unwrap());
    let (ok, _, stderr) = full(&split, &["--stop-after", "3"]);
    assert!(ok, "{stderr}");
    let (ok, stdout, stderr) = full(&split, &["--resume"]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 5, "steps 4..8");
    for f in ["adapter_model.safetensors", "optimizer.safetensors"] {
        assert_eq!(std::fs::read(straight.join(f)).unwrap(), std::fs::read(split.join(f)).unwrap(), "{f} differs");
    }
    let _ = std::fs::remove_dir_all(&d);
}
