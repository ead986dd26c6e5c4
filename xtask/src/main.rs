//! Atelier's build tool: builds the hydration WASM, the site folder and the server without
//! cargo-leptos (which would download sass, tailwind and binaryen, impossible offline).
//!
//! ```text
//! cargo run -p xtask -- build [--release] [--site-only] [--features metal|cuda]  # target/site/ + the `atelier` binary
//! cargo run -p xtask -- serve [--release] [--features metal|cuda] [-- serve args]
//! cargo run -p xtask -- test                   # cargo tests, then the browser test
//! cargo run -p xtask -- check-apple            # type-check the Mac (Metal) build
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

/// The name Leptos' `HydrationScripts` loads: `/pkg/atelier.js` and `/pkg/atelier_bg.wasm`.
const OUTPUT_NAME: &str = "atelier";
const WASM_TARGET: &str = "wasm32-unknown-unknown";
/// The Mac target `check-apple` type-checks (Apple silicon).
const APPLE_TARGET: &str = "aarch64-apple-darwin";

#[derive(Parser)]
#[command(about = "Build, serve and test Atelier")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the WASM bundle into target/site/ and the `atelier` server binary.
    Build {
        /// Optimised build (wasm-release profile for the WASM, release for the server).
        #[arg(long)]
        release: bool,
        /// Only the site folder (WASM, JS, CSS, public/), not the server binary.
        #[arg(long)]
        site_only: bool,
        /// Cargo features of the server: `metal` (Mac GPU), `cuda`, `flash-attn`.
        #[arg(long, value_delimiter = ',')]
        features: Vec<String>,
    },
    /// Build, then run `atelier serve` from the repository root.
    Serve {
        /// Optimised build.
        #[arg(long)]
        release: bool,
        /// Cargo features of the server: `metal` (Mac GPU), `cuda`, `flash-attn`.
        #[arg(long, value_delimiter = ',')]
        features: Vec<String>,
        /// Arguments passed on to `atelier serve` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the Rust tests, build the site, run the headless-browser test, then check-apple.
    Test,
    /// Type-check the crates of a Mac build (aarch64-apple-darwin, Metal) from any OS: the
    /// engine, the app and the blend maths. Needs `rustup target add aarch64-apple-darwin`.
    CheckApple,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let ws = Workspace::locate()?;
    match cli.command {
        Cmd::Build { release, site_only: true, .. } => ws.build_site(release),
        Cmd::Build { release, site_only: false, features } => ws.build(release, &features),
        Cmd::Serve { release, features, args } => {
            ws.build(release, &features)?;
            let bin = ws.server_binary(release);
            eprintln!("xtask: running {} serve {}", bin.display(), args.join(" "));
            let status = Command::new(&bin)
                .arg("serve")
                .args(&args)
                .current_dir(&ws.root)
                .status()
                .with_context(|| format!("starting {}", bin.display()))?;
            if !status.success() {
                bail!("atelier serve exited with {status}");
            }
            Ok(())
        }
        Cmd::Test => ws.test(),
        Cmd::CheckApple => ws.check_apple(),
    }
}

/// Paths of the repository and of cargo's target directory.
struct Workspace {
    root: PathBuf,
    target_dir: PathBuf,
}

impl Workspace {
    fn locate() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent folder")?
            .to_path_buf();
        // Ask cargo rather than guess: CARGO_TARGET_DIR or .cargo/config may move it.
        let out = Command::new(cargo())
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .current_dir(&root)
            .output()
            .context("running cargo metadata")?;
        if !out.status.success() {
            bail!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let meta: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
        let target_dir = meta["target_directory"]
            .as_str()
            .context("cargo metadata has no target_directory")?
            .into();
        Ok(Self { root, target_dir })
    }

    /// The site folder the server serves (`--site-root`, default `target/site` in the repo).
    fn site_dir(&self) -> PathBuf {
        self.root.join("target").join("site")
    }

    fn server_binary(&self, release: bool) -> PathBuf {
        self.target_dir
            .join(if release { "release" } else { "debug" })
            .join(format!("atelier{}", std::env::consts::EXE_SUFFIX))
    }

    fn build(&self, release: bool, features: &[String]) -> Result<()> {
        self.build_site(release)?;
        self.build_server(release, features)
    }

