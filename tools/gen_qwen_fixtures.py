#!/usr/bin/env python3
"""Generate tiny Qwen2-VL / Qwen2.5-VL parity fixtures for the rlaifd engine.

Run through tools/gen_qwen_fixtures.sh (the venv, pinned threads and hash seed).  Every case is a tiny
random-weight model saved by transformers' own save_pretrained, then (for the 4.52 layout) with its keys renamed;
the references are computed by transformers in float32 with eager attention on the CPU:

  image.png                 the case's image (a size that forces smart_resize up or down)
  expected.safetensors      pixel_values (patches, 3*T*P*P) from Qwen2VLImageProcessorPil, exactly
  expected.json             ids (vision start, the image token once, vision end), image_grid_thw, the image's feature
                            count, the log-prob of every scored id (transformers expands the image token and computes
                            the multimodal rope positions itself), and greedy tokens after the prompt

Key layouts: "native" is what save_pretrained of the installed transformers writes, the layout of the Qwen/Qwen2-VL
and Qwen2.5-VL repositories too (model.*, visual.*, lm_head); "4.52" is transformers' in-memory naming since 4.52
(model.language_model.*, model.visual.*, lm_head), which some conversions save.  Output: <out>/<case>/ and <out>/manifest.json.
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
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_common import (BOS, build_cases, deterministic_torch, make_image, randomize_lora_,  # noqa: E402
                            write_dpo_grad_fixture, write_json)

IMAGE_ID, VSTART, VEND = 64, 65, 66
PATCH, MERGE, TEMPORAL = 4, 2, 2
MIN_PIXELS, MAX_PIXELS = 8 * 8 * 4, 8 * 8 * 30

DECODER = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# LoRA through the whole image path too: every linear layer of the vision blocks and the merger.
VISION_AND_DECODER = (r".*(language_model.*\.(q_proj|v_proj)|visual\.blocks\.\d+\.(attn\.qkv|attn\.proj|"
                      r"mlp\.(gate_proj|up_proj|down_proj|fc1|fc2))|visual\.merger\.mlp\.(0|2))")

CASES = [
    # name, version, layout, text knobs, image (width, height)
    dict(name="qwen25_native_f32_gqa", version="2.5", layout="native", text=dict(num_key_value_heads=2),
         image=(61, 43), grad="qwen25_native_f32_gqa_lora"),
    dict(name="qwen25_452_f32_tied", version="2.5", layout="4.52", text=dict(num_key_value_heads=4,
                                                                            tie_word_embeddings=True),
         image=(120, 90)),
    dict(name="qwen25_native_f32_tall", version="2.5", layout="native", text=dict(num_key_value_heads=1),
         image=(20, 70), grad="qwen25_native_f32_tall_vision_lora", grad_targets=VISION_AND_DECODER),
    dict(name="qwen2_native_f32_gqa", version="2", layout="native", text=dict(num_key_value_heads=2),
         image=(13, 11), grad="qwen2_native_f32_gqa_vision_lora", grad_targets=VISION_AND_DECODER),
    dict(name="qwen2_452_f32_wide", version="2", layout="4.52", text=dict(num_key_value_heads=2), image=(90, 33)),
    # Qwen2's sliding window: layers from max_window_layers on (here the second of two) attend their last 6 positions.
    dict(name="qwen25_native_f32_window", version="2.5", layout="native",
         text=dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=6, max_window_layers=1),
         image=(40, 40), grad="qwen25_native_f32_window_lora"),
    dict(name="qwen2_native_f32_window", version="2", layout="native",
         text=dict(num_key_value_heads=4, use_sliding_window=True, sliding_window=5, max_window_layers=0),
         image=(30, 20)),
]


def rename(k: str, layout: str) -> str:
    if layout == "native":
        return k
    if layout == "4.52":
        for a, b in [("model.", "model.language_model."), ("visual.", "model.visual.")]:
            if k.startswith(a):
                return b + k[len(a):]
        return k
    raise ValueError(layout)


def build(case: dict, out: str, seed: int) -> dict:
    torch.manual_seed(seed)
    text = dict(vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=512, initializer_range=0.1,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))
    text.update(case["text"])
    tie = text.pop("tie_word_embeddings", False)
    ids = dict(image_token_id=IMAGE_ID, vision_start_token_id=VSTART, vision_end_token_id=VEND,
               video_token_id=67)
    if case["version"] == "2.5":
        vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=PATCH,
                      spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, window_size=16, out_hidden_size=64,
                      fullatt_block_indexes=[1], initializer_range=0.1)
        cfg = Qwen2_5_VLConfig(text_config=dict(**text, tie_word_embeddings=tie), vision_config=vision,
                               tie_word_embeddings=tie, **ids)
        cls = Qwen2_5_VLForConditionalGeneration
    else:
        vision = dict(depth=2, embed_dim=32, mlp_ratio=2, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE,
                      temporal_patch_size=TEMPORAL, hidden_size=64, initializer_range=0.1)
        cfg = Qwen2VLConfig(text_config=dict(**text, tie_word_embeddings=tie), vision_config=vision,
                            tie_word_embeddings=tie, **ids)
        cls = Qwen2VLForConditionalGeneration
    model = cls(cfg).eval()
    with torch.no_grad():  # widen everything so the parity check has signal
        for i, (n, p) in enumerate(sorted(model.named_parameters())):
            if "norm" not in n and "ln_q" not in n:
                p.normal_(0.0, 0.15, generator=torch.Generator().manual_seed(seed * 1000 + i))
            elif p.dim() == 1:
                p.normal_(1.0, 0.1, generator=torch.Generator().manual_seed(seed * 1000 + i))
    proc = Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL,
                                    min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
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
        # The word-level tokenizer of tools/gen_fixtures.py, so the CLI can run these models.
        shutil.copy(os.path.join(out, "..", "llava", "l15_4x_f32_gqa_tied_lora", "model", "tokenizer.json"), mdir)
        ref, info = cls.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager",
                                        output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ref.eval()
    w, h = case["image"]
    img = make_image(w, h, seed)
    img.save(os.path.join(case_dir, "image.png"))
    enc = proc(images=Image.open(os.path.join(case_dir, "image.png")), return_tensors="pt")
    pv, grid = enc["pixel_values"].float(), enc["image_grid_thw"]
    save_file({"pixel_values": pv.contiguous(), "image_grid_thw": grid.contiguous()},
              os.path.join(case_dir, "expected.safetensors"))
    n_img = int(grid[0].prod()) // (MERGE * MERGE)
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(3, 60, (12,), generator=g).tolist()
    ids_ = [BOS] + words[:3] + [VSTART, IMAGE_ID, VEND] + words[3:]
    full = []
    for t in ids_:
        full.extend([t] * n_img if t == IMAGE_ID else [t])
    rows, r = [], 0
    for t in ids_:
        rows.append(r)
        r += n_img if t == IMAGE_ID else 1
    x = torch.tensor([full])
    mm = (x == IMAGE_ID).int()
    with torch.no_grad():
        logits = ref(input_ids=x, attention_mask=torch.ones_like(x), pixel_values=pv, image_grid_thw=grid,
                     mm_token_type_ids=mm).logits[0].float()
    lsm = torch.log_softmax(logits, dim=-1)
    lps = [float(lsm[rows[j] - 1, ids_[j]]) for j in range(1, len(ids_)) if ids_[j] != IMAGE_ID]
    # Greedy continuation of the prompt (the last 4 words dropped), through transformers' generate (its cache and
    # rope deltas), eos never stops it.
    prompt = ids_[:-4]
    pfull = []
    for t in prompt:
        pfull.extend([t] * n_img if t == IMAGE_ID else [t])
    px = torch.tensor([pfull])
    with torch.no_grad():
        gen = ref.generate(input_ids=px, attention_mask=torch.ones_like(px), pixel_values=pv, image_grid_thw=grid,
                           mm_token_type_ids=(px == IMAGE_ID).int(), max_new_tokens=8, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    greedy = gen[0, len(pfull):].tolist()
    exp = dict(ids=ids_, n_image_features=n_img, image_grid_thw=grid[0].tolist(), image_size=[h, w], logprobs=lps,
               prompt=prompt, greedy=greedy, layout=case["layout"], version=case["version"],
               versions=dict(torch=torch.__version__, transformers=transformers.__version__))
    write_json(os.path.join(case_dir, "expected.json"), exp)
    if case.get("grad"):
        grad_case(case, ref, case_dir, os.path.join(out, "..", "grad", case["grad"]), pv, grid, n_img, seed)
    return dict(name=case["name"], version=case["version"], layout=case["layout"], grid=grid[0].tolist(),
                n_image_features=n_img)


def expand(ids: list, n_img: int) -> list:
    out = []
    for t in ids:
        out.extend([t] * n_img if t == IMAGE_ID else [t])
    return out


def answer_logps(model, prompt_ids, ans_ids, pv, grid, n_img):
    full = expand(prompt_ids + ans_ids, n_img)
    p = len(expand(prompt_ids, n_img))
    x = torch.tensor([full])
    logits = model(input_ids=x, attention_mask=torch.ones_like(x), pixel_values=pv, image_grid_thw=grid,
                   mm_token_type_ids=(x == IMAGE_ID).int(), use_cache=False).logits[0].float()
    lsm = torch.log_softmax(logits[p - 1:p - 1 + len(ans_ids)], dim=-1)
    return lsm.gather(1, torch.tensor(ans_ids)[:, None])[:, 0]


def grad_case(case, ref, case_dir, grad_dir, pv, grid, n_img, seed, beta=0.1):
    """A DPO gradient fixture in the format of tests/fixtures/grad/ (engine/tests/grad_parity.rs): peft LoRA on the
    Qwen2 decoder's attention and MLP projections, or (grad_targets) on the decoder's q/v and every linear layer of
    the vision transformer and the merger, two pairs over the case's image, the loss and the LoRA gradients by
    autograd."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=case.get("grad_targets", DECODER))
    pm = get_peft_model(ref, lcfg)
    randomize_lora_(pm, torch.Generator().manual_seed(seed + 7), 4, 2.0)
    g = torch.Generator().manual_seed(seed + 11)
    rnd = lambda n: torch.randint(3, 60, (n,), generator=g).tolist()  # noqa: E731
    pairs = [dict(prompt_ids=[BOS] + rnd(2) + [VSTART, IMAGE_ID, VEND] + rnd(3), chosen_ids=rnd(5),
                  rejected_ids=rnd(4)),
             dict(prompt_ids=[BOS] + rnd(4) + [VSTART, IMAGE_ID, VEND] + rnd(2), chosen_ids=rnd(3),
                  rejected_ids=rnd(6))]
    write_dpo_grad_fixture(
        pm, pairs, lambda m, p, a: answer_logps(m, p, a, pv, grid, n_img), case_dir, grad_dir, case["grad"], n_img,
        "loss = mean_pairs -logsigmoid(beta*((pi_c-ref_c)-(pi_r-ref_r))); Qwen2.5-VL image (grid and "
        "mm_token_type_ids passed, multimodal RoPE), pi = base+LoRA, ref = adapter disabled; f32, eval, "
        "eager attention", beta)
    pm.unload()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*", help="build just these cases (the manifest keeps the others)")
    args = ap.parse_args()
    deterministic_torch()
    manifest = build_cases(CASES, args.out, 2000, build, args.only)
    print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
