//! `atelier style-data`: writes a training folder for one of the example picture styles
//! (restyled renders of the starter model's shapes world, with `.txt` captions), from
//! which the shipped styles are trained.

use std::path::PathBuf;

use anyhow::{Context, Result};
use atelier_engine::starter::styles::{write_dataset, PictureStyle};

/// Arguments of `atelier style-data`.
#[derive(Debug, clap::Args)]
pub struct StyleDataArgs {
    /// stripes, pointillism, inkline or pastel.
    #[arg(long)]
    pub style: String,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Number of images.
    #[arg(long, default_value_t = 40)]
    pub count: usize,
    /// Seed of the shapes world.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

pub fn run(args: StyleDataArgs) -> Result<()> {
    let style = PictureStyle::from_name(&args.style).with_context(|| {
        let names: Vec<&str> = PictureStyle::ALL.iter().map(|s| s.name()).collect();
        format!("unknown style {}; choose one of {}", args.style, names.join(", "))
    })?;
    write_dataset(style, &args.out, args.count, args.seed)?;
    println!("wrote {} {} images with captions to {}", args.count, style.name(), args.out.display());
    Ok(())
}
