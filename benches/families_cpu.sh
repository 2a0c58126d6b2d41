#!/usr/bin/env bash
# Side-by-side CPU benchmark of the newer families: rlaifd vs transformers on random ~150M-parameter
# LLaVA-NeXT and Qwen2.5-VL checkpoints (tools/make_bench_model.py), f32, same thread count, interleaved runs,
# medians reported. Each side preprocesses the same image with its own processor (not timed): LLaVA-NeXT gets a
# 448x224 image (base + 2 tiles of 224 px, 196 rows each, packed with image_newline), Qwen2.5-VL a 224x224 image
# (256 patches of 14 px, window attention, 64 merged rows). Prefill = vision + decoder over the expanded prompt,
# logits of the last position; decode = greedy tokens/s of one answer with the KV cache.
#   RUNS=5 THREADS=2 NEW_TOKENS=64 benches/families_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
THREADS=${THREADS:-2}
NEW_TOKENS=${NEW_TOKENS:-64}
source "$(tools/pyenv.sh)"
cargo build --release -p rlaifd 2>&1 | tail -n 1
out=target/bench
mkdir -p "$out"
for fam in llava_next qwen2_5_vl; do
  [ -f "$out/$fam-150m/config.json" ] || python tools/make_bench_model.py "$out/$fam-150m" --family "$fam"
done
python - "$out" <<'PY'
import sys
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
Image.fromarray(rng.integers(0, 256, (224, 448, 3), dtype=np.uint8)).save(f"{sys.argv[1]}/wide448x224.png")
Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(f"{sys.argv[1]}/square224.png")
PY
res="$out/families.jsonl"
: > "$res"
rl() { ./target/release/rlaifd --threads "$THREADS" bench --runs 1 --new-tokens "$NEW_TOKENS" "$@"; }
peer() { python tools/bench_peer.py --threads "$THREADS" --new-tokens "$NEW_TOKENS" "$@" 2>/dev/null; }
for i in $(seq "$RUNS"); do
  echo "run $i/$RUNS" >&2
  rl --model "$out/llava_next-150m" --image "$out/wide448x224.png" | sed 's/^{/{"case":"LLaVA-NeXT",/' >> "$res"
  peer "$out/llava_next-150m" --image "$out/wide448x224.png"      | sed 's/^{/{"case":"LLaVA-NeXT",/' >> "$res"
  rl --model "$out/qwen2_5_vl-150m" --image "$out/square224.png"   | sed 's/^{/{"case":"Qwen2.5-VL",/' >> "$res"
  peer "$out/qwen2_5_vl-150m" --image "$out/square224.png"        | sed 's/^{/{"case":"Qwen2.5-VL",/' >> "$res"
done
python - "$res" <<'PY'
import json, statistics, sys, collections
rows = [json.loads(l) for l in open(sys.argv[1])]
groups = collections.OrderedDict()
for r in rows:
    groups.setdefault((r["case"], r["impl"]), []).append(r)
print("| model | implementation | prompt positions | prefill tok/s (median) | decode tok/s (median) | runs |")
print("|---|---|---|---|---|---|")
for (case, who), rs in groups.items():
    p = statistics.median(r["prefill_tok_s"] for r in rs)
    d = statistics.median(r["decode_tok_s"] for r in rs)
    print(f"| {case} | {who} | {rs[0]['prefill_tokens']} | {p:.0f} | {d:.1f} | {len(rs)} |")
PY
