//! Deployments: named serving endpoints bound to a model-registry reference
//! (`STYLE@production`, `STYLE@3`, or a registered baked blend `BLEND@1`), with the
//! generation settings their requests start from.
//!
//! - Stored one JSON file per deployment in `DATA/deployments/NAME.json` (written
//!   atomically); [`DeploymentStore`].
//! - Served by `POST /api/v1/deployments/{name}/generate` ([`http`]) and by the
//!   AUTOMATIC1111 web API subset ([`a1111`]). Each request resolves the target **once,
//!   when it is accepted** ([`accept`]): the prompt gets the pinned tag
//!   `<lora:STYLE@N:WEIGHT>`, so a job keeps the version it was accepted with while the
//!   alias moves (promotion, rollback) — the next request simply resolves to the new
//!   version, with no restart and nothing reloaded by hand. Every image records
//!   `Deployment: NAME` and `Style version: STYLE@N` in its `parameters` chunk.
//! - Pushed to another Atelier server ([`remote`]): the version's files and registry tags
//!   go to its token-protected `POST /api/deployments/import`, which registers them as a
//!   new version there and creates the deployment.
//!
//! Refusals: an unknown style, version or alias is a 404 naming what exists; a version
//! trained on another base model (its `base_model_hash` tag, else its card's) than the
//! served one is a 400 naming both hashes.

pub mod a1111;
pub mod http;
pub mod remote;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use app::dto::{Deployment, DeploymentInfo, GenerateRequest, JobAccepted, JobState, NewDeployment};

use crate::tracking::Tracker;
use crate::{ApiError, AppState};

pub use app::dto::ModelVersion;

/// The deployments' files: `DIR/NAME.json`, one per deployment.
#[derive(Debug, Clone)]
pub struct DeploymentStore {
    dir: PathBuf,
}

impl DeploymentStore {
    /// The store in `DATA/deployments` (created on the first write).
    pub fn in_data_dir(data_dir: &Path) -> Self {
        Self { dir: data_dir.join("deployments") }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// Every deployment, sorted by name; unreadable files are skipped with a warning.
    pub fn list(&self) -> Vec<Deployment> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut out: Vec<Deployment> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json") && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
            .filter_map(|p| match std::fs::read(&p).map_err(|e| e.to_string()).and_then(|b| serde_json::from_slice::<Deployment>(&b).map_err(|e| e.to_string())) {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "skipping an unreadable deployment file");
                    None
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The deployment called `name`, or a 404 listing the deployments that exist.
    pub fn get(&self, name: &str) -> Result<Deployment, ApiError> {
        let all = self.list();
        let names: Vec<&str> = all.iter().map(|d| d.name.as_str()).collect();
        let known = if names.is_empty() { "none yet".to_string() } else { names.join(", ") };
        all.iter().find(|d| d.name == name).cloned().ok_or(ApiError::NotFound { what: "deployment", id: format!("{name}; deployments: {known}") })
    }

    /// Writes `d` atomically (replacing one of the same name).
    pub fn save(&self, d: &Deployment) -> Result<(), ApiError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| ApiError::storage(&e, &e))?;
        atelier_engine::files::write_json_atomic(&self.path(&d.name), d).map_err(|e| ApiError::storage(&e, &e))
    }

    /// Removes `name` (and its metric series); a 404 listing the deployments when there is
    /// none.
    pub fn delete(&self, name: &str) -> Result<(), ApiError> {
        self.get(name)?;
        std::fs::remove_file(self.path(name)).map_err(|e| ApiError::storage(&e, &e))?;
        crate::monitoring::metrics::forget_deployment(name);
        Ok(())
    }
}

/// Splits `STYLE@SELECTOR` (a selector is an alias, a number, `vN` or `latest`).
pub fn split_target(target: &str) -> Result<(&str, &str), ApiError> {
    match target.split_once('@') {
        Some((name, selector)) if !name.is_empty() && !selector.is_empty() => Ok((name, selector)),
        _ => Err(ApiError::Invalid {
            field: "target".into(),
            message: format!("{target:?} names no registry version: write STYLE@ALIAS (e.g. ink@production) or STYLE@NUMBER (e.g. ink@3)"),
        }),
    }
}

