#!/usr/bin/env bash
# Trains the ShapesWorld labeler (assets/shapes-labeler): the base model fine-tuned in full on the labeler's own
# question only ("Is there a red circle in the image? Please answer yes or no."), balanced yes/no, with the absent
# objects a captioner confuses as negatives (`rlaifd shapes sft --mix labeler`). Three stages, about 25 min on
# 2 cores. RLAIF-V's 7B recipe labels with a stronger model than the policy; this is ours for ShapesWorld.
# Usage: tools/train_shapes_labeler.sh [OUT_DIR]   (default target/shapes-labeler)
# Deterministic: same binary, same CPU kind -> the same model.safetensors, whatever the thread count.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/shapes-labeler}
WORK=$OUT.work
BIN=target/release/rlaifd
cargo build --release --locked -p rlaifd
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"
$BIN shapes sft --mix labeler --seed 11 --count 8000 --out "$WORK/train11"
$BIN shapes sft --mix labeler --seed 12 --count 12000 --out "$WORK/train12"
$BIN shapes sft --mix labeler --seed 13 --count 12000 --out "$WORK/train13"
$BIN shapes sft --mix labeler --seed 910000 --count 200 --out "$WORK/heldout"
sft() { # stage: model data out lr epochs seed
  time $BIN train-sft --model "$2" --data "$3/sft.jsonl" --eval "$WORK/heldout/sft.jsonl" --out "$4" --full \
    --lr "$5" --batch-size 32 --epochs "$6" --weight-decay 0.01 --seed "$7" > "$WORK/stage$1.log"
}
sft 1 assets/shapes-base "$WORK/train11" "$WORK/lab1" 2e-4 1 0
sft 2 "$WORK/lab1" "$WORK/train12" "$WORK/lab2" 2e-4 2 1
sft 3 "$WORK/lab2" "$WORK/train13" "$WORK/lab3" 1e-4 2 2
cp "$WORK/lab3/model.safetensors" assets/shapes-base/config.json assets/shapes-base/tokenizer.json \
  assets/shapes-base/preprocessor_config.json "$OUT/"
sha256sum "$OUT/model.safetensors"
$BIN eval hallucination --model "$OUT" --seed 1000000 --count 200
