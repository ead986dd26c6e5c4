//! Generation settings stored in PNG files the way AUTOMATIC1111's web UI stores them: one
//! text chunk with keyword `parameters`, so A1111, ComfyUI, civitai and other tools can read
//! them back.
//!
//! The text layout (A1111 `processing.create_infotext`):
//! ```text
//! {prompt}
//! Negative prompt: {negative prompt}
//! Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: abcdef1234, Model: name
//! ```
//! The negative-prompt line is left out when empty; a value holding `,`, `:` or a newline is
//! written as a JSON string. Parsing follows A1111's `parse_generation_parameters`.

use std::path::Path;
use std::sync::OnceLock;

use image::RgbImage;
use regex::Regex;

use crate::{Error, Result};

/// The PNG text keyword A1111 uses.
pub const PARAMETERS_KEY: &str = "parameters";
const NEGATIVE_PREFIX: &str = "Negative prompt:";

/// What produced an image, in A1111's terms.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ImageMetadata {
    pub prompt: String,
    /// Written only when not empty.
    pub negative_prompt: String,
    pub steps: usize,
    /// A1111 sampler name, e.g. "Euler a", "DPM++ 2M Karras", "DDIM".
    pub sampler: String,
    pub cfg_scale: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    /// Short checkpoint hash as A1111 shows it (10 hex digits); written only when not empty.
    pub model_hash: String,
    /// Checkpoint name.
    pub model: Option<String>,
    /// img2img strength.
    pub denoising_strength: Option<f64>,
    /// Further `key: value` pairs, written after the fixed ones in this order (e.g. "Clip skip",
    /// "Lora hashes", "Version"). Keys must not repeat the fixed ones.
    pub extra: Vec<(String, String)>,
}

impl ImageMetadata {
    /// The `parameters` text exactly as A1111 writes it.
    pub fn to_parameters(&self) -> String {
        let mut fields: Vec<(&str, String)> = vec![
            ("Steps", self.steps.to_string()),
            ("Sampler", self.sampler.clone()),
            ("CFG scale", format_float(self.cfg_scale)),
            ("Seed", self.seed.to_string()),
            ("Size", format!("{}x{}", self.width, self.height)),
        ];
        if !self.model_hash.is_empty() {
            fields.push(("Model hash", self.model_hash.clone()));
        }
        if let Some(model) = &self.model {
            fields.push(("Model", model.clone()));
        }
        if let Some(strength) = self.denoising_strength {
            fields.push(("Denoising strength", format_float(strength)));
        }
        fields.extend(self.extra.iter().map(|(k, v)| (k.as_str(), v.clone())));
        let params = fields.iter().map(|(k, v)| format!("{k}: {}", quote(v))).collect::<Vec<_>>().join(", ");
        let negative = if self.negative_prompt.is_empty() {
            String::new()
        } else {
            format!("\n{NEGATIVE_PREFIX} {}", self.negative_prompt)
        };
        // A1111 strips the whole text, so an empty prompt leaves no blank first line.
        format!("{}{negative}\n{params}", self.prompt).trim().to_string()
    }
}

impl ImageMetadata {
    /// What A1111 records for one image of a generation: `prompt` as the user typed it
    /// (`<lora:…>` tags included, as A1111 keeps them), this image's `seed`, the model's
    /// short hash and name, `Denoising strength` for img2img, and `Lora hashes`
    /// (`name: hash, …`) of the `adapters` used. The one writer for the CLI and the studio.
    pub fn for_generation(
        params: &crate::pipeline::GenerateParams,
        prompt: &str,
        seed: u64,
        model_hash: &str,
        model_name: Option<&str>,
        adapters: &[(String, String)],
    ) -> Self {
        let mut extra = Vec::new();
        if !adapters.is_empty() {
            let list: Vec<String> = adapters.iter().map(|(name, hash)| format!("{name}: {hash}")).collect();
            extra.push(("Lora hashes".to_string(), list.join(", ")));
        }
        ImageMetadata {
            prompt: prompt.to_string(),
            negative_prompt: params.negative_prompt.clone(),
            steps: params.steps,
            sampler: params.scheduler.a1111_name().to_string(),
            cfg_scale: params.guidance,
            seed,
            width: params.width,
            height: params.height,
            model_hash: model_hash.to_string(),
            model: model_name.map(str::to_string),
            denoising_strength: params.init_image.as_ref().map(|_| params.strength),
            extra,
        }
    }
}