    /// `target/site/`: the WASM bundle and its JS, the CSS and `public/`, each precompressed.
    fn build_site(&self, release: bool) -> Result<()> {
        check_wasm_target()?;
        let wasm = self.build_wasm(release)?;
        let pkg = self.site_dir().join("pkg");
        // Should a step below fail, no `.br`/`.gz` of the last build may outlive its file.
        remove_precompressed(&self.site_dir())?;
        self.bindgen(&wasm, &pkg, release)?;
        if release {
            wasm_opt(&pkg.join(format!("{OUTPUT_NAME}_bg.wasm")), &self.root)?;
        }
        std::fs::copy(self.root.join("style/main.css"), pkg.join(format!("{OUTPUT_NAME}.css")))
            .context("copying style/main.css")?;
        let public = self.root.join("public");
        if public.is_dir() {
            copy_dir(&public, &self.site_dir())?;
        }
        precompress_dir(&self.site_dir(), release)
    }

    /// Builds `frontend` for the browser. A separate cargo run from the server's: one
    /// invocation would unify the `ssr` and `hydrate` features of `app` and `leptos`.
    fn build_wasm(&self, release: bool) -> Result<PathBuf> {
        let profile = if release { "wasm-release" } else { "dev" };
        eprintln!("xtask: building frontend for {WASM_TARGET} ({profile})");
        let status = Command::new(cargo())
            .args(["build", "-p", "frontend", "--lib", "--target", WASM_TARGET, "--profile", profile])
            .env("LEPTOS_OUTPUT_NAME", OUTPUT_NAME)
            .current_dir(&self.root)
            .status()
            .context("running cargo build for the frontend")?;
        if !status.success() {
            bail!("building the frontend failed");
        }
        let dir = if release { "wasm-release" } else { "debug" };
        Ok(self.target_dir.join(WASM_TARGET).join(dir).join("frontend.wasm"))
    }

    fn bindgen(&self, wasm: &Path, pkg: &Path, release: bool) -> Result<()> {
        eprintln!("xtask: wasm-bindgen {} -> {}", wasm.display(), pkg.display());
        std::fs::create_dir_all(pkg).with_context(|| format!("creating {}", pkg.display()))?;
        wasm_bindgen_cli_support::Bindgen::new()
            .input_path(wasm)
            .out_name(OUTPUT_NAME)
            .web(true)?
            .typescript(false)
            .debug(!release)
            .keep_debug(false)
            .generate(pkg)
            .context("wasm-bindgen")?;
        Ok(())
    }

    fn build_server(&self, release: bool, features: &[String]) -> Result<()> {
        eprintln!("xtask: building the server");
        let mut cmd = Command::new(cargo());
        cmd.args(["build", "-p", "server", "--bin", "atelier"]);
        if release {
            cmd.arg("--release");
        }
        if !features.is_empty() {
            cmd.args(["--features", &features.join(",")]);
        }
        // The server's leptos must be compiled WITHOUT LEPTOS_OUTPUT_NAME: then
        // HydrationScripts loads `<name>_bg.wasm`, the file wasm-bindgen writes.
        let status = cmd
            .env_remove("LEPTOS_OUTPUT_NAME")
            .current_dir(&self.root)
            .status()
            .context("running cargo build for the server")?;
        if !status.success() {
            bail!("building the server failed");
        }
        Ok(())
    }

    fn test(&self) -> Result<()> {
        let mlflow = self.mlflow()?;
        let (dvc, s3s) = (self.dvc()?, self.s3s()?);
        let webuiapi = self.webuiapi()?;
        let coremltools = self.coremltools()?;
        // The Core ML package checker and MIL evaluator the exporter tests run (tests/coreml).
        run(Command::new(&coremltools).args(["-m", "unittest", "discover", "tests/coreml"]).current_dir(&self.root))?;
        run(Command::new(cargo())
            .args(["test", "-p", "atelier-blend", "-p", "atelier-engine", "-p", "app", "-p", "server"])
            .env_remove("LEPTOS_OUTPUT_NAME")
            // The tests that need real services fail instead of skipping when run from here.
            .env("ATELIER_REQUIRE_SERVICES", "1")
            .env("ATELIER_MLFLOW_BIN", &mlflow)
            .env("ATELIER_DVC_BIN", &dvc)
            .env("ATELIER_S3S_BIN", &s3s)
            .env("ATELIER_WEBUIAPI_PYTHON", &webuiapi)
            .env("ATELIER_COREMLTOOLS_PYTHON", &coremltools)
            .current_dir(&self.root))?;
        self.build(false, &[])?;
        let browser = self.root.join("tests/browser");
        if !browser.join("node_modules").is_dir() {
            bail!("tests/browser/node_modules is missing: run `npm ci` in tests/browser (or .ci/run)");
        }
        run(Command::new("node")
            .args(["--test", "--test-reporter=spec", "generate.spec.mjs", "deployments.spec.mjs", "export.spec.mjs"])
            .env("ATELIER_BIN", self.server_binary(false))
            .env("ATELIER_ROOT", &self.root)
            .current_dir(&browser))?;
        self.check_apple()
    }

