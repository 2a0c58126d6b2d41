//! `rlaifd serve`: the daemon. Long-running actix actors run RLAIF-V without a person in the loop — Sampler,
//! Labeler, Trainer and Checkpointer claim their work from PostgreSQL (so several daemons can share a database),
//! woken by LISTEN/NOTIFY and a poll; a Supervisor restarts a failed actor with backoff. The Server actor
//! (actix-web) answers OpenAI-style requests on the promoted checkpoint and the Control actor takes commands on a
//! Unix socket. Every model computation runs on the engine thread by priority (serving first).

use crate::actors::Supervisor;
use crate::config::Config;
use crate::rlaif::Engine;
use crate::store::{self, CheckpointRow};
use crate::worker::Priority;
use actix::prelude::*;
use anyhow::{Context as _, Result};
use engine::Adapter;
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// What the Server answers with: one adapter generation. A request holds its `Arc` from start to finish, so a
/// hot-swap never changes the weights under a request in flight.
pub struct Serving {
    pub generation: u64,
    pub checkpoint: CheckpointRow,
    pub adapter: Option<Arc<Adapter>>,
    /// The checkpoint's parent adapter: the reference of the implicit reward (best-of-N).
    pub reference: Option<Arc<Adapter>>,
    /// Checkpoint ids from the base to this one.
    pub lineage: Vec<i64>,
}

/// The daemon's Prometheus metrics (the `prometheus` crate: registry, types and text exposition). Request
/// counters and latency are recorded as requests finish; the gauges of the loop and the engines are set when
/// `/metrics` is scraped. Plus the per-client rate limiter's table.
pub struct Metrics {
    pub registry: prometheus::Registry,
    pub requests: prometheus::IntCounterVec,
    pub latency: prometheus::Histogram,
    pub swaps: prometheus::IntCounter,
    pub queue_depth: prometheus::IntGaugeVec,
    pub chat_in_flight: prometheus::IntGaugeVec,
    pub chat_requests: prometheus::IntCounterVec,
    pub batch_steps: prometheus::IntCounterVec,
    pub batch_answer_steps: prometheus::IntCounterVec,
    pub jobs: prometheus::IntGaugeVec,
    pub iteration: prometheus::IntGauge,
    pub pairs: prometheus::IntCounter,
    pub serving_checkpoint: prometheus::IntGauge,
    pub serving_generation: prometheus::IntGauge,
    pub paused: prometheus::IntGauge,
    pub hallucination: prometheus::GaugeVec,
    /// Rate limiting per client address (`governor`'s keyed GCRA limiter), rebuilt when `server.rate_per_s` or
    /// `server.rate_burst` change (`reload-config`).
    pub limiter: Mutex<Option<LimiterFor>>,
}

/// A limiter and the (rate, burst) it was built for.
pub type LimiterFor = ((f64, f64), Arc<ClientLimiter>);

/// The per-client-address limiter of chat requests.
pub type ClientLimiter = governor::DefaultKeyedRateLimiter<std::net::IpAddr>;

