//! Bounded decoding: PNG / JPEG sniffed by signature, the size checked from the header before any pixel buffer
//! exists (decompression-bomb limits), and the result converted to 8-bit RGB exactly like PIL's
//! `Image.convert("RGB")`.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageFormat, RgbImage};

use super::{ImageError, MAX_ENCODED_BYTES, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE};

/// Reads and decodes a PNG or JPEG file and converts it to 8-bit RGB like PIL's
/// `Image.open(path).convert("RGB")`. Errors name the file.
pub fn load_rgb8(path: &Path) -> Result<RgbImage, ImageError> {
    let what = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|cause| ImageError::Read { path: path.to_path_buf(), cause })?;
    if meta.len() > MAX_ENCODED_BYTES {
        return Err(ImageError::TooLarge {
            what,
            detail: format!(
                "the file is {} bytes, more than the {MAX_ENCODED_BYTES}-byte limit for encoded images",
                meta.len()
            ),
        });
    }
    let bytes = std::fs::read(path).map_err(|cause| ImageError::Read { path: path.to_path_buf(), cause })?;
    decode_rgb8(&bytes, &what)
}

/// Decodes an in-memory PNG or JPEG and converts it to 8-bit RGB like PIL's `convert("RGB")`.
/// `what` names the input in error messages (a file name, "request image 2", ...).
pub fn decode_rgb8(bytes: &[u8], what: &str) -> Result<RgbImage, ImageError> {
    decode_rgb8_within(bytes, what, MAX_IMAGE_SIDE)
}

/// `decode_rgb8` for images at most `max_side` pixels per side (and within the global limits): the side is read
/// from the PNG or JPEG header and a larger image is refused before any pixel buffer exists.
pub fn decode_rgb8_within(bytes: &[u8], what: &str, max_side: u32) -> Result<RgbImage, ImageError> {
    let dynimg = decode_dynamic(bytes, what, max_side.min(MAX_IMAGE_SIDE))?;
    Ok(to_rgb8_like_pil(dynimg))
}

/// The width and height a PNG or JPEG header declares, without decoding any pixel.
pub fn header_dimensions(bytes: &[u8], what: &str) -> Result<(u32, u32), ImageError> {
    let format = sniff_format(bytes, what)?;
    image::ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| classify_decode_error(e, what, format_name(format)))
}

fn format_name(format: ImageFormat) -> &'static str {
    if format == ImageFormat::Png {
        "PNG"
    } else {
        "JPEG"
    }
}

/// PNG or JPEG by signature; errors name what the data looks like, never its bytes (they may be a secret file's).
fn sniff_format(bytes: &[u8], what: &str) -> Result<ImageFormat, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::UnsupportedFormat {
            what: what.to_string(),
            detail: "the data is empty (0 bytes)".into(),
        });
    }
    match image::guess_format(bytes) {
        Ok(f @ (ImageFormat::Png | ImageFormat::Jpeg)) => Ok(f),
        Ok(other) => {
            Err(ImageError::UnsupportedFormat { what: what.to_string(), detail: format!("it looks like {other:?}") })
        }
        Err(_) => {
            let text = bytes.iter().take(64).all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace());
            let looks = if text { "it looks like text" } else { "it is not an image format this build knows" };
            Err(ImageError::UnsupportedFormat {
                what: what.to_string(),
                detail: format!("the data does not start with a PNG or JPEG signature ({looks})"),
            })
        }
    }
}

fn decode_dynamic(bytes: &[u8], what: &str, max_side: u32) -> Result<DynamicImage, ImageError> {
    if bytes.len() as u64 > MAX_ENCODED_BYTES {
        return Err(ImageError::TooLarge {
            what: what.to_string(),
            detail: format!("the encoded data is {} bytes, more than the {MAX_ENCODED_BYTES}-byte limit", bytes.len()),
        });
    }
    let format = sniff_format(bytes, what)?;
    let fmt_name = format_name(format);
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
    if w > max_side || h > max_side {
        return Err(ImageError::TooLarge {
            what: what.to_string(),
            detail: format!("it is {w}x{h} pixels, more than {max_side} per side"),
        });
    }
    DynamicImage::from_decoder(decoder).map_err(map_err)
}

pub(super) fn check_dims(w: u64, h: u64, what: &str) -> Result<(), ImageError> {
    if w == 0 || h == 0 {
        return Err(ImageError::Empty { what: what.to_string(), width: w, height: h });
    }
    if w > MAX_IMAGE_SIDE as u64 || h > MAX_IMAGE_SIDE as u64 || w * h > MAX_IMAGE_PIXELS {
        return Err(ImageError::TooLarge { what: what.to_string(), detail: format!("it is {w}x{h} pixels") });
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
        image::ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => ImageError::Decode {
            what: what.to_string(),
            format: fmt_name.to_string(),
            detail: format!("the data ends early (truncated): {io}"),
        },
        other => ImageError::Decode {
            what: what.to_string(),
            format: fmt_name.to_string(),
            detail: other.to_string().trim_end().to_string(),
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
