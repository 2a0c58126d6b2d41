"""Writes a random-weight ~150M-parameter checkpoint for the CPU benchmarks (benches/llava_cpu.sh,
benches/families_cpu.sh).

llava (default): CLIP 6 layers x 512 on 224 px / 16 px patches (196 patches), LLaMA 12 layers x 768, vocab 32064.
llava_next: the same tower, projector and decoder with anyres tiles (pinpoints 224x448 and 448x224).
qwen2_5_vl: a Qwen2.5-VL vision transformer 6 x 512 (14 px patches, 2x2 merge, 112 px windows, full attention in
blocks 2 and 5) and a Qwen2 decoder 12 x 768 (12 heads, 2 key/value heads, q/k/v biases, multimodal RoPE),
vocab 32064; its processor keeps 224x224 images at 224x224 (256 patches, 64 decoder rows).
Usage: make_bench_model.py OUT_DIR [--dtype float32|bfloat16|float16] [--family llava|llava_next|qwen2_5_vl]
"""
import argparse
import json
import os

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
ap.add_argument("--family", default="llava", choices=["llava", "llava_next", "qwen2_5_vl"])
args = ap.parse_args()

if args.family == "qwen2_5_vl":
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(0)
    text = dict(vocab_size=32064, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[8, 12, 12]))
    vision = dict(depth=6, hidden_size=512, intermediate_size=1536, num_heads=8, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, out_hidden_size=768, fullatt_block_indexes=[2, 5])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=32000, vision_start_token_id=32001,
                           vision_end_token_id=32002, video_token_id=32003)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    model = model.to(getattr(torch, args.dtype))
    model.save_pretrained(args.out, safe_serialization=True, max_shard_size="10GB")
    Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=224 * 224,
                             max_pixels=224 * 224).save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n / 1e6:.1f}M parameters, {args.dtype}")
    raise SystemExit(0)

torch.manual_seed(0)
text = dict(model_type="llama", vocab_size=32064, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=4096, rms_norm_eps=1e-5)
vision = dict(model_type="clip_vision_model", hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
              num_attention_heads=8, image_size=224, patch_size=16, hidden_act="quick_gelu")
if args.family == "llava_next":
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    cfg = LlavaNextConfig(text_config=text, vision_config=vision, image_token_index=32000, vision_feature_layer=-2,
                          vision_feature_select_strategy="default", projector_hidden_act="gelu",
                          image_grid_pinpoints=[[224, 448], [448, 224]])
    model = LlavaNextForConditionalGeneration(cfg).eval()
else:
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
if args.family == "llava_next":
    pp["image_processor_type"] = "LlavaNextImageProcessor"
    pp["image_grid_pinpoints"] = [[224, 448], [448, 224]]
with open(os.path.join(args.out, "preprocessor_config.json"), "w") as f:
    json.dump(pp, f, indent=2)
n = sum(p.numel() for p in model.parameters())
print(f"wrote {args.out}: {n / 1e6:.1f}M parameters, {args.dtype}")
