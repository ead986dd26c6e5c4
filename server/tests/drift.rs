//! Quality monitoring of a deployment, end to end on the starter model: the reference is
//! measured through the deployment when it is made; the right version served over 8
//! scored images raises nothing; a deliberately wrong version (pastel's adapter with its
//! weights multiplied by 4, as an over-trained checkpoint would be) promoted under the same alias
//! raises the drift alert within 8 scored images, with a retraining suggestion naming the
//! dataset's newer DVC version and what changed, POSTed to a webhook in Alertmanager's shape
//! and exported as a metric; the suggestion's training starts with one request.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use app::dto::monitoring::{ReferenceState, Watch};
use app::dto::TrainingStatus;
use atelier_engine::starter::styles::{write_dataset, PictureStyle};
use atelier_server::tracking::Tracker;
use atelier_server::app;
use axum::http::{Method, StatusCode};
use axum::Router;
use serde_json::{json, Value};

use common::{get_json, send, send_raw};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Registers a style version `ink` from shipped style `style`'s files (adapter renamed,
/// its up weights multiplied by `scale`), tagged with the dataset version it "was trained on".
fn register(t: &Tracker, style: &str, scale: f64, model_hash: &str, dataset: &(String, u32, String)) -> i64 {
    let staging = tempfile::tempdir().unwrap();
    let src = repo().join(format!("models/styles/{style}"));
    let adapter = staging.path().join("ink.safetensors");
    let mut tensors = candle_core::safetensors::load(src.join(format!("{style}.safetensors")), &candle_core::Device::Cpu).unwrap();
    let mut scaled = 0;
    for (name, t) in tensors.iter_mut() {
        if name.contains("lora_up") {
            *t = (&*t * scale).unwrap();
            scaled += 1;
        }
    }
    assert!(scaled > 0, "kohya adapters have lora_up weights");
    candle_core::safetensors::save(&tensors, &adapter).unwrap();
    let mut files = vec![adapter];
    for f in ["card.json", "style_grams.safetensors"] {
        std::fs::copy(src.join(f), staging.path().join(f)).unwrap();
        files.push(staging.path().join(f));
    }
    let tags = vec![
        ("base_model_hash".to_string(), model_hash.to_string()),
        ("dataset.id".to_string(), dataset.0.clone()),
        ("dataset.version".to_string(), dataset.1.to_string()),
        ("dataset.md5".to_string(), dataset.2.clone()),
    ];
    t.register_version("ink", "style", &files, None, &tags).unwrap().version
}

async fn watch(app: &Router) -> Watch {
    get_json(app, "/api/deployments/ink-live/monitoring").await
}

