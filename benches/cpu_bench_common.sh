# Shared parts of the CPU training benchmarks (benches/dpo_cpu.sh, benches/sft_cpu.sh); sourced, not run.
# The caller sets: data (work folder), res (results .jsonl), waits (wait log), NOISE_MAX, BATCH, and
#   RATE_KEY   the per-step rate field both sides print (pairs_per_s, tokens_per_s)
#   UNITS_KEY  the field holding the step's units when a step line has no step_s (empty: BATCH)
#   ROW_EXTRA  step-line fields copied into the result rows besides the rate and the loss (space-separated)
# Noise control (others compile on the dev machine): each measurement starts only when no rustc/cargo runs, and
# benches/cpu_bench_runner.py records every second how much CPU the rest of the machine used (/proc/stat minus the
# measured process tree). A step during which other processes used more than NOISE_MAX cores on average is
# "disturbed" and the callers leave it out of the medians.
RATE_KEY=${RATE_KEY:-pairs_per_s}
UNITS_KEY=${UNITS_KEY:-}
ROW_EXTRA=${ROW_EXTRA:-logp_chosen}
bench_runner="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/cpu_bench_runner.py"

# Wait until no compiler (or cargo, which also runs tests) is running.
wait_idle() {
  local t0=$SECONDS
  while pgrep -x rustc >/dev/null || pgrep -x cargo >/dev/null; do sleep 5; done
  if [ $((SECONDS - t0)) -gt 0 ]; then echo "waited $((SECONDS - t0)) s for compilers to finish before: $1" | tee -a "$waits" >&2; fi
}
# measure IMPL ROUND cmd...: appends one row per optimizer step (the rate, the other processes' mean CPU during the
# step, clean or not) and one row for the whole command (wall, peak RSS, the other processes' mean CPU).
measure() {
  local impl=$1 round=$2; shift 2
  local tmp
  tmp=$(mktemp -d)
  wait_idle "$impl round $round"
  local t0=$EPOCHREALTIME
  python "$bench_runner" "$tmp/stdout" "$tmp/load" "$tmp/time" -- "$@" 2> "$tmp/stderr" || { cat "$tmp/stderr" >&2; exit 1; }
  local t1=$EPOCHREALTIME
  python - "$impl" "$round" "$tmp" "$t0" "$t1" "$NOISE_MAX" "$BATCH" "$RATE_KEY" "$UNITS_KEY" "$ROW_EXTRA" >> "$res" <<'PY'
import json, sys
impl, rnd, tmp, t0, t1, noise_max, bs = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7])
rate_key, units_key, row_extra = sys.argv[8], sys.argv[9], sys.argv[10].split()
rss_kb = next(int(l.split(":")[1]) for l in open(f"{tmp}/time") if "Maximum resident set size" in l)
load = [tuple(map(float, l.split())) for l in open(f"{tmp}/load")]
def mean(a, b, col):
    """Mean of load column `col` over [a, b] (one-second intervals pro-rated)."""
    tot = sum(r[col] * max(0.0, min(b, r[1]) - max(a, r[0])) for r in load)
    return round(tot / max(b - a, 1e-9), 3)
def diag(a, b):
    return {"foreign_cores": mean(a, b, 2), "own_cores": mean(a, b, 3), "iowait_cores": mean(a, b, 4),
            "steal_cores": mean(a, b, 5), "major_faults": int(sum(r[6] for r in load if r[0] >= a - 0.5 and r[1] <= b + 0.5)),
            "minor_faults": int(sum(r[7] for r in load if r[0] >= a - 0.5 and r[1] <= b + 0.5))}
def foreign(a, b):
    return mean(a, b, 2)
extra = {}
for line in open(f"{tmp}/stdout"):
    ts, _, body = line.partition(" ")
    if not body.startswith("{"):
        continue
    r = json.loads(body)
    if r.get("summary"):
        extra = r
        continue
    if "step" not in r:  # e.g. rlaifd's eval_loss lines
        continue
    units = r[units_key] if units_key else bs
    step_s = r.get("step_s", r[rate_key] and units / r[rate_key])
    a, b = float(ts) - step_s, float(ts)
    print(json.dumps({"impl": impl, "round": rnd, "step": r["step"], rate_key: r[rate_key], "loss": r["loss"],
                      **{k: r.get(k) for k in row_extra}, **diag(a, b), "clean": foreign(a, b) <= noise_max}))
print(json.dumps({"impl": impl, "round": rnd, "wall_s": t1 - t0, "peak_rss_mib": rss_kb / 1024, **diag(t0, t1),
                  "clean": foreign(t0, t1) <= noise_max, "self_report": extra}))
PY
  rm -rf "$tmp"
}
# enough NEED IMPL...: true when every implementation has NEED clean steps in $res.
enough() {
  python - "$res" "$@" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
need, impls = int(sys.argv[2]), sys.argv[3:]
counts = {i: sum(1 for r in rows if r["impl"] == i and "step" in r and r["clean"]) for i in impls}
print("clean steps so far: " + ", ".join(f"{i} {c}/{need}" for i, c in counts.items()), file=sys.stderr)
sys.exit(0 if all(c >= need for c in counts.values()) else 1)
PY
}

# make_token_data KIND DIR N: N random 224 px images in DIR and DIR/pairs.jsonl (KIND dpo: chosen/rejected of 40
# tokens) or DIR/data.jsonl (KIND sft: a 40-token answer); prompts are 30 tokens with the image token once.
make_token_data() {
  python - "$1" "$2" "$3" <<'PY'
import json, os, sys
import numpy as np
from PIL import Image
kind, d, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(0)
with open(os.path.join(d, "pairs.jsonl" if kind == "dpo" else "data.jsonl"), "w") as f:
    for i in range(n):
        name = f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(os.path.join(d, name))
        ids = lambda k: [int(x) for x in rng.integers(100, 30000, k)]
        prompt = [1] + ids(3) + [32000] + ids(25)  # 30 tokens, image token once
        answers = {"chosen_ids": ids(40), "rejected_ids": ids(40)} if kind == "dpo" else {"answer_ids": ids(40)}
        f.write(json.dumps({"image": name, "prompt_ids": prompt, **answers}) + "\n")
PY
}
