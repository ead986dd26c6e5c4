//! Router tests: the whole app driven with `oneshot`, no socket, a fake generator.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use app::dto::{GalleryItem, GalleryPage, JobAccepted, JobState, JobStatus, ModelInfo};
use atelier_engine::pipeline::{GenerateParams, Generated, StepProgress};
use atelier_server::{app, AppState, Generator};
use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use leptos::config::LeptosOptions;
use serde_json::{json, Value};

use common::{expect_error, get_json, send, wait_job, Reply};
use tower::ServiceExt;

/// Paints a flat colour after `steps` steps of `step_delay` each, with a preview per step.
struct FakeGenerator {
    step_delay: Duration,
    calls: AtomicUsize,
}

impl FakeGenerator {
    fn new(step_delay: Duration) -> Arc<Self> {
        Arc::new(Self { step_delay, calls: AtomicUsize::new(0) })
    }
}

impl Generator for FakeGenerator {
    fn generate(
        &self,
        params: &GenerateParams,
        on_step: &mut dyn FnMut(&StepProgress) -> bool,
    ) -> atelier_engine::Result<Generated> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        for step in 1..=params.steps {
            std::thread::sleep(self.step_delay);
            let preview = Some(image::RgbImage::from_pixel(4, 4, image::Rgb([step as u8, 0, 0])));
            if !on_step(&StepProgress { step, total: params.steps, preview }) {
                return Err(atelier_engine::Error::Cancelled);
            }
        }
        let img = image::RgbImage::from_pixel(params.width as u32, params.height as u32, image::Rgb([10, 200, 30]));
        // As if a `<lora:pastel:…>` tag had been resolved: the PNG must name it.
        let adapters = vec![("pastel".to_string(), "6ebf0cadcb".to_string())];
        Ok(Generated { images: vec![img; params.batch_size], warnings: vec!["fake warning".into()], adapters })
    }
    fn model_hash(&self) -> String {
        "fakehash00".into()
    }
    fn model_name(&self) -> String {
        "fake-model".into()
    }
}

fn state(data_dir: &Path, generator: Arc<dyn Generator>) -> AppState {
    let options = LeptosOptions::builder()
        .output_name("atelier")
        .site_root(data_dir.join("site").to_string_lossy().as_ref())
        .build();
    AppState::new(options, generator, data_dir, (64, 64), Some("test note: coloured noise".into())).unwrap()
}

async fn submit(app: &Router, body: Value) -> JobAccepted {
    let r = send(app, Method::POST, "/api/generate", Some(body)).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    r.json()
}

async fn wait_for(app: &Router, job: &str, done: impl Fn(&JobState) -> bool) -> JobStatus {
    wait_job(app, job, Duration::from_secs(20), done).await
}

async fn wait_finished(app: &Router, job: &str) -> JobStatus {
    wait_for(app, job, JobState::is_finished).await
}

#[tokio::test]
async fn generate_completes_and_lands_in_gallery_with_png_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(state(dir.path(), FakeGenerator::new(Duration::ZERO)));

    let accepted = submit(&app, json!({"prompt": "a cat", "negative_prompt": "dogs", "steps": 3, "seed": 42, "scheduler": "euler-a", "guidance": 7})).await;
    assert_eq!(accepted.seed, 42);
    let done = wait_finished(&app, &accepted.job_id).await;
    let JobState::Done { image_ids, warnings } = done.state else { panic!("{done:?}") };
    assert_eq!((image_ids.len(), warnings), (1, vec!["fake warning".to_string()]));
    assert!(done.preview.is_some_and(|p| p.starts_with("data:image/png;base64,")));

    let page: GalleryPage = get_json(&app, "/api/gallery").await;
    assert_eq!(page.total, 1);
    let item = &page.items[0];
    assert_eq!((item.id.as_str(), item.prompt.as_str(), item.seed, item.steps), (image_ids[0].as_str(), "a cat", 42, 3));
    assert_eq!((item.scheduler.as_str(), item.width, item.model_hash.as_str()), ("euler-a", 64, "fakehash00"));

    let meta: GalleryItem = get_json(&app, &format!("/api/gallery/{}", item.id)).await;
    assert_eq!(&meta, item);

    let res = app.clone().oneshot(Request::get(&item.url).body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::CONTENT_TYPE], "image/png");
    let png = res.into_body().collect().await.unwrap().to_bytes();
    let params = atelier_engine::metadata::read_png_parameters(&png).unwrap().expect("parameters chunk");
    // Exactly what the CLI writes for the same request (one writer, A1111's rules: floats
    // as Python prints them, a value with `:` or `,` quoted).
    assert_eq!(
        params,
        "a cat\nNegative prompt: dogs\nSteps: 3, Sampler: Euler a, CFG scale: 7.0, Seed: 42, Size: 64x64, \
         Model hash: fakehash00, Model: fake-model, Lora hashes: \"pastel: 6ebf0cadcb\""
    );
    let parsed = atelier_engine::metadata::parse_parameters(&params).unwrap();
    assert_eq!((parsed.prompt.as_str(), parsed.negative_prompt.as_str(), parsed.cfg_scale, parsed.seed), ("a cat", "dogs", 7.0, 42));
    assert_eq!(parsed.extra, vec![("Lora hashes".to_string(), "pastel: 6ebf0cadcb".to_string())]);
    let img = image::load_from_memory(&png).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));
}

