//! Bounded decoding: PNG, JPEG, WebP, GIF (first frame only) and BMP sniffed by signature, the size checked from
//! the header before any pixel buffer exists (decompression-bomb limits; the `image` crate's allocation budget is
//! then narrowed to that size), and the result converted to 8-bit RGB exactly like PIL's
//! `Image.open(f).convert("RGB")`.
//!
//! Against Pillow 13 (`engine/tests/image_formats.rs`, fixtures from `tools/image_format_fixtures.py`): PNG, WebP
//! (lossless, lossy and animated: image-webp matched libwebp exactly on every file tried), GIF and BMP (1/4/8-bit
//! palette, RLE8, 16-bit 5-5-5 and 5-6-5, 24- and 32-bit, top-down) decode bit-identically, given three
//! corrections where the `image` crate reads differently: the canvas Pillow builds around a GIF's first frame
//! (`GifFirstFrame`), Pillow's 16-bit BMP levels and its index 0 for pixels an RLE bitmap skips (`BmpHeader`).
//! JPEG (zune-jpeg, not libjpeg-turbo) may differ by a few levels. Alpha (RGBA WebP, transparent GIF indices,
//! 32-bit BMP) is dropped, never composited, as `convert("RGB")` does.

use std::borrow::Cow;
use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageFormat, RgbImage};

use super::{ImageError, MAX_ENCODED_BYTES, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE};

/// Reads and decodes a PNG, JPEG, WebP, GIF or BMP file and converts it to 8-bit RGB like PIL's
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

/// Decodes an in-memory PNG, JPEG, WebP, GIF or BMP and converts it to 8-bit RGB like PIL's `convert("RGB")`.
/// `what` names the input in error messages (a file name, "request image 2", ...).
pub fn decode_rgb8(bytes: &[u8], what: &str) -> Result<RgbImage, ImageError> {
    decode_rgb8_within(bytes, what, MAX_IMAGE_SIDE)
}

/// `decode_rgb8` for images at most `max_side` pixels per side (and within the global limits): the side is read
/// from the header and a larger image is refused before any pixel buffer exists.
pub fn decode_rgb8_within(bytes: &[u8], what: &str, max_side: u32) -> Result<RgbImage, ImageError> {
    let dynimg = decode_dynamic(bytes, what, max_side.min(MAX_IMAGE_SIDE))?;
    Ok(to_rgb8_like_pil(dynimg))
}

/// The width and height of the image the header declares, as Pillow's `Image.open(f).size` gives them (for a GIF
/// the logical screen, enlarged to hold the first frame), without decoding any pixel.
pub fn header_dimensions(bytes: &[u8], what: &str) -> Result<(u32, u32), ImageError> {
    let format = sniff_format(bytes, what)?;
    if let Some(dims) = Header::read(bytes, format).declared_dimensions() {
        return Ok(dims);
    }
    image::ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| classify_decode_error(e, what, format_name(format)))
}

/// How error messages list what this build decodes.
const SUPPORTED_FORMATS: &str = "PNG, JPEG, WebP, GIF or BMP";

fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Png => "PNG",
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::WebP => "WebP",
        ImageFormat::Gif => "GIF",
        ImageFormat::Bmp => "BMP",
        _ => "image",
    }
}

/// The format whose signature starts `bytes`, among those this build decodes.
fn signature_format(bytes: &[u8]) -> Option<ImageFormat> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(ImageFormat::Png)
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(ImageFormat::Jpeg)
    } else if bytes.len() >= 12 && bytes.starts_with(b"RIFF") && &bytes[8..12] == b"WEBP" {
        Some(ImageFormat::WebP)
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some(ImageFormat::Gif)
    } else if BmpHeader::parse(bytes).is_some() {
        Some(ImageFormat::Bmp)
    } else {
        None
    }
}

/// PNG, JPEG, WebP, GIF or BMP by signature; errors name what the data looks like, never its bytes (they may be a
/// secret file's).
fn sniff_format(bytes: &[u8], what: &str) -> Result<ImageFormat, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::UnsupportedFormat {
            what: what.to_string(),
            detail: "the data is empty (0 bytes)".into(),
        });
    }
    if let Some(format) = signature_format(bytes) {
        return Ok(format);
    }
    let detail = match image::guess_format(bytes) {
        // A format of ours that failed the stricter check above ("BM" starting a text) is not named.
        Ok(other) if format_name(other) == "image" => {
            format!("it looks like {other:?}, and only {SUPPORTED_FORMATS} can be decoded")
        }
        _ => {
            let text = bytes.iter().take(64).all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace());
            let looks = if text { "it looks like text" } else { "it is not an image format this build knows" };
            format!("the data does not start with a {SUPPORTED_FORMATS} signature ({looks})")
        }
    };
    Err(ImageError::UnsupportedFormat { what: what.to_string(), detail })
}

