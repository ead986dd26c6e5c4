//! The job queue: generations wait in a FIFO and run one at a time on a dedicated worker
//! thread that owns the model, so diffusion never blocks the async runtime.
//!
//! Each job's status is published through a `tokio::sync::watch` channel: any number of
//! watchers (SSE streams, status polls) see the latest state, and a slow watcher just skips
//! intermediate steps. Cancelling a queued job removes it; a running job stops at its next step.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use app::dto::{JobAccepted, JobState, JobStatus};
use atelier_engine::pipeline::{GenerateParams, StepProgress};
use tokio::sync::watch;

use crate::generation::gallery::{Gallery, NewImage};
use crate::generation::generator::{Admitted, Generator};
use crate::ApiError;

/// Most jobs that may wait at once; more are refused with 503.
pub const MAX_QUEUED: usize = 64;
/// Finished jobs kept for status queries; older ones are forgotten.
const KEEP_FINISHED: usize = 256;

struct Job {
    params: Option<Box<GenerateParams>>,
    admitted: Admitted,
    status: watch::Sender<JobStatus>,
    cancel: Arc<AtomicBool>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<String>,
    jobs: HashMap<String, Job>,
    finished: VecDeque<String>,
    shutdown: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Seconds per unit of [`work_units`], learned from finished jobs (moving average).
    seconds_per_unit: Mutex<Option<f64>>,
    wake: Condvar,
    generator: Arc<dyn Generator>,
    gallery: Arc<Gallery>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The queue and its worker thread. Dropping it stops the worker after the current step.
pub struct JobQueue {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
}

impl JobQueue {
    /// Starts the worker thread.
    pub fn start(generator: Arc<dyn Generator>, gallery: Arc<Gallery>) -> Self {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            seconds_per_unit: Mutex::new(None),
            wake: Condvar::new(),
            generator,
            gallery,
        });
        let worker = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("atelier-worker".into())
                .spawn(move || worker_loop(&shared))
                .expect("spawning the worker thread")
        };
        Self { shared, worker: Some(worker) }
    }

    /// Admission (see [`Generator::admit`]): checks what can be known before running and
    /// fits `params` to `budget`. Blocking (binds adapter files): call it off the runtime.
    pub fn admit(&self, params: &mut GenerateParams, budget: &atelier_engine::memory::MemoryBudget) -> Result<Admitted, ApiError> {
        Ok(self.shared.generator.admit(params, budget)?)
    }

    /// Queues a validated, admitted generation.
    pub fn submit(&self, params: GenerateParams, admitted: Admitted) -> Result<JobAccepted, ApiError> {
        let id = uuid::Uuid::new_v4().to_string();
        let seed = params.seed;
        let rate = *self.shared.seconds_per_unit.lock().unwrap_or_else(|e| e.into_inner());
        let estimated_seconds = rate.map(|r| r * work_units(&params));
        let mut q = self.shared.lock();
        if q.waiting.len() >= MAX_QUEUED {
            return Err(ApiError::QueueFull(q.waiting.len()));
        }
        let position = q.waiting.len() + 1;
        let status = JobStatus { job_id: id.clone(), seed, state: JobState::Queued { position }, preview: None };
        let (tx, _) = watch::channel(status);
        q.jobs.insert(
            id.clone(),
            Job { params: Some(Box::new(params)), admitted, status: tx, cancel: Arc::new(AtomicBool::new(false)) },
        );
        q.waiting.push_back(id.clone());
        drop(q);
        self.shared.wake.notify_one();
        tracing::info!(job = %id, seed, "job queued");
        Ok(JobAccepted { job_id: id, seed, estimated_seconds })
    }

    /// The current status of a job.
    pub fn status(&self, id: &str) -> Result<JobStatus, ApiError> {
        let q = self.shared.lock();
        let job = q.jobs.get(id).ok_or_else(|| not_found(id))?;
        let status = job.status.borrow().clone();
        Ok(status)
    }

    /// A receiver that sees every later status change of the job.
    pub fn subscribe(&self, id: &str) -> Result<watch::Receiver<JobStatus>, ApiError> {
        let q = self.shared.lock();
        Ok(q.jobs.get(id).ok_or_else(|| not_found(id))?.status.subscribe())
    }

    /// Cancels a job: a queued one is removed at once, a running one stops at its next step,
    /// a finished one is left as it is. Returns the status after the request.
    pub fn cancel(&self, id: &str) -> Result<JobStatus, ApiError> {
        let mut q = self.shared.lock();
        let job = q.jobs.get(id).ok_or_else(|| not_found(id))?;
        job.cancel.store(true, Ordering::Relaxed);
        let state = job.status.borrow().state.clone();
        if let JobState::Queued { .. } = state {
            q.waiting.retain(|w| w != id);
            if let Some(job) = q.jobs.get_mut(id) {
                job.params = None;
                job.status.send_modify(|s| s.state = JobState::Cancelled);
            }
            finish(&mut q, id);
            renumber(&q);
            tracing::info!(job = %id, "queued job cancelled");
        } else if let JobState::Running { .. } = state {
            tracing::info!(job = %id, "cancelling running job at its next step");
        }
        Ok(q.jobs.get(id).map(|j| j.status.borrow().clone()).ok_or_else(|| not_found(id))?)
    }
}

