//! Training a LoRA style adapter on a frozen base model.
//!
//! The base model is loaded as usual (plain tensors, nothing tracked); low-rank pairs
//! are created as trainable variables and attached to the layers' adapter slots, so the
//! forward pass is the same code that applies adapters at inference. Targets: the
//! UNet's attention projections (`to_q`, `to_k`, `to_v`, `to_out.0` of every
//! transformer block), optionally the text encoder's (`q_proj`, `k_proj`, `v_proj`,
//! `out_proj`) and the UNet resnets' 3×3 convolutions (LoCon). `down` starts uniform in
//! ±1/√fan_in and `up` at zero, so step 0 is exactly the base model.
//!
//! Each step: a batch of training latents (the prepared images encoded once by the
//! VAE, with horizontal flips when enabled), noise (plus the optional noise offset
//! `offset · N(0,1)` per image and channel), uniform timesteps, ε-prediction MSE with
//! min-SNR-γ weighting, AdamW. Checkpoints hold the adapter, the optimiser moments and
//! the step, so a stopped run resumes exactly; sample images on fixed prompts and seeds
//! are written every `sample_every` steps.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarMap};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::attention::AttentionKind;
use crate::layers::{enable_grad, LoraDelta, SlotShape};
use crate::lora::{ActiveLora, BlockWeights, BoundLora, BoundModule, Component, LoraAdapter, LoraFormat};
use crate::model::save_safetensors_with_metadata_atomic;
use crate::noise::Noise;
use crate::pipeline::{image_to_tensor, GenerateParams, StableDiffusion};
use crate::style::dataset::PreparedDataset;
use crate::train::checkpoint;
use crate::train::diffusion::{alphas_cumprod, detached, timesteps_tensor, weighted_loss, Objective};
use crate::train::curves::CsvLog;
use crate::train::init::seeded_var_builder;
use crate::train::optim::{AdamW, OptimConfig};
use crate::train::plot::plot_png;
use crate::{Error, Result};

/// Everything that decides a trained adapter; saved with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StyleTrainConfig {
    pub name: String,
    /// The word that calls the style up in prompts.
    pub trigger: String,
    pub rank: usize,
    pub alpha: f64,
    pub steps: u64,
    pub batch: usize,
    pub optim: OptimConfig,
    pub seed: u64,
    /// Also adapt the text encoder's attention.
    pub text_encoder: bool,
    /// Also adapt the UNet resnets' 3×3 convolutions (LoCon).
    pub convs: bool,
    /// Min-SNR loss weighting γ (0 disables).
    pub min_snr_gamma: f64,
    /// Noise offset (0 disables).
    pub noise_offset: f64,
    /// Train on horizontal mirror images too.
    pub flip: bool,
    pub checkpoint_every: u64,
    pub keep_checkpoints: usize,
    /// Steps between sample sheets (0 disables).
    pub sample_every: u64,
    pub sample_prompts: Vec<String>,
    pub sample_seed: u64,
    pub sample_steps: usize,
    /// Short hash of the base model's UNet weights.
    pub base_model_hash: String,
    /// Hash of the prepared dataset.
    pub dataset_hash: String,
}

impl StyleTrainConfig {
    /// Defaults for a style called `name`, triggered by `trigger`: those of
    /// `atelier_blend::defaults::style_training` (as the web request,
    /// `app::dto::StyleTrainingRequest`), alpha = rank, plus the engine's own.
    pub fn new(name: &str, trigger: &str, steps: u64) -> Self {
        use atelier_blend::defaults::style_training as d;
        Self {
            name: name.to_string(),
            trigger: trigger.to_string(),
            rank: d::RANK,
            alpha: d::RANK as f64,
            steps,
            batch: d::BATCH,
            optim: OptimConfig { weight_decay: 0.0, ..OptimConfig::new(d::LR, 20.min(steps / 10 + 1), steps) },
            seed: d::SEED,
            text_encoder: d::TEXT_ENCODER,
            convs: d::CONVS,
            min_snr_gamma: d::MIN_SNR_GAMMA,
            noise_offset: d::NOISE_OFFSET,
            flip: d::FLIP,
            checkpoint_every: d::CHECKPOINT_EVERY,
            keep_checkpoints: 2,
            sample_every: d::SAMPLE_EVERY,
            sample_prompts: Vec::new(),
            sample_seed: 1000,
            sample_steps: 20,
            base_model_hash: String::new(),
            dataset_hash: String::new(),
        }
    }
}

