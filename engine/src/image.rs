//! CLIP / LLaVA-1.5 image preprocessing that reproduces HuggingFace's PIL-based
//! `CLIPImageProcessor` (transformers 4.x `CLIPImageProcessor`, 5.x `CLIPImageProcessorPil`)
//! bit for bit.
//!
//! Pipeline ([`load_rgb8`] / [`decode_rgb8`] then [`preprocess`]):
//!
//! 1. decode PNG / JPEG (with decompression-bomb limits) and convert to 8-bit RGB exactly like
//!    PIL's `Image.convert("RGB")`: alpha is dropped (not composited), grey is replicated,
//!    16-bit RGB(A) / grey+alpha keep the high byte, 16-bit grey saturates at 255 (PIL's `I;16`
//!    conversion clips rather than scales);
//! 2. optional LLaVA `expand2square` (`pad_to_square`): centre the image on a square canvas filled
//!    with `int(m * 255)` of each `image_mean` channel;
//! 3. resize (shortest edge, or exact `height`×`width`) with a re-implementation of Pillow's
//!    fixed-point separable resampler (`libImaging/Resample.c`), BICUBIC or BILINEAR;
//! 4. centre crop (zero padded when the image is smaller than the crop, as transformers does);
//! 5. rescale (`u8 as f64 * rescale_factor`, then `f32`) and normalise (`(x - mean) / std` in f32);
//! 6. CHW `f32` output.
//!
//! Only `std`, `image`, `serde`/`serde_json` and `thiserror` are used.

use std::fmt;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageFormat, RgbImage};
use serde::Deserialize;
use serde_json::Value;

/// Largest accepted width or height of a decoded image (checked from the header, before the
/// pixel buffer is allocated).
pub const MAX_IMAGE_SIDE: u32 = 16_384;
/// Largest accepted number of pixels (width × height) of a decoded image, and of any
/// intermediate image created by preprocessing (padding to square, resizing).
pub const MAX_IMAGE_PIXELS: u64 = 8192 * 8192;
/// Largest accepted encoded image file.
pub const MAX_ENCODED_BYTES: u64 = 256 * 1024 * 1024;

/// OpenAI CLIP normalisation mean (also the LLaVA-1.5 values).
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP normalisation standard deviation.
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// PIL resampling codes (`PIL.Image.Resampling`).
pub const PIL_NEAREST: u32 = 0;
pub const PIL_LANCZOS: u32 = 1;
pub const PIL_BILINEAR: u32 = 2;
pub const PIL_BICUBIC: u32 = 3;
pub const PIL_BOX: u32 = 4;
pub const PIL_HAMMING: u32 = 5;

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Errors from image loading, configuration parsing and preprocessing. Every message names the
/// file or input concerned, says what was wrong and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image file could not be read from disk.
    #[error("cannot read image file {path}: {cause}; check that the path exists and is readable")]
    Read { path: PathBuf, cause: std::io::Error },

    /// The bytes are not a PNG or JPEG (or a format this build cannot decode).
    #[error("image {what} is not a supported image: {detail}; only PNG and JPEG are supported, convert the image to one of those")]
    UnsupportedFormat { what: String, detail: String },

    /// The decoder rejected the data (corrupt, truncated, or an unsupported variant of the format).
    #[error("image {what} could not be decoded ({format}): {detail}; the file is probably corrupt or truncated, re-export or re-download it")]
    Decode { what: String, format: String, detail: String },

    /// The image (or an intermediate image of the pipeline) is larger than the safety limits.
    #[error("image {what} is too large: {detail}; downscale it before sending (limits: at most {max_side} pixels per side and {max_pixels} pixels in total)", max_side = MAX_IMAGE_SIDE, max_pixels = MAX_IMAGE_PIXELS)]
    TooLarge { what: String, detail: String },

    /// The image has zero width or height.
    #[error("image {what} is empty ({width}x{height} pixels); send an image with at least one pixel")]
    Empty { what: String, width: u64, height: u64 },

    /// The preprocessor config file could not be read.
    #[error("cannot read image preprocessor config {path}: {cause}; check that the model directory contains preprocessor_config.json")]
    ConfigRead { path: PathBuf, cause: std::io::Error },

    /// The preprocessor config is not valid JSON or has invalid / unsupported values.
    #[error("invalid image preprocessor config {what}: {detail}")]
    Config { what: String, detail: String },
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// How the image is resized (`size` in `preprocessor_config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeSize {
    /// `{"shortest_edge": N}` (or a bare integer): the shorter side becomes N, the longer side
    /// `int(N * long / short)`.
    ShortestEdge(u32),
    /// `{"height": H, "width": W}`: resize to exactly H×W (aspect ratio not preserved).
    Exact { height: u32, width: u32 },
}

