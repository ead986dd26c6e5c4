//! `atelier train-base`: trains the starter model from scratch (VAE, then text encoder
//! and UNet) into a diffusers folder, with a progress bar showing loss and steps/s.
//! Re-running the same command resumes from the newest checkpoint in `--out`;
//! Ctrl-C stops after the current step with a checkpoint written.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use atelier_server::tracking::record::Recorded;
use atelier_server::tracking::{RunStatus, Tracker};
use anyhow::{Context, Result};
use atelier_engine::starter::train::{train_base, Stage, TrainBaseConfig, TrainEvent};
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `atelier train-base`.
#[derive(Debug, clap::Args)]
pub struct TrainBaseArgs {
    /// Recorded as a run in experiment "train-base" (a resumed training continues its run).
    #[command(flatten)]
    pub track: super::Tracking,
    /// Output folder (diffusers layout); an unfinished run there is resumed.
    #[arg(long)]
    pub out: PathBuf,
    /// Diffusion (text encoder + UNet) training steps.
    #[arg(long, default_value_t = 2500)]
    pub steps: u64,
    /// VAE training steps.
    #[arg(long)]
    pub vae_steps: Option<u64>,
    /// Seed for data, initial weights and noise: the same seed and steps give the same model.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Diffusion batch size.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Steps between checkpoints.
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Fine-tune this starter-architecture model folder (its VAE is kept) instead of
    /// training from random weights, e.g. `--init-from models/starter --steps 5000`.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// With --init-from: train the VAE again, starting from that model's VAE (then the
    /// diffusion stage on its new latents), instead of keeping it.
    #[arg(long, requires = "init_from")]
    pub retrain_vae: bool,
    /// With --retrain-vae: train only the decoder, keeping the encoder and so the
    /// latent space (the UNet stays valid; use --steps 0 to skip the diffusion stage).
    #[arg(long, requires = "retrain_vae")]
    pub vae_decoder_only: bool,
    /// Weight of the VAE edge loss (L1 of pixel differences), which keeps edges sharp.
    #[arg(long)]
    pub vae_edge_weight: Option<f64>,
    /// Weight of the VAE detail loss (local Laplacian energy), which keeps sharpness,
    /// grain and blur distinguishable after decoding.
    #[arg(long)]
    pub vae_detail_weight: Option<f64>,
    /// Min-SNR-γ weighting of the diffusion loss (0: plain ε-MSE, which weighs the
    /// low-noise steps that decide fine detail, such as blur and grain, more).
    #[arg(long)]
    pub min_snr_gamma: Option<f64>,
    /// Peak learning rate of the VAE stage.
    #[arg(long)]
    pub vae_lr: Option<f64>,
    /// Folder with the CLIP tokenizer files (vocab.json, merges.txt).
    #[arg(long, default_value = "models/starter/tokenizer")]
    pub tokenizer: PathBuf,
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} {msg} {elapsed} eta {eta}")
        .expect("static template")
        .progress_chars("=> ")
}

/// The run of the training into `args.out`: the one a stopped training started (its id in
/// `OUT/training/tracking_run`), else a new one with the config as params.
fn base_run<'a>(t: &'a Tracker, args: &TrainBaseArgs, config: &TrainBaseConfig, device: &candle_core::Device) -> Result<Recorded<'a>> {
    let file = args.out.join("training").join("tracking_run");
    if let Some(id) = std::fs::read_to_string(&file).ok().map(|s| s.trim().to_string()) {
        if t.run(&id)?.is_some() {
            return Ok(t.reopen(&id)?);
        }
    }
    let mut params = serde_json::to_value(config)?;
    if let Some(o) = params.as_object_mut() {
        o.insert("out".into(), serde_json::json!(args.out));
    }
    let r = t.record("train-base", &format!("train-base {}", args.out.display()), &params, &super::run_tags(device))?;
    std::fs::create_dir_all(file.parent().unwrap_or(&args.out)).with_context(|| format!("creating {}", args.out.display()))?;
    atelier_engine::files::write_atomic(&file, r.run.as_bytes()).with_context(|| format!("writing {}", file.display()))?;
    Ok(r)
}

