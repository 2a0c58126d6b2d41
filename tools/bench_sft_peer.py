"""PyTorch + transformers + peft side of benches/sft_cpu.sh: SFT (LoRA) training steps of a LLaVA checkpoint on
CPU, doing the same work as `rlaifd train-sft`.

Work per optimizer step (batch of B examples, gradient accumulation over single examples):
  for each example: vision tower + projector once under no_grad (frozen, no LoRA there), then forward of
  prompt (image token expanded to its patch rows) + answer with logits only on the answer's predicting positions
  (the prompt is masked), loss = sum of -log p(answer token) / (answer tokens in the batch), backward; then clip
  the global grad norm to 1, AdamW step (cosine schedule without warmup, as rlaifd's --warmup-ratio 0), zero
  grads. Prints one JSON line per step (`tokens_per_s` = answer tokens of the batch / step seconds, like rlaifd's)
  and a final summary line with peak RSS.
--eval-only: print the mean -log p per answer token over all examples under the fresh adapter (= the base model,
  LoRA B starts at 0) and exit; compared with rlaifd's `--eval` loss at step 0 (same-work check).

Usage: bench_sft_peer.py --model DIR --data data.jsonl [--threads 2] [--batch-size 4] [--attn sdpa|eager]
"""
import argparse
import json
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

t_start = time.perf_counter()
ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--data", required=True)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--batch-size", type=int, default=4)
ap.add_argument("--lr", type=float, default=1e-4)
ap.add_argument("--max-grad-norm", type=float, default=1.0)
ap.add_argument("--r", type=int, default=64)
ap.add_argument("--lora-alpha", type=float, default=16.0)
ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
ap.add_argument("--eval-only", action="store_true")
args = ap.parse_args()

torch.set_num_threads(args.threads)
torch.manual_seed(0)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lora_common import image_features as _image_features, load_lora_llava, read_items  # noqa: E402
from transformers import get_cosine_schedule_with_warmup  # noqa: E402

model, cfg, proc, n_img, img_tok = load_lora_llava(args.model, args.r, args.lora_alpha, args.attn)
n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
examples = read_items(args.data, proc, n_img, img_tok)


def image_features(pixels):
    return _image_features(model, cfg, pixels)


def answer_nll(prompt, answer, feats):
    """Sum over the answer tokens of -log p(token | prompt, image, earlier answer tokens); the prompt is masked."""
    ids = torch.tensor([prompt + answer])
    out = model(input_ids=ids, mm_encoder_outputs={"image": feats}, use_cache=False, logits_to_keep=len(answer) + 1)
    logits = out.logits[0, -(len(answer) + 1):-1]
    return F.cross_entropy(logits.float(), torch.tensor(answer), reduction="sum")


if args.eval_only:
    with torch.no_grad():
        nll = sum(answer_nll(e["prompt"], e["answer"], image_features(e["pixels"])).item() for e in examples)
    print(json.dumps({"eval_loss": nll / sum(len(e["answer"]) for e in examples), "examples": len(examples)}), flush=True)
    raise SystemExit(0)

params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
bs = args.batch_size
steps = (len(examples) + bs - 1) // bs
# rlaifd's schedule with --warmup-ratio 0: cosine decay to 0 over the run's steps, no warmup
sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=steps)
for s in range(steps):
    batch = examples[s * bs:(s + 1) * bs]
    t0 = time.perf_counter()
    tokens = sum(len(e["answer"]) for e in batch)
    w = 1.0 / tokens
    nll_sum = 0.0
    for e in batch:
        nll = answer_nll(e["prompt"], e["answer"], image_features(e["pixels"]))
        (nll * w).backward()
        nll_sum += nll.item()
    gn = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm) if args.max_grad_norm > 0 else torch.tensor(0.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    print(json.dumps({"step": s + 1, "total_steps": steps, "loss": nll_sum * w, "tokens": tokens, "grad_norm": float(gn),
                      "tokens_per_s": tokens / dt, "step_s": dt}), flush=True)

seq_len = len(examples[0]["prompt"]) + len(examples[0]["answer"])
print(json.dumps({
    "summary": True, "impl": f"pytorch+peft ({args.attn})",
    "steps": steps, "examples": len(examples), "trainable_params": n_train, "seq_len": seq_len,
    "total_s": time.perf_counter() - t_start,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    "threads": torch.get_num_threads(), "torch": torch.__version__,
    "transformers": __import__("transformers").__version__, "peft": __import__("peft").__version__,
}), flush=True)
