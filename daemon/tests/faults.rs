//! Faults injected into a running `rlaifd serve`: PostgreSQL stopped mid-iteration for 13 s (a private cluster this
//! test owns) and restarted — the daemon keeps serving, its actors retry with backoff, nothing is lost or duplicated and
//! the loop finishes; a training run that diverges (NaN) is rejected and logged, and the loop continues after
//! `reload-config`; a checkpoint that cannot be written is discarded with the promoted one untouched; a corrupted
//! adapter file is refused at load and never served.

mod common;

use common::pg::Cluster;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/shapes-base")
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &Path, db_url: &str, extra_loop: &str) -> (Proc, String, PathBuf) {
    let config = dir.join("rlaifd.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{db_url}\"\n[model]\npath = \"{}\"\n[state]\ndir = \"{}\"\n[server]\nbind = \"127.0.0.1:0\"\n[daemon]\nauto_iterate = true\nmax_iterations = 3\npoll_s = 0.2\n\
             [loop]\nn = 4\nmax_new_tokens = 32\nprompts_per_iteration = 150\npairs_per_iteration = 1\neval_count = 20\nepochs = 1\nbatch_size = 2\npromote_margin = -1.0\nmax_cover_drop = 1.0\n{extra_loop}",
            model().display(),
            dir.join("state").display()
        ),
    )
    .unwrap();
    let addr_file = dir.join("state/server.addr");
    let _ = std::fs::remove_file(&addr_file);
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    let mut p = Proc(
        Command::new(env!("CARGO_BIN_EXE_rlaifd"))
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while !addr_file.exists() || !dir.join("state/control.sock").exists() {
        assert!(
            p.0.try_wait().unwrap().is_none(),
            "the daemon exited: {}",
            std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
        );
        assert!(t0.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(30));
    }
    std::thread::sleep(Duration::from_millis(30));
    (p, std::fs::read_to_string(&addr_file).unwrap().trim().to_string(), dir.join("state/control.sock"))
}

