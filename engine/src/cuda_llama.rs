//! The LLaMA decoder on the GPU (CUDA, first part): weights uploaded once as fp16, a KV cache on the device,
//! every op one of `kernels/*.cu` or a cuBLASLt GEMM, fp32 accumulation throughout. Text tokens only for now (no
//! vision tower, no LoRA, no attention/MLP biases); `engine/tests/cuda_llama.rs` checks it against the CPU
//! backend. Not yet wired into generation or the daemon.

use crate::config::LlamaConfig;
use crate::cuda::{cfg1, derr, err, Gpu};
use crate::error::Result;
use crate::ops::Rope;
use crate::weights::WeightStore;
use cudarc::driver::{CudaSlice, PushKernelArg};
use half::f16;

struct Layer {
    input_norm: CudaSlice<f16>,
    q: CudaSlice<f16>,
    k: CudaSlice<f16>,
    v: CudaSlice<f16>,
    o: CudaSlice<f16>,
    post_norm: CudaSlice<f16>,
    gate: CudaSlice<f16>,
    up: CudaSlice<f16>,
    down: CudaSlice<f16>,
}

pub struct GpuLlama {
    pub cfg: LlamaConfig,
    embed: CudaSlice<f16>,
    layers: Vec<Layer>,
    norm: CudaSlice<f16>,
    /// None: tied to `embed`.
    lm_head: Option<CudaSlice<f16>>,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    pub max_positions: usize,
}

/// Keys and values of every layer for up to `capacity` positions, on the device.
pub struct GpuKvCache {
    k: Vec<CudaSlice<f16>>,
    v: Vec<CudaSlice<f16>>,
    pub len: usize,
    pub capacity: usize,
}

