//! The CUDA backend of one device: the decoder, the image path and the LoRA trainers on the GPU
//! (`cuda_llama`, `cuda_clip`, `cuda_lora`, `cuda_train`), the adapters uploaded once and cached; what the device
//! cannot apply runs on `CpuBackend`.

use crate::adapter::Adapter;
use crate::backend::{Backend, CpuBackend, DeviceSpec, Placement};
use crate::cuda::Gpu;
use crate::cuda_llama::{GpuLlama, HostInput, Input};
use crate::cuda_lora::GpuLora;
use crate::error::{EngineError, Result};
use crate::generate::{Answer, GenerateRequest, GenerateStats};
use crate::llava::{ImageFeatures, Model};
use crate::train::dpo::TokenPair;
use crate::train::optim::AdamW;
use crate::train::sft::{SftConfig, SftExample, SftStepLog};
use crate::train::trainer::{StepLog, TrainConfig};
use std::sync::{Arc, Mutex};

/// Adapters kept on the device at once (the policy, the reference, the served checkpoint and one more).
const ADAPTER_SLOTS: usize = 4;

/// The CUDA backend of one device.
pub struct CudaBackend {
    ordinal: usize,
    label: String,
    /// Shared with the batch rows made on this device (`batch_rows`).
    state: Arc<Mutex<CudaState>>,
}

struct CudaState {
    gpu: Gpu,
    llama: GpuLlama,
    /// The image path on the device; None for a text model, or (with a note on stderr at start) one the GPU
    /// kernels cannot run: the CPU computes the features then.
    vision: Option<crate::cuda_clip::GpuVision>,
    /// Uploaded adapters, most recently used last: (fingerprint, adapter).
    adapters: Vec<(u64, OnGpu)>,
    /// Fingerprints of adapters found unsupported (warned about once; they run on the CPU).
    refused: Vec<u64>,
    /// The same for adapters' image-path changes (`cuda_clip::GpuVisionAdapter`), by `fingerprint(_, IMAGE_PATH)`.
    vision_adapters: Vec<(u64, Arc<crate::cuda_clip::GpuVisionAdapter>)>,
    vision_refused: Vec<u64>,
}

/// Where an adapter's image path runs (`CudaState::vision_adapter`).
enum VisionOn {
    /// On the device, with these changes (None: the adapter changes nothing there).
    Gpu(Option<Arc<crate::cuda_clip::GpuVisionAdapter>>),
    /// On the CPU backend.
    Cpu,
}

/// The module-name prefixes of the decoder (`fingerprint`; the image path's are `cuda_clip::IMAGE_PATH`).
const DECODER: &[&str] = &["language_model.", "lm_head."];
use crate::cuda_clip::IMAGE_PATH;

/// The entry under `key` of a most-recently-used-last cache, moved to the back; None when absent.
fn cache_get<T: Clone>(cache: &mut Vec<(u64, T)>, key: u64) -> Option<T> {
    let i = cache.iter().position(|(k, _)| *k == key)?;
    let hit = cache.remove(i);
    let v = hit.1.clone();
    cache.push(hit);
    Some(v)
}

/// Adds `value` under `key` to a most-recently-used-last cache of `ADAPTER_SLOTS` entries, evicting the oldest.
fn cache_put<T: Clone>(cache: &mut Vec<(u64, T)>, key: u64, value: T) -> T {
    if cache.len() >= ADAPTER_SLOTS {
        cache.remove(0);
    }
    cache.push((key, value.clone()));
    value
}

/// Identifies an adapter's factors in one part of the model (`DECODER` or `IMAGE_PATH`, by module name prefix) by
/// value: its path, its modules' names, ranks, scales and sizes, every 61st value of each factor (all of them change
/// in a training step) and the same of the parameters it replaces there. An adapter changed in place or a new one
/// at a reused address gets a new upload, and hashing stays ~1 ms for a 7B model's adapter (per call).
fn fingerprint(adapter: &Adapter, part: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |v: u64| h = (h ^ v).wrapping_mul(0x0100_0000_01b3);
    let mix_values = |f: &[f32], mix: &mut dyn FnMut(u64)| {
        mix(f.len() as u64);
        f.iter().step_by(61).chain(f.last()).for_each(|v| mix(v.to_bits() as u64));
    };
    let ours = |name: &str| part.iter().any(|p| name.starts_with(p));
    adapter.path.to_string_lossy().bytes().for_each(|b| mix(b as u64));
    for (name, m) in adapter.modules() {
        if !ours(name) {
            continue;
        }
        name.bytes().for_each(|b| mix(b as u64));
        mix(m.r as u64);
        mix(m.scale.to_bits() as u64);
        for f in [&m.a, &m.b] {
            mix_values(f, &mut mix);
        }
    }
    for (name, p) in adapter.saved_params() {
        if ours(name) {
            name.bytes().for_each(|b| mix(b as u64));
            mix_values(&p.values, &mut mix);
        }
    }
    h
}

