//! Quality monitoring of deployments: a fraction of the images each deployment serves is
//! scored (style similarity to the training images of the version its reference was measured
//! with, and the no-reference quality score), the rolling window of those scores is compared
//! with the reference measured when the deployment was made ([`rule`]), and drift raises an
//! [`alert::Alert`] with a retraining [`suggest::Suggestion`]: shown on the Deployments page,
//! logged, exported as a metric, and POSTed to a webhook in Alertmanager's payload shape.
//!
//! State is one JSON file per deployment in `DATA/monitoring/NAME.json`, written atomically
//! after every change, so a restart keeps the reference, the window and the alerts.

pub mod alert;
pub mod http;
pub mod rule;
pub mod service;
pub mod suggest;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

pub use app::dto::monitoring::{Reference, ReferenceState, Sample, Watch, KEEP_ALERTS};
pub use alert::Alert;
pub use rule::{DriftRule, MeasureCheck};
pub use suggest::{DatasetFacts, Suggestion};

/// The two scores of one image, each in [0, 1], higher is better.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// Style similarity to the reference version's training images; `None` when that
    /// version has no training Grams (a baked blend), and then style is not monitored.
    pub style: Option<f64>,
    /// Combined no-reference quality ([`atelier_engine::quality::assess`], default weights).
    pub quality: f64,
}

/// What recording one scored image changed.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// Nothing to tell anyone.
    None,
    /// A new alert fired (its suggestion still to be filled by the caller).
    Fired(Alert),
    /// The firing alert resolved.
    Resolved(Alert),
}

