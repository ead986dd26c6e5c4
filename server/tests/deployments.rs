//! Deployments over HTTP, on the starter model with registry versions made from the
//! shipped styles: create/list/delete and their refusals, serving pinned to the version
//! current at acceptance across a promotion (zero failures, the right version in every
//! PNG), the A1111 API subset with its error shapes, and a push to a second server.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use app::dto::{JobAccepted, JobState};
use atelier_server::styles::StyleLibrary;
use atelier_server::tracking::Tracker;
use atelier_server::{app, AppState, LoadedModel};
use axum::http::{header, Method, StatusCode};
use axum::Router;
use base64::Engine;
use leptos::config::LeptosOptions;
use serde_json::{json, Value};

use common::{assert_json_error, get_json, send, send_raw, wait_job, Reply};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn state(data: &Path) -> AppState {
    let library = StyleLibrary::new(data.join("styles")).with_shipped(repo().join("models/styles"));
    let model = LoadedModel::load(&repo().join("models/starter"), &candle_core::Device::Cpu).unwrap().with_styles(library.clone());
    let options = LeptosOptions::builder().output_name("atelier").site_root(data.join("site").to_string_lossy().as_ref()).build();
    AppState::new(options, Arc::new(model), data, (64, 64), None).unwrap().with_styles(library)
}

/// Registers `ink` v1 (the shipped inkline adapter) and v2 (pastel's), both for the
/// served model, `production` → 1; and `alien` v1 tagged for another base model.
fn register(data: &Path, model_hash: &str) {
    let t = Tracker::open(&data.join("tracking")).unwrap();
    let staging = tempfile::tempdir().unwrap();
    for (model, style, hash) in [("ink", "inkline", model_hash), ("ink", "pastel", model_hash), ("alien", "frame", "0123456789")] {
        let file = staging.path().join(format!("{model}.safetensors"));
        std::fs::copy(repo().join(format!("models/styles/{style}/{style}.safetensors")), &file).unwrap();
        let tags = vec![("base_model_hash".to_string(), hash.to_string()), ("trigger".to_string(), style.to_string())];
        t.register_version(model, "style", &[file], None, &tags).unwrap();
    }
    t.set_alias("ink", "production", 1).unwrap();
}

/// The `parameters` chunk of a PNG as (key, value) pairs after the standard ones.
fn extra(png: &[u8]) -> Vec<(String, String)> {
    let text = atelier_engine::metadata::read_png_parameters(png).unwrap().expect("a parameters chunk");
    atelier_engine::metadata::parse_parameters(&text).unwrap().extra
}

fn style_version(png: &[u8]) -> String {
    extra(png).into_iter().find(|(k, _)| k == "Style version").map(|(_, v)| v).unwrap_or_default()
}

async fn image_of(app: &Router, job: &str) -> Vec<u8> {
    let s = wait_job(app, job, Duration::from_secs(120), JobState::is_finished).await;
    let JobState::Done { image_ids, .. } = s.state else { panic!("job {job} ended as {:?}", s.state) };
    send(app, Method::GET, &format!("/api/images/{}.png", image_ids[0]), None).await.body
}

