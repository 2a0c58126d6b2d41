//! Qwen2-VL / Qwen2.5-VL's image processor (`Qwen2VLImageProcessor`): `smart_resize` to a size whose sides are
//! multiples of `patch_size × merge_size` and whose area lies within [min_pixels, max_pixels], Pillow's bicubic
//! resampler, rescale and normalise as CLIP's, then the patches flattened in the merger's order: for each
//! `merge_size`² block of patches in raster order, its patches in raster order, each patch as
//! (channel, frame, row, column) with the single image repeated over `temporal_patch_size` frames.

use super::config::{parse_triplet_value, ImageProcessorConfig, ResizeSize};
use super::decode::check_dims;
use super::resample::{resample_filter, resize_pil};
use super::{ImageError, PixelValues, MAX_IMAGE_PIXELS};
use image::RgbImage;
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// How Qwen's processor cuts an image into patches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchGrid {
    pub patch_size: u32,
    pub merge_size: u32,
    pub temporal_patch_size: u32,
    pub min_pixels: u64,
    pub max_pixels: u64,
}

impl PatchGrid {
    /// The side every resized image is a multiple of.
    pub fn factor(&self) -> u32 {
        self.patch_size * self.merge_size
    }
}

/// transformers' smart_resize refuses images longer than 200 times their width (or the reverse).
const MAX_ASPECT: f64 = 200.0;

/// Why `smart_resize` refuses an image.
#[derive(Debug, Clone, PartialEq)]
pub enum ResizeError {
    /// Proportions Qwen's processor does not take (an aspect ratio above 200).
    Shape(String),
    /// No pixels, or a result outside the engine's limits.
    Size(String),
}

impl std::fmt::Display for ResizeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResizeError::Shape(d) | ResizeError::Size(d) => f.write_str(d),
        }
    }
}

/// transformers' `smart_resize`: (height, width) rounded to multiples of `factor`, scaled into
/// [min_pixels, max_pixels] keeping the aspect ratio; an aspect ratio above 200 is an error.
pub fn smart_resize(height: u32, width: u32, g: &PatchGrid) -> Result<(u32, u32), ResizeError> {
    let (h, w) = (height as f64, width as f64);
    if height == 0 || width == 0 {
        return Err(ResizeError::Size(format!("a {width}x{height} image has no pixels")));
    }
    if h.max(w) / h.min(w) > MAX_ASPECT {
        let ratio = h.max(w) / h.min(w);
        return Err(ResizeError::Shape(format!("its aspect ratio ({ratio:.1}) is above Qwen's limit of {MAX_ASPECT}")));
    }
    let f = g.factor() as f64;
    // Python's round() is half-to-even.
    let mut hb = (h / f).round_ties_even() * f;
    let mut wb = (w / f).round_ties_even() * f;
    if hb * wb > g.max_pixels as f64 {
        let beta = ((h * w) / g.max_pixels as f64).sqrt();
        hb = f.max((h / beta / f).floor() * f);
        wb = f.max((w / beta / f).floor() * f);
    } else if hb * wb < g.min_pixels as f64 {
        let beta = (g.min_pixels as f64 / (h * w)).sqrt();
        hb = (h * beta / f).ceil() * f;
        wb = (w * beta / f).ceil() * f;
    }
    if hb < 1.0 || wb < 1.0 || hb * wb > MAX_IMAGE_PIXELS as f64 {
        return Err(ResizeError::Size(format!("smart_resize gives {wb}x{hb}, outside the engine's limits")));
    }
    Ok((hb as u32, wb as u32))
}

