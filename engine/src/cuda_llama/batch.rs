//! Continuous batching on the GPU: [`GpuRows`] holds `slots` sequences of up to `capacity` positions each, every
//! one with its own keys and values for its whole prompt and answer, and steps any of them together. A request
//! joins between steps: its prompt is prefilled once into a cache of its own (`forward_input`), which is then
//! copied into one slot per answer (`rows_fill`, device to device); a step (`rows_step`) feeds one token to each
//! chosen slot and returns each one's next-token logits. Rows of a step are the slots 0..n for the highest fed slot
//! n - 1 (a slot's place in the cache is its row), so `engine::batch` fills the lowest free slot first; an idle slot
//! below n runs along and writes only past its own data. The per-step values (ids, positions, lengths) live in
//! device memory, so each distinct row count is captured once as a CUDA graph and replayed, as in `DecodeSession`.
//!
//! The decode attention is `attn_decode_f16` with an empty shared prefix: every key of a row is in its slot.

use super::{Attend, GpuKvCache, GpuLlama, GpuSuffixCache, Input, Scratch};
use crate::cuda::{derr, err, Gpu};
use crate::cuda_lora::GpuLora;
use crate::error::Result;
use cudarc::driver::CudaGraph;
use std::collections::HashMap;

/// `slots` sequences of up to `capacity` positions, decoding together under one adapter (see the module docs).
pub struct GpuRows {
    /// A zero-length prefix for the attention kernel (every key is in the slot).
    empty: GpuKvCache,
    cache: GpuSuffixCache,
    scratch: Scratch,
    /// Per slot: positions filled (0: free), and the RoPE position minus cache row of its tokens.
    filled: Vec<usize>,
    shift: Vec<isize>,
    /// One captured step per row count.
    graphs: HashMap<usize, CudaGraph>,
    /// The row count of the last step: the attention workspace's merge counters sit where another row count's
    /// partial states go, so a step with another count clears the workspace first.
    last_rows: usize,
    /// Capture steps as CUDA graphs and replay them (default); false launches every kernel each step.
    pub use_graph: bool,
    /// Why graph replay was turned off, if capture failed.
    pub graph_error: Option<String>,
    lora_key: usize,
}

impl GpuRows {
    pub fn slots(&self) -> usize {
        self.filled.len()
    }

    /// Positions per slot (prompt and answer).
    pub fn capacity(&self) -> usize {
        self.cache.capacity
    }

    /// Positions slot `slot` holds (0: free).
    pub fn filled(&self, slot: usize) -> usize {
        self.filled.get(slot).copied().unwrap_or(0)
    }

    /// Marks `slot` free (its cache is overwritten by the next fill).
    pub fn release(&mut self, slot: usize) {
        if let (Some(f), Some(s)) = (self.filled.get_mut(slot), self.shift.get_mut(slot)) {
            (*f, *s) = (0, 0);
        }
    }
}

fn lora_key(lora: Option<&GpuLora>) -> usize {
    lora.map_or(0, |l| l as *const GpuLora as usize)
}

/// Bytes of keys and values one position takes over every layer (fp16).
pub fn kv_bytes_per_position(cfg: &crate::config::LlamaConfig) -> u64 {
    (cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2) as u64
}

impl GpuLlama {
    /// Allocates `slots` sequences of `capacity` positions each, decoding under `lora` (every call on them must
    /// pass the same adapter).
    pub fn new_rows(&self, gpu: &Gpu, slots: usize, capacity: usize, lora: Option<&GpuLora>) -> Result<GpuRows> {
        if slots == 0 || slots > 1024 || capacity == 0 || capacity > self.max_positions {
            return Err(err(format!(
                "batch rows: {slots} slots of {capacity} positions (1 to 1024 slots, at most {} positions)",
                self.max_positions
            )));
        }
        let (heads, hd) = (self.cfg.num_attention_heads, self.cfg.head_dim);
        // The attention workspace of the largest step over any row count up to `slots`.
        let part = (1..=slots).map(|r| gpu.decode_part_len(capacity, r, heads, hd)).max().unwrap_or(1);
        Ok(GpuRows {
            empty: self.new_cache(gpu, 1)?,
            cache: self.new_suffix_cache(gpu, slots, capacity)?,
            scratch: self.scratch(gpu, slots, slots, part, lora.map_or(1, |l| l.r))?,
            filled: vec![0; slots],
            shift: vec![0; slots],
            graphs: HashMap::new(),
            last_rows: 0,
            use_graph: true,
            graph_error: None,
            lora_key: lora_key(lora),
        })
    }