impl GpuLlama {
    /// Uploads the decoder of `ws` (keys under `prefix`, lm_head at `lm_head_key`, or tied when None) as fp16.
    pub fn load(gpu: &Gpu, ws: &WeightStore, prefix: &str, lm_head_key: Option<&str>, cfg: &LlamaConfig, max_positions: usize) -> Result<GpuLlama> {
        if cfg.attention_bias || cfg.mlp_bias {
            return Err(err("the CUDA decoder does not support attention or MLP biases yet"));
        }
        if cfg.head_dim > 128 || !cfg.head_dim.is_multiple_of(2) {
            return Err(err(format!("the CUDA attention kernels take an even head_dim of at most 128 (got {})", cfg.head_dim)));
        }
        let c = cfg.hidden_size;
        let (h, kvh, hd, i) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size);
        let up = |key: String, shape: &[usize]| -> Result<CudaSlice<f16>> { gpu.upload_f16(&ws.f32(&key, shape)?) };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let kp = format!("{prefix}layers.{l}.");
            layers.push(Layer {
                input_norm: up(format!("{kp}input_layernorm.weight"), &[c])?,
                q: up(format!("{kp}self_attn.q_proj.weight"), &[h * hd, c])?,
                k: up(format!("{kp}self_attn.k_proj.weight"), &[kvh * hd, c])?,
                v: up(format!("{kp}self_attn.v_proj.weight"), &[kvh * hd, c])?,
                o: up(format!("{kp}self_attn.o_proj.weight"), &[c, h * hd])?,
                post_norm: up(format!("{kp}post_attention_layernorm.weight"), &[c])?,
                gate: up(format!("{kp}mlp.gate_proj.weight"), &[i, c])?,
                up: up(format!("{kp}mlp.up_proj.weight"), &[i, c])?,
                down: up(format!("{kp}mlp.down_proj.weight"), &[c, i])?,
            });
        }
        let embed = up(format!("{prefix}embed_tokens.weight"), &[cfg.vocab_size, c])?;
        let lm_head = match lm_head_key {
            Some(k) => Some(up(format!("{k}.weight"), &[cfg.vocab_size, c])?),
            None => None,
        };
        let (cos, sin) = Rope::new(hd, cfg.rope_theta, &cfg.rope_scaling).tables(max_positions);
        Ok(GpuLlama {
            cfg: cfg.clone(),
            embed,
            layers,
            norm: up(format!("{prefix}norm.weight"), &[c])?,
            lm_head,
            cos: gpu.stream.clone_htod(&cos).map_err(derr)?,
            sin: gpu.stream.clone_htod(&sin).map_err(derr)?,
            max_positions,
        })
    }

    /// A decoder of `cfg`'s shape with random weights generated on the device (benchmarks): matrices uniform with
    /// standard deviation 0.02, norm weights 1.
    pub fn random(gpu: &Gpu, cfg: &LlamaConfig, max_positions: usize, seed: u64) -> Result<GpuLlama> {
        let c = cfg.hidden_size;
        let (h, kvh, hd, i) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size);
        let mut n = 0u64;
        let mut fill = |len: usize, scale: f32, offset: f32| -> Result<CudaSlice<f16>> {
            n += 1;
            let mut t = gpu.stream.alloc_zeros::<f16>(len).map_err(derr)?;
            let (l, sd) = (len as i64, seed.wrapping_mul(0x9e37_79b9).wrapping_add(n));
            let mut b = gpu.stream.launch_builder(gpu.f("fill_uniform_f16")?);
            b.arg(&mut t).arg(&l).arg(&sd).arg(&scale).arg(&offset);
            unsafe { b.launch(cfg1(len, 256)) }.map_err(derr)?;
            Ok(t)
        };
        let w = 0.02f32 * 3f32.sqrt();
        let mut layers = Vec::new();
        for _ in 0..cfg.num_hidden_layers {
            layers.push(Layer {
                input_norm: fill(c, 0.0, 1.0)?,
                q: fill(h * hd * c, w, 0.0)?,
                k: fill(kvh * hd * c, w, 0.0)?,
                v: fill(kvh * hd * c, w, 0.0)?,
                o: fill(c * h * hd, w, 0.0)?,
                post_norm: fill(c, 0.0, 1.0)?,
                gate: fill(i * c, w, 0.0)?,
                up: fill(i * c, w, 0.0)?,
                down: fill(c * i, w, 0.0)?,
            });
        }
        let embed = fill(cfg.vocab_size * c, w, 0.0)?;
        let lm_head = Some(fill(cfg.vocab_size * c, w, 0.0)?);
        let norm = fill(c, 0.0, 1.0)?;
        let (cos, sin) = Rope::new(hd, cfg.rope_theta, &cfg.rope_scaling).tables(max_positions);
        Ok(GpuLlama { cfg: cfg.clone(), embed, layers, norm, lm_head, cos: gpu.stream.clone_htod(&cos).map_err(derr)?, sin: gpu.stream.clone_htod(&sin).map_err(derr)?, max_positions })
    }

    /// Bytes of weights one decode step reads (every matrix once, the embedding row aside).
    pub fn weight_bytes(&self) -> u64 {
        let c = &self.cfg;
        let per_layer = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim * c.hidden_size + c.num_attention_heads * c.head_dim * c.hidden_size + 3 * c.intermediate_size * c.hidden_size + 2 * c.hidden_size;
        2 * (per_layer * c.num_hidden_layers + c.vocab_size * c.hidden_size + c.hidden_size) as u64
    }

    pub fn new_cache(&self, gpu: &Gpu, capacity: usize) -> Result<GpuKvCache> {
        let w = self.cfg.num_key_value_heads * self.cfg.head_dim;
        let mut k = Vec::new();
        let mut v = Vec::new();
        for _ in 0..self.cfg.num_hidden_layers {
            k.push(gpu.stream.alloc_zeros::<f16>(capacity * w).map_err(derr)?);
            v.push(gpu.stream.alloc_zeros::<f16>(capacity * w).map_err(derr)?);
        }
        Ok(GpuKvCache { k, v, len: 0, capacity })
    }

    /// Runs `ids` (positions cache.len ..) through the decoder, appending to the cache; returns the logits of
    /// every row, (rows, vocab), widened to f32.
    pub fn forward(&self, gpu: &Gpu, ids: &[u32], cache: &mut GpuKvCache) -> Result<Vec<f32>> {
        self.forward_rows(gpu, ids, cache, true)
    }

    /// `forward` returning the logits of the last row only (vocab): what prefill and decoding need.
    pub fn forward_last(&self, gpu: &Gpu, ids: &[u32], cache: &mut GpuKvCache) -> Result<Vec<f32>> {
        self.forward_rows(gpu, ids, cache, false)
    }

    fn forward_rows(&self, gpu: &Gpu, ids: &[u32], cache: &mut GpuKvCache, all_rows: bool) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let rows = ids.len();
        let (c, h, kvh, hd, inter, vocab) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size);
        let start = cache.len;
        if rows == 0 || start + rows > cache.capacity || start + rows > self.max_positions {
            return Err(err(format!("forward: {rows} rows at position {start} exceed the cache ({}) or the RoPE table ({})", cache.capacity, self.max_positions)));
        }
        let s = &gpu.stream;
        let alloc = |n: usize| s.alloc_zeros::<f16>(n).map_err(derr);
        let id32: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let mut x = alloc(rows * c)?;
        gpu.embedding_dev(&mut x, &self.embed, c, &id32)?;
        let pos: Vec<i32> = (start..start + rows).map(|p| p as i32).collect();
        let dpos = s.clone_htod(&pos).map_err(derr)?;
        let (mut hbuf, mut q, mut k, mut v, mut att, mut tmp) = (alloc(rows * c)?, alloc(rows * h * hd)?, alloc(rows * kvh * hd)?, alloc(rows * kvh * hd)?, alloc(rows * h * hd)?, alloc(rows * c)?);
        let (mut g, mut u, mut a) = (alloc(rows * inter)?, alloc(rows * inter)?, alloc(rows * inter)?);
        let w = kvh * hd;
        let eps = cfg.rms_norm_eps as f32;
        for (li, l) in self.layers.iter().enumerate() {
            gpu.rmsnorm_dev(&mut hbuf, &x, &l.input_norm, rows, eps)?;
            gpu.linear_device(&hbuf, &l.q, &mut q, rows, c, h * hd)?;
            gpu.linear_device(&hbuf, &l.k, &mut k, rows, c, w)?;
            gpu.linear_device(&hbuf, &l.v, &mut v, rows, c, w)?;
            gpu.rope_dev(&mut q, &dpos, &self.cos, &self.sin, rows, h, hd)?;
            gpu.rope_dev(&mut k, &dpos, &self.cos, &self.sin, rows, kvh, hd)?;
            s.memcpy_dtod(&k, &mut cache.k[li].slice_mut(start * w..(start + rows) * w)).map_err(derr)?;
            s.memcpy_dtod(&v, &mut cache.v[li].slice_mut(start * w..(start + rows) * w)).map_err(derr)?;
            gpu.attention_prefill_dev(&mut att, &q, &cache.k[li], &cache.v[li], rows, start + rows, h, kvh, hd, true)?;
            gpu.linear_device(&att, &l.o, &mut tmp, rows, h * hd, c)?;
            gpu.residual_add_dev(&mut x, &tmp, rows * c)?;
            gpu.rmsnorm_dev(&mut hbuf, &x, &l.post_norm, rows, eps)?;
            gpu.linear_device(&hbuf, &l.gate, &mut g, rows, c, inter)?;
            gpu.linear_device(&hbuf, &l.up, &mut u, rows, c, inter)?;
            gpu.swiglu_dev(&mut a, &g, &u, rows, inter)?;
            gpu.linear_device(&a, &l.down, &mut tmp, rows, inter, c)?;
            gpu.residual_add_dev(&mut x, &tmp, rows * c)?;
        }
        cache.len += rows;
        gpu.rmsnorm_dev(&mut hbuf, &x, &self.norm, rows, eps)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        if all_rows {
            let mut logits = alloc(rows * vocab)?;
            gpu.linear_device(&hbuf, head, &mut logits, rows, c, vocab)?;
            return gpu.download_f16(&logits);
        }
        let mut last = alloc(c)?;
        s.memcpy_dtod(&hbuf.slice((rows - 1) * c..rows * c), &mut last).map_err(derr)?;
        let mut logits = alloc(vocab)?;
        gpu.linear_device(&last, head, &mut logits, 1, c, vocab)?;
        gpu.download_f16(&logits)
    }
}

