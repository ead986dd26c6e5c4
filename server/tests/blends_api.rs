//! Saved blends and share links over HTTP, on the starter model and the shipped styles.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use app::dto::{JobAccepted, JobState};
use atelier_server::styles::StyleLibrary;
use atelier_server::{app, AppState, LoadedModel};
use axum::http::{Method, StatusCode};
use axum::Router;
use leptos::config::LeptosOptions;
use serde_json::{json, Value};

use common::{assert_json_error, get_json, send, wait_job};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn setup(data: &Path) -> Router {
    let library = StyleLibrary::new(data.join("styles")).with_shipped(repo().join("models/styles"));
    let model = LoadedModel::load(&repo().join("models/starter"), &candle_core::Device::Cpu).unwrap().with_styles(library.clone());
    let options = LeptosOptions::builder().output_name("atelier").site_root(data.join("site").to_string_lossy().as_ref()).build();
    let state = AppState::new(options, Arc::new(model), data, (64, 64), None).unwrap().with_styles(library);
    let source = atelier_server::styles::trainer::ModelSource { dir: repo().join("models/starter"), device: candle_core::Device::Cpu, resolution: 64, budget: atelier_engine::memory::MemoryBudget::from_machine() };
    let trainer = atelier_server::styles::trainer::Trainer::open(&data.join("trainings"), state.styles.clone(), data.join("tracking"), source, &state.workers).unwrap();
    app(state.with_trainer(Arc::new(trainer)))
}

async fn render(app: &Router, prompt: &str) -> Vec<u8> {
    let r = send(app, Method::POST, "/api/generate", Some(json!({"prompt": prompt, "seed": 9, "steps": 6}))).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let job: JobAccepted = r.json();
    let s = wait_job(app, &job.job_id, Duration::from_secs(60), JobState::is_finished).await;
    let JobState::Done { image_ids, .. } = s.state else { panic!("{:?}", s.state) };
    send(app, Method::GET, &format!("/api/images/{}.png", image_ids[0]), None).await.body
}