    /// Prefills `prompt` under `lora` into a cache of its own; returns it, the RoPE shift of the tokens after it,
    /// and its last logits row (vocab).
    pub fn rows_prefill(
        &self,
        gpu: &Gpu,
        prompt: Input,
        lora: Option<&GpuLora>,
    ) -> Result<(GpuKvCache, isize, Vec<f32>)> {
        let len = self.input_rows(prompt)?;
        if len == 0 || len >= self.max_positions {
            return Err(err(format!(
                "batch rows: a prompt of {len} positions (1 to {} before an answer)",
                self.max_positions - 1
            )));
        }
        let mut cache = self.new_cache(gpu, len)?;
        let last = self.forward_input(gpu, prompt, &mut cache, None, lora)?;
        let shift = match prompt {
            Input::Placed { shift, .. } => shift,
            _ => 0,
        };
        Ok((cache, shift, last))
    }

    /// Copies a prefilled prompt (`rows_prefill`) into the free slot `slot`, whose next token is then at RoPE
    /// position `prompt.len + shift`.
    pub fn rows_fill(
        &self,
        gpu: &Gpu,
        rows: &mut GpuRows,
        slot: usize,
        prompt: &GpuKvCache,
        shift: isize,
    ) -> Result<()> {
        let (n, cap) = (prompt.len, rows.cache.capacity);
        if slot >= rows.slots() || rows.filled[slot] != 0 || n == 0 || n >= cap {
            return Err(err(format!(
                "batch rows: filling slot {slot} of {} (free: {}) with {n} positions (at most {})",
                rows.slots(),
                rows.filled.get(slot).is_some_and(|&f| f == 0),
                cap - 1
            )));
        }
        let w = self.cfg.num_key_value_heads * self.cfg.head_dim;
        let at = slot * cap * w;
        for li in 0..self.cfg.num_hidden_layers {
            for (src, dst) in [(&prompt.k[li], &mut rows.cache.k[li]), (&prompt.v[li], &mut rows.cache.v[li])] {
                gpu.stream.memcpy_dtod(&src.slice(..n * w), &mut dst.slice_mut(at..at + n * w)).map_err(derr)?;
            }
        }
        rows.filled[slot] = n;
        rows.shift[slot] = shift;
        Ok(())
    }

