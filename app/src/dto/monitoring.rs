//! Quality monitoring of deployments as the API and the Deployments page see it: the drift
//! rule's settings, each measure's test figures, the reference, the window of scored served
//! images, alerts and their retraining suggestions. The server's `monitoring::drift` module
//! computes them (the rule itself is documented there).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::StyleTrainingRequest;

/// The parameters of the drift rule (the server's `monitoring::drift::rule` documents it).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DriftRule {
    /// How many of the latest scored images the window holds.
    pub window: usize,
    /// No decision before the window holds this many images.
    pub min_samples: usize,
    /// Family-wise significance level over the two measures.
    pub alpha: f64,
    /// Smallest drop of the window mean, as a fraction of the reference mean, that counts.
    pub min_drop: f64,
    /// Fraction of served images that are scored, in (0, 1].
    pub sample_fraction: f64,
    /// Images rendered through the deployment for its reference (seeds 7000, 7001, …).
    pub reference_images: usize,
}

impl Default for DriftRule {
    fn default() -> Self {
        Self { window: 8, min_samples: 4, alpha: 0.01, min_drop: 0.05, sample_fraction: 0.25, reference_images: 8 }
    }
}

impl DriftRule {
    /// Checks the values.
    ///
    /// # Errors
    /// A message naming the value out of range.
    pub fn check(&self) -> Result<(), String> {
        if self.window < 2 || self.window > 1000 {
            return Err(format!("window must be 2..=1000 images, not {}", self.window));
        }
        if self.min_samples < 2 || self.min_samples > self.window {
            return Err(format!("min_samples must be 2..=window ({}), not {}", self.window, self.min_samples));
        }
        if !(self.alpha > 0.0 && self.alpha < 0.5) {
            return Err(format!("alpha must be in (0, 0.5), not {}", self.alpha));
        }
        if !(0.0..1.0).contains(&self.min_drop) {
            return Err(format!("min_drop must be in [0, 1), not {}", self.min_drop));
        }
        if !(self.sample_fraction > 0.0 && self.sample_fraction <= 1.0) {
            return Err(format!("sample_fraction must be in (0, 1], not {}", self.sample_fraction));
        }
        if self.reference_images < 2 || self.reference_images > 64 {
            return Err(format!("reference_images must be 2..=64, not {}", self.reference_images));
        }
        Ok(())
    }
}

/// One measure's test result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeasureCheck {
    /// `style` or `quality`.
    pub measure: String,
    pub reference_mean: f64,
    pub window_mean: f64,
    pub n_reference: usize,
    pub n_window: usize,
    /// `(reference_mean − window_mean) / reference_mean`: 0.2 is a 20 % drop.
    pub drop: f64,
    /// Welch's t statistic (negative when the window is lower).
    pub t: f64,
    /// Welch–Satterthwaite degrees of freedom.
    pub df: f64,
    /// One-sided p-value of "the window is lower".
    pub p: f64,
    pub drifted: bool,
}

impl MeasureCheck {
    /// "style similarity 0.412 → 0.301 (−27 %, p = 0.0004, n = 8)".
    pub fn describe(&self) -> String {
        let name = if self.measure == "style" { "style similarity" } else { "quality score" };
        format!(
            "{name} {:.3} → {:.3} ({:+.0} %, p = {}, n = {})",
            self.reference_mean,
            self.window_mean,
            -self.drop * 100.0,
            format_p(self.p),
            self.n_window
        )
    }
}

fn format_p(p: f64) -> String {
    if p < 1e-4 { format!("{p:.1e}") } else { format!("{p:.4}") }
}

/// One alert as the studio keeps and shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// Stable per firing (the deployment name and start time).
    pub fingerprint: String,
    pub deployment: String,
    /// The served version whose images drifted (`NAME@N`).
    pub version: String,
    /// The version the reference was measured with.
    pub reference_version: String,
    /// Milliseconds since the Unix epoch.
    pub starts_at: i64,
    /// Set when the alert resolved.
    pub ends_at: Option<i64>,
    /// One line: what drifted, by how much, with the p-value.
    pub summary: String,
    /// Every measure's figures at the moment it fired.
    pub checks: Vec<MeasureCheck>,
    /// What to retrain, and on what (see [`Suggestion`]).
    pub suggestion: Option<Suggestion>,
}

