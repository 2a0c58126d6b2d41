//! Continuous batching: the answers of several requests decode together, one token each per step, on the CPU or
//! a GPU. A request joins between steps (`admit`: its image is encoded and its prompt prefilled once, and its
//! first tokens are sampled), every step feeds the last token of every unfinished answer of every request through
//! the decoder at once, and finished answers leave at once. Each request keeps its own sampling settings and each
//! answer its own RNG stream; sampling is on the host for both devices (`crate::sampling::sample`).
//!
//! Where the rows live is the backend's [`BatchRows`] (`Backend::batch_rows`): on the CPU ([`CpuRows`]) each
//! request keeps its prompt's KV cache and each answer its own cache after it, and a step is
//! `Llama::decode_step_multi` (row r attends to its own request's prompt cache and its own answer cache), so a
//! seeded answer is the same token for token alone or batched with others (the CPU matmuls keep one accumulation
//! order per row), and equal to `generate::generate`'s. On a CUDA device (`cuda_llama::GpuRows`) each answer
//! holds a slot of the device's batch cache with a copy of its prompt's keys and values; the step runs the fp16
//! kernels over every slot at once, so an answer equals the same request's answer alone up to fp16 rounding
//! (cuBLASLt may choose another algorithm for another number of rows), as in other GPU servers.
//!
//! The caller (the daemon's server) owns the loop: `admit` new requests, `step`, hand the emitted tokens to
//! their clients, `cancel` what a client no longer wants. Everything in one batch runs on one adapter, given when
//! the batch is made.

use crate::adapter::Adapter;
use crate::error::{EngineError, Result};
use crate::generate::{FinishReason, GenerateRequest};
use crate::limits::RequestShape;
use crate::llama::KvCache;
use crate::llava::Model;
use crate::rng::SplitMix64;
use crate::sampling::{sample, sorted_desc, SamplingParams};
use std::sync::Arc;

/// The most alternatives `top_logprobs` may ask for per token (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// What `admit` takes: a `generate::GenerateRequest`, and whether to report log-probabilities.
pub struct BatchRequest<'a> {
    pub request: GenerateRequest<'a>,
    /// Some(k): report each sampled token's log-probability and the k most likely tokens' (k <= 20).
    pub logprobs: Option<usize>,
}

/// A token's log-probability under the model (log-softmax of the raw logits: before the repetition penalty,
/// temperature, top-k and top-p shape the draw), and the `top` most likely tokens with theirs.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// One answer's progress in one step: a new token (with its log-probability when asked), and/or its end.
#[derive(Clone, Debug)]
pub struct Emitted {
    /// The request, as `admit` numbered it.
    pub request: u64,
    /// The answer within the request (the index of its seed).
    pub answer: usize,
    /// None when the answer ended on a stop token (which is not part of it).
    pub token: Option<u32>,
    pub logprob: Option<TokenLogprob>,
    pub finish: Option<FinishReason>,
}

/// Where a batch's rows (one per unfinished answer) live and how they step: made by the model's backend
/// (`Backend::batch_rows`) for one adapter.
pub trait BatchRows {
    /// The most answers the rows hold at once (None: bounded only by each request's memory budget).
    fn capacity(&self) -> Option<usize>;
    /// Positions (prompt and answer) one row holds, when fewer than the model's context.
    fn positions(&self) -> Option<usize>;
    /// Where the rows are, e.g. "cpu" or "cuda:0 (...)".
    fn device(&self) -> String;
    /// Encodes `req`'s image, prefills its prompt once and gives it `n` free rows: returns their keys and the
    /// prompt's next-token logits (vocab). Nothing is taken on error.
    fn admit(&mut self, model: &Model, req: &GenerateRequest, n: usize) -> Result<(Vec<usize>, Vec<f32>)>;
    /// Feeds `feed[i].1` to row `feed[i].0` (each row at most once); returns each fed row's next-token logits in
    /// `feed`'s order, (feed.len(), vocab).
    fn step(&mut self, model: &Model, feed: &[(usize, u32)]) -> Result<Vec<f32>>;
    /// Frees a row (its answer ended or was cancelled); unknown keys are ignored.
    fn release(&mut self, row: usize);
}

