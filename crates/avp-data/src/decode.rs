//! Decoding image files to RGB8 by their content (as PIL does), whatever
//! their extension says, with PIL's `convert('RGB')` rules.
//!
//! - grayscale is replicated to three channels;
//! - an alpha channel is dropped, not composited (PIL does the same);
//! - palette images are expanded through their palette;
//! - CMYK JPEGs are converted by the decoder;
//! - 16-bit images are *scaled* to 8 bits (`v / 257`); PIL clips them
//!   instead (`min(v, 255)`), which whitens most 16-bit photos. Ours is the
//!   visually faithful choice; it differs from torchvision on such files.

use std::io::Cursor;
use std::path::Path;

use image::{ImageReader, RgbImage};

use crate::error::DataError;

/// Largest image accepted, in pixels (a guard against decompression bombs).
pub const MAX_PIXELS: u64 = 64 * 1024 * 1024;

/// Decodes an image file to RGB8, sniffing the format from its bytes.
pub fn decode_rgb8(path: &Path) -> Result<RgbImage, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::Decode {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    decode_rgb8_bytes(path, &bytes)
}

/// Reads only the header of an image file: checks that its content is an
/// image format we decode and returns its size, without decoding pixels
/// (the cheap check of [`crate::folder::Verify::Header`]). A file that
/// passes may still fail [`decode_rgb8`] (a truncated or corrupt body).
pub fn probe_size(path: &Path) -> Result<(u32, u32), DataError> {
    let err = |reason: String| DataError::Decode {
        path: path.to_path_buf(),
        reason,
    };
    let reader = ImageReader::open(path)
        .map_err(|e| err(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| err(e.to_string()))?;
    if reader.format().is_none() {
        return Err(err("not an image format we recognise (by content)".into()));
    }
    let (w, h) = reader.into_dimensions().map_err(|e| err(e.to_string()))?;
    if w == 0 || h == 0 {
        return Err(err("image has no pixels".into()));
    }
    if u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(err(format!(
            "{w}x{h} pixels is over the limit of {MAX_PIXELS} pixels"
        )));
    }
    Ok((w, h))
}

/// Decodes in-memory image bytes (`path` is only used in messages).
pub fn decode_rgb8_bytes(path: &Path, bytes: &[u8]) -> Result<RgbImage, DataError> {
    let err = |reason: String| DataError::Decode {
        path: path.to_path_buf(),
        reason,
    };
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| err(e.to_string()))?;
    match reader.format() {
        None => return Err(err("not an image format we recognise (by content)".into())),
        // The JPEG decoder fills a truncated scan with grey where PIL (and
        // so torchvision) refuses the file: require the end-of-image
        // marker after the last scan, as a complete file has.
        Some(image::ImageFormat::Jpeg) if !jpeg_is_complete(bytes) => {
            return Err(err(
                "truncated JPEG: no end-of-image marker after the last scan".into(),
            ));
        }
        _ => {}
    }
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_PIXELS * 8);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| err(e.to_string()))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(err("image has no pixels".into()));
    }
    Ok(img.to_rgb8())
}

/// Whether a JPEG has an EOI marker (`FF D9`) after its last SOS (`FF DA`).
/// Inside entropy-coded data a literal `FF` is always followed by `00`, so
/// `FF D9` there can only be the marker.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last_sos = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    match last_sos {
        Some(i) => bytes[i..].windows(2).any(|w| w == [0xFF, 0xD9]),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{DynamicImage, GrayImage, ImageFormat, Luma, Rgba, RgbaImage};

    fn encode(img: DynamicImage, fmt: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, fmt).unwrap();
        out.into_inner()
    }

    #[test]
    fn png_named_jpg_decodes_by_content() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(3, 2, image::Rgb([10, 20, 30])));
        let png = encode(img, ImageFormat::Png);
        let out = decode_rgb8_bytes(Path::new("fake.jpg"), &png).unwrap();
        assert_eq!(out.get_pixel(1, 1).0, [10, 20, 30]);
    }

    #[test]
    fn gray_and_alpha_follow_pil_convert_rgb() {
        let g = DynamicImage::ImageLuma8(GrayImage::from_pixel(2, 2, Luma([77])));
        let out = decode_rgb8_bytes(Path::new("g.png"), &encode(g, ImageFormat::Png)).unwrap();
        assert_eq!(out.get_pixel(0, 0).0, [77, 77, 77]);
        // Alpha is dropped, not composited onto black or white.
        let a = DynamicImage::ImageRgba8(RgbaImage::from_pixel(2, 2, Rgba([200, 100, 50, 0])));
        let out = decode_rgb8_bytes(Path::new("a.png"), &encode(a, ImageFormat::Png)).unwrap();
        assert_eq!(out.get_pixel(1, 0).0, [200, 100, 50]);
    }

    #[test]
    fn sixteen_bit_is_scaled() {
        let img = image::ImageBuffer::<Luma<u16>, Vec<u16>>::from_pixel(1, 1, Luma([65535]));
        let out = decode_rgb8_bytes(
            Path::new("x.png"),
            &encode(DynamicImage::ImageLuma16(img), ImageFormat::Png),
        )
        .unwrap();
        assert_eq!(out.get_pixel(0, 0).0, [255, 255, 255]);
    }

    #[test]
    fn truncated_jpeg_is_refused_like_pil() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([x as u8, y as u8, 7])
        }));
        let jpg = encode(img, ImageFormat::Jpeg);
        assert!(decode_rgb8_bytes(Path::new("ok.jpg"), &jpg).is_ok());
        let e = decode_rgb8_bytes(Path::new("cut.jpg"), &jpg[..jpg.len() * 2 / 3]).unwrap_err();
        assert!(e.to_string().contains("truncated JPEG"), "{e}");
    }

    #[test]
    fn text_is_not_an_image() {
        let e =
            decode_rgb8_bytes(Path::new("notes.jpg"), b"hello world, not a picture").unwrap_err();
        assert!(e.to_string().contains("notes.jpg"), "{e}");
    }

    /// `ppm` and `pgm` are in torchvision's extension list: they must
    /// decode (the `image` crate's `pnm` feature), not be skipped.
    #[test]
    fn ppm_and_pgm_decode() {
        let ppm = b"P6\n2 1\n255\n\x0a\x14\x1e\xc8\x64\x32";
        let img = decode_rgb8_bytes(Path::new("a.ppm"), ppm).unwrap();
        assert_eq!(img.as_raw(), &[10, 20, 30, 200, 100, 50]);
        let pgm = b"P5\n2 1\n255\n\x07\xfa";
        let img = decode_rgb8_bytes(Path::new("a.pgm"), pgm).unwrap();
        assert_eq!(img.as_raw(), &[7, 7, 7, 250, 250, 250]);
    }
}