impl CudaBackend {
    /// Opens device `ordinal`, compiles the kernels and uploads `model`'s decoder. Err(reason) when there is no
    /// usable GPU or the decoder cannot run there.
    pub fn open(ordinal: usize, model: &Model) -> std::result::Result<CudaBackend, String> {
        let gpu = match Gpu::open(ordinal) {
            Ok(Ok(g)) => g,
            Ok(Err(why)) => return Err(why),
            Err(e) => return Err(format!("the CUDA kernels cannot be built: {e}")),
        };
        let max_positions = model.llm.cfg.max_position_embeddings.max(1);
        let llama = crate::cuda_llama::from_model(&gpu, model, max_positions)
            .map_err(|e| format!("the decoder of {} cannot run on the GPU: {e}", model.dir.display()))?;
        if model.config.qwen_vl().is_some() {
            tracing::info!(
                "the vision transformer of {} runs on the CPU backend (Qwen2-VL's has no CUDA kernels yet); its \
                 decoder runs on the GPU",
                model.dir.display()
            );
        }
        let vision = match model.config.llava() {
            None => None,
            Some(_) => match crate::cuda_clip::GpuVision::load(&gpu, &model.weights, &model.layout, &model.config) {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::warn!("the image path of {} runs on the CPU: {e}", model.dir.display());
                    None
                }
            },
        };
        // The upload read the checkpoint's pages back in; the device holds the weights now.
        model.weights.release_pages();
        let label = format!("cuda:{ordinal} ({}, {})", gpu.name, gpu.arch);
        Ok(CudaBackend {
            ordinal,
            label,
            state: Arc::new(Mutex::new(CudaState {
                gpu,
                llama,
                vision,
                adapters: Vec::new(),
                refused: Vec::new(),
                vision_adapters: Vec::new(),
                vision_refused: Vec::new(),
            })),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, CudaState>> {
        lock_state(&self.state)
    }
}

fn lock_state(state: &Mutex<CudaState>) -> Result<std::sync::MutexGuard<'_, CudaState>> {
    state
        .lock()
        .map_err(|_| EngineError::Input("the CUDA backend's state is poisoned (an earlier call panicked)".into()))
}

/// The most of the device's free memory a batch's caches take when they are made.
const BATCH_MEMORY_SHARE: f64 = 0.5;

/// Device bytes per value a full-parameter run trains whole: the fp32 master, gradient and two AdamW moments, the
/// fp16 copy the passes read and one pass's fp16 gradient (`GpuLora`).
const WHOLE_BYTES_PER_VALUE: u64 = 4 + 4 + 4 + 4 + 2 + 2;

/// The share of the free device memory a full-parameter run's whole parameters may take.
const WHOLE_MEMORY_SHARE: f64 = 0.8;

/// A continuous batch's rows on the device (`crate::batch::BatchRows`): `GpuRows` slots, one per answer, under
/// one adapter.
struct CudaRows {
    state: Arc<Mutex<CudaState>>,
    rows: crate::cuda_llama::GpuRows,
    adapter: Option<Arc<Adapter>>,
    on: OnGpu,
    label: String,
}

impl crate::batch::BatchRows for CudaRows {
    fn capacity(&self) -> Option<usize> {
        Some(self.rows.slots())
    }

    fn positions(&self) -> Option<usize> {
        Some(self.rows.capacity())
    }

    fn device(&self) -> String {
        self.label.clone()
    }

