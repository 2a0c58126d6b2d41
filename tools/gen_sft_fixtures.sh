#!/usr/bin/env bash
# Regenerates the full-parameter SFT gradient-parity fixtures under tests/fixtures/sft/ from the tiny models in
# tests/fixtures/llava/ (transformers, float32 on CPU; deterministic). Needs no GPU and no network beyond the
# one-time venv install done by pyenv.sh. Usage: tools/gen_sft_fixtures.sh [--llava DIR] [--out DIR]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
exec "$here/run_fixture_gen.sh" gen_sft_fixtures.py --llava "$root/tests/fixtures/llava" \
  --out "$root/tests/fixtures/sft" "$@"
