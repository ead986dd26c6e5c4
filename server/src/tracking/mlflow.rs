//! Mirroring the embedded store to an MLflow tracking server, through MLflow's REST API
//! 2.0 (the endpoints its Python client uses; facts checked against MLflow 3.x and noted
//! in `shared/notes/mlflow-dvc.md`).
//!
//! The embedded store stays the source of truth. For each server (its URI) the store
//! keeps, per local run, the server's run id and how far the run has been sent (table
//! `mlflow_runs`): the params and tags sent, the last metric row sent, the artifacts
//! uploaded, the status sent, and the run's change counter at the last complete sync.
//! So a sync sends only what is new, a crash between two calls resends at most one
//! batch (MLflow keeps one copy of an identical metric point), and a run never gets a
//! second copy on the server: before creating one, the sync looks for a server run
//! tagged `atelier.run_id` = the local id.
//!
//! - Params, tags and metrics go in `runs/log-batch` calls of at most 1000 entries, of
//!   which at most 100 params and tags (MLflow's limits), metrics with their original
//!   timestamps and steps.
//! - Artifacts go through the server's artifact proxy (`mlflow server
//!   --artifacts-destination …`): `PUT /api/2.0/mlflow-artifacts/artifacts/<path>`.
//! - `mlflow.parentRunId` is rewritten to the parent's server run id (the parent is
//!   synced first).
//! - A server that cannot be reached, or answers 429 or 5xx, is a *transient* failure:
//!   the call is retried with back-off, and the run stays pending. Any other refusal
//!   (e.g. a param whose value changed on the server) is recorded with the server's
//!   message against that version of the run and not retried until the run changes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, OptionalExtension};
use serde::Serialize;
use serde_json::{json, Value};

use super::{Tracker, TrackingError};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS mlflow_runs (
    server               TEXT NOT NULL,
    run_uuid             TEXT NOT NULL,
    remote_run_id        TEXT NOT NULL,
    remote_experiment_id TEXT NOT NULL,
    artifact_uri         TEXT NOT NULL,
    metrics_rowid        INTEGER NOT NULL DEFAULT 0,
    params               TEXT NOT NULL DEFAULT '[]',
    tags                 TEXT NOT NULL DEFAULT '{}',
    artifacts            TEXT NOT NULL DEFAULT '{}',
    status               TEXT NOT NULL DEFAULT 'RUNNING',
    synced_version       INTEGER NOT NULL DEFAULT 0,
    refused_version      INTEGER,
    error                TEXT,
    PRIMARY KEY (server, run_uuid)
);
-- Registry versions and aliases as the server has them.
CREATE TABLE IF NOT EXISTS mlflow_model_versions (
    server         TEXT NOT NULL,
    name           TEXT NOT NULL,
    version        INTEGER NOT NULL,
    remote_version TEXT NOT NULL,
    PRIMARY KEY (server, name, version)
);
CREATE TABLE IF NOT EXISTS mlflow_aliases (
    server  TEXT NOT NULL,
    name    TEXT NOT NULL,
    alias   TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (server, name, alias)
);
-- Refusals of runs that never reached the server (no remote run yet).
CREATE TABLE IF NOT EXISTS mlflow_refusals (
    server          TEXT NOT NULL,
    run_uuid        TEXT NOT NULL,
    refused_version INTEGER NOT NULL,
    error           TEXT NOT NULL,
    PRIMARY KEY (server, run_uuid)
);
";

/// Largest `runs/log-batch` call MLflow accepts: 1000 metrics, params and tags together, of
/// which at most 100 params and tags.
pub const MAX_BATCH_METRICS: usize = 1000;
pub const MAX_BATCH_PARAMS_TAGS: usize = 100;

/// The local run id, as a tag on the server's copy (finds it again after a crash).
pub const LOCAL_RUN_TAG: &str = "atelier.run_id";

/// Where runs are mirrored: an MLflow server's base URI (`http://host:5000`), with the
/// credentials MLflow's own clients read from the environment.
#[derive(Clone)]
pub struct ServerConfig {
    /// Without a trailing slash.
    pub uri: String,
    auth: Option<String>,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig").field("uri", &self.uri).field("auth", &self.auth.as_ref().map(|_| "…")).finish()
    }
}

impl ServerConfig {
    /// A server at `uri` (http or https), with credentials from the environment as
    /// MLflow's clients read them: `MLFLOW_TRACKING_TOKEN` (a bearer token), else
    /// `MLFLOW_TRACKING_USERNAME` and `MLFLOW_TRACKING_PASSWORD` (basic auth).
    ///
    /// # Errors
    /// Any other scheme (`file:`, `databricks`, a bare path), with what to write instead.
    pub fn new(uri: &str) -> Result<Self, String> {
        Self::from_env(uri, |k| std::env::var(k).ok())
    }

