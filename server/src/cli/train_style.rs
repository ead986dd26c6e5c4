//! `atelier train-style`: trains a LoRA style adapter from a folder of images into the
//! style library, with the dataset report first and a progress bar. Re-running the same
//! command resumes from the newest checkpoint; Ctrl-C stops with one written.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use app::dto::StyleTrainingRequest;
use atelier_engine::pipeline::StableDiffusion;
use atelier_engine::style::train::StyleEvent;
use indicatif::{ProgressBar, ProgressStyle};

pub use atelier_server::styles::training::{EVAL_SEED, SHIPPED_STYLES, STYLE_GRAMS};
use atelier_server::styles::training::{run_training, RunError, RunEvent};
use atelier_server::styles::StyleLibrary;

/// Arguments of `atelier train-style`.
#[derive(Debug, clap::Args)]
pub struct TrainStyleArgs {
    /// Name of the style in the library (letters, digits, `-`, `_`).
    #[arg(long)]
    pub name: String,
    /// Folder of training images (PNG, JPEG, WebP), with optional `.txt` captions beside them.
    #[arg(long)]
    pub images: PathBuf,
    /// Word that calls the style up in prompts; images without a caption file are
    /// captioned "TRIGGER style". Defaults to the name.
    #[arg(long)]
    pub trigger: Option<String>,
    /// LoRA rank.
    #[arg(long, default_value_t = atelier_blend::defaults::style_training::RANK)]
    pub rank: usize,
    /// LoRA alpha (the update is scaled by alpha / rank).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Training steps.
    #[arg(long, default_value_t = atelier_blend::defaults::style_training::STEPS)]
    pub steps: u64,
    /// Peak learning rate (AdamW, linear warm-up then cosine decay).
    #[arg(long, default_value_t = atelier_blend::defaults::style_training::LR)]
    pub lr: f64,
    /// Images per step.
    #[arg(long, default_value_t = atelier_blend::defaults::style_training::BATCH)]
    pub batch: usize,
    /// Memory this run may use (e.g. `12GiB`); a batch that would need more is refused
    /// with the largest that fits. Default: three quarters of the machine's memory.
    #[arg(long, env = "ATELIER_MAX_MEMORY", value_parser = crate::cli::parse_budget)]
    pub max_memory: Option<atelier_engine::memory::MemoryBudget>,
    /// Colour that transparent parts of input images (datasets, img2img) are composited
    /// onto before any resize: white (as A1111), black, grey or #RRGGBB.
    #[arg(long, env = "ATELIER_ALPHA_BACKGROUND", value_parser = crate::cli::parse_background)]
    pub alpha_background: Option<[u8; 3]>,
    #[arg(long, default_value_t = atelier_blend::defaults::style_training::SEED)]
    pub seed: u64,
    /// Also adapt the text encoder's attention layers.
    #[arg(long)]
    pub text_encoder: bool,
    /// Also adapt the UNet's 3×3 resnet convolutions (LoCon).
    #[arg(long)]
    pub convs: bool,
    /// Min-SNR-γ loss weighting (0 turns it off).
    #[arg(long, default_value_t = atelier_blend::defaults::style_training::MIN_SNR_GAMMA)]
    pub min_snr_gamma: f64,
    /// Noise offset (0 turns it off).
    #[arg(long, default_value_t = atelier_blend::defaults::style_training::NOISE_OFFSET)]
    pub noise_offset: f64,
    /// Do not add mirror images.
    #[arg(long)]
    pub no_flip: bool,
    /// Steps between checkpoints.
    #[arg(long, default_value_t = atelier_blend::defaults::style_training::CHECKPOINT_EVERY)]
    pub checkpoint_every: u64,
    /// Steps between sample sheets (0: none).
    #[arg(long, default_value_t = atelier_blend::defaults::style_training::SAMPLE_EVERY)]
    pub sample_every: u64,
    /// Prompt for the sample sheets (repeatable); default: the first four captions.
    #[arg(long = "sample-prompt")]
    pub sample_prompts: Vec<String>,
    /// Fewest usable images to train on.
    #[arg(long, default_value_t = atelier_blend::defaults::style_training::MIN_IMAGES)]
    pub min_images: usize,
    /// Prompt for the before/after quality metrics (repeatable); default: 8 starter-world
    /// prompts over held-out colour/shape triples, each ending in ", TRIGGER style".
    #[arg(long = "eval-prompt")]
    pub eval_prompts: Vec<String>,
    /// The embedded experiment store the run is recorded in (experiment "styles").
    #[arg(long, env = "ATELIER_TRACKING", default_value = "data/tracking")]
    pub tracking: PathBuf,
    #[command(flatten)]
    pub tracking_uri: super::TrackingUri,
    /// Base model folder (diffusers layout), hub id, or single-file `.safetensors` checkpoint.
    #[arg(long, env = "ATELIER_MODEL", default_value = "models/starter")]
    pub model: String,
    /// The style library the style is written to.
    #[arg(long, env = "ATELIER_STYLES", default_value = "data/styles")]
    pub library: PathBuf,
}

impl TrainStyleArgs {
    fn request(&self) -> StyleTrainingRequest {
        StyleTrainingRequest {
            dataset_id: String::new(),
            name: self.name.clone(),
            trigger: self.trigger.clone().unwrap_or_default(),
            rank: self.rank,
            alpha: self.alpha,
            steps: self.steps,
            lr: self.lr,
            batch: self.batch,
            seed: self.seed,
            text_encoder: self.text_encoder,
            convs: self.convs,
            min_snr_gamma: self.min_snr_gamma,
            noise_offset: self.noise_offset,
            flip: !self.no_flip,
            checkpoint_every: self.checkpoint_every,
            sample_every: self.sample_every,
            sample_prompts: self.sample_prompts.clone(),
            min_images: self.min_images,
            eval_prompts: self.eval_prompts.clone(),
        }
    }
}

