//! The server's answer to the UI's server functions: [`Backend`] over the job queue and gallery.

use app::dto::{GalleryPage, GenerateRequest, JobAccepted, ModelInfo, StyleSummary, StyleTrainingRequest, TrainingStatus};
use app::server_fns::ssr::{Backend, BoxFuture};
use app::AppError;

use crate::blends::BlendError;
use crate::{ApiError, AppState};

/// A style rename or delete the library refused, as the Styles page shows it (the
/// library's reason); a failed one (the disk) as the API reports it.
impl Backend for AppState {
    fn model_info(&self) -> ModelInfo {
        (*self.model).clone()
    }

    fn submit(&self, request: GenerateRequest) -> BoxFuture<Result<JobAccepted, AppError>> {
        let state = self.clone();
        Box::pin(async move { state.submit(request).await.map_err(AppError::from) })
    }

    fn cancel(&self, job_id: &str) -> Result<(), AppError> {
        self.jobs.cancel(job_id).map_err(ApiError::from)?;
        Ok(())
    }

    fn gallery(&self, offset: usize, limit: usize) -> Result<GalleryPage, AppError> {
        Ok(self.gallery.list(offset, limit).map_err(ApiError::from)?)
    }

    fn delete_image(&self, id: &str) -> Result<(), AppError> {
        if self.gallery.delete(id).map_err(ApiError::from)? {
            Ok(())
        } else {
            Err(ApiError::NotFound { what: "image", id: id.into() }.into())
        }
    }

    fn styles(&self) -> Result<Vec<StyleSummary>, AppError> {
        Ok(self
            .styles
            .list()
            .into_iter()
            .map(|s| {
                let files = crate::styles::served_files(&s);
                let card = s.card.as_ref();
                let sim = |who: &str| card.and_then(|c| c.metrics.get(who)?.get("style_similarity")?.as_f64());
                StyleSummary {
                    name: s.name.clone(),
                    builtin: s.builtin,
                    trigger: card.map_or_else(|| s.name.clone(), |c| c.trigger.clone()),
                    base_model_hash: card.map(|c| c.base_model_hash.clone()).unwrap_or_default(),
                    dataset_hash: card.map(|c| c.dataset_hash.clone()).unwrap_or_default(),
                    dataset_images: card.map_or(0, |c| c.dataset_images),
                    steps: card.map_or(0, |c| c.training.steps),
                    rank: card.map_or(0, |c| c.training.rank),
                    similarity: sim("base").zip(sim("style")),
                    hash: s.short_hash(),
                    files,
                }
            })
            .collect())
    }

    fn rename_style(&self, name: &str, new_name: &str) -> Result<(), AppError> {
        Ok(crate::styles::change(&self.styles, name, |lib| lib.rename(name, new_name))?)
    }

    fn delete_style(&self, name: &str) -> Result<(), AppError> {
        Ok(crate::styles::change(&self.styles, name, |lib| lib.delete(name))?)
    }

    fn blends(&self) -> Result<Vec<(String, String)>, AppError> {
        Ok(self.blends.list().into_iter().map(|b| (b.name, b.link)).collect())
    }

    fn save_blend(&self, name: &str, blend: atelier_blend::Blend) -> Result<String, AppError> {
        crate::styles::check_name(name).map_err(|e| AppError::BadRequest(e.to_string()))?;
        let saved = self.blends.save(name, &blend).map_err(|e| match e {
            BlendError::Io { .. } => AppError::from(ApiError::from(e)),
            refused => AppError::BadRequest(crate::error::report(&refused)),
        })?;
        Ok(saved.link)
    }

    fn trainings(&self) -> Result<Vec<TrainingStatus>, AppError> {
        Ok(self.training()?.list())
    }

    fn start_training(&self, request: StyleTrainingRequest) -> BoxFuture<Result<TrainingStatus, AppError>> {
        let trainer = self.training();
        Box::pin(async move {
            let trainer = trainer?;
            let started = tokio::task::spawn_blocking(move || trainer.start(request))
                .await
                .map_err(|e| ApiError::Internal(format!("training start task failed: {e}")))?;
            Ok(started?)
        })
    }

    fn stop_training(&self, id: &str) -> Result<TrainingStatus, AppError> {
        Ok(self.training()?.stop(id)?)
    }

    fn resume_training(&self, id: &str) -> Result<TrainingStatus, AppError> {
        Ok(self.training()?.resume(id)?)
    }

    fn delete_training(&self, id: &str) -> Result<(), AppError> {
        Ok(self.training()?.delete(id)?)
    }
}
