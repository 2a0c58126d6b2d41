//! `rlaifd demo`: the daemon (`serve::run_async`: actors, HTTP server, control socket) on the embedded default —
//! the bundled ShapesWorld model labeling itself, generated prompts, PostgreSQL — until K iterations are done,
//! then the lineage, a plot and one JSON line.

use crate::rlaif::LoopConfig;
use crate::store;
use anyhow::{Context, Result};
use engine::shapes::{Scene, WorldConfig, CAPTION_PROMPTS};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

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
    /// PostgreSQL URL (default: $DATABASE_URL, else postgres://postgres@127.0.0.1:5432/rlaifd_demo; when nothing
    /// answers there and the server is installed, a private cluster in STATE/postgres on a Unix socket).
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
    /// Where generation and scoring run: auto, cpu, cuda or cuda:N (model.device).
    #[arg(long, default_value = "auto")]
    pub device: String,
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
        // `--set extractor=llm` divides with the bundled ShapesWorld divide model when it is there (it stays
        // unused under the demo's exact extractor).
        extractor_model: std::fs::canonicalize("assets/shapes-divide")
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "self".into()),
        ..LoopConfig::default()
    };
    let mut v = serde_json::to_value(&cfg)?;
    for o in &a.overrides {
        let Some((k, val)) = o.split_once('=') else {
            anyhow::bail!("--set {o}: expected KEY=VALUE, e.g. --set lr=1e-4")
        };
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
        let c = cfg.clone();
        // Rendering and PNG encoding are CPU work: off the async runtime.
        let (scene, png) = tokio::task::spawn_blocking(move || -> Result<(Scene, Vec<u8>)> {
            let scene = Scene::generate(&c, s);
            let mut png = Vec::new();
            scene.render(&c, s).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
            Ok((scene, png))
        })
        .await
        .context("scene rendering task")??;
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

/// The daemon's configuration for the demo: the embedded defaults with the demo's loop settings, the state
/// directory, the database, an HTTP port picked by the system and iterations up to K.
pub fn daemon_config(a: &DemoArgs, url: &str) -> Result<crate::config::Config> {
    let mut cfg = crate::config::Config::from_toml_bytes(b"")?;
    cfg.database.url = url.to_string();
    cfg.database.max_connections = 4;
    cfg.model.path =
        std::fs::canonicalize(&a.model).with_context(|| format!("--model {}: no such directory", a.model.display()))?;
    cfg.state.dir = a.state_dir.clone();
    cfg.model.device = a.device.clone();
    cfg.model.devices = crate::config::DeviceList::Many(Vec::new());
    cfg.model.device_spec().map_err(|e| anyhow::anyhow!("--device: {e:#}"))?;
    cfg.server.bind = "127.0.0.1:0".into();
    cfg.daemon.auto_iterate = true;
    cfg.daemon.prompt_source = "shapes".into();
    cfg.daemon.poll_s = 0.2;
    cfg.daemon.max_iterations = a.iterations as u64;
    cfg.log.level = "warn".into();
    cfg.loop_ = demo_config(a)?;
    cfg.validate()?;
    Ok(cfg)
}

/// Runs the daemon (actors, HTTP server, control socket) on the embedded default until K iterations are done,
/// showing each stage's progress, then prints the lineage, writes the plot and prints one JSON line.
/// The demo's database when nothing says otherwise, and the address probed for it.
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/rlaifd_demo";
const DEFAULT_ADDR: &str = "127.0.0.1:5432";

pub fn run(a: DemoArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    std::fs::create_dir_all(&a.state_dir)
        .with_context(|| format!("cannot create state directory {}", a.state_dir.display()))?;
    // Checkpoint rows record absolute paths, so the lineage stays valid from any working directory.
    let state_dir =
        std::fs::canonicalize(&a.state_dir).with_context(|| format!("cannot resolve {}", a.state_dir.display()))?;
    let a = DemoArgs { state_dir, ..a };
    let given = a.database_url.clone().or_else(|| std::env::var("DATABASE_URL").ok().filter(|s| !s.is_empty()));
    // Nothing set and no server at the default address: a private cluster in the state directory, when the
    // server's binaries are installed (else the connection error below says how to get a server).
    let (url, mut cluster) = match given {
        Some(u) => (u, None),
        None if crate::private_pg::answers(DEFAULT_ADDR) => (DEFAULT_URL.to_string(), None),
        None => match crate::private_pg::server_bins() {
            Some(bins) => {
                eprintln!(
                    "rlaifd demo: no PostgreSQL answers at {DEFAULT_ADDR}; starting a private cluster in {} (Unix socket \
                     only), stopped when the demo ends",
                    a.state_dir.join("postgres").display()
                );
                let (c, u) = crate::private_pg::PrivateCluster::start(&a.state_dir, &bins, "rlaifd_demo")?;
                (u, Some(c))
            }
            None => (DEFAULT_URL.to_string(), None),
        },
    };
    let cfg = daemon_config(&a, &url)?;
    crate::serve::init_tracing(&cfg);
    eprintln!(
        "rlaifd demo: the daemon on {} (database {}, state {}), {} iterations",
        cfg.model.path.display(),
        crate::db::redacted(&url),
        a.state_dir.display(),
        a.iterations
    );
    let k = a.iterations;
    // Kept to the end: dropping the system drops the actors' pending futures, whose database connections need
    // the runtime (a SIGTERM or Ctrl-C mid-run would abort with a panic in a destructor).
    let system = actix::System::new();
    let res = system.block_on(async move {
        let why = crate::serve::run_async(cfg, None, Some(Box::pin(watch(url.clone(), k)))).await.map_err(|e| {
            // Only a database error gets the hint on starting PostgreSQL; a configuration error speaks for itself.
            if e.chain().any(|c| c.downcast_ref::<sqlx::Error>().is_some()) {
                e.context(
                    "the demo needs PostgreSQL: start a server (Debian/Ubuntu: `apt install postgresql && service postgresql start`; \
                     or `docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:16`) or set DATABASE_URL / --database-url \
                     (e.g. postgres://postgres@127.0.0.1:5432/rlaifd_demo)",
                )
            } else {
                e
            }
        })?;
        if why != "finished" {
            anyhow::bail!("the demo stopped early ({why}); run it again to resume");
        }
        let pool = crate::db::connect(&url, 2).await?;
        report(&pool, &a, t0).await
    });
    if let Some(c) = cluster.as_mut() {
        c.stop();
    }
    // Everything is stored: exit without running the actors' destructors outside the runtime (as `serve` does).
    match res {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("rlaifd: {e:#}");
            std::process::exit(1)
        }
    }
}

