//! The model a user points rlaifd at: LLaVA (CLIP + projector + LLaMA) or a text-only LLaMA, loaded from a
//! Hugging Face directory in any of the llava-hf key layouts.

use crate::adapter::{Adapter, ModelFamily};
use crate::clip::ClipVision;
use crate::config::{LlavaConfig, ModelConfig};
use crate::error::{EngineError, Result};
use crate::family::keys::{projector_linears, vision_layer, vision_linears, Keys};
use crate::image::{ImageProcessorConfig, PixelValues};
use crate::linear::Linear;
use crate::llama::{KvCache, Llama};
use crate::ops::log_softmax_rows;
use crate::weights::WeightStore;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use crate::family::KeyLayout;

/// How to hold the weights in memory.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Keep F16/BF16 checkpoint weights 16-bit (half the memory and bytes streamed per token) and widen them
    /// inside the matmul; widening is exact, so outputs are identical to converting at load. Default true.
    pub keep_16bit: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { keep_16bit: true }
    }
}

/// An image's rows for the decoder, and for multimodal RoPE (Qwen2-VL) the merged grid (rows, columns) they
/// fill in raster order, which places them on the rotary positions.
#[derive(Clone, Debug, Default)]
pub struct ImageFeatures {
    /// (N, C) rows.
    pub rows: Vec<f32>,
    pub grid: Option<(usize, usize)>,
}

impl ImageFeatures {
    /// Rows without a grid (LLaVA's images, which take consecutive positions).
    pub fn plain(rows: Vec<f32>) -> ImageFeatures {
        ImageFeatures { rows, grid: None }
    }
}

impl std::ops::Deref for ImageFeatures {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.rows
    }
}

pub struct Projector {
    pub(crate) linear_1: Linear,
    pub(crate) linear_2: Linear,
    pub(crate) act: crate::config::Activation,
}

pub struct Model {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub layout: KeyLayout,
    pub vision: Option<ClipVision>,
    pub projector: Option<Projector>,
    /// Qwen2-VL / Qwen2.5-VL's vision transformer and merger (instead of `vision` and `projector`).
    pub qwen_vision: Option<crate::qwen_vit::QwenVision>,
    pub llm: Llama,
    pub image_processor: Option<ImageProcessorConfig>,
    /// LLaVA-NeXT's learned row end of the tiles' feature grid (C).
    pub image_newline: Option<Vec<f32>>,
    /// The checkpoint's weights as opened (memory-mapped, pages released after loading): a device backend
    /// uploads from them (`backend::CudaBackend::open`) instead of reading the files again.
    pub weights: std::sync::Arc<WeightStore>,
    linear_shapes: HashMap<String, (usize, usize)>,
    /// Where generation, scoring and training run (`crate::backend`): the CPU unless `set_backend` picked a device.
    backend: std::sync::Arc<dyn crate::backend::Backend>,
    /// Most bytes one generation request may take (`crate::limits`); None: only the context bounds it.
    pub(crate) request_budget: Option<u64>,
}

impl Model {
    /// Loads config.json, the safetensors weights and (for LLaVA) preprocessor_config.json from `dir`.
    /// 16-bit weights stay 16-bit in memory (see `load_with`).
    pub fn load(dir: &Path) -> Result<Model> {
        Self::load_with(dir, &LoadOptions::default())
    }

