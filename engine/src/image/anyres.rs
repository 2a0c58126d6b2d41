//! LLaVA-NeXT's "anyres" geometry, as transformers' `LlavaNextImageProcessor` (PIL) and
//! `LlavaNextForConditionalGeneration` compute it: the best resolution among `image_grid_pinpoints` for an
//! image, the size the image is resized to inside it (aspect ratio kept), the centred zero padding around it,
//! the tiles of the tower's size cut from the padded image, and which rows and columns of the tiles' feature
//! grid survive unpadding. The processor (`preprocess_anyres`) and the model (`llava::Model`'s feature packing)
//! both read these functions, so the two sides cannot disagree. Float operations follow Python's order
//! (true division, then truncation or ceiling) so every size is the one transformers gets.

use image::RgbImage;

use super::config::ImageProcessorConfig;
use super::resample::{resample_filter, resize_pil};
use super::{preprocess_one, ImageError, PixelValues, ResizeSize, MAX_IMAGE_PIXELS};

/// `select_best_resolution`: the (height, width) among `pinpoints` that keeps most of an `h`x`w` image's
/// resolution when it is fitted inside, ties going to the one that wastes the least area.
pub fn select_best_resolution(h: u32, w: u32, pinpoints: &[(u32, u32)]) -> (u32, u32) {
    let (oh, ow) = (h as f64, w as f64);
    let mut best = pinpoints.first().copied().unwrap_or((h, w));
    let (mut max_effective, mut min_wasted) = (0u64, u64::MAX);
    for &(ph, pw) in pinpoints {
        let scale = (pw as f64 / ow).min(ph as f64 / oh);
        let (dw, dh) = ((ow * scale) as u64, (oh * scale) as u64);
        let effective = (dw * dh).min(w as u64 * h as u64);
        let wasted = (pw as u64 * ph as u64).saturating_sub(effective);
        if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
            max_effective = effective;
            min_wasted = wasted;
            best = (ph, pw);
        }
    }
    best
}

/// `_get_patch_output_size`: the (height, width) an `h`x`w` image is resized to inside `target` (height,
/// width), its aspect ratio kept.
pub fn patch_output_size(h: u32, w: u32, target: (u32, u32)) -> (u32, u32) {
    let (th, tw) = target;
    let scale_w = tw as f64 / w as f64;
    let scale_h = th as f64 / h as f64;
    if scale_w < scale_h {
        (((h as f64 * scale_w).ceil() as u32).min(th), tw)
    } else {
        (th, ((w as f64 * scale_h).ceil() as u32).min(tw))
    }
}

/// `get_anyres_image_grid_shape`: tiles down and across for an `h`x`w` image and tiles of `tile` pixels.
pub fn grid_shape(h: u32, w: u32, pinpoints: &[(u32, u32)], tile: u32) -> (usize, usize) {
    let (bh, bw) = select_best_resolution(h, w, pinpoints);
    ((bh / tile) as usize, (bw / tile) as usize)
}

/// `unpad_image`: of a (cur_h, cur_w) feature grid covering the padded image, the rows and the columns
/// (half-open ranges) that cover the original `h`x`w` image.
pub fn unpadded_window(cur_h: usize, cur_w: usize, h: u32, w: u32) -> ((usize, usize), (usize, usize)) {
    let (oh, ow) = (h as f64, w as f64);
    let original_aspect = ow / oh;
    let current_aspect = cur_w as f64 / cur_h as f64;
    // Python's int(round(x, 7)).
    let round7 = |x: f64| ((x * 1e7).round() / 1e7) as i64;
    if original_aspect > current_aspect {
        let scale = cur_w as f64 / ow;
        let new_h = round7(oh * scale).clamp(0, cur_h as i64) as usize;
        let pad = (cur_h - new_h) / 2;
        ((pad, cur_h - pad), (0, cur_w))
    } else {
        let scale = cur_h as f64 / oh;
        let new_w = round7(ow * scale).clamp(0, cur_w as i64) as usize;
        let pad = (cur_w - new_w) / 2;
        ((0, cur_h), (pad, cur_w - pad))
    }
}

