//! The [`Generator`] seam between the job queue and the engine: the real model in production,
//! a fast fake in tests.

use std::path::Path;

use atelier_engine::memory::MemoryBudget;
use atelier_engine::pipeline::{GenerateParams, Generated, StableDiffusion, StepProgress};

/// What admission decided for one generation, beyond the (possibly adjusted) params.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Admitted {
    /// Told to the user with the result (e.g. attention switched to fit the memory).
    pub notes: Vec<String>,
    /// The working memory the job may use: the engine's largest buffers check it
    /// ([`atelier_engine::memory::with_limit`]).
    pub limit: Option<u64>,
}

/// Something that turns parameters into images, reporting each step. Blocking and CPU/GPU
/// heavy: only the job queue's worker thread calls [`Generator::generate`].
pub trait Generator: Send + Sync {
    /// Runs one generation; `on_step` returning `false` cancels it.
    fn generate(
        &self,
        params: &GenerateParams,
        on_step: &mut dyn FnMut(&StepProgress) -> bool,
    ) -> atelier_engine::Result<Generated>;
    /// Checks, before a generation is queued, everything that can be known without running
    /// it: `<lora:…>` tags name styles that exist and fit, and the memory it needs fits
    /// `budget` (switching `params.attention` to split-einsum when only that fits).
    fn admit(&self, params: &mut GenerateParams, budget: &MemoryBudget) -> atelier_engine::Result<Admitted> {
        let _ = (params, budget);
        Ok(Admitted::default())
    }
    /// A1111-style short hash of the weights, written into PNG metadata.
    fn model_hash(&self) -> String;
    /// A human-readable model name (the folder name).
    fn model_name(&self) -> String;
    /// Mean Gram matrices of the VAE encoder's activations over `images`
    /// ([`atelier_engine::style::metrics::mean_grams`]), for style similarity.
    fn encoder_grams(&self, _images: &[image::RgbImage]) -> atelier_engine::Result<Vec<candle_core::Tensor>> {
        Err(atelier_engine::Error::invalid("style", "this generator cannot measure style similarity"))
    }
    /// The loaded model itself, where there is one (blend bakes read its layer shapes).
    fn pipeline(&self) -> Option<&StableDiffusion> {
        None
    }
    /// Where the model computes, as the studio shows it: (device, dtype), e.g. ("cpu", "f32").
    fn compute(&self) -> (String, String) {
        match self.pipeline() {
            Some(sd) => (atelier_engine::device::name(sd.device()), sd.dtype().as_str().to_string()),
            None => ("cpu".into(), "f32".into()),
        }
    }
}

impl Generator for StableDiffusion {
    fn generate(
        &self,
        params: &GenerateParams,
        on_step: &mut dyn FnMut(&StepProgress) -> bool,
    ) -> atelier_engine::Result<Generated> {
        StableDiffusion::generate(self, params, on_step)
    }
    fn admit(&self, params: &mut GenerateParams, budget: &MemoryBudget) -> atelier_engine::Result<Admitted> {
        admit_on(self, params, budget)
    }
    fn model_hash(&self) -> String {
        StableDiffusion::model_hash(self).to_string()
    }
    fn model_name(&self) -> String {
        "stable-diffusion".into()
    }
    fn encoder_grams(&self, images: &[image::RgbImage]) -> atelier_engine::Result<Vec<candle_core::Tensor>> {
        atelier_engine::style::metrics::mean_grams(self.vae(), images)
    }
    fn pipeline(&self) -> Option<&StableDiffusion> {
        Some(self)
    }
}

/// Memory admission of `params` on `sd` (see [`Generator::admit`]).
fn admit_on(sd: &StableDiffusion, params: &mut GenerateParams, budget: &MemoryBudget) -> atelier_engine::Result<Admitted> {
    let available = budget.available(sd.weights_bytes());
    let admission = sd.admit(params, available)?;
    params.attention = admission.attention;
    Ok(Admitted { notes: admission.note.into_iter().collect(), limit: Some(available) })
}

/// A model loaded from a folder, with what the UI needs to know about it.
pub struct LoadedModel {
    sd: StableDiffusion,
    name: String,
    /// Native image size (UNet sample size × VAE scale factor).
    pub default_size: (usize, usize),
    /// What the UI tells people about the model (see [`model_note`]).
    pub note: Option<String>,
    /// Where `<lora:NAME:WEIGHT>` tags in prompts are looked up.
    styles: Option<crate::styles::StyleLibrary>,
    /// Adapters already checked against this model, by file (and its modification time).
    bound: std::sync::Mutex<BoundCache>,
}

type BoundCache = std::collections::HashMap<(std::path::PathBuf, Option<std::time::SystemTime>), std::sync::Arc<atelier_engine::lora::BoundLora>>;

