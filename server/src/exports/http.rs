//! Core ML exports over HTTP (README: "JSON API"): `POST /exports` (an
//! [`ExportRequest`]; 202 with the queued export), `GET /exports` (newest first),
//! `GET /exports/{id}`, `GET /exports/{id}/events` (SSE, one event per change, ending with
//! the export), `POST /exports/{id}/cancel`, and `GET /exports/{id}/file` (the zip, as an
//! attachment, streamed from disk).

use app::dto::exports::{ExportRequest, ExportStatus};
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::io::AsyncReadExt;

use crate::http::extract::AppJson;
use crate::{ApiError, AppState};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/exports", get(list).post(start))
        .route("/exports/{id}", get(status))
        .route("/exports/{id}/events", get(events))
        .route("/exports/{id}/cancel", post(cancel))
        .route("/exports/{id}/file", get(file))
}

/// `POST /api/exports`: checks the request (400 naming the field, 404 for an unknown style)
/// and answers 202 with the queued export.
async fn start(State(state): State<AppState>, AppJson(request): AppJson<ExportRequest>) -> Result<(StatusCode, Json<ExportStatus>), ApiError> {
    let exports = state.exports.clone();
    let status = tokio::task::spawn_blocking(move || exports.submit(request)).await.map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok((StatusCode::ACCEPTED, Json(status)))
}

async fn list(State(state): State<AppState>) -> Json<Vec<ExportStatus>> {
    Json(state.exports.list())
}

async fn status(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<ExportStatus>, ApiError> {
    Ok(Json(state.exports.status(&id)?))
}

async fn events(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let rx = state.exports.subscribe(&id)?;
    Ok(crate::http::extract::status_stream(rx, |s: &ExportStatus| s.state.is_finished()).into_response())
}

async fn cancel(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<ExportStatus>, ApiError> {
    Ok(Json(state.exports.cancel(&id)?))
}

/// `GET /api/exports/{id}/file`: the zip (`application/zip`, `Content-Disposition:
/// attachment; filename="Atelier-STYLE-coreml.zip"`), read from disk in 256 KiB chunks.
async fn file(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let (path, name) = state.exports.file(&id)?;
    let file = tokio::fs::File::open(&path).await.map_err(|e| ApiError::Internal(format!("{}: {e}", path.display())))?;
    let len = file.metadata().await.map_err(|e| ApiError::Internal(format!("{}: {e}", path.display())))?.len();
    let chunks = futures::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buf = vec![0u8; 256 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    // Fused: layers above (compression) may poll again after the end.
    let chunks = futures::StreamExt::fuse(chunks);
    let mut response = Body::from_stream(chunks).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/zip"));
    headers.insert(header::CONTENT_LENGTH, len.into());
    if let Ok(v) = format!("attachment; filename=\"{name}\"").parse() {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}
