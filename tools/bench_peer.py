"""transformers side of benches/llava_cpu.sh: prefill and decode tokens/s of a LLaVA checkpoint on CPU.

Prefill = vision tower + projector + decoder over the whole prompt (image expanded), last-position logits only.
Decode = greedy single-sequence steps with the KV cache. Prints one JSON line.
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
args = ap.parse_args()

torch.set_num_threads(args.threads)
dtype = getattr(torch, args.compute_dtype)
model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa").eval()
cfg = model.config
n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
text_ids = [1] + [100 + i for i in range(args.prompt_tokens - 1)]
ids = [text_ids[0]] + [cfg.image_token_index] * n_img + text_ids[1:]
input_ids = torch.tensor([ids])
g = torch.Generator().manual_seed(0)
pixels = torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=g).to(dtype)

with torch.inference_mode():
    # warm-up
    model(input_ids=input_ids, pixel_values=pixels, use_cache=True, logits_to_keep=1)
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, pixel_values=pixels, use_cache=True, logits_to_keep=1)
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