fn decode_dynamic(bytes: &[u8], what: &str, max_side: u32) -> Result<DynamicImage, ImageError> {
    if bytes.len() as u64 > MAX_ENCODED_BYTES {
        return Err(ImageError::TooLarge {
            what: what.to_string(),
            detail: format!("the encoded data is {} bytes, more than the {MAX_ENCODED_BYTES}-byte limit", bytes.len()),
        });
    }
    let format = sniff_format(bytes, what)?;
    let header = Header::read(bytes, format);
    if let Some((w, h)) = header.declared_dimensions() {
        check_size(w, h, what, max_side)?;
    }
    match header {
        Header::Gif(frame) => {
            let mut image = decode_bounded(&frame.with_canvas_screen(bytes), format, what, max_side)?;
            if let DynamicImage::ImageRgba8(canvas) = &mut image {
                frame.fill_outside(canvas);
            }
            Ok(image)
        }
        Header::Bmp(bmp) => {
            let mut image = decode_bounded(bytes, format, what, max_side)?;
            bmp.like_pillow(bytes, &mut image, |patched| decode_bounded(patched, format, what, max_side))?;
            Ok(image)
        }
        Header::WebP(..) | Header::Other => decode_bounded(bytes, format, what, max_side),
    }
}

/// Decodes one image (for GIF and animated WebP the first frame: later frames are never decoded) with the size
/// checked from the header before any pixel buffer exists, and the `image` crate's allocations bounded by it.
fn decode_bounded(bytes: &[u8], format: ImageFormat, what: &str, max_side: u32) -> Result<DynamicImage, ImageError> {
    let map_err = |e: image::ImageError| classify_decode_error(e, what, format_name(format));
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    // Until the header is read, the largest image allowed (RGBA16 at the pixel limit is exactly 512 MiB).
    reader.limits(decode_limits(MAX_IMAGE_PIXELS * 8 + 64 * 1024 * 1024));
    // Reads only the header.
    let mut decoder = reader.into_decoder().map_err(map_err)?;
    let (w, h) = decoder.dimensions();
    check_size(w, h, what, max_side)?;
    // The header is in bounds: narrow the allocation budget from the largest image allowed to this one, its
    // pixel buffer (reserved here, as `ImageReader::decode` does) plus as much again and 16 MiB for the decoder's
    // own buffers (a GIF frame smaller than the screen is decoded into one first).
    let pixel_bytes = decoder.total_bytes();
    let mut limits = decode_limits(pixel_bytes.saturating_mul(2).saturating_add(16 * 1024 * 1024));
    limits.reserve(pixel_bytes).map_err(map_err)?;
    decoder.set_limits(limits).map_err(map_err)?;
    DynamicImage::from_decoder(decoder).map_err(map_err)
}

/// Limits for the `image` crate: at most `MAX_IMAGE_SIDE` per side, and `max_alloc` bytes allocated.
fn decode_limits(max_alloc: u64) -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(max_alloc);
    limits
}

fn check_size(w: u32, h: u32, what: &str, max_side: u32) -> Result<(), ImageError> {
    check_dims(w as u64, h as u64, what)?;
    if w > max_side || h > max_side {
        return Err(ImageError::TooLarge {
            what: what.to_string(),
            detail: format!("it is {w}x{h} pixels, more than {max_side} per side"),
        });
    }
    Ok(())
}

/// What this file reads from a header itself, before the decoder sees the data.
enum Header {
    /// Where Pillow's first frame lies and what surrounds it.
    Gif(GifFirstFrame),
    /// Where Pillow's BMP reading differs from the decoder's.
    Bmp(BmpHeader),
    /// The canvas size (the decoder refuses a large one without saying its size).
    WebP(u32, u32),
    /// PNG, JPEG, and headers this code does not parse (the decoder reports what is wrong).
    Other,
}

impl Header {
    fn read(bytes: &[u8], format: ImageFormat) -> Header {
        let header = match format {
            ImageFormat::Gif => GifFirstFrame::parse(bytes).map(Header::Gif),
            ImageFormat::Bmp => BmpHeader::parse(bytes).map(Header::Bmp),
            ImageFormat::WebP => webp_dimensions(bytes).map(|(w, h)| Header::WebP(w, h)),
            _ => None,
        };
        header.unwrap_or(Header::Other)
    }

