//! CLIP / LLaVA image preprocessing against Pillow + transformers reference outputs.
//!
//! Fixtures come from `tools/gen_image_fixtures.py` (see `tests/fixtures/image/manifest.json`
//! for the Pillow / transformers versions used). `expected.bin` holds little-endian arrays
//! addressed by `{offset, len, dtype, shape}` entries of the manifest.

use std::path::{Path, PathBuf};

use engine::image::{
    decode_rgb8, load_rgb8, preprocess, resize_bicubic_pil, resize_bilinear_pil, resize_pil_with, ImageError,
    ImageProcessorConfig, PassOrder, ResampleFilter, ResizeSize,
};
use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/image");

/// Tolerance for pixel_values against transformers. The pipeline performs the same operations
/// as numpy in the same precision (u8 -> f64 * rescale_factor -> f32, then (x - mean) / std in
/// f32), so the result is expected to be bit-identical (measured max |diff| = 0). 1e-6 is a few
/// f32 ulps for |x| <= 2.7 (the output range), i.e. it only tolerates a different f32 rounding
/// order; any single-step difference of a resized u8 pixel changes a value by >= 1/255/0.277
/// ~ 0.014 and is caught.
const PIXEL_VALUES_TOL: f32 = 1e-6;

/// JPEG decoding: Pillow uses libjpeg(-turbo), the `image` crate uses zune-jpeg. Their IDCT /
/// chroma upsampling can differ by a few levels, so JPEG decodes are compared with a tolerance
/// (the PNG paths are exact). Measured on the fixtures: 4:4:4 max 3, 4:2:0 max 10 (zune-jpeg
/// rounds the vertical and horizontal chroma upsampling steps separately, libjpeg-turbo's
/// "fancy" h2v2 upsampling does not), greyscale max 1.
const JPEG_MAX_ABS_DIFF: u8 = 12;
/// pixel_values of JPEG inputs inherit the decoder difference (one u8 level is ~0.015 after
/// normalisation; measured max |diff| ~0.07 on the 4:2:0 fixture).
const JPEG_PIXEL_VALUES_TOL: f32 = 0.2;

fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

struct Fixtures {
    manifest: Value,
    blob: Vec<u8>,
}

impl Fixtures {
    fn load() -> Self {
        let text = std::fs::read_to_string(fixture("manifest.json"))
            .expect("tests/fixtures/image/manifest.json missing: run tools/gen_image_fixtures.py");
        let manifest: Value = serde_json::from_str(&text).expect("manifest.json is not valid JSON");
        let blob = std::fs::read(fixture("expected.bin")).expect("expected.bin missing");
        Fixtures { manifest, blob }
    }

    fn list(&self, key: &str) -> &Vec<Value> {
        self.manifest[key].as_array().unwrap_or_else(|| panic!("manifest has no {key} list"))
    }

    fn shape(entry: &Value) -> Vec<usize> {
        entry["shape"].as_array().expect("shape").iter().map(|v| v.as_u64().expect("shape dim") as usize).collect()
    }

    fn u8s(&self, entry: &Value) -> &[u8] {
        assert_eq!(entry["dtype"], "u8");
        let off = entry["offset"].as_u64().expect("offset") as usize;
        let len = entry["len"].as_u64().expect("len") as usize;
        &self.blob[off..off + len]
    }

    fn f32s(&self, entry: &Value) -> Vec<f32> {
        assert_eq!(entry["dtype"], "f32");
        let off = entry["offset"].as_u64().expect("offset") as usize;
        let len = entry["len"].as_u64().expect("len") as usize;
        self.blob[off..off + 4 * len].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }
}

fn s(v: &Value) -> &str {
    v.as_str().expect("string field")
}

/// Index and values of the first differing byte, for readable failures.
fn first_diff(a: &[u8], b: &[u8]) -> Option<(usize, u8, u8)> {
    a.iter().zip(b).enumerate().find(|(_, (x, y))| x != y).map(|(i, (x, y))| (i, *x, *y))
}