    /// One decode step: `feed[i] = (slot, token)` feeds `token` to filled slot `slot` (each slot at most once) and
    /// appends it to the slot's cache. Returns the next-token logits of each fed slot in `feed`'s order,
    /// (feed.len(), vocab).
    pub fn rows_step(
        &self,
        gpu: &Gpu,
        rows: &mut GpuRows,
        feed: &[(usize, u32)],
        lora: Option<&GpuLora>,
    ) -> Result<Vec<f32>> {
        if lora_key(lora) != rows.lora_key {
            return Err(err("batch rows: a step must use the adapter the rows were made for"));
        }
        let (slots, cap) = (rows.slots(), rows.cache.capacity);
        let mut fed = vec![false; slots];
        for &(slot, _) in feed {
            if slot >= slots || rows.filled[slot] == 0 || rows.filled[slot] >= cap || fed[slot] {
                return Err(err(format!(
                    "batch rows: feeding slot {slot} of {slots} (filled {}, capacity {cap}, fed twice: {})",
                    rows.filled.get(slot).copied().unwrap_or(0),
                    fed.get(slot).copied().unwrap_or(false)
                )));
            }
            fed[slot] = true;
        }
        let Some(n) = feed.iter().map(|&(s, _)| s + 1).max() else { return Ok(Vec::new()) };
        // Row r is slot r. An idle row feeds token 0 at its next free position (a free slot at position 0, with no
        // shift), which the slot's next fill or step overwrites; a full idle slot cannot be below a fed one here
        // (it ends its answer).
        let mut ids = vec![0u32; n];
        let mut pos = vec![0i32; n];
        let mut lens = vec![1i32; n];
        for (r, (&f, &shift)) in rows.filled.iter().zip(&rows.shift).take(n).enumerate() {
            if f >= cap {
                return Err(err(format!("batch rows: slot {r} is full ({cap} positions) but still in the batch")));
            }
            let p = if f == 0 { 0 } else { f as isize + shift };
            if p < 0 || p as usize >= self.max_positions {
                return Err(err(format!("batch rows: RoPE position {p} of slot {r} is outside the table")));
            }
            pos[r] = p as i32;
            lens[r] = (f + 1) as i32;
        }
        for &(slot, tok) in feed {
            ids[slot] = tok;
        }
        let id32 = self.check_ids(&ids)?;
        let s = &gpu.stream;
        s.memcpy_htod(&id32, &mut rows.scratch.ids.slice_mut(..n)).map_err(derr)?;
        s.memcpy_htod(&pos, &mut rows.scratch.pos.slice_mut(..n)).map_err(derr)?;
        s.memcpy_htod(&lens, &mut rows.cache.lens.slice_mut(..n)).map_err(derr)?;
        let (c, vocab) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let GpuRows { empty, cache, scratch, graphs, use_graph, graph_error, last_rows, .. } = rows;
        if *last_rows != n {
            s.memset_zeros(&mut scratch.part).map_err(derr)?;
            *last_rows = n;
        }
        scratch.rows = n;
        scratch.pos_width = 1;
        let enqueue = |scratch: &mut Scratch, cache: &mut GpuSuffixCache| -> Result<()> {
            self.forward_layers(gpu, scratch, &mut Attend::Decode { prefix: &*empty, suffix: cache }, true, lora)?;
            let head = self.plan.launches(gpu, n, lora.is_some()).head;
            gpu.matmul_with(head, &scratch.h, self.head(), &mut scratch.logits, n, c, vocab)
        };
        if !graphs.contains_key(&n) && *use_graph {
            s.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(derr)?;
            let enq = enqueue(scratch, cache);
            let captured = s.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
            match (enq, captured) {
                (Ok(()), Ok(Some(g))) => {
                    graphs.insert(n, g);
                }
                // Nothing captured ran: launch the kernels from now on (and say why).
                (enq, captured) => {
                    *use_graph = false;
                    *graph_error = Some(format!(
                        "CUDA graph capture of a batch step failed ({enq:?}, {:?}); launching kernels directly",
                        captured.map(|g| g.is_some())
                    ));
                }
            }
        }
        match graphs.get(&n) {
            Some(g) if *use_graph => g.launch().map_err(derr)?,
            _ => enqueue(scratch, cache)?,
        }
        for &(slot, _) in feed {
            rows.filled[slot] += 1;
        }
        let h = s.clone_dtoh(&rows.scratch.logits.slice(..n * vocab)).map_err(derr)?;
        let mut out = vec![0.0f32; feed.len() * vocab];
        // The slice conversion (several values per instruction), as `Gpu::download_f16` widens.
        use half::slice::HalfFloatSliceExt;
        for (o, &(slot, _)) in out.chunks_mut(vocab).zip(feed) {
            h[slot * vocab..(slot + 1) * vocab].convert_to_f32_slice(o);
        }
        Ok(out)
    }
}
