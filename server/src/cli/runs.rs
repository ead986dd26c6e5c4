//! `atelier runs`: the experiment store from the command line: `list` (a table per
//! experiment, narrowed by an MLflow filter) and `show` (one run: params, tags, latest
//! metrics with their point counts, artifacts).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use atelier_server::tracking::search;
use atelier_server::tracking::{RunSummary, Tracker};

/// Arguments of `atelier runs`.
#[derive(Debug, clap::Args)]
pub struct RunsArgs {
    #[command(subcommand)]
    command: RunsCommand,
    /// The experiment store (the studio keeps it in DATA/tracking).
    #[arg(long, global = true, env = "ATELIER_TRACKING", default_value = "data/tracking")]
    tracking: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
enum RunsCommand {
    /// Runs, newest first, a table per experiment.
    List {
        /// Only this experiment (name or id).
        #[arg(long)]
        experiment: Option<String>,
        /// MLflow filter, e.g. "metrics.similarity_gain > 0.05 and params.rank = '8'".
        #[arg(long, default_value = "")]
        filter: String,
    },
    /// One run: params, tags, metrics, artifacts.
    Show {
        /// The run id (or its first characters, as `list` shows them).
        run: String,
    },
    /// Sends every run with something new to the MLflow server (idempotent: runs already
    /// there are updated, never duplicated) and prints a table of what went.
    Sync {
        #[command(flatten)]
        uri: super::TrackingUri,
        /// Forget what was sent and send every run again (after the server's database was
        /// reset); runs still on the server are matched by tag and updated, not duplicated.
        #[arg(long)]
        resend: bool,
    },
}

pub fn run(args: RunsArgs) -> Result<()> {
    if !args.tracking.join("tracking.sqlite").is_file() {
        bail!("no experiment store at {}: train a style or run an optimisation first, or pass --tracking DIR", args.tracking.display());
    }
    let tracker = Tracker::open(&args.tracking).with_context(|| format!("opening {}", args.tracking.display()))?;
    match args.command {
        RunsCommand::List { experiment, filter } => list(&tracker, experiment.as_deref(), &filter),
        RunsCommand::Show { run } => show(&tracker, &run),
        RunsCommand::Sync { uri, resend } => sync(&tracker, &uri, resend),
    }
}

fn sync(tracker: &Tracker, uri: &super::TrackingUri, resend: bool) -> Result<()> {
    use atelier_server::tracking::mlflow::{Client, Mirror};
    let server = uri.server()?.context("no MLflow server: pass --tracking-uri http://HOST:PORT or set MLFLOW_TRACKING_URI")?;
    let client = Client::new(server);
    if resend {
        tracker.forget_sync(client.uri())?;
    }
    let pending = tracker.pending_runs(client.uri())?.len();
    if pending == 0 {
        let (versions, aliases) = Mirror::new(tracker, &client).sync_registry()?;
        println!("nothing to sync: every run is on {}", client.uri());
        if versions + aliases > 0 {
            println!("registry: {versions} model version(s) created, {aliases} alias change(s)");
        }
        return Ok(());
    }
    let bar = indicatif::ProgressBar::new(pending as u64).with_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_prefix("sync");
    let report = Mirror::new(tracker, &client).sync_pending(&mut |r| {
        bar.inc(1);
        bar.set_message(r.name.clone());
    })?;
    bar.finish_and_clear();
    let mut rows = vec![["run", "name", "experiment", "server run", "new", "params", "tags", "metrics", "artifacts", "status"].map(String::from).to_vec()];
    for r in &report.synced {
        rows.push(vec![
            r.run_id.chars().take(8).collect(),
            r.name.clone(),
            r.experiment.clone(),
            r.remote_run_id.chars().take(8).collect(),
            if r.created { "yes" } else { "no" }.into(),
            r.params.to_string(),
            r.tags.to_string(),
            r.metrics.to_string(),
            r.artifacts.to_string(),
            r.status.clone(),
        ]);
    }
    print!("{}", columns(rows));
    println!("{} run(s) sent to {}", report.synced.len(), client.uri());
    if report.versions + report.aliases > 0 {
        println!("registry: {} model version(s) created, {} alias change(s)", report.versions, report.aliases);
    }
    for (run, name, message) in &report.refused {
        println!("refused: {} ({name}): {message}", &run[..run.len().min(8)]);
    }
    if let Some(e) = &report.interrupted {
        bail!("{e}
{} run(s) still waiting; run `atelier runs sync` again when the server is back", report.pending);
    }
    if !report.refused.is_empty() {
        bail!("the server refused {} run(s); they are retried once they change", report.refused.len());
    }
    Ok(())
}

/// Rows as left-aligned columns two spaces apart.
pub(crate) fn columns(rows: Vec<Vec<String>>) -> String {
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len)).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn list(tracker: &Tracker, experiment: Option<&str>, filter: &str) -> Result<()> {
    let parsed = search::parse(filter).map_err(|e| anyhow::anyhow!("{e}\n  {filter}\n  {}^", " ".repeat(e.position)))?;
    let experiments = match experiment {
        Some(name) => {
            let id = tracker.find_experiment(name)?.with_context(|| {
                let known: Vec<String> = tracker.experiments().map(|all| all.into_iter().map(|e| e.name).collect()).unwrap_or_default();
                format!("no experiment {name:?} (known: {})", known.join(", "))
            })?;
            tracker.experiments()?.into_iter().filter(|e| e.experiment_id == id).collect()
        }
        None => tracker.experiments()?,
    };
    for e in experiments {
        let runs = tracker.search(e.experiment_id, &parsed)?;
        println!("experiment {} (id {}): {} of {} run(s)", e.name, e.experiment_id, runs.len(), e.runs);
        if !runs.is_empty() {
            print!("{}", table(&runs));
        }
        println!();
    }
    Ok(())
}

/// A fixed-width table: id, name, status, start, then every metric's latest value.
fn table(runs: &[RunSummary]) -> String {
    let mut metric_keys: Vec<&String> = runs.iter().flat_map(|r| r.metrics.keys()).collect();
    metric_keys.sort();
    metric_keys.dedup();
    let mut rows: Vec<Vec<String>> = vec![["run", "name", "status", "started"].iter().map(|s| s.to_string()).chain(metric_keys.iter().map(|k| k.to_string())).collect()];
    for r in runs {
        let started = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.info.start_time.max(0) as u64)).to_string();
        let mut row = vec![r.info.run_id.chars().take(8).collect(), r.info.name.clone(), r.info.status.clone(), started];
        row.extend(metric_keys.iter().map(|k| r.metrics.get(*k).map_or_else(|| "-".into(), |v| format!("{v:.4}"))));
        rows.push(row);
    }
    columns(rows)
}

