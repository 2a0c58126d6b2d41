#!/usr/bin/env bash
# Regenerates tests/fixtures/chat/cases.json: chat templates rendered by transformers' apply_chat_template.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
exec "$here/run_fixture_gen.sh" gen_chat_fixtures.py --out "$root/tests/fixtures/chat" "$@"
