//! Continuous batching on the CPU: the answers of several requests decode together, one token each per step.
//! A request joins between steps (`admit`: its image is encoded and its prompt prefilled into its own KV cache,
//! and its first tokens are sampled), every step feeds the last token of every unfinished answer of every request
//! through the decoder at once (`Llama::decode_step_multi`: row r attends to its own request's prompt cache and
//! its own answer cache), and finished answers leave at once. Each request keeps its own sampling settings and
//! each answer its own RNG stream, so a seeded answer is the same token for token alone or batched with others
//! (the CPU matmuls keep one accumulation order per row), and equal to `generate::generate`'s.
//!
//! The caller (the daemon's server) owns the loop: `admit` new requests, `step`, hand the emitted tokens to
//! their clients, `cancel` what a client no longer wants. Everything in one batch runs on one adapter.

use crate::adapter::Adapter;
use crate::error::{EngineError, Result};
use crate::generate::{FinishReason, GenerateRequest};
use crate::limits::RequestShape;
use crate::llama::KvCache;
use crate::llava::Model;
use crate::rng::SplitMix64;
use crate::sampling::{sample, sorted_desc, SamplingParams};

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

struct Answer {
    index: usize,
    suffix: KvCache,
    /// Prompt and answer so far (the repetition penalty's history).
    seen: Vec<u32>,
    rng: SplitMix64,
    produced: usize,
    /// The token to feed in the next step; None once finished.
    pending: Option<u32>,
}

struct Request {
    id: u64,
    prefix: KvCache,
    params: SamplingParams,
    stop: Vec<u32>,
    logprobs: Option<usize>,
    answers: Vec<Answer>,
}

/// The requests decoding together on one model and one adapter.
#[derive(Default)]
pub struct CpuBatch {
    requests: Vec<Request>,
    next_id: u64,
    steps: u64,
}

impl CpuBatch {
    pub fn new() -> CpuBatch {
        CpuBatch::default()
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

    /// Decode steps run so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Adds a request: checks it against the context and the memory budget (answers that would run past the
    /// context end there), encodes its image, prefills its prompt and samples every answer's first token, which
    /// the returned events carry. Nothing is added on error.
    pub fn admit(
        &mut self,
        model: &Model,
        req: &BatchRequest,
        adapter: Option<&Adapter>,
    ) -> Result<(u64, Vec<Emitted>)> {
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
        let shape = RequestShape {
            prompt_positions: model.prompt_positions(req.ids),
            answers: req.seeds.len(),
            max_new_tokens: req.params.max_new_tokens,
        };
        let max_new = model.check_request(shape, model.request_budget())?;
        let params = SamplingParams { max_new_tokens: max_new.min(req.params.max_new_tokens), ..req.params.clone() };
        let cfg = &model.llm.cfg;
        let stop = if req.stop_ids.is_empty() { cfg.eos_token_ids.clone() } else { req.stop_ids.clone() };
        let feats = match req.pixels {
            Some(p) => Some(model.image_features(p, adapter)?),
            None => None,
        };
        let (prefix, first) = model.prefill(req.ids, feats.as_ref(), adapter)?;
        let id = self.next_id;
        self.next_id += 1;
        let mut r = Request { id, prefix, params, stop, logprobs, answers: Vec::new() };
        let mut events = Vec::new();
        for (index, &seed) in req.seeds.iter().enumerate() {
            let mut a = Answer {
                index,
                suffix: KvCache::new(cfg.num_hidden_layers),
                seen: req.ids.to_vec(),
                rng: SplitMix64::new(seed),
                produced: 0,
                pending: None,
            };
            if r.params.max_new_tokens == 0 {
                events.push(Emitted {
                    request: id,
                    answer: index,
                    token: None,
                    logprob: None,
                    finish: Some(FinishReason::Length),
                });
                continue;
            }
            let mut logits = first.clone();
            let e = choose(&mut logits, &mut a, &r.params, &r.stop, r.logprobs, id);
            let finished = e.finish.is_some();
            events.push(e);
            if !finished {
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
    pub fn step(&mut self, model: &Model, adapter: Option<&Adapter>) -> Result<Vec<Emitted>> {
        let rows = self.active_answers();
        if rows == 0 {
            return Ok(Vec::new());
        }
        crate::interrupt::check()?;
        let c = model.llm.cfg.hidden_size;
        let v = model.llm.cfg.vocab_size;
        let feed: Vec<u32> =
            self.requests.iter().flat_map(|r| r.answers.iter().map(|a| a.pending.unwrap_or(0))).collect();
        let mut x = Vec::with_capacity(rows * c);
        model.llm.embed_into(&mut x, &feed);
        {
            let mut prefixes = Vec::with_capacity(rows);
            let mut suffixes = Vec::with_capacity(rows);
            for r in self.requests.iter_mut() {
                for a in r.answers.iter_mut() {
                    prefixes.push(&r.prefix);
                    suffixes.push(&mut a.suffix);
                }
            }
            model.llm.decode_step_multi(&mut x, &prefixes, &mut suffixes, adapter);
        }
        let mut logits = model.llm.logits(&x, rows, adapter);
        self.steps += 1;
        let mut events = Vec::with_capacity(rows);
        let mut row = 0;
        for r in self.requests.iter_mut() {
            let (params, stop, lp, id) = (&r.params, &r.stop, r.logprobs, r.id);
            r.answers.retain_mut(|a| {
                let e = choose(&mut logits[row * v..(row + 1) * v], a, params, stop, lp, id);
                row += 1;
                let keep = e.finish.is_none();
                events.push(e);
                keep
            });
        }
        self.requests.retain(|r| !r.answers.is_empty());
        Ok(events)
    }

    /// Drops a request (its client went away, or its time ran out); unknown ids are ignored.
    pub fn cancel(&mut self, request: u64) {
        self.requests.retain(|r| r.id != request);
    }

    /// Ends one answer early (it reached a stop string); unknown ids are ignored.
    pub fn cancel_answer(&mut self, request: u64, answer: usize) {
        for r in self.requests.iter_mut().filter(|r| r.id == request) {
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
