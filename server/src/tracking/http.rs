//! The experiment store over HTTP (README: "JSON API"): `GET /experiments`,
//! `GET /experiments/{id}/runs?filter=F` (MLflow's filter language; a malformed filter is
//! a 400 naming the character), `GET /runs/{id}` (params, tags, latest metrics,
//! artifacts), `GET /runs/{id}/metrics/{key}` (the whole history).

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::{search, ExperimentInfo, MetricPoint, RunSummary, Tracker};
use crate::http::extract::AppQuery;
use crate::{ApiError, AppState};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/experiments", get(experiments))
        .route("/experiments/{id}/runs", get(runs))
        .route("/runs/{id}", get(run))
        .route("/runs/{id}/metrics/{key}", get(history))
        .route("/tracking/sync", get(sync_status).post(sync_now))
}

/// `GET /api/tracking/sync`: where the mirror to MLflow stands (server, runs waiting,
/// refusals, the last failure). Without a server: `uri` null and the local pending count 0.
async fn sync_status(State(state): State<AppState>) -> Json<super::mlflow::MirrorStatus> {
    Json(state.mirror.as_ref().map(|m| m.status()).unwrap_or_default())
}

/// `POST /api/tracking/sync`: sync now instead of at the next pass; answers the status.
async fn sync_now(State(state): State<AppState>) -> Result<Json<super::mlflow::MirrorStatus>, ApiError> {
    let mirror = state.mirror.as_ref().ok_or_else(|| ApiError::Unavailable("no MLflow server is configured: start the studio with --tracking-uri http://HOST:PORT".into()))?;
    mirror.wake();
    Ok(Json(mirror.status()))
}

/// Runs `work` on the studio's store, off the async runtime.
async fn with_tracker<T: Send + 'static>(state: &AppState, work: impl FnOnce(&Tracker) -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    let dir = state.data_dir.join("tracking");
    tokio::task::spawn_blocking(move || work(&Tracker::open(&dir)?)).await.map_err(|e| ApiError::Internal(e.to_string()))?
}

async fn experiments(State(state): State<AppState>) -> Result<Json<Vec<ExperimentInfo>>, ApiError> {
    Ok(Json(with_tracker(&state, |t| Ok(t.experiments()?)).await?))
}

#[derive(Deserialize)]
struct RunsQuery {
    #[serde(default)]
    filter: String,
}

async fn runs(State(state): State<AppState>, Path(id): Path<String>, AppQuery(q): AppQuery<RunsQuery>) -> Result<Json<Vec<RunSummary>>, ApiError> {
    let filter = search::parse(&q.filter)
        .map_err(|e| ApiError::Invalid { field: "filter".into(), message: format!("at character {}: {}", e.position + 1, e.message) })?;
    Ok(Json(
        with_tracker(&state, move |t| {
            let experiment = t.find_experiment(&id)?.ok_or(ApiError::NotFound { what: "experiment", id })?;
            Ok(t.search(experiment, &filter)?)
        })
        .await?,
    ))
}

/// A run as `GET /api/runs/{id}` answers it.
#[derive(Serialize)]
struct RunDetail {
    #[serde(flatten)]
    summary: RunSummary,
    artifacts: Vec<String>,
}

async fn run(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<RunDetail>, ApiError> {
    Ok(Json(
        with_tracker(&state, move |t| {
            let summary = t.summary(&id)?.ok_or_else(|| ApiError::NotFound { what: "run", id: id.clone() })?;
            Ok(RunDetail { artifacts: t.artifacts(&id)?, summary })
        })
        .await?,
    ))
}

async fn history(State(state): State<AppState>, Path((id, key)): Path<(String, String)>) -> Result<Json<Vec<MetricPoint>>, ApiError> {
    Ok(Json(
        with_tracker(&state, move |t| {
            t.run(&id)?.ok_or_else(|| ApiError::NotFound { what: "run", id: id.clone() })?;
            let points = t.metric_history(&id, &key)?;
            if points.is_empty() {
                return Err(ApiError::NotFound { what: "metric", id: format!("{id}/{key}") });
            }
            Ok(points)
        })
        .await?,
    ))
}
