#!/usr/bin/env bash
# `rlaifd import` and `rlaifd export` on an RLAIF-V-shaped file (benches/make_rlaifv_like.py: 3600 rows, 300
# distinct 640 x 480 JPEGs, 781 MB), side by side with Hugging Face `datasets` reading the same file (every row,
# every image decoded): wall time and peak memory, median of 5 (farm-bench). Needs the release binary and a local
# PostgreSQL (database rlaifd_bench_io, recreated each run). Usage: benches/dataset_io.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/tmp/rlaifd-dataset-io}
py=$(tools/datasets-venv.sh)
[ -f "$dir/RLAIF-V-Dataset_000.parquet" ] || "$py" benches/make_rlaifv_like.py "$dir" >/dev/null
url=${RLAIFD_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/rlaifd_bench_io}
admin=${url%/*}/postgres
db=${url##*/}
bin=$PWD/target/release/rlaifd
file=$dir/RLAIF-V-Dataset_000.parquet
read_all="import datasets; ds = datasets.load_dataset('parquet', data_files='$file', split='train', cache_dir='$dir/hf-cache')
n = sum(1 for r in ds if r['image'].load() is None)"
fresh="psql '$admin' -qc 'DROP DATABASE IF EXISTS $db' -c 'CREATE DATABASE $db' >/dev/null 2>&1"
echo "== import --as pairs (fresh database each run) vs datasets reading every row and decoding every image"
farm-bench -n 5 --timeout 900 --vs "sh -c \"rm -rf $dir/hf-cache; $py -c \\\"$read_all\\\"\"" \
  -- sh -c "$fresh; $bin import $file --as pairs --database-url $url >/dev/null 2>&1"
echo "== export --pairs imported (3600 pairs)"
farm-bench -n 5 --timeout 900 -- sh -c "$bin export --pairs imported --out $dir/export.parquet --database-url $url >/dev/null 2>&1"
