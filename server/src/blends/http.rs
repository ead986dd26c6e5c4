//! Saved blends, share links and bakes over HTTP (README: "JSON API"):
//! `GET /blends`, `GET|PUT|DELETE /blends/{name}`, `POST /blends/resolve` (`{"link"}`).

use atelier_blend::Blend;
use axum::extract::{Path, State};
use axum::http::StatusCode;
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
        .route("/blends/bake", get(bake))
        .route("/blends/{name}", get(one).put(save).delete(delete))
}

async fn list(State(state): State<AppState>) -> Json<Vec<SavedBlend>> {
    Json(state.blends.list())
}

async fn one(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<SavedBlend>, ApiError> {
    crate::styles::check_name(&name).map_err(|e| ApiError::Invalid { field: "name".into(), message: e.to_string() })?;
    state.blends.get(&name).map_err(ApiError::internal)?.map(Json).ok_or(ApiError::NotFound { what: "blend", id: name })
}

async fn save(
    State(state): State<AppState>,
    Path(name): Path<String>,
    AppJson(blend): AppJson<Blend>,
) -> Result<Json<SavedBlend>, ApiError> {
    crate::styles::check_name(&name).map_err(|e| ApiError::Invalid { field: "name".into(), message: e.to_string() })?;
    atelier_blend::encode(&blend).map_err(|e| ApiError::Invalid { field: "blend".into(), message: e.to_string() })?;
    Ok(Json(state.blends.save(&name, &blend).map_err(ApiError::internal)?))
}

async fn delete(State(state): State<AppState>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    crate::styles::check_name(&name).map_err(|e| ApiError::Invalid { field: "name".into(), message: e.to_string() })?;
    if state.blends.delete(&name).map_err(ApiError::internal)? {
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

/// `GET /api/blends/bake?b=CODE[&rank=R]`: the blend baked into one kohya LoRA file
/// (download), with the relative error of a compressed bake in `X-Bake-Relative-Error`.
async fn bake(
    State(state): State<AppState>,
    AppQuery(q): AppQuery<BakeQuery>,
) -> Result<axum::response::Response, ApiError> {
    use axum::http::header;
    use axum::response::IntoResponse;
    let blend = atelier_blend::decode(&q.b).map_err(|e| ApiError::Invalid { field: "b".into(), message: e.to_string() })?;
    if q.rank.is_some_and(|r| r == 0 || r > 1024) {
        return Err(ApiError::Invalid { field: "rank".into(), message: "must be in 1..=1024".into() });
    }
    let source = state.training()?.model_source().clone();
    let styles = state.styles.clone();
    let (bytes, error) = tokio::task::spawn_blocking(move || -> Result<(Vec<u8>, f64), ApiError> {
        let sd = atelier_engine::pipeline::StableDiffusion::load(&source.dir, &source.device)?;
        let r = crate::blends::resolve(blend, &styles, sd.model_hash());
        let active = r.active(&sd).map_err(|e| {
            // A missing style is the link's problem; an unreadable one in the library is ours.
            if r.missing.is_empty() { ApiError::Internal(format!("{e:#}")) } else { ApiError::Invalid { field: "b".into(), message: format!("{e:#}") } }
        })?;
        let baked = match q.rank {
            None => atelier_engine::bake::bake_exact(&active, sd.lora_slots())?,
            Some(rank) => atelier_engine::bake::bake_compressed(&active, sd.lora_slots(), rank)?,
        };
        let dir = tempfile_dir()?;
        let path = dir.join("blend.safetensors");
        let meta = std::collections::HashMap::from([
            ("atelier_blend".to_string(), q.b.clone()),
            ("ss_sd_model_hash".to_string(), sd.model_hash().to_string()),
        ]);
        atelier_engine::bake::save_kohya(&baked, &meta, &path)?;
        let bytes = std::fs::read(&path).map_err(|e| ApiError::Internal(e.to_string()))?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok((bytes, baked.relative_error))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_DISPOSITION, "attachment; filename=\"blend.safetensors\"".to_string()),
            (header::HeaderName::from_static("x-bake-relative-error"), format!("{error}")),
        ],
        bytes,
    )
        .into_response())
}

/// A fresh private folder for one bake.
fn tempfile_dir() -> Result<std::path::PathBuf, ApiError> {
    let dir = std::env::temp_dir().join(format!("atelier-bake-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(dir)
}
