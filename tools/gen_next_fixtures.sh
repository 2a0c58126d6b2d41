#!/usr/bin/env bash
# Regenerates the LLaVA-NeXT parity fixtures under tests/fixtures/llava_next/ (deterministic for the same library
# versions and CPU). Needs no GPU and no network beyond the one-time venv install done by pyenv.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
exec "$here/run_fixture_gen.sh" gen_next_fixtures.py --out "$root/tests/fixtures/llava_next" "$@"
