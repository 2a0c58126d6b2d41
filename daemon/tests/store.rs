//! The loop's store against real PostgreSQL (a fresh database per test): migrations, uniqueness that makes
//! retries harmless, leased job claims under concurrency.

mod common;

use rlaifd::store::{self, NewClaim, NewPair, NewPrompt, NewResponse};
use sqlx::Row;

fn png(seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([seed, x as u8 * 20, y as u8 * 20]));
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

async fn prompt(pool: &sqlx::PgPool, seed: u8) -> i64 {
    let sha = store::insert_image(pool, &png(seed)).await.unwrap();
    store::insert_prompt(
        pool,
        &NewPrompt {
            image_sha256: Some(sha),
            instruction: "Describe the image.".into(),
            source: "test".into(),
            split: "train".into(),
            ground_truth: None,
        },
    )
    .await
    .unwrap()
}

async fn count(pool: &sqlx::PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}")).fetch_one(pool).await.unwrap()
}

#[tokio::test]
async fn migrations_create_the_lineage_schema_and_rerun_as_no_ops() {
    let db = common::fresh("migrate").await;
    // A second start-up (and the CLI) applies nothing new and fails nothing.
    rlaifd::db::open(&db.url, 1).await.unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rlaifd"))
        .args(["migrate", "--database-url", &db.url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for t in [
        "checkpoints",
        "claims",
        "events",
        "images",
        "iterations",
        "jobs",
        "pairs",
        "prompts",
        "responses",
        "training_runs",
    ] {
        assert!(tables.contains(&t.to_string()), "missing table {t}: {tables:?}");
    }
    let applied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success").fetch_one(&db.pool).await.unwrap();
    assert_eq!(applied as usize, rlaifd::db::MIGRATOR.iter().count());
    db.drop_db().await;
}

#[tokio::test]
async fn a_bad_database_url_is_refused_with_the_server_named() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rlaifd"))
        .args(["migrate", "--database-url", "postgres://postgres@127.0.0.1:1/nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("127.0.0.1:1") && err.contains("DATABASE_URL"), "{err}");
}

#[tokio::test]
async fn retried_stages_store_nothing_twice() {
    let db = common::fresh("dupes").await;
    let pool = &db.pool;
    let p = prompt(pool, 1).await;
    assert_eq!(prompt(pool, 1).await, p, "the same image + instruction is one prompt");
    assert_eq!(count(pool, "images").await, 1);
    // An image that does not decode is refused and stores nothing.
    assert!(store::insert_image(pool, b"\x89PNG\r\n\x1a\nnot really").await.is_err());
    assert_eq!(count(pool, "images").await, 1);

    let base = store::ensure_base(pool, "/models/base", None).await.unwrap();
    assert_eq!(base.status, store::CheckpointStatus::Promoted);
    assert_eq!(store::ensure_base(pool, "/models/base", None).await.unwrap(), base);
    // A second promoted checkpoint is impossible.
    let second = sqlx::query(
        "INSERT INTO checkpoints (parent_id, iteration, kind, path, status) VALUES ($1, 1, 'lora', '/x', 'promoted')",
    )
    .bind(base.id)
    .execute(pool)
    .await;
    assert!(second.is_err(), "two promoted checkpoints");

    let cfg = serde_json::json!({});
    let it = store::start_iteration(pool, &cfg, &[p], false).await.unwrap();
    assert_eq!(
        store::start_iteration(pool, &cfg, &[p], false).await.unwrap(),
        it,
        "starting is idempotent while one is open"
    );
    let jobs = store::claim_jobs(pool, store::JobKind::Sample, "w1", 10, 60.0).await.unwrap();
    assert_eq!(jobs.len(), 1);
    let answers: Vec<NewResponse> = (0..3)
        .map(|s| NewResponse {
            seed: s,
            text: format!("answer {s}"),
            tokens: vec![5, 6, s as u32],
            finish: "stop".into(),
        })
        .collect();
    let dec = serde_json::json!({ "temperature": 0.7 });
    assert!(store::finish_sample(pool, &jobs[0], "w1", base.id, &dec, &answers).await.unwrap());
    // The same job finished again (a worker that did not know it was done) stores nothing.
    assert!(!store::finish_sample(pool, &jobs[0], "w1", base.id, &dec, &answers).await.unwrap());
    assert_eq!(count(pool, "responses").await, 3);
    let rows = store::responses(pool, p, base.id, &[2, 0, 1]).await.unwrap();
    assert_eq!(rows.iter().map(|r| r.seed).collect::<Vec<_>>(), vec![2, 0, 1], "in the order of the seeds asked for");
    assert_eq!(rows[0].tokens, vec![5, 6, 2]);

    let label = store::claim_jobs(pool, store::JobKind::Label, "w2", 10, 60.0).await.unwrap();
    assert_eq!(label.len(), 1, "a finished sample job queues exactly one label job");
    let claim = |ok: bool| NewClaim {
        claim: "There is a red circle.".into(),
        question: "Is there a red circle in the image?".into(),
        p_yes: if ok { 0.9 } else { 0.1 },
        p_no: if ok { 0.1 } else { 0.9 },
        accepted: ok,
    };
    let labeled = vec![
        (rows[1].id, Some(0), vec![claim(true)]),
        (rows[2].id, Some(-1), vec![claim(false)]),
        (rows[0].id, None, vec![]),
    ];
    let pairs = vec![NewPair {
        chosen_id: rows[1].id,
        rejected_id: rows[2].id,
        score_gap: 1,
        ref_logp_chosen: -3.0,
        ref_logp_rejected: -4.0,
    }];
    assert!(store::finish_label(pool, &label[0], "w2", "self:1", "rules", base.id, &labeled, &pairs).await.unwrap());
    assert!(!store::finish_label(pool, &label[0], "w2", "self:1", "rules", base.id, &labeled, &pairs).await.unwrap());
    assert_eq!((count(pool, "claims").await, count(pool, "pairs").await), (2, 1));
    // The schema itself refuses a duplicate pair and a pair of an answer with itself.
    let dup = sqlx::query("INSERT INTO pairs (iteration_id, prompt_id, chosen_id, rejected_id, score_gap, ref_checkpoint_id, ref_logp_chosen, ref_logp_rejected) VALUES ($1, $2, $3, $4, 1, $5, 0, 0)");
    assert!(dup.bind(it.id).bind(p).bind(rows[1].id).bind(rows[2].id).bind(base.id).execute(pool).await.is_err());
    let same = sqlx::query("INSERT INTO pairs (iteration_id, prompt_id, chosen_id, rejected_id, score_gap, ref_checkpoint_id, ref_logp_chosen, ref_logp_rejected) VALUES ($1, $2, $3, $3, 1, $4, 0, 0)");
    assert!(same.bind(it.id).bind(p).bind(rows[1].id).bind(base.id).execute(pool).await.is_err());
    assert_eq!(store::job_counts(pool, it.id).await.unwrap(), (0, 2, 0));
    let scores: Vec<Option<i32>> = sqlx::query("SELECT score FROM responses ORDER BY seed")
        .fetch_all(pool)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get("score"))
        .collect();
    assert_eq!(scores, vec![Some(0), Some(-1), None], "seeds 0, 1, 2");
    db.drop_db().await;
}

#[tokio::test]
async fn concurrent_workers_never_share_a_job_and_dead_workers_leases_expire() {
    let db = common::fresh("claims").await;
    let pool = db.pool.clone();
    let mut ids = Vec::new();
    for s in 0..20 {
        ids.push(prompt(&pool, s).await);
    }
    store::ensure_base(&pool, "/models/base", None).await.unwrap();
    let it = store::start_iteration(&pool, &serde_json::json!({}), &ids, false).await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..4 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = store::claim_jobs(&pool, store::JobKind::Sample, &format!("w{w}"), 2, 60.0).await.unwrap();
                if got.is_empty() {
                    break;
                }
                mine.extend(got.into_iter().map(|j| j.id));
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    let n = all.len();
    all.dedup();
    assert_eq!((n, all.len()), (20, 20), "every job claimed exactly once");

    // A worker that dies keeps its lease until it expires; then another worker gets the job, and the dead
    // worker's late result is refused.
    let db2 = common::fresh("lease").await;
    let pool2 = &db2.pool;
    let p = prompt(pool2, 1).await;
    let base = store::ensure_base(pool2, "/models/base", None).await.unwrap();
    store::start_iteration(pool2, &serde_json::json!({}), &[p], false).await.unwrap();
    let dead = store::claim_jobs(pool2, store::JobKind::Sample, "dead", 1, 0.2).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        store::claim_jobs(pool2, store::JobKind::Sample, "alive", 1, 60.0).await.unwrap().is_empty(),
        "the lease still holds"
    );
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let retry = store::claim_jobs(pool2, store::JobKind::Sample, "alive", 1, 60.0).await.unwrap();
    assert_eq!((retry.len(), retry[0].id, retry[0].attempts), (1, dead[0].id, 2));
    let a = [NewResponse { seed: 1, text: "x".into(), tokens: vec![1], finish: "stop".into() }];
    assert!(!store::finish_sample(pool2, &dead[0], "dead", base.id, &serde_json::json!({}), &a).await.unwrap());
    assert_eq!(count(pool2, "responses").await, 0);
    assert!(store::finish_sample(pool2, &retry[0], "alive", base.id, &serde_json::json!({}), &a).await.unwrap());
    assert_eq!(count(pool2, "responses").await, 1);
    let _ = it;
    db.drop_db().await;
    db2.drop_db().await;
}

#[tokio::test]
async fn checkpoint_files_are_stored_by_content_and_checked_when_read() {
    let db = common::fresh("blobs").await;
    let pool = &db.pool;
    let base = store::ensure_base(pool, "/models/base", None).await.unwrap();
    let mut ids = Vec::new();
    for n in 1..=2 {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO checkpoints (parent_id, iteration, kind, path, sha256, status) VALUES ($1, $2, 'lora', '/elsewhere', 'x', 'candidate') RETURNING id",
        )
        .bind(base.id)
        .bind(n)
        .fetch_one(pool)
        .await
        .unwrap();
        ids.push(id);
    }
    let shared = b"{\"r\": 4}".to_vec();
    let files = |w: u8| {
        vec![
            ("adapter_config.json".to_string(), shared.clone()),
            ("adapter_model.safetensors".to_string(), vec![w; 1000]),
        ]
    };
    store::upload_checkpoint_files(pool, ids[0], &files(1)).await.unwrap();
    store::upload_checkpoint_files(pool, ids[1], &files(2)).await.unwrap();
    // The config both share is one blob: three blobs for four files.
    assert_eq!(store::blob_totals(pool).await.unwrap(), (3, (shared.len() + 2000) as i64));
    let got = store::checkpoint_files(pool, ids[1]).await.unwrap();
    assert_eq!(
        got.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
        ["adapter_config.json", "adapter_model.safetensors"]
    );
    assert_eq!(store::blob(pool, &got[1].sha256).await.unwrap(), vec![2u8; 1000]);
    assert_eq!(got[1].sha256, store::sha256_hex(&[2u8; 1000]));
    // A path in a file name is refused before anything is stored.
    let bad = vec![("../escape".to_string(), vec![0u8])];
    assert!(store::upload_checkpoint_files(pool, ids[0], &bad).await.is_err());
    assert_eq!(store::checkpoint_files(pool, ids[0]).await.unwrap().len(), 2);
    // Damaged at rest: read back, refused with the reason.
    sqlx::query("UPDATE blobs SET bytes = $2 WHERE sha256 = $1")
        .bind(&got[1].sha256)
        .bind(vec![3u8; 1000])
        .execute(pool)
        .await
        .unwrap();
    let err = format!("{:#}", store::blob(pool, &got[1].sha256).await.unwrap_err());
    assert!(err.contains("damaged"), "{err}");
    let missing = format!("{:#}", store::blob(pool, &"0".repeat(64)).await.unwrap_err());
    assert!(missing.contains("not in the database"), "{missing}");
    db.drop_db().await;
}

