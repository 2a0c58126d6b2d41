#!/usr/bin/env bash
# Serving latency while the loop runs (BENCHMARKS.md, "Daemon: serving latency by loop stage"): starts
# `rlaifd serve` on the bundled model with the demo's loop settings on a fresh database, measures chat latency per
# stage for SECONDS (default 150) with benches/serve_latency.py, then stops the daemon.
# Usage: benches/serve_latency.sh [SECONDS]   (needs PostgreSQL at 127.0.0.1:5432, user postgres)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-150}
cargo build --release --locked -p rlaifd 2>&1 | tail -n 1
work=$(mktemp -d)
db=rlaifd_bench_latency
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)"
cat > "$work/rlaifd.toml" <<TOML
[database]
url = "postgres://postgres@127.0.0.1:5432/$db"
[model]
path = "$PWD/assets/shapes-base"
[state]
dir = "$work/state"
[server]
bind = "127.0.0.1:0"
[loop]
max_new_tokens = 48
length_balance = false
nll_weight = 3.0
lr = 2e-4
epochs = 1
prompts_per_iteration = 300
pairs_per_iteration = 300
eval_count = 100
TOML
target/release/rlaifd serve --config "$work/rlaifd.toml" 2> "$work/daemon.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
until [ -f "$work/state/server.addr" ] && [ -S "$work/state/control.sock" ]; do sleep 0.2; done
target/release/rlaifd shapes gen --seed 4242 --count 1 --out "$work/img" > /dev/null
python3 benches/serve_latency.py --addr "$(cat "$work/state/server.addr")" --socket "$work/state/control.sock" --seconds "$secs" --image "$work/img/000000.png"