    fn admit(&mut self, model: &Model, req: &GenerateRequest, n: usize) -> Result<(Vec<usize>, Vec<f32>)> {
        let free: Vec<usize> = (0..self.rows.slots()).filter(|&s| self.rows.filled(s) == 0).take(n).collect();
        if free.len() < n {
            return Err(EngineError::Input(format!(
                "the batch on {} has {} free rows, the request asks for {n}",
                self.label,
                free.len()
            )));
        }
        let mut guard = lock_state(&self.state)?;
        let st = &mut *guard;
        let rows = st.prompt_rows(model, req, self.adapter.as_deref())?;
        let input = rows.as_ref().map_or(Input::Ids(req.ids), HostInput::input);
        let llama = self.on.llama(&st.llama);
        let (prompt, shift, first) = llama.rows_prefill(&st.gpu, input, self.on.lora.as_deref())?;
        for (i, &slot) in free.iter().enumerate() {
            if let Err(e) = llama.rows_fill(&st.gpu, &mut self.rows, slot, &prompt, shift) {
                for &s in &free[..i] {
                    self.rows.release(s);
                }
                return Err(e);
            }
        }
        Ok((free, first))
    }

    fn step(&mut self, _model: &Model, feed: &[(usize, u32)]) -> Result<Vec<f32>> {
        let guard = lock_state(&self.state)?;
        self.on.llama(&guard.llama).rows_step(&guard.gpu, &mut self.rows, feed, self.on.lora.as_deref())
    }

    fn release(&mut self, row: usize) {
        self.rows.release(row);
    }
}

/// Where an adapter's decoder runs (`CudaState::lora`).
enum LoraOn {
    /// On the device.
    Gpu(OnGpu),
    /// On the CPU backend.
    Cpu,
}

/// An adapter's decoder on the device: a copy of the decoder holding the whole parameters a full-parameter
/// checkpoint replaces (`GpuLlama::with_whole`; None: the base's), and its LoRA factors (None: none).
#[derive(Clone, Default)]
struct OnGpu {
    decoder: Option<Arc<GpuLlama>>,
    lora: Option<Arc<GpuLora>>,
}

impl OnGpu {
    /// The decoder to run: the adapter's copy, or `base`.
    fn llama<'a>(&'a self, base: &'a GpuLlama) -> &'a GpuLlama {
        self.decoder.as_deref().unwrap_or(base)
    }
}

/// Why `need` bytes do not fit in `share` of the device's free memory (`why(need GiB, free GiB)`), or None.
fn over_free_share(
    gpu: &crate::cuda::Gpu,
    need: f64,
    share: f64,
    why: impl FnOnce(f64, f64) -> String,
) -> Option<String> {
    let free = match gpu.ctx.mem_get_info() {
        Ok((free, _)) => free as f64,
        Err(e) => return Some(format!("the device's free memory is unknown ({e})")),
    };
    let gib = |b: f64| b / (1u64 << 30) as f64;
    (need > free * share).then(|| why(gib(need), gib(free)))
}

/// The share of the free device memory a full-parameter checkpoint's copy of the decoder may take for serving.
const WHOLE_COPY_SHARE: f64 = 0.5;

/// Whether `adapter` changes the image path (LoRA on the vision tower or projector, or replaced parameters there).
fn touches_image_path(adapter: Option<&Adapter>) -> bool {
    use crate::cuda_clip::in_image_path;
    adapter.is_some_and(|a| {
        a.module_names().into_iter().any(in_image_path) || a.saved_params().any(|(n, _)| in_image_path(n))
    })
}

impl CudaState {
    /// Projected image features under `adapter`: on the device when the image path is there and can apply what the
    /// adapter changes in it, else on the CPU.
    fn features(
        &mut self,
        model: &Model,
        pixels: &crate::image::PixelValues,
        adapter: Option<&Adapter>,
    ) -> Result<Vec<f32>> {
        let on = self.vision_adapter(adapter)?;
        self.features_on(model, pixels, adapter, &on)
    }

    /// The decoder input of `req`'s prompt under `adapter`: None for text (its ids go in as they are), else the
    /// host rows with the image's features in place (`decoder_input`).
    fn prompt_rows(
        &mut self,
        model: &Model,
        req: &GenerateRequest,
        adapter: Option<&Adapter>,
    ) -> Result<Option<HostInput>> {
        let feats = match req.pixels {
            Some(p) => Some(self.features(model, p, adapter)?),
            None => None,
        };
        let feats = feats.map(|rows| ImageFeatures { rows, grid: req.pixels.and_then(|p| model.feature_grid(p)) });
        decoder_input(model, req.ids, feats.as_ref())
    }

