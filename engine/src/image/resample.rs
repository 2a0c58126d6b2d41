//! Pillow's resampler (`libImaging/Resample.c`, the 8-bits-per-channel path), written out by hand.
//!
//! It is hand-written rather than taken from the `image` crate because LLaVA's checkpoints were trained on
//! pixels produced by Pillow: bit-exact `pixel_values` need Pillow's fixed-point coefficients, its rounding and
//! its order of the two separable passes (which changed in Pillow 13, see [`PassOrder`]); any other resizer
//! differs by a level here and there. Only BICUBIC and BILINEAR, the filters CLIP configs use, are implemented.

use image::RgbImage;

use super::{PIL_BICUBIC, PIL_BILINEAR, PIL_BOX, PIL_HAMMING, PIL_LANCZOS, PIL_NEAREST};

/// Fixed-point precision of Pillow's 8-bit resampler: 32 bits minus 8 for the value minus 2 for
/// the sign and for coefficient sums above 1.
const PRECISION_BITS: u32 = 32 - 8 - 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Filter {
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

pub(super) fn resample_filter(code: u32) -> Result<Filter, String> {
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
fn resample_horizontal(src: &[u8], src_w: usize, row0: usize, rows: usize, out_w: usize, c: &Coeffs) -> Vec<u8> {
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

/// Order of Pillow's two separable passes when both axes change size.
///
/// The values produced by the two orders differ in a few pixels by ±1 (the intermediate image is
/// rounded to u8), so the Pillow version of the reference matters for bit-exactness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PassOrder {
    /// Pillow >= 13.0: horizontal pass first, except when the height shrinks by more than twice
    /// as many pixels as the width (`in_h - out_h > 0 && in_h - out_h > 2 * (in_w - out_w)`),
    /// in which case the vertical pass runs first. This is what the repo's reference toolchain
    /// (`tools/pyenv.sh`: latest Pillow + transformers) produces.
    #[default]
    Pillow13,
    /// Pillow <= 12.x: always horizontal first (what LLaVA-1.5 was trained and evaluated with).
    HorizontalFirst,
}

impl PassOrder {
    fn horizontal_first(self, in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
        match self {
            PassOrder::HorizontalFirst => true,
            PassOrder::Pillow13 => {
                let dh = in_h as i64 - out_h as i64;
                let dw = in_w as i64 - out_w as i64;
                !(dh > 0 && dh > dw * 2)
            }
        }
    }
}

/// Resampling filters implemented bit-exactly (Pillow's 8-bit fixed-point path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResampleFilter {
    /// `Image.BILINEAR` (2).
    Bilinear,
    /// `Image.BICUBIC` (3), cubic convolution with a = -0.5.
    Bicubic,
}

/// Pillow `Image.resize((width, height), filter, reducing_gap=None)` for an 8-bit RGB image,
/// with an explicit pass order (see [`PassOrder`]). A zero target size or an empty input gives a
/// black image of the requested size instead of panicking.
pub fn resize_pil_with(img: &RgbImage, width: u32, height: u32, filter: ResampleFilter, order: PassOrder) -> RgbImage {
    let filter = match filter {
        ResampleFilter::Bilinear => Filter::Bilinear,
        ResampleFilter::Bicubic => Filter::Bicubic,
    };
    resize_pil(img, width, height, filter, order)
}

pub(super) fn resize_pil(img: &RgbImage, width: u32, height: u32, filter: Filter, order: PassOrder) -> RgbImage {
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

    let data = if need_h && need_v {
        let vert = precompute_coeffs(in_h, out_h, filter);
        let horiz = precompute_coeffs(in_w, out_w, filter);
        if order.horizontal_first(in_w, in_h, out_w, out_h) {
            // Only the source rows the vertical pass reads are resampled horizontally (as Pillow
            // does; it does not change any value).
            let row_first = vert.bounds[0].0;
            let row_last = vert.bounds[out_h - 1].0 + vert.bounds[out_h - 1].1;
            let tmp = resample_horizontal(src, in_w, row_first, row_last - row_first, out_w, &horiz);
            resample_vertical(&tmp, out_w, out_h, &vert, row_first)
        } else {
            let tmp = resample_vertical(src, in_w, out_h, &vert, 0);
            resample_horizontal(&tmp, in_w, 0, out_h, out_w, &horiz)
        }
    } else if need_h {
        let horiz = precompute_coeffs(in_w, out_w, filter);
        resample_horizontal(src, in_w, 0, in_h, out_w, &horiz)
    } else {
        let vert = precompute_coeffs(in_h, out_h, filter);
        resample_vertical(src, in_w, out_h, &vert, 0)
    };
    RgbImage::from_raw(width, height, data).unwrap_or_else(|| RgbImage::new(width, height))
}

/// Bit-exact re-implementation of Pillow's `Image.resize((width, height),
/// resample=Image.BICUBIC, reducing_gap=None)` for 8-bit RGB images (separable two-pass
/// fixed-point resampler with antialiasing when downscaling), with Pillow >= 13's pass order
/// ([`PassOrder::Pillow13`]; use [`resize_pil_with`] for Pillow <= 12). A zero target size or
/// an empty input gives a black image of the requested size instead of panicking.
pub fn resize_bicubic_pil(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    resize_pil(img, width, height, Filter::Bicubic, PassOrder::default())
}

/// Same as [`resize_bicubic_pil`] with Pillow's BILINEAR filter.
pub fn resize_bilinear_pil(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    resize_pil(img, width, height, Filter::Bilinear, PassOrder::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_degenerate_sizes_do_not_panic() {
        let img = RgbImage::new(5, 3);
        assert_eq!(resize_bicubic_pil(&img, 0, 4).dimensions(), (0, 4));
        assert_eq!(resize_bicubic_pil(&RgbImage::new(0, 0), 2, 2).dimensions(), (2, 2));
        assert_eq!(resize_bicubic_pil(&img, 1, 1).dimensions(), (1, 1));
        assert_eq!(resize_bicubic_pil(&img, 500, 1).dimensions(), (500, 1));
    }
}
