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
        .route("/styles", get(styles_list))
        .route("/styles/{name}", axum::routing::delete(style_delete))
        .route("/styles/{name}/rename", post(style_rename))
        .route("/styles/{name}/files/{file}", get(style_file))
        .merge(crate::training_api::routes())
        .merge(crate::blends_api::routes())
        .merge(crate::negatives_api::routes())
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

pub(crate) fn json_rejection(rejection: JsonRejection) -> ApiError {
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
    Ok(status_stream(rx, |s: &JobStatus| s.state.is_finished()))
}

/// An SSE stream of a `watch` channel: the current value first, then each change, ending
/// after a value for which `last` holds. Comments keep idle connections alive.
pub(crate) fn status_stream<T>(
    rx: tokio::sync::watch::Receiver<T>,
    last: fn(&T) -> bool,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>>
where
    T: serde::Serialize + Clone + Send + Sync + 'static,
{
    let stream = futures::stream::unfold((rx, true, false), move |(mut rx, first, done)| async move {
        if done {
            return None;
        }
        if !first && rx.changed().await.is_err() {
            return None; // forgotten, or the server is shutting down
        }
        let value = rx.borrow_and_update().clone();
        let finished = last(&value);
        let event = Event::default().json_data(&value).unwrap_or_else(|_| Event::default().comment("encode error"));
        Some((Ok(event), (rx, false, finished)))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
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

/// One style as the API lists it.
#[derive(serde::Serialize)]
struct StyleItem {
    name: String,
    builtin: bool,
    card: Option<crate::styles::StyleCard>,
    /// A1111 short hash of the kohya file (what blends and share links name it by).
    hash: Option<String>,
    /// Files that can be fetched from `/api/styles/{name}/files/{file}`.
    files: Vec<String>,
}

/// Files of a style folder the API serves, with their content types.
const STYLE_FILES: [(&str, &str); 5] = [
    ("compare.png", "image/png"),
    ("loss.png", "image/png"),
    ("card.json", "application/json"),
    ("adapter.safetensors", "application/octet-stream"),
    ("adapter.diffusers.safetensors", "application/octet-stream"),
];

/// `GET /api/styles`: every style with its card.
async fn styles_list(State(state): State<AppState>) -> Json<Vec<StyleItem>> {
    let items = state
        .styles
        .list()
        .into_iter()
        .map(|s| StyleItem { name: s.name.clone(), builtin: s.builtin, card: s.card.clone(), hash: crate::blends::style_hash(&s), files: style_files(&s) })
        .collect();
    Json(items)
}

/// The files of a style that `/api/styles/{name}/files/{file}` serves.
pub(crate) fn style_files(s: &crate::styles::StyleEntry) -> Vec<String> {
    STYLE_FILES.iter().map(|(f, _)| f.to_string()).filter(|f| style_path(s, f).is_some_and(|p| p.is_file())).collect()
}

/// The path behind an API file name (`adapter.safetensors` is the kohya file `NAME.safetensors`).
fn style_path(s: &crate::styles::StyleEntry, file: &str) -> Option<std::path::PathBuf> {
    match file {
        "adapter.safetensors" => Some(s.adapter()),
        "adapter.diffusers.safetensors" => Some(s.diffusers_adapter()),
        f if STYLE_FILES.iter().any(|(n, _)| *n == f) => Some(s.dir.join(f)),
        _ => None,
    }
}

/// `GET /api/styles/{name}/files/{file}`: the comparison sheet, loss plot, card, or an
/// adapter file (downloaded as `NAME.safetensors` / `NAME.diffusers.safetensors`).
async fn style_file(State(state): State<AppState>, Path((name, file)): Path<(String, String)>) -> Result<Response, ApiError> {
    let s = state.styles.find(&name).ok_or_else(|| ApiError::NotFound { what: "style", id: name.clone() })?;
    let path = style_path(&s, &file).ok_or_else(|| ApiError::NotFound { what: "style file", id: format!("{name}/{file}") })?;
    let bytes = tokio::fs::read(&path).await.map_err(|_| ApiError::NotFound { what: "style file", id: format!("{name}/{file}") })?;
    let ctype = STYLE_FILES.iter().find(|(n, _)| *n == file).map_or("application/octet-stream", |(_, t)| *t);
    let mut resp = (StatusCode::OK, [(header::CONTENT_TYPE, ctype)], bytes).into_response();
    if file.ends_with(".safetensors") {
        let download = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or(file);
        if let Ok(v) = format!("attachment; filename=\"{download}\"").parse() {
            resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
        }
    }
    Ok(resp)
}

#[derive(Deserialize)]
struct RenameBody {
    name: String,
}

/// `POST /api/styles/{name}/rename` with `{"name": NEW}`.
async fn style_rename(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<RenameBody>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(body) = body.map_err(json_rejection)?;
    style_change(&state, &name, |lib| lib.rename(&name, &body.name))?;
    Ok(Json(serde_json::json!({ "name": body.name })))
}

/// `DELETE /api/styles/{name}`.
async fn style_delete(State(state): State<AppState>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    style_change(&state, &name, |lib| lib.delete(&name))?;
    Ok(StatusCode::NO_CONTENT)
}

fn style_change(
    state: &AppState,
    name: &str,
    change: impl FnOnce(&crate::styles::StyleLibrary) -> anyhow::Result<()>,
) -> Result<(), ApiError> {
    if state.styles.find(name).is_none() {
        return Err(ApiError::NotFound { what: "style", id: name.to_string() });
    }
    change(&state.styles).map_err(|e| ApiError::Invalid { field: "name".into(), message: e.to_string() })
}
