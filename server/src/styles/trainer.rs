//! Style training from the web: a training is a task in the long lane of the one work
//! queue ([`crate::queue`]), run with the trainer's own copy of the model (generation keeps
//! its own), pausing between steps while generations run.
//!
//! On disk, under `DATA/trainings/`: `datasets/` (see [`super::datasets`]) and
//! `runs/ID.json`, each training's status (settings, step, loss history, samples), written
//! atomically, so a restarted server lists its trainings; one that was running comes back
//! as stopped and resumes from its last checkpoint.
//!
//! The training itself writes into the style's folder in the library, exactly as
//! `atelier train-style` does ([`crate::styles::training::run_training`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use app::dto::{DatasetSummary, StyleTrainingRequest, TrainingSample, TrainingState, TrainingStatus};
use atelier_engine::pipeline::StableDiffusion;
use atelier_engine::style::train::StyleEvent;
use tokio::sync::watch;

use super::datasets::Datasets;
use crate::queue::{Ctx, JsonDir, Lane, Layout, Phase, Queue, QueueError, Task, Workers};
use crate::styles::training::{run_training, RunError, RunEvent};
use crate::styles::{check_name, StyleLibrary};
use crate::ApiError;

/// Loss points kept per training for the chart.
const MAX_LOSS_POINTS: usize = 300;
/// How often a running training's status is written to disk.
const PERSIST_EVERY: Duration = Duration::from_secs(2);
/// Most trainings that may wait at once.
pub const MAX_QUEUED: usize = 16;

/// Where the trainer gets its model.
#[derive(Clone)]
pub struct ModelSource {
    pub dir: PathBuf,
    pub device: candle_core::Device,
    /// Side of the square images the model makes (datasets are checked against it).
    pub resolution: u32,
    /// How much memory this process may use (`--max-memory`); trainings are checked
    /// against it before they are queued.
    pub budget: atelier_engine::memory::MemoryBudget,
}

/// The style-training task kind.
pub struct StyleTraining {
    library: Arc<StyleLibrary>,
    tracking: PathBuf,
    model: ModelSource,
    datasets: Arc<Datasets>,
    /// The model, loaded by the first training and freed when the long lane is idle.
    loaded: Mutex<Option<Arc<StableDiffusion>>>,
}

impl Task for StyleTraining {
    type Input = ();
    type Status = TrainingStatus;
    const NOUN: &'static str = "training";
    const LANE: Lane = Lane::Long;
    const MAX_WAITING: usize = MAX_QUEUED;

    fn id(s: &TrainingStatus) -> &str {
        &s.id
    }

    fn phase(s: &TrainingStatus) -> Phase {
        match s.state {
            TrainingState::Queued { .. } => Phase::Waiting,
            TrainingState::Preparing | TrainingState::Running | TrainingState::Measuring | TrainingState::Stopping => Phase::Running,
            TrainingState::Stopped | TrainingState::Done { .. } | TrainingState::Failed { .. } => Phase::Ended,
        }
    }

    fn set_waiting(s: &mut TrainingStatus, position: usize) {
        s.state = TrainingState::Queued { position };
    }

    fn set_started(s: &mut TrainingStatus, _input: Option<&()>) {
        s.state = TrainingState::Preparing;
        s.note = Some("loading the model and the images".into());
    }

    fn set_cancelled(s: &mut TrainingStatus) {
        s.state = TrainingState::Stopped;
    }

    fn set_stopping(s: &mut TrainingStatus) {
        s.state = TrainingState::Stopping;
    }

    fn set_interrupted(s: &mut TrainingStatus) {
        s.steps_per_s = None;
        s.eta_s = None;
        s.note = Some(if matches!(s.state, TrainingState::Queued { .. }) {
            "the server stopped before this training started; resume starts it".into()
        } else {
            "the server stopped during this training; resume continues from its last checkpoint".into()
        });
        s.state = TrainingState::Stopped;
    }

    fn set_crashed(s: &mut TrainingStatus, message: &str) {
        s.state = TrainingState::Failed { message: message.into() };
        s.steps_per_s = None;
        s.eta_s = None;
    }

    fn can_resume(s: &TrainingStatus) -> bool {
        s.state.can_resume()
    }

