//! Router tests of the site files: precompressed variants chosen by `Accept-Encoding`, ETag
//! revalidation with `304`, `Cache-Control`, the 404 page for what is no file, and on-the-fly
//! compression of JSON that leaves event streams alone. A small site root is made per test.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use atelier_engine::pipeline::{GenerateParams, Generated, StepProgress};
use atelier_server::{app, AppState, Generator};
use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use leptos::config::LeptosOptions;
use tower::ServiceExt;

use common::Reply;

/// Never asked to paint: these tests only fetch files.
struct NoGenerator;

impl Generator for NoGenerator {
    fn generate(&self, _: &GenerateParams, _: &mut dyn FnMut(&StepProgress) -> bool) -> atelier_engine::Result<Generated> {
        Err(atelier_engine::Error::Cancelled)
    }
    fn model_hash(&self) -> String {
        "nohash0000".into()
    }
    fn model_name(&self) -> String {
        "no-model".into()
    }
}

/// A WASM-like file: compressible, but not trivially so.
fn wasm_bytes() -> Vec<u8> {
    let mut bytes = b"\0asm\x01\0\0\0".to_vec();
    bytes.extend((0u32..20_000).flat_map(|i| (i.wrapping_mul(2_654_435_761) % 97).to_le_bytes()));
    bytes
}

/// A site root as `xtask build` leaves it: `pkg/atelier_bg.wasm` with `.br` and `.gz` beside it.
fn site(data: &Path) -> (Router, Vec<u8>) {
    let pkg = data.join("site/pkg");
    std::fs::create_dir_all(&pkg).unwrap();
    let plain = wasm_bytes();
    std::fs::write(pkg.join("atelier_bg.wasm"), &plain).unwrap();
    let mut br = Vec::new();
    brotli::BrotliCompress(&mut &plain[..], &mut br, &brotli::enc::BrotliEncoderParams::default()).unwrap();
    std::fs::write(pkg.join("atelier_bg.wasm.br"), &br).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&plain).unwrap();
    std::fs::write(pkg.join("atelier_bg.wasm.gz"), gz.finish().unwrap()).unwrap();
    std::fs::write(pkg.join("atelier.css"), "body { margin: 0 }\n".repeat(20)).unwrap();

    let options = LeptosOptions::builder()
        .output_name("atelier")
        .site_root(data.join("site").to_string_lossy().as_ref())
        .build();
    let state = AppState::new(options, Arc::new(NoGenerator), data, (64, 64), None).unwrap();
    (app(state), plain)
}

async fn get(app: &Router, uri: &str, headers: &[(header::HeaderName, &str)]) -> Reply {
    let mut req = Request::builder().method(Method::GET).uri(uri);
    for (name, value) in headers {
        req = req.header(name, *value);
    }
    let res = app.clone().oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes().to_vec();
    Reply { status, body, headers }
}

