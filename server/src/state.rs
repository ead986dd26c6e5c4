//! Shared server state: the Leptos options, the work queue's workers and the queues of
//! every feature, the gallery, the style library and the model's facts.

use std::path::Path;
use std::sync::Arc;

use app::dto::{GenerateRequest, JobAccepted, ModelInfo, SCHEDULERS};
use axum::extract::FromRef;
use leptos::config::LeptosOptions;

use crate::generation::gallery::Gallery;
use crate::generation::generator::Generator;
use crate::generation::jobs::{Generation, JobQueue};
use crate::queue::{JsonDir, Layout, Workers};
use crate::ApiError;

/// Cheap to clone; handed to every handler and, as [`app::server_fns::ssr::SharedBackend`], to
/// server functions.
#[derive(Clone)]
pub struct AppState {
    pub leptos_options: LeptosOptions,
    /// The worker threads every queue shares (one per lane); [`AppState::shutdown`] stops them.
    pub workers: Arc<Workers>,
    pub jobs: JobQueue,
    pub gallery: Arc<Gallery>,
    pub model: Arc<ModelInfo>,
    /// The style library (user styles in `DATA/styles`, plus shipped ones).
    pub styles: Arc<crate::styles::StyleLibrary>,
    /// Saved blends (`DATA/blends/`).
    pub blends: Arc<crate::blends::BlendStore>,
    /// Blend bakes (`DATA/bakes/`).
    pub bakes: Arc<crate::blends::bake::Bakes>,
    /// Core ML exports (`DATA/exports/`).
    pub exports: Arc<crate::exports::Exports>,
    /// The generator the queues run (bakes read its model).
    pub generator: Arc<dyn Generator>,
    /// The studio's data folder.
    pub data_dir: std::path::PathBuf,
    /// Style training from the web; `None` when the server has no model to train on.
    pub trainer: Option<Arc<crate::styles::trainer::Trainer>>,
    /// Negative-prompt optimisation; `None` until [`AppState::with_negatives`].
    pub negatives: Option<Arc<crate::negatives::NegativeService>>,
    /// How much memory this process may use (`--max-memory`); heavy requests are
    /// estimated against it before they are queued.
    pub budget: atelier_engine::memory::MemoryBudget,
    /// The mirror of the experiment store to an MLflow server (`--tracking-uri`); `None`
    /// when runs are kept locally only.
    pub mirror: Option<Arc<crate::tracking::mlflow::Background>>,
    /// Deployments (`DATA/deployments/`), the import token and the A1111 API's options.
    pub deployments: Arc<crate::deployments::Deployments>,
    /// Quality monitoring of deployments (`DATA/monitoring/`): references, windows, alerts.
    pub drift: Arc<crate::monitoring::drift::service::DriftService>,
}

impl AppState {
    /// Opens the gallery in `data_dir` and starts the worker thread around `generator`.
    pub fn new(
        leptos_options: LeptosOptions,
        generator: Arc<dyn Generator>,
        data_dir: &Path,
        default_size: (usize, usize),
        note: Option<String>,
    ) -> Result<Self, crate::ApiError> {
        let gallery = Arc::new(Gallery::open(data_dir)?);
        let (device, dtype) = generator.compute();
        let model = Arc::new(ModelInfo {
            device,
            dtype,
            name: generator.model_name(),
            hash: generator.model_hash(),
            default_width: default_size.0,
            default_height: default_size.1,
            note,
            schedulers: SCHEDULERS.iter().map(|(id, _)| id.to_string()).collect(),
        });
        let workers = Workers::start();
        let store = JsonDir::open(data_dir.join("jobs"), Layout::Flat).map_err(|e| crate::ApiError::Internal(e.to_string()))?;
        let jobs = JobQueue::open(Generation::new(generator.clone(), gallery.clone()), store, &workers)?;
        let styles = Arc::new(crate::styles::StyleLibrary::new(data_dir.join("styles")));
        let blends = Arc::new(crate::blends::store_in(data_dir));
        let bakes = Arc::new(crate::blends::bake::Bakes::open(data_dir.join("bakes"), generator.clone(), styles.clone(), &workers)?);
        let exports = Arc::new(crate::exports::Exports::open(data_dir.join("exports"), generator.clone(), styles.clone(), &workers)?);
        let budget = atelier_engine::memory::MemoryBudget::from_machine();
        let drift = Arc::new(
            crate::monitoring::drift::service::DriftService::open(data_dir).map_err(|e| crate::ApiError::Internal(format!("opening {}: {e}", data_dir.join("monitoring").display())))?,
        );
        Ok(Self { leptos_options, workers, jobs, gallery, model, styles, blends, bakes, exports, generator, data_dir: data_dir.to_path_buf(), trainer: None, negatives: None, budget, mirror: None, deployments: Arc::new(crate::deployments::Deployments::open(data_dir)), drift })
    }

