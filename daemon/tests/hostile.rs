//! Hostile input against a real `rlaifd serve` (issue 25): each input that once killed, hung, leaked from or
//! opened the daemon, sent again. Every test here failed on a613f84 (run with `RLAIFD_TEST_BIN` pointing at that
//! commit's binary, under `ulimit -v` for the first so that its unbounded allocation aborts instead of swapping);
//! the figures they print (resident memory around the requests) go to RELIABILITY.md.

mod common;

use common::daemon::{bin, chat_request as chat, counts, png, shapes_png, Daemon};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rlaifd-hostile-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A fresh database and scratch folder for one test; `done` stops the daemon and removes both.
struct Case {
    db: common::TestDb,
    dir: PathBuf,
}

impl Case {
    async fn new(tag: &str) -> Case {
        Case { db: common::fresh(tag).await, dir: scratch(tag) }
    }

    async fn done(self, d: Daemon) {
        drop(d);
        self.db.drop_db().await;
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

fn error_message(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("error body is not JSON: {body}"));
    v["error"]["message"].as_str().unwrap_or_else(|| panic!("no error message: {body}")).to_string()
}

/// One control line with a reply deadline: Err when no reply came in time (a hung connection).
fn ctl_within(socket: &Path, line: &[u8], within: Duration) -> Result<Value, String> {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(within)).unwrap();
    // The daemon may close a connection before taking all of an over-long line.
    let _ = s.write_all(line);
    let _ = s.write_all(b"\n");
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).map_err(|e| format!("no reply within {within:?}: {e}"))?;
    serde_json::from_str(&reply).map_err(|e| format!("reply {reply:?}: {e}"))
}

