#!/usr/bin/env python3
"""Generate tiny LLaVA-1.5 / LLaMA parity fixtures for the rlaifd engine.

Run through tools/gen_fixtures.sh (creates the venv, pins threads and hash
seed).  Every case is a tiny random-weight model; the reference outputs are
computed with PyTorch + transformers + peft in float32 on the CPU (eager
attention).  16-bit cases compute from the 16-bit-ROUNDED weights upcast to
float32, which is what the Rust side does.

Output: <out>/<case>/{model/, adapter/?, image.png, expected.json,
expected.safetensors} and <out>/manifest.json.  Deterministic: running twice
gives byte-identical files (same library versions, same CPU).

Checkpoint key layouts written (renamed from the in-memory transformers names):
  4.x    language_model.model.* / language_model.lm_head.weight /
         vision_tower.vision_model.* / multi_modal_projector.*
  4.52   model.language_model.* / lm_head.weight /
         model.vision_tower.vision_model.* / model.multi_modal_projector.*
  5.x    as 4.52 but model.vision_tower.* (no vision_model. level)
  hybrid exactly what save_pretrained of the installed transformers (5.24)
         writes: language_model.model.* / language_model.lm_head.weight /
         vision_tower.* (no vision_model.) / multi_modal_projector.*
  llama  text-only LlamaForCausalLM: model.* / lm_head.weight
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shutil
import sys
import tempfile
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import peft
import tokenizers
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_common import (BOS, EOS, IMAGE_ID, PAD_ID, TOKENIZER_SIZE, UNK,  # noqa: E402
                            SlowCLIPImageProcessor, checkpoint_keys, compute_logprobs, deterministic_torch,
                            dir_size, expand_ids, fixture_pixel_values, forward_logits, load_model, model_inputs,
                            peft_saved, randomize_lora_, rename_adapter_key, rename_base_key, write_json)

VERSIONS = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "tokenizers": tokenizers.__version__}

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# ---------------------------------------------------------------------------------------------
# Shared tokenizer: <unk>=0 <s>=1 </s>=2, 61 words (3..63), <image>=64, <pad>=65  (66 tokens; the ids are
# defined in tools/fixture_common.py).
# Model vocab sizes are >= 66 (padded like llava-1.5's 32064 vs 32002 tokenizer entries).
# ---------------------------------------------------------------------------------------------
WORDS = [
    "USER", "ASSISTANT", ":", ".", ",", "?", "describe", "the", "image", "a", "an", "is", "there",
    "what", "in", "this", "picture", "color", "of", "and", "on", "left", "right", "top", "bottom",
    "red", "green", "blue", "yellow", "circle", "square", "triangle", "box", "shape", "small", "large",
    "see", "do", "you", "it", "yes", "no", "one", "two", "three", "many", "with", "near", "far",
    "bright", "dark", "line", "dot", "sky", "tree", "cat", "dog", "show", "me", "please", "here",
]
assert len(WORDS) == 61 and len(set(WORDS)) == 61 and 3 + len(WORDS) == IMAGE_ID


def build_tokenizer() -> Tokenizer:
    vocab = {"<unk>": UNK, "<s>": BOS, "</s>": EOS}
    for i, w in enumerate(WORDS):
        vocab[w] = 3 + i
    vocab["<image>"] = IMAGE_ID
    vocab["<pad>"] = PAD_ID
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ["<unk>", "<s>", "</s>", "<image>", "<pad>"]])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)])
    assert tok.get_vocab_size(with_added_tokens=True) == TOKENIZER_SIZE
    assert tok.token_to_id("<image>") == IMAGE_ID
    return tok


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------
ALL_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REGEX_TARGET = r".*language_model.*\.(q_proj|v_proj)"

CASES: list[dict[str, Any]] = [
    dict(
        name="l15_4x_f32_gqa_tied_lora",
        description="layout 4.x, f32 single file, GQA (kv=2), tied embeddings (signalled only in text_config, "
                    "4.x-style diff config), rope_theta 1e4, eps 1e-5, CLIP quick_gelu 3 layers, feature layer -2, "
                    "strategy default; LoRA r8/a16 on all 7 llama proj names (also hits CLIP q/k/v), old naming",
        layout="4.x", dtype="f32", sharded=False, config_style="4.x-diff", seed=1000,
        text=dict(vocab_size=96, hidden_size=32, intermediate_size=96, num_key_value_heads=2, tie=True,
                  rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=256),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                    image_size=28, patch_size=7, hidden_act="quick_gelu"),
        feature_layer=-2, strategy="default", image_wh=(37, 29),
        prompt="USER: <image>\ndescribe the image . is there a red circle ? ASSISTANT:",
        greedy_prompt="USER: <image>\nwhat color is the box ? ASSISTANT:",
        adapter=dict(r=8, lora_alpha=16, target_modules=ALL_LORA_TARGETS, use_rslora=False, naming="old",
                     dtype="f32"),
    ),
    dict(
        name="l15_452_f16_mqa_sharded_lora",
        description="layout 4.52, f16 sharded (2 files), MQA (kv=1), untied, rope_theta 5e5, eps 1e-6, CLIP gelu "
                    "4 layers/4 heads, image 32 patch 8, feature layer -3, strategy full (CLS kept); "
                    "LoRA r4/a16 with regex target (language q/v only), new naming (4.52: vision_model level)",
        layout="4.52", dtype="f16", sharded=True, config_style="4.x-diff", seed=2000,
        text=dict(vocab_size=72, hidden_size=48, intermediate_size=96, num_key_value_heads=1, tie=False,
                  rope_theta=500000.0, rms_norm_eps=1e-6, max_position_embeddings=512),
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                    image_size=32, patch_size=8, hidden_act="gelu"),
        feature_layer=-3, strategy="full", image_wh=(29, 41),
        prompt="USER: what is in this picture ? <image>\nshow me the shape . ASSISTANT:",
        greedy_prompt="USER: <image>\ndescribe the image . ASSISTANT:",
        adapter=dict(r=4, lora_alpha=16, target_modules=REGEX_TARGET, use_rslora=False, naming="new",
                     dtype="f32"),
    ),
    dict(
        name="l3rope_5x_bf16_mha_rslora",
        description="layout 5.x, bf16 single file, MHA (kv=4), untied, llama3 rope_scaling (theta 5e5, factor 8, "
                    "orig max pos 64, head_dim 16 so all three frequency bands occur), eps 1e-5, 5.x-style full "
                    "config (rope_parameters), CLIP gelu 2 layers, feature layer -1, strategy default; "
                    "rsLoRA r6/a16 on q_proj/v_proj/down_proj (also CLIP q/v), adapter saved in bf16, new naming",
        layout="5.x", dtype="bf16", sharded=False, config_style="5.x", seed=3000,
        text=dict(vocab_size=80, hidden_size=64, intermediate_size=128, num_key_value_heads=4, tie=False,
                  rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=512,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        vision=dict(hidden_size=40, intermediate_size=80, num_hidden_layers=2, num_attention_heads=2,
                    image_size=28, patch_size=7, hidden_act="gelu"),
        feature_layer=-1, strategy="default", image_wh=(33, 23),
        prompt="<image>\nUSER: is there a cat near the tree ? ASSISTANT: yes , it is",
        greedy_prompt="<image>\nUSER: what do you see ? ASSISTANT:",
        adapter=dict(r=6, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                     naming="new", dtype="bf16"),
    ),
    dict(
        name="l15_4x_f32_sharded_full",
        description="layout 4.x, f32 sharded (2 files), GQA (kv=2), untied, rope_theta 1e4, eps 1e-6, padded vocab "
                    "128, CLIP quick_gelu 3 layers/4 heads, image 32 patch 8, feature layer -3, strategy full; "
                    "no adapter",
        layout="4.x", dtype="f32", sharded=True, config_style="4.x-diff", seed=4000,
        text=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_key_value_heads=2, tie=False,
                  rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=256),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                    image_size=32, patch_size=8, hidden_act="quick_gelu"),
        feature_layer=-3, strategy="full", image_wh=(41, 31),
        prompt="USER: <image>\nwhat color is the large square on the left ? ASSISTANT:",
        greedy_prompt="USER: <image>\nis there a dog ? ASSISTANT:",
        adapter=None,
    ),
    dict(
        name="l15_5x_f16_tied_mqa",
        description="layout 5.x, f16 single file, MQA (kv=1), tied embeddings (5.x config: top-level AND "
                    "text_config tie_word_embeddings), no lm_head key, vocab 66 == tokenizer size, rope_theta 1e4, "
                    "eps 1e-5, CLIP gelu 2 layers/4 heads, feature layer -1, strategy full; no adapter",
        layout="5.x", dtype="f16", sharded=False, config_style="5.x", seed=5000,
        text=dict(vocab_size=66, hidden_size=32, intermediate_size=64, num_key_value_heads=1, tie=True,
                  rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=256),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=28, patch_size=7, hidden_act="gelu"),
        feature_layer=-1, strategy="full", image_wh=(30, 45),
        prompt="USER: <image>\nshow me the small dot , please . ASSISTANT:",
        greedy_prompt="USER: <image>\ndescribe this picture . ASSISTANT:",
        adapter=None,
    ),
    dict(
        name="l15_452_f32_sparse_config",
        description="layout 4.52, f32 single file, SPARSE config like early llava-hf (no num_key_value_heads -> MHA, "
                    "no rope_theta -> 1e4, no rms_norm_eps -> 1e-6, no hidden_act, no vision hidden_act -> "
                    "quick_gelu, no layer_norm_eps, no vision_feature_layer -> -2, no strategy -> default, no "
                    "projector_hidden_act -> gelu, no tie flag -> untied, junk vision vocab_size); no adapter",
        layout="4.52", dtype="f32", sharded=False, config_style="sparse", seed=6000,
        text=dict(vocab_size=96, hidden_size=32, intermediate_size=80, num_key_value_heads=4, tie=False,
                  rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=2048),
        vision=dict(hidden_size=36, intermediate_size=72, num_hidden_layers=3, num_attention_heads=2,
                    image_size=28, patch_size=7, hidden_act="quick_gelu"),
        feature_layer=-2, strategy="default", image_wh=(45, 34),
        prompt="USER: <image>\ndo you see a blue line on the top ? ASSISTANT: no",
        greedy_prompt="USER: <image>\nwhat shape is it ? ASSISTANT:",
        adapter=None,
    ),
    dict(
        name="native_save_f32_sharded_lora",
        description="layout 'hybrid' = exactly what save_pretrained of the installed transformers writes "
                    "(language_model.model.*, language_model.lm_head, vision_tower.* without vision_model.), "
                    "f32 sharded by save_pretrained, GQA (kv=2), untied, rope_theta 1e6, eps 1e-5, 5.x config, "
                    "CLIP gelu 3 layers, feature layer -2, strategy default; LoRA r4/a8 on q/k/v/o_proj "
                    "(also CLIP q/k/v) exactly as peft saves it (new naming)",
        layout="hybrid", dtype="f32", sharded=True, config_style="5.x", seed=7000,
        text=dict(vocab_size=80, hidden_size=32, intermediate_size=64, num_key_value_heads=2, tie=False,
                  rope_theta=1000000.0, rms_norm_eps=1e-5, max_position_embeddings=256),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                    image_size=28, patch_size=7, hidden_act="gelu"),
        feature_layer=-2, strategy="default", image_wh=(26, 39),
        prompt="USER: <image>\nis the sky bright and blue ? ASSISTANT: the sky is",
        greedy_prompt="USER: <image>\nshow me the tree . ASSISTANT:",
        adapter=dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_rslora=False,
                     naming="new", dtype="f32"),
    ),
    dict(
        name="l15_4x_bf16_gqa_rslora_old",
        description="layout 4.x, bf16 single file, GQA (kv=2), untied, rope_theta 5e5, eps 1e-5, CLIP quick_gelu "
                    "3 layers/3 heads, image 32 patch 8, feature layer -2, strategy full; rsLoRA r8/a16 on all 7 "
                    "llama proj names (also CLIP q/k/v), old naming",
        layout="4.x", dtype="bf16", sharded=False, config_style="4.x-diff", seed=8000,
        text=dict(vocab_size=96, hidden_size=48, intermediate_size=128, num_key_value_heads=2, tie=False,
                  rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=512),
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
                    image_size=32, patch_size=8, hidden_act="quick_gelu"),
        feature_layer=-2, strategy="full", image_wh=(43, 30),
        prompt="USER: <image>\nhere is one yellow triangle and a green dot . what is it ? ASSISTANT:",
        greedy_prompt="USER: <image>\nis it a cat ? ASSISTANT:",
        adapter=dict(r=8, lora_alpha=16, target_modules=ALL_LORA_TARGETS, use_rslora=True, naming="old",
                     dtype="f32"),
    ),
    dict(
        name="llama_text_only",
        description="text-only LlamaForCausalLM (model.*, lm_head.weight), f32 single file, GQA (kv=2), untied, "
                    "llama3 rope in the LEGACY config form (top-level rope_theta 5e5 + rope_scaling, like "
                    "Llama-3.1 repos; head_dim 8, orig max pos 256 so all three frequency bands occur), eps 1e-6; "
                    "no image, no adapter",
        layout="llama", dtype="f32", sharded=False, config_style="4.x-full", seed=9000,
        text=dict(vocab_size=72, hidden_size=32, intermediate_size=80, num_key_value_heads=2, tie=False,
                  rope_theta=500000.0, rms_norm_eps=1e-6, max_position_embeddings=2048,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 256}),
        vision=None, feature_layer=None, strategy=None, image_wh=None,
        prompt="USER: describe a red circle and a blue square . ASSISTANT: there is a",
        greedy_prompt="USER: what color is the sky ? ASSISTANT:",
        adapter=None,
    ),
]

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
MAX_NEW_TOKENS = 10
MIN_MARGIN = 1e-2  # we want top1-top2 logit gaps well above float noise (brief requires > 1e-3)
MAX_SEED_TRIES = 200


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def num_image_patches(case) -> int:
    v = case["vision"]
    n = (v["image_size"] // v["patch_size"]) ** 2
    return n + 1 if case["strategy"] == "full" else n


def make_text_config(case) -> LlamaConfig:
    t = case["text"]
    rope = {"rope_type": "default", "rope_theta": t["rope_theta"]}
    if t.get("rope_scaling"):
        rope = dict(t["rope_scaling"], rope_theta=t["rope_theta"])
    return LlamaConfig(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=t["num_key_value_heads"],
        max_position_embeddings=t["max_position_embeddings"], rms_norm_eps=t["rms_norm_eps"],
        tie_word_embeddings=t["tie"], rope_parameters=rope, bos_token_id=BOS, eos_token_id=EOS,
        pad_token_id=None,
    )


def make_config(case):
    tc = make_text_config(case)
    if case["vision"] is None:
        tc.architectures = ["LlamaForCausalLM"]
        return tc
    v = case["vision"]
    vc = CLIPVisionConfig(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                          num_hidden_layers=v["num_hidden_layers"], num_attention_heads=v["num_attention_heads"],
                          image_size=v["image_size"], patch_size=v["patch_size"], hidden_act=v["hidden_act"],
                          layer_norm_eps=1e-5)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_ID,
                      image_seq_length=num_image_patches(case), projector_hidden_act="gelu",
                      vision_feature_layer=case["feature_layer"],
                      vision_feature_select_strategy=case["strategy"], tie_word_embeddings=case["text"]["tie"])
    cfg.architectures = ["LlavaForConditionalGeneration"]
    return cfg


def build_model(case, cfg):
    cls = LlamaForCausalLM if case["vision"] is None else LlavaForConditionalGeneration
    model = cls._from_config(cfg, attn_implementation="eager")
    return model.eval()


def init_weights(model, gen: torch.Generator, case):
    """Deterministic re-init with larger scales than HF's 0.02 so tiny random models give varied outputs."""
    tied = case["text"]["tie"]
    head_std = 0.35
    special_rows = [UNK, BOS, EOS, IMAGE_ID, PAD_ID] + list(range(TOKENIZER_SIZE, case["text"]["vocab_size"]))
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied params appear once
            def rn(*shape):
                return torch.randn(*shape, generator=gen, dtype=torch.float32)
            if name.endswith("class_embedding"):
                p.copy_(rn(p.shape) * 0.5)
            elif p.ndim == 1 and name.endswith(".weight"):  # RMSNorm / LayerNorm scales
                p.copy_(1.0 + 0.1 * rn(p.shape))
            elif p.ndim == 1 and name.endswith(".bias"):
                p.copy_(0.05 * rn(p.shape))
            elif "embed_tokens" in name:
                if tied:  # this matrix is also the LM head
                    p.copy_(rn(p.shape) * head_std * math.sqrt(32 / p.shape[1]) * 0.6)  # small: avoids self-repeat
                    p[special_rows] *= 0.25
                else:
                    p.copy_(rn(p.shape))
            elif "position_embedding" in name:
                p.copy_(rn(p.shape) * 0.5)
            elif name.endswith("lm_head.weight"):
                p.copy_(rn(p.shape) * head_std * math.sqrt(32 / p.shape[1]))
                p[special_rows] *= 0.25
            else:
                fan_in = p[0].numel()
                gain = 1.6 if re.search(r"\.(q_proj|k_proj)\.weight$", name) else 1.0
                p.copy_(rn(p.shape) * gain / math.sqrt(fan_in))


