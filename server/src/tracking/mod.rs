//! The embedded experiment store, with MLflow's data model: experiments hold runs; a
//! run has params (string key → value, set once), metrics (key, value, timestamp, step —
//! many per key), tags (key → value, may change) and artifacts (files under the run's
//! artifact folder). Stored in SQLite (`DIR/tracking.sqlite`) with artifacts under
//! `DIR/artifacts/EXPERIMENT_ID/RUN_ID/`, the same shape MLflow's file and SQL stores
//! have, so that runs can later be copied to an MLflow server as they are.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub mod http;
pub mod mlflow;
pub mod queries;
pub mod record;
pub mod registry;
pub mod registry_http;
pub mod search;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS experiments (
    experiment_id     INTEGER PRIMARY KEY AUTOINCREMENT,
    name              TEXT NOT NULL UNIQUE,
    artifact_location TEXT NOT NULL,
    lifecycle_stage   TEXT NOT NULL DEFAULT 'active',
    creation_time     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_uuid        TEXT PRIMARY KEY,
    experiment_id   INTEGER NOT NULL REFERENCES experiments(experiment_id),
    name            TEXT NOT NULL,
    status          TEXT NOT NULL,          -- RUNNING, FINISHED, FAILED, KILLED
    start_time      INTEGER NOT NULL,       -- ms since the epoch
    end_time        INTEGER,
    artifact_uri    TEXT NOT NULL,
    lifecycle_stage TEXT NOT NULL DEFAULT 'active'
);
CREATE TABLE IF NOT EXISTS params (
    run_uuid TEXT NOT NULL REFERENCES runs(run_uuid),
    key      TEXT NOT NULL,
    value    TEXT NOT NULL,
    PRIMARY KEY (run_uuid, key)
);
CREATE TABLE IF NOT EXISTS metrics (
    run_uuid  TEXT NOT NULL REFERENCES runs(run_uuid),
    key       TEXT NOT NULL,
    value     REAL NOT NULL,
    timestamp INTEGER NOT NULL,
    step      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_run_key ON metrics (run_uuid, key, step);
CREATE TABLE IF NOT EXISTS tags (
    run_uuid TEXT NOT NULL REFERENCES runs(run_uuid),
    key      TEXT NOT NULL,
    value    TEXT NOT NULL,
    PRIMARY KEY (run_uuid, key)
);
-- A counter per run, raised by every change to it (the triggers below, and artifact
-- copies), so that a mirror to an MLflow server knows which runs have something new.
CREATE TABLE IF NOT EXISTS run_versions (
    run_uuid TEXT PRIMARY KEY,
    version  INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS runs_changed AFTER UPDATE ON runs BEGIN
    INSERT INTO run_versions (run_uuid, version) VALUES (NEW.run_uuid, 1)
    ON CONFLICT (run_uuid) DO UPDATE SET version = version + 1;
END;
CREATE TRIGGER IF NOT EXISTS params_changed AFTER INSERT ON params BEGIN
    INSERT INTO run_versions (run_uuid, version) VALUES (NEW.run_uuid, 1)
    ON CONFLICT (run_uuid) DO UPDATE SET version = version + 1;
END;
CREATE TRIGGER IF NOT EXISTS metrics_changed AFTER INSERT ON metrics BEGIN
    INSERT INTO run_versions (run_uuid, version) VALUES (NEW.run_uuid, 1)
    ON CONFLICT (run_uuid) DO UPDATE SET version = version + 1;
END;
CREATE TRIGGER IF NOT EXISTS tags_changed AFTER INSERT ON tags BEGIN
    INSERT INTO run_versions (run_uuid, version) VALUES (NEW.run_uuid, 1)
    ON CONFLICT (run_uuid) DO UPDATE SET version = version + 1;
END;
";

/// Why the experiment store could not do something.
#[derive(Debug, thiserror::Error)]
pub enum TrackingError {
    /// The SQLite database failed.
    #[error(transparent)]
    Db(#[from] rusqlite::Error),
    /// The store's or a run's folder could not be created.
    #[error("creating {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file could not be copied into a run's artifacts.
    #[error("copying {path} into the run")]
    Artifact {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An artifact path that names no file.
    #[error("artifact without a file name")]
    NoFileName(PathBuf),
    #[error("no run {0}")]
    NoRun(String),
    /// A registered model name that is not a valid style name (the message says the rule).
    #[error("{0}")]
    BadName(String),
    #[error("no registered model {0:?}; train the style first (every finished training registers a version)")]
    NoModel(String),
    #[error("{name} has no version {version}")]
    NoVersion { name: String, version: String },
    #[error("{0:?} is not an alias: use letters, digits, '-', '_' or '.', and not 'latest', a number or vN")]
    BadAlias(String),
    /// Params are set once.
    #[error("param {key} of run {run} is {old:?} already; params cannot change")]
    ParamChanged { run: String, key: String, old: String },
}

/// A missing run is a 404, a full disk a 503 saying to free space, the rest a 500.
impl From<TrackingError> for crate::ApiError {
    fn from(e: TrackingError) -> Self {
        use crate::ApiError;
        match e {
            TrackingError::NoRun(id) => ApiError::NotFound { what: "run", id },
            TrackingError::NoModel(id) => ApiError::NotFound { what: "registered model", id },
            TrackingError::NoVersion { name, version } => ApiError::NotFound { what: "model version", id: format!("{name}@{version}") },
            TrackingError::BadAlias(_) => ApiError::Invalid { field: "alias".into(), message: e.to_string() },
            TrackingError::BadName(message) => ApiError::Invalid { field: "name".into(), message },
            TrackingError::Io { ref source, .. } | TrackingError::Artifact { ref source, .. } => ApiError::storage(&e, source),
            other => ApiError::Internal(crate::error::report(&other)),
        }
    }
}

type Result<T, E = TrackingError> = std::result::Result<T, E>;

fn creating(path: &Path) -> impl FnOnce(std::io::Error) -> TrackingError + '_ {
    move |source| TrackingError::Io { path: path.to_path_buf(), source }
}

/// The tag holding the id of the process a run is running in.
pub const PID_TAG: &str = "atelier.pid";

/// Whether process `pid` exists (unix: `kill(pid, 0)`; elsewhere assumed alive).
fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
        // SAFETY: signal 0 only checks that the process exists; nothing is sent.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Tags every run gets: the Atelier version and git commit that ran it, and the user
/// (MLflow's `mlflow.user`). Device and dtype are tagged by the code that knows them.
pub fn standard_tags() -> Vec<(&'static str, String)> {
    let mut tags = vec![("atelier.version", env!("CARGO_PKG_VERSION").to_string())];
    let commit = env!("ATELIER_COMMIT");
    if !commit.is_empty() {
        tags.push(("atelier.commit", commit.to_string()));
    }
    if let Some(user) = std::env::var("USER").ok().or_else(|| std::env::var("USERNAME").ok()).filter(|u| !u.is_empty()) {
        tags.push(("mlflow.user", user));
    }
    tags
}

/// The device name as tagged on runs: `cpu`, `cuda:N`, `metal:N`.
pub fn device_tag(device: &candle_core::Device) -> String {
    atelier_engine::device::name(device)
}

/// Flattens a JSON object of settings into params: nested objects as dotted keys
/// (`optim.lr`), strings as they are, everything else as JSON text.
pub fn flatten_params(value: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(fields) => {
                for (k, v) in fields {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&key, v, out);
                }
            }
            serde_json::Value::String(s) => out.push((prefix.to_string(), s.clone())),
            serde_json::Value::Null => {}
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let mut out = Vec::new();
    walk("", value, &mut out);
    out
}

/// Run states, as MLflow names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RunStatus {
    Running,
    Finished,
    Failed,
    Killed,
}

impl RunStatus {
    fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "RUNNING",
            RunStatus::Finished => "FINISHED",
            RunStatus::Failed => "FAILED",
            RunStatus::Killed => "KILLED",
        }
    }
}