/// HuggingFace `CLIPImageProcessor` settings (the subset rlaifd needs) plus the LLaVA
/// pad-to-square option.
///
/// Deserializes from a `preprocessor_config.json`; unknown fields are ignored, missing fields get
/// the `CLIPImageProcessor` defaults except `size`/`crop_size`, which default to the CLIP-336 /
/// LLaVA-1.5 values (shortest edge 336, crop 336×336). `pad_to_square` is an rlaifd option: it is
/// set when the JSON contains `"image_aspect_ratio": "pad"` (the LLaVA model-config key) and can
/// be set by the caller afterwards.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawConfig")]
pub struct ImageProcessorConfig {
    pub do_resize: bool,
    pub size: ResizeSize,
    /// PIL resampling code; 3 (BICUBIC) and 2 (BILINEAR) are supported.
    pub resample: u32,
    pub do_center_crop: bool,
    /// (height, width) of the centre crop.
    pub crop_height: u32,
    pub crop_width: u32,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    pub do_convert_rgb: bool,
    /// LLaVA `expand2square` before resizing (`image_aspect_ratio == "pad"`).
    pub pad_to_square: bool,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        ImageProcessorConfig {
            do_resize: true,
            size: ResizeSize::ShortestEdge(336),
            resample: PIL_BICUBIC,
            do_center_crop: true,
            crop_height: 336,
            crop_width: 336,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
            do_convert_rgb: true,
            pad_to_square: false,
        }
    }
}

impl ImageProcessorConfig {
    /// Reads and validates a `preprocessor_config.json`. Errors name the file.
    pub fn from_file(path: &Path) -> Result<Self, ImageError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ImageError::ConfigRead {
            path: path.to_path_buf(),
            cause,
        })?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses and validates a preprocessor config from JSON text; `what` names the source in
    /// errors.
    pub fn from_json_str(json: &str, what: &str) -> Result<Self, ImageError> {
        let cfg: ImageProcessorConfig =
            serde_json::from_str(json).map_err(|e| ImageError::Config {
                what: what.to_string(),
                detail: format!(
                    "{e}; expected a HuggingFace CLIPImageProcessor preprocessor_config.json object"
                ),
            })?;
        cfg.validate().map_err(|detail| ImageError::Config {
            what: what.to_string(),
            detail,
        })?;
        Ok(cfg)
    }

    /// (height, width) of the `pixel_values` produced by [`preprocess`].
    ///
    /// Exact whenever the output size does not depend on the input image (centre crop enabled,
    /// exact `height`/`width` resize, or shortest-edge resize with `pad_to_square`), which is the
    /// case for every CLIP/LLaVA config. Otherwise (shortest-edge resize of a non-square image
    /// without crop, or no resize and no crop) it returns the size a square input would get;
    /// use [`ImageProcessorConfig::fixed_output_size`] to detect that case.
    pub fn output_size(&self) -> (usize, usize) {
        if let Some(s) = self.fixed_output_size() {
            return s;
        }
        match (self.do_resize, self.size) {
            (true, ResizeSize::ShortestEdge(n)) => (n as usize, n as usize),
            (true, ResizeSize::Exact { height, width }) => (height as usize, width as usize),
            (false, _) => (0, 0),
        }
    }

    /// (height, width) of the output if it is independent of the input image size.
    pub fn fixed_output_size(&self) -> Option<(usize, usize)> {
        if self.do_center_crop {
            return Some((self.crop_height as usize, self.crop_width as usize));
        }
        match (self.do_resize, self.size) {
            (true, ResizeSize::Exact { height, width }) => Some((height as usize, width as usize)),
            (true, ResizeSize::ShortestEdge(n)) if self.pad_to_square => {
                Some((n as usize, n as usize))
            }
            _ => None,
        }
    }

    /// Checks that the settings are supported; the error text says what is wrong.
    fn validate(&self) -> Result<(), String> {
        if self.do_resize {
            resample_filter(self.resample)?;
            match self.size {
                ResizeSize::ShortestEdge(0) => {
                    return Err("size.shortest_edge must be at least 1".into())
                }
                ResizeSize::Exact { height, width } if height == 0 || width == 0 => {
                    return Err(format!(
                        "size {{\"height\": {height}, \"width\": {width}}} must be at least 1x1"
                    ))
                }
                _ => {}
            }
        }
        if self.do_center_crop && (self.crop_height == 0 || self.crop_width == 0) {
            return Err(format!(
                "crop_size {}x{} (height x width) must be at least 1x1",
                self.crop_height, self.crop_width
            ));
        }
        if self.do_center_crop
            && (self.crop_height as u64) * (self.crop_width as u64) > MAX_IMAGE_PIXELS
        {
            return Err(format!(
                "crop_size {}x{} is larger than the {MAX_IMAGE_PIXELS}-pixel limit",
                self.crop_height, self.crop_width
            ));
        }
        if self.do_rescale && !self.rescale_factor.is_finite() {
            return Err(format!(
                "rescale_factor {} is not a finite number",
                self.rescale_factor
            ));
        }
        if self.do_normalize {
            for c in 0..3 {
                if !self.image_mean[c].is_finite() {
                    return Err(format!("image_mean[{c}] = {} is not finite", self.image_mean[c]));
                }
                let s = self.image_std[c];
                if !s.is_finite() || s == 0.0 {
                    return Err(format!(
                        "image_std[{c}] = {s} must be a finite, non-zero number"
                    ));
                }
            }
        }
        if self.pad_to_square {
            for c in 0..3 {
                if !self.image_mean[c].is_finite() {
                    return Err(format!(
                        "image_mean[{c}] = {} is not finite (needed for pad_to_square)",
                        self.image_mean[c]
                    ));
                }
            }
        }
        Ok(())
    }

    /// Background colour LLaVA's `expand2square` uses: `tuple(int(m * 255) for m in image_mean)`.
    pub fn pad_color(&self) -> [u8; 3] {
        // Python's int() truncates toward zero; PIL then clamps the fill colour to 0..=255.
        self.image_mean
            .map(|m| (m * 255.0).trunc().clamp(0.0, 255.0) as u8)
    }
}