impl Default for Metrics {
    fn default() -> Self {
        use prometheus::{GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};
        let registry = prometheus::Registry::new();
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &prometheus::Registry, c: C) -> C {
            // Names are distinct constants: registering cannot fail.
            let _ = r.register(Box::new(c.clone()));
            c
        }
        let opts = |name: &str, help: &str| Opts::new(name, help);
        let r = &registry;
        Metrics {
            requests: reg(
                r,
                IntCounterVec::new(
                    opts("rlaifd_requests_total", "HTTP requests by route and status."),
                    &["route", "status"],
                )
                .expect("metric"),
            ),
            latency: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new("rlaifd_request_duration_seconds", "HTTP request latency.")
                        .buckets(LATENCY_BOUNDS.to_vec()),
                )
                .expect("metric"),
            ),
            swaps: reg(
                r,
                IntCounter::new("rlaifd_hot_swaps_total", "Checkpoints hot-swapped into serving.").expect("metric"),
            ),
            queue_depth: reg(
                r,
                IntGaugeVec::new(
                    opts("rlaifd_engine_queue_depth", "Tasks waiting for the engine thread."),
                    &["priority"],
                )
                .expect("metric"),
            ),
            chat_in_flight: reg(
                r,
                IntGaugeVec::new(
                    opts("rlaifd_engine_chat_in_flight", "Chat requests each device's engine is answering."),
                    &["engine", "device"],
                )
                .expect("metric"),
            ),
            chat_requests: reg(
                r,
                IntCounterVec::new(
                    opts("rlaifd_engine_chat_requests_total", "Chat requests each device's engine took."),
                    &["engine", "device"],
                )
                .expect("metric"),
            ),
            batch_steps: reg(
                r,
                IntCounterVec::new(
                    opts("rlaifd_batch_steps_total", "Decode steps of each engine's continuous batch."),
                    &["engine", "device"],
                )
                .expect("metric"),
            ),
            batch_answer_steps: reg(
                r,
                IntCounterVec::new(
                    opts(
                        "rlaifd_batch_answer_steps_total",
                        "Answers advanced by those steps (divided by the steps: the mean batch).",
                    ),
                    &["engine", "device"],
                )
                .expect("metric"),
            ),
            jobs: reg(
                r,
                IntGaugeVec::new(opts("rlaifd_jobs", "Loop jobs by kind and status."), &["kind", "status"])
                    .expect("metric"),
            ),
            iteration: reg(r, IntGauge::new("rlaifd_iteration", "The latest loop iteration.").expect("metric")),
            pairs: reg(r, IntCounter::new("rlaifd_pairs_total", "Preference pairs the loop stored.").expect("metric")),
            serving_checkpoint: reg(
                r,
                IntGauge::new("rlaifd_serving_checkpoint", "The checkpoint being served.").expect("metric"),
            ),
            serving_generation: reg(
                r,
                IntGauge::new("rlaifd_serving_generation", "Hot-swap generation of the served checkpoint.")
                    .expect("metric"),
            ),
            paused: reg(r, IntGauge::new("rlaifd_paused", "1 while the loop is paused.").expect("metric")),
            hallucination: reg(
                r,
                GaugeVec::new(
                    opts("rlaifd_hallucination", "Held-out hallucination metrics of the served checkpoint."),
                    &["metric", "checkpoint"],
                )
                .expect("metric"),
            ),
            limiter: Mutex::new(None),
            registry,
        }
    }
}

/// Client addresses the rate limiter tracks at most.
pub const MAX_RATE_CLIENTS: usize = 100_000;

pub const LATENCY_BOUNDS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

impl Metrics {
    /// Admits one request from `ip` at `rate` per second with bursts of `burst`; false: over the limit. The
    /// table of client addresses is bounded: past `MAX_RATE_CLIENTS` the clients that have refilled are forgotten,
    /// and while every tracked client is still limited, requests are refused (fail closed) rather than the table
    /// growing.
    pub fn admit(&self, ip: std::net::IpAddr, rate: f64, burst: f64) -> bool {
        if rate <= 0.0 {
            return true;
        }
        let limiter = {
            let Ok(mut slot) = self.limiter.lock() else { return true };
            match &*slot {
                Some((settings, l)) if *settings == (rate, burst) => l.clone(),
                _ => {
                    let Some(quota) = governor::Quota::with_period(std::time::Duration::from_secs_f64(1.0 / rate))
                    else {
                        return true;
                    };
                    let cells = std::num::NonZeroU32::new(burst.floor().clamp(1.0, u32::MAX as f64) as u32)
                        .unwrap_or(std::num::NonZeroU32::MIN);
                    let l = Arc::new(governor::RateLimiter::keyed(quota.allow_burst(cells)));
                    *slot = Some(((rate, burst), l.clone()));
                    l
                }
            }
        };
        if limiter.len() >= MAX_RATE_CLIENTS {
            limiter.retain_recent();
            if limiter.len() >= MAX_RATE_CLIENTS {
                return false;
            }
        }
        limiter.check_key(&ip).is_ok()
    }