/// Progress of a style run.
#[derive(Debug, Clone)]
pub enum StyleEvent {
    Start { step: u64, total: u64 },
    Step { step: u64, total: u64, loss: f64, lr: f64 },
    Samples { step: u64, path: PathBuf },
    Note(String),
}

/// What a finished run wrote.
#[derive(Debug, Clone)]
pub struct StyleOutput {
    pub kohya: PathBuf,
    pub diffusers: PathBuf,
    pub final_loss: Option<f64>,
    /// [`FIXED_TIMESTEPS`] loss of the base model and of the trained adapter on the dataset.
    pub fit_before: f64,
    pub fit_after: f64,
}

/// The text encoder's output for every caption (token ids), with whatever adapters are attached.
fn caption_context(sd: &StableDiffusion, ids: &[Vec<u32>]) -> Result<Tensor> {
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    let t = Tensor::from_vec(flat, (ids.len(), sd.tokenizer().max_len()), sd.device())?;
    Ok(sd.text_encoder().forward(&t, AttentionKind::Original)?.last_hidden_state)
}

/// Timesteps of the deterministic dataset-fit loss.
pub const FIXED_TIMESTEPS: [usize; 5] = [100, 300, 500, 700, 900];

/// The ε-prediction MSE over every training latent at each of [`FIXED_TIMESTEPS`], with
/// noise drawn from `seed`: a deterministic measure of how well the model (with the
/// adapters attached now) fits the dataset, unlike the noisy per-step training loss.
fn fixed_loss(sd: &StableDiffusion, pool: &Tensor, context: &Tensor, seed: u64) -> Result<f64> {
    let acp = alphas_cumprod();
    let n = pool.dim(0)?;
    let mut total = 0.0;
    for (k, &t) in FIXED_TIMESTEPS.iter().enumerate() {
        let eps = Noise::new(seed.wrapping_add(k as u64)).randn(pool.dims(), sd.device())?;
        let xt = ((pool * acp[t].sqrt())? + (&eps * (1.0 - acp[t]).sqrt())?)?;
        let ts = timesteps_tensor(&vec![t; n], sd.device())?;
        let pred = sd.unet().forward_timesteps(&xt, &ts, context, AttentionKind::Original)?;
        total += (pred.to_dtype(DType::F32)? - &eps)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(total / FIXED_TIMESTEPS.len() as f64)
}

/// One trainable layer: where it attaches and its variables' names.
struct Target {
    component: Component,
    name: String,
    slot: usize,
}

fn var_name(t: &Target, part: &str) -> String {
    format!("{}.{}.{part}", t.component.peft_prefix(), t.name)
}

const ATTENTION_TARGETS: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];
const TEXT_TARGETS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "out_proj"];

fn targets(sd: &StableDiffusion, config: &StyleTrainConfig) -> Vec<Target> {
    let mut out = Vec::new();
    for (i, (component, info)) in sd.lora_slots().iter().enumerate() {
        let last = |list: &[&str]| list.iter().any(|t| info.name.ends_with(&format!(".{t}")));
        let wanted = match component {
            Component::Unet => {
                (last(&ATTENTION_TARGETS) && (info.name.contains(".attn1.") || info.name.contains(".attn2.")))
                    || (config.convs && info.name.contains("resnets") && matches!(info.shape, SlotShape::Conv { kernel: 3, .. }))
            }
            Component::TextEncoder => config.text_encoder && last(&TEXT_TARGETS),
            // SDXL training is refused in `train_style` before targets are chosen.
            Component::TextEncoder2 => false,
        };
        if wanted {
            out.push(Target { component, name: info.name.clone(), slot: i });
        }
    }
    out
}

/// The run folder's layout.
struct RunDir(PathBuf);

impl RunDir {
    fn checkpoints(&self) -> PathBuf {
        self.0.join("checkpoints")
    }
    fn config(&self) -> PathBuf {
        self.0.join("training_config.json")
    }
    fn loss_csv(&self) -> PathBuf {
        self.0.join("loss.csv")
    }
    fn samples(&self) -> PathBuf {
        self.0.join("samples")
    }
}

#[derive(Serialize, Deserialize)]
struct StyleCheckpoint {
    step: u64,
    config: StyleTrainConfig,
}

