//! Core ML exports over HTTP, on the starter model and the shipped styles: a queued export
//! of a library style ends in a zip holding every package, the tokenizer and the manifest;
//! bad requests are refused before anything is queued; a cancelled export leaves nothing.

mod common;

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use app::dto::exports::{ExportState, ExportStatus};
use app::dto::JobAccepted;
use axum::http::{header, Method, StatusCode};
use axum::Router;
use serde_json::{json, Value};

use common::{assert_json_error, get_json, send};

fn setup(data: &Path) -> Router {
    atelier_server::app(common::studio_with_trainer(data))
}

/// Polls an export until `done` says stop, failing after `limit`.
async fn wait_export(app: &Router, id: &str, limit: Duration, done: impl Fn(&ExportStatus) -> bool) -> ExportStatus {
    let start = Instant::now();
    loop {
        let s: ExportStatus = get_json(app, &format!("/api/exports/{id}")).await;
        if done(&s) {
            return s;
        }
        assert!(start.elapsed() < limit, "export {id} still {:?} after {limit:?}", s.state);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn exports_a_library_style_as_a_zip() {
    let tmp = tempfile::tempdir().unwrap();
    let app = setup(tmp.path());
    let r = send(&app, Method::POST, "/api/exports", Some(json!({"styles": [{"name": "pastel", "weight": 0.8}], "precision": "fp32"}))).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let queued: ExportStatus = r.json();
    assert_eq!(queued.name, "Atelier-pastel-coreml");
    assert!(matches!(queued.state, ExportState::Queued { .. } | ExportState::Running), "{:?}", queued.state);
    let id = queued.id.clone();

    // The event stream ends with the finished export, having reported each package.
    let events = send(&app, Method::GET, &format!("/api/exports/{id}/events"), None).await;
    assert_eq!(events.status, StatusCode::OK);
    let statuses: Vec<ExportStatus> = events.text().lines().filter_map(|l| l.strip_prefix("data:")).map(|d| serde_json::from_str(d.trim()).unwrap()).collect();
    let last = statuses.last().expect("at least one event");
    let ExportState::Done { bytes, packages, compression_errors } = &last.state else { panic!("{:?}", last.state) };
    assert_eq!(last.done, last.total);
    assert!(last.total >= 4, "text encoder, UNet, VAE decoder and encoder: {}", last.total);
    let names: Vec<&str> = packages.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["TextEncoder", "Unet", "VAEDecoder", "VAEEncoder"]);
    assert!(packages.iter().all(|p| p.bytes > 0 && p.functions == ["main"]), "{packages:?}");
    assert_eq!(compression_errors.len(), 4);
    for e in compression_errors {
        assert_eq!(e.option, "fp32");
        assert!(e.relative_error < 1e-6, "fp32 stores the weights as they are: {e:?}");
    }

    // The zip: one readable folder with every package, the tokenizer and the manifest.
    let file = send(&app, Method::GET, &format!("/api/exports/{id}/file"), None).await;
    assert_eq!(file.status, StatusCode::OK, "{}", file.text());
    assert_eq!(file.header(header::CONTENT_TYPE).as_deref(), Some("application/zip"));
    assert_eq!(file.header(header::CONTENT_DISPOSITION).as_deref(), Some("attachment; filename=\"Atelier-pastel-coreml.zip\""));
    assert_eq!(file.body.len() as u64, *bytes);
    assert_eq!(&file.body[..2], b"PK");
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(file.body.clone())).unwrap();
    let listed: Vec<String> = zip.file_names().map(|n| n.unwrap().into_owned()).collect();
    let root = "Atelier-pastel-coreml";
    for package in ["TextEncoder", "Unet", "VAEDecoder", "VAEEncoder"] {
        for f in ["Manifest.json", "Data/com.apple.CoreML/model.mlmodel", "Data/com.apple.CoreML/weights/weight.bin"] {
            let name = format!("{root}/{package}.mlpackage/{f}");
            assert!(listed.contains(&name), "{name} not in {listed:?}");
        }
    }
    for f in ["vocab.json", "merges.txt", "atelier_export.json"] {
        assert!(listed.contains(&format!("{root}/{f}")), "{f} not in {listed:?}");
    }
    let mut manifest = String::new();
    zip.by_name(&format!("{root}/atelier_export.json")).unwrap().read_to_string(&mut manifest).unwrap();
    let manifest: Value = serde_json::from_str(&manifest).unwrap();
    assert_eq!(manifest["styles"][0]["name"], "pastel");
    assert_eq!(manifest["styles"][0]["kind"], "lora");
    assert_eq!(manifest["styles"][0]["components"][0]["weight"], 0.8);
    assert_eq!(manifest["settings"]["precision"], "fp32");
    assert_eq!(manifest["settings"]["width"], 64);
    let mut weights = Vec::new();
    zip.by_name(&format!("{root}/TextEncoder.mlpackage/Data/com.apple.CoreML/weights/weight.bin")).unwrap().read_to_end(&mut weights).unwrap();
    let on_disk = std::fs::read(tmp.path().join(format!("exports/{id}/export/TextEncoder.mlpackage/Data/com.apple.CoreML/weights/weight.bin"))).unwrap();
    assert!(!weights.is_empty());
    assert_eq!(weights, on_disk, "the zip holds the exported weights unchanged");

    // Listed, and a finished export cannot be cancelled any more.
    let listed: Vec<ExportStatus> = get_json(&app, "/api/exports").await;
    assert_eq!(listed.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), [id.as_str()]);
    assert_eq!(send(&app, Method::POST, &format!("/api/exports/{id}/cancel"), None).await.json::<Value>()["state"], "done");
    assert_json_error(&send(&app, Method::GET, "/api/exports/nope", None).await, StatusCode::NOT_FOUND, "no export");
    assert_json_error(&send(&app, Method::GET, "/api/exports/nope/file", None).await, StatusCode::NOT_FOUND, "no export");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_export_requests_are_refused_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let app = setup(tmp.path());
    let post = |body: Value| {
        let app = app.clone();
        async move { send(&app, Method::POST, "/api/exports", Some(body)).await }
    };
    assert_json_error(&post(json!({"width": 100})).await, StatusCode::BAD_REQUEST, "invalid width: 100 pixels is not a multiple of 8");
    assert_json_error(&post(json!({"height": 4096})).await, StatusCode::BAD_REQUEST, "invalid height");
    assert_json_error(&post(json!({"palettize": 5})).await, StatusCode::BAD_REQUEST, "invalid palettize: 5 bits");
    assert_json_error(&post(json!({"quantize": "int4"})).await, StatusCode::BAD_REQUEST, "invalid quantize");
    assert_json_error(&post(json!({"palettize": 4, "quantize": "int8"})).await, StatusCode::BAD_REQUEST, "not both");
    // Several styles are multifunction packages, which need iOS 18.
    assert_json_error(
        &post(json!({"styles": [{"name": "pastel"}, {"name": "inkline"}], "target": "ios16"})).await,
        StatusCode::BAD_REQUEST,
        "invalid target: several styles in one export are multifunction packages, which need --target ios18",
    );
    assert_json_error(&post(json!({"styles": [{"name": "pastel"}, {"name": "pastel"}], "target": "ios18"})).await, StatusCode::BAD_REQUEST, "listed twice");
    assert_json_error(&post(json!({"styles": [{"name": "no-such-style"}]})).await, StatusCode::NOT_FOUND, "no-such-style");
    assert_json_error(&post(json!({"blend": "not-a-link"})).await, StatusCode::BAD_REQUEST, "invalid blend");
    assert_json_error(&post(json!({"blend_name": "x"})).await, StatusCode::BAD_REQUEST, "invalid blend_name");
    assert_json_error(&post(json!({"target": "ios15"})).await, StatusCode::BAD_REQUEST, "unknown variant `ios15`");
    assert_json_error(&post(json!({"precison": "fp32"})).await, StatusCode::BAD_REQUEST, "unknown field `precison`");
    assert_json_error(&post(json!({"styles": [{"name": "pastel", "weight": 99}]})).await, StatusCode::BAD_REQUEST, "invalid styles");
    assert!(get_json::<Vec<Value>>(&app, "/api/exports").await.is_empty(), "nothing refused was queued");
    assert!(!tmp.path().join("exports").read_dir().map(|mut d| d.next().is_some()).unwrap_or(false), "nothing refused was written");
}