impl LoadedModel {
    /// Loads the diffusers folder `dir` (or a hub id found in the Hugging Face cache) on `device`.
    pub fn load(dir: &Path, device: &candle_core::Device) -> atelier_engine::Result<Self> {
        let resolved = atelier_engine::model::resolve(&dir.to_string_lossy())?;
        let dir = resolved.as_path();
        let sd = StableDiffusion::load(dir, device)?;
        let name = atelier_engine::single_file::source_of(dir).map(|(name, _)| name).unwrap_or_else(|| {
            dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| dir.display().to_string())
        });
        let note = model_note(dir, &sd);
        let size = sd.default_size();
        Ok(Self { sd, name, default_size: (size, size), note, styles: None, bound: Default::default() })
    }

    /// Resolves `<lora:NAME:WEIGHT>` tags in prompts against `library`.
    pub fn with_styles(mut self, library: crate::styles::StyleLibrary) -> Self {
        self.styles = Some(library);
        self
    }

    /// The adapter file bound to this model (cached).
    fn bind(&self, file: &Path) -> atelier_engine::Result<std::sync::Arc<atelier_engine::lora::BoundLora>> {
        let key = (file.to_path_buf(), std::fs::metadata(file).and_then(|m| m.modified()).ok());
        let mut cache = self.bound.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = cache.get(&key) {
            return Ok(b.clone());
        }
        let adapter = std::sync::Arc::new(atelier_engine::lora::LoraAdapter::load(file)?);
        let bound = self.sd.bind_lora(&adapter)?;
        cache.insert(key, bound.clone());
        Ok(bound)
    }

    /// Moves the prompt's `<lora:…>` tags into `params.loras` (the tags stay in the
    /// prompt that is stored; the text encoder sees the prompt without them).
    fn with_tagged_loras(&self, params: &GenerateParams) -> atelier_engine::Result<Option<GenerateParams>> {
        let (text, tags) = atelier_engine::prompt::extract_lora_tags(&params.prompt)?;
        if tags.is_empty() {
            return Ok(None);
        }
        let Some(library) = &self.styles else {
            return Err(atelier_engine::Error::invalid("prompt", "<lora:…> tags need a style library"));
        };
        let mut out = params.clone();
        out.prompt = text;
        for tag in tags {
            let entry = library.resolve(&tag.name).map_err(|m| atelier_engine::Error::invalid("prompt", m))?;
            let blocks = tag.blocks.map_or_else(Default::default, |[down, mid, up]| atelier_engine::lora::BlockWeights { down, mid, up });
            out.loras.push(atelier_engine::lora::ActiveLora { lora: self.bind(&entry.adapter())?, weight: tag.weight, blocks });
        }
        Ok(Some(out))
    }
}

impl Generator for LoadedModel {
    fn generate(
        &self,
        params: &GenerateParams,
        on_step: &mut dyn FnMut(&StepProgress) -> bool,
    ) -> atelier_engine::Result<Generated> {
        match self.with_tagged_loras(params)? {
            Some(p) => self.sd.generate(&p, on_step),
            None => self.sd.generate(params, on_step),
        }
    }
    fn admit(&self, params: &mut GenerateParams, budget: &MemoryBudget) -> atelier_engine::Result<Admitted> {
        // Unknown or unfitting `<lora:…>` styles are refused now, not inside the job.
        self.with_tagged_loras(params)?;
        admit_on(&self.sd, params, budget)
    }
    fn model_hash(&self) -> String {
        self.sd.model_hash().to_string()
    }
    fn model_name(&self) -> String {
        self.name.clone()
    }
    fn encoder_grams(&self, images: &[image::RgbImage]) -> atelier_engine::Result<Vec<candle_core::Tensor>> {
        atelier_engine::style::metrics::mean_grams(self.sd.vae(), images)
    }
    fn pipeline(&self) -> Option<&StableDiffusion> {
        Some(&self.sd)
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
    fn admit(&self, params: &mut GenerateParams, budget: &MemoryBudget) -> atelier_engine::Result<Admitted> {
        self.inner.admit(params, budget)
    }
    fn model_hash(&self) -> String {
        self.inner.model_hash()
    }
    fn pipeline(&self) -> Option<&StableDiffusion> {
        self.inner.pipeline()
    }
    fn model_name(&self) -> String {
        self.inner.model_name()
    }
    fn encoder_grams(&self, images: &[image::RgbImage]) -> atelier_engine::Result<Vec<candle_core::Tensor>> {
        self.inner.encoder_grams(images)
    }
}

/// Real SD UNets start at 320 channels; anything smaller is a test model.
const TOY_CHANNELS: u64 = 320;

/// Shown in the UI and `/api/model` for tiny models without a model card.
pub const NOISE_NOTE: &str = "This is a tiny untrained test model: its images are coloured noise. \
Start the server with --model pointing at a real Stable Diffusion 1.x, 2.x or SDXL model (a \
diffusers folder, a hub id or a single-file .safetensors checkpoint) for real images.";

/// What the UI says about a model: the `note` of its `atelier.json` card (the starter
/// model has one), a warning for tiny models without one, nothing for real SD models.
fn model_note(dir: &Path, sd: &StableDiffusion) -> Option<String> {
    let card = std::fs::read_to_string(dir.join("atelier.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    if let Some(note) = card.as_ref().and_then(|c| c["note"].as_str()) {
        return Some(note.to_string());
    }
    let max_channels = sd.unet().config().block_out_channels.iter().copied().max().unwrap_or(0) as u64;
    (max_channels < TOY_CHANNELS).then(|| NOISE_NOTE.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_model_is_64px_and_describes_its_world() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/starter");
        let m = LoadedModel::load(&dir, &candle_core::Device::Cpu).expect("built-in model loads");
        assert_eq!(m.default_size, (64, 64));
        assert!(m.note.as_deref().is_some_and(|n| n.contains("a red circle on a blue background")));
    }

    #[test]
    fn tiny_models_without_a_card_are_flagged_as_noise() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/sd-tiny/pipeline");
        let m = LoadedModel::load(&dir, &candle_core::Device::Cpu).expect("fixture loads");
        assert_eq!(m.note.as_deref(), Some(NOISE_NOTE));
    }
}
