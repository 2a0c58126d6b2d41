#!/usr/bin/env python3
"""Generate fixtures for engine/tests/image_preprocess.rs (CLIP/LLaVA image preprocessing).

Usage:  tools/pyenv.sh && tools/.venv/bin/python tools/gen_image_fixtures.py

Writes tests/fixtures/image/:
  *.png / *.jpg        small source images (deterministic, each < 20 KB) plus malformed inputs
  cfg_*.json           preprocessor configs (HuggingFace preprocessor_config.json format)
  manifest.json        what to check, with offsets into expected.bin
  expected.bin         little-endian arrays: uint8 (Pillow decode / resize results) and
                       float32 (transformers pixel_values, CHW)

Reference implementation: transformers' PIL image processor (`CLIPImageProcessorPil` in
transformers >= 5, `CLIPImageProcessor` in 4.x) on images opened with
`PIL.Image.open(f).convert("RGB")` as LLaVA does, and LLaVA's `expand2square` for
pad_to_square. Note: transformers >= 5's own `convert_to_rgb` composites alpha onto white; LLaVA
(and transformers 4.x) drop alpha, which is what rlaifd reproduces, so images are converted to RGB
here before they reach the processor.
"""
import io
import json
import os
import struct
import sys
import zlib

import warnings

import numpy as np
import PIL
from PIL import Image, ImageDraw
import transformers

try:  # transformers >= 5: the PIL backend has its own class
    from transformers import CLIPImageProcessorPil as ClipPil
except ImportError:  # transformers 4.x: CLIPImageProcessor is the slow PIL version
    from transformers import CLIPImageProcessor as ClipPil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "image")


# ---------------------------------------------------------------------------------------------
# raw PNG writer (for bit depths / colour types Pillow cannot write, and malformed files)
# ---------------------------------------------------------------------------------------------
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(w, h, bit_depth, color_type, rows, extra_chunks=()):
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0))
    idat = png_chunk(b"IDAT", zlib.compress(b"".join(b"\x00" + r for r in rows), 9))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"".join(extra_chunks) + idat + png_chunk(b"IEND", b"")