/// Generations go first: an export pauses after its first package while they run, and a
/// cancel then ends it with nothing left but its status.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_export_leaves_no_files() {
    let tmp = tempfile::tempdir().unwrap();
    let app = setup(tmp.path());
    let mut jobs = Vec::new();
    for seed in 0..4 {
        let r = send(&app, Method::POST, "/api/generate", Some(json!({"prompt": "a lighthouse", "seed": seed, "steps": 150}))).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
        jobs.push(r.json::<JobAccepted>().job_id);
    }
    let r = send(&app, Method::POST, "/api/exports", Some(json!({"styles": [{"name": "inkline"}]}))).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let id = r.json::<ExportStatus>().id;
    let paused = wait_export(&app, &id, Duration::from_secs(120), |s| s.note.is_some() || s.state.is_finished()).await;
    assert_eq!(paused.state, ExportState::Running, "paused mid-export while generations run");
    assert_eq!((paused.stage.as_str(), paused.done), ("TextEncoder", 1));
    assert!(paused.note.as_deref().unwrap().contains("generations"), "{:?}", paused.note);
    let dir = tmp.path().join(format!("exports/{id}"));
    assert!(dir.join(".export.partial/.TextEncoder.mlpackage.partial/Data/com.apple.CoreML/weights/weight.bin").is_file(), "the export is being staged");

    let r = send(&app, Method::POST, &format!("/api/exports/{id}/cancel"), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let ended = wait_export(&app, &id, Duration::from_secs(60), |s| s.state.is_finished()).await;
    assert_eq!(ended.state, ExportState::Cancelled);
    assert_eq!(ended.note, None);
    let left: Vec<String> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, ["status.json"], "no export folder, staging folder or zip left");
    assert_json_error(&send(&app, Method::GET, &format!("/api/exports/{id}/file"), None).await, StatusCode::BAD_REQUEST, "was cancelled");
    for job in jobs {
        send(&app, Method::POST, &format!("/api/jobs/{job}/cancel"), None).await;
    }
}