#[tokio::test]
async fn run_time_is_estimated_from_earlier_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(state(dir.path(), FakeGenerator::new(Duration::from_millis(20))));
    // Nothing has run yet: no estimate.
    let first = submit(&app, json!({"prompt": "x", "steps": 5, "guidance": 1})).await;
    assert_eq!(first.estimated_seconds, None);
    wait_finished(&app, &first.job_id).await;
    // 5 steps took ≥ 0.1 s; 20 steps at twice the pixels are (20+1)·2 / (5+1) = 7× the work.
    let second = submit(&app, json!({"prompt": "x", "steps": 20, "guidance": 1, "width": 128, "height": 64})).await;
    let est = second.estimated_seconds.expect("an estimate after one job");
    assert!((0.7..5.0).contains(&est), "{est}");
}

#[tokio::test]
async fn random_seed_is_returned_and_used() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(state(dir.path(), FakeGenerator::new(Duration::ZERO)));
    let accepted = submit(&app, json!({"prompt": "x", "steps": 1})).await;
    wait_finished(&app, &accepted.job_id).await;
    let page: GalleryPage = get_json(&app, "/api/gallery").await;
    assert_eq!(page.items[0].seed, accepted.seed);
}

#[tokio::test]
async fn sse_streams_progress_and_ends_after_done() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(state(dir.path(), FakeGenerator::new(Duration::from_millis(20))));
    let accepted = submit(&app, json!({"prompt": "x", "steps": 10})).await;
    let res = app
        .clone()
        .oneshot(Request::get(format!("/api/jobs/{}/events", accepted.job_id)).body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::CONTENT_TYPE], "text/event-stream");
    // The stream ends by itself after the final state.
    let body = tokio::time::timeout(Duration::from_secs(20), res.into_body().collect()).await.unwrap().unwrap().to_bytes();
    let events: Vec<JobStatus> = String::from_utf8_lossy(&body)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(events.iter().any(|e| matches!(e.state, JobState::Running { step, total: 10 } if step > 0)), "{events:?}");
    assert!(matches!(events.last().unwrap().state, JobState::Done { .. }));
}

#[tokio::test]
async fn bad_requests_get_json_errors_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let generator = FakeGenerator::new(Duration::ZERO);
    let app = app(state(dir.path(), generator.clone()));
    let bad = StatusCode::BAD_REQUEST;
    let post = |body| (Method::POST, "/api/generate", Some(body));

    for (body, needle) in [
        (json!({"prompt": "x", "width": 30}), "width"),
        (json!({"prompt": "x", "height": 0}), "height"),
        (json!({"prompt": "x", "steps": 0}), "steps"),
        (json!({"prompt": "x", "guidance": 100}), "guidance"),
        (json!({"prompt": "x", "strength": 2}), "strength"),
        (json!({"prompt": "x", "scheduler": "plms"}), "scheduler"),
        (json!({"prompt": "x", "init_image": "!!! not base64 !!!"}), "init_image"),
        (json!({"prompt": "x", "init_image": "aGVsbG8gd29ybGQ="}), "init_image"), // "hello world"
        (json!({"prompt": "x", "steps": "many"}), "steps"),
    ] {
        let (m, uri, b) = post(body);
        expect_error(&app, m, uri, b, bad, needle).await;
    }

    // Not JSON at all.
    let res = app
        .clone()
        .oneshot(Request::post("/api/generate").header(header::CONTENT_TYPE, "application/json").body(Body::from("{nope")).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), bad);

    // Over the body limit: 413 with a JSON message.
    let huge = "A".repeat(app::dto::MAX_BODY_BYTES + 1024);
    expect_error(&app, Method::POST, "/api/generate", Some(json!({"prompt": "x", "init_image": huge})), StatusCode::PAYLOAD_TOO_LARGE, "limit").await;

    let nf = StatusCode::NOT_FOUND;
    expect_error(&app, Method::GET, "/api/jobs/nope", None, nf, "job").await;
    expect_error(&app, Method::GET, "/api/jobs/nope/events", None, nf, "job").await;
    expect_error(&app, Method::POST, "/api/jobs/nope/cancel", None, nf, "job").await;
    expect_error(&app, Method::GET, "/api/gallery/nope", None, nf, "image").await;
    expect_error(&app, Method::DELETE, "/api/gallery/nope", None, nf, "image").await;
    expect_error(&app, Method::GET, "/api/images/nope.png", None, nf, "image").await;
    expect_error(&app, Method::GET, "/api/images/..%2F..%2Fgallery.sqlite", None, nf, "image").await;
    expect_error(&app, Method::GET, "/api/no-such-route", None, nf, "API route").await;

    // Nothing reached the generator, and the server still works.
    assert_eq!(generator.calls.load(Ordering::SeqCst), 0);
    let accepted = submit(&app, json!({"prompt": "still alive", "steps": 2})).await;
    assert!(matches!(wait_finished(&app, &accepted.job_id).await.state, JobState::Done { .. }));
}