    /// The size Pillow gives the image, where the decoder would not report it: GIF's canvas (the decoder crops it
    /// to the screen); BMP and WebP sides the decoders refuse (over 65535, over 16384) without the size.
    fn declared_dimensions(&self) -> Option<(u32, u32)> {
        match self {
            Header::Gif(frame) => Some(frame.canvas()),
            Header::Bmp(header) => Some((header.width, header.height)),
            Header::WebP(w, h) => Some((*w, *h)),
            Header::Other => None,
        }
    }
}

/// Canvas width and height from the first chunk of a WebP: VP8X (extended), VP8L (lossless) or "VP8 " (lossy).
fn webp_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    let data = bytes.get(20..)?;
    let u24_at = |pos: usize| Some(u32::from_le_bytes([*data.get(pos)?, *data.get(pos + 1)?, *data.get(pos + 2)?, 0]));
    let u16_at = |pos: usize| Some(u32::from(u16::from_le_bytes([*data.get(pos)?, *data.get(pos + 1)?])));
    match bytes.get(12..16)? {
        // Flags, 3 reserved bytes, then width - 1 and height - 1 in 24 bits each.
        b"VP8X" => Some((u24_at(4)? + 1, u24_at(7)? + 1)),
        // Signature 0x2f, then width - 1 and height - 1 in 14 bits each.
        b"VP8L" if *data.first()? == 0x2F => {
            let packed = u24_at(1)? | u32::from(*data.get(4)?) << 24;
            Some(((packed & 0x3FFF) + 1, (packed >> 14 & 0x3FFF) + 1))
        }
        // Key frame tag (3 bytes), start code, then width and height in 14 bits each (2 bits of scaling).
        b"VP8 " if data.get(3..6)? == [0x9D, 0x01, 0x2A] => Some((u16_at(6)? & 0x3FFF, u16_at(8)? & 0x3FFF)),
        _ => None,
    }
}

/// What Pillow's GIF reader takes from the blocks before the first frame's pixel data
/// (`GifImagePlugin._open` / `_seek(0)` / `load_prepare`).
struct GifFirstFrame {
    /// Logical screen width and height.
    screen: (u16, u16),
    /// The first frame's rectangle: left, top, width, height.
    rect: (u16, u16, u16, u16),
    /// The colour Pillow gives the canvas outside the first frame: the transparent index if the frame has one,
    /// else index 0, looked up in the frame's palette (black past its end; the index as grey without a palette);
    /// alpha 0 for the transparent index.
    fill: [u8; 4],
}

impl GifFirstFrame {
    /// None when the blocks do not parse; the decoder then reports what is wrong.
    fn parse(bytes: &[u8]) -> Option<GifFirstFrame> {
        let u16_at = |pos: usize| Some(u16::from_le_bytes([*bytes.get(pos)?, *bytes.get(pos + 1)?]));
        let screen = (u16_at(6)?, u16_at(8)?);
        let flags = *bytes.get(10)?;
        let mut pos = 13;
        let mut global_palette = None;
        if flags & 0x80 != 0 {
            let len = 3 << ((flags & 7) + 1);
            global_palette = Some(bytes.get(pos..pos + len)?);
            pos += len;
        }
        let mut transparent = None;
        loop {
            match *bytes.get(pos)? {
                // Extension: label, then sub-blocks up to an empty one; a graphic control extension's first
                // sub-block holds the transparency flag and index.
                0x21 => {
                    let label = *bytes.get(pos + 1)?;
                    pos += 2;
                    let mut first = true;
                    loop {
                        let len = *bytes.get(pos)? as usize;
                        let block = bytes.get(pos + 1..pos + 1 + len)?;
                        pos += 1 + len;
                        if len == 0 {
                            break;
                        }
                        if label == 0xF9 && first && len >= 4 && block[0] & 1 != 0 {
                            transparent = Some(block[3]);
                        }
                        first = false;
                    }
                }
                // Image descriptor: left, top, width, height, flags; a local palette may follow.
                0x2C => {
                    let rect = (u16_at(pos + 1)?, u16_at(pos + 3)?, u16_at(pos + 5)?, u16_at(pos + 7)?);
                    let local_flags = *bytes.get(pos + 9)?;
                    let palette = if local_flags & 0x80 != 0 {
                        let len = 3 << ((local_flags & 7) + 1);
                        pillow_palette(bytes.get(pos + 10..pos + 10 + len)?)
                    } else {
                        global_palette.and_then(pillow_palette)
                    };
                    let index = transparent.unwrap_or(0);
                    let start = 3 * index as usize;
                    let [r, g, b] = match palette {
                        Some(p) => p.get(start..start + 3).map_or([0, 0, 0], |c| [c[0], c[1], c[2]]),
                        None => [index; 3],
                    };
                    let alpha = if transparent.is_some() { 0 } else { 255 };
                    return Some(GifFirstFrame { screen, rect, fill: [r, g, b, alpha] });
                }
                0x3B => return None,
                // Pillow skips stray bytes between blocks.
                _ => pos += 1,
            }
        }
    }

