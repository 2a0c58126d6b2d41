//! WebP, GIF and BMP decoding against Pillow's `Image.open(f).convert("RGB")`.
//!
//! Fixtures come from `tools/image_format_fixtures.py` (`fixtures/image_formats/manifest.json` records the Pillow
//! and libwebp versions); each image's Pillow result is stored next to it as an RGB PNG, read back through the PNG
//! path (bit-exact against Pillow, see `image_preprocess.rs`).

use std::path::{Path, PathBuf};

use engine::image::{decode_rgb8, decode_rgb8_within, header_dimensions, load_rgb8, ImageError};
use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/image_formats");

/// Lossy WebP: Pillow decodes with libwebp, the `image` crate with image-webp, which implements the same "fancy"
/// chroma upsampling and fixed-point YUV -> RGB. Measured: bit-identical on the fixtures and on five more
/// (97x61 to 400x300, noise and shapes, quality 5 to 95, with and without alpha), so lossy files are held to the
/// same exactness as lossless ones; a decoder change that rounds differently should show up here.
const LOSSY_WEBP_MAX_ABS_DIFF: u8 = 0;

fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}; run tools/image_format_fixtures.py"))
}

fn manifest() -> Value {
    let text = std::fs::read_to_string(fixture("manifest.json"))
        .expect("fixtures/image_formats/manifest.json missing: run tools/image_format_fixtures.py");
    serde_json::from_str(&text).expect("manifest.json is not valid JSON")
}

fn entries(manifest: &Value, key: &str) -> Vec<Value> {
    manifest[key].as_array().unwrap_or_else(|| panic!("manifest has no {key} list")).clone()
}

fn text<'a>(entry: &'a Value, key: &str) -> &'a str {
    entry[key].as_str().unwrap_or_else(|| panic!("{key} in {entry}"))
}

fn dims(entry: &Value) -> (u32, u32) {
    let side = |key: &str| entry[key].as_u64().unwrap_or_else(|| panic!("{key} in {entry}")) as u32;
    (side("width"), side("height"))
}

/// (number of differing bytes, max |diff|).
fn compare(ours: &[u8], pillow: &[u8]) -> (usize, u8) {
    assert_eq!(ours.len(), pillow.len());
    let diffs = ours.iter().zip(pillow).map(|(a, b)| a.abs_diff(*b));
    diffs.fold((0, 0), |(n, max), d| (n + usize::from(d > 0), max.max(d)))
}

