//! `atelier reference`: recompute diffusers reference cases with the engine and write
//! the outputs, so they can be compared with the cases' EXPECTED tensors.

use std::path::PathBuf;

use anyhow::{Context, Result};
use atelier_engine::attention::AttentionKind;
use atelier_engine::model::save_safetensors_atomic;
use atelier_engine::reference::{discover, max_abs_diff, ReferenceRunner};
use candle_core::Device;

/// Arguments of `atelier reference`.
#[derive(Debug, clap::Args)]
pub struct ReferenceArgs {
    /// The diffusers model folder the cases were computed with, or a single-file checkpoint
    /// (`.safetensors`, original LDM / SGM key layout): SD 1.x, 2.x and SDXL base are
    /// recognised from their keys and shapes; anything else needs `--config`.
    #[arg(long)]
    pub model: PathBuf,
    /// For a single-file `--model` of a non-standard architecture (such as the tiny test
    /// models): the diffusers folder whose configs and tokenizers it uses (what weights
    /// cannot say: heads, groups, activations, scheduler), as diffusers'
    /// `from_single_file(config=…)`. The file is converted once into the user cache
    /// (`~/.cache/atelier/checkpoints`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Folder holding case files (`NAME.json` + `NAME.safetensors`).
    #[arg(long)]
    pub cases: PathBuf,
    /// Output folder; each case is written to `OUT/NAME.safetensors`.
    #[arg(long)]
    pub out: PathBuf,
    /// Attention implementation: original or split-einsum.
    #[arg(long, default_value = "original")]
    pub attention: String,
}

pub fn run(args: ReferenceArgs) -> Result<()> {
    let attention: AttentionKind = args.attention.parse()?;
    let cases = discover(&args.cases).with_context(|| format!("reading cases in {}", args.cases.display()))?;
    if cases.is_empty() {
        anyhow::bail!("no recognised case files in {}", args.cases.display());
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let model = if args.model.is_file() {
        atelier_engine::presets::materialize_checkpoint(&args.model, args.config.as_deref(), &atelier_engine::single_file::default_cache())?
    } else {
        args.model.clone()
    };
    let runner = ReferenceRunner::new(&model, &Device::Cpu, attention)?;
    let bar = indicatif::ProgressBar::new(cases.len() as u64);
    for case in &cases {
        bar.set_message(case.name.clone());
        let out = runner.run(case).with_context(|| format!("case {}", case.name))?;
        save_safetensors_atomic(&out, &args.out.join(format!("{}.safetensors", case.name)))?;
        // Report how far each output is from the case's expected tensor, when present.
        let expected = atelier_engine::model::load_safetensors(&case.tensors_path, &Device::Cpu)?;
        for name in &case.expected {
            if let (Some(g), Some(e)) = (out.get(name), expected.get(name)) {
                let g = g.to_dtype(candle_core::DType::F64)?;
                let e = e.to_dtype(candle_core::DType::F64)?;
                let line = format!("{:<28} {:<18} max|diff| {:.3e}", case.name, name, max_abs_diff(&g, &e)?);
                // `println` on a hidden bar (output not a terminal) would drop the line.
                bar.suspend(|| println!("{line}"));
            }
        }
        bar.inc(1);
    }
    bar.finish_with_message("done");
    Ok(())
}
