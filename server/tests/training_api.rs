//! Style training through the HTTP API on the starter model: upload (files and a zip,
//! with a corrupt file, a non-image and a duplicate), the dataset report, refusals, a
//! training that is stopped and resumed, its samples, the style landing in the library
//! and the experiment store, and the trainer's record surviving a restart.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use app::dto::{DatasetSummary, TrainingState, TrainingStatus};
use atelier_engine::starter::styles::{write_dataset, PictureStyle};
use atelier_server::styles::StyleLibrary;
use atelier_server::queue::Workers;
use atelier_server::styles::trainer::{ModelSource, Trainer};
use atelier_server::{app, AppState, LoadedModel};
use axum::http::{Method, StatusCode};
use axum::Router;
use leptos::config::LeptosOptions;
use serde_json::{json, Value};

use common::{assert_json_error, get_json, send, send_raw, Reply};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn open_trainer(data: &Path, library: Arc<StyleLibrary>, workers: &Workers) -> Arc<Trainer> {
    let source = ModelSource { dir: repo().join("models/starter"), device: candle_core::Device::Cpu, resolution: 64, budget: atelier_engine::memory::MemoryBudget::from_machine() };
    Arc::new(Trainer::open(&data.join("trainings"), library, data.join("tracking"), source, workers).unwrap())
}

fn setup(data: &Path) -> (Router, Arc<Workers>) {
    let library = StyleLibrary::new(data.join("styles")).with_shipped(repo().join("models/styles"));
    let model = LoadedModel::load(&repo().join("models/starter"), &candle_core::Device::Cpu).unwrap().with_styles(library.clone());
    let options = LeptosOptions::builder().output_name("atelier").site_root(data.join("site").to_string_lossy().as_ref()).build();
    let state = AppState::new(options, Arc::new(model), data, (64, 64), None).unwrap().with_styles(library);
    let trainer = open_trainer(data, state.styles.clone(), &state.workers);
    let workers = state.workers.clone();
    (app(state.with_trainer(trainer)), workers)
}

fn zip_of(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, bytes) in files {
        out.start_file(*name, zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated)).unwrap();
        out.write_all(bytes).unwrap();
    }
    out.finish().unwrap().into_inner()
}

async fn upload(app: &Router, uri: &str, files: &[(&str, Vec<u8>)]) -> Reply {
    let (ctype, body) = common::multipart(files);
    send_raw(app, Method::POST, uri, &ctype, body).await
}

