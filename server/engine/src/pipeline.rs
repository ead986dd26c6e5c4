//! The text-to-image / image-to-image pipeline: tokenizer → text encoder →
//! denoising loop with classifier-free guidance → VAE decode.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::attention::AttentionKind;
use crate::clip::{ClipConfig, ClipTextModel};
use crate::layers::collect_slots;
use crate::lora::{ActiveLora, BoundLora, Component, LoraAdapter, ModelSlots};
use crate::model::{build_from_file, read_config, short_hash, ModelFiles};
use crate::noise::Noise;
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerKind};
use crate::tokenizer::ClipTokenizer;
use crate::unet::{AddedConditioning, MicroConditioning, UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};
use crate::{Error, Result};

/// Everything that determines one generation. Same params + same model + same device ⇒ same images.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub prompt: String,
    /// On a model whose `model_index.json` says `force_zeros_for_empty_prompt` (SDXL
    /// base), an empty negative prompt means zero embeddings, as diffusers does when none
    /// is given; elsewhere the empty text is encoded.
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
    /// LoRA adapters active for this generation (bound to this model with
    /// [`StableDiffusion::bind_lora`]).
    pub loras: Vec<ActiveLora>,
}

/// Steps, guidance, scheduler, batch size and strength from
/// `atelier_blend::defaults::generate`, as the web request (`app::dto::GenerateRequest`).
impl Default for GenerateParams {
    fn default() -> Self {
        use atelier_blend::defaults::generate as d;
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: d::STEPS,
            guidance: d::GUIDANCE,
            seed: 0,
            scheduler: d::SCHEDULER.parse().expect("defaults::generate::SCHEDULER is a scheduler id"),
            width: 64,
            height: 64,
            batch_size: d::BATCH_SIZE,
            init_image: None,
            strength: d::STRENGTH,
            attention: AttentionKind::Original,
            loras: Vec::new(),
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
        // img2img denoises the last ⌊steps · strength⌋ steps of the schedule (diffusers'
        // rule, as in `generate`): none at all is known now, not only inside the job.
        if self.init_image.is_some() && (self.steps as f64 * self.strength) < 1.0 {
            let least = (1.0 / self.strength).ceil();
            return Err(Error::invalid(
                "strength",
                if self.strength > 0.0 {
                    format!("strength {} with {} steps leaves no denoising step (⌊steps × strength⌋ = 0); use at least {least} steps or a strength of at least {}", self.strength, self.steps, 1.0 / self.steps as f64)
                } else {
                    "strength 0 leaves no denoising step: the input image would come back unchanged; raise strength".to_string()
                },
            ));
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
    /// Warnings for the user (for example an extra-network tag removed from the prompt).
    pub warnings: Vec<String>,
    /// (name, short hash) of each LoRA adapter used, for A1111's `Lora hashes`.
    pub adapters: Vec<(String, String)>,
}

/// A prompt's text conditioning, for one prompt (batch 1) or a batch.
#[derive(Debug, Clone)]
pub struct TextConditioning {
    /// (batch, tokens, dim): the UNet's `encoder_hidden_states` (SDXL: both encoders'
    /// penultimate states concatenated on the last axis).
    pub context: Tensor,
    /// (batch, pooled_dim): SDXL's pooled `text_embeds` from the second encoder; `None`
    /// for SD 1.x / 2.x.
    pub pooled: Option<Tensor>,
}

impl TextConditioning {
    /// The same conditioning repeated for a batch of `n`.
    pub fn repeat(&self, n: usize) -> Result<Self> {
        Ok(Self { context: self.context.repeat((n, 1, 1))?, pooled: self.pooled.as_ref().map(|p| p.repeat((n, 1))).transpose()? })
    }

    /// All zeros of the same shapes: SDXL's unconditional input when no negative prompt is
    /// given and the model says `force_zeros_for_empty_prompt` (diffusers).
    pub fn zeros_like(&self) -> Result<Self> {
        Ok(Self { context: self.context.zeros_like()?, pooled: self.pooled.as_ref().map(Tensor::zeros_like).transpose()? })
    }

    fn cat(a: &Self, b: &Self) -> Result<Self> {
        let pooled = match (&a.pooled, &b.pooled) {
            (Some(x), Some(y)) => Some(Tensor::cat(&[x, y], 0)?),
            _ => None,
        };
        Ok(Self { context: Tensor::cat(&[&a.context, &b.context], 0)?, pooled })
    }
}

/// SDXL's second text encoder with its tokenizer.
struct SecondEncoder {
    tokenizer: ClipTokenizer,
    model: ClipTextModel,
}

/// A loaded Stable Diffusion model, ready to generate. `generate` takes `&self`, so one
/// loaded model can serve many jobs in turn (share it behind an `Arc`).
pub struct StableDiffusion {
    files: ModelFiles,
    device: Device,
    dtype: DType,
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel,
    /// SDXL's second text encoder; `None` for SD 1.x / 2.x.
    text_encoder_2: Option<SecondEncoder>,
    /// `model_index.json`'s `force_zeros_for_empty_prompt` (SDXL base: true): without a
    /// negative prompt the unconditional input is zeros instead of the encoded "".
    force_zeros_for_empty_prompt: bool,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    scheduler_config: SchedulerConfig,
    hash: String,
    /// Bytes of the weight files, what the loaded model keeps resident.
    weights_bytes: u64,
    /// The layers adapters attach to.
    slots: ModelSlots,
    /// TAESD decoder for step previews, when its file is beside the model ([`crate::taesd`]).
    preview_decoder: Option<crate::taesd::TinyDecoder>,
    /// Held while a generation runs, since the attached adapters are model state.
    generating: std::sync::Mutex<()>,
}

/// The dtype [`StableDiffusion::load`] computes in on `device`: f32 on the CPU, f16 on GPUs.
pub fn compute_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::F16
    }
}

