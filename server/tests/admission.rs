//! Heavy requests are admitted before they are queued, on the real starter model: the
//! request that used to abort `atelier serve` (2048×2048 × 8: about 2 TiB of attention
//! scores when the whole batch was scored at once, 143 GiB one row at a time) is refused
//! with what would fit, the largest request that fits is accepted, a run that slips past
//! admission fails its job with a message, numbers that doom a job (img2img that leaves no
//! step, a `<lora:…>` that names no style) are refused at request time, and the CLI says
//! the same instead of aborting. The estimate is checked against the peak RSS of real CLI
//! runs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use app::dto::{JobAccepted, JobState};
use atelier_engine::memory::MemoryBudget;
use atelier_server::styles::StyleLibrary;
use atelier_server::{app, AppState, Generator, LoadedModel};
use axum::http::{Method, StatusCode};
use axum::Router;
use common::{expect_error, send, wait_job};
use leptos::config::LeptosOptions;
use serde_json::json;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn setup(data: &Path, budget: MemoryBudget) -> Router {
    let library = StyleLibrary::new(data.join("styles")).with_shipped(repo().join("models/styles"));
    let model = LoadedModel::load(&repo().join("models/starter"), &candle_core::Device::Cpu).unwrap().with_styles(library.clone());
    let generator: Arc<dyn Generator> = Arc::new(model);
    let options = LeptosOptions::builder().output_name("atelier").site_root(data.join("site").to_string_lossy().as_ref()).build();
    let state = AppState::new(options, generator, data, (64, 64), None).unwrap().with_styles(library).with_budget(budget);
    app(state)
}

/// The side `S` in "… fit up to S×S" of a refusal.
fn side_that_fits(message: &str) -> usize {
    let after = message.split("fit up to ").nth(1).unwrap_or_else(|| panic!("no size in {message:?}"));
    after.split('×').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn the_request_that_aborted_the_studio_is_refused_and_the_largest_that_fits_runs() {
    let dir = tempfile::tempdir().unwrap();
    let app = setup(dir.path(), MemoryBudget { limit: 12 << 30 });
    let huge = json!({"prompt": "x", "width": 2048, "height": 2048, "batch_size": 8, "steps": 1});
    let r = send(&app, Method::POST, "/api/generate", Some(huge)).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text());
    let message = r.json::<serde_json::Value>()["error"].as_str().unwrap().to_string();
    // One of the 16 UNet rows (8 images × CFG) at a time: 4 heads × 65536² scores × 4 bytes, twice (scores and softmax), plus the feature maps and 10 %.
    assert!(message.starts_with("2048×2048 × 8 needs ≈143 GiB for attention in the UNet at 256×256 latents"), "{message}");
    assert!(message.contains("this studio allows 12.0 GiB for a job (--max-memory)"), "{message}");
    // Nothing was queued: the gallery is empty and a normal request runs at once.
    let side = side_that_fits(&message);
    assert!((512..2048).contains(&side), "{message}");

    // One step larger than what it says fits is refused too. (The largest request that
    // fits is run for real, measured, by the CLI test below: at 12 GiB it would take
    // minutes here; the engine's unit test checks it is admitted.)
    let bigger = json!({"prompt": "x", "width": side + 8, "height": side + 8, "batch_size": 8, "steps": 1});
    expect_error(&app, Method::POST, "/api/generate", Some(bigger), StatusCode::UNPROCESSABLE_ENTITY, "needs ≈").await;

    // A small request that only fits with split-einsum runs, and says so.
    let app = setup(dir.path(), MemoryBudget { limit: 320 << 20 });
    let r = send(&app, Method::POST, "/api/generate", Some(json!({"prompt": "x", "width": 512, "height": 512, "steps": 1, "seed": 1}))).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let job: JobAccepted = r.json();
    let done = wait_job(&app, &job.job_id, Duration::from_secs(120), JobState::is_finished).await;
    let JobState::Done { warnings, .. } = done.state else { panic!("{:?}", done.state) };
    assert!(warnings.iter().any(|w| w.contains("ran with split-einsum attention")), "{warnings:?}");
}

