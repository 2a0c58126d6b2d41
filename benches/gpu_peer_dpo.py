#!/usr/bin/env python3
"""The side-by-side peer for the GPU training benchmark (`rlaifd bench-gpu-train`): PyTorch + peft on the same GPU,
a random-weight LLaMA decoder of LLaVA-1.5-7B's language-model shape (or --shape tiny) in fp16, LoRA r=64 on every
linear layer of the decoder (fp32 adapter weights), fp16 autocast with a GradScaler, AdamW, gradient clipping at 1.
One DPO step = one pair: chosen and rejected sequences of --seq tokens (the 576 image positions are text tokens
here, as in our benchmark), answers of --answer tokens, reference log-probs precomputed (constants). Also one SFT
step on one sequence. Medians of --reps steps after --warmup. Prints one JSON line.
--full-parameter: the peer of `rlaifd bench-gpu-train --full-parameter` instead: no LoRA, every linear layer of
the decoder and the head trained whole as PyTorch's mixed precision does it (fp32 weights, fp16 autocast, a
GradScaler, AdamW; embeddings and norms frozen), DPO steps only.
Usage (GPU host with torch, transformers and peft): python3 benches/gpu_peer_dpo.py [--shape llava7b] [--seq 700]"""
import argparse, json, statistics, time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from gpu_peer import SHAPES, causal_lm, llama_config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llava7b", choices=SHAPES)
    ap.add_argument("--seq", type=int, default=700)
    ap.add_argument("--answer", type=int, default=60)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--full-parameter", action="store_true")
    a = ap.parse_args()
    cfg = llama_config(a.shape)
    dev = torch.device(a.device)
    cuda = a.device == "cuda"
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if a.full_parameter:
        # fp32 master weights under fp16 autocast; the linear layers (biases included) and the head train.
        with dev:
            model = causal_lm(cfg).float()
        for name, p in model.named_parameters():
            p.requires_grad = any(f".{t}." in name for t in targets) or name.startswith("lm_head.")
    else:
        with dev:
            model = causal_lm(cfg).to(torch.float16 if cuda else torch.float32)
        model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules=targets))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    scaler = torch.amp.GradScaler(enabled=cuda)
    ids = torch.tensor([[1 + (i * 7919 + s * 104729) % 32063 for i in range(a.seq)] for s in range(2)], device=dev)
    ref = torch.tensor([-150.0, -160.0], device=dev)
    beta = 0.1

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def answer_logps(logits, ids):
        # logits of the last answer+1 positions predict the answer tokens
        lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        return lp.gather(-1, ids[:, -a.answer:].unsqueeze(-1)).squeeze(-1).sum(-1)

    def update(loss):
        # loss-scaled backward, unscale, clip at 1, AdamW step (skipped by the scaler on overflow)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    def dpo_step():
        with torch.autocast(a.device, dtype=torch.float16, enabled=cuda):
            logits = model(ids, logits_to_keep=a.answer + 1).logits
        logp = answer_logps(logits, ids)
        margin = beta * ((logp[0] - ref[0]) - (logp[1] - ref[1]))
        update(-F.logsigmoid(margin))

    def sft_step():
        with torch.autocast(a.device, dtype=torch.float16, enabled=cuda):
            logits = model(ids[:1], logits_to_keep=a.answer + 1).logits
        update(-answer_logps(logits, ids[:1]).sum() / a.answer)

    dpo, sft = [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for rep in range(a.warmup + a.reps):
        sync()
        t = time.perf_counter()
        dpo_step()
        sync()
        if rep >= a.warmup:
            dpo.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    for rep in range(0 if a.full_parameter else a.warmup + a.reps):
        sync()
        t = time.perf_counter()
        sft_step()
        sync()
        if rep >= a.warmup:
            sft.append(time.perf_counter() - t)
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    import peft, transformers
    print(json.dumps({"peer": f"torch {torch.__version__} + transformers {transformers.__version__} + peft {peft.__version__}",
                      "device": name, "shape": a.shape, "seq": a.seq, "answer": a.answer, "rank": a.rank,
                      "dpo_step_ms": statistics.median(dpo) * 1e3, "dpo_pairs_per_s": 1.0 / statistics.median(dpo),
                      "full_parameter": a.full_parameter, "dpo_peak_memory_gb": peak,
                      "sft_tokens_per_s": a.seq / statistics.median(sft) if sft else None,
                      "trainable_params": sum(p.numel() for p in params)}))


if __name__ == "__main__":
    main()