    /// `features` with the adapter's image path already placed (`vision_adapter`).
    fn features_on(
        &self,
        model: &Model,
        pixels: &crate::image::PixelValues,
        adapter: Option<&Adapter>,
        on: &VisionOn,
    ) -> Result<Vec<f32>> {
        match (&self.vision, on) {
            (Some(v), VisionOn::Gpu(va)) => {
                model.check_tiles(pixels)?;
                let mut per_tile = Vec::new();
                for i in 0..pixels.tiles {
                    per_tile.extend(v.features(&self.gpu, pixels.tile(i), va.as_deref())?);
                }
                model.image_rows(pixels, per_tile)
            }
            _ => CpuBackend.image_features(model, pixels, adapter),
        }
    }

    /// Where `adapter`'s image path runs: on the device (its image-path changes uploaded once, kept among the
    /// last `ADAPTER_SLOTS`), or on the CPU when there is no GPU image path or it cannot apply them (said once on
    /// stderr).
    fn vision_adapter(&mut self, adapter: Option<&Adapter>) -> Result<VisionOn> {
        let (Some(v), Some(a)) = (&self.vision, adapter.filter(|a| touches_image_path(Some(a)))) else {
            return Ok(if self.vision.is_some() { VisionOn::Gpu(None) } else { VisionOn::Cpu });
        };
        let key = fingerprint(a, IMAGE_PATH);
        if self.vision_refused.contains(&key) {
            return Ok(VisionOn::Cpu);
        }
        if let Some(va) = cache_get(&mut self.vision_adapters, key) {
            return Ok(VisionOn::Gpu(Some(va)));
        }
        if let Some(why) = crate::cuda_clip::GpuVisionAdapter::unsupported(v, a) {
            tracing::warn!("the image path of adapter {} runs on the CPU: {why}", a.path.display());
            self.vision_refused.push(key);
            return Ok(VisionOn::Cpu);
        }
        // A device error (out of memory, say) is an error, not a reason to fall back.
        let Some(va) = crate::cuda_clip::GpuVisionAdapter::upload(&self.gpu, v, a)? else {
            return Ok(VisionOn::Gpu(None));
        };
        Ok(VisionOn::Gpu(Some(cache_put(&mut self.vision_adapters, key, Arc::new(va)))))
    }

    /// Where `adapter` runs: on the device (its decoder factors uploaded once, kept among the last
    /// `ADAPTER_SLOTS`), or on the CPU when the GPU decoder cannot apply it (said once on stderr). A device error
    /// (out of memory, say) is an error, not a reason to fall back.
    fn lora(&mut self, adapter: Option<&Adapter>) -> Result<LoraOn> {
        let Some(a) = adapter else { return Ok(LoraOn::Gpu(OnGpu::default())) };
        // An adapter that changes only the image path leaves the decoder as it is: the GPU decoder without LoRA.
        let outside = |n: &str| !crate::cuda_clip::in_image_path(n);
        let lora = a.module_names().into_iter().any(outside);
        let whole = a.saved_params().any(|(n, _)| outside(n));
        if !lora && !whole {
            return Ok(LoraOn::Gpu(OnGpu::default()));
        }
        let key = fingerprint(a, DECODER);
        if self.refused.contains(&key) {
            return Ok(LoraOn::Cpu);
        }
        if let Some(l) = cache_get(&mut self.adapters, key) {
            return Ok(LoraOn::Gpu(l));
        }
        let cfg = &self.llama.cfg;
        // A full-parameter checkpoint runs on a copy of the decoder holding its whole parameters (LoRA beside them
        // as usual), when the copy fits.
        let why = match whole {
            false => crate::cuda_train::inference_rank(cfg, a).err().map(|e| e.to_string()),
            true => crate::cuda_train::whole_decoder_values(cfg, a)
                .and_then(|_| crate::cuda_train::decoder_lora_rank(cfg, a))
                .err()
                .map(|e| e.to_string())
                .or_else(|| self.whole_copy_fits()),
        };
        if let Some(e) = why {
            tracing::warn!("adapter {} runs on the CPU: {e}", a.path.display());
            self.refused.push(key);
            return Ok(LoraOn::Cpu);
        }
        let lora = match lora {
            true => Some(Arc::new(GpuLora::for_inference(&self.gpu, cfg, a)?)),
            false => None,
        };
        let decoder = match whole {
            true => {
                // One copy of the decoder at a time: an older checkpoint's is dropped (a batch still running on it
                // keeps it until it ends).
                self.adapters.retain(|(_, on)| on.decoder.is_none());
                Some(Arc::new(self.llama.with_whole(&self.gpu, a)?))
            }
            false => None,
        };
        Ok(LoraOn::Gpu(cache_put(&mut self.adapters, key, OnGpu { decoder, lora })))
    }