#[test]
fn decode_and_rgb_conversion_match_pillow() {
    let fx = Fixtures::load();
    let mut jpeg_report = Vec::new();
    for e in fx.list("decode") {
        let name = s(&e["image"]);
        let img = load_rgb8(&fixture(name)).unwrap_or_else(|err| panic!("{name}: {err}"));
        let shape = Fixtures::shape(&e["rgb"]);
        assert_eq!(
            (img.height() as usize, img.width() as usize, 3),
            (shape[0], shape[1], shape[2]),
            "{name}: decoded size"
        );
        let want = fx.u8s(&e["rgb"]);
        if e["exact"].as_bool().unwrap_or(true) {
            assert!(
                first_diff(img.as_raw(), want).is_none(),
                "{name}: RGB differs from PIL convert(\"RGB\") at (index, ours, pillow) {:?}",
                first_diff(img.as_raw(), want)
            );
        } else {
            let max = img.as_raw().iter().zip(want).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
            jpeg_report.push(format!("{name}: max |diff| {max}"));
            assert!(max <= JPEG_MAX_ABS_DIFF, "{name}: JPEG decode differs from Pillow by {max}");
        }
    }
    eprintln!("JPEG decode vs Pillow: {}", jpeg_report.join(", "));
}

/// Major version of the Pillow that produced the fixtures (its pass order differs before 13).
fn pillow_major(fx: &Fixtures) -> u32 {
    s(&fx.manifest["pillow"]).split('.').next().and_then(|v| v.parse().ok()).expect("pillow version")
}

fn pass_order_of(fx: &Fixtures) -> PassOrder {
    if pillow_major(fx) >= 13 {
        PassOrder::Pillow13
    } else {
        PassOrder::HorizontalFirst
    }
}

#[test]
fn resize_matches_pillow_bit_exactly() {
    let fx = Fixtures::load();
    let order = pass_order_of(&fx);
    let (mut n, mut n_order_sensitive) = (0, 0);
    for e in fx.list("resize") {
        let name = s(&e["image"]);
        let (w, h) = (e["width"].as_u64().unwrap() as u32, e["height"].as_u64().unwrap() as u32);
        let src = load_rgb8(&fixture(name)).unwrap_or_else(|err| panic!("{name}: {err}"));
        let filter = match s(&e["filter"]) {
            "bicubic" => ResampleFilter::Bicubic,
            "bilinear" => ResampleFilter::Bilinear,
            f => panic!("unknown filter {f}"),
        };
        // Direct `Image.resize` of the Pillow that generated the fixtures.
        let out = resize_pil_with(&src, w, h, filter, order);
        let want = fx.u8s(&e["rgb"]);
        let diff = first_diff(out.as_raw(), want);
        assert!(
            diff.is_none(),
            "{name} {}x{} -> {w}x{h} {filter:?} {order:?}: differs from Pillow at (index, ours, pillow) {diff:?}",
            src.width(),
            src.height(),
        );
        // The public helpers use Pillow 13's order.
        if order == PassOrder::Pillow13 {
            let helper = match filter {
                ResampleFilter::Bicubic => resize_bicubic_pil(&src, w, h),
                ResampleFilter::Bilinear => resize_bilinear_pil(&src, w, h),
            };
            assert_eq!(helper.as_raw(), out.as_raw());
        }
        // Pillow <= 12 order (always horizontal first), reproduced in Python with two
        // single-axis resizes.
        if e.get("orders_differ").is_some() {
            let legacy = resize_pil_with(&src, w, h, filter, PassOrder::HorizontalFirst);
            let want = e.get("horizontal_first_rgb").map(|x| fx.u8s(x)).unwrap_or(want);
            let diff = first_diff(legacy.as_raw(), want);
            assert!(diff.is_none(), "{name} -> {w}x{h} {filter:?} horizontal-first: {diff:?}");
            if e.get("horizontal_first_rgb").is_some() {
                n_order_sensitive += 1;
            }
        }
        n += 1;
    }
    assert!(n >= 20, "expected the manifest to list the resize cases");
    if pillow_major(&fx) >= 13 {
        assert!(n_order_sensitive >= 2, "fixtures should contain cases where the pass order matters");
    }
}