/// Python's `repr(float)`: always a decimal point (`7.0`, not `7`), shortest round-trip digits.
fn format_float(v: f64) -> String {
    format!("{v:?}")
}

/// A1111's `quote`: a value with `,`, `:` or a newline becomes a JSON string (non-ASCII kept).
fn quote(value: &str) -> String {
    if value.contains([',', ':', '\n']) {
        serde_json::to_string(value).unwrap_or_else(|_| value.to_string())
    } else {
        value.to_string()
    }
}

/// A1111's `unquote`: a value in double quotes is read as a JSON string if it is one.
fn unquote(value: &str) -> String {
    if value.len() >= 2 && value.starts_with('"') && value.ends_with('"') {
        if let Ok(s) = serde_json::from_str::<String>(value) {
            return s;
        }
    }
    value.to_string()
}

fn param_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    // A1111 `infotext_utils.re_param_code`.
    RE.get_or_init(|| Regex::new(r#"\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)"#).expect("static regex"))
}

fn size_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"^(\d+)x(\d+)$").expect("static regex"))
}

/// Reads a `parameters` text (as written by A1111 or [`ImageMetadata::to_parameters`]).
///
/// Steps, Sampler, CFG scale, Seed and Size are required; unknown keys go to `extra` in order.
pub fn parse_parameters(text: &str) -> Result<ImageMetadata> {
    let mut lines: Vec<&str> = text.trim().split('\n').collect();
    let mut last = lines.pop().unwrap_or_default();
    // Like A1111: a last line with fewer than three `key: value` pairs is still prompt text.
    if param_regex().captures_iter(last).count() < 3 {
        lines.push(last);
        last = "";
    }

    let mut meta = ImageMetadata::default();
    let (mut prompt, mut negative): (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
    let mut in_negative = false;
    for line in lines {
        let mut line = line.trim();
        if let Some(rest) = line.strip_prefix(NEGATIVE_PREFIX) {
            in_negative = true;
            line = rest.trim();
        }
        if in_negative {
            negative.push(line)
        } else {
            prompt.push(line)
        }
    }
    meta.prompt = prompt.join("\n");
    meta.negative_prompt = negative.join("\n");

    let (mut steps, mut sampler, mut cfg, mut seed, mut size) = (None, None, None, None, None);
    for caps in param_regex().captures_iter(last) {
        let key = caps[1].to_string();
        let raw = &caps[2];
        let value = if raw.starts_with('"') && raw.ends_with('"') { unquote(raw) } else { raw.to_string() };
        let number_error = |what: &str| Error::Metadata(format!("{key}: {value:?} is not {what}"));
        match key.as_str() {
            "Steps" => steps = Some(value.parse::<usize>().map_err(|_| number_error("a step count"))?),
            "Sampler" => sampler = Some(value),
            "CFG scale" => cfg = Some(value.parse::<f64>().map_err(|_| number_error("a number"))?),
            "Seed" => seed = Some(value.parse::<u64>().map_err(|_| number_error("a seed"))?),
            "Size" => {
                let c = size_regex().captures(&value).ok_or_else(|| number_error("a WIDTHxHEIGHT size"))?;
                let dim = |i: usize| c[i].parse::<usize>().map_err(|_| number_error("a WIDTHxHEIGHT size"));
                size = Some((dim(1)?, dim(2)?));
            }
            "Model hash" => meta.model_hash = value,
            "Model" => meta.model = Some(value),
            "Denoising strength" => {
                meta.denoising_strength = Some(value.parse::<f64>().map_err(|_| number_error("a number"))?)
            }
            _ => meta.extra.push((key, value)),
        }
    }
    let missing = |what: &str| Error::Metadata(format!("parameters text has no \"{what}\" entry"));
    meta.steps = steps.ok_or_else(|| missing("Steps"))?;
    meta.sampler = sampler.ok_or_else(|| missing("Sampler"))?;
    meta.cfg_scale = cfg.ok_or_else(|| missing("CFG scale"))?;
    meta.seed = seed.ok_or_else(|| missing("Seed"))?;
    (meta.width, meta.height) = size.ok_or_else(|| missing("Size"))?;
    Ok(meta)
}

/// Encodes an 8-bit RGB PNG with `meta` in a `parameters` text chunk placed before the image
/// data. Like PIL (which A1111 uses), the chunk is tEXt when the text is Latin-1 and iTXt
/// (UTF-8, uncompressed) otherwise.
pub fn encode_png(img: &RgbImage, meta: &ImageMetadata) -> Result<Vec<u8>> {
    encode(img, Some(meta.to_parameters()))
}

/// Encodes an 8-bit RGB PNG without any text chunk (previews, intermediate images).
pub fn encode_plain_png(img: &RgbImage) -> Result<Vec<u8>> {
    encode(img, None)
}

fn encode(img: &RgbImage, text: Option<String>) -> Result<Vec<u8>> {
    let png_error = |e: png::EncodingError| Error::Metadata(format!("encoding PNG: {e}"));
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, img.width(), img.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        match text {
            Some(text) if text.chars().all(|c| u32::from(c) <= 0xFF) => {
                encoder.add_text_chunk(PARAMETERS_KEY.to_string(), text).map_err(png_error)?
            }
            Some(text) => encoder.add_itxt_chunk(PARAMETERS_KEY.to_string(), text).map_err(png_error)?,
            None => {}
        }
        let mut writer = encoder.write_header().map_err(png_error)?;
        writer.write_image_data(img.as_raw()).map_err(png_error)?;
        writer.finish().map_err(png_error)?;
    }
    Ok(out)
}

