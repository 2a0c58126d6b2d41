//! `ImageProcessorConfig`: the HuggingFace `preprocessor_config.json` settings (CLIPImageProcessor plus LLaVA's
//! pad-to-square), parsed from the JSON as transformers writes it and validated before any image is touched.

use std::fmt;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::resample::{resample_filter, PassOrder};
use super::{ImageError, MAX_IMAGE_PIXELS, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PIL_BICUBIC};

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
/// set when the JSON contains `"image_aspect_ratio": "pad"` (the key of original LLaVA model
/// configs), `"pad_to_square": true`, or `"do_pad": true` with
/// `"image_processor_type": "LlavaImageProcessor"` (transformers' equivalent of expand2square),
/// and can be set by the caller afterwards.
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
    /// Parsed for completeness; [`load_rgb8`](super::load_rgb8) / [`decode_rgb8`](super::decode_rgb8) always
    /// produce RGB and [`preprocess`](super::preprocess) takes an RGB image, so conversion always happens.
    pub do_convert_rgb: bool,
    /// LLaVA `expand2square` before resizing (`image_aspect_ratio == "pad"`).
    pub pad_to_square: bool,
    /// Which Pillow version's resampling pass order to reproduce (not read from the JSON).
    pub pass_order: PassOrder,
    /// LLaVA-NeXT's `image_grid_pinpoints` as (height, width): anyres tiling (`super::anyres`); empty: none.
    pub grid_pinpoints: Vec<(u32, u32)>,
    /// Qwen2-VL's dynamic resolution: `smart_resize` and flattened patches (`super::qwen`) instead of the
    /// resize-and-crop above; None for CLIP's pipeline.
    pub patches: Option<super::qwen::PatchGrid>,
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
            pass_order: PassOrder::default(),
            grid_pinpoints: Vec::new(),
            patches: None,
        }
    }
}

