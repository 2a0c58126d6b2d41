#!/usr/bin/env bash
# Continuous batching (BENCHMARKS.md, "Daemon: continuous batching"): starts `rlaifd serve` on the bundled model
# (no loop iterations) twice on a fresh database: with server.max_batch = 64 (the default: concurrent requests
# share decode steps) and with server.max_batch = 1 (one answer per step: requests take turns), and runs
# benches/serve_batching.py against each: 16 sequential requests vs 16 concurrent clients, ROUNDS rounds.
# Usage: benches/serve_batching.sh [ROUNDS]   (needs PostgreSQL at 127.0.0.1:5432, user postgres)
# RLAIFD_BIN=PATH runs that binary instead of building this checkout's (e.g. an earlier commit's, side by side).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
bin=${RLAIFD_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --locked -p rlaifd 2>&1 | tail -n 1
  bin=target/release/rlaifd
fi
work=$(mktemp -d)
db=rlaifd_bench_batching
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
pid=
"$bin" shapes gen --seed 4242 --count 1 --out "$work/img" > /dev/null
for max_batch in 64 1; do
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)"
  rm -rf "$work/state"
  cat > "$work/rlaifd.toml" <<TOML
[database]
url = "postgres://postgres@127.0.0.1:5432/$db"
[model]
path = "$PWD/assets/shapes-base"
[state]
dir = "$work/state"
[server]
bind = "127.0.0.1:0"
max_batch = $max_batch
[daemon]
auto_iterate = false
TOML
  "$bin" serve --config "$work/rlaifd.toml" 2> "$work/daemon.log" &
  pid=$!
  until [ -f "$work/state/server.addr" ] && [ -S "$work/state/control.sock" ]; do sleep 0.2; done
  python3 benches/serve_batching.py --addr "$(cat "$work/state/server.addr")" --image "$work/img/000000.png" \
    --rounds "$rounds" --label "server.max_batch = $max_batch:"
  kill $pid; wait $pid 2>/dev/null || true
done
