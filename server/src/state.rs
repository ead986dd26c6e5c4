//! Shared server state: the Leptos options, the job queue, the gallery and the model's facts.

use std::path::Path;
use std::sync::Arc;

use app::dto::{ModelInfo, SCHEDULERS};
use axum::extract::FromRef;
use leptos::config::LeptosOptions;

use crate::gallery::{Gallery, GalleryError};
use crate::generator::Generator;
use crate::jobs::JobQueue;

/// Cheap to clone; handed to every handler and, as [`app::server_fns::ssr::SharedBackend`], to
/// server functions.
#[derive(Clone)]
pub struct AppState {
    pub leptos_options: LeptosOptions,
    pub jobs: Arc<JobQueue>,
    pub gallery: Arc<Gallery>,
    pub model: Arc<ModelInfo>,
    /// The style library (user styles in `DATA/styles`, plus shipped ones).
    pub styles: Arc<crate::styles::StyleLibrary>,
    /// Saved blends (`DATA/blends/`).
    pub blends: Arc<crate::blends::BlendStore>,
    /// Style training from the web; `None` when the server has no model to train on.
    pub trainer: Option<Arc<crate::trainer::Trainer>>,
    /// Negative-prompt optimisation; `None` until [`AppState::with_negatives`].
    pub negatives: Option<Arc<crate::negatives::NegativeService>>,
    /// How much memory this process may use (`--max-memory`); heavy requests are
    /// estimated against it before they are queued.
    pub budget: atelier_engine::memory::MemoryBudget,
}

impl AppState {
    /// Opens the gallery in `data_dir` and starts the worker thread around `generator`.
    pub fn new(
        leptos_options: LeptosOptions,
        generator: Arc<dyn Generator>,
        data_dir: &Path,
        default_size: (usize, usize),
        note: Option<String>,
    ) -> Result<Self, GalleryError> {
        let gallery = Arc::new(Gallery::open(data_dir)?);
        let model = Arc::new(ModelInfo {
            name: generator.model_name(),
            hash: generator.model_hash(),
            default_width: default_size.0,
            default_height: default_size.1,
            note,
            schedulers: SCHEDULERS.iter().map(|(id, _)| id.to_string()).collect(),
        });
        let jobs = Arc::new(JobQueue::start(generator, gallery.clone()));
        let styles = Arc::new(crate::styles::StyleLibrary::new(data_dir.join("styles")));
        let blends = Arc::new(crate::blends::store_in(data_dir));
        let budget = atelier_engine::memory::MemoryBudget::from_machine();
        Ok(Self { leptos_options, jobs, gallery, model, styles, blends, trainer: None, negatives: None, budget })
    }

    /// Uses `library` as the style library.
    pub fn with_styles(mut self, library: crate::styles::StyleLibrary) -> Self {
        self.styles = Arc::new(library);
        self
    }

    /// Turns on style training from the web.
    /// Sets the memory budget (`--max-memory`).
    pub fn with_budget(mut self, budget: atelier_engine::memory::MemoryBudget) -> Self {
        self.budget = budget;
        self
    }

    pub fn with_trainer(mut self, trainer: Arc<crate::trainer::Trainer>) -> Self {
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