/// Item 1: A prompt far beyond the context (the 300 KB body that made the daemon grow to 24 GB and be OOM-killed) is
/// refused with 400 naming the numbers, before any model work; so is one just past the context in tokens; memory
/// stays flat. A prompt that fits without max_tokens gets the room the context leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_beyond_the_context_is_refused_before_model_work_and_memory_stays_flat() {
    let case = Case::new("long").await;
    let (db, dir) = (&case.db, case.dir.clone());
    let mut d = Daemon::start_with(&dir, &db.url, "", &[("RLAIFD__SERVER__MAX_BODY_BYTES", "8388608")]);
    let img = shapes_png(&dir, "77");
    let before = counts(&db.pool).await;
    let (rss0, hwm0) = (d.mem_kib("VmRSS"), d.mem_kib("VmHWM"));

    let huge = "the red circle ".repeat(20_000);
    let body = chat(&huge, None, json!({ "max_tokens": 4 }));
    assert!(body.len() > 300_000);
    let t0 = Instant::now();
    let (st, text) = d.http("POST", "/v1/chat/completions", "application/json", &body);
    let first_s = t0.elapsed().as_secs_f64();
    assert_eq!(st, 400, "{text}");
    let m = error_message(&text);
    assert!(m.contains("300000 bytes") && m.contains("context of 256 tokens"), "{m}");
    // The same eight times at once, and the daemon is as it was.
    let bodies: Vec<_> = (0..8).map(|_| body.clone()).collect();
    let addr = d.addr.clone();
    let codes: Vec<u16> = std::thread::scope(|s| {
        let hs: Vec<_> = bodies
            .iter()
            .map(|b| s.spawn(|| common::daemon::http(&addr, "POST", "/v1/chat/completions", "application/json", b).0))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(codes, vec![400; 8]);

    // Within the byte bound but past the context in tokens: 240 words, the template and 16 image rows.
    let long = "the red circle ".repeat(80);
    let (st, text) = d.http(
        "POST",
        "/v1/chat/completions",
        "application/json",
        &chat(&long, Some(("image/png", &img)), json!({ "max_tokens": 4 })),
    );
    assert_eq!(st, 400, "{text}");
    let m = error_message(&text);
    assert!(
        m.contains("max_tokens is 4") && m.contains("context of 256 tokens") && m.contains("the prompt takes 2"),
        "{m}"
    );
    // max_tokens alone past the context.
    let (st, text) = d.http(
        "POST",
        "/v1/chat/completions",
        "application/json",
        &chat("Describe the image.", Some(("image/png", &img)), json!({ "max_tokens": 250 })),
    );
    assert_eq!(st, 400, "{text}");
    assert!(error_message(&text).contains("max_tokens is 250"), "{text}");
    // Without max_tokens a long prompt gets what the context leaves.
    let fits = "the red circle ".repeat(60);
    let (st, text) = d.http(
        "POST",
        "/v1/chat/completions",
        "application/json",
        &chat(&fits, Some(("image/png", &img)), json!({ "temperature": 1.0, "seed": 3 })),
    );
    assert_eq!(st, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let (prompt, completion) =
        (v["usage"]["prompt_tokens"].as_u64().unwrap(), v["usage"]["completion_tokens"].as_u64().unwrap());
    assert!(prompt > 180 && prompt + completion <= 256, "{v}");

    let (rss1, hwm1) = (d.mem_kib("VmRSS"), d.mem_kib("VmHWM"));
    println!("long prompts: first refusal in {first_s:.3} s; VmRSS {rss0} -> {rss1} KiB, VmHWM {hwm0} -> {hwm1} KiB");
    assert!(first_s < 5.0, "the refusal took {first_s} s");
    assert!(hwm1 < hwm0 + 100 * 1024, "the peak resident memory grew by {} KiB", hwm1 - hwm0);
    assert!(d.alive(), "the daemon died: {}", d.log());
    assert_eq!(counts(&db.pool).await, before, "refused requests changed the database");
    case.done(d).await;
}

/// The engine's budget per request (server.max_request_mb), and the bound on requests in flight
/// (server.max_pending): a client holding its body open keeps one slot, the next request gets 503 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_memory_budget_or_past_the_pending_limit_are_refused() {
    let case = Case::new("budget").await;
    let (db, dir) = (&case.db, case.dir.clone());
    let d = Daemon::start(&dir, &db.url, "max_request_mb = 1\nmax_pending = 1\nmax_n = 16");
    let img = shapes_png(&dir, "78");
    let (st, text) = d.http(
        "POST",
        "/v1/chat/completions",
        "application/json",
        &chat("Describe the image.", Some(("image/png", &img)), json!({ "n": 16, "max_tokens": 200 })),
    );
    assert_eq!(st, 400, "{text}");
    assert!(error_message(&text).contains("budget of 1 MiB"), "{text}");
    let (st, text) = d.http(
        "POST",
        "/v1/chat/completions",
        "application/json",
        &chat("Describe the image.", Some(("image/png", &img)), json!({ "max_tokens": 8 })),
    );
    assert_eq!(st, 200, "a small request fits the budget: {text}");

    // A slow client: headers and half its body, then nothing.
    let mut slow = std::net::TcpStream::connect(&d.addr).unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"messages\": [").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (st, text) = d.http(
        "POST",
        "/v1/chat/completions",
        "application/json",
        &chat("Describe the image.", Some(("image/png", &img)), json!({ "max_tokens": 8 })),
    );
    assert_eq!(st, 503, "{text}");
    assert!(error_message(&text).contains("server.max_pending"), "{text}");
    drop(slow);
    std::thread::sleep(Duration::from_millis(300));
    let (st, text) = d.http(
        "POST",
        "/v1/chat/completions",
        "application/json",
        &chat("Describe the image.", Some(("image/png", &img)), json!({ "max_tokens": 8 })),
    );
    assert_eq!(st, 200, "the slot is free again once the slow client left: {text}");
    case.done(d).await;
}