pub use app::dto::{ExperimentInfo, MetricPoint, RunInfo, RunSummary};

/// The store.
pub struct Tracker {
    root: PathBuf,
    db: Mutex<Connection>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Tracker {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(creating(dir))?;
        // Absolute, so the artifact locations recorded in runs stay valid from any working
        // folder (the CLI and the studio are often started from different ones).
        let dir = &std::fs::canonicalize(dir).map_err(creating(dir))?;
        let db = Connection::open(dir.join("tracking.sqlite"))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.execute_batch(SCHEMA)?;
        // The model registry and the MLflow mirror's bookkeeping live in the same database.
        db.execute_batch(registry::SCHEMA)?;
        db.execute_batch(mlflow::SCHEMA)?;
        let tracker = Self { root: dir.to_path_buf(), db: Mutex::new(db) };
        tracker.ensure_latest_metrics()?;
        tracker.end_orphaned_runs()?;
        Ok(tracker)
    }

    /// Ends as `KILLED` every `RUNNING` run whose process (tag [`PID_TAG`], set by
    /// [`Tracker::start_run`] and [`Tracker::reopen_run`]) is gone, so a killed studio or
    /// CLI never leaves a run running forever. Runs of live processes are left alone.
    fn end_orphaned_runs(&self) -> Result<()> {
        let db = self.db();
        let running: Vec<(String, String)> = db
            .prepare("SELECT r.run_uuid, t.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = ?1 WHERE r.status = 'RUNNING'")?
            .query_map([PID_TAG], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        for (run, pid) in running {
            if pid.parse::<u32>().is_ok_and(|pid| !process_alive(pid)) {
                db.execute("UPDATE runs SET status = 'KILLED', end_time = ?1 WHERE run_uuid = ?2", params![now_ms(), run])?;
                tracing::info!(run = %run, pid = %pid, "a run whose process is gone is marked KILLED");
            }
        }
        Ok(())
    }

    pub(crate) fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The id of the experiment `name`, created when missing.
    pub fn experiment(&self, name: &str) -> Result<i64> {
        let db = self.db();
        if let Some(id) = db.query_row("SELECT experiment_id FROM experiments WHERE name = ?1", [name], |r| r.get(0)).optional()? {
            return Ok(id);
        }
        db.execute(
            "INSERT INTO experiments (name, artifact_location, creation_time) VALUES (?1, '', ?2)",
            params![name, now_ms()],
        )?;
        let id = db.last_insert_rowid();
        let loc = self.root.join("artifacts").join(id.to_string());
        db.execute("UPDATE experiments SET artifact_location = ?1 WHERE experiment_id = ?2", params![loc.display().to_string(), id])?;
        Ok(id)
    }

    /// Starts a run in `experiment`; returns its id (32 hex digits, as MLflow's).
    pub fn start_run(&self, experiment: i64, name: &str) -> Result<String> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let artifacts = self.root.join("artifacts").join(experiment.to_string()).join(&id).join("artifacts");
        std::fs::create_dir_all(&artifacts).map_err(creating(&artifacts))?;
        self.db().execute(
            "INSERT INTO runs (run_uuid, experiment_id, name, status, start_time, artifact_uri) VALUES (?1, ?2, ?3, 'RUNNING', ?4, ?5)",
            params![id, experiment, name, now_ms(), artifacts.display().to_string()],
        )?;
        self.set_tag(&id, PID_TAG, &std::process::id().to_string())?;
        for (k, v) in standard_tags() {
            self.set_tag(&id, k, &v)?;
        }
        Ok(id)
    }

