//! The one way an image enters Atelier (datasets, img2img, the CLI's init image).
//!
//! [`decode`] detects the format by content (PNG, JPEG or WebP, whatever the file is
//! called), reads the size from the header and refuses an image that is too large with
//! its size and the limit (a different error from a corrupt file), turns the picture
//! upright by its EXIF orientation (phones and cameras store it sideways with a tag),
//! and composites any transparency onto a background (white by default, as A1111
//! does), so pixels hidden under alpha 0 never show.

use image::{DynamicImage, ImageDecoder, ImageFormat, RgbImage};

/// Largest accepted side, in pixels, by default: far beyond any SD resolution, and small
/// enough that decoding stays within memory (8192² RGBA at 16 bits is 512 MiB).
pub const DEFAULT_MAX_SIDE: u32 = 8192;

/// Background transparent pixels are composited onto by default (white, like A1111).
pub const DEFAULT_BACKGROUND: [u8; 3] = [255, 255, 255];

/// How [`decode`] treats an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Largest accepted width or height, in pixels.
    pub max_side: u32,
    /// Largest accepted width × height, in pixels.
    pub max_pixels: u64,
    /// sRGB colour that transparent pixels are composited onto.
    pub background: [u8; 3],
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            max_side: DEFAULT_MAX_SIDE,
            max_pixels: u64::from(DEFAULT_MAX_SIDE) * u64::from(DEFAULT_MAX_SIDE),
            background: background(),
        }
    }
}

/// The process-wide background of [`DecodeOptions::default`], as 0xRRGGBB.
static BACKGROUND: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0xFF_FF_FF);

/// Sets the background every later default decode composites transparency onto
/// (`--alpha-background` of `atelier serve`, `generate`, `train-style`).
pub fn set_background(rgb: [u8; 3]) {
    BACKGROUND.store(u32::from_be_bytes([0, rgb[0], rgb[1], rgb[2]]), std::sync::atomic::Ordering::Relaxed);
}

/// The current process-wide background ([`DEFAULT_BACKGROUND`] unless [`set_background`] changed it).
pub fn background() -> [u8; 3] {
    let [_, r, g, b] = BACKGROUND.load(std::sync::atomic::Ordering::Relaxed).to_be_bytes();
    [r, g, b]
}

/// Parses a background colour: `white`, `black`, `grey`/`gray`, or `#RRGGBB` / `RRGGBB`.
pub fn parse_colour(text: &str) -> Option<[u8; 3]> {
    let t = text.trim().to_ascii_lowercase();
    match t.as_str() {
        "white" => return Some([255, 255, 255]),
        "black" => return Some([0, 0, 0]),
        "grey" | "gray" => return Some([128, 128, 128]),
        _ => {}
    }
    let hex = t.strip_prefix('#').unwrap_or(&t);
    if hex.len() != 6 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let byte = |i: usize| u8::from_str_radix(&hex[i..i + 2], 16).ok();
    Some([byte(0)?, byte(2)?, byte(4)?])
}

/// Why an input image cannot be used; the text is meant for the person who supplied it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageInputError {
    /// The bytes are not a known image format.
    #[error("not an image (PNG, JPEG or WebP expected)")]
    NotAnImage,
    /// A known image format that Atelier does not accept.
    #[error("{0} images are not supported; use PNG, JPEG or WebP")]
    Unsupported(String),
    /// The header announces a picture larger than the limits (width, height in pixels).
    #[error("{width}×{height} is larger than {limit}; downscale it first")]
    TooLarge { width: u32, height: u32, limit: String },
    /// Decoding would need more memory than allowed, although the size is within the limits.
    #[error("needs more memory to decode than this server allows ({0}); downscale it first")]
    OverMemory(String),
    /// The data is truncated or corrupt.
    #[error("cannot be decoded ({0}); the file may be truncated or corrupt")]
    Corrupt(String),
}

impl From<ImageInputError> for crate::Error {
    fn from(e: ImageInputError) -> Self {
        crate::Error::Image(e.to_string())
    }
}

/// The format of `bytes` by its content, if it is one Atelier accepts.
pub fn sniff_format(bytes: &[u8]) -> Result<ImageFormat, ImageInputError> {
    let format = image::guess_format(bytes).map_err(|_| ImageInputError::NotAnImage)?;
    match format {
        ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP => Ok(format),
        other => Err(ImageInputError::Unsupported(format!("{other:?}"))),
    }
}

