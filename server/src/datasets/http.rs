//! `/api/datasets`: the studio's DVC-versioned datasets (README: "Datasets").
//!
//! - `GET /datasets`: every dataset ([`super::DatasetInfo`]: hash, size, files, current
//!   version, `damaged` with the reason when the `.dvc` file does not match the cache);
//! - `GET /datasets/{id}`: `{"dataset": DatasetInfo, "versions": [Version]}`;
//! - `GET /datasets/{id}/diff?from=N&to=M`: [`super::VersionDiff`] (defaults: the current
//!   version against the one before it);
//! - `GET /datasets/{id}/versions/{n}/files/{relpath}[?thumb=PX]`: a file of version `n`
//!   from the cache (a PNG thumbnail at most PX pixels on its longer side with `thumb`, a
//!   grey square for a file that is not a readable picture);
//! - `DELETE /datasets/{id}/files/{relpath}`: removes a file and commits a version;
//! - `PUT /datasets/{id}/captions/{image}` with `{"caption": "..."}`: writes the image's
//!   caption (empty removes it) and commits a version. Both answer [`super::Commit`].

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, put};
use axum::{Json, Router};
use serde::Deserialize;

use super::{Project, VersionDiff};
use crate::http::extract::{AppJson, AppQuery};
use crate::{ApiError, AppState};

/// The routes, merged into `/api`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/datasets", get(list))
        .route("/datasets/{id}", get(show))
        .route("/datasets/{id}/diff", get(diff))
        .route("/datasets/{id}/versions/{n}/files/{*relpath}", get(file))
        .route("/datasets/{id}/files/{*relpath}", delete(remove))
        .route("/datasets/{id}/captions/{*image}", put(caption))
}

async fn blocking<T: Send + 'static>(state: &AppState, f: impl FnOnce(Project) -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    let data = state.data_dir.clone();
    tokio::task::spawn_blocking(move || f(Project::studio(&data)?)).await.map_err(|e| ApiError::Internal(e.to_string()))?
}

async fn list(State(state): State<AppState>) -> Result<Json<Vec<super::DatasetInfo>>, ApiError> {
    Ok(Json(blocking(&state, |p| Ok(p.list())).await?))
}

async fn show(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    let v = blocking(&state, move |p| {
        let ds = p.dataset(&id)?;
        Ok(serde_json::json!({ "dataset": p.info(&ds), "versions": p.versions(&ds)? }))
    })
    .await?;
    Ok(Json(v))
}

#[derive(Debug, Deserialize)]
struct DiffQuery {
    from: Option<u32>,
    to: Option<u32>,
}

async fn diff(State(state): State<AppState>, Path(id): Path<String>, AppQuery(q): AppQuery<DiffQuery>) -> Result<Json<VersionDiff>, ApiError> {
    Ok(Json(blocking(&state, move |p| Ok(p.diff(&p.dataset(&id)?, q.from, q.to)?)).await?))
}

#[derive(Debug, Deserialize)]
struct FileQuery {
    thumb: Option<u32>,
}

async fn file(State(state): State<AppState>, Path((id, n, relpath)): Path<(String, u32, String)>, AppQuery(q): AppQuery<FileQuery>) -> Result<Response, ApiError> {
    let (bytes, ctype) = blocking(&state, move |p| {
        let path = p.version_file(&p.dataset(&id)?, Some(n), &relpath)?;
        let bytes = std::fs::read(&path).map_err(|e| ApiError::Internal(format!("{}: {e}", path.display())))?;
        if let Some(side) = q.thumb {
            let side = side.clamp(16, 512);
            // A file that is not a readable picture (the trainer skips it) gets a grey square.
            let Ok(img) = atelier_engine::image_input::decode(&bytes, &Default::default()) else {
                return Ok((atelier_engine::metadata::encode_plain_png(&image::RgbImage::from_pixel(side, side, image::Rgb([200, 200, 200])))?, "image/png"));
            };
            let (w, h) = (img.width() as f64, img.height() as f64);
            let scale = (side as f64 / w.max(h)).min(1.0);
            let thumb = image::imageops::thumbnail(&img, ((w * scale).round() as u32).max(1), ((h * scale).round() as u32).max(1));
            return Ok((atelier_engine::metadata::encode_plain_png(&thumb)?, "image/png"));
        }
        let ext = relpath.rsplit('.').next().unwrap_or("").to_ascii_lowercase();
        let ctype = match ext.as_str() {
            "png" => "image/png",
            "jpg" | "jpeg" => "image/jpeg",
            "webp" => "image/webp",
            "txt" => "text/plain; charset=utf-8",
            _ => "application/octet-stream",
        };
        Ok((bytes, ctype))
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, ctype), (header::X_CONTENT_TYPE_OPTIONS, "nosniff")], bytes).into_response())
}

async fn remove(State(state): State<AppState>, Path((id, relpath)): Path<(String, String)>) -> Result<Json<super::Commit>, ApiError> {
    Ok(Json(blocking(&state, move |p| Ok(p.remove_files(&p.dataset(&id)?, &[relpath])?)).await?))
}

#[derive(Debug, Deserialize)]
struct CaptionBody {
    caption: String,
}

async fn caption(State(state): State<AppState>, Path((id, image)): Path<(String, String)>, AppJson(body): AppJson<CaptionBody>) -> Result<Json<super::Commit>, ApiError> {
    Ok(Json(blocking(&state, move |p| Ok(p.set_caption(&p.dataset(&id)?, &image, &body.caption)?)).await?))
}
