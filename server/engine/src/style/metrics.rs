//! Quality metrics of a style, measured on generated images (formulas below, all on
//! 8-bit RGB images), and [`measure_style`], which measures a trained style against its
//! base model and keeps the training images' statistics with it ([`load_style_grams`]):
//!
//! - **style similarity** to the training images, in (0, 1]: `1 / (1 + d)` with
//!   `d = mean over layers l of ‖Ḡ_gen,l − Ḡ_ref,l‖_F / ‖Ḡ_ref,l‖_F`, where `Ḡ_l` is the
//!   mean over a set of images of the Gram matrix `F Fᵀ / (C·h·w)` of the activations `F`
//!   (C × h·w) after down block l of the model's own VAE encoder (the feature statistics
//!   of Gatys et al.'s style loss, from a fixed network every model ships with);
//! - **sharpness**: variance of the 4-neighbour Laplacian of the luma
//!   ([`crate::quality::laplacian_variance`]);
//! - **colourfulness** (Hasler & Süsstrunk 2003): with `rg = R − G`, `yb = (R + G)/2 − B`,
//!   `M = √(σ_rg² + σ_yb²) + 0.3·√(μ_rg² + μ_yb²)` ([`crate::quality::colourfulness`]);
//! - **diversity** of a set: the mean over pairs of the RMS difference of 16×16
//!   thumbnails, in units of the full 0–255 range (0: identical images).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::lora::LoraAdapter;
use crate::model::{load_safetensors, save_safetensors_atomic};
use crate::pipeline::{image_to_tensor, StableDiffusion};
use crate::vae::AutoencoderKL;
use crate::{Error, Result};

/// File of a style folder holding the training images' mean Gram matrices (tensors
/// `layer0`, `layer1`, … in encoder-layer order), written by [`measure_style`].
pub const STYLE_GRAMS: &str = "style_grams.safetensors";

/// File of a style folder showing [`measure_style`]'s renders: the base model's row over
/// the style's.
pub const COMPARE_PNG: &str = "compare.png";

/// The four metrics of a set of images.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StyleMetrics {
    pub style_similarity: f64,
    pub sharpness: f64,
    pub colourfulness: f64,
    pub diversity: f64,
}

/// Mean Gram matrix per encoder layer of a set of images.
pub fn mean_grams(vae: &AutoencoderKL, images: &[RgbImage]) -> Result<Vec<Tensor>> {
    let device = vae.device();
    let mut sums: Vec<Tensor> = Vec::new();
    for chunk in images.chunks(16) {
        let xs = chunk
            .iter()
            .map(|i| image_to_tensor(i, i.width() as usize, i.height() as usize, &device))
            .collect::<Result<Vec<_>>>()?;
        let x = Tensor::cat(&xs, 0)?.to_dtype(vae.dtype())?;
        for (l, f) in vae.encoder_features(&x)?.into_iter().enumerate() {
            let (b, c, h, w) = f.dims4()?;
            let f = f.to_dtype(DType::F32)?.reshape((b, c, h * w))?;
            let g = (f.matmul(&f.t()?)? / (c * h * w) as f64)?.sum(0)?;
            if sums.len() <= l {
                sums.push(g);
            } else {
                sums[l] = (&sums[l] + g)?;
            }
        }
    }
    let n = images.len().max(1) as f64;
    sums.into_iter().map(|s| Ok((s / n)?)).collect()
}

/// `1 / (1 + d)` for the relative Gram distance `d` between two sets' mean Grams.
pub fn style_similarity(generated: &[Tensor], reference: &[Tensor]) -> Result<f64> {
    let mut d = 0.0;
    for (g, r) in generated.iter().zip(reference) {
        let num = (g - r)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        let den = r.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        d += num.sqrt() / den.sqrt().max(1e-12);
    }
    d /= reference.len().max(1) as f64;
    Ok(1.0 / (1.0 + d))
}

/// Mean pairwise RMS difference of 16×16 thumbnails, as a fraction of 255.
pub fn diversity(images: &[RgbImage]) -> f64 {
    let thumbs: Vec<Vec<f64>> = images
        .iter()
        .map(|i| {
            image::imageops::resize(i, 16, 16, image::imageops::FilterType::Triangle).as_raw().iter().map(|&v| v as f64 / 255.0).collect()
        })
        .collect();
    let (mut sum, mut pairs) = (0.0, 0usize);
    for a in 0..thumbs.len() {
        for b in a + 1..thumbs.len() {
            let ms = thumbs[a].iter().zip(&thumbs[b]).map(|(x, y)| (x - y) * (x - y)).sum::<f64>() / thumbs[a].len() as f64;
            sum += ms.sqrt();
            pairs += 1;
        }
    }
    if pairs == 0 { 0.0 } else { sum / pairs as f64 }
}

/// All four metrics of `generated`, with style similarity to `reference_grams` (from
/// [`mean_grams`] of the training images).
pub fn measure(vae: &AutoencoderKL, generated: &[RgbImage], reference_grams: &[Tensor]) -> Result<StyleMetrics> {
    let n = generated.len().max(1) as f64;
    Ok(StyleMetrics {
        style_similarity: style_similarity(&mean_grams(vae, generated)?, reference_grams)?,
        sharpness: generated.iter().map(crate::quality::laplacian_variance).sum::<f64>() / n,
        colourfulness: generated.iter().map(crate::quality::colourfulness).sum::<f64>() / n,
        diversity: diversity(generated),
    })
}

