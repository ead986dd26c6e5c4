//! PNG files of the studio: [`encode_png`] writes A1111's `parameters` chunk through the
//! engine's one writer ([`atelier_engine::metadata`]), or no text for previews.

use std::io::Write;
use std::path::Path;

use atelier_engine::metadata::ImageMetadata;
use image::RgbImage;

/// Encodes `img` as PNG, with A1111's `parameters` text chunk when `meta` is given.
pub fn encode_png(img: &RgbImage, meta: Option<&ImageMetadata>) -> atelier_engine::Result<Vec<u8>> {
    match meta {
        Some(meta) => atelier_engine::metadata::encode_png(img, meta),
        None => atelier_engine::metadata::encode_plain_png(img),
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, then a rename,
/// so a crash never leaves a half-written image behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A small PNG as a `data:` URL (step previews in progress events).
pub fn data_url(img: &RgbImage) -> Option<String> {
    use base64::Engine;
    let bytes = encode_png(img, None).ok()?;
    Some(format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes)))
}