/// Shows the loop's progress from the database until `k` iterations are done ("finished"), or until three
/// iterations failed ("failed").
async fn watch(url: String, k: usize) -> &'static str {
    let pool = loop {
        match crate::db::connect(&url, 1).await {
            Ok(p) => break p,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
        }
    };
    let tty = std::io::stderr().is_terminal();
    let mut reported: i64 = 0;
    let mut last_key = (0, "", usize::MAX);
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let Ok(done) = store::finished_iterations(&pool).await else { continue };
        // Newly decided candidates.
        let decided = store::decided_since(&pool, reported).await.unwrap_or_default();
        for (id, it, status, m, pairs) in decided {
            let f = |k: &str| m.as_ref().and_then(|m| m.get(k)).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
            let verdict = if status == "rejected" { "rejected" } else { "promoted" };
            if tty {
                eprintln!();
            }
            eprintln!(
                "  iteration {it}: checkpoint {id} {verdict} (CHAIR_i {:.3}, Cover {:.3}, {pairs} pairs)",
                f("chair_i"),
                f("cover")
            );
            reported = id;
        }
        let failed = store::count_failed_iterations(&pool).await.unwrap_or(0);
        if done as usize >= k {
            return "finished";
        }
        if failed >= 3 {
            let why = store::last_failure_reason(&pool).await.ok().flatten();
            eprintln!("three iterations failed; the last: {}", why.unwrap_or_default());
            return "failed";
        }
        // The open iteration's stage and, while sampling, its jobs.
        let Some(it) = store::open_iteration(&pool).await.ok().flatten() else { continue };
        let (open, jobs_done, _) = store::job_counts(&pool, it.id).await.unwrap_or((0, 0, 0));
        let total = (open + jobs_done).max(1) as usize;
        let name = match it.stage.as_str() {
            "sampling" => "sample+label",
            "training" => "train (DPO)",
            "evaluating" => "evaluate",
            s => s,
        };
        let line = if it.stage == store::Stage::Sampling {
            format!("iteration {}/{k} {name:<13} {}", it.number, bar(jobs_done as usize, total))
        } else {
            format!("iteration {}/{k} {name}", it.number)
        };
        if tty {
            eprint!("\r  {line:<70}");
        } else {
            // Without a terminal: one line per stage and per tenth of the jobs.
            let key = (
                it.number,
                it.stage.as_str(),
                if it.stage == store::Stage::Sampling { jobs_done as usize * 10 / total } else { 0 },
            );
            if key != last_key {
                eprintln!("  {line}");
                last_key = key;
            }
        }
    }
}

