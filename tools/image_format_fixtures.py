#!/usr/bin/env python3
"""Fixtures for engine/tests/image_formats.rs: WebP, GIF and BMP decoding compared with Pillow.

Usage:  python3 -m venv /tmp/imgvenv && /tmp/imgvenv/bin/pip install pillow
        /tmp/imgvenv/bin/python tools/image_format_fixtures.py

Writes engine/tests/fixtures/image_formats/:
  <name>.webp / .gif / .bmp   small images (37x23 unless said otherwise): written by Pillow, or by hand below
                              for layouts Pillow does not write (offset GIF frames, 4-bit / RLE / 16-bit /
                              top-down BMP), and headers that declare oversize images
  <name>.rgb.png              Pillow's `Image.open(f).convert("RGB")` of each image, stored losslessly as an
                              RGB PNG (the test decodes it with the PNG path, which is exact)
  manifest.json               per image: the size Pillow reads from the header and the expected file; the
                              Pillow / libwebp versions

The tests only read these files; Python is never run by `cargo test`.
"""
import io
import json
import os
import struct
import sys

import PIL
from PIL import Image, ImageDraw, features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "engine", "tests", "fixtures", "image_formats")
W, H = 37, 23


def gradient_rgb(w=W, h=H):
    """Smooth gradients (cheap to store) plus sharp-edged shapes (where lossy decoders differ)."""
    im = Image.new("RGB", (w, h))
    im.putdata([(x * 255 // (w - 1), y * 255 // (h - 1), (x * 7 + y * 11) % 256) for y in range(h) for x in range(w)])
    d = ImageDraw.Draw(im)
    d.ellipse((w // 4, h // 5, w // 4 + h // 2, h // 5 + h // 2), fill=(250, 30, 40))
    d.rectangle((w - 12, h - 9, w - 3, h - 3), fill=(20, 200, 60))
    return im


def gradient_rgba(w=W, h=H):
    """Alpha ramps along x; a fully transparent block keeps non-black colour (convert("RGB") must show it)."""
    im = gradient_rgb(w, h).convert("RGBA")
    alpha = Image.new("L", (w, h))
    alpha.putdata([min(255, 40 + x * 215 // (w - 1)) for y in range(h) for x in range(w)])
    ImageDraw.Draw(alpha).rectangle((2, 2, 9, 8), fill=0)
    im.putalpha(alpha)
    return im


def saved(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# GIF surgery: Pillow writes each first frame over the whole screen; these move it inside a bigger screen
# ---------------------------------------------------------------------------------------------
def gif_blocks_until_image(data, pos=None):
    """Offset of the next image descriptor (',') of a GIF from `pos` (default: after the header and global
    palette), walking over extensions."""
    if pos is None:
        flags = data[10]
        pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while data[pos] == 0x21:  # extension: introducer, label, sub-blocks
        pos += 2
        while data[pos]:
            pos += data[pos] + 1
        pos += 1
    assert data[pos] == 0x2C, "no image descriptor"
    return pos


def gif_with_screen(data, screen_w, screen_h, left, top):
    out = bytearray(data)
    out[6:10] = struct.pack("<HH", screen_w, screen_h)
    desc = gif_blocks_until_image(data)
    out[desc + 1 : desc + 5] = struct.pack("<HH", left, top)
    return bytes(out)


def gif_second_frame_corrupted(data):
    """Scrambles the LZW data of the second frame (its min code size becomes invalid): a decoder that decoded
    every frame would fail; one that stops after the first does not."""
    desc = gif_blocks_until_image(data)
    flags = data[desc + 9]
    pos = desc + 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1
    while data[pos]:
        pos += data[pos] + 1
    pos += 1  # end of the first frame's data
    second = gif_blocks_until_image(data, pos)
    flags = data[second + 9]
    lzw = second + 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    out = bytearray(data)
    out[lzw] = 0x0F  # minimum code size 15: not a valid GIF
    for i in range(lzw + 2, min(lzw + 2 + data[lzw + 1], len(out) - 1)):
        out[i] ^= 0x5A
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# raw BMP writer (for layouts Pillow does not write)
# ---------------------------------------------------------------------------------------------
def raw_bmp(w, h, bits, pixel_data, palette=b"", compression=0, masks=b"", top_down=False):
    """BITMAPINFOHEADER (40 bytes) + optional bit masks + palette (BGRA quads) + pixel data."""
    offset = 14 + 40 + len(masks) + len(palette)
    colors = len(palette) // 4
    info = struct.pack("<IiiHHIIiiII", 40, w, -h if top_down else h, 1, bits, compression, len(pixel_data),
                       2835, 2835, colors, 0)
    head = b"BM" + struct.pack("<IHHI", offset + len(pixel_data), 0, 0, offset)
    return head + info + masks + palette + pixel_data


def bmp_rows(rows, bottom_up=True):
    """Pads each row to 4 bytes; BMP stores the bottom row first unless the height is negative."""
    padded = [r + b"\x00" * (-len(r) % 4) for r in rows]
    return b"".join(reversed(padded) if bottom_up else padded)


def palette_quads(colors):
    return b"".join(bytes((b, g, r, 0)) for r, g, b in colors)


def bmp_4bit():
    colors = [(i * 17, 255 - i * 17, (i * 53) % 256) for i in range(16)]
    rows = []
    for y in range(H):
        idx = [(x + 2 * y) % 16 for x in range(W)] + [0]
        rows.append(bytes((idx[i] << 4) | idx[i + 1] for i in range(0, W, 2)))
    return raw_bmp(W, H, 4, bmp_rows(rows), palette_quads(colors))


def bmp_rle8():
    """RLE8: runs, absolute (literal) runs, a delta jump over 7 + 37 pixels (Pillow reads skipped pixels as index 0,
    which is not black here) and the end markers."""
    colors = [(10, 20, 30)] + [(i * 9 % 256, 255 - i * 5, i * 31 % 256) for i in range(1, 40)]
    data = bytearray()
    for y in range(H):
        if y == 10:
            data += bytes((20, y % 39 + 1))  # 20 pixels, then 7 right and 1 row on: to x=27 of the next row
            data += bytes((0, 2, 7, 1))
            continue
        if y == 11:
            data += bytes((W - 27, 5, 0, 0))
            continue
        literal = [(x * 3 + y) % 39 + 1 for x in range(9)]
        data += bytes((0, len(literal))) + bytes(literal) + b"\x00"  # absolute run, padded to 16 bits
        data += bytes((W - 9 - 5, y % 39 + 1, 5, 7))
        data += b"\x00\x00"  # end of line
    data += b"\x00\x01"  # end of bitmap
    return raw_bmp(W, H, 8, bytes(data), palette_quads(colors), compression=1)


def bmp_16bit(layout):
    """16-bit pixels: BI_RGB (5-5-5) or BI_BITFIELDS with 5-6-5 masks."""
    src = gradient_rgb()
    rows = []
    for y in range(H):
        row = bytearray()
        for x in range(W):
            r, g, b = src.getpixel((x, y))
            if layout == "565":
                v = (r >> 3) << 11 | (g >> 2) << 5 | (b >> 3)
            else:
                v = (r >> 3) << 10 | (g >> 3) << 5 | (b >> 3)
            row += struct.pack("<H", v)
        rows.append(bytes(row))
    if layout == "565":
        return raw_bmp(W, H, 16, bmp_rows(rows), compression=3, masks=struct.pack("<III", 0xF800, 0x07E0, 0x001F))
    return raw_bmp(W, H, 16, bmp_rows(rows))


def bmp_top_down():
    src = gradient_rgb()
    rows = [bytes(c for x in range(W) for c in reversed(src.getpixel((x, y)))) for y in range(H)]
    return raw_bmp(W, H, 24, bmp_rows(rows, bottom_up=False), top_down=True)


# ---------------------------------------------------------------------------------------------
# headers that declare oversize images (the pixel data is a few bytes)
# ---------------------------------------------------------------------------------------------
def huge_bmp(w, h):
    return raw_bmp(w, h, 24, b"\x00" * 64)


def huge_gif(w, h):
    small = saved(Image.new("P", (2, 2)), "GIF")
    return gif_with_screen(small, w, h, 0, 0)


def huge_webp(w, h):
    """VP8X canvas of w x h (24-bit fields) around a 1x1 lossless image."""
    vp8l = saved(Image.new("RGB", (1, 1)), "WEBP", lossless=True)[12:]  # the VP8L chunk
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + (w - 1).to_bytes(3, "little") + (
        h - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + vp8l
    return b"RIFF" + struct.pack("<I", len(body)) + body


def cases():
    rgb, rgba = gradient_rgb(), gradient_rgba()
    p64 = rgb.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    p_second = gradient_rgb().transpose(Image.Transpose.ROTATE_180).quantize(colors=64, dither=Image.Dither.NONE)
    p_transparent = p64.copy()
    small = rgb.resize((20, 11)).quantize(colors=32, dither=Image.Dither.NONE)
    two_frames = saved(p64, "GIF", save_all=True, append_images=[p_second], duration=100, loop=0)
    return [
        ("webp_lossless_rgb.webp", saved(rgb, "WEBP", lossless=True), True),
        ("webp_lossless_rgba.webp", saved(rgba, "WEBP", lossless=True, exact=True), True),
        ("webp_lossy_rgb.webp", saved(rgb, "WEBP", quality=80), False),
        ("webp_lossy_rgba.webp", saved(rgba, "WEBP", quality=80), False),
        ("webp_animated.webp", saved(rgba, "WEBP", lossless=True, exact=True, save_all=True,
                                     append_images=[rgb.transpose(Image.Transpose.ROTATE_180)], duration=100), True),
        ("gif_2frames.gif", two_frames, True),
        ("gif_second_frame_corrupt.gif", gif_second_frame_corrupted(two_frames), True),
        ("gif_transparent.gif", saved(p_transparent, "GIF", transparency=5), True),
        ("gif_gray.gif", saved(rgb.convert("L"), "GIF"), True),
        ("gif_offset_frame.gif", gif_with_screen(saved(small, "GIF"), W, H, 9, 7), True),
        # Pillow enlarges the canvas to hold a first frame that overhangs the screen: 35x19, not 30x15.
        ("gif_overhanging_frame.gif", gif_with_screen(saved(small, "GIF"), 30, 15, 15, 8), True),
        ("gif_offset_frame_transparent.gif", gif_with_screen(saved(small, "GIF", transparency=3), W, H, 9, 7), True),
        ("bmp_24bit.bmp", saved(rgb, "BMP"), True),
        ("bmp_32bit.bmp", saved(rgba, "BMP"), True),
        ("bmp_palette8.bmp", saved(p64, "BMP"), True),
        ("bmp_gray8.bmp", saved(rgb.convert("L"), "BMP"), True),
        ("bmp_1bit.bmp", saved(rgb.convert("1"), "BMP"), True),
        ("bmp_4bit.bmp", bmp_4bit(), True),
        ("bmp_rle8.bmp", bmp_rle8(), True),
        ("bmp_565.bmp", bmp_16bit("565"), True),
        ("bmp_555.bmp", bmp_16bit("555"), True),
        ("bmp_top_down.bmp", bmp_top_down(), True),
    ]


def main():
    os.makedirs(OUT, exist_ok=True)
    for old in os.listdir(OUT):
        os.remove(os.path.join(OUT, old))
    manifest = {
        "generator": "tools/image_format_fixtures.py",
        "pillow": PIL.__version__,
        "libwebp": features.version("webp"),
        "images": [],
        "oversize": [],
    }
    for name, data, lossless in cases():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)
        with Image.open(io.BytesIO(data)) as im:
            mode, size = im.mode, im.size
            rgb = im.convert("RGB")
        expected = name.rsplit(".", 1)[0] + ".rgb.png"
        rgb.save(os.path.join(OUT, expected), optimize=True)
        manifest["images"].append({"file": name, "width": size[0], "height": size[1], "pillow_mode": mode,
                                   "expected": expected, "lossless": lossless})
    Image.MAX_IMAGE_PIXELS = None  # only to read what the oversize headers declare
    for name, data in [("bmp_huge_100000x100000.bmp", huge_bmp(100000, 100000)),
                       ("bmp_huge_9000x9000.bmp", huge_bmp(9000, 9000)),
                       ("gif_huge_65535x65535.gif", huge_gif(65535, 65535)),
                       ("webp_huge_100000x100000.webp", huge_webp(100000, 100000))]:
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)
        try:
            with Image.open(io.BytesIO(data)) as im:
                pillow = "opens it as %dx%d" % im.size
        except Exception as e:  # noqa: BLE001 - only recorded for information
            pillow = "refuses it: %s" % e
        w, h = (int(v) for v in name.rsplit("_", 1)[1].split(".")[0].split("x"))
        manifest["oversize"].append({"file": name, "width": w, "height": h, "pillow": pillow})
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    print(f"wrote {len(os.listdir(OUT))} files, {total} bytes, to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
