//! `atelier reference`: Check the engine against reference data.

use anyhow::Result;

/// Arguments of `atelier reference`.
#[derive(Debug, clap::Args)]
pub struct ReferenceArgs {}

pub fn run(_args: ReferenceArgs) -> Result<()> {
    anyhow::bail!("not yet implemented")
}
