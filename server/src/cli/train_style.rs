//! `atelier train-style`: trains a LoRA style adapter from a folder of images into the
//! style library, with the dataset report first and a progress bar. Re-running the same
//! command resumes from the newest checkpoint; Ctrl-C stops with one written.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use atelier_engine::pipeline::StableDiffusion;
use atelier_engine::style::dataset::{prepare, scan};
use atelier_engine::style::train::{train_style, StyleEvent, StyleTrainConfig};
use indicatif::{ProgressBar, ProgressStyle};

use atelier_server::styles::{StyleCard, StyleLibrary};

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
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA alpha (the update is scaled by alpha / rank).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Training steps.
    #[arg(long, default_value_t = 400)]
    pub steps: u64,
    /// Peak learning rate (AdamW, linear warm-up then cosine decay).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Images per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also adapt the text encoder's attention layers.
    #[arg(long)]
    pub text_encoder: bool,
    /// Also adapt the UNet's 3×3 resnet convolutions (LoCon).
    #[arg(long)]
    pub convs: bool,
    /// Min-SNR-γ loss weighting (0 turns it off).
    #[arg(long, default_value_t = 5.0)]
    pub min_snr_gamma: f64,
    /// Noise offset (0 turns it off).
    #[arg(long, default_value_t = 0.0)]
    pub noise_offset: f64,
    /// Do not add mirror images.
    #[arg(long)]
    pub no_flip: bool,
    /// Steps between checkpoints.
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: u64,
    /// Steps between sample sheets (0: none).
    #[arg(long, default_value_t = 100)]
    pub sample_every: u64,
    /// Prompt for the sample sheets (repeatable); default: the first four captions.
    #[arg(long = "sample-prompt")]
    pub sample_prompts: Vec<String>,
    /// Fewest usable images to train on.
    #[arg(long, default_value_t = 5)]
    pub min_images: usize,
    /// Prompt for the before/after quality metrics (repeatable); default: 8 starter-world
    /// prompts over held-out colour/shape triples, each ending in ", TRIGGER style".
    #[arg(long = "eval-prompt")]
    pub eval_prompts: Vec<String>,
    /// The embedded experiment store the run is recorded in (experiment "styles").
    #[arg(long, env = "ATELIER_TRACKING", default_value = "data/tracking")]
    pub tracking: PathBuf,
    /// Base model folder (diffusers layout) or hub id.
    #[arg(long, env = "ATELIER_MODEL", default_value = "models/starter")]
    pub model: String,
    /// The style library the style is written to.
    #[arg(long, env = "ATELIER_STYLES", default_value = "data/styles")]
    pub library: PathBuf,
}

