//! The whole loop on the other model families: `rlaifd demo --model DIR` runs one iteration (sample, label, DPO,
//! gate) on a tiny Qwen2.5-VL checkpoint (tests/fixtures/qwen_vl/shapes_qwen25, made by
//! tools/make_qwen_demo_model.py: the ShapesWorld decoder in Qwen2 form, a random vision transformer) and on a
//! LLaVA-NeXT checkpoint built here from the bundled model (anyres tiles, a zero `image_newline`), each on its own
//! real PostgreSQL database. The loop has to run and leave a candidate checkpoint; its metrics need not improve.
//! And `rlaifd serve` on the Qwen2.5-VL checkpoint answers an OpenAI chat request with an image (the image goes
//! through Qwen's processor and vision transformer) and reports the family's prompt usage, and refuses hostile
//! input (a prompt past the context, an image too large by its header, one past Qwen's aspect-ratio limit, a
//! truncated one) before model work, with memory and the database unchanged.

mod common;

use common::daemon::{chat_body, chat_request, config_text, counts, png, shapes_png, Daemon};
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

/// `rlaifd serve` on the Qwen2.5-VL checkpoint (tests/fixtures/qwen_vl/shapes_qwen25) with a fresh database and
/// scratch folder, and more environment variables `env`.
async fn qwen_daemon(tag: &str, env: &[(&str, &str)]) -> (common::TestDb, PathBuf, Daemon) {
    let db = common::fresh(&format!("qwen_{tag}")).await;
    let dir = std::env::temp_dir().join(format!("rlaifd-family-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let qwen = root().join("tests/fixtures/qwen_vl/shapes_qwen25");
    let bundled = common::daemon::model().display().to_string();
    let text = config_text(&dir, &db.url, "").replace(&bundled, &qwen.display().to_string());
    assert!(text.contains("shapes_qwen25"), "{text}");
    let d = Daemon::launch(&dir, &text, env);
    (db, dir, d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_a_chat_request_with_an_image_on_qwen2_5_vl() {
    let (db, dir, d) = qwen_daemon("serve", &[]).await;
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
    drop(d);
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn error_message(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("error body is not JSON: {body}"));
    v["error"]["message"].as_str().unwrap_or_else(|| panic!("no error message: {body}")).to_string()
}

/// The hostile inputs of daemon/tests/hostile.rs that depend on the model family, against a Qwen2.5-VL-served
/// daemon: each gets 400 with a message naming the input, fast, without decoding a huge image, and the daemon
/// then still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qwen_served_daemon_refuses_hostile_input_before_model_work() {
    let (db, dir, mut d) = qwen_daemon("hostile", &[("RLAIFD__SERVER__MAX_BODY_BYTES", "8388608")]).await;
    let img = shapes_png(&dir, "5");
    let before = counts(&db.pool).await;
    let hwm0 = d.mem_kib("VmHWM");
    let post = |body: &[u8]| d.http("POST", "/v1/chat/completions", "application/json", body);
    let mut wide = Vec::new();
    image::RgbImage::from_pixel(250, 1, image::Rgb([9, 9, 9]))
        .write_to(&mut std::io::Cursor::new(&mut wide), image::ImageFormat::Png)
        .unwrap();
    let good = shapes_png(&dir, "6");
    let truncated = &good[..good.len() / 2];
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "300 KB of text",
            chat_request(&"the red circle ".repeat(20_000), None, serde_json::json!({ "max_tokens": 4 })),
            vec!["300000 bytes", "context of 256 tokens"],
        ),
        (
            "text and the image past the context",
            chat_body(&img, &"the red circle ".repeat(80), serde_json::json!({ "max_tokens": 4 })),
            vec!["context of 256 tokens", "the prompt takes 2"],
        ),
        (
            "an 8000x8000 PNG",
            chat_body(&png(8000, 8000), "Describe the image.", serde_json::json!({ "max_tokens": 4 })),
            vec!["8000x8000", "server.max_image_side"],
        ),
        (
            "a 250x1 PNG",
            chat_body(&wide, "Describe the image.", serde_json::json!({ "max_tokens": 4 })),
            vec!["aspect ratio (250.0)", "cannot be processed", "pad or crop"],
        ),
        (
            "a truncated PNG",
            chat_body(truncated, "Describe the image.", serde_json::json!({ "max_tokens": 4 })),
            vec!["image"],
        ),
    ];
    for (what, body, want) in &cases {
        let t0 = std::time::Instant::now();
        let (st, reply) = post(body);
        let took = t0.elapsed().as_secs_f64();
        assert_eq!(st, 400, "{what}: {reply}");
        let m = error_message(&reply);
        assert!(want.iter().all(|w| m.contains(w)), "{what}: {m}");
        println!("qwen daemon, {what}: 400 in {took:.3} s: {m}");
        assert!(took < 5.0, "{what}: the refusal took {took} s");
    }
    let hwm1 = d.mem_kib("VmHWM");
    println!("qwen daemon hostile input: VmHWM {hwm0} -> {hwm1} KiB");
    // A decoded 8000 x 8000 RGB image alone is 187 500 KiB.
    assert!(hwm1 < hwm0 + 60 * 1024, "the peak resident memory grew by {} KiB", hwm1 - hwm0);
    assert_eq!(counts(&db.pool).await, before, "refused requests changed the database");
    let (st, reply) = post(&chat_body(&good, "Describe the image.", serde_json::json!({ "max_tokens": 6 })));
    assert_eq!(st, 200, "the daemon still answers: {reply}");
    assert!(d.alive(), "the daemon died: {}", d.log());
    drop(d);
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(&dir);
}
