#!/usr/bin/env bash
# Creates (once) the Python venv used only by fixture generators and benchmarks.
# The daemon never runs Python. Usage: source "$(tools/pyenv.sh)"  or  tools/pyenv.sh && tools/.venv/bin/python ...
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${RLAIFD_PYENV:-$here/.venv}"
stamp="$venv/.rlaifd-deps-v1"
if [ ! -f "$stamp" ]; then
  echo "creating Python venv at $venv (torch, transformers, peft; a few minutes the first time)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip >&2
  "$venv/bin/pip" install --quiet "torch>=2.4" "transformers>=4.52,<6" "peft>=0.13" pillow numpy safetensors tokenizers >&2
  touch "$stamp"
fi
echo "$venv/bin/activate"