pub fn run(args: TrainStyleArgs) -> Result<()> {
    let library = StyleLibrary::new(args.library.clone()).with_shipped(PathBuf::from(SHIPPED_STYLES));
    let run_dir = library.style_dir(&args.name)?;
    let trigger = args.trigger.clone().unwrap_or_else(|| args.name.clone());
    let device = crate::cli::device()?;
    let model_dir = atelier_engine::model::resolve(&args.model)?;
    let sd = StableDiffusion::load(&model_dir, &device).with_context(|| format!("loading model {}", model_dir.display()))?;
    let resolution = sd.default_size() as u32;

    let report = scan(&args.images, &trigger, resolution, args.min_images)
        .with_context(|| format!("reading the images in {}", args.images.display()))?;
    println!("{}", report.summary());
    if !report.is_usable() {
        anyhow::bail!("not enough usable images in {}: add more, or lower --min-images", args.images.display());
    }
    let data = prepare(&report)?;
    println!("dataset hash {} ({} images at {resolution}×{resolution})", data.hash, data.images.len());

    let mut cfg = StyleTrainConfig::new(&args.name, &trigger, args.steps);
    cfg.rank = args.rank;
    cfg.alpha = args.alpha.unwrap_or(args.rank as f64);
    cfg.optim.lr = args.lr;
    cfg.batch = args.batch;
    cfg.seed = args.seed;
    cfg.text_encoder = args.text_encoder;
    cfg.convs = args.convs;
    cfg.min_snr_gamma = args.min_snr_gamma;
    cfg.noise_offset = args.noise_offset;
    cfg.flip = !args.no_flip;
    cfg.checkpoint_every = args.checkpoint_every.max(1);
    cfg.sample_every = args.sample_every;
    cfg.sample_prompts =
        if args.sample_prompts.is_empty() { data.captions.iter().take(4).cloned().collect() } else { args.sample_prompts.clone() };
    cfg.base_model_hash = sd.model_hash().to_string();
    cfg.dataset_hash = data.hash.clone();

    // The experiment store: a resumed run continues the same tracked run.
    let tracker = atelier_server::tracking::Tracker::open(&args.tracking)?;
    let run_file = run_dir.join("tracking_run");
    let tracked = match std::fs::read_to_string(&run_file).ok().filter(|id| tracker.run(id.trim()).ok().flatten().is_some()) {
        Some(id) => {
            let id = id.trim().to_string();
            tracker.reopen_run(&id)?;
            id
        }
        None => {
            let exp = tracker.experiment("styles")?;
            let id = tracker.start_run(exp, &args.name)?;
            std::fs::write(&run_file, &id)?;
            if let serde_json::Value::Object(fields) = serde_json::to_value(&cfg)? {
                for (k, v) in fields {
                    let text = match v {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    tracker.log_param(&id, &k, &text)?;
                }
            }
            for (k, v) in [
                ("style", args.name.as_str()),
                ("trigger", trigger.as_str()),
                ("dataset_hash", data.hash.as_str()),
                ("base_model_hash", sd.model_hash()),
                ("base_model", &model_dir.display().to_string()),
                ("dataset_dir", &args.images.display().to_string()),
            ] {
                tracker.set_tag(&id, k, v)?;
            }
            id
        }
    };

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
    let started = Instant::now();
    let mut window: Option<(Instant, u64)> = None;
    let mut smoothed: Option<f64> = None;
    let result = train_style(&sd, &data, &cfg, &run_dir, &mut |ev| {
        match ev {
            StyleEvent::Start { step, .. } => {
                bar.set_position(*step);
                window = Some((Instant::now(), *step));
                if *step > 0 {
                    bar.println(format!("resuming at step {step}"));
                }
            }
            StyleEvent::Step { step, loss, lr, .. } => {
                let _ = tracker.log_metric(&tracked, "loss", *loss, *step as i64);
                let _ = tracker.log_metric(&tracked, "lr", *lr, *step as i64);
                let s = smoothed.map_or(*loss, |m| 0.95 * m + 0.05 * loss);
                smoothed = Some(s);
                let rate = window.map_or(0.0, |(t, s0)| (*step - s0) as f64 / t.elapsed().as_secs_f64().max(1e-9));
                bar.set_position(*step);
                bar.set_message(format!("loss {s:.4} lr {lr:.1e} {rate:.2} steps/s"));
            }
            StyleEvent::Samples { step, path } => {
                let _ = tracker.log_artifact(&tracked, path, Some("samples"));
                bar.println(format!("samples at step {step}: {}", path.display()))
            }
            StyleEvent::Note(m) => bar.println(m.clone()),
        }
        !stop.load(Ordering::SeqCst)
    });
    bar.finish_and_clear();
    match result {
        Ok(out) => {
            let mut card = StyleCard::new(&cfg, &report, &model_dir, &out, started.elapsed().as_secs_f64());
            println!("measuring the style: base model vs the new style on the same prompts and seeds");
            let prompts = if args.eval_prompts.is_empty() {
                atelier_engine::style::metrics::starter_eval_prompts(&trigger)
            } else {
                args.eval_prompts.clone()
            };
            card.metrics = measure_style(&sd, &out.kohya, &data.images, &prompts, &run_dir)?;
            library.write_card(&args.name, &card)?;
            let step = args.steps as i64;
            tracker.log_metric(&tracked, "fit_loss_base", out.fit_before, step)?;
            tracker.log_metric(&tracked, "fit_loss_adapter", out.fit_after, step)?;
            for who in ["base", "style"] {
                if let Some(serde_json::Value::Object(m)) = card.metrics.get(who) {
                    for (k, v) in m {
                        if let Some(v) = v.as_f64() {
                            tracker.log_metric(&tracked, &format!("{who}_{k}"), v, step)?;
                        }
                    }
                }
            }
            for f in [out.kohya.clone(), out.diffusers.clone(), run_dir.join("compare.png"), run_dir.join("loss.png"), run_dir.join("card.json")] {
                if f.is_file() {
                    tracker.log_artifact(&tracked, &f, None)?;
                }
            }
            tracker.end_run(&tracked, atelier_server::tracking::RunStatus::Finished)?;
            println!(
                "trained style {} in {:.1} min: dataset fit loss {:.5} (base) -> {:.5} (with the style)",
                args.name,
                started.elapsed().as_secs_f64() / 60.0,
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
                run_dir.join("compare.png").display()
            );
            println!("adapter (kohya): {}\nadapter (diffusers): {}", out.kohya.display(), out.diffusers.display());
            println!("use it in a prompt as <lora:{}:1> {trigger}", args.name);
            Ok(())
        }
        Err(atelier_engine::Error::Cancelled) => {
            tracker.end_run(&tracked, atelier_server::tracking::RunStatus::Killed)?;
            eprintln!("stopped with a checkpoint in {}. Run the same command again to resume.", run_dir.display());
            std::process::exit(130);
        }
        Err(e) => {
            tracker.end_run(&tracked, atelier_server::tracking::RunStatus::Failed)?;
            Err(e).with_context(|| format!("training style {}", args.name))
        }
    }
}

/// Where the styles that ship with Atelier live (relative to the repository root).
pub const SHIPPED_STYLES: &str = "models/styles";

/// File of a style folder holding the training images' mean Gram matrices.
pub const STYLE_GRAMS: &str = "style_grams.safetensors";

/// Seed of the first evaluation image; image i uses EVAL_SEED + i.
pub const EVAL_SEED: u64 = 2000;

/// Renders the evaluation prompts with the base model and with the style (weight 1),
/// writes `compare.png` (base row over style row) and returns the metrics of both.
pub fn measure_style(
    sd: &StableDiffusion,
    adapter: &std::path::Path,
    training_images: &[image::RgbImage],
    prompts: &[String],
    run_dir: &std::path::Path,
) -> Result<serde_json::Value> {
    use atelier_engine::style::metrics::{mean_grams, measure, render_set};
    let lora = sd.bind_lora(&Arc::new(atelier_engine::lora::LoraAdapter::load(adapter)?))?;
    let reference = mean_grams(sd.vae(), training_images)?;
    // Kept with the style, so that it can be measured again without its dataset.
    let grams: std::collections::HashMap<String, candle_core::Tensor> =
        reference.iter().enumerate().map(|(i, g)| (format!("layer{i}"), g.clone())).collect();
    atelier_engine::model::save_safetensors_atomic(&grams, &run_dir.join(STYLE_GRAMS))?;
    let base_images = render_set(sd, None, prompts, EVAL_SEED)?;
    let style_images = render_set(sd, Some((&lora, 1.0)), prompts, EVAL_SEED)?;
    let base = measure(sd.vae(), &base_images, &reference)?;
    let style = measure(sd.vae(), &style_images, &reference)?;
    let mut all = base_images;
    all.extend(style_images);
    let sheet = atelier_engine::starter::eval::contact_sheet(&all, prompts.len().max(1));
    let path = run_dir.join("compare.png");
    let tmp = run_dir.join("compare.png.tmp");
    sheet.save_with_format(&tmp, image::ImageFormat::Png)?;
    std::fs::rename(&tmp, &path)?;
    Ok(serde_json::json!({
        "prompts": prompts,
        "first_seed": EVAL_SEED,
        "base": base,
        "style": style,
        "formulas": "see atelier_engine::style::metrics (README: Styles)",
    }))
}
