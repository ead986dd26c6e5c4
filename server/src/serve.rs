//! `atelier serve`: loads the model, opens the gallery and serves the studio until Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use atelier_server::styles::trainer::{ModelSource, Trainer};
use atelier_engine::memory::MemoryBudget;
use atelier_server::{AppState, Generator, LoadedModel, Throttled};
use leptos::config::LeptosOptions;

/// Arguments of `atelier serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "ATELIER_ADDR", default_value = "127.0.0.1:3000")]
    addr: SocketAddr,
    /// The model to load: a diffusers folder, a hub id in the Hugging Face cache, or a single-file
    /// `.safetensors` checkpoint (SD 1.x / SDXL base, recognised from its weights).
    #[arg(long, env = "ATELIER_MODEL", default_value = "models/starter")]
    model: PathBuf,
    /// Folder for the gallery (images and their database); created if missing.
    #[arg(long, env = "ATELIER_DATA", default_value = "data")]
    data_dir: PathBuf,
    /// The built site (`cargo run -p xtask -- build` writes it): pkg/atelier.js, .wasm, .css.
    #[arg(long, env = "ATELIER_SITE_ROOT", default_value = "target/site")]
    site_root: PathBuf,
    /// Make every denoising step take at least this many milliseconds, so live progress is
    /// visible with the tiny built-in model (demos, the browser test). 0 = full speed.
    #[arg(long, env = "ATELIER_MIN_STEP_MS", default_value_t = 0)]
    min_step_ms: u64,
    /// Memory this process may use (e.g. `12GiB`, `512MiB`); requests that would need more
    /// are refused with what would fit. Default: three quarters of the machine's memory.
    #[arg(long, env = "ATELIER_MAX_MEMORY", value_parser = crate::cli::parse_budget)]
    max_memory: Option<MemoryBudget>,
    /// Colour that transparent parts of input images (datasets, img2img) are composited
    /// onto before any resize: white (as A1111), black, grey or #RRGGBB.
    #[arg(long, env = "ATELIER_ALPHA_BACKGROUND", value_parser = crate::cli::parse_background)]
    alpha_background: Option<[u8; 3]>,
    #[command(flatten)]
    tracking_uri: crate::cli::TrackingUri,
    /// Token other Atelier servers must send to push deployments here
    /// (`atelier deploy create … --to URL --token T`); without one, pushes are refused.
    #[arg(long, env = "ATELIER_DEPLOY_TOKEN", hide_env_values = true)]
    deploy_token: Option<String>,
    /// Where quality-drift alerts of deployments are POSTed, in Alertmanager's webhook
    /// payload shape (any Alertmanager webhook receiver takes them).
    #[arg(long, env = "ATELIER_ALERT_WEBHOOK")]
    alert_webhook: Option<String>,
    /// The address people reach the studio at, for the links in alerts (default: the
    /// address it listens on).
    #[arg(long, env = "ATELIER_EXTERNAL_URL")]
    external_url: Option<String>,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> Result<()> {
    let pkg = args.site_root.join("pkg");
    for file in ["atelier.js", "atelier_bg.wasm", "atelier.css"] {
        if !pkg.join(file).is_file() {
            tracing::warn!(
                "{} is missing: the page will not be interactive; build the site with `cargo run -p xtask -- build`",
                pkg.join(file).display()
            );
        }
    }

    if let Some(rgb) = args.alpha_background {
        atelier_engine::image_input::set_background(rgb);
    }
    let budget = args.max_memory.unwrap_or_else(MemoryBudget::from_machine);
    atelier_server::monitoring::metrics::set_memory_limit(budget.limit);
    tracing::info!(limit = %atelier_engine::memory::format_bytes(budget.limit), "memory budget (--max-memory)");
    let device = crate::cli::device().context("opening the compute device")?;
    tracing::info!(model = %args.model.display(), ?device, "loading model");
    let model_dir = args.model.clone();
    let load_device = device.clone();
    let began = std::time::Instant::now();
    let model = tokio::task::spawn_blocking(move || LoadedModel::load(&model_dir, &load_device))
        .await?
        .with_context(|| format!("loading the model from {}", args.model.display()))?;
    atelier_server::monitoring::metrics::set_model_load_seconds("generation", began.elapsed());
    let styles = atelier_server::styles::StyleLibrary::new(args.data_dir.join("styles")).with_shipped(std::path::PathBuf::from("models/styles"));
    let model = model.with_styles(styles.clone());
    let default_size = model.default_size;
    let note = model.note.clone();
    if let Some(note) = &note {
        tracing::warn!("{note}");
    }

    let leptos_options = LeptosOptions::builder()
        .output_name("atelier")
        .site_root(args.site_root.to_string_lossy().as_ref())
        .site_pkg_dir("pkg")
        .site_addr(args.addr)
        .build();
    let generator: Arc<dyn Generator> = if args.min_step_ms > 0 {
        let min_step = std::time::Duration::from_millis(args.min_step_ms);
        Arc::new(Throttled { inner: model, min_step })
    } else {
        Arc::new(model)
    };
    let generator_for_negatives = generator.clone();
    let state = AppState::new(leptos_options, generator, &args.data_dir, default_size, note)
        .with_context(|| format!("opening the gallery in {}", args.data_dir.display()))?
        .with_styles(styles)
        .with_budget(budget);
    // The data folder is a DVC project: datasets are versioned in DVC's own layout.
    atelier_server::datasets::Project::studio(&args.data_dir).with_context(|| format!("making {} a DVC project", args.data_dir.display()))?;
    let model_dir = atelier_engine::model::resolve(&args.model.to_string_lossy())?;
    let source = ModelSource { dir: model_dir, device, resolution: default_size.0 as u32, budget };
    let trainer = Arc::new(
        Trainer::open(&args.data_dir.join("trainings"), state.styles.clone(), args.data_dir.join("tracking"), source, &state.workers)
            .with_context(|| format!("opening the style trainer in {}", args.data_dir.join("trainings").display()))?,
    );
    let state = state.with_trainer(trainer);
    state.deployments.set_token(args.deploy_token.clone());
    let negatives = Arc::new(
        atelier_server::negatives::NegativeService::start(
            atelier_server::negatives::Context::new(
                args.data_dir.join("negatives"),
                generator_for_negatives,
                state.styles.clone(),
                args.data_dir.join("tracking"),
                default_size,
            )
            .with_budget(budget),
            &state.workers,
        )
        .with_context(|| format!("opening {}", args.data_dir.join("negatives").display()))?,
    );
    let mut state = state.with_negatives(negatives);
    if let Some(server) = args.tracking_uri.server()? {
        tracing::info!(server = %server.uri, "mirroring runs to MLflow (--tracking-uri)");
        state = state.with_mirror(server);
    }

    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    let local = listener.local_addr()?;
    let external = args.external_url.clone().unwrap_or_else(|| format!("http://{local}"));
    state.drift.set_webhook(args.alert_webhook.clone(), &external);
    // Deployments made from the command line, or whose reference a restart cut off, get
    // their reference measured now.
    atelier_server::monitoring::drift::service::resume_all(&state);
    tracing::info!("Atelier is running: open http://{local}/");
    eprintln!("Atelier is running: open http://{local}/  (Ctrl-C to stop)");
    let workers = state.workers.clone();
    let stopping = state.clone();
    axum::serve(listener, atelier_server::app(state))
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            // Ends running tasks (and so their progress streams) instead of waiting for
            // them; a running style training stops with a checkpoint and resumes after a
            // restart.
            stopping.begin_shutdown();
        })
        .await
        .context("serving")?;
    tokio::task::spawn_blocking(move || workers.join()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}
