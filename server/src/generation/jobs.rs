//! Generations as queued tasks: each waits in the interactive lane of the one work
//! queue ([`crate::queue`]), runs on the worker that owns the model, and saves its images
//! into the gallery. Status goes out through the queue's `watch` channel (SSE and polls
//! see the latest state; a slow watcher skips steps). Records live in `DATA/jobs/ID.json`;
//! the newest [`KEEP_FINISHED`] ended jobs are kept.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use app::dto::{JobAccepted, JobState, JobStatus};
use atelier_engine::pipeline::{GenerateParams, StepProgress};

use crate::generation::gallery::{Gallery, NewImage};
use crate::generation::generator::{Admitted, Generator};
use crate::monitoring::metrics;
use crate::queue::{Ctx, Lane, Phase, Queue, Task};
use crate::ApiError;

/// Most generations that may wait at once; more are refused with 503.
pub const MAX_QUEUED: usize = 64;
/// Ended generations kept for status queries; older ones are forgotten.
pub const KEEP_FINISHED: usize = 256;

/// The generation task kind: the generator, the gallery it saves into, and the observed
/// speed (for `estimated_seconds`).
pub struct Generation {
    generator: Arc<dyn Generator>,
    gallery: Arc<Gallery>,
    /// Seconds per unit of [`work_units`], learned from finished jobs (moving average).
    seconds_per_unit: Mutex<Option<f64>>,
}

/// What a generation needs that its status does not hold.
pub struct GenerationInput {
    pub params: Box<GenerateParams>,
    pub admitted: Admitted,
    /// Extra `Key: value` pairs for the images' `parameters` chunk (e.g. a deployment's
    /// name and the style version it served).
    pub extra: Vec<(String, String)>,
}

/// The queue of generations.
pub type JobQueue = Queue<Generation>;

impl Generation {
    pub fn new(generator: Arc<dyn Generator>, gallery: Arc<Gallery>) -> Self {
        Self { generator, gallery, seconds_per_unit: Mutex::new(None) }
    }
}

impl Task for Generation {
    type Input = GenerationInput;
    type Status = JobStatus;
    const NOUN: &'static str = "job";
    const LANE: Lane = Lane::Interactive;
    const MAX_WAITING: usize = MAX_QUEUED;
    const KEEP_ENDED: Option<usize> = Some(KEEP_FINISHED);

    fn id(s: &JobStatus) -> &str {
        &s.job_id
    }

    fn phase(s: &JobStatus) -> Phase {
        match s.state {
            JobState::Queued { .. } => Phase::Waiting,
            JobState::Running { .. } => Phase::Running,
            _ => Phase::Ended,
        }
    }

    fn set_waiting(s: &mut JobStatus, position: usize) {
        s.state = JobState::Queued { position };
    }

    fn set_started(s: &mut JobStatus, input: Option<&GenerationInput>) {
        s.state = JobState::Running { step: 0, total: input.map_or(0, |i| i.params.steps) };
    }

    fn set_cancelled(s: &mut JobStatus) {
        s.state = JobState::Cancelled;
    }

    fn set_interrupted(s: &mut JobStatus) {
        s.state = JobState::Failed { message: "the server stopped before this generation finished; generate it again".into() };
    }

    fn set_crashed(s: &mut JobStatus, message: &str) {
        s.state = JobState::Failed { message: message.into() };
    }

    fn run(&self, input: Option<GenerationInput>, ctx: &mut Ctx<'_, Self>) {
        let Some(GenerationInput { params, admitted, extra }) = input else {
            ctx.save(|s| Self::set_interrupted(s));
            return;
        };
        let started = std::time::Instant::now();
        let cancel = ctx.cancel_flag();
        let mut last_step = started;
        let mut on_step = |p: &StepProgress| {
            metrics::generation_step(last_step.elapsed());
            last_step = std::time::Instant::now();
            if cancel.load(Ordering::SeqCst) {
                return false;
            }
            let preview = p.preview.as_ref().and_then(data_url);
            ctx.update(|s| {
                s.state = JobState::Running { step: p.step, total: p.total };
                if preview.is_some() {
                    s.preview = preview;
                }
            });
            true
        };
        // The engine's largest buffers check the job's memory limit first, so a request
        // that slipped past admission fails here with a message instead of aborting.
        let result = atelier_engine::memory::with_limit(admitted.limit, || self.generator.generate(&params, &mut on_step));
        let state = match result {
            Ok(generated) => {
                let mut warnings = admitted.notes.clone();
                warnings.extend(generated.warnings.iter().cloned());
                save_images(self, &params, &generated, &warnings, &extra)
            }
            Err(atelier_engine::Error::Cancelled) if ctx.is_shutting_down() => {
                let mut s = ctx.status();
                Self::set_interrupted(&mut s);
                s.state
            }
            Err(atelier_engine::Error::Cancelled) => JobState::Cancelled,
            Err(e) => {
                tracing::warn!(error = %e, "generation failed");
                JobState::Failed { message: e.to_string() }
            }
        };
        if matches!(state, JobState::Done { .. }) {
            let observed = started.elapsed().as_secs_f64() / work_units(&params);
            let mut rate = self.seconds_per_unit.lock().unwrap_or_else(|e| e.into_inner());
            *rate = Some(rate.map_or(observed, |r| 0.5 * r + 0.5 * observed));
        }
        match &state {
            JobState::Done { image_ids, .. } => metrics::generation_ended("done", image_ids.len()),
            JobState::Cancelled => metrics::generation_ended("cancelled", 0),
            _ => metrics::generation_ended("failed", 0),
        }
        ctx.save(|s| s.state = state);
    }
}