    pub fn load_with(dir: &Path, opts: &LoadOptions) -> Result<Model> {
        let keep = opts.keep_16bit;
        if !dir.is_dir() {
            return Err(EngineError::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model directory does not exist"),
            ));
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let ws = WeightStore::open_dir(dir, "model")?;
        let family = crate::family::Family::of(config.family());
        let layout = KeyLayout::detect(&ws, family)?;
        let text = config.text();
        let lm_head_key = if text.tie_word_embeddings {
            None
        } else if ws.contains(&format!("{}.weight", layout.lm_head)) {
            Some(layout.lm_head.as_str())
        } else {
            return Err(EngineError::MissingTensor {
                key: format!("{}.weight", layout.lm_head),
                searched: ws.source().to_string(),
                hint: "; config.json says tie_word_embeddings is false, so the checkpoint needs its own lm_head".into(),
            });
        };
        let llm = Llama::load(&ws, &layout.text, lm_head_key, text, keep)?;
        let image_newline = match config.llava() {
            Some(lc) if lc.anyres() => {
                let key = crate::family::llava_next::image_newline_key(&layout.projector);
                Some(ws.f32(key, &[text.hidden_size])?)
            }
            _ => None,
        };
        let (vision, projector, image_processor) = match config.llava() {
            None => (None, None, None),
            Some(lc) => {
                let vision = ClipVision::load(&ws, &layout.vision, &lc.vision, lc.vision_layers_needed(), keep)?;
                let (on_disk, canonical) = (Keys::new(&layout.projector), Keys::new("multi_modal_projector."));
                let [l1, l2] = projector_linears(lc).map(|(name, fi, fo)| {
                    Linear::load(&ws, &on_disk.key(name), canonical.key(name), fi, fo, lc.projector_bias, keep)
                });
                let projector = Projector { linear_1: l1?, linear_2: l2?, act: lc.projector_hidden_act };
                (Some(vision), Some(projector), (family.image_processor)(&config, dir)?)
            }
        };
        let (qwen_vision, image_processor) = match config.qwen_vl() {
            None => (None, image_processor),
            Some(qc) => (
                Some(crate::qwen_vit::QwenVision::load(&ws, &layout.vision, &qc.vision, keep)?),
                (family.image_processor)(&config, dir)?,
            ),
        };
        let mut linear_shapes = HashMap::new();
        let linears = llm
            .linears()
            .chain(vision.iter().flat_map(|v| v.linears()))
            .chain(qwen_vision.iter().flat_map(|v| v.linears()))
            .chain(projector.iter().flat_map(|p| [&p.linear_1, &p.linear_2]));
        for l in linears {
            linear_shapes.insert(l.name.clone(), (l.in_features, l.out_features));
        }
        // Vision layers past `vision_feature_layer` are never run, but adapters trained with peft may still
        // carry LoRA weights for them (e.g. target "q_proj" matches every CLIP layer): accept and ignore them.
        if let Some(lc) = config.llava() {
            let tower = Keys::new("vision_tower.");
            for l in lc.vision_layers_needed()..lc.vision.num_hidden_layers {
                for (m, fi, fo) in vision_linears(&lc.vision) {
                    linear_shapes.insert(vision_layer(&tower, l).key(m), (fi, fo));
                }
            }
        }
        ws.release_pages();
        Ok(Model {
            weights: std::sync::Arc::new(ws),
            dir: dir.to_path_buf(),
            config,
            layout,
            vision,
            projector,
            qwen_vision,
            llm,
            image_processor,
            image_newline,
            linear_shapes,
            backend: std::sync::Arc::new(crate::backend::CpuBackend),
            request_budget: None,
        })
    }

    /// Runs generation, scoring and training on `backend` from now on (`crate::backend::select`).
    pub fn set_backend(&mut self, backend: std::sync::Arc<dyn crate::backend::Backend>) {
        self.backend = backend;
    }

    /// The backend generation, scoring and training run on (the CPU unless `set_backend` picked a device).
    pub fn backend(&self) -> &std::sync::Arc<dyn crate::backend::Backend> {
        &self.backend
    }

    /// What generation and scoring run on: "cpu" or the device's description.
    pub fn device(&self) -> String {
        self.backend.device()
    }

    /// Where a LoRA training run (`what`: "DPO", "SFT") of `adapter` goes, decided once per run and logged.
    pub fn training_placement(&self, what: &str, adapter: &Adapter) -> crate::backend::Placement {
        let place = self.backend.training_placement(self, adapter);
        match &place {
            crate::backend::Placement::Cpu(Some(why)) => tracing::warn!("{what} training runs on the CPU: {why}"),
            p => tracing::info!("{what} training runs on {p}"),
        }
        place
    }

