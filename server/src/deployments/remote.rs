//! Deploying to another Atelier server: [`push`] sends a registry version's files (adapter
//! in both layouts, card) and its registry tags to the other server's
//! `POST /api/deployments/import` with `Authorization: Bearer TOKEN`; [`import`] there
//! registers them as a new version of the same registered model, points the alias the
//! target named (if it named one) at it, and creates (or replaces) the deployment.
//!
//! The import endpoint is closed unless the receiving server was started with a token
//! (`atelier serve --deploy-token T` or `ATELIER_DEPLOY_TOKEN`): 403 then; a missing or
//! wrong token is a 401. Body: JSON [`Import`], files base64-encoded, at most
//! [`MAX_IMPORT_BYTES`].

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::{Deserialize, Serialize};

use app::dto::{Deployment, DeploymentDefaults, DeploymentInfo, ErrorBody};

use super::{info, ModelVersion};
use crate::http::extract::AppJson;
use crate::tracking::Tracker;
use crate::{ApiError, AppState};

/// Largest import body accepted, in bytes (base64 grows files by a third).
pub const MAX_IMPORT_BYTES: usize = 1024 * 1024 * 1024;

/// What a pushed deployment carries.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Import {
    /// The registered model (style or baked blend) name.
    pub model: String,
    /// `style` or `blend`.
    pub kind: String,
    /// The version's registry tags (base model hash, trigger, dataset hash, …).
    pub tags: BTreeMap<String, String>,
    /// The alias the sender's target named (`production`), if it named one.
    pub alias: Option<String>,
    /// `STYLE@N` on the sending server, recorded as the tag `deployed_from`.
    pub source: String,
    pub files: Vec<ImportFile>,
    pub deployment: ImportDeployment,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportFile {
    /// A plain file name (no folders).
    pub name: String,
    /// The bytes, base64 (standard alphabet, padded).
    pub base64: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportDeployment {
    pub name: String,
    pub weight: f64,
    pub defaults: DeploymentDefaults,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(5)))
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into()
}

/// Pushes `version` and `deployment` to the Atelier server at `url` (blocking).
///
/// # Errors
/// The server cannot be reached (503 naming it), or it refused (400 with its status and
/// message: wrong token, another base model, …). Nothing local changes either way.
pub fn push(url: &str, token: &str, deployment: &Deployment, version: &ModelVersion) -> Result<(), ApiError> {
    let url = url.trim().trim_end_matches('/');
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(ApiError::Invalid { field: "to".into(), message: format!("{url:?} is not an http:// or https:// URL of an Atelier server") });
    }
    let mut files = Vec::new();
    let dir = std::path::Path::new(&version.source);
    let entries = std::fs::read_dir(dir).map_err(|e| ApiError::storage(&e, &e))?;
    for entry in entries.filter_map(|e| e.ok()).filter(|e| e.path().is_file()) {
        let bytes = std::fs::read(entry.path()).map_err(|e| ApiError::storage(&e, &e))?;
        files.push(ImportFile { name: entry.file_name().to_string_lossy().into_owned(), base64: base64::engine::general_purpose::STANDARD.encode(bytes) });
    }
    let selector = deployment.target.split_once('@').map(|(_, s)| s).unwrap_or("");
    let alias = crate::tracking::registry::check_alias(selector).ok().map(|_| selector.to_string());
    let body = Import {
        model: version.name.clone(),
        kind: version.kind.clone(),
        tags: version.tags.clone(),
        alias,
        source: format!("{}@{}", version.name, version.version),
        files,
        deployment: ImportDeployment { name: deployment.name.clone(), weight: deployment.weight, defaults: deployment.defaults.clone() },
    };
    let endpoint = format!("{url}/api/deployments/import");
    let mut resp = agent()
        .post(&endpoint)
        .header("Authorization", format!("Bearer {token}"))
        .send_json(&body)
        .map_err(|e| ApiError::Unavailable(format!("cannot reach the deployment target {url}: {e}; nothing was deployed")))?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().with_config().limit(1024 * 1024).read_to_string().unwrap_or_default();
    if (200..300).contains(&status) {
        return Ok(());
    }
    let message = serde_json::from_str::<ErrorBody>(&text).map(|b| b.error).unwrap_or_else(|_| text.chars().take(300).collect());
    Err(ApiError::Invalid { field: "to".into(), message: format!("{url} refused the deployment ({status}): {message}") })
}

