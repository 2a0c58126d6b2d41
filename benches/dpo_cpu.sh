#!/usr/bin/env bash
# Side-by-side CPU benchmark of DPO training: `rlaifd train-dpo` vs PyTorch + transformers + peft
# (tools/bench_dpo_peer.py) doing the same work on the same random ~150M-parameter LLaVA checkpoint (f32), same
# thread count, interleaved runs, medians reported.
#   fresh LoRA r=64, alpha=16 on q,k,v,o,gate,up,down of the language model (vision tower and projector frozen),
#   DPO sigmoid loss beta 0.1, 4 pairs per optimizer step (accumulated pair by pair), AdamW lr 1e-5, clip 1.0,
#   reference log-probs precomputed before timing. Pairs: a 224x224 random-noise PNG, a 30-token prompt holding the
#   image token once (196 patch rows after expansion), 40-token chosen and rejected answers.
# Per-step pairs/s comes from each side's own step timer (reference pass and loading excluded); the whole command's
# wall time and peak RSS (/usr/bin/time -v, "Maximum resident set size") are reported too. The reference log-probs
# of both sides are compared (same-work check).
#
# Noise control (others compile on the dev machine; shared with sft_cpu.sh through cpu_bench_common.sh and
# cpu_bench_runner.py): each measurement starts only when no rustc/cargo runs, and a sampler records every second how
# much CPU the rest of the machine used (/proc/stat minus the measured process tree). A step during which other
# processes used more than NOISE_MAX cores on average is "disturbed" and left out of the medians; rounds (one run of
# every implementation, interleaved) repeat until every implementation has RUNS x steps clean steps, at most
# MAX_ROUNDS rounds. The rlaifd binary is copied first, so a rebuild by someone else cannot swap it mid-benchmark;
# RLAIFD_BIN=path benchmarks a given binary instead of building one.
#   RUNS=3 THREADS=2 PAIRS=12 benches/dpo_cpu.sh       (EAGER=0 skips the eager-attention peer row)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
THREADS=${THREADS:-2}
PAIRS=${PAIRS:-12}
BATCH=${BATCH:-4}
EAGER=${EAGER:-1}
NOISE_MAX=${NOISE_MAX:-0.05}
MAX_ROUNDS=${MAX_ROUNDS:-$((RUNS * 3))}
source "$(tools/pyenv.sh)"
if [ -z "${RLAIFD_BIN:-}" ]; then
  cargo build --release -p rlaifd 2>&1 | tail -n 1
  RLAIFD_BIN=target/release/rlaifd
fi
[ -x /usr/bin/time ] || { echo "needs /usr/bin/time (Debian package 'time')" >&2; exit 1; }
out=target/bench
model="$out/llava150m-f32"
[ -f "$model/model.safetensors" ] || python tools/make_bench_model.py "$model" --dtype float32
data="$out/dpo"
mkdir -p "$data"
source benches/cpu_bench_common.sh  # wait_idle, measure, enough, make_token_data
make_token_data dpo "$data" "$PAIRS"

