#!/usr/bin/env bash
# Trains the ShapesWorld base model (assets/shapes-base) from scratch with rlaifd's own SFT, then evaluates it.
# Usage: tools/train_shapes_base.sh [OUT_DIR]   (default target/shapes-base; the committed model came from this)
# Deterministic: same binary, same CPU kind -> the same model.safetensors, whatever the thread count.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/shapes-base}
WORK=$OUT.work
BIN=target/release/rlaifd
cargo build --release --locked -p rlaifd
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"
# The tokenizer is a pure function of the ShapesWorld vocabulary: regenerate and check it matches the asset.
$BIN shapes tokenizer --out "$WORK/tokenizer.json"
cmp "$WORK/tokenizer.json" assets/shapes-base/tokenizer.json
$BIN init-model --config assets/shapes-base/config.json --out "$WORK/init" --seed 0 \
  --copy assets/shapes-base/tokenizer.json --copy assets/shapes-base/preprocessor_config.json
# Training data (four stages): captions with co-occurrence noise, exact yes/no, count and attribute answers, on fresh images
# at every stage. Stages 1-2 list a caption's objects in reading order, stages 3-4 in vocabulary order (what the
# committed model writes): a ViT trained from scratch learns to see during the first stages, and listing in
# vocabulary order is then quick to learn. (Held-out loss is printed after each epoch; it does not steer training.)
$BIN shapes sft --seed 1 --count 8000 --caption-noise 0.7 --caption-order reading --out "$WORK/train1"
$BIN shapes sft --seed 2 --count 8000 --caption-noise 0.7 --caption-order reading --out "$WORK/train2"
$BIN shapes sft --seed 3 --count 8000 --caption-noise 0.7 --caption-order canonical --out "$WORK/train3"
$BIN shapes sft --seed 4 --count 8000 --caption-noise 0.7 --caption-order canonical --out "$WORK/train4"
$BIN shapes sft --seed 900000 --count 200 --caption-noise 0.7 --out "$WORK/heldout"
sft() { # stage: model data out [extra train-sft flags]
  time $BIN train-sft --model "$2" --data "$3/sft.jsonl" --eval "$WORK/heldout/sft.jsonl" --out "$4" --full \
    --lr 5e-4 --batch-size 32 --epochs 2 --weight-decay 0.01 --seed 0 "${@:5}" > "$WORK/stage$1.log"
}
sft 1 "$WORK/init" "$WORK/train1" "$WORK/sft1"
sft 2 "$WORK/sft1" "$WORK/train2" "$WORK/sft2" --stop-after 1111
sft 3 "$WORK/sft2" "$WORK/train3" "$WORK/sft3"
sft 4 "$WORK/sft3" "$WORK/train4" "$WORK/sft"
cp "$WORK/sft/model.safetensors" "$WORK/sft/config.json" assets/shapes-base/tokenizer.json \
  assets/shapes-base/preprocessor_config.json "$OUT/"
sha256sum "$OUT/model.safetensors"
$BIN eval hallucination --model "$OUT" --seed 1000000 --count 200