/// Compares without stopping at the first difference (the time taken does not tell how
/// much of a guessed token was right).
fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn refuse(status: StatusCode, error: String) -> Response {
    tracing::info!(%error, "deployment import refused");
    (status, Json(ErrorBody { error })).into_response()
}

/// `POST /api/deployments/import`: registers a pushed version and creates its deployment;
/// 201 with the deployment (its target `MODEL@ALIAS` or `MODEL@N`).
pub async fn import(State(state): State<AppState>, headers: HeaderMap, body: Result<AppJson<Import>, ApiError>) -> Response {
    let Some(expected) = state.deployments.token() else {
        return refuse(
            StatusCode::FORBIDDEN,
            "this server accepts no pushed deployments: start it with --deploy-token TOKEN (or ATELIER_DEPLOY_TOKEN) and push with that token".into(),
        );
    };
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    if !same_token(given.as_bytes(), expected.as_bytes()) {
        return refuse(StatusCode::UNAUTHORIZED, "wrong or missing deployment token (send Authorization: Bearer TOKEN, the receiving server's --deploy-token)".into());
    }
    let AppJson(body) = match body {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let (store, tracking, hash) = (state.deployments.store.clone(), state.data_dir.join("tracking"), state.model.hash.clone());
    let result = tokio::task::spawn_blocking(move || register(&store, &tracking, &hash, body)).await;
    match result {
        Ok(Ok(info)) => (StatusCode::CREATED, Json(info)).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => ApiError::Internal(e.to_string()).into_response(),
    }
}

fn register(store: &super::DeploymentStore, tracking: &std::path::Path, model_hash: &str, body: Import) -> Result<DeploymentInfo, ApiError> {
    crate::styles::check_name(&body.model).map_err(|e| ApiError::Invalid { field: "model".into(), message: e.to_string() })?;
    crate::styles::check_name(&body.deployment.name).map_err(|e| ApiError::Invalid { field: "deployment.name".into(), message: e.to_string() })?;
    if let Some(h) = body.tags.get("base_model_hash").filter(|h| !h.is_empty() && !h.eq_ignore_ascii_case(model_hash)) {
        return Err(ApiError::Invalid {
            field: "target".into(),
            message: format!("{} was trained for the base model with hash {h}, but this server serves the model with hash {model_hash}", body.source),
        });
    }
    if !body.files.iter().any(|f| f.name == format!("{}.safetensors", body.model)) {
        return Err(ApiError::Invalid { field: "files".into(), message: format!("no adapter file {}.safetensors among the pushed files", body.model) });
    }
    std::fs::create_dir_all(tracking).map_err(|e| ApiError::storage(&e, &e))?;
    let staging = tempfile::tempdir_in(tracking).map_err(|e| ApiError::storage(&e, &e))?;
    let mut paths = Vec::new();
    for f in &body.files {
        let plain = std::path::Path::new(&f.name).file_name().is_some_and(|n| n == f.name.as_str()) && !f.name.starts_with('.');
        if !plain {
            return Err(ApiError::Invalid { field: "files".into(), message: format!("{:?} is not a plain file name", f.name) });
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(f.base64.as_bytes())
            .map_err(|e| ApiError::Invalid { field: "files".into(), message: format!("{}: not valid base64 ({e})", f.name) })?;
        let path = staging.path().join(&f.name);
        std::fs::write(&path, bytes).map_err(|e| ApiError::storage(&e, &e))?;
        paths.push(path);
    }
    let mut tags: Vec<(String, String)> = body.tags.into_iter().collect();
    tags.push(("deployed_from".into(), body.source.clone()));
    let tracker = Tracker::open(tracking)?;
    let version = tracker.register_version(&body.model, &body.kind, &paths, None, &tags)?;
    let target = match &body.alias {
        Some(alias) => {
            tracker.set_alias(&version.name, alias, version.version)?;
            format!("{}@{alias}", version.name)
        }
        None => format!("{}@{}", version.name, version.version),
    };
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let deployment = Deployment { name: body.deployment.name, target, weight: body.deployment.weight, defaults: body.deployment.defaults, created, remote: None, monitor: true };
    store.save(&deployment)?;
    tracing::info!(deployment = %deployment.name, version = %format!("{}@{}", version.name, version.version), from = %body.source, "deployment imported");
    Ok(info(tracking, deployment))
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_compare_whole() {
        assert!(super::same_token(b"abc", b"abc"));
        assert!(!super::same_token(b"abc", b"abd"));
        assert!(!super::same_token(b"abc", b"abcd"));
        assert!(!super::same_token(b"", b"a"));
    }
}