async fn wait_training(app: &Router, id: &str, done: impl Fn(&TrainingStatus) -> bool) -> TrainingStatus {
    let start = Instant::now();
    loop {
        let s: TrainingStatus = get_json(app, &format!("/api/style-trainings/{id}")).await;
        if done(&s) {
            return s;
        }
        if let TrainingState::Failed { message } = &s.state {
            panic!("training failed: {message}");
        }
        assert!(start.elapsed() < Duration::from_secs(300), "training stuck: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_report_train_stop_resume_and_land_in_the_library() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, workers) = setup(tmp.path());
    let src = tmp.path().join("src");
    write_dataset(PictureStyle::Pastel, &src, 12, 3).unwrap();
    let file = |n: &str| std::fs::read(src.join(n)).unwrap();

    // Three images and a caption as plain files; the rest in a zip whose entries sit in
    // folders (one tries to climb out); a corrupt PNG, a PDF and a copy of 000.png.
    let mut loose: Vec<(&str, Vec<u8>)> = vec![("000.png", file("000.png")), ("000.txt", file("000.txt")), ("001.png", file("001.png"))];
    let names: Vec<String> = (2..12).map(|i| format!("{i:03}")).collect();
    let mut zipped: Vec<(String, Vec<u8>)> = Vec::new();
    for n in &names {
        zipped.push((format!("pastel/{n}.png"), file(&format!("{n}.png"))));
        zipped.push((format!("pastel/{n}.txt"), file(&format!("{n}.txt"))));
    }
    zipped.push(("../../escape.png".into(), file("002.png")[..200].to_vec()));
    zipped.push(("__MACOSX/pastel/._002.png".into(), b"resource fork".to_vec()));
    let zipped_refs: Vec<(&str, Vec<u8>)> = zipped.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    loose.push(("set.zip", zip_of(&zipped_refs)));
    loose.push(("broken.png", file("003.png")[..300].to_vec()));
    loose.push(("notes.pdf", b"%PDF-1.4 not a picture".to_vec()));
    loose.push(("copy of 000.png", file("000.png")));
    let r = upload(&app, "/api/style-datasets", &loose).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let ds: DatasetSummary = r.json();

    // The report, checked against reading the source folder directly.
    let direct = atelier_engine::style::dataset::scan(&src, "TRIGGER", 64, 5).unwrap();
    assert_eq!(ds.images.len(), direct.items.len(), "{ds:?}");
    assert!(ds.usable && ds.resolution == 64 && ds.min_images == 5);
    let reason = |f: &str| ds.skipped.iter().find(|s| s.file == f).map(|s| s.reason.clone()).unwrap_or_else(|| panic!("{f} not reported: {ds:?}"));
    assert!(reason("broken.png").contains("cannot be decoded"), "{}", reason("broken.png"));
    assert!(reason("notes.pdf").contains("not an image"), "{}", reason("notes.pdf"));
    assert!(reason("escape.png").contains("cannot be decoded"));
    let dup = reason("copy of 000.png");
    assert!(dup.contains("near-duplicate of 000.png") && dup.contains("0 of 64"), "{dup}");
    let first = ds.images.iter().find(|i| i.file == "000.png").unwrap();
    assert_eq!(first.caption.as_deref(), Some(std::str::from_utf8(&file("000.txt")).unwrap()));
    let dir = tmp.path().join("trainings/datasets").join(&ds.id);
    assert!(dir.join("escape.png").is_file() && !tmp.path().join("trainings/escape.png").exists());
    assert!(!dir.join("._002.png").exists(), "resource forks are skipped");
    // Thumbnails are served; names that leave the folder are not.
    let r = send(&app, Method::GET, &format!("/api/style-datasets/{}/files/000.png", ds.id), None).await;
    assert_eq!((r.status, r.body.clone()), (StatusCode::OK, file("000.png")));
    let r = send(&app, Method::GET, &format!("/api/style-datasets/{}/files/..%2F..%2Fruns", ds.id), None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // Bad uploads are refused and change nothing.
    let before = std::fs::read_dir(&dir).unwrap().count();
    let r = upload(&app, &format!("/api/style-datasets?dataset={}", ds.id), &[("more.zip", b"PK\x03\x04 truncated".to_vec())]).await;
    assert_json_error(&r, StatusCode::BAD_REQUEST, "more.zip: not a readable zip archive");
    let r = send_raw(&app, Method::POST, "/api/style-datasets", "application/json", b"{}".to_vec()).await;
    assert_json_error(&r, StatusCode::BAD_REQUEST, "multipart/form-data");
    let r = upload(&app, "/api/style-datasets?dataset=0c7c5a1e-0000-4000-8000-000000000000", &[("a.png", file("000.png"))]).await;
    assert_json_error(&r, StatusCode::NOT_FOUND, "dataset");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), before);
    // A dataset that is too small gets a clear refusal when training starts.
    let small: DatasetSummary = upload(&app, "/api/style-datasets", &[("a.png", file("004.png")), ("b.png", file("005.png"))]).await.json();
    assert!(!small.usable);
    // Uploads may be far larger than the 20 MB JSON limit.
    let big: DatasetSummary =
        upload(&app, &format!("/api/style-datasets?dataset={}", small.id), &[("big.bin", vec![7u8; 24 * 1024 * 1024])]).await.json();
    assert!(big.skipped.iter().any(|s| s.file == "big.bin" && s.reason.contains("not an image")), "{big:?}");

    let start = |body: Value| {
        let app = app.clone();
        async move { send(&app, Method::POST, "/api/style-trainings", Some(body)).await }
    };
    assert_json_error(&start(json!({"dataset_id": small.id, "name": "tiny"})).await, StatusCode::BAD_REQUEST, "at least 5 are needed");
    assert_json_error(&start(json!({"dataset_id": ds.id, "name": "inkline"})).await, StatusCode::BAD_REQUEST, "already exists");
    assert_json_error(&start(json!({"dataset_id": ds.id, "name": "../x"})).await, StatusCode::BAD_REQUEST, "name");
    assert_json_error(&start(json!({"dataset_id": ds.id, "name": "ok", "steps": 0})).await, StatusCode::BAD_REQUEST, "steps");
    assert_json_error(&start(json!({"dataset_id": "nope", "name": "ok"})).await, StatusCode::BAD_REQUEST, "upload the images first");

    // Train: stop part-way (a checkpoint is written), then resume to the end.
    let body = json!({"dataset_id": ds.id, "name": "webpastel", "trigger": "pastel", "steps": 40, "batch": 2,
                      "checkpoint_every": 5, "sample_every": 20, "eval_prompts": ["a red circle on a blue background, pastel style"]});
    let r = start(body.clone()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let t: TrainingStatus = r.json();
    assert_json_error(&start(body).await, StatusCode::BAD_REQUEST, "already trains webpastel");
    let running = wait_training(&app, &t.id, |s| s.step >= 8).await;
    assert_eq!(running.state, TrainingState::Running);
    assert!(running.loss.is_some() && running.total == 40);
    let r = send(&app, Method::POST, &format!("/api/style-trainings/{}/stop", t.id), None).await;
    assert_eq!(r.status, StatusCode::OK);
    let stopped = wait_training(&app, &t.id, |s| s.state == TrainingState::Stopped).await;
    assert!(stopped.step >= 8 && stopped.step < 40, "{stopped:?}");
    let ckpts = tmp.path().join("styles/webpastel/checkpoints");
    assert!(std::fs::read_dir(&ckpts).unwrap().count() > 0, "a checkpoint to resume from");
    let r = send(&app, Method::DELETE, &format!("/api/style-trainings/{}", t.id), None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    // (Deleted and gone: train it again under the same name, this time to the end.)
    assert!(!tmp.path().join("styles/webpastel").exists());
    let t: TrainingStatus = start(json!({"dataset_id": ds.id, "name": "webpastel", "trigger": "pastel", "steps": 40, "batch": 2,
                      "checkpoint_every": 5, "sample_every": 20, "eval_prompts": ["a red circle on a blue background, pastel style"]}))
        .await
        .json();
    wait_training(&app, &t.id, |s| s.step >= 12).await;
    send(&app, Method::POST, &format!("/api/style-trainings/{}/stop", t.id), None).await;
    let stopped = wait_training(&app, &t.id, |s| s.state == TrainingState::Stopped).await;
    let r = send(&app, Method::POST, &format!("/api/style-trainings/{}/resume", t.id), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let done = wait_training(&app, &t.id, |s| matches!(s.state, TrainingState::Done { .. })).await;
    assert_eq!(done.state, TrainingState::Done { style: "webpastel".into() });
    assert_eq!(done.step, 40);
    // The loss history runs through the stop without gaps or repeats.
    let steps: Vec<u64> = done.losses.iter().map(|(k, _)| *k).collect();
    assert_eq!(steps, (1..=40).collect::<Vec<_>>(), "resumed at {}", stopped.step);
    assert!(done.losses.iter().all(|(_, l)| l.is_finite() && *l > 0.0));
    // Sample sheets at 0, 20 and 40, served as PNG.
    assert_eq!(done.samples.iter().map(|s| s.step).collect::<Vec<_>>(), [0, 20, 40]);
    let r = send(&app, Method::GET, &done.samples[2].url, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(image::load_from_memory(&r.body).unwrap().width() >= 64);
    // Resuming a finished training is refused.
    let r = send(&app, Method::POST, &format!("/api/style-trainings/{}/resume", t.id), None).await;
    assert_json_error(&r, StatusCode::BAD_REQUEST, "cannot be resumed");

    // The style is in the library with its card, and the run in the experiment store.
    let styles: Vec<Value> = get_json(&app, "/api/styles").await;
    let mine = styles.iter().find(|s| s["name"] == "webpastel").expect("the new style is listed");
    assert_eq!(mine["builtin"], false);
    assert_eq!(mine["card"]["trigger"], "pastel");
    assert_eq!(mine["card"]["dataset_images"], ds.images.len());
    assert_eq!(mine["card"]["training"]["steps"], 40);
    assert!(mine["files"].as_array().unwrap().iter().any(|f| f == "compare.png"));
    let tracker = atelier_server::tracking::Tracker::open(&tmp.path().join("tracking")).unwrap();
    let exp = tracker.experiment("styles").unwrap();
    let runs = tracker.runs(exp).unwrap();
    let run = runs.iter().find(|r| r.name == "webpastel" && r.status == "FINISHED").expect("a finished run");
    let loss = tracker.metric_history(&run.run_id, "loss").unwrap();
    assert_eq!(loss.len(), 40, "one loss per step, none repeated after the resume");
    // The run and the registry version name the DVC version of the pictures.
    let project = atelier_server::datasets::Project::open(tmp.path()).unwrap();
    let current = project.version(&project.dataset(&ds.id).unwrap(), None).unwrap();
    let tags: std::collections::BTreeMap<String, String> = tracker.tags(&run.run_id).unwrap().into_iter().collect();
    assert_eq!(tags.get("dataset.md5"), Some(&current.md5), "{tags:?}");
    assert_eq!((tags.get("dataset.id"), tags.get("dataset.version")), (Some(&ds.id), Some(&current.number.to_string())));
    let registered = tracker.resolve_version("webpastel", "latest").unwrap();
    assert_eq!(registered.tags.get("dataset.md5"), Some(&current.md5));

    // A new trainer on the same folder lists the training as it ended.
    drop(app);
    workers.join();
    let again = open_trainer(tmp.path(), Arc::new(StyleLibrary::new(tmp.path().join("styles"))), &Workers::start());
    let listed = again.list();
    let same = listed.iter().find(|s| s.id == t.id).unwrap();
    assert_eq!(same.state, TrainingState::Done { style: "webpastel".into() });
    assert_eq!(same.losses, done.losses);
}

/// `side`² PNG: a disc of `fg` on `bg`.
fn disc_png(fg: [u8; 3], bg: [u8; 3], side: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(side, side, |x, y| {
        let (u, v) = (x as f32 / side as f32 - 0.5, y as f32 / side as f32 - 0.5);
        image::Rgb(if u * u + v * v < 0.09 { fg } else { bg })
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_keep_each_image_with_its_caption() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, _workers) = setup(tmp.path());
    let (white, yellow) = ([255, 255, 255], [255, 255, 0]);
    let mut camera = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut camera, 90)
        .encode_image(&image::RgbImage::from_fn(96, 64, |x, _| image::Rgb([(x * 2) as u8, 40, 90])))
        .unwrap();
    // `b/1.txt` belongs to `b/1.png`, not to `a/1.png` (which comes first); colour
    // variations of one drawing are all kept; camera names pair whatever the case.
    let zip = zip_of(&[
        ("a/1.png", disc_png([255, 0, 0], white, 64)),
        ("b/1.png", disc_png([0, 255, 0], white, 64)),
        ("b/1.txt", b"\xEF\xBB\xBFgreen disc, inkline\r\n".to_vec()),
        ("c/1.png", disc_png([128, 0, 128], yellow, 64)),
        ("IMG_0001.JPG", camera),
        ("IMG_0001.TXT", b"caf\xE9 table".to_vec()),
    ]);
    let r = upload(&app, "/api/style-datasets", &[("set.zip", zip)]).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let ds: DatasetSummary = r.json();
    let image = |f: &str| ds.images.iter().find(|i| i.file == f).cloned().unwrap_or_else(|| panic!("{f} missing: {ds:?}"));
    assert_eq!(image("a_1.png").caption, None);
    assert_eq!(image("b_1.png").caption.as_deref(), Some("green disc, inkline"));
    assert_eq!(image("c_1.png").caption, None);
    let camera = image("IMG_0001.JPG");
    assert_eq!(camera.caption.as_deref(), Some("café table"));
    assert!(camera.caption_note.as_deref().is_some_and(|n| n.contains("Windows-1252")), "{camera:?}");
    assert!(ds.skipped.is_empty(), "{:?}", ds.skipped);

    // A loose image and caption whose names are taken move together.
    let uri = format!("/api/style-datasets?dataset={}", ds.id);
    let r = upload(&app, &uri, &[("b_1.png", disc_png([0, 0, 255], white, 64)), ("b_1.txt", b"blue disc".to_vec())]).await;
    let more: DatasetSummary = r.json();
    let moved = more.images.iter().find(|i| i.file == "b_1-2.png").unwrap_or_else(|| panic!("{more:?}"));
    assert_eq!(moved.caption.as_deref(), Some("blue disc"));
    assert_eq!(more.images.iter().find(|i| i.file == "b_1.png").unwrap().caption.as_deref(), Some("green disc, inkline"));

    // Two captions for one image are refused, and nothing is added.
    let dir = tmp.path().join("trainings/datasets").join(&ds.id);
    let before = std::fs::read_dir(&dir).unwrap().count();
    let clash = zip_of(&[("x/2.png", disc_png([0, 0, 0], white, 64)), ("x/2.txt", b"one".to_vec()), ("x/2.TXT", b"two".to_vec())]);
    let r = upload(&app, &uri, &[("clash.zip", clash)]).await;
    assert_json_error(&r, StatusCode::BAD_REQUEST, "clash.zip: x/2.txt and x/2.TXT are both captions of the same image; keep one");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), before);

    // Thumbnails come from the trainer's reader: an RGBA cut-out whose transparent half
    // stores magenta shows white there, scaled to fit the asked size (200×100 → 160×80).
    let cutout = image::RgbaImage::from_fn(200, 100, |x, _| if x < 100 { image::Rgba([255, 0, 255, 0]) } else { image::Rgba([0, 0, 255, 255]) });
    let mut png = std::io::Cursor::new(Vec::new());
    cutout.write_to(&mut png, image::ImageFormat::Png).unwrap();
    let r = upload(&app, &uri, &[("cutout.png", png.into_inner())]).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let thumb = common::send(&app, axum::http::Method::GET, &format!("/api/style-datasets/{}/files/cutout.png?thumb=160", ds.id), None).await;
    assert_eq!(thumb.status, StatusCode::OK, "{}", thumb.text());
    let thumb = image::load_from_memory(&thumb.body).unwrap().to_rgb8();
    assert_eq!(thumb.dimensions(), (160, 80));
    assert_eq!(thumb.get_pixel(10, 40).0, [255, 255, 255]);
    assert_eq!(thumb.get_pixel(150, 40).0, [0, 0, 255]);
}
