//! `/api/datasets` on a studio: an upload through the Train page's endpoint is a DVC
//! version; more uploads, a caption edit and a removal each make the next one, with their
//! diffs; unchanged content makes none; files of old versions are served from the cache;
//! unknown datasets and versions are 404/400 JSON errors; a damaged cache is reported and
//! a change is refused without touching the `.dvc` file.

mod common;

use std::path::Path;

use app::dto::DatasetSummary;
use atelier_engine::starter::styles::{write_dataset, PictureStyle};
use atelier_server::app;
use axum::http::{Method, StatusCode};
use axum::Router;
use serde_json::{json, Value};

use common::{assert_json_error, get_json, send, send_raw};

fn setup(data: &Path) -> Router {
    app(common::studio_with_trainer(data))
}

async fn upload(app: &Router, uri: &str, files: &[(&str, Vec<u8>)]) -> DatasetSummary {
    let (ctype, body) = common::multipart(files);
    let r = send_raw(app, Method::POST, uri, &ctype, body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    r.json()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_dataset_change_is_a_dvc_version_with_its_diff() {
    let tmp = tempfile::tempdir().unwrap();
    let app = setup(tmp.path());
    let src = tmp.path().join("src");
    write_dataset(PictureStyle::Pastel, &src, 6, 3).unwrap();
    let file = |n: &str| std::fs::read(src.join(n)).unwrap();

    let ds = upload(&app, "/api/style-datasets", &[("000.png", file("000.png")), ("000.txt", file("000.txt")), ("001.png", file("001.png"))]).await;
    assert!(tmp.path().join(".dvc/config").is_file(), "the data folder is a DVC project");
    let dvc_file = tmp.path().join(format!("trainings/datasets/{}.dvc", ds.id));
    let text = std::fs::read_to_string(&dvc_file).unwrap();
    assert!(text.contains("  nfiles: 3\n  hash: md5\n") && text.contains(&format!("  path: {}\n", ds.id)), "{text}");

    let list: Vec<Value> = get_json(&app, "/api/datasets").await;
    assert_eq!(list.len(), 1);
    assert_eq!((list[0]["id"].as_str(), list[0]["version"].as_u64(), list[0]["nfiles"].as_u64()), (Some(ds.id.as_str()), Some(1), Some(3)));
    assert!(list[0]["damaged"].is_null());

    // More images: version 2, its diff lists them.
    upload(&app, &format!("/api/style-datasets?dataset={}", ds.id), &[("002.png", file("002.png")), ("003.png", file("003.png"))]).await;
    let d: Value = get_json(&app, &format!("/api/datasets/{}/diff", ds.id)).await;
    assert_eq!((d["from"].as_u64(), d["to"].as_u64()), (Some(1), Some(2)));
    assert_eq!(d["images_added"], json!(["002.png", "003.png"]));

    // A caption edit: version 3; the same caption again makes no version.
    let r = send(&app, Method::PUT, &format!("/api/datasets/{}/captions/001.png", ds.id), Some(json!({"caption": "pastel hills at dusk"}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let c: Value = r.json();
    assert_eq!((c["new"].as_bool(), c["version"]["number"].as_u64()), (Some(true), Some(3)));
    assert_eq!(c["version"]["summary"], "1 caption changed");
    let again: Value = send(&app, Method::PUT, &format!("/api/datasets/{}/captions/001.png", ds.id), Some(json!({"caption": "pastel hills at dusk"}))).await.json();
    assert_eq!((again["new"].as_bool(), again["version"]["md5"].clone()), (Some(false), c["version"]["md5"].clone()));
    let d: Value = get_json(&app, &format!("/api/datasets/{}/diff", ds.id)).await;
    assert_eq!(d["captions_changed"], json!([{"caption": "001.txt", "image": "001.png", "before": null, "after": "pastel hills at dusk"}]));

    // A removal: version 4; version 1's file is still served from the cache, as a thumbnail too.
    let r = send(&app, Method::DELETE, &format!("/api/datasets/{}/files/000.png", ds.id), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let d: Value = get_json(&app, &format!("/api/datasets/{}/diff?from=1&to=4", ds.id)).await;
    assert_eq!((d["images_removed"].clone(), d["images_added"].clone()), (json!(["000.png"]), json!(["002.png", "003.png"])));
    let shown: Value = get_json(&app, &format!("/api/datasets/{}", ds.id)).await;
    let versions = shown["versions"].as_array().unwrap();
    assert_eq!(versions.iter().map(|v| v["number"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert_eq!(versions[3]["summary"], "1 image removed");
    let r = send(&app, Method::GET, &format!("/api/datasets/{}/versions/1/files/000.png", ds.id), None).await;
    assert_eq!((r.status, r.body.clone()), (StatusCode::OK, file("000.png")));
    let r = send(&app, Method::GET, &format!("/api/datasets/{}/versions/1/files/000.png?thumb=32", ds.id), None).await;
    assert_eq!(r.header(axum::http::header::CONTENT_TYPE).as_deref(), Some("image/png"));
    assert!(image::load_from_memory(&r.body).unwrap().width() <= 32);

    // Bad input.
    let r = send(&app, Method::GET, "/api/datasets/nope/diff", None).await;
    assert_json_error(&r, StatusCode::NOT_FOUND, "nope");
    let r = send(&app, Method::GET, &format!("/api/datasets/{}/diff?to=9", ds.id), None).await;
    assert_json_error(&r, StatusCode::BAD_REQUEST, "no version 9; it has 1..=4");
    let r = send(&app, Method::GET, &format!("/api/datasets/{}/versions/1/files/..%2F..%2F.dvc%2Fconfig", ds.id), None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // A damaged cache: listed as such; a change is refused and the .dvc file kept.
    let (_, files) = {
        let p = atelier_server::datasets::Project::open(tmp.path()).unwrap();
        let d = p.dataset(&ds.id).unwrap();
        p.files(&d, None).unwrap()
    };
    let object = tmp.path().join(".dvc/cache/files/md5").join(&files[0].md5[..2]).join(&files[0].md5[2..]);
    std::fs::write(&object, b"not the picture").unwrap();
    let list: Vec<Value> = get_json(&app, "/api/datasets").await;
    assert!(list[0]["damaged"].as_str().unwrap().contains("damaged"), "{list:?}");
    let before = std::fs::read(&dvc_file).unwrap();
    let r = send(&app, Method::DELETE, &format!("/api/datasets/{}/files/002.png", ds.id), None).await;
    assert_json_error(&r, StatusCode::BAD_REQUEST, "nothing was changed");
    assert_eq!(std::fs::read(&dvc_file).unwrap(), before);
    assert!(tmp.path().join(format!("trainings/datasets/{}/002.png", ds.id)).is_file(), "the refused removal removed nothing");
}
