//! `Engine`: the model side of the loop (base model, tokenizer, image processor, optional labeler model, the
//! engine thread) and the checkpoint adapters it loads on demand, each checked against its recorded sha256.

use crate::store::{self, CheckpointRow};
use crate::worker::{Priority, Slice, Worker};
use anyhow::{bail, Context, Result};
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
    /// The engine thread every model computation runs on, by priority.
    pub worker: Worker,
    /// A ShapesWorld model (its tokenizer is the world's vocabulary): object claims and exact held-out metrics.
    /// Otherwise: rule-based English claims and a labeler-estimated hallucination rate on held-out prompts.
    pub shapes: bool,
    adapters: Mutex<HashMap<i64, Arc<Adapter>>>,
    /// The device the model landed on (a labeler model goes to the same one).
    device: engine::backend::DeviceSpec,
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
                worker: Worker::start("rlaifd-engine"),
                shapes,
                adapters: Mutex::new(HashMap::new()),
                device: on,
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
        let mut model = Model::load(&dir).with_context(|| format!("loading the labeler loop.labeler = {labeler:?}"))?;
        let (backend, _) = engine::backend::select(self.device, &model)
            .with_context(|| format!("putting the labeler {labeler} on {}", self.device))?;
        model.set_backend(backend);
        let tok = TextTokenizer::from_file(&dir.join("tokenizer.json"))
            .with_context(|| format!("loading the labeler's tokenizer from {labeler}"))?;
        self.labeler = Some((model, tok, dir));
        Ok(self)
    }

    /// Runs `f` on the engine thread at `prio`.
    pub async fn run<T: Send + 'static>(
        &self,
        prio: Priority,
        f: impl FnOnce(&Slice) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.worker.run(prio, f).await
    }

    /// The adapter of a checkpoint (None for the base). A file whose sha256 differs from the row is refused.
    pub fn adapter(&self, c: &CheckpointRow) -> Result<Option<Arc<Adapter>>> {
        if c.kind == store::CheckpointKind::Base {
            return Ok(None);
        }
        if let Some(a) = self.adapters.lock().map_err(|_| anyhow::anyhow!("adapter cache poisoned"))?.get(&c.id) {
            return Ok(Some(a.clone()));
        }
        let dir = Path::new(&c.path);
        let sha = adapter_sha256(dir)?;
        if c.sha256.as_deref() != Some(sha.as_str()) {
            bail!("checkpoint {} at {}: adapter_model.safetensors has sha256 {sha}, the database recorded {:?}; refusing to load it", c.id, c.path, c.sha256);
        }
        let a = Arc::new(
            self.model.load_adapter(dir).with_context(|| format!("loading checkpoint {} from {}", c.id, c.path))?,
        );
        self.adapters.lock().map_err(|_| anyhow::anyhow!("adapter cache poisoned"))?.insert(c.id, a.clone());
        Ok(Some(a))
    }

    pub fn pixels(&self, bytes: &[u8]) -> Result<PixelValues> {
        let img = engine::image::decode_rgb8(bytes, "stored image")?;
        Ok(engine::image::preprocess(&img, &self.ip)?)
    }
}
