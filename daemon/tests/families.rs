//! The whole loop on the other model families: `rlaifd demo --model DIR` runs one iteration (sample, label, DPO,
//! gate) on a tiny Qwen2.5-VL checkpoint (tests/fixtures/qwen_vl/shapes_qwen25, made by
//! tools/make_qwen_demo_model.py: the ShapesWorld decoder in Qwen2 form, a random vision transformer) and on a
//! LLaVA-NeXT checkpoint built here from the bundled model (anyres tiles, a zero `image_newline`), each on its own
//! real PostgreSQL database. The loop has to run and leave a candidate checkpoint; its metrics need not improve.
//! And `rlaifd serve` on the Qwen2.5-VL checkpoint answers an OpenAI chat request with an image (the image goes
//! through Qwen's processor and vision transformer) and reports the family's prompt usage.

mod common;

use common::daemon::{chat_body, config_text, shapes_png, Daemon};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A LLaVA-NeXT checkpoint from the bundled LLaVA-1.5 model: its files, config.json as `llava_next` with three
/// grid pinpoints, and `model.image_newline` (zeros) in a second shard.
fn next_checkpoint(dir: &Path) {
    let base = root().join("assets/shapes-base");
    std::fs::create_dir_all(dir).unwrap();
    for f in ["tokenizer.json", "preprocessor_config.json"] {
        std::fs::copy(base.join(f), dir.join(f)).unwrap();
    }
    std::fs::copy(base.join("model.safetensors"), dir.join("model-00001-of-00002.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["LlavaNextForConditionalGeneration"]);
    cfg["model_type"] = serde_json::json!("llava_next");
    cfg["image_grid_pinpoints"] = serde_json::json!([[64, 128], [128, 64], [128, 128]]);
    let hidden = cfg["text_config"]["hidden_size"].as_u64().unwrap() as usize;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let zeros = vec![0f32; hidden];
    engine::weights::write_f32_safetensors(
        &dir.join("model-00002-of-00002.safetensors"),
        &[("model.image_newline".to_string(), vec![hidden], &zeros)],
    )
    .unwrap();
    let ws = engine::weights::WeightStore::open_files(&[base.join("model.safetensors")]).unwrap();
    let mut map = serde_json::Map::new();
    for k in ws.keys() {
        map.insert(k.to_string(), "model-00001-of-00002.safetensors".into());
    }
    map.insert("model.image_newline".into(), "model-00002-of-00002.safetensors".into());
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

async fn one_demo_iteration(tag: &str, model: &Path) {
    let db = common::fresh(tag).await;
    let state = std::env::temp_dir().join(format!("rlaifd-family-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let out = Command::new(env!("CARGO_BIN_EXE_rlaifd"))
        .args(["demo", "--iterations", "1", "--prompts-per-iteration", "12", "--eval-count", "4"])
        .args(["--set", "n=4", "--set", "max_new_tokens=24", "--set", "batch_size=2", "--threads", "2"])
        .arg("--state-dir")
        .arg(&state)
        .args(["--database-url", &db.url])
        .arg("--model")
        .arg(model)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{tag}: demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("the demo's JSON summary");
    assert_eq!(summary["iterations"], 1, "{tag}: {summary}");
    // The lineage: the base (1) and iteration 1's candidate (2), gated either way.
    let candidate = stdout
        .lines()
        .find(|l| l.split_whitespace().take(3).collect::<Vec<_>>() == ["2", "1", "1"])
        .unwrap_or_else(|| panic!("{tag}: no candidate of iteration 1 in the lineage\n{stdout}"));
    assert!(candidate.contains("promoted") || candidate.contains("rejected"), "{tag}: {candidate}");
    let _ = std::fs::remove_dir_all(&state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_an_iteration_on_qwen2_5_vl() {
    one_demo_iteration("qwen25", &root().join("tests/fixtures/qwen_vl/shapes_qwen25")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_an_iteration_on_llava_next() {
    let dir = std::env::temp_dir().join(format!("rlaifd-next-model-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    next_checkpoint(&dir);
    one_demo_iteration("next", &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_a_chat_request_with_an_image_on_qwen2_5_vl() {
    let db = common::fresh("qwen_serve").await;
    let dir = std::env::temp_dir().join(format!("rlaifd-family-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let qwen = root().join("tests/fixtures/qwen_vl/shapes_qwen25");
    let bundled = common::daemon::model().display().to_string();
    let text = config_text(&dir, &db.url, "").replace(&bundled, &qwen.display().to_string());
    assert!(text.contains("shapes_qwen25"), "{text}");
    let d = Daemon::launch(&dir, &text, &[]);
    let img = shapes_png(&dir, "3");
    let body =
        chat_body(&img, "describe the image .", serde_json::json!({ "max_tokens": 12, "n": 2, "temperature": 0.7 }));
    let (status, reply) = d.http("POST", "/v1/chat/completions", "application/json", &body);
    assert_eq!(status, 200, "{reply}\n{}", d.log());
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2, "{v}");
    assert!(choices.iter().all(|c| c["message"]["content"].as_str().is_some_and(|t| !t.is_empty())), "{v}");
    // The prompt: the template's words plus the image's 16 merged patches (64x64 pixels, 8-pixel patches, 2x2).
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().expect("usage");
    assert!(prompt_tokens > 16, "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}