#[tokio::test]
async fn one_train_job_per_iteration_and_a_lost_lease_records_nothing() {
    let db = common::fresh("stagejobs").await;
    let pool = &db.pool;
    store::ensure_base(pool, "/models/base", None).await.unwrap();
    let new = store::NewPrompt {
        image_sha256: None,
        instruction: "Describe.".into(),
        source: "test".into(),
        split: "train".into(),
        ground_truth: None,
    };
    let prompt = store::insert_prompt(pool, &new).await.unwrap();
    let it = store::start_iteration(pool, &serde_json::json!({}), &[prompt], false).await.unwrap();
    store::start_training(pool, it.id).await.unwrap();
    store::start_training(pool, it.id).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind = 'train'").fetch_one(pool).await.unwrap();
    assert_eq!(n, 1, "starting training twice queues one train job");
    // Two daemons race for it: one gets it.
    let other = rlaifd::db::open(&db.url, 2).await.unwrap();
    let (a, b) = tokio::join!(
        store::claim_stage_job(pool, store::JobKind::Train, "a", "host-a:1:cpu", 0.3),
        store::claim_stage_job(&other, store::JobKind::Train, "b", "host-b:2:cpu", 60.0)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(a.is_some() != b.is_some(), "exactly one claimer: {a:?} {b:?}");
    // Make sure "a" holds it (with a short lease), then let that lease lapse: "b" takes the job over.
    if b.is_some() {
        sqlx::query(
            "UPDATE jobs SET lease_owner = 'a', lease_until = now() + interval '0.3 seconds' WHERE kind = 'train'",
        )
        .execute(pool)
        .await
        .unwrap();
    }
    let job_a = a.or(b).unwrap();
    assert!(store::renew_lease(pool, job_a.id, "a", 0.3).await.unwrap());
    assert!(store::claim_stage_job(&other, store::JobKind::Train, "b", "host-b:2:cpu", 60.0).await.unwrap().is_none());
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let job_b = store::claim_stage_job(&other, store::JobKind::Train, "b", "host-b:2:cpu", 60.0)
        .await
        .unwrap()
        .expect("taken over");
    assert_eq!(job_b.id, job_a.id);
    assert!(job_b.attempts >= 2);
    // The old holder can neither renew, nor save a state, nor record a candidate.
    assert!(!store::renew_lease(pool, job_a.id, "a", 60.0).await.unwrap());
    let files = vec![("trainer_state.json".to_string(), b"{}".to_vec())];
    assert!(!store::save_training_state(pool, job_a.id, "a", it.id, 3, "host-a:1:cpu", &files).await.unwrap());
    let cand = store::NewCandidate {
        path: "/a/iter-0001",
        sha256: &"1".repeat(64),
        files: &[("adapter_model.safetensors".to_string(), vec![1u8; 10])],
        pair_ids: &[],
        imported_pair_ids: &[],
        steps: 1,
        losses: &serde_json::json!([]),
        config: &serde_json::json!({}),
        started_at: chrono::Utc::now(),
    };
    assert!(store::add_candidate(pool, &it, &cand, Some((job_a.id, "a"))).await.unwrap().is_none());
    assert_eq!(store::iteration(pool, it.id).await.unwrap().candidate_id, None);
    // The new holder saves a state (readable by whoever comes next) and records the candidate; the state goes.
    assert!(store::save_training_state(&other, job_b.id, "b", it.id, 3, "host-b:2:cpu", &files).await.unwrap());
    let (step, saved) = store::training_state(pool, it.id).await.unwrap().unwrap();
    assert_eq!((step, saved[0].name.as_str()), (3, "trainer_state.json"));
    let row =
        store::add_candidate(&other, &it, &store::NewCandidate { path: "/b/iter-0001", ..cand }, Some((job_b.id, "b")))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(store::training_state(pool, it.id).await.unwrap(), None);
    assert_eq!(store::checkpoint_files(pool, row.id).await.unwrap().len(), 1);
    let (status, worker): (String, String) =
        sqlx::query_as("SELECT status, worker FROM jobs WHERE id = $1").bind(job_b.id).fetch_one(pool).await.unwrap();
    assert_eq!((status.as_str(), worker.as_str()), ("done", "host-b:2:cpu"));
    let gates: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind = 'gate' AND status = 'pending'")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(gates, 1, "the candidate's gate job is queued with it");
    db.drop_db().await;
}

#[tokio::test]
async fn pause_and_iterate_requests_live_in_the_database_and_are_taken_once() {
    let db = common::fresh("loopctl").await;
    let pool = &db.pool;
    assert!(!store::loop_paused(pool).await.unwrap());
    store::set_loop_paused(pool, true).await.unwrap();
    // Another connection (another daemon, or this one after a restart) sees it.
    let other = rlaifd::db::open(&db.url, 2).await.unwrap();
    assert!(store::loop_paused(&other).await.unwrap());
    store::set_loop_paused(&other, false).await.unwrap();
    assert!(!store::loop_paused(pool).await.unwrap());
    assert!(!store::take_iterate_request(pool).await.unwrap(), "nothing asked yet");
    store::request_iteration(pool).await.unwrap();
    let takers: Vec<bool> = take_concurrently(pool, &other).await;
    assert_eq!(takers.iter().filter(|&&t| t).count(), 1, "exactly one daemon takes the request: {takers:?}");
    other.close().await;
    db.drop_db().await;
}

/// Eight concurrent takers on two pools.
async fn take_concurrently(a: &sqlx::PgPool, b: &sqlx::PgPool) -> Vec<bool> {
    let mut handles = Vec::new();
    for i in 0..8 {
        let p = if i % 2 == 0 { a.clone() } else { b.clone() };
        handles.push(tokio::spawn(async move { store::take_iterate_request(&p).await.unwrap() }));
    }
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
