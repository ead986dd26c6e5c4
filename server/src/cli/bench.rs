//! `atelier bench`: Measure generation speed.

use anyhow::Result;

/// Arguments of `atelier bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {}

pub fn run(_args: BenchArgs) -> Result<()> {
    anyhow::bail!("not yet implemented")
}
