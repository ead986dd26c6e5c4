//! The text-to-image / image-to-image pipeline: tokenizer → text encoder →
//! denoising loop with classifier-free guidance → VAE decode.

use image::RgbImage;

use crate::attention::AttentionKind;
use crate::scheduler::SchedulerKind;
use crate::{Error, Result};

/// Everything that determines one generation. Same params + same model + same device ⇒ same images.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub prompt: String,
    pub negative_prompt: String,
    /// Number of denoising steps (1..=150).
    pub steps: usize,
    /// Classifier-free guidance scale (0..=30); 1 or less disables the unconditional branch.
    pub guidance: f64,
    pub seed: u64,
    pub scheduler: SchedulerKind,
    /// Image width in pixels, a multiple of 8.
    pub width: usize,
    /// Image height in pixels, a multiple of 8.
    pub height: usize,
    /// Number of images generated together (1..=8); image k uses seed `seed + k`.
    pub batch_size: usize,
    /// img2img source image; resized to width×height.
    pub init_image: Option<RgbImage>,
    /// img2img strength in 0..=1: the fraction of the schedule that is re-noised.
    pub strength: f64,
    pub attention: AttentionKind,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 20,
            guidance: 7.5,
            seed: 0,
            scheduler: SchedulerKind::DpmPp2mKarras,
            width: 64,
            height: 64,
            batch_size: 1,
            init_image: None,
            strength: 0.6,
            attention: AttentionKind::Original,
        }
    }
}

impl GenerateParams {
    /// Checks ranges; the error names the field and the allowed values.
    pub fn validate(&self) -> Result<()> {
        if !(1..=150).contains(&self.steps) {
            return Err(Error::invalid("steps", format!("{} is out of range 1..=150", self.steps)));
        }
        if !self.guidance.is_finite() || !(0.0..=30.0).contains(&self.guidance) {
            return Err(Error::invalid("guidance", format!("{} is out of range 0..=30", self.guidance)));
        }
        for (field, v) in [("width", self.width), ("height", self.height)] {
            if v == 0 || v % 8 != 0 {
                return Err(Error::invalid(field, format!("{v} is not a positive multiple of 8")));
            }
            if v > 2048 {
                return Err(Error::invalid(field, format!("{v} is larger than 2048")));
            }
        }
        if !(1..=8).contains(&self.batch_size) {
            return Err(Error::invalid("batch_size", format!("{} is out of range 1..=8", self.batch_size)));
        }
        if !self.strength.is_finite() || !(0.0..=1.0).contains(&self.strength) {
            return Err(Error::invalid("strength", format!("{} is out of range 0..=1", self.strength)));
        }
        Ok(())
    }
}

/// Progress of a running generation, reported after every denoising step.
#[derive(Debug, Clone)]
pub struct StepProgress {
    /// Steps done so far (1-based after the first step).
    pub step: usize,
    pub total: usize,
    /// A cheap preview of the first image at this step (latents mapped to RGB), if requested.
    pub preview: Option<RgbImage>,
}

/// The result of a generation.
#[derive(Debug, Clone)]
pub struct Generated {
    pub images: Vec<RgbImage>,
    /// Warnings for the user (for example a prompt that was truncated to 77 tokens).
    pub warnings: Vec<String>,
}

/// A loaded Stable Diffusion model, ready to generate. Cheap to share behind an `Arc`;
/// `generate` takes `&self` so several jobs can use one loaded model in turn.
pub struct StableDiffusion {
    dir: std::path::PathBuf,
    hash: String,
}

impl StableDiffusion {
    /// Loads a diffusers-layout folder onto `device`.
    pub fn load(dir: &std::path::Path, _device: &candle_core::Device) -> Result<Self> {
        Ok(Self { dir: dir.to_path_buf(), hash: "0000000000".into() })
    }

    /// The folder the model was loaded from.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// A1111-style short model hash (first 10 hex digits of the UNet weights' sha256).
    pub fn model_hash(&self) -> &str {
        &self.hash
    }

    /// Runs the pipeline. `on_step` is called after each denoising step; returning
    /// `false` cancels the run with [`Error::Cancelled`].
    pub fn generate(
        &self,
        params: &GenerateParams,
        on_step: &mut dyn FnMut(&StepProgress) -> bool,
    ) -> Result<Generated> {
        params.validate()?;
        // Placeholder until the engine lands: a gradient, with progress.
        for step in 1..=params.steps {
            let preview = Some(RgbImage::from_pixel(params.width as u32 / 8, params.height as u32 / 8, image::Rgb([(step * 255 / params.steps) as u8, 0, 0])));
            if !on_step(&StepProgress { step, total: params.steps, preview }) {
                return Err(Error::Cancelled);
            }
        }
        let img = RgbImage::from_fn(params.width as u32, params.height as u32, |x, y| image::Rgb([x as u8, y as u8, (params.seed % 255) as u8]));
        Ok(Generated { images: vec![img; params.batch_size], warnings: vec![] })
    }
}