/// The rows of a batch on the CPU: each request's prompt cache (shared by its answers) and each answer's cache.
pub struct CpuRows {
    adapter: Option<Arc<Adapter>>,
    /// Per prompt: its cache and how many rows still use it.
    prompts: Vec<Option<(KvCache, usize)>>,
    /// Per row: its prompt and its own cache.
    rows: Vec<Option<(usize, KvCache)>>,
}

impl CpuRows {
    pub fn new(adapter: Option<Arc<Adapter>>) -> CpuRows {
        CpuRows { adapter, prompts: Vec::new(), rows: Vec::new() }
    }
}

/// The index of a free entry of `v` (None), appending one if there is none.
fn free_entry<T>(v: &mut Vec<Option<T>>) -> usize {
    match v.iter().position(|e| e.is_none()) {
        Some(i) => i,
        None => {
            v.push(None);
            v.len() - 1
        }
    }
}

impl BatchRows for CpuRows {
    fn capacity(&self) -> Option<usize> {
        None
    }

    fn positions(&self) -> Option<usize> {
        None
    }

    fn device(&self) -> String {
        "cpu".into()
    }

    fn admit(&mut self, model: &Model, req: &GenerateRequest, n: usize) -> Result<(Vec<usize>, Vec<f32>)> {
        let adapter = self.adapter.as_deref();
        let feats = match req.pixels {
            Some(p) => Some(model.image_features(p, adapter)?),
            None => None,
        };
        let (prefix, first) = model.prefill(req.ids, feats.as_ref(), adapter)?;
        let p = free_entry(&mut self.prompts);
        self.prompts[p] = Some((prefix, n));
        let layers = model.llm.cfg.num_hidden_layers;
        let keys = (0..n)
            .map(|_| {
                let k = free_entry(&mut self.rows);
                self.rows[k] = Some((p, KvCache::new(layers)));
                k
            })
            .collect();
        Ok((keys, first))
    }

    fn step(&mut self, model: &Model, feed: &[(usize, u32)]) -> Result<Vec<f32>> {
        let c = model.llm.cfg.hidden_size;
        let rows = feed.len();
        let tokens: Vec<u32> = feed.iter().map(|&(_, t)| t).collect();
        let mut x = Vec::with_capacity(rows * c);
        model.llm.embed_into(&mut x, &tokens);
        {
            let prompts = &self.prompts;
            let mut by_key: Vec<Option<(usize, &mut KvCache)>> =
                self.rows.iter_mut().map(|r| r.as_mut().map(|(p, s)| (*p, s))).collect();
            let mut prefixes = Vec::with_capacity(rows);
            let mut suffixes = Vec::with_capacity(rows);
            for &(key, _) in feed {
                let Some((p, suffix)) = by_key.get_mut(key).and_then(|r| r.take()) else {
                    return Err(EngineError::Input(format!("batch: row {key} is free or fed twice")));
                };
                let Some((prefix, _)) = prompts.get(p).and_then(|e| e.as_ref()) else {
                    return Err(EngineError::Input(format!("batch: row {key} has no prompt")));
                };
                prefixes.push(prefix);
                suffixes.push(suffix);
            }
            model.llm.decode_step_multi(&mut x, &prefixes, &mut suffixes, self.adapter.as_deref());
        }
        Ok(model.llm.logits(&x, rows, self.adapter.as_deref()))
    }

    fn release(&mut self, row: usize) {
        let Some((p, _)) = self.rows.get_mut(row).and_then(|r| r.take()) else { return };
        if let Some(e) = self.prompts.get_mut(p) {
            if let Some((_, users)) = e.as_mut() {
                *users -= 1;
                if *users == 0 {
                    *e = None;
                }
            }
        }
    }
}

struct Answer {
    index: usize,
    /// Its row in the batch's `BatchRows`.
    row: usize,
    /// Prompt and answer so far (the repetition penalty's history).
    seen: Vec<u32>,
    rng: SplitMix64,
    produced: usize,
    /// The token to feed in the next step; None once finished.
    pending: Option<u32>,
}

struct Request {
    id: u64,
    params: SamplingParams,
    stop: Vec<u32>,
    logprobs: Option<usize>,
    answers: Vec<Answer>,
}