    /// `cargo check` of the Mac build's crates for aarch64-apple-darwin with Metal.
    ///
    /// The server crate itself is left out: two of its dependencies compile C for the target
    /// in their build scripts, which needs Apple's SDK (ring includes `TargetConditionals.h`;
    /// rusqlite's bundled SQLite includes the C library's headers), so it only checks on a
    /// Mac. Everything else of a `--features metal` build, Candle's Metal backend included,
    /// is Rust and is checked here.
    fn check_apple(&self) -> Result<()> {
        run(Command::new(cargo())
            .args(["check", "--target", APPLE_TARGET, "-p", "atelier-engine", "-p", "atelier-blend", "-p", "app", "--features", "atelier-engine/metal"])
            .current_dir(&self.root))
        .with_context(|| format!("the Mac build does not type-check (if the target is missing: rustup target add {APPLE_TARGET})"))
    }
}

impl Workspace {
    /// The `mlflow` executable the MLflow tests start servers with: `ATELIER_MLFLOW_BIN`,
    /// else a venv in TARGET/services/mlflow-venv, made (MLflow from PyPI, ~40 s and
    /// ~850 MB, once) when missing.
    fn mlflow(&self) -> Result<PathBuf> {
        if let Some(bin) = std::env::var_os("ATELIER_MLFLOW_BIN") {
            return Ok(PathBuf::from(bin));
        }
        let venv = self.target_dir.join("services/mlflow-venv");
        let bin = venv.join("bin/mlflow");
        if !bin.is_file() {
            let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
            run(Command::new(&python).args(["-m", "venv"]).arg(&venv))
                .with_context(|| format!("making a Python venv for MLflow with {python} (on Debian: apt-get install python3-venv)"))?;
            run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "--disable-pip-version-check", MLFLOW_REQUIREMENT]))
                .context("installing MLflow from PyPI")?;
        }
        Ok(bin)
    }
}

impl Workspace {
    /// The `dvc` executable the dataset tests run: `ATELIER_DVC_BIN`, else a venv in
    /// TARGET/services/dvc-venv with DVC and its S3 support from PyPI, made when missing.
    fn dvc(&self) -> Result<PathBuf> {
        if let Some(bin) = std::env::var_os("ATELIER_DVC_BIN") {
            return Ok(PathBuf::from(bin));
        }
        let venv = self.target_dir.join("services/dvc-venv");
        let bin = venv.join("bin/dvc");
        if !bin.is_file() {
            let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
            run(Command::new(&python).args(["-m", "venv"]).arg(&venv))
                .with_context(|| format!("making a Python venv for DVC with {python} (on Debian: apt-get install python3-venv)"))?;
            run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "--disable-pip-version-check", DVC_REQUIREMENT]))
                .context("installing DVC from PyPI")?;
        }
        Ok(bin)
    }

    /// The S3-compatible server the S3 remote tests run against: `ATELIER_S3S_BIN`, else
    /// `s3s-fs` (an S3 server over a folder) built from crates.io into TARGET/services/s3s
    /// once (a few minutes).
    fn s3s(&self) -> Result<PathBuf> {
        if let Some(bin) = std::env::var_os("ATELIER_S3S_BIN") {
            return Ok(PathBuf::from(bin));
        }
        let root = self.target_dir.join("services/s3s");
        let bin = root.join("bin/s3s-fs");
        if !bin.is_file() {
            run(Command::new(cargo())
                // 0.17 declares rust-version 1.96 but builds with 1.95.
                .args(["install", "s3s-fs", "--version", S3S_VERSION, "--features", "binary", "--locked", "--ignore-rust-version", "--root"])
                .arg(&root))
            .context("building the s3s-fs S3 server from crates.io")?;
        }
        Ok(bin)
    }

    /// The Python with the `webuiapi` client (A1111 API) that `server/tests/a1111.rs`
    /// drives a studio with: `ATELIER_WEBUIAPI_PYTHON`, else a venv in
    /// TARGET/services/webuiapi-venv, made (webuiapi from PyPI, a few seconds) when missing.
    fn webuiapi(&self) -> Result<PathBuf> {
        if let Some(python) = std::env::var_os("ATELIER_WEBUIAPI_PYTHON") {
            return Ok(PathBuf::from(python));
        }
        let venv = self.target_dir.join("services/webuiapi-venv");
        let python = venv.join("bin/python");
        if !venv.join(".installed").is_file() {
            let base = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
            run(Command::new(&base).args(["-m", "venv"]).arg(&venv))
                .with_context(|| format!("making a Python venv for webuiapi with {base} (on Debian: apt-get install python3-venv)"))?;
            run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "--disable-pip-version-check", WEBUIAPI_REQUIREMENT]))
                .context("installing webuiapi from PyPI")?;
            std::fs::write(venv.join(".installed"), WEBUIAPI_REQUIREMENT)?;
        }
        Ok(python)
    }
}

