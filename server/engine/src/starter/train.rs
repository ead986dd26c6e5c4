//! Training the starter model from scratch, in two stages:
//!
//! 1. **VAE**: the autoencoder learns to reconstruct shape images (L1 loss plus a
//!    small KL term). Its latent scaling factor is then measured as 1/std of the
//!    latents, as SD's 0.18215 was.
//! 2. **Diffusion**: the text encoder and the UNet learn together to predict the noise
//!    added to VAE latents (ε-prediction on SD's scaled-linear schedule, min-SNR
//!    weighting), with captions dropped for classifier-free guidance.
//!
//! Both stages use [`AdamW`] with warm-up and cosine decay, clip gradients, write
//! checkpoints every `checkpoint_every` steps under `OUT/checkpoints/` and resume from
//! the newest one exactly: every batch, noise draw and caption choice is a pure
//! function of the seed and the step number. The diffusion stage keeps an [`Ema`] of
//! the weights, which is what gets saved. The finished folder has the diffusers
//! layout plus `training/` (config, loss CSVs and plots).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::attention::AttentionKind;
use crate::clip::ClipTextModel;
use crate::layers::enable_grad;
use crate::model::{load_safetensors, save_safetensors_atomic};
use crate::noise::Noise;
use crate::starter::model::{self, IMAGE_SIZE};
use crate::starter::shapes::{Scene, World};
use crate::tokenizer::ClipTokenizer;
use crate::train::curves::CsvLog;
use crate::train::diffusion::{alphas_cumprod, detached, weighted_loss, Objective};
use crate::train::plot::plot_png;
use crate::train::{checkpoint, seeded_var_builder, AdamW, Ema, OptimConfig};
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKL;
use crate::{Error, Result};

/// Everything that decides the trained weights; saved as `training/config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainBaseConfig {
    /// Seeds the data stream, the initial weights and every noise draw.
    pub seed: u64,
    /// Autoencoder steps and images per step.
    pub vae_steps: u64,
    pub vae_batch: usize,
    pub vae_optim: OptimConfig,
    /// Weight of the KL term (per latent element) against the L1 reconstruction loss.
    pub vae_kl_weight: f64,
    /// Weight of the edge term: L1 between the horizontal and vertical pixel differences
    /// of the reconstruction and of the input. Plain L1 lets a small decoder smear edges
    /// (every image, sharp or `blurry`, comes out equally soft); this term makes it keep
    /// them, so sharpness survives the autoencoder and a negative prompt can steer it.
    #[serde(default)]
    pub vae_edge_weight: f64,
    /// Weight of the detail term: L1 between the local RMS of the Laplacian (per 8×8
    /// patch and channel) of the reconstruction and of the input. It asks the decoder to
    /// reproduce how much fine detail each region has — crisp edges where the input has
    /// them, grain where it is `noisy`, none where it is `blurry` — which pixel losses
    /// alone average away.
    #[serde(default)]
    pub vae_detail_weight: f64,
    /// Train only the VAE decoder (with `init_from` and `retrain_vae`): the encoder, and
    /// so the latent space the UNet was trained on, stays exactly as it was.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vae_decoder_only: bool,
    /// Diffusion steps and latents per step.
    pub steps: u64,
    pub batch: usize,
    pub optim: OptimConfig,
    pub ema_decay: f64,
    /// Probability of training on the empty caption (for classifier-free guidance).
    pub caption_dropout: f64,
    /// Probability that a degraded image is captioned with its quality words only
    /// ("blurry, noisy"), so that those words alone, as a negative prompt, mean something.
    pub quality_only_caption: f64,
    /// Min-SNR loss weighting γ (0 disables).
    pub min_snr_gamma: f64,
    /// Distinct training images encoded once for the diffusion stage.
    pub latent_pool: usize,
    pub checkpoint_every: u64,
    /// Checkpoints kept on disk.
    pub keep_checkpoints: usize,
    /// Fine-tune instead of starting from random weights: the diffusers folder whose
    /// VAE is reused and whose text encoder and UNet are the starting point, with the
    /// short hash of its UNet weights (so the run records exactly what it started from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<InitFrom>,
}

/// The model a fine-tuning run starts from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitFrom {
    pub path: PathBuf,
    pub unet_hash: String,
    /// Train the VAE stage again, starting from this model's VAE, instead of keeping it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retrain_vae: bool,
}