/// The requests decoding together on one model and one adapter.
pub struct Batch {
    rows: Box<dyn BatchRows>,
    requests: Vec<Request>,
    next_id: u64,
    steps: u64,
}

impl Batch {
    /// An empty batch under `adapter` on `model`'s backend, for up to `max_answers` answers at once (a GPU
    /// allocates its rows' caches here: `Backend::batch_rows`).
    pub fn new(model: &Model, adapter: Option<Arc<Adapter>>, max_answers: usize) -> Result<Batch> {
        let rows = model.backend().batch_rows(model, adapter, max_answers.max(1))?;
        Ok(Batch::with_rows(rows))
    }

    /// An empty batch on the given rows.
    pub fn with_rows(rows: Box<dyn BatchRows>) -> Batch {
        Batch { rows, requests: Vec::new(), next_id: 0, steps: 0 }
    }

    /// Requests with an unfinished answer.
    pub fn len(&self) -> usize {
        self.requests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// Unfinished answers over all requests (the rows of the next step).
    pub fn active_answers(&self) -> usize {
        self.requests.iter().map(|r| r.answers.len()).sum()
    }

    /// The most answers the batch holds at once (None: no limit but each request's memory budget).
    pub fn capacity(&self) -> Option<usize> {
        self.rows.capacity()
    }

    /// Where the batch decodes.
    pub fn device(&self) -> String {
        self.rows.device()
    }

    /// Decode steps run so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Adds a request: checks it against the context, the memory budget and the batch's free rows (answers that
    /// would run past the context end there), encodes its image, prefills its prompt and samples every answer's
    /// first token, which the returned events carry. Nothing is added on error.
    pub fn admit(&mut self, model: &Model, req: &BatchRequest) -> Result<(u64, Vec<Emitted>)> {
        let (logprobs, req) = (req.logprobs, &req.request);
        req.params.validate().map_err(EngineError::Input)?;
        if req.seeds.is_empty() {
            return Err(EngineError::Input("a request needs at least one seed (one per answer)".into()));
        }
        if let Some(k) = logprobs {
            if k > MAX_TOP_LOGPROBS {
                return Err(EngineError::Input(format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {k}")));
            }
        }
        let n = req.seeds.len();
        if let Some(cap) = self.rows.capacity() {
            let free = cap.saturating_sub(self.active_answers());
            if n > free {
                return Err(EngineError::Input(format!(
                    "the batch on {} has room for {free} more answers of {cap}, the request asks for {n}",
                    self.rows.device()
                )));
            }
        }
        let shape = RequestShape {
            prompt_positions: model.prompt_positions(req.ids),
            answers: n,
            max_new_tokens: req.params.max_new_tokens,
        };
        let mut max_new = model.check_request(shape, model.request_budget())?;
        if let Some(room) = self.rows.positions() {
            if shape.prompt_positions >= room {
                return Err(EngineError::Input(format!(
                    "the prompt takes {} positions, a batch row on {} holds {room}: shorten the prompt",
                    shape.prompt_positions,
                    self.rows.device()
                )));
            }
            max_new = max_new.min(room - shape.prompt_positions);
        }
        let params = SamplingParams { max_new_tokens: max_new.min(req.params.max_new_tokens), ..req.params.clone() };
        let cfg = &model.llm.cfg;
        let stop = if req.stop_ids.is_empty() { cfg.eos_token_ids.clone() } else { req.stop_ids.clone() };
        // An answer with no room gets no row.
        let want = if params.max_new_tokens == 0 { 0 } else { n };
        let (keys, first) = if want == 0 { (Vec::new(), Vec::new()) } else { self.rows.admit(model, req, want)? };
        let id = self.next_id;
        self.next_id += 1;
        let mut r = Request { id, params, stop, logprobs, answers: Vec::new() };
        let mut events = Vec::new();
        for (index, &seed) in req.seeds.iter().enumerate() {
            let Some(&row) = keys.get(index) else {
                events.push(Emitted {
                    request: id,
                    answer: index,
                    token: None,
                    logprob: None,
                    finish: Some(FinishReason::Length),
                });
                continue;
            };
            let mut a =
                Answer { index, row, seen: req.ids.to_vec(), rng: SplitMix64::new(seed), produced: 0, pending: None };
            let mut logits = first.clone();
            let e = choose(&mut logits, &mut a, &r.params, &r.stop, r.logprobs, id);
            let finished = e.finish.is_some();
            events.push(e);
            if finished {
                self.rows.release(row);
            } else {
                r.answers.push(a);
            }
        }
        if !r.answers.is_empty() {
            self.requests.push(r);
        }
        Ok((id, events))
    }

    /// One decode step for every unfinished answer: feeds each its last token and samples the next. Returns one
    /// event per answer that was in the step.
    pub fn step(&mut self, model: &Model) -> Result<Vec<Emitted>> {
        let rows = self.active_answers();
        if rows == 0 {
            return Ok(Vec::new());
        }
        crate::interrupt::check()?;
        let v = model.llm.cfg.vocab_size;
        let feed: Vec<(usize, u32)> =
            self.requests.iter().flat_map(|r| r.answers.iter().map(|a| (a.row, a.pending.unwrap_or(0)))).collect();
        let mut logits = self.rows.step(model, &feed)?;
        self.steps += 1;
        let mut events = Vec::with_capacity(rows);
        let mut row = 0;
        let mut freed = Vec::new();
        for r in self.requests.iter_mut() {
            let (params, stop, lp, id) = (&r.params, &r.stop, r.logprobs, r.id);
            r.answers.retain_mut(|a| {
                let e = choose(&mut logits[row * v..(row + 1) * v], a, params, stop, lp, id);
                row += 1;
                let keep = e.finish.is_none();
                if !keep {
                    freed.push(a.row);
                }
                events.push(e);
                keep
            });
        }
        for k in freed {
            self.rows.release(k);
        }
        self.requests.retain(|r| !r.answers.is_empty());
        Ok(events)
    }

    /// Drops a request (its client went away, or its time ran out); unknown ids are ignored.
    pub fn cancel(&mut self, request: u64) {
        for r in self.requests.iter().filter(|r| r.id == request) {
            for a in &r.answers {
                self.rows.release(a.row);
            }
        }
        self.requests.retain(|r| r.id != request);
    }

    /// Ends one answer early (it reached a stop string); unknown ids are ignored.
    pub fn cancel_answer(&mut self, request: u64, answer: usize) {
        for r in self.requests.iter_mut().filter(|r| r.id == request) {
            for a in r.answers.iter().filter(|a| a.index == answer) {
                self.rows.release(a.row);
            }
            r.answers.retain(|a| a.index != answer);
        }
        self.requests.retain(|r| !r.answers.is_empty());
    }
}

/// Samples answer `a`'s next token from `logits` and records it as `generate`'s decode loop does: a stop token
/// ends the answer without joining it, `max_new_tokens` ends it after joining.
fn choose(
    logits: &mut [f32],
    a: &mut Answer,
    params: &SamplingParams,
    stop: &[u32],
    logprobs: Option<usize>,
    request: u64,
) -> Emitted {
    let raw = logprobs.map(|k| (log_softmax_f64(logits), k));
    let tok = sample(logits, &a.seen, params, &mut a.rng);
    let mut e = Emitted { request, answer: a.index, token: None, logprob: None, finish: None };
    if stop.contains(&tok) {
        e.finish = Some(FinishReason::Stop);
        a.pending = None;
        return e;
    }
    if let Some((lp, k)) = raw {
        let top = if k == 0 {
            Vec::new()
        } else {
            let lp32: Vec<f32> = lp.iter().map(|&x| x as f32).collect();
            sorted_desc(&lp32).into_iter().take(k).map(|t| (t, lp32[t as usize])).collect()
        };
        e.logprob = Some(TokenLogprob { logprob: lp[tok as usize] as f32, top });
    }
    e.token = Some(tok);
    a.seen.push(tok);
    a.produced += 1;
    if a.produced >= params.max_new_tokens {
        e.finish = Some(FinishReason::Length);
        a.pending = None;
    } else {
        a.pending = Some(tok);
    }
    e
}

/// log-softmax of one row of logits, in f64.
fn log_softmax_f64(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&x| x as f64 - lse).collect()
}