    /// Marks a run as running again (a resumed training run).
    pub fn reopen_run(&self, run: &str) -> Result<()> {
        self.db().execute("UPDATE runs SET status = 'RUNNING', end_time = NULL WHERE run_uuid = ?1", [run])?;
        self.set_tag(run, PID_TAG, &std::process::id().to_string())
    }

    /// Ends a run with `status`.
    pub fn end_run(&self, run: &str, status: RunStatus) -> Result<()> {
        self.db().execute("UPDATE runs SET status = ?1, end_time = ?2 WHERE run_uuid = ?3", params![status.as_str(), now_ms(), run])?;
        Ok(())
    }

    /// Sets a param; params are immutable, so setting one again to another value fails.
    pub fn log_param(&self, run: &str, key: &str, value: &str) -> Result<()> {
        let db = self.db();
        let old: Option<String> =
            db.query_row("SELECT value FROM params WHERE run_uuid = ?1 AND key = ?2", params![run, key], |r| r.get(0)).optional()?;
        match old {
            Some(v) if v == value => Ok(()),
            Some(old) => Err(TrackingError::ParamChanged { run: run.to_string(), key: key.to_string(), old }),
            None => {
                db.execute("INSERT INTO params (run_uuid, key, value) VALUES (?1, ?2, ?3)", params![run, key, value])?;
                Ok(())
            }
        }
    }

    pub fn log_metric(&self, run: &str, key: &str, value: f64, step: i64) -> Result<()> {
        self.db().execute(
            "INSERT INTO metrics (run_uuid, key, value, timestamp, step) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![run, key, value, now_ms(), step],
        )?;
        Ok(())
    }

