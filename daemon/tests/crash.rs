//! Crash consistency of the loop: `rlaifd demo` is SIGKILLed at random moments (model loading, sampling, labeling,
//! training, checkpoint writing, evaluation), restarted each time, and the database and checkpoint files are
//! checked after every kill. Real PostgreSQL, the bundled model, tiny settings.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Invariants that must hold whenever the process is dead: nothing duplicated, nothing half-written.
async fn check(pool: &sqlx::PgPool, n: i64) {
    let q = |s: &str| sqlx::query_scalar::<_, i64>(s.to_string().leak()).fetch_one(pool);
    assert_eq!(q("SELECT count(*) FROM (SELECT 1 FROM responses GROUP BY prompt_id, checkpoint_id, seed HAVING count(*) > 1) d").await.unwrap(), 0, "duplicate responses");
    assert_eq!(
        q("SELECT count(*) FROM (SELECT 1 FROM pairs GROUP BY chosen_id, rejected_id HAVING count(*) > 1) d")
            .await
            .unwrap(),
        0,
        "duplicate pairs"
    );
    // A finished sample job stored all n answers (never a part of them).
    let partial = format!(
        "SELECT count(*) FROM jobs j JOIN iterations i ON i.id = j.iteration_id WHERE j.kind = 'sample' AND j.status = 'done'
           AND (SELECT count(*) FROM responses r WHERE r.prompt_id = j.prompt_id AND r.checkpoint_id = i.policy_id) <> {n}"
    );
    assert_eq!(q(&partial).await.unwrap(), 0, "a finished sample job without its {n} answers");
    // A finished label job scored every answer that has claims, and every pair's answers belong to its prompt.
    assert_eq!(q("SELECT count(*) FROM pairs p JOIN responses c ON c.id = p.chosen_id JOIN responses r ON r.id = p.rejected_id WHERE c.prompt_id <> p.prompt_id OR r.prompt_id <> p.prompt_id").await.unwrap(), 0);
    assert!(q("SELECT count(*) FROM checkpoints WHERE status = 'promoted'").await.unwrap() <= 1);
    // Every adapter checkpoint row points at complete files with the recorded hash.
    let rows: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT path, sha256 FROM checkpoints WHERE kind = 'lora'").fetch_all(pool).await.unwrap();
    for (path, sha) in rows {
        let got = rlaifd::rlaif::adapter_sha256(std::path::Path::new(&path))
            .unwrap_or_else(|e| panic!("checkpoint {path}: {e}"));
        assert_eq!(Some(got), sha, "checkpoint {path} does not match its recorded sha256");
        assert!(std::path::Path::new(&path).join("adapter_config.json").exists());
    }
    // Candidates exist only for iterations that reached evaluation.
    assert_eq!(
        q("SELECT count(*) FROM iterations WHERE candidate_id IS NOT NULL AND stage IN ('sampling', 'training')")
            .await
            .unwrap(),
        0
    );
}

/// Where a kill landed, read from what the dead process left: the open iteration's stage; within sampling, the
/// kinds of job it held leases on (a label job also builds the prompt's pairs with their reference log-probs); a
/// half-written checkpoint directory of its own (process `pid`) under `checkpoints`.
async fn landed(pool: &sqlx::PgPool, checkpoints: &std::path::Path, pid: u32) -> String {
    let open: Option<(i64, String)> = sqlx::query_as(
        "SELECT id, stage FROM iterations WHERE stage NOT IN ('done', 'failed') ORDER BY number LIMIT 1",
    )
    .fetch_optional(pool)
    .await
    .unwrap();
    let Some((id, stage)) = open else { return "between iterations".into() };
    let writing = std::fs::read_dir(checkpoints)
        .map(|r| r.flatten().any(|e| e.file_name().to_string_lossy().ends_with(&format!(".tmp-{pid}"))))
        .unwrap_or(false);
    if writing {
        return "checkpoint write".into();
    }
    if stage != "sampling" {
        return stage;
    }
    let kinds: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT kind FROM jobs WHERE iteration_id = $1 AND status = 'running' ORDER BY kind",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .unwrap();
    match kinds.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => "sampling stage, no job held".into(),
        ["sample"] => "sampling".into(),
        ["label"] => "labeling and pairing".into(),
        _ => "sampling and labeling".into(),
    }
}

