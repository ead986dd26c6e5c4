//! The JSON API under `/api` (documented in the README). Every error is JSON `{"error": ...}`.

use std::convert::Infallible;
use std::time::Duration;

use app::dto::{GalleryItem, GalleryPage, GenerateRequest, JobAccepted, JobStatus, ModelInfo, MAX_BODY_BYTES};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, OriginalUri, Path, Query, State};
use axum::http::{header, Method, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use serde::Deserialize;

use crate::{ApiError, AppState};

/// The `/api` routes (nested by [`crate::app`]).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/model", get(model))
        .route("/generate", post(generate))
        .route("/jobs/{id}", get(job_status))
        .route("/jobs/{id}/events", get(job_events))
        .route("/jobs/{id}/cancel", post(cancel_job))
        .route("/gallery", get(gallery_list))
        .route("/gallery/{id}", get(gallery_item).delete(gallery_delete))
        .route("/images/{file}", get(image_file))
        .fallback(|method: Method, OriginalUri(uri): OriginalUri| async move { ApiError::UnknownRoute(format!("{method} {}", uri.path())) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn model(State(state): State<AppState>) -> Json<ModelInfo> {
    Json((*state.model).clone())
}

/// `POST /api/generate`: validates and queues; 202 with the job id and seed.
async fn generate(
    State(state): State<AppState>,
    body: Result<Json<GenerateRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<JobAccepted>), ApiError> {
    let Json(request) = body.map_err(json_rejection)?;
    let accepted = state.submit(request).await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge { limit: MAX_BODY_BYTES }
    } else {
        ApiError::BadBody(rejection.body_text())
    }
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
    // Sends the current status first, then each change; stops after a finished state.
    let stream = futures::stream::unfold((rx, true, false), |(mut rx, first, done)| async move {
        if done {
            return None;
        }
        if !first && rx.changed().await.is_err() {
            return None; // job forgotten or server shutting down
        }
        let status = rx.borrow_and_update().clone();
        let finished = status.state.is_finished();
        let event = Event::default().json_data(&status).unwrap_or_else(|_| Event::default().comment("encode error"));
        Some((Ok(event), (rx, false, finished)))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
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
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<GalleryPage>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadBody(e.body_text()))?;
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
