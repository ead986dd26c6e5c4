//! Quality monitoring over HTTP (under `/api`):
//!
//! - `GET /deployments/{name}/monitoring` → [`Watch`]: the reference (or its progress), the
//!   window of scored served images, the latest figures, the alerts with their retraining
//!   suggestions;
//! - `POST /deployments/{name}/monitoring` [`MonitoringRequest`] → 202 [`Watch`]: measure the
//!   reference again, with the version the deployment serves now (after a deliberate change
//!   of style), optionally with another rule or prompts;
//! - `GET /monitoring/alerts` → the firing alerts of every deployment, newest first.

use app::dto::monitoring::{Alert, MonitoringRequest, Watch};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};

use crate::http::extract::AppJson;
use crate::{ApiError, AppState};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/deployments/{name}/monitoring", get(show).post(restart))
        .route("/monitoring/alerts", get(alerts))
}

async fn show(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<Watch>, ApiError> {
    let store = state.deployments.store.clone();
    let d = { let name = name.clone(); tokio::task::spawn_blocking(move || store.get(&name)).await.map_err(|e| ApiError::Internal(e.to_string()))?? };
    Ok(Json(state.drift.monitor.watch(&d.name).unwrap_or_else(|| Watch::new(&d.name, Default::default()))))
}

async fn restart(State(state): State<AppState>, Path(name): Path<String>, AppJson(req): AppJson<MonitoringRequest>) -> Result<(StatusCode, Json<Watch>), ApiError> {
    let store = state.deployments.store.clone();
    let d = { let name = name.clone(); tokio::task::spawn_blocking(move || store.get(&name)).await.map_err(|e| ApiError::Internal(e.to_string()))?? };
    if d.remote.is_some() {
        return Err(ApiError::Invalid { field: "name".into(), message: format!("{name} is served by {}; monitor it there", d.remote.unwrap_or_default()) });
    }
    let rule = req.rule.unwrap_or_else(|| state.drift.monitor.watch(&d.name).map(|w| w.rule).unwrap_or_default());
    rule.check().map_err(|m| ApiError::Invalid { field: "rule".into(), message: m })?;
    let tracking = state.data_dir.join("tracking");
    let version = {
        let target = d.target.clone();
        tokio::task::spawn_blocking(move || crate::deployments::resolve(&tracking, &target)).await.map_err(|e| ApiError::Internal(e.to_string()))??
    };
    let pinned = format!("{}@{}", version.name, version.version);
    let prompts = if req.prompts.is_empty() { super::service::default_prompts(&state, &pinned) } else { req.prompts };
    super::service::start(&state, &d.name, rule, prompts);
    Ok((StatusCode::ACCEPTED, Json(state.drift.monitor.watch(&d.name).unwrap_or_else(|| Watch::new(&d.name, rule)))))
}

async fn alerts(State(state): State<AppState>) -> Json<Vec<Alert>> {
    Json(state.drift.monitor.firing())
}