#[tokio::test]
async fn img2img_accepts_a_base64_png() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let app = app(state(dir.path(), FakeGenerator::new(Duration::ZERO)));
    let src = image::RgbImage::from_pixel(32, 32, image::Rgb([1, 2, 3]));
    let png = atelier_engine::metadata::encode_plain_png(&src).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(png);
    let accepted = submit(&app, json!({"prompt": "x", "steps": 4, "init_image": format!("data:image/png;base64,{b64}"), "strength": 0.3})).await;
    wait_finished(&app, &accepted.job_id).await;
    let page: GalleryPage = get_json(&app, "/api/gallery").await;
    assert!(page.items[0].has_init_image);
    assert_eq!(page.items[0].strength, 0.3);
}

#[tokio::test]
async fn queue_positions_and_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(state(dir.path(), FakeGenerator::new(Duration::from_millis(20))));
    let a = submit(&app, json!({"prompt": "a", "steps": 150})).await;
    let b = submit(&app, json!({"prompt": "b", "steps": 150})).await;
    let c = submit(&app, json!({"prompt": "c", "steps": 2})).await;

    wait_for(&app, &a.job_id, |s| matches!(s, JobState::Running { step, .. } if *step > 0)).await;
    let sc: JobStatus = get_json(&app, &format!("/api/jobs/{}", c.job_id)).await;
    assert_eq!(sc.state, JobState::Queued { position: 2 });

    // Cancelling a queued job removes it at once; the one behind moves up.
    let Reply { status, body, .. } = send(&app, Method::POST, &format!("/api/jobs/{}/cancel", b.job_id), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_slice::<JobStatus>(&body).unwrap().state, JobState::Cancelled);
    let sc: JobStatus = get_json(&app, &format!("/api/jobs/{}", c.job_id)).await;
    assert_eq!(sc.state, JobState::Queued { position: 1 });

    // Cancelling the running job stops it at its next step; the queue moves on.
    send(&app, Method::POST, &format!("/api/jobs/{}/cancel", a.job_id), None).await;
    assert_eq!(wait_finished(&app, &a.job_id).await.state, JobState::Cancelled);
    assert!(matches!(wait_finished(&app, &c.job_id).await.state, JobState::Done { .. }));

    let page: GalleryPage = get_json(&app, "/api/gallery").await;
    assert_eq!(page.items.iter().map(|i| i.prompt.as_str()).collect::<Vec<_>>(), ["c"]);
}

#[tokio::test]
async fn gallery_survives_a_restart_and_delete_removes_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let app = app(state(dir.path(), FakeGenerator::new(Duration::ZERO)));
        let accepted = submit(&app, json!({"prompt": "persist me", "steps": 1})).await;
        let JobState::Done { image_ids, .. } = wait_finished(&app, &accepted.job_id).await.state else { panic!() };
        image_ids[0].clone()
    };
    // A new state on the same data dir: a restart.
    let app = app(state(dir.path(), FakeGenerator::new(Duration::ZERO)));
    let page: GalleryPage = get_json(&app, "/api/gallery?limit=10").await;
    assert_eq!(page.items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), [id.as_str()]);
    let Reply { status, .. } = send(&app, Method::GET, &format!("/api/images/{id}.png"), None).await;
    assert_eq!(status, StatusCode::OK);

    let Reply { status, .. } = send(&app, Method::DELETE, &format!("/api/gallery/{id}"), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(!dir.path().join(format!("images/{id}.png")).exists());
    let page: GalleryPage = get_json(&app, "/api/gallery").await;
    assert_eq!(page.total, 0);
}