/// The JSON as HuggingFace writes it; converted (with validation of shapes) by `TryFrom`.
#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    do_resize: Option<bool>,
    #[serde(default)]
    size: Option<Value>,
    #[serde(default)]
    resample: Option<Value>,
    #[serde(default)]
    do_center_crop: Option<bool>,
    #[serde(default)]
    crop_size: Option<Value>,
    #[serde(default)]
    do_rescale: Option<bool>,
    #[serde(default)]
    rescale_factor: Option<f64>,
    #[serde(default)]
    do_normalize: Option<bool>,
    #[serde(default)]
    image_mean: Option<Value>,
    #[serde(default)]
    image_std: Option<Value>,
    #[serde(default)]
    do_convert_rgb: Option<bool>,
    #[serde(default)]
    image_aspect_ratio: Option<Value>,
    #[serde(default)]
    pad_to_square: Option<bool>,
}

/// Error type of the `RawConfig` → `ImageProcessorConfig` conversion (serde wants `Display`).
struct ConfigShapeError(String);

impl fmt::Display for ConfigShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn value_u32(v: &Value, what: &str) -> Result<u32, ConfigShapeError> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| ConfigShapeError(format!("{what} must be a non-negative integer, got {v}")))
}

fn parse_size(v: &Value) -> Result<ResizeSize, ConfigShapeError> {
    // transformers: an int `size` with default_to_square=False means shortest edge.
    if v.is_number() {
        return Ok(ResizeSize::ShortestEdge(value_u32(v, "size")?));
    }
    let Some(obj) = v.as_object() else {
        return Err(ConfigShapeError(format!(
            "size must be an integer or an object like {{\"shortest_edge\": 336}} or {{\"height\": 336, \"width\": 336}}, got {v}"
        )));
    };
    let get = |k: &str| obj.get(k).filter(|x| !x.is_null());
    match (get("shortest_edge"), get("height"), get("width")) {
        (Some(se), None, None) => {
            if let Some(le) = get("longest_edge") {
                return Err(ConfigShapeError(format!(
                    "size.longest_edge ({le}) is not supported by rlaifd; remove it or use {{\"height\", \"width\"}}"
                )));
            }
            Ok(ResizeSize::ShortestEdge(value_u32(se, "size.shortest_edge")?))
        }
        (None, Some(h), Some(w)) => Ok(ResizeSize::Exact {
            height: value_u32(h, "size.height")?,
            width: value_u32(w, "size.width")?,
        }),
        _ => Err(ConfigShapeError(format!(
            "size must be {{\"shortest_edge\": N}} or {{\"height\": H, \"width\": W}}, got {v}"
        ))),
    }
}

fn parse_crop(v: &Value) -> Result<(u32, u32), ConfigShapeError> {
    // transformers: an int crop_size means a square crop.
    if v.is_number() {
        let n = value_u32(v, "crop_size")?;
        return Ok((n, n));
    }
    let obj = v.as_object();
    match obj.and_then(|o| o.get("height").zip(o.get("width"))) {
        Some((h, w)) => Ok((value_u32(h, "crop_size.height")?, value_u32(w, "crop_size.width")?)),
        None => Err(ConfigShapeError(format!(
            "crop_size must be an integer or {{\"height\": H, \"width\": W}}, got {v}"
        ))),
    }
}

fn parse_triplet(v: &Value, what: &str) -> Result<[f64; 3], ConfigShapeError> {
    if let Some(x) = v.as_f64() {
        return Ok([x; 3]);
    }
    let bad = || ConfigShapeError(format!("{what} must be a number or a list of 3 numbers, got {v}"));
    let arr = v.as_array().ok_or_else(bad)?;
    let nums: Vec<f64> = arr.iter().map(|x| x.as_f64()).collect::<Option<_>>().ok_or_else(bad)?;
    match nums.as_slice() {
        [x] => Ok([*x; 3]),
        [a, b, c] => Ok([*a, *b, *c]),
        _ => Err(bad()),
    }
}