/// Loads the decoder of a Hugging Face LLaMA/LLaVA directory onto the GPU.
pub fn load_dir(gpu: &Gpu, dir: &std::path::Path, max_positions: usize) -> Result<GpuLlama> {
    let config = crate::config::ModelConfig::from_file(&dir.join("config.json"))?;
    let ws = WeightStore::open_dir(dir, "model")?;
    let layout = crate::llava::KeyLayout::detect(&ws, config.llava().is_some())?;
    let text = config.text();
    let lm_head = if text.tie_word_embeddings { None } else { Some(layout.lm_head.as_str()) };
    GpuLlama::load(gpu, &ws, &layout.text, lm_head, text, max_positions)
}

/// What `bench` measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub device: String,
    pub prompt_tokens: usize,
    pub prefill_ms: Vec<f64>,
    pub decode_tokens: usize,
    pub decode_tokens_per_s: Vec<f64>,
    /// Device-to-device copy bandwidth, GB/s (bytes read + written per second).
    pub copy_gb_per_s: f64,
    pub weight_bytes: u64,
    /// Decode tokens/s if every step only streamed the weights at `copy_gb_per_s`.
    pub roofline_tokens_per_s: f64,
}

/// Decode and prefill speed of a random-weight decoder of `cfg`'s shape at batch 1: `reps` times, a prefill of
/// `prompt` tokens then `decode` greedy steps (each copying its logits row to the host, as sampling does), plus the
/// device's copy bandwidth for the roofline.
pub fn bench(gpu: &Gpu, cfg: &LlamaConfig, prompt: usize, decode: usize, reps: usize) -> Result<BenchReport> {
    let model = GpuLlama::random(gpu, cfg, prompt + decode + 1, 1)?;
    let sync = || gpu.stream.synchronize().map_err(derr);
    // Copy bandwidth: 1 GiB buffers, a warm-up copy, then 5 timed copies.
    let n = 1usize << 29;
    let src = gpu.stream.alloc_zeros::<f16>(n).map_err(derr)?;
    let mut dst = gpu.stream.alloc_zeros::<f16>(n).map_err(derr)?;
    gpu.stream.memcpy_dtod(&src, &mut dst).map_err(derr)?;
    sync()?;
    let t = std::time::Instant::now();
    for _ in 0..5 {
        gpu.stream.memcpy_dtod(&src, &mut dst).map_err(derr)?;
    }
    sync()?;
    let copy_gb_per_s = 5.0 * 2.0 * (n * 2) as f64 / t.elapsed().as_secs_f64() / 1e9;
    drop((src, dst));
    let ids: Vec<u32> = (0..prompt).map(|i| (1 + i * 7919 % (cfg.vocab_size - 1)) as u32).collect();
    let (mut prefill_ms, mut tps) = (Vec::new(), Vec::new());
    for _ in 0..reps.max(1) + 1 {
        let mut cache = model.new_cache(gpu, prompt + decode + 1)?;
        sync()?;
        let t = std::time::Instant::now();
        let mut logits = model.forward_last(gpu, &ids, &mut cache)?;
        let pf = t.elapsed().as_secs_f64() * 1e3;
        let t = std::time::Instant::now();
        for _ in 0..decode {
            let tok = crate::sampling::argmax(&logits);
            logits = model.forward_last(gpu, &[tok], &mut cache)?;
        }
        let secs = t.elapsed().as_secs_f64();
        prefill_ms.push(pf);
        tps.push(decode as f64 / secs);
    }
    // The first repetition warms up (module loading, allocator, cuBLASLt heuristics) and is dropped.
    prefill_ms.remove(0);
    tps.remove(0);
    let weight_bytes = model.weight_bytes();
    Ok(BenchReport { device: gpu.name.clone(), prompt_tokens: prompt, prefill_ms, decode_tokens: decode, decode_tokens_per_s: tps, copy_gb_per_s, weight_bytes, roofline_tokens_per_s: copy_gb_per_s * 1e9 / weight_bytes as f64 })
}
