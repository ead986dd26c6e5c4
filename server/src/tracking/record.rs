//! Recording a command's work as runs: settings as params (flattened, `optim.lr`),
//! numbers as metrics, and parent/child runs as MLflow nests them (tag
//! `mlflow.parentRunId` on the child; `mlflow.runName` is the run's name).

use std::path::Path;

use super::{flatten_params, RunStatus, Tracker, TrackingError};

/// One run being recorded: its store and id. Dropped without [`Recorded::finish`], the
/// run ends `FAILED` (a command that returned an error or panicked).
pub struct Recorded<'a> {
    tracker: &'a Tracker,
    pub run: String,
    experiment: i64,
    done: bool,
}

impl Tracker {
    /// Starts a run named `name` in `experiment` (created if missing) with `params` (a JSON
    /// object, flattened) and `tags`.
    pub fn record<'a>(&'a self, experiment: &str, name: &str, params: &serde_json::Value, tags: &[(&str, String)]) -> Result<Recorded<'a>, TrackingError> {
        let exp = self.experiment(experiment)?;
        self.record_in(exp, name, params, tags, None)
    }

    /// Continues run `run` (a resumed training): running again, in this process.
    pub fn reopen<'a>(&'a self, run: &str) -> Result<Recorded<'a>, TrackingError> {
        let info = self.run(run)?.ok_or_else(|| TrackingError::NoRun(run.to_string()))?;
        self.reopen_run(run)?;
        Ok(Recorded { tracker: self, run: run.to_string(), experiment: info.experiment_id, done: false })
    }

    fn record_in<'a>(&'a self, exp: i64, name: &str, params: &serde_json::Value, tags: &[(&str, String)], parent: Option<&str>) -> Result<Recorded<'a>, TrackingError> {
        let run = self.start_run(exp, name)?;
        let recorded = Recorded { tracker: self, run, experiment: exp, done: false };
        self.set_tag(&recorded.run, "mlflow.runName", name)?;
        if let Some(p) = parent {
            self.set_tag(&recorded.run, "mlflow.parentRunId", p)?;
        }
        for (k, v) in flatten_params(params) {
            self.log_param(&recorded.run, &k, &v)?;
        }
        for (k, v) in tags {
            self.set_tag(&recorded.run, k, v)?;
        }
        Ok(recorded)
    }
}

impl Recorded<'_> {
    /// A child run in the same experiment (one style of an eval, one prompt of a sweep).
    pub fn child(&self, name: &str, params: &serde_json::Value, tags: &[(&str, String)]) -> Result<Recorded<'_>, TrackingError> {
        self.tracker.record_in(self.experiment, name, params, tags, Some(&self.run))
    }

    pub fn metric(&self, key: &str, value: f64, step: i64) -> Result<(), TrackingError> {
        self.tracker.log_metric(&self.run, key, value, step)
    }

    /// Several metrics at one step.
    pub fn metrics(&self, values: &[(&str, f64)], step: i64) -> Result<(), TrackingError> {
        values.iter().try_for_each(|(k, v)| self.metric(k, *v, step))
    }

    pub fn tag(&self, key: &str, value: &str) -> Result<(), TrackingError> {
        self.tracker.set_tag(&self.run, key, value)
    }

    pub fn artifact(&self, file: &Path, subdir: Option<&str>) -> Result<(), TrackingError> {
        self.tracker.log_artifact(&self.run, file, subdir).map(drop)
    }

    /// An image in MLflow's image gallery ([`Tracker::log_image`]).
    pub fn image(&self, file: &Path, key: &str, step: i64) -> Result<(), TrackingError> {
        self.tracker.log_image(&self.run, file, key, step).map(drop)
    }

    /// Ends the run `FINISHED`.
    pub fn finish(self) -> Result<(), TrackingError> {
        self.end(RunStatus::Finished)
    }

    /// Ends the run with `status` (`KILLED` for a stopped training).
    pub fn end(mut self, status: RunStatus) -> Result<(), TrackingError> {
        self.done = true;
        self.tracker.end_run(&self.run, status)
    }
}

impl Drop for Recorded<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.tracker.end_run(&self.run, RunStatus::Failed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_children_and_failures() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tracker::open(dir.path()).unwrap();
        let parent = t.record("eval-styles", "eval", &serde_json::json!({ "weights": [0, 1], "model": { "name": "starter" } }), &[("device", "cpu".into())]).unwrap();
        let child = parent.child("ink", &serde_json::json!({ "style": "ink" }), &[]).unwrap();
        child.metrics(&[("similarity", 0.5), ("base_similarity", 0.25)], 1).unwrap();
        let child_id = child.run.clone();
        child.finish().unwrap();
        let failed = parent.child("broken", &serde_json::json!({}), &[]).unwrap();
        let failed_id = failed.run.clone();
        drop(failed);
        let parent_id = parent.run.clone();
        parent.finish().unwrap();

        let tags: std::collections::BTreeMap<_, _> = t.tags(&child_id).unwrap().into_iter().collect();
        assert_eq!(tags["mlflow.parentRunId"], parent_id);
        assert_eq!(tags["mlflow.runName"], "ink");
        let params: std::collections::BTreeMap<_, _> = t.params(&parent_id).unwrap().into_iter().collect();
        assert_eq!((params["weights"].as_str(), params["model.name"].as_str()), ("[0,1]", "starter"));
        assert_eq!(t.run(&child_id).unwrap().unwrap().status, "FINISHED");
        assert_eq!(t.run(&failed_id).unwrap().unwrap().status, "FAILED", "dropped without finish");
        assert_eq!(t.run(&parent_id).unwrap().unwrap().status, "FINISHED");
        assert_eq!(t.metric_history(&child_id, "similarity").unwrap()[0].value, 0.5);
    }
}
