#!/usr/bin/env bash
# Trains the ShapesWorld base model (assets/shapes-base) with rlaifd's own SFT, then evaluates it.
# Usage: tools/train_shapes_base.sh [OUT_DIR]   (default target/shapes-base; the committed model came from this)
# Deterministic: same binary, same CPU kind -> the same model.safetensors, whatever the thread count.
#
# Two phases.
#  v1 (about 50 min): four SFT stages from random weights with a 67-word vocabulary; that model is committed as
#     assets/shapes-base in git commit 98a4845 and was made by tools/train_shapes_base.sh of that commit. This
#     script starts from it (`git show`), so it needs a git checkout.
#  v2 (this script, about 50 min): the vocabulary gains the labeler's "please answer yes or no" (new rows: the mean
#     word embedding), then three SFT stages on fresh images whose yes/no questions include hard negatives (an absent
#     object sharing a present object's colour, one sharing its shape) and carry the labeler's suffix half the time.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/shapes-base}
WORK=$OUT.work
BIN=target/release/rlaifd
V1=98a4845
cargo build --release --locked -p rlaifd
rm -rf "$WORK" && mkdir -p "$WORK/v1" "$OUT"
# The tokenizer is a pure function of the ShapesWorld vocabulary: regenerate and check it matches the asset.
$BIN shapes tokenizer --out "$WORK/tokenizer.json"
cmp "$WORK/tokenizer.json" assets/shapes-base/tokenizer.json
git show "$V1:assets/shapes-base/model.safetensors" > "$WORK/v1.safetensors"
echo "a3cdfb31b9727d74fb9b7c76040bd00631a0a9873c93d94f0fa5e15202c21029  $WORK/v1.safetensors" | sha256sum -c
python3 tools/extend_vocab.py "$WORK/v1.safetensors" "$WORK/v1/model.safetensors" 67 70
cp assets/shapes-base/config.json assets/shapes-base/tokenizer.json assets/shapes-base/preprocessor_config.json "$WORK/v1/"
$BIN shapes sft --seed 5 --count 8000 --caption-noise 0.7 --caption-order canonical --out "$WORK/train5"
$BIN shapes sft --seed 6 --count 8000 --caption-noise 0.7 --caption-order canonical --out "$WORK/train6"
$BIN shapes sft --seed 7 --count 8000 --caption-noise 0.7 --caption-order canonical --out "$WORK/train7"
$BIN shapes sft --seed 900000 --count 200 --caption-noise 0.7 --out "$WORK/heldout"
sft() { # stage: model data out [extra train-sft flags]
  time $BIN train-sft --model "$2" --data "$3/sft.jsonl" --eval "$WORK/heldout/sft.jsonl" --out "$4" --full \
    --lr 3e-4 --batch-size 32 --epochs 2 --weight-decay 0.01 --seed 0 "${@:5}" > "$WORK/stage$1.log"
}
sft 5 "$WORK/v1" "$WORK/train5" "$WORK/sft5"
sft 6 "$WORK/sft5" "$WORK/train6" "$WORK/sft6"
sft 7 "$WORK/sft6" "$WORK/train7" "$WORK/sft"
cp "$WORK/sft/model.safetensors" "$WORK/sft/config.json" assets/shapes-base/tokenizer.json \
  assets/shapes-base/preprocessor_config.json "$OUT/"
sha256sum "$OUT/model.safetensors"
$BIN eval hallucination --model "$OUT" --seed 1000000 --count 200
