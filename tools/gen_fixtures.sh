#!/usr/bin/env bash
# Regenerates every parity fixture under tests/fixtures/llava/ (deterministic: same library versions and CPU
# give byte-identical files). Needs no GPU and no network beyond the one-time venv install done by pyenv.sh.
# Usage: tools/gen_fixtures.sh [--only CASE...] [--no-verify]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
"$here/pyenv.sh" >/dev/null
venv="${RLAIFD_PYENV:-$here/.venv}"
export PYTHONHASHSEED=0 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 CUDA_VISIBLE_DEVICES="" TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore
exec "$venv/bin/python" "$here/gen_fixtures.py" --out "$root/tests/fixtures/llava" "$@"