impl InitFrom {
    /// Refers to the starter-architecture model folder `dir`.
    pub fn new(dir: &Path) -> Result<Self> {
        let weights = dir.join("unet").join("diffusion_pytorch_model.safetensors");
        Ok(Self { path: dir.to_path_buf(), unet_hash: crate::model::short_hash(&weights)?, retrain_vae: false })
    }

    /// The same, with the VAE stage trained again from this model's VAE when `retrain`.
    pub fn retraining_vae(self, retrain: bool) -> Self {
        Self { retrain_vae: retrain, ..self }
    }
}

impl TrainBaseConfig {
    /// The recipe of the shipped model, with `steps` diffusion steps.
    pub fn recipe(seed: u64, steps: u64) -> Self {
        let vae_steps = 600;
        Self {
            seed,
            vae_steps,
            vae_batch: 8,
            vae_optim: OptimConfig::new(2e-3, 50, vae_steps),
            vae_kl_weight: 1e-4,
            vae_edge_weight: 0.0,
            vae_detail_weight: 0.0,
            vae_decoder_only: false,
            steps,
            batch: 16,
            optim: OptimConfig::new(1e-3, 100.min(steps / 10 + 1), steps),
            ema_decay: 0.995,
            caption_dropout: 0.1,
            quality_only_caption: 0.15,
            min_snr_gamma: 5.0,
            latent_pool: 4096,
            checkpoint_every: 100,
            keep_checkpoints: 2,
            init_from: None,
        }
    }

    /// A few steps of everything, for tests.
    pub fn smoke(seed: u64, vae_steps: u64, steps: u64) -> Self {
        let mut c = Self::recipe(seed, steps);
        c.vae_steps = vae_steps;
        c.vae_batch = 4;
        c.vae_optim = OptimConfig::new(2e-3, 3, vae_steps);
        c.batch = 4;
        c.optim = OptimConfig::new(1e-3, 1, steps);
        c.latent_pool = 16;
        c.checkpoint_every = 2;
        c
    }
}

/// Which stage a progress report belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    Vae,
    Diffusion,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Vae => "vae",
            Stage::Diffusion => "diffusion",
        }
    }
}

/// What the trainer reports after every step (and while it prepares a stage).
#[derive(Debug, Clone)]
pub enum TrainEvent {
    /// A stage starts (or resumes) at `step` of `total`.
    StageStart { stage: Stage, step: u64, total: u64 },
    /// One optimiser step finished.
    Step { stage: Stage, step: u64, total: u64, loss: f64, lr: f64, grad_norm: f64 },
    /// Something long that is not a step (encoding the latent pool, saving).
    Note(String),
}

/// Where the files of a run live inside `OUT`.
struct Layout {
    out: PathBuf,
}

impl Layout {
    fn training(&self) -> PathBuf {
        self.out.join("training")
    }
    fn checkpoints(&self, stage: Stage) -> PathBuf {
        self.out.join("checkpoints").join(stage.name())
    }
    fn vae_weights(&self) -> PathBuf {
        self.out.join("vae").join("diffusion_pytorch_model.safetensors")
    }
    fn vae_config(&self) -> PathBuf {
        self.out.join("vae").join("config.json")
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct CheckpointState {
    stage: Stage,
    step: u64,
    config: TrainBaseConfig,
}

/// The result of a finished run.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub out: PathBuf,
    pub vae_final_loss: Option<f64>,
    pub diffusion_final_loss: Option<f64>,
    pub scaling_factor: f64,
}

/// A deterministic per-step random source, independent of how the run was split up.
fn step_rng(seed: u64, stage: Stage, step: u64) -> rand::rngs::StdRng {
    let salt = match stage {
        Stage::Vae => 0x5641_4500,
        Stage::Diffusion => 0x4449_4600,
    };
    rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt ^ step.wrapping_mul(0xD1B5_4A32_D192_ED03))
}

/// Images (B, 3, 64, 64) in [-1, 1].
fn images_to_tensor(images: &[image::RgbImage], device: &Device) -> Result<Tensor> {
    let n = images.len();
    let s = IMAGE_SIZE;
    let mut data = Vec::with_capacity(n * 3 * s * s);
    for img in images {
        let raw = img.as_raw();
        for c in 0..3 {
            data.extend(raw.chunks_exact(3).map(|p| p[c] as f32 / 127.5 - 1.0));
        }
    }
    Ok(Tensor::from_vec(data, (n, 3, s, s), &Device::Cpu)?.to_device(device)?)
}

