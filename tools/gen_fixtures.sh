#!/usr/bin/env bash
# Regenerates every parity fixture under tests/fixtures/llava/ (deterministic: same library versions and CPU
# give byte-identical files). Needs no GPU and no network beyond the one-time venv install done by pyenv.sh.
# Usage: tools/gen_fixtures.sh [--only CASE...] [--no-verify]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
exec "$here/run_fixture_gen.sh" gen_fixtures.py --out "$root/tests/fixtures/llava" "$@"