    fn run(&self, _input: Option<()>, ctx: &mut Ctx<'_, Self>) {
        let request = ctx.status().request;
        // The engine's largest buffers check this limit: an allocation that would not fit
        // fails the training with a message instead of aborting the process.
        let limit = self.model.budget.limit;
        let outcome = atelier_engine::memory::with_limit(Some(limit), || self.run_one(&request, ctx));
        crate::monitoring::metrics::training_ended();
        let state = match outcome {
            Ok(style) => TrainingState::Done { style },
            Err(RunError::Stopped) => TrainingState::Stopped,
            Err(RunError::Dataset(m)) => TrainingState::Failed { message: m },
            Err(e) => {
                let message = crate::error::report(&e);
                tracing::error!(training = %ctx.status().id, error = %message, "style training failed");
                TrainingState::Failed { message }
            }
        };
        ctx.save(|s| {
            s.note = match &state {
                TrainingState::Stopped => Some(format!("stopped at step {} with a checkpoint; resume continues from it", s.step)),
                _ => None,
            };
            s.state = state;
            s.steps_per_s = None;
            s.eta_s = None;
        });
    }

    fn idle(&self) {
        // Nothing waiting: free the model's memory until the next training.
        *self.loaded.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl StyleTraining {
    fn model(&self) -> Result<Arc<StableDiffusion>, RunError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sd) = loaded.as_ref() {
            return Ok(sd.clone());
        }
        let began = Instant::now();
        let sd = Arc::new(StableDiffusion::load(&self.model.dir, &self.model.device)?);
        crate::monitoring::metrics::set_model_load_seconds("training", began.elapsed());
        *loaded = Some(sd.clone());
        Ok(sd)
    }

    fn run_one(&self, request: &StyleTrainingRequest, ctx: &mut Ctx<'_, Self>) -> Result<String, RunError> {
        let sd = self.model()?;
    let images = self.datasets.dir(&request.dataset_id).map_err(|_| {
            RunError::Dataset(format!("the uploaded dataset {} is gone: upload the images again and start a new training", request.dataset_id))
        })?;
        let stride = (request.steps as usize).div_ceil(MAX_LOSS_POINTS).max(1) as u64;
        let mut window: Option<(Instant, u64)> = None;
        let mut last_save = Instant::now();
        let mut progress = |ev: &RunEvent| -> bool {
            match ev {
                RunEvent::Report(r) => ctx.update(|s| s.note = Some(format!("{} usable images; preparing", r.items.len()))),
                RunEvent::Prepared { hash, images, resolution } => ctx.update(|s| {
                    s.note = Some(format!("dataset {hash}: {images} images at {resolution}×{resolution}"));
                }),
                RunEvent::Train(StyleEvent::Start { step, total }) => {
                    window = Some((Instant::now(), *step));
                    let (step, total) = (*step, *total);
                    ctx.save(|s| {
                        // A resumed run restarts at its checkpoint: forget what came after it.
                        s.losses.retain(|(k, _)| *k <= step);
                        s.samples.retain(|x| x.step <= step);
                        s.step = step;
                        s.total = total;
                        if !matches!(s.state, TrainingState::Stopping) {
                            s.state = TrainingState::Running;
                        }
                        s.note = (step > 0).then(|| format!("resumed at step {step}"));
                    });
                }
                RunEvent::Train(StyleEvent::Step { step, total, loss, .. }) => {
                    let (step, total, loss) = (*step, *total, *loss);
                    let rate = window.map(|(t, s0)| (step - s0) as f64 / t.elapsed().as_secs_f64().max(1e-9));
                    crate::monitoring::metrics::training_step(rate);
                    let save = last_save.elapsed() > PERSIST_EVERY || step == total;
                    if save {
                        last_save = Instant::now();
                    }
                    let apply = |s: &mut TrainingStatus| {
                        s.step = step;
                        s.total = total;
                        s.loss = Some(s.loss.map_or(loss, |m| 0.9 * m + 0.1 * loss));
                        if step % stride == 0 || step == total {
                            s.losses.push((step, loss));
                        }
                        s.steps_per_s = rate;
                        s.eta_s = rate.filter(|r| *r > 0.0).map(|r| (total - step) as f64 / r);
                    };
                    if save {
                        ctx.save(apply);
                    } else {
                        ctx.update(apply);
                    }
                    // Generations go first: pause here while one waits or runs, and say so.
                    let paused = ctx.wait_turn(|| {
                        ctx.update(|s| {
                            s.note = Some("paused while generations run (they go first); continues after them".into());
                            s.eta_s = None;
                        })
                    });
                    if paused {
                        // The pause is not training speed: measure from here.
                        window = Some((Instant::now(), step));
                        ctx.update(|s| s.note = None);
                    }
                }
                RunEvent::Train(StyleEvent::Samples { step, .. }) => {
                    let step = *step;
                    ctx.save(|s| {
                        s.samples.retain(|x| x.step != step);
                        s.samples.push(TrainingSample { step, url: format!("/api/style-trainings/{}/samples/{step}.png", s.id) });
                    });
                }
                RunEvent::Train(StyleEvent::Note(m)) => ctx.update(|s| s.note = Some(m.clone())),
                RunEvent::Measuring => ctx.save(|s| {
                    s.state = TrainingState::Measuring;
                    s.steps_per_s = None;
                    s.eta_s = None;
                    s.note = Some("rendering the base model and the style on the same prompts and seeds".into());
                }),
            }
            !ctx.is_cancelled()
        };
        run_training(request, &images, &sd, &self.model.dir, &self.library, &self.tracking, &mut progress)?;
        Ok(request.name.clone())
    }
}

