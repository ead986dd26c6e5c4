//! `atelier eval-starter`: prompt adherence of the starter model on held-out
//! colour/shape/background triples, and the sharpness effect of a quality negative
//! prompt. Prints a table (or JSON) and can save contact sheets of every image.

use std::path::PathBuf;

use anyhow::{Context, Result};
use atelier_engine::pipeline::StableDiffusion;
use atelier_engine::sheet::contact_sheet;
use atelier_engine::starter::eval::{evaluate, held_out_cases, Adherence, EvalSettings};

/// Arguments of `atelier eval-starter`.
#[derive(Debug, clap::Args)]
pub struct EvalStarterArgs {
    /// The model to evaluate (diffusers folder).
    #[arg(long, env = "ATELIER_MODEL", default_value = "models/starter")]
    pub model: PathBuf,
    /// Evaluate only the first N held-out prompts (default: all).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Seed of the first prompt; prompt i uses seed + i.
    #[arg(long, default_value_t = 1000)]
    pub seed: u64,
    /// Denoising steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Guidance scale.
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// The negative prompt compared with an empty one.
    #[arg(long, default_value = "blurry, noisy")]
    pub negative_prompt: String,
    /// Folder for contact sheets (plain.png, negative.png) and report.json.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Recorded as a run in experiment "eval-starter".
    #[command(flatten)]
    pub track: super::Tracking,
}

fn row(name: &str, a: &Adherence) -> String {
    format!(
        "| {name} | {} | {:.1}% | {:.1}% | {:.1}% | {:.1}% | {:.0} |",
        a.images,
        a.colour * 100.0,
        a.background * 100.0,
        a.both * 100.0,
        a.shape * 100.0,
        a.mean_sharpness
    )
}

pub fn run(args: EvalStarterArgs) -> Result<()> {
    let device = crate::cli::device()?;
    let sd = StableDiffusion::load(&args.model, &device).with_context(|| format!("loading model {}", args.model.display()))?;
    let mut cases = held_out_cases(args.seed);
    if let Some(n) = args.limit {
        cases.truncate(n.max(1));
    }
    let settings =
        EvalSettings { steps: args.steps, guidance: args.guidance, quality_negative: args.negative_prompt.clone(), ..Default::default() };
    let bar = indicatif::ProgressBar::new(cases.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("evaluating [{bar:30}] {pos}/{len} prompts {elapsed} eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let (mut plain, mut negative) = (Vec::new(), Vec::new());
    let report = evaluate(
        &sd,
        &cases,
        &settings,
        &mut |done, _| {
            bar.set_position(done as u64);
            true
        },
        &mut |_, a, b| {
            plain.push(a.clone());
            negative.push(b.clone());
        },
    )?;
    bar.finish_and_clear();
    if let Some(t) = args.track.open() {
        let mut tags = super::run_tags(&device);
        tags.push(("model_hash", sd.model_hash().to_string()));
        let run = t.record(
            "eval-starter",
            &format!("eval-starter {}", args.model.display()),
            &serde_json::json!({ "model": args.model, "prompts": cases.len(), "seed": args.seed, "steps": args.steps, "guidance": args.guidance, "negative_prompt": args.negative_prompt, "scheduler": settings.scheduler.id() }),
            &tags,
        )?;
        for (prefix, a) in [("plain", &report.plain), ("negative", &report.with_negative)] {
            run.metrics(
                &[
                    (&format!("{prefix}_colour"), a.colour),
                    (&format!("{prefix}_background"), a.background),
                    (&format!("{prefix}_both"), a.both),
                    (&format!("{prefix}_shape"), a.shape),
                    (&format!("{prefix}_sharpness"), a.mean_sharpness),
                ],
                0,
            )?;
        }
        run.metrics(&[("sharper_fraction", report.sharper_fraction), ("seconds_per_image", report.seconds_per_image)], 0)?;
        if !plain.is_empty() {
            let sheets = tempfile::tempdir()?;
            for (key, images) in [("plain", &plain), ("negative", &negative)] {
                let path = sheets.path().join(format!("{key}.png"));
                contact_sheet(images, 12).save(&path).with_context(|| format!("writing {}", path.display()))?;
                run.image(&path, key, 0)?;
            }
        }
        run.finish()?;
        args.track.finish();
    }
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        contact_sheet(&plain, 12).save(dir.join("plain.png")).context("writing plain.png")?;
        contact_sheet(&negative, 12).save(dir.join("negative.png")).context("writing negative.png")?;
        std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&report)?).context("writing report.json")?;
    }
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(o) = v.as_object_mut() {
            o.remove("rows");
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("Held-out prompts: {} ({} steps, guidance {}, {})", cases.len(), args.steps, args.guidance, settings.scheduler.id());
    println!();
    println!("| negative prompt | images | shape colour | background | both | shape | sharpness (var. of Laplacian) |");
    println!("|---|---|---|---|---|---|---|");
    println!("{}", row("(empty)", &report.plain));
    println!("{}", row(&format!("\"{}\"", args.negative_prompt), &report.with_negative));
    println!();
    println!(
        "The negative prompt made {:.0}% of images sharper (mean sharpness {:.0} -> {:.0}, {:+.0}%).",
        report.sharper_fraction * 100.0,
        report.plain.mean_sharpness,
        report.with_negative.mean_sharpness,
        (report.with_negative.mean_sharpness / report.plain.mean_sharpness.max(1e-9) - 1.0) * 100.0
    );
    println!("Mean time per image: {:.3} s.", report.seconds_per_image);
    Ok(())
}
