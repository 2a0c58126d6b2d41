"""Runs an `rlaifd export` file through TRL's own vision preference collator (`DataCollatorForVisionPreference`,
what `DPOTrainer` uses for a vision-language model): a LLaVA processor built from a model directory rlaifd loads
(CLIP image processor, tokenizer.json, a LLaVA-1.5 chat template), then one batch of the export's rows. Prints the
batch's tensor shapes and, per row, the chosen completion decoded from the completion mask, as JSON. Needs torch,
transformers and TRL (not part of the test venv; run it with a Python that has them).

Usage: python tools/trl_collator_check.py MODEL_DIR EXPORT.parquet [ROWS]"""
import json
import sys

import datasets
from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

# LLaVA-1.5's conversation format as a chat template (image parts become the <image> placeholder).
TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'user' %}USER: {% for p in m.content %}"
    "{% if p.type == 'image' %}<image>\n{% else %}{{ p.text }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for p in m.content %}{{ p.text }}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def main():
    model_dir, export = sys.argv[1], sys.argv[2]
    rows = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    cfg = json.load(open(f"{model_dir}/config.json"))
    image_processor = CLIPImageProcessor(**json.load(open(f"{model_dir}/preprocessor_config.json")))
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{model_dir}/tokenizer.json", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=TEMPLATE,
                               patch_size=cfg["vision_config"]["patch_size"], vision_feature_select_strategy=strategy,
                               image_token="<image>", num_additional_image_tokens=1)
    ds = datasets.load_dataset("parquet", data_files=export, split="train")
    examples = [ds[i] for i in range(min(rows, ds.num_rows))]
    batch = DataCollatorForVisionPreference(processor)(examples)
    n = len(examples)
    chosen = []
    for i in range(n):
        ids = batch["input_ids"][i][batch["completion_mask"][i].bool()].tolist()
        chosen.append(tok.decode(ids, skip_special_tokens=False))
    image_token = tok.convert_tokens_to_ids("<image>")
    print(json.dumps({
        "shapes": {k: list(v.shape) for k, v in batch.items() if hasattr(v, "shape")},
        "image_tokens_per_row": [int((batch["input_ids"][i] == image_token).sum()) for i in range(2 * n)],
        "chosen": chosen,
        "rows": n,
    }))


if __name__ == "__main__":
    main()