/// The `parameters` text of a PNG (from a tEXt, iTXt or zTXt chunk, before or after the image
/// data), or `None` when it has none.
pub fn read_png_parameters(bytes: &[u8]) -> Result<Option<String>> {
    let decode_error = |e: png::DecodingError| Error::Metadata(format!("reading PNG: {e}"));
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().map_err(decode_error)?;
    if let Some(text) = find_parameters(reader.info()).map_err(decode_error)? {
        return Ok(Some(text));
    }
    // Text chunks may also follow the image data; read to the end to see them.
    reader.finish().map_err(decode_error)?;
    find_parameters(reader.info()).map_err(decode_error)
}

fn find_parameters(info: &png::Info<'_>) -> std::result::Result<Option<String>, png::DecodingError> {
    if let Some(chunk) = info.uncompressed_latin1_text.iter().find(|c| c.keyword == PARAMETERS_KEY) {
        return Ok(Some(chunk.text.clone()));
    }
    if let Some(chunk) = info.utf8_text.iter().find(|c| c.keyword == PARAMETERS_KEY) {
        return chunk.get_text().map(Some);
    }
    if let Some(chunk) = info.compressed_latin1_text.iter().find(|c| c.keyword == PARAMETERS_KEY) {
        return chunk.get_text().map(Some);
    }
    Ok(None)
}

