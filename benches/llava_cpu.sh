#!/usr/bin/env bash
# Side-by-side CPU benchmark: rlaifd vs transformers on the same random ~150M-parameter LLaVA checkpoint
# (CLIP 6x512 on 224 px / 16 px patches, LLaMA 12x768, vocab 32k), same thread count, interleaved runs,
# medians reported. Prefill = vision tower + projector + decoder over 229 positions (196 image + 33 text),
# decode = greedy tokens/s of one answer with the KV cache.
#   RUNS=5 THREADS=2 NEW_TOKENS=64 benches/llava_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
THREADS=${THREADS:-2}
NEW_TOKENS=${NEW_TOKENS:-64}
source "$(tools/pyenv.sh)"
cargo build --release -p rlaifd 2>&1 | tail -n 1
out=target/bench
mkdir -p "$out"
for dt in float32 bfloat16; do
  dir="$out/llava150m-$([ $dt = float32 ] && echo f32 || echo bf16)"
  [ -f "$dir/model.safetensors" ] || python tools/make_bench_model.py "$dir" --dtype "$dt"
done
res="$out/results.jsonl"
: > "$res"
rl() { ./target/release/rlaifd --threads "$THREADS" bench --runs 1 --new-tokens "$NEW_TOKENS" "$@"; }
peer() { python tools/bench_peer.py --threads "$THREADS" --new-tokens "$NEW_TOKENS" "$@" 2>/dev/null; }
for i in $(seq "$RUNS"); do
  echo "run $i/$RUNS" >&2
  rl --model "$out/llava150m-f32"                    | sed 's/^{/{"case":"f32 checkpoint",/' >> "$res"
  peer "$out/llava150m-f32"                          | sed 's/^{/{"case":"f32 checkpoint",/' >> "$res"
  rl --model "$out/llava150m-bf16"                   | sed 's/^{/{"case":"bf16 checkpoint",/' >> "$res"
  rl --model "$out/llava150m-bf16" --f32-weights     | sed 's/^{/{"case":"bf16 checkpoint",/' >> "$res"
  peer "$out/llava150m-bf16"                         | sed 's/^{/{"case":"bf16 checkpoint",/' >> "$res"
  peer "$out/llava150m-bf16" --compute-dtype bfloat16 | sed 's/^{/{"case":"bf16 checkpoint",/' >> "$res"
done
python - "$res" <<'PY'
import json, statistics, sys, collections
rows = [json.loads(l) for l in open(sys.argv[1])]
groups = collections.OrderedDict()
for r in rows:
    who = r["impl"] + (f" ({r['weights']} weights in memory)" if r["impl"] == "rlaifd" else "")
    groups.setdefault((r["case"], who), []).append(r)
print(f"| checkpoint | implementation | prefill tok/s (median) | decode tok/s (median) | runs |")
print(f"|---|---|---|---|---|")
base = {}
for (case, who), rs in groups.items():
    p = statistics.median(r["prefill_tok_s"] for r in rs)
    d = statistics.median(r["decode_tok_s"] for r in rs)
    print(f"| {case} | {who} | {p:.0f} | {d:.1f} | {len(rs)} |")
PY
