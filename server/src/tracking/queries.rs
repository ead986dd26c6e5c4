//! Queries of the experiment dashboard (issue 14, section 4), kept apart from the store's
//! core (`mod.rs`): the latest value of every metric without reading every point (a
//! `latest_metrics` table kept by a trigger), a metric's points logged after a given row
//! (live streams), fast bulk writes of seeded runs, and CSV rendering (RFC 4180).

use std::collections::BTreeMap;

use rusqlite::{params, OptionalExtension};

use super::{MetricPoint, Result, RunSummary, Tracker};

/// The latest point of each (run, metric), kept up to date by a trigger on `metrics` so
/// that any writer (this studio, the CLI, an older binary) keeps it right. "Latest" is as
/// [`Tracker::metric_history`] orders: highest step, then latest timestamp, then the row
/// inserted last.
const LATEST_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS latest_metrics (
    run_uuid  TEXT NOT NULL,
    key       TEXT NOT NULL,
    value     REAL NOT NULL,
    timestamp INTEGER NOT NULL,
    step      INTEGER NOT NULL,
    PRIMARY KEY (run_uuid, key)
);
CREATE TRIGGER IF NOT EXISTS metrics_latest AFTER INSERT ON metrics BEGIN
    INSERT INTO latest_metrics (run_uuid, key, value, timestamp, step)
    VALUES (NEW.run_uuid, NEW.key, NEW.value, NEW.timestamp, NEW.step)
    ON CONFLICT (run_uuid, key) DO UPDATE SET value = excluded.value, timestamp = excluded.timestamp, step = excluded.step
    WHERE excluded.step > latest_metrics.step
       OR (excluded.step = latest_metrics.step AND excluded.timestamp >= latest_metrics.timestamp);
END;
";

/// One seeded run for [`Tracker::insert_run_bulk`]: params, then metric curves as
/// `(key, values)` where value `i` is logged at step `i + 1`, one millisecond apart.
pub struct BulkRun<'a> {
    pub name: &'a str,
    pub params: &'a [(String, String)],
    pub metrics: &'a [(String, Vec<f64>)],
    pub status: &'a str,
}

/// Points per INSERT statement in [`Tracker::insert_run_bulk`] (3 variables each).
const BULK_ROWS: usize = 200;