async fn promote(app: &Router, version: i64) {
    let r = send(app, Method::PUT, "/api/registry/ink/aliases/production", Some(json!({ "version": version }))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

fn pixels(png: &[u8]) -> Vec<u8> {
    image::load_from_memory(png).unwrap().to_rgb8().into_raw()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deployments_are_created_refused_served_and_hot_swapped() {
    let tmp = tempfile::tempdir().unwrap();
    let state = state(tmp.path());
    let hash = state.model.hash.clone();
    register(tmp.path(), &hash);
    let app = app(state);

    // Refusals name what exists.
    let create = |body: Value| {
        let app = app.clone();
        async move { send(&app, Method::POST, "/api/deployments", Some(body)).await }
    };
    assert_json_error(&create(json!({"name": "x", "target": "nope@production"})).await, StatusCode::NOT_FOUND, "registered models: alien, ink");
    assert_json_error(&create(json!({"name": "x", "target": "ink@staging"})).await, StatusCode::NOT_FOUND, "known: 2, 1, production");
    assert_json_error(&create(json!({"name": "x", "target": "ink@7"})).await, StatusCode::NOT_FOUND, "known: 2, 1, production");
    let r = create(json!({"name": "x", "target": "alien@1"})).await;
    assert_json_error(&r, StatusCode::BAD_REQUEST, "0123456789");
    assert_json_error(&r, StatusCode::BAD_REQUEST, &hash);
    assert_json_error(&create(json!({"name": "x", "target": "ink"})).await, StatusCode::BAD_REQUEST, "STYLE@ALIAS");
    assert_json_error(&create(json!({"name": "bad name", "target": "ink@1"})).await, StatusCode::BAD_REQUEST, "name");
    assert_json_error(&create(json!({"name": "x", "target": "ink@1", "defaults": {"scheduler": "plms"}})).await, StatusCode::BAD_REQUEST, "scheduler");
    assert_json_error(&create(json!({"name": "x", "target": "ink@1", "colour": 1})).await, StatusCode::BAD_REQUEST, "colour");
    assert!(get_json::<Vec<Value>>(&app, "/api/deployments").await.is_empty(), "nothing refused was saved");

    let r = create(json!({"name": "ink-prod", "target": "ink@production", "weight": 0.8, "defaults": {"steps": 4, "negative_prompt": "blurry"}})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let created: Value = r.json();
    assert_eq!((created["version"].as_i64(), created["target"].as_str()), (Some(1), Some("ink@production")));
    assert_json_error(&create(json!({"name": "ink-prod", "target": "ink@2"})).await, StatusCode::BAD_REQUEST, "exists");
    let on_disk: Value = serde_json::from_slice(&std::fs::read(tmp.path().join("deployments/ink-prod.json")).unwrap()).unwrap();
    assert_eq!(on_disk["defaults"]["steps"], 4);
    let shown: Value = get_json(&app, "/api/deployments/ink-prod").await;
    assert_eq!(shown["defaults"]["negative_prompt"], "blurry");
    assert_json_error(&send(&app, Method::GET, "/api/deployments/nope", None).await, StatusCode::NOT_FOUND, "deployments: ink-prod");

    // Synchronous: the PNG, naming the deployment and the version; it paints what the
    // pinned tag paints.
    let r = send(&app, Method::POST, "/api/v1/deployments/ink-prod/generate", Some(json!({"prompt": "a red circle on a blue background", "seed": 5}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header(header::CONTENT_TYPE).as_deref(), Some("image/png"));
    assert_eq!(r.header(header::HeaderName::from_static("x-atelier-style-version")).as_deref(), Some("ink@1"));
    let meta = extra(&r.body);
    assert!(meta.contains(&("Deployment".into(), "ink-prod".into())), "{meta:?}");
    assert!(meta.contains(&("Style version".into(), "ink@1".into())), "{meta:?}");
    let text = atelier_engine::metadata::read_png_parameters(&r.body).unwrap().unwrap();
    assert!(text.contains("Negative prompt: blurry") && text.contains("Steps: 4,"), "the deployment's defaults: {text}");
    let direct = send(&app, Method::POST, "/api/generate", Some(json!({"prompt": "a red circle on a blue background <lora:ink@1:0.8>", "seed": 5, "steps": 4, "negative_prompt": "blurry"}))).await;
    let direct = image_of(&app, &direct.json::<JobAccepted>().job_id).await;
    assert!(pixels(&r.body) == pixels(&direct), "the deployment paints ink@1 at weight 0.8");
    let metrics = send(&app, Method::GET, "/metrics", None).await.text();
    assert!(
        metrics.lines().any(|l| l.starts_with("atelier_deployment_requests_total{") && ["deployment=\"ink-prod\"", "version=\"ink@1\"", "status=\"200\""].iter().all(|x| l.contains(x))),
        "the served request is counted per deployment and version"
    );
    assert_json_error(&send(&app, Method::POST, "/api/v1/deployments/nope/generate", Some(json!({"prompt": "x"}))).await, StatusCode::NOT_FOUND, "ink-prod");
    assert_json_error(&send(&app, Method::POST, "/api/v1/deployments/ink-prod/generate", Some(json!({"prompt": "x", "steps": 0}))).await, StatusCode::BAD_REQUEST, "steps");
    assert_json_error(&send(&app, Method::POST, "/api/v1/deployments/ink-prod/generate", Some(json!({"promt": "x"}))).await, StatusCode::BAD_REQUEST, "promt");

    // Across a promotion: requests accepted before it finish on version 1, those after it
    // run version 2; none fails. Jobs accepted before the promotion are still queued or
    // running when it happens.
    let mut accepted = Vec::new();
    for seed in 0..4 {
        let r = send(&app, Method::POST, "/api/v1/deployments/ink-prod/generate?async=1", Some(json!({"prompt": "a circle", "seed": seed}))).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
        accepted.push(r.json::<Value>());
    }
    promote(&app, 2).await;
    for seed in 0..4 {
        let r = send(&app, Method::POST, "/api/v1/deployments/ink-prod/generate?async=1", Some(json!({"prompt": "a circle", "seed": seed}))).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
        accepted.push(r.json::<Value>());
    }
    let mut images = Vec::new();
    for (k, a) in accepted.iter().enumerate() {
        let want = if k < 4 { "ink@1" } else { "ink@2" };
        assert_eq!(a["version"], want);
        let png = image_of(&app, a["job_id"].as_str().unwrap()).await;
        assert_eq!(style_version(&png), want, "request {k}");
        images.push(png);
    }
    assert!(pixels(&images[0]) != pixels(&images[4]), "same seed, different version, different picture");
    assert_eq!(get_json::<Value>(&app, "/api/deployments/ink-prod").await["version"], 2);

    // Many concurrent synchronous requests while the alias moves back to 1 and to 2
    // again: none fails, and each PNG names the version its reply says it was pinned to.
    let spawn = |seed: u64| {
        let app = app.clone();
        tokio::spawn(async move { send(&app, Method::POST, "/api/v1/deployments/ink-prod/generate", Some(json!({"prompt": "a square", "seed": seed, "steps": 3}))).await })
    };
    let before = get_json::<Value>(&app, "/api/gallery?limit=1").await["total"].as_u64().unwrap();
    let mut tasks: Vec<_> = (0..6).map(spawn).collect();
    // Once one of these has finished (so was accepted on version 2), move the alias while
    // the rest are queued or running.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while get_json::<Value>(&app, "/api/gallery?limit=1").await["total"].as_u64().unwrap() == before {
        assert!(std::time::Instant::now() < deadline, "no request of the first batch finished");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    promote(&app, 1).await;
    tasks.extend((6..12).map(spawn));
    tokio::time::sleep(Duration::from_millis(100)).await;
    promote(&app, 2).await;
    tasks.extend((12..14).map(spawn));
    let mut seen = std::collections::BTreeSet::new();
    for t in tasks {
        let r: Reply = t.await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "no request fails during the swap: {}", r.text());
        let pinned = r.header(header::HeaderName::from_static("x-atelier-style-version")).unwrap();
        assert_eq!(style_version(&r.body), pinned);
        seen.insert(pinned);
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec!["ink@1".to_string(), "ink@2".to_string()], "both versions were served");

    // Pinned to a number: unaffected by the alias. Delete.
    let r = create(json!({"name": "ink-one", "target": "ink@1", "weight": 0.5})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    promote(&app, 2).await;
    let r = send(&app, Method::POST, "/api/v1/deployments/ink-one/generate", Some(json!({"prompt": "a circle", "steps": 2}))).await;
    assert_eq!(style_version(&r.body), "ink@1");
    assert_eq!(send(&app, Method::DELETE, "/api/deployments/ink-one", None).await.status, StatusCode::NO_CONTENT);
    assert_json_error(&send(&app, Method::DELETE, "/api/deployments/ink-one", None).await, StatusCode::NOT_FOUND, "ink-one");
    let list: Vec<Value> = get_json(&app, "/api/deployments").await;
    assert_eq!(list.iter().map(|d| d["name"].as_str().unwrap()).collect::<Vec<_>>(), vec!["ink-prod"]);
}

async fn sd(app: &Router, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let r = send(app, method, &format!("/sdapi/v1/{path}"), body).await;
    let v = serde_json::from_slice(&r.body).unwrap_or_else(|_| panic!("not JSON: {}", r.text()));
    (r.status, v)
}

fn decode(b64: &Value) -> image::DynamicImage {
    image::load_from_memory(&base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap()).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_a1111_api_subset_answers_in_its_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let state = state(tmp.path());
    register(tmp.path(), &state.model.hash.clone());
    let app = app(state);
    let r = send(&app, Method::POST, "/api/deployments", Some(json!({"name": "ink-prod", "target": "ink@production", "weight": 0.8}))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());

    // txt2img on the plain model: base64 PNGs, the request echoed, info a JSON string.
    let body = json!({"prompt": "a red circle <lora:inkline:0.5>", "negative_prompt": "", "steps": 4, "width": 64, "height": 64, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "seed": 3, "batch_size": 2, "cfg_scale": 6.5, "restore_faces": false, "override_settings": {}});
    let (status, v) = sd(&app, Method::POST, "txt2img", Some(body.clone())).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["parameters"], body);
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert!(images.iter().all(|i| { let img = decode(i); (img.width(), img.height()) == (64, 64) }));
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!((info["seed"].as_u64(), info["all_seeds"].clone()), (Some(3), json!([3, 4])));
    assert_eq!((info["width"].as_u64(), info["steps"].as_u64(), info["cfg_scale"].as_f64()), (Some(64), Some(4), Some(6.5)));
    assert_eq!(info["sampler_name"], "DPM++ 2M Karras");
    assert!(info["infotexts"][0].as_str().unwrap().contains("Lora hashes: \"inkline: "), "{info}");

    // The deployment through the options: pinned as the deployment endpoint does.
    let (status, v) = sd(&app, Method::POST, "options", Some(json!({"sd_model_checkpoint": "ink-prod"}))).await;
    assert_eq!((status, v), (StatusCode::OK, Value::Null));
    let (_, options) = sd(&app, Method::GET, "options", None).await;
    assert_eq!(options["sd_model_checkpoint"], "ink-prod");
    let (status, v) = sd(&app, Method::POST, "txt2img", Some(json!({"prompt": "a circle", "steps": 3, "width": 64, "height": 64}))).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["extra_generation_params"]["Style version"], "ink@1");
    assert_eq!(info["extra_generation_params"]["Deployment"], "ink-prod");
    assert_eq!(info["sd_model_name"], "ink-prod");
    // Per request, the plain model again.
    let title = get_json::<Vec<Value>>(&app, "/sdapi/v1/sd-models").await[0]["title"].as_str().unwrap().to_string();
    let (_, v) = sd(&app, Method::POST, "txt2img", Some(json!({"prompt": "a circle", "steps": 3, "width": 64, "height": 64, "override_settings": {"sd_model_checkpoint": title}}))).await;
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert!(info["extra_generation_params"].get("Deployment").is_none(), "{info}");
    let (status, v) = sd(&app, Method::POST, "options", Some(json!({"sd_model_checkpoint": "nope"}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(v["detail"].as_str().unwrap().contains("ink-prod"), "{v}");
    assert_eq!(sd(&app, Method::GET, "options", None).await.1["sd_model_checkpoint"], "ink-prod", "a refused change changes nothing");

    // img2img: the init image at the requested size.
    let init = image::RgbImage::from_pixel(48, 40, image::Rgb([200, 30, 30]));
    let init = base64::engine::general_purpose::STANDARD.encode(atelier_engine::metadata::encode_plain_png(&init).unwrap());
    let (status, v) = sd(&app, Method::POST, "img2img", Some(json!({"init_images": [init], "denoising_strength": 0.5, "prompt": "a circle", "steps": 4, "width": 64, "height": 64, "seed": 1}))).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(decode(&v["images"][0]).width(), 64);
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["denoising_strength"], 0.5);

    // Lists.
    let models: Vec<Value> = get_json(&app, "/sdapi/v1/sd-models").await;
    assert_eq!(models.iter().map(|m| m["title"].as_str().unwrap().to_string()).collect::<Vec<_>>(), vec![title.clone(), "ink-prod [ink@production]".into()]);
    let loras: Vec<Value> = get_json(&app, "/sdapi/v1/loras").await;
    let names: Vec<&str> = loras.iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"inkline") && names.contains(&"ink@production"), "{names:?}");
    let samplers: Vec<Value> = get_json(&app, "/sdapi/v1/samplers").await;
    assert!(samplers.iter().any(|s| s["name"] == "Euler a" && s["aliases"] == json!(["euler-a"])));
    let (_, p) = sd(&app, Method::GET, "progress", None).await;
    assert_eq!((p["progress"].as_f64(), p["state"]["job_count"].as_u64()), (Some(0.0), Some(0)), "idle: {p}");

    // Malformed requests: FastAPI's 422 shape with the field's location.
    let (status, v) = sd(&app, Method::POST, "txt2img", Some(json!({"prompt": "x", "steps": "many"}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v, json!({"detail": [{"loc": ["body", "steps"], "msg": "value is not a valid integer", "type": "type_error.integer"}]}));
    let r = send_raw(&app, Method::POST, "/sdapi/v1/txt2img", "application/json", b"{\"prompt\": ".to_vec()).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.json::<Value>()["detail"][0]["type"], "value_error.jsondecode");
    let (status, v) = sd(&app, Method::POST, "img2img", Some(json!({"init_images": "abc"}))).await;
    assert_eq!((status, v["detail"][0]["loc"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, json!(["body", "init_images"])));
    let (status, v) = sd(&app, Method::POST, "txt2img", Some(json!({"prompt": "x", "width": 30, "height": 64, "steps": 2}))).await;
    assert_eq!((status, v["detail"][0]["loc"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, json!(["body", "width"])), "{v}");
    let (status, v) = sd(&app, Method::POST, "txt2img", Some(json!({"prompt": "x", "sampler_name": "LMS"}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(v["detail"].as_str().unwrap().contains("Sampler not found"), "{v}");
    let (status, v) = sd(&app, Method::GET, "nope", None).await;
    assert_eq!((status, v), (StatusCode::NOT_FOUND, json!({"detail": "Not Found"})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deployment_is_pushed_to_another_server() {
    // The receiving studio, on a real socket; pushes are refused until it has a token.
    let there = tempfile::tempdir().unwrap();
    let receiver = state(there.path());
    let deployments = receiver.deployments.clone();
    let remote_app = app(receiver);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let served = remote_app.clone();
    tokio::spawn(async move { axum::serve(listener, served).await.unwrap() });

    let here = tempfile::tempdir().unwrap();
    let sender = state(here.path());
    register(here.path(), &sender.model.hash.clone());
    let app = app(sender);
    let push = |token: &str, to: &str| {
        let (app, token, to) = (app.clone(), token.to_string(), to.to_string());
        async move { send(&app, Method::POST, "/api/deployments", Some(json!({"name": "ink-served", "target": "ink@production", "weight": 0.8, "defaults": {"steps": 3}, "to": to, "token": token}))).await }
    };
    assert_json_error(&push("s3cret", &url).await, StatusCode::BAD_REQUEST, "--deploy-token");
    deployments.set_token(Some("s3cret".into()));
    assert_json_error(&push("wrong", &url).await, StatusCode::BAD_REQUEST, "(401)");
    assert_json_error(&push("s3cret", "http://127.0.0.1:9").await, StatusCode::SERVICE_UNAVAILABLE, "cannot reach");
    assert!(get_json::<Vec<Value>>(&app, "/api/deployments").await.is_empty(), "a failed push leaves nothing behind");
    assert!(get_json::<Vec<Value>>(&remote_app, "/api/deployments").await.is_empty());

    let r = push("s3cret", &url).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.json::<Value>()["remote"], url.as_str());

    // There: a registered version with the same adapter and tags, its alias, the deployment.
    let v: Value = get_json(&remote_app, "/api/registry/ink/versions/production").await;
    assert_eq!((v["version"].as_i64(), v["tags"]["deployed_from"].as_str(), v["tags"]["trigger"].as_str()), (Some(1), Some("ink@1"), Some("inkline")));
    let sent = std::fs::read(repo().join("models/styles/inkline/inkline.safetensors")).unwrap();
    assert!(std::fs::read(Path::new(v["source"].as_str().unwrap()).join("ink.safetensors")).unwrap() == sent, "the adapter's own bytes");
    let d: Value = get_json(&remote_app, "/api/deployments/ink-served").await;
    assert_eq!((d["target"].as_str(), d["version"].as_i64(), d["defaults"]["steps"].as_u64()), (Some("ink@production"), Some(1), Some(3)));

    // Served there as here: same picture, same version.
    let body = json!({"prompt": "a red circle", "seed": 11});
    let there_png = send(&remote_app, Method::POST, "/api/v1/deployments/ink-served/generate", Some(body.clone())).await;
    let here_png = send(&app, Method::POST, "/api/v1/deployments/ink-served/generate", Some(body)).await;
    assert_eq!((there_png.status, here_png.status), (StatusCode::OK, StatusCode::OK), "{}", there_png.text());
    assert_eq!(style_version(&there_png.body), "ink@1");
    assert!(pixels(&there_png.body) == pixels(&here_png.body), "the pushed version paints what the original does");

    // Import is token-protected even when called directly.
    let r = send(&remote_app, Method::POST, "/api/deployments/import", Some(json!({}))).await;
    assert_json_error(&r, StatusCode::UNAUTHORIZED, "token");
}
