#!/usr/bin/env bash
# Every GPU check in one go, on an x86-64 NVIDIA host (CUDA 13 driver; NVRTC and headers from /usr/local/cuda or
# the Python environment's nvidia packages), with the prebuilt binaries of scripts/build-gpu-bins
# (target/gpu-bins/). Builds nothing. Logs go to $OUT (default ./gpu-check-out).
#   1. rlaifd kernels: every kernel compiled by the daemon's NVRTC path for this GPU's and the target archs.
#   2. cuda_parity: every inference kernel, the GEMV kernels and the cuBLASLt linear against float64 references on
#      random inputs (rel. L2 <= 1e-2); cuda_train_parity: every backward kernel and AdamW against the CPU backend
#      (rel. L2 <= 2e-2).
#   3. cuda_llama: the fp16 LLaMA decoder on the GPU against the CPU backend on the tiny fixtures (log-probs within
#      5e-2, same greedy tokens, n sequences decoding against a shared prefix, graph replay = direct launches);
#      cuda_train: GPU LoRA DPO (loss, log-probs, every LoRA gradient) against the CPU backend, and a short GPU DPO
#      run; cuda_backend: the daemon's CUDA backend on the bundled ShapesWorld model (image prompts, LoRA on the
#      device: greedy tokens, answer log-probs, sampling, the CPU fallback, continuous batching), the GPU image path (vision tower +
#      projector) on every fixture, labeler verdicts, and GPU DPO on ShapesWorld pairs with images against the CPU
#      trainer, paused, saved and resumed on the GPU or the CPU; cuda_parallel: data-parallel DPO on two GPUs against
#      one (skipped on a one-GPU host); train_cli: `rlaifd train-dpo --device cuda`, paused and resumed on either
#      device, and `--device cuda:0,cuda:1`. Needs the fixtures and assets/: run from a checkout.
#   4. rlaifd generate --device cuda on generated ShapesWorld images (the CLI end to end), and --device cpu beside it.
#   5. rlaifd bench-gpu: prefill (640 tokens), batch-1 decode and n=10 sampling of a random-weight LLaVA-1.5-7B-
#      shaped decoder, copy bandwidth and roofline, a per-op breakdown; rlaifd bench-gpu-batch: CLIENTS (32)
#      requests in one continuous batch against one at a time (answer tokens/s); rlaifd bench-gpu-train: DPO and SFT steps
#      with LoRA r=64 on every linear layer, 700-token sequences; then the peers on the same GPU (if torch is there):
#      benches/gpu_peer.py (transformers fp16) and benches/gpu_peer_dpo.py (PyTorch + peft, fp16 autocast).
#      SHAPE=qwen7b runs stage 5 on Qwen2-VL-7B's decoder instead (q/k/v biases, multimodal RoPE, GQA 28/4).
#      Full-parameter DPO (rlaifd bench-gpu-train --full-parameter and its PyTorch peer) runs on FULL_SHAPE: a
#      1.1B decoder (llama1b) by default, since a 7B one needs about 125 GiB for it; the tiny shape of a tiny run.
#
# A rehearsal without a GPU (checks this script, its arguments and the binaries, not the GPU):
#   CUEMU=1 SHAPE=tiny PROMPT=70 DECODE=4 SEQ=80 ANSWER=10 RANK=8 REPS=1 CLIENTS=4 LIMIT_SCALE=10 OUT=/tmp/rehearsal scripts/gpu-check.sh
# runs every stage on cuemu (tools/cuemu, built by tools/cuemu/build.sh) with a tiny benchmark shape.
# RLAIFD_CUDA_MMA_ATTENTION=0 runs everything with the scalar attention kernels instead of the tensor-core ones (for
# when those fail on the hardware: the binaries cannot be rebuilt on the GPU host). The script sets it itself for
# the stages after the parity tests when a tensor-core attention check failed there ($OUT/mma-failed).
# On an H200 (2026-11-27) the default run took 213 s: tests ~85 s, bench ~30 s, peers ~100 s (plus ~35 s to start
# the machine); PARTS=sanitize 89 s. Run 6 (PARTS=tests,bench,peer,sanitize in one call) took 302 s; run 7 (tests,bench,sanitize) 191 s.
# PARTS=tests,bench,peer (the default) picks the parts to run, so a session whose commands are time-limited can
# split the run in two (PARTS=tests, then PARTS=bench,peer) into the same $OUT. PARTS=sanitize (not in the default;
# for device time left over) runs the kernel parity tests under NVIDIA's compute-sanitizer (memcheck, racecheck,
# synccheck), the hardware's own check of what cuemu's checker checks on the CPU (tools/cuemu/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
SHAPE=${SHAPE:-llava7b} PROMPT=${PROMPT:-640} DECODE=${DECODE:-128} SEQ=${SEQ:-700} ANSWER=${ANSWER:-60} RANK=${RANK:-64} REPS=${REPS:-}
case "$SHAPE" in tiny | qwen-tiny) FULL_SHAPE=${FULL_SHAPE:-$SHAPE} ;; *) FULL_SHAPE=${FULL_SHAPE:-llama1b} ;; esac
LIMIT_SCALE=${LIMIT_SCALE:-1}
mkdir -p "$OUT"
# $OUT receives logs only, 8 files at most (env, parity, llama, backend, generate, bench, peer, sanitize, and the
# marker mma-failed after a failed tensor-core attention check): the development setup's device tool brings back 8.
# Scratch files go to $work.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bins=target/gpu-bins
[ -x "$bins/rlaifd" ] || { echo "no $bins/rlaifd: run scripts/build-gpu-bins on the build machine and carry target/gpu-bins" >&2; exit 2; }
libs=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do [ -d "$d" ] && libs="$libs:$d"; done
py=$(command -v python3 || true)
if [ -n "$py" ]; then
  for d in $("$py" - <<'PY' 2>/dev/null
import site, glob, os
roots = site.getsitepackages() + [site.getusersitepackages()]
for r in roots:
    for p in glob.glob(os.path.join(r, "nvidia", "*", "lib")):
        print(p)
PY
); do libs="$libs:$d"; done
  inc=$("$py" -c 'import site,glob,os; print(":".join(p for r in site.getsitepackages() for p in glob.glob(os.path.join(r,"nvidia","*","include")) if os.path.exists(os.path.join(p,"cuda_fp16.h"))))' 2>/dev/null || true)
  [ -n "$inc" ] && export RLAIFD_CUDA_INCLUDE="$inc${RLAIFD_CUDA_INCLUDE:+:$RLAIFD_CUDA_INCLUDE}"
