"""transformers side of benches/llava_cpu.sh and benches/families_cpu.sh: prefill and decode tokens/s of a LLaVA,
LLaVA-NeXT or Qwen2.5-VL checkpoint on CPU.

Prefill = vision tower + projector + decoder over the whole prompt (image expanded), last-position logits only.
Decode = greedy single-sequence steps with the KV cache. With --image, the image goes through the model's own
PIL processor first (not timed); without, LLaVA gets random pixel values. Prints one JSON line.
"""
import argparse
import json
import time

import torch
from transformers import LlavaForConditionalGeneration

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--prompt-tokens", type=int, default=33)
ap.add_argument("--new-tokens", type=int, default=64)
ap.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
ap.add_argument("--image", default=None)
args = ap.parse_args()

torch.set_num_threads(args.threads)
dtype = getattr(torch, args.compute_dtype)
arch = json.load(open(f"{args.model}/config.json"))["architectures"][0]
text_ids = [1] + [100 + i for i in range(args.prompt_tokens - 1)]
extra = {}
if arch == "Qwen2_5_VLForConditionalGeneration":
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.model, dtype=dtype,
                                                               attn_implementation="sdpa").eval()
    cfg = model.config
    enc = Qwen2VLImageProcessorPil.from_pretrained(args.model)(images=Image.open(args.image), return_tensors="pt")
    pixels, extra["image_grid_thw"] = enc["pixel_values"].to(dtype), enc["image_grid_thw"]
    n_img = int(enc["image_grid_thw"][0].prod()) // cfg.vision_config.spatial_merge_size ** 2
    ids = ([text_ids[0], cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id]
           + text_ids[1:])
    extra["mm_token_type_ids"] = (torch.tensor([ids]) == cfg.image_token_id).int()
elif arch == "LlavaNextForConditionalGeneration":
    from PIL import Image
    from transformers import LlavaNextForConditionalGeneration
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    model = LlavaNextForConditionalGeneration.from_pretrained(args.model, dtype=dtype,
                                                              attn_implementation="sdpa").eval()
    cfg = model.config
    enc = LlavaNextImageProcessorPil.from_pretrained(args.model)(images=Image.open(args.image), return_tensors="pt")
    pixels, extra["image_sizes"] = enc["pixel_values"].to(dtype), enc["image_sizes"]
    with torch.inference_mode():
        n_img = int(model.model.get_image_features(pixel_values=pixels, image_sizes=enc["image_sizes"])
                    .pooler_output[0].shape[0])
    ids = [text_ids[0]] + [cfg.image_token_index] * n_img + text_ids[1:]
else:
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa").eval()
    cfg = model.config
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    ids = [text_ids[0]] + [cfg.image_token_index] * n_img + text_ids[1:]
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=g).to(dtype)
input_ids = torch.tensor([ids])

with torch.inference_mode():
    # warm-up
    model(input_ids=input_ids, pixel_values=pixels, use_cache=True, logits_to_keep=1, **extra)
    if hasattr(model.model, "rope_deltas"):  # a fresh request: positions computed again in the timed prefill
        model.model.rope_deltas = None
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, pixel_values=pixels, use_cache=True, logits_to_keep=1, **extra)
    t1 = time.perf_counter()
    past = out.past_key_values
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    t2 = time.perf_counter()
    for _ in range(args.new_tokens):
        out = model(input_ids=tok, past_key_values=past, use_cache=True)
        past = out.past_key_values
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    t3 = time.perf_counter()
print(json.dumps({"impl": f"transformers {args.compute_dtype}", "prefill_tokens": len(ids),
                  "prefill_tok_s": len(ids) / (t1 - t0), "decode_tok_s": args.new_tokens / (t3 - t2),
                  "torch": torch.__version__, "threads": torch.get_num_threads()}))