    /// Why a copy of the decoder for a full-parameter checkpoint does not fit the device (None: it does).
    fn whole_copy_fits(&self) -> Option<String> {
        // The matrices, and the embeddings `weight_bytes` leaves out.
        let cfg = &self.llama.cfg;
        let need = (self.llama.weight_bytes() + 2 * (cfg.vocab_size * cfg.hidden_size) as u64) as f64;
        over_free_share(&self.gpu, need, WHOLE_COPY_SHARE, |need, free| {
            format!("a full-parameter checkpoint is served from a copy of the decoder ({need:.1} GiB) and {free:.1} GiB of device memory is free")
        })
    }
}

/// The decoder input of `ids` (with `feats` in place of the image token): the ids themselves when there is no
/// image, else the rows `Model::embed_inputs` builds on the host, with their multimodal RoPE positions where the
/// model has them (Qwen2-VL).
fn decoder_input(model: &Model, ids: &[u32], feats: Option<&ImageFeatures>) -> Result<Option<HostInput>> {
    let has_image = model.image_token_id().is_some_and(|t| ids.contains(&t));
    if feats.is_none() && !has_image {
        return Ok(None);
    }
    let rows = model.embed_inputs(ids, feats.map(|f| &f.rows[..]))?.0;
    Ok(Some(HostInput { rows, placed: model.rope_positions(ids, feats) }))
}

impl Backend for CudaBackend {
    fn device(&self) -> String {
        self.label.clone()
    }

    fn spec(&self) -> DeviceSpec {
        DeviceSpec::Cuda(self.ordinal)
    }

    fn generate(
        &self,
        model: &Model,
        req: &GenerateRequest,
        adapter: Option<&Adapter>,
    ) -> Result<(Vec<Answer>, GenerateStats)> {
        let t0 = std::time::Instant::now();
        let mut guard = self.lock()?;
        let st = &mut *guard;
        let LoraOn::Gpu(on) = st.lora(adapter)? else {
            drop(guard);
            return CpuBackend.generate(model, req, adapter);
        };
        let cfg = &model.llm.cfg;
        let stop: Vec<u32> = if req.stop_ids.is_empty() { cfg.eos_token_ids.clone() } else { req.stop_ids.clone() };
        let rows = st.prompt_rows(model, req, adapter)?;
        let input = rows.as_ref().map_or(Input::Ids(req.ids), HostInput::input);
        let before = t0.elapsed().as_secs_f64();
        let (answers, mut stats) = on.llama(&st.llama).sample_answers(
            &st.gpu,
            input,
            req.ids,
            req.seeds,
            &req.params,
            &stop,
            on.lora.as_deref(),
        )?;
        // The prefill time includes the image path.
        stats.prefill_s += before;
        Ok((answers, stats))
    }

    /// Slots of the device's batch cache, each the context long: as many as `max_answers` asks, or as
    /// `BATCH_MEMORY_SHARE` of the device's free memory holds (at least one). An adapter the GPU decoder cannot
    /// apply keeps the batch on the CPU, as `generate` does.
    fn batch_rows(
        &self,
        model: &Model,
        adapter: Option<Arc<Adapter>>,
        max_answers: usize,
    ) -> Result<Box<dyn crate::batch::BatchRows>> {
        let mut guard = self.lock()?;
        let st = &mut *guard;
        let LoraOn::Gpu(on) = st.lora(adapter.as_deref())? else {
            return Ok(Box::new(crate::batch::CpuRows::new(adapter)));
        };
        let positions = st.llama.max_positions.min(model.context_len()).max(2);
        let per_slot = crate::cuda_llama::kv_bytes_per_position(&st.llama.cfg) * positions as u64
            + 2 * model.llm.cfg.vocab_size as u64;
        let (free, _) = st.gpu.ctx.mem_get_info().map_err(crate::cuda::derr)?;
        let fit = ((free as f64 * BATCH_MEMORY_SHARE) as u64 / per_slot.max(1)) as usize;
        let slots = max_answers.clamp(1, 1024).min(fit.max(1));
        let rows = on.llama(&st.llama).new_rows(&st.gpu, slots, positions, on.lora.as_deref())?;
        drop(guard);
        Ok(Box::new(CudaRows { state: self.state.clone(), rows, adapter, on, label: self.label.clone() }))
    }

