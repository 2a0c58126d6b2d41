//! `rlaifd demo`: the daemon (`serve::run_async`: actors, HTTP server, control socket) on the embedded default —
//! the bundled ShapesWorld model labeling itself, generated prompts, PostgreSQL — until K iterations are done,
//! then the lineage, a plot and one JSON line.

use crate::rlaif::LoopConfig;
use crate::store;
use anyhow::{Context, Result};
use engine::shapes::{Scene, WorldConfig, CAPTION_PROMPTS};
use plotters::chart::SeriesLabelPosition;
use plotters::prelude::{
    BindKeyPoints, ChartBuilder, Circle, Color, IntoDrawingArea, IntoLogRange, LineSeries, PathElement, RGBColor,
    SVGBackend, BLACK, WHITE,
};
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

// Both plots are drawn with plotters' SVG backend and no font feature ("ttf" would link fontconfig and freetype,
// "ab_glyph" would need a font file registered at run time): the backend writes each label as an SVG <text> that the
// viewer lays out with its own fonts, and plotters' built-in estimate of a label's width is enough to place the axes
// and the legend. So the daemon draws them on a headless server with no fonts installed.

/// Width and height of both plots, in pixels.
const PLOT_SIZE: (u32, u32) = (640, 360);
/// Family and size of every label: plotters' size 15 is written as font-size 12 (px) in the SVG.
const PLOT_FONT: (&str, u32) = ("sans-serif", 15);
/// The metrics both plots draw: key in a checkpoint's metrics, label, colour.
const PLOT_METRICS: [(&str, &str, RGBColor); 2] =
    [("chair_i", "CHAIR_i", RGBColor(0xc0, 0x39, 0x2b)), ("cover", "Cover", RGBColor(0x24, 0x71, 0xa3))];

/// A metric of a checkpoint, clamped to the plots' 0..1 y axis.
fn checkpoint_metric(row: &store::CheckpointRow, key: &str) -> Option<f64> {
    row.metrics.as_ref().and_then(|m| m.get(key)).and_then(|v| v.as_f64()).map(|v| v.clamp(0.0, 1.0))
}

/// The legend's sample of a series: a short stroke in its colour.
fn legend_line(color: RGBColor) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
}

/// Writes an SVG drawn into a string, so that a failure to write names the file.
/// The series' legend, boxed in the upper right corner, as both plots draw it.
fn draw_legend<'a, 'b: 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut plotters::chart::ChartContext<'a, SVGBackend<'b>, CT>,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(PLOT_FONT)
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn write_svg(path: &Path, svg: &str) -> Result<()> {
    std::fs::write(path, svg).with_context(|| format!("cannot write the plot {}", path.display()))
}

/// CHAIR_i and Cover of every checkpoint against its iteration, as SVG: a line through the checkpoints that were
/// served (promoted, then retired), promoted ones filled and rejected ones hollow. It needs no system fonts:
/// see the note above `PLOT_SIZE`.
pub fn write_plot(path: &Path, rows: &[store::CheckpointRow]) -> Result<()> {
    let max_iteration = rows.iter().map(|r| r.iteration).max().unwrap_or(1).max(1);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(44)
            .build_cartesian_2d(0..max_iteration, 0.0..1.0)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .label_style(PLOT_FONT)
            .axis_desc_style(PLOT_FONT)
            .x_labels((max_iteration as usize + 1).min(11))
            .y_labels(6)
            .y_label_formatter(&|v| format!("{v:.1}"))
            .x_desc("iteration")
            .draw()?;
        for (key, label, color) in PLOT_METRICS {
            let served = rows
                .iter()
                .filter(|r| matches!(r.status, store::CheckpointStatus::Promoted | store::CheckpointStatus::Retired))
                .filter_map(|r| Some((r.iteration, checkpoint_metric(r, key)?)));
            chart.draw_series(LineSeries::new(served, color.stroke_width(2)))?.label(label).legend(legend_line(color));
            chart.draw_series(rows.iter().filter_map(|r| {
                let style =
                    if r.status == store::CheckpointStatus::Rejected { color.stroke_width(1) } else { color.filled() };
                Some(Circle::new((r.iteration, checkpoint_metric(r, key)?), 4, style))
            }))?;
        }
        draw_legend(&mut chart)?;
        root.present()?;
    }
    write_svg(path, &svg)
}

