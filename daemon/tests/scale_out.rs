//! Many daemons, one database, no shared files: real `rlaifd serve` processes, each with its state directory on a
//! tmpfs in a mount namespace of its own (as if each ran on another host), cooperate on one PostgreSQL.
//!
//! - Three daemons run an iteration: its sample and label jobs split across them, one trains and one gates. The
//!   trainer is SIGKILLed mid-training (it stalls after its first saved state); another takes the train job over
//!   once the lease lapses and resumes from the state saved in the database. The iteration's answers, pairs and
//!   adapter are byte-identical to a single daemon's run of the same iteration.
//! - Every daemon then serves the promoted checkpoint, fetched from the database; the killed one restarted with an
//!   empty state directory, and a fourth (serve role only) started later, too. While the database's copy is damaged
//!   the fourth keeps serving what it has and the checkpoint stays promoted; repaired, it swaps it in.
//! - PostgreSQL restarted mid-iteration under two daemons: nothing is lost or duplicated and the iteration finishes.
//! - One daemon drives two engines (two CPU threads here; on cuemu, two emulated GPUs that also train the iteration
//!   data-parallel over NCCL's stand-in: `scripts/emu-check` runs the `*on_the_gpu` test).

mod common;

use common::daemon::{model, Daemon};
use common::pg::Cluster;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// A daemon's configuration: private state under `dir`, the control socket beside it, small loop settings with
/// a state saved to the database after every training step and short leases (a dead trainer's job is taken
/// over within seconds).
fn config(dir: &Path, db_url: &str, roles: &str, prompts: usize) -> String {
    format!(
        "[database]\nurl = \"{db_url}\"\nmax_connections = 4\n[model]\npath = \"{}\"\n[state]\ndir = \"{}\"\n\
         [server]\nbind = \"127.0.0.1:0\"\nmax_body_bytes = 65536\nmax_image_side = 256\n[control]\nsocket = \"{}\"\n\
         [daemon]\nauto_iterate = false\npoll_s = 0.2\nroles = [{roles}]\n\
         [loop]\nn = 4\nmax_new_tokens = 24\nprompts_per_iteration = {prompts}\npairs_per_iteration = 1\neval_count = 4\nepochs = 2\nbatch_size = 2\n\
         promote_margin = -1.0\nmax_cover_drop = 1.0\nlease_s = 5.0\nsave_every = 1\n",
        model().display(),
        dir.join("state").display(),
        dir.join("control.sock").display()
    )
}

const ALL: &str = "\"serve\", \"sample\", \"label\", \"train\", \"gate\"";

fn start(dir: &Path, db_url: &str, roles: &str, env: &[(&str, &str)]) -> Result<Daemon, String> {
    start_with(dir, db_url, roles, 6, env)
}

fn start_with(dir: &Path, db_url: &str, roles: &str, prompts: usize, env: &[(&str, &str)]) -> Result<Daemon, String> {
    let _ = std::fs::remove_dir_all(dir);
    Daemon::launch_private(dir, &config(dir, db_url, roles, prompts), env)
}

async fn scalar(pool: &sqlx::PgPool, q: &str) -> i64 {
    sqlx::query_scalar(q).fetch_one(pool).await.unwrap_or_else(|e| panic!("{q}: {e}"))
}