/// Item 2: reload-config never weakens access: with a non-loopback bind (the v4-mapped loopback counts as such) and a
/// token, a file with an empty token and a loopback bind is refused whole; so are an empty and a short token on the
/// running bind; a new long token rotates in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_config_cannot_drop_the_token_while_the_old_bind_stays_open() {
    let case = Case::new("reload").await;
    let (db, dir) = (&case.db, case.dir.clone());
    let token = "tok-0123456789abcdef-0123456789";
    let text = common::daemon::config_text(&dir, &db.url, &format!("token = \"{token}\""))
        .replace("bind = \"127.0.0.1:0\"", "bind = \"[::ffff:127.0.0.1]:0\"");
    let d = Daemon::launch(&dir, &text, &[]);
    let get = |auth: Option<&str>| -> u16 {
        let mut s = std::net::TcpStream::connect(&d.addr).unwrap();
        let auth = auth.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        s.write_all(format!("GET /v1/models HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes())
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert_eq!((get(None), get(Some(token))), (401, 200));
    let reload = |file_text: &str| -> Value {
        std::fs::write(&d.config, file_text).unwrap();
        d.ctl(json!({ "cmd": "reload-config" }))
    };
    // The issue's steps: no token, loopback bind.
    let r = reload(
        &text.replace(&format!("token = \"{token}\""), "token = \"\"").replace("[::ffff:127.0.0.1]:0", "127.0.0.1:0"),
    );
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("server.bind"), "{r}");
    assert_eq!(get(None), 401, "still guarded after the refused reload");
    // No token on the running bind.
    let r = reload(&text.replace(&format!("token = \"{token}\""), "token = \"\""));
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("server.token"), "{r}");
    assert_eq!(get(None), 401);
    // A short token.
    let r = reload(&text.replace(token, "short"));
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("at least 16"), "{r}");
    assert_eq!((get(None), get(Some(token))), (401, 200));
    // Rotation to a new long token applies at once.
    let fresh = "tok-fedcba9876543210-fedcba9876";
    let r = reload(&text.replace(token, fresh));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!((get(None), get(Some(token)), get(Some(fresh))), (401, 401, 200));
    let shown = serde_json::to_string(&r).unwrap();
    assert!(!shown.contains(fresh) && !d.log().contains(fresh) && !d.log().contains(token), "the token leaked");
    case.done(d).await;
}

/// Item 3: import-prompts reads only regular files, bounded, with images inside the prompts file's folder after
/// symlinks are resolved, and shows no file bytes in any error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_prompts_reads_only_bounded_regular_files_inside_their_folder() {
    let case = Case::new("import").await;
    let (db, dir) = (&case.db, case.dir.clone());
    let d = Daemon::start(&dir, &db.url, "");
    let pdir = dir.join("prompts");
    std::fs::create_dir_all(pdir.join("img")).unwrap();
    std::fs::write(pdir.join("img/a.png"), shapes_png(&dir, "79")).unwrap();
    let before = counts(&db.pool).await;
    let import = |file: &Path| -> Value {
        let line = json!({ "cmd": "import-prompts", "file": file }).to_string();
        ctl_within(&d.socket, line.as_bytes(), Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("import-prompts {}: {e}", file.display()))
    };
    let refused = |file: &Path, needle: &str| {
        let t0 = Instant::now();
        let r = import(file);
        assert_eq!(r["ok"], false, "{}: {r}", file.display());
        let e = r["error"].as_str().unwrap();
        assert!(e.contains(needle), "{}: {e}", file.display());
        assert!(!e.contains("root:") && !e.contains("72 6f 6f 74"), "file bytes in the error: {e}");
        assert!(t0.elapsed() < Duration::from_secs(10), "{} took {:?}", file.display(), t0.elapsed());
    };
    let fifo = pdir.join("fifo.jsonl");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    refused(&fifo, "FIFO");
    refused(Path::new("/dev/zero"), "a device");
    refused(&pdir, "a directory");
    refused(Path::new("/etc/passwd"), "not valid JSON");
    let big = pdir.join("big.jsonl");
    std::fs::File::create(&big).unwrap().set_len(65 << 20).unwrap();
    refused(&big, "more than the limit");
    // An image that is a symlink out of the folder, and a prompts file that is one.
    std::os::unix::fs::symlink("/etc/passwd", pdir.join("img/evil.png")).unwrap();
    std::fs::write(
        pdir.join("evil.jsonl"),
        "{\"image\": \"img/evil.png\", \"question\": \"What is in the picture?\"}\n",
    )
    .unwrap();
    refused(&pdir.join("evil.jsonl"), "outside");
    std::os::unix::fs::symlink(&fifo, pdir.join("link.jsonl")).unwrap();
    refused(&pdir.join("link.jsonl"), "FIFO");
    // A text file posing as an image inside the folder: named, not shown.
    std::fs::write(pdir.join("img/text.png"), "root:x:0:0:root:/root:/bin/bash\n").unwrap();
    std::fs::write(
        pdir.join("text.jsonl"),
        "{\"image\": \"img/text.png\", \"question\": \"What is in the picture?\"}\n",
    )
    .unwrap();
    refused(&pdir.join("text.jsonl"), "not start with a PNG, JPEG, WebP, GIF or BMP signature");
    // An image over server.max_image_side (256), refused from its header.
    std::fs::write(pdir.join("img/big.png"), png(300, 300)).unwrap();
    std::fs::write(
        pdir.join("big-image.jsonl"),
        "{\"image\": \"img/big.png\", \"question\": \"What is in the picture?\"}\n",
    )
    .unwrap();
    refused(&pdir.join("big-image.jsonl"), "300x300 pixels, more than 256 per side");
    // A question longer than the context.
    std::fs::write(
        pdir.join("long.jsonl"),
        format!("{{\"image\": \"img/a.png\", \"question\": \"{}\"}}\n", "the red circle ".repeat(100)),
    )
    .unwrap();
    refused(&pdir.join("long.jsonl"), "context of 256 tokens");
    assert_eq!(counts(&db.pool).await, before, "a refused import stored nothing");
    // A symlink that stays inside is followed.
    std::os::unix::fs::symlink(pdir.join("img/a.png"), pdir.join("img/alias.png")).unwrap();
    std::fs::write(
        pdir.join("good.jsonl"),
        "{\"image\": \"img/alias.png\", \"question\": \"What is in the picture?\"}\n",
    )
    .unwrap();
    let r = import(&pdir.join("good.jsonl"));
    assert_eq!((r["ok"].as_bool(), r["imported"].as_i64()), (Some(true), Some(1)), "{r}");
    case.done(d).await;
}

