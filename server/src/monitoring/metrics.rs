//! The studio's Prometheus metrics, served at `GET /metrics` (at the root, not under `/api`)
//! in the Prometheus text exposition format, version 0.0.4
//! (<https://prometheus.io/docs/instrumenting/exposition_formats/>), by the `prometheus`
//! crate's [`TextEncoder`].
//!
//! One registry per process: the studio's parts report through the free functions below
//! from wherever they run (request middleware, queue workers, the trainer), without
//! threading a handle through every constructor. Several studios in one process (router
//! tests) share it, so a test compares values before and after, never absolute ones.
//!
//! Names follow Prometheus's conventions (<https://prometheus.io/docs/practices/naming/>):
//! the `atelier_` prefix, base units (`_seconds`, `_bytes`), `_total` on counters.
//!
//! | metric | type | labels | what |
//! | --- | --- | --- | --- |
//! | `atelier_http_requests_total` | counter | `method`, `route`, `status` | HTTP requests answered |
//! | `atelier_http_request_duration_seconds` | histogram | `method`, `route` | time to the response head |
//! | `atelier_queue_length` | gauge | `kind` | tasks waiting in the work queue |
//! | `atelier_queue_wait_seconds` | histogram | `kind` | time from queued to started |
//! | `atelier_generation_step_seconds` | histogram | | seconds per denoising step |
//! | `atelier_generations_total` | counter | `outcome` | generations ended: `done`, `failed`, `cancelled` |
//! | `atelier_images_generated_total` | counter | | images generated and saved to the gallery |
//! | `atelier_training_steps_total` | counter | | style-training optimiser steps |
//! | `atelier_training_steps_per_second` | gauge | | speed of the running training (0 when none runs) |
//! | `atelier_model_load_seconds` | gauge | `purpose` | how long the last model load took (`generation`, `training`) |
//! | `process_resident_memory_bytes` | gauge | | resident memory of the process |
//! | `atelier_memory_limit_bytes` | gauge | | the memory the studio may use (`--max-memory`) |
//! | `atelier_build_info` | gauge | `version`, `commit` | always 1 |
//! | `atelier_deployment_requests_total` | counter | `deployment`, `version`, `status` | requests served by a deployment |
//! | `atelier_deployment_request_duration_seconds` | histogram | `deployment` | a deployment's request latency |
//! | `atelier_deployment_quality_score` | gauge | `deployment` | rolling quality score of served images |
//! | `atelier_deployment_drift_alert` | gauge | `deployment` | 1 while quality drift is detected, else 0 |
//!
//! `route` is the route's template as axum matched it (`/api/jobs/{id}`), never the raw
//! path, so the number of series stays bounded whatever URLs clients send; requests no route
//! matched (static site files, unknown paths) share [`FALLBACK_ROUTE`]. `kind` is the queue
//! task kind (`job`, `training`, `bake`, `optimisation`). A labelled family appears in the
//! output once it has a first series (Prometheus's client rule: no samples, no family).
//!
//! # Per-deployment metrics
//!
//! For serving endpoints ("deployments"), labelled by the deployment's name:
//! [`deployment_request`] (one per answered request, with the registry version that served
//! it and the HTTP status), [`deployment_latency`], [`set_quality_score`],
//! [`set_drift_alert`], and [`forget_deployment`] when a deployment is deleted (so its series
//! end instead of lingering). The rule `AtelierDeploymentQualityDrift` in
//! `monitoring/alerts.yml` fires on the drift gauge.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

/// The `route` label of requests that no route matched (served by the fallback: static site
/// files, unknown paths).
pub const FALLBACK_ROUTE: &str = "(fallback)";

/// Request latencies, in seconds: a few milliseconds for JSON, up to a minute for
/// synchronous generations.
const LATENCY_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Queue waits, in seconds: from nothing to an hour behind a long queue.
const WAIT_BUCKETS: &[f64] = &[0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];
/// Denoising step times, in seconds: a millisecond (the built-in toy model) to tens of seconds
/// (SDXL on a CPU).
const STEP_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Every metric family, registered once in `registry`.
struct Metrics {
    registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    queue_length: IntGaugeVec,
    queue_wait: HistogramVec,
    step_seconds: Histogram,
    generations: IntCounterVec,
    images: IntCounter,
    training_steps: IntCounter,
    training_rate: Gauge,
    model_load: GaugeVec,
    resident_memory: IntGauge,
    memory_limit: IntGauge,
    deployment_requests: IntCounterVec,
    deployment_duration: HistogramVec,
    deployment_quality: GaugeVec,
    deployment_drift: IntGaugeVec,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Registers `metric` in `registry` and returns it. The names and labels are constants of
/// this module, so a failure is a bug here (a duplicate or malformed name), caught by the
/// unit tests.
fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: prometheus::Result<M>) -> M {
    let metric = metric.expect("a valid metric definition");
    registry.register(Box::new(metric.clone())).expect("a metric name registered once");
    metric
}

