//! One style training from start to finish, shared by `atelier train-style` and the web
//! trainer: read and check the images, prepare the dataset, record the run in the
//! experiment store, train (resuming from the newest checkpoint in the style's folder),
//! then measure the style against the base model and write its card into the library.

use std::path::{Path, PathBuf};
use std::time::Instant;

use app::dto::StyleTrainingRequest;
use atelier_engine::pipeline::StableDiffusion;
use atelier_engine::style::dataset::{prepare, scan, DatasetReport};
use atelier_engine::style::metrics::{measure_style, COMPARE_PNG};
use atelier_engine::style::train::{train_style, StyleEvent, StyleOutput, StyleTrainConfig};

use crate::styles::{LibraryError, StyleCard, StyleLibrary};
use crate::tracking::{RunStatus, Tracker, TrackingError};

/// Where the styles that ship with Atelier live (relative to the repository root).
pub const SHIPPED_STYLES: &str = "models/styles";

/// File of a style folder holding the training images' mean Gram matrices.
pub use atelier_engine::style::metrics::STYLE_GRAMS;

/// Seed of the first evaluation image; image i uses EVAL_SEED + i.
pub const EVAL_SEED: u64 = 2000;

/// What a training reports while it runs. Returning `false` from the callback stops it
/// (with a checkpoint, when training has started).
pub enum RunEvent<'a> {
    /// The dataset was read: what will be trained on and what was left out.
    Report(&'a DatasetReport),
    /// The dataset was prepared (cropped, resized, hashed).
    Prepared { hash: &'a str, images: usize, resolution: u32 },
    Train(&'a StyleEvent),
    /// Training finished; rendering the before/after comparison.
    Measuring,
}

/// Why a training ended without a style.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The images cannot be trained on; the message says what to change.
    #[error("{0}")]
    Dataset(String),
    /// Stopped on request, with a checkpoint to resume from.
    #[error("stopped")]
    Stopped,
    /// The style's folder or card (a refused name, a failed write).
    #[error(transparent)]
    Library(#[from] LibraryError),
    /// The image folder could not be read.
    #[error("reading the images in {path}")]
    Scan {
        path: PathBuf,
        #[source]
        source: atelier_engine::Error,
    },
    /// Training itself failed (the tracked run is marked failed).
    #[error("training style {name}")]
    Train {
        name: String,
        #[source]
        source: atelier_engine::Error,
    },
    /// Loading the model, preparing the dataset or measuring the style failed.
    #[error(transparent)]
    Engine(#[from] atelier_engine::Error),
    /// The experiment store could not record the run.
    #[error(transparent)]
    Tracking(#[from] TrackingError),
    /// The style folder's link to its tracked run could not be written.
    #[error("writing {path}")]
    RunFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The training settings could not be recorded as the run's params.
    #[error("recording the training settings")]
    Settings(#[source] serde_json::Error),
}

/// A finished training.
pub struct Finished {
    pub card: StyleCard,
    pub output: StyleOutput,
    pub dir: PathBuf,
    pub seconds: f64,
    /// The model-registry version this training registered (`None` when registering
    /// failed; the style itself is complete then, and the failure is logged).
    pub version: Option<i64>,
}

/// The engine's configuration for `req`, on the model `sd` and the prepared dataset.
pub fn train_config(req: &StyleTrainingRequest, sd: &StableDiffusion, dataset_hash: &str, captions: &[String]) -> StyleTrainConfig {
    let mut cfg = StyleTrainConfig::new(&req.name, req.trigger_word(), req.steps);
    cfg.rank = req.rank;
    cfg.alpha = req.alpha.unwrap_or(req.rank as f64);
    cfg.optim.lr = req.lr;
    cfg.batch = req.batch;
    cfg.seed = req.seed;
    cfg.text_encoder = req.text_encoder;
    cfg.convs = req.convs;
    cfg.min_snr_gamma = req.min_snr_gamma;
    cfg.noise_offset = req.noise_offset;
    cfg.flip = req.flip;
    cfg.checkpoint_every = req.checkpoint_every.max(1);
    cfg.sample_every = req.sample_every;
    cfg.sample_prompts = if req.sample_prompts.is_empty() { captions.iter().take(4).cloned().collect() } else { req.sample_prompts.clone() };
    cfg.base_model_hash = sd.model_hash().to_string();
    cfg.dataset_hash = dataset_hash.to_string();
    cfg
}

/// Trains the style `req.name` on the images in `images` into `library`, recording the
/// run in the experiment store at `tracking`. Re-running after a stop resumes.
pub fn run_training(
    req: &StyleTrainingRequest,
    images: &Path,
    sd: &StableDiffusion,
    model_dir: &Path,
    library: &StyleLibrary,
    tracking: &Path,
    progress: &mut dyn FnMut(&RunEvent) -> bool,
) -> Result<Finished, RunError> {
    let run_dir = library.style_dir(&req.name)?;
    let trigger = req.trigger_word().to_string();
    let resolution = sd.default_size() as u32;
    let report = scan(images, &trigger, resolution, req.min_images)
        .map_err(|source| RunError::Scan { path: images.to_path_buf(), source })?;
    if !progress(&RunEvent::Report(&report)) {
        return Err(RunError::Stopped);
    }
    if !report.is_usable() {
        return Err(RunError::Dataset(format!(
            "{} usable image(s) in {}, at least {} are needed: add more images (or lower the minimum)",
            report.items.len(),
            images.display(),
            report.min_images
        )));
    }
    let data = prepare(&report)?;
    if !progress(&RunEvent::Prepared { hash: &data.hash, images: data.images.len(), resolution }) {
        return Err(RunError::Stopped);
    }
    let cfg = train_config(req, sd, &data.hash, &data.captions);
    // The DVC version of the pictures (dataset.md5, .version, .id), so the style traces to them.
    let dataset_tags = match crate::datasets::training_dataset(images) {
        Ok(d) => d.tags(),
        Err(e) => {
            tracing::warn!(folder = %images.display(), error = %e, "the dataset version is not recorded");
            Vec::new()
        }
    };

    let tracker = Tracker::open(tracking)?;
    let (base_model, dataset_dir, dataset_images, device) =
        (model_dir.display().to_string(), images.display().to_string(), data.images.len().to_string(), crate::tracking::device_tag(sd.device()));
    let mut tags: Vec<(&str, &str)> = vec![
        ("style", req.name.as_str()),
        ("trigger", trigger.as_str()),
        ("dataset_hash", data.hash.as_str()),
        ("base_model_hash", sd.model_hash()),
        ("base_model", &base_model),
        ("dataset_dir", &dataset_dir),
        ("dataset_images", &dataset_images),
        ("device", &device),
        ("dtype", "f32"),
    ];
    tags.extend(dataset_tags.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let tracked = tracked_run(&tracker, &run_dir, &cfg, &tags)?;

    let started = Instant::now();
    let (mut smoothed, mut last_step) = (None::<f64>, Instant::now());
    let result = train_style(sd, &data, &cfg, &run_dir, &mut |ev| {
        match ev {
            StyleEvent::Start { .. } => last_step = Instant::now(),
            StyleEvent::Step { step, loss, lr, .. } => {
                // Smoothed as the CLI's progress bar and the Train page show it (EMA, 0.95).
                let s = smoothed.map_or(*loss, |m| 0.95 * m + 0.05 * loss);
                smoothed = Some(s);
                let seconds = last_step.elapsed().as_secs_f64();
                last_step = Instant::now();
                let step = *step as i64;
                let _ = tracker.log_metric(&tracked, "loss", *loss, step);
                let _ = tracker.log_metric(&tracked, "smoothed_loss", s, step);
                let _ = tracker.log_metric(&tracked, "lr", *lr, step);
                let _ = tracker.log_metric(&tracked, "seconds_per_step", seconds, step);
                if step % 10 == 0 || step as u64 == cfg.steps {
                    if let Some(peak) = atelier_engine::memory::peak_rss() {
                        let _ = tracker.log_metric(&tracked, "peak_rss_mib", peak as f64 / 1_048_576.0, step);
                    }
                }
            }
            StyleEvent::Samples { path, step } => {
                let _ = tracker.log_image(&tracked, path, "samples", *step as i64);
            }
            _ => {}
        }
        progress(&RunEvent::Train(ev))
    });
    let output = match result {
        Ok(out) => out,
        Err(atelier_engine::Error::Cancelled) => {
            tracker.end_run(&tracked, RunStatus::Killed)?;
            return Err(RunError::Stopped);
        }
        Err(e) => {
            tracker.end_run(&tracked, RunStatus::Failed)?;
            return Err(RunError::Train { name: req.name.clone(), source: e });
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    progress(&RunEvent::Measuring);
    let mut card = StyleCard::new(&cfg, &report, model_dir, &output, seconds);
    let prompts = if req.eval_prompts.is_empty() {
        atelier_engine::style::metrics::starter_eval_prompts(&trigger)
    } else {
        req.eval_prompts.clone()
    };
    let measured = measure_style(sd, &output.kohya, &data.images, &prompts, EVAL_SEED, &run_dir)?;
    card.metrics = serde_json::json!({
        "prompts": prompts,
        "first_seed": EVAL_SEED,
        "base": measured.base,
        "style": measured.style,
        "formulas": "see atelier_engine::style::metrics (README: Styles)",
    });
    library.write_card(&req.name, &card)?;
    let step = req.steps as i64;
    tracker.log_metric(&tracked, "fit_loss_base", output.fit_before, step)?;
    tracker.log_metric(&tracked, "fit_loss_adapter", output.fit_after, step)?;
    for (k, v) in card_measures(&card) {
        tracker.log_metric(&tracked, &k, v, step)?;
    }
    if let Ok(json) = serde_json::to_vec_pretty(&report) {
        let path = run_dir.join("dataset_report.json");
        if atelier_engine::files::write_atomic(&path, &json).is_ok() {
            tracker.log_artifact(&tracked, &path, None)?;
        }
    }
    let files = ["loss.png", "loss.csv", "card.json", "training_config.json", "fit.json"].map(|f| run_dir.join(f));
    for f in [output.kohya.clone(), output.diffusers.clone(), run_dir.join(COMPARE_PNG)].into_iter().chain(files) {
        if f.is_file() {
            tracker.log_artifact(&tracked, &f, None)?;
        }
    }
    tracker.end_run(&tracked, RunStatus::Finished)?;
    let version = match register(&tracker, &cfg, &card, &output, &run_dir, &tracked, &model_dir.display().to_string(), data.images.len(), &dataset_tags) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(style = %req.name, error = %crate::error::report(&e), "the style is trained but could not be registered");
            None
        }
    };
    Ok(Finished { card, output, dir: run_dir, seconds, version })
}

/// The card's before/after measurements, as the run logs them and the registry tags them:
/// `base_KEY` and `style_KEY` for every number measured, and `similarity_gain` (style
/// similarity with the style minus without).
fn card_measures(card: &StyleCard) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for who in ["base", "style"] {
        if let Some(serde_json::Value::Object(m)) = card.metrics.get(who) {
            out.extend(m.iter().filter_map(|(k, v)| Some((format!("{who}_{k}"), v.as_f64()?))));
        }
    }
    if let (Some(b), Some(s)) = (card.metrics["base"]["style_similarity"].as_f64(), card.metrics["style"]["style_similarity"].as_f64()) {
        out.push(("similarity_gain".into(), s - b));
    }
    out
}

/// Registers the trained style as a new version of its registered model, with its
/// metadata as version tags; returns the version number.
#[allow(clippy::too_many_arguments)]
fn register(
    tracker: &Tracker,
    cfg: &StyleTrainConfig,
    card: &StyleCard,
    output: &StyleOutput,
    run_dir: &Path,
    run: &str,
    base_model: &str,
    images: usize,
    dataset_tags: &[(String, String)],
) -> Result<i64, crate::tracking::TrackingError> {
    let mut tags: Vec<(String, String)> = vec![
        ("trigger".into(), cfg.trigger.clone()),
        ("base_model".into(), base_model.to_string()),
        ("base_model_hash".into(), cfg.base_model_hash.clone()),
        ("dataset_hash".into(), cfg.dataset_hash.clone()),
        ("dataset_images".into(), images.to_string()),
        ("rank".into(), cfg.rank.to_string()),
        ("alpha".into(), cfg.alpha.to_string()),
        ("targets".into(), format!("unet attention{}{}", if cfg.convs { " + convs" } else { "" }, if cfg.text_encoder { " + text encoder" } else { "" })),
        ("steps".into(), cfg.steps.to_string()),
        ("run_id".into(), run.to_string()),
    ];
    tags.extend(dataset_tags.iter().cloned());
    tags.extend(card_measures(card).into_iter().map(|(k, v)| (k, format!("{v:.6}"))));
    // The training images' Grams go with the version: monitoring scores served images
    // against them (monitoring::drift).
    let files: Vec<PathBuf> = [output.kohya.clone(), output.diffusers.clone(), run_dir.join("card.json"), run_dir.join(STYLE_GRAMS)].into_iter().filter(|f| f.is_file()).collect();
    Ok(tracker.register_version(&cfg.name, "style", &files, Some(run), &tags)?.version)
}

/// The tracked run of the style in `run_dir`: the one a stopped training started
/// (reopened), else a new run in experiment "styles" with `cfg` as params and `tags`.
fn tracked_run(tracker: &Tracker, run_dir: &Path, cfg: &StyleTrainConfig, tags: &[(&str, &str)]) -> Result<String, RunError> {
    let run_file = run_dir.join("tracking_run");
    if let Some(id) = std::fs::read_to_string(&run_file).ok().map(|s| s.trim().to_string()) {
        if tracker.run(&id)?.is_some() {
            tracker.reopen_run(&id)?;
            return Ok(id);
        }
    }
    let exp = tracker.experiment("styles")?;
    let id = tracker.start_run(exp, &cfg.name)?;
    std::fs::write(&run_file, &id).map_err(|source| RunError::RunFile { path: run_file.clone(), source })?;
    for (k, v) in crate::tracking::flatten_params(&serde_json::to_value(cfg).map_err(RunError::Settings)?) {
        tracker.log_param(&id, &k, &v)?;
    }
    for (k, v) in tags {
        tracker.set_tag(&id, k, v)?;
    }
    Ok(id)
}