#[tokio::test]
async fn the_wasm_comes_brotli_compressed_and_revalidates_with_304() {
    let dir = tempfile::tempdir().unwrap();
    let (app, plain) = site(dir.path());

    let r = get(&app, "/pkg/atelier_bg.wasm", &[(header::ACCEPT_ENCODING, "br, gzip")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header(header::CONTENT_ENCODING).as_deref(), Some("br"));
    assert_eq!(r.header(header::CONTENT_TYPE).as_deref(), Some("application/wasm"));
    assert_eq!(r.header(header::CACHE_CONTROL).as_deref(), Some("no-cache"));
    assert_eq!(r.header(header::VARY).as_deref(), Some("accept-encoding"));
    assert!(r.body.len() < plain.len() / 2, "{} compressed bytes for {}", r.body.len(), plain.len());
    let mut unpacked = Vec::new();
    brotli::Decompressor::new(&r.body[..], 4096).read_to_end(&mut unpacked).unwrap();
    assert_eq!(unpacked, plain, "the br variant is the plain file");
    let etag = r.header(header::ETAG).expect("an ETag");
    assert!(etag.starts_with("W/\"") && etag.ends_with("-br\""), "{etag}");

    // A repeat visit sends the tag back: 304, no body, same validators.
    let again = get(&app, "/pkg/atelier_bg.wasm", &[(header::ACCEPT_ENCODING, "br, gzip"), (header::IF_NONE_MATCH, &etag)]).await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    assert!(again.body.is_empty());
    assert_eq!(again.header(header::ETAG).as_deref(), Some(etag.as_str()));
    assert_eq!(again.header(header::CACHE_CONTROL).as_deref(), Some("no-cache"));

    // Another tag (the file changed since) gets the file again.
    let changed = get(&app, "/pkg/atelier_bg.wasm", &[(header::ACCEPT_ENCODING, "br"), (header::IF_NONE_MATCH, "W/\"0-0-br\"")]).await;
    assert_eq!(changed.status, StatusCode::OK);
    assert_eq!(changed.body, r.body);
}

#[tokio::test]
async fn gzip_and_plain_variants_follow_accept_encoding() {
    let dir = tempfile::tempdir().unwrap();
    let (app, plain) = site(dir.path());

    let gz = get(&app, "/pkg/atelier_bg.wasm", &[(header::ACCEPT_ENCODING, "gzip")]).await;
    assert_eq!(gz.header(header::CONTENT_ENCODING).as_deref(), Some("gzip"));
    let mut unpacked = Vec::new();
    flate2::read::GzDecoder::new(&gz.body[..]).read_to_end(&mut unpacked).unwrap();
    assert_eq!(unpacked, plain);

    let identity = get(&app, "/pkg/atelier_bg.wasm", &[]).await;
    assert_eq!(identity.status, StatusCode::OK);
    assert_eq!(identity.header(header::CONTENT_ENCODING), None);
    assert_eq!(identity.body, plain);
    // Each variant has its own tag: a gzip tag does not validate the plain bytes.
    let gz_tag = gz.header(header::ETAG).unwrap();
    assert_ne!(identity.header(header::ETAG).unwrap(), gz_tag);
    let r = get(&app, "/pkg/atelier_bg.wasm", &[(header::IF_NONE_MATCH, &gz_tag)]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, plain);

    // A file without precompressed variants is served plain, with its validators all the same.
    let css = get(&app, "/pkg/atelier.css", &[(header::ACCEPT_ENCODING, "br")]).await;
    assert_eq!(css.status, StatusCode::OK);
    assert_eq!(css.header(header::CACHE_CONTROL).as_deref(), Some("no-cache"));
    assert!(css.header(header::ETAG).is_some());
}

#[tokio::test]
async fn what_is_no_file_is_the_404_page() {
    let dir = tempfile::tempdir().unwrap();
    let (app, _) = site(dir.path());
    let r = get(&app, "/pkg/missing.js", &[(header::ACCEPT_ENCODING, "br")]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.header(header::ETAG), None);
    let r = get(&app, "/no/such/page", &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.text().contains("<html"), "the Leptos 404 page: {}", r.text());
}

#[tokio::test]
async fn json_is_compressed_on_the_fly_and_event_streams_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let (app, _) = site(dir.path());
    let plain = get(&app, "/api/model", &[]).await;
    assert_eq!(plain.status, StatusCode::OK);
    let r = get(&app, "/api/model", &[(header::ACCEPT_ENCODING, "gzip")]).await;
    assert_eq!(r.header(header::CONTENT_ENCODING).as_deref(), Some("gzip"));
    let mut unpacked = Vec::new();
    flate2::read::GzDecoder::new(&r.body[..]).read_to_end(&mut unpacked).unwrap();
    assert_eq!(unpacked, plain.body);

    // Progress events must reach the browser as they happen, not when a compressor flushes.
    let job = common::send(&app, Method::POST, "/api/generate", Some(serde_json::json!({"prompt": "x", "steps": 1}))).await;
    assert_eq!(job.status, StatusCode::ACCEPTED, "{}", job.text());
    let id = job.json::<serde_json::Value>()["job_id"].as_str().unwrap().to_string();
    let events = get(&app, &format!("/api/jobs/{id}/events"), &[(header::ACCEPT_ENCODING, "br, gzip")]).await;
    assert_eq!(events.status, StatusCode::OK);
    assert_eq!(events.header(header::CONTENT_TYPE).as_deref(), Some("text/event-stream"));
    assert_eq!(events.header(header::CONTENT_ENCODING), None);
    assert!(events.text().contains("data: "), "{}", events.text());
}
