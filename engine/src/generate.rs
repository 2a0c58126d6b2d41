//! n answers per prompt in one batch: the image is encoded once, the prompt's KV cache is computed once and
//! shared, and every answer has its own u64 seed and its own suffix cache. Same inputs and seeds give the same
//! tokens bit for bit on one machine (every reduction has a fixed order; rayon splits only independent rows).

use crate::adapter::Adapter;
use crate::error::{EngineError, Result};
use crate::image::PixelValues;
use crate::limits::RequestShape;
use crate::llava::Model;
use crate::sampling::SamplingParams;

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
    // Checked once here for every backend.
    req.params.validate().map_err(EngineError::Input)?;
    if req.seeds.is_empty() {
        return Ok((Vec::new(), GenerateStats::default()));
    }
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
    model.backend().generate(model, req, adapter)
}

/// One answer to each of several text prompts (no image), `seeds[i]` for `prompts[i]`, in one batch: on the CPU
/// their longest common beginning (an instruction shared by every prompt) is computed once and all answers are
/// decoded together, each at its own length; an answer equals `generate` on its prompt alone, up to the order
/// of floating-point sums. Every prompt is checked against the context and the memory budget before any work,
/// and answers that would run past the context end there, as in `generate`.
pub fn generate_batch(
    model: &Model,
    prompts: &[&[u32]],
    seeds: &[u64],
    params: &SamplingParams,
    adapter: Option<&Adapter>,
) -> Result<Vec<Answer>> {
    params.validate().map_err(EngineError::Input)?;
    if prompts.len() != seeds.len() {
        return Err(EngineError::Input(format!(
            "{} prompts but {} seeds: give one seed per prompt",
            prompts.len(),
            seeds.len()
        )));
    }
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(EngineError::Input(format!("prompt {i} of the batch is empty")));
    }
    if let Some(image) = model.image_token_id() {
        if let Some(i) = prompts.iter().position(|p| p.contains(&image)) {
            return Err(EngineError::Input(format!(
                "prompt {i} of the batch holds the image token: a batch is text only"
            )));
        }
    }
    // Bounded as one request of `prompts.len()` answers to the longest prompt: more than the shared prefix needs.
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let shape =
        RequestShape { prompt_positions: longest, answers: prompts.len(), max_new_tokens: params.max_new_tokens };
    let max_new = model.check_request(shape, model.request_budget())?;
    let params = SamplingParams { max_new_tokens: max_new.min(params.max_new_tokens), ..params.clone() };
    model.backend().generate_batch(model, prompts, seeds, &params, &[], adapter)
}
