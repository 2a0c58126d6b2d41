//! SFT lowers the held-out loss, with LoRA and with full fine-tuning, and a fully fine-tuned model saves as a
//! checkpoint that loads back with the same outputs.

use engine::adapter::{LoraSpec, TargetModules};
use engine::train::optim::{AdamW, AdamWConfig};
use engine::train::sft::{sft_eval_loss, train_sft, SftConfig, SftExample, SftTarget};
use engine::Model;
use std::path::Path;

/// Questions about the image answered with a fixed pattern; train and held-out share the pattern, not the text.
fn data(model: &Model, questions: &[&str]) -> Vec<(Vec<u32>, Vec<u32>)> {
    let tok = engine::tokenizer::TextTokenizer::from_file(&model.dir.join("tokenizer.json")).unwrap();
    let image = model.image_token_id().unwrap();
    questions
        .iter()
        .map(|q| {
            let mut p = tok.encode("USER :", true).unwrap();
            p.push(image);
            p.extend(tok.encode(&format!("{q} ASSISTANT :"), false).unwrap());
            (p, tok.encode("there is a red circle and a blue square .", false).unwrap())
        })
        .collect()
}

#[test]
fn sft_lowers_held_out_loss_with_lora_and_full_fine_tuning() {
    let case = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llava/l15_4x_f32_gqa_tied_lora");
    let base = Model::load(&case.join("model")).unwrap();
    let px = base.load_image(&case.join("image.png")).unwrap();
    let train =
        data(&base, &["describe the image .", "what is in this picture ?", "show me the image .", "what do you see ?"]);
    let held = data(&base, &["describe this picture .", "what is there ?"]);
    let train_ex: Vec<SftExample> =
        train.iter().map(|(p, a)| SftExample { pixels: Some(&px), prompt_ids: p, answer_ids: a }).collect();
    let held_ex: Vec<SftExample> =
        held.iter().map(|(p, a)| SftExample { pixels: Some(&px), prompt_ids: p, answer_ids: a }).collect();
    let before = sft_eval_loss(&base, None, &held_ex).unwrap();
    let cfg = SftConfig { epochs: 10, batch_size: 2, seed: 1 };

    // LoRA.
    let mut model = Model::load(&case.join("model")).unwrap();
    let spec = LoraSpec {
        r: 4,
        lora_alpha: 8.0,
        target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into(), "down_proj".into()]),
        ..Default::default()
    };
    let mut adapter = model.create_adapter(&spec, 2).unwrap();
    let mut opt = AdamW::new(AdamWConfig { lr: 1e-2, total_steps: 20, warmup_steps: 1, ..Default::default() });
    let mut losses = Vec::new();
    train_sft(&mut model, SftTarget::Lora(&mut adapter), &train_ex, &cfg, &mut opt, None, |l| losses.push(l.loss))
        .unwrap();
    let lora_after = sft_eval_loss(&model, Some(&adapter), &held_ex).unwrap();
    println!(
        "LoRA: held-out loss {before:.3} -> {lora_after:.3}; train loss {:.3} -> {:.3}",
        losses[0],
        losses[losses.len() - 1]
    );
    assert!(lora_after < 0.5 * before, "LoRA SFT: {before} -> {lora_after}");

    // Full fine-tuning, then save and reload.
    let mut model = Model::load(&case.join("model")).unwrap();
    let mut opt = AdamW::new(AdamWConfig { lr: 3e-3, total_steps: 20, warmup_steps: 1, ..Default::default() });
    train_sft(&mut model, SftTarget::Full, &train_ex, &cfg, &mut opt, None, |_| {}).unwrap();
    let full_after = sft_eval_loss(&model, None, &held_ex).unwrap();
    println!("full: held-out loss {before:.3} -> {full_after:.3}");
    assert!(full_after < 0.5 * before, "full SFT: {before} -> {full_after}");
    let out = std::env::temp_dir().join(format!("rlaifd-sft-full-{}", std::process::id()));
    model.save_checkpoint(&out, &[]).unwrap();
    let reloaded = Model::load(&out).unwrap();
    assert_eq!(reloaded.layout.name, base.layout.name, "the checkpoint keeps its key layout");
    let ids: Vec<u32> = held[0].0.iter().chain(&held[0].1).copied().collect();
    let a = model.logprobs(&ids, Some(&px), None).unwrap();
    let b = reloaded.logprobs(&ids, Some(&px), None).unwrap();
    assert_eq!(a, b, "reloaded checkpoint gives the trained model's log-probs");
    std::fs::remove_dir_all(&out).unwrap();
}