/// The registry version `target` names now, in the experiment store `tracking`.
///
/// # Errors
/// 404 naming the registered models (unknown style) or the versions and aliases (unknown
/// version or alias); 400 for a target without `@`.
pub fn resolve(tracking: &Path, target: &str) -> Result<ModelVersion, ApiError> {
    let (name, selector) = split_target(target)?;
    let tracker = Tracker::open(tracking)?;
    match tracker.resolve_version(name, selector) {
        Ok(v) => Ok(v),
        Err(crate::tracking::TrackingError::NoModel(_)) => {
            let names: Vec<String> = tracker.registered_models()?.into_iter().map(|m| m.name).collect();
            let known = if names.is_empty() { "none yet; every finished style training registers one".to_string() } else { names.join(", ") };
            Err(ApiError::NotFound { what: "registered model", id: format!("{name}; registered models: {known}") })
        }
        Err(e) => Err(e.into()),
    }
}

/// The base-model hash a version was made for: its `base_model_hash` tag, else the
/// `base_model_hash` of the `card.json` among its files; `None` when neither says.
pub fn version_base_hash(v: &ModelVersion) -> Option<String> {
    if let Some(h) = v.tags.get("base_model_hash").filter(|h| !h.is_empty()) {
        return Some(h.clone());
    }
    let card = std::fs::read(Path::new(&v.source).join("card.json")).ok()?;
    let card: serde_json::Value = serde_json::from_slice(&card).ok()?;
    card["base_model_hash"].as_str().filter(|h| !h.is_empty()).map(str::to_string)
}

/// Refuses a version made for another base model than `model_hash` (the served one).
pub fn check_base(v: &ModelVersion, model_hash: &str) -> Result<(), ApiError> {
    match version_base_hash(v) {
        Some(h) if !h.eq_ignore_ascii_case(model_hash) => Err(ApiError::Invalid {
            field: "target".into(),
            message: format!(
                "{}@{} was trained for the base model with hash {h}, but this server serves the model with hash {model_hash}; deploy it on a server running that model, or retrain the style on this one",
                v.name, v.version
            ),
        }),
        _ => Ok(()),
    }
}

/// Checks `new` against the registry and the served model and builds the deployment
/// (not saved yet).
///
/// # Errors
/// A bad name (400), weight (400), scheduler (400), unknown target (404), another base
/// model (400).
pub fn prepare(tracking: &Path, model_hash: &str, new: &NewDeployment) -> Result<(Deployment, ModelVersion), ApiError> {
    crate::styles::check_name(&new.name).map_err(|e| ApiError::Invalid { field: "name".into(), message: e.to_string() })?;
    if !new.weight.is_finite() || !(-4.0..=4.0).contains(&new.weight) {
        return Err(ApiError::Invalid { field: "weight".into(), message: format!("{} is not a weight between -4 and 4", new.weight) });
    }
    <atelier_engine::scheduler::SchedulerKind as std::str::FromStr>::from_str(&new.defaults.scheduler)?;
    let version = resolve(tracking, &new.target)?;
    check_base(&version, model_hash)?;
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let deployment = Deployment { name: new.name.clone(), target: new.target.clone(), weight: new.weight, defaults: new.defaults.clone(), created, remote: None, monitor: new.monitor };
    Ok((deployment, version))
}

/// A deployment with the version its target resolves to now (or why it does not).
pub fn info(tracking: &Path, d: Deployment) -> DeploymentInfo {
    match resolve(tracking, &d.target) {
        Ok(v) => DeploymentInfo { deployment: d, version: Some(v.version), problem: None },
        Err(e) => DeploymentInfo { deployment: d, version: None, problem: Some(e.to_string()) },
    }
}

/// Called once for every request a deployment served or refused, with the deployment's
/// name, the version it was pinned to (`STYLE@N`; empty when it never resolved), the HTTP
/// status answered and the seconds from arrival to the answer: counted and timed in the
/// Prometheus metrics (`atelier_deployment_requests_total`,
/// `atelier_deployment_request_duration_seconds`).
pub fn record_served(deployment: &str, version: &str, status: u16, seconds: f64) {
    tracing::debug!(deployment, version, status, seconds, "deployment request served");
    crate::monitoring::metrics::deployment_request(deployment, version, status);
    crate::monitoring::metrics::deployment_latency(deployment, seconds);
}

/// Per-server deployment state: the store, the import token and the A1111 API's options.
pub struct Deployments {
    pub store: DeploymentStore,
    /// The token `POST /api/deployments/import` requires (`--deploy-token`,
    /// `ATELIER_DEPLOY_TOKEN`); `None` refuses every import.
    token: Mutex<Option<String>>,
    /// The A1111 API's state (options, the job `/sdapi/v1/progress` follows).
    pub a1111: a1111::A1111State,
}

impl Deployments {
    pub fn open(data_dir: &Path) -> Self {
        Self { store: DeploymentStore::in_data_dir(data_dir), token: Mutex::new(None), a1111: a1111::A1111State::open(data_dir) }
    }

