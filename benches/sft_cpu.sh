#!/usr/bin/env bash
# Side-by-side CPU benchmark of SFT (LoRA) training: `rlaifd train-sft` vs PyTorch + transformers + peft
# (tools/bench_sft_peer.py) doing the same work on the same random ~150M-parameter LLaVA checkpoint (f32), same
# thread count, interleaved runs, medians reported.
#   fresh LoRA r=64, alpha=16 on q,k,v,o,gate,up,down of the language model (vision tower and projector frozen),
#   cross-entropy on the answer tokens with the prompt masked, token mean over the batch, 4 examples per optimizer
#   step (accumulated example by example), AdamW lr 1e-4 (cosine schedule over the run, no warmup), clip 1.0.
#   Examples: a 224x224 random-noise PNG, a 30-token prompt holding the image token once (196 patch rows after
#   expansion), a 40-token answer.
# Per-step answer tokens/s comes from each side's own step timer (loading excluded); the whole command's wall time
# and peak RSS (/usr/bin/time -v, "Maximum resident set size") are reported too. Same-work check, untimed: the
# mean loss per answer token over all examples under the fresh adapter (= the base model, LoRA B is 0) from
# rlaifd's `--eval` and the peer's `--eval-only`.
# Noise control and the runner are shared with dpo_cpu.sh (cpu_bench_common.sh, cpu_bench_runner.py): a run starts
# only when no rustc/cargo runs, steps during which other processes used more than NOISE_MAX cores are left out of
# the medians, rounds (one run of every implementation, interleaved) repeat until every implementation has
# RUNS x steps clean steps, at most MAX_ROUNDS rounds. The rlaifd binary is copied first; RLAIFD_BIN=path
# benchmarks a given binary instead of building one.
#   RUNS=3 THREADS=2 EXAMPLES=12 benches/sft_cpu.sh       (EAGER=0 skips the eager-attention peer row)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
THREADS=${THREADS:-2}
EXAMPLES=${EXAMPLES:-12}
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
data="$out/sft"
mkdir -p "$data"
source benches/cpu_bench_common.sh  # wait_idle, measure, enough, make_token_data
make_token_data sft "$data" "$EXAMPLES"

bin="$data/rlaifd.bench-bin"
cp "$RLAIFD_BIN" "$bin"
echo "rlaifd binary: $RLAIFD_BIN sha256 $(sha256sum "$bin" | cut -c1-16); worktree HEAD $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- engine daemon || echo ' (engine/daemon modified in the worktree)')" >&2
res="$out/sft_results.jsonl"
waits="$out/sft_waits.log"
: > "$res"
: > "$waits"
RATE_KEY=tokens_per_s UNITS_KEY=tokens ROW_EXTRA="tokens grad_norm"
impls=("rlaifd" "pytorch+peft sdpa")
[ "$EAGER" = 1 ] && impls+=("pytorch+peft eager")
steps_per_run=$(( (EXAMPLES + BATCH - 1) / BATCH ))
need=$((RUNS * steps_per_run))
rl_out=$(mktemp -d)
rl_train() {  # rlaifd train-sft with the benchmark's settings; extra arguments appended
  rm -rf "$rl_out/adapter"
  "$bin" --threads "$THREADS" train-sft --model "$model" --data "$data/data.jsonl" --out "$rl_out/adapter" --epochs 1 \
    --batch-size "$BATCH" --lr 1e-4 --r 64 --lora-alpha 16 --warmup-ratio 0 "$@"
}

# Same-work check (untimed): base-model loss per answer token over all examples on both sides.
wait_idle "same-work check"
rl_eval=$(rl_train --eval "$data/data.jsonl" --stop-after 1 2>/dev/null | python -c \
  'import json,sys; print([json.loads(l)["eval_loss"] for l in sys.stdin if "eval_loss" in l][0])')  # reads all: no SIGPIPE
pt_eval=$(python tools/bench_sft_peer.py --model "$model" --data "$data/data.jsonl" --threads "$THREADS" --eval-only \
  2>/dev/null | python -c 'import json,sys; print(json.loads(sys.stdin.readlines()[-1])["eval_loss"])')
echo "{\"check\": true, \"rlaifd_eval_loss\": $rl_eval, \"pytorch_eval_loss\": $pt_eval}" > "$data/check.json"

