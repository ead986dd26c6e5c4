//! Deployments over HTTP (under `/api`):
//!
//! - `GET /deployments` → `[DeploymentInfo]` (each with the version its target resolves to
//!   now); `GET /deployments/{name}` → `DeploymentInfo`;
//! - `POST /deployments` `NewDeployment` → 201 `DeploymentInfo` (with `to` + `token`: pushed
//!   to that server first, see [`super::remote`]); `DELETE /deployments/{name}` → 204;
//! - `POST /v1/deployments/{name}/generate` `{"prompt", …overrides}` → the PNG (200,
//!   `image/png`, headers `X-Atelier-Deployment` and `X-Atelier-Style-Version`), or with
//!   `?async=1` 202 `{"job_id", "seed", "deployment", "version"}` to follow at
//!   `/api/jobs/{id}` like `/api/generate`;
//! - `POST /deployments/import` (bearer token): a version pushed by another server.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use app::dto::{DeploymentInfo, NewDeployment};

use super::{accept, image_bytes, info, prepare, wait_images, Overrides, Timer};
use crate::http::extract::{AppJson, AppQuery};
use crate::{ApiError, AppState};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/deployments", get(list).post(create))
        .route("/deployments/import", post(super::remote::import).layer(axum::extract::DefaultBodyLimit::max(super::remote::MAX_IMPORT_BYTES)))
        .route("/deployments/{name}", get(show).delete(delete))
        .route("/v1/deployments/{name}/generate", post(generate))
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| ApiError::Internal(e.to_string()))?
}

async fn list(State(state): State<AppState>) -> Result<Json<Vec<DeploymentInfo>>, ApiError> {
    let (store, tracking) = (state.deployments.store.clone(), state.data_dir.join("tracking"));
    Ok(Json(blocking(move || Ok(store.list().into_iter().map(|d| info(&tracking, d)).collect())).await?))
}

async fn show(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<DeploymentInfo>, ApiError> {
    let (store, tracking) = (state.deployments.store.clone(), state.data_dir.join("tracking"));
    Ok(Json(blocking(move || Ok(info(&tracking, store.get(&name)?))).await?))
}

async fn delete(State(state): State<AppState>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    let store = state.deployments.store.clone();
    let n = name.clone();
    blocking(move || store.delete(&n)).await?;
    state.drift.monitor.remove(&name);
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/deployments`: checks the target (exists, same base model) and saves; with
/// `to`, pushes the version to that server and creates the deployment there as well.
async fn create(State(state): State<AppState>, AppJson(new): AppJson<NewDeployment>) -> Result<(StatusCode, Json<DeploymentInfo>), ApiError> {
    let (store, tracking, hash) = (state.deployments.store.clone(), state.data_dir.join("tracking"), state.model.hash.clone());
    if let Some(rule) = &new.monitoring {
        rule.check().map_err(|m| ApiError::Invalid { field: "monitoring".into(), message: m })?;
    }
    let rule = new.monitoring;
    let created = blocking(move || {
        if store.list().iter().any(|d| d.name == new.name) {
            return Err(ApiError::Invalid { field: "name".into(), message: format!("a deployment called {} exists; delete it first or choose another name", new.name) });
        }
        let (mut deployment, version) = prepare(&tracking, &hash, &new)?;
        if let Some(url) = new.to.as_deref().filter(|u| !u.trim().is_empty()) {
            let token = new.token.clone().unwrap_or_default();
            super::remote::push(url, &token, &deployment, &version)?;
            deployment.remote = Some(url.trim_end_matches('/').to_string());
        }
        store.save(&deployment)?;
        Ok(info(&tracking, deployment))
    })
    .await?;
    // The reference is measured through the new deployment, on the queue (see
    // monitoring::drift::service).
    crate::monitoring::drift::service::start_for(&state, &created.deployment, rule);
    Ok((StatusCode::CREATED, Json(created)))
}

#[derive(Deserialize, Default)]
struct GenerateQuery {
    #[serde(default, rename = "async")]
    asynchronous: Option<String>,
}

/// `POST /api/v1/deployments/{name}/generate`.
async fn generate(State(state): State<AppState>, Path(name): Path<String>, AppQuery(q): AppQuery<GenerateQuery>, AppJson(o): AppJson<Overrides>) -> Response {
    let timer = Timer::start();
    let asynchronous = q.asynchronous.as_deref().is_some_and(|v| !matches!(v, "" | "0" | "false"));
    let accepted = match accept(&state, &name, o).await {
        Ok(a) => a,
        Err(e) => {
            // Requests for deployments that do not exist are not counted (their names are
            // whatever a client typed).
            if !matches!(e, ApiError::NotFound { what: "deployment", .. }) {
                timer.done(&name, "", e.status().as_u16());
            }
            return e.into_response();
        }
    };
    if asynchronous {
        timer.done(&name, &accepted.version, 202);
        return (StatusCode::ACCEPTED, Json(accepted)).into_response();
    }
    let result = async {
        let ids = wait_images(&state, &accepted.job.job_id).await?;
        let first = ids.first().ok_or_else(|| ApiError::Internal("a finished job without images".into()))?;
        Ok::<_, ApiError>((image_bytes(&state, first).await?, ids))
    }
    .await;
    match result {
        Ok((png, ids)) => {
            timer.done(&name, &accepted.version, 200);
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, "image/png".parse().expect("static header"));
            for (key, value) in [("x-atelier-deployment", &accepted.deployment), ("x-atelier-style-version", &accepted.version), ("x-atelier-images", &ids.join(","))] {
                if let Ok(v) = value.parse() {
                    headers.insert(key, v);
                }
            }
            (StatusCode::OK, headers, png).into_response()
        }
        Err(e) => {
            timer.done(&name, &accepted.version, e.status().as_u16());
            e.into_response()
        }
    }
}
