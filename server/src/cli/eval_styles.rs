//! `atelier eval-styles`: for each style in the library, its style similarity (see
//! `atelier_engine::style::metrics`) on held-out prompts with the base model and with
//! the style at a sweep of weights, as a table.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use atelier_engine::pipeline::StableDiffusion;
use atelier_engine::style::metrics::{load_style_grams, render_set, starter_eval_prompts, style_similarity};
use atelier_server::styles::StyleLibrary;

use super::train_style::{EVAL_SEED, STYLE_GRAMS};

/// Arguments of `atelier eval-styles`.
#[derive(Debug, clap::Args)]
pub struct EvalStylesArgs {
    /// Styles to measure (repeatable); default: every style with measurements.
    #[arg(long = "style")]
    pub styles: Vec<String>,
    /// Adapter weights of the sweep.
    #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.5,0.75,1")]
    pub weights: Vec<f64>,
    /// Base model folder or hub id.
    #[arg(long, env = "ATELIER_MODEL", default_value = "models/starter")]
    pub model: String,
    #[arg(long, env = "ATELIER_STYLES", default_value = "data/styles")]
    pub library: PathBuf,
    /// Folder of shipped (read-only) styles.
    #[arg(long, default_value = "models/styles")]
    pub shipped: PathBuf,
    /// One JSON object per style instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: EvalStylesArgs) -> Result<()> {
    let library = StyleLibrary::new(args.library.clone()).with_shipped(args.shipped.clone());
    let model_dir = atelier_engine::model::resolve(&args.model)?;
    let sd = StableDiffusion::load(&model_dir, &crate::cli::device()?).with_context(|| format!("loading {}", model_dir.display()))?;
    let entries: Vec<_> = if args.styles.is_empty() {
        library.list().into_iter().filter(|s| s.dir.join(STYLE_GRAMS).is_file()).collect()
    } else {
        args.styles
            .iter()
            .map(|n| library.find(n).with_context(|| format!("no style called {n}")))
            .collect::<Result<_>>()?
    };
    if entries.is_empty() {
        anyhow::bail!("no measured styles in {} or {}; train one with `atelier train-style`", args.library.display(), args.shipped.display());
    }
    if !args.json {
        let ws: Vec<String> = args.weights.iter().map(|w| format!("w={w}")).collect();
        println!("| style | base model | {} | rises monotonically |", ws.join(" | "));
        println!("|---|---|{}---|", "---|".repeat(args.weights.len()));
    }
    for entry in entries {
        let trigger = entry.card.as_ref().map_or(entry.name.clone(), |c| c.trigger.clone());
        let reference = load_style_grams(&entry.dir, sd.device())?;
        let lora = sd.bind_lora(&Arc::new(atelier_engine::lora::LoraAdapter::load(&entry.adapter())?))?;
        let prompts = starter_eval_prompts(&trigger);
        let sim = |w: Option<f64>| -> Result<f64> {
            let images = render_set(&sd, w.map(|w| (&lora, w)), &prompts, EVAL_SEED)?;
            Ok(style_similarity(&atelier_engine::style::metrics::mean_grams(sd.vae(), &images)?, &reference)?)
        };
        let base = sim(None)?;
        let sweep: Vec<f64> = args.weights.iter().map(|&w| sim(Some(w))).collect::<Result<_>>()?;
        let monotonic = sweep.windows(2).all(|p| p[1] >= p[0]);
        if args.json {
            println!("{}", serde_json::json!({"style": entry.name, "base": base, "weights": args.weights, "similarity": sweep, "monotonic": monotonic}));
        } else {
            let cells: Vec<String> = sweep.iter().map(|s| format!("{s:.4}")).collect();
            println!("| {} | {base:.4} | {} | {} |", entry.name, cells.join(" | "), if monotonic { "yes" } else { "no" });
        }
    }
    Ok(())
}
