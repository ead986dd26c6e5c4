//! Negative-prompt optimisation over HTTP (README: "JSON API"): analysis and suggestions,
//! the editable knowledge base, optimisation runs with live status, cancel and images.

use app::dto::{NegativeAnalysis, NegativeAnalysisRequest, OptimizeRequest, OptimizeStatus};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::negatives::history::Entry;
use crate::negatives::knowledge::KnowledgeBase;
use crate::http::extract::AppJson;
use crate::{ApiError, AppState};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/negatives/analyze", post(analyze))
        .route("/negatives/knowledge", get(knowledge).put(save_knowledge))
        .route("/negatives/history", get(history))
        .route("/negatives/optimize", post(optimize))
        .route("/negatives/runs", get(list))
        .route("/negatives/runs/{id}", get(status))
        .route("/negatives/runs/{id}/events", get(events))
        .route("/negatives/runs/{id}/cancel", post(cancel))
        .route("/negatives/runs/{id}/images/{file}", get(image))
}

async fn analyze(
    State(state): State<AppState>,
    AppJson(r): AppJson<NegativeAnalysisRequest>,
) -> Result<Json<NegativeAnalysis>, ApiError> {
    let service = state.negatives()?;
    Ok(Json(service.context().analyze(&r.prompt, &r.negative_prompt)?))
}

async fn knowledge(State(state): State<AppState>) -> Result<Json<KnowledgeBase>, ApiError> {
    Ok(Json(state.negatives()?.context().knowledge.load()?))
}

async fn save_knowledge(
    State(state): State<AppState>,
    AppJson(kb): AppJson<KnowledgeBase>,
) -> Result<Json<KnowledgeBase>, ApiError> {
    kb.check().map_err(|message| ApiError::Invalid { field: "knowledge".into(), message })?;
    let file = &state.negatives()?.context().knowledge;
    file.save(&kb).map_err(|e| {
        ApiError::Unavailable(format!("cannot save the knowledge base ({}); check the disk and try again", crate::error::report(&e)))
    })?;
    Ok(Json(kb))
}

async fn history(State(state): State<AppState>) -> Result<Json<Vec<Entry>>, ApiError> {
    Ok(Json(state.negatives()?.context().history.entries()?))
}

/// `POST /api/negatives/optimize`: 202 with the queued run.
async fn optimize(
    State(state): State<AppState>,
    AppJson(r): AppJson<OptimizeRequest>,
) -> Result<(StatusCode, Json<OptimizeStatus>), ApiError> {
    Ok((StatusCode::ACCEPTED, Json(state.negatives()?.submit(r)?)))
}

async fn list(State(state): State<AppState>) -> Result<Json<Vec<OptimizeStatus>>, ApiError> {
    Ok(Json(state.negatives()?.list()))
}

async fn status(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<OptimizeStatus>, ApiError> {
    Ok(Json(state.negatives()?.status(&id)?))
}

async fn events(State(state): State<AppState>, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let rx = state.negatives()?.subscribe(&id)?;
    Ok(crate::http::extract::status_stream(rx, |s: &OptimizeStatus| s.state.is_finished()))
}

async fn cancel(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<OptimizeStatus>, ApiError> {
    Ok(Json(state.negatives()?.cancel(&id)?))
}

async fn image(State(state): State<AppState>, Path((id, file)): Path<(String, String)>) -> Result<Response, ApiError> {
    let path = state.negatives()?.file(&id, &file)?;
    let bytes = tokio::fs::read(&path).await.map_err(|e| ApiError::Internal(format!("{}: {e}", path.display())))?;
    Ok(([(header::CONTENT_TYPE, "image/png"), (header::CACHE_CONTROL, "no-cache")], bytes).into_response())
}
