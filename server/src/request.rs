//! Turns a [`GenerateRequest`] (JSON from the API or the UI) into engine parameters,
//! with a message naming the field for everything that is wrong.

use std::str::FromStr;

use app::dto::GenerateRequest;
use atelier_engine::attention::AttentionKind;
use atelier_engine::pipeline::GenerateParams;
use atelier_engine::scheduler::SchedulerKind;
use base64::Engine;

use crate::ApiError;

/// Random seeds stay below 2³² so they survive JavaScript numbers and match A1111's range.
const RANDOM_SEED_LIMIT: u64 = 1 << 32;
/// Largest seed accepted from a client: JavaScript numbers are exact only up to 2⁵³.
const MAX_SEED: u64 = (1 << 53) - 1;
/// Longest prompt accepted, in bytes (the tokenizer keeps 77 tokens anyway).
const MAX_PROMPT_BYTES: usize = 10_000;

/// Validates `req` and builds the engine parameters. Decodes the init image, so call it
/// off the async runtime (`spawn_blocking`).
pub fn to_params(req: GenerateRequest, default_size: (usize, usize)) -> Result<GenerateParams, ApiError> {
    for (field, text) in [("prompt", &req.prompt), ("negative_prompt", &req.negative_prompt)] {
        if text.len() > MAX_PROMPT_BYTES {
            return Err(invalid(field, format!("is {} bytes long; the limit is {MAX_PROMPT_BYTES}", text.len())));
        }
    }
    let scheduler = SchedulerKind::from_str(&req.scheduler)?;
    let seed = match req.seed {
        Some(s) if s > MAX_SEED => return Err(invalid("seed", format!("{s} is larger than {MAX_SEED}"))),
        Some(s) => s,
        None => rand::random_range(0..RANDOM_SEED_LIMIT),
    };
    let init_image = req.init_image.as_deref().filter(|s| !s.trim().is_empty()).map(decode_image).transpose()?;
    let params = GenerateParams {
        prompt: req.prompt,
        negative_prompt: req.negative_prompt,
        steps: req.steps,
        guidance: req.guidance,
        seed,
        scheduler,
        width: req.width.unwrap_or(default_size.0),
        height: req.height.unwrap_or(default_size.1),
        batch_size: req.batch_size,
        init_image,
        strength: req.strength,
        attention: AttentionKind::default(),
        loras: Vec::new(),
    };
    params.validate()?;
    Ok(params)
}

fn invalid(field: &str, message: String) -> ApiError {
    ApiError::Invalid { field: field.into(), message }
}

/// Decodes base64 (optionally a `data:image/...;base64,` URL) PNG/JPEG/WebP to RGB.
fn decode_image(text: &str) -> Result<image::RgbImage, ApiError> {
    let b64 = match text.split_once(";base64,") {
        Some((head, rest)) if head.starts_with("data:") => rest,
        _ => text,
    };
    let cleaned: String = b64.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(cleaned.as_bytes())
        .map_err(|e| ApiError::BadImage(format!("not valid base64 ({e})")))?;
    let format = image::guess_format(&bytes)
        .map_err(|_| ApiError::BadImage("not a PNG, JPEG or WebP image".into()))?;
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP) {
        return Err(ApiError::BadImage(format!("{format:?} images are not supported; use PNG, JPEG or WebP")));
    }
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    // Refuse decompression bombs: 8192² is far beyond any SD resolution.
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(8192);
    limits.max_image_height = Some(8192);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| ApiError::BadImage(e.to_string()))?;
    Ok(img.to_rgb8())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> GenerateRequest {
        GenerateRequest { prompt: "x".into(), ..Default::default() }
    }

    #[test]
    fn defaults_fill_in_model_size_and_random_seed() {
        let p = to_params(req(), (64, 64)).unwrap();
        assert_eq!((p.width, p.height, p.steps), (64, 64, 20));
        assert!(p.seed < RANDOM_SEED_LIMIT);
    }

    #[test]
    fn errors_name_the_field() {
        let e = to_params(GenerateRequest { width: Some(30), ..req() }, (64, 64)).unwrap_err();
        assert!(e.to_string().contains("width"), "{e}");
        let e = to_params(GenerateRequest { scheduler: "plms".into(), ..req() }, (64, 64)).unwrap_err();
        assert!(e.to_string().contains("scheduler"), "{e}");
        let e = to_params(GenerateRequest { init_image: Some("@@@".into()), ..req() }, (64, 64)).unwrap_err();
        assert!(matches!(e, ApiError::BadImage(_)), "{e}");
    }

    #[test]
    fn data_url_png_decodes() {
        let img = image::RgbImage::from_pixel(16, 8, image::Rgb([9, 8, 7]));
        let png = crate::png::encode_png(&img, None).unwrap();
        let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png));
        let p = to_params(GenerateRequest { init_image: Some(url), ..req() }, (64, 64)).unwrap();
        assert_eq!(p.init_image.unwrap(), img);
    }
}
