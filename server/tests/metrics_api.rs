//! `GET /metrics` through the router, no socket: the text is well-formed Prometheus
//! exposition (every sample under a `# HELP` and `# TYPE` of its family), values move after
//! requests and a generation, and requests to ever-new unknown URLs add no series.
//!
//! One test function: the metrics registry is per process, so tests running in parallel in
//! this binary would move each other's counts.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use app::dto::{JobAccepted, JobState};
use atelier_engine::pipeline::{GenerateParams, Generated, StepProgress};
use atelier_server::{app, AppState, Generator};
use axum::http::{header, Method, StatusCode};
use axum::Router;
use leptos::config::LeptosOptions;
use serde_json::json;

use common::{send, wait_job};

/// Paints a flat colour after `params.steps` steps of 5 ms.
struct FlatGenerator;

impl Generator for FlatGenerator {
    fn generate(&self, params: &GenerateParams, on_step: &mut dyn FnMut(&StepProgress) -> bool) -> atelier_engine::Result<Generated> {
        for step in 1..=params.steps {
            std::thread::sleep(Duration::from_millis(5));
            if !on_step(&StepProgress { step, total: params.steps, preview: None }) {
                return Err(atelier_engine::Error::Cancelled);
            }
        }
        let img = image::RgbImage::from_pixel(params.width as u32, params.height as u32, image::Rgb([200, 30, 30]));
        Ok(Generated { images: vec![img; params.batch_size], warnings: Vec::new(), adapters: Vec::new() })
    }
    fn model_hash(&self) -> String {
        "flat000000".into()
    }
    fn model_name(&self) -> String {
        "flat".into()
    }
}

fn studio(data_dir: &Path) -> Router {
    let options = LeptosOptions::builder().output_name("atelier").site_root(data_dir.join("site").to_string_lossy().as_ref()).build();
    app(AppState::new(options, Arc::new(FlatGenerator), data_dir, (64, 64), None).unwrap())
}

/// A parsed exposition: sample values by series (`name{labels}` exactly as written), and
/// each family's type.
struct Exposition {
    samples: BTreeMap<String, f64>,
    types: BTreeMap<String, String>,
}

impl Exposition {
    fn value(&self, series: &str) -> f64 {
        self.samples.get(series).copied().unwrap_or(0.0)
    }

    /// Series of the family `name` (with `_bucket`/`_sum`/`_count` for histograms) whose
    /// labels contain `label`.
    fn series_with(&self, name: &str, label: &str) -> BTreeSet<String> {
        self.samples.keys().filter(|s| s.starts_with(&format!("{name}{{")) && s.contains(label)).cloned().collect()
    }
}

/// Parses the text format (version 0.0.4), failing on anything out of place: every sample
/// line is `name{labels} value` with a finite or ±Inf/NaN value, its family (the name less a
/// histogram suffix) announced by `# HELP` and `# TYPE` lines before it.
fn parse(text: &str) -> Exposition {
    let mut samples = BTreeMap::new();
    let mut types = BTreeMap::new();
    let mut helped = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or_else(|| panic!("HELP without text: {line}"));
            assert!(!help.trim().is_empty(), "empty HELP: {line}");
            helped.insert(name.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("TYPE without a type: {line}"));
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{line}");
            assert!(helped.contains(name), "TYPE before HELP for {name}");
            types.insert(name.to_string(), kind.to_string());
        } else if !line.is_empty() {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("not a number in {line}")),
            };
            let name = series.split('{').next().unwrap();
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "bad name in {line}");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix).filter(|f| types.get(*f).is_some_and(|t| t == "histogram")))
                .unwrap_or(name);
            assert!(types.contains_key(family), "sample before its TYPE: {line}");
            assert!(samples.insert(series.to_string(), value).is_none(), "series twice: {series}");
        }
    }
    Exposition { samples, types }
}