/// Item 4: Every refused control line is audited, NUL bytes and invalid UTF-8 included; a flood of refusals from one
/// peer adds at most 10 rows a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_control_lines_are_audited_and_a_flood_is_aggregated() {
    let case = Case::new("audit").await;
    let (db, dir) = (&case.db, case.dir.clone());
    let d = Daemon::start(&dir, &db.url, "");
    let rejected = || async {
        sqlx::query_as::<_, (Value,)>("SELECT detail FROM events WHERE kind = 'control_rejected' ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap()
    };
    let r = d.ctl_bytes(b"{\"cmd\":\"status\0\"}");
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("NUL"), "{r}");
    let r = d.ctl_bytes(b"{\"cmd\":\"st\xffatus\"}");
    assert_eq!(r["ok"], false, "{r}");
    let rows = rejected().await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows[0].0["line"].as_str().unwrap().contains("\\u{0000}"), "{rows:?}");
    assert!(
        rows[1].0["error"].as_str().unwrap().contains("not UTF-8")
            && rows[1].0["line"].as_str().unwrap().contains('\u{fffd}'),
        "{rows:?}"
    );
    assert!(rows[0].0["peer_uid"].is_u64(), "{rows:?}");

    // 500 refused lines on one connection: each answered, at most 10 rows this minute in all.
    let s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let lines: Vec<u8> = (0..500).flat_map(|i| format!("{{\"cmd\":\"flood-{i}\"}}\n").into_bytes()).collect();
    let writer = {
        let mut w = s.try_clone().unwrap();
        std::thread::spawn(move || w.write_all(&lines).unwrap())
    };
    let mut replies = BufReader::new(&s);
    for i in 0..500 {
        let mut line = String::new();
        replies.read_line(&mut line).unwrap();
        assert!(line.contains("unknown command"), "reply {i}: {line}");
    }
    writer.join().unwrap();
    let rows = rejected().await;
    assert!(rows.len() <= 10, "{} rows for one peer in a minute", rows.len());
    assert_eq!(d.ctl(json!({ "cmd": "status" }))["ok"], true, "valid commands still run");
    case.done(d).await;
}