bin="$data/rlaifd.bench-bin"
cp "$RLAIFD_BIN" "$bin"
echo "rlaifd binary: $RLAIFD_BIN sha256 $(sha256sum "$bin" | cut -c1-16); worktree HEAD $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- engine daemon || echo ' (engine/daemon modified in the worktree)')" >&2
res="$out/dpo_results.jsonl"
waits="$out/dpo_waits.log"
RATE_KEY=pairs_per_s UNITS_KEY="" ROW_EXTRA=logp_chosen
: > "$res"
: > "$waits"
impls=("rlaifd" "pytorch+peft sdpa")
[ "$EAGER" = 1 ] && impls+=("pytorch+peft eager")
steps_per_run=$(( (PAIRS + BATCH - 1) / BATCH ))
need=$((RUNS * steps_per_run))
rl_out=$(mktemp -d)
for round in $(seq "$MAX_ROUNDS"); do
  echo "round $round (at least $RUNS, at most $MAX_ROUNDS)" >&2
  rm -rf "$rl_out/adapter"
  measure rlaifd "$round" "$bin" --threads "$THREADS" train-dpo --model "$model" --pairs "$data/pairs.jsonl" \
    --out "$rl_out/adapter" --epochs 1 --batch-size "$BATCH" --lr 1e-5 --beta 0.1 --r 64 --lora-alpha 16 --warmup-ratio 0
  python -c 'import json,sys; print(json.dumps({"impl": "rlaifd", "references": json.load(open(sys.argv[1]))["references"]}))' \
    "$rl_out/adapter/trainer_state.json" > "$data/rlaifd_refs.json"
  measure "pytorch+peft sdpa" "$round" python tools/bench_dpo_peer.py --model "$model" --pairs "$data/pairs.jsonl" \
    --threads "$THREADS" --batch-size "$BATCH" --attn sdpa
  if [ "$EAGER" = 1 ]; then
    measure "pytorch+peft eager" "$round" python tools/bench_dpo_peer.py --model "$model" --pairs "$data/pairs.jsonl" \
      --threads "$THREADS" --batch-size "$BATCH" --attn eager
  fi
  if [ "$round" -ge "$RUNS" ] && enough "$need" "${impls[@]}"; then break; fi
done
rm -rf "$rl_out"
python - "$res" "$BATCH" "$NOISE_MAX" <<'PY'
import json, os, statistics, sys, collections
rows = [json.loads(l) for l in open(sys.argv[1])]
bs, noise_max = int(sys.argv[2]), float(sys.argv[3])
steps, whole = collections.OrderedDict(), collections.OrderedDict()
for r in rows:
    (steps if "step" in r else whole).setdefault(r["impl"], []).append(r)
med = lambda xs: statistics.median(xs) if xs else float("nan")
clean = {i: [r["pairs_per_s"] for r in rs if r["clean"]] for i, rs in steps.items()}
peer = med(clean["pytorch+peft sdpa"])
print(f"| implementation | pairs/s per step (median, clean steps) | min-max | ratio vs PyTorch sdpa | s per 4-pair step "
      f"| median of all steps | wall of whole command (median, clean runs) | peak RSS MiB (median) | clean steps / all "
      f"| cores busy in clean steps (median) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for impl, rs in steps.items():
    v = clean[impl]
    m = med(v)
    allv = med([r["pairs_per_s"] for r in rs])
    w = med([r["wall_s"] for r in whole[impl] if r["clean"]])
    rss = med([r["peak_rss_mib"] for r in whole[impl]])
    print(f"| {impl} | {m:.3f} | {min(v, default=float('nan')):.3f}-{max(v, default=float('nan')):.3f} | {m / peer:.2f} "
          f"| {bs / m:.2f} | {allv:.3f} | {w:.1f} s ({sum(r['clean'] for r in whole[impl])} of {len(whole[impl])}) "
          f"| {rss:.0f} | {len(v)}/{len(rs)} | {med([r['own_cores'] for r in rs if r['clean']]):.2f} |")
print(f"\nclean = other processes used <= {noise_max} cores on average during the step (or the whole command)")
rl = json.load(open(os.path.join(os.path.dirname(sys.argv[1]), "dpo", "rlaifd_refs.json")))["references"]
pt = next(r["self_report"]["references"] for r in whole["pytorch+peft sdpa"])
d = max(abs(a - b) for x, y in zip(rl, pt) for a, b in zip(x, y))
print(f"same-work check: reference answer log-probs (sums over 40 tokens, ~-415), max |rlaifd - PyTorch| = {d:.2e} "
      f"over {len(rl)} pairs")
for impl in steps:
    if impl != "rlaifd":
        sr = [r["self_report"] for r in whole[impl] if r["clean"]] or [r["self_report"] for r in whole[impl]]
        print(f"{impl}: reference pass {med([s['ref_s'] for s in sr]):.1f} s, python import+load+refs+steps "
              f"{med([s['total_s'] for s in sr]):.1f} s (medians)")
PY
if [ -s "$waits" ]; then echo "waits:" >&2; cat "$waits" >&2; else echo "no waits for compilers" >&2; fi