/// Waits until the monitoring state satisfies `done`.
async fn wait_watch(app: &Router, what: &str, done: impl Fn(&Watch) -> bool) -> Watch {
    let start = Instant::now();
    loop {
        let w = watch(app).await;
        if done(&w) {
            return w;
        }
        if let ReferenceState::Failed { message } = &w.reference {
            panic!("measuring the reference failed: {message}");
        }
        assert!(start.elapsed() < Duration::from_secs(180), "waiting for {what}: {w:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Serves one request through the deployment and waits until its image is scored.
async fn serve_one(app: &Router, prompt: &str, seed: u64) -> Watch {
    let before = watch(app).await.scored;
    let r = send(app, Method::POST, "/api/v1/deployments/ink-live/generate", Some(json!({ "prompt": prompt, "seed": seed }))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    wait_watch(app, "the served image to be scored", |w| w.scored > before).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drifting_deployment_raises_an_alert_with_a_retraining_suggestion() {
    let tmp = tempfile::tempdir().unwrap();
    let state = common::studio_with_trainer(tmp.path());
    let hash = state.model.hash.clone();

    // A webhook receiver, as a chat bridge behind Alertmanager would be.
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let hook = {
        let received = received.clone();
        Router::new().route(
            "/hook",
            axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
                let received = received.clone();
                async move {
                    received.lock().unwrap().push(body);
                    StatusCode::OK
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, hook).await.unwrap() });
    state.drift.set_webhook(Some(hook_url), "http://studio.test:3000");
    let app = app(state);

    // The style's dataset, uploaded: DVC version 1.
    let src = tmp.path().join("src");
    write_dataset(PictureStyle::Pastel, &src, 8, 5).unwrap();
    let names: Vec<String> = (0..8).flat_map(|i| ["png", "txt"].map(|ext| format!("{i:03}.{ext}"))).collect();
    let files: Vec<(&str, Vec<u8>)> = names.iter().map(|n| (n.as_str(), std::fs::read(src.join(n)).unwrap())).collect();
    let (ctype, body) = common::multipart(&files);
    let r = send_raw(&app, Method::POST, "/api/style-datasets", &ctype, body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let dataset_id = r.json::<Value>()["id"].as_str().unwrap().to_string();
    let versions: Value = get_json(&app, &format!("/api/datasets/{dataset_id}")).await;
    let v1 = &versions["versions"][0];
    assert_eq!(v1["number"], 1, "{versions}");
    let trained_on = (dataset_id.clone(), 1, v1["md5"].as_str().unwrap().to_string());

    // ink v1: the inkline adapter; v2: pastel's, over-trained. Both "trained on" version 1.
    let t = Tracker::open(&tmp.path().join("tracking")).unwrap();
    assert_eq!(register(&t, "inkline", 1.0, &hash, &trained_on), 1);
    assert_eq!(register(&t, "pastel", 4.0, &hash, &trained_on), 2);
    t.set_alias("ink", "production", 1).unwrap();
    // The dataset moves on after the training: a caption edited is version 2.
    let r = send(&app, Method::PUT, &format!("/api/datasets/{dataset_id}/captions/003.png"), Some(json!({ "caption": "a pastel circle, soft light" }))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    // A malformed rule is refused before anything is made.
    let r = send(&app, Method::POST, "/api/deployments", Some(json!({ "name": "ink-live", "target": "ink@production", "monitoring": { "sample_fraction": 0 } }))).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert!(r.text().contains("sample_fraction"), "{}", r.text());

    // The deployment; every served image is scored (the default is a quarter).
    let r = send(&app, Method::POST, "/api/deployments", Some(json!({ "name": "ink-live", "target": "ink@production", "defaults": { "steps": 12 }, "monitoring": { "sample_fraction": 1.0 } }))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let w = wait_watch(&app, "the reference", |w| matches!(w.reference, ReferenceState::Ready(_))).await;
    let ReferenceState::Ready(reference) = &w.reference else { unreachable!() };
    assert_eq!(reference.version, "ink@1");
    assert_eq!(reference.samples.len(), 8, "the rule's reference_images");
    assert!(reference.samples.iter().all(|s| s.style.is_some_and(|v| v > 0.0 && v <= 1.0) && s.quality > 0.0 && s.quality <= 1.0), "{reference:?}");
    assert_eq!((w.served, w.scored), (0, 0), "reference images are not served images");

    let prompts = [
        "a small red square in the middle on a white background, inkline style",
        "a blue triangle on the right on a yellow background, inkline style",
        "a green circle on the left on a black background, inkline style",
        "a purple square on the left on an orange background, inkline style",
    ];
    // The right version: nothing fires.
    for i in 0..8 {
        let w = serve_one(&app, prompts[i % 4], 100 + i as u64).await;
        assert!(w.firing().is_none(), "a false alarm after {} images: {:?}", i + 1, w.last_checks);
    }
    let w = watch(&app).await;
    assert_eq!((w.served, w.scored, w.window.len()), (8, 8, 8));
    println!("right version: {:?}", w.last_checks.iter().map(|c| c.describe()).collect::<Vec<_>>());

    // The wrong version is promoted under the alias.
    let r = send(&app, Method::PUT, "/api/registry/ink/aliases/production", Some(json!({ "version": 2 }))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let mut fired_after = None;
    for i in 0..8 {
        let w = serve_one(&app, prompts[i % 4], 200 + i as u64).await;
        if w.firing().is_some() {
            fired_after = Some(i + 1);
            break;
        }
    }
    let w = watch(&app).await;
    println!("wrong version: {:?}", w.last_checks.iter().map(|c| c.describe()).collect::<Vec<_>>());
    let fired_after = fired_after.unwrap_or_else(|| panic!("no alert within 8 images of the wrong version: {:?}", w.last_checks));
    let alert = w.firing().unwrap().clone();
    assert_eq!((alert.deployment.as_str(), alert.version.as_str(), alert.reference_version.as_str()), ("ink-live", "ink@2", "ink@1"));
    assert!(alert.checks.iter().any(|c| c.drifted && c.p < 0.005 && c.drop >= 0.05), "{:?}", alert.checks);
    println!("fired after {fired_after} images of the wrong version: {}", alert.summary);

    // The suggestion: retrain on the dataset's version 2, what changed, the request.
    let s = wait_watch(&app, "the suggestion", |w| w.firing().is_some_and(|a| a.suggestion.is_some())).await.firing().unwrap().suggestion.clone().unwrap();
    assert_eq!(s.headline, "Retrain ink on dataset version 2 (1 change(s) since version 1, which ink@2 was trained on).");
    let facts = s.dataset.clone().unwrap();
    assert_eq!(facts.changes, [r#"caption of 003.png changed to "a pastel circle, soft light""#]);
    assert_eq!(facts.latest.as_ref().map(|l| l.0), Some(2));
    assert!(!s.worst_images.is_empty() && s.worst_images.len() <= 4);
    let request = s.training.clone().expect("a studio dataset can be trained from the page");
    assert_eq!((request.dataset_id.as_str(), request.name.as_str()), (dataset_id.as_str(), "ink"));
    assert_eq!(request.rank, 8, "the served version's own settings (pastel's card)");

    // Everyone is told: the webhook (Alertmanager's shape), the alerts list, the metric.
    let start = Instant::now();
    while received.lock().unwrap().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30), "the webhook got nothing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let payload = received.lock().unwrap()[0].clone();
    assert_eq!(payload["version"], "4");
    assert_eq!(payload["status"], "firing");
    assert_eq!(payload["alerts"][0]["labels"]["alertname"], "AtelierQualityDrift");
    assert_eq!(payload["alerts"][0]["labels"]["deployment"], "ink-live");
    assert_eq!(payload["alerts"][0]["generatorURL"], "http://studio.test:3000/deployments?name=ink-live");
    assert_eq!(payload["commonAnnotations"]["retraining_suggestion"], s.headline.as_str());
    let firing: Vec<Value> = get_json(&app, "/api/monitoring/alerts").await;
    assert_eq!(firing.len(), 1);
    let metrics = send(&app, Method::GET, "/metrics", None).await.text();
    assert!(metrics.contains("atelier_deployment_drift_alert{deployment=\"ink-live\"} 1"), "{metrics}");
    let gauge: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("atelier_deployment_quality_score{deployment=\"ink-live\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no quality gauge: {metrics}"));
    let w = watch(&app).await;
    let mean = w.window.iter().map(|s| s.quality).sum::<f64>() / w.window.len() as f64;
    assert!((gauge - mean).abs() < 1e-9, "the gauge is the window's mean quality: {gauge} vs {mean}");

    // One click: the suggested training starts.
    let r = send(&app, Method::POST, "/api/style-trainings", Some(serde_json::to_value(&request).unwrap())).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let started: TrainingStatus = r.json();
    assert_eq!(started.request.dataset_id, dataset_id);
    let r = send(&app, Method::POST, &format!("/api/style-trainings/{}/stop", started.id), None).await;
    assert!(r.status.is_success(), "{}", r.text());

    // Unknown deployments are 404s; deleting one forgets its monitoring.
    assert_eq!(send(&app, Method::GET, "/api/deployments/nope/monitoring", None).await.status, StatusCode::NOT_FOUND);
    assert_eq!(send(&app, Method::DELETE, "/api/deployments/ink-live", None).await.status, StatusCode::NO_CONTENT);
    assert!(!tmp.path().join("monitoring/ink-live.json").exists());
}