/// Latent → RGB coefficients for SD-family VAEs, for cheap step previews.
const LATENT_RGB: [[f32; 3]; 4] =
    [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]];

impl StableDiffusion {
    /// Loads a diffusers-layout folder onto `device` in [`compute_dtype`].
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_with_dtype(dir, device, compute_dtype(device))
    }

    /// Loads with an explicit compute dtype.
    pub fn load_with_dtype(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let files = ModelFiles::locate(dir)?;
        let tokenizer = ClipTokenizer::from_dir(&files.tokenizer_dir)?;
        let clip_cfg: ClipConfig = read_config(&files.text_encoder_config)?;
        let (text_encoder, te_slots) =
            collect_slots(|| build_from_file(&files.text_encoder_weights, dtype, device, |vb| ClipTextModel::new(&clip_cfg, vb)));
        let text_encoder = text_encoder?;
        let mut te2_slots = Vec::new();
        let text_encoder_2 = match &files.text_encoder_2 {
            None => None,
            Some(f) => {
                let cfg: ClipConfig = read_config(&f.config)?;
                if !cfg.with_projection() {
                    return Err(Error::Config {
                        path: f.config.clone(),
                        message: "text_encoder_2 is not a CLIPTextModelWithProjection (SDXL's second encoder needs its text_projection)".into(),
                    });
                }
                let (model, slots) = collect_slots(|| build_from_file(&f.weights, dtype, device, |vb| ClipTextModel::new(&cfg, vb)));
                te2_slots = slots;
                Some(SecondEncoder { tokenizer: ClipTokenizer::from_dir(&f.tokenizer_dir)?, model: model? })
            }
        };
        let index: serde_json::Value = read_config(&files.root.join("model_index.json"))?;
        let force_zeros_for_empty_prompt =
            index.get("force_zeros_for_empty_prompt").and_then(serde_json::Value::as_bool).unwrap_or(false);
        let unet_cfg: UNetConfig = read_config(&files.unet_config)?;
        unet_cfg
            .check_supported()
            .map_err(|message| Error::Config { path: files.unet_config.clone(), message })?;
        let (unet, unet_slots) =
            collect_slots(|| build_from_file(&files.unet_weights, dtype, device, |vb| UNet2DConditionModel::new(&unet_cfg, vb)));
        let unet = unet?;
        let vae_cfg: VaeConfig = read_config(&files.vae_config)?;
        // diffusers runs a half-precision pipeline's VAE in f32 unless the config says it
        // need not (`force_upcast`).
        let vae_dtype = if dtype != DType::F32 && vae_cfg.force_upcast { DType::F32 } else { dtype };
        let vae = build_from_file(&files.vae_weights, vae_dtype, device, |vb| AutoencoderKL::new(&vae_cfg, vb))?;
        if vae_cfg.latent_channels != unet_cfg.in_channels {
            return Err(Error::Config {
                path: files.vae_config.clone(),
                message: format!(
                    "VAE latent_channels {} does not match the UNet's in_channels {}",
                    vae_cfg.latent_channels, unet_cfg.in_channels
                ),
            });
        }
        let text_width = clip_cfg.hidden_size + text_encoder_2.as_ref().map_or(0, |t| t.model.hidden_size());
        if text_width != unet_cfg.cross_attention_dim {
            return Err(Error::Config {
                path: files.text_encoder_config.clone(),
                message: format!(
                    "the text encoder{} give{} {text_width}-wide features but the UNet's cross_attention_dim is {}",
                    if text_encoder_2.is_some() { "s (hidden sizes added)" } else { "'s hidden_size" },
                    if text_encoder_2.is_some() { "" } else { "s" },
                    unet_cfg.cross_attention_dim
                ),
            });
        }
        let pooled = text_encoder_2.as_ref().and_then(|t| t.model.projection_dim());
        if pooled != unet_cfg.pooled_text_dim() {
            let show = |d: Option<usize>| d.map_or("none".to_string(), |d| d.to_string());
            return Err(Error::Config {
                path: files.unet_config.clone(),
                message: format!(
                    "the UNet expects pooled text embeddings of width {} (SDXL's added conditioning) but the text encoders give {}: is a text_encoder_2 folder missing or extra?",
                    show(unet_cfg.pooled_text_dim()),
                    show(pooled)
                ),
            });
        }
        let scheduler_config = SchedulerConfig::load(&files.scheduler_config)?;
        let mut slots = ModelSlots::new(vec![
            (Component::TextEncoder, te_slots),
            (Component::TextEncoder2, te2_slots),
            (Component::Unet, unet_slots),
        ]);
        slots.add_ldm_aliases(&unet_cfg);
        // A broken preview decoder must not stop the model: previews fall back to the
        // latent approximation, and the log says why.
        let preview_decoder = match crate::taesd::TinyDecoder::find(&files.root, text_encoder_2.is_some(), device) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("TAESD preview decoder not used: {e}");
                None
            }
        };
        // A folder converted from a single file carries that file's hash (A1111's "Model hash").
        let hash = match crate::single_file::source_of(&files.root) {
            Some((_, h)) => h,
            None => short_hash(&files.unet_weights)?,
        };
        let weights_bytes = crate::memory::weights_bytes(&files, dtype.size_in_bytes() as u64)?;
        Ok(Self {
            files,
            device: device.clone(),
            dtype,
            tokenizer,
            text_encoder,
            text_encoder_2,
            force_zeros_for_empty_prompt,
            unet,
            vae,
            scheduler_config,
            hash,
            weights_bytes,
            slots,
            preview_decoder,
            generating: std::sync::Mutex::new(()),
        })
    }

    /// Checks a LoRA file against this model (refusing it, with the reason, when any of
    /// its modules does not fit) and prepares it on the model's device.
    pub fn bind_lora(&self, adapter: &std::sync::Arc<LoraAdapter>) -> Result<std::sync::Arc<BoundLora>> {
        Ok(std::sync::Arc::new(LoraAdapter::bind(adapter, &self.slots, &self.device, self.dtype)?))
    }

    /// Attaches exactly these adapters to the text encoder and UNet (detaching any
    /// others) for the direct `text_encoder()` / `unet()` calls; [`Self::generate`]
    /// attaches the ones in its params by itself.
    pub fn set_loras(&self, active: &[ActiveLora]) {
        self.slots.attach(active);
    }

    /// The layers adapters can attach to.
    pub fn lora_slots(&self) -> &ModelSlots {
        &self.slots
    }

    /// The folder the model was loaded from.
    pub fn dir(&self) -> &Path {
        &self.files.root
    }

    /// A1111-style short model hash: the first 10 hex digits of the sha256 of the single-file
    /// checkpoint the folder was converted from (what A1111 writes), else of the UNet weights.
    pub fn model_hash(&self) -> &str {
        &self.hash
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype the networks compute in ([`compute_dtype`] unless loaded with another).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    pub fn text_encoder(&self) -> &ClipTextModel {
        &self.text_encoder
    }

    /// SDXL's second text encoder and its tokenizer.
    pub fn text_encoder_2(&self) -> Option<(&ClipTokenizer, &ClipTextModel)> {
        self.text_encoder_2.as_ref().map(|t| (&t.tokenizer, &t.model))
    }

    /// Whether this is an SDXL-architecture model (two text encoders, added conditioning).
    pub fn is_sdxl(&self) -> bool {
        self.text_encoder_2.is_some()
    }

    /// Whether an empty negative prompt means zero embeddings (`force_zeros_for_empty_prompt`).
    pub fn zeros_for_empty_negative(&self) -> bool {
        self.force_zeros_for_empty_prompt
    }

    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.unet
    }

    pub fn vae(&self) -> &AutoencoderKL {
        &self.vae
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// Uses `decoder` (or, with `None`, the latent approximation) for step previews.
    pub fn set_preview_decoder(&mut self, decoder: Option<crate::taesd::TinyDecoder>) {
        self.preview_decoder = decoder;
    }

    /// The TAESD decoder previews use, if any.
    pub fn preview_decoder(&self) -> Option<&crate::taesd::TinyDecoder> {
        self.preview_decoder.as_ref()
    }

    /// A step preview of the first latent of a batch: TAESD's decoding when a decoder is
    /// loaded, else [`latent_preview`] (one pixel per latent cell).
    pub fn preview(&self, latents: &Tensor) -> Result<RgbImage> {
        match &self.preview_decoder {
            Some(d) => d.preview(latents),
            None => latent_preview(latents),
        }
    }

    /// Pixels per latent cell (8 for SD, 2 for the tiny test model).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().scale_factor()
    }

    /// The image size the UNet was trained for, in pixels.
    pub fn default_size(&self) -> usize {
        self.unet.config().sample_size.unwrap_or(64) * self.vae_scale_factor()
    }

    /// Tokenizes and encodes one prompt as diffusers does (truncated to one 77-token
    /// window): context (1, 77, dim), plus SDXL's pooled embeds; warns when it was truncated.
    pub fn encode_prompt(&self, prompt: &str, attn: AttentionKind, warnings: &mut Vec<String>) -> Result<TextConditioning> {
        let enc = self.tokenizer.encode(prompt);
        if enc.truncated {
            let max = self.tokenizer.max_len();
            warnings.push(format!(
                "prompt is {} tokens long; only the first {} are used (the text after \"{}\" was cut)",
                enc.untruncated_length.saturating_sub(2),
                max - 2,
                self.tokenizer.decode(&enc.ids[enc.length.saturating_sub(4)..enc.length.saturating_sub(1)]).trim()
            ));
        }
        let ids = Tensor::new(enc.ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let Some(second) = &self.text_encoder_2 else {
            return Ok(TextConditioning { context: self.text_encoder.forward(&ids, attn)?.last_hidden_state, pooled: None });
        };
        let ids2 = Tensor::new(second.tokenizer.encode(prompt).ids.as_slice(), &self.device)?.unsqueeze(0)?;
        self.encode_sdxl_ids(&ids, &ids2, attn)
    }

    /// SDXL: both encoders' penultimate states concatenated, and the second encoder's
    /// projected pooled output (diffusers `StableDiffusionXLPipeline.encode_prompt`).
    fn encode_sdxl_ids(&self, ids: &Tensor, ids2: &Tensor, attn: AttentionKind) -> Result<TextConditioning> {
        let second = self.text_encoder_2.as_ref().ok_or_else(|| Error::invalid("model", "not an SDXL model"))?;
        let a = self.text_encoder.forward_penultimate(ids, false, attn)?.penultimate;
        let b = second.model.forward_penultimate(ids2, true, attn)?;
        Ok(TextConditioning { context: Tensor::cat(&[&a, &b.penultimate], 2)?, pooled: b.text_embeds })
    }

    /// Encodes a prompt written in A1111's syntax to (1, 77·chunks, dim), as A1111's
    /// `sd_hijack_clip` does: extra-network tags are removed (LoRA tags are resolved by
    /// the caller into [`GenerateParams::loras`]; any tag left is reported in `warnings`),
    /// attention weights (`(word:1.2)`, `[word]`, see [`crate::prompt::parse_attention`])
    /// apply per token, `BREAK` starts a new chunk, and the tokens are split into chunks
    /// of 75 ([`crate::prompt::chunk_tokens`]), each encoded with its start/end tokens and
    /// padding to 77, its vectors multiplied by their weights and rescaled to the chunk's
    /// unweighted mean; the chunks' hidden states are concatenated along the token axis.
    /// A prompt of one chunk without weights encodes exactly as [`Self::encode_prompt`].
    /// A prompt as A1111 chunks it (extra-network tags removed, attention weights per
    /// token, 75-token chunks, `BREAK`), with the warnings about what was removed.
    fn chunked_prompt(&self, prompt: &str) -> Result<(Vec<crate::prompt::TokenChunk>, Vec<String>)> {
        self.chunked_prompt_with(&self.tokenizer, prompt)
    }

    fn chunked_prompt_with(&self, tok: &ClipTokenizer, prompt: &str) -> Result<(Vec<crate::prompt::TokenChunk>, Vec<String>)> {
        use crate::prompt::{chunk_tokens, parse_extra_networks, parse_segments, Segment, TokenRun};
        let parsed = parse_extra_networks(prompt)?;
        let mut warnings = parsed.warnings();
        if !parsed.loras.is_empty() {
            let names: Vec<String> = parsed.loras.iter().map(|t| format!("<lora:{}>", t.name)).collect();
            warnings.push(format!("{} removed from the text and not applied here (LoRA tags are resolved by the caller)", names.join(", ")));
        }
        let runs: Vec<TokenRun> = parse_segments(&parsed.text)
            .into_iter()
            .map(|s| match s {
                Segment::Text(text, w) => TokenRun::Ids(tok.encode_unpadded(&text), w),
                Segment::Break => TokenRun::Break,
            })
            .collect();
        Ok((chunk_tokens(&runs, tok.max_len().saturating_sub(2), tok.token_to_id(",</w>")), warnings))
    }

    ///
    /// SDXL: each text encoder reads the prompt through its own tokenizer, chunks and
    /// weights it alone (as A1111's two SDXL embedders do), the chunks' penultimate states
    /// are concatenated on the feature axis (the encoder with fewer chunks gets empty-prompt
    /// chunks), and the pooled embeds are those of the first chunk.
    pub fn encode_weighted_prompt(&self, prompt: &str, attn: AttentionKind, warnings: &mut Vec<String>) -> Result<TextConditioning> {
        let (chunks, notes) = self.chunked_prompt(prompt)?;
        warnings.extend(notes);
        let Some(second) = &self.text_encoder_2 else {
            let encoded = self.encode_chunks(&self.tokenizer, &chunks, &mut |ids, _| Ok((self.text_encoder.forward(ids, attn)?.last_hidden_state, None)))?;
            let parts: Vec<Tensor> = encoded.into_iter().map(|(z, _)| z).collect();
            return Ok(TextConditioning { context: Tensor::cat(&parts, 1)?, pooled: None });
        };
        let (chunks2, _) = self.chunked_prompt_with(&second.tokenizer, prompt)?;
        let n = chunks.len().max(chunks2.len());
        let pad = |mut c: Vec<crate::prompt::TokenChunk>| {
            c.resize(n, crate::prompt::TokenChunk { ids: Vec::new(), weights: Vec::new() });
            c
        };
        let (chunks, chunks2) = (pad(chunks), pad(chunks2));
        let first = self.encode_chunks(&self.tokenizer, &chunks, &mut |ids, _| {
            Ok((self.text_encoder.forward_penultimate(ids, false, attn)?.penultimate, None))
        })?;
        let second_out = self.encode_chunks(&second.tokenizer, &chunks2, &mut |ids, i| {
            let o = second.model.forward_penultimate(ids, i == 0, attn)?;
            Ok((o.penultimate, o.text_embeds))
        })?;
        let mut parts = Vec::with_capacity(n);
        let mut pooled = None;
        for ((a, _), (b, p)) in first.into_iter().zip(second_out) {
            parts.push(Tensor::cat(&[&a, &b], 2)?);
            pooled = pooled.or(p);
        }
        Ok(TextConditioning { context: Tensor::cat(&parts, 1)?, pooled })
    }

    /// Encodes each chunk with `encode` (ids (1, 77), chunk index → hidden states and an
    /// optional pooled output), then applies the chunk's attention weights with A1111's
    /// mean restoration: `z·w · mean(z) / mean(z·w)`.
    fn encode_chunks(
        &self,
        tok: &ClipTokenizer,
        chunks: &[crate::prompt::TokenChunk],
        encode: &mut dyn FnMut(&Tensor, usize) -> Result<(Tensor, Option<Tensor>)>,
    ) -> Result<Vec<(Tensor, Option<Tensor>)>> {
        let max = tok.max_len();
        let mut encoded = Vec::with_capacity(chunks.len());
        for (i, chunk) in chunks.iter().enumerate() {
            let mut ids = Vec::with_capacity(max);
            ids.push(tok.bos_id());
            ids.extend_from_slice(&chunk.ids);
            ids.push(tok.eos_id());
            ids.resize(max, tok.pad_id());
            let ids = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
            let (z, pooled) = encode(&ids, i)?;
            if chunk.weights.iter().all(|w| *w == 1.0) {
                encoded.push((z, pooled));
                continue;
            }
            let mut weights = vec![1f32];
            weights.extend(chunk.weights.iter().map(|w| *w as f32));
            weights.resize(max, 1.0);
            let w = Tensor::from_vec(weights, (1, max, 1), &self.device)?.to_dtype(z.dtype())?;
            let before = z.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()?;
            let weighted = z.broadcast_mul(&w)?;
            let after = weighted.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()?;
            let z = if after == 0.0 || !after.is_finite() { weighted } else { (weighted * (before / after) as f64)? };
            encoded.push((z, pooled));
        }
        Ok(encoded)
    }

    /// Pads the shorter of a prompt's and a negative prompt's encodings (from
    /// [`Self::encode_weighted_prompt`]) with encodings of the empty prompt until both
    /// have the same number of 77-token chunks, as A1111 does (`pad_cond` with
    /// `cond_stage_model_empty_prompt`), so the two can share one UNet batch.
    /// The pooled embeds are left as they are.
    pub fn pad_to_same_chunks(
        &self,
        cond: TextConditioning,
        uncond: TextConditioning,
        attn: AttentionKind,
    ) -> Result<(TextConditioning, TextConditioning)> {
        let (c, u) = (cond.context.dim(1)?, uncond.context.dim(1)?);
        if c == u {
            return Ok((cond, uncond));
        }
        let empty = self.encode_weighted_prompt("", attn, &mut Vec::new())?.context;
        let chunk = empty.dim(1)?;
        let pad = |t: TextConditioning, n: usize| -> Result<TextConditioning> {
            let mut parts = vec![t.context];
            parts.extend(std::iter::repeat_n(empty.clone(), n / chunk));
            Ok(TextConditioning { context: Tensor::cat(&parts, 1)?, pooled: t.pooled })
        };
        Ok(if c < u { (pad(cond, u - c)?, uncond) } else { (cond, pad(uncond, c - u)?) })
    }

    /// The denoising loop from step `start` of `scheduler`. `cond` / `uncond` hold
    /// (batch, tokens, dim) contexts; with `uncond` the UNet sees `cat([uncond, cond])` and
    /// the prediction is guided as `u + g·(c − u)`, exactly as diffusers does. SDXL models
    /// also get the pooled embeds and `micro`'s time ids (the same for both halves).
    #[allow(clippy::too_many_arguments)]
    pub fn denoise(
        &self,
        mut latents: Tensor,
        cond: &TextConditioning,
        uncond: Option<&TextConditioning>,
        micro: &MicroConditioning,
        guidance: f64,
        scheduler: &mut dyn Scheduler,
        start: usize,
        noise: &mut Noise,
        attn: AttentionKind,
        on_step: &mut dyn FnMut(usize, &Tensor) -> bool,
    ) -> Result<Tensor> {
        let conditioning = match uncond {
            Some(u) => TextConditioning::cat(u, cond)?,
            None => cond.clone(),
        };
        let rows = conditioning.context.dim(0)?;
        let added = if self.unet.needs_added_conditioning() {
            let text_embeds = conditioning
                .pooled
                .clone()
                .ok_or_else(|| Error::invalid("prompt", "an SDXL UNet needs the pooled text embeddings"))?;
            let ids = Tensor::new(&micro.time_ids(), &self.device)?.unsqueeze(0)?.repeat((rows, 1))?;
            Some(AddedConditioning { text_embeds, time_ids: ids })
        } else {
            None
        };
        let context = conditioning.context;
        let timesteps = scheduler.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate().skip(start) {
            let input = match uncond {
                Some(_) => Tensor::cat(&[&latents, &latents], 0)?,
                None => latents.clone(),
            };
            let input = scheduler.scale_model_input(&input, i)?;
            let t = Tensor::full(t as f32, input.dim(0)?, &self.device)?;
            let pred = self.unet.forward_added(&input, &t, &context, added.as_ref(), attn)?;
            let pred = match uncond {
                Some(_) => {
                    let b = latents.dim(0)?;
                    let (u, c) = (pred.narrow(0, 0, b)?, pred.narrow(0, b, b)?);
                    (&u + ((c - &u)? * guidance)?)?
                }
                None => pred,
            };
            latents = scheduler.step(&pred, i, &latents, noise)?;
            if !on_step(i, &latents) {
                return Err(Error::Cancelled);
            }
        }
        Ok(latents)
    }

    /// Decodes latents (as the denoiser leaves them) to images in roughly [-1, 1].
    pub fn decode(&self, latents: &Tensor, attn: AttentionKind) -> Result<Tensor> {
        let cfg = self.vae.config();
        let mut z = (latents.to_dtype(self.vae.dtype())? / cfg.scaling_factor)?;
        if let Some(shift) = cfg.shift_factor {
            z = (z + shift)?;
        }
        Ok(self.vae.decode(&z, attn)?)
    }

    /// Runs the pipeline. `on_step` is called after each denoising step; returning
    /// `false` cancels the run with [`Error::Cancelled`].
    /// Upper bound of the memory the loaded weights take, in bytes (twice the weight
    /// files on the CPU, where fp16 files are widened to f32).
    pub fn weights_bytes(&self) -> u64 {
        self.weights_bytes
    }

    /// Checks that `params` fits in `available` bytes of working memory (see
    /// [`crate::memory::admit_generation`]): the attention to use, or an
    /// [`Error::OutOfMemory`] that says what would fit.
    pub fn admit(&self, params: &GenerateParams, available: u64) -> Result<crate::memory::Admission> {
        let f = self.vae_scale_factor();
        if params.width % f != 0 || params.height % f != 0 {
            return Err(Error::invalid("size", format!("width and height must be multiples of {f} for this model")));
        }
        let chunks = |p: &str| self.chunked_prompt(p).map(|(c, _)| c.len().max(1));
        let cfg = params.guidance > 1.0;
        let context = chunks(&params.prompt)?.max(if cfg { chunks(&params.negative_prompt)? } else { 1 });
        let shape = crate::memory::GenerationShape {
            width: params.width,
            height: params.height,
            batch: params.batch_size,
            cfg,
            img2img: params.init_image.is_some(),
            attention: params.attention,
            context_tokens: context * self.tokenizer.max_len(),
        };
        crate::memory::admit_generation(self.unet.config(), self.vae.config(), self.dtype.size_in_bytes() as u64, &shape, available)
    }

    pub fn generate(
        &self,
        params: &GenerateParams,
        on_step: &mut dyn FnMut(&StepProgress) -> bool,
    ) -> Result<Generated> {
        params.validate()?;
        let f = self.vae_scale_factor();
        if params.width % f != 0 || params.height % f != 0 {
            return Err(Error::invalid("size", format!("width and height must be multiples of {f} for this model")));
        }
        let _running = self.generating.lock().unwrap_or_else(|e| e.into_inner());
        self.slots.attach(&params.loras);
        let result = self.generate_attached(params, on_step);
        self.slots.attach(&[]);
        result
    }

    fn generate_attached(
        &self,
        params: &GenerateParams,
        on_step: &mut dyn FnMut(&StepProgress) -> bool,
    ) -> Result<Generated> {
        let attn = params.attention;
        let f = self.vae_scale_factor();
        let mut warnings = Vec::new();
        let cond1 = self.encode_weighted_prompt(&params.prompt, attn, &mut warnings)?;
        let use_cfg = params.guidance > 1.0;
        let (cond1, uncond1) = if !use_cfg {
            (cond1, None)
        } else if params.negative_prompt.trim().is_empty() && self.force_zeros_for_empty_prompt {
            let zeros = cond1.zeros_like()?;
            (cond1, Some(zeros))
        } else {
            let u = self.encode_weighted_prompt(&params.negative_prompt, attn, &mut warnings)?;
            self.pad_to_same_chunks(cond1, u, attn).map(|(c, u)| (c, Some(u)))?
        };
        for w in params.loras.iter().flat_map(|a| &a.lora.adapter.warnings) {
            if !warnings.contains(w) {
                warnings.push(w.clone());
            }
        }
        let n = params.batch_size;
        let cond = cond1.repeat(n)?;
        let uncond = uncond1.as_ref().map(|u| u.repeat(n)).transpose()?;

        let mut scheduler = crate::scheduler::build(params.scheduler, &self.scheduler_config, params.steps)?;
        let (h, w) = (params.height / f, params.width / f);
        let ch = self.unet.config().in_channels;
        // Image k of a batch uses seed + k, so it can be reproduced alone.
        let init_noise = (0..n)
            .map(|k| Noise::new(params.seed.wrapping_add(k as u64)).randn(&[1, ch, h, w], &self.device))
            .collect::<Result<Vec<_>>>()?;
        let init_noise = Tensor::cat(&init_noise, 0)?.to_dtype(self.dtype)?;
        let mut noise = Noise::new(params.seed ^ 0x5eed_5eed_5eed_5eed);

        let (latents, start) = match &params.init_image {
            None => ((init_noise * scheduler.init_noise_sigma())?, 0),
            Some(img) => {
                let steps = scheduler.timesteps().len();
                let init_steps = ((steps as f64 * params.strength) as usize).min(steps);
                if init_steps == 0 {
                    return Err(Error::invalid(
                        "strength",
                        format!("strength {} with {} steps leaves no denoising step; raise strength or steps", params.strength, params.steps),
                    ));
                }
                let start = steps - init_steps;
                let pixels = image_to_tensor(img, params.width, params.height, &self.device)?.to_dtype(self.vae.dtype())?;
                let dist = self.vae.encode(&pixels, attn)?;
                let sample_noise = noise.randn(dist.mean.dims(), &self.device)?.to_dtype(self.vae.dtype())?;
                let mut x0 = dist.sample(&sample_noise)?;
                if let Some(shift) = self.vae.config().shift_factor {
                    x0 = (x0 - shift)?;
                }
                let x0 = (x0 * self.vae.config().scaling_factor)?.to_dtype(self.dtype)?.repeat((n, 1, 1, 1))?;
                (scheduler.add_noise(&x0, &init_noise, start)?, start)
            }
        };

        let total = scheduler.timesteps().len() - start;
        let mut cb = |i: usize, x: &Tensor| -> bool {
            let preview = self.preview(x).ok();
            on_step(&StepProgress { step: i + 1 - start, total, preview })
        };
        let micro = MicroConditioning::for_size(params.height, params.width);
        let latents =
            self.denoise(latents, &cond, uncond.as_ref(), &micro, params.guidance, scheduler.as_mut(), start, &mut noise, attn, &mut cb)?;
        let decoded = self.decode(&latents, attn)?;
        let images = tensor_to_images(&decoded)?;
        let adapters = params.loras.iter().map(|l| (l.lora.adapter.name.clone(), l.lora.adapter.hash.clone())).collect();
        Ok(Generated { images, warnings, adapters })
    }
}