pub fn run(args: TrainStyleArgs) -> Result<()> {
    if let Some(rgb) = args.alpha_background {
        atelier_engine::image_input::set_background(rgb);
    }
    let req = args.request();
    let library = StyleLibrary::new(args.library.clone()).with_shipped(PathBuf::from(SHIPPED_STYLES));
    let device = crate::cli::device()?;
    let model_dir = atelier_engine::model::resolve(&args.model)?;
    let sd = StableDiffusion::load(&model_dir, &device).with_context(|| format!("loading model {}", model_dir.display()))?;
    let budget = args.max_memory.unwrap_or_else(atelier_engine::memory::MemoryBudget::from_machine);
    let dtype_bytes = atelier_engine::pipeline::compute_dtype(&device).size_in_bytes() as u64;
    // The images are counted before they are read (the dataset report comes later).
    let images = std::fs::read_dir(&args.images).map(|d| d.count()).unwrap_or(0);
    let limit = atelier_engine::memory::admit_training(&model_dir, dtype_bytes, sd.default_size(), args.batch, images, &budget)?;

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst)).context("installing the Ctrl-C handler")?;
    }
    let bar = ProgressBar::new(args.steps);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>7} [{bar:30}] {pos}/{len} {msg} {elapsed} eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_prefix("style");
    bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    let mut window: Option<(Instant, u64)> = None;
    let mut smoothed: Option<f64> = None;
    let result = atelier_engine::memory::with_limit(Some(limit), || run_training(&req, &args.images, &sd, &model_dir, &library, &args.tracking, &mut |ev| {
        match ev {
            RunEvent::Report(report) => println!("{}", report.summary()),
            RunEvent::Prepared { hash, images, resolution } => {
                println!("dataset hash {hash} ({images} images at {resolution}×{resolution})");
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            }
            RunEvent::Train(StyleEvent::Start { step, .. }) => {
                bar.set_position(*step);
                window = Some((Instant::now(), *step));
                if *step > 0 {
                    bar.suspend(|| println!("resuming at step {step}"));
                }
            }
            RunEvent::Train(StyleEvent::Step { step, loss, lr, .. }) => {
                let s = smoothed.map_or(*loss, |m| 0.95 * m + 0.05 * loss);
                smoothed = Some(s);
                let rate = window.map_or(0.0, |(t, s0)| (*step - s0) as f64 / t.elapsed().as_secs_f64().max(1e-9));
                bar.set_position(*step);
                bar.set_message(format!("loss {s:.4} lr {lr:.1e} {rate:.2} steps/s"));
            }
            RunEvent::Train(StyleEvent::Samples { step, path }) => bar.suspend(|| println!("samples at step {step}: {}", path.display())),
            RunEvent::Train(StyleEvent::Note(m)) => bar.suspend(|| println!("{m}")),
            RunEvent::Measuring => {
                bar.finish_and_clear();
                println!("measuring the style: base model vs the new style on the same prompts and seeds");
            }
        }
        !stop.load(Ordering::SeqCst)
    }));
    bar.finish_and_clear();
    if !matches!(result, Err(RunError::Stopped)) {
        args.tracking_uri.mirror(&args.tracking);
    }
    match result {
        Ok(done) => {
            let (out, card) = (&done.output, &done.card);
            println!(
                "trained style {} in {:.1} min: dataset fit loss {:.5} (base) -> {:.5} (with the style)",
                args.name,
                done.seconds / 60.0,
                out.fit_before,
                out.fit_after
            );
            let m = &card.metrics;
            println!(
                "style similarity {:.4} -> {:.4}, sharpness {:.1} -> {:.1}, colourfulness {:.1} -> {:.1}, diversity {:.3} -> {:.3} (base -> style; {})",
                m["base"]["style_similarity"].as_f64().unwrap_or(0.0),
                m["style"]["style_similarity"].as_f64().unwrap_or(0.0),
                m["base"]["sharpness"].as_f64().unwrap_or(0.0),
                m["style"]["sharpness"].as_f64().unwrap_or(0.0),
                m["base"]["colourfulness"].as_f64().unwrap_or(0.0),
                m["style"]["colourfulness"].as_f64().unwrap_or(0.0),
                m["base"]["diversity"].as_f64().unwrap_or(0.0),
                m["style"]["diversity"].as_f64().unwrap_or(0.0),
                done.dir.join("compare.png").display()
            );
            println!("adapter (kohya): {}\nadapter (diffusers): {}", out.kohya.display(), out.diffusers.display());
            println!("use it in a prompt as <lora:{}:1> {}", args.name, req.trigger_word());
            if let Some(v) = done.version {
                println!("registered as {} version {v} (this exact adapter: <lora:{}@{v}:1>; `atelier registry alias {} production {v}` promotes it)", args.name, args.name, args.name);
            }
            Ok(())
        }
        Err(RunError::Stopped) => {
            eprintln!("stopped with a checkpoint in {}. Run the same command again to resume.", args.library.join(&args.name).display());
            std::process::exit(130);
        }
        Err(RunError::Dataset(m)) => anyhow::bail!("{m}"),
        Err(e) => Err(e.into()),
    }
}