fn note(progress: &mut dyn FnMut(&TrainEvent) -> bool, msg: impl Into<String>) -> Result<()> {
    if progress(&TrainEvent::Note(msg.into())) {
        Ok(())
    } else {
        Err(Error::Cancelled)
    }
}

/// Trains the starter model into `out` (diffusers layout), resuming from the newest
/// checkpoint there when one exists. `tokenizer_dir` holds the CLIP `vocab.json` and
/// `merges.txt`. `progress` returning false stops the run after the current step (a
/// checkpoint is written first, so it can be resumed).
pub fn train_base(
    out: &Path,
    tokenizer_dir: &Path,
    config: &TrainBaseConfig,
    device: &Device,
    progress: &mut dyn FnMut(&TrainEvent) -> bool,
) -> Result<TrainSummary> {
    let layout = Layout { out: out.to_path_buf() };
    std::fs::create_dir_all(layout.training()).map_err(|e| Error::io(layout.training(), e))?;
    let config_path = layout.training().join("config.json");
    if config_path.exists() {
        let text = std::fs::read(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let previous: TrainBaseConfig =
            serde_json::from_slice(&text).map_err(|e| Error::Config { path: config_path.clone(), message: e.to_string() })?;
        if &previous != config {
            return Err(Error::invalid(
                "out",
                format!(
                    "{} holds a run with different settings ({}); pass the same settings to resume it, or choose another --out",
                    out.display(),
                    config_path.display()
                ),
            ));
        }
    }
    let config_json = serde_json::to_value(config).map_err(|e| Error::Metadata(e.to_string()))?;
    crate::files::save_json(&config_path, &config_json)?;
    let tokenizer = ClipTokenizer::from_dir(tokenizer_dir)?;

    if let Some(init) = config.init_from.as_ref().filter(|i| !i.retrain_vae) {
        if !layout.vae_weights().is_file() {
            let weights = load_safetensors(&init.path.join("vae").join("diffusion_pytorch_model.safetensors"), device)?;
            let src_cfg = init.path.join("vae").join("config.json");
            let vae_cfg: Value = serde_json::from_slice(&std::fs::read(&src_cfg).map_err(|e| Error::io(&src_cfg, e))?)
                .map_err(|e| Error::Config { path: src_cfg.clone(), message: e.to_string() })?;
            save_safetensors_atomic(&weights, &layout.vae_weights())?;
            crate::files::save_json(&layout.vae_config(), &vae_cfg)?;
        }
    }
    let (vae_final_loss, scaling_factor) = if layout.vae_weights().is_file() && layout.vae_config().is_file() {
        let cfg: crate::vae::VaeConfig = crate::model::read_config(&layout.vae_config())?;
        (None, cfg.scaling_factor)
    } else {
        train_vae(&layout, config, device, progress)?
    };
    let diffusion_final_loss = train_diffusion(&layout, &tokenizer, config, scaling_factor, device, progress)?;

    crate::files::save_json(&out.join("model_index.json"), &model::model_index_json())?;
    crate::files::save_json(&out.join("atelier.json"), &model::card_json())?;
    crate::files::save_json(&out.join("scheduler").join("scheduler_config.json"), &model::scheduler_config_json())?;
    model::write_tokenizer(tokenizer_dir, &out.join("tokenizer"))?;
    let ckpts = out.join("checkpoints");
    if ckpts.exists() {
        std::fs::remove_dir_all(&ckpts).map_err(|e| Error::io(&ckpts, e))?;
    }
    Ok(TrainSummary { out: out.to_path_buf(), vae_final_loss, diffusion_final_loss, scaling_factor })
}

/// Reads back the `loss` column of a curve and plots it.
fn plot_curve(csv: &Path, png: &Path, title: &str) -> Result<()> {
    let (columns, rows) = CsvLog::read(csv)?;
    let loss_col = columns.iter().position(|c| c == "loss").unwrap_or(0);
    let points: Vec<(f64, f64)> = rows.iter().filter_map(|(s, v)| v.get(loss_col).map(|l| (*s as f64, *l))).collect();
    if points.is_empty() {
        return Ok(());
    }
    plot_png(png, title, "step", "loss", &[("loss", points)], true)
}

fn train_vae(
    layout: &Layout,
    config: &TrainBaseConfig,
    device: &Device,
    progress: &mut dyn FnMut(&TrainEvent) -> bool,
) -> Result<(Option<f64>, f64)> {
    let stage = Stage::Vae;
    let vae_cfg = model::vae_config(1.0);
    let varmap = VarMap::new();
    let vae = {
        let _g = enable_grad();
        AutoencoderKL::new(&vae_cfg, seeded_var_builder(&varmap, config.seed, DType::F32, device))?
    };
    let init_vae = config.init_from.as_ref().filter(|i| i.retrain_vae).map(|i| i.path.join("vae"));
    if let Some(dir) = &init_vae {
        load_into(&varmap, &dir.join("diffusion_pytorch_model.safetensors"), "", device)?;
    }
    let decoder_only = config.vae_decoder_only && init_vae.is_some();
    let trained = if decoder_only {
        // The optimiser sees the decoder's variables only.
        let sub = VarMap::new();
        {
            let all = varmap.data().lock().map_err(|_| Error::Metadata("VarMap lock poisoned".into()))?;
            let mut dec = sub.data().lock().map_err(|_| Error::Metadata("VarMap lock poisoned".into()))?;
            for (name, var) in all.iter().filter(|(n, _)| n.starts_with("decoder.") || n.starts_with("post_quant_conv.")) {
                dec.insert(name.clone(), var.clone());
            }
        }
        sub
    } else {
        varmap.clone()
    };
    let mut opt = AdamW::new(&trained, config.vae_optim.clone())?;
    let ckpt_root = layout.checkpoints(stage);
    let start = resume(&ckpt_root, stage, config, &varmap, &mut opt, None, device)?;
    let csv_path = layout.training().join("loss_vae.csv");
    let mut log = CsvLog::open(&csv_path, &["loss", "l1", "kl", "edge", "detail", "lr", "grad_norm"], Some(start))?;
    if !progress(&TrainEvent::StageStart { stage, step: start, total: config.vae_steps }) {
        return Err(Error::Cancelled);
    }
    let world = World::new(config.seed);
    let mut last = None;
    for step in start + 1..=config.vae_steps {
        let _g = enable_grad();
        let images: Vec<_> =
            (0..config.vae_batch).map(|i| world.training_sample((step - 1) * config.vae_batch as u64 + i as u64).1).collect();
        let x = images_to_tensor(&images, device)?;
        let mut dist = vae.encode(&x, AttentionKind::Original)?;
        if decoder_only {
            dist = crate::vae::LatentDist { mean: dist.mean.detach(), logvar: dist.logvar.detach() };
        }
        let mut noise = Noise::new(step_rng(config.seed, stage, step).random());
        let eps = noise.randn(dist.mean.dims(), device)?;
        let z = dist.sample(&eps)?;
        let recon = vae.decode(&z, AttentionKind::Original)?;
        let l1 = (&recon - &x)?.abs()?.mean_all()?;
        let edge = edge_l1(&recon, &x)?;
        let detail = detail_l1(&recon, &x)?;
        let var = dist.logvar.exp()?;
        let kl = ((dist.mean.sqr()? + &var)? - 1.0)?.sub(&dist.logvar)?.mean_all()?.affine(0.5, 0.0)?;
        let mut loss = (&l1 + (&kl * config.vae_kl_weight)?)?;
        if config.vae_edge_weight > 0.0 {
            loss = (loss + (&edge * config.vae_edge_weight)?)?;
        }
        if config.vae_detail_weight > 0.0 {
            loss = (loss + (&detail * config.vae_detail_weight)?)?;
        }
        let stats = opt.step(&loss.backward()?)?;
        drop(_g);
        let scalar = |t: &Tensor| -> Result<f64> { Ok(t.to_scalar::<f32>()? as f64) };
        let (loss_v, l1_v, kl_v, edge_v, detail_v) = (scalar(&loss)?, scalar(&l1)?, scalar(&kl)?, scalar(&edge)?, scalar(&detail)?);
        log.append(step, &[loss_v, l1_v, kl_v, edge_v, detail_v, stats.lr, stats.grad_norm])?;
        last = Some(loss_v);
        let keep_going =
            progress(&TrainEvent::Step { stage, step, total: config.vae_steps, loss: loss_v, lr: stats.lr, grad_norm: stats.grad_norm });
        if step % config.checkpoint_every == 0 || step == config.vae_steps || !keep_going {
            save_checkpoint(&ckpt_root, stage, step, config, &varmap, &opt, None)?;
        }
        if !keep_going {
            return Err(Error::Cancelled);
        }
    }
    plot_curve(&csv_path, &layout.training().join("loss_vae.png"), "VAE reconstruction loss")?;

    let weights = detached(&varmap)?;
    if let (true, Some(dir)) = (decoder_only, &init_vae) {
        // Same encoder, same latents: keep the scale the UNet was trained with.
        let cfg: crate::vae::VaeConfig = crate::model::read_config(&dir.join("config.json"))?;
        save_safetensors_atomic(&weights, &layout.vae_weights())?;
        crate::files::save_json(&layout.vae_config(), &model::vae_config_json(cfg.scaling_factor))?;
        return Ok((last, cfg.scaling_factor));
    }
    // Latent scale: 1/std of the latent means over a sample of training images.
    note(progress, "measuring the VAE latent scale")?;
    let frozen = AutoencoderKL::new(&vae_cfg, VarBuilder::from_tensors(weights.clone(), DType::F32, device))?;
    let world = World::new(config.seed ^ 0x5CA1E);
    let images: Vec<_> = (0..256u64).map(|i| world.training_sample(i).1).collect();
    let mut means = Vec::new();
    for chunk in images.chunks(32) {
        means.push(frozen.encode(&images_to_tensor(chunk, device)?, AttentionKind::Original)?.mean);
    }
    let all = Tensor::cat(&means, 0)?.flatten_all()?;
    let mean = all.mean_all()?.to_scalar::<f32>()? as f64;
    let std = (all.sqr()?.mean_all()?.to_scalar::<f32>()? as f64 - mean * mean).max(1e-12).sqrt();
    let scaling_factor = 1.0 / std;
    save_safetensors_atomic(&weights, &layout.vae_weights())?;
    crate::files::save_json(&layout.vae_config(), &model::vae_config_json(scaling_factor))?;
    Ok((last, scaling_factor))
}

/// Mean L1 distance between the horizontal and the vertical neighbour differences of
/// two (B, C, H, W) images: how far apart their edges are.
fn edge_l1(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = a.dims4()?;
    let dx = |t: &Tensor| -> Result<Tensor> { Ok((t.narrow(3, 1, w - 1)? - t.narrow(3, 0, w - 1)?)?) };
    let dy = |t: &Tensor| -> Result<Tensor> { Ok((t.narrow(2, 1, h - 1)? - t.narrow(2, 0, h - 1)?)?) };
    let ex = (dx(a)? - dx(b)?)?.abs()?.mean_all()?;
    let ey = (dy(a)? - dy(b)?)?.abs()?.mean_all()?;
    Ok(((ex + ey)? * 0.5)?)
}

/// The 4-neighbour Laplacian of (B, C, H, W) images over the interior (H−2, W−2).
fn laplacian(t: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = t.dims4()?;
    let at = |dy: usize, dx: usize| -> Result<Tensor> { Ok(t.narrow(2, dy, h - 2)?.narrow(3, dx, w - 2)?) };
    Ok((((at(0, 1)? + at(2, 1)?)? + (at(1, 0)? + at(1, 2)?)?)? - (at(1, 1)? * 4.0)?)?)
}

/// Size of the patches over which [`detail_l1`] measures detail.
const DETAIL_PATCH: usize = 8;

/// Mean L1 distance between the local RMS of the Laplacian (per channel, per
/// `DETAIL_PATCH`² patch) of two (B, C, H, W) images: how differently detailed they are,
/// region by region, whatever the exact pixels.
fn detail_l1(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let rms = |t: &Tensor| -> Result<Tensor> {
        let energy = laplacian(t)?.sqr()?.avg_pool2d(DETAIL_PATCH)?;
        Ok((energy + 1e-6)?.sqrt()?)
    };
    Ok((rms(a)? - rms(b)?)?.abs()?.mean_all()?)
}

fn save_checkpoint(
    root: &Path,
    stage: Stage,
    step: u64,
    config: &TrainBaseConfig,
    varmap: &VarMap,
    opt: &AdamW,
    ema: Option<&Ema>,
) -> Result<()> {
    let weights = detached(varmap)?;
    let optim = opt.state();
    let ema_t = ema.map(|e| e.tensors());
    let mut files: Vec<(&str, &HashMap<String, Tensor>)> = vec![("model", &weights), ("optim", &optim)];
    if let Some(e) = &ema_t {
        files.push(("ema", e));
    }
    checkpoint::save(root, step, &files, &CheckpointState { stage, step, config: config.clone() }, config.keep_checkpoints)?;
    Ok(())
}

/// Restores the newest checkpoint under `root` into the model, optimiser and EMA;
/// returns the step to continue after (0 when there is none).
fn resume(
    root: &Path,
    stage: Stage,
    config: &TrainBaseConfig,
    varmap: &VarMap,
    opt: &mut AdamW,
    ema: Option<&mut Ema>,
    device: &Device,
) -> Result<u64> {
    let Some((step, dir)) = checkpoint::latest(root)? else { return Ok(0) };
    let state: CheckpointState = checkpoint::read_state(&dir)?;
    if state.stage != stage || &state.config != config || state.step != step {
        return Err(Error::invalid("out", format!("checkpoint {} belongs to a different run", dir.display())));
    }
    let weights = checkpoint::read_tensors(&dir, "model", device)?;
    {
        let data = varmap.data().lock().map_err(|_| Error::Metadata("VarMap lock poisoned".into()))?;
        for (name, var) in data.iter() {
            let t = weights.get(name).ok_or_else(|| Error::Weights { path: dir.clone(), message: format!("lacks {name}") })?;
            var.set(t)?;
        }
    }
    opt.load_state(&checkpoint::read_tensors(&dir, "optim", device)?, step)?;
    if let Some(ema) = ema {
        ema.load(&checkpoint::read_tensors(&dir, "ema", device)?)?;
    }
    Ok(step)
}

/// The caption a training step uses for `scene`, given a uniform draw `u`.
pub fn training_caption(scene: &Scene, u: f64, config: &TrainBaseConfig) -> String {
    if u < config.caption_dropout {
        return String::new();
    }
    let q = scene.quality;
    if !q.is_clean() && u < config.caption_dropout + config.quality_only_caption {
        let mut words = Vec::new();
        if q.blurry {
            words.push("blurry");
        }
        if q.noisy {
            words.push("noisy");
        }
        if q.low_contrast {
            words.push("low contrast");
        }
        return words.join(", ");
    }
    scene.caption()
}

/// Sets every variable named `prefix` + k from tensor k of the safetensors file `path`.
fn load_into(varmap: &VarMap, path: &Path, prefix: &str, device: &Device) -> Result<()> {
    let tensors = load_safetensors(path, device)?;
    let data = varmap.data().lock().map_err(|_| Error::Metadata("VarMap lock poisoned".into()))?;
    for (name, var) in data.iter() {
        let Some(key) = name.strip_prefix(prefix) else { continue };
        let t = tensors
            .get(key)
            .ok_or_else(|| Error::Weights { path: path.to_path_buf(), message: format!("lacks {key}: not a starter-architecture model") })?;
        if t.shape() != var.shape() {
            return Err(Error::Weights {
                path: path.to_path_buf(),
                message: format!("{key} has shape {:?}, the starter architecture needs {:?}", t.shape(), var.shape()),
            });
        }
        var.set(t)?;
    }
    Ok(())
}

fn split_prefix(all: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    all.iter().filter_map(|(k, v)| k.strip_prefix(prefix).map(|rest| (rest.to_string(), v.clone()))).collect()
}

fn train_diffusion(
    layout: &Layout,
    tokenizer: &ClipTokenizer,
    config: &TrainBaseConfig,
    scaling_factor: f64,
    device: &Device,
    progress: &mut dyn FnMut(&TrainEvent) -> bool,
) -> Result<Option<f64>> {
    let stage = Stage::Diffusion;
    // The latent pool: distinct training images encoded once by the frozen VAE.
    note(progress, format!("encoding {} training images with the VAE", config.latent_pool))?;
    let vae_cfg = model::vae_config(scaling_factor);
    let vae = AutoencoderKL::new(&vae_cfg, VarBuilder::from_tensors(load_safetensors(&layout.vae_weights(), device)?, DType::F32, device))?;
    let world = World::new(config.seed);
    let mut scenes = Vec::with_capacity(config.latent_pool);
    let mut latents = Vec::new();
    let pool_base = 1u64 << 40;
    let mut start = 0;
    while start < config.latent_pool {
        let n = 64.min(config.latent_pool - start);
        let mut images = Vec::with_capacity(n);
        for i in 0..n {
            let (scene, img) = world.training_sample(pool_base + (start + i) as u64);
            scenes.push(scene);
            images.push(img);
        }
        latents.push((vae.encode(&images_to_tensor(&images, device)?, AttentionKind::Original)?.mean * scaling_factor)?);
        start += n;
    }
    let pool = Tensor::cat(&latents, 0)?;
    drop(vae);

    let varmap = VarMap::new();
    let (text_encoder, unet) = {
        let _g = enable_grad();
        let vb = seeded_var_builder(&varmap, config.seed.wrapping_add(1), DType::F32, device);
        let te = ClipTextModel::new(&model::text_encoder_config(), vb.pp("text_encoder"))?;
        let unet = UNet2DConditionModel::new(&model::unet_config(), vb.pp("unet"))?;
        (te, unet)
    };
    let mut opt = AdamW::new(&varmap, config.optim.clone())?;
    if let Some(init) = &config.init_from {
        load_into(&varmap, &init.path.join("unet").join("diffusion_pytorch_model.safetensors"), "unet.", device)?;
        load_into(&varmap, &init.path.join("text_encoder").join("model.safetensors"), "text_encoder.", device)?;
    }
    let mut ema = Ema::new(&varmap, config.ema_decay)?;
    let ckpt_root = layout.checkpoints(stage);
    let start = resume(&ckpt_root, stage, config, &varmap, &mut opt, Some(&mut ema), device)?;
    let csv_path = layout.training().join("loss_diffusion.csv");
    let mut log = CsvLog::open(&csv_path, &["loss", "lr", "grad_norm"], Some(start))?;
    if !progress(&TrainEvent::StageStart { stage, step: start, total: config.steps }) {
        return Err(Error::Cancelled);
    }
    let acp = alphas_cumprod();
    let objective = Objective { min_snr_gamma: config.min_snr_gamma, noise_offset: 0.0 };
    let mut token_cache: HashMap<String, Vec<u32>> = HashMap::new();
    let mut last = None;
    for step in start + 1..=config.steps {
        let mut rng = step_rng(config.seed, stage, step);
        let mut idx = Vec::with_capacity(config.batch);
        let mut ids = Vec::with_capacity(config.batch * tokenizer.max_len());
        let mut ts = Vec::with_capacity(config.batch);
        for _ in 0..config.batch {
            let i = rng.random_range(0..config.latent_pool);
            idx.push(i as u32);
            let caption = training_caption(&scenes[i], rng.random::<f64>(), config);
            let toks = token_cache.entry(caption.clone()).or_insert_with(|| tokenizer.encode(&caption).ids);
            ids.extend_from_slice(toks);
            ts.push(rng.random_range(0..acp.len()));
        }
        let x0 = pool.index_select(&Tensor::new(idx.as_slice(), device)?, 0)?;
        let batch = objective.noise(&x0, &ts, &acp, &mut Noise::new(rng.random()))?;
        let ids = Tensor::from_vec(ids, (config.batch, tokenizer.max_len()), device)?;

        let g = enable_grad();
        let ctx = text_encoder.forward(&ids, AttentionKind::Original)?.last_hidden_state;
        let pred = unet.forward_timesteps(&batch.xt, &batch.timesteps, &ctx, AttentionKind::Original)?;
        let loss = weighted_loss(&pred, &batch)?;
        let stats = opt.step(&loss.backward()?)?;
        drop(g);
        ema.update(step)?;
        let loss_v = loss.to_scalar::<f32>()? as f64;
        log.append(step, &[loss_v, stats.lr, stats.grad_norm])?;
        last = Some(loss_v);
        let keep_going =
            progress(&TrainEvent::Step { stage, step, total: config.steps, loss: loss_v, lr: stats.lr, grad_norm: stats.grad_norm });
        if step % config.checkpoint_every == 0 || step == config.steps || !keep_going {
            save_checkpoint(&ckpt_root, stage, step, config, &varmap, &opt, Some(&ema))?;
        }
        if !keep_going {
            return Err(Error::Cancelled);
        }
    }
    plot_curve(&csv_path, &layout.training().join("loss_diffusion.png"), "Diffusion loss (min-SNR weighted)")?;

    note(progress, "saving the averaged weights")?;
    write_diffusion_weights(&layout.out, &ema.tensors())?;
    Ok(last)
}

/// Writes the UNet and text encoder (weights named `unet.*` / `text_encoder.*`) with
/// their configs into the diffusers folder `out`.
fn write_diffusion_weights(out: &Path, weights: &HashMap<String, Tensor>) -> Result<()> {
    save_safetensors_atomic(&split_prefix(weights, "unet."), &out.join("unet").join("diffusion_pytorch_model.safetensors"))?;
    crate::files::save_json(&out.join("unet").join("config.json"), &model::unet_config_json())?;
    save_safetensors_atomic(&split_prefix(weights, "text_encoder."), &out.join("text_encoder").join("model.safetensors"))?;
    crate::files::save_json(&out.join("text_encoder").join("config.json"), &model::text_encoder_config_json())
}

/// Exports the averaged weights of the newest diffusion checkpoint of the run in `run`
/// (whose VAE stage has finished) as a complete diffusers folder `dest`, to look at a
/// run before it ends.
pub fn export_snapshot(run: &Path, tokenizer_dir: &Path, dest: &Path) -> Result<u64> {
    let layout = Layout { out: run.to_path_buf() };
    let (step, dir) = checkpoint::latest(&layout.checkpoints(Stage::Diffusion))?
        .ok_or_else(|| Error::invalid("run", format!("{} has no diffusion checkpoint yet", run.display())))?;
    write_diffusion_weights(dest, &checkpoint::read_tensors(&dir, "ema", &Device::Cpu)?)?;
    let vae = load_safetensors(&layout.vae_weights(), &Device::Cpu)?;
    save_safetensors_atomic(&vae, &dest.join("vae").join("diffusion_pytorch_model.safetensors"))?;
    let vae_cfg = std::fs::read(layout.vae_config()).map_err(|e| Error::io(layout.vae_config(), e))?;
    std::fs::write(dest.join("vae").join("config.json"), vae_cfg).map_err(|e| Error::io(dest.join("vae"), e))?;
    crate::files::save_json(&dest.join("model_index.json"), &model::model_index_json())?;
    crate::files::save_json(&dest.join("atelier.json"), &model::card_json())?;
    crate::files::save_json(&dest.join("scheduler").join("scheduler_config.json"), &model::scheduler_config_json())?;
    model::write_tokenizer(tokenizer_dir, &dest.join("tokenizer"))?;
    Ok(step)
}

/// The state a run would resume from, for tests and `--status`: (stage, step) of the
/// newest checkpoint under `out`.
pub fn resume_point(out: &Path) -> Result<Option<(Stage, u64)>> {
    let layout = Layout { out: out.to_path_buf() };
    if let Some((step, _)) = checkpoint::latest(&layout.checkpoints(Stage::Diffusion))? {
        return Ok(Some((Stage::Diffusion, step)));
    }
    Ok(checkpoint::latest(&layout.checkpoints(Stage::Vae))?.map(|(s, _)| (Stage::Vae, s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_loss_compares_neighbour_differences() {
        let a = Tensor::new(&[[[[0f32, 1., 3.], [0., 0., 0.]]]], &Device::Cpu).unwrap();
        let zero = a.zeros_like().unwrap();
        // dx of a: [1, 2; 0, 0] → mean |·| 0.75; dy: [0, -1, -3] → 4/3.
        let e = edge_l1(&a, &zero).unwrap().to_scalar::<f32>().unwrap();
        assert!((e - (0.75 + 4.0 / 3.0) / 2.0).abs() < 1e-6, "{e}");
        // A constant offset changes no edge.
        assert_eq!(edge_l1(&a, &(&a + 5.0).unwrap()).unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn detail_loss_compares_local_laplacian_energy() {
        let dev = Device::Cpu;
        // A 10×10 image with one bright pixel at (4, 4): its Laplacian over the 8×8 interior
        // is −4 there and 1 at its four neighbours, so the patch RMS is √(20/64).
        let mut v = vec![0f32; 100];
        v[44] = 1.0;
        let spot = Tensor::from_vec(v, (1, 1, 10, 10), &dev).unwrap();
        let flat = spot.zeros_like().unwrap();
        let d = detail_l1(&spot, &flat).unwrap().to_scalar::<f32>().unwrap();
        let expected = (20f32 / 64.0 + 1e-6).sqrt() - 1e-3;
        assert!((d - expected).abs() < 1e-5, "{d} vs {expected}");
        // Moving the spot changes pixels but not the amount of detail.
        let mut v = vec![0f32; 100];
        v[55] = 1.0;
        let moved = Tensor::from_vec(v, (1, 1, 10, 10), &dev).unwrap();
        assert!(detail_l1(&spot, &moved).unwrap().to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn step_randomness_depends_only_on_seed_and_step() {
        let a: u64 = step_rng(7, Stage::Diffusion, 42).random();
        let b: u64 = step_rng(7, Stage::Diffusion, 42).random();
        let c: u64 = step_rng(7, Stage::Diffusion, 43).random();
        let d: u64 = step_rng(7, Stage::Vae, 42).random();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }
}