/// Writes the PNG so that `path` holds either the old file or the complete new one, never a
/// partial file: a temporary file in the same folder is written, synced and renamed over `path`
/// ([`crate::files::write_atomic`]).
pub fn write_png_atomic(path: &Path, img: &RgbImage, meta: &ImageMetadata) -> Result<()> {
    let bytes = encode_png(img, meta)?;
    crate::files::write_atomic(path, &bytes).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> ImageMetadata {
        ImageMetadata {
            prompt: "a photograph of an astronaut riding a horse".into(),
            negative_prompt: "blurry, low quality".into(),
            steps: 20,
            sampler: "Euler a".into(),
            cfg_scale: 7.5,
            seed: 42,
            width: 512,
            height: 512,
            model_hash: "abcdef1234".into(),
            model: Some("name".into()),
            denoising_strength: Some(0.6),
            extra: Vec::new(),
        }
    }

    fn test_image() -> RgbImage {
        RgbImage::from_fn(7, 5, |x, y| image::Rgb([(x * 30) as u8, (y * 50) as u8, ((x + y) * 10) as u8]))
    }

    #[test]
    fn parameters_text_matches_a1111_layout() {
        assert_eq!(
            example().to_parameters(),
            "a photograph of an astronaut riding a horse\n\
             Negative prompt: blurry, low quality\n\
             Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: abcdef1234, Model: name, Denoising strength: 0.6"
        );
        let plain = ImageMetadata {
            negative_prompt: String::new(),
            sampler: "DPM++ 2M Karras".into(),
            cfg_scale: 7.0,
            model: None,
            denoising_strength: None,
            extra: vec![("Lora hashes".into(), "a: 0123, b: 4567".into()), ("Version".into(), "atelier 0.1".into())],
            ..example()
        };
        assert_eq!(
            plain.to_parameters(),
            "a photograph of an astronaut riding a horse\n\
             Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.0, Seed: 42, Size: 512x512, Model hash: abcdef1234, \
             Lora hashes: \"a: 0123, b: 4567\", Version: atelier 0.1"
        );
    }

    #[test]
    fn parameters_round_trip() -> anyhow::Result<()> {
        let cases = [
            example(),
            ImageMetadata {
                prompt: "(masterpiece:1.2), café 🐱\nsecond line, <lora:x:0.8>".into(),
                negative_prompt: "bad anatomy\nworst quality".into(),
                sampler: "DPM++ 2M Karras".into(),
                cfg_scale: 7.0,
                seed: 4_294_967_295,
                width: 768,
                height: 512,
                model: Some("sd-v1-5, pruned: emaonly".into()),
                denoising_strength: None,
                extra: vec![
                    ("Clip skip".into(), "2".into()),
                    ("Lora hashes".into(), "x: 0123abcd, y: \"q\"".into()),
                    ("Version".into(), "atelier 0.1".into()),
                ],
                ..example()
            },
            ImageMetadata {
                prompt: String::new(),
                negative_prompt: String::new(),
                model_hash: String::new(),
                model: None,
                ..example()
            },
        ];
        for meta in cases {
            let text = meta.to_parameters();
            assert_eq!(parse_parameters(&text)?, meta, "{text}");
        }
        Ok(())
    }

    #[test]
    fn parses_a1111_text() -> anyhow::Result<()> {
        let text = "masterpiece, best quality, 1girl\nNegative prompt: lowres, bad hands\n\
                    Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, \
                    Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Hires upscale: 2, \
                    Lora hashes: \"detail: 0a1b2c3d4e5f\", Version: v1.10.1";
        let meta = parse_parameters(text)?;
        assert_eq!(meta.prompt, "masterpiece, best quality, 1girl");
        assert_eq!(meta.negative_prompt, "lowres, bad hands");
        assert_eq!(
            (meta.steps, meta.sampler.as_str(), meta.cfg_scale, meta.seed),
            (28, "DPM++ 2M", 7.0, 1_234_567_890)
        );
        assert_eq!((meta.width, meta.height), (512, 768));
        assert_eq!(meta.model_hash, "6ce0161689");
        assert_eq!(meta.model.as_deref(), Some("v1-5-pruned-emaonly"));
        assert_eq!(meta.denoising_strength, Some(0.45));
        let extra: Vec<(&str, &str)> = meta.extra.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            extra,
            [
                ("Schedule type", "Karras"),
                ("Hires upscale", "2"),
                ("Lora hashes", "detail: 0a1b2c3d4e5f"),
                ("Version", "v1.10.1")
            ]
        );
        Ok(())
    }

    #[test]
    fn missing_or_bad_fields_are_errors() {
        let err = parse_parameters("a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1").expect_err("no size");
        assert!(err.to_string().contains("Size"), "{err}");
        let err = parse_parameters("a cat\nSteps: many, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 8x8")
            .expect_err("bad steps");
        assert!(err.to_string().contains("Steps"), "{err}");
        assert!(parse_parameters("just a prompt").is_err());
    }

    #[test]
    fn png_round_trip_keeps_pixels_and_text() -> anyhow::Result<()> {
        let img = test_image();
        for meta in [example(), ImageMetadata { prompt: "東京の夜景 🐱🚀".into(), ..example() }] {
            let bytes = encode_png(&img, &meta)?;
            assert_eq!(read_png_parameters(&bytes)?.as_deref(), Some(meta.to_parameters().as_str()));
            assert_eq!(parse_parameters(&read_png_parameters(&bytes)?.unwrap_or_default())?, meta);
            let decoded = image::load_from_memory(&bytes)?.to_rgb8();
            assert_eq!(decoded, img);
        }
        Ok(())
    }

    #[test]
    fn latin1_text_uses_text_chunk_and_other_text_uses_itxt() -> anyhow::Result<()> {
        let has_chunk = |bytes: &[u8], kind: &[u8]| {
            bytes.windows(4 + PARAMETERS_KEY.len()).any(|w| w[..4] == *kind && w[4..] == *PARAMETERS_KEY.as_bytes())
        };
        let latin = encode_png(&test_image(), &ImageMetadata { prompt: "crème brûlée".into(), ..example() })?;
        assert!(has_chunk(&latin, b"tEXt") && !has_chunk(&latin, b"iTXt"));
        let utf8 = encode_png(&test_image(), &ImageMetadata { prompt: "🐱".into(), ..example() })?;
        assert!(has_chunk(&utf8, b"iTXt") && !has_chunk(&utf8, b"tEXt"));
        Ok(())
    }

    #[test]
    fn png_without_parameters_and_non_png() -> anyhow::Result<()> {
        let mut plain = Vec::new();
        test_image().write_to(&mut std::io::Cursor::new(&mut plain), image::ImageFormat::Png)?;
        assert_eq!(read_png_parameters(&plain)?, None);
        assert!(read_png_parameters(b"not a png").is_err());
        Ok(())
    }

    #[test]
    fn reads_the_fixture_pngs() -> anyhow::Result<()> {
        // diffusers' own PNGs carry no A1111 text; reading them must still work.
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures/sd-tiny/pipeline_ddim.png");
        let bytes = std::fs::read(path)?;
        let _ = read_png_parameters(&bytes)?;
        Ok(())
    }

    #[test]
    fn atomic_write_leaves_only_the_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("00001-42.png");
        write_png_atomic(&path, &test_image(), &example())?;
        // Overwriting goes through the same rename.
        let second = ImageMetadata { seed: 43, ..example() };
        write_png_atomic(&path, &test_image(), &second)?;
        let names: Vec<_> =
            std::fs::read_dir(dir.path())?.map(|e| e.map(|e| e.file_name())).collect::<std::io::Result<_>>()?;
        assert_eq!(names, vec![std::ffi::OsString::from("00001-42.png")]);
        let text = read_png_parameters(&std::fs::read(&path)?)?;
        assert_eq!(text, Some(second.to_parameters()));

        let err = write_png_atomic(&dir.path().join("no-such-dir/x.png"), &test_image(), &example())
            .expect_err("missing dir");
        assert!(err.to_string().contains("no-such-dir"), "{err}");
        Ok(())
    }
}
