//! Loading the GPU decoder: a checkpoint's weights uploaded as fp16 (q/k/v and gate/up fused into one matrix
//! each), or random weights for the benchmarks; then, for a decoder of LLaVA's size, the decode plan tuned on the
//! device (`GpuLlama::tune_decode`).

use super::{DecodePlan, GpuLlama, Layer, TUNE_MIN_HIDDEN};
use crate::config::LlamaConfig;
use crate::cuda::{derr, err, Gpu};
use crate::error::Result;
use crate::family::keys::{decoder_layer, decoder_linears, Keys, EMBED_TOKENS, FINAL_NORM, INPUT_NORM, POST_NORM};
use crate::ops::Rope;
use crate::weights::WeightStore;
use cudarc::driver::CudaSlice;
use half::f16;

impl GpuLlama {
    /// Uploads the decoder of `ws` (keys under `prefix`, lm_head at `lm_head_key`, or tied when None) as fp16.
    pub fn load(
        gpu: &Gpu,
        ws: &WeightStore,
        prefix: &str,
        lm_head_key: Option<&str>,
        cfg: &LlamaConfig,
        max_positions: usize,
    ) -> Result<GpuLlama> {
        if cfg.attention_bias || cfg.mlp_bias {
            return Err(err("the CUDA decoder does not support attention or MLP biases yet"));
        }
        check_shape(cfg)?;
        let c = cfg.hidden_size;
        let (h, hd, i) = (cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size);
        let up = |key: String, shape: &[usize]| -> Result<CudaSlice<f16>> { gpu.upload_f16(&ws.f32(&key, shape)?) };
        let cat = |keys: &[(String, usize)]| -> Result<CudaSlice<f16>> {
            let mut all = Vec::new();
            for (key, rows) in keys {
                all.extend(ws.f32(key, &[*rows, c])?);
            }
            gpu.upload_f16(&all)
        };
        let decoder = Keys::new(prefix);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let kp = decoder_layer(&decoder, l);
            // q, k, v, o, gate, up, down (family::keys): (key, rows) of each weight (out features x in features).
            let linears = decoder_linears(cfg);
            let [q, k, v, o, g, u, d] = linears.map(|(name, _, rows, _)| (kp.pp(name).key("weight"), rows));
            // Qwen2's q/k/v biases, fused as their weights are.
            let qkv_bias = if cfg.qkv_bias {
                let mut all = Vec::new();
                for (name, _, rows, _) in &linears[..3] {
                    all.extend(ws.f32(&kp.pp(name).key("bias"), &[*rows])?);
                }
                Some(gpu.upload_f16(&all)?)
            } else {
                None
            };
            layers.push(Layer {
                input_norm: up(kp.pp(INPUT_NORM).key("weight"), &[c])?,
                qkv: cat(&[q, k, v])?,
                qkv_bias,
                o: up(o.0, &[c, h * hd])?,
                post_norm: up(kp.pp(POST_NORM).key("weight"), &[c])?,
                gate_up: cat(&[g, u])?,
                down: up(d.0, &[c, i])?,
            });
        }
        let embed = up(decoder.pp(EMBED_TOKENS).key("weight"), &[cfg.vocab_size, c])?;
        let lm_head = match lm_head_key {
            Some(k) => Some(up(format!("{k}.weight"), &[cfg.vocab_size, c])?),
            None => None,
        };
        let norm = up(decoder.pp(FINAL_NORM).key("weight"), &[c])?;
        Self::assemble(gpu, cfg, embed, layers, norm, lm_head, max_positions)
    }

    fn assemble(
        gpu: &Gpu,
        cfg: &LlamaConfig,
        embed: CudaSlice<f16>,
        layers: Vec<Layer>,
        norm: CudaSlice<f16>,
        lm_head: Option<CudaSlice<f16>>,
        max_positions: usize,
    ) -> Result<GpuLlama> {
        let (cos, sin) = Rope::new(cfg.head_dim, cfg.rope_theta, &cfg.rope_scaling).tables(max_positions);
        let mut model = GpuLlama {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            cos: gpu.stream.clone_htod(&cos).map_err(derr)?,
            sin: gpu.stream.clone_htod(&sin).map_err(derr)?,
            max_positions,
            gemv_tuning: Vec::new(),
            plan: DecodePlan::untuned(cfg),
        };
        if cfg.hidden_size >= TUNE_MIN_HIDDEN {
            model.gemv_tuning = model.tune_decode(gpu)?;
        }
        Ok(model)
    }

    /// A decoder of `cfg`'s shape with random weights generated on the device (benchmarks): matrices uniform with
    /// standard deviation 0.02, norm weights 1.
    pub fn random(gpu: &Gpu, cfg: &LlamaConfig, max_positions: usize, seed: u64) -> Result<GpuLlama> {
        check_shape(cfg)?;
        let c = cfg.hidden_size;
        let (h, kvh, hd, i) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size);
        let mut n = 0u64;
        let mut fill = |len: usize, scale: f32, offset: f32| -> Result<CudaSlice<f16>> {
            n += 1;
            gpu.fill_uniform(len, scale, offset, seed.wrapping_mul(0x9e37_79b9).wrapping_add(n))
        };
        let w = 0.02f32 * 3f32.sqrt();
        let mut layers = Vec::new();
        for _ in 0..cfg.num_hidden_layers {
            layers.push(Layer {
                input_norm: fill(c, 0.0, 1.0)?,
                qkv: fill((h + 2 * kvh) * hd * c, w, 0.0)?,
                qkv_bias: if cfg.qkv_bias { Some(fill((h + 2 * kvh) * hd, w, 0.0)?) } else { None },
                o: fill(c * h * hd, w, 0.0)?,
                post_norm: fill(c, 0.0, 1.0)?,
                gate_up: fill(2 * i * c, w, 0.0)?,
                down: fill(c * i, w, 0.0)?,
            });
        }
        let embed = fill(cfg.vocab_size * c, w, 0.0)?;
        let lm_head = Some(fill(cfg.vocab_size * c, w, 0.0)?);
        let norm = fill(c, 0.0, 1.0)?;
        Self::assemble(gpu, cfg, embed, layers, norm, lm_head, max_positions)
    }
}