fn histogram_opts(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(buckets.to_vec())
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        let build_info = register(
            &r,
            IntGaugeVec::new(
                Opts::new("atelier_build_info", "Always 1; the labels say which Atelier build is running (commit empty outside a git checkout)."),
                &["version", "commit"],
            ),
        );
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION"), env!("ATELIER_COMMIT")]).set(1);
        let generations = register(
            &r,
            IntCounterVec::new(Opts::new("atelier_generations_total", "Generations ended, by outcome (done, failed, cancelled)."), &["outcome"]),
        );
        for outcome in ["done", "failed", "cancelled"] {
            generations.with_label_values(&[outcome]);
        }
        Self {
            http_requests: register(
                &r,
                IntCounterVec::new(
                    Opts::new("atelier_http_requests_total", "HTTP requests answered, by method, route template and status code."),
                    &["method", "route", "status"],
                ),
            ),
            http_duration: register(
                &r,
                HistogramVec::new(
                    histogram_opts(
                        "atelier_http_request_duration_seconds",
                        "Seconds from a request's arrival to its response head, by method and route template.",
                        LATENCY_BUCKETS,
                    ),
                    &["method", "route"],
                ),
            ),
            queue_length: register(
                &r,
                IntGaugeVec::new(Opts::new("atelier_queue_length", "Tasks waiting in the work queue, by task kind."), &["kind"]),
            ),
            queue_wait: register(
                &r,
                HistogramVec::new(
                    histogram_opts("atelier_queue_wait_seconds", "Seconds a task waited in the queue before a worker started it, by task kind.", WAIT_BUCKETS),
                    &["kind"],
                ),
            ),
            step_seconds: register(
                &r,
                Histogram::with_opts(histogram_opts(
                    "atelier_generation_step_seconds",
                    "Seconds per denoising step of generations (the first step also counts encoding the prompt).",
                    STEP_BUCKETS,
                )),
            ),
            generations,
            images: register(&r, IntCounter::new("atelier_images_generated_total", "Images generated and saved to the gallery.")),
            training_steps: register(&r, IntCounter::new("atelier_training_steps_total", "Style-training optimiser steps taken.")),
            training_rate: register(
                &r,
                Gauge::new("atelier_training_steps_per_second", "Optimiser steps per second of the running style training; 0 when none runs."),
            ),
            model_load: register(
                &r,
                GaugeVec::new(
                    Opts::new("atelier_model_load_seconds", "Seconds the last load of the model took, by purpose (generation, training)."),
                    &["purpose"],
                ),
            ),
            resident_memory: register(&r, IntGauge::new("process_resident_memory_bytes", "Resident memory size in bytes.")),
            memory_limit: register(
                &r,
                IntGauge::new("atelier_memory_limit_bytes", "Memory the studio may use (--max-memory); heavier requests are refused."),
            ),
            deployment_requests: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "atelier_deployment_requests_total",
                        "Requests served by a deployment, by deployment, the registry version that served it, and status code.",
                    ),
                    &["deployment", "version", "status"],
                ),
            ),
            deployment_duration: register(
                &r,
                HistogramVec::new(
                    histogram_opts("atelier_deployment_request_duration_seconds", "Seconds a deployment took to answer a request.", LATENCY_BUCKETS),
                    &["deployment"],
                ),
            ),
            deployment_quality: register(
                &r,
                GaugeVec::new(
                    Opts::new("atelier_deployment_quality_score", "Rolling quality score of a deployment's scored images (higher is better)."),
                    &["deployment"],
                ),
            ),
            deployment_drift: register(
                &r,
                IntGaugeVec::new(
                    Opts::new("atelier_deployment_drift_alert", "1 while a deployment's served quality has drifted from its reference, else 0."),
                    &["deployment"],
                ),
            ),
            registry: r,
        }
    }
}