/// The web trainer: the datasets and the queue of trainings.
pub struct Trainer {
    queue: Queue<StyleTraining>,
}

impl Trainer {
    /// Opens the trainer's folder `root` (listing earlier trainings) on `workers`.
    pub fn open(root: &Path, library: Arc<StyleLibrary>, tracking: PathBuf, model: ModelSource, workers: &Workers) -> Result<Self, ApiError> {
        let internal = |e: &dyn std::fmt::Display| ApiError::Internal(format!("{}: {e}", root.display()));
        let datasets = Arc::new(Datasets::open(root, model.resolution).map_err(|e| internal(&e))?);
        let store = JsonDir::open(root.join("runs"), Layout::Flat).map_err(|e| internal(&e))?;
        let task = StyleTraining { library, tracking, model, datasets, loaded: Mutex::new(None) };
        Ok(Self { queue: Queue::open(task, store, workers)? })
    }

    /// The model the trainer loads.
    pub fn model_source(&self) -> &ModelSource {
        &self.queue.task().model
    }

    /// The uploaded datasets.
    pub fn datasets(&self) -> &Datasets {
        &self.queue.task().datasets
    }

    /// Adds uploaded files to a dataset (see [`Datasets::add_files`]).
    pub fn add_files(&self, into: Option<&str>, files: Vec<(String, PathBuf)>) -> Result<DatasetSummary, ApiError> {
        self.datasets().add_files(into, files)
    }

