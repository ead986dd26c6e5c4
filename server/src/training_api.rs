//! The style-training endpoints under `/api` (README: "JSON API"):
//!
//! - `POST /style-datasets[?dataset=ID]`: multipart upload (field `files`, repeatable) of
//!   images, `.txt` captions and zips into a new (or the given) dataset; answers its report.
//! - `GET /style-datasets/{id}`, `GET /style-datasets/{id}/files/{file}`.
//! - `POST /style-trainings` (a [`StyleTrainingRequest`]), `GET /style-trainings`,
//!   `GET|DELETE /style-trainings/{id}`, `GET /style-trainings/{id}/events` (SSE),
//!   `POST /style-trainings/{id}/stop`, `POST /style-trainings/{id}/resume`,
//!   `GET /style-trainings/{id}/samples/{step}.png`.

use std::path::PathBuf;

use app::dto::{DatasetSummary, StyleTrainingRequest, TrainingStatus, MAX_UPLOAD_BYTES};
use axum::extract::multipart::MultipartError;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use crate::{ApiError, AppState};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/style-datasets", post(upload).layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES)))
        .route("/style-datasets/{id}", get(dataset))
        .route("/style-datasets/{id}/files/{file}", get(dataset_file))
        .route("/style-trainings", get(list).post(start))
        .route("/style-trainings/{id}", get(status).delete(delete))
        .route("/style-trainings/{id}/events", get(events))
        .route("/style-trainings/{id}/stop", post(stop))
        .route("/style-trainings/{id}/resume", post(resume))
        .route("/style-trainings/{id}/samples/{file}", get(sample))
}

fn io_error(what: &str, e: std::io::Error) -> ApiError {
    if e.raw_os_error() == Some(28) {
        ApiError::Unavailable(format!("the server's disk is full while {what}: free some space and try again"))
    } else {
        ApiError::Internal(format!("{what}: {e}"))
    }
}

fn multipart_error(e: MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge { limit: MAX_UPLOAD_BYTES }
    } else {
        ApiError::BadBody(format!("{}; send multipart/form-data with the files in fields named `files`", e.body_text()))
    }
}

#[derive(Deserialize)]
struct UploadQuery {
    /// Add to this dataset instead of starting a new one.
    dataset: Option<String>,
}

/// Streams every file of the form to a temporary file, then hands them to the trainer.
async fn upload(
    State(state): State<AppState>,
    Query(query): Query<UploadQuery>,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<(StatusCode, Json<DatasetSummary>), ApiError> {
    let trainer = state.training()?;
    let mut multipart = multipart.map_err(|e| ApiError::BadBody(format!("{}; send multipart/form-data", e.body_text())))?;
    let incoming = trainer.incoming_dir();
    tokio::fs::create_dir_all(&incoming).await.map_err(|e| io_error("receiving the upload", e))?;
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    let received = async {
        while let Some(mut field) = multipart.next_field().await.map_err(multipart_error)? {
            let Some(name) = field.file_name().map(str::to_string) else { continue };
            let tmp = incoming.join(uuid::Uuid::new_v4().to_string());
            let mut out = tokio::fs::File::create(&tmp).await.map_err(|e| io_error("receiving the upload", e))?;
            files.push((name, tmp));
            while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                out.write_all(&chunk).await.map_err(|e| io_error("receiving the upload", e))?;
            }
            out.flush().await.map_err(|e| io_error("receiving the upload", e))?;
        }
        Ok::<(), ApiError>(())
    }
    .await;
    if let Err(e) = received {
        for (_, tmp) in &files {
            let _ = tokio::fs::remove_file(tmp).await;
        }
        return Err(e);
    }
    if files.is_empty() {
        return Err(ApiError::Invalid {
            field: "files".into(),
            message: "the upload holds no files: send images, .txt captions or .zip archives in form fields named `files`".into(),
        });
    }
    let summary = tokio::task::spawn_blocking(move || trainer.add_files(query.dataset.as_deref(), files))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok((StatusCode::CREATED, Json(summary)))
}