impl Tracker {
    /// Creates `latest_metrics` and its trigger when missing (called by [`Tracker::open`]),
    /// filling it from the points already stored (in one transaction, so no point logged meanwhile is missed).
    pub(super) fn ensure_latest_metrics(&self) -> Result<()> {
        let mut db = self.db();
        let present: Option<i64> = db.query_row("SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = 'metrics_latest'", [], |r| r.get(0)).optional()?;
        if present.is_some() {
            return Ok(());
        }
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let again: Option<i64> = tx.query_row("SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = 'metrics_latest'", [], |r| r.get(0)).optional()?;
        if again.is_none() {
            tx.execute_batch(LATEST_SCHEMA)?;
            // In history order, so the last row written for each (run, key) is its latest.
            tx.execute(
                "INSERT OR REPLACE INTO latest_metrics (run_uuid, key, value, timestamp, step) \
                 SELECT run_uuid, key, value, timestamp, step FROM metrics ORDER BY step, timestamp, rowid",
                [],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The latest value of every metric of every run of `experiment`: run id → key → value.
    /// Reads one row per (run, metric), not every point.
    pub fn latest_metrics(&self, experiment: i64) -> Result<BTreeMap<String, BTreeMap<String, f64>>> {
        let db = self.db();
        let mut st = db.prepare("SELECT x.run_uuid, x.key, x.value FROM latest_metrics x JOIN runs r ON r.run_uuid = x.run_uuid WHERE r.experiment_id = ?1")?;
        let mut out: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
        for row in st.query_map([experiment], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, f64>(2)?)))? {
            let (run, k, v) = row?;
            out.entry(run).or_default().insert(k, v);
        }
        Ok(out)
    }

    /// The points of metric `key` of `run` stored after row `after` (0 for all), by step
    /// then time, each with its row id: the largest is what to pass next time.
    pub fn metric_since(&self, run: &str, key: &str, after: i64) -> Result<Vec<(i64, MetricPoint)>> {
        let db = self.db();
        let mut st = db.prepare(
            "SELECT rowid, value, timestamp, step FROM metrics WHERE run_uuid = ?1 AND key = ?2 AND rowid > ?3 ORDER BY step, timestamp, rowid",
        )?;
        let rows = st
            .query_map(params![run, key, after], |r| Ok((r.get(0)?, MetricPoint { value: r.get(1)?, timestamp: r.get(2)?, step: r.get(3)? })))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Readies this connection for many bulk writes: a 256 MiB page cache (the metrics
    /// index then stays in memory while millions of points go in) and `synchronous =
    /// NORMAL` (in WAL mode a crash may lose the last transactions, never corrupt the store).
    pub fn prepare_bulk(&self) -> Result<()> {
        let db = self.db();
        db.pragma_update(None, "cache_size", -262_144)?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(())
    }

    /// Writes a whole finished (or failed…) run in `experiment` in one transaction: fast
    /// enough for thousands of points per metric (seeded demo and benchmark runs). Starts
    /// at `start_time` (ms since the epoch); returns the run's id.
    pub fn insert_run_bulk(&self, experiment: i64, run: &BulkRun<'_>, start_time: i64) -> Result<String> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let artifacts = self.root.join("artifacts").join(experiment.to_string()).join(&id).join("artifacts");
        std::fs::create_dir_all(&artifacts).map_err(super::creating(&artifacts))?;
        // The trigger first, so that the new points keep `latest_metrics` up to date.
        let points = run.metrics.iter().map(|(_, v)| v.len() as i64).max().unwrap_or(0);
        let end_time = (run.status != "RUNNING").then_some(start_time + points + 1);
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute(
            "INSERT INTO runs (run_uuid, experiment_id, name, status, start_time, end_time, artifact_uri) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![id, experiment, run.name, run.status, start_time, end_time, artifacts.display().to_string()],
        )?;
        tx.execute("INSERT INTO tags (run_uuid, key, value) VALUES (?1, ?2, ?3)", params![id, super::PID_TAG, std::process::id().to_string()])?;
        {
            let mut st = tx.prepare("INSERT INTO params (run_uuid, key, value) VALUES (?1, ?2, ?3)")?;
            for (k, v) in run.params {
                st.execute(params![id, k, v])?;
            }
            // BULK_ROWS points per statement (run and key bound once per statement): a
            // third less CPU than a statement per point.
            let insert = |rows: usize| {
                let values: Vec<String> = (0..rows).map(|r| format!("(?1, ?2, ?{}, ?{}, ?{})", 3 + 3 * r, 4 + 3 * r, 5 + 3 * r)).collect();
                format!("INSERT INTO metrics (run_uuid, key, value, timestamp, step) VALUES {}", values.join(", "))
            };
            let mut full = tx.prepare(&insert(BULK_ROWS))?;
            for (key, values) in run.metrics {
                for (c, chunk) in values.chunks(BULK_ROWS).enumerate() {
                    let mut args: Vec<rusqlite::types::Value> = Vec::with_capacity(2 + 3 * chunk.len());
                    args.push(id.clone().into());
                    args.push(key.clone().into());
                    for (j, v) in chunk.iter().enumerate() {
                        let i = (c * BULK_ROWS + j) as i64;
                        args.extend([(*v).into(), (start_time + i).into(), (i + 1).into()]);
                    }
                    if chunk.len() == BULK_ROWS {
                        full.execute(rusqlite::params_from_iter(args))?;
                    } else {
                        tx.prepare(&insert(chunk.len()))?.execute(rusqlite::params_from_iter(args))?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(id)
    }
}

/// One CSV field (RFC 4180 §2): quoted when it holds a comma, a quote, CR or LF, with
/// quotes doubled.
pub fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// One CSV record: the fields, comma-separated, ended by CRLF (RFC 4180 §2).
pub fn csv_record<S: AsRef<str>>(fields: impl IntoIterator<Item = S>) -> String {
    let mut line = fields.into_iter().map(|f| csv_field(f.as_ref())).collect::<Vec<_>>().join(",");
    line.push_str("\r\n");
    line
}

/// A float as CSV writes it: Rust's shortest round-trip decimal form (`0.1`, `0.0000001`, `NaN`).
fn number(v: f64) -> String {
    format!("{v}")
}

/// The runs table as CSV: `run_id,name,status,start_time` (ms since the epoch), then a
/// column per param (`params.KEY`) and per metric (`metrics.KEY`, its latest value),
/// sorted by key; a header row, then a row per run in the order given.
pub fn runs_csv(runs: &[RunSummary]) -> String {
    let params: Vec<&String> = runs.iter().flat_map(|r| r.params.keys()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    let metrics: Vec<&String> = runs.iter().flat_map(|r| r.metrics.keys()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    let mut out = csv_record(
        ["run_id", "name", "status", "start_time"]
            .iter()
            .map(|s| s.to_string())
            .chain(params.iter().map(|k| format!("params.{k}")))
            .chain(metrics.iter().map(|k| format!("metrics.{k}"))),
    );
    for r in runs {
        out.push_str(&csv_record(
            [r.info.run_id.clone(), r.info.name.clone(), r.info.status.clone(), r.info.start_time.to_string()]
                .into_iter()
                .chain(params.iter().map(|k| r.params.get(*k).cloned().unwrap_or_default()))
                .chain(metrics.iter().map(|k| r.metrics.get(*k).map(|v| number(*v)).unwrap_or_default())),
        ));
    }
    out
}

/// A metric's history as CSV: `step,value,timestamp` (ms since the epoch), a row per point.
pub fn history_csv(points: &[MetricPoint]) -> String {
    let mut out = csv_record(["step", "value", "timestamp"]);
    for p in points {
        out.push_str(&csv_record([p.step.to_string(), number(p.value), p.timestamp.to_string()]));
    }
    out
}

/// Checks an artifact path from a URL (`images/a.png`): relative, `/`-separated, with no
/// `..`, `.` or empty part and no backslash, colon or NUL (so it cannot leave the run's
/// folder or name a drive on Windows). Returns it as a path, or why it is refused.
pub fn artifact_relative_path(path: &str) -> std::result::Result<std::path::PathBuf, String> {
    if path.is_empty() {
        return Err("empty: name a file under the run's artifacts, e.g. images/sample.png".into());
    }
    if path.starts_with('/') || path.contains(['\\', ':', '\0']) {
        return Err(format!("{path:?} must be relative to the run's artifacts, with `/` between folders"));
    }
    let mut out = std::path::PathBuf::new();
    for part in path.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return Err(format!("{path:?} may not hold `..`, `.` or an empty folder name"));
        }
        out.push(part);
    }
    Ok(out)
}

/// The `Content-Type` of an artifact by its extension: images, JSON, CSV, text, YAML;
/// anything else (`.safetensors` weights included) is `application/octet-stream`.
pub fn artifact_content_type(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "svg" => "image/svg+xml",
        "json" => "application/json",
        "csv" => "text/csv; charset=utf-8",
        "txt" | "md" | "log" => "text/plain; charset=utf-8",
        "yaml" | "yml" => "application/yaml",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracking::{search, RunStatus};

    #[test]
    fn artifact_paths_stay_inside_and_are_typed() {
        assert_eq!(artifact_relative_path("images/a+step+1.png").unwrap(), std::path::Path::new("images").join("a+step+1.png"));
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a\\..\\b", "C:x"] {
            assert!(artifact_relative_path(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(artifact_content_type("images/s.PNG"), "image/png");
        assert_eq!(artifact_content_type("card.json"), "application/json");
        assert_eq!(artifact_content_type("metrics.csv"), "text/csv; charset=utf-8");
        assert_eq!(artifact_content_type("lora.safetensors"), "application/octet-stream");
        assert_eq!(artifact_content_type("README"), "application/octet-stream");
    }

    #[test]
    fn csv_quotes_as_rfc_4180() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
        let pts = [MetricPoint { value: 0.5, timestamp: 7, step: 1 }, MetricPoint { value: 1e-7, timestamp: 8, step: 2 }];
        assert_eq!(history_csv(&pts), "step,value,timestamp\r\n1,0.5,7\r\n2,0.0000001,8\r\n");
    }

    #[test]
    fn latest_metrics_follow_steps_even_for_points_logged_before_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let (exp, run) = {
            let t = Tracker::open(dir.path()).unwrap();
            let exp = t.experiment("styles").unwrap();
            let run = t.start_run(exp, "a").unwrap();
            t.log_metric(&run, "loss", 0.5, 1).unwrap();
            t.log_metric(&run, "loss", 0.25, 3).unwrap();
            // A store written before `latest_metrics` existed.
            t.db().execute_batch("DROP TRIGGER metrics_latest; DROP TABLE latest_metrics;").unwrap();
            (exp, run)
        };
        let t = Tracker::open(dir.path()).unwrap();
        // Backfilled on opening from the points already there.
        assert_eq!(t.latest_metrics(exp).unwrap()[&run]["loss"], 0.25);
        // Then kept by the trigger: an older step does not replace it, a newer one does.
        t.log_metric(&run, "loss", 9.0, 2).unwrap();
        assert_eq!(t.latest_metrics(exp).unwrap()[&run]["loss"], 0.25);
        t.log_metric(&run, "loss", 0.125, 3).unwrap();
        t.log_metric(&run, "acc", 0.9, 1).unwrap();
        let latest = t.latest_metrics(exp).unwrap();
        assert_eq!((latest[&run]["loss"], latest[&run]["acc"]), (0.125, 0.9));
        let from_search = t.search(exp, &search::Filter::default()).unwrap();
        assert_eq!(from_search[0].metrics, latest[&run]);

        let since: Vec<(i64, f64)> = t.metric_since(&run, "loss", 0).unwrap().iter().map(|(_, p)| (p.step, p.value)).collect();
        assert_eq!(since, vec![(1, 0.5), (2, 9.0), (3, 0.25), (3, 0.125)]);
        let last_row = t.metric_since(&run, "loss", 0).unwrap().iter().map(|(r, _)| *r).max().unwrap();
        t.log_metric(&run, "loss", 0.1, 4).unwrap();
        let new: Vec<f64> = t.metric_since(&run, "loss", last_row).unwrap().iter().map(|(_, p)| p.value).collect();
        assert_eq!(new, vec![0.1]);
        t.end_run(&run, RunStatus::Finished).unwrap();
    }

    #[test]
    fn bulk_runs_read_back_like_logged_ones() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tracker::open(dir.path()).unwrap();
        let exp = t.experiment("seeded").unwrap();
        let params = vec![("rank".to_string(), "8".to_string()), ("optimizer".to_string(), "adam, w".to_string())];
        let metrics = vec![("loss".to_string(), vec![3.0, 2.0, 1.0])];
        let id = t.insert_run_bulk(exp, &BulkRun { name: "r0", params: &params, metrics: &metrics, status: "FINISHED" }, 1000).unwrap();
        let runs = t.search(exp, &search::parse("params.rank = '8' and metrics.loss < 1.5").unwrap()).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].info.run_id.as_str(), runs[0].info.status.as_str(), runs[0].info.end_time), (id.as_str(), "FINISHED", Some(1004)));
        let h: Vec<(i64, f64, i64)> = t.metric_history(&id, "loss").unwrap().iter().map(|p| (p.step, p.value, p.timestamp)).collect();
        assert_eq!(h, vec![(1, 3.0, 1000), (2, 2.0, 1001), (3, 1.0, 1002)]);
        let csv = runs_csv(&runs);
        assert_eq!(csv, format!("run_id,name,status,start_time,params.optimizer,params.rank,metrics.loss\r\n{id},r0,FINISHED,1000,\"adam, w\",8,1\r\n"));
    }
}
