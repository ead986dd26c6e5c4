//! Saved blends, share links and bakes over HTTP (README: "JSON API"):
//! `GET /blends`, `GET|PUT|DELETE /blends/{name}`, `POST /blends/resolve` (`{"link"}`);
//! bakes: `POST /blends/bakes` (a `BakeRequest`), `GET /blends/bakes`,
//! `GET /blends/bakes/{id}`, `GET /blends/bakes/{id}/events` (SSE),
//! `POST /blends/bakes/{id}/cancel`, `GET /blends/bakes/{id}/file`, and
//! `GET /blends/bake?b=CODE[&rank=R]`, which bakes and answers the file in one request.

use atelier_blend::Blend;
use axum::extract::{Path, State};
use app::dto::{BakeRequest, BakeState, BakeStatus};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::blends::{MissingStyle, SavedBlend};
use crate::http::extract::{AppJson, AppQuery};
use crate::{ApiError, AppState};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/blends", get(list))
        .route("/blends/resolve", post(resolve))
        .route("/blends/bake", get(bake_now))
        .route("/blends/bakes", get(bake_list).post(bake_start))
        .route("/blends/bakes/{id}", get(bake_status))
        .route("/blends/bakes/{id}/events", get(bake_events))
        .route("/blends/bakes/{id}/cancel", post(bake_cancel))
        .route("/blends/bakes/{id}/file", get(bake_file))
        .route("/blends/{name}", get(one).put(save).delete(delete))
}

async fn list(State(state): State<AppState>) -> Json<Vec<SavedBlend>> {
    Json(state.blends.list())
}

async fn one(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<SavedBlend>, ApiError> {
    crate::styles::check_name(&name)?;
    state.blends.get(&name)?.map(Json).ok_or(ApiError::NotFound { what: "blend", id: name })
}

async fn save(
    State(state): State<AppState>,
    Path(name): Path<String>,
    AppJson(blend): AppJson<Blend>,
) -> Result<Json<SavedBlend>, ApiError> {
    crate::styles::check_name(&name)?;
    atelier_blend::encode(&blend).map_err(|e| ApiError::Invalid { field: "blend".into(), message: e.to_string() })?;
    Ok(Json(state.blends.save(&name, &blend)?))
}

async fn delete(State(state): State<AppState>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    crate::styles::check_name(&name)?;
    if state.blends.delete(&name)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound { what: "blend", id: name })
    }
}

#[derive(Deserialize)]
struct ResolveBody {
    link: String,
}

/// What a link holds and what this studio makes of it.
#[derive(Serialize)]
struct ResolveReply {
    blend: Blend,
    /// The local style name used for each blend style (null where missing).
    local_names: Vec<Option<String>>,
    missing: Vec<MissingStyle>,
    /// The blend was made on another model than the one loaded.
    other_model: bool,
    /// The prompt with `<lora:…>` tags for the local styles, ready for `/api/generate`
    /// (absent when a style is missing).
    prompt: Option<String>,
}

async fn resolve(State(state): State<AppState>, AppJson(body): AppJson<ResolveBody>) -> Result<Json<ResolveReply>, ApiError> {
    let blend = atelier_blend::decode(&body.link).map_err(|e| ApiError::Invalid { field: "link".into(), message: e.to_string() })?;
    let styles = state.styles.clone();
    let model_hash = state.model.hash.clone();
    let r = tokio::task::spawn_blocking(move || crate::blends::resolve(blend, &styles, &model_hash))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(ResolveReply {
        prompt: r.tagged_prompt().ok(),
        local_names: r.styles.iter().map(|s| s.as_ref().map(|e| e.name.clone())).collect(),
        missing: r.missing.clone(),
        other_model: r.other_model,
        blend: r.blend,
    }))
}

#[derive(Deserialize)]
struct BakeQuery {
    /// The share link or its code.
    b: String,
    /// Compress to this rank per layer; exact when absent.
    rank: Option<usize>,
}

