//! Continuous batching (`engine::batch::Batch`): requests that join a running batch at different steps, with
//! different prompts (one with an image), sampling settings and numbers of answers, each get exactly the tokens
//! `generate` gives them alone; the reported log-probabilities agree with `Model::answer_logp` (an independent
//! full forward over prompt and answer) and the top alternatives are the most likely tokens in order.

use engine::batch::{Batch, BatchRequest, Emitted};
use engine::generate::{generate, FinishReason, GenerateRequest};
use engine::sampling::SamplingParams;
use engine::Model;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// An answer as the batch wrote it: its tokens, their log-probabilities, how it ended.
type Written = (Vec<u32>, Vec<f32>, Option<FinishReason>);

struct Case {
    ids: Vec<u32>,
    pixels: Option<engine::image::PixelValues>,
    seeds: Vec<u64>,
    params: SamplingParams,
    /// The step of the batch at which it joins.
    joins_at: u64,
}

#[test]
fn requests_joining_a_running_batch_get_what_generate_gives_them_alone() {
    for dir in [
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/shapes-base"),
        fixtures().join("llava/llama_text_only/model"),
        fixtures().join("llava_next/next_native_f32_mistral_window/model"),
        // LLaVA-NeXT's tiles and Qwen2.5-VL's multimodal RoPE (text after the image at shifted positions).
        fixtures().join("llava_next/next_native_f32_gqa/model"),
        fixtures().join("qwen_vl/qwen25_native_f32_gqa/model"),
    ] {
        let model = Model::load(&dir).unwrap();
        let vocab = model.llm.cfg.vocab_size as u32;
        let image = model.image_token_id();
        let token = |i: u32| -> u32 {
            let t = 3 + (i * 7919) % (vocab - 4);
            if Some(t) == image {
                t + 1
            } else {
                t
            }
        };
        let greedy = SamplingParams { temperature: 0.0, max_new_tokens: 10, ..Default::default() };
        let sampled =
            SamplingParams { temperature: 0.9, top_k: 20, top_p: 0.95, repetition_penalty: 1.1, max_new_tokens: 14 };
        let hot = SamplingParams { temperature: 1.3, max_new_tokens: 7, ..Default::default() };
        let mut cases = vec![
            Case { ids: (0..9).map(token).collect(), pixels: None, seeds: vec![5], params: greedy, joins_at: 0 },
            Case {
                ids: (20..24).map(token).collect(),
                pixels: None,
                seeds: vec![7, 8, 9],
                params: sampled,
                joins_at: 0,
            },
            Case { ids: (30..45).map(token).collect(), pixels: None, seeds: vec![1, 2], params: hot, joins_at: 3 },
        ];
        // The bundled LLaVA model also takes a request with an image, joining late.
        if let (Some(img_tok), Some(ip)) = (image, &model.image_processor) {
            let cfg = engine::shapes::WorldConfig::default();
            let pic = engine::shapes::Scene::generate(&cfg, 3).render(&cfg, 3);
            let pixels = engine::image::preprocess(&pic, ip).unwrap();
            let ids = [vec![token(50), img_tok], (51..56).map(token).collect()].concat();
            let params = SamplingParams { temperature: 0.8, max_new_tokens: 12, ..Default::default() };
            cases.push(Case { ids, pixels: Some(pixels), seeds: vec![42, 43], params, joins_at: 5 });
        }
        println!(
            "{}: {} requests, {} with an image",
            dir.display(),
            cases.len(),
            cases.iter().filter(|c| c.pixels.is_some()).count()
        );
        let mut batch = Batch::new(&model, None, 64).unwrap();
        let mut ids_of: BTreeMap<u64, usize> = BTreeMap::new();
        let mut got: BTreeMap<(usize, usize), Written> = BTreeMap::new();
        let mut record = |events: Vec<Emitted>, ids_of: &BTreeMap<u64, usize>| {
            for e in events {
                let slot = got.entry((ids_of[&e.request], e.answer)).or_default();
                assert!(slot.2.is_none(), "an event after the answer finished");
                if let Some(t) = e.token {
                    slot.0.push(t);
                    let lp = e.logprob.expect("logprobs were asked for");
                    // The top alternatives: 3, most likely first, the sampled token's probability among them
                    // when it is the most likely.
                    assert_eq!(lp.top.len(), 3);
                    assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
                    assert!(lp.logprob <= lp.top[0].1 + 1e-6);
                    if lp.top[0].0 == t {
                        assert_eq!(lp.logprob, lp.top[0].1);
                    }
                    slot.1.push(lp.logprob);
                }
                slot.2 = e.finish;
            }
        };
        let mut admitted = 0;
        let mut peak = 0;
        loop {
            while admitted < cases.len() && cases[admitted].joins_at <= batch.steps() {
                let c = &cases[admitted];
                let request = GenerateRequest {
                    ids: &c.ids,
                    pixels: c.pixels.as_ref(),
                    seeds: &c.seeds,
                    params: c.params.clone(),
                    stop_ids: vec![],
                };
                let req = BatchRequest { request, logprobs: Some(3) };
                let (id, events) = batch.admit(&model, &req).unwrap();
                ids_of.insert(id, admitted);
                record(events, &ids_of);
                admitted += 1;
            }
            peak = peak.max(batch.len());
            if batch.is_empty() && admitted == cases.len() {
                break;
            }
            let events = batch.step(&model).unwrap();
            record(events, &ids_of);
        }
        assert!(peak >= 3, "{}: at most {peak} requests were ever in the batch together", dir.display());
        let mut checked = 0;
        for (i, c) in cases.iter().enumerate() {
            let req = GenerateRequest {
                ids: &c.ids,
                pixels: c.pixels.as_ref(),
                seeds: &c.seeds,
                params: c.params.clone(),
                stop_ids: vec![],
            };
            let alone = generate(&model, &req, None).unwrap();
            for (j, a) in alone.iter().enumerate() {
                let what = format!("{}: request {i} answer {j}", dir.display());
                let (tokens, lps, finish) = &got[&(i, j)];
                assert_eq!(tokens, &a.tokens, "{what}");
                assert_eq!(*finish, Some(a.finish), "{what}");
                if image.is_some_and(|t| tokens.contains(&t)) {
                    // answer_logp refuses an answer holding the image token (a tiny model may sample it).
                    continue;
                }
                checked += 1;
                // Summed per-token log-probabilities against a full forward over prompt + answer (f32 math in
                // a different order: agreement to 1e-3 relative).
                let feats = c.pixels.as_ref().map(|p| model.image_features(p, None).unwrap());
                let reference = model.answer_logp(&c.ids, tokens, feats.as_ref(), None).unwrap();
                let sum: f64 = lps.iter().map(|&x| x as f64).sum();
                assert!(
                    (sum - reference).abs() <= 1e-3 * reference.abs().max(1.0),
                    "{what}: summed logprobs {sum} vs answer_logp {reference}"
                );
            }
        }
        assert!(checked >= 4, "{}: only {checked} answers had their logprobs checked", dir.display());
    }
}

