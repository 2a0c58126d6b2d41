//! n answers per prompt in one batch: the image is encoded once, the prompt's KV cache is computed once and
//! shared, and every answer has its own u64 seed and its own suffix cache. Same inputs and seeds give the same
//! tokens bit for bit on one machine (every reduction has a fixed order; rayon splits only independent rows).

use crate::adapter::Adapter;
use crate::error::{EngineError, Result};
use crate::image::PixelValues;
use crate::limits::RequestShape;
use crate::llama::KvCache;
use crate::llava::Model;
use crate::rng::SplitMix64;
use crate::sampling::{sample, SamplingParams};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token was produced (it is not part of `tokens`).
    Stop,
    /// max_new_tokens reached.
    Length,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Answer {
    pub seed: u64,
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

#[derive(Clone)]
pub struct GenerateRequest<'a> {
    /// Prompt ids with the image token once (if there is an image).
    pub ids: &'a [u32],
    pub pixels: Option<&'a PixelValues>,
    /// One answer per seed.
    pub seeds: &'a [u64],
    pub params: SamplingParams,
    /// Tokens that end an answer; defaults to the model's eos ids when empty.
    pub stop_ids: Vec<u32>,
}

/// Where the time of one `generate` call went.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GenerateStats {
    /// Positions in the prompt after image expansion.
    pub prompt_positions: usize,
    /// Vision tower + projector + prompt prefill, seconds.
    pub prefill_s: f64,
    /// Batched decode steps (after the first token), and their total seconds.
    pub decode_steps: usize,
    /// Tokens produced by those steps, summed over answers.
    pub decode_tokens: usize,
    pub decode_s: f64,
}

/// Samples `req.seeds.len()` answers to one prompt.
pub fn generate(model: &Model, req: &GenerateRequest, adapter: Option<&Adapter>) -> Result<Vec<Answer>> {
    generate_with_stats(model, req, adapter).map(|(a, _)| a)
}

/// `generate`, also reporting timings. Runs on the model's backend (`Model::set_backend`; the CPU by default).
/// A prompt at or past the model's context, or a request over the model's memory budget, is refused before any
/// work (`crate::limits`); answers that would run past the context end there (`FinishReason::Length`).
pub fn generate_with_stats(
    model: &Model,
    req: &GenerateRequest,
    adapter: Option<&Adapter>,
) -> Result<(Vec<Answer>, GenerateStats)> {
    let shape = RequestShape {
        prompt_positions: model.prompt_positions(req.ids),
        answers: req.seeds.len(),
        max_new_tokens: req.params.max_new_tokens,
    };
    let max_new = model.check_request(shape, model.request_budget())?;
    let clamped;
    let req = if max_new < req.params.max_new_tokens {
        clamped =
            GenerateRequest { params: SamplingParams { max_new_tokens: max_new, ..req.params.clone() }, ..req.clone() };
        &clamped
    } else {
        req
    };
    match model.backend() {
        Some(b) => b.generate(model, req, adapter),
        None => generate_cpu(model, req, adapter),
    }
}

/// `generate_with_stats` on the CPU backend.
pub fn generate_cpu(
    model: &Model,
    req: &GenerateRequest,
    adapter: Option<&Adapter>,
) -> Result<(Vec<Answer>, GenerateStats)> {
    let mut stats = GenerateStats::default();
    let t0 = std::time::Instant::now();
    req.params.validate().map_err(EngineError::Input)?;
    if req.seeds.is_empty() {
        return Ok((Vec::new(), stats));
    }
    let cfg = &model.llm.cfg;
    let stop: Vec<u32> = if req.stop_ids.is_empty() { cfg.eos_token_ids.clone() } else { req.stop_ids.clone() };
    let feats = match req.pixels {
        Some(p) => Some(model.image_features(p, adapter)?),
        None => None,
    };
    let (prefix, first_logits) = model.prefill(req.ids, feats.as_deref(), adapter)?;
    stats.prompt_positions = prefix.len;
    stats.prefill_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let n = req.seeds.len();
    let v = cfg.vocab_size;
    let c = cfg.hidden_size;
    let mut rngs: Vec<SplitMix64> = req.seeds.iter().map(|&s| SplitMix64::new(s)).collect();
    let mut answers: Vec<Answer> =
        req.seeds.iter().map(|&seed| Answer { seed, tokens: Vec::new(), finish: FinishReason::Length }).collect();
    let mut suffixes: Vec<KvCache> = (0..n).map(|_| KvCache::new(cfg.num_hidden_layers)).collect();
    let mut active: Vec<usize> = (0..n).collect();
    let mut seen: Vec<Vec<u32>> = vec![req.ids.to_vec(); n];

    // First token of every answer comes from the shared prefill logits.
    let mut next: Vec<u32> = Vec::with_capacity(n);
    for i in 0..n {
        if req.params.max_new_tokens == 0 {
            break;
        }
        let mut l = first_logits.clone();
        next.push(sample(&mut l, &seen[i], &req.params, &mut rngs[i]));
    }
    if req.params.max_new_tokens == 0 {
        return Ok((answers, stats));
    }
    loop {
        // Record this step's tokens, drop finished answers.
        let mut still = Vec::with_capacity(active.len());
        let mut feed = Vec::with_capacity(active.len());
        for (slot, &i) in active.iter().enumerate() {
            let tok = next[slot];
            if stop.contains(&tok) {
                answers[i].finish = FinishReason::Stop;
                continue;
            }
            answers[i].tokens.push(tok);
            seen[i].push(tok);
            if answers[i].tokens.len() >= req.params.max_new_tokens {
                answers[i].finish = FinishReason::Length;
                continue;
            }
            still.push(i);
            feed.push(tok);
        }
        active = still;
        if active.is_empty() {
            break;
        }
        crate::interrupt::check()?;
        stats.decode_steps += 1;
        stats.decode_tokens += active.len();
        let mut x = Vec::with_capacity(active.len() * c); // (A, C)
        model.llm.embed_into(&mut x, &feed);
        {
            // `active` is ascending, so filtering in index order lines the caches up with the rows of x.
            let mut is_active = vec![false; n];
            active.iter().for_each(|&i| is_active[i] = true);
            let mut refs: Vec<&mut KvCache> =
                suffixes.iter_mut().zip(&is_active).filter(|(_, &a)| a).map(|(s, _)| s).collect();
            model.llm.forward_shared_prefix(&mut x, &prefix, &mut refs, adapter);
        }
        let mut logits = model.llm.logits(&x, active.len(), adapter); // (A, V)
        next.clear();
        for (slot, &i) in active.iter().enumerate() {
            let row = &mut logits[slot * v..(slot + 1) * v];
            next.push(sample(row, &seen[i], &req.params, &mut rngs[i]));
        }
    }
    stats.decode_s = t1.elapsed().as_secs_f64();
    Ok((answers, stats))
}
