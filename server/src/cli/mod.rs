//! The command-line subcommands other than `serve`.

pub mod bench;
pub mod bench_coreml;
pub mod bench_torch;
pub mod blend;
pub mod datasets;
pub mod deploy;
pub mod eval_negatives;
pub mod export_coreml;
pub mod eval_starter;
pub mod eval_styles;
pub mod export_ios;
pub mod generate;
pub mod optimize_negative;
pub mod reference;
pub mod convert_checkpoint;
pub mod registry;
pub mod runs;
pub mod style_data;
pub mod train_base;
pub mod train_style;

/// `atelier export …`: packaging models and apps for other platforms.
#[derive(Debug, clap::Subcommand)]
pub enum ExportCommand {
    /// A SwiftUI app (Xcode / Swift Playgrounds app package) around a Core ML export folder.
    IosApp(export_ios::IosAppArgs),
    /// Core ML packages (TextEncoder, Unet or UnetChunk1/2, VAEDecoder, VAEEncoder) with a
    /// style, blend or LoRA merged in, as Apple's ml-stable-diffusion Swift package loads them.
    Coreml(export_coreml::CoremlArgs),
}

static DEVICE_CHOICE: std::sync::OnceLock<atelier_engine::device::DeviceChoice> = std::sync::OnceLock::new();

/// Records the global `--device` (`ATELIER_DEVICE`) for [`device`]; the first call wins.
pub fn set_device_choice(choice: atelier_engine::device::DeviceChoice) {
    let _ = DEVICE_CHOICE.set(choice);
}

/// The compute device every command runs on: the global `--device` choice (default
/// `auto`: CUDA, then Metal, then the CPU, as compiled), opened once per call.
///
/// # Errors
/// A device this build lacks or the driver cannot open, saying what to do instead.
pub fn device() -> anyhow::Result<candle_core::Device> {
    let choice = DEVICE_CHOICE.get().copied().unwrap_or_default();
    Ok(choice.open()?)
}

/// `--max-memory`: a size such as `12GiB`, `512MiB` or a byte count.
pub fn parse_budget(text: &str) -> Result<atelier_engine::memory::MemoryBudget, String> {
    atelier_engine::memory::parse_size(text)
        .map(|limit| atelier_engine::memory::MemoryBudget { limit })
        .ok_or_else(|| format!("{text:?} is not a size; write it like 12GiB, 512MiB or 8G"))
}

/// `--alpha-background`: `white`, `black`, `grey` or `#RRGGBB`.
pub fn parse_background(text: &str) -> Result<[u8; 3], String> {
    atelier_engine::image_input::parse_colour(text).ok_or_else(|| format!("{text:?} is not a colour; write white, black, grey or #RRGGBB"))
}

/// `--tracking-uri`: the MLflow server runs are mirrored to (MLflow's own
/// `MLFLOW_TRACKING_URI` when not given). Runs are always kept in the embedded store too.
#[derive(Debug, Clone, clap::Args)]
pub struct TrackingUri {
    /// MLflow tracking server to mirror runs to, e.g. http://127.0.0.1:5000 (credentials
    /// from MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD).
    #[arg(long = "tracking-uri", env = "MLFLOW_TRACKING_URI")]
    pub uri: Option<String>,
}

impl TrackingUri {
    /// The server, if one is configured.
    ///
    /// # Errors
    /// A URI that is not http(s), saying how to write it.
    pub fn server(&self) -> anyhow::Result<Option<atelier_server::tracking::mlflow::ServerConfig>> {
        self.uri
            .as_deref()
            .filter(|u| !u.trim().is_empty())
            .map(|u| atelier_server::tracking::mlflow::ServerConfig::new(u).map_err(anyhow::Error::msg))
            .transpose()
    }

    /// After a command recorded runs in `tracking`: sends what is pending to the server
    /// (if one is configured) and prints a line; an unreachable server is a warning, as
    /// the runs stay recorded and `atelier runs sync` sends them later.
    pub fn mirror(&self, tracking: &std::path::Path) {
        let server = match self.server() {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                eprintln!("warning: {e:#}");
                return;
            }
        };
        let client = atelier_server::tracking::mlflow::Client::new(server);
        let outcome = atelier_server::tracking::Tracker::open(tracking)
            .and_then(|t| atelier_server::tracking::mlflow::Mirror::new(&t, &client).sync_pending(&mut |_| {}));
        match outcome {
            Ok(report) => {
                let sent: usize = report.synced.iter().map(|r| r.metrics).sum();
                println!(
                    "mirrored {} run(s) ({sent} metric points), {} model version(s) and {} alias change(s) to MLflow at {}",
                    report.synced.len(),
                    report.versions,
                    report.aliases,
                    client.uri()
                );
                for (_, name, message) in &report.refused {
                    eprintln!("warning: MLflow refused run {name}: {message}");
                }
                if let Some(e) = report.interrupted {
                    eprintln!(
                        "warning: {e}\n{} run(s) waiting to sync: they are kept in {}; `atelier runs sync --tracking {}` sends them when the server is back",
                        report.pending,
                        tracking.display(),
                        tracking.display()
                    );
                }
            }
            Err(e) => eprintln!("warning: syncing runs to MLflow: {}", atelier_server::error::report(&e)),
        }
    }
}

/// Where a command records its run: the embedded store, and the MLflow server it is
/// mirrored to when one is configured.
#[derive(Debug, Clone, clap::Args)]
pub struct Tracking {
    /// The embedded experiment store (the studio keeps it in DATA/tracking).
    #[arg(long, env = "ATELIER_TRACKING", default_value = "data/tracking")]
    pub tracking: std::path::PathBuf,
    #[command(flatten)]
    pub uri: TrackingUri,
    /// Do not record this command as a run.
    #[arg(long)]
    pub no_track: bool,
}

impl Tracking {
    /// The store, unless `--no-track`; an unusable store is a warning (the command's own
    /// work matters more than its record).
    pub fn open(&self) -> Option<atelier_server::tracking::Tracker> {
        if self.no_track {
            return None;
        }
        match atelier_server::tracking::Tracker::open(&self.tracking) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("warning: not recording this run: {}", atelier_server::error::report(&e));
                None
            }
        }
    }

    /// After the command: mirrors its runs to MLflow when a server is configured.
    pub fn finish(&self) {
        if !self.no_track {
            self.uri.mirror(&self.tracking);
        }
    }
}

/// Tags of a command run on `device`: device and dtype (the engine computes in f32).
pub fn run_tags(device: &candle_core::Device) -> Vec<(&'static str, String)> {
    vec![("device", atelier_server::tracking::device_tag(device)), ("dtype", "f32".to_string())]
}
