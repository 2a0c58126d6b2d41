//! One full RLAIF-V iteration end to end on the bundled ShapesWorld model and real PostgreSQL: prompts ->
//! sampled answers -> claims and verdicts -> pairs -> DPO candidate on disk -> held-out gate -> promoted or
//! rejected, with the lineage and audit log in the database; then a rerun that resumes instead of redoing.

mod common;

use rlaifd::rlaif::{run_iteration, Engine, LoopConfig, Stage};
use rlaifd::store;
use std::path::PathBuf;
use std::sync::Arc;

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/shapes-base")
}

async fn scalar(pool: &sqlx::PgPool, q: &str) -> i64 {
    sqlx::query_scalar(q).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_iteration_end_to_end_then_resume() {
    let db = common::fresh("loop").await;
    let pool = &db.pool;
    let state = std::env::temp_dir().join(format!("rlaifd-loop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let engine = Arc::new(Engine::load(&model_dir(), &state).unwrap());
    let cfg = LoopConfig {
        n: 4,
        max_new_tokens: 24,
        prompts_per_iteration: 4,
        pairs_per_iteration: 1,
        eval_count: 4,
        epochs: 1,
        batch_size: 2,
        promote_margin: 0.0,
        max_cover_drop: 1.0,
        ..LoopConfig::default()
    };
    cfg.validate().unwrap();
    let base = store::ensure_base(pool, &model_dir().display().to_string(), None).await.unwrap();
    rlaifd::demo::ensure_shapes_prompts(pool, 3, 8, engine.ip.crop_width).await.unwrap();
    assert_eq!(store::count_prompts(pool, "train").await.unwrap(), 8);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let progress: Arc<dyn Fn(Stage, usize, usize) + Send + Sync> =
        Arc::new(move |st, d, t| s2.lock().unwrap().push((st, d, t)));
    let out = run_iteration(pool, &engine, &cfg, "test", progress.clone()).await.unwrap();
    assert_eq!(out.iteration, 1);

    // Sampling: n answers per prompt from the base policy, each with its seed; claims for every answer that
    // names objects; every pair's answers exist and belong to its prompt.
    assert_eq!(scalar(pool, "SELECT count(*) FROM responses").await, 16);
    assert_eq!(scalar(pool, "SELECT count(DISTINCT (prompt_id, seed)) FROM responses").await, 16);
    assert!(scalar(pool, "SELECT count(*) FROM claims").await > 0);
    assert_eq!(scalar(pool, "SELECT count(*) FROM responses r WHERE r.score IS NOT NULL AND NOT EXISTS (SELECT 1 FROM claims c WHERE c.response_id = r.id)").await, 0);
    assert_eq!(scalar(pool, "SELECT count(*) FROM responses r WHERE r.score IS DISTINCT FROM -(SELECT count(*) FROM claims c WHERE c.response_id = r.id AND NOT c.accepted) AND r.score IS NOT NULL").await, 0, "score = -(rejected claims)");
    let pairs = scalar(pool, "SELECT count(*) FROM pairs").await;
    assert!(pairs >= 1 && pairs as usize == out.pairs);
    assert_eq!(scalar(pool, "SELECT count(*) FROM pairs p JOIN responses c ON c.id = p.chosen_id JOIN responses r ON r.id = p.rejected_id WHERE c.prompt_id <> p.prompt_id OR r.prompt_id <> p.prompt_id OR c.score - r.score <> p.score_gap OR p.score_gap < 1").await, 0);

    // The candidate: a PEFT directory whose weights match the recorded sha256, its training run, a decision.
    let cand = store::checkpoint(pool, out.candidate).await.unwrap();
    assert_eq!((cand.parent_id, cand.iteration, cand.kind.as_str()), (Some(base.id), 1, "lora"));
    assert_eq!(
        cand.sha256.as_deref(),
        Some(rlaifd::rlaif::adapter_sha256(std::path::Path::new(&cand.path)).unwrap().as_str())
    );
    assert!(std::path::Path::new(&cand.path).join("adapter_config.json").exists());
    assert_eq!(cand.status.as_str(), if out.promoted { "promoted" } else { "rejected" });
    assert!(cand.metrics.as_ref().unwrap()["chair_i"].as_f64().is_some());
    let trained = scalar(
        pool,
        &format!("SELECT cardinality(pair_ids)::bigint FROM training_runs WHERE checkpoint_id = {}", cand.id),
    )
    .await as usize;
    assert!(trained >= 1 && trained <= out.pairs, "{trained} pairs trained of {}", out.pairs);
    assert_eq!(scalar(pool, "SELECT count(*) FROM checkpoints WHERE status = 'promoted'").await, 1);
    assert!(
        store::base(pool).await.unwrap().metrics.unwrap()["chair_i"].as_f64().is_some(),
        "the gate measured the base too"
    );
    for kind in ["iteration_started", "candidate_saved", if out.promoted { "promoted" } else { "rejected" }] {
        assert_eq!(scalar(pool, &format!("SELECT count(*) FROM events WHERE kind = '{kind}'")).await, 1, "{kind}");
    }
    assert_eq!(store::finished_iterations(pool).await.unwrap(), 1);
    assert!(
        seen.lock().unwrap().iter().any(|(s, d, t)| *s == Stage::Sample && d == t),
        "progress reached the end of sampling"
    );

    // A crash between training and the gate: the iteration resumes at evaluation and trains nothing again.
    let out2_it = {
        let cfg2 = LoopConfig { ..cfg.clone() };
        let prompts = store::unused_train_prompts(pool, 4).await.unwrap();
        assert_eq!(prompts.len(), 4, "iteration 2 samples prompts iteration 1 did not use");
        let it = store::start_iteration(pool, &serde_json::to_value(&cfg2).unwrap(), &prompts, false).await.unwrap();
        assert_eq!(it.number, 2);
        it
    };
    let out2 = run_iteration(pool, &engine, &cfg, "test", progress).await.unwrap();
    assert_eq!(out2.iteration, out2_it.number);
    let parent = store::checkpoint(pool, out2.candidate).await.unwrap().parent_id.unwrap();
    assert_eq!(parent, out2_it.policy_id, "a candidate's parent is the policy its iteration sampled from");
    assert_eq!(scalar(pool, "SELECT count(*) FROM checkpoints WHERE status = 'promoted'").await, 1);

    // docs/sql.md's queries and views run and answer.
    let doc = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/sql.md")).unwrap();
    let mut queries: Vec<String> =
        doc.split("```sql").skip(1).map(|b| b.split("```").next().unwrap().to_string()).collect();
    queries.extend(
        doc.lines()
            .filter_map(|l| l.strip_prefix('`'))
            .filter(|l| l.starts_with("SELECT"))
            .map(|l| l.split('`').next().unwrap().to_string()),
    );
    assert!(queries.len() >= 6, "{queries:?}");
    for q in &queries {
        let q = q.replace("t.checkpoint_id = 2", &format!("t.checkpoint_id = {}", out.candidate));
        let rows = sqlx::query(&q).fetch_all(pool).await.unwrap_or_else(|e| panic!("{q}: {e}"));
        assert!(!rows.is_empty(), "no rows from {q}");
    }
    let agreement: f64 = sqlx::query_scalar("SELECT agreement::float8 FROM labeler_agreement WHERE iteration = 1")
        .fetch_one(pool)
        .await
        .unwrap();
    assert!((0.0..=1.0).contains(&agreement));
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(&state);
}

/// A model without ground truth (not ShapesWorld) is gated on the labeler-estimated hallucination rate of its
/// greedy answers to the held-out prompts in the database, judged by a fixed model; no held-out prompts is a clear
/// error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_without_ground_truth_is_gated_on_labeler_estimated_hallucination() {
    let db = common::fresh("labgate").await;
    let pool = &db.pool;
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llava/l15_4x_f32_gqa_tied_lora");
    let state = std::env::temp_dir().join(format!("rlaifd-labgate-{}", std::process::id()));
    let engine = Arc::new(Engine::load(&fixture.join("model"), &state).unwrap());
    assert!(!engine.shapes, "the fixture is not a ShapesWorld model");
    let cfg = LoopConfig { eval_count: 3, max_new_tokens: 16, ..LoopConfig::default() };
    let base = store::ensure_base(pool, &fixture.join("model").display().to_string(), None).await.unwrap();
    let e = format!("{:#}", rlaifd::rlaif::evaluate(pool, &engine, &cfg, &base).await.unwrap_err());
    assert!(e.contains("held-out prompts") && e.contains("import-prompts"), "{e}");
    let png = std::fs::read(fixture.join("image.png")).unwrap();
    let sha = store::insert_image(pool, &png).await.unwrap();
    for q in ["Describe the image.", "What is in the picture?", "What colour is it?", "Not used: eval_count is 3."] {
        store::insert_prompt(
            pool,
            &store::NewPrompt {
                image_sha256: Some(sha.clone()),
                instruction: q.into(),
                source: "test".into(),
                split: "heldout".into(),
                ground_truth: None,
            },
        )
        .await
        .unwrap();
    }
    let m = rlaifd::rlaif::evaluate(pool, &engine, &cfg, &base).await.unwrap();
    println!("{m}");
    assert_eq!((m["kind"].as_str(), m["answers"].as_u64()), (Some("labeler"), Some(3)), "{m}");
    let (claims, rejected) = (m["claims"].as_u64().unwrap(), m["rejected"].as_u64().unwrap());
    assert!(claims > 0 && rejected <= claims, "{m}");
    assert!((m["hallucination_rate"].as_f64().unwrap() - rejected as f64 / claims as f64).abs() < 1e-12);
    assert!((m["claims_per_answer"].as_f64().unwrap() - claims as f64 / 3.0).abs() < 1e-12);
    assert_eq!(
        m,
        rlaifd::rlaif::evaluate(pool, &engine, &cfg, &base).await.unwrap(),
        "greedy answers and a fixed judge: deterministic"
    );
    // The same gate with the LLM extractor (`loop.extractor = "llm"`, the base model dividing): a random-weight
    // model writes no "- " listing, so its answers get no claims; the gate still measures every answer, and says
    // there was nothing to rate rather than failing.
    let llm = LoopConfig { extractor: "llm".into(), extractor_max_new_tokens: 12, ..cfg.clone() };
    let m_llm = rlaifd::rlaif::evaluate(pool, &engine, &llm, &base).await.unwrap();
    println!("{m_llm}");
    assert_eq!(m_llm["answers"].as_u64(), Some(3), "{m_llm}");
    let llm_claims = m_llm["claims"].as_u64().unwrap();
    assert!(m_llm["hallucination_rate"].is_null() == (llm_claims == 0), "{m_llm}");
    assert_eq!(m_llm, rlaifd::rlaif::evaluate(pool, &engine, &llm, &base).await.unwrap(), "greedy: deterministic");
    // The gate reads these metrics as it reads CHAIR_i and Cover.
    let better = |h: f64, c: f64| serde_json::json!({ "hallucination_rate": h, "claims_per_answer": c });
    let cfg = LoopConfig { promote_margin: 0.01, max_cover_drop: 0.1, ..cfg };
    assert!(rlaifd::rlaif::better(&cfg, &better(0.2, 3.0), &better(0.3, 3.0), &better(0.3, 3.0)).0);
    assert!(
        !rlaifd::rlaif::better(&cfg, &better(0.295, 3.0), &better(0.3, 3.0), &better(0.3, 3.0)).0,
        "within the margin"
    );
    assert!(
        !rlaifd::rlaif::better(&cfg, &better(0.1, 2.0), &better(0.3, 3.0), &better(0.3, 3.0)).0,
        "says much less than the base"
    );
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(&state);
}

/// The demo's loop, one iteration (its own settings, fewer prompts and held-out images): the candidate's CHAIR_i on
/// the held-out images is below the base model's, by at least 15 %. The pairs come from the policy's own labels,
/// never from ground truth; only the gate's metrics use it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_demo_iteration_lowers_chair_i_below_the_base_models() {
    let db = common::fresh("lower").await;
    let state = std::env::temp_dir().join(format!("rlaifd-lower-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rlaifd"))
        .args(["demo", "--iterations", "1", "--prompts-per-iteration", "400", "--eval-count", "100"])
        .arg("--state-dir")
        .arg(&state)
        .arg("--database-url")
        .arg(&db.url)
        .arg("--model")
        .arg(model_dir())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let chair = |q: &str| {
        let pool = db.pool.clone();
        let q = q.to_string();
        async move { sqlx::query_scalar::<_, f64>(&q).fetch_one(&pool).await.unwrap() }
    };
    let base = chair("SELECT (metrics->>'chair_i')::float8 FROM checkpoints WHERE kind = 'base'").await;
    let cand = chair("SELECT (metrics->>'chair_i')::float8 FROM checkpoints WHERE iteration = 1").await;
    println!(
        "held-out CHAIR_i: base {base:.3}, after one iteration {cand:.3}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(cand < 0.85 * base, "one iteration: CHAIR_i {cand:.3} against the base's {base:.3}");
    let _ = std::fs::remove_dir_all(&state);
    db.drop_db().await;
}

/// `loop.gate = "objhal:FILE"`: the checkpointer measures the base model and each candidate on an Object HalBench
/// file (COCO instances format; here `rlaifd shapes bench`'s, ShapesWorld objects as categories), stores the figures
/// tagged with the gate (the `checkpoint_metrics` view shows them), and they are exactly what `rlaifd eval bench`
/// reports for the same checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_benchmark_gate_measures_checkpoints_as_eval_bench_does() {
    let db = common::fresh("benchgate").await;
    let state = std::env::temp_dir().join(format!("rlaifd-benchgate-{}", std::process::id()));
    let files = state.join("bench");
    let _ = std::fs::remove_dir_all(&state);
    let rlaifd = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rlaifd"))
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(out.status.success(), "rlaifd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let (files_s, state_s, model) = (files.to_str().unwrap(), state.to_str().unwrap(), model_dir());
    rlaifd(&["shapes", "bench", "--seed", "1000000", "--count", "30", "--out", files_s]);
    let data = files.join("instances.json");
    let syn = files.join("synonyms.txt");
    let gate = format!("gate=objhal:{}", data.display());
    let gate_syn = format!("gate_synonyms={}", syn.display());
    let model_s = model.to_str().unwrap();
    rlaifd(&[
        "demo",
        "--iterations",
        "1",
        "--prompts-per-iteration",
        "60",
        "--eval-count",
        "30",
        "--state-dir",
        state_s,
        "--database-url",
        &db.url,
        "--model",
        model_s,
        "--set",
        &gate,
        "--set",
        &gate_syn,
    ]);
    type Row = (i32, String, Option<String>, Option<f64>, Option<f64>);
    let rows: Vec<Row> =
        sqlx::query_as("SELECT iteration, status, gate, chair_i, cover FROM checkpoint_metrics ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 2, "the base model and one candidate: {rows:?}");
    let bench = |adapter: Option<&str>| {
        let (d, s) = (data.to_str().unwrap(), syn.to_str().unwrap());
        let mut args = vec!["eval", "bench", "--suite", "objhal", "--data", d, "--images", files_s, "--model", model_s];
        args.extend(["--synonyms", s, "--max-new-tokens", "48", "--json"]);
        if let Some(a) = adapter {
            args.extend(["--adapter", a]);
        }
        serde_json::from_str::<serde_json::Value>(rlaifd(&args).trim()).unwrap()
    };
    let cand_dir = state.join("checkpoints/iter-0001");
    for ((it, status, g, chair_i, cover), want) in
        rows.iter().zip([bench(None), bench(Some(cand_dir.to_str().unwrap()))])
    {
        assert_eq!(
            g.as_deref(),
            Some(gate.trim_start_matches("gate=")),
            "iteration {it} ({status}) is tagged with its gate"
        );
        assert_eq!(*chair_i, want["chair_i"].as_f64(), "iteration {it}: the gate's CHAIR_i is eval bench's");
        assert_eq!(*cover, want["cover"].as_f64(), "iteration {it}: the gate's Cover is eval bench's");
    }
    let reason: String = sqlx::query_scalar(
        "SELECT detail->>'reason' FROM events WHERE kind IN ('promoted', 'rejected') ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(reason.contains("chair_i"), "the decision names the benchmark's metric: {reason}");
    let _ = std::fs::remove_dir_all(&state);
    db.drop_db().await;
}

/// The bundled model with one more word in its vocabulary (a row added to the embeddings and the head, the mean of
/// the others): it captions as the ShapesWorld model does, but its tokenizer is not ShapesWorld's, so the loop
/// treats it as any other model (no exact objects, no generated prompts, claims from the configured extractor).
fn disguised_model(dir: &std::path::Path) {
    let base = model_dir();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(base.join("preprocessor_config.json"), dir.join("preprocessor_config.json")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
    let vocab = cfg["text_config"]["vocab_size"].as_u64().unwrap() as usize;
    cfg["text_config"]["vocab_size"] = serde_json::json!(vocab + 1);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("tokenizer.json")).unwrap()).unwrap();
    tok["model"]["vocab"]["hello"] = serde_json::json!(vocab);
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let ws = engine::weights::WeightStore::open_files(&[base.join("model.safetensors")]).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for k in ws.keys() {
        let mut shape = ws.shape(k).unwrap().to_vec();
        let mut data = ws.f32_any_shape(k).unwrap();
        if shape.first() == Some(&vocab) && shape.len() == 2 {
            let width = shape[1];
            let mean: Vec<f32> =
                (0..width).map(|j| (0..vocab).map(|i| data[i * width + j]).sum::<f32>() / vocab as f32).collect();
            data.extend(mean);
            shape[0] += 1;
        }
        tensors.push((k.to_string(), shape, data));
    }
    let refs: Vec<(String, Vec<usize>, &[f32])> =
        tensors.iter().map(|(k, s, d)| (k.clone(), s.clone(), &d[..])).collect();
    engine::weights::write_f32_safetensors(&dir.join("model.safetensors"), &refs).unwrap();
}

/// The loop on a model that is not ShapesWorld's (`disguised_model`), as on a real one: prompts imported with
/// their images, answers divided by a model (`loop.extractor = "llm"` with the bundled divide model,
/// assets/shapes-divide, in one batch per prompt), verified by the policy, paired, trained, and the candidate gated
/// on an Object HalBench file (`loop.gate = "objhal:FILE"`). Every stored claim names its extractor, the claims
/// are the objects the answers name, pairs exist, and the gate's CHAIR_i is stored for both checkpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_divides_with_a_model_and_gates_on_a_benchmark_for_a_model_that_is_not_shapesworlds() {
    let db = common::fresh("llmdivide").await;
    let pool = &db.pool;
    let state = std::env::temp_dir().join(format!("rlaifd-llmdivide-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let model = state.join("model");
    disguised_model(&model);
    let bench = state.join("bench");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rlaifd"))
        .args(["shapes", "bench", "--seed", "1000000", "--count", "12", "--out"])
        .arg(&bench)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let divide = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/shapes-divide");
    let cfg = LoopConfig {
        n: 4,
        max_new_tokens: 24,
        prompts_per_iteration: 8,
        pairs_per_iteration: 1,
        eval_count: 12,
        epochs: 1,
        batch_size: 2,
        promote_margin: 0.0,
        max_cover_drop: 1.0,
        extractor: "llm".into(),
        extractor_model: divide.display().to_string(),
        extractor_max_new_tokens: 64,
        gate: format!("objhal:{}", bench.join("instances.json").display()),
        gate_synonyms: bench.join("synonyms.txt").display().to_string(),
        ..LoopConfig::default()
    };
    cfg.validate().unwrap();
    let engine =
        Arc::new(Engine::load(&model, &state).unwrap().with_extractor(&cfg.extractor, &cfg.extractor_model).unwrap());
    assert!(!engine.shapes, "the disguised model is not taken for ShapesWorld's");
    store::ensure_base(pool, &model.display().to_string(), None).await.unwrap();
    // Imported prompts: images and questions, no ground truth.
    let cfg_w = engine::shapes::WorldConfig { size: engine.ip.crop_width, ..Default::default() };
    for i in 0..8u64 {
        let scene = engine::shapes::Scene::generate(&cfg_w, 77 + i);
        let mut png = Vec::new();
        scene.render(&cfg_w, 77 + i).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        let sha = store::insert_image(pool, &png).await.unwrap();
        let p = store::NewPrompt {
            image_sha256: Some(sha),
            instruction: "Describe the image.".into(),
            source: "import".into(),
            split: "train".into(),
            ground_truth: None,
        };
        store::insert_prompt(pool, &p).await.unwrap();
    }
    let progress: Arc<dyn Fn(Stage, usize, usize) + Send + Sync> = Arc::new(|_, _, _| {});
    let out = run_iteration(pool, &engine, &cfg, "test", progress).await.unwrap();
    let extractor = format!("llm:{}", divide.display());
    let claims: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT claim, question, extractor FROM claims ORDER BY id").fetch_all(pool).await.unwrap();
    assert!(claims.len() >= 8, "{claims:?}");
    for (claim, question, by) in &claims {
        assert_eq!(by.as_deref(), Some(extractor.as_str()));
        let objects = engine::hallucination::mentions(claim);
        assert_eq!(objects.len(), 1, "an atomic object claim: {claim:?}");
        assert!(question.ends_with('?') && question.contains(objects.iter().next().unwrap()), "{question:?}");
    }
    assert!(out.pairs >= 1, "{out:?}");
    type Row = (i32, Option<String>, Option<f64>);
    let rows: Vec<Row> = sqlx::query_as("SELECT iteration, gate, chair_i FROM checkpoint_metrics ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (it, gate, chair_i) in &rows {
        assert_eq!(gate.as_deref(), Some(cfg.gate.as_str()), "iteration {it}");
        assert!(chair_i.is_some_and(|c| (0.0..=1.0).contains(&c)), "iteration {it}: {chair_i:?}");
    }
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(&state);
}