/// The text exposition of every metric, with the resident memory read now.
pub fn render() -> Result<String, prometheus::Error> {
    let m = &*METRICS;
    if let Some(bytes) = resident_memory_bytes() {
        m.resident_memory.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
    TextEncoder::new().encode_to_string(&m.registry.gather())
}

/// The process's resident memory in bytes: `/proc/self/statm` on Linux, `task_info` on
/// macOS, `GetProcessMemoryInfo` on Windows (through the `memory-stats` crate); `None`
/// where the platform does not tell.
pub fn resident_memory_bytes() -> Option<u64> {
    memory_stats::memory_stats().map(|s| s.physical_mem as u64)
}

/// `GET /metrics`: [`render`] as `text/plain; version=0.0.4`.
pub async fn handler() -> Response {
    match render() {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => crate::ApiError::Internal(format!("encoding the metrics: {e}")).into_response(),
    }
}

/// Middleware (`axum::middleware::from_fn`) counting every request by method, route
/// template and status, and timing it. Put on the whole router with `Router::layer`, it
/// runs after routing, where [`MatchedPath`] tells the template.
pub async fn track_http(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let method = method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    let route = route.as_deref().unwrap_or(FALLBACK_ROUTE);
    let m = &*METRICS;
    m.http_requests.with_label_values(&[method, route, response.status().as_str()]).inc();
    m.http_duration.with_label_values(&[method, route]).observe(started.elapsed().as_secs_f64());
    response
}

/// The `method` label: the standard methods by name, anything else as `OTHER` (methods are
/// open-ended, labels must not be).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// The queue of `kind` now has `waiting` tasks waiting.
pub fn set_queue_length(kind: &str, waiting: usize) {
    METRICS.queue_length.with_label_values(&[kind]).set(i64::try_from(waiting).unwrap_or(i64::MAX));
}

/// A task of `kind` started after waiting `waited` in the queue.
pub fn queue_waited(kind: &str, waited: Duration) {
    METRICS.queue_wait.with_label_values(&[kind]).observe(waited.as_secs_f64());
}

/// One denoising step took `took`.
pub fn generation_step(took: Duration) {
    METRICS.step_seconds.observe(took.as_secs_f64());
}

/// A generation ended with `outcome` (`done`, `failed` or `cancelled`) after saving `images`
/// images.
pub fn generation_ended(outcome: &str, images: usize) {
    METRICS.generations.with_label_values(&[outcome]).inc();
    METRICS.images.inc_by(images as u64);
}

/// A style training took one optimiser step; `steps_per_second` is its measured speed,
/// where known.
pub fn training_step(steps_per_second: Option<f64>) {
    METRICS.training_steps.inc();
    if let Some(rate) = steps_per_second.filter(|r| r.is_finite()) {
        METRICS.training_rate.set(rate);
    }
}

/// The running style training ended (done, stopped or failed): its speed goes back to 0.
pub fn training_ended() {
    METRICS.training_rate.set(0.0);
}

/// Loading the model for `purpose` (`generation`, `training`) took `took`.
pub fn set_model_load_seconds(purpose: &str, took: Duration) {
    METRICS.model_load.with_label_values(&[purpose]).set(took.as_secs_f64());
}

/// The studio may use `bytes` of memory (`--max-memory`, or its default).
pub fn set_memory_limit(bytes: u64) {
    METRICS.memory_limit.set(i64::try_from(bytes).unwrap_or(i64::MAX));
}

/// Deployment `name` answered a request with HTTP `status`, served by registry `version`
/// (its number, e.g. `"3"`, or `""` where no version applies, as for a baked blend).
/// Feeds `atelier_deployment_requests_total{deployment, version, status}`.
pub fn deployment_request(name: &str, version: &str, status: u16) {
    METRICS.deployment_requests.with_label_values(&[name, version, &status.to_string()]).inc();
}

/// Deployment `name` took `seconds` to answer a request.
/// Feeds `atelier_deployment_request_duration_seconds{deployment}`.
pub fn deployment_latency(name: &str, seconds: f64) {
    METRICS.deployment_duration.with_label_values(&[name]).observe(seconds);
}

/// The rolling quality score of deployment `name`'s scored images is now `score` (the
/// quality monitor's figure; higher is better).
/// Feeds `atelier_deployment_quality_score{deployment}`.
pub fn set_quality_score(name: &str, score: f64) {
    METRICS.deployment_quality.with_label_values(&[name]).set(score);
}

/// Whether deployment `name`'s quality has drifted from its reference (`firing`), or not.
/// Feeds `atelier_deployment_drift_alert{deployment}` (1 or 0).
pub fn set_drift_alert(name: &str, firing: bool) {
    METRICS.deployment_drift.with_label_values(&[name]).set(i64::from(firing));
}

/// Deployment `name` was deleted: every series labelled with it ends.
pub fn forget_deployment(name: &str) {
    use prometheus::core::Collector;
    let m = &*METRICS;
    // The request counter has more labels than the deployment: remove each of its series.
    for family in m.deployment_requests.collect() {
        for metric in family.get_metric() {
            let labels: std::collections::HashMap<&str, &str> = metric.get_label().iter().map(|l| (l.name(), l.value())).collect();
            if labels.get("deployment") == Some(&name) {
                let _ = m.deployment_requests.remove(&labels);
            }
        }
    }
    let _ = m.deployment_duration.remove_label_values(&[name]);
    let _ = m.deployment_quality.remove_label_values(&[name]);
    let _ = m.deployment_drift.remove_label_values(&[name]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample `series` (name and labels exactly as rendered) in `text`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_family_renders_with_help_and_type() {
        set_queue_length("test-kind", 3);
        generation_step(Duration::from_millis(20));
        let text = render().unwrap();
        for (name, kind) in [
            ("atelier_build_info", "gauge"),
            ("atelier_queue_length", "gauge"),
            ("atelier_generation_step_seconds", "histogram"),
            ("atelier_generations_total", "counter"),
            ("atelier_images_generated_total", "counter"),
            ("atelier_training_steps_total", "counter"),
            ("atelier_training_steps_per_second", "gauge"),
            ("process_resident_memory_bytes", "gauge"),
        ] {
            assert!(text.contains(&format!("# HELP {name} ")), "no HELP for {name}:\n{text}");
            assert!(text.contains(&format!("# TYPE {name} {kind}\n")), "no TYPE {kind} for {name}:\n{text}");
        }
        assert_eq!(sample(&text, "atelier_queue_length{kind=\"test-kind\"}"), Some(3.0));
        let build = format!("atelier_build_info{{commit=\"{}\",version=\"{}\"}}", env!("ATELIER_COMMIT"), env!("CARGO_PKG_VERSION"));
        assert_eq!(sample(&text, &build), Some(1.0), "{text}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn resident_memory_is_the_process_rss() {
        let bytes = resident_memory_bytes().expect("statm is readable on Linux");
        // A test binary with the router linked in is several MiB resident, and not terabytes.
        assert!((4 << 20..1 << 40).contains(&bytes), "{bytes}");
        let rendered = sample(&render().unwrap(), "process_resident_memory_bytes").unwrap();
        assert!(rendered >= (4 << 20) as f64, "{rendered}");
    }

    #[test]
    fn deployment_series_appear_and_are_forgotten() {
        deployment_request("unit-a", "3", 200);
        deployment_request("unit-a", "3", 200);
        deployment_request("unit-a", "4", 500);
        deployment_request("unit-b", "1", 200);
        deployment_latency("unit-a", 0.2);
        set_quality_score("unit-a", 0.75);
        set_drift_alert("unit-a", true);
        let text = render().unwrap();
        assert_eq!(sample(&text, r#"atelier_deployment_requests_total{deployment="unit-a",status="200",version="3"}"#), Some(2.0));
        assert_eq!(sample(&text, r#"atelier_deployment_requests_total{deployment="unit-a",status="500",version="4"}"#), Some(1.0));
        assert_eq!(sample(&text, r#"atelier_deployment_request_duration_seconds_count{deployment="unit-a"}"#), Some(1.0));
        assert_eq!(sample(&text, r#"atelier_deployment_quality_score{deployment="unit-a"}"#), Some(0.75));
        assert_eq!(sample(&text, r#"atelier_deployment_drift_alert{deployment="unit-a"}"#), Some(1.0));
        set_drift_alert("unit-a", false);
        assert_eq!(sample(&render().unwrap(), r#"atelier_deployment_drift_alert{deployment="unit-a"}"#), Some(0.0));

        forget_deployment("unit-a");
        let text = render().unwrap();
        assert!(!text.contains("deployment=\"unit-a\""), "{text}");
        assert_eq!(sample(&text, r#"atelier_deployment_requests_total{deployment="unit-b",status="200",version="1"}"#), Some(1.0));
    }

    #[test]
    fn odd_methods_share_one_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "OTHER");
    }
}