/// Creates the adapter variables, attaches them, and returns them by target.
fn create_adapter(
    sd: &StableDiffusion,
    targets: &[Target],
    varmap: &VarMap,
    config: &StyleTrainConfig,
) -> Result<Vec<(Tensor, Tensor)>> {
    let vb = seeded_var_builder(varmap, config.seed, DType::F32, sd.device());
    let r = config.rank;
    let mut pairs = Vec::with_capacity(targets.len());
    for t in targets {
        let (_, info) = sd.lora_slots().get(t.slot).ok_or_else(|| Error::invalid("targets", "layer index out of range"))?;
        let (down_shape, up_shape, fan_in): (Vec<usize>, Vec<usize>, usize) = match info.shape {
            SlotShape::Linear { in_dim, out_dim } => (vec![r, in_dim], vec![out_dim, r], in_dim),
            SlotShape::Conv { in_c, out_c, kernel } => (vec![r, in_c, kernel, kernel], vec![out_c, r, 1, 1], in_c * kernel * kernel),
        };
        let bound = 1.0 / (fan_in as f64).sqrt();
        let down = vb.get_with_hints(down_shape, &var_name(t, "lora_down"), Init::Uniform { lo: -bound, up: bound })?;
        let up = vb.get_with_hints(up_shape, &var_name(t, "lora_up"), Init::Const(0.0))?;
        pairs.push((down, up));
    }
    Ok(pairs)
}

fn attach(sd: &StableDiffusion, targets: &[Target], pairs: &[(Tensor, Tensor)], scale: f64) {
    sd.set_loras(&[]);
    for (t, (down, up)) in targets.iter().zip(pairs) {
        if let Some((_, info)) = sd.lora_slots().get(t.slot) {
            info.slot.set(vec![LoraDelta { down: down.clone(), up: up.clone(), scale }]);
        }
    }
}

/// A frozen copy of the current adapter, bound to `sd`, for sampling.
fn snapshot(sd: &StableDiffusion, targets: &[Target], pairs: &[(Tensor, Tensor)], config: &StyleTrainConfig) -> Result<Arc<BoundLora>> {
    let scale = config.alpha / config.rank as f64;
    let mut modules = Vec::with_capacity(targets.len());
    for (t, (down, up)) in targets.iter().zip(pairs) {
        let m = BoundModule::new(sd.lora_slots(), t.slot, down.detach().copy()?, up.detach().copy()?, scale)
            .ok_or_else(|| Error::invalid("targets", "layer index out of range"))?;
        modules.push(m);
    }
    let adapter = Arc::new(LoraAdapter {
        name: config.name.clone(),
        path: None,
        format: LoraFormat::Kohya,
        hash: String::new(),
        metadata: Default::default(),
        modules: Vec::new(),
        warnings: Vec::new(),
    });
    Ok(Arc::new(BoundLora { adapter, modules }))
}

/// Renders one image per sample prompt (fixed seeds) with `lora` at weight 1, or the base model.
pub fn sample_images(sd: &StableDiffusion, lora: Option<Arc<BoundLora>>, config: &StyleTrainConfig) -> Result<Vec<image::RgbImage>> {
    let size = sd.default_size();
    let mut out = Vec::with_capacity(config.sample_prompts.len());
    for (i, prompt) in config.sample_prompts.iter().enumerate() {
        let params = GenerateParams {
            prompt: prompt.clone(),
            steps: config.sample_steps,
            seed: config.sample_seed + i as u64,
            width: size,
            height: size,
            loras: lora.iter().map(|l| ActiveLora { lora: l.clone(), weight: 1.0, blocks: BlockWeights::default() }).collect(),
            ..Default::default()
        };
        out.extend(sd.generate(&params, &mut |_| true)?.images);
    }
    Ok(out)
}