    /// Accepts pushed deployments authenticated with `token` (an empty token accepts none).
    pub fn set_token(&self, token: Option<String>) {
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = token.filter(|t| !t.is_empty());
    }

    fn token(&self) -> Option<String> {
        self.token.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Per-request settings over a deployment's defaults (every field optional but the prompt).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub scheduler: Option<String>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub seed: Option<u64>,
    pub batch_size: Option<usize>,
    /// img2img source (base64 PNG/JPEG/WebP or a `data:` URL) and its strength.
    pub init_image: Option<String>,
    pub strength: Option<f64>,
}

/// A request accepted by a deployment: its job and the version it is pinned to.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Accepted {
    #[serde(flatten)]
    pub job: JobAccepted,
    pub deployment: String,
    /// `STYLE@N`, the version every image of this job is made with.
    pub version: String,
}

/// Accepts one request for deployment `name`: resolves its target once (now), checks the
/// base model, writes the pinned `<lora:STYLE@N:W>` tag into the prompt, and queues the
/// job with `Deployment` and `Style version` in its images' metadata.
pub async fn accept(state: &AppState, name: &str, o: Overrides) -> Result<Accepted, ApiError> {
    let (store, tracking, hash) = (state.deployments.store.clone(), state.data_dir.join("tracking"), state.model.hash.clone());
    let name = name.to_string();
    let (deployment, version) = tokio::task::spawn_blocking(move || {
        let d = store.get(&name)?;
        let v = resolve(&tracking, &d.target)?;
        check_base(&v, &hash)?;
        Ok::<_, ApiError>((d, v))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("deployment lookup failed: {e}")))??;
    let pinned = format!("{}@{}", version.name, version.version);
    let d = &deployment.defaults;
    let request = GenerateRequest {
        prompt: format!("{} <lora:{pinned}:{}>", o.prompt.trim_end(), deployment.weight),
        negative_prompt: o.negative_prompt.unwrap_or_else(|| d.negative_prompt.clone()),
        steps: o.steps.unwrap_or(d.steps),
        guidance: o.guidance.unwrap_or(d.guidance),
        seed: o.seed,
        scheduler: o.scheduler.unwrap_or_else(|| d.scheduler.clone()),
        width: o.width.or(d.width),
        height: o.height.or(d.height),
        batch_size: o.batch_size.unwrap_or(1),
        strength: o.strength.unwrap_or(GenerateRequest::default().strength),
        init_image: o.init_image,
    };
    let extra = vec![("Deployment".to_string(), deployment.name.clone()), ("Style version".to_string(), pinned.clone())];
    let job = state.submit_with(request, extra).await?;
    // Its images are scored for quality drift when it ends (the sampled fraction).
    crate::monitoring::drift::service::follow(state, &deployment.name, &pinned, &job.job_id);
    Ok(Accepted { job, deployment: deployment.name, version: pinned })
}

/// Waits until job `id` ends; its image ids, or why it produced none (503).
pub async fn wait_images(state: &AppState, id: &str) -> Result<Vec<String>, ApiError> {
    let mut rx = state.jobs.subscribe(id)?;
    loop {
        let s = rx.borrow_and_update().clone();
        match s.state {
            JobState::Done { image_ids, .. } => return Ok(image_ids),
            JobState::Failed { message } => return Err(ApiError::Unavailable(format!("the generation failed: {message}"))),
            JobState::Cancelled => return Err(ApiError::Unavailable("the generation was cancelled".into())),
            _ => {}
        }
        if rx.changed().await.is_err() {
            // The sender is gone: the job ended; read its final state once more.
            let s = state.jobs.status(id)?;
            return match s.state {
                JobState::Done { image_ids, .. } => Ok(image_ids),
                JobState::Failed { message } => Err(ApiError::Unavailable(format!("the generation failed: {message}"))),
                other => Err(ApiError::Unavailable(format!("the generation ended as {other:?}"))),
            };
        }
    }
}

/// Reads the PNG of gallery image `id`.
pub async fn image_bytes(state: &AppState, id: &str) -> Result<Vec<u8>, ApiError> {
    let path = state.gallery.image_path(id).ok_or(ApiError::NotFound { what: "image", id: id.to_string() })?;
    tokio::fs::read(&path).await.map_err(|e| ApiError::storage(&e, &e))
}

/// Times a served request for [`record_served`].
pub(crate) struct Timer(Instant);

impl Timer {
    pub fn start() -> Self {
        Self(Instant::now())
    }
    pub fn done(self, deployment: &str, version: &str, status: u16) {
        record_served(deployment, version, status, self.0.elapsed().as_secs_f64());
    }
}