fn chat(addr: &str) -> u16 {
    let body =
        json!({ "messages": [{ "role": "user", "content": "Describe the image." }], "max_tokens": 8, "seed": 1 })
            .to_string();
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return 0 };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = s.write_all(format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

fn ctl(socket: &Path, cmd: Value) -> Value {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

fn term(mut p: Proc) -> std::process::ExitStatus {
    Command::new("kill").arg("-TERM").arg(p.0.id().to_string()).status().unwrap();
    let t0 = Instant::now();
    loop {
        if let Some(s) = p.0.try_wait().unwrap() {
            return s;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "SIGTERM did not stop the daemon");
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn no_duplicates(pool: &sqlx::PgPool) {
    let q = |s: &'static str| sqlx::query_scalar::<_, i64>(s).fetch_one(pool);
    assert_eq!(q("SELECT count(*) FROM (SELECT 1 FROM responses GROUP BY prompt_id, checkpoint_id, seed HAVING count(*) > 1) d").await.unwrap(), 0);
    assert_eq!(
        q("SELECT count(*) FROM (SELECT 1 FROM pairs GROUP BY chosen_id, rejected_id HAVING count(*) > 1) d")
            .await
            .unwrap(),
        0
    );
    assert_eq!(q("SELECT count(*) FROM checkpoints WHERE status = 'promoted'").await.unwrap(), 1);
    // A finished sample job stored all 4 answers.
    assert_eq!(
        q("SELECT count(*) FROM jobs j JOIN iterations i ON i.id = j.iteration_id WHERE j.kind = 'sample' AND j.status = 'done'
             AND (SELECT count(*) FROM responses r WHERE r.prompt_id = j.prompt_id AND r.checkpoint_id = i.policy_id) <> 4")
        .await
        .unwrap(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_mid_run_loses_nothing_and_serving_continues() {
    let dir = std::env::temp_dir().join(format!("rlaifd-pgfault-{}", std::process::id()));
    let port = 20000 + (std::process::id() % 20000) as u16;
    let Ok(cluster) =
        Cluster::started(dir.join("pg"), port).map_err(|why| println!("SKIPPED: no private PostgreSQL cluster: {why}"))
    else {
        return;
    };
    let url = format!("postgres://postgres@127.0.0.1:{port}/rlaifd");
    let (daemon, addr, socket) = start(&dir, &url, "");
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    // Wait until the first iteration is sampling, then take the database away.
    let t0 = Instant::now();
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM responses").fetch_one(&pool).await.unwrap();
        if n > 0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no sampling started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pool.close().await;
    cluster.ctl("stop");
    let outage = Instant::now();
    let mut served = Vec::new();
    // Longer than the pool's 10 s acquire timeout: the actors' queries fail and the supervisor restarts them.
    // RLAIFD_OUTAGE_S (default 13) lengthens it, e.g. past the supervisor's 60 s maximum backoff.
    let outage_s: u64 = std::env::var("RLAIFD_OUTAGE_S").ok().and_then(|v| v.parse().ok()).unwrap_or(13);
    while outage.elapsed() < Duration::from_secs(outage_s) {
        served.push(chat(&addr));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(served.iter().all(|&c| c == 200), "requests during the outage: {served:?}");
    cluster.ctl("start");
    let back = Instant::now();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let t0 = Instant::now();
    loop {
        let done: i64 =
            sqlx::query_scalar("SELECT count(*) FROM iterations WHERE stage = 'done'").fetch_one(&pool).await.unwrap();
        if done >= 3 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "the loop did not resume: {}",
            std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let resumed = back.elapsed().as_secs_f64();
    no_duplicates(&pool).await;
    let failures: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE kind = 'actor_failed'")
        .fetch_one(&pool)
        .await
        .unwrap_or(0);
    let s = ctl(&socket, json!({ "cmd": "status" }));
    let restarts: u64 = s["actors"].as_object().unwrap().values().map(|a| a["restarts"].as_u64().unwrap()).sum();
    println!("{} requests served during a {outage_s} s outage; {restarts} actor restarts ({failures} logged after the outage); 3 iterations done {resumed:.0} s after the database came back", served.len());
    assert!(restarts >= 1, "the actors noticed the outage: {s}");
    let promoted: i64 =
        sqlx::query_scalar("SELECT id FROM checkpoints WHERE status = 'promoted'").fetch_one(&pool).await.unwrap();
    assert_eq!(s["current"]["checkpoint"].as_i64(), Some(promoted), "serves the promoted checkpoint");
    pool.close().await;
    assert!(term(daemon).success());
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diverged_training_unwritable_checkpoints_and_corrupt_adapters_are_refused() {
    let db = common::fresh("faults").await;
    let pool = &db.pool;
    let dir = std::env::temp_dir().join(format!("rlaifd-faults-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("state/checkpoints")).unwrap();
    // 1. Diverging training (absurd learning rate): the candidate is discarded, the iteration marked failed and
    //    logged; serving is untouched. max_iterations 3 counts finished iterations only, so the loop retries.
    let (daemon, addr, socket) = start(&dir, &db.url, "lr = 1e30\n");
    let t0 = Instant::now();
    let failed = loop {
        let f: Option<String> =
            sqlx::query_scalar("SELECT detail->>'reason' FROM events WHERE kind = 'iteration_failed' LIMIT 1")
                .fetch_optional(pool)
                .await
                .unwrap();
        if let Some(f) = f {
            break f;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no failure logged: {}",
            std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(failed.contains("NaN") || failed.contains("non-finite"), "{failed}");
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM checkpoints WHERE kind = 'lora'")
            .fetch_one(pool)
            .await
            .unwrap(),
        0,
        "no candidate row"
    );
    assert_eq!(chat(&addr), 200);
    // Back to a sane learning rate without a restart; wait until no training is running.
    ctl(&socket, json!({ "cmd": "pause" }));
    let t0 = Instant::now();
    loop {
        let training: i64 =
            sqlx::query_scalar("SELECT count(*) FROM iterations WHERE stage IN ('training', 'evaluating')")
                .fetch_one(pool)
                .await
                .unwrap();
        if training == 0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(120));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cfg = dir.join("rlaifd.toml");
    std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap().replace("lr = 1e30\n", "lr = 2e-4\n")).unwrap();
    assert_eq!(ctl(&socket, json!({ "cmd": "reload-config" }))["ok"], true);
    // 2. The next checkpoint cannot be written (its directory name is taken by a file): discarded, logged.
    let open: Option<i32> = sqlx::query_scalar("SELECT number FROM iterations WHERE stage NOT IN ('done', 'failed')")
        .fetch_optional(pool)
        .await
        .unwrap();
    let next = match open {
        Some(n) => n,
        None => sqlx::query_scalar::<_, i32>("SELECT COALESCE(max(number), 0) + 1 FROM iterations")
            .fetch_one(pool)
            .await
            .unwrap(),
    };
    let blocker = dir.join(format!("state/checkpoints/iter-{next:04}"));
    std::fs::write(&blocker, b"not a directory").unwrap();
    ctl(&socket, json!({ "cmd": "resume" }));
    let t0 = Instant::now();
    let reason = loop {
        let r: Option<String> = sqlx::query_scalar(
            "SELECT detail->>'reason' FROM events WHERE kind = 'iteration_failed' AND (detail->>'iteration')::int = $1",
        )
        .bind(next)
        .fetch_optional(pool)
        .await
        .unwrap();
        if let Some(r) = r {
            break r;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the unwritable checkpoint did not fail iteration {next}: {}",
            std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(reason.contains(&format!("iter-{next:04}")), "failed for another reason: {reason}");
    assert_eq!(std::fs::read(&blocker).unwrap(), b"not a directory", "the blocker is untouched");
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM checkpoints WHERE kind = 'lora'")
            .fetch_one(pool)
            .await
            .unwrap(),
        0,
        "no candidate row"
    );
    std::fs::remove_file(&blocker).unwrap();
    // 3. The loop continues: an iteration finishes and its candidate is promoted and served.
    let t0 = Instant::now();
    let cand = loop {
        let c: Option<i64> =
            sqlx::query_scalar("SELECT id FROM checkpoints WHERE kind = 'lora' AND status = 'promoted'")
                .fetch_optional(pool)
                .await
                .unwrap();
        if let Some(c) = c {
            break c;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "no promotion after the faults: {}",
            std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    ctl(&socket, json!({ "cmd": "pause" }));
    let t0 = Instant::now();
    while ctl(&socket, json!({ "cmd": "status" }))["current"]["checkpoint"].as_i64() != Some(cand) {
        assert!(t0.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(100));
    }
    // 4. A corrupted adapter file, here and in the database: promoting it is refused, nothing changes, the served
    //    checkpoint stays. (Damaged here only, the database's checked copy would serve.)
    let base: i64 = sqlx::query_scalar("SELECT id FROM checkpoints WHERE kind = 'base'").fetch_one(pool).await.unwrap();
    assert_eq!(ctl(&socket, json!({ "cmd": "rollback" }))["promoted"].as_i64(), Some(base));
    let path: String =
        sqlx::query_scalar("SELECT path FROM checkpoints WHERE id = $1").bind(cand).fetch_one(pool).await.unwrap();
    let f = Path::new(&path).join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0xff;
    std::fs::write(&f, &bytes).unwrap();
    sqlx::query("UPDATE blobs SET bytes = $2 WHERE sha256 = (SELECT sha256 FROM checkpoint_files WHERE checkpoint_id = $1 AND name = 'adapter_model.safetensors')")
        .bind(cand)
        .bind(&bytes)
        .execute(pool)
        .await
        .unwrap();
    let before: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, status FROM checkpoints ORDER BY id").fetch_all(pool).await.unwrap();
    let r = ctl(&socket, json!({ "cmd": "promote", "id": cand }));
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("sha256"), "{r}");
    let after: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, status FROM checkpoints ORDER BY id").fetch_all(pool).await.unwrap();
    assert_eq!(before, after, "a refused promotion changes nothing");
    assert_eq!(ctl(&socket, json!({ "cmd": "status" }))["current"]["checkpoint"].as_i64(), Some(base));
    assert_eq!(chat(&addr), 200);
    no_duplicates(pool).await;
    assert!(term(daemon).success());
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Unmounts (lazily) a test's tmpfs when dropped, whatever way the test ends.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A full disk under the checkpoints (a 64 KiB tmpfs: an adapter's config fits, its weights do not): the candidate
/// is discarded with the error logged, nothing half-written stays, the base keeps serving; once space returns the
/// loop trains, promotes and serves a checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_discards_the_candidate_and_the_loop_continues_when_space_returns() {
    let dir = std::env::temp_dir().join(format!("rlaifd-diskfull-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ckpt = dir.join("state/checkpoints");
    std::fs::create_dir_all(&ckpt).unwrap();
    match Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&ckpt)
        .stderr(Stdio::piped())
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            println!(
                "SKIPPED: cannot mount a small tmpfs to fill (needs root): {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return;
        }
        Err(e) => {
            println!("SKIPPED: no mount command: {e}");
            return;
        }
    }
    let mounted = Mounted(ckpt.clone());
    let db = common::fresh("diskfull").await;
    let pool = &db.pool;
    let (daemon, addr, socket) = start(&dir, &db.url, "");
    let t0 = Instant::now();
    let reason = loop {
        let r: Option<String> =
            sqlx::query_scalar("SELECT detail->>'reason' FROM events WHERE kind = 'iteration_failed' LIMIT 1")
                .fetch_optional(pool)
                .await
                .unwrap();
        if let Some(r) = r {
            break r;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the full disk did not fail an iteration: {}",
            std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(reason.contains("cannot write") && reason.contains("No space left"), "failed for another reason: {reason}");
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM checkpoints WHERE kind = 'lora'")
            .fetch_one(pool)
            .await
            .unwrap(),
        0,
        "no candidate row"
    );
    let base: i64 = sqlx::query_scalar("SELECT id FROM checkpoints WHERE kind = 'base'").fetch_one(pool).await.unwrap();
    assert_eq!(
        ctl(&socket, json!({ "cmd": "status" }))["current"]["checkpoint"].as_i64(),
        Some(base),
        "still serving the base"
    );
    assert_eq!(chat(&addr), 200);
    let left: Vec<String> =
        std::fs::read_dir(&ckpt).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(left.is_empty(), "the failed save left {left:?}");
    // Space returns: the loop goes on by itself.
    assert!(Command::new("mount").args(["-o", "remount,size=256m"]).arg(&ckpt).status().unwrap().success());
    let t0 = Instant::now();
    let cand = loop {
        let c: Option<i64> =
            sqlx::query_scalar("SELECT id FROM checkpoints WHERE kind = 'lora' AND status = 'promoted'")
                .fetch_optional(pool)
                .await
                .unwrap();
        if let Some(c) = c {
            break c;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "no promotion once space returned: {}",
            std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    ctl(&socket, json!({ "cmd": "pause" }));
    let t0 = Instant::now();
    while ctl(&socket, json!({ "cmd": "status" }))["current"]["checkpoint"].as_i64() != Some(cand) {
        assert!(t0.elapsed() < Duration::from_secs(30), "the promoted checkpoint is not served");
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("disk full: iteration failed ({reason}); after space returned checkpoint {cand} was promoted and served");
    no_duplicates(pool).await;
    assert!(term(daemon).success());
    db.drop_db().await;
    drop(mounted);
    let _ = std::fs::remove_dir_all(&dir);
}