#[tokio::test]
async fn health_model_and_server_rendered_page() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(state(dir.path(), FakeGenerator::new(Duration::ZERO)));
    let health: Value = get_json(&app, "/api/health").await;
    assert_eq!(health["status"], "ok");
    let model: ModelInfo = get_json(&app, "/api/model").await;
    assert_eq!((model.name.as_str(), model.default_width), ("fake-model", 64));
    assert!(model.note.unwrap().contains("noise"));
    assert!(model.schedulers.contains(&"dpmpp-2m-karras".to_string()));
    assert_eq!((model.device.as_str(), model.dtype.as_str()), ("cpu", "f32"));

    let Reply { status, body, .. } = send(&app, Method::GET, "/", None).await;
    let html = String::from_utf8_lossy(&body);
    assert_eq!(status, StatusCode::OK, "{html}");
    assert!(html.contains("/pkg/atelier.js"), "hydration script missing: {html}");
    assert!(html.contains("test note: coloured noise"), "model note missing: {html}");
    assert!(html.contains("fake-model · cpu · f32"), "the footer says where the model computes: {html}");
    assert!(html.contains("Reuse settings") || html.contains("No images yet"), "{html}");
}

/// Generations have records: after a shutdown (the running job interrupted, the waiting
/// one too) a new studio on the same folder answers for both, failed with what to do; a
/// finished one keeps its images. Wrong methods are JSON 405s.
#[tokio::test(flavor = "multi_thread")]
async fn generations_survive_a_restart_as_records() {
    let tmp = tempfile::tempdir().unwrap();
    let first = state(tmp.path(), FakeGenerator::new(Duration::from_millis(20)));
    let app1 = app(first.clone());
    let done = submit(&app1, json!({"prompt": "x", "steps": 2, "seed": 1})).await;
    wait_finished(&app1, &done.job_id).await;
    let running = submit(&app1, json!({"prompt": "x", "steps": 150, "seed": 2})).await;
    let waiting = submit(&app1, json!({"prompt": "x", "steps": 5, "seed": 3})).await;
    wait_for(&app1, &running.job_id, |s| matches!(s, JobState::Running { step, .. } if *step > 0)).await;
    first.begin_shutdown();
    let interrupted = |s: &JobState| matches!(s, JobState::Failed { message } if message.contains("generate it again"));
    assert!(interrupted(&wait_finished(&app1, &running.job_id).await.state), "a job running at shutdown is interrupted, not cancelled");
    assert!(interrupted(&wait_finished(&app1, &waiting.job_id).await.state));
    let r = send(&app1, Method::POST, "/api/generate", Some(json!({"prompt": "x"}))).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    first.workers.join();
    drop((app1, first));

    let app2 = app(state(tmp.path(), FakeGenerator::new(Duration::ZERO)));
    let again: JobStatus = get_json(&app2, &format!("/api/jobs/{}", done.job_id)).await;
    let JobState::Done { image_ids, .. } = again.state else { panic!("{:?}", again.state) };
    assert_eq!(send(&app2, Method::GET, &format!("/api/images/{}.png", image_ids[0]), None).await.status, StatusCode::OK);
    for id in [&running.job_id, &waiting.job_id] {
        let s: JobStatus = get_json(&app2, &format!("/api/jobs/{id}")).await;
        assert!(interrupted(&s.state), "{s:?}");
    }
    for (method, uri) in [(Method::POST, "/api/health"), (Method::GET, "/api/generate"), (Method::DELETE, "/api/jobs/x")] {
        let r = send(&app2, method, uri, None).await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{uri}");
        assert!(r.text().contains("is not allowed here"), "{uri}: {}", r.text());
    }
}

/// Seeds `DATA/tracking` with three style runs: ranks 4, 8, 8 with similarity gains
/// 0.2, 0.01, 0.3 and a loss curve of `steps` points each. Returns their ids.
fn seed_runs(data: &Path, steps: i64) -> Vec<String> {
    let t = atelier_server::tracking::Tracker::open(&data.join("tracking")).unwrap();
    let exp = t.experiment("styles").unwrap();
    t.experiment("negative-prompts").unwrap();
    let mut ids = Vec::new();
    for (name, rank, gain) in [("ink-r4", "4", 0.2), ("ink-r8", "8", 0.01), ("pastel-r8", "8", 0.3)] {
        let run = t.start_run(exp, name).unwrap();
        t.log_param(&run, "rank", rank).unwrap();
        t.set_tag(&run, "trigger", name.split('-').next().unwrap()).unwrap();
        for step in 1..=steps {
            t.log_metric(&run, "loss", 1.0 / step as f64, step).unwrap();
        }
        t.log_metric(&run, "similarity_gain", gain, steps).unwrap();
        let f = data.join("card.json");
        std::fs::write(&f, b"{}").unwrap();
        t.log_artifact(&run, &f, None).unwrap();
        t.end_run(&run, atelier_server::tracking::RunStatus::Finished).unwrap();
        ids.push(run);
        std::thread::sleep(Duration::from_millis(5)); // distinct start times
    }
    ids
}

