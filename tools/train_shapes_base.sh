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
# Training data: captions with co-occurrence noise, exact yes/no, count and attribute answers. Two stages of
# fresh images (the model sees a new 8000-image set in stage 2; a tiny ViT trained from scratch needs the
# second learning-rate cycle before it sees shapes reliably).
$BIN shapes sft --seed 1 --count 8000 --caption-noise 0.7 --out "$WORK/train"
$BIN shapes sft --seed 2 --count 8000 --caption-noise 0.7 --out "$WORK/train2"
$BIN shapes sft --seed 900000 --count 200 --caption-noise 0.7 --out "$WORK/heldout"
time $BIN train-sft --model "$WORK/init" --data "$WORK/train/sft.jsonl" --eval "$WORK/heldout/sft.jsonl" \
  --out "$WORK/sft1" --full --lr 5e-4 --batch-size 32 --epochs 2 --weight-decay 0.01 --seed 0 > "$WORK/train1.log"
time $BIN train-sft --model "$WORK/sft1" --data "$WORK/train2/sft.jsonl" --eval "$WORK/heldout/sft.jsonl" \
  --out "$WORK/sft" --full --lr 5e-4 --batch-size 32 --epochs 2 --weight-decay 0.01 --seed 0 > "$WORK/train2.log"
cp "$WORK/sft/model.safetensors" "$WORK/sft/config.json" assets/shapes-base/tokenizer.json \
  assets/shapes-base/preprocessor_config.json "$OUT/"
sha256sum "$OUT/model.safetensors"
$BIN eval hallucination --model "$OUT" --seed 1000000 --count 200
