//! `rlaifd import` / `rlaifd export` against real PostgreSQL and the Hugging Face `datasets` library: the RLAIF-V
//! dataset's parquet layout (written by `datasets` itself, as the hub's files were, from ShapesWorld images) goes
//! into the prompt pool or as ready pairs; bad files are refused naming file and row, storing nothing; pairs come
//! back out as a dataset `datasets` loads with TRL's vision preference columns (images decoded as images, the
//! messages as chat turns), byte for byte; and a loop iteration trains on imported pairs beside its own.
//!
//! The Python side (`tools/datasets-venv.sh`: datasets, Pillow, transformers' tokenizers and TRL's data utilities,
//! no torch) is created by the test on first use.

mod common;

use rlaifd::rlaif::{run_iteration, Engine, LoopConfig, Stage};
use rlaifd::store;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The datasets venv's python (created once by the project's script).
fn python() -> PathBuf {
    let o = Command::new(repo().join("tools/datasets-venv.sh")).output().unwrap();
    assert!(
        o.status.success(),
        "tools/datasets-venv.sh could not create the datasets venv (needs python3 and PyPI): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    PathBuf::from(String::from_utf8(o.stdout).unwrap().trim())
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

fn rlaifd(args: &[&str]) -> Output {
    run(Command::new(env!("CARGO_BIN_EXE_rlaifd")).args(args))
}

fn ok(o: Output, what: &str) -> String {
    assert!(o.status.success(), "{what}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// Writes `rows` (spec lines, images named relative to `dir`) as an RLAIF-V parquet file with `datasets`.
fn rlaifv_parquet(py: &Path, dir: &Path, name: &str, rows: &[Value], extra: &[&str]) -> PathBuf {
    let spec = dir.join(format!("{name}.jsonl"));
    std::fs::write(&spec, rows.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
    let out = dir.join(name);
    let o = run(Command::new(py).arg(repo().join("tools/rlaifv_parquet.py")).arg(&spec).arg(&out).args(extra));
    ok(o, "tools/rlaifv_parquet.py");
    out
}

fn import(url: &str, file: &Path, args: &[&str]) -> Output {
    let mut a = vec!["import", file.to_str().unwrap(), "--database-url", url];
    a.extend_from_slice(args);
    rlaifd(&a)
}

fn reports(stdout: &str) -> Vec<Value> {
    stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

async fn scalar(pool: &sqlx::PgPool, q: &str) -> i64 {
    sqlx::query_scalar(q).fetch_one(pool).await.unwrap()
}

async fn counts(pool: &sqlx::PgPool) -> (i64, i64, i64) {
    (
        scalar(pool, "SELECT count(*) FROM prompts").await,
        scalar(pool, "SELECT count(*) FROM images").await,
        scalar(pool, "SELECT count(*) FROM imported_pairs").await,
    )
}

fn sha256(b: &[u8]) -> String {
    store::sha256_hex(b)
}

/// ShapesWorld PNGs a.png, b.png and a JPEG c.jpg in `dir`.
fn images(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let gen = dir.join("gen");
    ok(rlaifd(&["shapes", "gen", "--seed", "4242", "--count", "3", "--out", gen.to_str().unwrap()]), "shapes gen");
    let mut out = Vec::new();
    for (i, name) in ["a.png", "b.png"].iter().enumerate() {
        let b = std::fs::read(gen.join(format!("{i:06}.png"))).unwrap();
        std::fs::write(dir.join(name), &b).unwrap();
        out.push((name.to_string(), b));
    }
    let img = image::open(gen.join("000002.png")).unwrap().to_rgb8();
    let mut jpg = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut jpg), image::ImageFormat::Jpeg).unwrap();
    std::fs::write(dir.join("c.jpg"), &jpg).unwrap();
    out.push(("c.jpg".into(), jpg));
    out
}

/// A PNG whose header declares `w` x `h` (with valid CRCs) and holds no pixels: refused from its header.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc32(&ihdr).to_be_bytes());
    // An empty zlib stream as the only pixel data (the decoder reads the header up to here).
    let mut idat = b"IDAT".to_vec();
    idat.extend([0x78, 0x01, 0x01, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x01]);
    png.extend(11u32.to_be_bytes());
    png.extend(&idat);
    png.extend(crc32(&idat).to_be_bytes());
    png.extend(0u32.to_be_bytes());
    png.extend(b"IEND");
    png.extend(crc32(b"IEND").to_be_bytes());
    png
}

fn the_rows() -> Vec<Value> {
    vec![
        json!({"image": "a.png", "question": "Describe the image.", "chosen": "There is a red circle.", "rejected": "There is a red circle and a dog.", "idx": "7"}),
        json!({"image": "a.png", "question": "Describe the image.", "chosen": "A red circle is in the image.", "rejected": "A blue square is in the image.", "idx": "8"}),
        json!({"image": "b.png", "question": "<image>\nWhat shapes are there?", "chosen": "A green triangle.", "rejected": "A green triangle and a yellow star.", "idx": "9"}),
        json!({"image": "c.jpg", "question": "Describe the image.", "chosen": "There is a small square.", "rejected": "There is a cat on a sofa.", "idx": "10"}),
        json!({"image": "a.png", "question": "How many shapes are there?", "chosen": "There is one shape.", "rejected": "There are five shapes.", "idx": "11"}),
    ]
}

/// Loads an export with `datasets` (tools/load_export.py).
fn load_export(py: &Path, file: &Path) -> Value {
    let o = run(Command::new(py).arg(repo().join("tools/load_export.py")).arg(file));
    serde_json::from_str(&ok(o, "tools/load_export.py")).unwrap()
}

fn user_turn(question: &str, image: bool) -> Value {
    let mut content = Vec::new();
    if image {
        content.push(json!({"type": "image", "text": null}));
    }
    content.push(json!({"type": "text", "text": question}));
    json!([{"role": "user", "content": content}])
}

fn assistant_turn(text: &str) -> Value {
    json!([{"role": "assistant", "content": [{"type": "text", "text": text}]}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rlaif_v_parquet_imports_as_prompts_or_pairs_refuses_bad_rows_and_exports_for_trl() {
    let db = common::fresh("dataset").await;
    let (pool, url) = (&db.pool, db.url.as_str());
    let dir = std::env::temp_dir().join(format!("rlaifd-dataset-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let py = python();
    let imgs = images(&dir);
    let file = rlaifv_parquet(&py, &dir, "RLAIF-V-Dataset_000.parquet", &the_rows(), &[]);

    // As prompts: one prompt per (image, question), each image once; the LLaVA placeholder is dropped.
    let r = reports(&ok(import(url, &file, &[]), "import --as prompts"));
    assert_eq!(r.len(), 1);
    assert_eq!((r[0]["rows"].as_i64(), r[0]["prompts_new"].as_i64()), (Some(5), Some(4)), "{r:?}");
    assert_eq!(counts(pool).await, (4, 3, 0));
    let stored: Vec<(String, i32, i32)> =
        sqlx::query_as("SELECT sha256, width, height FROM images ORDER BY sha256").fetch_all(pool).await.unwrap();
    let mut want: Vec<(String, i32, i32)> = imgs
        .iter()
        .map(|(_, b)| {
            let i = image::load_from_memory(b).unwrap();
            (sha256(b), i.width() as i32, i.height() as i32)
        })
        .collect();
    want.sort();
    assert_eq!(stored, want, "the embedded bytes are stored as they are");
    let qs: Vec<(String, String, String)> =
        sqlx::query_as("SELECT instruction, split, source FROM prompts ORDER BY id").fetch_all(pool).await.unwrap();
    assert_eq!(qs[1].0, "What shapes are there?");
    assert!(
        qs.iter().all(|(_, split, src)| split == "train" && src == "rlaif-v:RLAIF-V-Dataset_000.parquet"),
        "{qs:?}"
    );
    // Again: nothing new.
    let r = reports(&ok(import(url, &file, &[]), "import again"));
    assert_eq!(r[0]["prompts_new"].as_i64(), Some(0));
    assert_eq!(counts(pool).await, (4, 3, 0));

    // As pairs: every row is a pair for its (already stored) prompt, with its provenance; again adds nothing.
    let r = reports(&ok(import(url, &file, &["--as", "pairs"]), "import --as pairs"));
    assert_eq!((r[0]["pairs_new"].as_i64(), r[0]["prompts_new"].as_i64()), (Some(5), Some(0)), "{r:?}");
    assert_eq!(counts(pool).await, (4, 3, 5));
    let r = reports(&ok(import(url, &file, &["--as", "pairs"]), "import --as pairs again"));
    assert_eq!((r[0]["pairs_new"].as_i64(), r[0]["pairs_existing"].as_i64()), (Some(0), Some(5)));
    let origin: Value =
        sqlx::query_scalar("SELECT origin FROM imported_pairs ORDER BY id LIMIT 1").fetch_one(pool).await.unwrap();
    assert_eq!((origin["idx"].as_str(), origin["row"].as_i64()), (Some("7"), Some(0)), "{origin}");
    assert_eq!(origin["ds_name"].as_str(), Some("ShapesWorld"));
    // Held-out prompts and --limit.
    let r = reports(&ok(import(url, &file, &["--split", "heldout", "--limit", "2"]), "import --split heldout"));
    assert_eq!((r[0]["rows"].as_i64(), r[0]["prompts_new"].as_i64()), (Some(2), Some(1)));
    assert_eq!(store::count_prompts(pool, "heldout").await.unwrap(), 1);
    let before = counts(pool).await;

    // Bad files: a clear error naming the file (and row), and nothing of that file stored.
    let refused = |o: Output, needle: &str| {
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!o.status.success() && err.contains(needle), "wanted {needle:?} in: {err}");
    };
    let text = dir.join("notes.parquet");
    std::fs::write(&text, "this is not parquet\n").unwrap();
    refused(import(url, &text, &[]), "is not a parquet file");
    refused(import(url, &dir, &[]), "is not a regular file");
    let no_rejected = rlaifv_parquet(&py, &dir, "no-rejected.parquet", &the_rows(), &["--drop", "rejected"]);
    refused(import(url, &no_rejected, &["--as", "pairs"]), "no column \"rejected\"");
    let fresh_rows = |n: usize| -> Vec<Value> {
        (0..n).map(|i| json!({"image": "b.png", "question": format!("Fresh question {i}?"), "chosen": "Yes.", "rejected": "No."})).collect()
    };
    let mut same = fresh_rows(4);
    same[3]["rejected"] = json!("Yes.");
    let f = rlaifv_parquet(&py, &dir, "same.parquet", &same, &[]);
    refused(import(url, &f, &["--as", "pairs"]), "same.parquet row 3: \"chosen\" and \"rejected\" are the same text");
    let mut by_path = fresh_rows(3);
    by_path[1]["image_bytes"] = json!(false);
    let f = rlaifv_parquet(&py, &dir, "by-path.parquet", &by_path, &[]);
    refused(import(url, &f, &[]), "by-path.parquet row 1: the image is not embedded");
    std::fs::write(dir.join("huge.png"), png_header_only(100_000, 100_000)).unwrap();
    let mut huge = fresh_rows(3);
    huge[2]["image"] = json!("huge.png");
    let f = rlaifv_parquet(&py, &dir, "huge.parquet", &huge, &[]);
    refused(import(url, &f, &[]), "huge.parquet row 2: image is 100000x100000; its longer side passes the limit");
    let mut long = fresh_rows(2);
    long[1]["question"] = json!("Why? ".repeat(4000));
    let f = rlaifv_parquet(&py, &dir, "long.parquet", &long, &[]);
    refused(import(url, &f, &[]), "long.parquet row 1: \"question\" is 20000 bytes, more than the limit of 16384");
    assert_eq!(counts(pool).await, before, "a refused file stores nothing");

    // Export the imported pairs; `datasets` loads them with TRL's columns, images and texts as imported.
    let out = dir.join("export.parquet");
    let r: Value = serde_json::from_str(&ok(
        rlaifd(&["export", "--pairs", "imported", "--out", out.to_str().unwrap(), "--database-url", url]),
        "export",
    ))
    .unwrap();
    assert_eq!((r["pairs"].as_i64(), r["images"].as_i64()), (Some(5), Some(5)), "{r}");
    let loaded = load_export(&py, &out);
    assert_eq!(loaded["num_rows"].as_i64(), Some(5));
    assert_eq!(loaded["images_are_images"], json!(true), "{}", loaded["features"]);
    let rows = loaded["rows"].as_array().unwrap();
    for (spec, row) in the_rows().iter().zip(rows) {
        let (name, bytes) = imgs.iter().find(|(n, _)| n == spec["image"].as_str().unwrap()).unwrap();
        let img = image::load_from_memory(bytes).unwrap();
        assert_eq!(row["image_sha256"], json!([sha256(bytes)]), "{name}: the image's bytes come back as imported");
        assert_eq!(row["images"][0]["size"], json!([img.width(), img.height()]), "{name}");
        let q = spec["question"].as_str().unwrap().replace("<image>", "").trim().to_string();
        assert_eq!(row["prompt"], user_turn(&q, true));
        assert_eq!(row["chosen"], assistant_turn(spec["chosen"].as_str().unwrap()));
        assert_eq!(row["rejected"], assistant_turn(spec["rejected"].as_str().unwrap()));
        assert_eq!((row["kind"].as_str(), row["iteration"].is_null()), (Some("imported"), true));
        assert_eq!(row["source"].as_str(), Some("rlaif-v:RLAIF-V-Dataset_000.parquet"));
    }
    // TRL's own preparation (trl.data_utils, as DPOTrainer runs it before tokenizing) takes the rows as
    // conversational preference data and renders them with a chat template: the image placeholder and the question
    // in the prompt, each answer closed by the end-of-turn marker.
    let trl = &loaded["trl"];
    assert_eq!(trl["conversational"], json!(true), "{trl}");
    for (spec, r) in the_rows().iter().zip(trl["rendered"].as_array().unwrap()) {
        let q = spec["question"].as_str().unwrap().replace("<image>", "").trim().to_string();
        let prompt = format!(
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(r["prompt"].as_str(), Some(prompt.as_str()));
        assert_eq!(
            r["chosen"].as_str().map(String::from),
            Some(format!("{}<|im_end|>\n", spec["chosen"].as_str().unwrap()))
        );
        assert_eq!(
            r["rejected"].as_str().map(String::from),
            Some(format!("{}<|im_end|>\n", spec["rejected"].as_str().unwrap()))
        );
    }
    // TRL's vision collator itself (`DataCollatorForVisionPreference`, what DPOTrainer batches vision data with)
    // needs torch, which the test venv does not install: with RLAIFD_TRL_PYTHON naming a Python that has torch,
    // transformers and TRL, one batch of the export goes through it with a LLaVA processor for the bundled model.
    match std::env::var_os("RLAIFD_TRL_PYTHON") {
        Some(trl_py) => {
            let o = run(Command::new(trl_py)
                .arg(repo().join("tools/trl_collator_check.py"))
                .arg(repo().join("assets/shapes-base"))
                .arg(&out)
                .arg("5"));
            let b: Value = serde_json::from_str(ok(o, "tools/trl_collator_check.py").lines().last().unwrap()).unwrap();
            assert_eq!(b["shapes"]["input_ids"][0].as_i64(), Some(10), "chosen and rejected of 5 rows: {b}");
            assert_eq!(b["shapes"]["pixel_values"][0].as_i64(), Some(10), "one image per sequence: {b}");
            assert!(b["image_tokens_per_row"].as_array().unwrap().iter().all(|n| n.as_i64() > Some(0)), "{b}");
            assert!(
                b["chosen"].as_array().unwrap().iter().all(|c| c.as_str().is_some_and(|c| c.ends_with("</s>"))),
                "{b}"
            );
        }
        None => eprintln!("TRL collator check skipped: RLAIFD_TRL_PYTHON is not set (a Python with torch and trl)"),
    }
    // Nothing to export, and contradicting options: clear errors, no file.
    let none = dir.join("none.parquet");
    refused(
        rlaifd(&["export", "--out", none.to_str().unwrap(), "--database-url", url]),
        "holds no pairs from the loop",
    );
    refused(
        rlaifd(&[
            "export",
            "--pairs",
            "imported",
            "--iteration",
            "1",
            "--out",
            none.to_str().unwrap(),
            "--database-url",
            url,
        ]),
        "--iteration selects the loop's pairs",
    );
    assert!(!none.exists());
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// One loop iteration on the bundled model with `loop.imported_pairs = 3`: the candidate trains on the
/// iteration's own pairs and the first three imported pairs (recorded in its training run), and `rlaifd export
/// --pairs all` writes both kinds, the loop's with their iteration, score gap and sampled answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_iteration_trains_on_imported_pairs_and_exports_both_kinds() {
    let db = common::fresh("datasetloop").await;
    let (pool, url) = (&db.pool, db.url.as_str());
    let dir = std::env::temp_dir().join(format!("rlaifd-datasetloop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let py = python();
    images(&dir);
    let model = repo().join("assets/shapes-base");
    let engine = Arc::new(Engine::load(&model, &dir.join("state")).unwrap());
    store::ensure_base(pool, &model.display().to_string(), None).await.unwrap();
    rlaifd::demo::ensure_shapes_prompts(pool, 3, 8, engine.ip.crop_width).await.unwrap();
    let file = rlaifv_parquet(&py, &dir, "RLAIF-V-Dataset_000.parquet", &the_rows(), &[]);
    ok(import(url, &file, &["--as", "pairs"]), "import --as pairs");
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
        imported_pairs: 3,
        ..LoopConfig::default()
    };
    cfg.validate().unwrap();
    let progress: Arc<dyn Fn(Stage, usize, usize) + Send + Sync> = Arc::new(|_, _, _| {});
    let out = run_iteration(pool, &engine, &cfg, "test", progress).await.unwrap();
    let (own, imported): (Vec<i64>, Vec<i64>) =
        sqlx::query_as("SELECT pair_ids, imported_pair_ids FROM training_runs").fetch_one(pool).await.unwrap();
    let first3: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM imported_pairs ORDER BY id LIMIT 3").fetch_all(pool).await.unwrap();
    assert_eq!(imported, first3, "iteration 1 trains on the first three imported pairs");
    assert!(!own.is_empty() && own.len() <= out.pairs, "{own:?} {out:?}");
    let recorded: Value = sqlx::query_scalar("SELECT config FROM training_runs").fetch_one(pool).await.unwrap();
    assert_eq!(recorded["imported_pairs"].as_i64(), Some(3));
    // Iteration 2 would take the next window (wrapping): pairs 4, 5, 1.
    let next = store::imported_pairs_for_iteration(pool, 2, 3).await.unwrap();
    let all: Vec<i64> = sqlx::query_scalar("SELECT id FROM imported_pairs ORDER BY id").fetch_all(pool).await.unwrap();
    assert_eq!(next.iter().map(|p| p.id).collect::<Vec<_>>(), vec![all[3], all[4], all[0]]);

    let exported = dir.join("all.parquet");
    let r: Value = serde_json::from_str(&ok(
        rlaifd(&["export", "--pairs", "all", "--out", exported.to_str().unwrap(), "--database-url", url]),
        "export --pairs all",
    ))
    .unwrap();
    let loop_pairs = scalar(pool, "SELECT count(*) FROM pairs").await;
    assert_eq!((r["loop_pairs"].as_i64(), r["imported_pairs"].as_i64()), (Some(loop_pairs), Some(5)), "{r}");
    let loaded = load_export(&py, &exported);
    let rows = loaded["rows"].as_array().unwrap();
    assert_eq!(rows.len() as i64, loop_pairs + 5);
    type LoopPair = (i64, String, String, String, i32);
    let db_pairs: Vec<LoopPair> = sqlx::query_as(
        "SELECT p.id, pr.instruction, c.text, r.text, p.score_gap FROM pairs p JOIN prompts pr ON pr.id = p.prompt_id
         JOIN responses c ON c.id = p.chosen_id JOIN responses r ON r.id = p.rejected_id ORDER BY p.id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for ((id, q, chosen, rejected, gap), row) in db_pairs.iter().zip(rows) {
        assert_eq!((row["kind"].as_str(), row["pair_id"].as_i64()), (Some("loop"), Some(*id)));
        assert_eq!((row["iteration"].as_i64(), row["score_gap"].as_i64()), (Some(1), Some(*gap as i64)));
        assert_eq!(row["images"].as_array().map(|a| a.len()), Some(1), "every ShapesWorld prompt has its image");
        assert_eq!(row["prompt"], user_turn(q, true));
        assert_eq!((&row["chosen"], &row["rejected"]), (&assistant_turn(chosen), &assistant_turn(rejected)));
    }
    assert!(rows[db_pairs.len()..].iter().all(|r| r["kind"] == "imported"));
    // One iteration's pairs only.
    let one = dir.join("one.parquet");
    let r: Value = serde_json::from_str(&ok(
        rlaifd(&["export", "--iteration", "1", "--out", one.to_str().unwrap(), "--database-url", url]),
        "export --iteration 1",
    ))
    .unwrap();
    assert_eq!(r["pairs"].as_i64(), Some(loop_pairs));
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(&dir);
}