/// Kills (counted by `landed`) hit the feedback stages and the training or evaluation after them.
fn assert_kills_reached_the_stages(hit: &std::collections::BTreeMap<String, usize>) {
    let feedback = hit.keys().any(|k| k.contains("sampling") || k.contains("labeling"));
    assert!(
        feedback && ["training", "checkpoint write", "evaluating"].iter().any(|k| hit.contains_key(*k)),
        "kills missed the loop's stages: {hit:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_loop_at_random_moments_loses_and_duplicates_nothing() {
    let db = common::fresh("crash").await;
    let state = std::env::temp_dir().join(format!("rlaifd-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let model = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/shapes-base");
    let args: Vec<String> = [
        "demo",
        "--iterations",
        "6",
        "--prompts-per-iteration",
        "12",
        "--eval-count",
        "4",
        "--set",
        "n=4",
        "--set",
        "max_new_tokens=24",
        "--set",
        "batch_size=2",
        "--set",
        "epochs=2",
        "--set",
        "promote_margin=0.0",
        "--set",
        "max_cover_drop=1.0",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--state-dir".into(),
        state.display().to_string(),
        "--database-url".into(),
        db.url.clone(),
        "--model".into(),
        model.display().to_string(),
    ])
    .collect();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut kills = 0;
    let mut hit: std::collections::BTreeMap<String, usize> = Default::default();
    let t0 = Instant::now();
    for _ in 0..80 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let delay = Duration::from_millis(20 + rng % 700);
        let log = state.with_extension("stderr");
        let mut child = Command::new(env!("CARGO_BIN_EXE_rlaifd"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let pid = child.id();
        let start = Instant::now();
        let finished = loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "the demo failed on its own (after {kills} kills): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                break true;
            }
            if start.elapsed() >= delay {
                child.kill().unwrap();
                child.wait().unwrap();
                kills += 1;
                break false;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        check(&db.pool, 4).await;
        if finished {
            break;
        }
        *hit.entry(landed(&db.pool, &state.join("checkpoints"), pid).await).or_insert(0) += 1;
    }
    // Let it finish.
    let out = Command::new(env!("CARGO_BIN_EXE_rlaifd")).args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    check(&db.pool, 4).await;
    let done: i64 =
        sqlx::query_scalar("SELECT count(*) FROM iterations WHERE stage = 'done'").fetch_one(&db.pool).await.unwrap();
    assert_eq!(done, 6, "the loop made progress to the requested iterations");
    let promoted: i64 = sqlx::query_scalar("SELECT count(*) FROM checkpoints WHERE status = 'promoted'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(promoted, 1);
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(summary["iterations"], 6);
    println!("{kills} kills survived in {:.1} s; where they landed: {hit:?}", t0.elapsed().as_secs_f64());
    assert!(kills >= 10, "only {kills} kills landed; the schedule is too slow for this machine");
    assert_kills_reached_the_stages(&hit);
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(&state);
}

/// SIGTERM mid-iteration (as `systemctl stop` or a terminal's Ctrl-C sends): the demo finishes the work in hand,
/// says how to resume and exits 1, without a panic (dropping the actor system outside its runtime used to abort
/// the process), and the database holds the invariants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_demo_with_a_message_not_a_panic() {
    let db = common::fresh("sigterm").await;
    let state = std::env::temp_dir().join(format!("rlaifd-sigterm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let model = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/shapes-base");
    let log = state.with_extension("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rlaifd"))
        .args([
            "demo",
            "--iterations",
            "1",
            "--prompts-per-iteration",
            "400",
            "--eval-count",
            "4",
            "--set",
            "n=4",
            "--set",
            "max_new_tokens=24",
        ])
        .arg("--state-dir")
        .arg(&state)
        .arg("--database-url")
        .arg(&db.url)
        .arg("--model")
        .arg(&model)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Wait until sampling has stored answers, so the stop lands mid-iteration with actors busy.
    let t0 = Instant::now();
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM responses").fetch_one(&db.pool).await.unwrap_or(0);
        if n > 0 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the demo ended before sampling: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(t0.elapsed() < Duration::from_secs(120), "no answer stored after 120 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let st = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    let status = child.wait().unwrap();
    let err = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!err.contains("panicked"), "the demo panicked on SIGTERM:\n{err}");
    assert_eq!(status.code(), Some(1), "exit status {status:?} after SIGTERM:\n{err}");
    assert!(err.contains("the demo stopped early (SIGTERM); run it again to resume"), "{err}");
    check(&db.pool, 4).await;
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(&state);
    let _ = std::fs::remove_file(&log);
}

/// Writes a daemon configuration for `db_url` under `dir` ([daemon] and [loop] keys given) and returns its path.
fn daemon_config(dir: &std::path::Path, db_url: &str, daemon: &str, loop_: &str) -> std::path::PathBuf {
    let model = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/shapes-base");
    let config = dir.join("rlaifd.toml");
    let text = format!(
        "[database]\nurl = \"{db_url}\"\n[model]\npath = \"{}\"\n[state]\ndir = \"{}\"\n[server]\nbind = \"127.0.0.1:0\"\n[daemon]\n{daemon}[loop]\n{loop_}",
        model.display(),
        dir.join("state").display()
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// The checkpoint a running daemon serves (GET /healthz).
fn served_checkpoint(addr: &str) -> i64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1;
    let v: serde_json::Value = serde_json::from_str(&body[body.find('{').unwrap()..=body.rfind('}').unwrap()]).unwrap();
    v["checkpoint"].as_i64().unwrap()
}

/// The daemon itself (`rlaifd serve`, iterating on its own) SIGKILLed at random moments and restarted: the same
/// invariants after every kill, the restarted daemon serves exactly the promoted checkpoint, and the loop reaches
/// its iteration target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_daemon_at_random_moments_loses_nothing_and_it_serves_the_promoted_checkpoint() {
    let db = common::fresh("crashd").await;
    let dir = std::env::temp_dir().join(format!("rlaifd-crashd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = daemon_config(&dir, &db.url, "auto_iterate = true\nmax_iterations = 8\npoll_s = 0.2\n", "n = 4\nmax_new_tokens = 32\nprompts_per_iteration = 150\npairs_per_iteration = 1\neval_count = 40\nepochs = 2\nbatch_size = 2\npromote_margin = 0.0\nmax_cover_drop = 1.0\n");
    let addr_file = dir.join("state/server.addr");
    let start = || {
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
        Killed(
            Command::new(env!("CARGO_BIN_EXE_rlaifd"))
                .args(["serve", "--config"])
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    };
    let wait_up = |child: &mut Killed| -> String {
        let up = Instant::now();
        while !addr_file.exists() {
            assert!(
                child.0.try_wait().unwrap().is_none(),
                "the daemon died on its own: {}",
                std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
            );
            assert!(up.elapsed() < Duration::from_secs(60), "the daemon did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(20));
        std::fs::read_to_string(&addr_file).unwrap().trim().to_string()
    };
    let served = served_checkpoint;
    let promoted = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT id FROM checkpoints WHERE status = 'promoted'")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let (mut kills, mut checked_serving) = (0, 0);
    let mut hit: std::collections::BTreeMap<String, usize> = Default::default();
    let t0 = Instant::now();
    for _ in 0..30 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let mut child = start();
        // Up: the served checkpoint is the promoted one.
        let addr = wait_up(&mut child);
        let (s, p) = (served(&addr), promoted(db.pool.clone()).await);
        // A promotion may land between the two reads; the checkpointer hot-swaps it within a poll.
        if s == p {
            checked_serving += 1;
        }
        std::thread::sleep(Duration::from_millis(100 + rng % 3000));
        let pid = child.0.id();
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        kills += 1;
        check(&db.pool, 4).await;
        *hit.entry(landed(&db.pool, &dir.join("state/checkpoints"), pid).await).or_insert(0) += 1;
    }
    // Let it reach its target, then stop it with SIGTERM: a clean exit.
    let mut child = start();
    let addr = wait_up(&mut child);
    let up = Instant::now();
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM iterations WHERE stage = 'done'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if done >= 8 {
            break;
        }
        assert!(
            up.elapsed() < Duration::from_secs(400),
            "no progress: {}",
            std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let p = promoted(db.pool.clone()).await;
    let t = Instant::now();
    while served(&addr) != p {
        assert!(t.elapsed() < Duration::from_secs(30), "the daemon does not serve the promoted checkpoint {p}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(Command::new("kill").arg("-TERM").arg(child.0.id().to_string()).status().unwrap().success());
    let status = child.0.wait().unwrap();
    assert!(status.success(), "SIGTERM: exit {status}");
    check(&db.pool, 4).await;
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM iterations WHERE stage NOT IN ('done', 'failed')")
            .fetch_one(&db.pool)
            .await
            .unwrap(),
        0,
        "max_iterations = 8: no ninth iteration"
    );
    println!("{kills} daemon kills survived in {:.1} s ({checked_serving} restarts checked serving the promoted checkpoint); where they landed: {hit:?}", t0.elapsed().as_secs_f64());
    assert!(kills >= 30, "only {kills} kills");
    assert_kills_reached_the_stages(&hit);
    assert!(checked_serving >= kills / 2, "restarts did not serve the promoted checkpoint");
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A child process killed when dropped (a failed assertion must not leave a daemon running).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Crashes placed exactly where they hurt most (failpoints abort the process): inside a sample job's and a label
/// job's transaction (answers, or claims, scores and pairs inserted, not committed), in the middle of writing a
/// checkpoint's files, after a checkpoint directory is written but before its row exists, after a promotion commits
/// but before the hot-swap, and while hot-swapping.
/// After each, the invariants hold, the restarted daemon serves the promoted checkpoint and the loop goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_at_job_commits_checkpoint_write_promotion_and_hot_swap_leave_a_consistent_state() {
    let db = common::fresh("failpt").await;
    let dir = std::env::temp_dir().join(format!("rlaifd-failpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = daemon_config(&dir, &db.url, "auto_iterate = true\npoll_s = 0.2\n", "n = 4\nmax_new_tokens = 24\nprompts_per_iteration = 30\npairs_per_iteration = 1\neval_count = 10\nepochs = 1\nbatch_size = 2\npromote_margin = -1.0\nmax_cover_drop = 1.0\n");
    let addr_file = dir.join("state/server.addr");
    let start = |failpoint: &str| {
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::File::create(dir.join(format!("daemon-{failpoint}.log"))).unwrap();
        Killed(
            Command::new(env!("CARGO_BIN_EXE_rlaifd"))
                .args(["serve", "--config"])
                .arg(&config)
                .env("RLAIFD_FAILPOINTS", failpoint)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    };
    let healthz = served_checkpoint;
    let done = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM iterations WHERE stage = 'done'")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    for fp in ["sample_tx", "label_tx", "adapter_save", "train_saved", "decided", "hot_swap"] {
        // Armed: the daemon runs until it reaches the point and aborts there.
        let mut child = start(fp);
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = child.0.try_wait().unwrap() {
                break s;
            }
            assert!(t0.elapsed() < Duration::from_secs(180), "failpoint {fp} was never reached");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(!status.success(), "{fp}: the daemon aborted");
        let log = std::fs::read_to_string(dir.join(format!("daemon-{fp}.log"))).unwrap();
        assert!(log.contains(&format!("failpoint {fp} reached")), "{fp}: {log}");
        check(&db.pool, 4).await;
        if let Some(kind) = fp.strip_suffix("_tx") {
            // The abort came inside the job's transaction: PostgreSQL rolled it back, so the job the dead process
            // held is still open and nothing of its result is stored.
            let open: Vec<(i64, i64)> = sqlx::query_as("SELECT j.prompt_id, i.policy_id FROM jobs j JOIN iterations i ON i.id = j.iteration_id WHERE j.kind = $1 AND j.status = 'running'").bind(kind).fetch_all(&db.pool).await.unwrap();
            assert!(!open.is_empty(), "{fp}: no {kind} job was in flight");
            for (prompt, policy) in open {
                let stored: i64 = if kind == "sample" {
                    sqlx::query_scalar("SELECT count(*) FROM responses WHERE prompt_id = $1 AND checkpoint_id = $2")
                        .bind(prompt)
                        .bind(policy)
                        .fetch_one(&db.pool)
                        .await
                        .unwrap()
                } else {
                    sqlx::query_scalar("SELECT (SELECT count(*) FROM claims c JOIN responses r ON r.id = c.response_id WHERE r.prompt_id = $1 AND r.checkpoint_id = $2) + (SELECT count(*) FROM pairs p JOIN responses c ON c.id = p.chosen_id WHERE p.prompt_id = $1 AND c.checkpoint_id = $2) + (SELECT count(*) FROM responses WHERE prompt_id = $1 AND checkpoint_id = $2 AND score IS NOT NULL)")
                        .bind(prompt)
                        .bind(policy)
                        .fetch_one(&db.pool)
                        .await
                        .unwrap()
                };
                assert_eq!(stored, 0, "{fp}: prompt {prompt}'s uncommitted {kind} result is visible");
            }
        }
        if fp == "adapter_save" {
            // The abort came mid-write: a temporary directory with the config but not the weights, which no row
            // names (check() above verified every row's files).
            let tmp: Vec<std::path::PathBuf> = std::fs::read_dir(dir.join("state/checkpoints"))
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().contains(".tmp-"))
                .collect();
            assert!(
                tmp.len() == 1
                    && tmp[0].join("adapter_config.json").exists()
                    && !tmp[0].join("adapter_model.safetensors").exists(),
                "adapter_save: {tmp:?}"
            );
        }
        let before = done(db.pool.clone()).await;
        // Disarmed: the restarted daemon serves the promoted checkpoint and finishes another iteration.
        let mut child = start("none");
        let t0 = Instant::now();
        while !addr_file.exists() {
            assert!(
                child.0.try_wait().unwrap().is_none() && t0.elapsed() < Duration::from_secs(60),
                "restart after {fp} failed"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(20));
        let addr = std::fs::read_to_string(&addr_file).unwrap().trim().to_string();
        loop {
            let d = done(db.pool.clone()).await;
            let p: i64 = sqlx::query_scalar("SELECT id FROM checkpoints WHERE status = 'promoted'")
                .fetch_one(&db.pool)
                .await
                .unwrap();
            if d > before && healthz(&addr) == p {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(180), "no progress after the {fp} crash");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(Command::new("kill").arg("-TERM").arg(child.0.id().to_string()).status().unwrap().success());
        assert!(child.0.wait().unwrap().success(), "{fp}: clean SIGTERM after recovery");
        check(&db.pool, 4).await;
        // No half-written checkpoint directory is left behind (the retried save removes the dead process's).
        let leftovers: Vec<String> = std::fs::read_dir(dir.join("state/checkpoints"))
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains(".tmp-"))
                    .collect()
            })
            .unwrap_or_default();
        assert!(leftovers.is_empty(), "{fp}: temporary checkpoint directories left: {leftovers:?}");
        println!("failpoint {fp}: aborted there, recovered, {} iterations done", done(db.pool.clone()).await);
    }
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(&dir);
}