/// Decodes a PNG, JPEG or WebP file's bytes to upright RGB, alpha composited onto
/// `options.background`.
///
/// Errors: [`ImageInputError::NotAnImage`] / [`ImageInputError::Unsupported`] by content,
/// [`ImageInputError::TooLarge`] when the header's width or height exceeds
/// `options.max_side` or their product `options.max_pixels` (checked before any pixel is
/// decoded), [`ImageInputError::OverMemory`] if a decoder still needs more memory than
/// the limits imply, [`ImageInputError::Corrupt`] for truncated or malformed data.
pub fn decode(bytes: &[u8], options: &DecodeOptions) -> Result<RgbImage, ImageInputError> {
    let format = sniff_format(bytes)?;
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    // The size check below is ours; the allocation limit only has to admit what it lets
    // through (16-bit RGBA plus the decoder's own buffers).
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(options.max_pixels.saturating_mul(8).saturating_add(256 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(decode_error)?;
    let (width, height) = decoder.dimensions();
    check_size(width, height, options)?;
    // A damaged EXIF block is not worth refusing the picture for: it stays as stored.
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(decode_error)?;
    img.apply_orientation(orientation);
    Ok(flatten(&img, options.background))
}

fn check_size(width: u32, height: u32, options: &DecodeOptions) -> Result<(), ImageInputError> {
    if width > options.max_side || height > options.max_side {
        return Err(ImageInputError::TooLarge { width, height, limit: format!("the {}-pixel limit per side", options.max_side) });
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > options.max_pixels {
        return Err(ImageInputError::TooLarge {
            width,
            height,
            limit: format!("the limit of {:.1} megapixels", options.max_pixels as f64 / 1e6),
        });
    }
    Ok(())
}

fn decode_error(e: image::ImageError) -> ImageInputError {
    match e {
        // Within the size limits the memory limit should not bite; if a decoder still
        // asks for more, say so rather than calling the file corrupt.
        image::ImageError::Limits(l) => ImageInputError::OverMemory(l.to_string()),
        e => ImageInputError::Corrupt(e.to_string()),
    }
}

/// `img` as RGB, with every pixel that has alpha composited onto `background` in sRGB
/// (`round((c·a + bg·(255 − a)) / 255)`, as PIL's `alpha_composite` and A1111 do).
pub fn flatten(img: &DynamicImage, background: [u8; 3]) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y).0;
        let a = u32::from(p[3]);
        let mix = |c: u8, bg: u8| ((u32::from(c) * a + u32::from(bg) * (255 - a) + 127) / 255) as u8;
        image::Rgb([mix(p[0], background[0]), mix(p[1], background[1]), mix(p[2], background[2])])
    })
}

#[cfg(test)]
pub(crate) mod tests {

    #[test]
    fn background_colours_parse_and_set_the_default() {
        assert_eq!(parse_colour("white"), Some([255, 255, 255]));
        assert_eq!(parse_colour("#1a2B3c"), Some([0x1a, 0x2b, 0x3c]));
        assert_eq!(parse_colour("102030"), Some([0x10, 0x20, 0x30]));
        assert_eq!(parse_colour("#12345"), None);
        assert_eq!(parse_colour("purple"), None);
        assert_eq!(DecodeOptions::default().background, [255, 255, 255]);
    }

    use super::*;

