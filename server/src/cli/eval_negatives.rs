//! `atelier eval-negatives`: the negative-prompt optimisation on held-out prompts of the
//! starter world, as a table: for each prompt, the winner, its gain on the search seeds,
//! and what it does on new seeds compared with the empty negative prompt.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use app::dto::{OptimizeRequest, OptimizeState};
use atelier_server::negatives::service::{execute, new_status};
use atelier_server::negatives::Context;
use atelier_server::styles::StyleLibrary;
use atelier_server::{Generator, LoadedModel};

/// Arguments of `atelier eval-negatives`.
#[derive(Debug, clap::Args)]
pub struct EvalNegativesArgs {
    /// How many held-out prompts (spread over the 108 colour/shape/background/size cases).
    #[arg(long, default_value_t = 6)]
    pub prompts: usize,
    #[arg(long, default_value_t = 6)]
    pub candidates: usize,
    #[arg(long, default_value_t = 4)]
    pub seeds: usize,
    #[arg(long, default_value_t = 4)]
    pub holdout_seeds: usize,
    #[arg(long, env = "ATELIER_MODEL", default_value = "models/starter")]
    pub model: PathBuf,
    /// Recorded as a run in experiment "eval-negatives", a child run per prompt.
    #[command(flatten)]
    pub track: super::Tracking,
}

pub fn run(args: EvalNegativesArgs) -> Result<()> {
    let model = LoadedModel::load(&args.model, &crate::cli::device()?).with_context(|| format!("loading {}", args.model.display()))?;
    let size = model.default_size;
    let generator: Arc<dyn Generator> = Arc::new(model);
    let cases = atelier_engine::starter::eval::held_out_cases(0);
    let step = (cases.len() / args.prompts.max(1)).max(1);
    let tracker = args.track.open();
    let parent = match &tracker {
        Some(t) => Some(t.record(
            "eval-negatives",
            "eval-negatives",
            &serde_json::json!({ "prompts": args.prompts, "candidates": args.candidates, "seeds": args.seeds, "holdout_seeds": args.holdout_seeds, "model": args.model }),
            &[("model_hash", generator.model_hash())],
        )?),
        None => None,
    };
    println!("| prompt | winner | Δ search seeds | Δ new seeds | new seeds better | verdict |");
    println!("|---|---|---|---|---|---|");
    let (mut adopted_sum, mut helped, mut n) = (0.0, 0, 0);
    for case in cases.iter().step_by(step).take(args.prompts) {
        // A fresh studio per prompt: no history from the other prompts.
        let tmp = tempfile::tempdir()?;
        let ctx = Context::new(tmp.path().join("negatives"), generator.clone(), Arc::new(StyleLibrary::new(tmp.path().join("styles"))), tmp.path().join("tracking"), size);
        let request = OptimizeRequest {
            prompt: case.prompt.clone(),
            candidates: args.candidates,
            seeds: args.seeds,
            holdout_seeds: args.holdout_seeds,
            ..OptimizeRequest::default()
        };
        let status = execute(&ctx, new_status(request), &AtomicBool::new(false), &mut |_| {});
        if let OptimizeState::Failed { message } = &status.state {
            anyhow::bail!("{}: {message}", case.prompt);
        }
        let r = status.result.context("no result")?;
        n += 1;
        let (winner, search, new, better) = match r.winner {
            Some(w) => {
                let c = &r.candidates[w];
                let d = r.holdout_mean_delta.unwrap_or(0.0);
                // The studio adopts the winner only when it held on the new seeds.
                if r.helped {
                    adopted_sum += d;
                    helped += 1;
                }
                (format!("\"{}\"", c.negative), format!("{:+.4}", c.mean_delta), format!("{d:+.4}"), format!("{}/{}", r.holdout_improved.unwrap_or(0), r.holdout_seeds.len()))
            }
            None => ("none".into(), "".into(), "".into(), "".into()),
        };
        let verdict = if r.helped { "helped" } else if r.winner.is_some() { "did not hold" } else { "nothing helped" };
        if let Some(p) = &parent {
            let winner_text = r.winner.map(|w| r.candidates[w].negative.clone()).unwrap_or_default();
            let child = p.child(&case.prompt, &serde_json::json!({ "prompt": case.prompt }), &[("winner", winner_text), ("verdict", verdict.to_string())])?;
            child.metrics(&[("baseline_mean_score", r.baseline.mean), ("helped", f64::from(u8::from(r.helped)))], 0)?;
            if let Some(w) = r.winner {
                child.metrics(&[("search_mean_delta", r.candidates[w].mean_delta), ("holdout_mean_delta", r.holdout_mean_delta.unwrap_or(0.0))], 0)?;
            }
            child.finish()?;
        }
        println!("| {} | {winner} | {search} | {new} | {better} | {verdict} |", case.prompt);
    }
    println!(
        "\n{helped} of {n} prompts got a negative prompt that beat the empty one on new seeds; mean change of the combined score on new seeds over all {n} prompts (keeping the empty negative where nothing helped): {:+.4}",
        adopted_sum / n.max(1) as f64
    );
    if let Some(p) = parent {
        p.metrics(&[("helped_fraction", helped as f64 / n.max(1) as f64), ("mean_adopted_delta", adopted_sum / n.max(1) as f64)], 0)?;
        p.finish()?;
        args.track.finish();
    }
    Ok(())
}
