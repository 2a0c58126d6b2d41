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
    assert_eq!(q("SELECT count(*) FROM (SELECT 1 FROM pairs GROUP BY chosen_id, rejected_id HAVING count(*) > 1) d").await.unwrap(), 0, "duplicate pairs");
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
    let rows: Vec<(String, Option<String>)> = sqlx::query_as("SELECT path, sha256 FROM checkpoints WHERE kind = 'lora'").fetch_all(pool).await.unwrap();
    for (path, sha) in rows {
        let got = rlaifd::rlaif::adapter_sha256(std::path::Path::new(&path)).unwrap_or_else(|e| panic!("checkpoint {path}: {e}"));
        assert_eq!(Some(got), sha, "checkpoint {path} does not match its recorded sha256");
        assert!(std::path::Path::new(&path).join("adapter_config.json").exists());
    }
    // Candidates exist only for iterations that reached evaluation.
    assert_eq!(q("SELECT count(*) FROM iterations WHERE candidate_id IS NOT NULL AND stage IN ('sampling', 'training')").await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_loop_at_random_moments_loses_and_duplicates_nothing() {
    let db = common::fresh("crash").await;
    let state = std::env::temp_dir().join(format!("rlaifd-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let model = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/shapes-base");
    let args: Vec<String> = [
        "demo", "--iterations", "6", "--prompts-per-iteration", "8", "--eval-count", "4", "--set", "n=4", "--set", "max_new_tokens=24",
        "--set", "batch_size=2", "--set", "epochs=2", "--set", "promote_margin=0.0", "--set", "max_cover_drop=1.0",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(["--state-dir".into(), state.display().to_string(), "--database-url".into(), db.url.clone(), "--model".into(), model.display().to_string()])
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
        let mut child = Command::new(env!("CARGO_BIN_EXE_rlaifd")).args(&args).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
        let start = Instant::now();
        let finished = loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "the demo failed on its own (after {kills} kills): {}", std::fs::read_to_string(&log).unwrap_or_default());
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
        // Where the kill landed: the open iteration's stage, or before/between iterations.
        let stage: Option<String> = sqlx::query_scalar("SELECT stage FROM iterations WHERE stage NOT IN ('done', 'failed') ORDER BY number LIMIT 1").fetch_optional(&db.pool).await.unwrap();
        *hit.entry(stage.unwrap_or_else(|| "between iterations".into())).or_insert(0) += 1;
    }
    // Let it finish.
    let out = Command::new(env!("CARGO_BIN_EXE_rlaifd")).args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    check(&db.pool, 4).await;
    let done: i64 = sqlx::query_scalar("SELECT count(*) FROM iterations WHERE stage = 'done'").fetch_one(&db.pool).await.unwrap();
    assert_eq!(done, 6, "the loop made progress to the requested iterations");
    let promoted: i64 = sqlx::query_scalar("SELECT count(*) FROM checkpoints WHERE status = 'promoted'").fetch_one(&db.pool).await.unwrap();
    assert_eq!(promoted, 1);
    let summary: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(summary["iterations"], 6);
    println!("{kills} kills survived in {:.1} s; where they landed: {hit:?}", t0.elapsed().as_secs_f64());
    assert!(kills >= 10, "only {kills} kills landed; the schedule is too slow for this machine");
    assert!(hit.contains_key("sampling") && (hit.contains_key("training") || hit.contains_key("evaluating")), "kills missed the loop's stages: {hit:?}");
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(&state);
}
