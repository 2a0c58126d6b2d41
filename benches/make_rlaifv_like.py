"""Writes an RLAIF-V-shaped parquet file for the import / export benchmark (benches/dataset_io.sh): IMAGES noise
JPEGs of 640 x 480 (about 217 KB each, as large as RLAIF-V's COCO photos), PER rows per image (RLAIF-V asks
several questions of an image), answers of about 600 characters, written by tools/rlaifv_parquet.py with
`datasets`, 100 rows per row group. Usage: python benches/make_rlaifv_like.py DIR [IMAGES] [PER]"""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

out = sys.argv[1]
n_img = int(sys.argv[2]) if len(sys.argv) > 2 else 300
per = int(sys.argv[3]) if len(sys.argv) > 3 else 12
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(0)
rows = []
for i in range(n_img):
    a = (rng.random((480, 640, 3)) * 255).astype("uint8")
    a[::2] //= 2
    Image.fromarray(a).save(os.path.join(out, f"img{i}.jpg"), quality=85)
    for j in range(per):
        rows.append({"image": f"img{i}.jpg", "question": f"Question {j} about image {i}: describe it in detail.",
                     "chosen": "A detailed and correct answer. " * 20, "rejected": "A detailed but wrong answer. " * 20,
                     "idx": str(len(rows))})
spec = os.path.join(out, "spec.jsonl")
with open(spec, "w") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
here = os.path.dirname(os.path.abspath(__file__))
subprocess.run([sys.executable, os.path.join(here, "..", "tools", "rlaifv_parquet.py"), spec,
                os.path.join(out, "RLAIF-V-Dataset_000.parquet"), "--rows-per-group", "100"], check=True)