/// Converts decoder output in [-1, 1] to 8-bit images as diffusers does:
/// `round(clamp(x/2 + 0.5, 0, 1) · 255)`.
pub fn tensor_to_images(decoded: &Tensor) -> Result<Vec<RgbImage>> {
    let x = ((decoded.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let x = (x * 255.0)?.round()?.to_dtype(DType::U8)?.permute((0, 2, 3, 1))?.to_device(&Device::Cpu)?;
    let (b, h, w, _) = x.dims4()?;
    (0..b)
        .map(|i| {
            let data = x.get(i)?.flatten_all()?.to_vec1::<u8>()?;
            RgbImage::from_raw(w as u32, h as u32, data).ok_or_else(|| Error::Image("bad decoded size".into()))
        })
        .collect()
}

/// Resizes an image to width×height and maps it to a (1, 3, H, W) tensor in [-1, 1].
pub fn image_to_tensor(img: &RgbImage, width: usize, height: usize, device: &Device) -> Result<Tensor> {
    let img = if img.width() as usize != width || img.height() as usize != height {
        image::imageops::resize(img, width as u32, height as u32, image::imageops::FilterType::Lanczos3)
    } else {
        img.clone()
    };
    let t = Tensor::from_vec(img.into_raw(), (height, width, 3), &Device::Cpu)?
        .permute((2, 0, 1))?
        .to_dtype(DType::F32)?;
    Ok(((t / 127.5)? - 1.0)?.unsqueeze(0)?.to_device(device)?)
}

/// A cheap preview of the first latent of a batch: a fixed linear map of the latent
/// channels to RGB (SD-family VAEs), one pixel per latent cell.
pub fn latent_preview(latents: &Tensor) -> Result<RgbImage> {
    let x = latents.get(0)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let (c, h, w) = x.dims3()?;
    let coeffs: Vec<f32> = (0..c).flat_map(|i| LATENT_RGB[i % 4]).collect();
    let m = Tensor::from_vec(coeffs, (c, 3), &Device::Cpu)?;
    let rgb = x.reshape((c, h * w))?.t()?.matmul(&m)?; // (hw, 3)
    let rgb = ((rgb + 1.0)? * 127.5)?.clamp(0f32, 255f32)?.to_dtype(DType::U8)?;
    RgbImage::from_raw(w as u32, h as u32, rgb.flatten_all()?.to_vec1::<u8>()?)
        .ok_or_else(|| Error::Image("bad preview size".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_default_scheduler_is_an_engine_id() {
        assert_eq!(GenerateParams::default().scheduler.id(), atelier_blend::defaults::generate::SCHEDULER);
    }
}