/// Polls `q` (a bigint query) until it is at least `want`; panics with the daemons' logs after `secs`.
async fn wait_for(pool: &sqlx::PgPool, q: &str, want: i64, secs: u64, logs: &[&Daemon]) {
    let t0 = Instant::now();
    loop {
        if sqlx::query_scalar::<_, i64>(q).fetch_one(pool).await.is_ok_and(|n| n >= want) {
            return;
        }
        if t0.elapsed() > Duration::from_secs(secs) {
            let all: Vec<String> = logs.iter().map(|d| format!("--- {}\n{}", d.dir.display(), d.log())).collect();
            panic!("waited {secs} s for `{q}` >= {want}:\n{}", all.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The checkpoint a daemon serves, from `GET /v1/models`.
fn served(d: &Daemon) -> i64 {
    let (status, body) = d.http("GET", "/v1/models", "application/json", b"");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["data"][0]["checkpoint"].as_i64().unwrap_or_else(|| panic!("{body}"))
}

fn wait_served(d: &Daemon, id: i64, secs: u64) {
    let t0 = Instant::now();
    while served(d) != id {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "{} does not serve checkpoint {id}: {}",
            d.dir.display(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What must not depend on how many workers ran the iteration: its answers, its pairs (with their reference
/// log-probs) and the trained adapter's sha256.
async fn outcome(pool: &sqlx::PgPool) -> (Vec<(i64, i64, String)>, Vec<(i64, i64, i64, f64, f64)>, Vec<String>) {
    let answers = sqlx::query_as("SELECT prompt_id, seed, text FROM responses ORDER BY prompt_id, seed")
        .fetch_all(pool)
        .await
        .unwrap();
    let pairs = sqlx::query_as(
        "SELECT p.prompt_id, c.seed, r.seed, p.ref_logp_chosen, p.ref_logp_rejected FROM pairs p
         JOIN responses c ON c.id = p.chosen_id JOIN responses r ON r.id = p.rejected_id ORDER BY 1, 2, 3",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let adapters = sqlx::query_scalar("SELECT sha256 FROM checkpoints WHERE kind = 'lora' ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap();
    (answers, pairs, adapters)
}

fn private_namespaces() -> Result<(), String> {
    match std::process::Command::new("unshare").args(["--mount", "true"]).status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("unshare --mount exited with {s} (needs root or user namespaces)")),
        Err(e) => Err(format!("no unshare command: {e}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_share_an_iteration_survive_the_trainer_dying_and_all_serve_the_result() {
    if let Err(why) = private_namespaces() {
        println!("SKIPPED: no private mount namespaces: {why}");
        return;
    }
    let root = std::env::temp_dir().join(format!("rlaifd-scale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);

    // The reference: one daemon runs iteration 1 alone.
    let solo_db = common::fresh("scale_solo").await;
    let solo = start(&root.join("solo"), &solo_db.url, ALL, &[]).unwrap();
    assert_eq!(solo.ctl(json!({ "cmd": "iterate" }))["ok"], true);
    wait_for(&solo_db.pool, "SELECT count(*) FROM iterations WHERE stage = 'done'", 1, 300, &[&solo]).await;
    let reference = outcome(&solo_db.pool).await;
    drop(solo);
    solo_db.drop_db().await;
    assert_eq!(reference.2.len(), 1, "one candidate");

    // Three daemons on one database. The first to train stalls after its first saved state (failpoint), as a
    // trainer that is about to be killed.
    let db = common::fresh("scale").await;
    let pool = &db.pool;
    let stall = [("RLAIFD_FAILPOINTS", "train_chunk_saved")];
    let mut daemons: Vec<Daemon> =
        ["a", "b", "c"].iter().map(|n| start(&root.join(n), &db.url, ALL, &stall).unwrap()).collect();
    assert_eq!(daemons[0].ctl(json!({ "cmd": "iterate" }))["ok"], true);
    wait_for(pool, "SELECT count(*) FROM training_state", 1, 300, &daemons.iter().collect::<Vec<_>>()).await;
    let owner: String = sqlx::query_scalar("SELECT lease_owner FROM jobs WHERE kind = 'train' AND status = 'running'")
        .fetch_one(pool)
        .await
        .unwrap();
    let k = daemons
        .iter()
        .position(|d| owner.ends_with(&d.dir.join("state").display().to_string()))
        .unwrap_or_else(|| panic!("the train job's owner {owner} is none of the daemons"));
    let killed_pid = daemons[k].pid();
    daemons[k].child.kill().unwrap();
    daemons[k].child.wait().unwrap();
    let killed_at = Instant::now();
    let survivors: Vec<&Daemon> = daemons.iter().enumerate().filter(|(i, _)| *i != k).map(|(_, d)| d).collect();
    wait_for(pool, "SELECT count(*) FROM iterations WHERE stage = 'done'", 1, 300, &survivors).await;
    let split: Vec<(String, i64)> = sqlx::query_as(
        "SELECT worker, count(*) FROM jobs WHERE kind IN ('sample', 'label') AND status = 'done' GROUP BY worker ORDER BY worker",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    println!(
        "killed the trainer (pid {killed_pid}); the iteration was done {:.1} s later; sample+label jobs per worker: {split:?}",
        killed_at.elapsed().as_secs_f64()
    );
    // The work split across the daemons; one trainer finished (the second attempt, resumed), one gate decided.
    let workers =
        scalar(pool, "SELECT count(DISTINCT worker) FROM jobs WHERE kind IN ('sample', 'label') AND status = 'done'")
            .await;
    assert!(workers >= 2, "sample and label jobs were done by {workers} worker(s)");
    let (status, attempts, worker): (String, i32, String) =
        sqlx::query_as("SELECT status, attempts, worker FROM jobs WHERE kind = 'train'").fetch_one(pool).await.unwrap();
    assert_eq!(status, "done");
    assert_eq!(attempts, 2, "taken over once");
    assert!(!worker.contains(&format!(":{killed_pid}:")), "the killed daemon cannot have finished it: {worker}");
    assert_eq!(scalar(pool, "SELECT count(*) FROM training_runs").await, 1);
    let resumed = scalar(pool, "SELECT (config->>'resumed_from_step')::bigint FROM training_runs").await;
    assert!(resumed >= 1, "resumed from the saved state (step {resumed})");
    let steps = scalar(pool, "SELECT steps::bigint FROM training_runs").await;
    println!("the second trainer resumed at step {resumed} of {steps}");
    assert_eq!(scalar(pool, "SELECT count(*) FROM jobs WHERE kind = 'gate' AND status = 'done'").await, 1);
    assert_eq!(
        scalar(pool, "SELECT count(*) FROM events WHERE kind IN ('promoted', 'rejected')").await,
        1,
        "one decision"
    );
    assert_eq!(scalar(pool, "SELECT count(*) FROM training_state").await, 0, "the saved state goes with the candidate");
    // Same answers, pairs and adapter as the single daemon's run.
    let got = outcome(pool).await;
    assert_eq!(got.0, reference.0, "answers differ from a single daemon's");
    assert_eq!(got.1, reference.1, "pairs differ from a single daemon's");
    assert_eq!(got.2, reference.2, "the adapter differs from a single daemon's");

    // Everyone serves the promoted checkpoint: the survivors, the killed one restarted with an empty state
    // directory, and a fourth daemon that only serves.
    let promoted = scalar(pool, "SELECT id FROM checkpoints WHERE status = 'promoted'").await;
    assert_eq!(scalar(pool, "SELECT count(*) FROM checkpoints WHERE kind = 'lora'").await, 1);
    for d in &survivors {
        wait_served(d, promoted, 60);
    }
    let name = ["a", "b", "c"][k];
    daemons[k] = start(&root.join(name), &db.url, ALL, &[]).unwrap();
    wait_served(&daemons[k], promoted, 60);
    // The fourth starts while the database's copy of the adapter is damaged: it serves the base meanwhile, says
    // why, and the checkpoint stays promoted; once the copy is repaired it swaps the checkpoint in.
    let sha: String = sqlx::query_scalar(
        "SELECT sha256 FROM checkpoint_files WHERE checkpoint_id = $1 AND name = 'adapter_model.safetensors'",
    )
    .bind(promoted)
    .fetch_one(pool)
    .await
    .unwrap();
    let good: Vec<u8> =
        sqlx::query_scalar("SELECT bytes FROM blobs WHERE sha256 = $1").bind(&sha).fetch_one(pool).await.unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    sqlx::query("UPDATE blobs SET bytes = $2 WHERE sha256 = $1").bind(&sha).bind(&bad).execute(pool).await.unwrap();
    let fourth = start(&root.join("d"), &db.url, "\"serve\"", &[]).unwrap();
    let base = scalar(pool, "SELECT id FROM checkpoints WHERE kind = 'base'").await;
    assert_eq!(served(&fourth), base, "nothing verified to serve but the base");
    wait_for(pool, "SELECT count(*) FROM events WHERE kind = 'swap_failed'", 1, 60, &[&fourth]).await;
    let why: String = sqlx::query_scalar("SELECT detail->>'error' FROM events WHERE kind = 'swap_failed' LIMIT 1")
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(why.contains("damaged"), "{why}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        scalar(pool, "SELECT id FROM checkpoints WHERE status = 'promoted'").await,
        promoted,
        "a local failure changes no status"
    );
    sqlx::query("UPDATE blobs SET bytes = $2 WHERE sha256 = $1").bind(&sha).bind(&good).execute(pool).await.unwrap();
    wait_served(&fourth, promoted, 120);
    let fourth_jobs =
        scalar(pool, &format!("SELECT count(*) FROM jobs WHERE worker LIKE '%:{}:%'", fourth.pid())).await;
    assert_eq!(fourth_jobs, 0, "a serve-only daemon takes no jobs");
    // No daemon saw another's files: each state directory is empty from outside its namespace.
    for d in daemons.iter().chain([&fourth]) {
        let outside = std::fs::read_dir(d.dir.join("state")).unwrap().count();
        assert_eq!(outside, 0, "{} leaked files outside its namespace", d.dir.display());
    }
    drop(fourth);
    drop(daemons);
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_iteration_under_two_daemons_loses_and_duplicates_nothing() {
    if let Err(why) = private_namespaces() {
        println!("SKIPPED: no private mount namespaces: {why}");
        return;
    }
    let root = std::env::temp_dir().join(format!("rlaifd-scale-pg-{}", std::process::id()));
    let port = 20000 + ((std::process::id() + 7) % 20000) as u16;
    let Ok(cluster) = Cluster::started(root.join("pg"), port)
        .map_err(|why| println!("SKIPPED: no private PostgreSQL cluster: {why}"))
    else {
        return;
    };
    let url = format!("postgres://postgres@127.0.0.1:{port}/rlaifd");
    let daemons: Vec<Daemon> =
        ["a", "b"].iter().map(|n| start_with(&root.join(n), &url, ALL, 24, &[]).unwrap()).collect();
    let refs: Vec<&Daemon> = daemons.iter().collect();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    assert_eq!(daemons[0].ctl(json!({ "cmd": "iterate" }))["ok"], true);
    wait_for(&pool, "SELECT count(*) FROM responses", 1, 120, &refs).await;
    let open = scalar(&pool, "SELECT count(*) FROM jobs WHERE status <> 'done'").await;
    println!("stopping PostgreSQL with {open} jobs not done");
    pool.close().await;
    cluster.ctl("stop");
    tokio::time::sleep(Duration::from_secs(4)).await;
    for d in &daemons {
        assert_eq!(d.http("GET", "/healthz", "application/json", b"").0, 200, "serving goes on without the database");
    }
    cluster.ctl("start");
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    wait_for(&pool, "SELECT count(*) FROM iterations WHERE stage = 'done'", 1, 300, &refs).await;
    // Every prompt sampled once (4 answers each) and labeled once; one training run; one decision.
    let sampled = scalar(&pool, "SELECT count(*) FROM jobs WHERE kind = 'sample' AND status = 'done'").await;
    assert_eq!(scalar(&pool, "SELECT count(*) FROM jobs WHERE status <> 'done'").await, 0, "every job done");
    assert_eq!(scalar(&pool, "SELECT count(*) FROM responses").await, 4 * sampled);
    assert_eq!(scalar(&pool, "SELECT count(*) FROM jobs WHERE kind = 'label'").await, sampled);
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM (SELECT 1 FROM pairs GROUP BY chosen_id, rejected_id HAVING count(*) > 1) d"
        )
        .await,
        0
    );
    assert_eq!(scalar(&pool, "SELECT count(*) FROM training_runs").await, 1);
    assert_eq!(scalar(&pool, "SELECT count(*) FROM events WHERE kind IN ('promoted', 'rejected')").await, 1);
    let promoted = scalar(&pool, "SELECT id FROM checkpoints WHERE status = 'promoted'").await;
    for d in &daemons {
        wait_served(d, promoted, 60);
    }
    drop(daemons);
    pool.close().await;
    drop(cluster);
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_daemon_drives_two_engines_and_spreads_jobs_and_requests_over_them() {
    if let Err(why) = private_namespaces() {
        println!("SKIPPED: no private mount namespaces: {why}");
        return;
    }
    let root = std::env::temp_dir().join(format!("rlaifd-scale-dev-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let db = common::fresh("scale_dev").await;
    let pool = &db.pool;
    // Two engine threads on the CPU stand for two devices (the same plumbing a host's GPUs take).
    let dir = root.join("two");
    let text = config(&dir, &db.url, ALL, 6).replace("[model]\n", "[model]\ndevices = [\"cpu\", \"cpu\"]\n");
    let d = Daemon::launch_private(&dir, &text, &[]).unwrap();
    let (status, body) = d.http("GET", "/healthz", "application/json", b"");
    assert_eq!(status, 200);
    let health: Value = serde_json::from_str(&body).unwrap();
    let devices = health["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2, "{body}");
    let names: Vec<String> = devices.iter().map(|x| x["worker"].as_str().unwrap().to_string()).collect();
    assert!(names[0].ends_with(":cpu") && names[1].ends_with(":cpu#1"), "{names:?}");
    assert_eq!(d.ctl(json!({ "cmd": "iterate" }))["ok"], true);
    wait_for(pool, "SELECT count(*) FROM iterations WHERE stage = 'done'", 1, 300, &[&d]).await;
    let by: Vec<(String, i64)> = sqlx::query_as(
        "SELECT worker, count(*) FROM jobs WHERE kind IN ('sample', 'label') AND status = 'done' GROUP BY worker ORDER BY worker",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    println!("sample+label jobs per engine: {by:?}");
    assert_eq!(by.iter().map(|(w, _)| w.clone()).collect::<Vec<_>>(), names, "both engines took jobs");
    // The promoted checkpoint serves from both engines: concurrent requests spread over them, all answered.
    let promoted = scalar(pool, "SELECT id FROM checkpoints WHERE status = 'promoted'").await;
    wait_served(&d, promoted, 60);
    let body = common::daemon::chat_request("Describe the image.", None, json!({ "max_tokens": 8, "n": 2 }));
    let addr = d.addr.clone();
    let answered: Vec<u16> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..6)
            .map(|_| {
                s.spawn(|| common::daemon::http(&addr, "POST", "/v1/chat/completions", "application/json", &body).0)
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(answered, vec![200; 6]);
    let (_, metrics) = d.http("GET", "/metrics", "text/plain", b"");
    let taken: Vec<u64> = (0..2)
        .map(|i| {
            let engine = i.to_string();
            let labels = [("engine", engine.as_str()), ("device", "cpu")];
            common::daemon::prom_sample(&metrics, "rlaifd_engine_chat_requests_total", &labels)
                .unwrap_or_else(|| panic!("no chat requests of engine {i} in {metrics}")) as u64
        })
        .collect();
    println!("chat requests per engine: {taken:?}");
    assert_eq!(taken.iter().sum::<u64>(), 6);
    assert!(taken.iter().all(|&n| n > 0), "concurrent requests went to both engines: {taken:?}");
    drop(d);
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(&root);
}

/// `model.devices = "all"` on a host with two GPUs: an engine per device, sample and label jobs on both, training
/// data-parallel over both (the run's config records 2 devices), the candidate gated and served, chat answered,
/// also by three concurrent requests sharing the GPU's decode steps (with log-probabilities).
/// Runs on cuemu under `scripts/emu-check` (CUEMU_DEVICES=2); elsewhere without two GPUs it prints why and passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_on_two_gpus_trains_data_parallel_on_the_gpu() {
    let n = engine::cuda::device_count();
    if n < 2 {
        println!("SKIPPED: no GPU: two CUDA devices needed, {n} usable here");
        return;
    }
    if let Err(why) = engine::cuda::nccl::nccl_status() {
        println!("SKIPPED: no GPU: {why}");
        return;
    }
    let root = std::env::temp_dir().join(format!("rlaifd-scale-gpu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let db = common::fresh("scale_gpu").await;
    let pool = &db.pool;
    let dir = root.join("gpus");
    // 2 prompts x 4 answers, 4 held-out images: small, because cuemu runs every CUDA thread on the CPU.
    let text = config(&dir, &db.url, ALL, 2)
        .replace("[model]\n", "[model]\ndevices = \"all\"\n")
        .replace("eval_count = 4", "eval_count = 2")
        .replace("max_new_tokens = 24", "max_new_tokens = 12")
        .replace(
            &dir.join("control.sock").display().to_string(),
            &dir.join("state/control.sock").display().to_string(),
        );
    let d = Daemon::launch(&dir, &text, &[]);
    let (status, body) = d.http("GET", "/healthz", "application/json", b"");
    assert_eq!(status, 200, "{body}");
    let health: Value = serde_json::from_str(&body).unwrap();
    let names: Vec<String> =
        health["devices"].as_array().unwrap().iter().map(|x| x["worker"].as_str().unwrap().to_string()).collect();
    println!("engines: {names:?}");
    assert_eq!(names.len(), 2, "{body}");
    assert!(names[0].ends_with(":cuda:0") && names[1].ends_with(":cuda:1"), "{names:?}");
    assert_eq!(d.ctl(json!({ "cmd": "iterate" }))["ok"], true);
    wait_for(pool, "SELECT count(*) FROM iterations WHERE stage = 'done'", 1, 1500, &[&d]).await;
    let by: Vec<(String, i64)> = sqlx::query_as(
        "SELECT worker, count(*) FROM jobs WHERE kind IN ('sample', 'label') AND status = 'done' GROUP BY worker ORDER BY worker",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    println!("sample+label jobs per device: {by:?}");
    assert_eq!(by.iter().map(|(w, _)| w.clone()).collect::<Vec<_>>(), names, "both devices took jobs");
    let devices = scalar(pool, "SELECT (config->>'devices')::bigint FROM training_runs").await;
    assert_eq!(devices, 2, "the run trained on {devices} device(s):\n{}", d.log());
    assert!(d.log().contains("training data-parallel on 2 GPUs"), "{}", d.log());
    let promoted = scalar(pool, "SELECT id FROM checkpoints WHERE status = 'promoted'").await;
    wait_served(&d, promoted, 120);
    let body = common::daemon::chat_request("Describe the image.", None, json!({ "max_tokens": 4 }));
    let (status, answer) = d.http("POST", "/v1/chat/completions", "application/json", &body);
    assert_eq!(status, 200, "{answer}");
    // Continuous batching on the GPU: greedy requests with log-probabilities, three at once, give the texts
    // they give one at a time, with a log-probability per token.
    let asks = ["Describe the image.", "What shapes are there?", "Name a colour."];
    let ask = |q: &str| -> Value {
        let body = common::daemon::chat_request(
            q,
            None,
            json!({ "max_tokens": 6, "temperature": 0, "logprobs": true, "top_logprobs": 2 }),
        );
        let (status, answer) = d.http("POST", "/v1/chat/completions", "application/json", &body);
        assert_eq!(status, 200, "{answer}");
        serde_json::from_str(&answer).unwrap()
    };
    let alone: Vec<Value> = asks.iter().map(|q| ask(q)).collect();
    let together: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> = asks.iter().map(|q| s.spawn(|| ask(q))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (a, t) in alone.iter().zip(&together) {
        let text = |v: &Value| v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        println!("GPU batch: alone {:?}, together {:?}", text(a), text(t));
        assert_eq!(text(a), text(t), "{a} vs {t}");
        let lps = t["choices"][0]["logprobs"]["content"].as_array().unwrap();
        assert_eq!(lps.len() as u64, t["usage"]["completion_tokens"].as_u64().unwrap(), "{t}");
        assert!(
            lps.iter()
                .all(|l| l["logprob"].as_f64().unwrap() <= 0.0 && l["top_logprobs"].as_array().unwrap().len() == 2),
            "{t}"
        );
    }
    drop(d);
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(&root);
}
