//! `rlaifd bench`: prefill and decode speed of a checkpoint on random inputs (benches/llava_cpu.sh runs it
//! beside transformers on the same checkpoint).

use anyhow::{Context, Result};
use engine::generate::{generate_with_stats, GenerateRequest};
use engine::image::PixelValues;
use engine::rng::SplitMix64;
use engine::sampling::SamplingParams;
use engine::Model;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct BenchArgs {
    #[arg(long)]
    model: PathBuf,
    /// Text tokens in the prompt, BOS included (the image adds its patches on top).
    #[arg(long, default_value_t = 33)]
    prompt_tokens: usize,
    /// Greedy tokens decoded after the prefill.
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Answers decoded together (sharing the prompt prefix).
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Timed repetitions; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Widen 16-bit weights to f32 at load.
    #[arg(long)]
    f32_weights: bool,
    /// An image file, preprocessed by the model's own processor (needed for LLaVA-NeXT's tiles and Qwen2-VL's
    /// patches); without it a LLaVA-1.5 model gets random pixel values at the tower's size.
    #[arg(long)]
    image: Option<PathBuf>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(a: BenchArgs) -> Result<()> {
    let t = std::time::Instant::now();
    let opts = engine::LoadOptions { keep_16bit: !a.f32_weights };
    let model = Model::load_with(&a.model, &opts).with_context(|| format!("loading {}", a.model.display()))?;
    let load_s = t.elapsed().as_secs_f64();
    let mut ids: Vec<u32> = vec![1];
    let pixels = match (&a.image, model.config.llava()) {
        (Some(path), _) => {
            let image = model.image_token_id().context("--image for a text-only model")?;
            match model.config.qwen_vl() {
                Some(q) => ids.extend([q.vision_start_token_id, image, q.vision_end_token_id]),
                None => ids.push(image),
            }
            Some(model.load_image(path).with_context(|| format!("--image {}", path.display()))?)
        }
        (None, Some(lc)) => {
            ids.push(lc.image_token_id);
            let s = lc.vision.image_size;
            let mut rng = SplitMix64::new(0);
            let data = (0..3 * s * s).map(|_| (rng.next_f64() * 4.0 - 2.0) as f32).collect();
            Some(PixelValues::single(data, 3, s, s))
        }
        (None, None) => None,
    };
    ids.extend((0..a.prompt_tokens.saturating_sub(1)).map(|i| 100 + i as u32));
    let seeds: Vec<u64> = (0..a.n.max(1) as u64).collect();
    let params = SamplingParams { temperature: 0.0, max_new_tokens: a.new_tokens + 1, ..Default::default() };
    let req = GenerateRequest { ids: &ids, pixels: pixels.as_ref(), seeds: &seeds, params, stop_ids: vec![u32::MAX] };
    generate_with_stats(
        &model,
        &GenerateRequest { params: SamplingParams { max_new_tokens: 2, ..req.params.clone() }, ..req.clone() },
        None,
    )?;
    let (mut pre, mut dec) = (Vec::new(), Vec::new());
    let mut positions = 0;
    for _ in 0..a.runs.max(1) {
        let (_, st) = generate_with_stats(&model, &req, None)?;
        positions = st.prompt_positions;
        pre.push(st.prompt_positions as f64 / st.prefill_s);
        dec.push(st.decode_tokens as f64 / st.decode_s);
    }
    println!(
        "{}",
        serde_json::json!({
            "impl": "rlaifd",
            "weights": model.llm.layers.first().map(|_| model.weight_dtype()).unwrap_or("f32"),
            "prefill_tokens": positions,
            "prefill_tok_s": median(pre),
            "decode_tok_s": median(dec),
            "answers": a.n.max(1),
            "threads": rayon::current_num_threads(),
            "load_s": load_s,
        })
    );
    Ok(())
}
