//! Saved blends and share links over HTTP (README: "JSON API"):
//! `GET /blends`, `GET|PUT|DELETE /blends/{name}`, `POST /blends/resolve` (`{"link"}`).

use atelier_blend::Blend;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::blends::{MissingStyle, SavedBlend};
use crate::{ApiError, AppState};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/blends", get(list))
        .route("/blends/resolve", post(resolve))
        .route("/blends/{name}", get(one).put(save).delete(delete))
}

fn internal(e: anyhow::Error) -> ApiError {
    ApiError::Internal(format!("{e:#}"))
}

async fn list(State(state): State<AppState>) -> Json<Vec<SavedBlend>> {
    Json(state.blends.list())
}

async fn one(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<SavedBlend>, ApiError> {
    crate::styles::check_name(&name).map_err(|e| ApiError::Invalid { field: "name".into(), message: e.to_string() })?;
    state.blends.get(&name).map_err(internal)?.map(Json).ok_or(ApiError::NotFound { what: "blend", id: name })
}

async fn save(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<Blend>, JsonRejection>,
) -> Result<Json<SavedBlend>, ApiError> {
    let Json(blend) = body.map_err(|e| ApiError::BadBody(e.body_text()))?;
    crate::styles::check_name(&name).map_err(|e| ApiError::Invalid { field: "name".into(), message: e.to_string() })?;
    atelier_blend::encode(&blend).map_err(|e| ApiError::Invalid { field: "blend".into(), message: e.to_string() })?;
    Ok(Json(state.blends.save(&name, &blend).map_err(internal)?))
}

async fn delete(State(state): State<AppState>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    crate::styles::check_name(&name).map_err(|e| ApiError::Invalid { field: "name".into(), message: e.to_string() })?;
    if state.blends.delete(&name).map_err(internal)? {
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

async fn resolve(State(state): State<AppState>, body: Result<Json<ResolveBody>, JsonRejection>) -> Result<Json<ResolveReply>, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::BadBody(e.body_text()))?;
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