/// `LlavaNextImageProcessor.preprocess` of one image: the base image (resized to `size` without keeping its
/// aspect ratio), then the tiles of the image resized into its best resolution and zero padded to it, each tile
/// through the CLIP pipeline (`preprocess_one`). `PixelValues::tiles` counts them; `original` is the image's size.
pub(super) fn preprocess_anyres(img: &RgbImage, cfg: &ImageProcessorConfig) -> Result<PixelValues, ImageError> {
    let what = format!("input image {}x{}", img.width(), img.height());
    let config_err =
        |detail: String| ImageError::Config { what: format!("(settings used to preprocess the {what})"), detail };
    let (h, w) = (img.height(), img.width());
    let tile = cfg.crop_height;
    let (bh, bw) = select_best_resolution(h, w, &cfg.grid_pinpoints);
    if (bh as u64) * (bw as u64) > MAX_IMAGE_PIXELS {
        return Err(ImageError::TooLarge { what, detail: format!("its best resolution {bw}x{bh} is too large") });
    }
    let filter = resample_filter(cfg.resample).map_err(config_err)?;
    let (nh, nw) = patch_output_size(h, w, (bh, bw));
    let resized = if (nh, nw) == (h, w) { img.clone() } else { resize_pil(img, nw, nh, filter, cfg.pass_order) };
    // `_pad_for_patching`: centred on a zero canvas of the best resolution.
    let mut padded = RgbImage::new(bw, bh);
    let (x0, y0) = ((bw - nw) / 2, (bh - nh) / 2);
    image::imageops::replace(&mut padded, &resized, x0 as i64, y0 as i64);
    let (sh, sw) = match cfg.size {
        ResizeSize::ShortestEdge(n) => (n, n),
        ResizeSize::Exact { height, width } => (height, width),
    };
    let base = if (sh, sw) == (h, w) { img.clone() } else { resize_pil(img, sw, sh, filter, cfg.pass_order) };
    let mut tiles = vec![base];
    for ty in 0..bh / tile {
        for tx in 0..bw / tile {
            tiles.push(image::imageops::crop_imm(&padded, tx * tile, ty * tile, tile, tile).to_image());
        }
    }
    let mut out: Option<PixelValues> = None;
    for t in &tiles {
        let pv = preprocess_one(t, cfg)?;
        match out.as_mut() {
            None => out = Some(pv),
            Some(o) => {
                o.data.extend_from_slice(&pv.data);
                o.tiles += 1;
            }
        }
    }
    let mut out = out.ok_or_else(|| config_err("image_grid_pinpoints gave no tiles".into()))?;
    out.original = (h as usize, w as usize);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PINS: [(u32, u32); 5] = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];

    #[test]
    fn best_resolution_follows_the_aspect_ratio() {
        // transformers' `select_best_resolution` on the same inputs: a wide image goes to the widest grid (it keeps
        // more pixels), a tall one to the tallest, a big square one to 2x2.
        assert_eq!(select_best_resolution(300, 700, &PINS), (336, 1008));
        assert_eq!(select_best_resolution(700, 300, &PINS), (1008, 336));
        assert_eq!(select_best_resolution(800, 800, &PINS), (672, 672));
        assert_eq!(grid_shape(800, 800, &PINS, 336), (2, 2));
    }

    #[test]
    fn unpadding_keeps_the_image_rows() {
        // A 2:1 image in a square grid of 24x24 features: 12 rows survive, centred.
        assert_eq!(unpadded_window(24, 24, 100, 200), ((6, 18), (0, 24)));
        assert_eq!(unpadded_window(24, 24, 200, 100), ((0, 24), (6, 18)));
        assert_eq!(unpadded_window(24, 24, 50, 50), ((0, 24), (0, 24)));
    }
}
