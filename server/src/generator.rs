//! The [`Generator`] seam between the job queue and the engine: the real model in production,
//! a fast fake in tests.

use std::path::{Path, PathBuf};

use atelier_engine::pipeline::{GenerateParams, Generated, StableDiffusion, StepProgress};

/// Something that turns parameters into images, reporting each step. Blocking and CPU/GPU
/// heavy: only the job queue's worker thread calls [`Generator::generate`].
pub trait Generator: Send + Sync {
    /// Runs one generation; `on_step` returning `false` cancels it.
    fn generate(
        &self,
        params: &GenerateParams,
        on_step: &mut dyn FnMut(&StepProgress) -> bool,
    ) -> atelier_engine::Result<Generated>;
    /// A1111-style short hash of the weights, written into PNG metadata.
    fn model_hash(&self) -> String;
    /// A human-readable model name (the folder name).
    fn model_name(&self) -> String;
}

impl Generator for StableDiffusion {
    fn generate(
        &self,
        params: &GenerateParams,
        on_step: &mut dyn FnMut(&StepProgress) -> bool,
    ) -> atelier_engine::Result<Generated> {
        StableDiffusion::generate(self, params, on_step)
    }
    fn model_hash(&self) -> String {
        StableDiffusion::model_hash(self).to_string()
    }
    fn model_name(&self) -> String {
        "stable-diffusion".into()
    }
}

/// A model loaded from a folder, with what the UI needs to know about it.
pub struct LoadedModel {
    sd: StableDiffusion,
    name: String,
    /// Native image size (UNet sample size × VAE scale factor).
    pub default_size: (usize, usize),
    /// Set for tiny untrained models, whose images are coloured noise.
    pub note: Option<String>,
}

impl LoadedModel {
    /// Loads the diffusers folder `dir` (or a hub id found in the Hugging Face cache) on `device`.
    pub fn load(dir: &Path, device: &candle_core::Device) -> atelier_engine::Result<Self> {
        let resolved = atelier_engine::model::resolve(&dir.to_string_lossy())?;
        let dir = resolved.as_path();
        let sd = StableDiffusion::load(dir, device)?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        let info = ModelShape::read(dir);
        Ok(Self { sd, name, default_size: (info.size, info.size), note: info.note() })
    }
}

impl Generator for LoadedModel {
    fn generate(
        &self,
        params: &GenerateParams,
        on_step: &mut dyn FnMut(&StepProgress) -> bool,
    ) -> atelier_engine::Result<Generated> {
        self.sd.generate(params, on_step)
    }
    fn model_hash(&self) -> String {
        self.sd.model_hash().to_string()
    }
    fn model_name(&self) -> String {
        self.name.clone()
    }
}

/// Wraps a generator so every step takes at least `min_step`: makes live progress visible
/// with tiny test models (demos, the browser test). `atelier serve --min-step-ms`.
pub struct Throttled<G> {
    pub inner: G,
    pub min_step: std::time::Duration,
}

impl<G: Generator> Generator for Throttled<G> {
    fn generate(
        &self,
        params: &GenerateParams,
        on_step: &mut dyn FnMut(&StepProgress) -> bool,
    ) -> atelier_engine::Result<Generated> {
        let mut last = std::time::Instant::now();
        self.inner.generate(params, &mut |p: &StepProgress| {
            if let Some(rest) = self.min_step.checked_sub(last.elapsed()) {
                std::thread::sleep(rest);
            }
            last = std::time::Instant::now();
            on_step(p)
        })
    }
    fn model_hash(&self) -> String {
        self.inner.model_hash()
    }
    fn model_name(&self) -> String {
        self.inner.model_name()
    }
}

/// The little the UI needs from a model's configs: native size and whether it is a toy.
struct ModelShape {
    size: usize,
    max_channels: Option<u64>,
}

/// Real SD UNets start at 320 channels; anything smaller is a test model.
const TOY_CHANNELS: u64 = 320;

/// Shown in the UI and `/api/model` for tiny untrained models.
pub const NOISE_NOTE: &str = "The built-in model is a tiny untrained test model: its images are \
coloured noise. Start the server with --model pointing at a real Stable Diffusion 1.x/2.x \
diffusers folder (or hub id) for real images.";

impl ModelShape {
    fn read(dir: &Path) -> Self {
        let json = |p: PathBuf| -> Option<serde_json::Value> {
            serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
        };
        let unet = json(dir.join("unet/config.json"));
        let vae = json(dir.join("vae/config.json"));
        let sample = unet.as_ref().and_then(|u| u["sample_size"].as_u64());
        let vae_blocks = vae.as_ref().and_then(|v| v["block_out_channels"].as_array().map(|a| a.len()));
        let size = match (sample, vae_blocks) {
            (Some(s), Some(n)) if n > 0 => (s as usize) << (n - 1),
            _ => vae.as_ref().and_then(|v| v["sample_size"].as_u64()).map_or(512, |s| s as usize),
        };
        let max_channels = unet
            .as_ref()
            .and_then(|u| u["block_out_channels"].as_array().and_then(|a| a.iter().filter_map(|c| c.as_u64()).max()));
        Self { size, max_channels }
    }

    fn note(&self) -> Option<String> {
        match self.max_channels {
            Some(c) if c < TOY_CHANNELS => Some(NOISE_NOTE.into()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_model_is_64px_and_flagged_as_noise() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/sd-tiny");
        let shape = ModelShape::read(&dir);
        assert_eq!(shape.size, 64);
        assert!(shape.note().is_some());
    }
}
