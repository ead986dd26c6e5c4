//! PNG files with an A1111-style `parameters` text chunk, so other tools (and Atelier's
//! "Reuse settings") can read back how an image was made.
//!
//! Stand-in until `atelier_engine::metadata` lands: [`encode_png`] is the one function to swap.

use std::io::Write;
use std::path::Path;

use atelier_engine::pipeline::GenerateParams;
use image::RgbImage;

/// What the `parameters` chunk records about one image.
pub struct PngParameters<'a> {
    pub params: &'a GenerateParams,
    /// The seed of this image (batch image k uses `params.seed + k`).
    pub seed: u64,
    pub model_hash: &'a str,
    pub model_name: &'a str,
}

impl PngParameters<'_> {
    /// The A1111 text: prompt, `Negative prompt:` line, then `Key: value` pairs.
    pub fn to_a1111(&self) -> String {
        let p = self.params;
        let mut s = p.prompt.clone();
        if !p.negative_prompt.is_empty() {
            s.push_str("\nNegative prompt: ");
            s.push_str(&p.negative_prompt);
        }
        s.push_str(&format!(
            "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model hash: {}, Model: {}",
            p.steps,
            p.scheduler.a1111_name(),
            p.guidance,
            self.seed,
            p.width,
            p.height,
            self.model_hash,
            self.model_name,
        ));
        if p.init_image.is_some() {
            s.push_str(&format!(", Denoising strength: {}", p.strength));
        }
        s
    }
}

/// Encodes `img` as PNG, with a `parameters` text chunk when given.
pub fn encode_png(img: &RgbImage, parameters: Option<&str>) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, img.width(), img.height());
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        if let Some(text) = parameters {
            // tEXt is Latin-1 only; prompts with other characters go in an iTXt (UTF-8) chunk,
            // as A1111 does.
            if text.is_ascii() {
                enc.add_text_chunk("parameters".into(), text.into())?;
            } else {
                enc.add_itxt_chunk("parameters".into(), text.into())?;
            }
        }
        let mut writer = enc.write_header()?;
        writer.write_image_data(img.as_raw())?;
        writer.finish()?;
    }
    Ok(out)
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

/// Reads the `parameters` text back from PNG bytes (tEXt or iTXt).
pub fn read_parameters(bytes: &[u8]) -> Option<String> {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let reader = decoder.read_info().ok()?;
    let info = reader.info();
    info.uncompressed_latin1_text
        .iter()
        .find(|c| c.keyword == "parameters")
        .map(|c| c.text.clone())
        .or_else(|| {
            info.utf8_text
                .iter()
                .find(|c| c.keyword == "parameters")
                .and_then(|c| c.get_text().ok())
        })
}

/// A small PNG as a `data:` URL (step previews in progress events).
pub fn data_url(img: &RgbImage) -> Option<String> {
    use base64::Engine;
    let bytes = encode_png(img, None).ok()?;
    Some(format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_round_trip_including_unicode() {
        let img = RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3]));
        for text in ["a cat\nSteps: 4", "ein Kätzchen 🐱\nSteps: 4"] {
            let bytes = encode_png(&img, Some(text)).unwrap();
            assert_eq!(read_parameters(&bytes).as_deref(), Some(text));
            assert_eq!(image::load_from_memory(&bytes).unwrap().to_rgb8(), img);
        }
    }
}
