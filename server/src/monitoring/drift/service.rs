//! Monitoring wired to the studio: the reference measured through a deployment when it is
//! made, the served images followed and scored, and what a drift alert sets off (the
//! retraining suggestion, the log line, the metric, the webhook).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::Tensor;

use super::{DriftRule, Monitor, Reference, ReferenceState, Sample, Transition};
use crate::deployments::{self, Overrides};
use crate::{ApiError, AppState};

/// Seeds of the reference images: `REFERENCE_SEED + i`.
pub const REFERENCE_SEED: u64 = 7_000;

/// The monitoring part of the server state.
pub struct DriftService {
    pub monitor: Monitor,
    /// Where alerts are POSTed (`--alert-webhook`), in Alertmanager's webhook payload shape,
    /// and the studio's own address for the alerts' links (`--external-url`).
    webhook: Mutex<(Option<String>, String)>,
    /// Training Grams by version (`NAME@N`); `None` when the version has none.
    grams: Mutex<HashMap<String, Option<Arc<Vec<Tensor>>>>>,
}

impl DriftService {
    /// Opens `DATA/monitoring` (no webhook until [`DriftService::set_webhook`]).
    pub fn open(data_dir: &std::path::Path) -> std::io::Result<Self> {
        Ok(Self {
            monitor: Monitor::open(&data_dir.join("monitoring"))?,
            webhook: Mutex::new((None, "http://localhost:3000".into())),
            grams: Mutex::new(HashMap::new()),
        })
    }

    /// POST alerts to `url` (`None`: nowhere); `external_url` is the studio's address that
    /// the alerts link to.
    pub fn set_webhook(&self, url: Option<String>, external_url: &str) {
        *self.webhook.lock().unwrap_or_else(|e| e.into_inner()) = (url.filter(|u| !u.trim().is_empty()), external_url.to_string());
    }

    /// The training Grams of registered version `version` (cached), from its
    /// `style_grams.safetensors`; `None` when it has none.
    fn grams(&self, state: &AppState, version: &str) -> Option<Arc<Vec<Tensor>>> {
        if let Some(g) = self.grams.lock().unwrap_or_else(|e| e.into_inner()).get(version) {
            return g.clone();
        }
        let loaded = state.styles.find_version(version).ok().and_then(|entry| {
            atelier_engine::style::metrics::load_style_grams(&entry.dir, &candle_core::Device::Cpu).ok().map(Arc::new)
        });
        self.grams.lock().unwrap_or_else(|e| e.into_inner()).insert(version.to_string(), loaded.clone());
        loaded
    }
}

/// The prompts the reference is rendered with when none are given: the version's sample
/// prompts from its training card, else the starter world's held-out evaluation prompts with
/// its trigger.
pub fn default_prompts(state: &AppState, version: &str) -> Vec<String> {
    let entry = state.styles.find_version(version).ok();
    let card = entry.as_ref().and_then(|e| e.card.clone());
    if let Some(prompts) = card.as_ref().map(|c| c.training.sample_prompts.clone()).filter(|p| !p.is_empty()) {
        return prompts;
    }
    let trigger = card.map(|c| c.trigger).unwrap_or_else(|| version.split('@').next().unwrap_or(version).to_string());
    atelier_engine::style::metrics::starter_eval_prompts(&trigger)
}

/// Starts monitoring deployment `name` with `rule`: renders `prompts` (seeds
/// [`REFERENCE_SEED`] + i) through the deployment, on the queue like any request, scores them,
/// and keeps them as the reference. Returns at once; progress shows in the deployment's
/// monitoring state.
pub fn start(state: &AppState, name: &str, rule: DriftRule, prompts: Vec<String>) {
    let svc = state.drift.clone();
    svc.monitor.start(name, rule);
    let prompts: Vec<String> = if prompts.is_empty() { Vec::new() } else { prompts.iter().cycle().take(rule.reference_images).cloned().collect() };
    let total = prompts.len();
    svc.monitor.set_reference(name, ReferenceState::Measuring { done: 0, total });
    let (state, name) = (state.clone(), name.to_string());
    tokio::spawn(async move {
        let result = measure_reference(&state, &name, prompts).await;
        let svc = &state.drift;
        match result {
            Ok(reference) => svc.monitor.set_reference(&name, ReferenceState::Ready(reference)),
            Err(e) => {
                tracing::warn!("measuring the reference of deployment {name}: {e}");
                svc.monitor.set_reference(&name, ReferenceState::Failed { message: e.to_string() });
            }
        }
    });
}

