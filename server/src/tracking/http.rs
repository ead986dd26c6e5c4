//! The experiment store over HTTP (README: "JSON API"): `GET /experiments`,
//! `GET /experiments/{id}/runs?filter=F` (MLflow's filter language; a malformed filter is
//! a 400 naming the character), `GET /runs/{id}` (params, tags, latest metrics,
//! artifacts), `GET /runs/{id}/metrics/{key}` (the whole history). For the dashboard:
//! CSV downloads `GET /experiments/{id}/runs.csv?filter=F` and
//! `GET /runs/{id}/metrics/{key}.csv`, and `GET /runs/{id}/metrics/{key}/stream`, the
//! SSE stream of a metric as it is logged; `GET /runs/{id}/artifacts/{*path}`, one file of a
//! run's artifacts (sample sheets, model cards, weights).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use app::dto::MetricStreamEvent;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::Stream;
use serde::{Deserialize, Serialize};

use super::{queries, search, ExperimentInfo, MetricPoint, RunSummary, Tracker};
use crate::http::extract::AppQuery;
use crate::{ApiError, AppState};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/experiments", get(experiments))
        .route("/experiments/{id}/runs", get(runs))
        .route("/experiments/{id}/runs.csv", get(runs_csv))
        .route("/runs/{id}", get(run))
        .route("/runs/{id}/metrics/{key}", get(history))
        .route("/runs/{id}/metrics/{key}/stream", get(history_stream))
        .route("/runs/{id}/artifacts/{*path}", get(artifact))
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
pub(super) async fn with_tracker<T: Send + 'static>(state: &AppState, work: impl FnOnce(&Tracker) -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
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

/// The runs of experiment `id` (name or number) that `filter` keeps, newest first.
async fn search_runs(state: &AppState, id: String, filter: &str) -> Result<Vec<RunSummary>, ApiError> {
    let filter = search::parse(filter)
        .map_err(|e| ApiError::Invalid { field: "filter".into(), message: format!("at character {}: {}", e.position + 1, e.message) })?;
    with_tracker(state, move |t| {
        let experiment = t.find_experiment(&id)?.ok_or(ApiError::NotFound { what: "experiment", id })?;
        Ok(t.search(experiment, &filter)?)
    })
    .await
}

async fn runs(State(state): State<AppState>, Path(id): Path<String>, AppQuery(q): AppQuery<RunsQuery>) -> Result<Json<Vec<RunSummary>>, ApiError> {
    Ok(Json(search_runs(&state, id, &q.filter).await?))
}

/// Keeps the characters of `name` that are safe in a file name (letters, digits, `-_.`).
fn file_name_part(name: &str) -> String {
    let s: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    if s.is_empty() { "export".into() } else { s }
}

/// A CSV download: `text/csv` (RFC 4180, with a header row) saved as `file`.
fn csv_response(file: &str, body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8; header=present".to_string()),
            (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{file}\"")),
        ],
        body,
    )
        .into_response()
}

/// `GET /api/experiments/{id}/runs.csv?filter=F`: the runs table as CSV (see [`queries::runs_csv`]).
async fn runs_csv(State(state): State<AppState>, Path(id): Path<String>, AppQuery(q): AppQuery<RunsQuery>) -> Result<Response, ApiError> {
    let file = format!("{}-runs.csv", file_name_part(&id));
    let list = search_runs(&state, id, &q.filter).await?;
    Ok(csv_response(&file, queries::runs_csv(&list)))
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

/// `GET /api/runs/{id}/artifacts/{*path}`: the file at `path` (relative, `/`-separated,
/// as `GET /api/runs/{id}` lists it) under the run's artifact folder, typed by its
/// extension (see [`queries::artifact_content_type`]). A path that is absolute or climbs out
/// (`..`) is a 400; a run or file that does not exist, a 404.
async fn artifact(State(state): State<AppState>, Path((id, path)): Path<(String, String)>) -> Result<Response, ApiError> {
    let rel = queries::artifact_relative_path(&path).map_err(|message| ApiError::Invalid { field: "artifact path".into(), message })?;
    let (file, body) = with_tracker(&state, move |t| {
        let info = t.run(&id)?.ok_or_else(|| ApiError::NotFound { what: "run", id: id.clone() })?;
        let root = std::path::PathBuf::from(&info.artifact_uri);
        let missing = || ApiError::NotFound { what: "artifact", id: format!("{id}/{path}") };
        // Resolved, so that a link inside the folder cannot lead out of it either.
        let (Ok(root), Ok(full)) = (root.canonicalize(), root.join(&rel).canonicalize()) else { return Err(missing()) };
        if !full.starts_with(&root) || !full.is_file() {
            return Err(missing());
        }
        let body = std::fs::read(&full).map_err(|e| ApiError::Internal(format!("cannot read {}: {e}", full.display())))?;
        Ok((path, body))
    })
    .await?;
    // Artifacts are data, never a page of the studio: no sniffing, and an SVG or any other
    // document opened directly runs sandboxed (no scripts, no same-origin access).
    Ok((
        [
            (header::CONTENT_TYPE, queries::artifact_content_type(&file)),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CONTENT_SECURITY_POLICY, "sandbox"),
        ],
        body,
    )
        .into_response())
}