/// The monitoring state of every deployment.
pub struct Monitor {
    dir: PathBuf,
    watches: Mutex<HashMap<String, Watch>>,
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Monitor {
    /// Opens `dir` (`DATA/monitoring`), reading every deployment's state; unreadable files
    /// are skipped with a warning (the deployment starts monitoring afresh).
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut watches = HashMap::new();
        for entry in std::fs::read_dir(dir)?.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                match std::fs::read(&path).map_err(|e| e.to_string()).and_then(|b| serde_json::from_slice::<Watch>(&b).map_err(|e| e.to_string())) {
                    Ok(w) => {
                        watches.insert(w.deployment.clone(), w);
                    }
                    Err(e) => tracing::warn!("skipping the monitoring state {}: {e}", path.display()),
                }
            }
        }
        Ok(Self { dir: dir.to_path_buf(), watches: Mutex::new(watches) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Watch>> {
        self.watches.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, w: &Watch) {
        let path = self.dir.join(format!("{}.json", w.deployment));
        if let Err(e) = atelier_engine::files::write_json_atomic(&path, w) {
            tracing::warn!("writing {}: {e}", path.display());
        }
    }

    /// Starts (or restarts) monitoring `deployment` with `rule`: the window and the reference
    /// are cleared; alerts are kept.
    pub fn start(&self, deployment: &str, rule: DriftRule) -> Watch {
        let mut all = self.lock();
        let w = all.entry(deployment.to_string()).or_insert_with(|| Watch::new(deployment, rule));
        w.rule = rule;
        w.reference = ReferenceState::Missing;
        w.window.clear();
        w.last_checks.clear();
        let w = w.clone();
        drop(all);
        self.save(&w);
        w
    }

    /// Forgets `deployment` (deleted).
    pub fn remove(&self, deployment: &str) {
        self.lock().remove(deployment);
        let _ = std::fs::remove_file(self.dir.join(format!("{deployment}.json")));
    }

    /// The state of `deployment`.
    pub fn watch(&self, deployment: &str) -> Option<Watch> {
        self.lock().get(deployment).cloned()
    }

    /// Every firing alert, newest first.
    pub fn firing(&self) -> Vec<Alert> {
        let mut out: Vec<Alert> = self.lock().values().filter_map(|w| w.firing().cloned()).collect();
        out.sort_by(|a, b| b.starts_at.cmp(&a.starts_at));
        out
    }

    /// Sets the reference state (progress, failure, or the measured reference).
    pub fn set_reference(&self, deployment: &str, state: ReferenceState) {
        let mut all = self.lock();
        let Some(w) = all.get_mut(deployment) else { return };
        w.reference = state;
        let w = w.clone();
        drop(all);
        self.save(&w);
    }

    /// Counts one served image of `deployment` and says whether to score it: every image
    /// while `sample_fraction` is 1, else evenly spread (`floor(n · f)` grows). `false` while
    /// there is no reference.
    pub fn should_score(&self, deployment: &str) -> bool {
        let mut all = self.lock();
        let Some(w) = all.get_mut(deployment) else { return false };
        if !matches!(w.reference, ReferenceState::Ready(_)) {
            return false;
        }
        let f = w.rule.sample_fraction;
        let before = (w.served as f64 * f).floor();
        w.served += 1;
        (w.served as f64 * f).floor() > before
    }

    /// Records a scored image and applies the rule: a drifted measure fires an alert (when
    /// none is firing); the firing alert resolves after a whole window of checks without
    /// drift.
    pub fn record(&self, deployment: &str, sample: Sample) -> Transition {
        let mut all = self.lock();
        let Some(w) = all.get_mut(deployment) else { return Transition::None };
        let ReferenceState::Ready(reference) = &w.reference else { return Transition::None };
        w.scored += 1;
        w.window.push_back(sample);
        while w.window.len() > w.rule.window {
            w.window.pop_front();
        }
        let styles = |xs: &mut dyn Iterator<Item = &Sample>| xs.map(|s| s.style).collect::<Option<Vec<f64>>>();
        let qualities = |xs: &mut dyn Iterator<Item = &Sample>| xs.map(|s| s.quality).collect::<Vec<f64>>();
        let mut checks = Vec::with_capacity(2);
        if let (Some(r), Some(win)) = (styles(&mut reference.samples.iter()), styles(&mut w.window.iter())) {
            checks.push(rule::test(&w.rule, "style", &r, &win));
        }
        checks.push(rule::test(&w.rule, "quality", &qualities(&mut reference.samples.iter()), &qualities(&mut w.window.iter())));
        let drifted = checks.iter().any(|c| c.drifted);
        let reference_version = reference.version.clone();
        w.last_checks = checks.clone();
        let now = now_ms();
        if drifted {
            w.scored_at_drift = w.scored;
        }
        let transition = match (drifted, w.firing().is_some()) {
            (true, false) => {
                let latest = w.window.back().map(|s| s.version.clone()).unwrap_or_default();
                let summary = format!(
                    "{}: served images drifted from the reference measured with {reference_version}: {}",
                    w.deployment,
                    checks.iter().filter(|c| c.drifted).map(MeasureCheck::describe).collect::<Vec<_>>().join("; ")
                );
                let alert = Alert {
                    fingerprint: format!("{}-{now}", w.deployment),
                    deployment: w.deployment.clone(),
                    version: latest,
                    reference_version,
                    starts_at: now,
                    ends_at: None,
                    summary,
                    checks,
                    suggestion: None,
                };
                w.alerts.insert(0, alert.clone());
                w.alerts.truncate(KEEP_ALERTS + 1);
                Transition::Fired(alert)
            }
            (false, true) => {
                if w.scored - w.scored_at_drift >= w.rule.window as u64 {
                    w.alerts[0].ends_at = Some(now);
                    Transition::Resolved(w.alerts[0].clone())
                } else {
                    Transition::None
                }
            }
            _ => Transition::None,
        };
        let w = w.clone();
        drop(all);
        self.save(&w);
        transition
    }

    /// Attaches `suggestion` to the firing alert of `deployment`.
    pub fn set_suggestion(&self, deployment: &str, fingerprint: &str, suggestion: Suggestion) {
        let mut all = self.lock();
        let Some(w) = all.get_mut(deployment) else { return };
        if let Some(a) = w.alerts.iter_mut().find(|a| a.fingerprint == fingerprint) {
            a.suggestion = Some(suggestion);
        }
        let w = w.clone();
        drop(all);
        self.save(&w);
    }
}

/// Scores one image: its style similarity to `grams` (the reference version's training
/// Grams, [`atelier_engine::style::metrics::load_style_grams`]; `None` skips style) through
/// `generator`'s VAE encoder, and its combined quality score.
///
/// # Errors
/// The generator cannot measure style (no VAE), or the tensors do not match.
pub fn score(generator: &dyn crate::Generator, image: &image::RgbImage, grams: Option<&[candle_core::Tensor]>) -> atelier_engine::Result<Scores> {
    let style = match grams {
        Some(grams) => {
            let own = generator.encoder_grams(std::slice::from_ref(image))?;
            let grams: Vec<candle_core::Tensor> = match own.first() {
                Some(g) => grams.iter().map(|r| r.to_device(g.device())).collect::<candle_core::Result<_>>()?,
                None => grams.to_vec(),
            };
            Some(atelier_engine::style::metrics::style_similarity(&own, &grams)?)
        }
        None => None,
    };
    let quality = atelier_engine::quality::assess(image, None, &atelier_engine::quality::Weights::default()).combined;
    Ok(Scores { style, quality })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(i: usize, style: f64, quality: f64) -> Sample {
        Sample { at: now_ms() + i as i64, image_id: format!("img{i}"), version: "ink@1".into(), style: Some(style), quality }
    }

    #[test]
    fn fires_once_resolves_after_a_fresh_good_window_and_survives_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let m = Monitor::open(tmp.path()).unwrap();
        assert!(!m.should_score("ink"), "unknown deployment");
        m.start("ink", DriftRule { sample_fraction: 0.5, ..Default::default() });
        assert!(!m.should_score("ink"), "no reference yet");
        let good = [0.52, 0.55, 0.49, 0.51, 0.53, 0.50, 0.54, 0.52];
        let reference = Reference { version: "ink@1".into(), measured_at: 0, samples: good.iter().enumerate().map(|(i, &v)| sample(i, v, 0.7)).collect() };
        m.set_reference("ink", ReferenceState::Ready(reference));
        // Half of the served images are scored, evenly.
        let picks: Vec<bool> = (0..6).map(|_| m.should_score("ink")).collect();
        assert_eq!(picks, [false, true, false, true, false, true]);

        let mut fired = 0;
        for i in 0..8 {
            if let Transition::Fired(a) = m.record("ink", sample(100 + i, 0.30 + 0.01 * (i % 3) as f64, 0.7)) {
                fired += 1;
                assert!(a.summary.contains("style similarity"), "{}", a.summary);
                assert_eq!(i, 3, "fires as soon as min_samples (4) bad images are in the window");
            }
        }
        assert_eq!(fired, 1, "one alert while it stays bad");
        assert_eq!(m.firing().len(), 1);

        let m = Monitor::open(tmp.path()).unwrap();
        assert!(m.watch("ink").unwrap().firing().is_some(), "the alert survives a restart");
        let mut resolved_at = None;
        let mut last_drifted = None;
        for i in 0..24 {
            if let Transition::Resolved(_) = m.record("ink", sample(1000 + i, good[i % 8], 0.7)) {
                resolved_at = Some(i);
            }
            if m.watch("ink").unwrap().last_checks.iter().any(|c| c.drifted) {
                last_drifted = Some(i);
            }
        }
        let last_drifted = last_drifted.expect("the first good images still share the window with bad ones");
        assert_eq!(resolved_at, Some(last_drifted + 8), "resolved after a whole window (8) of checks without drift");
        assert!(m.firing().is_empty());
        m.remove("ink");
        assert!(m.watch("ink").is_none() && !tmp.path().join("ink.json").exists());
    }
}