    fn answer_logp(
        &self,
        model: &Model,
        prompt: &[u32],
        answer: &[u32],
        feats: Option<&ImageFeatures>,
        adapter: Option<&Adapter>,
    ) -> Result<f64> {
        if prompt.is_empty() {
            return Err(EngineError::Input("empty prompt".into()));
        }
        if let Some(&tok) = answer.iter().find(|&&t| Some(t) == model.image_token_id()) {
            return Err(EngineError::Input(format!("answer holds the image token {tok}")));
        }
        let ids: Vec<u32> = prompt.iter().chain(answer).copied().collect();
        // Checks the ids and the image token, and gives the row of every id.
        let (x, id_rows) = model.embed_inputs(&ids, feats.map(|f| &f.rows[..]))?;
        let x = HostInput { rows: x, placed: model.rope_positions(&ids, feats) };
        if answer.is_empty() {
            return Ok(0.0);
        }
        let mut guard = self.lock()?;
        let st = &mut *guard;
        let LoraOn::Gpu(on) = st.lora(adapter)? else {
            drop(guard);
            return CpuBackend.answer_logp(model, prompt, answer, feats, adapter);
        };
        let c = model.llm.cfg.hidden_size;
        let v = model.llm.cfg.vocab_size;
        let total = x.rows.len() / c;
        // The answer is text after the prompt: its ids sit on consecutive rows, each predicted by the row before.
        let from = id_rows[prompt.len()] - 1;
        let llama = on.llama(&st.llama);
        let mut cache = llama.new_cache(&st.gpu, total)?;
        let logits = llama.forward_input(&st.gpu, x.input(), &mut cache, Some(from), on.lora.as_deref())?;
        let mut sum = 0.0f64;
        for (i, &tok) in answer.iter().enumerate() {
            let row = &logits[i * v..(i + 1) * v];
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &z| m.max(z)) as f64;
            let lse = max + row.iter().map(|&z| (z as f64 - max).exp()).sum::<f64>().ln();
            sum += row[tok as usize] as f64 - lse;
        }
        Ok(sum)
    }

    /// The prefix runs once into a shared cache; the continuations then step together one token at a time (a
    /// decode session whose sequence b feeds continuation b's tokens, a finished one repeating its last), and each
    /// keeps the logits of its own last token.
    fn branch_logits(
        &self,
        model: &Model,
        prefix: &[u32],
        continuations: &[&[u32]],
        feats: Option<&ImageFeatures>,
        adapter: Option<&Adapter>,
    ) -> Result<Vec<Vec<f32>>> {
        // `Model::branch_logits` checked the continuations.
        let vocab = model.llm.cfg.vocab_size;
        // An empty prefix (no shared part) has nothing to prefill: the CPU handles that rare case.
        if prefix.is_empty() {
            return CpuBackend.branch_logits(model, prefix, continuations, feats, adapter);
        }
        let rows = model.embed_inputs(prefix, feats.map(|f| &f.rows[..]))?.0;
        let rows = HostInput { rows, placed: model.rope_positions(prefix, feats) };
        let mut guard = self.lock()?;
        let st = &mut *guard;
        let LoraOn::Gpu(on) = st.lora(adapter)? else {
            drop(guard);
            return CpuBackend.branch_logits(model, prefix, continuations, feats, adapter);
        };
        let (llama, lora) = (on.llama(&st.llama), on.lora.as_deref());
        let n = continuations.len();
        let longest = continuations.iter().map(|c| c.len()).max().unwrap_or(1);
        let (mut sess, _) = llama.start_decode_input(&st.gpu, rows.input(), n, longest, lora)?;
        let mut out = vec![Vec::new(); n];
        for t in 0..longest {
            let feed: Vec<u32> = continuations.iter().map(|c| c[t.min(c.len() - 1)]).collect();
            let logits = llama.decode_step_lora(&st.gpu, &mut sess, &feed, lora)?;
            for (b, c) in continuations.iter().enumerate() {
                if c.len() == t + 1 {
                    out[b] = logits[b * vocab..(b + 1) * vocab].to_vec();
                }
            }
        }
        Ok(out)
    }

