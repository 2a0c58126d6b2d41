#!/usr/bin/env bash
# Trains the ShapesWorld divide model (assets/shapes-divide): a small text-only LLaMA, from random weights, that
# lists the claims of a free-form ShapesWorld answer one a line and writes each claim's yes/no question
# (`rlaifd shapes sft --mix divide`: answers with lists, pronouns, relations, hedges and opinions, and their exact
# claims). RLAIF-V fine-tuned its own divide model; this is ours in miniature. The prompts it learns are written
# beside it (divide_prompt.txt, question_prompt.txt), and `loop.extractor = "llm"` with
# `loop.extractor_model = "assets/shapes-divide"` asks it with them.
# Usage: tools/train_shapes_divide.sh [OUT_DIR]   (default target/shapes-divide)
# Deterministic: same binary, same CPU kind -> the same model.safetensors, whatever the thread count.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/shapes-divide}
WORK=$OUT.work
BIN=target/release/rlaifd
cargo build --release --locked -p rlaifd
rm -rf "$WORK" && mkdir -p "$WORK/tok" "$OUT"
$BIN shapes tokenizer --divide --out "$WORK/tok/tokenizer.json"
VOCAB=$(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))['model']['vocab']))" "$WORK/tok/tokenizer.json")
cat > "$WORK/config.json" <<JSON
{
  "architectures": ["LlamaForCausalLM"],
  "model_type": "llama",
  "vocab_size": $VOCAB,
  "hidden_size": 128,
  "intermediate_size": 256,
  "num_hidden_layers": 3,
  "num_attention_heads": 4,
  "num_key_value_heads": 4,
  "head_dim": 32,
  "max_position_embeddings": 256,
  "rms_norm_eps": 1e-05,
  "rope_theta": 10000.0,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "pad_token_id": 3,
  "tie_word_embeddings": false,
  "torch_dtype": "float32"
}
JSON
$BIN init-model --config "$WORK/config.json" --out "$WORK/init" --seed 0 --copy "$WORK/tok/tokenizer.json"
$BIN shapes sft --mix divide --seed 31 --count ${DIVIDE_COUNT:-8000} --max-objects 6 --out "$WORK/train31"
$BIN shapes sft --mix divide --seed 920000 --count 200 --max-objects 6 --out "$WORK/heldout"
time $BIN train-sft --model "$WORK/init" --data "$WORK/train31/sft.jsonl" --eval "$WORK/heldout/sft.jsonl" \
  --out "$WORK/sft" --full --lr ${DIVIDE_LR:-1e-3} --batch-size 32 --epochs ${DIVIDE_EPOCHS:-3} --weight-decay 0.01 \
  --seed 0 > "$WORK/train.log"
cp "$WORK/sft/model.safetensors" "$WORK/sft/config.json" "$WORK/tok/tokenizer.json" "$WORK/tok/divide_prompt.txt" \
  "$WORK/tok/question_prompt.txt" "$OUT/"
sha256sum "$OUT/model.safetensors"
# Held-out answers of a seed never trained on: object-claim precision, recall and F1 against the exact claims.
$BIN shapes divide --seed 5000000 --count 500 --out "$WORK/eval"
$BIN claims --extractor llm --extractor-model "$OUT" --answers "$WORK/eval/divide.jsonl" --out "$WORK/eval/llm.jsonl" \
  --device cpu