/// An SVG of CHAIR_i and Cover against N for best-of-N captions (`rlaifd eval hallucination --best-of`): `points`
/// are (N, CHAIR_i, Cover), N on a log2 axis with a tick at each N. It needs no system fonts:
/// see the note above `PLOT_SIZE`.
pub fn write_best_of_plot(path: &Path, points: &[(usize, f64, f64)], temperature: f32) -> Result<()> {
    // A log axis cannot hold N = 0, and 1..1 would be empty.
    let points: Vec<(usize, f64, f64)> = points.iter().map(|&(n, c, v)| (n.max(1), c, v)).collect();
    let max_n = points.iter().map(|p| p.0).max().unwrap_or(2).max(2);
    let mut ticks: Vec<usize> = points.iter().map(|p| p.0).collect();
    ticks.sort_unstable();
    ticks.dedup();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(44)
            .build_cartesian_2d((1..max_n).log_scale().base(2.0).with_key_points(ticks), 0.0..1.0)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .label_style(PLOT_FONT)
            .axis_desc_style(PLOT_FONT)
            .y_labels(6)
            .y_label_formatter(&|v| format!("{v:.1}"))
            .x_desc(format!("N (best of N samples at temperature {temperature}, by the implicit reward)"))
            .draw()?;
        for (pick, (_, label, color)) in PLOT_METRICS.into_iter().enumerate() {
            let value = move |p: &(usize, f64, f64)| (p.0, if pick == 0 { p.1 } else { p.2 }.clamp(0.0, 1.0));
            chart
                .draw_series(LineSeries::new(points.iter().map(value), color.stroke_width(2)))?
                .label(label)
                .legend(legend_line(color));
            chart.draw_series(points.iter().map(|p| Circle::new(value(p), 4, color.filled())))?;
        }
        draw_legend(&mut chart)?;
        root.present()?;
    }
    write_svg(path, &svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(
        id: i64,
        iteration: i32,
        status: store::CheckpointStatus,
        metrics: Option<(f64, f64)>,
    ) -> store::CheckpointRow {
        store::CheckpointRow {
            id,
            parent_id: (id > 1).then_some(id - 1),
            iteration,
            kind: if id == 1 { store::CheckpointKind::Base } else { store::CheckpointKind::Lora },
            path: format!("adapters/{id}"),
            sha256: None,
            status,
            metrics: metrics.map(|(chair_i, cover)| serde_json::json!({ "chair_i": chair_i, "cover": cover })),
        }
    }

    /// The `cx` of every `<circle>`, in drawing order.
    fn circle_xs(svg: &str) -> Vec<f64> {
        svg.split("<circle")
            .skip(1)
            .map(|c| c.split("cx=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap())
            .collect()
    }

    fn assert_whole_svg(svg: &str) {
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"), "{svg}");
        assert!(svg.contains("width=\"640\"") && svg.contains("height=\"360\""), "{svg}");
    }

    #[test]
    fn plots_have_a_marker_per_measured_checkpoint_and_their_labels() {
        let dir = std::env::temp_dir().join(format!("rlaifd-plots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        use store::CheckpointStatus::{Candidate, Promoted, Rejected, Retired};
        let rows = [
            checkpoint(1, 0, Retired, Some((0.40, 0.50))),
            checkpoint(2, 1, Rejected, Some((0.45, 0.48))),
            checkpoint(3, 2, Promoted, Some((0.20, 0.55))),
            checkpoint(4, 3, Candidate, None),
        ];
        let lineage = dir.join("hallucination.svg");
        write_plot(&lineage, &rows).unwrap();
        let svg = std::fs::read_to_string(&lineage).unwrap();
        assert_whole_svg(&svg);
        for label in ["CHAIR_i", "Cover", "iteration"] {
            assert!(svg.contains(label), "{label} missing from {svg}");
        }
        assert_eq!(svg.matches("<circle").count(), 2 * 3, "two metrics of three measured checkpoints: {svg}");
        assert_eq!(svg.matches("fill=\"none\" stroke=\"#C0392B\"").count(), 1, "the rejected CHAIR_i is hollow: {svg}");
        assert_eq!(svg.matches("fill=\"none\" stroke=\"#2471A3\"").count(), 1, "the rejected Cover is hollow: {svg}");

        let best_of = dir.join("best_of.svg");
        let points = [(1, 0.30, 0.50), (2, 0.25, 0.52), (4, 0.20, 0.55), (8, 0.18, 0.56)];
        write_best_of_plot(&best_of, &points, 0.7).unwrap();
        let svg = std::fs::read_to_string(&best_of).unwrap();
        assert_whole_svg(&svg);
        for label in ["CHAIR_i", "Cover", "N (best of N samples at temperature 0.7, by the implicit reward)"] {
            assert!(svg.contains(label), "{label} missing from {svg}");
        }
        let xs = circle_xs(&svg);
        assert_eq!(xs.len(), 2 * points.len(), "{svg}");
        let steps: Vec<f64> = xs[..points.len()].windows(2).map(|w| w[1] - w[0]).collect();
        assert!(steps[0] > 100.0, "N spreads over the axis: {xs:?}");
        assert!(
            steps.iter().all(|s| (s - steps[0]).abs() <= 1.0),
            "doubling N moves as far each time (log2 axis): {xs:?}"
        );

        write_plot(&lineage, &[]).unwrap();
        write_best_of_plot(&best_of, &[], 0.7).unwrap();
        for empty in [&lineage, &best_of] {
            let svg = std::fs::read_to_string(empty).unwrap();
            assert_whole_svg(&svg);
            assert_eq!(svg.matches("<circle").count(), 0, "{svg}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