async fn scrape(app: &Router) -> Exposition {
    let r = send(app, Method::GET, "/metrics", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header(header::CONTENT_TYPE).as_deref(), Some("text/plain; version=0.0.4"));
    parse(&r.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text_that_moves_and_stays_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let app = studio(tmp.path());

    let before = scrape(&app).await;
    for (family, kind) in [
        ("atelier_build_info", "gauge"),
        ("atelier_queue_length", "gauge"),
        ("atelier_generation_step_seconds", "histogram"),
        ("atelier_generations_total", "counter"),
        ("atelier_images_generated_total", "counter"),
        ("atelier_training_steps_total", "counter"),
        ("atelier_training_steps_per_second", "gauge"),
        ("process_resident_memory_bytes", "gauge"),
    ] {
        assert_eq!(before.types.get(family).map(String::as_str), Some(kind), "{family}");
    }
    let build = format!(r#"atelier_build_info{{commit="{}",version="{}"}}"#, env!("ATELIER_COMMIT"), env!("CARGO_PKG_VERSION"));
    assert_eq!(before.value(&build), 1.0);
    assert!(before.value("process_resident_memory_bytes") > 1e6, "resident memory {}", before.value("process_resident_memory_bytes"));
    // The queue of generations reports its length from the start, empty.
    assert_eq!(before.samples.get(r#"atelier_queue_length{kind="job"}"#), Some(&0.0));

    // Plain requests: counted by template and status, timed.
    let health = r#"atelier_http_requests_total{method="GET",route="/api/health",status="200"}"#;
    let health_count = r#"atelier_http_request_duration_seconds_count{method="GET",route="/api/health"}"#;
    for _ in 0..3 {
        assert_eq!(send(&app, Method::GET, "/api/health", None).await.status, StatusCode::OK);
    }
    let missing_job = send(&app, Method::GET, "/api/jobs/no-such-job", None).await;
    assert_eq!(missing_job.status, StatusCode::NOT_FOUND);
    let after = scrape(&app).await;
    // Requests are counted once answered: the first scrape shows in this one.
    assert_eq!(after.types["atelier_http_requests_total"], "counter");
    assert_eq!(after.types["atelier_http_request_duration_seconds"], "histogram");
    assert!(after.value(r#"atelier_http_requests_total{method="GET",route="/metrics",status="200"}"#) >= 1.0);
    assert_eq!(after.value(health), before.value(health) + 3.0);
    assert_eq!(after.value(health_count), before.value(health_count) + 3.0);
    // A path parameter stays in its template.
    assert!(after.value(r#"atelier_http_requests_total{method="GET",route="/api/jobs/{id}",status="404"}"#) >= 1.0);
    assert!(after.series_with("atelier_http_requests_total", "no-such-job").is_empty());

    // A generation of 4 steps: steps, images, queue wait and outcome move.
    let r = send(&app, Method::POST, "/api/generate", Some(json!({"prompt": "a red circle", "steps": 4, "batch_size": 2, "width": 64, "height": 64}))).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let job: JobAccepted = r.json();
    let done = wait_job(&app, &job.job_id, Duration::from_secs(30), JobState::is_finished).await;
    assert!(matches!(done.state, JobState::Done { .. }), "{:?}", done.state);
    let generated = scrape(&app).await;
    let moved = |series: &str| generated.value(series) - after.value(series);
    assert_eq!(moved("atelier_generation_step_seconds_count"), 4.0);
    // Each fake step sleeps 5 ms.
    assert!(moved("atelier_generation_step_seconds_sum") >= 0.02, "{}", moved("atelier_generation_step_seconds_sum"));
    assert_eq!(moved("atelier_generation_step_seconds_bucket{le=\"0.001\"}"), 0.0);
    assert_eq!(moved("atelier_generation_step_seconds_bucket{le=\"+Inf\"}"), 4.0);
    assert_eq!(moved("atelier_images_generated_total"), 2.0);
    assert_eq!(moved(r#"atelier_generations_total{outcome="done"}"#), 1.0);
    assert_eq!(moved(r#"atelier_queue_wait_seconds_count{kind="job"}"#), 1.0);
    assert_eq!(generated.value(r#"atelier_queue_length{kind="job"}"#), 0.0);
    assert_eq!(moved(r#"atelier_http_requests_total{method="POST",route="/api/generate",status="202"}"#), 1.0);

    // 50 different unknown URLs, at the root and under /api: no new series but the fallback's.
    let series_before = generated.series_with("atelier_http_requests_total", "").len();
    for i in 0..50 {
        assert_eq!(send(&app, Method::GET, &format!("/nope-{i}/x?q={i}"), None).await.status, StatusCode::NOT_FOUND);
        assert_eq!(send(&app, Method::GET, &format!("/api/nope-{i}"), None).await.status, StatusCode::NOT_FOUND);
    }
    let flooded = scrape(&app).await;
    let fallback = r#"atelier_http_requests_total{method="GET",route="(fallback)",status="404"}"#;
    assert_eq!(flooded.value(fallback) - generated.value(fallback), 100.0);
    assert!(!flooded.samples.keys().any(|s| s.contains("nope")), "a raw path became a label");
    // At most the fallback's counter series was new (and `/metrics`'s own is not).
    let series_after = flooded.series_with("atelier_http_requests_total", "").len();
    assert!(series_after <= series_before + 1, "{series_before} → {series_after} series");
    let latency_series = flooded.series_with("atelier_http_request_duration_seconds_count", "").len();
    assert_eq!(latency_series, flooded.series_with("atelier_http_request_duration_seconds_count", "route=").len());

    // Odd methods share one label.
    let brew = send(&app, Method::from_bytes(b"BREW").unwrap(), "/api/health", None).await;
    assert_eq!(brew.status, StatusCode::METHOD_NOT_ALLOWED);
    let last = scrape(&app).await;
    assert_eq!(last.value(r#"atelier_http_requests_total{method="OTHER",route="/api/health",status="405"}"#), 1.0);
}
