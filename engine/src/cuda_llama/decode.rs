//! Decoding n answers to one prompt on the GPU: a [`DecodeSession`] (the shared prefix cache, each sequence's suffix
//! cache, the step's buffers and its captured CUDA graphs), one step of every sequence (`decode_step`,
//! `decode_step_greedy`), and the n answers sampled from them (`sample_answers`).

use super::{Attend, GpuKvCache, GpuLlama, Input, Scratch};
use crate::cuda::{derr, err, Gpu};
use crate::cuda_lora::GpuLora;
use crate::error::Result;
use crate::generate::{Answer, FinishReason, GenerateStats};
use cudarc::driver::{CudaGraph, CudaSlice};
use half::f16;

/// The n answers of one prompt decoding together: each sequence's own keys and values after the shared prefix,
/// `capacity` positions per sequence, and their current lengths (on the device: `lens`).
pub struct GpuSuffixCache {
    pub(super) k: Vec<CudaSlice<f16>>,
    pub(super) v: Vec<CudaSlice<f16>>,
    pub(super) lens: CudaSlice<i32>,
    pub bsz: usize,
    pub len: usize,
    pub capacity: usize,
}

/// n sequences decoding together after one shared prefill (see the module documentation).
pub struct DecodeSession {
    prefix: GpuKvCache,
    suffix: GpuSuffixCache,
    scratch: Scratch,
    graph: Option<CudaGraph>,
    /// The greedy step (`decode_step_greedy`: the logits step plus the device's argmax), captured on its first use.
    greedy_graph: Option<CudaGraph>,
    /// Whether the device's ids, positions and lengths already hold the next step's inputs: the last step was a
    /// greedy one, which leaves its picks there.
    device_fed: bool,
    /// Capture the first step as a CUDA graph and replay it (default); false launches every kernel each step.
    pub use_graph: bool,
    /// Why graph replay was turned off, if capture failed.
    pub graph_error: Option<String>,
    /// The adapter the session decodes with (its address; 0: none): a captured graph holds its buffers.
    lora_key: usize,
    /// RoPE position minus cache row of the decoded tokens (Qwen2-VL after an image: `Input::Placed`).
    shift: isize,
}

fn lora_key(lora: Option<&GpuLora>) -> usize {
    lora.map_or(0, |l| l as *const GpuLora as usize)
}

impl DecodeSession {
    pub fn bsz(&self) -> usize {
        self.suffix.bsz
    }

    /// Tokens decoded per sequence so far.
    pub fn len(&self) -> usize {
        self.suffix.len
    }

    pub fn is_empty(&self) -> bool {
        self.suffix.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.suffix.capacity
    }
}

impl GpuLlama {
    pub(super) fn new_suffix_cache(&self, gpu: &Gpu, bsz: usize, capacity: usize) -> Result<GpuSuffixCache> {
        let w = self.cfg.num_key_value_heads * self.cfg.head_dim;
        let mut k = Vec::new();
        let mut v = Vec::new();
        for _ in 0..self.cfg.num_hidden_layers {
            k.push(gpu.stream.alloc_zeros::<f16>(bsz * capacity.max(1) * w).map_err(derr)?);
            v.push(gpu.stream.alloc_zeros::<f16>(bsz * capacity.max(1) * w).map_err(derr)?);
        }
        Ok(GpuSuffixCache { k, v, lens: gpu.stream.alloc_zeros::<i32>(bsz).map_err(derr)?, bsz, len: 0, capacity })
    }

    /// Prefills `prompt` once and prepares `bsz` sequences of up to `max_new` tokens each to decode against it.
    /// Returns the session and the prompt's last logits row (from which each sequence samples its first token).
    pub fn start_decode(
        &self,
        gpu: &Gpu,
        prompt: &[u32],
        bsz: usize,
        max_new: usize,
    ) -> Result<(DecodeSession, Vec<f32>)> {
        self.start_decode_input(gpu, Input::Ids(prompt), bsz, max_new, None)
    }