/// Item 5: Tokens shorter than 16 characters are refused at start; `--check-config` shows neither the token nor
/// the database password.
#[test]
fn short_tokens_are_refused_and_check_config_redacts_secrets() {
    let dir = scratch("secrets");
    let f = dir.join("rlaifd.toml");
    std::fs::write(&f, "[server]\ntoken = \"x\"\n").unwrap();
    let o = Command::new(bin()).args(["serve", "--check-config", "--config"]).arg(&f).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("server.token") && err.contains("16"), "{err}");
    let token = "0123456789abcdef0123456789abcdef";
    std::fs::write(&f, format!("[server]\ntoken = \"{token}\"\n[database]\nurl = \"postgres://rlaifd:hunter2-db-pass@127.0.0.1:5432/rlaifd\"\n")).unwrap();
    let o = Command::new(bin()).args(["serve", "--check-config", "--config"]).arg(&f).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains(token) && !out.contains("hunter2"), "a secret printed: {out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["server"]["token"], "<redacted>", "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Item 6: An image's size is read from its header, PNG and JPEG, and a too-large one is refused before any pixel is
/// decoded: the daemon's peak memory does not move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_too_large_are_refused_from_their_header_before_decoding() {
    let case = Case::new("bigimg").await;
    let (db, dir) = (&case.db, case.dir.clone());
    let d = Daemon::start_with(&dir, &db.url, "", &[("RLAIFD__SERVER__MAX_BODY_BYTES", "8388608")]);
    let big_png = png(8000, 8000);
    let mut big_jpeg = Vec::new();
    image::RgbImage::from_pixel(6000, 6000, image::Rgb([200, 30, 30]))
        .write_to(&mut std::io::Cursor::new(&mut big_jpeg), image::ImageFormat::Jpeg)
        .unwrap();
    let hwm0 = d.mem_kib("VmHWM");
    for (mime, bytes, dims) in [("image/png", &big_png, "8000x8000"), ("image/jpeg", &big_jpeg, "6000x6000")] {
        let t0 = Instant::now();
        let (st, text) = d.http(
            "POST",
            "/v1/chat/completions",
            "application/json",
            &chat("Describe the image.", Some((mime, bytes)), json!({ "max_tokens": 4 })),
        );
        assert_eq!(st, 400, "{text}");
        let m = error_message(&text);
        assert!(m.contains(dims) && m.contains("server.max_image_side"), "{m}");
        println!("{mime} {dims} ({} bytes): refused in {:.3} s", bytes.len(), t0.elapsed().as_secs_f64());
    }
    let hwm1 = d.mem_kib("VmHWM");
    println!("large images: VmHWM {hwm0} -> {hwm1} KiB");
    // A decoded 8000 x 8000 RGB image alone is 187 500 KiB.
    assert!(hwm1 < hwm0 + 60 * 1024, "the peak resident memory grew by {} KiB: the image was decoded", hwm1 - hwm0);
    case.done(d).await;
}