impl ImageProcessorConfig {
    /// Reads and validates a `preprocessor_config.json`. Errors name the file.
    pub fn from_file(path: &Path) -> Result<Self, ImageError> {
        let text = std::fs::read_to_string(path)
            .map_err(|cause| ImageError::ConfigRead { path: path.to_path_buf(), cause })?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses and validates a preprocessor config from JSON text; `what` names the source in
    /// errors.
    pub fn from_json_str(json: &str, what: &str) -> Result<Self, ImageError> {
        let cfg: ImageProcessorConfig = serde_json::from_str(json).map_err(|e| ImageError::Config {
            what: what.to_string(),
            detail: format!("{e}; expected a HuggingFace CLIPImageProcessor preprocessor_config.json object"),
        })?;
        cfg.validate().map_err(|detail| ImageError::Config { what: what.to_string(), detail })?;
        Ok(cfg)
    }

    /// (height, width) of the `pixel_values` produced by [`preprocess`](super::preprocess).
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
            (true, ResizeSize::ShortestEdge(n)) if self.pad_to_square => Some((n as usize, n as usize)),
            _ => None,
        }
    }

    /// Checks that the settings are supported; the error text says what is wrong.
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.do_resize {
            resample_filter(self.resample)?;
            match self.size {
                ResizeSize::ShortestEdge(0) => return Err("size.shortest_edge must be at least 1".into()),
                ResizeSize::Exact { height, width } if height == 0 || width == 0 => {
                    return Err(format!("size {{\"height\": {height}, \"width\": {width}}} must be at least 1x1"))
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
        if self.do_center_crop && (self.crop_height as u64) * (self.crop_width as u64) > MAX_IMAGE_PIXELS {
            return Err(format!(
                "crop_size {}x{} is larger than the {MAX_IMAGE_PIXELS}-pixel limit",
                self.crop_height, self.crop_width
            ));
        }
        if self.do_rescale && !self.rescale_factor.is_finite() {
            return Err(format!("rescale_factor {} is not a finite number", self.rescale_factor));
        }
        if self.do_normalize {
            for c in 0..3 {
                if !self.image_mean[c].is_finite() {
                    return Err(format!("image_mean[{c}] = {} is not finite", self.image_mean[c]));
                }
                let s = self.image_std[c];
                if !s.is_finite() || s == 0.0 {
                    return Err(format!("image_std[{c}] = {s} must be a finite, non-zero number"));
                }
            }
        }
        self.validate_anyres()?;
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

    /// Checks the anyres settings: square tiles (the crop) that divide every pinpoint.
    fn validate_anyres(&self) -> Result<(), String> {
        if self.grid_pinpoints.is_empty() {
            return Ok(());
        }
        let tile = self.crop_height;
        if !self.do_center_crop || self.crop_width != tile || tile == 0 {
            return Err(format!(
                "image_grid_pinpoints needs a square crop_size (the tower's input), got {}x{}",
                self.crop_height, self.crop_width
            ));
        }
        for &(h, w) in &self.grid_pinpoints {
            if h == 0 || w == 0 || h % tile != 0 || w % tile != 0 || (h as u64) * (w as u64) > MAX_IMAGE_PIXELS {
                return Err(format!(
                    "image_grid_pinpoints entry [{h}, {w}] must be whole multiples of the {tile}-pixel crop_size"
                ));
            }
        }
        Ok(())
    }

    /// Background colour LLaVA's `expand2square` uses: `tuple(int(m * 255) for m in image_mean)`.
    pub fn pad_color(&self) -> [u8; 3] {
        // Python's int() truncates toward zero; PIL then clamps the fill colour to 0..=255.
        self.image_mean.map(|m| (m * 255.0).trunc().clamp(0.0, 255.0) as u8)
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
    #[serde(default)]
    do_pad: Option<bool>,
    #[serde(default)]
    image_processor_type: Option<Value>,
    #[serde(default)]
    image_grid_pinpoints: Option<Value>,
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
        (None, Some(h), Some(w)) => {
            Ok(ResizeSize::Exact { height: value_u32(h, "size.height")?, width: value_u32(w, "size.width")? })
        }
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
        None => {
            Err(ConfigShapeError(format!("crop_size must be an integer or {{\"height\": H, \"width\": W}}, got {v}")))
        }
    }
}

/// `parse_triplet` with a plain error text.
pub(super) fn parse_triplet_value(v: &Value, what: &str) -> Result<[f64; 3], String> {
    parse_triplet(v, what).map_err(|e| e.0)
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
        // transformers' LlavaImageProcessor: `do_pad` is LLaVA's expand2square (same background,
        // same centring). Other processors use `do_pad` for batch padding, which is a no-op here.
        let llava_do_pad = raw.do_pad == Some(true)
            && raw
                .image_processor_type
                .as_ref()
                .and_then(|v| v.as_str())
                .is_some_and(|t| t.starts_with("LlavaImageProcessor"));
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
            pad_to_square: raw.pad_to_square.unwrap_or(pad_from_aspect || llava_do_pad),
            pass_order: d.pass_order,
            grid_pinpoints: match raw.image_grid_pinpoints.as_ref().filter(|v| !v.is_null()) {
                Some(v) => parse_pinpoints(v).map_err(ConfigShapeError)?,
                None => Vec::new(),
            },
            patches: None,
        })
    }
}

/// `image_grid_pinpoints`: a list of [height, width] pairs.
pub(crate) fn parse_pinpoints(v: &Value) -> Result<Vec<(u32, u32)>, String> {
    let bad = || format!("image_grid_pinpoints must be a list of [height, width] pairs, got {v}");
    let list = v.as_array().ok_or_else(bad)?;
    if list.is_empty() || list.len() > 64 {
        return Err(format!("image_grid_pinpoints must hold 1 to 64 resolutions, got {}", list.len()));
    }
    list.iter()
        .map(|p| match p.as_array().map(|a| a.as_slice()) {
            Some([h, w]) => match (h.as_u64(), w.as_u64()) {
                (Some(h), Some(w)) if h <= u32::MAX as u64 && w <= u32::MAX as u64 => Ok((h as u32, w as u32)),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn llava_image_processor_do_pad_means_pad_to_square() {
        let c = ImageProcessorConfig::from_json_str(
            r#"{"image_processor_type": "LlavaImageProcessor", "do_pad": true}"#,
            "inline",
        )
        .unwrap();
        assert!(c.pad_to_square);
        let c = ImageProcessorConfig::from_json_str(
            r#"{"image_processor_type": "CLIPImageProcessor", "do_pad": true}"#,
            "inline",
        )
        .unwrap();
        assert!(!c.pad_to_square);
    }

    #[test]
    fn rejects_unsupported_resample() {
        let e = ImageProcessorConfig::from_json_str(r#"{"resample": 1}"#, "cfg.json").unwrap_err();
        let m = e.to_string();
        assert!(m.contains("cfg.json") && m.contains("LANCZOS"), "{m}");
    }
}