/// Trains a style adapter on `data` into the run folder `run` (resuming from its newest
/// checkpoint when the settings match), then writes `NAME.safetensors` (kohya) and
/// `NAME.diffusers.safetensors` there. `progress` returning false stops after the
/// current step with a checkpoint written.
pub fn train_style(
    sd: &StableDiffusion,
    data: &PreparedDataset,
    config: &StyleTrainConfig,
    run: &Path,
    progress: &mut dyn FnMut(&StyleEvent) -> bool,
) -> Result<StyleOutput> {
    if config.rank == 0 || config.batch == 0 || config.steps == 0 {
        return Err(Error::invalid("config", "rank, batch and steps must be at least 1"));
    }
    if sd.is_sdxl() {
        return Err(Error::invalid(
            "model",
            "style training runs on SD 1.x/2.x models; this is an SDXL model (training on SDXL is not available yet): start the studio with an SD 1.x/2.x model to train",
        ));
    }
    if config.dataset_hash != data.hash {
        return Err(Error::invalid("dataset", "the config's dataset hash is not the prepared dataset's"));
    }
    let dirs = RunDir(run.to_path_buf());
    std::fs::create_dir_all(run).map_err(|e| Error::io(run, e))?;
    if let Ok(text) = std::fs::read(dirs.config()) {
        let previous: StyleTrainConfig =
            serde_json::from_slice(&text).map_err(|e| Error::Config { path: dirs.config(), message: e.to_string() })?;
        if &previous != config {
            return Err(Error::invalid(
                "out",
                format!("{} holds a run with other settings; pass the same settings to resume it, or choose another name", run.display()),
            ));
        }
    }
    crate::files::save_json(&dirs.config(), &serde_json::to_value(config).map_err(|e| Error::Metadata(e.to_string()))?)?;
    let device = sd.device().clone();

    // Encode the dataset once (and its mirror images).
    let note = |p: &mut dyn FnMut(&StyleEvent) -> bool, m: String| if p(&StyleEvent::Note(m)) { Ok(()) } else { Err(Error::Cancelled) };
    note(progress, format!("encoding {} images with the VAE", data.images.len()))?;
    let size = sd.default_size();
    let scaling = sd.vae().config().scaling_factor;
    let mut latents = Vec::new();
    let mut captions = Vec::new();
    for (img, caption) in data.images.iter().zip(&data.captions) {
        let mut variants = vec![img.clone()];
        if config.flip {
            variants.push(image::imageops::flip_horizontal(img));
        }
        for v in variants {
            let x = image_to_tensor(&v, size, size, &device)?;
            latents.push((sd.vae().encode(&x, AttentionKind::Original)?.mean * scaling)?);
            captions.push(caption.clone());
        }
    }
    let pool = Tensor::cat(&latents, 0)?.to_dtype(DType::F32)?;
    let tok = sd.tokenizer();
    let ids: Vec<Vec<u32>> = captions.iter().map(|c| tok.encode(c).ids).collect();
    // Without text-encoder training the context of each caption is fixed: encode it once.
    let fixed_context = if config.text_encoder { None } else { Some(caption_context(sd, &ids)?) };

    let all_context = match &fixed_context {
        Some(c) => c.clone(),
        None => caption_context(sd, &ids)?,
    };
    sd.set_loras(&[]);
    let fit_before = fixed_loss(sd, &pool, &all_context, config.seed ^ 0xF17)?;
    let targets = targets(sd, config);
    if targets.is_empty() {
        return Err(Error::invalid("model", "the model has no attention layers to adapt"));
    }
    let varmap = VarMap::new();
    let pairs = create_adapter(sd, &targets, &varmap, config)?;
    let mut opt = AdamW::new(&varmap, config.optim.clone())?;
    let start = match checkpoint::latest(&dirs.checkpoints())? {
        Some((step, dir)) => {
            let state: StyleCheckpoint = checkpoint::read_state(&dir)?;
            if state.config != *config || state.step != step {
                return Err(Error::invalid("out", format!("checkpoint {} belongs to a different run", dir.display())));
            }
            let saved = checkpoint::read_tensors(&dir, "adapter", &device)?;
            let data = varmap.data().lock().map_err(|_| Error::Metadata("VarMap lock poisoned".into()))?;
            for (name, var) in data.iter() {
                let t = saved.get(name).ok_or_else(|| Error::Weights { path: dir.clone(), message: format!("lacks {name}") })?;
                var.set(t)?;
            }
            drop(data);
            opt.load_state(&checkpoint::read_tensors(&dir, "optim", &device)?, step)?;
            step
        }
        None => 0,
    };
    let scale = config.alpha / config.rank as f64;
    attach(sd, &targets, &pairs, scale);
    let mut log = CsvLog::open(&dirs.loss_csv(), &["loss", "lr", "grad_norm"], Some(start))?;
    if !progress(&StyleEvent::Start { step: start, total: config.steps }) {
        sd.set_loras(&[]);
        return Err(Error::Cancelled);
    }
    if start == 0 && config.sample_every > 0 && !config.sample_prompts.is_empty() {
        let images = sample_images(sd, None, config)?;
        let path = write_sheet(&dirs.samples(), 0, &images)?;
        attach(sd, &targets, &pairs, scale);
        progress(&StyleEvent::Samples { step: 0, path });
    }
    let acp = alphas_cumprod();
    let objective = Objective { min_snr_gamma: config.min_snr_gamma, noise_offset: config.noise_offset };
    let n = pool.dim(0)?;
    let mut last = None;
    let result = (|| -> Result<()> {
        for step in start + 1..=config.steps {
            let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step.wrapping_mul(0xD1B5_4A32_D192_ED03));
            let idx: Vec<u32> = (0..config.batch).map(|_| rng.random_range(0..n) as u32).collect();
            let ts: Vec<usize> = (0..config.batch).map(|_| rng.random_range(0..acp.len())).collect();
            let index = Tensor::new(idx.as_slice(), &device)?;
            let x0 = pool.index_select(&index, 0)?;
            let batch = objective.noise(&x0, &ts, &acp, &mut Noise::new(rng.random()))?;
            let g = enable_grad();
            let ctx = match &fixed_context {
                Some(c) => c.index_select(&index, 0)?,
                None => {
                    let flat: Vec<u32> = idx.iter().flat_map(|&i| ids[i as usize].iter().copied()).collect();
                    let t = Tensor::from_vec(flat, (config.batch, tok.max_len()), &device)?;
                    sd.text_encoder().forward(&t, AttentionKind::Original)?.last_hidden_state
                }
            };
            let pred = sd.unet().forward_timesteps(&batch.xt, &batch.timesteps, &ctx, AttentionKind::Original)?;
            let loss = weighted_loss(&pred, &batch)?;
            let stats = opt.step(&loss.backward()?)?;
            drop(g);
            let loss_v = loss.to_scalar::<f32>()? as f64;
            log.append(step, &[loss_v, stats.lr, stats.grad_norm])?;
            last = Some(loss_v);
            let keep_going = progress(&StyleEvent::Step { step, total: config.steps, loss: loss_v, lr: stats.lr });
            if step % config.checkpoint_every == 0 || step == config.steps || !keep_going {
                let adapter = detached(&varmap)?;
                let optim = opt.state();
                let state = StyleCheckpoint { step, config: config.clone() };
                checkpoint::save(&dirs.checkpoints(), step, &[("adapter", &adapter), ("optim", &optim)], &state, config.keep_checkpoints)?;
            }
            if !keep_going {
                return Err(Error::Cancelled);
            }
            if config.sample_every > 0 && !config.sample_prompts.is_empty() && (step % config.sample_every == 0 || step == config.steps) {
                let lora = snapshot(sd, &targets, &pairs, config)?;
                let images = sample_images(sd, Some(lora), config)?;
                let path = write_sheet(&dirs.samples(), step, &images)?;
                attach(sd, &targets, &pairs, scale);
                progress(&StyleEvent::Samples { step, path });
            }
        }
        Ok(())
    })();
    let fit_after = match result {
        Ok(()) => {
            let ctx = match &fixed_context {
                Some(c) => c.clone(),
                None => caption_context(sd, &ids)?,
            };
            let fit = fixed_loss(sd, &pool, &ctx, config.seed ^ 0xF17);
            sd.set_loras(&[]);
            fit?
        }
        Err(e) => {
            sd.set_loras(&[]);
            return Err(e);
        }
    };
    let fit = serde_json::json!({ "fit_loss_base": fit_before, "fit_loss_adapter": fit_after, "timesteps": FIXED_TIMESTEPS });
    crate::files::save_json(&run.join("fit.json"), &fit)?;
    let (columns, rows) = CsvLog::read(&dirs.loss_csv())?;
    let li = columns.iter().position(|c| c == "loss").unwrap_or(0);
    let points: Vec<(f64, f64)> = rows.iter().filter_map(|(s, v)| v.get(li).map(|l| (*s as f64, *l))).collect();
    if !points.is_empty() {
        plot_png(&run.join("loss.png"), &format!("{}: diffusion loss", config.name), "step", "loss", &[("loss", points)], true)?;
    }
    let tensors: Vec<(Component, String, Tensor, Tensor)> = targets
        .iter()
        .zip(&pairs)
        .map(|(t, (d, u))| Ok((t.component, t.name.clone(), d.detach().copy()?, u.detach().copy()?)))
        .collect::<Result<_>>()?;
    let meta = AdapterMeta { config: config.clone(), step: config.steps };
    let kohya = run.join(format!("{}.safetensors", config.name));
    let diffusers = run.join(format!("{}.diffusers.safetensors", config.name));
    save_adapter(&tensors, &meta, LoraFormat::Kohya, &kohya)?;
    save_adapter(&tensors, &meta, LoraFormat::Diffusers, &diffusers)?;
    let ckpts = dirs.checkpoints();
    if ckpts.exists() {
        std::fs::remove_dir_all(&ckpts).map_err(|e| Error::io(&ckpts, e))?;
    }
    Ok(StyleOutput { kohya, diffusers, final_loss: last, fit_before, fit_after })
}