impl TryFrom<RawConfig> for ImageProcessorConfig {
    type Error = ConfigShapeError;

    fn try_from(raw: RawConfig) -> Result<Self, Self::Error> {
        let d = ImageProcessorConfig::default();
        let size = match raw.size.as_ref().filter(|v| !v.is_null()) {
            Some(v) => parse_size(v)?,
            None => d.size,
        };
        let (crop_height, crop_width) = match raw.crop_size.as_ref().filter(|v| !v.is_null()) {
            Some(v) => parse_crop(v)?,
            None => (d.crop_height, d.crop_width),
        };
        let resample = match raw.resample.as_ref().filter(|v| !v.is_null()) {
            Some(v) => value_u32(v, "resample")?,
            None => d.resample,
        };
        let image_mean = match raw.image_mean.as_ref().filter(|v| !v.is_null()) {
            Some(v) => parse_triplet(v, "image_mean")?,
            None => d.image_mean,
        };
        let image_std = match raw.image_std.as_ref().filter(|v| !v.is_null()) {
            Some(v) => parse_triplet(v, "image_std")?,
            None => d.image_std,
        };
        let pad_from_aspect = match raw.image_aspect_ratio.as_ref() {
            None | Some(Value::Null) => false,
            Some(Value::String(s)) => s == "pad",
            Some(other) => {
                return Err(ConfigShapeError(format!(
                    "image_aspect_ratio must be a string such as \"pad\", got {other}"
                )))
            }
        };
        Ok(ImageProcessorConfig {
            do_resize: raw.do_resize.unwrap_or(d.do_resize),
            size,
            resample,
            do_center_crop: raw.do_center_crop.unwrap_or(d.do_center_crop),
            crop_height,
            crop_width,
            do_rescale: raw.do_rescale.unwrap_or(d.do_rescale),
            rescale_factor: raw.rescale_factor.unwrap_or(d.rescale_factor),
            do_normalize: raw.do_normalize.unwrap_or(d.do_normalize),
            image_mean,
            image_std,
            do_convert_rgb: raw.do_convert_rgb.unwrap_or(d.do_convert_rgb),
            pad_to_square: raw.pad_to_square.unwrap_or(pad_from_aspect),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

/// Reads and decodes a PNG or JPEG file and converts it to 8-bit RGB like PIL's
/// `Image.open(path).convert("RGB")`. Errors name the file.
pub fn load_rgb8(path: &Path) -> Result<RgbImage, ImageError> {
    let what = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|cause| ImageError::Read {
        path: path.to_path_buf(),
        cause,
    })?;
    if meta.len() > MAX_ENCODED_BYTES {
        return Err(ImageError::TooLarge {
            what,
            detail: format!(
                "the file is {} bytes, more than the {MAX_ENCODED_BYTES}-byte limit for encoded images",
                meta.len()
            ),
        });
    }
    let bytes = std::fs::read(path).map_err(|cause| ImageError::Read {
        path: path.to_path_buf(),
        cause,
    })?;
    decode_rgb8(&bytes, &what)
}

/// Decodes an in-memory PNG or JPEG and converts it to 8-bit RGB like PIL's `convert("RGB")`.
/// `what` names the input in error messages (a file name, "request image 2", ...).
pub fn decode_rgb8(bytes: &[u8], what: &str) -> Result<RgbImage, ImageError> {
    let dynimg = decode_dynamic(bytes, what)?;
    Ok(to_rgb8_like_pil(dynimg))
}

fn decode_dynamic(bytes: &[u8], what: &str) -> Result<DynamicImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::UnsupportedFormat {
            what: what.to_string(),
            detail: "the data is empty (0 bytes)".into(),
        });
    }
    if bytes.len() as u64 > MAX_ENCODED_BYTES {
        return Err(ImageError::TooLarge {
            what: what.to_string(),
            detail: format!(
                "the encoded data is {} bytes, more than the {MAX_ENCODED_BYTES}-byte limit",
                bytes.len()
            ),
        });
    }
    let format = match image::guess_format(bytes) {
        Ok(f @ (ImageFormat::Png | ImageFormat::Jpeg)) => f,
        Ok(other) => {
            return Err(ImageError::UnsupportedFormat {
                what: what.to_string(),
                detail: format!("it looks like {other:?}"),
            })
        }
        Err(_) => {
            let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
            return Err(ImageError::UnsupportedFormat {
                what: what.to_string(),
                detail: format!(
                    "the data does not start with a PNG or JPEG signature (first bytes: {})",
                    head.join(" ")
                ),
            });
        }
    };
    let fmt_name = if format == ImageFormat::Png { "PNG" } else { "JPEG" };
    let map_err = |e: image::ImageError| classify_decode_error(e, what, fmt_name);

    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    // Bound the decoder's own allocations too (RGBA16 at the pixel limit is exactly 512 MiB).
    limits.max_alloc = Some(MAX_IMAGE_PIXELS * 8 + 64 * 1024 * 1024);

    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(limits);
    // Reads only the header: dimensions are checked before any pixel buffer exists.
    let decoder = reader.into_decoder().map_err(map_err)?;
    let (w, h) = decoder.dimensions();
    check_dims(w as u64, h as u64, what)?;
    DynamicImage::from_decoder(decoder).map_err(map_err)
}