    /// Width and height of Pillow's canvas: the screen, enlarged to hold the first frame.
    fn canvas(&self) -> (u32, u32) {
        let (left, top, w, h) = self.rect;
        let right = u32::from(left) + u32::from(w);
        let bottom = u32::from(top) + u32::from(h);
        (right.max(u32::from(self.screen.0)), bottom.max(u32::from(self.screen.1)))
    }

    /// Pillow makes the canvas large enough for the first frame (a frame may overhang the logical screen) where
    /// `image` would crop it: the screen in a copy of the header is enlarged to match. The canvas was checked
    /// against the limits first, so both sides fit the header's 16-bit fields.
    fn with_canvas_screen<'a>(&self, bytes: &'a [u8]) -> Cow<'a, [u8]> {
        let (w, h) = self.canvas();
        if (w, h) == (u32::from(self.screen.0), u32::from(self.screen.1)) {
            return Cow::Borrowed(bytes);
        }
        let mut patched = bytes.to_vec();
        patched[6..8].copy_from_slice(&(w.min(u32::from(u16::MAX)) as u16).to_le_bytes());
        patched[8..10].copy_from_slice(&(h.min(u32::from(u16::MAX)) as u16).to_le_bytes());
        Cow::Owned(patched)
    }

    /// `image` leaves the canvas outside the first frame transparent black; Pillow fills it with `fill`.
    fn fill_outside(&self, canvas: &mut image::RgbaImage) {
        let (left, top, w, h) = self.rect;
        let (x0, y0) = (u32::from(left), u32::from(top));
        let (x1, y1) = (x0 + u32::from(w), y0 + u32::from(h));
        for (x, y, pixel) in canvas.enumerate_pixels_mut() {
            if x < x0 || x >= x1 || y < y0 || y >= y1 {
                pixel.0 = self.fill;
            }
        }
    }
}

/// Pillow ignores a palette whose entry i is (i, i, i) for every i and reads the indices as grey levels.
fn pillow_palette(palette: &[u8]) -> Option<&[u8]> {
    let identity = palette.chunks_exact(3).enumerate().all(|(i, c)| c.iter().all(|&v| usize::from(v) == i));
    (!identity).then_some(palette)
}

/// A BMP header as Pillow's `BmpImagePlugin` reads it (the BITMAPINFOHEADER family, or the 12-byte OS/2 one).
struct BmpHeader {
    width: u32,
    /// Absolute: a negative height marks a top-down bitmap.
    height: u32,
    header_size: u32,
    bits: u16,
    compression: u32,
    /// Red, green and blue masks (BI_BITFIELDS).
    masks: [u32; 3],
    colors: u32,
}

/// DIB header sizes Pillow reads; "BM" followed by anything else is not taken for a BMP.
const BMP_HEADER_SIZES: [u32; 7] = [12, 40, 52, 56, 64, 108, 124];
const BMP_RGB: u32 = 0;
const BMP_RLE8: u32 = 1;
const BMP_RLE4: u32 = 2;
const BMP_BITFIELDS: u32 = 3;

