#!/usr/bin/env python3
"""Generate tiny LLaVA-NeXT (LlavaNextForConditionalGeneration) parity fixtures for the rlaifd engine.

Run through tools/gen_next_fixtures.sh (the venv, pinned threads and hash seed).  Every case is a tiny
random-weight model saved by transformers' own save_pretrained, then (for the older layouts) with its keys
renamed; the references are computed by transformers in float32 with eager attention on the CPU:

  image.png                 the case's image (a size that forces resizing, padding and several tiles)
  expected.safetensors      pixel_values (tiles, 3, S, S) from LlavaNextImageProcessorPil, exactly
  expected.json             ids (the image token once), the image's feature count after packing, and the log-prob
                            of every scored id (transformers expands the image token to the feature count)

Key layouts: "native" is what save_pretrained of the installed transformers writes (language_model.model.*,
vision_tower.* without vision_model, image_newline at top level); "4.x" adds vision_model.; "4.52" puts everything
under model.* with lm_head.weight at top level.  Output: <out>/<case>/ and <out>/manifest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import transformers
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_common import (BOS, IMAGE_ID, build_cases, compute_logprobs, deterministic_torch,  # noqa: E402
                            expand, make_image, model_inputs, randomize_lora_, write_dpo_grad_fixture, write_json)

PINS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]

CASES = [
    # name, layout, text knobs, image (width, height), vision_feature_layer
    dict(name="next_native_f32_gqa", layout="native", text=dict(num_key_value_heads=2), image=(90, 50), layer=-2,
         grad="next_native_f32_gqa_lora"),
    dict(name="next_4x_f32_tied_mha", layout="4.x", text=dict(num_key_value_heads=4, tie_word_embeddings=True),
         image=(40, 70), layer=-1),
    dict(name="next_452_f32_llama3rope", layout="4.52",
         text=dict(num_key_value_heads=1, rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                                              low_freq_factor=1.0, high_freq_factor=4.0,
                                                              original_max_position_embeddings=64)),
         image=(100, 100), layer=-2),
    dict(name="next_native_f32_small_image", layout="native", text=dict(num_key_value_heads=2), image=(21, 13),
         layer=-2),
    dict(name="next_native_f32_tall3", layout="native", text=dict(num_key_value_heads=2), image=(30, 95), layer=-2),
    # LLaVA-NeXT-Mistral: a Mistral decoder without a sliding window (Mistral-7B-Instruct-v0.2's sliding_window: null).
    dict(name="next_native_f32_mistral", layout="native", text=dict(num_key_value_heads=2), image=(64, 48), layer=-2,
         mistral=True),
    # Mistral v0.1-style: every layer attends its last 7 positions (the image's features alone are longer).
    dict(name="next_native_f32_mistral_window", layout="native", text=dict(num_key_value_heads=2), image=(50, 40),
         layer=-2, mistral=True, window=7, grad="next_native_f32_mistral_window_lora"),
]


def rename(k: str, layout: str) -> str:
    if layout == "native":
        return k
    if layout == "4.x":
        return "vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k
    if layout == "4.52":
        for a, b in [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.", "model.vision_tower.vision_model."),
                     ("multi_modal_projector.", "model.multi_modal_projector."),
                     ("image_newline", "model.image_newline")]:
            if k.startswith(a):
                return b + k[len(a):]
        return k
    raise ValueError(layout)


def build(case: dict, out: str, seed: int) -> dict:
    torch.manual_seed(seed)
    text = dict(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=512, initializer_range=0.1)
    text.update(case["text"])
    tie = text.pop("tie_word_embeddings", False)
    if case.get("mistral"):
        from transformers import MistralConfig
        tc = MistralConfig(**text, tie_word_embeddings=tie, sliding_window=case.get("window"), rope_theta=1e6)
    else:
        tc = LlamaConfig(**text, tie_word_embeddings=tie)
    vc = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                          image_size=32, patch_size=8, initializer_range=0.1)
    cfg = LlavaNextConfig(text_config=tc, vision_config=vc, image_token_index=IMAGE_ID, image_grid_pinpoints=PINS,
                          vision_feature_layer=case["layer"], tie_word_embeddings=tie)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # CLIP initialises small; widen everything so the parity check has signal
        for i, (n, p) in enumerate(sorted(model.named_parameters())):
            if "norm" not in n and "layrnorm" not in n:
                p.normal_(0.0, 0.15, generator=torch.Generator().manual_seed(seed * 1000 + i))
    proc = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                      image_grid_pinpoints=PINS)
    case_dir = os.path.join(out, case["name"])
    shutil.rmtree(case_dir, ignore_errors=True)
    mdir = os.path.join(case_dir, "model")
    os.makedirs(mdir)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        sd = load_file(os.path.join(tmp, "model.safetensors"))
        for f in ("config.json", "generation_config.json"):
            shutil.copy(os.path.join(tmp, f), mdir)
    save_file({rename(k, case["layout"]): v.contiguous() for k, v in sorted(sd.items())},
              os.path.join(mdir, "model.safetensors"), metadata={"format": "pt"})
    proc.save_pretrained(mdir)
    # The word-level tokenizer of tools/gen_fixtures.py (<image> = 64 there too), so the CLI can run these models.
    shutil.copy(os.path.join(out, "..", "llava", "l15_4x_f32_gqa_tied_lora", "model", "tokenizer.json"), mdir)
    # The reference: the saved model reloaded (no missing or unexpected keys) in float32, eager attention.
    ref, info = LlavaNextForConditionalGeneration.from_pretrained(
        mdir if case["layout"] == "native" else tmp_native(model), dtype=torch.float32,
        attn_implementation="eager", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ref.eval()
    w, h = case["image"]
    img = make_image(w, h, seed)
    img.save(os.path.join(case_dir, "image.png"))
    enc = proc(images=Image.open(os.path.join(case_dir, "image.png")), return_tensors="pt")
    pv, sizes = enc["pixel_values"].float(), enc["image_sizes"]
    save_file({"pixel_values": pv[0].contiguous()}, os.path.join(case_dir, "expected.safetensors"))
    with torch.no_grad():
        feats = ref.model.get_image_features(pixel_values=pv, image_sizes=sizes)
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    n_img = int(feats[0].shape[0])
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(3, 60, (12,), generator=g).tolist()
    ids = [BOS] + words[:3] + [IMAGE_ID] + words[3:]
    lps, _ = compute_logprobs(ref, ids, pv, n_img, image_sizes=sizes)
    exp = dict(ids=ids, n_image_features=n_img, tiles=int(pv.shape[1]), image_size=[h, w], logprobs=lps,
               layout=case["layout"], versions=dict(torch=torch.__version__, transformers=transformers.__version__))
    write_json(os.path.join(case_dir, "expected.json"), exp)
    if case.get("grad"):
        grad_case(case, ref, case_dir, os.path.join(out, "..", "grad", case["grad"]), pv, sizes, n_img, seed)
    return dict(name=case["name"], layout=case["layout"], tiles=exp["tiles"], n_image_features=n_img)


def answer_logps(model, prompt_ids, ans_ids, pv, sizes, n_img):
    full = expand(prompt_ids + ans_ids, n_img)
    p = len(expand(prompt_ids, n_img))
    logits = model(**model_inputs(full, pv, image_sizes=sizes, use_cache=False)).logits[0].float()
    lsm = torch.log_softmax(logits[p - 1:p - 1 + len(ans_ids)], dim=-1)
    return lsm.gather(1, torch.tensor(ans_ids)[:, None])[:, 0]


def grad_case(case, ref, case_dir, grad_dir, pv, sizes, n_img, seed, beta=0.1):
    """A DPO gradient fixture in the format of tests/fixtures/grad/ (engine/tests/grad_parity.rs): peft LoRA on the
    decoder's and the CLIP tower's q/v projections (every tile goes through the LoRA'd tower) and on the projector,
    two pairs over the case's image, the loss and the LoRA gradients by autograd."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "linear_1"], lora_dropout=0.0)
    pm = get_peft_model(ref, lcfg)
    randomize_lora_(pm, torch.Generator().manual_seed(seed + 7), 4, 2.0)
    g = torch.Generator().manual_seed(seed + 11)
    rnd = lambda n: torch.randint(3, 60, (n,), generator=g).tolist()  # noqa: E731
    pairs = [dict(prompt_ids=[BOS] + rnd(2) + [IMAGE_ID] + rnd(3), chosen_ids=rnd(5), rejected_ids=rnd(4)),
             dict(prompt_ids=[BOS] + rnd(4) + [IMAGE_ID] + rnd(2), chosen_ids=rnd(3), rejected_ids=rnd(6))]
    write_dpo_grad_fixture(
        pm, pairs, lambda m, p, a: answer_logps(m, p, a, pv, sizes, n_img), case_dir, grad_dir, case["grad"], n_img,
        "loss = mean_pairs -logsigmoid(beta*((pi_c-ref_c)-(pi_r-ref_r))); LLaVA-NeXT anyres image "
        "(image_sizes passed), pi = base+LoRA, ref = adapter disabled; f32, eval, eager attention", beta)
    pm.unload()


_native_dirs: list = []


def tmp_native(model) -> str:
    """A native save of `model` for the reference (older layouts are not transformers' own on-disk names)."""
    d = tempfile.mkdtemp()
    _native_dirs.append(d)
    model.save_pretrained(d)
    return d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*", help="build just these cases (the manifest keeps the others)")
    args = ap.parse_args()
    deterministic_torch()
    manifest = build_cases(CASES, args.out, 1000, build, args.only)
    for d in _native_dirs:
        shutil.rmtree(d, ignore_errors=True)
    print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
