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
    /// Recorded as a run in experiment "eval-styles", a child run per style.
    #[command(flatten)]
    pub track: super::Tracking,
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
    let tracker = args.track.open();
    let mut tags = super::run_tags(sd.device());
    tags.push(("base_model_hash", sd.model_hash().to_string()));
    let names: Vec<String> = entries.iter().map(|e| e.name.clone()).collect();
    let parent = match &tracker {
        Some(t) => Some(t.record("eval-styles", "eval-styles", &serde_json::json!({ "weights": args.weights, "model": args.model, "styles": names }), &tags)?),
        None => None,
    };
    let (mut base_sum, mut gain_sum, mut monotonic_count) = (0.0, 0.0, 0);
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
        let gain = sweep.last().copied().unwrap_or(base) - base;
        (base_sum, gain_sum, monotonic_count) = (base_sum + base, gain_sum + gain, monotonic_count + usize::from(monotonic));
        if let Some(p) = &parent {
            let child = p.child(&entry.name, &serde_json::json!({ "style": entry.name, "trigger": trigger }), &[("style_hash", entry.short_hash().unwrap_or_default())])?;
            // The sweep as a curve: step i is weight i of --weights.
            for (i, s) in sweep.iter().enumerate() {
                child.metric("similarity", *s, i as i64)?;
            }
            child.metrics(&[("base_similarity", base), ("similarity_gain", gain), ("monotonic", f64::from(u8::from(monotonic)))], 0)?;
            child.finish()?;
        }
        if args.json {
            println!("{}", serde_json::json!({"style": entry.name, "base": base, "weights": args.weights, "similarity": sweep, "monotonic": monotonic}));
        } else {
            let cells: Vec<String> = sweep.iter().map(|s| format!("{s:.4}")).collect();
            println!("| {} | {base:.4} | {} | {} |", entry.name, cells.join(" | "), if monotonic { "yes" } else { "no" });
        }
    }
    if let Some(p) = parent {
        let n = names.len().max(1) as f64;
        p.metrics(&[("mean_base_similarity", base_sum / n), ("mean_similarity_gain", gain_sum / n), ("monotonic_fraction", monotonic_count as f64 / n)], 0)?;
        p.finish()?;
    }
    args.track.finish();
    Ok(())
}
