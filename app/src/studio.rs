//! Server functions the pages call, and (server side only) the [`ssr::Studio`] trait the
//! server implements to answer them. The engine, job queue and gallery live in the server
//! crate; this crate only sees them through that trait, so the WASM build never links them.

use leptos::prelude::*;
use leptos::server_fn::codec::Json;

use crate::dto::{GalleryPage, GenerateRequest, JobAccepted, ModelInfo};
use crate::error::AppError;

/// Server-only half: what the server provides through context.
#[cfg(feature = "ssr")]
pub mod ssr {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;

    use leptos::prelude::use_context;

    use crate::dto::{GalleryPage, GenerateRequest, JobAccepted, ModelInfo};
    use crate::error::AppError;

    /// A boxed future, so [`Studio`] stays object-safe.
    pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

    /// The studio's operations, implemented by the server over its job queue and gallery.
    pub trait Studio: Send + Sync + 'static {
        fn model_info(&self) -> ModelInfo;
        /// Validates and queues a generation (decoding the init image off the async runtime).
        fn submit(&self, request: GenerateRequest) -> BoxFuture<Result<JobAccepted, AppError>>;
        fn cancel(&self, job_id: &str) -> Result<(), AppError>;
        fn gallery(&self, offset: usize, limit: usize) -> Result<GalleryPage, AppError>;
        fn delete_image(&self, id: &str) -> Result<(), AppError>;
    }

    /// How the server passes the studio to server functions (`leptos_routes_with_context`).
    pub type SharedStudio = Arc<dyn Studio>;

    /// The studio provided by the server for this request.
    pub fn studio() -> Result<SharedStudio, AppError> {
        use_context::<SharedStudio>()
            .ok_or_else(|| AppError::Internal("the studio is not available in this context".into()))
    }
}

/// The loaded model's name, hash, native size and note.
#[server(prefix = "/_sfn", input = Json)]
pub async fn get_model_info() -> Result<ModelInfo, AppError> {
    Ok(ssr::studio()?.model_info())
}

/// Queues a generation; progress then comes from `/api/jobs/{id}/events`.
#[server(prefix = "/_sfn", input = Json)]
pub async fn submit_generation(request: GenerateRequest) -> Result<JobAccepted, AppError> {
    ssr::studio()?.submit(request).await
}

/// Cancels a queued or running job.
#[server(prefix = "/_sfn", input = Json)]
pub async fn cancel_job(job_id: String) -> Result<(), AppError> {
    ssr::studio()?.cancel(&job_id)
}

/// A page of the gallery, newest first.
#[server(prefix = "/_sfn", input = Json)]
pub async fn list_gallery(offset: usize, limit: usize) -> Result<GalleryPage, AppError> {
    ssr::studio()?.gallery(offset, limit)
}

/// Deletes an image and its file.
#[server(prefix = "/_sfn", input = Json)]
pub async fn delete_image(id: String) -> Result<(), AppError> {
    ssr::studio()?.delete_image(&id)
}