    pub fn observe(&self, route: &str, status: u16, seconds: f64) {
        self.requests.with_label_values(&[route, &status.to_string()]).inc();
        self.latency.observe(seconds);
    }
}

/// How each actor is doing (for `status`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ActorState {
    pub busy: bool,
    pub restarts: u32,
    pub last_error: Option<String>,
    pub jobs_done: u64,
}

/// Everything the actors, the server and the control socket share.
pub struct Daemon {
    pub cfg: RwLock<Config>,
    pub config_file: Option<PathBuf>,
    pub pool: PgPool,
    /// The first device's engine: training, gating and the control socket's evaluations run here.
    pub engine: Arc<Engine>,
    /// One engine per device of `model.devices` (the first is `engine`): sample and label actors for each, chat
    /// requests to the least-loaded.
    pub engines: Vec<Arc<Engine>>,
    /// The worker name of each engine (host:pid:device), recorded with the jobs it does.
    pub workers: Vec<String>,
    pub serving: RwLock<Arc<Serving>>,
    pub paused: AtomicBool,
    pub draining: AtomicBool,
    /// Set when the daemon shuts down: actors start nothing more (the pool is about to close).
    pub stopped: AtomicBool,
    pub metrics: Metrics,
    /// Chat requests in flight (`server.max_pending`).
    pub chat_in_flight: std::sync::atomic::AtomicUsize,
    pub actors: Mutex<BTreeMap<&'static str, ActorState>>,
    /// This daemon's lease owner name (host:state dir).
    pub owner: String,
    /// The first engine's worker name (host:pid:device), recorded with the train and gate jobs this daemon takes.
    pub worker: String,
    /// A promoted checkpoint this daemon could not swap in: (checkpoint, when to retry, failures so far).
    swap_retry: Mutex<Option<(i64, Instant, u32)>>,
    pub stop: tokio::sync::Notify,
    pub started: Instant,
    /// Unix seconds at start (the served model's `created` in `/v1/models`).
    pub started_unix: u64,
    generation: AtomicU64,
}

impl Daemon {
    /// The other GPU engines of this daemon, the data-parallel trainer's ranks beside `engine` (none when the first
    /// engine is not a GPU).
    pub fn gpu_peers(&self) -> Vec<Arc<Engine>> {
        let gpu = |e: &Engine| matches!(e.device_spec(), engine::backend::DeviceSpec::Cuda(_));
        if !gpu(&self.engine) {
            return Vec::new();
        }
        self.engines.iter().skip(1).filter(|e| gpu(e)).cloned().collect()
    }