impl JobQueue {
    /// Cancels every queued and running job (server shutdown).
    pub fn cancel_all(&self) {
        let ids: Vec<String> = {
            let q = self.shared.lock();
            q.jobs.iter().filter(|(_, j)| !j.status.borrow().state.is_finished()).map(|(id, _)| id.clone()).collect()
        };
        for id in ids {
            let _ = self.cancel(&id);
        }
    }
}

impl Drop for JobQueue {
    fn drop(&mut self) {
        {
            let mut q = self.shared.lock();
            q.shutdown = true;
            for job in q.jobs.values() {
                job.cancel.store(true, Ordering::Relaxed);
            }
        }
        self.shared.wake.notify_all();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
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

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound { what: "job", id: id.into() }
}

/// Tells every waiting job its new place in line.
fn renumber(q: &Queue) {
    for (i, id) in q.waiting.iter().enumerate() {
        if let Some(job) = q.jobs.get(id) {
            job.status.send_if_modified(|s| {
                let state = JobState::Queued { position: i + 1 };
                let changed = s.state != state;
                s.state = state;
                changed
            });
        }
    }
}

/// Records a job as finished and forgets the oldest finished jobs.
fn finish(q: &mut Queue, id: &str) {
    q.finished.push_back(id.to_string());
    while q.finished.len() > KEEP_FINISHED {
        if let Some(old) = q.finished.pop_front() {
            q.jobs.remove(&old);
        }
    }
}

fn worker_loop(shared: &Shared) {
    loop {
        let (id, params, admitted, status, cancel) = {
            let mut q = shared.lock();
            loop {
                if q.shutdown {
                    return;
                }
                if let Some(id) = q.waiting.pop_front() {
                    let Some(job) = q.jobs.get_mut(&id) else { continue };
                    let Some(params) = job.params.take() else { continue };
                    // Marked running under the lock, so a cancel never sees a popped job as queued.
                    job.status.send_modify(|s| s.state = JobState::Running { step: 0, total: params.steps });
                    let picked = (id, params, job.admitted.clone(), job.status.clone(), job.cancel.clone());
                    renumber(&q);
                    break picked;
                }
                q = shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        run_job(shared, &id, &params, &admitted, &status, &cancel);
        let mut q = shared.lock();
        finish(&mut q, &id);
    }
}

fn run_job(
    shared: &Shared,
    id: &str,
    params: &GenerateParams,
    admitted: &Admitted,
    status: &watch::Sender<JobStatus>,
    cancel: &AtomicBool,
) {
    let started = std::time::Instant::now();
    tracing::info!(job = %id, steps = params.steps, size = %format!("{}x{}", params.width, params.height), "job started");

    let mut on_step = |p: &StepProgress| {
        if cancel.load(Ordering::Relaxed) {
            return false;
        }
        let preview = p.preview.as_ref().and_then(crate::png::data_url);
        status.send_modify(|s| {
            s.state = JobState::Running { step: p.step, total: p.total };
            if preview.is_some() {
                s.preview = preview;
            }
        });
        true
    };
    // A panic in the engine must fail this job, not kill the only worker thread.
    // The engine's largest buffers check the job's memory limit first, so a request that
    // slipped past admission fails here with a message instead of aborting the process.
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        atelier_engine::memory::with_limit(admitted.limit, || shared.generator.generate(params, &mut on_step))
    }));

    let state = match result {
        Ok(Ok(generated)) => {
            let mut warnings = admitted.notes.clone();
            warnings.extend(generated.warnings.iter().cloned());
            save_images(shared, params, &generated, &warnings)
        }
        Ok(Err(atelier_engine::Error::Cancelled)) => JobState::Cancelled,
        Ok(Err(e)) => {
            tracing::warn!(job = %id, error = %e, "generation failed");
            JobState::Failed { message: e.to_string() }
        }
        Err(_) => {
            tracing::error!(job = %id, "the generator panicked");
            JobState::Failed { message: "the generator crashed; see the server log".into() }
        }
    };
    if matches!(state, JobState::Done { .. }) {
        let observed = started.elapsed().as_secs_f64() / work_units(params);
        let mut rate = shared.seconds_per_unit.lock().unwrap_or_else(|e| e.into_inner());
        *rate = Some(rate.map_or(observed, |r| 0.5 * r + 0.5 * observed));
    }
    tracing::info!(job = %id, elapsed = ?started.elapsed(), state = ?state, "job finished");
    status.send_modify(|s| s.state = state);
}

fn save_images(shared: &Shared, params: &GenerateParams, generated: &atelier_engine::pipeline::Generated, warnings: &[String]) -> JobState {
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