async fn measure_reference(state: &AppState, name: &str, prompts: Vec<String>) -> Result<Reference, ApiError> {
    let total = prompts.len();
    if total == 0 {
        return Err(ApiError::Invalid { field: "prompts".into(), message: "the reference needs at least one prompt".into() });
    }
    let mut samples = Vec::with_capacity(total);
    let mut version = String::new();
    for (i, prompt) in prompts.into_iter().enumerate() {
        let accepted = deployments::accept(state, name, Overrides { prompt, seed: Some(REFERENCE_SEED + i as u64), ..Default::default() }).await?;
        if !version.is_empty() && version != accepted.version {
            return Err(ApiError::Unavailable(format!(
                "the deployment moved from {version} to {} while its reference was measured; measure it again",
                accepted.version
            )));
        }
        version = accepted.version.clone();
        for id in deployments::wait_images(state, &accepted.job.job_id).await? {
            samples.push(score_image(state, &version, &id).await?);
        }
        state.drift.monitor.set_reference(name, ReferenceState::Measuring { done: i + 1, total });
    }
    let measured_at = super::now_ms();
    Ok(Reference { version, measured_at, samples })
}

/// Scores gallery image `id` painted by `version` against the deployment's reference
/// version's Grams (so a served version that differs from it shows as drift).
async fn score_image(state: &AppState, version: &str, id: &str) -> Result<Sample, ApiError> {
    score_against(state, version, version, id).await
}

async fn score_against(state: &AppState, reference_version: &str, version: &str, id: &str) -> Result<Sample, ApiError> {
    let bytes = deployments::image_bytes(state, id).await?;
    let (st, reference_version, version, id) = (state.clone(), reference_version.to_string(), version.to_string(), id.to_string());
    tokio::task::spawn_blocking(move || {
        let image = image::load_from_memory(&bytes).map_err(|e| ApiError::Internal(format!("reading served image {id}: {e}")))?.to_rgb8();
        let grams = st.drift.grams(&st, &reference_version);
        let scores = super::score(st.generator.as_ref(), &image, grams.as_deref().map(|g| g.as_slice()))
            .map_err(|e| ApiError::Internal(format!("scoring served image {id}: {e}")))?;
        Ok(Sample { at: super::now_ms(), image_id: id, version, style: scores.style, quality: scores.quality })
    })
    .await
    .map_err(|e| ApiError::Internal(format!("the scoring task failed: {e}")))?
}

/// Follows job `job_id` that deployment `name` accepted (pinned to `version`): when it ends,
/// each of its images the sampling picks is scored against the reference and recorded; an
/// alert that fires or resolves is announced. Returns at once.
pub fn follow(state: &AppState, name: &str, version: &str, job_id: &str) {
    if !matches!(state.drift.monitor.watch(name).map(|w| w.reference), Some(ReferenceState::Ready(_))) {
        return;
    }
    let (state, name, version, job_id) = (state.clone(), name.to_string(), version.to_string(), job_id.to_string());
    tokio::spawn(async move {
        let Ok(ids) = deployments::wait_images(&state, &job_id).await else { return };
        for id in ids {
            if !state.drift.monitor.should_score(&name) {
                continue;
            }
            let Some(ReferenceState::Ready(reference)) = state.drift.monitor.watch(&name).map(|w| w.reference) else { return };
            match score_against(&state, &reference.version, &version, &id).await {
                Ok(sample) => {
                    let transition = state.drift.monitor.record(&name, sample);
                    if let Some(w) = state.drift.monitor.watch(&name).filter(|w| !w.window.is_empty()) {
                        let mean = w.window.iter().map(|s| s.quality).sum::<f64>() / w.window.len() as f64;
                        crate::monitoring::metrics::set_quality_score(&name, mean);
                    }
                    announce(&state, &name, transition).await;
                }
                Err(e) => tracing::warn!("deployment {name}: {e}"),
            }
        }
    });
}

/// What a fired or resolved alert sets off: the suggestion (on a firing one), the log line,
/// the metric and the webhook.
async fn announce(state: &AppState, name: &str, transition: Transition) {
    let alert = match transition {
        Transition::None => return,
        Transition::Fired(mut alert) => {
            let (st, a) = (state.clone(), alert.clone());
            if let Ok(s) = tokio::task::spawn_blocking(move || suggestion_for(&st, &a)).await {
                state.drift.monitor.set_suggestion(name, &alert.fingerprint, s.clone());
                alert.suggestion = Some(s);
            }
            tracing::warn!(deployment = name, "quality drift: {} — {}", alert.summary, alert.suggestion.as_ref().map_or("", |s| s.headline.as_str()));
            crate::monitoring::metrics::set_drift_alert(name, true);
            alert
        }
        Transition::Resolved(alert) => {
            tracing::info!(deployment = name, "quality drift resolved: {}", alert.summary);
            crate::monitoring::metrics::set_drift_alert(name, false);
            alert
        }
    };
    let (url, external) = state.drift.webhook.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(url) = url {
        let payload = super::alert::webhook_payload(&alert, &external);
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = super::alert::post(&url, &payload) {
                tracing::warn!("{e}");
            }
        })
        .await;
    }
}