async fn dataset(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<DatasetSummary>, ApiError> {
    let trainer = state.training()?;
    let summary = tokio::task::spawn_blocking(move || trainer.dataset(&id)).await.map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(Json(summary))
}

/// `?thumb=N`: a thumbnail at most N pixels on its longer side.
#[derive(Debug, Deserialize)]
struct FileQuery {
    thumb: Option<u32>,
}

/// A dataset file as uploaded, or (`?thumb=N`) a PNG thumbnail made by the one image
/// reader the trainer uses: upright by EXIF orientation, transparency on the background,
/// so the page shows what will be trained on.
async fn dataset_file(
    State(state): State<AppState>,
    Path((id, file)): Path<(String, String)>,
    Query(q): Query<FileQuery>,
) -> Result<Response, ApiError> {
    let path = state.training()?.dataset_file(&id, &file)?;
    let bytes = tokio::fs::read(&path).await.map_err(|e| io_error("reading the dataset", e))?;
    if let Some(side) = q.thumb {
        let side = side.clamp(16, 512);
        let png = tokio::task::spawn_blocking(move || {
            let img = atelier_engine::image_input::decode(&bytes, &Default::default()).map_err(|e| ApiError::BadImage(e.to_string()))?;
            let (w, h) = (img.width() as f64, img.height() as f64);
            let scale = (side as f64 / w.max(h)).min(1.0);
            let thumb = image::imageops::thumbnail(&img, ((w * scale).round() as u32).max(1), ((h * scale).round() as u32).max(1));
            Ok::<_, ApiError>(crate::png::encode_png(&thumb, None)?)
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
        return Ok(([(header::CONTENT_TYPE, "image/png"), (header::X_CONTENT_TYPE_OPTIONS, "nosniff")], png).into_response());
    }
    let ctype = match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        Some("txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    };
    Ok(([(header::CONTENT_TYPE, ctype), (header::X_CONTENT_TYPE_OPTIONS, "nosniff")], bytes).into_response())
}

async fn list(State(state): State<AppState>) -> Result<Json<Vec<TrainingStatus>>, ApiError> {
    Ok(Json(state.training()?.list()))
}

async fn start(
    State(state): State<AppState>,
    body: Result<Json<StyleTrainingRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<TrainingStatus>), ApiError> {
    let Json(req) = body.map_err(|e| ApiError::BadBody(e.body_text()))?;
    let trainer = state.training()?;
    let status = tokio::task::spawn_blocking(move || trainer.start(req)).await.map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok((StatusCode::ACCEPTED, Json(status)))
}

async fn status(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<TrainingStatus>, ApiError> {
    Ok(Json(state.training()?.status(&id)?))
}

async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    state.training()?.delete(&id)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn events(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let rx = state.training()?.subscribe(&id)?;
    Ok(crate::api::status_stream(rx, |s: &TrainingStatus| !s.state.is_active()).into_response())
}

async fn stop(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<TrainingStatus>, ApiError> {
    Ok(Json(state.training()?.stop(&id)?))
}

async fn resume(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<TrainingStatus>, ApiError> {
    Ok(Json(state.training()?.resume(&id)?))
}

async fn sample(State(state): State<AppState>, Path((id, file)): Path<(String, String)>) -> Result<Response, ApiError> {
    let not_found = || ApiError::NotFound { what: "sample sheet", id: format!("{id}/{file}") };
    let step: u64 = file.strip_suffix(".png").and_then(|s| s.parse().ok()).ok_or_else(not_found)?;
    let path = state.training()?.sample_path(&id, step)?;
    let bytes = tokio::fs::read(&path).await.map_err(|_| not_found())?;
    Ok(([(header::CONTENT_TYPE, "image/png")], bytes).into_response())
}
