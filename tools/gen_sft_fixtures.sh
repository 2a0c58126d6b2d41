#!/usr/bin/env bash
# Regenerates the full-parameter SFT gradient-parity fixtures under tests/fixtures/sft/ from the tiny models in
# tests/fixtures/llava/ (transformers, float32 on CPU; deterministic). Needs no GPU and no network beyond the
# one-time venv install done by pyenv.sh. Usage: tools/gen_sft_fixtures.sh [--llava DIR] [--out DIR]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
# shellcheck disable=SC1090
source "$("$here/pyenv.sh")"
export PYTHONHASHSEED=0 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 CUDA_VISIBLE_DEVICES="" TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore
exec python "$here/gen_sft_fixtures.py" --llava "$root/tests/fixtures/llava" --out "$root/tests/fixtures/sft" "$@"