    pub fn config(&self) -> Config {
        self.cfg.read().map(|c| c.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn serving(&self) -> Arc<Serving> {
        self.serving.read().map(|s| s.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The lease owner of engine `i`'s sample and label jobs: the daemon's owner name, `#i` after it past the
    /// first (an engine's actor restarting returns its own jobs only).
    pub fn owner_of(&self, i: usize) -> String {
        if i == 0 {
            self.owner.clone()
        } else {
            format!("{}#{i}", self.owner)
        }
    }

    /// The engine answering the fewest chat requests now (the first among equals).
    pub fn least_loaded(&self) -> Arc<Engine> {
        self.engines.iter().min_by_key(|e| e.chat_load()).cloned().unwrap_or_else(|| self.engine.clone())
    }

    /// Whether swapping in promoted checkpoint `id` is due (not waiting out the backoff of an earlier failure).
    pub(crate) fn swap_due(&self, id: i64) -> bool {
        match self.swap_retry.lock().map(|r| *r) {
            Ok(Some((c, at, _))) if c == id => Instant::now() >= at,
            _ => true,
        }
    }

    /// Records a failed swap of `id`; returns the seconds until the next try (2, 4, 8 ... at most 60).
    pub(crate) fn swap_failed(&self, id: i64) -> u64 {
        let Ok(mut r) = self.swap_retry.lock() else { return 60 };
        let failures = match *r {
            Some((c, _, n)) if c == id => n + 1,
            _ => 1,
        };
        let wait = (1u64 << failures.min(6)).min(60);
        *r = Some((id, Instant::now() + Duration::from_secs(wait), failures));
        wait
    }

    pub(crate) fn swap_done(&self) {
        if let Ok(mut r) = self.swap_retry.lock() {
            *r = None;
        }
    }

    pub(crate) fn actor(&self, name: &'static str, f: impl FnOnce(&mut ActorState)) {
        if let Ok(mut a) = self.actors.lock() {
            f(a.entry(name).or_default());
        }
    }

    /// Loads `c` (adapter checked against its sha256) and makes it the served generation. Requests in flight keep
    /// the generation they started with.
    pub async fn hot_swap(&self, c: &CheckpointRow) -> Result<u64> {
        let lineage = store::lineage(&self.pool, c.id).await?;
        let parent = match c.parent_id {
            Some(p) => Some(store::checkpoint(&self.pool, p).await?),
            None => None,
        };
        crate::rlaif::fetch_checkpoint(&self.pool, &self.engine, c).await?;
        if let Some(p) = &parent {
            crate::rlaif::fetch_checkpoint(&self.pool, &self.engine, p).await?;
        }
        let (e, row) = (self.engine.clone(), c.clone());
        let (adapter, reference) = self
            .engine
            .run(Priority::Serve, move |_| {
                let a = e.adapter(&row)?;
                let r = match &parent {
                    Some(p) => e.adapter(p)?,
                    None => None,
                };
                Ok((a, r))
            })
            .await?;
        // Every device gets the adapters before the new generation serves: shared host copies, and on a GPU one
        // token generated with them, which uploads them to the device.
        for other in self.engines.iter().skip(1) {
            for (id, a) in [(c.id, &adapter), (c.parent_id.unwrap_or(0), &reference)] {
                if let Some(a) = a {
                    other.share_adapter(id, a.clone());
                }
            }
        }
        for e in self.engines.iter().filter(|e| e.device_spec() != engine::backend::DeviceSpec::Cpu) {
            let (ee, a) = (e.clone(), adapter.clone());
            e.run(Priority::Serve, move |_| {
                let ids = [ee.model.llm.cfg.bos_token_id.unwrap_or(1)];
                let params =
                    engine::sampling::SamplingParams { temperature: 0.0, max_new_tokens: 1, ..Default::default() };
                let req = engine::generate::GenerateRequest {
                    ids: &ids,
                    pixels: None,
                    seeds: &[0],
                    params,
                    stop_ids: vec![],
                };
                engine::generate::generate(&ee.model, &req, a.as_deref())?;
                Ok(())
            })
            .await
            .with_context(|| format!("putting checkpoint {} on {}", c.id, e.device_spec()))?;
        }
        if self.generation.load(Ordering::SeqCst) > 0 {
            crate::failpoint::hit("hot_swap");
        }
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let next = Arc::new(Serving { generation, checkpoint: c.clone(), adapter, reference, lineage });
        match self.serving.write() {
            Ok(mut s) => *s = next,
            Err(p) => *p.into_inner() = next,
        }
        self.metrics.swaps.inc();
        info!(checkpoint = c.id, generation, "hot-swapped the served checkpoint");
        Ok(generation)
    }
}

/// Command-line options of `rlaifd serve`.
#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// Configuration file (default: /etc/rlaifd/rlaifd.toml when it exists); see config/default.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Check the configuration, print it as JSON and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Where generation and scoring run: auto, cpu, cuda or cuda:N (overrides model.device).
    #[arg(long)]
    pub device: Option<String>,
}

pub(crate) fn init_tracing(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if cfg.log.format == "json" { b.json().try_init() } else { b.try_init() };
}

/// Absolute form of a configured path (checkpoint rows and the socket outlive the working directory).
fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map(|c| c.join(p)).unwrap_or_else(|_| p.to_path_buf())
    }
}

/// Stores in the database the files of checkpoints this daemon trained before checkpoints travelled through it
/// (rows without stored files whose adapter is on this host with the recorded sha256), so every other daemon can
/// fetch them. A failure is logged; the daemon serves on.
async fn upload_own_checkpoints(d: &Arc<Daemon>) {
    let rows = match store::checkpoints_without_files(&d.pool).await {
        Ok(r) => r,
        Err(e) => return warn!(error = %format!("{e:#}"), "cannot list checkpoints without stored files"),
    };
    for c in rows {
        let e = d.engine.clone();
        let row = c.clone();
        let files = tokio::task::spawn_blocking(move || e.local_dir(&row).map(|dir| crate::rlaif::dir_files(&dir)))
            .await
            .ok()
            .flatten();
        match files {
            Some(Ok(files)) => match store::upload_checkpoint_files(&d.pool, c.id, &files).await {
                Ok(()) => {
                    info!(checkpoint = c.id, "stored the checkpoint's files in the database for the other daemons")
                }
                Err(e) => warn!(checkpoint = c.id, error = %format!("{e:#}"), "cannot store the checkpoint's files"),
            },
            Some(Err(e)) => warn!(checkpoint = c.id, error = %format!("{e:#}"), "cannot read the checkpoint's files"),
            None => {}
        }
    }
}

/// Runs the daemon until SIGTERM/SIGINT or `drain`.
pub fn run(args: ServeArgs) -> Result<()> {
    let mut cfg = Config::load(args.config.as_deref())?;
    if let Some(d) = &args.device {
        cfg.model.device = d.clone();
        cfg.model.devices = crate::config::DeviceList::Many(Vec::new());
        cfg.model.device_spec().map_err(|e| anyhow::anyhow!("--device: {e:#}"))?;
    }
    if args.check_config {
        println!("{}", serde_json::to_string_pretty(&cfg.redacted())?);
        return Ok(());
    }
    cfg.state.dir = absolute(&cfg.state.dir);
    // Checkpoint rows record this path: canonical, so every way of naming the model finds the same base row.
    cfg.model.path = std::fs::canonicalize(&cfg.model.path).unwrap_or_else(|_| absolute(&cfg.model.path));
    init_tracing(&cfg);
    let system = actix::System::new();
    let res = system.block_on(async move { run_async(cfg, args.config, None).await.map(|_| ()) });
    if let Err(e) = &res {
        error!(error = %format!("{e:#}"), "rlaifd stopped");
        eprintln!("rlaifd: {e:#}");
    }
    // Everything is stored and the leases are released: exit without running the actors' destructors, which
    // would touch the database outside the (now stopped) runtime.
    std::process::exit(if res.is_ok() { 0 } else { 1 });
}

/// Something that ends the daemon besides SIGTERM, SIGINT and `drain` (the demo's "K iterations finished").
pub type Until = std::pin::Pin<Box<dyn std::future::Future<Output = &'static str>>>;

/// Runs the daemon until SIGTERM, SIGINT, `drain` or `until`; returns what stopped it. `rlaifd serve` and
/// `rlaifd demo` both run this inside an actix system.
pub async fn run_async(cfg: Config, config_file: Option<PathBuf>, until: Option<Until>) -> Result<&'static str> {
    crate::notify::status("connecting to PostgreSQL");
    std::fs::create_dir_all(&cfg.state.dir)
        .with_context(|| format!("cannot create state.dir {}", cfg.state.dir.display()))?;
    let pool = crate::db::open(&cfg.database.url, cfg.database.max_connections).await?;
    info!(database = %crate::db::redacted(&cfg.database.url), "database ready (migrated)");
    crate::notify::status("loading the model");
    // One engine per device: each loads the base weights (and a labeler model) onto its device.
    let mut engines = Vec::new();
    let mut chosen_all = Vec::new();
    for device in cfg.model.device_specs()? {
        let (model_dir, state, labeler) = (cfg.model.path.clone(), cfg.state.dir.clone(), cfg.loop_.labeler.clone());
        let (extractor, extractor_model) = (cfg.loop_.extractor.clone(), cfg.loop_.extractor_model.clone());
        let (mut engine, chosen) = tokio::task::spawn_blocking(move || -> Result<(Engine, String)> {
            let (e, chosen) = Engine::load_on(&model_dir, &state, device)?;
            Ok((e.with_labeler(&labeler)?.with_extractor(&extractor, &extractor_model)?, chosen))
        })
        .await
        .context("loading the model")?
        .with_context(|| format!("loading the model on {device}"))?;
        set_request_budget(&mut engine, &cfg)?;
        info!(device = %chosen, engine = engines.len(), "generation and scoring device");
        engines.push(Arc::new(engine));
        chosen_all.push(chosen);
    }
    let engine = engines[0].clone();
    let chosen = chosen_all.join(", ");
    if cfg.daemon.prompt_source == "shapes" && !engine.shapes {
        anyhow::bail!(
            "daemon.prompt_source = \"shapes\" generates ShapesWorld prompts, but {} is not a ShapesWorld model: set daemon.prompt_source = \"none\" and import prompts (rlaifd ctl import-prompts; held-out ones with \"split\": \"heldout\" gate checkpoints)",
            cfg.model.path.display()
        );
    }
    let base = store::ensure_base(&pool, &cfg.model.path.display().to_string(), None).await?;
    let promoted = store::promoted(&pool).await?.unwrap_or(base.clone());
    // One daemon per host and state directory: a restart reclaims the jobs its killed predecessor held (other
    // daemons sharing the database have other owners and keep theirs until their leases expire).
    let owner = format!("{}:{}", hostname(), cfg.state.dir.display());
    let released = store::release_leases(&pool, &owner).await?;
    if released > 0 {
        info!(jobs = released, "resuming: jobs left running by a previous run returned to the queue");
    }
    // Pause outlives a restart (`loop_control`): say so, or a paused daemon looks idle.
    let paused = store::loop_paused(&pool).await?;
    if paused {
        warn!("the loop is paused (rlaifd ctl resume to go on); serving continues");
    }
    // Worker names: host:pid:device, a CPU named more than once numbered (cpu#1, cpu#2 ...).
    let mut workers: Vec<String> = Vec::new();
    for (i, e) in engines.iter().enumerate() {
        let mut w = format!("{}:{}:{}", hostname(), std::process::id(), e.device_spec());
        if workers.contains(&w) {
            w = format!("{w}#{i}");
        }
        workers.push(w);
    }
    let d = Arc::new(Daemon {
        cfg: RwLock::new(cfg.clone()),
        config_file,
        pool: pool.clone(),
        engine,
        engines,
        serving: RwLock::new(Arc::new(Serving {
            generation: 0,
            checkpoint: base.clone(),
            adapter: None,
            reference: None,
            lineage: vec![base.id],
        })),
        paused: AtomicBool::new(paused),
        draining: AtomicBool::new(false),
        stopped: AtomicBool::new(false),
        metrics: Metrics::default(),
        chat_in_flight: std::sync::atomic::AtomicUsize::new(0),
        actors: Mutex::new(BTreeMap::new()),
        worker: workers[0].clone(),
        workers,
        swap_retry: Mutex::new(None),
        owner,
        stop: tokio::sync::Notify::new(),
        started: Instant::now(),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|t| t.as_secs())
            .unwrap_or(0),
        generation: AtomicU64::new(0),
    });
    upload_own_checkpoints(&d).await;
    if cfg.daemon.has_role("serve") {
        // The promoted checkpoint may be unreachable from here (its trainer has not uploaded it yet, the disk is
        // full): serve the base meanwhile; the checkpointer retries and swaps it in when it can.
        if let Err(e) = d.hot_swap(&promoted).await {
            let reason = format!("{e:#}");
            let retry_s = d.swap_failed(promoted.id);
            error!(checkpoint = promoted.id, error = %reason, retry_s, "cannot load the promoted checkpoint yet; serving the base model meanwhile");
            store::event(&pool, "swap_failed", &d.worker, serde_json::json!({ "checkpoint": promoted.id, "serving": base.id, "error": reason, "retry_s": retry_s })).await?;
        }
    }
    store::event(
        &pool,
        "daemon_started",
        "supervisor",
        serde_json::json!({ "owner": d.owner, "worker": d.worker, "pid": std::process::id(), "serving": d.serving().checkpoint.id, "device": chosen, "roles": cfg.daemon.roles }),
    )
    .await?;
    let server = crate::http::start(d.clone())?;
    let server_handle = server.handle();
    actix::spawn(server);
    let sup = Supervisor::new(d.clone()).start();
    let control = crate::control::start(d.clone(), sup.clone().recipient())?;
    crate::notify::ready(&format!("serving checkpoint {} on {}", promoted.id, cfg.server.bind));
    let watchdog = crate::notify::spawn_watchdog(d.engines.iter().map(|e| e.worker.clone()).collect());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the SIGINT handler")?;
    let why = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = d.stop.notified() => "drain",
        w = async move {
            match until {
                Some(f) => f.await,
                None => std::future::pending().await,
            }
        } => w,
    };
    info!(reason = why, "shutting down: finishing current work");
    crate::notify::stopping(&format!("stopping ({why})"));
    d.draining.store(true, Ordering::SeqCst);
    // Finish what is running (a job, a training slice loop, a gate), then stop.
    let deadline = Instant::now() + Duration::from_secs(120);
    while d.actors.lock().map(|a| a.values().any(|s| s.busy)).unwrap_or(false) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    d.stopped.store(true, Ordering::SeqCst);
    while d.actors.lock().map(|a| a.values().any(|s| s.busy)).unwrap_or(false) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server_handle.stop(true).await;
    drop(control);
    let released = store::release_leases(&pool, &d.owner).await.unwrap_or(0);
    let _ = store::event(
        &pool,
        "daemon_stopped",
        "supervisor",
        serde_json::json!({ "owner": d.owner, "reason": why, "leases_released": released }),
    )
    .await;
    let _ = std::fs::remove_file(d.config().socket_path());
    drop(watchdog);
    for e in &d.engines {
        e.worker.close();
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), pool.close()).await;
    info!("stopped");
    Ok(why)
}

