//! Generation over HTTP (README: "JSON API"): `POST /generate`, `GET /jobs/{id}`,
//! `GET /jobs/{id}/events` (SSE), `POST /jobs/{id}/cancel`, the gallery and its images.

use std::convert::Infallible;

use app::dto::{GalleryItem, GalleryPage, GenerateRequest, JobAccepted, JobStatus};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use serde::Deserialize;

use crate::http::extract::{AppJson, AppQuery};
use crate::{ApiError, AppState};

/// Generations, their jobs, the gallery and its images (nested under `/api`).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/generate", post(generate))
        .route("/jobs/{id}", get(job_status))
        .route("/jobs/{id}/events", get(job_events))
        .route("/jobs/{id}/cancel", post(cancel_job))
        .route("/gallery", get(gallery_list))
        .route("/gallery/{id}", get(gallery_item).delete(gallery_delete))
        .route("/images/{file}", get(image_file))
}

/// `POST /api/generate`: validates and queues; 202 with the job id and seed.
async fn generate(
    State(state): State<AppState>,
    AppJson(request): AppJson<GenerateRequest>,
) -> Result<(StatusCode, Json<JobAccepted>), ApiError> {
    let accepted = state.submit(request).await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

async fn job_status(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<JobStatus>, ApiError> {
    Ok(Json(state.jobs.status(&id)?))
}

async fn cancel_job(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<JobStatus>, ApiError> {
    Ok(Json(state.jobs.cancel(&id)?))
}

/// `GET /api/jobs/{id}/events`: one SSE `message` per status change (JSON [`JobStatus`]),
/// ending after the final state. Comments keep idle connections alive.
async fn job_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let rx = state.jobs.subscribe(&id)?;
    Ok(crate::http::extract::status_stream(rx, |s: &JobStatus| s.state.is_finished()))
}

#[derive(Debug, Deserialize)]
struct PageQuery {
    #[serde(default)]
    offset: usize,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    50
}

async fn gallery_list(
    State(state): State<AppState>,
    AppQuery(q): AppQuery<PageQuery>,
) -> Result<Json<GalleryPage>, ApiError> {
    Ok(Json(state.gallery.list(q.offset, q.limit)?))
}

async fn gallery_item(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<GalleryItem>, ApiError> {
    state.gallery.get(&id)?.map(Json).ok_or(ApiError::NotFound { what: "image", id })
}

async fn gallery_delete(State(state): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    if state.gallery.delete(&id)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound { what: "image", id })
    }
}

/// `GET /api/images/{id}.png`: the PNG with its `parameters` chunk.
async fn image_file(State(state): State<AppState>, Path(file): Path<String>) -> Result<Response, ApiError> {
    let not_found = || ApiError::NotFound { what: "image", id: file.clone() };
    let id = file.strip_suffix(".png").ok_or_else(not_found)?;
    let path = state.gallery.image_path(id).ok_or_else(not_found)?;
    let bytes = match tokio::fs::read(&path).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_found()),
        Err(e) => return Err(ApiError::Internal(format!("{}: {e}", path.display()))),
    };
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            // Ids are never reused, so the bytes behind a URL never change.
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        bytes,
    )
        .into_response())
}