fn query(text: &str) -> String {
    text.bytes().map(|b| if b.is_ascii_alphanumeric() || b"._-".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

/// The experiment store over HTTP: experiments, runs narrowed by MLflow's filter language
/// (errors name the character), one run with its artifacts, a metric's whole history.
#[tokio::test(flavor = "multi_thread")]
async fn experiments_and_runs_with_mlflow_filters() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = seed_runs(tmp.path(), 50);
    let app = app(state(tmp.path(), FakeGenerator::new(Duration::ZERO)));
    let experiments: Vec<Value> = get_json(&app, "/api/experiments").await;
    let names: Vec<(&str, u64)> = experiments.iter().map(|e| (e["name"].as_str().unwrap(), e["runs"].as_u64().unwrap())).collect();
    assert_eq!(names, [("negative-prompts", 0), ("styles", 3)]);

    let all: Vec<Value> = get_json(&app, "/api/experiments/styles/runs").await;
    let order: Vec<&str> = all.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(order, ["pastel-r8", "ink-r8", "ink-r4"], "newest first");
    assert_eq!(all[0]["metrics"]["loss"], 1.0 / 50.0, "the latest value of each metric");
    assert_eq!(all[0]["params"]["rank"], "8");
    let filtered: Vec<Value> = get_json(&app, &format!("/api/experiments/styles/runs?filter={}", query("metrics.similarity_gain > 0.05 and params.rank = '8'"))).await;
    assert_eq!(filtered.len(), 1);
    assert_eq!(filtered[0]["run_id"], ids[2].as_str());
    let like: Vec<Value> = get_json(&app, &format!("/api/experiments/1/runs?filter={}", query("tags.trigger LIKE 'in%' and attributes.status = 'FINISHED'"))).await;
    assert_eq!(like.len(), 2, "by experiment id too");

    let r = send(&app, Method::GET, &format!("/api/experiments/styles/runs?filter={}", query("metrics.loss >")), None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json::<Value>()["error"], "invalid filter: at character 15: expected a value (a number, or text in quotes)");
    expect_error(&app, Method::GET, "/api/experiments/nope/runs", None, StatusCode::NOT_FOUND, "no experiment").await;
    expect_error(&app, Method::GET, "/api/runs/nope", None, StatusCode::NOT_FOUND, "no run").await;
    expect_error(&app, Method::GET, &format!("/api/runs/{}/metrics/nope", ids[0]), None, StatusCode::NOT_FOUND, "no metric").await;

    let one: Value = get_json(&app, &format!("/api/runs/{}", ids[0])).await;
    assert_eq!(one["name"], "ink-r4");
    assert_eq!(one["artifacts"], json!(["card.json"]));
    let history: Vec<Value> = get_json(&app, &format!("/api/runs/{}/metrics/loss", ids[0])).await;
    assert_eq!(history.len(), 50);
    assert_eq!((history[0]["step"].as_i64(), history[49]["value"].as_f64()), (Some(1), Some(0.02)));
}

/// The model registry over HTTP: versions newest first, aliases set, moved and removed,
/// selectors (alias, number, latest), and the errors for what does not exist.
#[tokio::test(flavor = "multi_thread")]
async fn registry_versions_and_aliases_over_the_api() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let t = atelier_server::tracking::Tracker::open(&tmp.path().join("tracking")).unwrap();
        let f = tmp.path().join("ink.safetensors");
        for (body, rank) in [(&b"one"[..], "4"), (&b"two"[..], "8")] {
            std::fs::write(&f, body).unwrap();
            t.register_version("ink", "style", std::slice::from_ref(&f), None, &[("rank".into(), rank.into())]).unwrap();
        }
    }
    let app = app(state(tmp.path(), FakeGenerator::new(Duration::ZERO)));
    let all: Vec<Value> = get_json(&app, "/api/registry").await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0]["versions"].as_array().unwrap().iter().map(|v| v["version"].as_i64().unwrap()).collect::<Vec<_>>(), [2, 1]);

    let r = send(&app, Method::PUT, "/api/registry/ink/aliases/production", Some(json!({ "version": 1 }))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json::<Value>()["aliases"], json!({ "production": 1 }));
    let v: Value = get_json(&app, "/api/registry/ink/versions/production").await;
    assert_eq!((v["version"].as_i64(), v["tags"]["rank"].as_str()), (Some(1), Some("4")));
    assert_eq!(std::fs::read(Path::new(v["source"].as_str().unwrap()).join("ink.safetensors")).unwrap(), b"one", "the version's own files");
    // Moved by setting it again.
    send(&app, Method::PUT, "/api/registry/ink/aliases/production", Some(json!({ "version": 2 }))).await;
    let m: Value = get_json(&app, "/api/registry/INK").await;
    assert_eq!(m["aliases"], json!({ "production": 2 }));
    assert_eq!(m["versions"][0]["aliases"], json!(["production"]));
    let latest: Value = get_json(&app, "/api/registry/ink/versions/latest").await;
    assert_eq!(latest["version"], 2);

    expect_error(&app, Method::PUT, "/api/registry/ink/aliases/v2", Some(json!({ "version": 1 })), StatusCode::BAD_REQUEST, "is not an alias").await;
    expect_error(&app, Method::PUT, "/api/registry/ink/aliases/staging", Some(json!({ "version": 9 })), StatusCode::NOT_FOUND, "no model version").await;
    expect_error(&app, Method::PUT, "/api/registry/ink/aliases/staging", Some(json!({ "v": 1 })), StatusCode::BAD_REQUEST, "version").await;
    expect_error(&app, Method::GET, "/api/registry/nope", None, StatusCode::NOT_FOUND, "no registered model").await;
    expect_error(&app, Method::GET, "/api/registry/ink/versions/staging", None, StatusCode::NOT_FOUND, "known: 2, 1, production").await;
    let r = send(&app, Method::DELETE, "/api/registry/ink/aliases/production", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json::<Value>()["aliases"], json!({}));
    expect_error(&app, Method::DELETE, "/api/registry/ink/aliases/production", None, StatusCode::NOT_FOUND, "no alias").await;

    // Without --tracking-uri there is no mirror.
    let s: Value = get_json(&app, "/api/tracking/sync").await;
    assert_eq!((s["uri"].clone(), s["pending"].as_u64()), (Value::Null, Some(0)));
    expect_error(&app, Method::POST, "/api/tracking/sync", None, StatusCode::SERVICE_UNAVAILABLE, "--tracking-uri").await;
}

