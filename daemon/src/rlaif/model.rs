//! `Engine`: the model side of the loop (base model, tokenizer, image processor, optional labeler model, the
//! engine thread) and the checkpoint adapters it loads on demand, each checked against its recorded sha256.
//! A checkpoint trained by another daemon is fetched from the database first (`fetch_checkpoint`): no daemon
//! reads another's files.

use super::LoopConfig;
use crate::store::{self, CheckpointRow};
use crate::worker::{Priority, Slice, Worker};
use anyhow::{bail, Context, Result};
use engine::feedback::claims::{ClaimExtractor, ExtractorPrompts, LlmExtractor, RuleExtractor, ShapesExtractor};
use engine::image::{ImageProcessorConfig, PixelValues};
use engine::tokenizer::TextTokenizer;
use engine::{Adapter, Model};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The model side: the base model (loaded once, immutable), its tokenizer and image processor, and the adapters
/// of checkpoints (loaded on first use, checked against their recorded sha256).
pub struct Engine {
    pub model: Model,
    pub tok: TextTokenizer,
    pub ip: ImageProcessorConfig,
    pub state_dir: PathBuf,
    /// A separate labeler model (`loop.labeler = DIR`) and its tokenizer.
    pub labeler: Option<(Model, TextTokenizer, PathBuf)>,
    /// A separate claim extractor model (`loop.extractor = "llm"`, `loop.extractor_model = DIR`) with its
    /// tokenizer, directory and prompts.
    pub extractor_model: Option<(Model, TextTokenizer, PathBuf, ExtractorPrompts)>,
    /// The engine thread every model computation runs on, by priority.
    pub worker: Worker,
    /// A ShapesWorld model (its tokenizer is the world's vocabulary): object claims and exact held-out metrics.
    /// Otherwise: rule-based English claims and a labeler-estimated hallucination rate on held-out prompts.
    pub shapes: bool,
    adapters: Mutex<HashMap<i64, Arc<Adapter>>>,
    /// The device the model landed on (a labeler model goes to the same one).
    device: engine::backend::DeviceSpec,
    in_flight: std::sync::atomic::AtomicUsize,
    chats: std::sync::atomic::AtomicU64,
    /// Chat requests waiting for or decoding in this engine's continuous batch.
    pub batcher: crate::batcher::Batcher,
}

/// A chat request counted on an engine (`Engine::busy`).
pub struct InFlight(Arc<Engine>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Whether a tokenizer is ShapesWorld's (its vocabulary is exactly the world's words).
pub fn is_shapes_tokenizer(tok: &TextTokenizer) -> bool {
    engine::shapes::words().iter().all(|w| tok.token_id(w).is_some())
        && tok.vocab_size() == engine::shapes::words().len() + 5
}

/// sha256 of a checkpoint: of its adapter_model.safetensors.
pub fn adapter_sha256(dir: &Path) -> Result<String> {
    let f = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&f).with_context(|| format!("cannot read {}", f.display()))?;
    Ok(store::sha256_hex(&bytes))
}

impl Engine {
    /// Loads the model for the CPU backend.
    pub fn load(model_dir: &Path, state_dir: &Path) -> Result<Engine> {
        Self::load_on(model_dir, state_dir, engine::backend::DeviceSpec::Cpu).map(|(e, _)| e)
    }

    /// Loads the model and puts generation and scoring on `device`. Returns the engine and a line saying which
    /// device was chosen (and, for `auto` without a usable GPU, why not).
    pub fn load_on(
        model_dir: &Path,
        state_dir: &Path,
        device: engine::backend::DeviceSpec,
    ) -> Result<(Engine, String)> {
        let mut model = Model::load(model_dir).with_context(|| format!("loading model {}", model_dir.display()))?;
        let (backend, chosen) =
            engine::backend::select(device, &model).with_context(|| format!("model.device = \"{device}\""))?;
        let on = backend.spec();
        model.set_backend(backend);
        let tok = TextTokenizer::from_file(&model_dir.join("tokenizer.json"))?;
        let ip = model
            .image_processor
            .clone()
            .with_context(|| format!("{} has no vision tower; the loop needs a LLaVA model", model_dir.display()))?;
        std::fs::create_dir_all(state_dir.join("checkpoints"))
            .with_context(|| format!("cannot create {}/checkpoints", state_dir.display()))?;
        let shapes = is_shapes_tokenizer(&tok);
        Ok((
            Engine {
                model,
                tok,
                ip,
                state_dir: state_dir.to_path_buf(),
                labeler: None,
                extractor_model: None,
                worker: Worker::start("rlaifd-engine"),
                shapes,
                adapters: Mutex::new(HashMap::new()),
                device: on,
                in_flight: std::sync::atomic::AtomicUsize::new(0),
                chats: std::sync::atomic::AtomicU64::new(0),
                batcher: Default::default(),
            },
            chosen,
        ))
    }