#[test]
fn pixel_values_match_transformers() {
    let fx = Fixtures::load();
    let mut worst = 0f32;
    let mut jpeg_report = Vec::new();
    for e in fx.list("cases") {
        let (iname, cname) = (s(&e["image"]), s(&e["config"]));
        let pad = e["pad_to_square"].as_bool().unwrap();
        let mut cfg = ImageProcessorConfig::from_file(&fixture(cname)).unwrap_or_else(|err| panic!("{cname}: {err}"));
        cfg.pad_to_square = pad;
        cfg.pass_order = pass_order_of(&fx);
        let img = load_rgb8(&fixture(iname)).unwrap_or_else(|err| panic!("{iname}: {err}"));
        let pv = preprocess(&img, &cfg).unwrap_or_else(|err| panic!("{iname} {cname}: {err}"));
        let shape = Fixtures::shape(&e["pixel_values"]);
        assert_eq!(vec![pv.channels, pv.height, pv.width], shape, "{iname} {cname} pad={pad}: shape");
        if let Some(fixed) = cfg.fixed_output_size() {
            assert_eq!(fixed, (pv.height, pv.width));
            assert_eq!(cfg.output_size(), (pv.height, pv.width));
        }
        let want = fx.f32s(&e["pixel_values"]);
        assert_eq!(pv.data.len(), want.len());
        let (mut max, mut at) = (0f32, 0usize);
        for (i, (a, b)) in pv.data.iter().zip(&want).enumerate() {
            let d = (a - b).abs();
            assert!(d.is_finite(), "{iname} {cname}: non-finite value at {i}");
            if d > max {
                max = d;
                at = i;
            }
        }
        if e["exact"].as_bool().unwrap_or(true) {
            assert!(
                max <= PIXEL_VALUES_TOL,
                "{iname} {cname} pad={pad}: max |diff| {max} at flat index {at} (ours {}, transformers {})",
                pv.data[at],
                want[at]
            );
            worst = worst.max(max);
        } else {
            let mean = pv.data.iter().zip(&want).map(|(a, b)| (a - b).abs()).sum::<f32>() / want.len() as f32;
            jpeg_report.push(format!("{iname}: max |diff| {max:.4}, mean {mean:.5}"));
            assert!(max <= JPEG_PIXEL_VALUES_TOL, "{iname} {cname}: JPEG max |diff| {max}");
        }
    }
    eprintln!("pixel_values vs transformers (PNG inputs): max |diff| over all cases = {worst:e}");
    eprintln!("pixel_values vs transformers (JPEG inputs): {}", jpeg_report.join(", "));
}

