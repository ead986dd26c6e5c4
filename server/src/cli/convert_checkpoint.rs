//! `atelier convert-checkpoint`: a single-file SD 1.x checkpoint (`.safetensors`, CompVis
//! LDM key layout, as A1111 and Civitai use) written out as a diffusers folder, the way
//! diffusers' `from_single_file(...).save_pretrained(...)` does.

use std::path::PathBuf;

use anyhow::Result;

/// Arguments of `atelier convert-checkpoint`.
#[derive(Debug, clap::Args)]
pub struct ConvertCheckpointArgs {
    /// The checkpoint file (`.safetensors`; pickled `.ckpt` files are refused).
    pub file: PathBuf,
    /// A diffusers folder of the same architecture: its configs and tokenizer are copied
    /// (the weights cannot tell heads, group counts or the scheduler).
    #[arg(long)]
    pub config: PathBuf,
    /// The diffusers folder to write; it must not exist yet.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: ConvertCheckpointArgs) -> Result<()> {
    if args.out.exists() {
        anyhow::bail!("{} already exists; choose another --out or remove it", args.out.display());
    }
    atelier_engine::single_file::convert(&args.file, &args.config, &args.out)?;
    println!("wrote {} (use it as --model)", args.out.display());
    Ok(())
}
