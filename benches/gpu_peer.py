#!/usr/bin/env python3
"""The side-by-side peer for `rlaifd bench-gpu`: transformers on the same GPU, fp16, a random-weight LLaMA decoder of
LLaVA-1.5-7B's language-model shape (--shape qwen7b: Qwen2-VL-7B's; tiny, qwen-tiny: small ones). Measures prefill latency for --prompt tokens, greedy decode
tokens/s at batch 1 (generate with a fixed number of new tokens), and sampling throughput with
num_return_sequences=10, with --clients N also N distinct prompts of --prompt tokens decoded greedily in one
batched generate (static batching, the prefill included: the peer of `rlaifd bench-gpu-batch`), and LLaVA-1.5's image path (CLIP ViT-L/14-336 and the projector, random weights, the
features read from the second-to-last layer as transformers' LLaVA does). Medians of --reps runs after a warm-up.
Prints one JSON line.
Usage (GPU host with torch and transformers): python3 benches/gpu_peer.py [--shape llava7b] [--prompt 640]
[--decode 128] [--reps 3] [--clients 32]"""
import argparse, json, statistics, time

import torch
from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

SHAPES = ["llava7b", "tiny", "qwen7b", "qwen-tiny", "llama1b"]


def llama_config(shape):
    """LLaVA-1.5-7B's language model, Qwen2-VL-7B's (a Qwen2 decoder: q/k/v biases, GQA 28/4; its multimodal RoPE
    costs what 1-D RoPE costs on text), a 1.1B LLaMA (full-parameter training), or a tiny decoder of either kind,
    as rlaifd's bench-gpu builds it."""
    hidden, inter, layers, heads, kv, vocab = {
        "llava7b": (4096, 11008, 32, 32, 32, 32064), "tiny": (256, 688, 4, 8, 8, 32064),
        "qwen7b": (3584, 18944, 28, 28, 4, 152064), "qwen-tiny": (256, 688, 4, 8, 2, 32064),
        "llama1b": (2048, 5632, 22, 32, 4, 32064)}[shape]
    if shape.startswith("qwen"):
        return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv, rms_norm_eps=1e-6, rope_theta=1e6,
                           max_position_embeddings=32768, tie_word_embeddings=False)
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=4096, tie_word_embeddings=False)


def causal_lm(cfg):
    """The transformers model of a `llama_config`."""
    return Qwen2ForCausalLM(cfg) if isinstance(cfg, Qwen2Config) else LlamaForCausalLM(cfg)


def image_path(shape, text_hidden, device, dtype, reps):
    """Milliseconds per image of LLaVA-1.5's image path (rlaifd's `cuda_clip::bench_shape`): the CLIP tower with
    every hidden state, the second-to-last without its CLS row, then Linear-GELU-Linear."""
    if shape == "llava7b":
        vc = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, hidden_act="quick_gelu")
    else:
        vc = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                              image_size=64, patch_size=16, hidden_act="quick_gelu")
    with torch.device(device):
        tower = CLIPVisionModel(vc).to(dtype).eval()
        proj = torch.nn.Sequential(torch.nn.Linear(vc.hidden_size, text_hidden), torch.nn.GELU(),
                                   torch.nn.Linear(text_hidden, text_hidden)).to(dtype).eval()
    pixels = torch.randn(1, 3, vc.image_size, vc.image_size, device=device, dtype=dtype)
    times = []
    with torch.inference_mode():
        for rep in range(reps + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            hidden = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
            feats = proj(hidden).float().cpu()
            if rep > 0:
                times.append((time.perf_counter() - t) * 1e3)
    assert feats.shape[1] == (vc.image_size // vc.patch_size) ** 2
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llava7b", choices=SHAPES)
    ap.add_argument("--prompt", type=int, default=640)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--clients", type=int, default=0)
    a = ap.parse_args()
    cfg = llama_config(a.shape)
    dtype = torch.float16 if a.device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(a.device):
        model = causal_lm(cfg).to(dtype).eval()
    dev = torch.device(a.device)
    ids = torch.tensor([[1 + (i * 7919) % 32063 for i in range(a.prompt)]], device=dev)

    def sync():
        if a.device == "cuda":
            torch.cuda.synchronize()

    # --clients distinct prompts of the same length (no padding), as bench-gpu-batch builds them.
    many = torch.tensor([[1 + ((i + 31 * c) * 7919) % 32063 for i in range(a.prompt)] for c in range(a.clients)],
                        device=dev) if a.clients else None
    prefill, decode, sample10, batched = [], [], [], []
    with torch.inference_mode():
        for rep in range(a.reps + 1):
            sync()
            t = time.perf_counter()
            model(ids, use_cache=True)
            sync()
            pf = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=a.decode, min_new_tokens=a.decode, do_sample=False, pad_token_id=0)
            sync()
            gen = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=a.decode, min_new_tokens=a.decode, do_sample=True, temperature=0.7,
                           num_return_sequences=10, pad_token_id=0)
            sync()
            g10 = time.perf_counter() - t
            if many is not None:
                t = time.perf_counter()
                model.generate(many, max_new_tokens=a.decode, min_new_tokens=a.decode, do_sample=False, pad_token_id=0)
                sync()
                batched.append(a.clients * a.decode / (time.perf_counter() - t))
            if rep == 0:
                batched = batched[1:]
                continue  # warm-up
            prefill.append(pf * 1e3)
            decode.append(a.decode / max(gen - pf, 1e-9))
            sample10.append(10 * a.decode / g10)
    # Qwen2-VL's vision transformer runs on rlaifd's CPU backend: not compared here.
    image_ms = None if a.shape.startswith("qwen") else image_path(a.shape, cfg.hidden_size, a.device, dtype, a.reps)
    name = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    print(json.dumps({"peer": "transformers " + __import__("transformers").__version__, "torch": torch.__version__,
                      "device": name, "shape": a.shape, "prompt_tokens": a.prompt, "decode_tokens": a.decode,
                      "prefill_ms": statistics.median(prefill), "decode_tokens_per_s": statistics.median(decode),
                      "n10_sampling_tokens_per_s": statistics.median(sample10), "image_path_ms": image_ms,
                      "clients": a.clients, "batched_tokens_per_s": statistics.median(batched) if batched else None,
                      "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if a.device == "cuda" else None}))


if __name__ == "__main__":
    main()
