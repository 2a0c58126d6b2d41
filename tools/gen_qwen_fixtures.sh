#!/usr/bin/env bash
# Regenerates the Qwen2-VL and Qwen2.5-VL parity fixtures under tests/fixtures/qwen_vl/ (deterministic for the
# same library
# versions and CPU). Needs no GPU and no network beyond the one-time venv install done by pyenv.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
exec "$here/run_fixture_gen.sh" gen_qwen_fixtures.py --out "$root/tests/fixtures/qwen_vl" "$@"