#[test]
fn decodes_like_pillow_convert_rgb() {
    let manifest = manifest();
    let images = entries(&manifest, "images");
    assert!(images.len() >= 20, "manifest lists {} images", images.len());
    let mut failures = Vec::new();
    for entry in &images {
        let name = text(entry, "file");
        let ours = load_rgb8(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let pillow = load_rgb8(&fixture(text(entry, "expected"))).expect("expected PNG");
        assert_eq!(ours.dimensions(), dims(entry), "{name}: size");
        assert_eq!(pillow.dimensions(), dims(entry), "{name}: size of the expected image");
        let (n_diff, max_diff) = compare(ours.as_raw(), pillow.as_raw());
        let lossless = entry["lossless"].as_bool().expect("lossless");
        let allowed = if lossless { 0 } else { LOSSY_WEBP_MAX_ABS_DIFF };
        eprintln!("{name} (Pillow mode {}): {n_diff} bytes differ, max |diff| {max_diff}", text(entry, "pillow_mode"));
        if max_diff > allowed {
            failures.push(format!("{name}: {n_diff} bytes differ from Pillow, max |diff| {max_diff} > {allowed}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn each_format_is_covered() {
    let manifest = manifest();
    let names: Vec<String> = entries(&manifest, "images").iter().map(|e| text(e, "file").to_string()).collect();
    for (prefix, at_least) in [("webp_lossy", 2), ("webp_lossless", 2), ("gif_", 6), ("bmp_", 8)] {
        let n = names.iter().filter(|n| n.starts_with(prefix)).count();
        assert!(n >= at_least, "{n} {prefix}* fixtures, expected at least {at_least}");
    }
    for mode in ["P", "RGB", "RGBA", "L", "1"] {
        let found = entries(&manifest, "images").iter().any(|e| text(e, "pillow_mode") == mode);
        assert!(found, "no fixture Pillow opens in mode {mode}");
    }
}

#[test]
fn header_dimensions_match_pillow() {
    let manifest = manifest();
    for entry in entries(&manifest, "images").iter().chain(&entries(&manifest, "oversize")) {
        let name = text(entry, "file");
        let got = header_dimensions(&read(name), name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got, dims(entry), "{name}");
    }
}

#[test]
fn oversize_headers_are_refused_before_decoding() {
    // Each file holds a header and a few bytes of pixel data: reaching the decoder would fail as truncated (or
    // try to allocate gigabytes), so a TooLarge error quoting the declared size comes from the header check.
    let manifest = manifest();
    let oversize = entries(&manifest, "oversize");
    assert!(oversize.len() >= 4);
    for entry in &oversize {
        let name = text(entry, "file");
        let (w, h) = dims(entry);
        let err = decode_rgb8(&read(name), name).expect_err(name);
        let msg = err.to_string();
        assert!(matches!(err, ImageError::TooLarge { .. }), "{name}: {err:?}");
        assert!(msg.contains(name), "{name}: the error does not name the input: {msg}");
        assert!(msg.contains(&format!("{w}x{h}")), "{name}: the error does not give the declared size: {msg}");
        eprintln!("{name}: {msg}");
    }
    // A caller's smaller bound is checked the same way, for every format.
    for name in ["webp_lossy_rgb.webp", "gif_2frames.gif", "bmp_24bit.bmp", "webp_animated.webp"] {
        let err = decode_rgb8_within(&read(name), name, 36).expect_err(name);
        assert!(err.to_string().contains("37x23 pixels, more than 36 per side"), "{name}: {err}");
        assert!(decode_rgb8_within(&read(name), name, 37).is_ok(), "{name}");
    }
}

#[test]
fn gif_frames_after_the_first_are_never_decoded() {
    // The second frame's LZW data is invalid: decoding it would fail.
    let first = decode_rgb8(&read("gif_2frames.gif"), "gif_2frames.gif").expect("two frames");
    let corrupt = decode_rgb8(&read("gif_second_frame_corrupt.gif"), "corrupt").expect("bad second frame");
    assert_eq!(first, corrupt);
    // Many frames cost no more than one: 5000 copies of the second frame after the first.
    let bytes = read("gif_2frames.gif");
    let second = second_gif_frame(&bytes);
    let mut many = bytes[..bytes.len() - 1].to_vec();
    for _ in 0..5000 {
        many.extend_from_slice(second);
    }
    many.push(0x3B);
    let started = std::time::Instant::now();
    assert_eq!(decode_rgb8(&many, "many frames").expect("many frames"), first);
    assert!(started.elapsed().as_secs_f64() < 1.0, "5001-frame GIF took {:?}", started.elapsed());
}

/// The bytes of a GIF's last frame (its graphic control extension, descriptor and data), found by walking the
/// blocks; `bytes` ends with the trailer.
fn second_gif_frame(bytes: &[u8]) -> &[u8] {
    let mut pos = 13 + if bytes[10] & 0x80 != 0 { 3 << ((bytes[10] & 7) + 1) } else { 0 };
    let mut frame_starts = Vec::new();
    let mut block_start = pos;
    while bytes[pos] != 0x3B {
        let skip_sub_blocks = |mut p: usize| {
            while bytes[p] != 0 {
                p += bytes[p] as usize + 1;
            }
            p + 1
        };
        match bytes[pos] {
            0x21 => pos = skip_sub_blocks(pos + 2),
            0x2C => {
                let flags = bytes[pos + 9];
                pos = skip_sub_blocks(pos + 10 + if flags & 0x80 != 0 { 3 << ((flags & 7) + 1) } else { 0 } + 1);
                frame_starts.push(block_start);
                block_start = pos;
            }
            other => panic!("unexpected GIF block {other:#x}"),
        }
    }
    assert_eq!(frame_starts.len(), 2, "gif_2frames.gif should have two frames");
    &bytes[frame_starts[1]..pos]
}

#[test]
fn truncated_files_give_errors_naming_the_input() {
    let manifest = manifest();
    for entry in entries(&manifest, "images") {
        let name = text(&entry, "file");
        let bytes = read(name);
        let full = decode_rgb8(&bytes, name).expect(name);
        // Every prefix: never a panic; an error names the input and is one a user can act on.
        for len in 0..bytes.len() {
            match decode_rgb8(&bytes[..len], name) {
                Ok(img) => {
                    // Only bytes after the first frame's pixels may be missing (GIF trailer, later frames).
                    assert_eq!(img, full, "{name} cut to {len} bytes decoded to something else");
                }
                Err(err) => {
                    let msg = err.to_string();
                    assert!(msg.contains(name), "{name} cut to {len} bytes: error does not name it: {msg}");
                    assert!(
                        matches!(err, ImageError::Decode { .. } | ImageError::UnsupportedFormat { .. }),
                        "{name} cut to {len} bytes: {err:?}"
                    );
                }
            }
        }
        // Half the file is not an image.
        let err = decode_rgb8(&bytes[..bytes.len() / 2], name).expect_err(name);
        assert!(matches!(err, ImageError::Decode { .. }), "{name} cut in half: {err:?}");
        eprintln!("{name} cut in half: {err}");
    }
}

#[test]
fn unsupported_data_lists_the_supported_formats() {
    let cases: [(&str, &[u8]); 3] = [
        ("notes.txt", b"BMW is not a bitmap, but GIF9 is not a GIF either\n"),
        ("scan.tiff", b"II*\x00\x08\x00\x00\x00\x00\x00\x00\x00"),
        ("secret.bin", b"\x01\x02\x03SECRET-TOKEN\x04\x05"),
    ];
    for (name, bytes) in cases {
        let err = decode_rgb8(bytes, name).expect_err(name);
        let msg = err.to_string();
        assert!(matches!(err, ImageError::UnsupportedFormat { .. }), "{name}: {err:?}");
        assert!(msg.contains(name) && msg.contains("PNG, JPEG, WebP, GIF or BMP"), "{name}: {msg}");
        assert!(!msg.contains("SECRET") && !msg.contains("is not a bitmap"), "{name}: the error shows the data: {msg}");
        let err = header_dimensions(bytes, name).expect_err(name);
        assert!(matches!(err, ImageError::UnsupportedFormat { .. }), "{name}: {err:?}");
    }
    // "BM" alone is not taken for a BMP signature (the DIB header size must follow).
    let err = decode_rgb8(b"BMW, not a bitmap", "notes.txt").expect_err("BMW");
    assert!(matches!(err, ImageError::UnsupportedFormat { .. }) && err.to_string().contains("notes.txt"), "{err:?}");
    assert!(err.to_string().contains("it looks like text"), "{err}");
}

#[test]
fn decoder_messages_do_not_quote_the_data() {
    // A WebP whose first chunk is renamed: image-webp's message would list the four bytes of its name.
    let mut bytes = read("webp_lossless_rgb.webp");
    bytes[12..16].copy_from_slice(b"Q7Zk");
    let err = decode_rgb8(&bytes, "renamed.webp").expect_err("renamed chunk");
    let msg = err.to_string();
    assert!(msg.contains("renamed.webp"), "{msg}");
    for quoted in ["51, 37, 5a, 6b", "Q7Zk", "81, 55, 90, 107"] {
        assert!(!msg.contains(quoted), "the error quotes the data: {msg}");
    }
    eprintln!("{msg}");
}