impl Queue<Generation> {
    /// Admission (see [`Generator::admit`]): checks what can be known before running and
    /// fits `params` to `budget`. Blocking (binds adapter files): call it off the runtime.
    pub fn admit(&self, params: &mut GenerateParams, budget: &atelier_engine::memory::MemoryBudget) -> Result<Admitted, ApiError> {
        Ok(self.task().generator.admit(params, budget)?)
    }

    /// Queues a validated, admitted generation.
    pub fn submit_generation(&self, params: GenerateParams, admitted: Admitted) -> Result<JobAccepted, ApiError> {
        self.submit_generation_with(params, admitted, Vec::new())
    }

    /// Queues a validated, admitted generation whose images carry `extra` key/values in
    /// their `parameters` chunk after the standard ones.
    pub fn submit_generation_with(&self, params: GenerateParams, admitted: Admitted, extra: Vec<(String, String)>) -> Result<JobAccepted, ApiError> {
        let id = uuid::Uuid::new_v4().to_string();
        let seed = params.seed;
        let rate = *self.task().seconds_per_unit.lock().unwrap_or_else(|e| e.into_inner());
        let estimated_seconds = rate.map(|r| r * work_units(&params));
        let status = JobStatus { job_id: id.clone(), seed, state: JobState::Queued { position: 1 }, preview: None };
        self.submit(status, Some(GenerationInput { params: Box::new(params), admitted, extra }))?;
        Ok(JobAccepted { job_id: id, seed, estimated_seconds })
    }
}

/// A step preview as a `data:image/png;base64,…` URL (small: the preview is latent-sized).
fn data_url(img: &image::RgbImage) -> Option<String> {
    use base64::Engine;
    let bytes = atelier_engine::metadata::encode_plain_png(img).ok()?;
    Some(format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes)))
}

/// The work of a generation in UNet evaluations × latent pixels: denoising steps run
/// (⌊steps × strength⌋ for img2img), twice with guidance, per image, plus about one
/// step's worth for the text encoder and the VAE.
fn work_units(p: &GenerateParams) -> f64 {
    let steps = if p.init_image.is_some() { (p.steps as f64 * p.strength).floor() } else { p.steps as f64 };
    let cfg = if p.guidance > 1.0 { 2.0 } else { 1.0 };
    let pixels = (p.width * p.height) as f64 / 64.0;
    (steps * cfg + 1.0) * p.batch_size as f64 * pixels
}

fn save_images(shared: &Generation, params: &GenerateParams, generated: &atelier_engine::pipeline::Generated, warnings: &[String], extra: &[(String, String)]) -> JobState {
    let images = &generated.images;
    let model_name = shared.generator.model_name();
    let model_hash = shared.generator.model_hash();
    let mut image_ids = Vec::with_capacity(images.len());
    for (k, img) in images.iter().enumerate() {
        let meta = NewImage {
            params,
            seed: params.seed.wrapping_add(k as u64),
            model_name: &model_name,
            model_hash: &model_hash,
            adapters: &generated.adapters,
            warnings,
            extra,
        };
        match shared.gallery.save(img, &meta) {
            Ok(id) => image_ids.push(id),
            Err(e) => {
                tracing::error!(error = %e, "saving a generated image failed");
                return JobState::Failed { message: "saving the image failed; see the server log".into() };
            }
        }
    }
    JobState::Done { image_ids, warnings: warnings.to_vec() }
}