fi
export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ -n "${CUEMU:-}" ]; then
  export LD_LIBRARY_PATH="$PWD/target/cuemu:$LD_LIBRARY_PATH" RLAIFD_CUDA_INCLUDE="$PWD/tools/cuemu/include"
fi
# The test binaries were built elsewhere: point them at this checkout's kernels/ and tests/fixtures/.
export RLAIFD_ROOT=$PWD
{ nvidia-smi || true; echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"; echo "RLAIFD_CUDA_INCLUDE=${RLAIFD_CUDA_INCLUDE:-}"; } > "$OUT/env.log" 2>&1
status=0
PARTS=${PARTS:-tests,bench,peer}
part() { [[ ",$PARTS," == *",$1,"* ]]; }
# stage NAME LOG SECONDS CMD...: runs CMD under a time limit, appending to $OUT/LOG; a failure marks the run failed.
stage() {
  local name=$1 log=$2 secs=$3
  shift 3
  echo "== $name" | tee -a "$OUT/$log"
  local t0=$SECONDS
  timeout "$((secs * LIMIT_SCALE))" "$@" >> "$OUT/$log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && { status=1; echo "   FAILED (exit $rc)" | tee -a "$OUT/$log"; }
  echo "   ($((SECONDS - t0)) s)"
}
# A run that found tensor-core attention failing goes on with the scalar kernels.
mma_check() {
  if [ -f "$OUT/mma-failed" ] && [ "${RLAIFD_CUDA_MMA_ATTENTION:-}" != 0 ]; then
    export RLAIFD_CUDA_MMA_ATTENTION=0
    echo "== $(cat "$OUT/mma-failed"): the stages from here on run the scalar attention kernels (RLAIFD_CUDA_MMA_ATTENTION=0)"
  fi
}
# racecheck_ours LOG: the kernels (other than cuBLASLt's nvjet_*) that LOG reports a hazard in, one per line.
racecheck_ours() {
  grep -oE "(Race reported between|and) (Read|Write) access at [^ +]+" "$1" | awk '{print $NF}' | grep -v '^nvjet_' | sort -u
}
if part tests; then
stage "rlaifd kernels" env.log 120 "$bins/rlaifd" kernels --arch sm_80 --arch sm_90
tail -n 1 "$OUT/env.log"
stage "cuda_parity (inference kernels)" parity.log 180 "$bins/cuda_parity" --nocapture --test-threads 1
grep -E "CUDA device|SKIPPED|rel L2|test result|panicked" "$OUT/parity.log" | tail -n 70
stage "cuda_train_parity (backward kernels, AdamW)" parity.log 180 "$bins/cuda_train_parity" --nocapture --test-threads 1
grep -E "SKIPPED|bwd|adamw|logprob_gather_f16|lora_dropout|test result|panicked" "$OUT/parity.log" | tail -n 80
# Tensor-core attention failing its parity checks (a fragment layout the hardware reads otherwise than cuemu) must
# not cost the rest of the run: the later stages, and a later PARTS=bench call into the same $OUT, then run the
# scalar attention kernels, and say so.
if grep -A3 "panicked" "$OUT/parity.log" | grep -q "mma"; then
  echo "tensor-core attention failed its parity checks (see parity.log)" > "$OUT/mma-failed"
fi
mma_check
stage "cuda_llama (decoder vs CPU backend)" llama.log 180 "$bins/cuda_llama" --nocapture --test-threads 1
grep -E "SKIPPED|log-prob|greedy|test result|panicked" "$OUT/llama.log" | tail -n 20
stage "cuda_train (GPU DPO vs CPU backend, short DPO run)" llama.log 180 "$bins/cuda_train" --nocapture --test-threads 1
grep -E "SKIPPED|loss CPU|LoRA gradients|GPU DPO|dropout seed|test result|panicked" "$OUT/llama.log" | tail -n 14
stage "cuda_backend (daemon backend on ShapesWorld: generation, scoring, DPO with images)" backend.log 300 "$bins/cuda_backend" --nocapture --test-threads 1
grep -E "SKIPPED|backend:|scene|worst|step|image features|questions|trained|test result|panicked" "$OUT/backend.log" | tail -n 40
# Data-parallel DPO needs two GPUs (and NCCL): on a one-GPU host the test says so and passes skipped.
stage "cuda_parallel (2-GPU data-parallel DPO against one GPU, NCCL)" backend.log 300 "$bins/cuda_parallel" --nocapture --test-threads 1
grep -E "SKIPPED|rank|two GPUs|test result|panicked" "$OUT/backend.log" | tail -n 8
stage "train_cli (rlaifd train-dpo --device cuda, paused and resumed on the GPU or the CPU)" backend.log 180 env RLAIFD_BIN="$bins/rlaifd" "$bins/train_cli" --nocapture --test-threads 1 on_the_gpu
grep -E "SKIPPED|training on|resumed|trained weights|test result|panicked" "$OUT/backend.log" | tail -n 6
# The CLI end to end on the GPU: ShapesWorld images through `rlaifd generate --device cuda` (vision tower, decoder,
# sampling), the same prompts on the CPU for comparison.
"$bins/rlaifd" shapes gen --seed 7 --count 3 --out "$work/shapes" >/dev/null 2>&1
printf '{"image": "%s", "prompt": "Describe the image."}\n' 000000.png 000001.png 000002.png > "$work/shapes/batch.jsonl" 2>/dev/null
stage "generate --device cuda (ShapesWorld, greedy)" generate.log 120 "$bins/rlaifd" generate --model assets/shapes-base --batch "$work/shapes/batch.jsonl" --max-new-tokens 24 --json --device cuda
stage "generate --device cpu (the same prompts)" generate.log 120 "$bins/rlaifd" generate --model assets/shapes-base --batch "$work/shapes/batch.jsonl" --max-new-tokens 24 --json --device cpu
grep -E '^\{|generating on|error' "$OUT/generate.log" | tail -n 8
fi
if part bench; then
mma_check
stage "bench-gpu (rlaifd)" bench.log 300 "$bins/rlaifd" bench-gpu --shape "$SHAPE" --prompt "$PROMPT" --decode "$DECODE" --reps "${REPS:-3}" --n 10
grep -E "decoder, batch 1|argmax on the device|without graph replay|batch-1 projection|one launch|then add|attn_decode" "$OUT/bench.log" | tail -n 30
stage "bench-gpu-batch (rlaifd: continuous batching against one request at a time)" bench.log 300 "$bins/rlaifd" bench-gpu-batch --shape "$SHAPE" --prompt "$PROMPT" --decode "$DECODE" --clients "${CLIENTS:-32}" --reps "${REPS:-3}"
grep -E "continuous batch" "$OUT/bench.log" | tail -n 2
stage "bench-gpu-train (rlaifd)" bench.log 300 "$bins/rlaifd" bench-gpu-train --shape "$SHAPE" --seq "$SEQ" --answer "$ANSWER" --rank "$RANK" --reps "${REPS:-5}" --warmup 2
grep -E "DPO step|image path" "$OUT/bench.log" | tail -n 4
# Full-parameter DPO: a 7B decoder does not fit it (about 125 GiB), so a 1.1B one (or the tiny shape of a quick run).
stage "bench-gpu-train --full-parameter (rlaifd)" bench.log 300 "$bins/rlaifd" bench-gpu-train --full-parameter --shape "$FULL_SHAPE" --seq "$SEQ" --answer "$ANSWER" --reps "${REPS:-5}" --warmup 2
grep -E "full-parameter DPO" "$OUT/bench.log" | tail -n 1
fi
if ! part peer; then
  :
elif [ -n "$py" ] && "$py" -c "import torch, transformers" 2>/dev/null; then
  stage "bench peer (transformers)" peer.log 300 env PYTHONUNBUFFERED=1 "$py" benches/gpu_peer.py --shape "$SHAPE" --prompt "$PROMPT" --decode "$DECODE" --reps "${REPS:-3}" --clients "${CLIENTS:-32}"
  tail -n 1 "$OUT/peer.log"
  if "$py" -c "import peft" 2>/dev/null; then
    stage "bench peer (PyTorch + peft DPO/SFT)" peer.log 300 env PYTHONUNBUFFERED=1 "$py" benches/gpu_peer_dpo.py --shape "$SHAPE" --seq "$SEQ" --answer "$ANSWER" --rank "$RANK" --reps "${REPS:-5}" --warmup 2
    tail -n 1 "$OUT/peer.log"
    stage "bench peer (PyTorch full-parameter DPO)" peer.log 300 env PYTHONUNBUFFERED=1 "$py" benches/gpu_peer_dpo.py --full-parameter --shape "$FULL_SHAPE" --seq "$SEQ" --answer "$ANSWER" --reps "${REPS:-5}" --warmup 2
    tail -n 1 "$OUT/peer.log"
  fi
else
  echo "== bench peer skipped: no torch/transformers in $py" | tee "$OUT/peer.log"
fi
if part sanitize; then
  san=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
  if [ -z "$san" ]; then
    echo "== sanitize skipped: no compute-sanitizer on PATH or in /usr/local/cuda/bin" | tee "$OUT/sanitize.log"
  else
    for tool in memcheck racecheck synccheck; do
      for t in cuda_parity cuda_train_parity; do
        if [ "$tool" = racecheck ]; then
          # racecheck reports hazards inside cuBLASLt's own Hopper GEMM kernels (nvjet_*, which synchronise through
          # hardware barriers it does not model), and excluding them (--kernel-name-exclude kns=nvjet) made the
          # sanitizer fail on an H200 ("Internal Sanitizer Error ... hardware exception", then an illegal address in
          # the next call). So racecheck watches every kernel, and the stage fails on a test failure or on a hazard
          # in a kernel of rlaifd's (any kernel not named nvjet_*).
          stage "compute-sanitizer --tool racecheck $t" sanitize.log 150 "$san" --tool racecheck "$bins/$t" --test-threads 1
          sed -n "/^== compute-sanitizer --tool racecheck $t\$/,\$p" "$OUT/sanitize.log" > "$work/racecheck.log"
          ours=$(racecheck_ours "$work/racecheck.log")
          echo "   hazards in rlaifd's kernels: ${ours:-none}; reports in cuBLASLt's nvjet kernels: $(grep -c 'Race reported between .* at nvjet_' "$work/racecheck.log")" | tee -a "$OUT/sanitize.log"
          [ -n "$ours" ] && status=1
          continue
        fi
        stage "compute-sanitizer --tool $tool $t" sanitize.log 150 "$san" --tool "$tool" --error-exitcode 3 "$bins/$t" --test-threads 1
      done
    done
    grep -E "^== |ERROR SUMMARY|RACECHECK SUMMARY|hazards in|test result|FAILED" "$OUT/sanitize.log" | tail -n 30
  fi
fi
exit $status