/// Writes a row of sample images as `samples/step-NNNNN.png`.
fn write_sheet(dir: &Path, step: u64, images: &[image::RgbImage]) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(format!("step-{step:05}.png"));
    crate::sheet::save_png(&path, &crate::sheet::contact_sheet(images, images.len().max(1)))?;
    Ok(path)
}

/// What is recorded in a trained adapter's metadata.
pub struct AdapterMeta {
    pub config: StyleTrainConfig,
    pub step: u64,
}

/// Saves adapter matrices `(component, layer name, down, up)` in `format`, with the
/// training record in the metadata (kohya's `ss_*` keys that A1111 shows, diffusers'
/// `lora_adapter_metadata` with `r` / `lora_alpha`, and `atelier_*` keys in both).
pub fn save_adapter(tensors: &[(Component, String, Tensor, Tensor)], meta: &AdapterMeta, format: LoraFormat, path: &Path) -> Result<()> {
    let c = &meta.config;
    let mut out = HashMap::new();
    let mut md: HashMap<String, String> = HashMap::from([
        ("format".into(), "pt".into()),
        ("atelier_name".into(), c.name.clone()),
        ("atelier_trigger".into(), c.trigger.clone()),
        ("atelier_base_model_hash".into(), c.base_model_hash.clone()),
        ("atelier_dataset_hash".into(), c.dataset_hash.clone()),
        ("atelier_step".into(), meta.step.to_string()),
        ("atelier_training_config".into(), serde_json::to_string(c).map_err(|e| Error::Metadata(e.to_string()))?),
    ]);
    match format {
        LoraFormat::Kohya => {
            for (component, name, down, up) in tensors {
                let stem = format!("{}_{}", component.kohya_prefix(), name.replace('.', "_"));
                out.insert(format!("{stem}.lora_down.weight"), down.clone());
                out.insert(format!("{stem}.lora_up.weight"), up.clone());
                out.insert(format!("{stem}.alpha"), Tensor::new(c.alpha as f32, &Device::Cpu)?);
            }
            md.extend([
                ("ss_network_module".to_string(), "networks.lora".to_string()),
                ("ss_network_dim".into(), c.rank.to_string()),
                ("ss_network_alpha".into(), c.alpha.to_string()),
                ("ss_output_name".into(), c.name.clone()),
                ("ss_sd_model_hash".into(), c.base_model_hash.clone()),
                ("ss_steps".into(), meta.step.to_string()),
                ("ss_seed".into(), c.seed.to_string()),
                ("ss_learning_rate".into(), c.optim.lr.to_string()),
            ]);
        }
        LoraFormat::Diffusers => {
            let mut peft = serde_json::Map::new();
            for component in [Component::Unet, Component::TextEncoder] {
                let names: Vec<String> = tensors
                    .iter()
                    .filter(|t| t.0 == component)
                    .map(|t| t.1.rsplit_once('.').map_or(t.1.clone(), |(_, last)| last.to_string()))
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                if names.is_empty() {
                    continue;
                }
                let p = component.peft_prefix();
                peft.insert(format!("{p}.r"), c.rank.into());
                peft.insert(format!("{p}.lora_alpha"), c.alpha.into());
                peft.insert(format!("{p}.target_modules"), names.into());
                peft.insert(format!("{p}.peft_type"), "LORA".into());
                peft.insert(format!("{p}.use_rslora"), false.into());
                peft.insert(format!("{p}.use_dora"), false.into());
                peft.insert(format!("{p}.alpha_pattern"), serde_json::Value::Object(Default::default()));
                peft.insert(format!("{p}.rank_pattern"), serde_json::Value::Object(Default::default()));
            }
            for (component, name, down, up) in tensors {
                let stem = format!("{}.{name}", component.peft_prefix());
                out.insert(format!("{stem}.lora_A.weight"), down.clone());
                out.insert(format!("{stem}.lora_B.weight"), up.clone());
            }
            md.insert("lora_adapter_metadata".into(), serde_json::Value::Object(peft).to_string());
        }
    }
    save_safetensors_with_metadata_atomic(&out, &md, path)
}
