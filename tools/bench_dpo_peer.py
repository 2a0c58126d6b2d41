"""PyTorch + transformers + peft side of benches/dpo_cpu.sh: DPO (sigmoid) LoRA training steps of a LLaVA
checkpoint on CPU, doing the same work as `rlaifd train-dpo`.

Work per optimizer step (batch of B pairs, gradient accumulation over single pairs):
  for each pair: vision tower + projector once under no_grad (frozen, no LoRA there), then forward of chosen and
  rejected (prompt with the image token expanded to its patch rows + answer; logits only on the answer's
  predicting positions), DPO loss / B, backward; then clip the global grad norm to 1, AdamW step, zero grads.
Reference log-probs are computed with the adapter disabled before timing. Prints one JSON line per step
(`pairs_per_s` = batch pairs / step seconds, like rlaifd's) and a final summary line with peak RSS.

Usage: bench_dpo_peer.py --model DIR --pairs pairs.jsonl [--threads 2] [--batch-size 4] [--attn sdpa|eager]
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
ap.add_argument("--pairs", required=True)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--batch-size", type=int, default=4)
ap.add_argument("--lr", type=float, default=1e-5)
ap.add_argument("--beta", type=float, default=0.1)
ap.add_argument("--r", type=int, default=64)
ap.add_argument("--lora-alpha", type=float, default=16.0)
ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
ap.add_argument("--full-logits", action="store_true",
                help="lm_head over every position (as TRL's DPOTrainer does) instead of the answer positions only")
args = ap.parse_args()

torch.set_num_threads(args.threads)
torch.manual_seed(0)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lora_common import image_features as _image_features, load_lora_llava, read_items  # noqa: E402

model, cfg, proc, n_img, img_tok = load_lora_llava(args.model, args.r, args.lora_alpha, args.attn)
n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
pairs = read_items(args.pairs, proc, n_img, img_tok)


def image_features(pixels):
    return _image_features(model, cfg, pixels)


def answer_logp(prompt, answer, feats):
    """Sum of log p(answer | prompt, image) under the current model (grad enabled if the caller's is)."""
    ids = torch.tensor([prompt + answer])
    keep = 0 if args.full_logits else len(answer) + 1
    out = model(input_ids=ids, mm_encoder_outputs={"image": feats}, use_cache=False, logits_to_keep=keep)
    logits = out.logits[0, -(len(answer) + 1):-1]
    lp = F.log_softmax(logits.float(), dim=-1)
    return lp.gather(1, torch.tensor(answer)[:, None]).sum()


t0 = time.perf_counter()
refs = []
with torch.no_grad(), model.disable_adapter():
    for p in pairs:
        f = image_features(p["pixels"])
        refs.append((answer_logp(p["prompt"], p["chosen"], f).item(), answer_logp(p["prompt"], p["rejected"], f).item()))
t_refs = time.perf_counter() - t0

params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
bs = args.batch_size
steps = (len(pairs) + bs - 1) // bs
rates = []
for s in range(steps):
    batch = list(range(s * bs, min((s + 1) * bs, len(pairs))))
    t0 = time.perf_counter()
    w = 1.0 / len(batch)
    loss_sum = 0.0
    lc_sum = 0.0
    for i in batch:
        p = pairs[i]
        f = image_features(p["pixels"])
        pc = answer_logp(p["prompt"], p["chosen"], f)
        pr = answer_logp(p["prompt"], p["rejected"], f)
        z = args.beta * ((pc - refs[i][0]) - (pr - refs[i][1]))
        loss = -F.logsigmoid(z) * w
        loss.backward()
        loss_sum += loss.item()
        lc_sum += pc.item() * w
    gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    rates.append(len(batch) / dt)
    print(json.dumps({"step": s + 1, "total_steps": steps, "loss": loss_sum, "logp_chosen": lc_sum, "grad_norm": float(gn),
                      "pairs_per_s": len(batch) / dt, "step_s": dt}), flush=True)

seq_len = len(pairs[0]["prompt"]) + len(pairs[0]["chosen"])
print(json.dumps({
    "summary": True, "impl": f"pytorch+peft ({args.attn}{', full logits' if args.full_logits else ''})",
    "steps": steps, "pairs": len(pairs), "trainable_params": n_train, "seq_len": seq_len,
    "ref_s": t_refs, "references": refs, "total_s": time.perf_counter() - t_start,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    "threads": torch.get_num_threads(), "torch": torch.__version__,
    "transformers": __import__("transformers").__version__, "peft": __import__("peft").__version__,
}), flush=True)
