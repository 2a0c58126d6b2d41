//! `rlaifd serve` as users run it: a real process on real PostgreSQL with the bundled model. The HTTP API (good
//! and bad requests), every control command (and malformed ones, which change nothing), an iteration started by
//! `iterate` that promotes and hot-swaps, rollback, import, reload, drain; and a hot-swap every few hundred
//! milliseconds while clients send concurrent requests: zero failed requests, none mixing two generations.

mod common;

use common::daemon::{chat_body, counts, http, model, png, rlaifd, shapes_png, Daemon};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_serves_http_and_obeys_every_control_command() {
    let db = common::fresh("serve").await;
    let dir = std::env::temp_dir().join(format!("rlaifd-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // The control socket goes to control.group: as root, a group other than the test's own (the socket then
    // shows the chown happened); else the test's own group, the only one it may give files to.
    std::fs::create_dir_all(&dir).unwrap();
    use std::os::unix::fs::MetadataExt;
    let own = std::fs::metadata(&dir).unwrap();
    let groups = std::fs::read_to_string("/etc/group").unwrap();
    let group = groups
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some((f.first()?.to_string(), f.get(2)?.parse::<u32>().ok()?))
        })
        .find(|&(_, gid)| if own.uid() == 0 { gid != own.gid() } else { gid == own.gid() })
        .expect("a group in /etc/group");
    let d = Daemon::start(&dir, &db.url, &format!("[control]\ngroup = \"{}\"\n", group.0));
    let pool = &db.pool;
    let img = shapes_png(&dir, "4242");

    // Health, models, one good request (greedy, twice: same answer) and n = 2 with a seed.
    let (st, body) = d.http("GET", "/healthz", "text/plain", b"");
    assert_eq!(st, 200, "{body}");
    let h: Value = serde_json::from_str(&body).unwrap();
    let base_id = h["checkpoint"].as_i64().unwrap();
    assert_eq!(h["generation"], 1);
    // Where it generates: the CPU here unless a CUDA driver exists (model.device = "auto"), also in the audit log.
    if engine::cuda::driver_status().is_err() {
        assert_eq!(h["device"], "cpu", "{h}");
    }
    let started: Value =
        sqlx::query_scalar("SELECT detail FROM events WHERE kind = 'daemon_started'").fetch_one(pool).await.unwrap();
    let first_word = |v: &Value| v.as_str().and_then(|s| s.split(' ').next()).map(String::from);
    assert_eq!(first_word(&started["device"]), first_word(&h["device"]), "{started}");
    let (st, body) = d.http("GET", "/v1/models", "text/plain", b"");
    assert_eq!(st, 200);
    let m: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(m["data"][0]["checkpoint"].as_i64(), Some(base_id));
    assert_eq!(m["data"][0]["lineage"].as_array().unwrap().len(), 1);
    let ask = |extra: Value| -> Value {
        let (st, body) =
            d.http("POST", "/v1/chat/completions", "application/json", &chat_body(&img, "Describe the image.", extra));
        assert_eq!(st, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    let a = ask(json!({ "temperature": 0.0, "max_tokens": 32 }));
    let text = a["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(!engine::hallucination::mentions(&text).is_empty(), "a caption names objects: {text:?}");
    assert_eq!(a["choices"][0]["message"]["role"], "assistant");
    assert!(a["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        ask(json!({ "temperature": 0.0, "max_tokens": 32 }))["choices"][0]["message"]["content"].as_str().unwrap(),
        text,
        "greedy is deterministic"
    );
    let two = ask(json!({ "n": 2, "seed": 7, "temperature": 0.9, "max_tokens": 32 }));
    assert_eq!(two["choices"].as_array().unwrap().len(), 2);
    assert_eq!(
        two,
        {
            let mut again = ask(json!({ "n": 2, "seed": 7, "temperature": 0.9, "max_tokens": 32 }));
            again["created"] = two["created"].clone();
            again["rlaifd"]["engine_s"] = two["rlaifd"]["engine_s"].clone();
            again
        },
        "same seed, same answers"
    );

    // Self-feedback best-of-N: 3 samples ranked by the implicit reward, the best returned with its reward.
    let best = ask(json!({ "best_of": 3, "seed": 5, "temperature": 0.9, "max_tokens": 32 }));
    assert_eq!(
        (best["choices"].as_array().unwrap().len(), best["rlaifd"]["rewards"].as_array().map(|r| r.len())),
        (1, Some(1)),
        "{best}"
    );

    // Bad requests: a clear error each, the daemon stays up, nothing in the database changes.
    let before = counts(pool).await;
    let big = vec![b'x'; 70_000];
    let bad: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("POST", "application/json", b"{not json".to_vec(), 400, "not a valid chat request"),
        ("POST", "text/plain", chat_body(&img, "Describe the image.", json!({})), 415, "application/json"),
        ("POST", "application/json", big, 413, "max_body_bytes"),
        ("POST", "application/json", chat_body(&png(300, 300), "Describe.", json!({})), 400, "max_image_side"),
        ("POST", "application/json", chat_body(b"\x89PNG\r\n\x1a\ntruncated", "Describe.", json!({})), 400, "request image"),
        ("POST", "application/json", json!({ "messages": [{ "role": "user", "content": [{ "type": "image_url", "image_url": { "url": "data:image/png;base64,@@@" } }, { "type": "text", "text": "hi" }] }] }).to_string().into_bytes(), 400, "base64"),
        ("POST", "application/json", json!({ "messages": [{ "role": "user", "content": [{ "type": "image_url", "image_url": { "url": "http://example.com/a.png" } }, { "type": "text", "text": "hi" }] }] }).to_string().into_bytes(), 400, "data URL"),
        ("POST", "application/json", chat_body(&img, "Describe.", json!({ "n": 100 })), 400, "max_n"),
        ("POST", "application/json", chat_body(&img, "Describe.", json!({ "max_tokens": 100000 })), 400, "max_tokens"),
        ("POST", "application/json", chat_body(&img, "Describe.", json!({ "stream": true, "best_of": 2 })), 400, "best_of cannot be combined with stream"),
        ("POST", "application/json", chat_body(&img, "Describe.", json!({ "stream_options": { "include_usage": true } })), 400, "only allowed with stream"),
        ("POST", "application/json", chat_body(&img, "Describe.", json!({ "logprobs": true, "top_logprobs": 21 })), 400, "top_logprobs must be between 0 and 20"),
        ("POST", "application/json", chat_body(&img, "Describe.", json!({ "top_logprobs": 2 })), 400, "needs logprobs"),
        ("POST", "application/json", chat_body(&img, "Describe.", json!({ "temperature": -1 })), 400, "temperature"),
        ("POST", "application/json", json!({ "messages": [{ "role": "user", "content": "a" }, { "role": "assistant", "content": "b" }] }).to_string().into_bytes(), 400, "last message must be from the user"),
        ("POST", "application/json", json!({ "messages": [{ "role": "tool", "content": "a" }, { "role": "user", "content": "b" }] }).to_string().into_bytes(), 400, "tool messages are not supported"),
        ("POST", "application/json", json!({ "messages": [] }).to_string().into_bytes(), 400, "the conversation is empty"),
        ("POST", "application/json", json!({ "messages": [{ "role": "user", "content": "'; DROP TABLE prompts; --" }], "max_tokens": 4 }).to_string().into_bytes(), 200, ""),
    ];
    for (method, ct, body, want, needle) in bad {
        let (st, text) = d.http(method, "/v1/chat/completions", ct, &body);
        assert_eq!(st, want, "{text}");
        if want != 200 {
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("error body is not JSON: {text}"));
            assert!(v["error"]["message"].as_str().unwrap().contains(needle), "{needle}: {text}");
        }
    }
    assert_eq!(d.http("GET", "/nope", "text/plain", b"").0, 404);
    assert_eq!(d.http("GET", "/healthz", "text/plain", b"").0, 200, "still up");
    assert_eq!(counts(pool).await, before, "bad requests changed the database");

    // Malformed and refused control commands: an error object each, nothing changes, each is in the audit log.
    for line in [
        "hello",
        "[1,2]",
        r#"{"cmd":"launch"}"#,
        r#"{"cmd":"promote"}"#,
        r#"{"cmd":"promote","id":"1; DELETE FROM checkpoints"}"#,
        r#"{"cmd":"promote","id":99999}"#,
        r#"{"cmd":"rollback"}"#,
        r#"{"cmd":"eval","id":0}"#,
        r#"{"cmd":"pause","x":1}"#,
        r#"{"cmd":"import-prompts","file":"relative.jsonl"}"#,
    ] {
        let r = d.ctl_raw(line);
        assert_eq!(r["ok"], false, "{line}: {r}");
        assert!(!r["error"].as_str().unwrap().is_empty());
    }
    assert_eq!(counts(pool).await, before, "malformed commands changed the database");
    let logged: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE kind IN ('control', 'control_rejected')")
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(logged >= 10, "every command is logged ({logged})");
    let meta = std::fs::metadata(&d.socket).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o660, "socket mode");
    assert_eq!(meta.gid(), group.1, "the control socket belongs to control.group {}", group.0);

    // status, pause (iterate refused), resume, iterate: one iteration runs, its candidate is promoted and served.
    let s = d.ctl(json!({ "cmd": "status" }));
    assert_eq!(
        (s["ok"].as_bool(), s["current"]["checkpoint"].as_i64(), s["stage"].as_str()),
        (Some(true), Some(base_id), Some("idle")),
        "{s}"
    );
    assert_eq!(d.ctl(json!({ "cmd": "pause" }))["paused"], true);
    assert_eq!(d.ctl(json!({ "cmd": "status" }))["stage"], "paused");
    assert_eq!(d.ctl(json!({ "cmd": "iterate" }))["ok"], false);
    assert_eq!(d.ctl(json!({ "cmd": "resume" }))["ok"], true);
    assert_eq!(d.ctl(json!({ "cmd": "iterate" }))["ok"], true);
    let t0 = Instant::now();
    let cand = loop {
        let s = d.ctl(json!({ "cmd": "status" }));
        if s["current"]["checkpoint"].as_i64() != Some(base_id) {
            break s["current"]["checkpoint"].as_i64().unwrap();
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "no promotion after 300 s: {s}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(300));
    };
    let it: (i32, String) = sqlx::query_as("SELECT number, stage FROM iterations").fetch_one(pool).await.unwrap();
    assert_eq!(it, (1, "done".to_string()));
    let h: Value = serde_json::from_str(&d.http("GET", "/healthz", "", b"").1).unwrap();
    assert_eq!((h["checkpoint"].as_i64(), h["generation"].as_i64()), (Some(cand), Some(2)), "hot-swapped");
    let m: Value = serde_json::from_str(&d.http("GET", "/v1/models", "", b"").1).unwrap();
    let lineage: Vec<i64> =
        m["data"][0]["lineage"].as_array().unwrap().iter().map(|x| x["checkpoint"].as_i64().unwrap()).collect();
    assert_eq!(lineage, vec![base_id, cand]);
    assert_eq!(d.ctl(json!({ "cmd": "iterate" }))["ok"], true, "a second request is accepted while idle");
    assert_eq!(d.ctl(json!({ "cmd": "pause" }))["ok"], true);
    // Let the second iteration's start settle, then leave it paused.
    std::thread::sleep(Duration::from_millis(500));

    // eval, rollback (to the parent), promote back.
    let e = d.ctl(json!({ "cmd": "eval", "id": cand }));
    assert!(e["metrics"]["chair_i"].as_f64().is_some(), "{e}");
    let r = d.ctl(json!({ "cmd": "rollback" }));
    assert_eq!((r["ok"].as_bool(), r["promoted"].as_i64()), (Some(true), Some(base_id)), "{r}");
    let h: Value = serde_json::from_str(&d.http("GET", "/healthz", "", b"").1).unwrap();
    assert_eq!(h["checkpoint"].as_i64(), Some(base_id));
    let r = d.ctl(json!({ "cmd": "promote", "id": cand }));
    assert_eq!(r["promoted"].as_i64(), Some(cand), "{r}");
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE kind = 'rollback'")
            .fetch_one(pool)
            .await
            .unwrap(),
        1
    );

    // import-prompts: a traversal or a broken line refuses the whole file; a good file imports (idempotently).
    let pdir = dir.join("prompts");
    std::fs::create_dir_all(pdir.join("img")).unwrap();
    std::fs::write(pdir.join("img/a.png"), &img).unwrap();
    std::fs::write(pdir.join("img/b.png"), shapes_png(&dir, "4243")).unwrap();
    let before = counts(pool).await;
    std::fs::write(pdir.join("bad.jsonl"), "{\"image\": \"img/a.png\", \"question\": \"Describe the image.\"}\n{\"image\": \"../../etc/passwd\", \"question\": \"x\"}\n").unwrap();
    let r = d.ctl(json!({ "cmd": "import-prompts", "file": pdir.join("bad.jsonl") }));
    assert!(r["error"].as_str().unwrap().contains("line 2"), "{r}");
    std::fs::write(
        pdir.join("bad2.jsonl"),
        "{\"image\": \"img/a.png\", \"question\": \"Describe the image.\"}\nnot json\n",
    )
    .unwrap();
    assert_eq!(d.ctl(json!({ "cmd": "import-prompts", "file": pdir.join("bad2.jsonl") }))["ok"], false);
    assert_eq!(counts(pool).await, before, "a refused import stored nothing");
    std::fs::write(pdir.join("good.jsonl"), "{\"image\": \"img/a.png\", \"question\": \"What is in the picture?\"}\n\n{\"image\": \"img/b.png\", \"question\": \"What is in the picture?\"}\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_rlaifd"))
        .args(["ctl", "--socket"])
        .arg(&d.socket)
        .arg("import-prompts")
        .arg(pdir.join("good.jsonl"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["imported"], 2, "{r}");
    assert_eq!(
        d.ctl(json!({ "cmd": "import-prompts", "file": pdir.join("good.jsonl") }))["imported"],
        0,
        "importing twice adds nothing"
    );

    // reload-config: a valid change applies; an invalid file changes nothing.
    let cfg_text = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, cfg_text.replace("n = 4", "n = 5")).unwrap();
    let r = d.ctl(json!({ "cmd": "reload-config" }));
    assert_eq!((r["ok"].as_bool(), r["changed"].as_bool()), (Some(true), Some(true)), "{r}");
    std::fs::write(&d.config, cfg_text.replace("n = 4", "n = 1")).unwrap();
    let r = d.ctl(json!({ "cmd": "reload-config" }));
    assert!(r["error"].as_str().unwrap().contains("loop.n"), "{r}");
    std::fs::write(&d.config, &cfg_text).unwrap();

    // /metrics in Prometheus text.
    let (st, text) = d.http("GET", "/metrics", "", b"");
    assert_eq!(st, 200);
    let sample = |name: &str, labels: &[(&str, &str)]| {
        common::daemon::prom_sample(&text, name, labels)
            .unwrap_or_else(|| panic!("/metrics lacks {name} {labels:?}:\n{text}"))
    };
    let chat = "/v1/chat/completions";
    assert!(sample("rlaifd_requests_total", &[("route", chat), ("status", "200")]) >= 1.0);
    assert!(sample("rlaifd_requests_total", &[("route", chat), ("status", "400")]) >= 1.0);
    assert!(sample("rlaifd_request_duration_seconds_count", &[]) >= 2.0);
    assert_eq!(sample("rlaifd_serving_checkpoint", &[]), cand as f64);
    assert!(sample("rlaifd_pairs_total", &[]) >= 1.0);
    sample("rlaifd_engine_queue_depth", &[("priority", "serve")]);
    let c = cand.to_string();
    assert!((0.0..=1.0).contains(&sample("rlaifd_hallucination", &[("metric", "chair_i"), ("checkpoint", c.as_str())])));
    // Every metric the shipped Grafana dashboard queries is exposed.
    let dashboard =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../grafana/rlaifd-dashboard.json")).unwrap();
    let names = regex::Regex::new(r"rlaifd_[a-z_]+").unwrap();
    for n in names.find_iter(&dashboard).map(|m| m.as_str()) {
        assert!(
            text.contains(&format!("# TYPE {} ", n.trim_end_matches("_bucket"))),
            "the dashboard queries {n}, which /metrics lacks"
        );
    }

    // drain: the daemon finishes and exits 0; its leases are released.
    let r = d.ctl(json!({ "cmd": "drain" }));
    assert_eq!(r["draining"], true);
    let mut d = d;
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = d.child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "drain did not stop the daemon");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "exit status {status}: {}", d.log());
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE kind = 'daemon_stopped'")
            .fetch_one(pool)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs WHERE status = 'running'")
            .fetch_one(pool)
            .await
            .unwrap(),
        0
    );
    drop(d);
    db.drop_db().await;
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swaps_under_concurrent_requests_fail_none_and_never_mix_generations() {
    let db = common::fresh("swap").await;
    let dir = std::env::temp_dir().join(format!("rlaifd-swap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // A second checkpoint whose answers differ from the base's: a LoRA adapter fitted hard on a few examples.
    let data = dir.join("sft");
    rlaifd(&["shapes", "sft", "--seed", "3", "--count", "16", "--out", data.to_str().unwrap()]);
    let adapter = dir.join("adapter");
    rlaifd(&[
        "train-sft",
        "--model",
        model().to_str().unwrap(),
        "--data",
        data.join("sft.jsonl").to_str().unwrap(),
        "--out",
        adapter.to_str().unwrap(),
        "--r",
        "8",
        "--lr",
        "0.01",
        "--stop-after",
        "12",
        "--batch-size",
        "4",
    ]);
    // Served prompts join the training pool (opt-in).
    let d = Daemon::start(&dir, &db.url, "join_prompt_pool = true");
    let pool = &db.pool;
    let base: i64 = sqlx::query_scalar("SELECT id FROM checkpoints WHERE kind = 'base'").fetch_one(pool).await.unwrap();
    let sha = rlaifd::rlaif::adapter_sha256(&adapter).unwrap();
    let other: i64 = sqlx::query_scalar("INSERT INTO checkpoints (parent_id, iteration, kind, path, sha256, status) VALUES ($1, 0, 'lora', $2, $3, 'rejected') RETURNING id")
        .bind(base)
        .bind(adapter.display().to_string())
        .bind(sha)
        .fetch_one(pool)
        .await
        .unwrap();
    let img = shapes_png(&dir, "5151");
    let body =
        chat_body(&img, "Describe the image.", json!({ "temperature": 0.8, "seed": 11, "max_tokens": 32, "n": 2 }));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // RLAIFD_LOAD_CLIENTS / RLAIFD_LOAD_SECONDS make this a longer load run (RELIABILITY.md); CI uses 4 for 20 s.
    let n_clients: usize = std::env::var("RLAIFD_LOAD_CLIENTS").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    let seconds: u64 = std::env::var("RLAIFD_LOAD_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let clients: Vec<_> = (0..n_clients)
        .map(|_| {
            let (addr, body, stop) = (d.addr.clone(), body.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let t = Instant::now();
                    let (st, text) = http(&addr, "POST", "/v1/chat/completions", "application/json", &body);
                    seen.push((st, text, t.elapsed().as_secs_f64()));
                }
                seen
            })
        })
        .collect();
    let t0 = Instant::now();
    let mut swaps = 0;
    while t0.elapsed() < Duration::from_secs(seconds) {
        let target = if swaps % 2 == 0 { other } else { base };
        let r = d.ctl(json!({ "cmd": "promote", "id": target }));
        assert_eq!(r["ok"], true, "{r}");
        swaps += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut by_checkpoint: std::collections::BTreeMap<i64, std::collections::BTreeSet<String>> = Default::default();
    let (mut total, mut failed) = (0, 0);
    let mut latency = Vec::new();
    for c in clients {
        for (st, text, secs) in c.join().unwrap() {
            total += 1;
            latency.push(secs);
            if st != 200 {
                failed += 1;
                eprintln!("failed request: {st} {text}");
                continue;
            }
            let v: Value = serde_json::from_str(&text).unwrap();
            let answers: Vec<String> = v["choices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["message"]["content"].as_str().unwrap().to_string())
                .collect();
            by_checkpoint.entry(v["rlaifd"]["checkpoint"].as_i64().unwrap()).or_default().insert(answers.join(" | "));
        }
    }
    latency.sort_by(f64::total_cmp);
    let pct = |p: f64| latency[((latency.len() - 1) as f64 * p).round() as usize] * 1000.0;
    println!("{total} requests from {n_clients} clients during {swaps} hot-swaps in {seconds} s, {failed} failed; latency p50 {:.1} ms, p99 {:.1} ms; answers per checkpoint: {by_checkpoint:?}", pct(0.5), pct(0.99));
    assert_eq!(failed, 0, "failed requests during hot-swaps");
    assert!(total >= 20 && swaps >= 20, "{total} requests, {swaps} swaps");
    // Same seed, same prompt: each generation always gives the same answers. A request that mixed two
    // generations would show a third variant.
    assert_eq!(by_checkpoint.len(), 2, "both checkpoints served");
    for (c, answers) in &by_checkpoint {
        assert_eq!(answers.len(), 1, "checkpoint {c} gave different answers to the same seeded request: {answers:?}");
    }
    assert_ne!(
        by_checkpoint[&base], by_checkpoint[&other],
        "the two checkpoints answer differently (else this test proves nothing)"
    );
    let served: Vec<(String, String)> =
        sqlx::query_as("SELECT instruction, split FROM prompts WHERE source = 'served'").fetch_all(pool).await.unwrap();
    assert_eq!(
        served,
        vec![("Describe the image.".to_string(), "train".to_string())],
        "the served prompt joined the pool once"
    );
    drop(d);
    db.drop_db().await;
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn serve_refuses_an_invalid_configuration_naming_the_key_and_checks_a_good_one() {
    let dir = std::env::temp_dir().join(format!("rlaifd-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("rlaifd.toml");
    for (text, env, needle) in [
        ("[server]\nbind = \"127.0.0.1:8080\"\nworkerz = 2\n", None, "workerz"),
        ("[loop]\nbeta = \"high\"\n", None, "beta"),
        ("[daemon]\nprompt_source = \"web\"\n", None, "daemon.prompt_source"),
        ("[daemon]\nroles = [\"serve\", \"cook\"]\n", None, "daemon.roles: unknown role \"cook\""),
        ("[daemon]\nroles = []\n", None, "daemon.roles is empty"),
        ("[model]\ndevices = [\"cuda:0\", \"cuda:0\"]\n", None, "model.devices: device cuda:0 is named twice"),
        ("", Some(("RLAIFD__MODEL__DEVICES", "auto,cpu")), "model.devices: \"auto\" goes alone"),
        ("", Some(("RLAIFD__MODEL__DEVICES", &["cpu"; 17].join(","))), "model.devices: 17 devices named: at most 16"),
        ("", Some(("RLAIFD__DAEMON__ROLES", "sample,sample")), "daemon.roles names \"sample\" twice"),
        ("", Some(("RLAIFD__SERVER__BIND", "0.0.0.0:8080")), "server.token"),
        ("[log\n", None, "not valid TOML"),
        ("[model]\ndevice = \"gpu\"\n", None, "model.device"),
        ("", Some(("RLAIFD__MODEL__DEVICE", "cuda:one")), "model.device"),
        (
            "[control]\ngroup = \"rlaifd-no-such-group\"\n",
            None,
            "control.group \"rlaifd-no-such-group\" is not a group",
        ),
    ] {
        std::fs::write(&f, text).unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_rlaifd"));
        c.args(["serve", "--config"]).arg(&f);
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle), "{text:?}: {err}");
    }
    std::fs::write(&f, "[loop]\nn = 6\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_rlaifd"))
        .args(["serve", "--check-config", "--config"])
        .arg(&f)
        .env("RLAIFD__SERVER__MAX_N", "3")
        .env("RLAIFD__DAEMON__ROLES", "sample,label")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["loop"]["n"].as_u64(), v["server"]["max_n"].as_u64()), (Some(6), Some(3)));
    assert_eq!(v["daemon"]["roles"], json!(["sample", "label"]), "a comma-separated list from the environment");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_guards_every_route_but_healthz_and_the_rate_limit_answers_429() {
    let db = common::fresh("auth").await;
    let dir = std::env::temp_dir().join(format!("rlaifd-auth-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = Daemon::start(&dir, &db.url, "token = \"s3cret-s3cret-s3cret\"\nrate_per_s = 0.5\nrate_burst = 3.0");
    let get = |path: &str, auth: Option<&str>| -> u16 {
        let mut s = std::net::TcpStream::connect(&d.addr).unwrap();
        let auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert_eq!(get("/healthz", None), 200, "health checks need no token");
    for path in ["/v1/models", "/metrics"] {
        assert_eq!(get(path, None), 401, "{path} without a token");
        assert_eq!(get(path, Some("Bearer wrong")), 401, "{path} with a wrong token");
        assert_eq!(get(path, Some("Bearer s3cret-s3cret-s3cret")), 200, "{path} with the token");
    }
    assert_eq!(d.http("POST", "/v1/chat/completions", "application/json", b"{}").0, 401, "chat without a token");
    // Burst 3, then 0.5 per second: of 6 quick authorised requests, 3 pass and the rest get 429.
    let body = json!({ "messages": [{ "role": "user", "content": "hello" }], "max_tokens": 2 }).to_string();
    let mut codes = Vec::new();
    for _ in 0..6 {
        let mut s = std::net::TcpStream::connect(&d.addr).unwrap();
        s.write_all(format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret-s3cret-s3cret\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        codes.push(out.split_whitespace().nth(1).unwrap().parse::<u16>().unwrap());
    }
    assert_eq!(codes.iter().filter(|&&c| c == 200).count(), 3, "{codes:?}");
    assert_eq!(codes.iter().filter(|&&c| c == 429).count(), 3, "{codes:?}");
    drop(d);
    db.drop_db().await;
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_survives_a_restart_and_iterate_is_a_request_any_daemon_takes() {
    let db = common::fresh("pausedb").await;
    let dir = std::env::temp_dir().join(format!("rlaifd-pausedb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = Daemon::start(&dir, &db.url, "");
    assert_eq!(d.ctl(json!({ "cmd": "pause" }))["paused"], true);
    drop(d); // SIGKILL: nothing but the database remembers the pause
    let d = Daemon::start(&dir, &db.url, "");
    let s = d.ctl(json!({ "cmd": "status" }));
    assert_eq!((s["paused"].as_bool(), s["stage"].as_str()), (Some(true), Some("paused")), "{s}");
    let r = d.ctl(json!({ "cmd": "iterate" }));
    assert!(r["error"].as_str().unwrap_or("").contains("paused"), "{r}");
    assert_eq!(d.ctl(json!({ "cmd": "resume" }))["paused"], false);
    assert_eq!(d.ctl(json!({ "cmd": "iterate" }))["requested"], true);
    let t0 = Instant::now();
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM iterations").fetch_one(&db.pool).await.unwrap() == 0 {
        assert!(t0.elapsed() < Duration::from_secs(60), "the requested iteration never started: {}", d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pending: bool =
        sqlx::query_scalar("SELECT iterate_requested FROM loop_control").fetch_one(&db.pool).await.unwrap();
    assert!(!pending, "the request was taken");
    drop(d);
    db.drop_db().await;
    std::fs::remove_dir_all(&dir).ok();
}

/// The OpenAI API as clients call it (issue 31, first part): `stop` ends an answer before the stop string (the
/// same seed's answer cut there, finish_reason "stop", fewer completion tokens), `max_completion_tokens` bounds the
/// answer as `max_tokens` does, a `developer` message is taken like a system one, bad `stop` lists are refused, and
/// `GET /v1/models/{id}` answers for the served model and 404s for any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_max_completion_tokens_developer_role_and_model_retrieval() {
    let db = common::fresh("openai").await;
    let dir = std::env::temp_dir().join(format!("rlaifd-openai-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = Daemon::start(&dir, &db.url, "");
    let png = common::daemon::shapes_png(&dir, "31");
    let chat = |extra: Value| -> (u16, Value) {
        let body = common::daemon::chat_body(&png, "Describe the image.", extra);
        let (st, text) = d.http("POST", "/v1/chat/completions", "application/json", &body);
        (st, serde_json::from_str(&text).unwrap_or(Value::Null))
    };
    let base = json!({ "seed": 11, "temperature": 0.9, "max_tokens": 40 });
    let (st, full) = chat(base.clone());
    assert_eq!(st, 200, "{full}");
    let text = full["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let words: Vec<&str> = text.split_whitespace().collect();
    assert!(words.len() >= 4, "a caption of a few words: {text:?}");
    // A stop string from inside the answer: the same answer, cut before its first occurrence.
    let stop = words[2].to_string();
    let mut with_stop = base.clone();
    with_stop["stop"] = json!([stop.clone(), "never appears"]);
    let (st, cut) = chat(with_stop);
    assert_eq!(st, 200, "{cut}");
    let want = &text[..text.find(&stop).unwrap()];
    assert_eq!(cut["choices"][0]["message"]["content"].as_str(), Some(want), "stop {stop:?} in {text:?}");
    assert_eq!(cut["choices"][0]["finish_reason"].as_str(), Some("stop"));
    let tokens = |v: &Value| v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(tokens(&cut) < tokens(&full), "{} vs {}", cut["usage"], full["usage"]);
    let (_, one) = chat(json!({ "seed": 11, "temperature": 0.9, "stop": stop }));
    assert_eq!(one["choices"][0]["message"]["content"].as_str(), Some(want), "a single stop string");
    // max_completion_tokens bounds the answer (and wins over max_tokens).
    let (st, short) = chat(json!({ "seed": 11, "temperature": 0.9, "max_tokens": 40, "max_completion_tokens": 2 }));
    assert_eq!(st, 200, "{short}");
    assert!(tokens(&short) <= 2, "{}", short["usage"]);
    // A developer message is instructions, like a system message.
    let body = json!({ "messages": [
        { "role": "developer", "content": "Answer briefly." },
        { "role": "user", "content": [{ "type": "text", "text": "Describe the image." },
            { "type": "image_url", "image_url": { "url": format!("data:image/png;base64,{}", common::daemon::b64(&png)) } }] },
    ], "max_tokens": 4 });
    let (st, r) = d.http("POST", "/v1/chat/completions", "application/json", body.to_string().as_bytes());
    assert_eq!(st, 200, "{r}");
    // Bad stop lists.
    for bad in [json!(["a", "b", "c", "d", "e"]), json!([""]), json!("x".repeat(300))] {
        let (st, r) = chat(json!({ "stop": bad }));
        assert_eq!(st, 400, "{r}");
        assert!(r["error"]["message"].as_str().unwrap().contains("stop"), "{r}");
    }
    // models.retrieve.
    let (st, list) = d.http("GET", "/v1/models", "", b"");
    assert_eq!(st, 200);
    let id = serde_json::from_str::<Value>(&list).unwrap()["data"][0]["id"].as_str().unwrap().to_string();
    let (st, m) = d.http("GET", &format!("/v1/models/{id}"), "", b"");
    let m: Value = serde_json::from_str(&m).unwrap();
    assert_eq!((st, m["id"].as_str(), m["object"].as_str()), (200, Some(id.as_str()), Some("model")), "{m}");
    assert!(m["created"].as_u64().is_some_and(|c| c > 1_700_000_000), "{m}");
    let (st, e) = d.http("GET", "/v1/models/gpt-4o", "", b"");
    assert_eq!(st, 404, "{e}");
    assert!(e.contains(&id), "the error names the served model: {e}");
    drop(d);
    db.drop_db().await;
    std::fs::remove_dir_all(&dir).ok();
}

/// A streaming client that goes away mid-answer: its answers leave the batch at the next step (the engine stops
/// spending steps on them), the daemon keeps serving, and the request no longer counts as in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_client_that_disconnects_is_dropped_from_the_batch() {
    let db = common::fresh("streamgone").await;
    let dir = std::env::temp_dir().join(format!("rlaifd-streamgone-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = Daemon::start(&dir, &db.url, "max_tokens = 512");
    let img = shapes_png(&dir, "5");
    let answer_steps = || -> f64 {
        let (_, text) = d.http("GET", "/metrics", "text/plain", b"");
        text.lines()
            .filter(|l| l.starts_with("rlaifd_batch_answer_steps_total"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    // 8 answers of 200 tokens each (the bundled model's context is 256), past every end-of-sequence token: 8 x 199
    // answer steps if nobody left.
    let body = chat_body(
        &img,
        "Describe the image.",
        json!({ "stream": true, "n": 8, "max_tokens": 200, "ignore_eos": true, "seed": 3 }),
    );
    let mut s = std::net::TcpStream::connect(&d.addr).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&body).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"content\":\"") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(text.starts_with("HTTP/1.1 200") && text.contains("text/event-stream"), "{text}");
    assert!(text.contains("data: {") && text.contains("chat.completion.chunk"), "{text}");
    drop(s);
    // The batch notices at its next step; wait until the engine is idle.
    let t0 = Instant::now();
    let mut last = answer_steps();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = answer_steps();
        if now == last {
            break;
        }
        last = now;
        assert!(t0.elapsed() < Duration::from_secs(60), "the engine kept decoding for a client that left");
    }
    assert!(last < 8.0 * 199.0 * 0.9, "{last} answer steps: the abandoned answers ran (nearly) to the end");
    let (_, health) = d.http("GET", "/healthz", "application/json", b"");
    let h: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(h["devices"][0]["in_flight"], 0, "{health}");
    // Still serving, streamed and not.
    let (st, text) = d.http(
        "POST",
        "/v1/chat/completions",
        "application/json",
        &chat_body(&img, "Describe.", json!({ "max_tokens": 8 })),
    );
    assert_eq!(st, 200, "{text}");
    let (st, text) = d.http(
        "POST",
        "/v1/chat/completions",
        "application/json",
        &chat_body(&img, "Describe.", json!({ "max_tokens": 8, "stream": true })),
    );
    assert_eq!(st, 200, "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    drop(d);
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Image URLs over http(s), opt-in: with `server.image_url_hosts` naming a host, an image fetched from it gives the
/// answer its data URL gives; other hosts, redirects, images over `image_url_max_bytes` and servers slower than
/// `image_url_timeout_s` get 400s naming the reason, and the daemon goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_urls_are_fetched_only_from_allowed_hosts_within_their_limits() {
    let db = common::fresh("imageurl").await;
    let dir = std::env::temp_dir().join(format!("rlaifd-imageurl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let img = shapes_png(&dir, "9");
    // A small image server: /ok.png, /big.png (past the limit), /slow.png (past the timeout), /moved (a redirect).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = img.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            let served = served.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let n = c.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = req.split_whitespace().nth(1).unwrap_or("").to_string();
                let (status, extra, body): (&str, &str, Vec<u8>) = match path.as_str() {
                    "/ok.png" => ("200 OK", "", served),
                    "/big.png" => ("200 OK", "", vec![7u8; 200_000]),
                    "/slow.png" => {
                        std::thread::sleep(Duration::from_secs(4));
                        ("200 OK", "", served)
                    }
                    "/moved" => ("302 Found", "Location: /ok.png\r\n", Vec::new()),
                    _ => ("404 Not Found", "", Vec::new()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: image/png\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = c.write_all(head.as_bytes());
                let _ = c.write_all(&body);
            });
        }
    });
    let d = Daemon::start(
        &dir,
        &db.url,
        "image_url_hosts = [\"127.0.0.1\"]\nimage_url_max_bytes = 65536\nimage_url_timeout_s = 1.0",
    );
    let ask = |url: &str| -> (u16, Value) {
        let body = json!({ "messages": [{ "role": "user", "content": [
            { "type": "image_url", "image_url": { "url": url } }, { "type": "text", "text": "Describe the image." }] }],
            "seed": 4, "temperature": 0.7, "max_tokens": 16 });
        let (st, text) = d.http("POST", "/v1/chat/completions", "application/json", body.to_string().as_bytes());
        (st, serde_json::from_str(&text).unwrap_or(Value::Null))
    };
    let (st, by_url) = ask(&format!("http://127.0.0.1:{port}/ok.png"));
    assert_eq!(st, 200, "{by_url}");
    let (st, by_data) = ask(&format!("data:image/png;base64,{}", common::daemon::b64(&img)));
    assert_eq!(st, 200, "{by_data}");
    assert_eq!(by_url["choices"][0]["message"]["content"], by_data["choices"][0]["message"]["content"]);
    for (url, needle) in [
        (format!("http://localhost:{port}/ok.png"), "\"localhost\" is not in server.image_url_hosts"),
        (format!("http://127.0.0.1:{port}/big.png"), "larger than 65536 bytes (server.image_url_max_bytes)"),
        (format!("http://127.0.0.1:{port}/slow.png"), "server.image_url_timeout_s"),
        (format!("http://127.0.0.1:{port}/moved"), "HTTP 302"),
        (format!("http://127.0.0.1:{port}/missing.png"), "HTTP 404"),
        (format!("http://user:pw@127.0.0.1:{port}/ok.png"), "credentials"),
        ("ftp://127.0.0.1/ok.png".to_string(), "data URL"),
    ] {
        let t0 = Instant::now();
        let (st, v) = ask(&url);
        assert_eq!(st, 400, "{url}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains(needle), "{url}: {msg}");
        assert!(!msg.contains("pw@"), "{msg}");
        assert!(t0.elapsed() < Duration::from_secs(3), "{url} took {:?}", t0.elapsed());
    }
    assert_eq!(ask(&format!("http://127.0.0.1:{port}/ok.png")).0, 200, "still serving");
    drop(d);
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(&dir);
}