/// `--tracking-uri` pointing at nothing: runs stay recorded and waiting, the sync status
/// says why, and the studio works on.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_mlflow_server_leaves_runs_waiting_and_the_studio_working() {
    let tmp = tempfile::tempdir().unwrap();
    seed_runs(tmp.path(), 5);
    // Port 1: nothing listens there, connections are refused at once.
    let server = atelier_server::tracking::mlflow::ServerConfig::new("http://127.0.0.1:1").unwrap();
    let app = app(state(tmp.path(), FakeGenerator::new(Duration::ZERO)).with_mirror(server));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        let s: Value = get_json(&app, "/api/tracking/sync").await;
        if s["last_error"].is_string() || std::time::Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status["uri"], "http://127.0.0.1:1");
    assert_eq!(status["pending"], 3, "{status}");
    assert!(status["last_error"].as_str().unwrap().contains("cannot reach the MLflow server at http://127.0.0.1:1"), "{status}");
    // The studio goes on: runs are listed and generations run.
    let runs: Vec<Value> = get_json(&app, "/api/experiments/styles/runs").await;
    assert_eq!(runs.len(), 3);
    let job = submit(&app, json!({ "prompt": "a red circle", "steps": 2 })).await;
    wait_finished(&app, &job.job_id).await;
}

/// CSV downloads (issue 14 §4): the runs table under a filter, with a column per param and
/// metric and RFC 4180 quoting, and a metric's history; both `text/csv` attachments.
#[tokio::test(flavor = "multi_thread")]
async fn runs_and_metrics_download_as_csv() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = seed_runs(tmp.path(), 50);
    {
        let t = atelier_server::tracking::Tracker::open(&tmp.path().join("tracking")).unwrap();
        t.log_param(&ids[0], "note", "says \"hi\", twice").unwrap();
    }
    let app = app(state(tmp.path(), FakeGenerator::new(Duration::ZERO)));
    let r = send(&app, Method::GET, "/api/experiments/styles/runs.csv", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(r.header(header::CONTENT_TYPE).unwrap().starts_with("text/csv"));
    assert_eq!(r.header(header::CONTENT_DISPOSITION).unwrap(), "attachment; filename=\"styles-runs.csv\"");
    let text = r.text();
    let lines: Vec<&str> = text.split_terminator("\r\n").collect();
    assert_eq!(lines.len(), 4, "a header and a row per run: {text}");
    assert_eq!(lines[0], "run_id,name,status,start_time,params.note,params.rank,metrics.loss,metrics.similarity_gain");
    assert!(lines[3].starts_with(&format!("{},ink-r4,FINISHED,", ids[0])), "{}", lines[3]);
    assert!(lines[3].ends_with(",\"says \"\"hi\"\", twice\",4,0.02,0.2"), "quoted as RFC 4180: {}", lines[3]);
    assert!(lines[1].ends_with(",,8,0.02,0.3"), "an empty cell for a missing param: {}", lines[1]);

    let filtered = send(&app, Method::GET, &format!("/api/experiments/1/runs.csv?filter={}", query("params.rank = '8'")), None).await;
    assert_eq!(filtered.text().split_terminator("\r\n").count(), 3);
    let bad = send(&app, Method::GET, &format!("/api/experiments/styles/runs.csv?filter={}", query("metrics.loss >")), None).await;
    common::assert_json_error(&bad, StatusCode::BAD_REQUEST, "at character 15");

    let m = send(&app, Method::GET, &format!("/api/runs/{}/metrics/loss.csv", ids[1]), None).await;
    assert_eq!(m.status, StatusCode::OK, "{}", m.text());
    assert!(m.header(header::CONTENT_TYPE).unwrap().starts_with("text/csv"));
    assert_eq!(m.header(header::CONTENT_DISPOSITION).unwrap(), format!("attachment; filename=\"{}-loss.csv\"", &ids[1][..8]));
    let text = m.text();
    let rows: Vec<&str> = text.split_terminator("\r\n").collect();
    assert_eq!(rows.len(), 51);
    assert_eq!(rows[0], "step,value,timestamp");
    assert!(rows[1].starts_with("1,1,") && rows[50].starts_with("50,0.02,"), "{} / {}", rows[1], rows[50]);
    expect_error(&app, Method::GET, &format!("/api/runs/{}/metrics/nope.csv", ids[1]), None, StatusCode::NOT_FOUND, "no metric").await;
}

