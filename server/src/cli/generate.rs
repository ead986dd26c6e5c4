//! `atelier generate`: Generate images from the command line.

use anyhow::Result;

/// Arguments of `atelier generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {}

pub fn run(_args: GenerateArgs) -> Result<()> {
    anyhow::bail!("not yet implemented")
}
