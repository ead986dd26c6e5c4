//! The server's answer to the UI's server functions: [`Studio`] over the job queue and gallery.

use app::dto::{GalleryPage, GenerateRequest, JobAccepted, ModelInfo};
use app::studio::ssr::{BoxFuture, Studio};
use app::AppError;

use crate::{ApiError, AppState};

impl Studio for AppState {
    fn model_info(&self) -> ModelInfo {
        (*self.model).clone()
    }

    fn submit(&self, request: GenerateRequest) -> BoxFuture<Result<JobAccepted, AppError>> {
        let state = self.clone();
        Box::pin(async move { state.submit(request).await.map_err(AppError::from) })
    }

    fn cancel(&self, job_id: &str) -> Result<(), AppError> {
        self.jobs.cancel(job_id)?;
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
}

impl AppState {
    /// Validates a request (decoding any init image on a blocking thread) and queues it.
    pub async fn submit(&self, request: GenerateRequest) -> Result<JobAccepted, ApiError> {
        let size = self.default_size();
        let params = tokio::task::spawn_blocking(move || crate::request::to_params(request, size))
            .await
            .map_err(|e| ApiError::Internal(format!("request decoding task failed: {e}")))??;
        self.jobs.submit(params)
    }
}