def round_params_(module, dtype):
    if dtype == torch.float32:
        return
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(dtype).to(torch.float32))


def make_image(case, seed) -> Image.Image:
    w, h = case["image_wh"]
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3), dtype=np.float64)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (xx / max(w - 1, 1) * rng.uniform(0.3, 1.0) + yy / max(h - 1, 1) * rng.uniform(0.3, 1.0))[..., None]
    t = t / t.max()
    img += c0 * (1 - t) + c1 * t
    for _ in range(6):
        x0, y0 = rng.integers(0, w - 4), rng.integers(0, h - 4)
        x1, y1 = x0 + rng.integers(3, w // 2), y0 + rng.integers(3, h // 2)
        img[y0:y1, x0:x1] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), mode="RGB")


def preprocessor_config(S: int) -> dict:
    return {
        "crop_size": {"height": S, "width": S},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": S},
    }


def manual_pixel_values(img: Image.Image, S: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Independent re-implementation (PIL bicubic on uint8, center crop, rescale, normalize) as a cross-check."""
    w, h = img.size
    if w <= h:
        nw, nh = S, int(S * h / w)
    else:
        nw, nh = int(S * w / h), S
    r = np.asarray(img.convert("RGB").resize((nw, nh), resample=Image.BICUBIC)).astype(np.float32)
    top, left = (nh - S) // 2, (nw - S) // 2
    r = r[top:top + S, left:left + S]
    r = r * np.float32(1 / 255)
    r = (r - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return r.transpose(2, 0, 1), (nh, nw)


@torch.no_grad()
def compute_greedy(model, prompt_ids, pv, n_img):
    """Reference greedy by full recompute each step; cross-checked against model.generate (KV cache)."""
    exp, _ = expand_ids(prompt_ids, n_img)
    new, margins = [], []
    for _ in range(MAX_NEW_TOKENS):
        logits = forward_logits(model, exp + new, pv)[-1]
        top = torch.topk(logits, 2)
        margins.append(float(top.values[0] - top.values[1]))
        new.append(int(top.indices[0]))
    kw = model_inputs(exp, pv, generation_config=GenerationConfig(
        do_sample=False, max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=0, eos_token_id=None, pad_token_id=PAD_ID,
        bos_token_id=BOS))
    g = model.generate(**kw)[0, len(exp):].tolist()
    assert g == new, f"generate() {g} != recompute greedy {new}"
    return new, margins


def greedy_ok(tokens, margins) -> str | None:
    if len(set(tokens)) < 4:
        return f"too few distinct tokens {tokens}"
    bad = [t for t in tokens if t in (UNK, BOS, EOS, IMAGE_ID, PAD_ID) or t >= TOKENIZER_SIZE]
    if bad:
        return f"greedy produced special/padded ids {bad}"
    if min(margins) < MIN_MARGIN:
        return f"near tie (min margin {min(margins):.2e})"
    return None


# ----- key layouts (rename_base_key / rename_adapter_key: tools/fixture_common.py) ----------------------
def write_safetensors_checkpoint(sd: dict[str, torch.Tensor], out_dir: str, sharded: bool, metadata_extra=None):
    keys = sorted(sd)
    if not sharded:
        save_file({k: sd[k].contiguous() for k in keys}, os.path.join(out_dir, "model.safetensors"),
                  metadata={"format": "pt"})
        return ["model.safetensors"]
    sizes = [sd[k].numel() * sd[k].element_size() for k in keys]
    total, acc, cut = sum(sizes), 0, len(keys)
    for i, s in enumerate(sizes):
        if acc >= total / 2:
            cut = i
            break
        acc += s
    shards = [keys[:cut], keys[cut:]]
    assert all(shards)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    wm = {}
    for name, ks in zip(names, shards):
        save_file({k: sd[k].contiguous() for k in ks}, os.path.join(out_dir, name), metadata={"format": "pt"})
        wm.update({k: name for k in ks})
    index = {"metadata": {"total_size": total, **(metadata_extra or {})}, "weight_map": dict(sorted(wm.items()))}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return names


# ----- config styles -------------------------------------------------------------------------
LLAMA_4X_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, hidden_act="silu",
                         max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True,
                         pad_token_id=None, bos_token_id=1, eos_token_id=2, pretraining_tp=1,
                         tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=None, attention_bias=False,
                         attention_dropout=0.0, mlp_bias=False, head_dim=128)
CLIP_4X_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12,
                        num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                        hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0, initializer_range=0.02,
                        initializer_factor=1.0)
LLAVA_4X_DEFAULTS = dict(ignore_index=-100, image_token_index=32000, projector_hidden_act="gelu",
                         vision_feature_select_strategy="default", vision_feature_layer=-2, image_seq_length=576,
                         multimodal_projector_bias=True, tie_word_embeddings=False)
DTYPE_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def _rope_to_legacy(tc: dict) -> dict:
    tc = dict(tc)
    rp = tc.pop("rope_parameters", None) or {}
    tc["rope_theta"] = rp.get("rope_theta", 10000.0)
    rest = {k: v for k, v in rp.items() if k != "rope_theta"}
    tc["rope_scaling"] = rest if rest.get("rope_type", "default") != "default" else None
    return tc


def _diff(d: dict, defaults: dict, keep=("model_type",)) -> dict:
    return {k: v for k, v in d.items() if k in keep or k not in defaults or defaults[k] != v}


def config_4x_style(full: dict, case, sparse: bool) -> dict:
    """Emulate what transformers 4.x wrote (to_diff_dict: only non-default fields, torch_dtype, rope_theta/
    rope_scaling).  sparse=True drops even more, like the early llava-hf repos."""
    d = copy.deepcopy(full)
    d.pop("dtype", None)
    d.pop("transformers_version", None)
    tc = _rope_to_legacy(d.pop("text_config"))
    tc.pop("dtype", None)
    vc = d.pop("vision_config")
    tc = _diff(tc, LLAMA_4X_DEFAULTS)
    vc = _diff(vc, CLIP_4X_DEFAULTS)
    top = _diff(d, LLAVA_4X_DEFAULTS, keep=("model_type", "architectures"))
    top.pop("tie_word_embeddings", None)  # 4.x LLaVA read the tie flag from text_config only
    if sparse:
        for k in ("num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "hidden_act", "max_position_embeddings"):
            if k in tc:
                assert k != "num_key_value_heads" or tc[k] == tc["num_attention_heads"]
                tc.pop(k)
        tc["architectures"] = ["LlamaForCausalLM"]
        tc["_name_or_path"] = "tiny-vicuna"
        vc.pop("hidden_act", None)
        vc.pop("layer_norm_eps", None)
        vc["vocab_size"] = 32000  # junk key present in the real llava-1.5-*-hf configs
        vc["projection_dim"] = 768
        for k in ("vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act",
                  "multimodal_projector_bias", "image_seq_length"):
            top.pop(k, None)
        top.update(ignore_index=-100, pad_token_id=PAD_ID, vocab_size=case["text"]["vocab_size"],
                   tie_word_embeddings=False)
        top["transformers_version"] = "4.36.0.dev0"
    else:
        top["transformers_version"] = "4.46.2" if case["layout"] == "4.x" else "4.52.4"
    tc["torch_dtype"] = DTYPE_NAMES[case["dtype"]]
    top["text_config"] = dict(sorted(tc.items()))
    top["vision_config"] = dict(sorted(vc.items()))
    top["torch_dtype"] = DTYPE_NAMES[case["dtype"]]
    return dict(sorted(top.items()))


# ---------------------------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------------------------
def try_seed(case, seed, tok):
    cfg = make_config(case)
    model = build_model(case, cfg)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    init_weights(model, gen, case)
    dt = DTYPES[case["dtype"]]
    round_params_(model, dt)
    model.eval()

    text_only = case["vision"] is None
    n_img = 0 if text_only else num_image_patches(case)
    ids = tok.encode(case["prompt"]).ids
    gids = tok.encode(case["greedy_prompt"]).ids
    assert ids.count(IMAGE_ID) == (0 if text_only else 1) and gids.count(IMAGE_ID) == (0 if text_only else 1)
    assert UNK not in ids and UNK not in gids, (case["prompt"], ids)

    res: dict[str, Any] = dict(model=model, cfg=cfg, ids=ids, gids=gids, n_img=n_img, seed=seed)
    pv = None
    if not text_only:
        S = case["vision"]["image_size"]
        img = make_image(case, seed)
        proc = SlowCLIPImageProcessor(**{k: v for k, v in preprocessor_config(S).items()
                                         if k != "image_processor_type"})
        pv = proc(images=img, return_tensors="pt")["pixel_values"].float()
        assert pv.shape == (1, 3, S, S), pv.shape
        man, resized_hw = manual_pixel_values(img, S)
        pv_manual_diff = float(np.abs(man - pv[0].numpy()).max())
        assert pv_manual_diff < 1e-5, pv_manual_diff
        res.update(img=img, pv=pv, resized_hw=resized_hw, pv_manual_diff=pv_manual_diff)
        with torch.no_grad():
            vo = model.model.vision_tower(pv, output_hidden_states=True)
            hs = [h[0].float().clone() for h in vo.hidden_states]
            assert len(hs) == case["vision"]["num_hidden_layers"] + 1
            feats = model.model.get_image_features(
                pixel_values=pv, vision_feature_layer=case["feature_layer"],
                vision_feature_select_strategy=case["strategy"]).pooler_output[0].float()
            sel = hs[case["feature_layer"]]
            if case["strategy"] == "default":
                sel = sel[1:]
            manual = model.model.multi_modal_projector(sel)
            assert torch.allclose(manual, feats, atol=1e-6)
            assert feats.shape == (n_img, case["text"]["hidden_size"])
        res.update(vision_hs=hs, image_features=feats)

    res["logprobs"], res["logits"] = compute_logprobs(model, ids, pv, n_img)
    res["greedy"], res["margins"] = compute_greedy(model, gids, pv, n_img)
    why = greedy_ok(res["greedy"], res["margins"])
    if why:
        return None, why

    ad = case["adapter"]
    if ad:
        pm = get_peft_model(copy.deepcopy(model), LoraConfig(
            r=ad["r"], lora_alpha=ad["lora_alpha"], target_modules=ad["target_modules"], lora_dropout=0.0,
            use_rslora=ad["use_rslora"], init_lora_weights=True))
        scaling = ad["lora_alpha"] / (math.sqrt(ad["r"]) if ad["use_rslora"] else ad["r"])
        randomize_lora_(pm, torch.Generator().manual_seed(seed + 1), ad["r"], scaling)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(p.to(DTYPES[ad["dtype"]]).float())
        pm.eval()
        res["pm"] = pm
        res["logprobs_adapter"], res["logits_adapter"] = compute_logprobs(pm, ids, pv, n_img)
        res["greedy_adapter"], res["margins_adapter"] = compute_greedy(pm, gids, pv, n_img)
        why = greedy_ok(res["greedy_adapter"], res["margins_adapter"])
        if why:
            return None, "adapter: " + why
        dl = max(abs(a - b) for a, b in zip(res["logprobs"], res["logprobs_adapter"]))
        if dl < 0.2:
            return None, f"adapter changes logprobs too little ({dl:.3f})"
        if res["greedy_adapter"] == res["greedy"]:
            return None, "adapter greedy == base greedy"
        res["adapter_max_logprob_delta"] = dl
        if not text_only:
            with torch.no_grad():
                res["image_features_adapter"] = pm.base_model.model.model.get_image_features(
                    pixel_values=pv, vision_feature_layer=case["feature_layer"],
                    vision_feature_select_strategy=case["strategy"]).pooler_output[0].float()
    return res, None


def save_case(case, res, out_root, tok_json: str):
    name = case["name"]
    cdir = os.path.join(out_root, name)
    mdir = os.path.join(cdir, "model")
    os.makedirs(mdir)
    model, layout, dt = res["model"], case["layout"], DTYPES[case["dtype"]]
    tied = case["text"]["tie"]

    # What save_pretrained of the installed transformers writes (config + key names), from a 16-bit copy.
    with tempfile.TemporaryDirectory() as tmp:
        m16 = copy.deepcopy(model).to(dt)
        total = sum(v.numel() * v.element_size() for v in m16.state_dict().values())
        m16.save_pretrained(tmp, max_shard_size=int(total * 0.6) if case["sharded"] else "50GB")
        native_cfg = json.load(open(os.path.join(tmp, "config.json")))
        gen_cfg = json.load(open(os.path.join(tmp, "generation_config.json")))
        native_keys = checkpoint_keys(tmp)
        if layout == "hybrid":  # keep exactly what save_pretrained wrote
            for fn in os.listdir(tmp):
                if fn.endswith(".safetensors") or fn.endswith(".index.json"):
                    shutil.copy(os.path.join(tmp, fn), mdir)

    sd = {k: v.detach().to(dt).clone() for k, v in model.state_dict().items()}
    if tied:
        sd.pop("lm_head.weight", None)
    expected_native = sorted(rename_base_key(k, "hybrid" if case["vision"] else "llama") for k in sd)
    assert native_keys == expected_native, (set(native_keys) ^ set(expected_native))
    if layout != "hybrid":
        write_safetensors_checkpoint({rename_base_key(k, layout): v for k, v in sd.items()}, mdir, case["sharded"],
                                     metadata_extra={"total_parameters": sum(v.numel() for v in sd.values())})
    keys = checkpoint_keys(mdir)
    if tied:
        assert not any("lm_head" in k for k in keys)
    shard_files = sorted(f for f in os.listdir(mdir) if f.endswith(".safetensors"))
    assert (len(shard_files) == 2) == case["sharded"], shard_files

    if case["config_style"] == "5.x":
        cfg_json = native_cfg
    elif case["config_style"] == "4.x-full":  # flat LlamaForCausalLM config, all fields, legacy rope/dtype keys
        cfg_json = _rope_to_legacy(native_cfg)
        cfg_json["torch_dtype"] = DTYPE_NAMES[case["dtype"]]
        cfg_json.pop("dtype", None)
        cfg_json["transformers_version"] = "4.43.1"
    else:
        cfg_json = config_4x_style(native_cfg, case, sparse=case["config_style"] == "sparse")
    write_json(os.path.join(mdir, "config.json"), cfg_json)
    write_json(os.path.join(mdir, "generation_config.json"), gen_cfg)
    with open(os.path.join(mdir, "tokenizer.json"), "w") as f:
        f.write(tok_json)

    tensors = {"logits": res["logits"].contiguous()}
    if case["vision"] is not None:
        S = case["vision"]["image_size"]
        write_json(os.path.join(mdir, "preprocessor_config.json"), preprocessor_config(S))
        res["img"].save(os.path.join(cdir, "image.png"), optimize=False, compress_level=9)
        tensors["pixel_values"] = res["pv"][0].contiguous()
        tensors["image_features"] = res["image_features"].contiguous()
        for i, h in enumerate(res["vision_hs"]):
            tensors[f"vision_hidden_states.{i}"] = h.contiguous()

    adapter_info = None
    ad = case["adapter"]
    if ad:
        tensors["logits_adapter"] = res["logits_adapter"].contiguous()
        if "image_features_adapter" in res:
            tensors["image_features_adapter"] = res["image_features_adapter"].contiguous()
        adir = os.path.join(cdir, "adapter")
        acfg, asd = peft_saved(res["pm"])
        os.makedirs(adir)
        # the hybrid case keeps the adapter exactly as peft wrote it (5.x in-memory names)
        renamed = {rename_adapter_key(k, "5.x" if layout == "hybrid" else layout): v.to(DTYPES[ad["dtype"]])
                   for k, v in asd.items()}
        save_file(dict(sorted(renamed.items())), os.path.join(adir, "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        if isinstance(acfg.get("target_modules"), list):
            acfg["target_modules"] = sorted(acfg["target_modules"])
        acfg["base_model_name_or_path"] = "../model"
        if acfg.get("auto_mapping"):
            acfg["auto_mapping"] = dict(acfg["auto_mapping"])
        write_json(os.path.join(adir, "adapter_config.json"), acfg)
        mods = sorted({re.sub(r"\.lora_[AB]\.weight$", "", k)[len("base_model.model."):] for k in renamed})
        adapter_info = dict(r=ad["r"], lora_alpha=ad["lora_alpha"], use_rslora=ad["use_rslora"],
                            scaling=ad["lora_alpha"] / (math.sqrt(ad["r"]) if ad["use_rslora"] else ad["r"]),
                            naming=ad["naming"], key_layout=layout, dtype=ad["dtype"],
                            target_modules=ad["target_modules"], modules_with_lora=mods,
                            vision_modules_with_lora=[m for m in mods if "vision_tower" in m])
        assert (ad["naming"] == "old") == any(k.startswith("base_model.model.language_model.model.")
                                              for k in renamed)

    save_file(dict(sorted(tensors.items())), os.path.join(cdir, "expected.safetensors"), metadata={"format": "pt"})

    exp: dict[str, Any] = {
        "case": name,
        "description": case["description"],
        "layout": layout,
        "config_style": case["config_style"],
        "dtype": case["dtype"],
        "sharded": case["sharded"],
        "seed": res["seed"],
        "image_token_id": None if case["vision"] is None else IMAGE_ID,
        "num_image_patches": res["n_img"],
        "prompt": case["prompt"],
        "input_ids": res["ids"],
        "logprobs": res["logprobs"],
        "greedy": {"prompt": case["greedy_prompt"], "prompt_ids": res["gids"], "max_new_tokens": MAX_NEW_TOKENS,
                   "tokens": res["greedy"], "margins": res["margins"]},
        "greedy_min_margin": min(res["margins"]),
        "adapter": adapter_info,
        "tied": tied,
        "knobs": {
            "text": {k: v for k, v in case["text"].items() if k != "tie"} | {"num_attention_heads": 4,
                                                                                "num_hidden_layers": 2},
            "vision": case["vision"],
            "vision_feature_layer": case["feature_layer"],
            "vision_feature_select_strategy": case["strategy"],
        },
        "checkpoint_keys_sample": [k for k in keys if re.search(r"(embed_tokens|lm_head|patch_embedding|"
                                                                r"linear_1\.weight|layers\.0\.self_attn\.q_proj\.weight)",
                                                                k)],
        "versions": VERSIONS,
    }
    if case["vision"] is not None:
        exp["image"] = {"width": case["image_wh"][0], "height": case["image_wh"][1],
                        "resized_hw": list(res["resized_hw"]), "crop": case["vision"]["image_size"],
                        "manual_preprocess_max_abs_diff": res["pv_manual_diff"]}
    if ad:
        exp["logprobs_adapter"] = res["logprobs_adapter"]
        exp["greedy_adapter"] = {"prompt": case["greedy_prompt"], "prompt_ids": res["gids"],
                                 "max_new_tokens": MAX_NEW_TOKENS, "tokens": res["greedy_adapter"],
                                 "margins": res["margins_adapter"]}
        exp["greedy_adapter_min_margin"] = min(res["margins_adapter"])
        exp["adapter_max_logprob_delta"] = res["adapter_max_logprob_delta"]
    write_json(os.path.join(cdir, "expected.json"), exp)
    return exp


# ---------------------------------------------------------------------------------------------
# verification by reloading from disk
# ---------------------------------------------------------------------------------------------
def verify_case(case, out_root, tok) -> dict:
    cdir = os.path.join(out_root, case["name"])
    mdir = os.path.join(cdir, "model")
    exp = json.load(open(os.path.join(cdir, "expected.json")))
    report = {}
    t2 = Tokenizer.from_file(os.path.join(mdir, "tokenizer.json"))
    assert t2.encode(exp["prompt"]).ids == exp["input_ids"]
    assert t2.encode(exp["greedy"]["prompt"]).ids == exp["greedy"]["prompt_ids"]

    model = load_model(mdir, case["vision"] is None)
    pv = None if case["vision"] is None else fixture_pixel_values(mdir, cdir)
    lps, _ = compute_logprobs(model, exp["input_ids"], pv, exp["num_image_patches"])
    report["reload_base_maxdiff"] = max(abs(a - b) for a, b in zip(lps, exp["logprobs"]))
    assert report["reload_base_maxdiff"] < 1e-5, report
    g, _ = compute_greedy(model, exp["greedy"]["prompt_ids"], pv, exp["num_image_patches"])
    assert g == exp["greedy"]["tokens"]
    if exp["adapter"]:
        try:
            pm = PeftModel.from_pretrained(model, os.path.join(cdir, "adapter"))
            pm.eval()
            loaded = {n for n, _ in pm.named_parameters() if "lora_A" in n}
            lps, _ = compute_logprobs(pm, exp["input_ids"], pv, exp["num_image_patches"])
            d = max(abs(a - b) for a, b in zip(lps, exp["logprobs_adapter"]))
            report["reload_adapter_maxdiff"] = d
            report["reload_adapter_modules"] = len(loaded)
            report["reload_adapter_ok"] = d < 1e-5
        except Exception as e:  # noqa: BLE001 - reported, not fatal (old naming may not load in new peft)
            report["reload_adapter_ok"] = False
            report["reload_adapter_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return report


# ---------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                                  "fixtures", "llava"))
    ap.add_argument("--only", nargs="*", help="case names (default: all)")
    ap.add_argument("--no-verify", action="store_true")
    args = ap.parse_args()

    deterministic_torch()
    out_root = os.path.abspath(args.out)
    cases = [c for c in CASES if not args.only or c["name"] in args.only]
    if not args.only and os.path.isdir(out_root):
        shutil.rmtree(out_root)
    os.makedirs(out_root, exist_ok=True)

    tok = build_tokenizer()
    tok_json = tok.to_str(pretty=True) + "\n"

    rows = []
    for case in cases:
        cdir = os.path.join(out_root, case["name"])
        if os.path.isdir(cdir):
            shutil.rmtree(cdir)
        res = None
        for k in range(MAX_SEED_TRIES):
            seed = case["seed"] + k
            res, why = try_seed(case, seed, tok)
            if res is not None:
                break
            print(f"  {case['name']}: seed {seed} rejected: {why}", file=sys.stderr)
        if res is None:
            raise SystemExit(f"{case['name']}: no acceptable seed")
        exp = save_case(case, res, out_root, tok_json)
        rep = {} if args.no_verify else verify_case(case, out_root, tok)
        exp_path = os.path.join(cdir, "expected.json")
        if rep:
            exp = json.load(open(exp_path))
            exp["reload_check"] = rep
            write_json(exp_path, exp)
        rows.append((case, exp, rep, dir_size(cdir)))

    manifest = {
        "description": "Tiny random-weight LLaVA-1.5 / LLaMA parity fixtures generated by tools/gen_fixtures.py "
                       "(regenerate with tools/gen_fixtures.sh). Reference outputs computed in float32 on CPU.",
        "versions": VERSIONS,
        "tokenizer": {"size": TOKENIZER_SIZE, "bos": BOS, "eos": EOS, "unk": UNK, "image": IMAGE_ID, "pad": PAD_ID},
        "cases": [{"name": c["name"], "layout": c["layout"], "config_style": c["config_style"], "dtype": c["dtype"],
                   "sharded": c["sharded"], "adapter": bool(c["adapter"]),
                   "adapter_naming": c["adapter"]["naming"] if c["adapter"] else None,
                   "text_only": c["vision"] is None, "description": c["description"]}
                  for c, _, _, _ in rows],
    }
    if args.only:
        old = os.path.join(out_root, "manifest.json")
        if os.path.exists(old):
            prev = json.load(open(old))
            names = {c["name"] for c in manifest["cases"]}
            manifest["cases"] = [c for c in prev["cases"] if c["name"] not in names] + manifest["cases"]
            order = [c["name"] for c in CASES]
            manifest["cases"].sort(key=lambda c: order.index(c["name"]) if c["name"] in order else 999)
    write_json(os.path.join(out_root, "manifest.json"), manifest)

    print(f"\nversions: {VERSIONS}")
    hdr = f"{'case':32} {'layout':6} {'dtype':5} {'shard':5} {'kv':>2} {'tie':3} {'feat':>4} {'strat':7} " \
          f"{'act':10} {'adapter':22} {'seed':>5} {'margin':>7} {'reload':7} {'size':>8}"
    print(hdr)
    print("-" * len(hdr))
    for c, e, rep, sz in rows:
        a = c["adapter"]
        ad = f"{a['naming']} r{a['r']}/{a['lora_alpha']}{' rs' if a['use_rslora'] else ''}" if a else "-"
        if a and rep:
            ad += " ok" if rep.get("reload_adapter_ok") else " NOLOAD"
        rl = "-" if not rep else ("ok" if rep["reload_base_maxdiff"] < 1e-5 else "FAIL")
        print(f"{c['name']:32} {c['layout']:6} {c['dtype']:5} {str(c['sharded']):5} "
              f"{c['text']['num_key_value_heads']:>2} {'y' if c['text']['tie'] else 'n':3} "
              f"{str(c['feature_layer']) if c['feature_layer'] else '-':>4} {c['strategy'] or '-':7} "
              f"{c['vision']['hidden_act'] if c['vision'] else '-':10} {ad:22} {e['seed']:>5} "
              f"{e['greedy_min_margin']:7.3f} {rl:7} {sz / 1024:7.1f}K")
    print(f"total size of {out_root}: {dir_size(out_root) / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