    /// `start_decode` from any input, under `lora` (every step of the session must pass the same adapter).
    pub fn start_decode_input(
        &self,
        gpu: &Gpu,
        prompt: Input,
        bsz: usize,
        max_new: usize,
        lora: Option<&GpuLora>,
    ) -> Result<(DecodeSession, Vec<f32>)> {
        let len = self.input_rows(prompt)?;
        if bsz == 0 || bsz > 1024 || len == 0 || len + max_new > self.max_positions {
            return Err(err(format!(
                "decode: {bsz} sequences of a {len}-position prompt plus {max_new} new tokens (at most {} positions)",
                self.max_positions
            )));
        }
        let mut prefix = self.new_cache(gpu, len)?;
        let first = self.forward_input(gpu, prompt, &mut prefix, None, lora)?;
        let suffix = self.new_suffix_cache(gpu, bsz, max_new)?;
        let part = gpu.decode_part_len(len + max_new, bsz, self.cfg.num_attention_heads, self.cfg.head_dim);
        let scratch = self.scratch(gpu, bsz, bsz, part, lora.map_or(1, |l| l.r))?;
        Ok((
            DecodeSession {
                prefix,
                suffix,
                scratch,
                graph: None,
                greedy_graph: None,
                device_fed: false,
                use_graph: true,
                graph_error: None,
                lora_key: lora_key(lora),
                shift: match prompt {
                    Input::Placed { shift, .. } => shift,
                    _ => 0,
                },
            },
            first,
        ))
    }

    /// One step of every sequence of `sess`: `tokens[b]` is sequence b's newest token; returns the next-token logits
    /// of every sequence, (bsz, vocab).
    pub fn decode_step(&self, gpu: &Gpu, sess: &mut DecodeSession, tokens: &[u32]) -> Result<Vec<f32>> {
        self.decode_step_lora(gpu, sess, tokens, None)
    }

    /// `decode_step` under the adapter the session was started with.
    pub fn decode_step_lora(
        &self,
        gpu: &Gpu,
        sess: &mut DecodeSession,
        tokens: &[u32],
        lora: Option<&GpuLora>,
    ) -> Result<Vec<f32>> {
        self.step(gpu, sess, Some(tokens), false, lora)?;
        gpu.download_f16(&sess.scratch.logits)
    }

    /// One greedy step of every sequence of `sess` with the choice made on the device (`argmax_step_f16`): only
    /// the picks come back to the host, not the logits. `tokens[b]` is sequence b's newest token, or None to feed
    /// each sequence the token the previous greedy step picked for it (nothing is uploaded then). Returns each
    /// sequence's pick: `sampling::argmax` of its next-token logits, what `decode_step` would let the host pick.
    pub fn decode_step_greedy(
        &self,
        gpu: &Gpu,
        sess: &mut DecodeSession,
        tokens: Option<&[u32]>,
        lora: Option<&GpuLora>,
    ) -> Result<Vec<u32>> {
        self.step(gpu, sess, tokens, true, lora)?;
        let picks = gpu.stream.clone_dtoh(&sess.scratch.ids).map_err(derr)?;
        Ok(picks[..sess.suffix.bsz].iter().map(|&t| t as u32).collect())
    }