impl Workspace {
    /// The Python with coremltools that validates and evaluates exported Core ML packages
    /// (`tests/coreml/milcheck.py`): `ATELIER_COREMLTOOLS_PYTHON`, else a venv in
    /// TARGET/services/coremltools-venv, made (pinned wheels from PyPI, ~1 min) when missing.
    fn coremltools(&self) -> Result<PathBuf> {
        if let Some(python) = std::env::var_os("ATELIER_COREMLTOOLS_PYTHON") {
            return Ok(PathBuf::from(python));
        }
        let venv = self.target_dir.join("services/coremltools-venv");
        let python = venv.join("bin/python");
        let stamp = COREMLTOOLS_REQUIREMENTS.join(" ");
        if std::fs::read_to_string(venv.join(".installed")).ok().as_deref() != Some(stamp.as_str()) {
            let base = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
            run(Command::new(&base).args(["-m", "venv", "--clear"]).arg(&venv))
                .with_context(|| format!("making a Python venv for coremltools with {base} (on Debian: apt-get install python3-venv)"))?;
            run(Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check"])
                .args(COREMLTOOLS_REQUIREMENTS))
            .context("installing coremltools from PyPI")?;
            std::fs::write(venv.join(".installed"), stamp)?;
        }
        Ok(python)
    }
}

/// coremltools (MIL proto loader, Builder, weight compression; its Linux wheel cannot run
/// models) and what `tests/coreml` uses: numpy, scipy (erf for gelu), safetensors (tensor
/// files shared with the Rust tests), scikit-learn (k-means palettization in the tests).
const COREMLTOOLS_REQUIREMENTS: &[&str] =
    &["coremltools==9.0", "numpy==2.4.6", "scipy==1.17.1", "safetensors==0.8.0", "scikit-learn==1.9.1"];

/// The DVC the dataset tests run (real `dvc`, from PyPI, with S3 support).
const DVC_REQUIREMENT: &str = "dvc[s3]>=3.60,<4";
/// The s3s-fs release the S3 remote tests run against (0.14.1 answers 500 to a HEAD of a
/// key that is a folder, such as a remote's `files/md5`, which `dvc pull` asks for; 0.17
/// answers 404 as S3 does).
const S3S_VERSION: &str = "0.17.0";

/// The A1111 API client the tests use, unmodified (from PyPI).
const WEBUIAPI_REQUIREMENT: &str = "webuiapi==0.9.17";

/// The MLflow the tests run against (a real server, from PyPI).
const MLFLOW_REQUIREMENT: &str = "mlflow>=3.1,<4";

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Fails early, with the fix, when the WASM standard library is not installed.
fn check_wasm_target() -> Result<()> {
    let out = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .context("running rustc --print sysroot")?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !sysroot.join("lib/rustlib").join(WASM_TARGET).is_dir() {
        bail!("the {WASM_TARGET} target is not installed: run `rustup target add {WASM_TARGET}`");
    }
    Ok(())
}

