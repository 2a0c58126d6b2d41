"""Writes a parquet file in the RLAIF-V dataset's published layout (openbmb/RLAIF-V-Dataset: ds_name, image,
question, chosen, rejected, origin_dataset, origin_split, idx, image_path), the way the hub's files were made: a
Hugging Face `datasets` Dataset with an Image feature, saved with `to_parquet`. Test tooling only.

Usage: python tools/rlaifv_parquet.py SPEC.jsonl OUT.parquet [--rows-per-group N] [--drop COLUMN ...]
SPEC lines: {"image": file (bytes embedded as they are), "question", "chosen", "rejected", "idx"}, any field may be
null; "image_bytes": false keeps only the path (an image not embedded)."""
import argparse
import json
import os

import datasets


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("out")
    ap.add_argument("--rows-per-group", type=int, default=2)
    ap.add_argument("--drop", action="append", default=[])
    a = ap.parse_args()
    base = os.path.dirname(os.path.abspath(a.spec))
    cols = {k: [] for k in ["ds_name", "image", "question", "chosen", "rejected", "origin_dataset", "origin_split", "idx", "image_path"]}
    with open(a.spec) as f:
        for line in f:
            if not line.strip():
                continue
            s = json.loads(line)
            img = s.get("image")
            if img is None:
                cols["image"].append(None)
            elif s.get("image_bytes", True):
                with open(os.path.join(base, img), "rb") as g:
                    cols["image"].append({"bytes": g.read(), "path": img})
            else:
                cols["image"].append({"bytes": None, "path": img})
            cols["ds_name"].append("ShapesWorld")
            cols["question"].append(s.get("question"))
            cols["chosen"].append(s.get("chosen"))
            cols["rejected"].append(s.get("rejected"))
            cols["origin_dataset"].append("shapesworld")
            cols["origin_split"].append(json.dumps({"model": "shapes-base", "feedback_model": "exact", "type": "detailed_description"}))
            cols["idx"].append(str(s.get("idx", len(cols["idx"]))))
            cols["image_path"].append(img)
    string = datasets.Value("string")
    raw = datasets.Features({"bytes": datasets.Value("binary"), "path": string})
    features = datasets.Features({k: (raw if k == "image" else string) for k in cols})
    # Cast to Image from its storage struct: the bytes stay embedded whatever files the paths name here
    # (encoding a dict whose path exists would keep the path only).
    ds = datasets.Dataset.from_dict(cols, features=features).cast_column("image", datasets.Image())
    for c in a.drop:
        ds = ds.remove_columns(c)
    ds.to_parquet(a.out, batch_size=a.rows_per_group)


if __name__ == "__main__":
    main()