fn show(tracker: &Tracker, run: &str) -> Result<()> {
    let mut found = Vec::new();
    for e in tracker.experiments()? {
        found.extend(tracker.search(e.experiment_id, &search::Filter::default())?.into_iter().filter(|r| r.info.run_id.starts_with(run)));
    }
    let r = match found.len() {
        0 => bail!("no run {run:?}; `atelier runs list` shows them"),
        1 => found.remove(0),
        n => bail!("{n} runs start with {run:?}; give more of the id"),
    };
    println!("run {} ({}): {}", r.info.run_id, r.info.name, r.info.status);
    println!("experiment id {}, artifacts in {}", r.info.experiment_id, r.info.artifact_uri);
    let section = |title: &str, pairs: Vec<(String, String)>| {
        println!("\n{title}:");
        let w = pairs.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
        for (k, v) in pairs {
            println!("  {k:<w$}  {v}");
        }
    };
    section("params", r.params.clone().into_iter().collect());
    section("tags", r.tags.clone().into_iter().collect());
    let metrics = r
        .metrics
        .iter()
        .map(|(k, v)| Ok((k.clone(), format!("{v:.6}  ({} points)", tracker.metric_history(&r.info.run_id, k)?.len()))))
        .collect::<Result<Vec<_>>>()?;
    section("metrics (latest)", metrics);
    section("artifacts", tracker.artifacts(&r.info.run_id)?.into_iter().map(|a| (a, String::new())).collect());
    Ok(())
}