def header_only_png(w, h):
    """Valid signature + IHDR declaring w x h, a tiny IDAT, IEND: a decompression-bomb header."""
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------
# deterministic source images (shapes + gradients: compress well, exercise clipping at edges)
# ---------------------------------------------------------------------------------------------
def pattern_rgb(w, h, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * xx / max(w - 1, 1)
    g = 255 * yy / max(h - 1, 1)
    b = 127.5 + 127.5 * np.sin((xx + 2 * yy) / 3.0)
    arr = np.stack([r, g, b], -1).round().astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(im)
    for _ in range(6):  # hard edges, saturated colours (bicubic overshoot -> clipping)
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(1, max(2, w // 2))), y0 + int(rng.integers(1, max(2, h // 2)))
        col = tuple(int(c) for c in rng.choice([0, 255], 3))
        (d.rectangle if rng.integers(0, 2) else d.ellipse)([x0, y0, x1, y1], fill=col)
    # a few single noisy pixels
    a = np.array(im)
    for _ in range(max(3, w * h // 100)):
        a[int(rng.integers(0, h)), int(rng.integers(0, w))] = rng.integers(0, 256, 3)
    return Image.fromarray(a, "RGB")


def make_sources():
    srcs = {}
    srcs["rgb_37x29.png"] = pattern_rgb(37, 29, 1)
    srcs["rgb_29x53.png"] = pattern_rgb(29, 53, 2)
    rgba = pattern_rgb(64, 48, 3).convert("RGBA")
    alpha = np.fromfunction(lambda y, x: (x * 4 + y * 2) % 256, (48, 64)).astype(np.uint8)
    alpha[10:20, 10:30] = 0  # fully transparent block: colour must survive (alpha dropped)
    rgba.putalpha(Image.fromarray(alpha, "L"))
    srcs["rgba_64x48.png"] = rgba
    srcs["gray_20x20.png"] = pattern_rgb(20, 20, 4).convert("L")
    srcs["tiny_13x7.png"] = pattern_rgb(13, 7, 5)
    srcs["big_300x200.png"] = pattern_rgb(300, 200, 6)
    return srcs


def main():
    warnings.filterwarnings("ignore", message="Palette images with Transparency")
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        os.remove(os.path.join(OUT, f))

    blob = bytearray()

    def put(arr):
        arr = np.ascontiguousarray(arr)
        if arr.dtype == np.float32:
            data, dtype = arr.astype("<f4").tobytes(), "f32"
        elif arr.dtype == np.uint8:
            data, dtype = arr.tobytes(), "u8"
        else:
            raise TypeError(arr.dtype)
        while len(blob) % 4:
            blob.append(0)
        off = len(blob)
        blob.extend(data)
        return {"offset": off, "len": int(arr.size), "dtype": dtype, "shape": list(arr.shape)}

    manifest = {
        "generator": "tools/gen_image_fixtures.py",
        "pillow": PIL.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "processor_class": ClipPil.__name__,
        "decode": [],
        "resize": [],
        "cases": [],
        "errors": [],
    }

    # ---- source images ------------------------------------------------------------------
    srcs = make_sources()
    for name, im in srcs.items():
        im.save(os.path.join(OUT, name), optimize=True)

    # pixel-format conversions PIL does in convert("RGB") (tiny raw PNGs)
    vals16 = [0, 1, 255, 256, 0x7FFF, 0x80FF, 0xFF00, 0xFFFF, 0x1234, 0xABCD, 300, 0x00FF]
    conv = {
        # 16-bit grey: PIL mode I;16, convert("RGB") clips to 255
        "gray16_12x2.png": raw_png(12, 2, 16, 0, [b"".join(struct.pack(">H", (v + 97 * r) & 0xFFFF) for v in vals16) for r in range(2)]),
        # 16-bit RGB: PIL keeps the most significant byte
        "rgb16_12x2.png": raw_png(12, 2, 16, 2, [b"".join(struct.pack(">HHH", v, (v * 7 + r) & 0xFFFF, 0xFFFF - v) for v in vals16) for r in range(2)]),
        # 16-bit grey+alpha (PIL opens as RGBA, MSB)
        "la16_12x2.png": raw_png(12, 2, 16, 4, [b"".join(struct.pack(">HH", v, 0x1234 * r) for v in vals16) for r in range(2)]),
        # 16-bit RGBA
        "rgba16_12x2.png": raw_png(12, 2, 16, 6, [b"".join(struct.pack(">HHHH", v, 0xFFFF - v, v ^ 0x5A5A, 0) for v in vals16) for r in range(2)]),
        # 4-bit grey (scaled by 17), 2-bit grey (x85)
        "gray4_12x2.png": raw_png(12, 2, 4, 0, [bytes([0x01, 0x23, 0x45, 0x67, 0x89, 0xAB]), bytes([0xCD, 0xEF, 0x10, 0x32, 0x54, 0x76])]),
        "gray2_12x2.png": raw_png(12, 2, 2, 0, [bytes([0x1B, 0xE4, 0x55]), bytes([0xAA, 0xFF, 0x00])]),
        # palette with transparency (tRNS): palette colours, alpha ignored
        "pal_trns_12x2.png": raw_png(
            12, 2, 8, 3, [bytes(range(12)), bytes(range(11, -1, -1))],
            extra_chunks=[png_chunk(b"PLTE", bytes(np.arange(36, dtype=np.uint8) * 7)), png_chunk(b"tRNS", bytes([0, 128, 255, 7]))],
        ),
        # 8-bit grey+alpha
        "la8_12x2.png": raw_png(12, 2, 8, 4, [bytes(sum(([i * 20, 255 - i * 20] for i in range(12)), [])) for _ in range(2)]),
    }
    for name, data in conv.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)

    # JPEGs: 4:4:4 and 4:2:0 (libjpeg-turbo vs the Rust decoder: compared with a tolerance)
    jp = pattern_rgb(40, 30, 7)
    jp.save(os.path.join(OUT, "rgb_40x30_q90_444.jpg"), quality=90, subsampling=0)
    jp.save(os.path.join(OUT, "rgb_40x30_q90_420.jpg"), quality=90, subsampling=2)
    pattern_rgb(24, 16, 8).convert("L").save(os.path.join(OUT, "gray_24x16.jpg"), quality=92)

    def load_rgb(name):
        with Image.open(os.path.join(OUT, name)) as im:
            return Image.fromarray(np.array(im.convert("RGB")), "RGB")  # fresh image: no .info

    all_decode = list(srcs) + list(conv) + ["rgb_40x30_q90_444.jpg", "rgb_40x30_q90_420.jpg", "gray_24x16.jpg"]
    for name in all_decode:
        if name == "big_300x200.png":
            continue  # 180 KB; its decode is covered by the resize and pixel_values checks
        arr = np.array(load_rgb(name))
        manifest["decode"].append({"image": name, "exact": not name.endswith(".jpg"), "rgb": put(arr)})

    # ---- Pillow resize, raw uint8 -------------------------------------------------------
    resize_targets = {
        "rgb_37x29.png": [(40, 32), (24, 24), (37, 64), (100, 29), (5, 3)],
        "rgb_29x53.png": [(32, 58), (20, 53), (29, 20), (1, 1), (25, 10)],
        "rgba_64x48.png": [(42, 32)],
        "gray_20x20.png": [(32, 32), (7, 7)],
        "tiny_13x7.png": [(59, 32), (13, 1), (200, 9)],
        "big_300x200.png": [(48, 32), (7, 5), (320, 7), (33, 50), (280, 9)],
    }
    pillow_major = int(PIL.__version__.split(".")[0])
    for name, targets in resize_targets.items():
        im = load_rgb(name)
        for (w, h) in targets:
            for filt, code in (("bicubic", Image.Resampling.BICUBIC), ("bilinear", Image.Resampling.BILINEAR)):
                if filt == "bilinear" and (w, h) not in targets[:2] and (name, w, h) != ("rgb_29x53.png", 25, 10):
                    continue
                direct = np.array(im.resize((w, h), resample=code, reducing_gap=None))
                entry = {"image": name, "width": w, "height": h, "filter": filt, "rgb": put(direct)}
                if w != im.width and h != im.height:
                    # Both passes run; make each order explicit with two single-axis resizes
                    # (a single-axis resize runs exactly one pass).
                    h_first = np.array(im.resize((w, im.height), code, reducing_gap=None).resize((w, h), code, reducing_gap=None))
                    v_first = np.array(im.resize((im.width, h), code, reducing_gap=None).resize((w, h), code, reducing_gap=None))
                    dh, dw = im.height - h, im.width - w
                    pil13_h_first = not (dh > 0 and dh > dw * 2)
                    expect = h_first if (pillow_major < 13 or pil13_h_first) else v_first
                    assert np.array_equal(direct, expect), f"Pillow {PIL.__version__} pass order not as modelled for {name} -> {w}x{h}"
                    entry["orders_differ"] = bool(not np.array_equal(h_first, v_first))
                    if not np.array_equal(direct, h_first):
                        entry["horizontal_first_rgb"] = put(h_first)
                manifest["resize"].append(entry)

    # ---- preprocessor configs + transformers pixel_values -------------------------------
    base = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "do_center_crop": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
    }
    configs = {
        # LLaVA-1.5 layout, scaled down
        "cfg_se32_crop32.json": dict(base, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        # non-square crop
        "cfg_se24_crop24x20.json": dict(base, size={"shortest_edge": 24}, crop_size={"height": 24, "width": 20}),
        # exact resize; crop taller than the image (zero padding rows) and narrower (cropping)
        "cfg_hw18x26_crop20x24.json": dict(base, size={"height": 18, "width": 26}, crop_size={"height": 20, "width": 24}),
        # legacy int sizes, bilinear, other mean/std, no crop
        "cfg_int_bilinear_nocrop.json": dict(
            base, size=20, crop_size=20, resample=2, do_center_crop=False,
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], unknown_field={"x": [1, 2]},
        ),
    }
    for name, cfg in configs.items():
        with open(os.path.join(OUT, name), "w") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")

    case_images = ["rgb_37x29.png", "rgb_29x53.png", "rgba_64x48.png", "gray_20x20.png", "tiny_13x7.png", "big_300x200.png"]
    for cname, cfg in configs.items():
        kwargs = {k: v for k, v in cfg.items() if k not in ("image_processor_type", "processor_class", "unknown_field")}
        proc = ClipPil(**kwargs)
        bg = tuple(int(x * 255) for x in proc.image_mean)
        imgs = case_images if cname != "cfg_int_bilinear_nocrop.json" else ["rgb_37x29.png", "tiny_13x7.png"]
        for iname in imgs:
            for pad in (False, True):
                im = load_rgb(iname)
                if pad and im.width == im.height:
                    continue  # expand2square is the identity
                if pad and cname == "cfg_hw18x26_crop20x24.json" and iname not in ("rgb_37x29.png", "rgb_29x53.png"):
                    continue  # keep the fixtures small
                if pad:
                    im = expand2square(im, bg)
                pv = proc(images=im, return_tensors="np")["pixel_values"][0]
                assert pv.dtype == np.float32, pv.dtype
                manifest["cases"].append({"image": iname, "config": cname, "pad_to_square": pad, "pixel_values": put(pv)})

    # JPEG inputs end to end (the Rust JPEG decoder is not libjpeg-turbo: checked with a tolerance)
    proc = ClipPil(**{k: v for k, v in configs["cfg_se24_crop24x20.json"].items() if k not in ("image_processor_type", "processor_class")})
    for iname in ["rgb_40x30_q90_444.jpg", "rgb_40x30_q90_420.jpg"]:
        pv = proc(images=load_rgb(iname), return_tensors="np")["pixel_values"][0]
        manifest["cases"].append({"image": iname, "config": "cfg_se24_crop24x20.json", "pad_to_square": False,
                                  "exact": False, "pixel_values": put(pv)})

    # ---- malformed inputs -----------------------------------------------------------------
    good = open(os.path.join(OUT, "rgb_37x29.png"), "rb").read()
    rng = np.random.default_rng(1234)
    with open(os.path.join(OUT, "corrupt.png"), "wb") as f:
        f.write(good[:8] + rng.integers(0, 256, 600, dtype=np.uint8).tobytes())
    with open(os.path.join(OUT, "truncated.png"), "wb") as f:
        f.write(good[: len(good) * 2 // 3])
    with open(os.path.join(OUT, "truncated_header.png"), "wb") as f:
        f.write(good[:20])
    # IDAT with a wrong CRC (bytes flipped inside the compressed stream)
    idat = good.index(b"IDAT")
    bad = bytearray(good)
    for i in range(idat + 20, idat + 40):
        bad[i] ^= 0xFF
    with open(os.path.join(OUT, "bad_idat.png"), "wb") as f:
        f.write(bytes(bad))
    with open(os.path.join(OUT, "huge_100000x100000.png"), "wb") as f:
        f.write(header_only_png(100000, 100000))
    with open(os.path.join(OUT, "huge_9000x9000.png"), "wb") as f:
        f.write(header_only_png(9000, 9000))
    with open(os.path.join(OUT, "zero_0x10.png"), "wb") as f:
        f.write(header_only_png(0, 10))
    jpg = open(os.path.join(OUT, "rgb_40x30_q90_420.jpg"), "rb").read()
    with open(os.path.join(OUT, "truncated.jpg"), "wb") as f:
        f.write(jpg[: len(jpg) // 3])
    with open(os.path.join(OUT, "not_an_image.png"), "wb") as f:
        f.write(b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n")
    with open(os.path.join(OUT, "empty.png"), "wb") as f:
        pass
    gif = io.BytesIO()
    srcs["tiny_13x7.png"].save(gif, format="GIF")
    with open(os.path.join(OUT, "tiny.gif"), "wb") as f:
        f.write(gif.getvalue())
    for name in ["corrupt.png", "truncated.png", "truncated_header.png", "bad_idat.png", "huge_100000x100000.png",
                 "huge_9000x9000.png", "zero_0x10.png", "truncated.jpg", "not_an_image.png", "empty.png", "tiny.gif"]:
        try:
            with Image.open(os.path.join(OUT, name)) as im:
                im.convert("RGB")
            pil = "ok"
        except Exception as e:  # noqa: BLE001 - only recorded for information
            pil = type(e).__name__
        manifest["errors"].append({"file": name, "pillow": pil})

    # malformed configs
    with open(os.path.join(OUT, "bad_cfg_syntax.json"), "w") as f:
        f.write('{"size": {"shortest_edge": 32},, }\n')
    with open(os.path.join(OUT, "bad_cfg_resample.json"), "w") as f:
        json.dump(dict(base, resample=1, size={"shortest_edge": 32}, crop_size=32), f)
    with open(os.path.join(OUT, "bad_cfg_size.json"), "w") as f:
        json.dump(dict(base, size={"longest_edge": 32}), f)

    with open(os.path.join(OUT, "expected.bin"), "wb") as f:
        f.write(bytes(blob))
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")

    total = 0
    for f in sorted(os.listdir(OUT)):
        sz = os.path.getsize(os.path.join(OUT, f))
        total += sz
        if f.endswith((".png", ".jpg")) and sz >= 20_000:
            sys.exit(f"{f} is {sz} bytes, keep source images < 20 KB")
    print(f"wrote {len(os.listdir(OUT))} files, {total} bytes to {OUT}")
    print(f"  {len(manifest['decode'])} decode, {len(manifest['resize'])} resize, {len(manifest['cases'])} pixel_values cases")
    if total >= 500_000:
        sys.exit(f"fixtures total {total} bytes >= 500 KB")


def expand2square(pil_img, background_color):
    """LLaVA's llava/mm_utils.py expand2square."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


if __name__ == "__main__":
    main()
