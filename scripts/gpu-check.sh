#!/usr/bin/env bash
# Every GPU check in one go, on an x86-64 NVIDIA host (CUDA 13 driver; NVRTC and headers from /usr/local/cuda or
# the Python environment's nvidia packages), with the prebuilt binaries of scripts/build-gpu-bins
# (target/gpu-bins/). Builds nothing. Logs go to $OUT (default ./gpu-check-out).
#   1. rlaifd kernels: every kernel compiled by the daemon's NVRTC path for this GPU's and the target archs.
#   2. cuda_parity: every kernel and the cuBLASLt linear against float64 references on random inputs (rel. L2
#      <= 1e-2).
#   3. cuda_llama: the fp16 LLaMA decoder on the GPU against the CPU backend on the tiny fixtures (log-probs within
#      5e-2, same greedy tokens). Needs the fixtures: run from a checkout (tests/fixtures is in the tree).
#   4. rlaifd bench-gpu: prefill (640 tokens) and batch-1 decode of a random-weight LLaVA-1.5-7B-shaped decoder,
#      copy bandwidth and roofline; then benches/gpu_peer.py, transformers fp16 on the same GPU (if torch is there).
# Not yet here (issue 7 remainder): the vision tower and LoRA on the GPU, n=10 sampling with a shared prefix on
# the GPU (the peer's n=10 figure is measured already).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
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
# The test binaries were built elsewhere: point them at this checkout's kernels/ and tests/fixtures/.
export RLAIFD_ROOT=$PWD
{ nvidia-smi || true; echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"; echo "RLAIFD_CUDA_INCLUDE=${RLAIFD_CUDA_INCLUDE:-}"; } > "$OUT/env.log" 2>&1
status=0
echo "== rlaifd kernels" | tee "$OUT/kernels.log"
"$bins/rlaifd" kernels --arch sm_80 --arch sm_90 >> "$OUT/kernels.log" 2>&1 || status=1
tail -n 2 "$OUT/kernels.log"
echo "== cuda_parity" | tee "$OUT/parity.log"
"$bins/cuda_parity" --nocapture --test-threads 1 >> "$OUT/parity.log" 2>&1 || status=1
grep -E "CUDA device|SKIPPED|rel L2|test result|panicked" "$OUT/parity.log" | tail -n 60
echo "== cuda_llama" | tee "$OUT/llama.log"
"$bins/cuda_llama" --nocapture --test-threads 1 >> "$OUT/llama.log" 2>&1 || status=1
grep -E "SKIPPED|log-prob|greedy|test result|panicked" "$OUT/llama.log" | tail -n 20
echo "== bench-gpu (rlaifd)" | tee "$OUT/bench.log"
timeout 300 "$bins/rlaifd" bench-gpu --shape llava7b --prompt 640 --decode 128 --reps 3 >> "$OUT/bench.log" 2>&1 || status=1
tail -n 2 "$OUT/bench.log"
if [ -n "$py" ] && "$py" -c "import torch, transformers" 2>/dev/null; then
  echo "== bench peer (transformers)" | tee "$OUT/peer.log"
  timeout 300 "$py" benches/gpu_peer.py --shape llava7b --prompt 640 --decode 128 --reps 3 >> "$OUT/peer.log" 2>&1 || status=1
  tail -n 2 "$OUT/peer.log"
else
  echo "== bench peer skipped: no torch/transformers in $py" | tee "$OUT/peer.log"
fi
exit $status
