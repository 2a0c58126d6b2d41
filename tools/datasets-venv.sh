#!/usr/bin/env bash
# Creates (once) the small Python venv the import/export and API-client tests use: Hugging Face `datasets` (and
# pyarrow, which it brings), Pillow, transformers' tokenizers, TRL's data utilities, the official `openai` client
# and `prometheus_client`; nothing with torch. Prints
# the venv's python. The daemon never runs Python.
# Venv: $RLAIFD_DATASETS_VENV, default target/datasets-venv. Usage: py=$(tools/datasets-venv.sh)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${RLAIFD_DATASETS_VENV:-$here/target/datasets-venv}"
stamp="$venv/.rlaifd-datasets-v3"
mkdir -p "$(dirname "$venv")"
# Tests run in parallel: one creates the venv, the others wait for it.
exec 9>"$venv.lock"
flock 9
if [ ! -f "$stamp" ]; then
  echo "creating the datasets venv at $venv (datasets, pillow; once)" >&2
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "datasets>=3" pillow "transformers>=4.52" jinja2 \
    "openai>=1.50" prometheus_client >&2
  # TRL's data utilities only: its trainer and collator need torch (and accelerate), which this venv leaves out.
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps "trl>=0.19" >&2
  touch "$stamp"
fi
echo "$venv/bin/python"