impl BmpHeader {
    fn parse(bytes: &[u8]) -> Option<BmpHeader> {
        let u16_at = |pos: usize| Some(u16::from_le_bytes(bytes.get(pos..pos + 2)?.try_into().ok()?));
        let u32_at = |pos: usize| Some(u32::from_le_bytes(bytes.get(pos..pos + 4)?.try_into().ok()?));
        if !bytes.starts_with(b"BM") {
            return None;
        }
        let header_size = u32_at(14)?;
        if !BMP_HEADER_SIZES.contains(&header_size) {
            return None;
        }
        if header_size == 12 {
            let (width, height) = (u32::from(u16_at(18)?), u32::from(u16_at(20)?));
            return Some(BmpHeader {
                width,
                height,
                header_size,
                bits: u16_at(24)?,
                compression: 0,
                masks: [0; 3],
                colors: 0,
            });
        }
        let width = u32::try_from(u32_at(18)? as i32).ok()?;
        let height = (u32_at(22)? as i32).unsigned_abs();
        let compression = u32_at(30)?;
        let masks = match compression {
            BMP_BITFIELDS => [u32_at(54)?, u32_at(58)?, u32_at(62)?],
            _ => [0; 3],
        };
        Some(BmpHeader { width, height, header_size, bits: u16_at(28)?, compression, masks, colors: u32_at(46)? })
    }

    /// Brings the decoder's output to Pillow's where they differ: 16-bit levels, and pixels an RLE bitmap skips.
    fn like_pillow(
        &self,
        bytes: &[u8],
        image: &mut DynamicImage,
        decode: impl FnOnce(&[u8]) -> Result<DynamicImage, ImageError>,
    ) -> Result<(), ImageError> {
        let DynamicImage::ImageRgb8(rgb) = image else { return Ok(()) };
        match (self.bits, self.compression) {
            (16, BMP_RGB | BMP_BITFIELDS) => {
                let Some(levels) = self.pillow_16bit_levels() else { return Ok(()) };
                for pixel in rgb.pixels_mut() {
                    for (value, table) in pixel.0.iter_mut().zip(&levels) {
                        *value = table[usize::from(*value)];
                    }
                }
            }
            (8, BMP_RLE8) | (4, BMP_RLE4) => {
                // Pillow reads pixels the RLE codes skip (delta, early end of line) as palette index 0; `image`
                // leaves them black. Decoding again with an all-white palette shows which pixels were skipped.
                let palette_start = 14 + self.header_size as usize;
                let Some(entry0) = bytes.get(palette_start..palette_start + 3) else { return Ok(()) };
                let fill = [entry0[2], entry0[1], entry0[0]];
                if fill == [0, 0, 0] {
                    return Ok(());
                }
                let entries = if self.colors == 0 { 1usize << self.bits } else { self.colors as usize };
                let palette_end = (palette_start + 4 * entries).min(bytes.len());
                let mut white = bytes.to_vec();
                for entry in white[palette_start..palette_end].chunks_exact_mut(4) {
                    entry[..3].copy_from_slice(&[255, 255, 255]);
                }
                let DynamicImage::ImageRgb8(written) = decode(&white)? else { return Ok(()) };
                for (pixel, mask) in rgb.pixels_mut().zip(written.pixels()) {
                    if mask.0 == [0, 0, 0] {
                        pixel.0 = fill;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// For 16-bit pixels, per channel, the map from `image`'s 8-bit level (n-bit value v scaled to
    /// round(v * 255 / max)) to Pillow's (`Unpack.c`: v * 255 / max, rounded down). None for layouts Pillow does
    /// not read (it reads 5-5-5 and 5-6-5).
    fn pillow_16bit_levels(&self) -> Option<[[u8; 256]; 3]> {
        let bits = match (self.compression, self.masks) {
            (BMP_RGB, _) | (BMP_BITFIELDS, [0x7C00, 0x03E0, 0x001F]) => [5, 5, 5],
            (BMP_BITFIELDS, [0xF800, 0x07E0, 0x001F]) => [5, 6, 5],
            _ => return None,
        };
        Some(bits.map(|n| {
            let max = (1u32 << n) - 1;
            let mut table = [0u8; 256];
            for (level, out) in table.iter_mut().enumerate() {
                let value = (level as u32 * max + 127) / 255;
                *out = (value * 255 / max) as u8;
            }
            table
        }))
    }
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
            detail: without_quoted_bytes(other.to_string().trim_end()),
        },
    }
}

/// Some decoder messages quote a few bytes of the input (image-webp: "Invalid Chunk header: [41, 42, 43, 44]");
/// the input may be a secret file's, so bracketed lists are cut out.
fn without_quoted_bytes(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find(']') else { break };
        out.push_str(&rest[..open]);
        out.push_str("[..]");
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    out
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
        // Float images (not produced by these decoders) and future variants.
        #[allow(unreachable_patterns)]
        other => return other.to_rgb8(),
    }
    RgbImage::from_raw(w, h, out).unwrap_or_else(|| RgbImage::new(w, h))
}