    /// Uses `library` as the style library.
    pub fn with_styles(mut self, library: crate::styles::StyleLibrary) -> Self {
        self.styles = Arc::new(library);
        self.bakes.set_styles(self.styles.clone());
        self.exports.set_styles(self.styles.clone());
        self
    }

    /// Sets the memory budget (`--max-memory`).
    pub fn with_budget(mut self, budget: atelier_engine::memory::MemoryBudget) -> Self {
        self.budget = budget;
        self
    }

    /// Mirrors the experiment store (`DATA/tracking`) to an MLflow server in the background.
    pub fn with_mirror(mut self, config: crate::tracking::mlflow::ServerConfig) -> Self {
        self.mirror = Some(Arc::new(crate::tracking::mlflow::Background::start(self.data_dir.join("tracking"), config)));
        self
    }

    /// Turns on style training from the web.
    pub fn with_trainer(mut self, trainer: Arc<crate::styles::trainer::Trainer>) -> Self {
        self.trainer = Some(trainer);
        self
    }

    /// Turns on negative-prompt optimisation.
    pub fn with_negatives(mut self, service: Arc<crate::negatives::NegativeService>) -> Self {
        self.negatives = Some(service);
        self
    }

    /// The optimisation service, or 503 saying how to get one.
    pub fn negatives(&self) -> Result<&Arc<crate::negatives::NegativeService>, crate::ApiError> {
        self.negatives.as_ref().ok_or_else(|| crate::ApiError::Unavailable("negative-prompt optimisation is not enabled on this server".into()))
    }

    /// Validates a request (decoding any init image on a blocking thread), admits it
    /// (styles exist, memory fits the budget) and queues it.
    pub async fn submit(&self, request: GenerateRequest) -> Result<JobAccepted, ApiError> {
        self.submit_with(request, Vec::new()).await
    }

    /// [`AppState::submit`] with `extra` `Key: value` pairs written into the images'
    /// `parameters` chunk after the standard ones (deployments name themselves there).
    pub async fn submit_with(&self, request: GenerateRequest, extra: Vec<(String, String)>) -> Result<JobAccepted, ApiError> {
        let size = self.default_size();
        let (jobs, budget) = (self.jobs.clone(), self.budget);
        let (params, admitted) = tokio::task::spawn_blocking(move || {
            let mut params = crate::generation::request::to_params(request, size)?;
            let admitted = jobs.admit(&mut params, &budget)?;
            Ok::<_, ApiError>((params, admitted))
        })
        .await
        .map_err(|e| ApiError::Internal(format!("request decoding task failed: {e}")))??;
        self.jobs.submit_generation_with(params, admitted, extra)
    }

    /// The style trainer, or why there is none.
    pub fn training(&self) -> Result<Arc<crate::styles::trainer::Trainer>, crate::ApiError> {
        self.trainer.clone().ok_or_else(|| {
            crate::ApiError::Unavailable("style training is not enabled on this server; start it with `atelier serve` (or train with `atelier train-style`)".into())
        })
    }

    /// Stops every queue at once: waiting tasks are marked interrupted, running ones asked
    /// to stop (a training writes a checkpoint). Does not wait; [`Workers::join`] does.
    pub fn begin_shutdown(&self) {
        self.workers.begin_shutdown();
    }

    pub fn default_size(&self) -> (usize, usize) {
        (self.model.default_width, self.model.default_height)
    }
}

impl FromRef<AppState> for LeptosOptions {
    fn from_ref(state: &AppState) -> Self {
        state.leptos_options.clone()
    }
}

#[cfg(test)]
mod tests {
    use atelier_engine::scheduler::SchedulerKind;

    /// The UI's scheduler list must match the engine's.
    #[test]
    fn ui_scheduler_list_matches_engine() {
        let engine: Vec<_> = SchedulerKind::ALL.iter().map(|k| (k.id(), k.a1111_name())).collect();
        assert_eq!(engine, app::dto::SCHEDULERS.to_vec());
    }
}