pub fn run(args: TrainBaseArgs) -> Result<()> {
    let mut config = TrainBaseConfig::recipe(args.seed, args.steps);
    if let Some(v) = args.vae_steps {
        config.vae_steps = v;
        config.vae_optim.total_steps = v;
    }
    if let Some(w) = args.vae_edge_weight {
        config.vae_edge_weight = w;
    }
    if let Some(w) = args.vae_detail_weight {
        config.vae_detail_weight = w;
    }
    config.vae_decoder_only = args.vae_decoder_only;
    if let Some(g) = args.min_snr_gamma {
        config.min_snr_gamma = g;
    }
    if let Some(lr) = args.vae_lr {
        config.vae_optim.lr = lr;
    }
    if let Some(b) = args.batch {
        config.batch = b;
    }
    if let Some(c) = args.checkpoint_every {
        config.checkpoint_every = c.max(1);
    }
    if let Some(dir) = &args.init_from {
        config.init_from = Some(
            atelier_engine::starter::train::InitFrom::new(dir)
                .with_context(|| format!("reading the model to fine-tune, {}", dir.display()))?
                .retraining_vae(args.retrain_vae),
        );
    }
    let device = crate::cli::device()?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst)).context("installing the Ctrl-C handler")?;
    }
    let tracker = args.track.open();
    let recorded = match &tracker {
        Some(t) => Some(base_run(t, &args, &config, &device)?),
        None => None,
    };
    let bar = ProgressBar::new(1);
    bar.set_style(bar_style());
    let mut window: Option<(Instant, u64)> = None;
    let mut smoothed: Option<f64> = None;
    let started = Instant::now();
    let result = train_base(&args.out, &args.tokenizer, &config, &device, &mut |ev| {
        match ev {
            TrainEvent::StageStart { stage, step, total } => {
                bar.set_prefix(stage.name());
                bar.set_length(*total);
                bar.set_position(*step);
                bar.reset_eta();
                window = Some((Instant::now(), *step));
                smoothed = None;
                if *step > 0 {
                    bar.println(format!("resuming the {} stage at step {step}", stage.name()));
                }
            }
            TrainEvent::Step { stage, step, total, loss, lr, .. } => {
                if let Some(r) = &recorded {
                    let name = stage.name();
                    let _ = r.metrics(&[(&format!("{name}_loss"), *loss), (&format!("{name}_lr"), *lr)], *step as i64);
                }
                let s = smoothed.map_or(*loss, |m| 0.95 * m + 0.05 * loss);
                smoothed = Some(s);
                let rate = window.map_or(0.0, |(t, s0)| (*step - s0) as f64 / t.elapsed().as_secs_f64().max(1e-9));
                bar.set_position(*step);
                bar.set_message(format!("loss {s:.4} lr {lr:.1e} {rate:.2} steps/s"));
                if step == total {
                    bar.println(format!("{} stage done: loss {s:.4}, {rate:.2} steps/s", stage.name()));
                }
            }
            TrainEvent::Note(msg) => bar.println(msg.clone()),
        }
        !stop.load(Ordering::SeqCst)
    });
    bar.finish_and_clear();
    if let Some(r) = recorded {
        match &result {
            Ok(summary) => {
                r.metric("scaling_factor", summary.scaling_factor, 0)?;
                r.metric("minutes", started.elapsed().as_secs_f64() / 60.0, 0)?;
                r.finish()?;
            }
            Err(atelier_engine::Error::Cancelled) => r.end(RunStatus::Killed)?,
            Err(_) => r.end(RunStatus::Failed)?,
        }
        args.track.finish();
    }
    match result {
        Ok(summary) => {
            println!(
                "trained the starter model into {} in {:.1} min (VAE latent scale {:.4}; final loss VAE {} / diffusion {})",
                summary.out.display(),
                started.elapsed().as_secs_f64() / 60.0,
                summary.scaling_factor,
                summary.vae_final_loss.map_or("-".into(), |l| format!("{l:.4}")),
                summary.diffusion_final_loss.map_or("-".into(), |l| format!("{l:.4}")),
            );
            println!("loss curves: {}", args.out.join("training").display());
            Ok(())
        }
        Err(atelier_engine::Error::Cancelled) => {
            let at = atelier_engine::starter::train::resume_point(&args.out)?;
            let (stage, step) = at.unwrap_or((Stage::Vae, 0));
            eprintln!("stopped; checkpoint at {} step {step}. Run the same command again to resume.", stage.name());
            std::process::exit(130);
        }
        Err(e) => Err(e).with_context(|| format!("training into {}", args.out.display())),
    }
}
