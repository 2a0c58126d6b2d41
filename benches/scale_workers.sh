#!/usr/bin/env bash
# Sample + label throughput of one loop iteration with N worker processes on one database (BENCHMARKS.md,
# "Daemon: many workers on one database"). Starts N `rlaifd --threads 1 serve` daemons on the bundled ShapesWorld
# model and a fresh database: the first has every role (it starts the iteration), the others only sample and
# label. Asks for an iteration, waits until its sample and label jobs are all done, prints one JSON line (jobs,
# seconds from the first job taken to the last one finished, jobs per second, jobs per worker) and stops them.
# Usage: benches/scale_workers.sh N [PROMPTS] [ANSWERS]   (defaults 24 prompts, 8 answers each; PostgreSQL at 127.0.0.1:5432, user postgres; build first:
#        cargo build --release --locked -p rlaifd)
# DEVICES sets model.devices of every worker (e.g. DEVICES='"all"' on a GPU host, DEVICES='["cuda:0"]' for one
# device; DEVICES='["cpu", "cpu"]' for two CPU engines), THREADS its --threads (default 1).
# PIN=1 confines worker i to core i-1 (taskset): one core per worker, so one worker cannot use the other core
# through its engine thread's hand-offs to its one-thread pool.
# Side by side: farm-bench -n 3 --timeout 1800 --vs 'benches/scale_workers.sh 1' -- benches/scale_workers.sh 2
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:?usage: benches/scale_workers.sh N [PROMPTS] [ANSWERS]}
prompts=${2:-24}
answers=${3:-8}
bin=target/release/rlaifd
[ -x "$bin" ] || { echo "build first: cargo build --release --locked -p rlaifd" >&2; exit 2; }
work=$(mktemp -d)
db=rlaifd_bench_scale_$$
psql() { command psql -h 127.0.0.1 -U postgres -Atq "$@"; }
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
  rm -rf "$work"
}
trap cleanup EXIT
for i in $(seq 1 "$n"); do
  roles='"sample", "label"'
  [ "$i" = 1 ] && roles='"serve", "sample", "label", "train", "gate"'
  mkdir -p "$work/$i"
  cat > "$work/$i/rlaifd.toml" <<TOML
[database]
url = "postgres://postgres@127.0.0.1:5432/$db"
[model]
path = "$PWD/assets/shapes-base"
devices = ${DEVICES:-[]}
[state]
dir = "$work/$i/state"
[server]
bind = "127.0.0.1:0"
[daemon]
auto_iterate = false
poll_s = 0.2
roles = [$roles]
[loop]
n = $answers
max_new_tokens = 48
prompts_per_iteration = $prompts
pairs_per_iteration = 1
TOML
  pin=()
  [ "${PIN:-0}" = 1 ] && pin=(taskset -c $(( (i - 1) % $(nproc) )))
  "${pin[@]}" "$bin" --threads "${THREADS:-1}" serve --config "$work/$i/rlaifd.toml" 2> "$work/$i/daemon.log" &
  pids+=($!)
  # The first daemon creates and migrates the database; the others start after it.
  until [ -S "$work/$i/state/control.sock" ]; do
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$work/$i/daemon.log" >&2; exit 1; }
    sleep 0.1
  done
done
"$bin" ctl --socket "$work/1/state/control.sock" iterate > /dev/null
until [ "$(psql -d "$db" -c "SELECT count(*) FROM iterations WHERE stage <> 'sampling'")" = 1 ]; do sleep 0.2; done
psql -d "$db" -c "
  SELECT json_build_object('workers', $n, 'devices', '${DEVICES:-[]}', 'jobs', count(*),
         'seconds', round(extract(epoch FROM max(finished_at) - min(started_at))::numeric, 3),
         'jobs_per_s', round((count(*) / extract(epoch FROM max(finished_at) - min(started_at)))::numeric, 3),
         'per_worker', (SELECT json_object_agg(w, c) FROM (SELECT worker AS w, count(*) AS c FROM jobs
                        WHERE kind IN ('sample', 'label') GROUP BY worker) x))
  FROM jobs WHERE kind IN ('sample', 'label') AND status = 'done'"
