//! `atelier convert-checkpoint`: a single-file checkpoint (`.safetensors`, original LDM / SGM
//! key layout, as A1111 and Civitai use) written out as a diffusers folder, the way diffusers'
//! `from_single_file(...).save_pretrained(...)` does.

use std::path::PathBuf;

use anyhow::Result;

/// Arguments of `atelier convert-checkpoint`.
#[derive(Debug, clap::Args)]
pub struct ConvertCheckpointArgs {
    /// The checkpoint file (`.safetensors`; pickled `.ckpt` files are refused).
    pub file: PathBuf,
    /// A diffusers folder of the same architecture, whose configs and tokenizers are copied
    /// (the weights cannot tell heads, activations or the scheduler). Not needed for the
    /// standard SD 1.x and SDXL base architectures, which are recognised from the weights.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The diffusers folder to write; it must not exist yet.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: ConvertCheckpointArgs) -> Result<()> {
    if args.out.exists() {
        anyhow::bail!("{} already exists; choose another --out or remove it", args.out.display());
    }
    let config = match args.config {
        Some(c) => c,
        None => atelier_engine::presets::preset_for(&args.file)?.config_dir(&atelier_engine::presets::default_root())?,
    };
    atelier_engine::single_file::convert(&args.file, &config, &args.out)?;
    println!("wrote {} (use it as --model)", args.out.display());
    Ok(())
}