/// Reads an SSE body to its end, returning the JSON of every `data:` line.
async fn sse_events(app: &Router, uri: &str, limit: Duration) -> Vec<Value> {
    let req = Request::builder().uri(uri).body(Body::empty()).unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::CONTENT_TYPE], "text/event-stream");
    let body = tokio::time::timeout(limit, res.into_body().collect()).await.expect("the stream should end with the run").unwrap().to_bytes();
    String::from_utf8_lossy(&body).lines().filter_map(|l| l.strip_prefix("data: ")).map(|d| serde_json::from_str(d).unwrap()).collect()
}

/// `GET /api/runs/{id}/metrics/{key}/stream`: the history so far, then each point as a
/// RUNNING run logs it, ending once the run has finished; every point exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_running_metric_streams_until_its_run_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tracking");
    let t = atelier_server::tracking::Tracker::open(&dir).unwrap();
    let exp = t.experiment("live").unwrap();
    let run = t.start_run(exp, "going").unwrap();
    for step in 1..=3 {
        t.log_metric(&run, "loss", 1.0 / step as f64, step).unwrap();
    }
    let app = app(state(tmp.path(), FakeGenerator::new(Duration::ZERO)));
    let writer = {
        let run = run.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            for step in 4..=10 {
                t.log_metric(&run, "loss", 1.0 / step as f64, step).unwrap();
                std::thread::sleep(Duration::from_millis(150));
            }
            t.end_run(&run, atelier_server::tracking::RunStatus::Finished).unwrap();
        })
    };
    let events = sse_events(&app, &format!("/api/runs/{run}/metrics/loss/stream"), Duration::from_secs(30)).await;
    writer.join().unwrap();
    let steps: Vec<i64> = events.iter().flat_map(|e| e["points"].as_array().unwrap().iter().map(|p| p["step"].as_i64().unwrap())).collect();
    assert_eq!(steps, (1..=10).collect::<Vec<_>>(), "every point once, in order");
    assert_eq!(events[0]["points"].as_array().unwrap().len(), 3, "the history first");
    assert_eq!(events[0]["status"], "RUNNING");
    assert_eq!(events.last().unwrap()["status"], "FINISHED");
    assert!(events.len() >= 3, "new points came as they were logged: {events:?}");
    // A finished run: one event with everything, then the end.
    let again = sse_events(&app, &format!("/api/runs/{run}/metrics/loss/stream"), Duration::from_secs(10)).await;
    assert_eq!((again.len(), again[0]["points"].as_array().unwrap().len()), (1, 10));
    expect_error(&app, Method::GET, "/api/runs/nope/metrics/loss/stream", None, StatusCode::NOT_FOUND, "no run").await;
}

/// `atelier runs seed`: N runs with params and M metrics × S steps, the same curves for the
/// same seed, readable by the API (and its CSV) right away.
#[tokio::test(flavor = "multi_thread")]
async fn seeded_runs_are_deterministic_and_served() {
    let tmp = tempfile::tempdir().unwrap();
    let seed = |dir: &Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_atelier"))
            .args(["runs", "seed", "--experiment", "bench", "--runs", "4", "--metrics", "2", "--steps", "30", "--seed", "7", "--tracking"])
            .arg(dir.join("tracking"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("seeded 4 run(s) × 2 metric(s) × 30 step(s)"));
    };
    seed(tmp.path());
    let other = tempfile::tempdir().unwrap();
    seed(other.path());
    let app = app(state(tmp.path(), FakeGenerator::new(Duration::ZERO)));
    let runs: Vec<Value> = get_json(&app, "/api/experiments/bench/runs").await;
    assert_eq!(runs.len(), 4);
    let names: Vec<&str> = runs.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["seed-0003", "seed-0002", "seed-0001", "seed-0000"], "newest first");
    for r in &runs {
        assert!(["4", "8", "16"].contains(&r["params"]["rank"].as_str().unwrap()), "{r}");
        assert!(r["params"]["optimizer"].is_string() && r["params"]["lr"].is_string());
        assert_eq!(r["metrics"].as_object().unwrap().keys().collect::<Vec<_>>(), ["loss", "val_loss"]);
    }
    let loss: Vec<Value> = get_json(&app, &format!("/api/runs/{}/metrics/loss", runs[0]["run_id"].as_str().unwrap())).await;
    assert_eq!(loss.len(), 30);
    assert!(loss[29]["value"].as_f64() < loss[0]["value"].as_f64(), "decaying");
    let app2 = crate::app(state(other.path(), FakeGenerator::new(Duration::ZERO)));
    let runs2: Vec<Value> = get_json(&app2, "/api/experiments/bench/runs").await;
    let pick = |v: &[Value]| v.iter().map(|r| (r["params"].clone(), r["metrics"].clone())).collect::<Vec<_>>();
    assert_eq!(pick(&runs), pick(&runs2), "same seed, same runs");
    let csv = send(&app, Method::GET, "/api/experiments/bench/runs.csv", None).await.text();
    assert_eq!(csv.split_terminator("\r\n").count(), 5);
}

