"""Writes a random-weight ~150M-parameter LLaVA checkpoint for the CPU benchmark (benches/llava_cpu.sh).

CLIP 6 layers x 512 on 224 px / 16 px patches (196 patches), LLaMA 12 layers x 768, vocab 32000.
Usage: make_bench_model.py OUT_DIR [--dtype float32|bfloat16|float16]
"""
import argparse
import json
import os

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
args = ap.parse_args()

torch.manual_seed(0)
text = dict(model_type="llama", vocab_size=32064, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=4096, rms_norm_eps=1e-5)
vision = dict(model_type="clip_vision_model", hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
              num_attention_heads=8, image_size=224, patch_size=16, hidden_act="quick_gelu")
cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_index=32000, vision_feature_layer=-2,
                  vision_feature_select_strategy="default", projector_hidden_act="gelu")
model = LlavaForConditionalGeneration(cfg).eval()
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0.0, 0.02)
model = model.to(getattr(torch, args.dtype))
model.save_pretrained(args.out, safe_serialization=True, max_shard_size="10GB")
pp = {"do_resize": True, "size": {"shortest_edge": 224}, "resample": 3, "do_center_crop": True,
      "crop_size": {"height": 224, "width": 224}, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
      "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
      "do_convert_rgb": True, "image_processor_type": "CLIPImageProcessor"}
with open(os.path.join(args.out, "preprocessor_config.json"), "w") as f:
    json.dump(pp, f, indent=2)
n = sum(p.numel() for p in model.parameters())
print(f"wrote {args.out}: {n / 1e6:.1f}M parameters, {args.dtype}")
