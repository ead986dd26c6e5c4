//! `atelier`: the studio's web server and command-line tools.

mod cli;
mod serve;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "atelier", version, about = "Atelier: a self-hosted Stable Diffusion studio")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the web studio (UI and JSON API).
    Serve(serve::ServeArgs),
    /// Generate images from the command line.
    Generate(cli::generate::GenerateArgs),
    /// Check the engine against reference data.
    Reference(cli::reference::ReferenceArgs),
    /// Measure generation speed.
    Bench(cli::bench::BenchArgs),
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve::run(args),
        Command::Generate(args) => cli::generate::run(args),
        Command::Reference(args) => cli::reference::run(args),
        Command::Bench(args) => cli::bench::run(args),
    }
}