    fn image_features(
        &self,
        model: &Model,
        pixels: &crate::image::PixelValues,
        adapter: Option<&Adapter>,
    ) -> Result<Vec<f32>> {
        self.lock()?.features(model, pixels, adapter)
    }

    fn training_placement(&self, _model: &Model, adapter: &Adapter) -> Placement {
        match self.lock() {
            Ok(st) => match Self::why_not_trainable(&st, adapter) {
                None => Placement::Device(self.label.clone()),
                Some(why) => Placement::Cpu(Some(why)),
            },
            Err(e) => Placement::Cpu(Some(e.to_string())),
        }
    }

    fn train_dpo(
        &self,
        model: &Model,
        adapter: &mut Adapter,
        pairs: &[TokenPair],
        refs: &[(f64, f64)],
        cfg: &TrainConfig,
        opt: &mut AdamW,
        stop_after: Option<usize>,
        on_step: &mut dyn FnMut(&StepLog),
    ) -> Result<()> {
        self.train_on_gpu(model, adapter, |st, adapter, features| {
            crate::cuda_train::train_dpo_gpu(
                &st.gpu,
                &st.llama,
                model,
                adapter,
                pairs,
                refs,
                cfg,
                opt,
                stop_after,
                st.vision.as_ref(),
                features,
                on_step,
            )
        })
    }
    fn train_dpo_rank(
        &self,
        model: &Model,
        adapter: &mut Adapter,
        pairs: &[TokenPair],
        refs: &[(f64, f64)],
        cfg: &TrainConfig,
        opt: &mut AdamW,
        stop_after: Option<usize>,
        rank: &crate::train::parallel::Rank,
        on_step: &mut dyn FnMut(&StepLog),
    ) -> Result<()> {
        let r = self.train_on_gpu(model, adapter, |st, adapter, features| {
            crate::cuda_train::train_dpo_gpu_rank(
                &st.gpu,
                &st.llama,
                model,
                adapter,
                pairs,
                refs,
                cfg,
                opt,
                stop_after,
                st.vision.as_ref(),
                features,
                on_step,
                Some(rank),
            )
        });
        if let Err(e) = &r {
            rank.meeting.abandon(rank.rank, &e.to_string());
        }
        r
    }
    fn train_sft(
        &self,
        model: &Model,
        adapter: &mut Adapter,
        examples: &[SftExample],
        cfg: &SftConfig,
        opt: &mut AdamW,
        stop_after: Option<usize>,
        on_step: &mut dyn FnMut(&SftStepLog),
    ) -> Result<()> {
        self.train_on_gpu(model, adapter, |st, adapter, features| {
            crate::cuda_train::train_sft_gpu(
                &st.gpu,
                &st.llama,
                model,
                adapter,
                examples,
                cfg,
                opt,
                stop_after,
                st.vision.as_ref(),
                features,
                on_step,
            )
        })
    }
}

impl CudaBackend {
    /// Why the GPU trainer cannot train `adapter` (None: it can).
    fn why_not_trainable(st: &CudaState, adapter: &Adapter) -> Option<String> {
        crate::cuda_train::gpu_trainable(&st.llama.cfg, adapter).or_else(|| Self::whole_fits(st, adapter)).or_else(
            || match (&st.vision, touches_image_path(Some(adapter))) {
                (_, false) => None,
                (None, true) => {
                    Some("the adapter has LoRA on the image path, which runs on the CPU for this model".to_string())
                }
                (Some(v), true) => crate::cuda_clip::GpuVisionAdapter::unsupported(v, adapter),
            },
        )
    }

