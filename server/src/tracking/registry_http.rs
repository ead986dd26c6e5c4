//! The model registry over HTTP (README: "JSON API"): `GET /registry` (every registered
//! style with its versions and aliases), `GET /registry/{name}`,
//! `GET /registry/{name}/versions/{version|alias|latest}`, and
//! `PUT|DELETE /registry/{name}/aliases/{alias}` (`{"version": N}`) to set, move or
//! remove an alias, and `POST /registry/{name}/versions` (`{"bake": ID}`) to register a
//! finished blend bake. Unknown names, versions and aliases are 404s; a malformed alias a 400.

use axum::extract::{Path, State};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::Deserialize;

use super::registry::{ModelVersion, RegisteredModel};
use super::http::with_tracker;
use super::Tracker;
use crate::http::extract::AppJson;
use crate::{ApiError, AppState};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/registry", get(list))
        .route("/registry/{name}", get(show))
        .route("/registry/{name}/versions", axum::routing::post(register))
        .route("/registry/{name}/versions/{selector}", get(version))
        .route("/registry/{name}/aliases/{alias}", put(set_alias).delete(delete_alias))
}

async fn list(State(state): State<AppState>) -> Result<Json<Vec<RegisteredModel>>, ApiError> {
    Ok(Json(with_tracker(&state, |t| Ok(t.registered_models()?)).await?))
}

fn model(t: &Tracker, name: String) -> Result<RegisteredModel, ApiError> {
    t.registered_model(&name)?.ok_or(ApiError::NotFound { what: "registered model", id: name })
}

async fn show(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<RegisteredModel>, ApiError> {
    Ok(Json(with_tracker(&state, move |t| model(t, name)).await?))
}

async fn version(State(state): State<AppState>, Path((name, selector)): Path<(String, String)>) -> Result<Json<ModelVersion>, ApiError> {
    Ok(Json(with_tracker(&state, move |t| Ok(t.resolve_version(&name, &selector)?)).await?))
}

#[derive(Deserialize)]
struct RegisterBody {
    /// A finished bake of the Blend page (`POST /api/blends/bakes`).
    bake: String,
}

/// `POST /api/registry/{name}/versions` `{"bake": ID}`: registers a finished bake as a new
/// version of `name` (kind `blend`, its components as tags); 201 with the version.
async fn register(State(state): State<AppState>, Path(name): Path<String>, AppJson(body): AppJson<RegisterBody>) -> Result<(axum::http::StatusCode, Json<ModelVersion>), ApiError> {
    let status = state.bakes.status(&body.bake)?;
    let app::dto::BakeState::Done { relative_error, .. } = status.state else {
        return Err(ApiError::Invalid { field: "bake".into(), message: format!("bake {} has not finished; register it once it is done", body.bake) });
    };
    let file = state.bakes.file(&body.bake)?;
    let blend = atelier_blend::decode(&status.request.link).map_err(|e| ApiError::Invalid { field: "bake".into(), message: e.to_string() })?;
    let rank = status.request.rank;
    let version = with_tracker(&state, move |t| Ok(t.register_blend(&name, &file, &blend, rank, relative_error)?)).await?;
    if let Some(m) = &state.mirror {
        m.wake();
    }
    Ok((axum::http::StatusCode::CREATED, Json(version)))
}

#[derive(Deserialize)]
struct AliasBody {
    version: i64,
}

async fn set_alias(State(state): State<AppState>, Path((name, alias)): Path<(String, String)>, AppJson(body): AppJson<AliasBody>) -> Result<Json<RegisteredModel>, ApiError> {
    let model = with_tracker(&state, move |t| {
        t.set_alias(&name, &alias, body.version)?;
        model(t, name)
    })
    .await?;
    if let Some(m) = &state.mirror {
        m.wake();
    }
    Ok(Json(model))
}

async fn delete_alias(State(state): State<AppState>, Path((name, alias)): Path<(String, String)>) -> Result<Json<RegisteredModel>, ApiError> {
    let model = with_tracker(&state, move |t| {
        if !t.delete_alias(&name, &alias)? {
            return Err(ApiError::NotFound { what: "alias", id: format!("{name}@{alias}") });
        }
        model(t, name)
    })
    .await?;
    if let Some(m) = &state.mirror {
        m.wake();
    }
    Ok(Json(model))
}