    /// Loads the labeler `loop.labeler` names when it is a model directory ("self" and "base" need nothing).
    pub fn with_labeler(mut self, labeler: &str) -> Result<Engine> {
        if matches!(labeler, "self" | "base") {
            return Ok(self);
        }
        let dir = PathBuf::from(labeler);
        let (model, tok) = self.load_side_model(&dir, &format!("the labeler loop.labeler = {labeler:?}"))?;
        self.labeler = Some((model, tok, dir));
        Ok(self)
    }

    /// Loads the extractor model `loop.extractor_model` names when the loop divides with a model of its own
    /// (`loop.extractor = "llm"` and a directory; "self" needs nothing).
    pub fn with_extractor(mut self, extractor: &str, extractor_model: &str) -> Result<Engine> {
        if extractor != "llm" || extractor_model == "self" {
            return Ok(self);
        }
        let dir = PathBuf::from(extractor_model);
        let what = format!("the claim extractor loop.extractor_model = {extractor_model:?}");
        let (model, tok) = self.load_side_model(&dir, &what)?;
        let prompts = ExtractorPrompts::for_model(&dir).with_context(|| format!("reading the prompts of {what}"))?;
        self.extractor_model = Some((model, tok, dir, prompts));
        Ok(self)
    }

    /// The claim extractor `cfg.extractor` names, for work on the engine thread; `policy` is the adapter of the
    /// checkpoint that "self" means. A `loop.extractor_model` directory other than the one this engine loaded (the
    /// setting changed while the daemon ran) is an error that says to restart, never a silent switch to "self".
    pub fn extractor<'a>(
        &'a self,
        cfg: &LoopConfig,
        policy: Option<&'a Adapter>,
    ) -> Result<Box<dyn ClaimExtractor + 'a>> {
        Ok(match cfg.extractor.as_str() {
            "shapes" => Box::new(ShapesExtractor),
            "rules" => Box::new(RuleExtractor),
            "llm" => {
                let (model, adapter, tokenizer, source, prompts) = match (&self.extractor_model, cfg.extractor_model.as_str()) {
                    (None, "self") => (&self.model, policy, &self.tok, "self".to_string(), ExtractorPrompts::default()),
                    (Some((m, t, dir, p)), want) if Path::new(want) == dir => {
                        (m, None, t, dir.display().to_string(), p.clone())
                    }
                    (_, want) => bail!(
                        "loop.extractor_model = {want:?} is not the extractor this daemon loaded at start; restart it to load the new one"
                    ),
                };
                let max_new_tokens = cfg.extractor_max_new_tokens;
                Box::new(LlmExtractor { model, adapter, tokenizer, source, max_new_tokens, prompts })
            }
            _ if self.shapes => Box::new(ShapesExtractor),
            _ => Box::new(RuleExtractor),
        })
    }

    /// A second model (a labeler, a claim extractor) and its tokenizer, on this engine's device; errors name `what`.
    fn load_side_model(&self, dir: &Path, what: &str) -> Result<(Model, TextTokenizer)> {
        let mut model = Model::load(dir).with_context(|| format!("loading {what}"))?;
        let (backend, _) = engine::backend::select(self.device, &model)
            .with_context(|| format!("putting {what} on {}", self.device))?;
        model.set_backend(backend);
        let tok = TextTokenizer::from_file(&dir.join("tokenizer.json"))
            .with_context(|| format!("loading the tokenizer of {what}"))?;
        Ok((model, tok))
    }

    /// Runs `f` on the engine thread at `prio`.
    pub async fn run<T: Send + 'static>(
        &self,
        prio: Priority,
        f: impl FnOnce(&Slice) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.worker.run(prio, f).await
    }

    /// The device this engine's model math runs on (resolved: never `auto`).
    pub fn device_spec(&self) -> engine::backend::DeviceSpec {
        self.device
    }

    /// Chat requests this engine is answering now (the server sends a new one to the least-loaded engine).
    pub fn chat_load(&self) -> usize {
        self.in_flight.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Chat requests this engine has taken since start.
    pub fn chats_total(&self) -> u64 {
        self.chats.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts a chat request on this engine until the guard drops.
    pub fn busy(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.chats.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Shares an adapter another engine loaded (host memory; each device uploads it on first use).
    pub fn share_adapter(&self, id: i64, a: Arc<Adapter>) {
        if let Ok(mut m) = self.adapters.lock() {
            m.entry(id).or_insert(a);
        }
    }

    /// Whether checkpoint `id`'s adapter is loaded already.
    pub fn has_adapter(&self, id: i64) -> bool {
        self.adapters.lock().map(|a| a.contains_key(&id)).unwrap_or(false)
    }

    /// This host's copy of a checkpoint fetched from the database (by content).
    pub fn fetched_dir(&self, sha256: &str) -> PathBuf {
        self.state_dir.join("checkpoints").join("fetched").join(sha256)
    }

    /// Where this host has a checkpoint's files with the recorded sha256: the directory its row names (the
    /// daemon that trained it), else the copy fetched from the database. None: neither.
    pub fn local_dir(&self, c: &CheckpointRow) -> Option<PathBuf> {
        let want = c.sha256.as_deref()?;
        [PathBuf::from(&c.path), self.fetched_dir(want)]
            .into_iter()
            .find(|d| adapter_sha256(d).is_ok_and(|s| s == want))
    }

    /// The adapter of a checkpoint (None for the base), from this host's copy whose sha256 matches the row
    /// (`fetch_checkpoint` makes one). Files whose sha256 differs are refused.
    pub fn adapter(&self, c: &CheckpointRow) -> Result<Option<Arc<Adapter>>> {
        if c.kind == store::CheckpointKind::Base {
            return Ok(None);
        }
        if let Some(a) = self.adapters.lock().map_err(|_| anyhow::anyhow!("adapter cache poisoned"))?.get(&c.id) {
            return Ok(Some(a.clone()));
        }
        let Some(dir) = self.local_dir(c) else {
            let found =
                adapter_sha256(Path::new(&c.path)).map(|s| format!("sha256 {s}")).unwrap_or_else(|e| format!("{e:#}"));
            bail!(
                "checkpoint {}: no copy on this host has the recorded sha256 {:?} ({}: {found}; not fetched from the database yet); refusing to load it",
                c.id,
                c.sha256,
                c.path
            );
        };
        let a = Arc::new(
            self.model
                .load_adapter(&dir)
                .with_context(|| format!("loading checkpoint {} from {}", c.id, dir.display()))?,
        );
        self.adapters.lock().map_err(|_| anyhow::anyhow!("adapter cache poisoned"))?.insert(c.id, a.clone());
        Ok(Some(a))
    }

    pub fn pixels(&self, bytes: &[u8]) -> Result<PixelValues> {
        let img = engine::image::decode_rgb8(bytes, "stored image")?;
        Ok(engine::image::preprocess(&img, &self.ip)?)
    }
}

/// Makes sure this host has checkpoint `c`'s files with the recorded sha256: its own directory when this daemon
/// trained it, else a copy of the files stored with it in the database (each blob checked against its name, the
/// adapter against the row), written atomically under STATE/checkpoints/fetched/SHA256. A failure here is this
/// host's problem (the blob is missing, the disk is full): the caller keeps what it has and retries later; the
/// checkpoint's status is never changed because of it.
pub async fn fetch_checkpoint(pool: &sqlx::PgPool, engine: &Arc<Engine>, c: &CheckpointRow) -> Result<()> {
    if c.kind == store::CheckpointKind::Base || engine.has_adapter(c.id) {
        return Ok(());
    }
    let Some(want) = c.sha256.clone() else { bail!("checkpoint {} has no recorded sha256", c.id) };
    let (e, row) = (engine.clone(), c.clone());
    if tokio::task::spawn_blocking(move || e.local_dir(&row).is_some()).await? {
        return Ok(());
    }
    let files = store::checkpoint_files(pool, c.id).await?;
    if files.is_empty() {
        bail!(
            "checkpoint {}'s files are not in the database and not on this host ({}): the daemon that trained it uploads them when it starts",
            c.id,
            c.path
        );
    }
    match files.iter().find(|f| f.name == "adapter_model.safetensors") {
        Some(f) if f.sha256 == want => {}
        Some(f) => bail!(
            "checkpoint {}: the database's adapter_model.safetensors is {}, the row records {want}",
            c.id,
            f.sha256
        ),
        None => bail!("checkpoint {}: no adapter_model.safetensors among its stored files", c.id),
    }
    let mut contents = Vec::with_capacity(files.len());
    for f in &files {
        contents.push((f.name.clone(), store::blob(pool, &f.sha256).await?));
    }
    let dest = engine.fetched_dir(&want);
    let id = c.id;
    tokio::task::spawn_blocking(move || write_dir_atomically(&dest, &contents))
        .await?
        .with_context(|| format!("saving checkpoint {id} fetched from the database"))?;
    tracing::info!(checkpoint = id, sha256 = %want, "fetched the checkpoint from the database");
    Ok(())
}

/// Makes sure every daemon can fetch checkpoint `c`: its files in the database are intact (checked there), or
/// are stored again from a copy on this host with the recorded sha256. An error says what is wrong when neither.
pub async fn check_stored(pool: &sqlx::PgPool, engine: &Arc<Engine>, c: &CheckpointRow) -> Result<()> {
    if c.kind == store::CheckpointKind::Base {
        return Ok(());
    }
    let Some(want) = c.sha256.clone() else { bail!("checkpoint {} has no recorded sha256", c.id) };
    let problems = store::stored_file_problems(pool, c.id, &want).await?;
    if problems.is_empty() {
        return Ok(());
    }
    let (e, row) = (engine.clone(), c.clone());
    let local = tokio::task::spawn_blocking(move || e.local_dir(&row).map(|d| dir_files(&d))).await?;
    match local {
        Some(files) => {
            store::upload_checkpoint_files(pool, c.id, &files?).await?;
            tracing::info!(checkpoint = c.id, fixed = %problems.join("; "), "stored the checkpoint's files again from this host's copy");
            Ok(())
        }
        None => bail!(
            "checkpoint {}: {} in the database, and no copy on this host has the recorded sha256 {want}",
            c.id,
            problems.join("; ")
        ),
    }
}

/// Writes `files` into a fresh directory beside `dest` and renames it to `dest` (a reader sees all of them or
/// none). `dest` existing already (another task fetched it meanwhile) is fine.
pub fn write_dir_atomically(dest: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    let parent = dest.parent().context("no parent directory")?;
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("dir");
    let tmp = parent.join(format!(".{name}.tmp-{}-{:?}", std::process::id(), std::thread::current().id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    for (f, bytes) in files {
        if !store::safe_file_name(f) {
            bail!("file name {f:?} is not a plain file name");
        }
        std::fs::write(tmp.join(f), bytes).with_context(|| format!("cannot write {}", tmp.join(f).display()))?;
    }
    if dest.exists() {
        std::fs::remove_dir_all(dest).with_context(|| format!("cannot replace {}", dest.display()))?;
    }
    if let Err(e) = std::fs::rename(&tmp, dest) {
        let _ = std::fs::remove_dir_all(&tmp);
        if !dest.exists() {
            return Err(e).with_context(|| format!("cannot rename into {}", dest.display()));
        }
    }
    Ok(())
}

/// The files of an adapter directory (plain files only), for storing with its checkpoint.
pub fn dir_files(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_file() && store::safe_file_name(&name) {
            let bytes =
                std::fs::read(entry.path()).with_context(|| format!("cannot read {}", entry.path().display()))?;
            out.push((name, bytes));
        }
    }
    out.sort();
    Ok(out)
}
