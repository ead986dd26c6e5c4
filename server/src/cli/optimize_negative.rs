//! `atelier optimize-negative`: the web page's optimisation from the command line, with a
//! progress bar, Ctrl-C to cancel, and the same run folder, history and experiment store.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use app::dto::{OptimizeRequest, OptimizeState};
use atelier_server::negatives::service::{execute, new_status};
use atelier_server::negatives::Context;
use atelier_server::styles::StyleLibrary;
use atelier_server::{Generator, LoadedModel};
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `atelier optimize-negative`.
#[derive(Debug, clap::Args)]
pub struct OptimizeNegativeArgs {
    #[command(flatten)]
    pub tracking_uri: super::TrackingUri,
    #[arg(long)]
    pub prompt: String,
    /// The baseline negative prompt (default: none).
    #[arg(long = "negative-prompt", default_value = "")]
    pub negative_prompt: String,
    /// A style from the library: applied, and scored for style similarity.
    #[arg(long)]
    pub style: Option<String>,
    #[arg(long, default_value_t = 1.0)]
    pub style_weight: f64,
    /// How many suggestions to try.
    #[arg(long, default_value_t = 6)]
    pub candidates: usize,
    /// Your own candidate negative prompt (repeatable).
    #[arg(long = "candidate")]
    pub own: Vec<String>,
    /// Search seeds (every candidate is rendered on each).
    #[arg(long, default_value_t = 4)]
    pub seeds: usize,
    /// New seeds the winner is checked on afterwards.
    #[arg(long, default_value_t = 4)]
    pub holdout_seeds: usize,
    /// First search seed.
    #[arg(long, default_value_t = 1000)]
    pub seed: u64,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// Combined-score weights, e.g. `sharpness=0.4,noise=0.3` (others keep their defaults).
    #[arg(long, default_value = "")]
    pub weights: String,
    #[arg(long, env = "ATELIER_MODEL", default_value = "models/starter")]
    pub model: PathBuf,
    /// The studio's data folder (runs go to DATA/negatives, the experiment store to DATA/tracking).
    #[arg(long, env = "ATELIER_DATA", default_value = "data")]
    pub data_dir: PathBuf,
    /// Folder of shipped (read-only) styles.
    #[arg(long, default_value = "models/styles")]
    pub shipped: PathBuf,
    /// Print the final status as JSON instead of the tables.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: OptimizeNegativeArgs) -> Result<()> {
    let weights = atelier_engine::quality::Weights::parse(&args.weights).map_err(anyhow::Error::msg)?;
    let weights_map = atelier_engine::quality::METRIC_NAMES.iter().filter_map(|n| weights.get(n).map(|w| (n.to_string(), w))).collect();
    let request = OptimizeRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        style: args.style.clone(),
        style_weight: args.style_weight,
        candidates: args.candidates,
        own: args.own.clone(),
        seeds: args.seeds,
        holdout_seeds: args.holdout_seeds,
        seed: args.seed,
        steps: args.steps,
        guidance: args.guidance,
        weights: weights_map,
    };
    let styles = StyleLibrary::new(args.data_dir.join("styles")).with_shipped(args.shipped.clone());
    let model = LoadedModel::load(&args.model, &crate::cli::device()?)
        .with_context(|| format!("loading the model from {}", args.model.display()))?
        .with_styles(styles.clone());
    let size = model.default_size;
    let generator: Arc<dyn Generator> = Arc::new(model);
    let ctx = Context::new(args.data_dir.join("negatives"), generator, Arc::new(styles), args.data_dir.join("tracking"), size);
    ctx.check(&request)?;

    if !args.json {
        let analysis = ctx.analyze(&request.prompt, &request.negative_prompt)?;
        eprintln!("subject: {}   style cues: {}", or_none(&analysis.subject), or_none(&analysis.style_cues));
        for c in &analysis.contradictions {
            eprintln!("warning: {}", c.message);
        }
    }

    let cancel = Arc::new(AtomicBool::new(false));
    {
        let cancel = cancel.clone();
        ctrlc::set_handler(move || cancel.store(true, Ordering::SeqCst)).context("installing the Ctrl-C handler")?;
    }
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template("[{bar:30}] {pos}/{len} images {elapsed} eta {eta}  {msg}").expect("valid template").progress_chars("=> "),
    );
    let status = new_status(request);
    let id = status.id.clone();
    let status = execute(&ctx, status, &cancel, &mut |s| {
        bar.set_length(s.total.max(1) as u64);
        bar.set_position(s.done as u64);
        bar.set_message(s.phase.clone());
    });
    bar.finish_and_clear();

    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    }
    match &status.state {
        OptimizeState::Done => {}
        OptimizeState::Cancelled => anyhow::bail!("cancelled; the images so far are in {}", ctx.run_dir(&id).display()),
        OptimizeState::Failed { message } => anyhow::bail!("{message}"),
        other => anyhow::bail!("ended in state {}", other.name()),
    }
    let result = status.result.as_ref().context("no result")?;
    if !args.json {
        println!("| negative prompt | source | mean score | Δ vs baseline | seeds better | p (sign test) |");
        println!("|---|---|---|---|---|---|");
        let label = |n: &str| if n.is_empty() { "(none)".to_string() } else { format!("\"{n}\"") };
        let b = &result.baseline;
        println!("| {} | baseline | {:.4} | | | |", label(&b.negative), b.mean);
        for (i, c) in result.candidates.iter().enumerate() {
            let mark = if Some(i) == result.winner { " **winner**" } else { "" };
            println!(
                "| {}{mark} | {} | {:.4} | {:+.4} | {}/{} | {:.3} |",
                label(&c.negative),
                c.source,
                c.mean,
                c.mean_delta,
                c.improved,
                c.scores.len(),
                c.p_value
            );
        }
        if let Some(w) = result.winner {
            let deltas = &result.candidates[w].metric_deltas;
            let cells: Vec<String> = deltas.iter().map(|(k, v)| format!("{k} {v:+.4}")).collect();
            println!("\nwinner, per metric (search seeds): {}", cells.join(", "));
            if !result.holdout_metric_deltas.is_empty() {
                let cells: Vec<String> = result.holdout_metric_deltas.iter().map(|(k, v)| format!("{k} {v:+.4}")).collect();
                println!("winner, per metric (held-out seeds): {}", cells.join(", "));
            }
        }
        println!("\n{}", result.verdict);
        println!("images and status: {}", ctx.run_dir(&id).display());
        if let Some(run) = &status.tracking_run {
            println!("experiment store run: {run}");
        }
    }
    args.tracking_uri.mirror(&args.data_dir.join("tracking"));
    Ok(())
}

fn or_none(v: &[String]) -> String {
    if v.is_empty() { "none".into() } else { v.join(", ") }
}