    /// Why full-parameter training of `adapter` does not fit the device (None: it does, or the adapter trains LoRA
    /// only): its whole decoder parameters need `WHOLE_BYTES_PER_VALUE` bytes each beside the model, and at most
    /// `WHOLE_MEMORY_SHARE` of the free memory goes to them (the rest to the passes' activations).
    fn whole_fits(st: &CudaState, adapter: &Adapter) -> Option<String> {
        let n = crate::cuda_train::whole_decoder_values(&st.llama.cfg, adapter).ok()?;
        if n == 0 {
            return None;
        }
        let need = n as f64 * WHOLE_BYTES_PER_VALUE as f64;
        over_free_share(&st.gpu, need, WHOLE_MEMORY_SHARE, |need, free| {
            format!(
                "full-parameter training of {n} decoder values needs {need:.1} GiB of device memory (fp32 masters, gradients and AdamW moments, fp16 copies) and {free:.1} GiB is free; train LoRA (loop.tuning = \"lora\") or use a device with more memory"
            )
        })
    }

    /// A GPU trainer's run (`run`, given the device, the adapter and the image features of the GPU image path) for
    /// `adapter`; an error when the GPU trainer cannot train it (`training_placement` says so first).
    #[allow(clippy::type_complexity)]
    fn train_on_gpu(
        &self,
        model: &Model,
        adapter: &mut Adapter,
        run: impl FnOnce(
            &CudaState,
            &mut Adapter,
            &mut dyn FnMut(&crate::image::PixelValues) -> Result<Vec<f32>>,
        ) -> Result<u64>,
    ) -> Result<()> {
        let guard = self.lock()?;
        if let Some(why) = Self::why_not_trainable(&guard, adapter) {
            return Err(EngineError::Device(format!("{} cannot train this adapter: {why}", self.label)));
        }
        let st = &*guard;
        // Features of the image path without the adapter's changes: used when the adapter has none (with image-path
        // LoRA the trainer computes each image's features under it, on the device).
        let mut features = |px: &crate::image::PixelValues| st.features_on(model, px, None, &VisionOn::Gpu(None));
        run(st, adapter, &mut features).map(report_skipped)
    }
}

/// Logs how many GPU training steps overflowed in fp16 (each skipped, the loss scale lowered).
fn report_skipped(skipped: u64) {
    if skipped > 0 {
        tracing::warn!("{skipped} GPU training steps overflowed in fp16 and were skipped (loss scale lowered)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adapter_changed_by_training_gets_a_new_fingerprint() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/shapes-base");
        let model = Model::load(&dir).unwrap();
        let spec = crate::adapter::LoraSpec { r: 4, lora_alpha: 8.0, ..Default::default() };
        let a = model.create_adapter(&spec, 1).unwrap();
        let mut b = model.create_adapter(&spec, 1).unwrap();
        assert_eq!(fingerprint(&a, DECODER), fingerprint(&b, DECODER), "the same adapter twice");
        // A step of training moves every value of B (a sampled one included).
        let name = b.module_names()[0].to_string();
        b.module_mut(&name).unwrap().b.iter_mut().for_each(|v| *v += 1e-3);
        assert_ne!(fingerprint(&a, DECODER), fingerprint(&b, DECODER));
        let c = model.create_adapter(&spec, 2).unwrap();
        assert_ne!(fingerprint(&a, DECODER), fingerprint(&c, DECODER), "another seed");
        // The image path's part: changed by its own modules only.
        let both = crate::adapter::LoraSpec {
            target_modules: crate::adapter::TargetModules::Regex(r".*(q_proj|fc1|linear_1)".into()),
            ..spec
        };
        let (a, mut b) = (model.create_adapter(&both, 1).unwrap(), model.create_adapter(&both, 1).unwrap());
        let vision =
            b.module_names().into_iter().find(|n| n.starts_with("vision_tower.")).expect("a vision module").to_string();
        let decoder = b
            .module_names()
            .into_iter()
            .find(|n| n.starts_with("language_model."))
            .expect("a decoder module")
            .to_string();
        b.module_mut(&decoder).unwrap().b.iter_mut().for_each(|v| *v += 1e-3);
        assert_eq!(
            fingerprint(&a, IMAGE_PATH),
            fingerprint(&b, IMAGE_PATH),
            "a decoder change moved the image path's fingerprint"
        );
        b.module_mut(&vision).unwrap().b.iter_mut().for_each(|v| *v += 1e-3);
        assert_ne!(fingerprint(&a, IMAGE_PATH), fingerprint(&b, IMAGE_PATH));
    }
}