    pub fn set_tag(&self, run: &str, key: &str, value: &str) -> Result<()> {
        self.db().execute("INSERT OR REPLACE INTO tags (run_uuid, key, value) VALUES (?1, ?2, ?3)", params![run, key, value])?;
        Ok(())
    }

    /// Copies a file into the run's artifacts (under `subdir` when given).
    pub fn log_artifact(&self, run: &str, file: &Path, subdir: Option<&str>) -> Result<PathBuf> {
        let info = self.run(run)?.ok_or_else(|| TrackingError::NoRun(run.to_string()))?;
        let mut dest = PathBuf::from(info.artifact_uri);
        if let Some(s) = subdir {
            dest = dest.join(s);
        }
        std::fs::create_dir_all(&dest).map_err(creating(&dest))?;
        let dest = dest.join(file.file_name().ok_or_else(|| TrackingError::NoFileName(file.to_path_buf()))?);
        std::fs::copy(file, &dest).map_err(|source| TrackingError::Artifact { path: file.to_path_buf(), source })?;
        self.touch(run)?;
        Ok(dest)
    }

    /// Copies an image into the run as MLflow's `log_image(key=, step=)` names it,
    /// `images/KEY+step+STEP+timestamp+MS+UUID.png`, and sets the tag
    /// `mlflow.loggedImages=True`, so MLflow's UI shows it in the run's image gallery
    /// with a step slider (naming checked against MLflow 3.x; see
    /// `shared/notes/mlflow-dvc.md`). `key` may not hold `+` or `/` (they are replaced).
    pub fn log_image(&self, run: &str, file: &Path, key: &str, step: i64) -> Result<PathBuf> {
        let info = self.run(run)?.ok_or_else(|| TrackingError::NoRun(run.to_string()))?;
        let dir = PathBuf::from(info.artifact_uri).join("images");
        std::fs::create_dir_all(&dir).map_err(creating(&dir))?;
        let key: String = key.chars().map(|c| if matches!(c, '+' | '/' | '\\') { '_' } else { c }).collect();
        let name = format!("{key}+step+{step}+timestamp+{}+{}.png", now_ms(), uuid::Uuid::new_v4().simple());
        let dest = dir.join(name);
        std::fs::copy(file, &dest).map_err(|source| TrackingError::Artifact { path: file.to_path_buf(), source })?;
        self.set_tag(run, "mlflow.loggedImages", "True")?;
        self.touch(run)?;
        Ok(dest)
    }

    /// Raises the run's change counter (see `run_versions`).
    fn touch(&self, run: &str) -> Result<()> {
        self.db().execute(
            "INSERT INTO run_versions (run_uuid, version) VALUES (?1, 1) ON CONFLICT (run_uuid) DO UPDATE SET version = version + 1",
            [run],
        )?;
        Ok(())
    }

    /// The run's change counter: it grows with every param, metric, tag, artifact and
    /// status change.
    pub fn version(&self, run: &str) -> Result<i64> {
        Ok(self.db().query_row("SELECT version FROM run_versions WHERE run_uuid = ?1", [run], |r| r.get(0)).optional()?.unwrap_or(0))
    }

    pub fn run(&self, run: &str) -> Result<Option<RunInfo>> {
        Ok(self
            .db()
            .query_row(
                "SELECT run_uuid, experiment_id, name, status, start_time, end_time, artifact_uri FROM runs WHERE run_uuid = ?1",
                [run],
                row_to_run,
            )
            .optional()?)
    }