    /// Runs one decode step of `sess` (its captured graph, capturing it on first use): feeds `tokens` (uploaded
    /// with the step's positions), or with None what a greedy step left on the device; `greedy` adds the device's
    /// argmax, which leaves the picks, positions and lengths of the next step in place.
    fn step(
        &self,
        gpu: &Gpu,
        sess: &mut DecodeSession,
        tokens: Option<&[u32]>,
        greedy: bool,
        lora: Option<&GpuLora>,
    ) -> Result<()> {
        if lora_key(lora) != sess.lora_key {
            return Err(err("decode: a step must use the adapter its session was started with"));
        }
        let bsz = sess.suffix.bsz;
        if tokens.is_some_and(|t| t.len() != bsz) || sess.suffix.len >= sess.suffix.capacity {
            return Err(err(format!(
                "decode: {} tokens for {bsz} sequences, {} of {} positions used",
                tokens.map_or(0, |t| t.len()),
                sess.suffix.len,
                sess.suffix.capacity
            )));
        }
        let s = &gpu.stream;
        match tokens {
            Some(tokens) => {
                let id32 = self.check_ids(tokens)?;
                s.memcpy_htod(&id32, &mut sess.scratch.ids).map_err(derr)?;
                let pos = (sess.prefix.len + sess.suffix.len) as isize + sess.shift;
                if pos < 0 || pos as usize >= self.max_positions {
                    return Err(err(format!("decode: RoPE position {pos} is outside the table")));
                }
                s.memcpy_htod(&vec![pos as i32; bsz], &mut sess.scratch.pos).map_err(derr)?;
                s.memcpy_htod(&vec![(sess.suffix.len + 1) as i32; bsz], &mut sess.suffix.lens).map_err(derr)?;
            }
            None if !sess.device_fed => {
                return Err(err("decode: a step without tokens must follow a greedy step (it feeds that step's picks)"))
            }
            None => {}
        }
        let (c, vocab) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let DecodeSession { prefix, suffix, scratch, graph, greedy_graph, device_fed, use_graph, graph_error, .. } =
            sess;
        let enqueue = |scratch: &mut Scratch, suffix: &mut GpuSuffixCache| -> Result<()> {
            self.forward_layers(
                gpu,
                scratch,
                &mut Attend::Decode { prefix: &*prefix, suffix: &mut *suffix },
                true,
                lora,
            )?;
            let head = self.plan.launches(gpu, bsz, lora.is_some()).head;
            gpu.matmul_with(head, &scratch.h, self.head(), &mut scratch.logits, bsz, c, vocab)?;
            if greedy {
                gpu.argmax_step_dev(
                    &mut scratch.ids,
                    &scratch.logits,
                    bsz,
                    vocab,
                    Some((&mut scratch.pos, &mut suffix.lens)),
                )?;
            }
            Ok(())
        };
        let graph = if greedy { greedy_graph } else { graph };
        if graph.is_none() && *use_graph {
            s.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(derr)?;
            let enq = enqueue(scratch, suffix);
            let captured = s.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
            match (enq, captured) {
                (Ok(()), Ok(Some(g))) => *graph = Some(g),
                // Nothing captured ran: fall back to launching the kernels (and say why).
                (enq, captured) => {
                    *use_graph = false;
                    *graph_error = Some(format!(
                        "CUDA graph capture of a decode step failed ({enq:?}, {:?}); launching kernels directly",
                        captured.map(|g| g.is_some())
                    ));
                }
            }
        }
        // From here the step runs: a failure leaves the device state unknown, so the next step must upload.
        *device_fed = false;
        match graph {
            Some(g) if *use_graph => g.launch().map_err(derr)?,
            _ => enqueue(scratch, suffix)?,
        }
        suffix.len += 1;
        *device_fed = greedy;
        Ok(())
    }

    /// n answers to one prompt (ids only; see `sample_answers`): each answer's tokens, a stop token excluded.
    pub fn generate_n(
        &self,
        gpu: &Gpu,
        prompt: &[u32],
        seeds: &[u64],
        params: &crate::sampling::SamplingParams,
        stop_ids: &[u32],
    ) -> Result<Vec<Vec<u32>>> {
        Ok(self
            .sample_answers(gpu, Input::Ids(prompt), prompt, seeds, params, stop_ids, None)?
            .0
            .into_iter()
            .map(|a| a.tokens)
            .collect())
    }