#[tokio::test]
async fn doomed_numbers_are_refused_at_request_time() {
    let dir = tempfile::tempdir().unwrap();
    let app = setup(dir.path(), MemoryBudget { limit: 12 << 30 });
    // img2img with ⌊1 × 0.8⌋ = 0 denoising steps.
    let png = atelier_engine::metadata::encode_plain_png(&image::RgbImage::from_pixel(64, 64, image::Rgb([200, 0, 0]))).unwrap();
    use base64::Engine;
    let init = base64::engine::general_purpose::STANDARD.encode(png);
    let body = json!({"prompt": "x", "steps": 1, "strength": 0.8, "init_image": init});
    expect_error(&app, Method::POST, "/api/generate", Some(body), StatusCode::BAD_REQUEST, "use at least 2 steps or a strength of at least 1").await;
    // The same numbers without an init image are a plain txt2img: fine.
    let r = send(&app, Method::POST, "/api/generate", Some(json!({"prompt": "x", "steps": 1, "strength": 0.8}))).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    // A style that does not exist is known before queueing.
    expect_error(&app, Method::POST, "/api/generate", Some(json!({"prompt": "x <lora:nosuchstyle:1>"})), StatusCode::BAD_REQUEST, "names no style").await;
}

#[test]
fn a_run_that_slips_past_admission_fails_with_a_message() {
    let sd = atelier_engine::pipeline::StableDiffusion::load(&repo().join("models/starter"), &candle_core::Device::Cpu).unwrap();
    let params = atelier_engine::pipeline::GenerateParams { prompt: "x".into(), width: 256, height: 256, steps: 1, ..Default::default() };
    let err = atelier_engine::memory::with_limit(Some(1 << 20), || sd.generate(&params, &mut |_| true)).unwrap_err().to_string();
    assert!(err.contains("out of memory") && err.contains("may use 1 MiB"), "{err}");
    // The same run without the limit works (the thread's limit was restored).
    assert_eq!(sd.generate(&params, &mut |_| true).unwrap().images.len(), 1);
}

/// Runs `atelier generate` and returns (exit status, stderr, peak RSS in bytes).
fn generate(args: &[&str], out: &Path) -> (std::process::ExitStatus, String, u64) {
    let child = Command::new(env!("CARGO_BIN_EXE_atelier"))
        .args(["generate", "--model"])
        .arg(repo().join("models/starter"))
        .args(["--prompt", "a red circle on a blue background", "--steps", "1", "--seed", "3"])
        .args(args)
        .arg("--out")
        .arg(out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let output = child.wait_with_output().unwrap();
    // ru_maxrss of all waited-for children: the largest so far (KiB on Linux).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    (output.status, String::from_utf8_lossy(&output.stderr).into_owned(), usage.ru_maxrss as u64 * 1024)
}

#[test]
fn cli_refuses_with_a_message_and_a_fitting_run_stays_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let (status, stderr, _) = generate(&["--width", "2048", "--height", "2048", "--batch", "8", "--max-memory", "12GiB"], &out);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("2048×2048 × 8 needs ≈143 GiB"), "{stderr}");

    // With 400 MiB: what the refusal says fits runs, and the process's peak RSS (weights,
    // code, working memory) stays within the budget.
    let (status, stderr, _) = generate(&["--width", "2048", "--height", "2048", "--batch", "2", "--max-memory", "400MiB"], &out);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let side = side_that_fits(&stderr);
    let side_s = side.to_string();
    let (status, stderr, peak) = generate(&["--width", &side_s, "--height", &side_s, "--batch", "2", "--max-memory", "400MiB"], &out);
    assert!(status.success(), "{stderr}");
    let img = image::open(dir.path().join("x-1.png")).unwrap();
    assert_eq!((img.width() as usize, img.height() as usize), (side, side));
    eprintln!("BENCH admission: {side}×{side} × 2 under 400 MiB: peak RSS {} MiB", peak >> 20);
    assert!(peak <= 400 << 20, "peak RSS {} MiB over the 400 MiB budget", peak >> 20);
}