fn check_dims(w: u64, h: u64, what: &str) -> Result<(), ImageError> {
    if w == 0 || h == 0 {
        return Err(ImageError::Empty {
            what: what.to_string(),
            width: w,
            height: h,
        });
    }
    if w > MAX_IMAGE_SIDE as u64 || h > MAX_IMAGE_SIDE as u64 || w * h > MAX_IMAGE_PIXELS {
        return Err(ImageError::TooLarge {
            what: what.to_string(),
            detail: format!("it is {w}x{h} pixels"),
        });
    }
    Ok(())
}

fn classify_decode_error(e: image::ImageError, what: &str, fmt_name: &str) -> ImageError {
    match e {
        image::ImageError::Limits(l) => ImageError::TooLarge {
            what: what.to_string(),
            detail: format!("the {fmt_name} header declares a size beyond the limits ({l})"),
        },
        image::ImageError::Unsupported(u) => ImageError::UnsupportedFormat {
            what: what.to_string(),
            detail: format!("{fmt_name} variant not supported: {u}"),
        },
        image::ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            ImageError::Decode {
                what: what.to_string(),
                format: fmt_name.to_string(),
                detail: format!("the data ends early (truncated): {io}"),
            }
        }
        other => ImageError::Decode {
            what: what.to_string(),
            format: fmt_name.to_string(),
            detail: other.to_string(),
        },
    }
}