    /// n answers to one prompt under `lora`: the prompt is prefilled once, then the n sequences decode together
    /// against that shared prefix (`DecodeSession`), each drawn on the host with its own seed
    /// (`sampling::sample_fast`, the n rows in parallel; the repetition penalty sees `prompt_ids` and the answer),
    /// or, greedy without a repetition penalty, picked on the device (`decode_step_greedy`: the same tokens).
    /// An answer ends at a token of `stop` (not recorded: `FinishReason::Stop`) or at `max_new_tokens`, as on the
    /// CPU backend. Returns the answers and where the time went (the prefill timed from the call).
    #[allow(clippy::too_many_arguments)]
    pub fn sample_answers(
        &self,
        gpu: &Gpu,
        prompt: Input,
        prompt_ids: &[u32],
        seeds: &[u64],
        params: &crate::sampling::SamplingParams,
        stop: &[u32],
        lora: Option<&GpuLora>,
    ) -> Result<(Vec<Answer>, GenerateStats)> {
        use rayon::prelude::*;
        let t0 = std::time::Instant::now();
        let mut stats = GenerateStats::default();
        let n = seeds.len();
        let max_new = params.max_new_tokens;
        let mut answers: Vec<Answer> =
            seeds.iter().map(|&seed| Answer { seed, tokens: Vec::new(), finish: FinishReason::Length }).collect();
        if n == 0 || max_new == 0 {
            return Ok((answers, stats));
        }
        stats.prompt_positions = self.input_rows(prompt)?;
        let (mut sess, first) = self.start_decode_input(gpu, prompt, n, max_new, lora)?;
        stats.prefill_s = t0.elapsed().as_secs_f64();
        let t1 = std::time::Instant::now();
        let v = self.cfg.vocab_size;
        let mut rngs: Vec<crate::rng::SplitMix64> = seeds.iter().map(|&s| crate::rng::SplitMix64::new(s)).collect();
        let mut seen: Vec<Vec<u32>> = vec![prompt_ids.to_vec(); n];
        let mut next: Vec<u32> = rngs
            .par_iter_mut()
            .zip(seen.par_iter())
            .map(|(rng, s)| crate::sampling::sample_fast(&mut first.clone(), s, params, rng))
            .collect();
        let mut active = vec![true; n];
        // Greedy without a repetition penalty is the argmax of the logits: chosen on the device, so each step
        // copies n ids to the host instead of n rows of logits.
        let greedy = params.temperature == 0.0 && params.repetition_penalty == 1.0;
        loop {
            for i in 0..n {
                if !active[i] {
                    continue;
                }
                let tok = next[i];
                if stop.contains(&tok) {
                    answers[i].finish = FinishReason::Stop;
                    active[i] = false;
                    continue;
                }
                answers[i].tokens.push(tok);
                seen[i].push(tok);
                if answers[i].tokens.len() >= max_new {
                    active[i] = false;
                }
            }
            let live = active.iter().filter(|&&a| a).count();
            if live == 0 {
                break;
            }
            crate::interrupt::check()?;
            stats.decode_steps += 1;
            stats.decode_tokens += live;
            // Every sequence steps (the batch shape stays fixed for the captured graph): each feeds its newest draw
            // (a finished one its stop token or last token, a valid id either way) and a finished row is ignored.
            if greedy {
                // The picks stay on the device for the next step; only they come back.
                let fed = sess.device_fed;
                let picks = self.decode_step_greedy(gpu, &mut sess, if fed { None } else { Some(&next) }, lora)?;
                for ((t, p), &live) in next.iter_mut().zip(picks).zip(&active) {
                    if live {
                        *t = p;
                    }
                }
                continue;
            }
            let mut logits = self.decode_step_lora(gpu, &mut sess, &next, lora)?;
            next.par_iter_mut()
                .zip(rngs.par_iter_mut())
                .zip(logits.par_chunks_mut(v))
                .zip(seen.par_iter())
                .zip(active.par_iter())
                .for_each(|((((t, rng), row), s), &live)| {
                    if live {
                        *t = crate::sampling::sample_fast(row, s, params, rng);
                    }
                });
        }
        stats.decode_s = t1.elapsed().as_secs_f64();
        Ok((answers, stats))
    }
}