#[test]
fn configs_parse_like_transformers() {
    let c = ImageProcessorConfig::from_file(&fixture("cfg_se24_crop24x20.json")).unwrap();
    assert_eq!(c.size, ResizeSize::ShortestEdge(24));
    assert_eq!((c.crop_height, c.crop_width), (24, 20));
    assert_eq!(c.output_size(), (24, 20));
    assert!(!c.pad_to_square);

    let c = ImageProcessorConfig::from_file(&fixture("cfg_hw18x26_crop20x24.json")).unwrap();
    assert_eq!(c.size, ResizeSize::Exact { height: 18, width: 26 });
    assert_eq!(c.output_size(), (20, 24));

    // Legacy int sizes, bilinear, no crop, and an unknown field that must be ignored.
    let c = ImageProcessorConfig::from_file(&fixture("cfg_int_bilinear_nocrop.json")).unwrap();
    assert_eq!(c.size, ResizeSize::ShortestEdge(20));
    assert_eq!(c.resample, 2);
    assert!(!c.do_center_crop);
    assert_eq!(c.fixed_output_size(), None);
    assert_eq!(c.image_mean, [0.5; 3]);

    // The fixture's rescale_factor string must parse to exactly 1/255 (as Python parses it).
    let c = ImageProcessorConfig::from_file(&fixture("cfg_se32_crop32.json")).unwrap();
    assert_eq!(c.rescale_factor.to_bits(), (1.0f64 / 255.0).to_bits());
    assert_eq!(
        c,
        ImageProcessorConfig {
            size: ResizeSize::ShortestEdge(32),
            crop_height: 32,
            crop_width: 32,
            ..Default::default()
        }
    );

    // LLaVA's model-config key turns on pad_to_square.
    let c = ImageProcessorConfig::from_json_str(r#"{"image_aspect_ratio": "pad"}"#, "inline").unwrap();
    assert!(c.pad_to_square);
    assert_eq!(c.output_size(), (336, 336));
}

#[test]
fn config_errors_name_the_file() {
    for (name, needle) in [
        ("bad_cfg_syntax.json", "expected"),
        ("bad_cfg_resample.json", "resample"),
        ("bad_cfg_size.json", "size"),
        ("does_not_exist.json", "preprocessor_config.json"),
    ] {
        let err = ImageProcessorConfig::from_file(&fixture(name)).expect_err(name);
        let msg = err.to_string();
        assert!(msg.contains(name), "{name}: error does not name the file: {msg}");
        assert!(msg.contains(needle), "{name}: error does not say what is wrong: {msg}");
    }
}

#[test]
fn malformed_images_give_errors_naming_the_file() {
    let fx = Fixtures::load();
    for e in fx.list("errors") {
        let name = s(&e["file"]);
        if e["pillow"].as_str() == Some("ok") {
            // Pillow opens it (tiny.gif): so does this decoder, since GIF is supported.
            let img = load_rgb8(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(img.dimensions(), (13, 7), "{name}");
            continue;
        }
        let err = load_rgb8(&fixture(name)).expect_err(name);
        let msg = err.to_string();
        assert!(msg.contains(name), "{name}: error does not name the file: {msg}");
        match name {
            "huge_100000x100000.png" | "huge_9000x9000.png" => {
                assert!(matches!(err, ImageError::TooLarge { .. }), "{name}: {err:?}")
            }
            "not_an_image.png" | "empty.png" => {
                assert!(matches!(err, ImageError::UnsupportedFormat { .. }), "{name}: {err:?}")
            }
            _ => assert!(matches!(err, ImageError::Decode { .. } | ImageError::Empty { .. }), "{name}: {err:?}"),
        }
        eprintln!("{name}: {msg}");
    }
    // In-memory inputs are named by the caller.
    let bytes = std::fs::read(fixture("truncated.png")).unwrap();
    let msg = decode_rgb8(&bytes, "request image #2").unwrap_err().to_string();
    assert!(msg.contains("request image #2"), "{msg}");
    // Missing file.
    let msg = load_rgb8(&fixture("no_such_image.png")).unwrap_err().to_string();
    assert!(msg.contains("no_such_image.png"), "{msg}");
}

#[test]
fn preprocess_refuses_explosive_aspect_ratios() {
    // Shortest edge 336 on a 1x4000 strip would create a 336x1344000 image.
    let strip = image::RgbImage::new(4000, 1);
    let cfg = ImageProcessorConfig::default();
    let err = preprocess(&strip, &cfg).unwrap_err();
    assert!(matches!(err, ImageError::TooLarge { .. }), "{err:?}");
    assert!(err.to_string().contains("4000x1"), "{err}");
    // Padding to square first makes it fine.
    let mut pad = cfg.clone();
    pad.pad_to_square = true;
    let pv = preprocess(&strip, &pad).unwrap();
    assert_eq!((pv.channels, pv.height, pv.width), (3, 336, 336));
    assert_eq!(pv.data.len(), 3 * 336 * 336);

    let empty = image::RgbImage::new(0, 5);
    assert!(matches!(preprocess(&empty, &cfg), Err(ImageError::Empty { .. })));

    let mut bad = cfg.clone();
    bad.resample = 0;
    let msg = preprocess(&image::RgbImage::new(4, 4), &bad).unwrap_err().to_string();
    assert!(msg.contains("NEAREST"), "{msg}");
}