/// Shrinks the release WASM with binaryen's `wasm-opt -Oz`: the one named by `WASM_OPT`, else
/// `wasm-opt` on PATH, else the one `npm ci` in tests/browser installs (npm's `binaryen`, a
/// devDependency there). Old binaryen (Debian's 108) miscompiles Leptos' hydration, so
/// versions below 116 are skipped; without any, the build goes on unoptimised.
fn wasm_opt(wasm: &Path, root: &Path) -> Result<()> {
    let candidates: Vec<PathBuf> = match std::env::var_os("WASM_OPT") {
        Some(bin) => vec![bin.into()],
        None => vec!["wasm-opt".into(), root.join("tests/browser/node_modules/.bin/wasm-opt")],
    };
    let mut found = None;
    for bin in &candidates {
        let Ok(out) = Command::new(bin).arg("--version").output() else { continue };
        let version = String::from_utf8_lossy(&out.stdout);
        // "wasm-opt version 132 (version_132)"
        let major = version
            .split_whitespace()
            .skip_while(|w| *w != "version")
            .nth(1)
            .and_then(|w| w.parse::<u32>().ok())
            .unwrap_or(0);
        if major >= 116 {
            found = Some(bin);
            break;
        }
        eprintln!("xtask: skipping {} ({}): version 116 or newer needed", bin.display(), version.trim());
    }
    let Some(bin) = found else {
        eprintln!("xtask: no wasm-opt ≥ 116 found, skipping WASM optimisation (`npm ci` in tests/browser installs one)");
        return Ok(());
    };
    eprintln!("xtask: {} -Oz {}", bin.display(), wasm.display());
    run(Command::new(bin)
        .arg("-Oz")
        .arg("--enable-bulk-memory")
        .arg("--enable-nontrapping-float-to-int")
        .arg("--enable-sign-ext")
        .arg("--enable-mutable-globals")
        .arg(wasm)
        .arg("-o")
        .arg(wasm))
}

/// The site files worth compressing (text and WASM; PNGs and the like are compressed already).
const COMPRESSIBLE: &[&str] = &["wasm", "js", "css", "html", "svg", "json", "txt"];

/// Writes `NAME.br` and `NAME.gz` beside every compressible file under `dir`, which the
/// server's `ServeDir` sends to browsers that accept them: compression at build time, once,
/// at the highest levels for `--release`, instead of on every request. Faster levels for
/// dev builds, whose unoptimised WASM is tens of MB. A variant that would not be smaller is
/// not written, and an old one is removed, so a stale `.br` never outlives its file.
fn precompress_dir(dir: &Path, release: bool) -> Result<()> {
    let (br_quality, gz_level) = if release { (11, 9) } else { (5, 6) };
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            precompress_dir(&path, release)?;
            continue;
        }
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
        if !COMPRESSIBLE.contains(&ext) {
            continue;
        }
        let plain = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let started = std::time::Instant::now();
        let br = brotli_bytes(&plain, br_quality)?;
        let gz = gzip_bytes(&plain, gz_level)?;
        for (suffix, packed) in [("br", br), ("gz", gz)] {
            let mut out = path.clone().into_os_string();
            out.push(".");
            out.push(suffix);
            let out = PathBuf::from(out);
            if packed.len() < plain.len() {
                std::fs::write(&out, &packed).with_context(|| format!("writing {}", out.display()))?;
            } else if out.exists() {
                std::fs::remove_file(&out).with_context(|| format!("removing {}", out.display()))?;
            }
            eprintln!(
                "xtask: {}.{suffix}: {} -> {} bytes ({:.1?})",
                path.strip_prefix(dir).unwrap_or(&path).display(),
                plain.len(),
                packed.len(),
                started.elapsed()
            );
        }
    }
    Ok(())
}

fn remove_precompressed(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            remove_precompressed(&path)?;
        } else if path.extension().is_some_and(|e| e == "br" || e == "gz") {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

fn brotli_bytes(plain: &[u8], quality: i32) -> Result<Vec<u8>> {
    let params = brotli::enc::BrotliEncoderParams { quality, lgwin: 22, ..Default::default() };
    let mut out = Vec::new();
    brotli::BrotliCompress(&mut &plain[..], &mut out, &params).context("brotli")?;
    Ok(out)
}

fn gzip_bytes(plain: &[u8], level: u32) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
    gz.write_all(plain).context("gzip")?;
    gz.finish().context("gzip")
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &dest)?;
        } else {
            std::fs::copy(entry.path(), &dest)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}