/// `GET /api/blends/bake?b=CODE[&rank=R]`: queues a bake, waits for it and answers the file
/// (download), with the relative error of a compressed bake in `X-Bake-Relative-Error`.
/// For a plain link; the page uses `POST /api/blends/bakes` to show progress.
async fn bake_now(State(state): State<AppState>, AppQuery(q): AppQuery<BakeQuery>) -> Result<Response, ApiError> {
    let bakes = state.bakes.clone();
    let status = tokio::task::spawn_blocking(move || bakes.submit(BakeRequest { link: q.b, rank: q.rank }, "b"))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    // A client that goes away takes its bake with it (nobody else knows its id).
    let mut guard = CancelOnDrop { bakes: state.bakes.clone(), id: status.id.clone(), armed: true };
    let mut rx = state.bakes.subscribe(&status.id)?;
    let last = rx.wait_for(|s| s.state.is_finished()).await.map_err(|_| ApiError::Unavailable("the server is shutting down".into()))?.clone();
    guard.armed = false;
    match last.state {
        BakeState::Done { relative_error, .. } => file_response(&state, &last.id, Some(relative_error)).await,
        BakeState::Failed { message } => Err(ApiError::Invalid { field: "b".into(), message }),
        BakeState::Cancelled => Err(ApiError::Unavailable("the bake was cancelled".into())),
        BakeState::Queued { .. } | BakeState::Running => Err(ApiError::Internal("bake ended unfinished".into())),
    }
}

/// Cancels a one-request bake when its request is dropped before the bake ends.
struct CancelOnDrop {
    bakes: std::sync::Arc<crate::blends::bake::Bakes>,
    id: String,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.bakes.cancel(&self.id);
        }
    }
}

/// `POST /api/blends/bakes` with a [`BakeRequest`]: 202 with the queued bake.
async fn bake_start(State(state): State<AppState>, AppJson(request): AppJson<BakeRequest>) -> Result<(StatusCode, Json<BakeStatus>), ApiError> {
    let bakes = state.bakes.clone();
    let status = tokio::task::spawn_blocking(move || bakes.submit(request, "link")).await.map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok((StatusCode::ACCEPTED, Json(status)))
}

async fn bake_list(State(state): State<AppState>) -> Json<Vec<BakeStatus>> {
    Json(state.bakes.list())
}

async fn bake_status(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<BakeStatus>, ApiError> {
    Ok(Json(state.bakes.status(&id)?))
}

/// `GET /api/blends/bakes/{id}/events`: SSE, one event per change, ending with the bake.
async fn bake_events(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let rx = state.bakes.subscribe(&id)?;
    Ok(crate::http::extract::status_stream(rx, |s: &BakeStatus| s.state.is_finished()).into_response())
}

async fn bake_cancel(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<BakeStatus>, ApiError> {
    Ok(Json(state.bakes.cancel(&id)?))
}

/// `GET /api/blends/bakes/{id}/file`: the baked kohya file.
async fn bake_file(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let error = match state.bakes.status(&id)?.state {
        BakeState::Done { relative_error, .. } => Some(relative_error),
        _ => None,
    };
    file_response(&state, &id, error).await
}

async fn file_response(state: &AppState, id: &str, relative_error: Option<f64>) -> Result<Response, ApiError> {
    let path = state.bakes.file(id)?;
    let bytes = tokio::fs::read(&path).await.map_err(|e| ApiError::Internal(format!("{}: {e}", path.display())))?;
    let mut headers = vec![
        (header::CONTENT_TYPE, "application/octet-stream".to_string()),
        (header::CONTENT_DISPOSITION, "attachment; filename=\"blend.safetensors\"".to_string()),
    ];
    if let Some(e) = relative_error {
        headers.push((header::HeaderName::from_static("x-bake-relative-error"), format!("{e}")));
    }
    let mut response = bytes.into_response();
    for (k, v) in headers {
        if let Ok(v) = v.parse() {
            response.headers_mut().insert(k, v);
        }
    }
    Ok(response)
}
