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

/// Decodes base64 (optionally a `data:image/...;base64,` URL) PNG/JPEG/WebP to upright
/// RGB, transparency on white, through the engine's one image reader
/// ([`atelier_engine::image_input::decode`], at most 8192 pixels per side).
fn decode_image(text: &str) -> Result<image::RgbImage, ApiError> {
    let b64 = match text.split_once(";base64,") {
        Some((head, rest)) if head.starts_with("data:") => rest,
        _ => text,
    };
    let cleaned: String = b64.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(cleaned.as_bytes())
        .map_err(|e| ApiError::BadImage(format!("not valid base64 ({e})")))?;
    atelier_engine::image_input::decode(&bytes, &atelier_engine::image_input::DecodeOptions::default())
        .map_err(|e| ApiError::BadImage(e.to_string()))
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
        let png = atelier_engine::metadata::encode_plain_png(&img).unwrap();
        let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png));
        let p = to_params(GenerateRequest { init_image: Some(url), ..req() }, (64, 64)).unwrap();
        assert_eq!(p.init_image.unwrap(), img);
    }

    fn data_url(img: image::DynamicImage) -> String {
        let mut png = std::io::Cursor::new(Vec::new());
        img.write_to(&mut png, image::ImageFormat::Png).unwrap();
        format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png.into_inner()))
    }

    #[test]
    fn init_image_transparency_is_white_and_size_limits_say_so() {
        // Transparent pixels that store magenta come out white; half alpha is blended.
        let mut rgba = image::RgbaImage::from_pixel(16, 8, image::Rgba([255, 0, 255, 0]));
        rgba.put_pixel(3, 2, image::Rgba([0, 0, 200, 128]));
        let p = to_params(GenerateRequest { init_image: Some(data_url(image::DynamicImage::ImageRgba8(rgba))), ..req() }, (64, 64)).unwrap();
        let img = p.init_image.unwrap();
        assert_eq!(img.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(img.get_pixel(3, 2).0, [127, 127, 227]);
        // Too large is not corrupt: the size and the limit.
        let wide = image::DynamicImage::ImageLuma8(image::GrayImage::new(9000, 8));
        let e = to_params(GenerateRequest { init_image: Some(data_url(wide)), ..req() }, (64, 64)).unwrap_err();
        assert!(matches!(e, ApiError::BadImage(_)), "{e}");
        assert!(e.to_string().contains("9000×8 is larger than the 8192-pixel limit per side"), "{e}");
        assert!(!e.to_string().contains("corrupt"), "{e}");
    }
}
