//! The CPU backend: generation, scoring, the labeler's branches and the image path in f32 on the host
//! (`crate::llama`, `crate::clip`, `crate::ops`). The CUDA backend (`cuda.rs`) has the same methods and runs here
//! whatever its device cannot apply. Training on the CPU is `train::trainer` / `train::sft` over
//! `train::passes`.

use crate::adapter::Adapter;
use crate::backend::{Backend, DeviceSpec};
use crate::config::FeatureSelect;
use crate::error::{EngineError, Result};
use crate::generate::{Answer, FinishReason, GenerateRequest, GenerateStats};
use crate::image::PixelValues;
use crate::llama::KvCache;
use crate::llava::{ImageFeatures, Model};
use crate::ops::{apply_activation, log_softmax_rows};
use crate::rng::SplitMix64;
use crate::sampling::{sample, SamplingParams};

/// The CPU backend.
pub struct CpuBackend;

impl Backend for CpuBackend {
    fn device(&self) -> String {
        "cpu".into()
    }

    fn spec(&self) -> DeviceSpec {
        DeviceSpec::Cpu
    }

    fn generate(
        &self,
        model: &Model,
        req: &GenerateRequest,
        adapter: Option<&Adapter>,
    ) -> Result<(Vec<Answer>, GenerateStats)> {
        let mut stats = GenerateStats::default();
        let t0 = std::time::Instant::now();
        let cfg = &model.llm.cfg;
        let stop: Vec<u32> = if req.stop_ids.is_empty() { cfg.eos_token_ids.clone() } else { req.stop_ids.clone() };
        let feats = match req.pixels {
            Some(p) => Some(model.image_features(p, adapter)?),
            None => None,
        };
        let (prefix, first_logits) = model.prefill(req.ids, feats.as_ref(), adapter)?;
        stats.prompt_positions = prefix.len;
        stats.prefill_s = t0.elapsed().as_secs_f64();
        let first = vec![first_logits; req.seeds.len()];
        let seen = vec![req.ids.to_vec(); req.seeds.len()];
        let suffixes = vec![KvCache::new(cfg.num_hidden_layers); req.seeds.len()];
        let answers =
            decode(model, &prefix, suffixes, first, seen, req.seeds, &req.params, &stop, adapter, &mut stats)?;
        Ok((answers, stats))
    }

    fn generate_batch(
        &self,
        model: &Model,
        prompts: &[&[u32]],
        seeds: &[u64],
        params: &SamplingParams,
        stop_ids: &[u32],
        adapter: Option<&Adapter>,
    ) -> Result<Vec<Answer>> {
        // `generate::generate_batch` checked the prompts (text only, none empty, one seed each).
        let cfg = &model.llm.cfg;
        let stop: Vec<u32> = if stop_ids.is_empty() { cfg.eos_token_ids.clone() } else { stop_ids.to_vec() };
        // The longest common beginning, leaving every prompt at least its last token of its own: the prefix is
        // computed once, each tail continues it in its own cache.
        let shortest = prompts.iter().map(|p| p.len()).min().unwrap_or(0);
        let mut common = 0;
        while common + 1 < shortest && prompts.iter().all(|p| p[common] == prompts[0][common]) {
            common += 1;
        }
        let prefix = if common > 0 {
            model.prefill(&prompts[0][..common], None, adapter)?.0
        } else {
            KvCache::new(cfg.num_hidden_layers)
        };
        let c = cfg.hidden_size;
        let mut suffixes = Vec::with_capacity(prompts.len());
        let mut first = Vec::with_capacity(prompts.len());
        for p in prompts {
            crate::interrupt::check()?;
            let tail = &p[common..];
            let mut x = Vec::with_capacity(tail.len() * c);
            model.llm.embed_into(&mut x, tail);
            let mut suffix = KvCache::new(cfg.num_hidden_layers);
            model.llm.forward_suffix(&mut x, tail.len(), &prefix, &mut suffix, adapter);
            first.push(model.llm.logits(&x[(tail.len() - 1) * c..], 1, adapter));
            suffixes.push(suffix);
        }
        let seen: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
        let mut stats = GenerateStats::default();
        decode(model, &prefix, suffixes, first, seen, seeds, params, &stop, adapter, &mut stats)
    }

    fn image_features(&self, model: &Model, pixels: &PixelValues, adapter: Option<&Adapter>) -> Result<Vec<f32>> {
        if let Some(qv) = &model.qwen_vision {
            let grid = pixels.grid.ok_or_else(|| {
                EngineError::Input(
                    "Qwen2-VL takes the patches of its own image processor (pixel values with a patch grid)".into(),
                )
            })?;
            return qv.forward(&pixels.data, grid, adapter);
        }
        let (Some(lc), Some(vision), Some(proj)) = (model.config.llava(), &model.vision, &model.projector) else {
            return Err(EngineError::Input("this model has no vision tower".into()));
        };
        model.check_tiles(pixels)?;
        let mut per_tile = Vec::new();
        for i in 0..pixels.tiles {
            let hidden = vision.forward(pixels.tile(i), lc.vision_layers_needed(), adapter)?; // (N + 1, Dv)
            let dv = lc.vision.hidden_size;
            let feats = match lc.vision_feature_select_strategy {
                FeatureSelect::Default => &hidden[dv..],
                FeatureSelect::Full => &hidden[..],
            };
            let n = feats.len() / dv;
            let mut h = proj.linear_1.apply(feats, n, adapter); // (N, C)
            apply_activation(&mut h, proj.act);
            per_tile.extend(proj.linear_2.apply(&h, n, adapter));
        }
        model.image_rows(pixels, per_tile)
    }