    /// [`ServerConfig::new`] with the environment read through `var`.
    fn from_env(uri: &str, var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let env = |k: &str| var(k).filter(|v| !v.is_empty());
        let auth = if let Some(token) = env("MLFLOW_TRACKING_TOKEN") {
            Some(format!("Bearer {token}"))
        } else if let Some(user) = env("MLFLOW_TRACKING_USERNAME") {
            use base64::Engine;
            let pass = env("MLFLOW_TRACKING_PASSWORD").unwrap_or_default();
            Some(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))))
        } else {
            None
        };
        Self::with_auth(uri, auth)
    }

    fn with_auth(uri: &str, auth: Option<String>) -> Result<Self, String> {
        let uri = uri.trim().trim_end_matches('/');
        if !(uri.starts_with("http://") || uri.starts_with("https://")) || uri.len() <= "https://".len() {
            return Err(format!(
                "tracking URI {uri:?} is not an MLflow server: write it as http://HOST:PORT (the runs are always kept in the studio's own store too)"
            ));
        }
        Ok(Self { uri: uri.to_string(), auth })
    }
}

/// Why a sync did not complete.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// No answer (connection refused, timeout, DNS): try again later.
    #[error("cannot reach the MLflow server at {uri}: {message}")]
    Unreachable { uri: String, message: String },
    /// 429 or 5xx: the server is overloaded or failing; try again later.
    #[error("the MLflow server failed on {endpoint} (HTTP {status}): {message}")]
    ServerFailed { endpoint: String, status: u16, message: String },
    /// Any other non-success answer: the server will not take this as it is.
    #[error("the MLflow server refused {endpoint} (HTTP {status} {code}): {message}")]
    Refused { endpoint: String, status: u16, code: String, message: String },
    /// The server's artifacts are not behind its proxy, so they cannot be uploaded.
    #[error("the MLflow server keeps artifacts at {0}, which it does not proxy: start it with `mlflow server --artifacts-destination DIR_OR_S3_URI` (artifacts are served through it then)")]
    NoArtifactProxy(String),
    #[error("reading artifact {path}")]
    Artifact {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] TrackingError),
}

impl From<rusqlite::Error> for SyncError {
    fn from(e: rusqlite::Error) -> Self {
        SyncError::Store(e.into())
    }
}

impl SyncError {
    /// Whether trying again later may succeed (the server is down or overloaded).
    pub fn is_transient(&self) -> bool {
        matches!(self, SyncError::Unreachable { .. } | SyncError::ServerFailed { .. })
    }
}

/// A blocking client of one MLflow server's REST API.
pub struct Client {
    config: ServerConfig,
    agent: ureq::Agent,
    /// Waits between tries of a call that failed transiently (the first try is immediate).
    backoff: Vec<Duration>,
}