for round in $(seq "$MAX_ROUNDS"); do
  echo "round $round (at least $RUNS, at most $MAX_ROUNDS)" >&2
  rm -rf "$rl_out/adapter"
  measure rlaifd "$round" "$bin" --threads "$THREADS" train-sft --model "$model" --data "$data/data.jsonl" \
    --out "$rl_out/adapter" --epochs 1 --batch-size "$BATCH" --lr 1e-4 --r 64 --lora-alpha 16 --warmup-ratio 0
  measure "pytorch+peft sdpa" "$round" python tools/bench_sft_peer.py --model "$model" --data "$data/data.jsonl" \
    --threads "$THREADS" --batch-size "$BATCH" --lr 1e-4 --attn sdpa
  if [ "$EAGER" = 1 ]; then
    measure "pytorch+peft eager" "$round" python tools/bench_sft_peer.py --model "$model" --data "$data/data.jsonl" \
      --threads "$THREADS" --batch-size "$BATCH" --lr 1e-4 --attn eager
  fi
  if [ "$round" -ge "$RUNS" ] && enough "$need" "${impls[@]}"; then break; fi
done
rm -rf "$rl_out"
python - "$res" "$BATCH" "$NOISE_MAX" "$data/check.json" <<'PY'
import json, statistics, sys, collections
rows = [json.loads(l) for l in open(sys.argv[1])]
bs, noise_max = int(sys.argv[2]), float(sys.argv[3])
check = json.load(open(sys.argv[4]))
steps, whole = collections.OrderedDict(), collections.OrderedDict()
for r in rows:
    (steps if "step" in r else whole).setdefault(r["impl"], []).append(r)
med = lambda xs: statistics.median(xs) if xs else float("nan")
clean = {i: [r["tokens_per_s"] for r in rs if r["clean"]] for i, rs in steps.items()}
peer = med(clean["pytorch+peft sdpa"])
print(f"| implementation | answer tokens/s per step (median, clean steps) | min-max | ratio vs PyTorch sdpa "
      f"| s per {bs}-example step | median of all steps | wall of whole command (median, clean runs) "
      f"| peak RSS MiB (median) | clean steps / all | cores busy in clean steps (median) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for impl, rs in steps.items():
    v = clean[impl]
    m = med(v)
    allv = med([r["tokens_per_s"] for r in rs])
    tok = med([r["tokens"] for r in rs])
    w = med([r["wall_s"] for r in whole[impl] if r["clean"]])
    rss = med([r["peak_rss_mib"] for r in whole[impl]])
    print(f"| {impl} | {m:.1f} | {min(v, default=float('nan')):.1f}-{max(v, default=float('nan')):.1f} | {m / peer:.2f} "
          f"| {tok / m:.2f} | {allv:.1f} | {w:.1f} s ({sum(r['clean'] for r in whole[impl])} of {len(whole[impl])}) "
          f"| {rss:.0f} | {len(v)}/{len(rs)} | {med([r['own_cores'] for r in rs if r['clean']]):.2f} |")
print(f"\nclean = other processes used <= {noise_max} cores on average during the step (or the whole command)")
print(f"same-work check: base-model loss per answer token over all examples: rlaifd {check['rlaifd_eval_loss']:.6f}, "
      f"PyTorch {check['pytorch_eval_loss']:.6f}, |diff| {abs(check['rlaifd_eval_loss'] - check['pytorch_eval_loss']):.2e}")
for impl, rs in steps.items():
    s1 = [r for r in rs if r["step"] == 1]
    print(f"{impl}: step-1 loss {med([r['loss'] for r in s1]):.4f}, step-1 grad norm {med([r['grad_norm'] for r in s1]):.4f}, "
          f"last-step loss {med([r['loss'] for r in rs if r['step'] == max(x['step'] for x in rs)]):.4f} (medians over rounds)")
for impl in steps:
    if impl != "rlaifd":
        sr = [r["self_report"] for r in whole[impl] if r["clean"]] or [r["self_report"] for r in whole[impl]]
        print(f"{impl}: python import+load+steps {med([s['total_s'] for s in sr]):.1f} s (median), "
              f"torch {sr[0]['torch']}, transformers {sr[0]['transformers']}, peft {sr[0]['peft']}, "
              f"trainable {sr[0]['trainable_params']}, seq_len {sr[0]['seq_len']}")
PY
if [ -s "$waits" ]; then echo "waits:" >&2; cat "$waits" >&2; else echo "no waits for compilers" >&2; fi
