//! The style library over HTTP, and `<lora:NAME:WEIGHT>` in prompts sent to the real
//! starter model: the shipped styles are listed with their cards and files, can be
//! downloaded, cannot be renamed or deleted; user styles can.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use app::dto::{JobAccepted, JobState};
use atelier_server::styles::StyleLibrary;
use atelier_server::{app, AppState, LoadedModel};
use axum::http::{header, Method, StatusCode};
use axum::Router;
use leptos::config::LeptosOptions;
use serde_json::{json, Value};
use common::{send, wait_job, Reply};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn shipped() -> PathBuf {
    repo().join("models/styles")
}

fn setup(data: &Path) -> Router {
    let library = StyleLibrary::new(data.join("styles")).with_shipped(shipped());
    let model = LoadedModel::load(&repo().join("models/starter"), &candle_core::Device::Cpu).unwrap().with_styles(library.clone());
    let options = LeptosOptions::builder().output_name("atelier").site_root(data.join("site").to_string_lossy().as_ref()).build();
    let state = AppState::new(options, Arc::new(model), data, (64, 64), None).unwrap().with_styles(library);
    app(state)
}

async fn run_job(app: &Router, prompt: &str) -> JobState {
    let r = send(app, Method::POST, "/api/generate", Some(json!({"prompt": prompt, "seed": 3, "steps": 8}))).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let job: JobAccepted = r.json();
    wait_job(app, &job.job_id, Duration::from_secs(60), JobState::is_finished).await.state
}

async fn image_of(app: &Router, state: &JobState) -> Vec<u8> {
    let JobState::Done { image_ids, .. } = state else { panic!("job did not finish: {state:?}") };
    let Reply { status, body, .. } = send(app, Method::GET, &format!("/api/images/{}.png", image_ids[0]), None).await;
    assert_eq!(status, StatusCode::OK);
    let img = image::load_from_memory(&body).unwrap().to_rgb8();
    img.into_raw()
}

#[tokio::test(flavor = "multi_thread")]
async fn styles_are_listed_downloaded_protected_and_used_in_prompts() {
    let tmp = tempfile::tempdir().unwrap();
    let app = setup(tmp.path());

    let Reply { status, body, .. } = send(&app, Method::GET, "/api/styles", None).await;
    assert_eq!(status, StatusCode::OK);
    let list: Vec<Value> = serde_json::from_slice(&body).unwrap();
    let names: Vec<&str> = list.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["frame", "inkline", "pastel"], "the shipped styles");
    for s in &list {
        assert_eq!(s["builtin"], true);
        assert_eq!(s["card"]["trigger"], s["name"]);
        for f in ["compare.png", "adapter.safetensors", "adapter.diffusers.safetensors", "card.json"] {
            assert!(s["files"].as_array().unwrap().iter().any(|x| x == f), "{} lacks {f}", s["name"]);
        }
    }

    // Download: the kohya file, named as on disk.
    let r = send(&app, Method::GET, "/api/styles/inkline/files/adapter.safetensors", None).await;
    let (status, bytes, disposition) = (r.status, &r.body, r.header(header::CONTENT_DISPOSITION));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(*bytes, std::fs::read(shipped().join("inkline/inkline.safetensors")).unwrap());
    assert_eq!(disposition.as_deref(), Some("attachment; filename=\"inkline.safetensors\""));
    let Reply { status, .. } = send(&app, Method::GET, "/api/styles/inkline/files/..%2F..%2FCargo.toml", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let Reply { status, .. } = send(&app, Method::GET, "/api/styles/nosuch/files/card.json", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Shipped styles are read-only; a user copy can be renamed and deleted.
    let Reply { status, body, .. } = send(&app, Method::DELETE, "/api/styles/inkline", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("cannot be changed"));
    let mine = tmp.path().join("styles/mine");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::copy(shipped().join("inkline/inkline.safetensors"), mine.join("mine.safetensors")).unwrap();
    let Reply { status, body, .. } = send(&app, Method::POST, "/api/styles/mine/rename", Some(json!({"name": "ours"}))).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert!(tmp.path().join("styles/ours/ours.safetensors").is_file());
    let Reply { status, body, .. } = send(&app, Method::POST, "/api/styles/ours/rename", Some(json!({"name": "../evil"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(&body));

    // `<lora:NAME:WEIGHT>` in a web prompt: the style changes the picture; a copy of the
    // same file under another name gives the same picture; an unknown name fails the job
    // with a message naming the known styles.
    let plain = image_of(&app, &run_job(&app, "a red circle on a blue background, inkline style").await).await;
    let styled = image_of(&app, &run_job(&app, "a red circle on a blue background, inkline style <lora:inkline:1>").await).await;
    let copied = image_of(&app, &run_job(&app, "a red circle on a blue background, inkline style <lora:ours:1>").await).await;
    assert_ne!(plain, styled);
    assert_eq!(styled, copied);
    // Block weights: all three UNet block groups at 0 is the base model (this style has no
    // text-encoder layers); the up blocks alone change the picture.
    let off = image_of(&app, &run_job(&app, "a red circle on a blue background, inkline style <lora:inkline:1:lbw=0,0,0>").await).await;
    assert_eq!(off, plain);
    let up = image_of(&app, &run_job(&app, "a red circle on a blue background, inkline style <lora:inkline:1:lbw=0,0,1>").await).await;
    assert!(up != plain && up != styled);
    // A style that does not exist is refused when the request arrives, not inside the job.
    let r = send(&app, Method::POST, "/api/generate", Some(json!({"prompt": "a red circle <lora:nosuch:1>", "steps": 8}))).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert!(r.text().contains("<lora:nosuch> names no style") && r.text().contains("inkline"), "{}", r.text());
    let Reply { status, .. } = send(&app, Method::DELETE, "/api/styles/ours", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(!tmp.path().join("styles/ours").exists());
}