    /// Runs of an experiment, newest first.
    pub fn runs(&self, experiment: i64) -> Result<Vec<RunInfo>> {
        let db = self.db();
        let mut st = db.prepare(
            "SELECT run_uuid, experiment_id, name, status, start_time, end_time, artifact_uri FROM runs \
             WHERE experiment_id = ?1 AND lifecycle_stage = 'active' ORDER BY start_time DESC, rowid DESC",
        )?;
        let rows = st.query_map([experiment], row_to_run)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    pub fn params(&self, run: &str) -> Result<Vec<(String, String)>> {
        let db = self.db();
        let mut st = db.prepare("SELECT key, value FROM params WHERE run_uuid = ?1 ORDER BY key")?;
        let rows = st.query_map([run], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    pub fn tags(&self, run: &str) -> Result<Vec<(String, String)>> {
        let db = self.db();
        let mut st = db.prepare("SELECT key, value FROM tags WHERE run_uuid = ?1 ORDER BY key")?;
        let rows = st.query_map([run], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Every value of metric `key`, by step then time.
    pub fn metric_history(&self, run: &str, key: &str) -> Result<Vec<MetricPoint>> {
        let db = self.db();
        let mut st = db.prepare("SELECT value, timestamp, step FROM metrics WHERE run_uuid = ?1 AND key = ?2 ORDER BY step, timestamp, rowid")?;
        let rows = st
            .query_map(params![run, key], |r| Ok(MetricPoint { value: r.get(0)?, timestamp: r.get(1)?, step: r.get(2)? }))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }
}

impl Tracker {
    /// Every experiment, by name.
    pub fn experiments(&self) -> Result<Vec<ExperimentInfo>> {
        let db = self.db();
        let mut st = db.prepare(
            "SELECT e.experiment_id, e.name, COUNT(r.run_uuid), MAX(r.start_time) FROM experiments e \
             LEFT JOIN runs r ON r.experiment_id = e.experiment_id AND r.lifecycle_stage = 'active' \
             WHERE e.lifecycle_stage = 'active' GROUP BY e.experiment_id ORDER BY e.name",
        )?;
        let rows = st
            .query_map([], |r| {
                Ok(ExperimentInfo { experiment_id: r.get(0)?, name: r.get(1)?, runs: r.get::<_, i64>(2)? as usize, last_run_start: r.get(3)? })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// The experiment named `name_or_id` (its name, or its numeric id), without creating it.
    pub fn find_experiment(&self, name_or_id: &str) -> Result<Option<i64>> {
        let db = self.db();
        let by_name = db.query_row("SELECT experiment_id FROM experiments WHERE name = ?1", [name_or_id], |r| r.get(0)).optional()?;
        if by_name.is_some() {
            return Ok(by_name);
        }
        let Ok(id) = name_or_id.parse::<i64>() else { return Ok(None) };
        Ok(db.query_row("SELECT experiment_id FROM experiments WHERE experiment_id = ?1", [id], |r| r.get(0)).optional()?)
    }

    /// The runs of `experiment` that `filter` keeps, newest first, with their params, tags
    /// and latest metrics.
    pub fn search(&self, experiment: i64, filter: &search::Filter) -> Result<Vec<RunSummary>> {
        let runs = self.runs(experiment)?;
        let mut by_id: BTreeMap<String, RunSummary> = runs
            .iter()
            .map(|info| (info.run_id.clone(), RunSummary { info: info.clone(), params: BTreeMap::new(), tags: BTreeMap::new(), metrics: BTreeMap::new() }))
            .collect();
        {
            let db = self.db();
            let join = "JOIN runs r ON r.run_uuid = x.run_uuid WHERE r.experiment_id = ?1";
            let mut st = db.prepare(&format!("SELECT x.run_uuid, x.key, x.value FROM params x {join}"))?;
            for row in st.query_map([experiment], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))? {
                let (run, k, v) = row?;
                if let Some(s) = by_id.get_mut(&run) {
                    s.params.insert(k, v);
                }
            }
            let mut st = db.prepare(&format!("SELECT x.run_uuid, x.key, x.value FROM tags x {join}"))?;
            for row in st.query_map([experiment], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))? {
                let (run, k, v) = row?;
                if let Some(s) = by_id.get_mut(&run) {
                    s.tags.insert(k, v);
                }
            }
        }
        // One row per (run, metric), not every point (queries.rs).
        for (run, metrics) in self.latest_metrics(experiment)? {
            if let Some(s) = by_id.get_mut(&run) {
                s.metrics = metrics;
            }
        }
        Ok(runs.iter().filter_map(|info| by_id.remove(&info.run_id)).filter(|s| filter.matches(&search::facts(s))).collect())
    }

    /// One run with its params, tags and latest metrics.
    pub fn summary(&self, run: &str) -> Result<Option<RunSummary>> {
        let Some(info) = self.run(run)? else { return Ok(None) };
        let found = self.search(info.experiment_id, &search::Filter::default())?;
        Ok(found.into_iter().find(|s| s.info.run_id == run))
    }

    /// The files under a run's artifacts, as paths relative to it, sorted.
    pub fn artifacts(&self, run: &str) -> Result<Vec<String>> {
        let info = self.run(run)?.ok_or_else(|| TrackingError::NoRun(run.to_string()))?;
        let root = PathBuf::from(&info.artifact_uri);
        let mut out = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(rel) = p.strip_prefix(&root) {
                    out.push(rel.to_string_lossy().replace('\\', "/"));
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

fn row_to_run(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunInfo> {
    Ok(RunInfo {
        run_id: r.get(0)?,
        experiment_id: r.get(1)?,
        name: r.get(2)?,
        status: r.get(3)?,
        start_time: r.get(4)?,
        end_time: r.get(5)?,
        artifact_uri: r.get(6)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_params_metrics_tags_artifacts_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let run;
        {
            let t = Tracker::open(dir.path()).unwrap();
            let exp = t.experiment("styles").unwrap();
            assert_eq!(t.experiment("styles").unwrap(), exp, "get-or-create");
            run = t.start_run(exp, "ink").unwrap();
            t.log_param(&run, "rank", "8").unwrap();
            t.log_param(&run, "rank", "8").unwrap();
            let changed = t.log_param(&run, "rank", "4").unwrap_err();
            assert!(matches!(changed, TrackingError::ParamChanged { ref old, .. } if old == "8"), "{changed:?}");
            assert!(changed.to_string().contains("cannot change"));
            for (step, v) in [(1, 0.5), (2, 0.25), (3, 0.125)] {
                t.log_metric(&run, "loss", v, step).unwrap();
            }
            t.set_tag(&run, "dataset_hash", "abc").unwrap();
            t.set_tag(&run, "dataset_hash", "def").unwrap();
            let f = dir.path().join("samples.png");
            std::fs::write(&f, b"png").unwrap();
            let stored = t.log_artifact(&run, &f, Some("samples")).unwrap();
            assert_eq!(std::fs::read(stored).unwrap(), b"png");
            t.end_run(&run, RunStatus::Finished).unwrap();
        }
        let t = Tracker::open(dir.path()).unwrap();
        let exp = t.experiment("styles").unwrap();
        let runs = t.runs(exp).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].run_id.as_str(), runs[0].status.as_str()), (run.as_str(), "FINISHED"));
        assert!(runs[0].end_time.unwrap() >= runs[0].start_time);
        assert_eq!(t.params(&run).unwrap(), vec![("rank".to_string(), "8".to_string())]);
        let tags: BTreeMap<String, String> = t.tags(&run).unwrap().into_iter().collect();
        assert_eq!(tags["dataset_hash"], "def", "the latest value");
        assert_eq!(tags[PID_TAG], std::process::id().to_string(), "with the process that ran it");
        assert_eq!(tags["atelier.version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(tags.get("atelier.commit").map(String::as_str), Some(env!("ATELIER_COMMIT")).filter(|c| !c.is_empty()));
        let h: Vec<(i64, f64)> = t.metric_history(&run, "loss").unwrap().iter().map(|p| (p.step, p.value)).collect();
        assert_eq!(h, vec![(1, 0.5), (2, 0.25), (3, 0.125)]);
    }

    #[test]
    fn runs_of_dead_processes_are_killed_on_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let (orphan, live) = {
            let t = Tracker::open(dir.path()).unwrap();
            let exp = t.experiment("styles").unwrap();
            let orphan = t.start_run(exp, "killed").unwrap();
            let live = t.start_run(exp, "ours").unwrap();
            // A process that has exited: its run is an orphan.
            let mut child = std::process::Command::new("true").spawn().unwrap();
            let dead = child.id();
            child.wait().unwrap();
            t.set_tag(&orphan, PID_TAG, &dead.to_string()).unwrap();
            (orphan, live)
        };
        let t = Tracker::open(dir.path()).unwrap();
        let killed = t.run(&orphan).unwrap().unwrap();
        assert_eq!(killed.status, "KILLED");
        assert!(killed.end_time.is_some());
        assert_eq!(t.run(&live).unwrap().unwrap().status, "RUNNING", "this process is alive");
        t.reopen_run(&orphan).unwrap();
        assert_eq!(t.run(&orphan).unwrap().unwrap().status, "RUNNING", "a resumed run is this process's again");
        assert!(t.tags(&orphan).unwrap().contains(&(PID_TAG.to_string(), std::process::id().to_string())));
    }
}
