"""Loads an `rlaifd export` file the way a TRL user does (Hugging Face `datasets`, parquet builder) and prints, as
JSON, its features and every row with its images decoded (size, mode) and their raw bytes' sha256, and the rows
as TRL's own preference-data preparation renders them (`trl.data_utils`; TRL's collator needs torch, which this
tooling does not install). Test tooling only.

Usage: python tools/load_export.py EXPORT.parquet"""
import hashlib
import json
import sys

import datasets


# A Qwen2-VL-style chat template (image parts become the vision placeholder), for TRL to render the rows with.
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}"
    "{% if p.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ p.text }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def trl_check(ds):
    """TRL's own preference-data preparation on every row: is it conversational preference data, and what
    prompt / chosen / rejected text does TRL render from it with a chat template (as DPOTrainer does before
    tokenizing)."""
    try:
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast
        from trl.data_utils import is_conversational, maybe_apply_chat_template
    except ImportError as e:
        return {"skipped": f"trl is not installed ({e})"}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tok.chat_template = TEMPLATE
    rendered = []
    for ex in ds:
        pref = {k: ex[k] for k in ("prompt", "chosen", "rejected")}
        rendered.append(maybe_apply_chat_template(pref, tok))
    return {"conversational": all(is_conversational(ex) for ex in ds), "rendered": rendered}


def main():
    path = sys.argv[1]
    ds = datasets.load_dataset("parquet", data_files=path, split="train")
    out = {"num_rows": ds.num_rows, "features": {k: repr(v) for k, v in ds.features.items()}}
    image_feature = ds.features["images"]
    out["images_are_images"] = isinstance(getattr(image_feature, "feature", None), datasets.Image) or (
        isinstance(image_feature, list) and isinstance(image_feature[0], datasets.Image))
    rows = []
    raw = ds.cast_column("images", datasets.Sequence(datasets.Image(decode=False)))
    for row, raw_row in zip(ds, raw):
        rows.append({
            "images": [{"size": list(im.size), "mode": im.mode} for im in row["images"]],
            "image_sha256": [hashlib.sha256(r["bytes"]).hexdigest() for r in raw_row["images"]],
            "prompt": row["prompt"],
            "chosen": row["chosen"],
            "rejected": row["rejected"],
            "kind": row["kind"],
            "pair_id": row["pair_id"],
            "iteration": row["iteration"],
            "score_gap": row["score_gap"],
            "source": row["source"],
        })
    out["rows"] = rows
    out["trl"] = trl_check(ds)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