/// The lineage table, the plot and the JSON summary.
async fn report(pool: &sqlx::PgPool, a: &DemoArgs, t0: std::time::Instant) -> Result<()> {
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    let rows = store::checkpoints(pool).await?;
    println!(
        "{:<4} {:<7} {:<5} {:<10} {:>8} {:>8} {:>8} {:>9}",
        "id", "parent", "iter", "status", "CHAIR_i", "CHAIR_s", "Cover", "yes/no"
    );
    let f = |m: &Option<serde_json::Value>, k: &str| {
        m.as_ref().and_then(|m| m.get(k)).and_then(|v| v.as_f64()).map_or("-".to_string(), |v| format!("{:.3}", v))
    };
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
    let promoted = store::promoted(pool).await?.context("no promoted checkpoint")?;
    let base = store::base(pool).await?;
    let cuts = paper_comparison(base.metrics.as_ref(), promoted.metrics.as_ref());
    let summary = serde_json::json!({
        "base": base.metrics,
        "promoted": { "checkpoint": promoted.id, "adapter": if promoted.kind == store::CheckpointKind::Base { serde_json::Value::Null } else { promoted.path.clone().into() }, "metrics": promoted.metrics },
        "iterations": a.iterations,
        "seconds": t0.elapsed().as_secs_f64(),
        "plot": plot.display().to_string(),
        "vs_paper": cuts,
    });
    println!("{summary}");
    Ok(())
}

/// RLAIF-V's headline (LLaVA-1.5-7B on Object HalBench, response- and mention-level CHAIR in %): before and after.
const PAPER_CHAIR_S: (f64, f64) = (53.6, 8.5);
const PAPER_CHAIR_I: (f64, f64) = (25.2, 4.3);