/// Converts any decoded image to 8-bit RGB with PIL's `convert("RGB")` semantics (as used by
/// LLaVA's `Image.open(f).convert("RGB")` and transformers 4.x `convert_to_rgb`):
/// alpha dropped; grey replicated; 16-bit RGB(A) and grey+alpha (PIL opens these as 8-bit
/// `RGB`/`RGBA` keeping the most significant byte) → high byte; 16-bit grey (PIL mode `I;16`)
/// → clamped to 255, which is what PIL's `I;16` → `RGB` conversion does.
fn to_rgb8_like_pil(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let mut out: Vec<u8> = Vec::with_capacity(w as usize * h as usize * 3);
    match img {
        DynamicImage::ImageRgb8(im) => return im,
        DynamicImage::ImageRgba8(im) => {
            for p in im.as_raw().chunks_exact(4) {
                out.extend_from_slice(&p[..3]);
            }
        }
        DynamicImage::ImageLuma8(im) => {
            for &v in im.as_raw() {
                out.extend_from_slice(&[v, v, v]);
            }
        }
        DynamicImage::ImageLumaA8(im) => {
            for p in im.as_raw().chunks_exact(2) {
                out.extend_from_slice(&[p[0], p[0], p[0]]);
            }
        }
        DynamicImage::ImageLuma16(im) => {
            for &v in im.as_raw() {
                let b = v.min(255) as u8;
                out.extend_from_slice(&[b, b, b]);
            }
        }
        DynamicImage::ImageLumaA16(im) => {
            for p in im.as_raw().chunks_exact(2) {
                let b = (p[0] >> 8) as u8;
                out.extend_from_slice(&[b, b, b]);
            }
        }
        DynamicImage::ImageRgb16(im) => {
            for p in im.as_raw().chunks_exact(3) {
                out.extend_from_slice(&[(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8]);
            }
        }
        DynamicImage::ImageRgba16(im) => {
            for p in im.as_raw().chunks_exact(4) {
                out.extend_from_slice(&[(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8]);
            }
        }
        // Float images (not produced by the PNG/JPEG decoders) and future variants.
        #[allow(unreachable_patterns)]
        other => return other.to_rgb8(),
    }
    RgbImage::from_raw(w, h, out).unwrap_or_else(|| RgbImage::new(w, h))
}

// ---------------------------------------------------------------------------------------------
// Pillow resampling (libImaging/Resample.c, 8 bits per channel path)
// ---------------------------------------------------------------------------------------------

/// Fixed-point precision of Pillow's 8-bit resampler: 32 bits minus 8 for the value minus 2 for
/// the sign and for coefficient sums above 1.
const PRECISION_BITS: u32 = 32 - 8 - 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Filter {
    Bilinear,
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    /// Kernel value. The expressions keep Pillow's operation order so that the doubles match.
    fn eval(self, x: f64) -> f64 {
        let x = if x < 0.0 { -x } else { x };
        match self {
            Filter::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

fn resample_filter(code: u32) -> Result<Filter, String> {
    match code {
        PIL_BICUBIC => Ok(Filter::Bicubic),
        PIL_BILINEAR => Ok(Filter::Bilinear),
        other => {
            let name = match other {
                PIL_NEAREST => "NEAREST",
                PIL_LANCZOS => "LANCZOS",
                PIL_BOX => "BOX",
                PIL_HAMMING => "HAMMING",
                _ => "unknown",
            };
            Err(format!(
                "resample = {other} ({name}) is not supported; rlaifd implements 3 (BICUBIC, what CLIP and LLaVA use) and 2 (BILINEAR)"
            ))
        }
    }
}

/// Per-output-pixel filter windows for one axis, coefficients already in fixed point.
struct Coeffs {
    /// Coefficients per output pixel (row length of `k`).
    ksize: usize,
    /// (first input index, number of taps) per output pixel.
    bounds: Vec<(usize, usize)>,
    /// `out_size * ksize` fixed-point coefficients.
    k: Vec<i32>,
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for a box covering the
/// whole input axis (`in0 = 0`, `in1 = in_size`).
fn precompute_coeffs(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    // Pillow passes the box as C floats; (in1 - in0) is computed in float and then widened.
    let in0 = 0.0f32;
    let in1 = in_size as f32;
    let scale = (in1 - in0) as f64 / out_size as f64;
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = filter.support() * filterscale;
    let ksize = (support.ceil() as usize) * 2 + 1;

    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    let ss = 1.0 / filterscale;
    for xx in 0..out_size {
        let center = in0 as f64 + (xx as f64 + 0.5) * scale;
        // C `(int)` conversions truncate toward zero, as Rust's `as` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let n = (xmax - xmin).max(0) as usize;
        let n = n.min(ksize);
        let mut ww = 0.0f64;
        for (x, wx) in w.iter_mut().enumerate().take(n) {
            let v = filter.eval(((x as i64 + xmin) as f64 - center + 0.5) * ss);
            *wx = v;
            ww += v;
        }
        let row = &mut k[xx * ksize..(xx + 1) * ksize];
        for x in 0..n {
            let mut v = w[x];
            if ww != 0.0 {
                v /= ww;
            }
            // Round half away from zero into fixed point, then truncate like C's (int).
            row[x] = if v < 0.0 {
                (-0.5 + v * (1i64 << PRECISION_BITS) as f64) as i32
            } else {
                (0.5 + v * (1i64 << PRECISION_BITS) as f64) as i32
            };
        }
        bounds.push((xmin as usize, n));
    }
    Coeffs { ksize, bounds, k }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Horizontal pass over rows `row0 .. row0 + rows` of an interleaved 3-channel image.
fn resample_horizontal(
    src: &[u8],
    src_w: usize,
    row0: usize,
    rows: usize,
    out_w: usize,
    c: &Coeffs,
) -> Vec<u8> {
    let mut out = vec![0u8; out_w * rows * 3];
    for yy in 0..rows {
        let in_row = &src[(yy + row0) * src_w * 3..(yy + row0 + 1) * src_w * 3];
        let out_row = &mut out[yy * out_w * 3..(yy + 1) * out_w * 3];
        for xx in 0..out_w {
            let (xmin, n) = c.bounds[xx];
            let k = &c.k[xx * c.ksize..xx * c.ksize + n];
            let px = &in_row[xmin * 3..(xmin + n) * 3];
            let half = 1i32 << (PRECISION_BITS - 1);
            let (mut s0, mut s1, mut s2) = (half, half, half);
            for (p, &kx) in px.chunks_exact(3).zip(k) {
                s0 += p[0] as i32 * kx;
                s1 += p[1] as i32 * kx;
                s2 += p[2] as i32 * kx;
            }
            out_row[xx * 3] = clip8(s0);
            out_row[xx * 3 + 1] = clip8(s1);
            out_row[xx * 3 + 2] = clip8(s2);
        }
    }
    out
}

/// Vertical pass; `c.bounds` are relative to the first row of `src`.
fn resample_vertical(src: &[u8], w: usize, out_h: usize, c: &Coeffs, row_shift: usize) -> Vec<u8> {
    let stride = w * 3;
    let mut out = vec![0u8; stride * out_h];
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut acc = vec![0i32; stride];
    for yy in 0..out_h {
        let (ymin, n) = c.bounds[yy];
        let ymin = ymin - row_shift;
        let k = &c.k[yy * c.ksize..yy * c.ksize + n];
        acc.iter_mut().for_each(|a| *a = half);
        for (y, &ky) in k.iter().enumerate() {
            let in_row = &src[(ymin + y) * stride..(ymin + y + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(in_row) {
                *a += p as i32 * ky;
            }
        }
        for (o, &a) in out[yy * stride..(yy + 1) * stride].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Pillow `Image.resize((w, h), resample, reducing_gap=None)` for an 8-bit RGB image.
fn resize_pil(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    if out_w == 0 || out_h == 0 || in_w == 0 || in_h == 0 {
        // Pillow refuses these; there is nothing to interpolate from or into.
        return RgbImage::new(width, height);
    }
    if in_w == out_w && in_h == out_h {
        return img.clone();
    }
    let need_h = in_w != out_w;
    let need_v = in_h != out_h;
    let src = img.as_raw();

    let vert = precompute_coeffs(in_h, out_h, filter);
    // Rows of the source that the vertical pass reads (Pillow only resamples those horizontally).
    let row_first = vert.bounds[0].0;
    let row_last = vert.bounds[out_h - 1].0 + vert.bounds[out_h - 1].1;

    let (tmp, tmp_w, tmp_shift): (std::borrow::Cow<'_, [u8]>, usize, usize) = if need_h {
        let horiz = precompute_coeffs(in_w, out_w, filter);
        if need_v {
            let rows = row_last - row_first;
            (resample_horizontal(src, in_w, row_first, rows, out_w, &horiz).into(), out_w, row_first)
        } else {
            (resample_horizontal(src, in_w, 0, in_h, out_w, &horiz).into(), out_w, 0)
        }
    } else {
        (std::borrow::Cow::Borrowed(&src[..]), in_w, 0)
    };

    let data = if need_v {
        resample_vertical(&tmp, tmp_w, out_h, &vert, tmp_shift)
    } else {
        tmp.into_owned()
    };
    RgbImage::from_raw(width, height, data).unwrap_or_else(|| RgbImage::new(width, height))
}

/// Bit-exact re-implementation of Pillow's `Image.resize((width, height),
/// resample=Image.BICUBIC, reducing_gap=None)` for 8-bit RGB images (separable two-pass
/// fixed-point resampler with antialiasing when downscaling). A zero target size or an empty
/// input gives a black image of the requested size instead of panicking.
pub fn resize_bicubic_pil(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    resize_pil(img, width, height, Filter::Bicubic)
}

/// Same as [`resize_bicubic_pil`] with Pillow's BILINEAR filter.
pub fn resize_bilinear_pil(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    resize_pil(img, width, height, Filter::Bilinear)
}

// ---------------------------------------------------------------------------------------------
// Preprocessing
// ---------------------------------------------------------------------------------------------

/// `pixel_values` of one image: `channels × height × width` (CHW) row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    pub data: Vec<f32>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

/// LLaVA `expand2square`: centre (floor) the image on a square canvas of side max(w, h).
pub fn expand_to_square(img: &RgbImage, background: [u8; 3]) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    if w == h {
        return img.clone();
    }
    let side = w.max(h);
    let mut out = RgbImage::from_pixel(side, side, image::Rgb(background));
    let (x0, y0) = (((side - w) / 2) as usize, ((side - h) / 2) as usize);
    let (w, side_u) = (w as usize, side as usize);
    let src = img.as_raw();
    let dst: &mut [u8] = &mut out;
    for (y, row) in src.chunks_exact(w * 3).enumerate() {
        let start = ((y0 + y) * side_u + x0) * 3;
        dst[start..start + w * 3].copy_from_slice(row);
    }
    out
}

/// Target (height, width) of the resize step for an input of `h`×`w`, as transformers computes it
/// (`get_resize_output_image_size(..., default_to_square=False)` for `shortest_edge`).
pub fn resize_output_size(size: ResizeSize, h: u32, w: u32) -> (u64, u64) {
    match size {
        ResizeSize::Exact { height, width } => (height as u64, width as u64),
        ResizeSize::ShortestEdge(n) => {
            let (short, long) = if w <= h { (w, h) } else { (h, w) };
            // Python: int(n * long / short): exact integer product, correctly rounded true
            // division, truncation. All operands are < 2^53 so f64 reproduces it.
            let new_long = ((n as u64 * long as u64) as f64 / short as f64) as u64;
            if w <= h {
                (new_long, n as u64)
            } else {
                (n as u64, new_long)
            }
        }
    }
}

/// Runs the CLIPImageProcessor pipeline on an RGB image (see the module docs).
///
/// Errors (named "input image WxH") for empty images, unsupported settings, or when an
/// intermediate image would exceed [`MAX_IMAGE_PIXELS`].
pub fn preprocess(img: &RgbImage, cfg: &ImageProcessorConfig) -> Result<PixelValues, ImageError> {
    let what = format!("input image {}x{}", img.width(), img.height());
    cfg.validate().map_err(|detail| ImageError::Config {
        what: format!("(settings used to preprocess the {what})"),
        detail,
    })?;
    check_dims(img.width() as u64, img.height() as u64, &what)?;

    let mut owned: Option<RgbImage> = None;
    if cfg.pad_to_square && img.width() != img.height() {
        let side = img.width().max(img.height()) as u64;
        if side * side > MAX_IMAGE_PIXELS {
            return Err(ImageError::TooLarge {
                what,
                detail: format!("padding it to a square would create a {side}x{side} image"),
            });
        }
        owned = Some(expand_to_square(img, cfg.pad_color()));
    }

    if cfg.do_resize {
        let cur = owned.as_ref().unwrap_or(img);
        let (th, tw) = resize_output_size(cfg.size, cur.height(), cur.width());
        if th == 0 || tw == 0 || th * tw > MAX_IMAGE_PIXELS || th > u32::MAX as u64 || tw > u32::MAX as u64 {
            return Err(ImageError::TooLarge {
                what,
                detail: format!(
                    "resizing it as configured ({:?}) would create a {tw}x{th} image; its aspect ratio is too extreme",
                    cfg.size
                ),
            });
        }
        let filter = resample_filter(cfg.resample).map_err(|detail| ImageError::Config {
            what: format!("(settings used to preprocess the {what})"),
            detail,
        })?;
        owned = Some(resize_pil(cur, tw as u32, th as u32, filter));
    }
    let cur = owned.as_ref().unwrap_or(img);
    let (h, w) = (cur.height() as usize, cur.width() as usize);

    // Centre crop; pixels outside the image (crop larger than the image) are 0, as in
    // transformers' `center_crop` which pads with zeros before cropping.
    let (oh, ow, top, left) = if cfg.do_center_crop {
        let (ch, cw) = (cfg.crop_height as usize, cfg.crop_width as usize);
        let top = (h as i64 - ch as i64).div_euclid(2);
        let left = (w as i64 - cw as i64).div_euclid(2);
        (ch, cw, top, left)
    } else {
        (h, w, 0, 0)
    };

    let mean = cfg.image_mean.map(|m| m as f32);
    let std = cfg.image_std.map(|s| s as f32);
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, out) in table.iter_mut().enumerate() {
            // transformers: rescale = (u8 as float64 * factor) -> float32; normalize in float32.
            let mut x = if cfg.do_rescale {
                (v as f64 * cfg.rescale_factor) as f32
            } else {
                v as f32
            };
            if cfg.do_normalize {
                x = (x - mean[c]) / std[c];
            }
            *out = x;
        }
    }

    let src = cur.as_raw();
    let plane = oh * ow;
    let mut data = vec![0f32; 3 * plane];
    for c in 0..3 {
        let zero = lut[c][0];
        let out_plane = &mut data[c * plane..(c + 1) * plane];
        for i in 0..oh {
            let sy = top + i as i64;
            let out_row = &mut out_plane[i * ow..(i + 1) * ow];
            if sy < 0 || sy >= h as i64 {
                out_row.iter_mut().for_each(|o| *o = zero);
                continue;
            }
            let row = &src[sy as usize * w * 3..(sy as usize + 1) * w * 3];
            for (j, o) in out_row.iter_mut().enumerate() {
                let sx = left + j as i64;
                *o = if sx < 0 || sx >= w as i64 {
                    zero
                } else {
                    lut[c][row[sx as usize * 3 + c] as usize]
                };
            }
        }
    }
    Ok(PixelValues {
        data,
        channels: 3,
        height: oh,
        width: ow,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_sizes_match_transformers() {
        // int(336 * 640 / 480) = 448
        assert_eq!(resize_output_size(ResizeSize::ShortestEdge(336), 480, 640), (336, 448));
        assert_eq!(resize_output_size(ResizeSize::ShortestEdge(336), 640, 480), (448, 336));
        // int(32 * 37 / 29) = 40 (40.82...)
        assert_eq!(resize_output_size(ResizeSize::ShortestEdge(32), 29, 37), (32, 40));
    }

    #[test]
    fn default_config_is_clip336() {
        let c = ImageProcessorConfig::default();
        assert_eq!(c.output_size(), (336, 336));
        assert_eq!(c.pad_color(), [122, 116, 104]);
    }

    #[test]
    fn parses_legacy_int_sizes_and_pad() {
        let c = ImageProcessorConfig::from_json_str(
            r#"{"size": 224, "crop_size": 224, "image_aspect_ratio": "pad", "feature_extractor_type": "CLIPFeatureExtractor"}"#,
            "inline",
        )
        .unwrap();
        assert_eq!(c.size, ResizeSize::ShortestEdge(224));
        assert_eq!((c.crop_height, c.crop_width), (224, 224));
        assert!(c.pad_to_square);
    }

    #[test]
    fn rejects_unsupported_resample() {
        let e = ImageProcessorConfig::from_json_str(r#"{"resample": 1}"#, "cfg.json").unwrap_err();
        let m = e.to_string();
        assert!(m.contains("cfg.json") && m.contains("LANCZOS"), "{m}");
    }

    #[test]
    fn resize_degenerate_sizes_do_not_panic() {
        let img = RgbImage::new(5, 3);
        assert_eq!(resize_bicubic_pil(&img, 0, 4).dimensions(), (0, 4));
        assert_eq!(resize_bicubic_pil(&RgbImage::new(0, 0), 2, 2).dimensions(), (2, 2));
        assert_eq!(resize_bicubic_pil(&img, 1, 1).dimensions(), (1, 1));
        assert_eq!(resize_bicubic_pil(&img, 500, 1).dimensions(), (500, 1));
    }
}