impl Alert {
    pub fn is_firing(&self) -> bool {
        self.ends_at.is_none()
    }
}

/// What is known of the dataset behind the served version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DatasetFacts {
    /// The studio dataset id (uploads), when the style was trained on one.
    pub id: Option<String>,
    /// The folder the dataset lives in.
    pub path: Option<String>,
    /// (version number, DVC `.dir` md5) the served version was trained on.
    pub trained_on: Option<(u64, String)>,
    /// The dataset's newest version.
    pub latest: Option<(u64, String)>,
    /// What changed between the two, one line each ("added a.png", "caption of b.png changed").
    pub changes: Vec<String>,
}

/// A retraining suggestion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Suggestion {
    /// One sentence: what to do.
    pub headline: String,
    /// The drift figures that led to it.
    pub why: String,
    /// The style to retrain (its new version is registered under the same name).
    pub style: String,
    pub dataset: Option<DatasetFacts>,
    /// Gallery image ids of the scored served images, worst first (at most 4).
    pub worst_images: Vec<String>,
    /// What "Start this training" posts to `POST /api/style-trainings`; `None` when the style
    /// was not trained from a studio dataset (then [`Suggestion::command`] says what to run).
    pub training: Option<StyleTrainingRequest>,
    /// The same training from the command line.
    pub command: Option<String>,
}

/// One scored served image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Milliseconds since the Unix epoch.
    pub at: i64,
    /// Its gallery image id.
    pub image_id: String,
    /// The version that painted it (`NAME@N`).
    pub version: String,
    /// See the server's `Scores::style` (`None` when the reference version has no training Grams).
    pub style: Option<f64>,
    pub quality: f64,
}

/// The reference a deployment is compared with: its version's images, scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reference {
    /// The version measured (`NAME@N`); its training Grams score every later image.
    pub version: String,
    /// Milliseconds since the Unix epoch.
    pub measured_at: i64,
    pub samples: Vec<Sample>,
}

/// Where a deployment's reference stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ReferenceState {
    /// Not measured (monitoring off until it is).
    Missing,
    /// Being measured: `done` of `total` images.
    Measuring { done: usize, total: usize },
    /// Measuring failed.
    Failed { message: String },
    Ready(Reference),
}

/// Everything monitoring keeps about one deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Watch {
    pub deployment: String,
    pub rule: DriftRule,
    pub reference: ReferenceState,
    /// The latest scored images, oldest first (at most `rule.window`).
    pub window: VecDeque<Sample>,
    /// Images served since monitoring started.
    pub served: u64,
    /// Of those, how many were scored.
    pub scored: u64,
    /// The latest figures (after the last scored image).
    pub last_checks: Vec<MeasureCheck>,
    /// Alerts, newest first: at most one firing, then up to [`KEEP_ALERTS`] resolved ones.
    pub alerts: Vec<Alert>,
    /// `scored` at the latest check in which a measure drifted: a firing alert resolves once
    /// a whole window of images has been scored since with no drift.
    #[serde(default)]
    pub scored_at_drift: u64,
}

/// Resolved alerts kept per deployment.
pub const KEEP_ALERTS: usize = 20;

impl Watch {
    /// A deployment's state before anything is measured.
    pub fn new(deployment: &str, rule: DriftRule) -> Self {
        Self {
            deployment: deployment.to_string(),
            rule,
            reference: ReferenceState::Missing,
            window: VecDeque::new(),
            served: 0,
            scored: 0,
            last_checks: Vec::new(),
            alerts: Vec::new(),
            scored_at_drift: 0,
        }
    }

    /// The firing alert, if any.
    pub fn firing(&self) -> Option<&Alert> {
        self.alerts.first().filter(|a| a.is_firing())
    }
}


/// `POST /api/deployments/{name}/monitoring`: measure the reference again (with the version
/// the deployment serves now), optionally with another rule or prompts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MonitoringRequest {
    /// The rule; the current one when absent.
    #[serde(default)]
    pub rule: Option<DriftRule>,
    /// Prompts of the reference images (cycled); the version's sample prompts when empty.
    #[serde(default)]
    pub prompts: Vec<String>,
}
