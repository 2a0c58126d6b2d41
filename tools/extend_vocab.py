#!/usr/bin/env python3
"""Grows a LLaVA checkpoint's vocabulary for new words inserted before its image token (stdlib only).

Usage: extend_vocab.py IN.safetensors OUT.safetensors OLD_VOCAB NEW_VOCAB

Rows 0..OLD_VOCAB-2 of the token embedding and the LM head keep their ids; the new words get the ids
OLD_VOCAB-1 .. NEW_VOCAB-2, initialised to the mean of the existing word rows (ids 4..OLD_VOCAB-2), and the
image token's row (the last one) moves to NEW_VOCAB-1. Every other tensor is copied unchanged. Used by
tools/train_shapes_base.sh when ShapesWorld's vocabulary gained the labeler's "please answer yes or no".
"""
import json
import struct
import sys

ROWS = ("lm_head.weight", "model.language_model.embed_tokens.weight")


def main():
    src, dst, old, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if new <= old:
        sys.exit(f"NEW_VOCAB ({new}) must exceed OLD_VOCAB ({old})")
    raw = open(src, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    data = raw[8 + n :]
    out_header, chunks, offset = {}, [], 0
    for name in sorted(header, key=lambda k: header[k]["data_offsets"][0]):
        t = header[name]
        a, b = t["data_offsets"]
        blob = data[a:b]
        shape = list(t["shape"])
        if name in ROWS:
            if t["dtype"] != "F32" or shape[0] != old:
                sys.exit(f"{name}: expected F32 with {old} rows, found {t['dtype']} {shape}")
            width = shape[1]
            row = lambda i: struct.unpack(f"<{width}f", blob[4 * width * i : 4 * width * (i + 1)])
            words = [row(i) for i in range(4, old - 1)]
            mean = [sum(col) / len(words) for col in zip(*words)]
            extra = struct.pack(f"<{width}f", *mean) * (new - old)
            blob = blob[: 4 * width * (old - 1)] + extra + blob[4 * width * (old - 1) :]
            shape[0] = new
        out_header[name] = {"dtype": t["dtype"], "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        chunks.append(blob)
        offset += len(blob)
    if meta is not None:
        out_header["__metadata__"] = meta
    h = json.dumps(out_header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(chunks))


if __name__ == "__main__":
    main()