/// Resize, normalise and patchify `img`: `pixels.data` is (patches, 3 · T · P · P), `pixels.grid` (1, h, w) in
/// patches.
pub(super) fn preprocess_patches(
    img: &RgbImage,
    cfg: &ImageProcessorConfig,
    g: &PatchGrid,
) -> Result<PixelValues, ImageError> {
    let what = format!("input image {}x{}", img.width(), img.height());
    check_dims(img.width() as u64, img.height() as u64, &what)?;
    let (th, tw) = if cfg.do_resize {
        smart_resize(img.height(), img.width(), g).map_err(|e| match e {
            ResizeError::Shape(detail) => ImageError::Shape { what: what.clone(), detail },
            ResizeError::Size(detail) => ImageError::TooLarge { what: what.clone(), detail },
        })?
    } else {
        (img.height(), img.width())
    };
    let (p, m) = (g.patch_size as usize, g.merge_size as usize);
    if !(th as usize).is_multiple_of(p * m) || !(tw as usize).is_multiple_of(p * m) {
        return Err(ImageError::Config {
            what: format!("(settings used to preprocess the {what})"),
            detail: format!("{tw}x{th} is not a whole number of {0}x{0} merged patches; turn do_resize on", p * m),
        });
    }
    let resized;
    let cur = if (th, tw) != (img.height(), img.width()) {
        let filter = resample_filter(cfg.resample).map_err(|detail| ImageError::Config {
            what: format!("(settings used to preprocess the {what})"),
            detail,
        })?;
        resized = resize_pil(img, tw, th, filter, cfg.pass_order);
        &resized
    } else {
        img
    };
    let lut = super::normalize_lut(cfg);
    let (h, w) = (th as usize, tw as usize);
    let (gh, gw) = (h / p, w / p);
    let t = g.temporal_patch_size as usize;
    let dim = 3 * t * p * p;
    let src = cur.as_raw();
    let mut data = Vec::with_capacity(gh * gw * dim);
    for by in 0..gh / m {
        for bx in 0..gw / m {
            for iy in 0..m {
                for ix in 0..m {
                    let (py, px) = (by * m + iy, bx * m + ix);
                    for (c, table) in lut.iter().enumerate() {
                        for _ in 0..t {
                            for r in 0..p {
                                let row = (py * p + r) * w;
                                for col in 0..p {
                                    data.push(table[src[(row + px * p + col) * 3 + c] as usize]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(PixelValues {
        data,
        channels: 3,
        height: h,
        width: w,
        tiles: 1,
        original: (img.height() as usize, img.width() as usize),
        grid: Some([1, gh, gw]),
    })
}

#[derive(Deserialize)]
struct RawQwen {
    #[serde(default)]
    do_resize: Option<bool>,
    #[serde(default)]
    size: Option<Value>,
    #[serde(default)]
    min_pixels: Option<u64>,
    #[serde(default)]
    max_pixels: Option<u64>,
    #[serde(default)]
    resample: Option<u32>,
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
    patch_size: Option<u32>,
    #[serde(default)]
    merge_size: Option<u32>,
    #[serde(default)]
    temporal_patch_size: Option<u32>,
}

/// Qwen2VLImageProcessor's settings from a `preprocessor_config.json` (or its defaults when `path` is None),
/// for a vision tower of `patch_size`, `merge_size` and `temporal_patch_size`, which the file must agree with.
pub fn qwen_processor(path: Option<&Path>, tower: (u32, u32, u32)) -> Result<ImageProcessorConfig, ImageError> {
    let what = path.map_or_else(|| "Qwen2VLImageProcessor defaults".to_string(), |p| p.display().to_string());
    let raw: RawQwen = match path {
        None => {
            serde_json::from_str("{}").map_err(|e| ImageError::Config { what: what.clone(), detail: e.to_string() })?
        }
        Some(p) => {
            let text =
                std::fs::read_to_string(p).map_err(|cause| ImageError::ConfigRead { path: p.to_path_buf(), cause })?;
            serde_json::from_str(&text).map_err(|e| ImageError::Config {
                what: what.clone(),
                detail: format!("{e}; expected a Qwen2VLImageProcessor preprocessor_config.json object"),
            })?
        }
    };
    let bad = |detail: String| ImageError::Config { what: what.clone(), detail };
    let size_field = |keys: &[&str]| -> Option<u64> {
        let s = raw.size.as_ref()?.as_object()?;
        keys.iter().find_map(|k| s.get(*k).and_then(|v| v.as_u64()))
    };
    let min_pixels = raw.min_pixels.or_else(|| size_field(&["shortest_edge", "min_pixels"])).unwrap_or(56 * 56);
    let max_pixels = raw.max_pixels.or_else(|| size_field(&["longest_edge", "max_pixels"])).unwrap_or(28 * 28 * 1280);
    let grid = PatchGrid {
        patch_size: raw.patch_size.unwrap_or(tower.0),
        merge_size: raw.merge_size.unwrap_or(tower.1),
        temporal_patch_size: raw.temporal_patch_size.unwrap_or(tower.2),
        min_pixels,
        max_pixels,
    };
    if (grid.patch_size, grid.merge_size, grid.temporal_patch_size) != tower {
        return Err(bad(format!(
            "patch_size {}, merge_size {}, temporal_patch_size {} differ from the vision tower's {}, {}, {} (config.json)",
            grid.patch_size, grid.merge_size, grid.temporal_patch_size, tower.0, tower.1, tower.2
        )));
    }
    if min_pixels == 0 || min_pixels > max_pixels || max_pixels > MAX_IMAGE_PIXELS {
        return Err(bad(format!(
            "min_pixels {min_pixels} and max_pixels {max_pixels} must satisfy 0 < min <= max <= {MAX_IMAGE_PIXELS}"
        )));
    }
    let d = ImageProcessorConfig::default();
    let triplet = |v: &Option<Value>, name: &str, default: [f64; 3]| -> Result<[f64; 3], ImageError> {
        match v.as_ref().filter(|v| !v.is_null()) {
            None => Ok(default),
            Some(v) => parse_triplet_value(v, name).map_err(bad),
        }
    };
    let cfg = ImageProcessorConfig {
        do_resize: raw.do_resize.unwrap_or(true),
        size: ResizeSize::ShortestEdge(1),
        resample: raw.resample.unwrap_or(super::PIL_BICUBIC),
        do_center_crop: false,
        do_rescale: raw.do_rescale.unwrap_or(true),
        rescale_factor: raw.rescale_factor.unwrap_or(1.0 / 255.0),
        do_normalize: raw.do_normalize.unwrap_or(true),
        image_mean: triplet(&raw.image_mean, "image_mean", d.image_mean)?,
        image_std: triplet(&raw.image_std, "image_std", d.image_std)?,
        patches: Some(grid),
        ..d
    };
    cfg.validate().map_err(bad)?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(p: u32, m: u32, min: u64, max: u64) -> PatchGrid {
        PatchGrid { patch_size: p, merge_size: m, temporal_patch_size: 2, min_pixels: min, max_pixels: max }
    }

    #[test]
    fn smart_resize_matches_transformers() {
        // Values from transformers' smart_resize (factor 28, the Qwen2-VL defaults).
        let g = grid(14, 2, 56 * 56, 28 * 28 * 1280);
        assert_eq!(smart_resize(480, 640, &g).unwrap(), (476, 644));
        assert_eq!(smart_resize(10, 10, &g).unwrap(), (56, 56));
        assert_eq!(smart_resize(4000, 3000, &g).unwrap(), (1148, 840));
        // Half-to-even rounding: 42 / 28 = 1.5 rounds to 2, 70 / 28 = 2.5 rounds to 2.
        assert_eq!(smart_resize(42, 70, &grid(14, 2, 1, 1 << 40)).unwrap(), (56, 56));
        assert!(smart_resize(1, 300, &g).unwrap_err().to_string().contains("aspect ratio"));
    }
}