    pub fn start(&self, mut req: StyleTrainingRequest) -> Result<TrainingStatus, ApiError> {
        let invalid = |field: &str, message: String| ApiError::Invalid { field: field.into(), message };
        req.name = req.name.trim().to_string();
        req.trigger = req.trigger.trim().to_string();
        check_name(&req.name).map_err(|e| invalid("name", e.to_string()))?;
        if self.queue.task().library.find(&req.name).is_some_and(|s| s.name.eq_ignore_ascii_case(&req.name)) {
            return Err(invalid("name", format!("a style called {} already exists: delete or rename it, or choose another name", req.name)));
        }
        if req.trigger.chars().count() > 64 || req.trigger.contains(['\n', '<', '>']) {
            return Err(invalid("trigger", "use one short word or phrase (at most 64 characters, no line breaks or < >)".into()));
        }
        let ranges: [(&str, f64, f64, f64); 5] = [
            ("steps", req.steps as f64, 1.0, 100_000.0),
            ("rank", req.rank as f64, 1.0, 256.0),
            ("batch", req.batch as f64, 1.0, 64.0),
            ("lr", req.lr, 1e-7, 1.0),
            ("min_snr_gamma", req.min_snr_gamma, 0.0, 100.0),
        ];
        for (field, v, lo, hi) in ranges {
            if !(lo..=hi).contains(&v) || !v.is_finite() {
                return Err(invalid(field, format!("{v} is outside {lo}..={hi}")));
            }
        }
        if req.alpha.is_some_and(|a| !(a > 0.0 && a <= 1024.0)) {
            return Err(invalid("alpha", "must be in (0, 1024]".into()));
        }
        if !(0.0..=1.0).contains(&req.noise_offset) {
            return Err(invalid("noise_offset", "must be in 0..=1".into()));
        }
        let summary = self.datasets().dataset(&req.dataset_id).map_err(|e| match e {
            ApiError::NotFound { .. } => invalid("dataset_id", format!("no uploaded dataset {:?}: upload the images first", req.dataset_id)),
            other => other,
        })?;
        if summary.images.len() < req.min_images.max(1) {
            return Err(invalid(
                "dataset_id",
                format!("{} usable image(s), at least {} are needed: add more images", summary.images.len(), req.min_images.max(1)),
            ));
        }
        let m = &self.queue.task().model;
        let dtype_bytes = atelier_engine::pipeline::compute_dtype(&m.device).size_in_bytes() as u64;
        atelier_engine::memory::admit_training(&m.dir, dtype_bytes, m.resolution as usize, req.batch as usize, summary.images.len(), &m.budget)?;
        let name = req.name.clone();
        let status = TrainingStatus {
            id: uuid::Uuid::new_v4().to_string(),
            total: req.steps,
            request: req,
            created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            state: TrainingState::Queued { position: 1 },
            step: 0,
            loss: None,
            steps_per_s: None,
            eta_s: None,
            losses: Vec::new(),
            samples: Vec::new(),
            note: None,
        };
        let status = self.queue.submit_unless(status, Some(()), |other| {
            (other.request.name.eq_ignore_ascii_case(&name) && !matches!(other.state, TrainingState::Done { .. })).then(|| {
                invalid("name", format!("training {} already trains {}: resume or delete it, or choose another name", other.id, other.request.name))
            })
        })?;
        tracing::info!(training = %status.id, name = %status.request.name, "style training queued");
        Ok(status)
    }

    /// Stops a training: a queued one at once, a running one after writing a checkpoint.
    pub fn stop(&self, id: &str) -> Result<TrainingStatus, ApiError> {
        Ok(self.queue.cancel(id)?)
    }

    /// Queues a stopped (or failed) training again; it continues from its last checkpoint.
    pub fn resume(&self, id: &str) -> Result<TrainingStatus, ApiError> {
        self.queue.resume(id, |s| s.note = Some("resuming from the last checkpoint".into())).map_err(|e| match e {
            QueueError::WrongState { .. } => {
                let state = self.queue.status(id).map(|s| s.state.name()).unwrap_or("gone");
                ApiError::Invalid { field: "state".into(), message: format!("a training that is {state} cannot be resumed") }
            }
            other => other.into(),
        })
    }

    /// Forgets a training that is not running; a training that did not finish also loses
    /// its checkpoints (the style folder without an adapter).
    pub fn delete(&self, id: &str) -> Result<(), ApiError> {
        let status = self.queue.remove(id).map_err(|e| match e {
            QueueError::WrongState { .. } => ApiError::Invalid { field: "state".into(), message: "stop the training before deleting it".into() },
            other => other.into(),
        })?;
        if !matches!(status.state, TrainingState::Done { .. }) {
            let library = &self.queue.task().library;
            let dir = library.root().join(&status.request.name);
            let adapter = dir.join(format!("{}.safetensors", status.request.name));
            if check_name(&status.request.name).is_ok() && dir.is_dir() && !adapter.exists() {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        Ok(())
    }

    /// Every training, newest first.
    pub fn list(&self) -> Vec<TrainingStatus> {
        self.queue.list()
    }

    pub fn status(&self, id: &str) -> Result<TrainingStatus, ApiError> {
        Ok(self.queue.status(id)?)
    }

    /// A receiver that sees every later status change.
    pub fn subscribe(&self, id: &str) -> Result<watch::Receiver<TrainingStatus>, ApiError> {
        Ok(self.queue.subscribe(id)?)
    }

    /// The sample sheet a training wrote at `step`.
    pub fn sample_path(&self, id: &str, step: u64) -> Result<PathBuf, ApiError> {
        let status = self.status(id)?;
        let path = self.queue.task().library.root().join(&status.request.name).join("samples").join(format!("step-{step:05}.png"));
        if status.samples.iter().any(|s| s.step == step) && path.is_file() {
            Ok(path)
        } else {
            Err(ApiError::NotFound { what: "sample sheet", id: format!("{id}/{step}") })
        }
    }
}