/// A run's artifact files over HTTP (issue 14 §4): a sample sheet logged as MLflow's image
/// gallery names it comes back as the same PNG bytes, JSON and weights typed by extension;
/// paths that climb out or are absolute are 400s, missing runs and files 404s.
#[tokio::test(flavor = "multi_thread")]
async fn run_artifacts_are_served_inside_their_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = seed_runs(tmp.path(), 3);
    let png = tmp.path().join("sheet.png");
    image::RgbImage::from_pixel(3, 2, image::Rgb([200, 10, 10])).save(&png).unwrap();
    let weights = tmp.path().join("pastel.safetensors");
    std::fs::write(&weights, b"weights!").unwrap();
    let sheet = {
        let t = atelier_server::tracking::Tracker::open(&tmp.path().join("tracking")).unwrap();
        let stored = t.log_image(&ids[2], &png, "samples", 40).unwrap();
        t.log_artifact(&ids[2], &weights, Some("model")).unwrap();
        format!("images/{}", stored.file_name().unwrap().to_str().unwrap())
    };
    // A file beside the run's folder that escapes must not reach.
    std::fs::write(tmp.path().join("tracking").join("secret.txt"), b"no").unwrap();
    let app = app(state(tmp.path(), FakeGenerator::new(Duration::ZERO)));

    let listed: Value = get_json(&app, &format!("/api/runs/{}", ids[2])).await;
    assert!(listed["artifacts"].as_array().unwrap().iter().any(|a| a == sheet.as_str()), "{listed}");
    let r = send(&app, Method::GET, &format!("/api/runs/{}/artifacts/{}", ids[2], query(&sheet).replace("%2F", "/")), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header(header::CONTENT_TYPE).as_deref(), Some("image/png"));
    assert_eq!(r.header(header::CONTENT_SECURITY_POLICY).as_deref(), Some("sandbox"), "artifacts never run as studio pages");
    assert_eq!(r.header(header::X_CONTENT_TYPE_OPTIONS).as_deref(), Some("nosniff"));
    assert_eq!(r.body, std::fs::read(&png).unwrap(), "the PNG's bytes");
    let decoded = image::load_from_memory(&r.body).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (3, 2));

    let card = send(&app, Method::GET, &format!("/api/runs/{}/artifacts/card.json", ids[2]), None).await;
    assert_eq!((card.status, card.header(header::CONTENT_TYPE).as_deref(), card.text().as_str()), (StatusCode::OK, Some("application/json"), "{}"));
    let w = send(&app, Method::GET, &format!("/api/runs/{}/artifacts/model/pastel.safetensors", ids[2]), None).await;
    assert_eq!((w.status, w.header(header::CONTENT_TYPE).as_deref(), w.body.as_slice()), (StatusCode::OK, Some("application/octet-stream"), &b"weights!"[..]));

    for bad in ["../../secret.txt", "..%2F..%2Fsecret.txt", "images/..%2F..%2F..%2Fsecret.txt", "%2Fetc%2Fpasswd", "a%5C..%5Cb"] {
        let r = send(&app, Method::GET, &format!("/api/runs/{}/artifacts/{bad}", ids[2]), None).await;
        common::assert_json_error(&r, StatusCode::BAD_REQUEST, "invalid artifact path");
    }
    expect_error(&app, Method::GET, &format!("/api/runs/{}/artifacts/images/none.png", ids[2]), None, StatusCode::NOT_FOUND, "no artifact").await;
    expect_error(&app, Method::GET, &format!("/api/runs/{}/artifacts/images", ids[2]), None, StatusCode::NOT_FOUND, "no artifact").await;
    expect_error(&app, Method::GET, "/api/runs/nope/artifacts/card.json", None, StatusCode::NOT_FOUND, "no run").await;
}