    fn branch_logits(
        &self,
        model: &Model,
        prefix: &[u32],
        continuations: &[&[u32]],
        image_features: Option<&ImageFeatures>,
        adapter: Option<&Adapter>,
    ) -> Result<Vec<Vec<f32>>> {
        // `Model::branch_logits` checked the continuations.
        let (mut px, _) = model.embed_inputs(prefix, image_features.map(|f| &f.rows[..]))?;
        let c = model.llm.cfg.hidden_size;
        let mut cache = KvCache::new(model.llm.cfg.num_hidden_layers);
        if !px.is_empty() {
            model.forward_prompt_rows(&mut px, prefix, image_features, &mut cache, adapter);
        }
        let lens: Vec<usize> = continuations.iter().map(|c| c.len()).collect();
        let mut x = Vec::new();
        for cont in continuations {
            model.llm.embed_into(&mut x, cont);
        }
        model.llm.forward_branches(&mut x, &lens, &cache, adapter);
        let mut ends = Vec::with_capacity(lens.len() * c);
        let mut row = 0;
        for l in &lens {
            row += l;
            ends.extend_from_slice(&x[(row - 1) * c..row * c]);
        }
        let logits = model.llm.logits(&ends, lens.len(), adapter);
        let v = model.llm.cfg.vocab_size;
        Ok(logits.chunks(v).map(|r| r.to_vec()).collect())
    }

    fn answer_logp(
        &self,
        model: &Model,
        prompt: &[u32],
        answer: &[u32],
        feats: Option<&ImageFeatures>,
        adapter: Option<&Adapter>,
    ) -> Result<f64> {
        let (mut x, rows, targets, _, ids, _) = model.answer_rows(prompt, answer, feats.map(|f| &f.rows[..]))?;
        let c = model.llm.cfg.hidden_size;
        let mut cache = KvCache::new(model.llm.cfg.num_hidden_layers);
        model.forward_prompt_rows(&mut x, &ids, feats, &mut cache, adapter);
        let sel: Vec<f32> = rows.iter().flat_map(|&r| x[r * c..(r + 1) * c].iter().copied()).collect();
        let mut logits = model.llm.head_forward(&sel, adapter);
        let v = model.llm.cfg.vocab_size;
        log_softmax_rows(&mut logits, v);
        Ok(targets.iter().enumerate().map(|(i, &tok)| logits[i * v + tok as usize] as f64).sum())
    }
}

/// The decode loop of `generate` and `generate_batch`: sequence i continues `prefix` and `suffixes[i]`, its first
/// token is sampled from `first[i]` with its own RNG stream (`seeds[i]`) and repetition history `seen[i]`; every
/// step feeds all unfinished sequences together and drops the finished ones.
#[allow(clippy::too_many_arguments)]
fn decode(
    model: &Model,
    prefix: &KvCache,
    mut suffixes: Vec<KvCache>,
    mut first: Vec<Vec<f32>>,
    mut seen: Vec<Vec<u32>>,
    seeds: &[u64],
    params: &SamplingParams,
    stop: &[u32],
    adapter: Option<&Adapter>,
    stats: &mut GenerateStats,
) -> Result<Vec<Answer>> {
    let t1 = std::time::Instant::now();
    let n = seeds.len();
    let v = model.llm.cfg.vocab_size;
    let c = model.llm.cfg.hidden_size;
    let mut rngs: Vec<SplitMix64> = seeds.iter().map(|&s| SplitMix64::new(s)).collect();
    let mut answers: Vec<Answer> =
        seeds.iter().map(|&seed| Answer { seed, tokens: Vec::new(), finish: FinishReason::Length }).collect();
    if params.max_new_tokens == 0 {
        return Ok(answers);
    }
    let mut active: Vec<usize> = (0..n).collect();
    let mut next: Vec<u32> = Vec::with_capacity(n);
    for i in 0..n {
        next.push(sample(&mut first[i], &seen[i], params, &mut rngs[i]));
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
            if answers[i].tokens.len() >= params.max_new_tokens {
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
            model.llm.decode_step(&mut x, prefix, &mut refs, adapter);
        }
        let mut logits = model.llm.logits(&x, active.len(), adapter); // (A, V)
        next.clear();
        for (slot, &i) in active.iter().enumerate() {
            let row = &mut logits[slot * v..(slot + 1) * v];
            next.push(sample(row, &seen[i], params, &mut rngs[i]));
        }
    }
    stats.decode_s = t1.elapsed().as_secs_f64();
    Ok(answers)
}
