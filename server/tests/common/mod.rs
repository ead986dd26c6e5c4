//! Helpers shared by the HTTP tests: requests against the router in process, JSON
//! decoding, job polling and error checks.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use app::dto::{JobState, JobStatus};
use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

/// A response, read to the end.
pub struct Reply {
    pub status: StatusCode,
    pub body: Vec<u8>,
    pub headers: HeaderMap,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not the JSON expected ({e}): {}", self.text()))
    }

    pub fn header(&self, name: header::HeaderName) -> Option<String> {
        self.headers.get(name).map(|v| v.to_str().unwrap().to_string())
    }
}

/// Sends a request with an optional JSON body.
pub async fn send(app: &Router, method: Method, uri: &str, body: Option<Value>) -> Reply {
    match body {
        Some(v) => send_raw(app, method, uri, "application/json", serde_json::to_vec(&v).unwrap()).await,
        None => send_raw(app, method, uri, "", Vec::new()).await,
    }
}

/// Sends a request with a body of any type (an empty `content_type` sends none).
pub async fn send_raw(app: &Router, method: Method, uri: &str, content_type: &str, body: Vec<u8>) -> Reply {
    let mut req = Request::builder().method(method).uri(uri);
    if !content_type.is_empty() {
        req = req.header(header::CONTENT_TYPE, content_type);
    }
    let res = app.clone().oneshot(req.body(Body::from(body)).unwrap()).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes().to_vec();
    Reply { status, body, headers }
}

/// GETs `uri`, expecting 200 and JSON of type `T`.
pub async fn get_json<T: serde::de::DeserializeOwned>(app: &Router, uri: &str) -> T {
    let r = send(app, Method::GET, uri, None).await;
    assert_eq!(r.status, StatusCode::OK, "{uri}: {}", r.text());
    r.json()
}

/// Polls a generation job until `done` says stop, failing after `limit`.
pub async fn wait_job(app: &Router, job: &str, limit: Duration, done: impl Fn(&JobState) -> bool) -> JobStatus {
    let start = Instant::now();
    loop {
        let s: JobStatus = get_json(app, &format!("/api/jobs/{job}")).await;
        if done(&s.state) {
            return s;
        }
        assert!(start.elapsed() < limit, "job {job} stuck in {:?}", s.state);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Asserts a JSON error with `status` whose message contains `needle`.
pub async fn expect_error(app: &Router, method: Method, uri: &str, body: Option<Value>, status: StatusCode, needle: &str) {
    let r = send(app, method, uri, body).await;
    assert_json_error(&r, status, needle);
}

/// Asserts that `r` is a JSON error with `status` whose message contains `needle`.
pub fn assert_json_error(r: &Reply, status: StatusCode, needle: &str) {
    let text = r.text();
    assert_eq!(r.status, status, "{text}");
    let v: Value = serde_json::from_slice(&r.body).unwrap_or_else(|_| panic!("not JSON: {text}"));
    let msg = v["error"].as_str().unwrap_or_else(|| panic!("no error field: {text}"));
    assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
}

/// A multipart/form-data body with each (file name, bytes) in a `files` field, as the
/// Train page uploads them; returns (content type, body).
pub fn multipart(files: &[(&str, Vec<u8>)]) -> (String, Vec<u8>) {
    use std::io::Write;
    let boundary = "atelier-test-boundary-7f3a";
    let mut body = Vec::new();
    for (name, bytes) in files {
        write!(body, "--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").unwrap();
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    write!(body, "--{boundary}--\r\n").unwrap();
    (format!("multipart/form-data; boundary={boundary}"), body)
}

fn repo_root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A studio on the starter model (64×64) with the shipped styles and a style trainer, its
/// data in `data`.
pub fn studio_with_trainer(data: &std::path::Path) -> atelier_server::AppState {
    use atelier_server::styles::trainer::{ModelSource, Trainer};
    use atelier_server::styles::StyleLibrary;
    let repo = repo_root();
    let library = StyleLibrary::new(data.join("styles")).with_shipped(repo.join("models/styles"));
    let model = atelier_server::LoadedModel::load(&repo.join("models/starter"), &candle_core::Device::Cpu).unwrap().with_styles(library.clone());
    let options = leptos::config::LeptosOptions::builder().output_name("atelier").site_root(data.join("site").to_string_lossy().as_ref()).build();
    let state = atelier_server::AppState::new(options, std::sync::Arc::new(model), data, (64, 64), None).unwrap().with_styles(library);
    let source = ModelSource { dir: repo.join("models/starter"), device: candle_core::Device::Cpu, resolution: 64, budget: atelier_engine::memory::MemoryBudget::from_machine() };
    let trainer = std::sync::Arc::new(Trainer::open(&data.join("trainings"), state.styles.clone(), data.join("tracking"), source, &state.workers).unwrap());
    state.with_trainer(trainer)
}