impl Client {
    pub fn new(config: ServerConfig) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        Self { config, agent, backoff: vec![Duration::from_millis(250), Duration::from_secs(1), Duration::from_secs(3)] }
    }

    /// Tries each call once only (tests, and `runs sync --no-retry`).
    pub fn without_retries(mut self) -> Self {
        self.backoff.clear();
        self
    }

    pub fn uri(&self) -> &str {
        &self.config.uri
    }

    /// `POST /api/2.0/mlflow/ENDPOINT` with a JSON body (or `GET` with `query`).
    fn call(&self, endpoint: &str, body: Option<&Value>, query: &[(&str, &str)]) -> Result<Value, SyncError> {
        let url = format!("{}/api/2.0/mlflow/{endpoint}", self.config.uri);
        self.retrying(endpoint, || {
            let result = match body {
                Some(body) => self.with_auth(self.agent.post(&url)).send_json(body),
                None => {
                    let mut req = self.with_auth(self.agent.get(&url));
                    for (k, v) in query {
                        req = req.query(*k, *v);
                    }
                    req.call()
                }
            };
            self.answer(endpoint, result)
        })
    }

    fn with_auth<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.config.auth {
            Some(a) => req.header("Authorization", a),
            None => req,
        }
    }

    fn answer(&self, endpoint: &str, result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Value, SyncError> {
        let mut resp = result.map_err(|e| SyncError::Unreachable { uri: self.config.uri.clone(), message: e.to_string() })?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
            .map_err(|e| SyncError::Unreachable { uri: self.config.uri.clone(), message: e.to_string() })?;
        if (200..300).contains(&status) {
            return Ok(if text.trim().is_empty() { json!({}) } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) });
        }
        let parsed: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let code = parsed.get("error_code").and_then(Value::as_str).unwrap_or("").to_string();
        let message = parsed.get("message").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| text.chars().take(300).collect());
        if status == 429 || status >= 500 {
            Err(SyncError::ServerFailed { endpoint: endpoint.to_string(), status, message })
        } else {
            Err(SyncError::Refused { endpoint: endpoint.to_string(), status, code, message })
        }
    }

    fn retrying<T>(&self, what: &str, mut attempt: impl FnMut() -> Result<T, SyncError>) -> Result<T, SyncError> {
        let mut waits = self.backoff.iter();
        loop {
            match attempt() {
                Err(e) if e.is_transient() => match waits.next() {
                    Some(wait) => {
                        tracing::debug!(call = what, error = %e, ?wait, "MLflow call failed; retrying");
                        std::thread::sleep(*wait);
                    }
                    None => return Err(e),
                },
                other => return other,
            }
        }
    }

    /// The server experiment named `name`, created when missing.
    pub fn experiment_id(&self, name: &str) -> Result<String, SyncError> {
        match self.call("experiments/get-by-name", None, &[("experiment_name", name)]) {
            Ok(v) => Ok(str_at(&v, &["experiment", "experiment_id"])),
            Err(SyncError::Refused { code, .. }) if code == "RESOURCE_DOES_NOT_EXIST" => {
                match self.call("experiments/create", Some(&json!({ "name": name })), &[]) {
                    Ok(v) => Ok(str_at(&v, &["experiment_id"])),
                    // Created by someone else in between.
                    Err(SyncError::Refused { code, .. }) if code == "RESOURCE_ALREADY_EXISTS" => {
                        let v = self.call("experiments/get-by-name", None, &[("experiment_name", name)])?;
                        Ok(str_at(&v, &["experiment", "experiment_id"]))
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// `runs/search` in `experiment` with an MLflow filter; the runs' JSON.
    pub fn search_runs(&self, experiment: &str, filter: &str) -> Result<Vec<Value>, SyncError> {
        let v = self.call("runs/search", Some(&json!({ "experiment_ids": [experiment], "filter": filter, "max_results": 10 })), &[])?;
        Ok(v.get("runs").and_then(Value::as_array).cloned().unwrap_or_default())
    }

    /// `DELETE /api/2.0/mlflow/ENDPOINT` with a JSON body (MLflow's server reads DELETE
    /// parameters from the body); a target already gone counts as deleted.
    fn delete(&self, endpoint: &str, body: &Value) -> Result<(), SyncError> {
        let url = format!("{}/api/2.0/mlflow/{endpoint}", self.config.uri);
        let result = self.retrying(endpoint, || self.answer(endpoint, self.with_auth(self.agent.delete(&url)).force_send_body().send_json(body)));
        match result {
            Err(SyncError::Refused { code, .. }) if code == "RESOURCE_DOES_NOT_EXIST" => Ok(()),
            other => other.map(drop),
        }
    }

    fn log_batch(&self, run: &str, metrics: &[Value], params: &[Value], tags: &[Value]) -> Result<(), SyncError> {
        self.call("runs/log-batch", Some(&json!({ "run_id": run, "metrics": metrics, "params": params, "tags": tags })), &[]).map(drop)
    }

    /// Uploads `file` to `artifact_uri` (an `mlflow-artifacts:` URI) at `rel`, through the
    /// server's artifact proxy.
    fn upload(&self, artifact_uri: &str, rel: &str, file: &Path) -> Result<(), SyncError> {
        let base = proxy_path(artifact_uri).ok_or_else(|| SyncError::NoArtifactProxy(artifact_uri.to_string()))?;
        let bytes = std::fs::read(file).map_err(|source| SyncError::Artifact { path: file.to_path_buf(), source })?;
        let url = format!("{}/api/2.0/mlflow-artifacts/artifacts/{}/{}", self.config.uri, encode_path(&base), encode_path(rel));
        self.retrying("mlflow-artifacts", || {
            let result = self.with_auth(self.agent.put(&url)).header("Content-Type", "application/octet-stream").send(&bytes[..]);
            self.answer("mlflow-artifacts", result).map(drop)
        })
    }
}

/// The path under the artifact proxy of an `mlflow-artifacts:/1/RUN/artifacts` (or
/// `mlflow-artifacts://host:port/1/…`) URI.
fn proxy_path(uri: &str) -> Option<String> {
    let rest = uri.strip_prefix("mlflow-artifacts:")?;
    let rest = match rest.strip_prefix("//") {
        Some(with_host) => with_host.split_once('/').map_or("", |(_, p)| p),
        None => rest,
    };
    Some(rest.trim_matches('/').to_string())
}

/// Percent-encodes each segment of a `/`-separated path (RFC 3986 unreserved kept).
fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn str_at(v: &Value, path: &[&str]) -> String {
    let mut cur = v;
    for k in path {
        cur = &cur[*k];
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A metric value as MLflow's JSON reads it: non-finite values as the strings protobuf's
/// JSON mapping uses.
fn metric_value(v: f64) -> Value {
    if v.is_nan() {
        json!("NaN")
    } else if v.is_infinite() {
        json!(if v > 0.0 { "Infinity" } else { "-Infinity" })
    } else {
        json!(v)
    }
}

/// What one run's sync sent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSync {
    pub run_id: String,
    pub name: String,
    pub experiment: String,
    pub remote_run_id: String,
    /// Whether the server's run was created by this sync.
    pub created: bool,
    pub params: usize,
    pub tags: usize,
    pub metrics: usize,
    pub artifacts: usize,
    pub status: String,
}

/// The outcome of a sync of every pending run.
#[derive(Debug, Default, Serialize)]
pub struct SyncReport {
    pub synced: Vec<RunSync>,
    /// Runs the server refused: (run id, run name, the server's message).
    pub refused: Vec<(String, String, String)>,
    /// Set when the sync stopped early because the server is unreachable or failing.
    pub interrupted: Option<String>,
    /// Runs still waiting after this sync.
    pub pending: usize,
    /// Registry model versions and alias changes sent.
    pub versions: usize,
    pub aliases: usize,
}

/// The sync state of one run towards one server.
#[derive(Default)]
struct State {
    remote_run_id: String,
    remote_experiment_id: String,
    artifact_uri: String,
    metrics_rowid: i64,
    params: Vec<String>,
    tags: BTreeMap<String, String>,
    /// Relative path → "size:mtime" when uploaded.
    artifacts: BTreeMap<String, String>,
    status: String,
}

/// Sync of a store to a server.
pub struct Mirror<'a> {
    tracker: &'a Tracker,
    client: &'a Client,
    experiments: HashMap<i64, String>,
}

impl Tracker {
    /// Runs with something not yet on `server` (and not refused as they are now), oldest
    /// first.
    pub fn pending_runs(&self, server: &str) -> Result<Vec<String>, TrackingError> {
        let db = self.db();
        let mut st = db.prepare(
            "SELECT r.run_uuid FROM runs r \
             LEFT JOIN run_versions v ON v.run_uuid = r.run_uuid \
             LEFT JOIN mlflow_runs m ON m.server = ?1 AND m.run_uuid = r.run_uuid \
             LEFT JOIN mlflow_refusals x ON x.server = ?1 AND x.run_uuid = r.run_uuid \
             WHERE r.lifecycle_stage = 'active' \
               AND (m.run_uuid IS NULL OR m.synced_version < COALESCE(v.version, 0)) \
               AND COALESCE(m.refused_version, x.refused_version, -1) < COALESCE(v.version, 0) \
             ORDER BY r.start_time, r.rowid",
        )?;
        let rows = st.query_map([server], |r| r.get(0))?.collect::<rusqlite::Result<Vec<String>>>()?;
        Ok(rows)
    }

    /// Forgets what was sent to `server`, so the next sync sends every run again (after
    /// the server's database was reset). Runs still on the server are found by their
    /// `atelier.run_id` tag and updated, not duplicated.
    pub fn forget_sync(&self, server: &str) -> Result<(), TrackingError> {
        let db = self.db();
        db.execute("DELETE FROM mlflow_runs WHERE server = ?1", [server])?;
        db.execute("DELETE FROM mlflow_refusals WHERE server = ?1", [server])?;
        db.execute("DELETE FROM mlflow_model_versions WHERE server = ?1", [server])?;
        db.execute("DELETE FROM mlflow_aliases WHERE server = ?1", [server])?;
        Ok(())
    }

    /// Runs refused by `server` as they are now, with the server's message.
    pub fn refused_runs(&self, server: &str) -> Result<Vec<(String, String)>, TrackingError> {
        let db = self.db();
        let mut st = db.prepare(
            "SELECT run_uuid, error FROM mlflow_runs WHERE server = ?1 AND error IS NOT NULL \
             UNION ALL SELECT run_uuid, error FROM mlflow_refusals WHERE server = ?1",
        )?;
        let rows = st.query_map([server], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// The server's run id of local `run` on `server`, once synced.
    pub fn remote_run_id(&self, server: &str, run: &str) -> Result<Option<String>, TrackingError> {
        Ok(self
            .db()
            .query_row("SELECT remote_run_id FROM mlflow_runs WHERE server = ?1 AND run_uuid = ?2", [server, run], |r| r.get(0))
            .optional()?)
    }

    fn load_state(&self, server: &str, run: &str) -> Result<Option<State>, TrackingError> {
        let db = self.db();
        let row = db
            .query_row(
                "SELECT remote_run_id, remote_experiment_id, artifact_uri, metrics_rowid, params, tags, artifacts, status \
                 FROM mlflow_runs WHERE server = ?1 AND run_uuid = ?2",
                [server, run],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, String>(5)?,
                        r.get::<_, String>(6)?,
                        r.get::<_, String>(7)?,
                    ))
                },
            )
            .optional()?;
        Ok(row.map(|(remote_run_id, remote_experiment_id, artifact_uri, metrics_rowid, p, t, a, status)| State {
            remote_run_id,
            remote_experiment_id,
            artifact_uri,
            metrics_rowid,
            params: serde_json::from_str(&p).unwrap_or_default(),
            tags: serde_json::from_str(&t).unwrap_or_default(),
            artifacts: serde_json::from_str(&a).unwrap_or_default(),
            status,
        }))
    }

    fn save_state(&self, server: &str, run: &str, s: &State) -> Result<(), TrackingError> {
        self.db().execute(
            "INSERT INTO mlflow_runs (server, run_uuid, remote_run_id, remote_experiment_id, artifact_uri, metrics_rowid, params, tags, artifacts, status) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
             ON CONFLICT (server, run_uuid) DO UPDATE SET remote_run_id = ?3, remote_experiment_id = ?4, artifact_uri = ?5, \
             metrics_rowid = ?6, params = ?7, tags = ?8, artifacts = ?9, status = ?10",
            params![
                server,
                run,
                s.remote_run_id,
                s.remote_experiment_id,
                s.artifact_uri,
                s.metrics_rowid,
                json(&s.params),
                json(&s.tags),
                json(&s.artifacts),
                s.status
            ],
        )?;
        Ok(())
    }

    fn mark_synced(&self, server: &str, run: &str, version: i64) -> Result<(), TrackingError> {
        let db = self.db();
        db.execute("UPDATE mlflow_runs SET synced_version = ?3, refused_version = NULL, error = NULL WHERE server = ?1 AND run_uuid = ?2", params![server, run, version])?;
        db.execute("DELETE FROM mlflow_refusals WHERE server = ?1 AND run_uuid = ?2", [server, run])?;
        Ok(())
    }

    fn mark_refused(&self, server: &str, run: &str, version: i64, error: &str) -> Result<(), TrackingError> {
        let db = self.db();
        let n = db.execute("UPDATE mlflow_runs SET refused_version = ?3, error = ?4 WHERE server = ?1 AND run_uuid = ?2", params![server, run, version, error])?;
        if n == 0 {
            db.execute(
                "INSERT OR REPLACE INTO mlflow_refusals (server, run_uuid, refused_version, error) VALUES (?1, ?2, ?3, ?4)",
                params![server, run, version, error],
            )?;
        }
        Ok(())
    }

    fn remote_versions(&self, server: &str, name: &str) -> Result<HashMap<i64, String>, TrackingError> {
        let db = self.db();
        let mut st = db.prepare("SELECT version, remote_version FROM mlflow_model_versions WHERE server = ?1 AND name = ?2")?;
        let rows = st.query_map([server, name], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    fn save_remote_version(&self, server: &str, name: &str, version: i64, remote: &str) -> Result<(), TrackingError> {
        self.db().execute(
            "INSERT OR REPLACE INTO mlflow_model_versions (server, name, version, remote_version) VALUES (?1, ?2, ?3, ?4)",
            params![server, name, version, remote],
        )?;
        Ok(())
    }

    fn remote_aliases(&self, server: &str, name: &str) -> Result<BTreeMap<String, i64>, TrackingError> {
        let db = self.db();
        let mut st = db.prepare("SELECT alias, version FROM mlflow_aliases WHERE server = ?1 AND name = ?2")?;
        let rows = st.query_map([server, name], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    fn save_remote_alias(&self, server: &str, name: &str, alias: &str, version: Option<i64>) -> Result<(), TrackingError> {
        let db = self.db();
        match version {
            Some(v) => db.execute(
                "INSERT OR REPLACE INTO mlflow_aliases (server, name, alias, version) VALUES (?1, ?2, ?3, ?4)",
                params![server, name, alias, v],
            )?,
            None => db.execute("DELETE FROM mlflow_aliases WHERE server = ?1 AND name = ?2 AND alias = ?3", params![server, name, alias])?,
        };
        Ok(())
    }

    fn experiment_name(&self, id: i64) -> Result<String, TrackingError> {
        Ok(self.db().query_row("SELECT name FROM experiments WHERE experiment_id = ?1", [id], |r| r.get(0))?)
    }

    /// Metric rows of `run` after row `after`, in the order they were logged, at most `limit`.
    fn metric_rows(&self, run: &str, after: i64, limit: usize) -> Result<Vec<(i64, String, f64, i64, i64)>, TrackingError> {
        let db = self.db();
        let mut st = db.prepare("SELECT rowid, key, value, timestamp, step FROM metrics WHERE run_uuid = ?1 AND rowid > ?2 ORDER BY rowid LIMIT ?3")?;
        let rows = st
            .query_map(params![run, after, limit as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }
}

/// JSON text of one of the state's collections.
fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

impl<'a> Mirror<'a> {
    pub fn new(tracker: &'a Tracker, client: &'a Client) -> Self {
        Self { tracker, client, experiments: HashMap::new() }
    }

    fn server(&self) -> &str {
        self.client.uri()
    }

    /// Sends every pending run, oldest first. Stops at the first transient failure (the
    /// rest stays pending, in order); a refusal is recorded and the next run goes on.
    ///
    /// # Errors
    /// Only the local store's failures; the server's are in the report.
    pub fn sync_pending(&mut self, progress: &mut dyn FnMut(&RunSync)) -> Result<SyncReport, TrackingError> {
        let mut report = SyncReport::default();
        for run in self.tracker.pending_runs(self.server())? {
            match self.sync_run(&run) {
                Ok(done) => {
                    progress(&done);
                    report.synced.push(done);
                }
                Err(e) if e.is_transient() => {
                    report.interrupted = Some(e.to_string());
                    break;
                }
                Err(SyncError::Store(e)) => return Err(e),
                Err(e) => {
                    let name = self.tracker.run(&run)?.map(|r| r.name).unwrap_or_default();
                    let message = crate::error::report(&e);
                    tracing::warn!(run = %run, error = %message, "the MLflow server refused a run; it is not retried until it changes");
                    self.tracker.mark_refused(self.server(), &run, self.tracker.version(&run)?, &message)?;
                    report.refused.push((run, name, message));
                }
            }
        }
        if report.interrupted.is_none() {
            match self.sync_registry() {
                Ok((versions, aliases)) => (report.versions, report.aliases) = (versions, aliases),
                Err(e) if e.is_transient() => report.interrupted = Some(e.to_string()),
                Err(SyncError::Store(e)) => return Err(e),
                Err(e) => {
                    let message = crate::error::report(&e);
                    tracing::warn!(error = %message, "the MLflow server refused a registry change");
                    report.refused.push((String::new(), "model registry".into(), message));
                }
            }
        }
        report.pending = self.tracker.pending_runs(self.server())?.len();
        Ok(report)
    }

    /// Mirrors the model registry: registered models, versions whose run is on the server
    /// (`source` = that run's artifact URI, the version's tags, and `atelier.version`),
    /// and aliases (set, moved, removed). Returns (versions created, alias changes).
    pub fn sync_registry(&mut self) -> Result<(usize, usize), SyncError> {
        let server = self.server().to_string();
        let (mut versions, mut aliases) = (0, 0);
        for model in self.tracker.registered_models()? {
            let mut remote: HashMap<i64, String> = self.tracker.remote_versions(&server, &model.name)?;
            for v in model.versions.iter().rev() {
                if remote.contains_key(&v.version) {
                    continue;
                }
                // A version follows its run: once the run is on the server.
                let Some(run) = &v.run_id else { continue };
                let Some(state) = self.tracker.load_state(&server, run)? else { continue };
                match self.client.call("registered-models/create", Some(&json!({ "name": model.name })), &[]) {
                    Ok(_) => {}
                    Err(SyncError::Refused { code, .. }) if code == "RESOURCE_ALREADY_EXISTS" => {}
                    Err(e) => return Err(e),
                }
                // The same version created before a crash: found by run and tag.
                let filter = format!("name = '{}' and run_id = '{}'", model.name.replace('\'', "''"), state.remote_run_id);
                let found = self.client.call("model-versions/search", None, &[("filter", &filter)])?;
                let existing = found["model_versions"].as_array().into_iter().flatten().find(|mv| {
                    mv["tags"].as_array().into_iter().flatten().any(|t| t["key"] == "atelier.version" && t["value"] == v.version.to_string())
                });
                let number = match existing {
                    Some(mv) => str_at(mv, &["version"]),
                    None => {
                        let mut tags: Vec<Value> = v.tags.iter().map(|(k, val)| json!({ "key": k, "value": val })).collect();
                        tags.push(json!({ "key": "atelier.version", "value": v.version.to_string() }));
                        tags.push(json!({ "key": "atelier.kind", "value": v.kind }));
                        let created = self.client.call(
                            "model-versions/create",
                            Some(&json!({ "name": model.name, "source": state.artifact_uri, "run_id": state.remote_run_id, "tags": tags })),
                            &[],
                        )?;
                        versions += 1;
                        str_at(&created, &["model_version", "version"])
                    }
                };
                self.tracker.save_remote_version(&server, &model.name, v.version, &number)?;
                remote.insert(v.version, number);
            }
            // Aliases: set or moved where the server differs, removed where gone locally.
            let sent = self.tracker.remote_aliases(&server, &model.name)?;
            for (alias, version) in &model.aliases {
                let Some(number) = remote.get(version) else { continue };
                if sent.get(alias) == Some(version) {
                    continue;
                }
                self.client.call("registered-models/alias", Some(&json!({ "name": model.name, "alias": alias, "version": number })), &[])?;
                self.tracker.save_remote_alias(&server, &model.name, alias, Some(*version))?;
                aliases += 1;
            }
            for alias in sent.keys().filter(|a| !model.aliases.contains_key(*a)) {
                self.client.delete("registered-models/alias", &json!({ "name": model.name, "alias": alias }))?;
                self.tracker.save_remote_alias(&server, &model.name, alias, None)?;
                aliases += 1;
            }
        }
        Ok((versions, aliases))
    }

    fn remote_experiment(&mut self, local: i64) -> Result<String, SyncError> {
        if let Some(id) = self.experiments.get(&local) {
            return Ok(id.clone());
        }
        let name = self.tracker.experiment_name(local)?;
        let id = self.client.experiment_id(&name)?;
        self.experiments.insert(local, id.clone());
        Ok(id)
    }

    /// Sends what is new of one run (creating the server's run the first time).
    pub fn sync_run(&mut self, run: &str) -> Result<RunSync, SyncError> {
        let server = self.server().to_string();
        let version = self.tracker.version(run)?;
        let info = self.tracker.run(run)?.ok_or_else(|| TrackingError::NoRun(run.to_string()))?;
        let mut done = RunSync {
            run_id: run.to_string(),
            name: info.name.clone(),
            experiment: self.tracker.experiment_name(info.experiment_id)?,
            status: info.status.clone(),
            ..RunSync::default()
        };
        let mut state = match self.tracker.load_state(&server, run)? {
            Some(s) => s,
            None => {
                let experiment = self.remote_experiment(info.experiment_id)?;
                let filter = format!("tags.`{LOCAL_RUN_TAG}` = '{run}'");
                let found = self.client.search_runs(&experiment, &filter)?;
                let remote = match found.into_iter().next() {
                    Some(r) => r,
                    None => {
                        done.created = true;
                        let v = self.client.call(
                            "runs/create",
                            Some(&json!({
                                "experiment_id": experiment,
                                "run_name": info.name,
                                "start_time": info.start_time,
                                "tags": [
                                    { "key": LOCAL_RUN_TAG, "value": run },
                                    { "key": "mlflow.runName", "value": info.name },
                                    { "key": "mlflow.source.name", "value": "atelier" },
                                    { "key": "mlflow.source.type", "value": "LOCAL" },
                                ],
                            })),
                            &[],
                        )?;
                        v["run"].clone()
                    }
                };
                let s = State {
                    remote_run_id: str_at(&remote, &["info", "run_id"]),
                    remote_experiment_id: experiment,
                    artifact_uri: str_at(&remote, &["info", "artifact_uri"]),
                    status: "RUNNING".into(),
                    ..State::default()
                };
                self.tracker.save_state(&server, run, &s)?;
                s
            }
        };
        done.remote_run_id = state.remote_run_id.clone();

        // Params and tags (at most 100 a call) and metrics (at most 1000 a call, in the
        // order they were logged) share `log-batch` calls: a small run goes in one.
        let params: Vec<(String, String)> = self.tracker.params(run)?.into_iter().filter(|(k, _)| !state.params.contains(k)).collect();
        let mut tags: Vec<(String, String)> = Vec::new();
        for (k, v) in self.tracker.tags(run)? {
            let v = if k == "mlflow.parentRunId" { self.parent_on_server(&v)? } else { v };
            if state.tags.get(&k) != Some(&v) {
                tags.push((k, v));
            }
        }
        let mut pending: Vec<(bool, String, String)> =
            params.into_iter().map(|(k, v)| (true, k, v)).chain(tags.into_iter().map(|(k, v)| (false, k, v))).collect();
        loop {
            let chunk: Vec<_> = pending.drain(..pending.len().min(MAX_BATCH_PARAMS_TAGS)).collect();
            // The limit is on metrics, params and tags together.
            let rows = self.tracker.metric_rows(run, state.metrics_rowid, MAX_BATCH_METRICS - chunk.len())?;
            if chunk.is_empty() && rows.is_empty() {
                break;
            }
            let kv = |want: bool| -> Vec<Value> {
                chunk.iter().filter(|(p, ..)| *p == want).map(|(_, k, v)| json!({ "key": k, "value": v })).collect()
            };
            let metrics: Vec<Value> = rows
                .iter()
                .map(|(_, k, v, ts, step)| json!({ "key": k, "value": metric_value(*v), "timestamp": ts, "step": step }))
                .collect();
            self.client.log_batch(&state.remote_run_id, &metrics, &kv(true), &kv(false))?;
            for (is_param, k, v) in chunk {
                if is_param {
                    state.params.push(k);
                    done.params += 1;
                } else {
                    state.tags.insert(k, v);
                    done.tags += 1;
                }
            }
            if let Some(last) = rows.last() {
                state.metrics_rowid = last.0;
                done.metrics += rows.len();
            }
            self.tracker.save_state(&server, run, &state)?;
        }

        // Artifacts that are new or changed since their upload.
        let root = PathBuf::from(&info.artifact_uri);
        for rel in self.tracker.artifacts(run)? {
            let path = root.join(&rel);
            let Ok(meta) = std::fs::metadata(&path) else { continue };
            let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_millis());
            let stamp = format!("{}:{mtime}", meta.len());
            if state.artifacts.get(&rel) == Some(&stamp) {
                continue;
            }
            self.client.upload(&state.artifact_uri, &rel, &path)?;
            state.artifacts.insert(rel, stamp);
            done.artifacts += 1;
            self.tracker.save_state(&server, run, &state)?;
        }

        // The status, once it differs from what the server has.
        if info.status != state.status {
            let mut body = json!({ "run_id": state.remote_run_id, "status": info.status });
            if let Some(end) = info.end_time {
                body["end_time"] = json!(end);
            }
            self.client.call("runs/update", Some(&body), &[])?;
            state.status = info.status.clone();
            self.tracker.save_state(&server, run, &state)?;
        }
        self.tracker.mark_synced(&server, run, version)?;
        Ok(done)
    }

    /// The server's id of local parent run `parent` (synced first if it is not there yet).
    fn parent_on_server(&mut self, parent: &str) -> Result<String, SyncError> {
        if let Some(id) = self.tracker.remote_run_id(self.server(), parent)? {
            return Ok(id);
        }
        Ok(self.sync_run(parent)?.remote_run_id)
    }
}

pub use app::dto::MirrorStatus;

/// The studio's background mirror: a thread that syncs pending runs every few seconds,
/// backing off (up to a minute) while the server is unreachable, so runs recorded while
/// it was down are sent when it returns, in the order they started.
pub struct Background {
    status: std::sync::Arc<std::sync::Mutex<MirrorStatus>>,
    wake: std::sync::mpsc::Sender<()>,
}

impl Background {
    /// Starts the mirror of the store in `tracking` to `config`'s server.
    pub fn start(tracking: PathBuf, config: ServerConfig) -> Self {
        let status = std::sync::Arc::new(std::sync::Mutex::new(MirrorStatus { uri: Some(config.uri.clone()), ..MirrorStatus::default() }));
        let (wake, woken) = std::sync::mpsc::channel::<()>();
        let shared = status.clone();
        std::thread::Builder::new()
            .name("mlflow-sync".into())
            .spawn(move || {
                let client = Client::new(config);
                let mut wait = Duration::from_secs(2);
                // Opened once and kept (opening again until it succeeds).
                let mut store: Option<Tracker> = None;
                loop {
                    let opened = match store.take() {
                        Some(t) => Ok(t),
                        None => Tracker::open(&tracking).map_err(|e| crate::error::report(&e)),
                    };
                    let outcome = opened.and_then(|t| {
                        let t = store.insert(t);
                        let mut mirror = Mirror::new(t, &client);
                        let report = mirror.sync_pending(&mut |_| {}).map_err(|e| crate::error::report(&e))?;
                        let refused = t.refused_runs(client.uri()).map_err(|e| crate::error::report(&e))?;
                        Ok((report, refused))
                    });
                    {
                        let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
                        match outcome {
                            Ok((report, refused)) => {
                                s.pending = report.pending;
                                s.refused = refused;
                                if !report.synced.is_empty() {
                                    tracing::info!(runs = report.synced.len(), server = %client.uri(), "runs mirrored to MLflow");
                                }
                                match report.interrupted {
                                    Some(e) => {
                                        if s.last_error.is_none() {
                                            tracing::warn!(error = %e, pending = report.pending, "MLflow server unavailable; runs are kept and sent when it returns");
                                        }
                                        s.last_error = Some(e);
                                        wait = (wait * 2).min(Duration::from_secs(60));
                                    }
                                    None => {
                                        if s.last_error.take().is_some() {
                                            tracing::info!("MLflow server back; pending runs sent");
                                        }
                                        s.last_sync = Some(super::now_ms());
                                        wait = Duration::from_secs(2);
                                    }
                                }
                            }
                            Err(e) => {
                                s.last_error = Some(e);
                                wait = (wait * 2).min(Duration::from_secs(60));
                            }
                        }
                    }
                    match woken.recv_timeout(wait) {
                        Ok(()) => wait = Duration::from_secs(2),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
            })
            .expect("spawning the MLflow sync thread");
        Self { status, wake }
    }

    /// Asks for a sync pass now (after a run ended, or from the page).
    pub fn wake(&self) {
        let _ = self.wake.send(());
    }

    pub fn status(&self) -> MirrorStatus {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracking_uris_must_name_a_server() {
        assert_eq!(ServerConfig::with_auth("http://127.0.0.1:5000/", None).unwrap().uri, "http://127.0.0.1:5000");
        for bad in ["file:///tmp/mlruns", "databricks", "./mlruns", "http://"] {
            let e = ServerConfig::with_auth(bad, None).unwrap_err();
            assert!(e.contains("http://HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn credentials_come_from_mlflows_environment_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        let token = ServerConfig::from_env("http://h:5000", env(&[("MLFLOW_TRACKING_TOKEN", "abc"), ("MLFLOW_TRACKING_USERNAME", "u")])).unwrap();
        assert_eq!(token.auth.as_deref(), Some("Bearer abc"), "a token wins");
        let basic = ServerConfig::from_env("http://h:5000", env(&[("MLFLOW_TRACKING_USERNAME", "ann"), ("MLFLOW_TRACKING_PASSWORD", "s3cret")])).unwrap();
        assert_eq!(basic.auth.as_deref(), Some("Basic YW5uOnMzY3JldA=="), "base64 of ann:s3cret");
        assert_eq!(ServerConfig::from_env("http://h:5000", env(&[("MLFLOW_TRACKING_TOKEN", "")])).unwrap().auth, None);
        assert!(!format!("{basic:?}").contains("YW5u"), "credentials stay out of logs");
    }

    #[test]
    fn artifact_proxy_paths_and_encoding() {
        assert_eq!(proxy_path("mlflow-artifacts:/1/abc/artifacts").as_deref(), Some("1/abc/artifacts"));
        assert_eq!(proxy_path("mlflow-artifacts://host:5000/1/abc/artifacts").as_deref(), Some("1/abc/artifacts"));
        assert_eq!(proxy_path("s3://bucket/1/abc/artifacts"), None);
        assert_eq!(encode_path("images/loss+step+3 x.png"), "images/loss%2Bstep%2B3%20x.png");
        assert_eq!(metric_value(f64::NAN), json!("NaN"));
        assert_eq!(metric_value(f64::NEG_INFINITY), json!("-Infinity"));
        assert_eq!(metric_value(0.5), json!(0.5));
    }

    #[test]
    fn pending_runs_follow_the_change_counter() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tracker::open(dir.path()).unwrap();
        let exp = t.experiment("styles").unwrap();
        let a = t.start_run(exp, "a").unwrap();
        let b = t.start_run(exp, "b").unwrap();
        let server = "http://mlflow:5000";
        assert_eq!(t.pending_runs(server).unwrap(), vec![a.clone(), b.clone()], "oldest first");
        let s = State { remote_run_id: "r".into(), ..State::default() };
        t.save_state(server, &a, &s).unwrap();
        t.mark_synced(server, &a, t.version(&a).unwrap()).unwrap();
        assert_eq!(t.pending_runs(server).unwrap(), vec![b.clone()]);
        assert_eq!(t.pending_runs("http://other:5000").unwrap().len(), 2, "per server");
        t.log_metric(&a, "loss", 0.5, 1).unwrap();
        assert_eq!(t.pending_runs(server).unwrap(), vec![a.clone(), b.clone()], "a new metric makes it pending");
        t.mark_refused(server, &b, t.version(&b).unwrap(), "param changed").unwrap();
        assert_eq!(t.pending_runs(server).unwrap(), vec![a.clone()], "a refusal is not retried");
        assert_eq!(t.refused_runs(server).unwrap(), vec![(b.clone(), "param changed".to_string())]);
        t.set_tag(&b, "note", "fixed").unwrap();
        assert_eq!(t.pending_runs(server).unwrap(), vec![a, b], "until the run changes");
    }
}
