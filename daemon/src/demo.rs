//! `rlaifd demo`: the loop on the embedded default (the bundled ShapesWorld model labeling itself, generated
//! prompts, PostgreSQL), K iterations, then the lineage, a plot and one JSON line.

use crate::rlaif::{run_iteration, Engine, LoopConfig, Stage};
use crate::store;
use anyhow::{Context, Result};
use engine::shapes::{Scene, WorldConfig, CAPTION_PROMPTS};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(clap::Args, Clone, Debug)]
pub struct DemoArgs {
    /// Iterations to have finished when the demo ends (a rerun on the same state resumes and stops at K).
    #[arg(long, default_value_t = 4)]
    pub iterations: usize,
    /// Where checkpoints, the plot and the summary go.
    #[arg(long, default_value = "rlaifd-demo")]
    pub state_dir: PathBuf,
    /// The base model (HF LLaVA directory).
    #[arg(long, default_value = "assets/shapes-base")]
    pub model: PathBuf,
    /// PostgreSQL URL (default: $DATABASE_URL, else postgres://postgres@127.0.0.1:5432/rlaifd_demo).
    #[arg(long)]
    pub database_url: Option<String>,
    /// Training prompts sampled per iteration.
    #[arg(long, default_value_t = 500)]
    pub prompts_per_iteration: usize,
    /// Held-out images that gate each checkpoint.
    #[arg(long, default_value_t = 200)]
    pub eval_count: usize,
    /// Override a loop setting (see config/default.toml, section [loop]), e.g. --set lr=1e-4; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Seed of the prompts and of the loop.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// The demo's loop settings: RLAIF-V's, except for what a 2 MB model whose answers are a dozen words needs.
/// Measured on ShapesWorld (BENCHMARKS.md): with RLAIF-V's length balancing DPO only swaps one object for another
/// and CHAIR_i rises; without it plain DPO collapses the captions (Cover 7 %); without balancing but with an NLL
/// term on the chosen answer (RPO, weight 3), lr 2e-4 and one epoch, CHAIR_i falls and Cover holds.
pub fn demo_config(a: &DemoArgs) -> Result<LoopConfig> {
    let cfg = LoopConfig {
        max_new_tokens: 48,
        length_balance: false,
        nll_weight: 3.0,
        lr: 2e-4,
        epochs: 1,
        prompts_per_iteration: a.prompts_per_iteration,
        pairs_per_iteration: a.prompts_per_iteration,
        eval_count: a.eval_count,
        seed: a.seed,
        ..LoopConfig::default()
    };
    let mut v = serde_json::to_value(&cfg)?;
    for o in &a.overrides {
        let Some((k, val)) = o.split_once('=') else { anyhow::bail!("--set {o}: expected KEY=VALUE, e.g. --set lr=1e-4") };
        let Some(slot) = v.get_mut(k.trim()) else { anyhow::bail!("--set {o}: unknown loop setting {k:?}") };
        *slot = serde_json::from_str(val.trim()).unwrap_or_else(|_| serde_json::Value::String(val.trim().to_string()));
    }
    let cfg: LoopConfig = serde_json::from_value(v).map_err(|e| anyhow::anyhow!("--set: {e}"))?;
    cfg.validate()?;
    Ok(cfg)
}

/// Makes sure `count` ShapesWorld caption prompts exist (images stored in the database, ground truth kept).
pub async fn ensure_shapes_prompts(pool: &sqlx::PgPool, seed: u64, count: usize, size: u32) -> Result<()> {
    let have = store::count_prompts(pool, "train").await? as usize;
    let cfg = WorldConfig { size, ..Default::default() };
    for i in have..count {
        let s = engine::rng::SplitMix64::new(seed.wrapping_add(2_000_000 + i as u64)).next_u64();
        let scene = Scene::generate(&cfg, s);
        let mut png = Vec::new();
        scene.render(&cfg, s).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
        let sha = store::insert_image(pool, &png).await?;
        let p = store::NewPrompt {
            image_sha256: Some(sha),
            instruction: CAPTION_PROMPTS[i % CAPTION_PROMPTS.len()].to_string(),
            source: "shapesworld".into(),
            split: "train".into(),
            ground_truth: Some(serde_json::json!({ "objects": scene.phrases(), "scene_seed": s })),
        };
        store::insert_prompt(pool, &p).await?;
    }
    Ok(())
}

fn bar(done: usize, total: usize) -> String {
    let w = 30;
    let filled = (done * w).checked_div(total).unwrap_or(w).min(w);
    format!("[{}{}] {done}/{total}", "#".repeat(filled), " ".repeat(w - filled))
}

pub async fn run(a: DemoArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let cfg = demo_config(&a)?;
    std::fs::create_dir_all(&a.state_dir).with_context(|| format!("cannot create state directory {}", a.state_dir.display()))?;
    // Checkpoint rows record absolute paths, so the lineage stays valid from any working directory.
    let state_dir = std::fs::canonicalize(&a.state_dir).with_context(|| format!("cannot resolve {}", a.state_dir.display()))?;
    let a = DemoArgs { state_dir, ..a };
    let url = a.database_url.clone().or_else(|| std::env::var("DATABASE_URL").ok().filter(|s| !s.is_empty())).unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/rlaifd_demo".into());
    let pool = crate::db::open(&url, 4).await.context(
        "the demo needs PostgreSQL: start a server (Debian/Ubuntu: `apt install postgresql && service postgresql start`; \
         or `docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:16`) or set DATABASE_URL / --database-url \
         (e.g. postgres://postgres@127.0.0.1:5432/rlaifd_demo)",
    )?;
    eprintln!("database {} (migrated)", crate::db::redacted(&url));
    let model_dir = a.model.clone();
    let state = a.state_dir.clone();
    let labeler = cfg.labeler.clone();
    let engine = Arc::new(tokio::task::spawn_blocking(move || Engine::load(&model_dir, &state)?.with_labeler(&labeler)).await??);
    let base_path = std::fs::canonicalize(&a.model).unwrap_or(a.model.clone()).display().to_string();
    let base = store::ensure_base(&pool, &base_path, None).await?;
    if base.metrics.as_ref().and_then(|m| m.get("chair_i")).is_none() {
        eprintln!("evaluating the base model on {} held-out images", cfg.eval_count);
        let m = crate::rlaif::evaluate(&pool, &engine, &cfg, &base).await?;
        store::set_metrics(&pool, base.id, &m).await?;
    }
    let tty = std::io::stderr().is_terminal();
    let progress: Arc<dyn Fn(Stage, usize, usize) + Send + Sync> = Arc::new(move |stage, done, total| {
        let name = match stage {
            Stage::Sample => "sample+label",
            Stage::Label => "label",
            Stage::Train => "train (DPO steps)",
            Stage::Evaluate => "evaluate",
        };
        if tty {
            eprint!("\r  {name:<18} {}   ", bar(done, total));
            if done == total {
                eprintln!();
            }
        } else if done == total || done % 10 == 0 {
            eprintln!("  {name:<18} {done}/{total}");
        }
    });
    // One demo worker per state directory: a restart reclaims the jobs its killed predecessor held.
    let owner = format!("demo:{}", a.state_dir.display());
    let released = store::release_leases(&pool, &owner).await?;
    if released > 0 {
        eprintln!("resuming: {released} job(s) left running by a previous run returned to the queue");
    }
    while (store::finished_iterations(&pool).await? as usize) < a.iterations {
        // Fresh prompts for the iteration (an iteration short of pairs samples more, so top up each time).
        let unused = store::count_unused_train_prompts(&pool).await? as usize;
        if unused < 2 * cfg.prompts_per_iteration {
            let total = store::count_prompts(&pool, "train").await? as usize;
            ensure_shapes_prompts(&pool, a.seed, total + 2 * cfg.prompts_per_iteration - unused, engine.ip.crop_width).await?;
        }
        let n = store::finished_iterations(&pool).await? + 1;
        eprintln!("iteration {n}/{}", a.iterations);
        let out = run_iteration(&pool, &engine, &cfg, &owner, progress.clone()).await?;
        eprintln!(
            "  checkpoint {} {} (CHAIR_i {:.3}, Cover {:.3}, {} pairs)",
            out.candidate,
            if out.promoted { "promoted" } else { "rejected" },
            out.metrics["chair_i"].as_f64().unwrap_or(f64::NAN),
            out.metrics["cover"].as_f64().unwrap_or(f64::NAN),
            out.pairs
        );
    }
    let rows = store::checkpoints(&pool).await?;
    println!("{:<4} {:<7} {:<5} {:<10} {:>8} {:>8} {:>8} {:>9}", "id", "parent", "iter", "status", "CHAIR_i", "CHAIR_s", "Cover", "yes/no");
    let f = |m: &Option<serde_json::Value>, k: &str| m.as_ref().and_then(|m| m.get(k)).and_then(|v| v.as_f64()).map_or("-".to_string(), |v| format!("{:.3}", v));
    for r in &rows {
        println!(
            "{:<4} {:<7} {:<5} {:<10} {:>8} {:>8} {:>8} {:>9}",
            r.id,
            r.parent_id.map_or("-".into(), |p| p.to_string()),
            r.iteration,
            r.status,
            f(&r.metrics, "chair_i"),
            f(&r.metrics, "chair_s"),
            f(&r.metrics, "cover"),
            f(&r.metrics, "existence_accuracy")
        );
    }
    let plot = a.state_dir.join("hallucination.svg");
    write_plot(&plot, &rows)?;
    let promoted = store::promoted(&pool).await?.context("no promoted checkpoint")?;
    let base = store::base(&pool).await?;
    let summary = serde_json::json!({
        "base": base.metrics,
        "promoted": { "checkpoint": promoted.id, "adapter": if promoted.kind == "base" { serde_json::Value::Null } else { promoted.path.clone().into() }, "metrics": promoted.metrics },
        "iterations": a.iterations,
        "seconds": t0.elapsed().as_secs_f64(),
        "plot": plot.display().to_string(),
    });
    println!("{summary}");
    Ok(())
}

/// CHAIR_i and Cover of every checkpoint against its iteration (promoted filled, rejected hollow), as SVG.
pub fn write_plot(path: &Path, rows: &[store::CheckpointRow]) -> Result<()> {
    let (w, h, m) = (640.0, 360.0, 48.0);
    let max_it = rows.iter().map(|r| r.iteration).max().unwrap_or(1).max(1) as f64;
    let x = |it: f64| m + (w - 2.0 * m) * it / max_it;
    let y = |v: f64| h - m - (h - 2.0 * m) * v.clamp(0.0, 1.0);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    s += &format!("<line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>\n", h - m, w - m, h - m, h - m);
    for t in 0..=4 {
        let v = t as f64 / 4.0;
        s += &format!("<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.2}</text>\n", m - 4.0, y(v) + 4.0, v);
    }
    for it in 0..=max_it as i64 {
        s += &format!("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{it}</text>\n", x(it as f64), h - m + 16.0);
    }
    s += &format!("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">iteration</text>\n", w / 2.0, h - 8.0);
    for (key, color, label_y) in [("chair_i", "#c0392b", 20.0), ("cover", "#2471a3", 36.0)] {
        let promoted: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.status == "promoted" || r.status == "retired")
            .filter_map(|r| r.metrics.as_ref().and_then(|m| m.get(key)).and_then(|v| v.as_f64()).map(|v| (r.iteration as f64, v)))
            .collect();
        let pts: Vec<String> = promoted.iter().map(|&(i, v)| format!("{:.1},{:.1}", x(i), y(v))).collect();
        s += &format!("<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n", pts.join(" "));
        for r in rows {
            if let Some(v) = r.metrics.as_ref().and_then(|m| m.get(key)).and_then(|v| v.as_f64()) {
                let fill = if r.status == "rejected" { "white" } else { color };
                s += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{fill}\" stroke=\"{color}\"/>\n", x(r.iteration as f64), y(v));
            }
        }
        s += &format!("<text x=\"{}\" y=\"{label_y}\" fill=\"{color}\">{}</text>\n", w - m - 80.0, if key == "chair_i" { "CHAIR_i" } else { "Cover" });
    }
    s += "</svg>\n";
    std::fs::write(path, s).with_context(|| format!("cannot write {}", path.display()))
}
