//! The API as real clients call it: the official `openai` Python package (and `prometheus_client` for
//! /metrics) against a running `rlaifd serve` on the bundled model and a real PostgreSQL: models, streaming
//! (the concatenated deltas equal the non-streamed answer, usage in the last chunk), logprobs, stop strings,
//! max_completion_tokens, multi-turn conversations with system and developer turns, image tokens in usage, the
//! five image formats, 16 concurrent clients sharing decode steps and getting what they get alone, and error
//! objects. The checks live in `tools/openai_client_check.py`; the venv comes from `tools/datasets-venv.sh`.

mod common;

use common::daemon::Daemon;
use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_official_openai_client_uses_every_api_feature() {
    let o = Command::new(repo().join("tools/datasets-venv.sh")).output().unwrap();
    assert!(
        o.status.success(),
        "tools/datasets-venv.sh could not create the venv (needs python3 and PyPI): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let python = String::from_utf8(o.stdout).unwrap().trim().to_string();
    let db = common::fresh("openaiclient").await;
    let dir = std::env::temp_dir().join(format!("rlaifd-openai-client-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Uncompressed BMP bodies are larger than the tests' usual 64 KiB limit.
    let text =
        common::daemon::config_text(&dir, &db.url, "").replace("max_body_bytes = 65536", "max_body_bytes = 1048576");
    let d = Daemon::launch(&dir, &text, &[]);
    let png = common::daemon::shapes_png(&dir, "7");
    let png_path = dir.join("image.png");
    std::fs::write(&png_path, &png).unwrap();
    let out = Command::new(&python)
        .arg(repo().join("tools/openai_client_check.py"))
        .arg(&d.addr)
        .arg(&png_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "tools/openai_client_check.py failed:\n{stdout}\n{}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log().lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();
    assert_eq!(last["checks"].as_array().map(|a| a.len()), Some(9), "{last}");
    drop(d);
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(&dir);
}
