#!/usr/bin/env bash
# Shared runner of the fixture generators (tools/gen_fixtures.sh, gen_grad_fixtures.sh, gen_sft_fixtures.sh):
# creates the venv once (pyenv.sh), pins threads, hash seed and offline mode (deterministic output, no GPU, no
# network), then runs tools/SCRIPT with ARGS.  Usage: tools/run_fixture_gen.sh SCRIPT [ARGS...]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ $# -lt 1 ]; then
  echo "usage: $0 SCRIPT [ARGS...]   (SCRIPT: a generator in $here, e.g. gen_fixtures.py)" >&2
  exit 2
fi
script="$1"
shift
# shellcheck disable=SC1090
source "$("$here/pyenv.sh")"
export PYTHONHASHSEED=0 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 CUDA_VISIBLE_DEVICES="" TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore
exec python "$here/$script" "$@"
