//! `atelier runs`: the experiment store from the command line: `list` (a table per
//! experiment, narrowed by an MLflow filter) and `show` (one run: params, tags, latest
//! metrics with their point counts, artifacts) and `seed` (synthetic runs for demos,
//! tests and benchmarks).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use atelier_server::tracking::queries::BulkRun;
use atelier_server::tracking::search;
use atelier_server::tracking::{RunStatus, RunSummary, Tracker};

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
    /// Runs side by side: status, every param (rows that differ marked `*`) and the latest
    /// value of every metric; `--csv` writes the same as CSV.
    Compare {
        /// Two or more run ids (or their first characters).
        #[arg(required = true, num_args = 2..)]
        runs: Vec<String>,
        /// CSV (RFC 4180) on stdout: key, differs, then a column per run.
        #[arg(long)]
        csv: bool,
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
    /// Writes synthetic runs (for demos, tests and benchmarks): params `rank` (4, 8, 16),
    /// `lr`, `optimizer` and `seed`, and decaying pseudo-random metric curves, the same for
    /// the same --seed. Not real trainings: keep them out of a studio's real experiments.
    Seed {
        /// Experiment to add the runs to (created when missing).
        #[arg(long, default_value = "seeded")]
        experiment: String,
        /// Number of finished runs.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Metrics per run (loss, val_loss, accuracy, similarity_gain, grad_norm, then metric_5…).
        #[arg(long, default_value_t = 3)]
        metrics: usize,
        /// Points per metric (steps 1..=S).
        #[arg(long, default_value_t = 100)]
        steps: usize,
        /// Seed of the pseudo-random curves and params.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Then add one RUNNING run that logs a point of every metric every 200 ms for this
        /// many seconds, then ends FINISHED (live-view tests and demos).
        #[arg(long)]
        live: Option<f64>,
    },
}