fn check_shape(cfg: &LlamaConfig) -> Result<()> {
    if cfg.head_dim > 128
        || !cfg.head_dim.is_multiple_of(2)
        || cfg.num_key_value_heads == 0
        || !cfg.num_attention_heads.is_multiple_of(cfg.num_key_value_heads)
    {
        return Err(err(format!("the CUDA attention kernels take an even head_dim of at most 128 and heads a multiple of kv heads (got head_dim {}, heads {}/{})", cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads)));
    }
    Ok(())
}

/// Loads the decoder of a Hugging Face LLaMA/LLaVA directory onto the GPU (tests and tools; the daemon's backend
/// uploads from the weights its `Model` opened: `from_model`).
pub fn load_dir(gpu: &Gpu, dir: &std::path::Path, max_positions: usize) -> Result<GpuLlama> {
    let config = crate::config::ModelConfig::from_file(&dir.join("config.json"))?;
    let ws = WeightStore::open_dir(dir, "model")?;
    let layout = crate::family::KeyLayout::detect(&ws, crate::family::Family::of(config.family()))?;
    load_from(gpu, &ws, &layout, &config, max_positions)
}

/// Uploads the decoder of `model` from the weights it opened (`Model::weights`), without reading the files again.
pub fn from_model(gpu: &Gpu, model: &crate::llava::Model, max_positions: usize) -> Result<GpuLlama> {
    load_from(gpu, &model.weights, &model.layout, &model.config, max_positions)
}

fn load_from(
    gpu: &Gpu,
    ws: &WeightStore,
    layout: &crate::family::KeyLayout,
    config: &crate::config::ModelConfig,
    max_positions: usize,
) -> Result<GpuLlama> {
    let text = config.text();
    let lm_head = if text.tie_word_embeddings { None } else { Some(layout.lm_head.as_str()) };
    GpuLlama::load(gpu, ws, &layout.text, lm_head, text, max_positions)
}

impl GpuLlama {
    /// A copy of this decoder with the whole decoder parameters a full-parameter adapter replaces (peft
    /// `modules_to_save`, named as `cuda_lora::whole_at` names them) in place of the base's: fused as the base's, in
    /// fp16, the decode plan carried over (the shapes are the same). It serves such a checkpoint on the device; the
    /// adapter's LoRA modules, if any, are applied beside it as usual. Takes as much device memory as the base.
    pub fn with_whole(&self, gpu: &Gpu, adapter: &crate::adapter::Adapter) -> Result<GpuLlama> {
        use crate::cuda_lora::{fused_group, projection_shape, whole_at, WholeAt, FUSED};
        let cfg = &self.cfg;
        let copy = |b: &CudaSlice<f16>| b.try_clone().map_err(derr);
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            layers.push(Layer {
                input_norm: copy(&l.input_norm)?,
                qkv: copy(&l.qkv)?,
                qkv_bias: l.qkv_bias.as_ref().map(copy).transpose()?,
                o: copy(&l.o)?,
                post_norm: copy(&l.post_norm)?,
                gate_up: copy(&l.gate_up)?,
                down: copy(&l.down)?,
            });
        }
        let mut lm_head = self.lm_head.as_ref().map(copy).transpose()?;
        // A projection's rows start after those of the projections fused before it.
        let rows_before = |j: usize| -> usize {
            FUSED[fused_group(j)].iter().take_while(|&&k| k != j).map(|&k| projection_shape(cfg, k).1).sum()
        };
        for (name, p) in adapter.saved_params().filter(|(n, _)| !crate::cuda_clip::in_image_path(n)) {
            let (buf, off) = match whole_at(cfg, name)? {
                WholeAt::Head => {
                    // A tied head becomes the adapter's own.
                    if lm_head.is_none() {
                        lm_head = Some(copy(&self.embed)?);
                    }
                    (lm_head.as_mut().ok_or_else(|| err("no head"))?, 0)
                }
                WholeAt::Weight { layer, j } => {
                    let l = &mut layers[layer];
                    let buf = match fused_group(j) {
                        0 => &mut l.qkv,
                        1 => &mut l.o,
                        2 => &mut l.gate_up,
                        _ => &mut l.down,
                    };
                    (buf, rows_before(j) * projection_shape(cfg, j).0)
                }
                WholeAt::Bias { layer, j } => {
                    let buf = layers[layer]
                        .qkv_bias
                        .as_mut()
                        .ok_or_else(|| err(format!("{name}: the model's decoder has no q/k/v biases")))?;
                    (buf, rows_before(j))
                }
            };
            if off + p.values.len() > buf.len() {
                return Err(err(format!("{name}: {} values do not fit the decoder's layer", p.values.len())));
            }
            let up = gpu.upload_f16(&p.values)?;
            gpu.stream.memcpy_dtod(&up, &mut buf.slice_mut(off..off + p.values.len())).map_err(derr)?;
        }
        Ok(GpuLlama {
            cfg: cfg.clone(),
            embed: copy(&self.embed)?,
            layers,
            norm: copy(&self.norm)?,
            lm_head,
            cos: self.cos.try_clone().map_err(derr)?,
            sin: self.sin.try_clone().map_err(derr)?,
            max_positions: self.max_positions,
            gemv_tuning: self.gemv_tuning.clone(),
            plan: self.plan.clone(),
        })
    }
}