/// `GET /api/runs/{id}/metrics/{key}`: the whole history as JSON; with `.csv` after the
/// key (and no metric of that exact name), as CSV (`step,value,timestamp`).
async fn history(State(state): State<AppState>, Path((id, key)): Path<(String, String)>) -> Result<Response, ApiError> {
    let (points, csv_key) = with_tracker(&state, move |t| {
        t.run(&id)?.ok_or_else(|| ApiError::NotFound { what: "run", id: id.clone() })?;
        let points = t.metric_history(&id, &key)?;
        if !points.is_empty() {
            return Ok((points, None));
        }
        if let Some(stripped) = key.strip_suffix(".csv") {
            let points = t.metric_history(&id, stripped)?;
            if !points.is_empty() {
                let short: String = id.chars().take(8).collect();
                return Ok((points, Some(format!("{short}-{}.csv", file_name_part(stripped)))));
            }
        }
        Err(ApiError::NotFound { what: "metric", id: format!("{id}/{key}") })
    })
    .await?;
    Ok(match csv_key {
        Some(file) => csv_response(&file, queries::history_csv(&points)),
        None => Json(points).into_response(),
    })
}

/// How often a live metric stream looks for new points.
const STREAM_POLL: Duration = Duration::from_millis(500);

/// `GET /api/runs/{id}/metrics/{key}/stream`: SSE of [`MetricStreamEvent`]s: the history
/// so far, then the points logged since, polling the store every 0.5 s; the last event is
/// the first whose run is no longer `RUNNING`. Comments keep idle connections alive (15 s).
async fn history_stream(
    State(state): State<AppState>,
    Path((id, key)): Path<(String, String)>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let dir = state.data_dir.join("tracking");
    let check = id.clone();
    let tracker = tokio::task::spawn_blocking(move || -> Result<Tracker, ApiError> {
        let t = Tracker::open(&dir)?;
        t.run(&check)?.ok_or_else(|| ApiError::NotFound { what: "run", id: check.clone() })?;
        Ok(t)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let tracker = Arc::new(tracker);
    // State: the row last sent, whether this is the first poll, whether the run has ended.
    let stream = futures::stream::unfold((0i64, true, false), move |(after, first, done)| {
        let (tracker, id, key) = (tracker.clone(), id.clone(), key.clone());
        async move {
            if done {
                return None;
            }
            if !first {
                tokio::time::sleep(STREAM_POLL).await;
            }
            let polled = tokio::task::spawn_blocking(move || -> Result<(Vec<(i64, MetricPoint)>, String), super::TrackingError> {
                // Status first: points logged before the run ended are then all read below.
                let status = tracker.run(&id)?.map_or_else(|| "DELETED".to_string(), |r| r.status);
                Ok((tracker.metric_since(&id, &key, after)?, status))
            })
            .await;
            let (rows, status) = match polled {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => {
                    tracing::warn!(error = %crate::error::report(&e), "metric stream stopped");
                    return None;
                }
                Err(_) => return None,
            };
            let last = rows.iter().map(|(r, _)| *r).max().unwrap_or(after);
            let ended = status != "RUNNING";
            if rows.is_empty() && !first && !ended {
                // Nothing new: a comment, so the next poll comes without a client-visible event.
                return Some((Ok(Event::default().comment("")), (last, false, false)));
            }
            let event = MetricStreamEvent { points: rows.into_iter().map(|(_, p)| p).collect(), status };
            let event = Event::default().json_data(&event).unwrap_or_else(|_| Event::default().comment("encode error"));
            Some((Ok(event), (last, false, ended)))
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