    /// How the decoder's weights are held in memory: "f32", "bf16" or "f16".
    pub fn weight_dtype(&self) -> &'static str {
        self.llm.embed.dtype()
    }

    pub fn family(&self) -> ModelFamily {
        self.config.family()
    }

    /// A fresh LoRA adapter for this model (peft initialisation), its keys in this checkpoint's naming.
    pub fn create_adapter(&self, spec: &crate::adapter::LoraSpec, seed: u64) -> Result<Adapter> {
        let mut modules: Vec<(String, String, usize, usize)> = self
            .linear_shapes
            .iter()
            .map(|(name, &(i, o))| {
                (
                    name.clone(),
                    crate::adapter::peft_module_path(name, self.family(), self.layout.name, &self.layout.vision),
                    i,
                    o,
                )
            })
            .collect();
        modules.sort();
        Adapter::create(spec, &modules, seed, &|name| self.get_param(name))
    }

    /// `LoraSpec::full_parameter` for this model (a text-only model's decoder lives under `model`, its head is
    /// `lm_head`).
    pub fn full_parameter_spec(&self) -> crate::adapter::LoraSpec {
        let mut spec = crate::adapter::LoraSpec::full_parameter();
        if self.image_token_id().is_none() {
            spec.modules_to_save = vec!["model".into(), "lm_head".into()];
        }
        spec
    }

    /// Loads a PEFT LoRA adapter made for this model.
    pub fn load_adapter(&self, dir: &Path) -> Result<Adapter> {
        Adapter::load(dir, self.family(), &self.linear_shapes)
    }

    pub fn image_token_id(&self) -> Option<u32> {
        self.config.image_token_id()
    }

    /// Decodes and preprocesses an image file for this model.
    pub fn load_image(&self, path: &Path) -> Result<PixelValues> {
        let ip = self.image_processor.as_ref().ok_or_else(|| {
            EngineError::Input(format!("{} is a text-only model; it takes no image", self.dir.display()))
        })?;
        let img = crate::image::load_rgb8(path)?;
        Ok(crate::image::preprocess(&img, ip)?)
    }

    /// Projected image features (N_img, C) for the decoder, on the model's backend.
    pub fn image_features(&self, pixels: &PixelValues, adapter: Option<&Adapter>) -> Result<ImageFeatures> {
        let rows = self.backend.image_features(self, pixels, adapter)?;
        Ok(ImageFeatures { rows, grid: self.feature_grid(pixels) })
    }

    /// The (rows, columns) of the merged patch grid an image's features form (Qwen2-VL); None for other families.
    pub(crate) fn feature_grid(&self, pixels: &PixelValues) -> Option<(usize, usize)> {
        match (self.config.qwen_vl(), pixels.grid) {
            (Some(qc), Some([_, h, w])) => Some((h / qc.vision.spatial_merge_size, w / qc.vision.spatial_merge_size)),
            _ => None,
        }
    }

    /// Multimodal RoPE (Qwen2-VL) of a prompt with an image: each decoder row's position (text rows one after
    /// another, the image's rows at (start, start + row, start + column) of its merged grid, the text after it
    /// continuing from start + max(rows, columns)) and the shift of the rows that follow (transformers'
    /// `get_rope_index` and `rope_deltas`). None where positions are the row indices.
    pub(crate) fn rope_positions(&self, ids: &[u32], feats: Option<&ImageFeatures>) -> Option<(Vec<usize>, isize)> {
        self.rope_positions_grid(ids, feats?.grid)
    }

    /// `rope_positions` given the image's merged grid (`feature_grid`).
    pub(crate) fn rope_positions_grid(&self, ids: &[u32], grid: Option<(usize, usize)>) -> Option<(Vec<usize>, isize)> {
        let (gh, gw) = grid?;
        if !self.llm.rope_is_mrope() {
            return None;
        }
        let image = self.image_token_id();
        let mut pos = Vec::with_capacity(ids.len() + gh * gw);
        let mut next = 0usize;
        for &id in ids {
            if Some(id) == image {
                pos.extend((0..gh * gw).map(|i| crate::ops::rope::mrope_position(next, next + i / gw, next + i % gw)));
                next += gh.max(gw);
            } else {
                pos.push(next);
                next += 1;
            }
        }
        let shift = next as isize - pos.len() as isize;
        Some((pos, shift))
    }

    /// Runs the rows `x` (T, C) of prompt `ids` (image expanded) into `cache`, at their multimodal RoPE positions
    /// where the model has them.
    pub(crate) fn forward_prompt_rows(
        &self,
        x: &mut [f32],
        ids: &[u32],
        feats: Option<&ImageFeatures>,
        cache: &mut KvCache,
        adapter: Option<&Adapter>,
    ) {
        let t = x.len() / self.llm.cfg.hidden_size;
        match self.rope_positions(ids, feats) {
            Some((pos, shift)) if pos.len() == t && cache.len == 0 => {
                self.llm.forward_at(x, t, &pos, cache, adapter);
                cache.shift = shift;
            }
            _ => self.llm.forward(x, t, cache, adapter),
        }
    }

    /// Checks that `pixels` holds what this model's image path takes: one image of the tower's size, or for
    /// LLaVA-NeXT a base image and its tiles.
    pub(crate) fn check_tiles(&self, pixels: &PixelValues) -> Result<()> {
        let Some(lc) = self.llava_cfg() else {
            return Err(EngineError::Input("this model has no vision tower".into()));
        };
        let s = lc.vision.image_size;
        let n = pixels.channels * pixels.height * pixels.width;
        if pixels.tiles == 0 || pixels.data.len() != pixels.tiles * n || (pixels.height, pixels.width) != (s, s) {
            return Err(EngineError::Input(format!(
                "pixel values of {} values as {} tiles of {}x{}x{}; the vision tower takes 3x{s}x{s} tiles",
                pixels.data.len(),
                pixels.tiles,
                pixels.channels,
                pixels.height,
                pixels.width
            )));
        }
        if pixels.tiles > 1 && !lc.anyres() {
            return Err(EngineError::Input(format!(
                "{} image tiles for a model without anyres tiling (image_grid_pinpoints); preprocess with its own processor",
                pixels.tiles
            )));
        }
        Ok(())
    }

    /// LLaVA-NeXT's packing of an anyres image (transformers' `pack_image_features`): for each decoder image row,
    /// the row of the tiles' projected features (base image first, `side`² rows a tile) it takes, or None for the
    /// `image_newline` that ends each row of the unpadded tile grid. The base image's rows come first.
    pub(crate) fn anyres_rows(&self, pixels: &PixelValues) -> Result<Vec<Option<usize>>> {
        let Some(lc) = self.llava_cfg() else {
            return Err(EngineError::Input("this model has no vision tower".into()));
        };
        let side = lc.vision.image_size / lc.vision.patch_size;
        let per = side * side;
        let mut rows: Vec<Option<usize>> = (0..per).map(Some).collect();
        if pixels.tiles == 1 {
            rows.push(None);
            return Ok(rows);
        }
        let (h, w) = pixels.original;
        if h == 0 || w == 0 || h > u32::MAX as usize || w > u32::MAX as usize {
            return Err(EngineError::Input(format!("anyres image of original size {w}x{h}")));
        }
        let pins: Vec<(u32, u32)> = lc.grid_pinpoints.iter().map(|&(a, b)| (a as u32, b as u32)).collect();
        let (gh, gw) = crate::image::grid_shape(h as u32, w as u32, &pins, lc.vision.image_size as u32);
        if gh * gw + 1 != pixels.tiles {
            return Err(EngineError::Input(format!(
                "a {w}x{h} image takes a {gh}x{gw} tile grid plus the base image ({} tiles), got {}",
                gh * gw + 1,
                pixels.tiles
            )));
        }
        let ((y0, y1), (x0, x1)) = crate::image::unpadded_window(gh * side, gw * side, h as u32, w as u32);
        rows.reserve((y1 - y0) * (x1 - x0 + 1));
        for y in y0..y1 {
            for x in x0..x1 {
                let tile = 1 + (y / side) * gw + x / side;
                rows.push(Some(tile * per + (y % side) * side + x % side));
            }
            rows.push(None);
        }
        Ok(rows)
    }

    /// The decoder's image rows from the tiles' projected features (`anyres_rows`).
    pub(crate) fn pack_anyres(&self, per_tile: &[f32], packing: &[Option<usize>]) -> Result<Vec<f32>> {
        let c = self.llm.cfg.hidden_size;
        let newline = self
            .image_newline
            .as_deref()
            .ok_or_else(|| EngineError::Input("this model has no image_newline for anyres images".into()))?;
        let mut out = Vec::with_capacity(packing.len() * c);
        for src in packing {
            match src {
                Some(r) => out.extend_from_slice(per_tile.get(r * c..(r + 1) * c).ok_or_else(|| {
                    EngineError::Input(format!("anyres packing reads feature row {r} of {}", per_tile.len() / c))
                })?),
                None => out.extend_from_slice(newline),
            }
        }
        Ok(out)
    }

    /// The decoder's image rows from the projected features of every tile of `pixels`, in order.
    pub(crate) fn image_rows(&self, pixels: &PixelValues, per_tile: Vec<f32>) -> Result<Vec<f32>> {
        match self.llava_cfg() {
            Some(lc) if lc.anyres() => self.pack_anyres(&per_tile, &self.anyres_rows(pixels)?),
            _ => Ok(per_tile),
        }
    }

    fn llava_cfg(&self) -> Option<&LlavaConfig> {
        self.config.llava()
    }

    /// Decoder input (T, C) for `ids`, with the single image token replaced by the image features.
    /// Returns the embeddings and, for each id, the row of its embedding (the image token's first row).
    pub fn embed_inputs(&self, ids: &[u32], image_features: Option<&[f32]>) -> Result<(Vec<f32>, Vec<usize>)> {
        let c = self.llm.cfg.hidden_size;
        let vocab = self.llm.cfg.vocab_size;
        let image_token = self.image_token_id();
        let n_image_tokens = ids.iter().filter(|&&t| Some(t) == image_token).count();
        match (n_image_tokens, image_features.is_some()) {
            (0, false) | (1, true) => {}
            (0, true) => {
                return Err(EngineError::Input(format!(
                    "an image was given but the input ids hold no image token ({})",
                    image_token.unwrap_or(0)
                )))
            }
            (1, false) => {
                return Err(EngineError::Input("the input ids hold the image token but no image was given".into()))
            }
            (n, _) => {
                return Err(EngineError::Input(format!(
                    "the input ids hold the image token {n} times; put it exactly once (rlaifd expands it)"
                )))
            }
        }
        let mut out = Vec::with_capacity((ids.len() + 1024) * c);
        let mut rows = Vec::with_capacity(ids.len());
        for (j, &id) in ids.iter().enumerate() {
            rows.push(out.len() / c);
            if Some(id) == image_token {
                out.extend_from_slice(image_features.unwrap_or_default());
            } else if (id as usize) < vocab {
                self.llm.embed_into(&mut out, &[id]);
            } else {
                return Err(EngineError::Input(format!(
                    "token id {id} at position {j} is outside the vocabulary (size {vocab})"
                )));
            }
        }
        Ok((out, rows))
    }

    /// log p(ids[j] | ids[..j], image) for every j >= 1 whose id is not the image token.
    pub fn logprobs(&self, ids: &[u32], pixels: Option<&PixelValues>, adapter: Option<&Adapter>) -> Result<Vec<f32>> {
        if ids.len() < 2 {
            return Err(EngineError::Input("need at least 2 input ids to score".into()));
        }
        let feats = match pixels {
            Some(p) => Some(self.image_features(p, adapter)?),
            None => None,
        };
        let (mut x, rows) = self.embed_inputs(ids, feats.as_deref())?;
        let c = self.llm.cfg.hidden_size;
        let mut cache = KvCache::new(self.llm.cfg.num_hidden_layers);
        self.forward_prompt_rows(&mut x, ids, feats.as_ref(), &mut cache, adapter);
        // Only the rows that predict a scored token need the lm_head.
        let image_token = self.image_token_id();
        let targets: Vec<(usize, u32)> =
            (1..ids.len()).filter(|&j| Some(ids[j]) != image_token).map(|j| (rows[j] - 1, ids[j])).collect();
        let mut sel = Vec::with_capacity(targets.len() * c);
        for &(r, _) in &targets {
            sel.extend_from_slice(&x[r * c..(r + 1) * c]);
        }
        let v = self.llm.cfg.vocab_size;
        let mut logits = self.llm.logits(&sel, targets.len(), adapter);
        log_softmax_rows(&mut logits, v);
        Ok(targets.iter().enumerate().map(|(i, &(_, tok))| logits[i * v + tok as usize]).collect())
    }

    /// Next-token logits after each of several prompts that share `prefix` (ids with the image token once, if
    /// any): the prefix (and image) run once, then every continuation in one batch. Returns one (V) row per
    /// continuation; each continuation needs at least one id.
    pub fn branch_logits(
        &self,
        prefix: &[u32],
        continuations: &[&[u32]],
        image_features: Option<&ImageFeatures>,
        adapter: Option<&Adapter>,
    ) -> Result<Vec<Vec<f32>>> {
        if continuations.is_empty() {
            return Ok(Vec::new());
        }
        if continuations.iter().any(|c| c.is_empty()) {
            return Err(EngineError::Input("every continuation needs at least one token".into()));
        }
        let vocab = self.llm.cfg.vocab_size;
        if continuations.iter().any(|c| c.iter().any(|&id| Some(id) == self.image_token_id() || id as usize >= vocab)) {
            return Err(EngineError::Input(
                "a continuation holds an image token or an id outside the vocabulary".into(),
            ));
        }
        self.backend.branch_logits(self, prefix, continuations, image_features, adapter)
    }

    /// Prefill: runs the prompt, returns its KV cache and the logits (V) of the next token.
    pub fn prefill(
        &self,
        ids: &[u32],
        image_features: Option<&ImageFeatures>,
        adapter: Option<&Adapter>,
    ) -> Result<(KvCache, Vec<f32>)> {
        let (mut x, _) = self.embed_inputs(ids, image_features.map(|f| &f.rows[..]))?;
        let c = self.llm.cfg.hidden_size;
        let t = x.len() / c;
        if t == 0 {
            return Err(EngineError::Input("empty prompt".into()));
        }
        let mut cache = KvCache::new(self.llm.cfg.num_hidden_layers);
        self.forward_prompt_rows(&mut x, ids, image_features, &mut cache, adapter);
        let logits = self.llm.logits(&x[(t - 1) * c..], 1, adapter);
        Ok((cache, logits))
    }
}