pub fn run(args: RunsArgs) -> Result<()> {
    if let RunsCommand::Seed { experiment, runs, metrics, steps, seed, live } = &args.command {
        let tracker = Tracker::open(&args.tracking).with_context(|| format!("opening {}", args.tracking.display()))?;
        return seed_runs(&tracker, &SeedSpec { experiment: experiment.clone(), runs: *runs, metrics: *metrics, steps: *steps, seed: *seed, live: *live });
    }
    if !args.tracking.join("tracking.sqlite").is_file() {
        bail!("no experiment store at {}: train a style or run an optimisation first, or pass --tracking DIR", args.tracking.display());
    }
    let tracker = Tracker::open(&args.tracking).with_context(|| format!("opening {}", args.tracking.display()))?;
    match args.command {
        RunsCommand::List { experiment, filter } => list(&tracker, experiment.as_deref(), &filter),
        RunsCommand::Show { run } => show(&tracker, &run),
        RunsCommand::Compare { runs, csv } => compare(&tracker, &runs, csv),
        RunsCommand::Sync { uri, resend } => sync(&tracker, &uri, resend),
        RunsCommand::Seed { .. } => unreachable!("handled above"),
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

/// The one run whose id starts with `prefix`.
fn find_run(tracker: &Tracker, prefix: &str) -> Result<RunSummary> {
    let mut found = Vec::new();
    for e in tracker.experiments()? {
        found.extend(tracker.search(e.experiment_id, &search::Filter::default())?.into_iter().filter(|r| r.info.run_id.starts_with(prefix)));
    }
    match found.len() {
        0 => bail!("no run {prefix:?}; `atelier runs list` shows them"),
        1 => Ok(found.remove(0)),
        n => bail!("{n} runs start with {prefix:?}; give more of the id"),
    }
}

fn compare(tracker: &Tracker, ids: &[String], csv: bool) -> Result<()> {
    use std::collections::BTreeSet;
    let runs: Vec<RunSummary> = ids.iter().map(|id| find_run(tracker, id)).collect::<Result<_>>()?;
    let params: BTreeSet<&String> = runs.iter().flat_map(|r| r.params.keys()).collect();
    let metrics: BTreeSet<&String> = runs.iter().flat_map(|r| r.metrics.keys()).collect();
    // (key, values per run)
    let mut rows: Vec<(String, Vec<String>)> = vec![
        ("name".into(), runs.iter().map(|r| r.info.name.clone()).collect()),
        ("status".into(), runs.iter().map(|r| r.info.status.clone()).collect()),
    ];
    rows.extend(params.iter().map(|k| (format!("params.{k}"), runs.iter().map(|r| r.params.get(*k).cloned().unwrap_or_default()).collect())));
    rows.extend(metrics.iter().map(|k| {
        (format!("metrics.{k}"), runs.iter().map(|r| r.metrics.get(*k).map_or_else(String::new, |v| if csv { format!("{v}") } else { format!("{v:.6}") })).collect())
    }));
    let differs = |values: &[String]| values.iter().any(|v| v != &values[0]);
    if csv {
        use atelier_server::tracking::queries::csv_record;
        print!("{}", csv_record(["key".to_string(), "differs".to_string()].into_iter().chain(runs.iter().map(|r| r.info.run_id.clone()))));
        for (key, values) in &rows {
            print!("{}", csv_record([key.clone(), differs(values).to_string()].into_iter().chain(values.iter().cloned())));
        }
        return Ok(());
    }
    let mut table = vec![std::iter::once(String::new()).chain(runs.iter().map(|r| r.info.run_id.chars().take(8).collect())).collect::<Vec<String>>()];
    for (key, values) in rows {
        let mark = if differs(&values) { "* " } else { "  " };
        table.push(std::iter::once(format!("{mark}{key}")).chain(values.into_iter().map(|v| if v.is_empty() { "-".into() } else { v })).collect());
    }
    print!("{}", columns(table));
    println!("(* differs between the runs)");
    Ok(())
}

fn show(tracker: &Tracker, run: &str) -> Result<()> {
    let r = find_run(tracker, run)?;
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

/// What `atelier runs seed` writes.
struct SeedSpec {
    experiment: String,
    runs: usize,
    metrics: usize,
    steps: usize,
    seed: u64,
    live: Option<f64>,
}

/// SplitMix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number generators",
/// OOPSLA 2014): small, and the same numbers on every platform and version.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[(self.next() % from.len() as u64) as usize]
    }
}

/// The name of seeded metric `i`.
fn metric_name(i: usize) -> String {
    const NAMES: [&str; 5] = ["loss", "val_loss", "accuracy", "similarity_gain", "grad_norm"];
    NAMES.get(i).map_or_else(|| format!("metric_{i}"), |n| n.to_string())
}

/// One seeded curve's shape: value at `step` (1-based) is `start·e^(−step/tau) + floor`
/// plus noise of relative size `noise`; "accuracy" rises instead (1 minus that).
struct Curve {
    start: f64,
    tau: f64,
    floor: f64,
    noise: f64,
    rising: bool,
}

impl Curve {
    fn new(rng: &mut SplitMix, metric: usize, steps: usize) -> Self {
        let rising = metric == 2;
        let start = if rising { 0.9 } else { 0.5 + rng.unit() * 2.0 };
        Curve { start, tau: steps.max(1) as f64 * (0.1 + rng.unit() * 0.3), floor: if rising { 0.02 } else { 0.05 + rng.unit() * 0.2 }, noise: 0.02 + rng.unit() * 0.05, rising }
    }

    fn value(&self, rng: &mut SplitMix, step: usize) -> f64 {
        let clean = self.start * (-(step as f64) / self.tau).exp() + self.floor;
        let v = clean * (1.0 + self.noise * (rng.unit() * 2.0 - 1.0));
        if self.rising { 1.0 - v } else { v }
    }
}

/// Random params of a seeded run.
fn seed_params(rng: &mut SplitMix, index: usize) -> Vec<(String, String)> {
    vec![
        ("rank".to_string(), rng.pick(&["4", "8", "16"]).to_string()),
        ("lr".to_string(), rng.pick(&["0.0001", "0.0003", "0.001"]).to_string()),
        ("optimizer".to_string(), rng.pick(&["adamw", "lion", "sgd"]).to_string()),
        ("seed".to_string(), index.to_string()),
    ]
}

fn seed_runs(tracker: &Tracker, spec: &SeedSpec) -> Result<()> {
    let started = std::time::Instant::now();
    tracker.prepare_bulk()?;
    let experiment = tracker.experiment(&spec.experiment)?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let mut rng = SplitMix(spec.seed);
    for i in 0..spec.runs {
        let params = seed_params(&mut rng, i);
        let metrics: Vec<(String, Vec<f64>)> = (0..spec.metrics)
            .map(|m| {
                let curve = Curve::new(&mut rng, m, spec.steps);
                (metric_name(m), (1..=spec.steps).map(|s| curve.value(&mut rng, s)).collect())
            })
            .collect();
        let name = format!("seed-{i:04}");
        // A second apart, oldest first, all before now.
        let start = now - (spec.runs - i) as i64 * 1000 - spec.steps as i64;
        tracker.insert_run_bulk(experiment, &BulkRun { name: &name, params: &params, metrics: &metrics, status: "FINISHED" }, start)?;
    }
    println!(
        "seeded {} run(s) × {} metric(s) × {} step(s) into experiment {:?} (id {experiment}) in {:.2} s",
        spec.runs,
        spec.metrics,
        spec.steps,
        spec.experiment,
        started.elapsed().as_secs_f64()
    );
    let Some(seconds) = spec.live else { return Ok(()) };
    if !(seconds.is_finite() && seconds >= 0.0) {
        bail!("--live must be a number of seconds ≥ 0, not {seconds}");
    }
    let run = tracker.start_run(experiment, "seed-live")?;
    for (k, v) in seed_params(&mut rng, spec.runs) {
        tracker.log_param(&run, &k, &v)?;
    }
    let curves: Vec<Curve> = (0..spec.metrics).map(|m| Curve::new(&mut rng, m, spec.steps)).collect();
    println!("live run {run}: a point of every metric every 200 ms for {seconds} s");
    let end = std::time::Instant::now() + std::time::Duration::from_secs_f64(seconds);
    let mut step = 1;
    while std::time::Instant::now() < end {
        for (m, c) in curves.iter().enumerate() {
            tracker.log_metric(&run, &metric_name(m), c.value(&mut rng, step), step as i64)?;
        }
        step += 1;
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    tracker.end_run(&run, RunStatus::Finished)?;
    println!("live run {run} finished after {} step(s)", step - 1);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeded_numbers_are_splitmix64() {
        // Reference values of SplitMix64 from seed 0 (the first two outputs).
        let mut r = super::SplitMix(0);
        assert_eq!(r.next(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next(), 0x6E78_9E6A_A1B9_65F4);
    }
}
