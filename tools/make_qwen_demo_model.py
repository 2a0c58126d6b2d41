#!/usr/bin/env python3
"""Build a tiny Qwen2.5-VL checkpoint that speaks ShapesWorld, for running `rlaifd demo --model DIR` on the
Qwen family: the Qwen2 decoder takes the trained LLaMA decoder of assets/shapes-base (same blocks; q/k/v biases
zero; for text rows multimodal RoPE is plain RoPE), the vision transformer and merger are random (seeded), the
tokenizer is ShapesWorld's.  The loop runs on it; its image understanding starts from nothing.

Usage: tools/run_fixture_gen.sh make_qwen_demo_model.py tests/fixtures/qwen_vl/shapes_qwen25 (the committed copy,
which daemon/tests/families.rs runs the demo on)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil


def main() -> None:
    out = sys.argv[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = os.path.join(root, "assets", "shapes-base")
    bc = json.load(open(os.path.join(base, "config.json")))
    t = bc["text_config"]
    torch.manual_seed(0)
    text = dict(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
                num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
                num_key_value_heads=t["num_key_value_heads"], max_position_embeddings=t["max_position_embeddings"],
                rms_norm_eps=t["rms_norm_eps"], bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                rope_parameters=dict(rope_type="default", rope_theta=t["rope_theta"], mrope_section=[4, 4, 4]))
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=32, out_hidden_size=t["hidden_size"], fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=bc["image_token_index"],
                           vision_start_token_id=3, vision_end_token_id=3, video_token_id=0,
                           tie_word_embeddings=False)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        sd = load_file(os.path.join(tmp, "model.safetensors"))
        for f in ("config.json", "generation_config.json"):
            shutil.copy(os.path.join(tmp, f), out)
    trained = load_file(os.path.join(base, "model.safetensors"))
    for k, v in trained.items():
        if k.startswith("model.language_model."):
            sd["model." + k[len("model.language_model."):]] = v
        elif k == "lm_head.weight":
            sd[k] = v
    for k in sd:
        if k.startswith("model.layers.") and k.endswith("_proj.bias"):
            sd[k] = torch.zeros_like(sd[k])
    save_file({k: v.contiguous() for k, v in sorted(sd.items())}, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=64 * 64,
                             max_pixels=64 * 64).save_pretrained(out)
    shutil.copy(os.path.join(base, "tokenizer.json"), out)
    print(out)


if __name__ == "__main__":
    main()
