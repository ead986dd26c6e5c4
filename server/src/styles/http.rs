//! Styles over HTTP (README: "JSON API"):
//!
//! - `GET /styles`, `DELETE /styles/{name}`, `POST /styles/{name}/rename`,
//!   `GET /styles/{name}/files/{file}`, `GET /styles/by-hash/{hash}`,
//!   `POST /styles/import?name=NAME[&hash=HASH]`.
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
use axum::extract::{DefaultBodyLimit, Multipart, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use crate::http::extract::{AppJson, AppQuery};
use crate::{ApiError, AppState};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/styles", get(styles_list))
        .route("/styles/{name}", axum::routing::delete(style_delete))
        .route("/styles/{name}/rename", post(style_rename))
        .route("/styles/{name}/files/{file}", get(style_file))
        .route("/styles/by-hash/{hash}", get(style_by_hash))
        .route("/styles/import", post(import_style).layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES)))
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
    AppQuery(query): AppQuery<UploadQuery>,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<(StatusCode, Json<DatasetSummary>), ApiError> {
    let trainer = state.training()?;
    let mut multipart = multipart.map_err(|e| ApiError::BadBody(format!("{}; send multipart/form-data", e.body_text())))?;
    let incoming = trainer.datasets().incoming_dir();
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
    let summary = tokio::task::spawn_blocking(move || trainer.datasets().dataset(&id)).await.map_err(|e| ApiError::Internal(e.to_string()))??;
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
    AppQuery(q): AppQuery<FileQuery>,
) -> Result<Response, ApiError> {
    let path = state.training()?.datasets().dataset_file(&id, &file)?;
    let bytes = tokio::fs::read(&path).await.map_err(|e| io_error("reading the dataset", e))?;
    if let Some(side) = q.thumb {
        let side = side.clamp(16, 512);
        let png = tokio::task::spawn_blocking(move || {
            let img = atelier_engine::image_input::decode(&bytes, &Default::default()).map_err(|e| ApiError::BadImage(e.to_string()))?;
            let (w, h) = (img.width() as f64, img.height() as f64);
            let scale = (side as f64 / w.max(h)).min(1.0);
            let thumb = image::imageops::thumbnail(&img, ((w * scale).round() as u32).max(1), ((h * scale).round() as u32).max(1));
            Ok::<_, ApiError>(atelier_engine::metadata::encode_plain_png(&thumb)?)
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
    AppJson(req): AppJson<StyleTrainingRequest>,
) -> Result<(StatusCode, Json<TrainingStatus>), ApiError> {
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
    Ok(crate::http::extract::status_stream(rx, |s: &TrainingStatus| !s.state.is_active()).into_response())
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

/// One style as the API lists it.
#[derive(serde::Serialize)]
struct StyleItem {
    name: String,
    builtin: bool,
    card: Option<super::StyleCard>,
    /// A1111 short hash of the kohya file (what blends and share links name it by).
    hash: Option<String>,
    /// Files that can be fetched from `/api/styles/{name}/files/{file}`.
    files: Vec<String>,
}

/// `GET /api/styles`: every style with its card.
async fn styles_list(State(state): State<AppState>) -> Json<Vec<StyleItem>> {
    let items = state
        .styles
        .list()
        .into_iter()
        .map(|s| StyleItem { name: s.name.clone(), builtin: s.builtin, card: s.card.clone(), hash: s.short_hash(), files: super::served_files(&s) })
        .collect();
    Json(items)
}

/// `GET /api/styles/{name}/files/{file}`: the comparison sheet, loss plot, card, or an
/// adapter file (downloaded as `NAME.safetensors` / `NAME.diffusers.safetensors`).
async fn style_file(State(state): State<AppState>, Path((name, file)): Path<(String, String)>) -> Result<Response, ApiError> {
    let s = state.styles.find(&name).ok_or_else(|| ApiError::NotFound { what: "style", id: name.clone() })?;
    let path = super::served_path(&s, &file).ok_or_else(|| ApiError::NotFound { what: "style file", id: format!("{name}/{file}") })?;
    let bytes = tokio::fs::read(&path).await.map_err(|_| ApiError::NotFound { what: "style file", id: format!("{name}/{file}") })?;
    let ctype = super::SERVED_FILES.iter().find(|(n, _)| *n == file).map_or("application/octet-stream", |(_, t)| *t);
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
    AppJson(body): AppJson<RenameBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    super::change(&state.styles, &name, |lib| lib.rename(&name, &body.name))?;
    Ok(Json(serde_json::json!({ "name": body.name })))
}

/// `DELETE /api/styles/{name}`.
async fn style_delete(State(state): State<AppState>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    super::change(&state.styles, &name, |lib| lib.delete(&name))?;
    Ok(StatusCode::NO_CONTENT)
}


/// `GET /api/styles/by-hash/{hash}`: the kohya file of the style with that A1111 short hash,
/// readable from other origins, so a studio that opens a shared blend can fetch what it lacks.
async fn style_by_hash(State(state): State<AppState>, Path(hash): Path<String>) -> Result<axum::response::Response, ApiError> {
    use axum::http::header;
    use axum::response::IntoResponse;
    let not_found = || ApiError::NotFound { what: "style with hash", id: hash.clone() };
    if hash.len() != 10 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(not_found());
    }
    let styles = state.styles.clone();
    let wanted = hash.to_ascii_lowercase();
    let entry = tokio::task::spawn_blocking(move || styles.list().into_iter().find(|e| e.short_hash().as_deref() == Some(wanted.as_str())))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .ok_or_else(not_found)?;
    let bytes = tokio::fs::read(entry.adapter()).await.map_err(|_| not_found())?;
    let disposition = format!("attachment; filename=\"{}.safetensors\"", entry.name);
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_DISPOSITION, disposition),
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*".to_string()),
        ],
        bytes,
    )
        .into_response())
}

#[derive(Deserialize)]
struct ImportQuery {
    name: String,
    /// When given, the file must have this A1111 short hash.
    hash: Option<String>,
}

/// `POST /api/styles/import?name=NAME[&hash=HASH]` with a LoRA file as the body: checks it is
/// a LoRA this studio reads (and has the expected hash), then adds it to the library.
async fn import_style(
    State(state): State<AppState>,
    AppQuery(q): AppQuery<ImportQuery>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let invalid = |field: &str, message: String| ApiError::Invalid { field: field.into(), message };
    super::check_name(&q.name)?;
    if state.styles.find(&q.name).is_some() {
        return Err(invalid("name", format!("a style called {} already exists; import it under another name", q.name)));
    }
    let styles = state.styles.clone();
    let name = q.name.clone();
    let hash = tokio::task::spawn_blocking(move || -> Result<String, ApiError> {
        let dir = styles.style_dir(&name)?;
        let path = dir.join(format!("{name}.safetensors"));
        // Checked before it takes its name: a refused file leaves nothing behind.
        let mut hash = String::new();
        let written = atelier_engine::files::write_atomic_with(
            &path,
            |tmp| {
                std::fs::write(tmp, &body).map_err(|e| ApiError::Internal(e.to_string()))?;
                let adapter = atelier_engine::lora::LoraAdapter::load(tmp).map_err(|e| invalid("file", e.to_string()))?;
                if let Some(want) = &q.hash {
                    if !adapter.hash.eq_ignore_ascii_case(want) {
                        return Err(invalid("hash", format!("the file's hash is {}, not {want}: it is another version of the style", adapter.hash)));
                    }
                }
                hash = adapter.hash;
                Ok(())
            },
            |e| ApiError::Internal(e.to_string()),
        );
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(hash)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "name": q.name, "hash": hash }))))
}

