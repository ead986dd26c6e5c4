//! Server functions the pages call, and (server side only) the [`ssr::Backend`] trait the
//! server implements to answer them. The engine, job queue and gallery live in the server
//! crate; this crate only sees them through that trait, so the WASM build never links them.

use leptos::prelude::*;
use leptos::server_fn::codec::Json;

use crate::dto::{GalleryPage, GenerateRequest, JobAccepted, ModelInfo, StyleSummary, StyleTrainingRequest, TrainingStatus};
use crate::error::AppError;

/// Server-only half: what the server provides through context.
#[cfg(feature = "ssr")]
pub mod ssr {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;

    use leptos::prelude::use_context;

    use crate::dto::{GalleryPage, GenerateRequest, JobAccepted, ModelInfo, StyleSummary, StyleTrainingRequest, TrainingStatus};
    use crate::error::AppError;

    /// A boxed future, so [`Backend`] stays object-safe.
    pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

    /// What the server functions ask of the server, implemented by it over its job queue,
    /// gallery, style library, blends and trainer.
    pub trait Backend: Send + Sync + 'static {
        fn model_info(&self) -> ModelInfo;
        /// Validates and queues a generation (decoding the init image off the async runtime).
        fn submit(&self, request: GenerateRequest) -> BoxFuture<Result<JobAccepted, AppError>>;
        fn cancel(&self, job_id: &str) -> Result<(), AppError>;
        fn gallery(&self, offset: usize, limit: usize) -> Result<GalleryPage, AppError>;
        fn delete_image(&self, id: &str) -> Result<(), AppError>;
        /// The style library, shipped styles first.
        fn styles(&self) -> Result<Vec<StyleSummary>, AppError>;
        fn rename_style(&self, name: &str, new_name: &str) -> Result<(), AppError>;
        fn delete_style(&self, name: &str) -> Result<(), AppError>;
        /// Saved blends: (name, share-link code), by name.
        fn blends(&self) -> Result<Vec<(String, String)>, AppError>;
        /// Saves a blend by name; returns its share-link code.
        fn save_blend(&self, name: &str, blend: atelier_blend::Blend) -> Result<String, AppError>;
        /// Style trainings, newest first.
        fn trainings(&self) -> Result<Vec<TrainingStatus>, AppError>;
        /// Checks and queues a style training (reading its dataset off the async runtime).
        fn start_training(&self, request: StyleTrainingRequest) -> BoxFuture<Result<TrainingStatus, AppError>>;
        fn stop_training(&self, id: &str) -> Result<TrainingStatus, AppError>;
        fn resume_training(&self, id: &str) -> Result<TrainingStatus, AppError>;
        fn delete_training(&self, id: &str) -> Result<(), AppError>;
    }

    /// How the server passes its [`Backend`] to server functions (`leptos_routes_with_context`).
    pub type SharedBackend = Arc<dyn Backend>;

    /// Passes `result` through, setting the HTTP status of the server-function response to
    /// match the error (400, 404, 413 or 500) so it reads right in logs and dev tools.
    pub fn with_status<T>(result: Result<T, AppError>) -> Result<T, AppError> {
        if let Err(e) = &result {
            use http::StatusCode;
            let status = match e {
                AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
                AppError::NotFound(_) => StatusCode::NOT_FOUND,
                AppError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                AppError::Internal(_) | AppError::ServerFn(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            if let Some(response) = use_context::<leptos_axum::ResponseOptions>() {
                response.set_status(status);
            }
        }
        result
    }

    /// The backend provided by the server for this request.
    pub fn backend() -> Result<SharedBackend, AppError> {
        use_context::<SharedBackend>()
            .ok_or_else(|| AppError::Internal("the server backend is not available in this context".into()))
    }
}

/// The loaded model's name, hash, native size and note.
#[server(prefix = "/_sfn", input = Json)]
pub async fn get_model_info() -> Result<ModelInfo, AppError> {
    ssr::with_status(ssr::backend().map(|s| s.model_info()))
}

/// Queues a generation; progress then comes from `/api/jobs/{id}/events`.
#[server(prefix = "/_sfn", input = Json)]
pub async fn submit_generation(request: GenerateRequest) -> Result<JobAccepted, AppError> {
    let backend = ssr::with_status(ssr::backend())?;
    ssr::with_status(backend.submit(request).await)
}

/// Cancels a queued or running job.
#[server(prefix = "/_sfn", input = Json)]
pub async fn cancel_job(job_id: String) -> Result<(), AppError> {
    ssr::with_status(ssr::backend().and_then(|s| s.cancel(&job_id)))
}

/// A page of the gallery, newest first.
#[server(prefix = "/_sfn", input = Json)]
pub async fn list_gallery(offset: usize, limit: usize) -> Result<GalleryPage, AppError> {
    ssr::with_status(ssr::backend().and_then(|s| s.gallery(offset, limit)))
}

/// Deletes an image and its file.
#[server(prefix = "/_sfn", input = Json)]
pub async fn delete_image(id: String) -> Result<(), AppError> {
    ssr::with_status(ssr::backend().and_then(|s| s.delete_image(&id)))
}

/// The style library.
#[server(prefix = "/_sfn", input = Json)]
pub async fn list_styles() -> Result<Vec<StyleSummary>, AppError> {
    ssr::with_status(ssr::backend().and_then(|s| s.styles()))
}

/// Renames a user style.
#[server(prefix = "/_sfn", input = Json)]
pub async fn rename_style(name: String, new_name: String) -> Result<(), AppError> {
    ssr::with_status(ssr::backend().and_then(|s| s.rename_style(&name, &new_name)))
}

/// Deletes a user style.
#[server(prefix = "/_sfn", input = Json)]
pub async fn delete_style(name: String) -> Result<(), AppError> {
    ssr::with_status(ssr::backend().and_then(|s| s.delete_style(&name)))
}

/// Style trainings, newest first.
#[server(prefix = "/_sfn", input = Json)]
pub async fn list_style_trainings() -> Result<Vec<TrainingStatus>, AppError> {
    ssr::with_status(ssr::backend().and_then(|s| s.trainings()))
}

/// Queues a style training on an uploaded dataset; progress then comes from
/// `/api/style-trainings/{id}/events`.
#[server(prefix = "/_sfn", input = Json)]
pub async fn start_style_training(request: StyleTrainingRequest) -> Result<TrainingStatus, AppError> {
    let backend = ssr::with_status(ssr::backend())?;
    ssr::with_status(backend.start_training(request).await)
}

/// Stops a training (with a checkpoint when it is running).
#[server(prefix = "/_sfn", input = Json)]
pub async fn stop_style_training(id: String) -> Result<TrainingStatus, AppError> {
    ssr::with_status(ssr::backend().and_then(|s| s.stop_training(&id)))
}

/// Resumes a stopped training from its last checkpoint.
#[server(prefix = "/_sfn", input = Json)]
pub async fn resume_style_training(id: String) -> Result<TrainingStatus, AppError> {
    ssr::with_status(ssr::backend().and_then(|s| s.resume_training(&id)))
}

/// Forgets a training that is not running.
#[server(prefix = "/_sfn", input = Json)]
pub async fn delete_style_training(id: String) -> Result<(), AppError> {
    ssr::with_status(ssr::backend().and_then(|s| s.delete_training(&id)))
}

/// Saves a blend under `name` on the server; returns its share-link code.
#[server(prefix = "/_sfn", input = Json)]
pub async fn save_blend(name: String, blend: atelier_blend::Blend) -> Result<String, AppError> {
    ssr::with_status(ssr::backend().and_then(|s| s.save_blend(&name, blend)))
}

/// Saved blends: (name, share-link code).
#[server(prefix = "/_sfn", input = Json)]
pub async fn list_blends() -> Result<Vec<(String, String)>, AppError> {
    ssr::with_status(ssr::backend().and_then(|s| s.blends()))
}