#[test]
fn cancelled_requests_and_answers_leave_the_batch_and_the_rest_go_on() {
    let model = Model::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/shapes-base")).unwrap();
    let params = SamplingParams { temperature: 0.7, max_new_tokens: 9, ..Default::default() };
    let ids: Vec<u32> = (10..21).filter(|&t| Some(t) != model.image_token_id()).take(10).collect();
    // No stop token: every answer runs to max_new_tokens.
    fn request<'a>(ids: &'a [u32], seeds: &'a [u64], p: &SamplingParams, logprobs: Option<usize>) -> BatchRequest<'a> {
        let request = GenerateRequest { ids, pixels: None, seeds, params: p.clone(), stop_ids: vec![u32::MAX] };
        BatchRequest { request, logprobs }
    }
    let mut batch = Batch::new(&model, None, 64).unwrap();
    let (a, _) = batch.admit(&model, &request(&ids, &[1, 2], &params, None)).unwrap();
    let (b, _) = batch.admit(&model, &request(&ids, &[3], &params, None)).unwrap();
    assert_eq!((batch.len(), batch.active_answers()), (2, 3));
    batch.step(&model).unwrap();
    batch.cancel_answer(a, 0);
    assert_eq!(batch.active_answers(), 2);
    batch.cancel(b);
    assert_eq!((batch.len(), batch.active_answers()), (1, 1));
    let mut n = 0;
    while !batch.is_empty() {
        for e in batch.step(&model).unwrap() {
            assert_eq!((e.request, e.answer), (a, 1));
            n += 1;
        }
    }
    // 9 tokens: the first at admission, one in the step before the cancellations, 7 after.
    assert_eq!(n, 7);
    // A bad request changes nothing.
    let e = batch.admit(&model, &request(&ids, &[1], &params, Some(21))).unwrap_err().to_string();
    assert!(e.contains("top_logprobs must be at most 20"), "{e}");
    let long = vec![ids[0]; model.context_len()];
    let e = batch.admit(&model, &request(&long, &[1], &params, None)).unwrap_err().to_string();
    assert!(e.contains("context"), "{e}");
    assert!(batch.is_empty());
}