// -- scoring ------------------------------------------------------------------------------------------------

impl Model {
    #[allow(clippy::type_complexity)]
    pub(crate) fn answer_rows(
        &self,
        prompt: &[u32],
        answer: &[u32],
        feats: Option<&[f32]>,
    ) -> Result<(Vec<f32>, Vec<usize>, Vec<u32>, Option<(usize, usize)>, Vec<u32>, Vec<usize>)> {
        if prompt.is_empty() {
            return Err(EngineError::Input("empty prompt".into()));
        }
        let ids: Vec<u32> = prompt.iter().chain(answer).copied().collect();
        let (x, rows) = self.embed_inputs(&ids, feats)?;
        if let Some(&tok) = answer.iter().find(|&&t| Some(t) == self.image_token_id()) {
            return Err(EngineError::Input(format!("answer holds the image token {tok}")));
        }
        let pred_rows: Vec<usize> = (prompt.len()..ids.len()).map(|j| rows[j] - 1).collect();
        let image_rows = self.image_token_id().and_then(|it| ids.iter().position(|&t| t == it)).map(|p| {
            let n = feats.map_or(0, |f| f.len() / self.llm.cfg.hidden_size);
            (rows[p], n)
        });
        Ok((x, pred_rows, answer.to_vec(), image_rows, ids, rows))
    }