    /// `jpeg` (as the image crate writes it) with an EXIF APP1 segment holding only
    /// Orientation = `orientation`, spliced in right after SOI.
    pub(crate) fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
        assert_eq!(&jpeg[..2], &[0xFF, 0xD8]);
        // TIFF header (little endian), IFD0 at offset 8 with one entry, no next IFD.
        let mut tiff = Vec::new();
        tiff.extend_from_slice(b"II*\0");
        tiff.extend_from_slice(&8u32.to_le_bytes());
        tiff.extend_from_slice(&1u16.to_le_bytes());
        tiff.extend_from_slice(&0x0112u16.to_le_bytes()); // Orientation
        tiff.extend_from_slice(&3u16.to_le_bytes()); // SHORT
        tiff.extend_from_slice(&1u32.to_le_bytes()); // count
        tiff.extend_from_slice(&orientation.to_le_bytes());
        tiff.extend_from_slice(&[0, 0]); // value padded to 4 bytes
        tiff.extend_from_slice(&0u32.to_le_bytes());
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend_from_slice(&tiff);
        let mut out = jpeg[..2].to_vec();
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&app1);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    pub(crate) fn jpeg(img: &RgbImage, quality: u8) -> Vec<u8> {
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality).encode_image(img).unwrap();
        out
    }

    pub(crate) fn png(img: &DynamicImage) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    /// A 96×64 picture whose left third is red and the rest blue.
    fn landscape() -> RgbImage {
        RgbImage::from_fn(96, 64, |x, _| if x < 32 { image::Rgb([255, 0, 0]) } else { image::Rgb([0, 0, 255]) })
    }

    #[test]
    fn exif_orientation_6_turns_the_picture_upright() {
        let bytes = with_exif_orientation(&jpeg(&landscape(), 95), 6);
        let img = decode(&bytes, &DecodeOptions::default()).unwrap();
        assert_eq!(img.dimensions(), (64, 96));
        // Orientation 6: rotate 90° clockwise, so the stored left edge (red) becomes the top
        // and the stored bottom-left corner becomes the top-left.
        let top_left = img.get_pixel(0, 0).0;
        assert!(top_left[0] > 200 && top_left[2] < 60, "{top_left:?}");
        let bottom = img.get_pixel(32, 90).0;
        assert!(bottom[2] > 200 && bottom[0] < 60, "{bottom:?}");
        // Without the tag nothing turns.
        assert_eq!(decode(&jpeg(&landscape(), 95), &DecodeOptions::default()).unwrap().dimensions(), (96, 64));
        // Orientation 8 (90° counter-clockwise) puts the red third at the bottom.
        let img = decode(&with_exif_orientation(&jpeg(&landscape(), 95), 8), &DecodeOptions::default()).unwrap();
        assert_eq!(img.dimensions(), (64, 96));
        assert!(img.get_pixel(0, 95).0[0] > 200 && img.get_pixel(0, 0).0[2] > 200);
    }

    #[test]
    fn transparency_is_composited_onto_the_background() {
        // Left half transparent but storing magenta; one half-alpha green pixel; the rest opaque blue.
        let mut rgba = image::RgbaImage::from_fn(8, 4, |x, _| {
            if x < 4 { image::Rgba([255, 0, 255, 0]) } else { image::Rgba([0, 0, 255, 255]) }
        });
        rgba.put_pixel(6, 1, image::Rgba([0, 200, 0, 128]));
        let bytes = png(&DynamicImage::ImageRgba8(rgba));
        let img = decode(&bytes, &DecodeOptions::default()).unwrap();
        assert_eq!(img.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(img.get_pixel(3, 3).0, [255, 255, 255]);
        assert_eq!(img.get_pixel(5, 0).0, [0, 0, 255]);
        // (0·128 + 255·127 + 127) / 255 = 127; (200·128 + 255·127 + 127) / 255 = 227.
        assert_eq!(img.get_pixel(6, 1).0, [127, 227, 127]);
        // Another background on request.
        let black = decode(&bytes, &DecodeOptions { background: [0, 0, 0], ..Default::default() }).unwrap();
        assert_eq!(black.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(black.get_pixel(6, 1).0, [0, 100, 0]);
        // Grey with alpha too.
        let la = image::GrayAlphaImage::from_pixel(2, 2, image::LumaA([0, 0]));
        assert_eq!(decode(&png(&DynamicImage::ImageLumaA8(la)), &DecodeOptions::default()).unwrap().get_pixel(1, 1).0, [255, 255, 255]);
    }

    /// A real 12000×12000 PNG (1-bit grey, so it is small on disk and quick to write).
    pub(crate) fn huge_png() -> Vec<u8> {
        let side = 12000u32;
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, side, side);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::One);
        enc.set_compression(png::Compression::Fast);
        let mut writer = enc.write_header().unwrap();
        let mut stream = writer.stream_writer().unwrap();
        let row = vec![0xFFu8; (side as usize).div_ceil(8)];
        for _ in 0..side {
            std::io::Write::write_all(&mut stream, &row).unwrap();
        }
        stream.finish().unwrap();
        writer.finish().unwrap();
        out
    }

    #[test]
    fn too_large_says_the_size_and_the_limit_not_corrupt() {
        let bytes = huge_png();
        assert!(bytes.len() < 1_000_000, "{} bytes", bytes.len());
        let e = decode(&bytes, &DecodeOptions::default()).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, ImageInputError::TooLarge { width: 12000, height: 12000, .. }), "{e:?}");
        assert_eq!(text, "12000×12000 is larger than the 8192-pixel limit per side; downscale it first");
        // The pixel budget is a limit of its own.
        let small = png(&DynamicImage::ImageRgb8(RgbImage::new(300, 200)));
        let e = decode(&small, &DecodeOptions { max_pixels: 50_000, ..Default::default() }).unwrap_err();
        assert_eq!(e.to_string(), "300×200 is larger than the limit of 0.1 megapixels; downscale it first");
    }

    #[test]
    fn format_comes_from_the_content() {
        assert_eq!(decode(b"not a picture", &DecodeOptions::default()).unwrap_err(), ImageInputError::NotAnImage);
        let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;";
        assert_eq!(decode(gif, &DecodeOptions::default()).unwrap_err().to_string(), "Gif images are not supported; use PNG, JPEG or WebP");
        let good = png(&DynamicImage::ImageRgb8(landscape()));
        let e = decode(&good[..good.len() / 2], &DecodeOptions::default()).unwrap_err();
        assert!(matches!(e, ImageInputError::Corrupt(_)) && e.to_string().contains("truncated or corrupt"), "{e}");
    }
}