/// The most memory one generation request may take (`server.max_request_mb`, 0: half of what is available now,
/// with the model loaded). Logs it beside what the largest request the configuration allows would need.
fn set_request_budget(engine: &mut Engine, cfg: &Config) -> Result<()> {
    const MIB: u64 = 1 << 20;
    let budget = match cfg.server.max_request_mb {
        0 => mem_available_bytes().map(|b| b / 2).context("server.max_request_mb = 0 reads MemAvailable from /proc/meminfo, which is missing: set server.max_request_mb")?,
        mb => mb.saturating_mul(MIB),
    };
    let m = &engine.model;
    let ctx = m.context_len();
    let largest = engine::limits::RequestShape {
        prompt_positions: 1,
        answers: cfg.server.max_n.max(cfg.loop_.n),
        max_new_tokens: ctx.saturating_sub(1),
    };
    let need = m.generate_memory_bytes(largest);
    if need > budget {
        warn!(budget_mib = budget / MIB, largest_mib = need.div_ceil(MIB), context = ctx, answers = largest.answers, "the largest request the configuration allows needs more than the per-request memory budget; such requests are refused with 400 (raise server.max_request_mb or lower server.max_n / loop.n)");
    } else {
        info!(budget_mib = budget / MIB, largest_mib = need.div_ceil(MIB), context = ctx, "per-request memory budget");
    }
    engine.model.set_request_budget(Some(budget));
    Ok(())
}

/// MemAvailable of /proc/meminfo, bytes.
fn mem_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "host".into())
}