    /// Σ log p(answer | prompt, image) without keeping activations (reference model scoring), on the model's
    /// backend.
    pub fn answer_logp(
        &self,
        prompt: &[u32],
        answer: &[u32],
        feats: Option<&ImageFeatures>,
        adapter: Option<&Adapter>,
    ) -> Result<f64> {
        self.backend.answer_logp(self, prompt, answer, feats, adapter)
    }
}

// -- full fine-tuning: parameters by canonical name, and checkpoint saving ------------------------------------

impl Model {
    /// Every trainable base parameter by canonical name and shape (decoder, projector, loaded vision layers).
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = self.llm.param_shapes();
        if let Some(p) = &self.projector {
            for lin in [&p.linear_1, &p.linear_2] {
                out.push((format!("{}.weight", lin.name), vec![lin.out_features, lin.in_features]));
                if lin.bias.is_some() {
                    out.push((format!("{}.bias", lin.name), vec![lin.out_features]));
                }
            }
        }
        if let Some(v) = &self.vision {
            out.extend(v.param_shapes());
        }
        out
    }

    pub fn get_param(&self, name: &str) -> Option<Vec<f32>> {
        if name.starts_with("vision_tower.") {
            return self.vision.as_ref()?.get_param(name);
        }
        if name.starts_with("multi_modal_projector.") {
            let p = self.projector.as_ref()?;
            return [&p.linear_1, &p.linear_2].into_iter().find_map(|lin| lin.get_param(name));
        }
        self.llm.get_param(name)
    }

    /// Overwrites a base parameter; false for an unknown name.
    pub fn set_param(&mut self, name: &str, values: &[f32]) -> bool {
        if name.starts_with("vision_tower.") {
            return self.vision.as_mut().is_some_and(|v| v.set_param(name, values));
        }
        if name.starts_with("multi_modal_projector.") {
            let Some(p) = self.projector.as_mut() else { return false };
            return [&mut p.linear_1, &mut p.linear_2].into_iter().any(|lin| lin.set_param(name, values));
        }
        self.llm.set_param(name, values)
    }

    /// Writes the model as a Hugging Face checkpoint directory (same key layout and config as the one it was
    /// loaded from, weights f32), atomically: a temporary sibling directory, fsync'd, renamed over `dir`.
    /// Tensors the engine does not hold (e.g. vision layers past the feature layer) are copied unchanged.
    /// `extra` files (e.g. optimizer state) are written into the directory before the rename.
    pub fn save_checkpoint(&self, dir: &Path, extra: &[(&str, Vec<u8>)]) -> Result<()> {
        let src = WeightStore::open_dir(&self.dir, "model")?;
        let mut keys: Vec<String> = src.keys().map(str::to_string).collect();
        keys.sort();
        let mut values: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::with_capacity(keys.len());
        for key in keys {
            let shape = src.shape(&key).map(|s| s.to_vec()).unwrap_or_default();
            let ours = crate::adapter::canonical_module(&key, self.family()).and_then(|c| self.get_param(&c));
            let v = match ours {
                Some(v) => v,
                None => src.f32_any_shape(&key)?,
            };
            values.push((key, shape, v));
        }
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| EngineError::write(parent, e))?;
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("model");
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| EngineError::write(&tmp, e))?;
        let result = (|| -> Result<()> {
            let tensors: Vec<(String, Vec<usize>, &[f32])> =
                values.iter().map(|(k, s, v)| (k.clone(), s.clone(), v.as_slice())).collect();
            crate::weights::write_f32_safetensors(&tmp.join("model.safetensors"), &tensors)?;
            // Everything else that describes the model (config, tokenizer, processor) is copied as is.
            let entries = std::fs::read_dir(&self.dir).map_err(|e| EngineError::io(&self.dir, e))?;
            for e in entries.flatten() {
                let fname = e.file_name().to_string_lossy().to_string();
                if fname.ends_with(".safetensors") || fname.ends_with(".safetensors.index.json") || !e.path().is_file()
                {
                    continue;
                }
                if extra.iter().any(|(name, _)| *name == fname) {
                    continue;
                }
                std::fs::copy(e.path(), tmp.join(&fname)).map_err(|err| EngineError::io(e.path(), err))?;
            }
            for (name, bytes) in extra {
                std::fs::write(tmp.join(name), bytes).map_err(|e| EngineError::write(tmp.join(name), e))?;
            }
            if dir.exists() {
                std::fs::remove_dir_all(dir).map_err(|e| EngineError::write(dir, e))?;
            }
            std::fs::rename(&tmp, dir).map_err(|e| EngineError::write(dir, e))?;
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }
}