/// Item 7: The systemd watchdog is pinged only while the engine thread answers heartbeats: a stuck engine thread (the
/// `engine_stall` failpoint, as a hung GPU call) stops the pings, and systemd would restart the daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_engine_thread_stops_the_watchdog_pings() {
    let case = Case::new("watchdog").await;
    let (db, dir) = (&case.db, case.dir.clone());
    let notify = dir.join("notify.sock");
    let listener = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    let sock = notify.to_str().unwrap().to_string();
    let d = Daemon::start_with(
        &dir,
        &db.url,
        "",
        &[("NOTIFY_SOCKET", &sock), ("WATCHDOG_USEC", "400000"), ("RLAIFD_FAILPOINTS", "engine_stall")],
    );
    // Messages received in `window`.
    let recv_for = |window: Duration| -> Vec<String> {
        let end = Instant::now() + window;
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            listener.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
            match listener.recv(&mut buf) {
                Ok(n) => got.push(String::from_utf8_lossy(&buf[..n]).to_string()),
                Err(_) => break,
            }
        }
        got
    };
    let pings = |msgs: &[String]| msgs.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    let healthy = recv_for(Duration::from_secs(2));
    assert!(healthy.iter().any(|m| m.contains("READY=1")), "{healthy:?}");
    assert!(pings(&healthy) >= 4, "an idle engine answers heartbeats: {healthy:?}");
    // A chat request reaches the engine thread, which then hangs.
    let addr = d.addr.clone();
    let body = chat("Describe.", None, json!({ "max_tokens": 4 }));
    std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        let _ = s.write_all(format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
        let _ = s.write_all(&body);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
    });
    let t0 = Instant::now();
    while !d.log().contains("failpoint engine_stall reached") {
        assert!(t0.elapsed() < Duration::from_secs(20), "the request never reached the engine: {}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let _in_flight = recv_for(Duration::from_millis(500));
    let stuck = recv_for(Duration::from_secs(3));
    assert_eq!(pings(&stuck), 0, "pinged while the engine thread hung: {stuck:?}");
    assert!(d.log().contains("did not answer a heartbeat"), "{}", d.log());
    assert_eq!(d.http("GET", "/healthz", "text/plain", b"").0, 200, "the HTTP side itself still answers");
    case.done(d).await;
}

/// Beyond the seven: a fresh probe of the same kinds (bodies, headers, connections, special tokens, control lines
/// and connections). Each is answered or cut off with a clear error; the daemon stays up, its memory flat, the
/// database unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_probe_finds_nothing_that_kills_hangs_or_leaks() {
    let case = Case::new("probe").await;
    let (db, dir) = (&case.db, case.dir.clone());
    let mut d = Daemon::start_with(&dir, &db.url, "max_n = 16", &[("RLAIFD__SERVER__MAX_BODY_BYTES", "8388608")]);
    let img = shapes_png(&dir, "80");
    let before = counts(&db.pool).await;
    let hwm0 = d.mem_kib("VmHWM");
    let post = |body: &[u8]| d.http("POST", "/v1/chat/completions", "application/json", body);
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let many_messages = json!({ "messages": (0..60_000).map(|_| json!({ "role": "system", "content": "be brief" })).chain([json!({ "role": "user", "content": "hi" })]).collect::<Vec<_>>() }).to_string();
    let image_tokens = "<image> ".repeat(2000);
    // Issue 31's inputs: conversations, logprobs, stream options, image URLs, the new image formats.
    let long_conversation = json!({ "messages": (0..30_000).map(|i| json!({ "role": if i % 2 == 0 { "user" } else { "assistant" }, "content": "more" })).chain([json!({ "role": "user", "content": "hi" })]).collect::<Vec<_>>() }).to_string();
    let gif_bomb = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/fixtures/image_formats/gif_huge_65535x65535.gif"),
    )
    .unwrap();
    let url_image = json!({ "messages": [{ "role": "user", "content": [{ "type": "image_url", "image_url": { "url": "http://169.254.169.254/latest/meta-data/" } }, { "type": "text", "text": "hi" }] }] }).to_string();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("30001 conversation turns", long_conversation.into_bytes(), 400, "context of 256 tokens"),
        (
            "top_logprobs = 1e30",
            chat("hi", None, json!({ "logprobs": true, "top_logprobs": 1e30 })),
            400,
            "not a valid chat request",
        ),
        (
            "top_logprobs = 1000",
            chat("hi", None, json!({ "logprobs": true, "top_logprobs": 1000 })),
            400,
            "top_logprobs",
        ),
        (
            "stream_options with an unknown key",
            chat("hi", None, json!({ "stream": true, "stream_options": { "x": 1 } })),
            400,
            "not a valid chat request",
        ),
        (
            "an image URL to a metadata service, URLs off",
            url_image.into_bytes(),
            400,
            "server.image_url_hosts is empty",
        ),
        ("a GIF declaring 65535 x 65535", chat("hi", Some(("image/gif", &gif_bomb)), json!({})), 400, "65535x65535"),
        ("stop: 1000 strings", chat("hi", None, json!({ "stop": vec!["x"; 1000] })), 400, "stop"),
        ("JSON nested 100000 deep", nested.into_bytes(), 400, "not a valid chat request"),
        ("60000 system messages", many_messages.into_bytes(), 400, "context of 256 tokens"),
        ("the image token typed 2000 times", chat(&image_tokens, None, json!({ "max_tokens": 4 })), 400, "context"),
        ("the image token typed once, no image", chat("<image> hi", None, json!({ "max_tokens": 4 })), 400, "image"),
        ("n = 1e30", chat("hi", None, json!({ "n": 1e30 })), 400, "not a valid chat request"),
        ("temperature 1e39 (inf as f32)", chat("hi", None, json!({ "temperature": 1e39 })), 400, "temperature"),
        ("best_of 17", chat("hi", None, json!({ "best_of": 17 })), 400, "best_of"),
        (
            "two images",
            {
                let mut v: Value = serde_json::from_slice(&chat("hi", Some(("image/png", &img)), json!({}))).unwrap();
                let part = v["messages"][0]["content"][1].clone();
                v["messages"][0]["content"].as_array_mut().unwrap().push(part);
                v.to_string().into_bytes()
            },
            400,
            "one image",
        ),
        (
            "an image that is text",
            chat("hi", Some(("image/png", b"root:x:0:0:root:/root:/bin/bash")), json!({})),
            400,
            "signature",
        ),
        (
            "4-byte characters, 20000 of them",
            chat(&"\u{1F600}".repeat(20_000), None, json!({ "max_tokens": 4 })),
            400,
            "bytes",
        ),
    ];
    for (what, body, want, needle) in &cases {
        let (st, text) = post(body);
        assert_eq!(st, *want, "{what}: {text}");
        let m = error_message(&text);
        assert!(m.contains(needle) && !m.contains("root:x"), "{what}: {m}");
    }
    // A 256 KiB header: past the HTTP layer's 128 KiB bound on a request head, refused or cut off.
    let mut s = std::net::TcpStream::connect(&d.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(
        format!("GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(256 * 1024)).as_bytes(),
    );
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let head = String::from_utf8_lossy(&out);
    assert!(head.is_empty() || head.starts_with("HTTP/1.1 4"), "{head}");
    // 500 idle connections (headers never finished) and 40 control connections at once: the daemon still serves.
    let idle: Vec<_> = (0..500)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&d.addr).unwrap();
            let _ = s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n");
            s
        })
        .collect();
    let controls: Vec<_> = (0..40).map(|_| std::os::unix::net::UnixStream::connect(&d.socket).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let r = ctl_within(&d.socket, br#"{"cmd":"status"}"#, Duration::from_secs(10));
    assert!(
        r.as_ref().map(|v| v["error"].as_str().unwrap_or("").contains("too many control connections")).unwrap_or(true),
        "{r:?}"
    );
    drop(controls);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        ctl_within(&d.socket, br#"{"cmd":"status"}"#, Duration::from_secs(10)).unwrap()["ok"],
        true,
        "control is back once they closed"
    );
    let (st, text) = post(&chat("Describe the image.", Some(("image/png", &img)), json!({ "max_tokens": 8 })));
    assert_eq!(st, 200, "served with 500 idle connections open: {text}");
    drop(idle);
    // A control line of 100 KiB with no newline: refused, the connection closed.
    let r = ctl_within(&d.socket, &vec![b'x'; 100 * 1024], Duration::from_secs(10)).unwrap();
    assert!(r["error"].as_str().unwrap().contains("longer than"), "{r}");
    let hwm1 = d.mem_kib("VmHWM");
    println!("probe: VmHWM {hwm0} -> {hwm1} KiB");
    assert!(hwm1 < hwm0 + 150 * 1024, "peak memory grew by {} KiB", hwm1 - hwm0);
    assert!(d.alive(), "{}", d.log());
    assert_eq!(counts(&db.pool).await, before);
    case.done(d).await;
}