/// The retraining suggestion for `alert`: from the served version's registry tags (the
/// dataset it was trained on, see [`crate::datasets`]) and its card's training settings.
fn suggestion_for(state: &AppState, alert: &super::Alert) -> super::Suggestion {
    let style = alert.version.split('@').next().unwrap_or(&alert.version).to_string();
    let watch = state.drift.monitor.watch(&alert.deployment);
    let samples: Vec<Sample> = watch.map(|w| w.window.into_iter().collect()).unwrap_or_default();
    let entry = state.styles.find_version(&alert.version).ok();
    let previous = entry.as_ref().and_then(|e| e.card.as_ref()).map(|c| super::suggest::request_from_config(&c.training));
    let dataset = dataset_facts(state, &alert.version);
    super::suggest::suggest(&style, &alert.version, &alert.checks, &samples, dataset, previous)
}

/// The dataset behind registered version `version` (`NAME@N`): the dataset version its
/// training recorded (`dataset.id`, `dataset.version`, `dataset.md5` tags), the dataset's
/// newest version, and what changed between the two.
fn dataset_facts(state: &AppState, version: &str) -> Option<super::DatasetFacts> {
    let (name, selector) = version.split_once('@')?;
    let tracker = crate::tracking::Tracker::open(&state.data_dir.join("tracking")).ok()?;
    let v = tracker.resolve_version(name, selector).ok()?;
    let md5 = v.tags.get("dataset.md5").cloned();
    let number = v.tags.get("dataset.version").and_then(|n| n.parse::<u32>().ok());
    let Some(id) = v.tags.get("dataset.id").cloned() else {
        return md5.map(|m| super::DatasetFacts { trained_on: Some((0, m)), ..Default::default() });
    };
    let project = crate::datasets::Project::studio(&state.data_dir).ok()?;
    let ds = project.dataset(&id).ok()?;
    let latest = project.version(&ds, None).ok();
    let changes = match (number, &latest) {
        (Some(from), Some(l)) if l.number != from => project.diff(&ds, Some(from), Some(l.number)).map(|d| change_lines(&d)).unwrap_or_default(),
        _ => Vec::new(),
    };
    Some(super::DatasetFacts {
        // Uploaded datasets (a uuid) can be trained from the web; others from the CLI.
        id: uuid::Uuid::parse_str(&ds.id).is_ok().then(|| ds.id.clone()),
        path: Some(ds.folder.display().to_string()),
        trained_on: number.map(u64::from).zip(md5),
        latest: latest.map(|l| (u64::from(l.number), l.md5)),
        changes,
    })
}

/// One line per change of a dataset diff.
fn change_lines(d: &crate::datasets::VersionDiff) -> Vec<String> {
    let mut out: Vec<String> = d.images_added.iter().map(|p| format!("added {p}")).collect();
    out.extend(d.images_removed.iter().map(|p| format!("removed {p}")));
    out.extend(d.images_changed.iter().map(|p| format!("changed {p}")));
    out.extend(d.captions_changed.iter().map(|c| match (&c.before, &c.after) {
        (None, Some(a)) => format!("caption of {} added: \"{a}\"", c.image.as_deref().unwrap_or(&c.caption)),
        (Some(_), None) => format!("caption of {} removed", c.image.as_deref().unwrap_or(&c.caption)),
        (_, after) => format!("caption of {} changed to \"{}\"", c.image.as_deref().unwrap_or(&c.caption), after.as_deref().unwrap_or("")),
    }));
    out
}

/// Starts monitoring a deployment that was just made, or that the studio serves without a
/// reference (made from the command line, or its measuring cut off by a restart), with
/// `rule` (the kept or default one) and its version's sample prompts. Deployments pushed to
/// another server, or made with `monitor: false`, are left alone.
pub fn start_for(state: &AppState, deployment: &app::dto::Deployment, rule: Option<DriftRule>) {
    if !deployment.monitor || deployment.remote.is_some() {
        return;
    }
    let tracking = state.data_dir.join("tracking");
    let Ok(version) = deployments::resolve(&tracking, &deployment.target) else { return };
    let pinned = format!("{}@{}", version.name, version.version);
    let rule = rule.or_else(|| state.drift.monitor.watch(&deployment.name).map(|w| w.rule)).unwrap_or_default();
    start(state, &deployment.name, rule, default_prompts(state, &pinned));
}

/// At start-up: every deployment to monitor whose reference is missing or was being
/// measured when the studio stopped gets it measured.
pub fn resume_all(state: &AppState) {
    for d in state.deployments.store.list() {
        let needs = match state.drift.monitor.watch(&d.name).map(|w| w.reference) {
            None | Some(ReferenceState::Missing) | Some(ReferenceState::Measuring { .. }) => true,
            Some(ReferenceState::Failed { .. }) | Some(ReferenceState::Ready(_)) => false,
        };
        if needs {
            start_for(state, &d, None);
        }
    }
}