/// A style and its base model measured on the same prompts and seeds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StyleComparison {
    /// The base model alone.
    pub base: StyleMetrics,
    /// The base model with the style at weight 1.
    pub style: StyleMetrics,
}

/// Measures the adapter file `adapter` on the model `sd` it was trained for: renders
/// `prompts` (seeds `first_seed + i`, see [`render_set`]) with the base model and with the
/// adapter at weight 1, and measures both sets against the mean Grams of
/// `training_images`. Writes into `style_dir` those Grams ([`STYLE_GRAMS`], so the style
/// can be measured again without its dataset, see [`load_style_grams`]) and
/// [`COMPARE_PNG`] (base row over style row).
pub fn measure_style(
    sd: &StableDiffusion,
    adapter: &Path,
    training_images: &[RgbImage],
    prompts: &[String],
    first_seed: u64,
    style_dir: &Path,
) -> Result<StyleComparison> {
    let lora = sd.bind_lora(&Arc::new(LoraAdapter::load(adapter)?))?;
    let reference = mean_grams(sd.vae(), training_images)?;
    let grams: HashMap<String, Tensor> =
        reference.iter().enumerate().map(|(i, g)| (format!("layer{i}"), g.clone())).collect();
    save_safetensors_atomic(&grams, &style_dir.join(STYLE_GRAMS))?;
    let base_images = render_set(sd, None, prompts, first_seed)?;
    let style_images = render_set(sd, Some((&lora, 1.0)), prompts, first_seed)?;
    let base = measure(sd.vae(), &base_images, &reference)?;
    let style = measure(sd.vae(), &style_images, &reference)?;
    let mut all = base_images;
    all.extend(style_images);
    crate::sheet::save_png(&style_dir.join(COMPARE_PNG), &crate::sheet::contact_sheet(&all, prompts.len().max(1)))?;
    Ok(StyleComparison { base, style })
}

/// The training images' mean Grams that [`measure_style`] kept in `style_dir`
/// ([`STYLE_GRAMS`]), in encoder-layer order, on `device`.
pub fn load_style_grams(style_dir: &Path, device: &Device) -> Result<Vec<Tensor>> {
    let file = style_dir.join(STYLE_GRAMS);
    let unusable = |why: String| Error::Weights {
        path: file.clone(),
        message: format!("{why} (train the style again to measure style similarity)"),
    };
    let map = load_safetensors(&file, device).map_err(|e| {
        unusable(match e {
            Error::Io { source, .. } => source.to_string(),
            Error::Weights { message, .. } => message,
            other => other.to_string(),
        })
    })?;
    (0..map.len()).map(|i| map.get(&format!("layer{i}")).cloned().ok_or_else(|| unusable(format!("lacks layer{i}")))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn style_grams_load_in_layer_order_or_say_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_style_grams(dir.path(), &Device::Cpu).unwrap_err();
        assert!(matches!(err, Error::Weights { .. }) && err.to_string().contains("train the style again"), "{err}");
        let grams: HashMap<String, Tensor> = (0..3)
            .map(|i| (format!("layer{i}"), Tensor::full(i as f32, (2, 2), &Device::Cpu).unwrap()))
            .collect();
        save_safetensors_atomic(&grams, &dir.path().join(STYLE_GRAMS)).unwrap();
        let loaded = load_style_grams(dir.path(), &Device::Cpu).unwrap();
        let firsts: Vec<f32> = loaded.iter().map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]).collect();
        assert_eq!(firsts, [0.0, 1.0, 2.0]);
    }

    #[test]
    fn diversity_is_zero_for_copies_and_grows_with_difference() {
        let a = RgbImage::from_pixel(32, 32, image::Rgb([0, 0, 0]));
        let b = RgbImage::from_pixel(32, 32, image::Rgb([255, 255, 255]));
        assert_eq!(diversity(&[a.clone(), a.clone()]), 0.0);
        assert!((diversity(&[a.clone(), b.clone()]) - 1.0).abs() < 1e-9);
        assert!((diversity(&[a.clone(), a, b]) - 2.0 / 3.0).abs() < 1e-9);
    }
}

/// Renders one image per prompt (seeds `seed0 + i`, 20 steps, the model's size) with
/// `lora` at the given weight, or with the base model.
pub fn render_set(
    sd: &crate::pipeline::StableDiffusion,
    lora: Option<(&std::sync::Arc<crate::lora::BoundLora>, f64)>,
    prompts: &[String],
    seed0: u64,
) -> Result<Vec<RgbImage>> {
    let size = sd.default_size();
    let mut out = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        let params = crate::pipeline::GenerateParams {
            prompt: p.clone(),
            seed: seed0 + i as u64,
            width: size,
            height: size,
            loras: lora
                .iter()
                .map(|(l, w)| crate::lora::ActiveLora { lora: (*l).clone(), weight: *w, blocks: Default::default() })
                .collect(),
            ..Default::default()
        };
        out.extend(sd.generate(&params, &mut |_| true)?.images);
    }
    Ok(out)
}

/// Evaluation prompts for a style on the starter model: 8 prompts over colour / shape /
/// background triples held out of the starter's training (so neither the base model
/// nor a style dataset made from its world has seen them), each ending in
/// `, TRIGGER style`.
pub fn starter_eval_prompts(trigger: &str) -> Vec<String> {
    crate::starter::eval::held_out_cases(0)
        .into_iter()
        .step_by(13)
        .take(8)
        .map(|c| if trigger.is_empty() { c.prompt } else { format!("{}, {trigger} style", c.prompt) })
        .collect()
}
