//! `atelier`: the studio's web server and command-line tools.

mod cli;
mod serve;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "atelier", version, about = "Atelier: a self-hosted Stable Diffusion studio")]
struct Cli {
    /// The compute device for every command: auto (CUDA, then Metal, then the CPU, as this
    /// build was compiled), cpu, cuda, cuda:N, metal or metal:N.
    #[arg(long, global = true, env = "ATELIER_DEVICE", default_value = "auto", value_parser = parse_device)]
    device: atelier_engine::device::DeviceChoice,
    #[command(subcommand)]
    command: Command,
}

fn parse_device(text: &str) -> Result<atelier_engine::device::DeviceChoice, String> {
    text.parse().map_err(|e: atelier_engine::Error| e.to_string())
}

#[derive(Subcommand)]
enum Command {
    /// Run the web studio (UI and JSON API).
    Serve(serve::ServeArgs),
    /// Generate images from the command line.
    Generate(cli::generate::GenerateArgs),
    /// Check the engine against reference data.
    Reference(cli::reference::ReferenceArgs),
    /// Convert a single-file SD 1.x checkpoint (.safetensors, LDM layout) into a diffusers folder.
    ConvertCheckpoint(cli::convert_checkpoint::ConvertCheckpointArgs),
    /// Measure generation speed.
    Bench(cli::bench::BenchArgs),
    /// Train the starter model from scratch on the procedural shapes world.
    TrainBase(cli::train_base::TrainBaseArgs),
    /// Measure the starter model's prompt adherence and negative-prompt effect.
    EvalStarter(cli::eval_starter::EvalStarterArgs),
    /// Measure the styles in the library: style similarity vs the base model and over a weight sweep.
    EvalStyles(cli::eval_styles::EvalStylesArgs),
    /// Write a training folder for one of the example picture styles (stripes, pointillism, inkline, pastel).
    StyleData(cli::style_data::StyleDataArgs),
    /// Train a LoRA style adapter from a folder of images into the style library.
    TrainStyle(cli::train_style::TrainStyleArgs),
    /// Blends of styles: share links, saved blends, baking into one adapter or the model.
    Blend(cli::blend::BlendArgs),
    /// Find the negative prompt that measurably improves a prompt's images, with before/after scores.
    OptimizeNegative(cli::optimize_negative::OptimizeNegativeArgs),
    /// Measure negative-prompt optimisation on held-out starter prompts (table).
    EvalNegatives(cli::eval_negatives::EvalNegativesArgs),
    /// Tracked runs (trainings, optimisations, evaluations): list with an MLflow filter, show, sync to MLflow.
    Runs(cli::runs::RunsArgs),
    /// The model registry: registered styles, their versions and aliases (production, staging, …).
    Registry(cli::registry::RegistryArgs),
    /// Style datasets versioned in DVC's layout: list, show, diff, add, remove, checkout, push, pull, remotes.
    Datasets(cli::datasets::DatasetsArgs),
    /// Deployments: serving endpoints bound to registry versions (create, list, show, delete).
    Deploy(cli::deploy::DeployArgs),
    /// Export for other platforms: `coreml` writes Core ML packages, `ios-app` a SwiftUI app around them.
    Export {
        #[command(subcommand)]
        command: cli::ExportCommand,
    },
}

fn main() -> Result<()> {
    // Piped into `head` or `less`, stop quietly when the reader goes away (as other unix
    // tools do) instead of panicking on the next print.
    #[cfg(unix)]
    // SAFETY: restores the default action of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Feature maps of 10–100 MiB are allocated and freed hundreds of times per UNet step:
    // keep freed memory mapped instead of faulting fresh pages in every time.
    atelier_engine::memory::keep_freed_memory();
    // Candle sizes its thread pools from RAYON_NUM_THREADS; when it is unset it reads
    // /proc/cpuinfo on every parallel operation, which costs several percent.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let cli = Cli::parse();
    cli::set_device_choice(cli.device);
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Generate(args) => cli::generate::run(args),
        Command::Reference(args) => cli::reference::run(args),
        Command::ConvertCheckpoint(args) => cli::convert_checkpoint::run(args),
        Command::Bench(args) => cli::bench::run(args),
        Command::TrainBase(args) => cli::train_base::run(args),
        Command::EvalStarter(args) => cli::eval_starter::run(args),
        Command::TrainStyle(args) => cli::train_style::run(args),
        Command::EvalStyles(args) => cli::eval_styles::run(args),
        Command::StyleData(args) => cli::style_data::run(args),
        Command::Blend(args) => cli::blend::run(args),
        Command::OptimizeNegative(args) => cli::optimize_negative::run(args),
        Command::EvalNegatives(args) => cli::eval_negatives::run(args),
        Command::Runs(args) => cli::runs::run(args),
        Command::Registry(args) => cli::registry::run(args),
        Command::Datasets(args) => cli::datasets::run(args),
        Command::Deploy(args) => cli::deploy::run(args),
        Command::Export { command } => match command {
            cli::ExportCommand::IosApp(args) => cli::export_ios::run(args),
            cli::ExportCommand::Coreml(args) => cli::export_coreml::run(args),
        },
    }
}