/// The relative change base -> promoted of CHAIR_i, CHAIR_s and Cover, printed next to the paper's, and as JSON.
fn paper_comparison(base: Option<&serde_json::Value>, promoted: Option<&serde_json::Value>) -> serde_json::Value {
    let get = |m: Option<&serde_json::Value>, k: &str| m.and_then(|m| m.get(k)).and_then(|v| v.as_f64());
    let change = |k: &str| match (get(base, k), get(promoted, k)) {
        (Some(b), Some(p)) if b > 0.0 => Some((p - b) / b),
        _ => None,
    };
    let paper = |(b, a): (f64, f64)| (a - b) / b;
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:+.0} %", 100.0 * v));
    println!("relative change, base -> promoted   this demo (ShapesWorld)   RLAIF-V (LLaVA-1.5-7B, Object HalBench)");
    println!(
        "  CHAIR_i (mention level)           {:>10}                {:+.0} % ({} -> {})",
        pct(change("chair_i")),
        100.0 * paper(PAPER_CHAIR_I),
        PAPER_CHAIR_I.0,
        PAPER_CHAIR_I.1
    );
    println!(
        "  CHAIR_s (response level)          {:>10}                {:+.0} % ({} -> {})",
        pct(change("chair_s")),
        100.0 * paper(PAPER_CHAIR_S),
        PAPER_CHAIR_S.0,
        PAPER_CHAIR_S.1
    );
    println!("  Cover (objects mentioned)         {:>10}                not in that table", pct(change("cover")));
    serde_json::json!({
        "chair_i": change("chair_i"),
        "chair_s": change("chair_s"),
        "cover": change("cover"),
        "paper_chair_i": paper(PAPER_CHAIR_I),
        "paper_chair_s": paper(PAPER_CHAIR_S),
    })
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
            .filter(|r| matches!(r.status, store::CheckpointStatus::Promoted | store::CheckpointStatus::Retired))
            .filter_map(|r| {
                r.metrics.as_ref().and_then(|m| m.get(key)).and_then(|v| v.as_f64()).map(|v| (r.iteration as f64, v))
            })
            .collect();
        let pts: Vec<String> = promoted.iter().map(|&(i, v)| format!("{:.1},{:.1}", x(i), y(v))).collect();
        s += &format!("<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n", pts.join(" "));
        for r in rows {
            if let Some(v) = r.metrics.as_ref().and_then(|m| m.get(key)).and_then(|v| v.as_f64()) {
                let fill = if r.status == store::CheckpointStatus::Rejected { "white" } else { color };
                s += &format!(
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{fill}\" stroke=\"{color}\"/>\n",
                    x(r.iteration as f64),
                    y(v)
                );
            }
        }
        s += &format!(
            "<text x=\"{}\" y=\"{label_y}\" fill=\"{color}\">{}</text>\n",
            w - m - 80.0,
            if key == "chair_i" { "CHAIR_i" } else { "Cover" }
        );
    }
    s += "</svg>\n";
    std::fs::write(path, s).with_context(|| format!("cannot write {}", path.display()))
}

/// An SVG of CHAIR_i and Cover against N for best-of-N captions (`rlaifd eval hallucination --best-of`): `points`
/// are (N, CHAIR_i, Cover), N on a log2 axis.
pub fn write_best_of_plot(path: &Path, points: &[(usize, f64, f64)], temperature: f32) -> Result<()> {
    let (w, h, m) = (640.0, 360.0, 48.0);
    let max_log = points.iter().map(|p| (p.0.max(1) as f64).log2()).fold(1.0f64, f64::max);
    let x = |n: usize| m + (w - 2.0 * m) * (n.max(1) as f64).log2() / max_log;
    let y = |v: f64| h - m - (h - 2.0 * m) * v.clamp(0.0, 1.0);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    s += &format!("<line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>\n", h - m, w - m, h - m, h - m);
    for t in 0..=4 {
        let v = t as f64 / 4.0;
        s += &format!("<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.2}</text>\n", m - 4.0, y(v) + 4.0, v);
    }
    for p in points {
        s += &format!("<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", x(p.0), h - m + 16.0, p.0);
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">N (best of N samples at temperature {temperature}, by the implicit reward)</text>\n",
        w / 2.0,
        h - 8.0
    );
    for (pick, color, label, label_y) in [(1usize, "#c0392b", "CHAIR_i", 20.0), (2usize, "#2471a3", "Cover", 36.0)] {
        let v = |p: &(usize, f64, f64)| if pick == 1 { p.1 } else { p.2 };
        let pts: Vec<String> = points.iter().map(|p| format!("{:.1},{:.1}", x(p.0), y(v(p)))).collect();
        s += &format!("<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n", pts.join(" "));
        for p in points {
            s += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{color}\"/>\n", x(p.0), y(v(p)));
        }
        s += &format!("<text x=\"{}\" y=\"{label_y}\" fill=\"{color}\">{label}</text>\n", w - m - 80.0);
    }
    s += "</svg>\n";
    std::fs::write(path, s).with_context(|| format!("cannot write {}", path.display()))
}