#[tokio::test(flavor = "multi_thread")]
async fn save_list_resolve_and_render_blends() {
    let tmp = tempfile::tempdir().unwrap();
    let app = setup(tmp.path());
    let model: Value = get_json(&app, "/api/model").await;
    // The real model says where it computes (tests load it on the CPU, in f32).
    assert_eq!((model["device"].as_str(), model["dtype"].as_str()), (Some("cpu"), Some("f32")));
    let styles: Vec<Value> = get_json(&app, "/api/styles").await;
    let hash = |n: &str| styles.iter().find(|s| s["name"] == n).unwrap()["hash"].as_str().unwrap().to_string();
    assert_eq!(hash("inkline").len(), 10);
    let blend = json!({
        "model_hash": model["hash"], "prompt": "a red circle on a blue background", "negative_prompt": "",
        "seed": 9, "steps": 6, "guidance": 7.5, "scheduler": "dpmpp-2m-karras", "width": 64, "height": 64,
        "styles": [
            {"name": "inkline", "hash": hash("inkline"), "weight": 0.5, "blocks": {"down": 1.0, "mid": 1.0, "up": 1.0}},
            {"name": "pastel", "hash": hash("pastel"), "weight": 0.5, "blocks": {"down": 0.0, "mid": 1.0, "up": 1.0}}
        ]
    });
    let r = send(&app, Method::PUT, "/api/blends/soft-ink", Some(blend.clone())).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let saved: Value = r.json();
    let link = saved["link"].as_str().unwrap().to_string();
    let list: Vec<Value> = get_json(&app, "/api/blends").await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["blend"], blend);
    assert_eq!(list[0]["link"], link.as_str());

    // Resolving the link gives the prompt with tags; rendering it equals typing the tags.
    let r = send(&app, Method::POST, "/api/blends/resolve", Some(json!({"link": format!("http://elsewhere/blend?b={link}")}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let resolved: Value = r.json();
    assert_eq!(resolved["missing"], json!([]));
    assert_eq!(resolved["other_model"], false);
    let prompt = resolved["prompt"].as_str().unwrap();
    assert_eq!(prompt, "a red circle on a blue background <lora:inkline:0.5> <lora:pastel:0.5:lbw=0,1,1>");
    assert_eq!(render(&app, prompt).await, render(&app, "a red circle on a blue background <lora:inkline:0.5> <lora:pastel:0.5:lbw=0,1,1>").await);

    // Baking for download: the exact file is a LoRA that reproduces the blend; compressed
    // reports its error.
    let r = send(&app, Method::GET, &format!("/api/blends/bake?b={link}"), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header(axum::http::header::HeaderName::from_static("x-bake-relative-error")).as_deref(), Some("0"));
    std::fs::create_dir_all(tmp.path().join("styles/baked")).unwrap();
    std::fs::write(tmp.path().join("styles/baked/baked.safetensors"), &r.body).unwrap();
    let from_bake = render(&app, "a red circle on a blue background <lora:baked:1>").await;
    let from_tags = render(&app, prompt).await;
    let (a, b) = (image::load_from_memory(&from_bake).unwrap().to_rgb8(), image::load_from_memory(&from_tags).unwrap().to_rgb8());
    let d = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    assert!(d <= 2, "baked file vs runtime blend: {d}/255");
    let r = send(&app, Method::GET, &format!("/api/blends/bake?b={link}&rank=1"), None).await;
    let err: f64 = r.header(axum::http::header::HeaderName::from_static("x-bake-relative-error")).unwrap().parse().unwrap();
    assert!(err > 0.0 && err < 1.0, "{err}");
    assert_eq!(send(&app, Method::GET, &format!("/api/blends/bake?b={link}&rank=0"), None).await.status, StatusCode::BAD_REQUEST);

    // Missing styles are named with their hash; bad links get a clear 400.
    let mut other = blend.clone();
    other["styles"][1]["hash"] = json!("00112233ff");
    let code = send(&app, Method::PUT, "/api/blends/other", Some(other)).await.json::<Value>()["link"].as_str().unwrap().to_string();
    let resolved: Value = send(&app, Method::POST, "/api/blends/resolve", Some(json!({"link": code}))).await.json();
    assert_eq!(resolved["missing"], json!([{"name": "pastel", "hash": "00112233ff", "name_taken_by_other_version": true}]));
    assert_eq!(resolved["prompt"], Value::Null);
    let r = send(&app, Method::POST, "/api/blends/resolve", Some(json!({"link": &link[..link.len() - 3]}))).await;
    assert_json_error(&r, StatusCode::BAD_REQUEST, "damaged or cut off");
    let r = send(&app, Method::POST, "/api/blends/resolve", Some(json!({"link": "hello world"}))).await;
    assert_json_error(&r, StatusCode::BAD_REQUEST, "link");
    let r = send(&app, Method::PUT, "/api/blends/..evil", Some(blend.clone())).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // What a studio lacks can be fetched by hash (from any origin) and imported.
    let r = send(&app, Method::GET, &format!("/api/styles/by-hash/{}", hash("pastel")), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header(axum::http::header::ACCESS_CONTROL_ALLOW_ORIGIN).as_deref(), Some("*"));
    assert_eq!(r.body, std::fs::read(repo().join("models/styles/pastel/pastel.safetensors")).unwrap());
    assert_eq!(send(&app, Method::GET, "/api/styles/by-hash/00112233ff", None).await.status, StatusCode::NOT_FOUND);
    let file = r.body.clone();
    let r = common::send_raw(&app, Method::POST, "/api/styles/import?name=pastel2&hash=00112233ff", "application/octet-stream", file.clone()).await;
    assert_json_error(&r, StatusCode::BAD_REQUEST, "another version");
    let r = common::send_raw(&app, Method::POST, "/api/styles/import?name=broken", "application/octet-stream", file[..1000].to_vec()).await;
    assert_json_error(&r, StatusCode::BAD_REQUEST, "truncated");
    assert!(!tmp.path().join("styles/broken").exists(), "a refused import leaves nothing behind");
    let r = common::send_raw(&app, Method::POST, &format!("/api/styles/import?name=pastel2&hash={}", hash("pastel")), "application/octet-stream", file).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert!(tmp.path().join("styles/pastel2/pastel2.safetensors").is_file());
    assert_eq!(send(&app, Method::DELETE, "/api/blends/soft-ink", None).await.status, StatusCode::NO_CONTENT);
    assert_eq!(send(&app, Method::GET, "/api/blends/soft-ink", None).await.status, StatusCode::NOT_FOUND);
}

/// A bake is a queued task: 202, live progress over SSE layer by layer, then the file;
/// bad links and missing styles are refused before anything is queued.
#[tokio::test(flavor = "multi_thread")]
async fn bakes_are_queued_tasks_with_progress() {
    let tmp = tempfile::tempdir().unwrap();
    let app = setup(tmp.path());
    let model: Value = get_json(&app, "/api/model").await;
    let styles: Vec<Value> = get_json(&app, "/api/styles").await;
    let hash = |n: &str| styles.iter().find(|s| s["name"] == n).unwrap()["hash"].as_str().unwrap().to_string();
    let blend = json!({
        "model_hash": model["hash"], "prompt": "a circle", "negative_prompt": "",
        "seed": 1, "steps": 4, "guidance": 7.5, "scheduler": "euler", "width": 64, "height": 64,
        "styles": [
            {"name": "inkline", "hash": hash("inkline"), "weight": 0.7, "blocks": {"down": 1.0, "mid": 1.0, "up": 1.0}},
            {"name": "pastel", "hash": hash("pastel"), "weight": 0.4, "blocks": {"down": 1.0, "mid": 0.0, "up": 1.0}}
        ]
    });
    let link = send(&app, Method::PUT, "/api/blends/two", Some(blend.clone())).await.json::<Value>()["link"].as_str().unwrap().to_string();

    let r = send(&app, Method::POST, "/api/blends/bakes", Some(json!({"link": link, "rank": 2}))).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let id = r.json::<Value>()["id"].as_str().unwrap().to_string();
    let events = send(&app, Method::GET, &format!("/api/blends/bakes/{id}/events"), None).await;
    assert_eq!(events.status, StatusCode::OK);
    let events: Vec<Value> = events.text().lines().filter_map(|l| l.strip_prefix("data:")).map(|d| serde_json::from_str(d.trim()).unwrap()).collect();
    let last = events.last().unwrap();
    assert_eq!(last["state"], "done", "{events:?}");
    let total = last["total"].as_u64().unwrap();
    assert!(total > 10, "the starter model's styles touch many layers: {total}");
    assert_eq!(last["done"], total);
    let error = last["relative_error"].as_f64().unwrap();
    assert!(error > 0.0 && error < 1.0, "rank 2 loses part of a rank-8+8 blend: {error}");
    let file = send(&app, Method::GET, &format!("/api/blends/bakes/{id}/file"), None).await;
    assert_eq!(file.status, StatusCode::OK);
    assert_eq!(file.body.len() as u64, last["bytes"].as_u64().unwrap());
    let adapter = tmp.path().join("baked.safetensors");
    std::fs::write(&adapter, &file.body).unwrap();
    let lora = atelier_engine::lora::LoraAdapter::load(&adapter).unwrap();
    assert_eq!(lora.modules.len() as u64, total, "one module per baked layer");
    let listed: Vec<Value> = get_json(&app, "/api/blends/bakes").await;
    assert_eq!(listed[0]["id"], id.as_str());

    // Registered as a version of its own model (kind blend, components as tags); prompts
    // then name it <lora:NAME@VERSION>, painting what the file itself paints.
    let r = send(&app, Method::POST, "/api/registry/two-baked/versions", Some(json!({"bake": id}))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let v: Value = r.json();
    assert_eq!((v["version"].as_i64(), v["kind"].as_str()), (Some(1), Some("blend")));
    assert_eq!(v["tags"]["components"], "inkline:0.7, pastel:0.4");
    assert_eq!(v["tags"]["rank"], "2");
    assert!((v["tags"]["relative_error"].as_str().unwrap().parse::<f64>().unwrap() - error).abs() < 1e-5);
    assert_eq!(std::fs::read(Path::new(v["source"].as_str().unwrap()).join("two-baked.safetensors")).unwrap(), file.body, "the bake's own bytes");
    std::fs::create_dir_all(tmp.path().join("styles/baked2")).unwrap();
    std::fs::write(tmp.path().join("styles/baked2/baked2.safetensors"), &file.body).unwrap();
    let pixels = |png: Vec<u8>| image::load_from_memory(&png).unwrap().to_rgb8().into_raw();
    let (by_version, by_file) = (render(&app, "a red circle <lora:two-baked@1:1>").await, render(&app, "a red circle <lora:baked2:1>").await);
    assert!(pixels(by_version) == pixels(by_file), "the registered version paints what the baked file paints");
    assert_json_error(&send(&app, Method::POST, "/api/registry/two-baked/versions", Some(json!({"bake": "nope"}))).await, StatusCode::NOT_FOUND, "no bake");
    assert_json_error(&send(&app, Method::POST, "/api/registry/bad%20name/versions", Some(json!({"bake": id}))).await, StatusCode::BAD_REQUEST, "not valid");
    // Cancelling a finished bake changes nothing; unknown bakes are 404.
    assert_eq!(send(&app, Method::POST, &format!("/api/blends/bakes/{id}/cancel"), None).await.json::<Value>()["state"], "done");
    assert_json_error(&send(&app, Method::GET, "/api/blends/bakes/nope", None).await, StatusCode::NOT_FOUND, "no bake");
    assert_json_error(&send(&app, Method::GET, "/api/blends/bakes/nope/file", None).await, StatusCode::NOT_FOUND, "no bake");

    // Refused before queueing: a malformed link, a missing style, a rank out of range.
    assert_json_error(&send(&app, Method::POST, "/api/blends/bakes", Some(json!({"link": "not-a-link"}))).await, StatusCode::BAD_REQUEST, "invalid link");
    let mut other = blend.clone();
    other["styles"][1]["hash"] = json!("00112233ff");
    let code = send(&app, Method::PUT, "/api/blends/other", Some(other)).await.json::<Value>()["link"].as_str().unwrap().to_string();
    assert_json_error(&send(&app, Method::POST, "/api/blends/bakes", Some(json!({"link": code}))).await, StatusCode::BAD_REQUEST, "00112233ff");
    assert_json_error(&send(&app, Method::POST, "/api/blends/bakes", Some(json!({"link": link, "rank": 0}))).await, StatusCode::BAD_REQUEST, "rank");
    assert_eq!(get_json::<Vec<Value>>(&app, "/api/blends/bakes").await.len(), 1, "nothing refused was queued");
    assert_json_error(&send(&app, Method::DELETE, &format!("/api/blends/bakes/{id}"), None).await, StatusCode::METHOD_NOT_ALLOWED, "not allowed");

    // A mistyped field is refused, not ignored; a bad query names the query string.
    assert_json_error(&send(&app, Method::POST, "/api/blends/bakes", Some(json!({"link": link, "rnak": 4}))).await, StatusCode::BAD_REQUEST, "unknown field `rnak`");
    assert_json_error(&send(&app, Method::GET, &format!("/api/blends/bake?b={link}&rank=x"), None).await, StatusCode::BAD_REQUEST, "bad query string");
    // A bake waiting behind a generation can be cancelled; its file then says why it is absent.
    let gen = send(&app, Method::POST, "/api/generate", Some(json!({"prompt": "x", "steps": 60, "seed": 1}))).await;
    assert_eq!(gen.status, StatusCode::ACCEPTED);
    let queued: Value = send(&app, Method::POST, "/api/blends/bakes", Some(json!({"link": link}))).await.json();
    let qid = queued["id"].as_str().unwrap();
    assert_eq!(send(&app, Method::POST, &format!("/api/blends/bakes/{qid}/cancel"), None).await.json::<Value>()["state"], "cancelled");
    assert_json_error(&send(&app, Method::GET, &format!("/api/blends/bakes/{qid}/file"), None).await, StatusCode::BAD_REQUEST, "was cancelled");

    // One body extractor everywhere: a body over the limit is 413 on every JSON endpoint.
    let huge = format!("{{\"link\": \"{}\"}}", "x".repeat(app::dto::MAX_BODY_BYTES + 1));
    for (method, uri) in [(Method::POST, "/api/blends/bakes"), (Method::PUT, "/api/blends/big"), (Method::POST, "/api/blends/resolve"), (Method::POST, "/api/style-trainings")] {
        let r = common::send_raw(&app, method, uri, "application/json", huge.clone().into_bytes()).await;
        assert_json_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "larger than");
    }
}
