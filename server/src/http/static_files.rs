//! The built site (`--site-root`: the WASM bundle, its JS and CSS, `public/`) as browsers should
//! get it: precompressed and cheaply revalidated.
//!
//! `xtask build` writes `NAME.br` and `NAME.gz` beside every text and WASM file; `ServeDir`
//! sends the variant the request accepts (`Content-Encoding: br` or `gzip`). The file names are
//! fixed (Leptos' `HydrationScripts` loads `/pkg/atelier.js` and `/pkg/atelier_bg.wasm`), so
//! nothing may be cached blindly: every file carries `Cache-Control: no-cache` and an `ETag`, and
//! a browser that sends it back in `If-None-Match` gets a bodiless `304 Not Modified`.
//! A path that is no file falls through to Leptos' handler, which renders the 404 page.

use std::time::UNIX_EPOCH;

use axum::extract::Request;
use axum::handler::Handler;
use axum::http::header::{CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, ETAG, IF_NONE_MATCH, LAST_MODIFIED, VARY};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower_http::services::ServeDir;

use crate::AppState;

/// Static files under the site root, then Leptos' 404 page: the router's fallback.
pub fn service(state: AppState) -> Router {
    let site_root = state.leptos_options.site_root.to_string();
    // The 404 page renders the whole app shell, footer included, whose server functions
    // need the backend as the pages have it.
    let backend: app::server_fns::ssr::SharedBackend = std::sync::Arc::new(state.clone());
    let not_found = leptos_axum::file_and_error_handler_with_context::<AppState, _>(
        move || leptos::prelude::provide_context(backend.clone()),
        app::shell,
    )
    .with_state(state);
    let files = ServeDir::new(site_root)
        .precompressed_br()
        .precompressed_gzip()
        // Whatever a file cannot answer (a POST to an unknown path, say) is Leptos' to answer.
        .call_fallback_on_method_not_allowed(true)
        .fallback(not_found);
    Router::new().fallback_service(files).layer(axum::middleware::from_fn(revalidate))
}

/// Adds the validator and caching headers to a file served whole, and answers a matching
/// `If-None-Match` with `304 Not Modified`.
pub async fn revalidate(request: Request, next: Next) -> Response {
    let if_none_match = matches!(*request.method(), Method::GET | Method::HEAD)
        .then(|| request.headers().get(IF_NONE_MATCH).cloned())
        .flatten();
    let mut response = next.run(request).await;
    if response.status() != StatusCode::OK {
        return response;
    }
    let Some(etag) = etag(response.headers()) else { return response };
    let headers = response.headers_mut();
    headers.insert(ETAG, etag.clone());
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // The same URL answers br, gzip or plain bytes: shared caches must key on the header.
    headers.insert(VARY, HeaderValue::from_static("accept-encoding"));
    if if_none_match.is_some_and(|list| matches(&list, &etag)) {
        let mut not_modified = StatusCode::NOT_MODIFIED.into_response();
        for name in [ETAG, CACHE_CONTROL, VARY, LAST_MODIFIED] {
            if let Some(v) = response.headers().get(&name) {
                not_modified.headers_mut().insert(name, v.clone());
            }
        }
        return not_modified;
    }
    response
}

/// A weak validator from what `ServeDir` reports of the file it sent: modification time, length
/// and encoding (as nginx derives its ETags). Weak, because the br, gzip and plain variants
/// are the same content; the encoding is in it all the same so each variant revalidates as
/// itself. `None` for anything that is not such a file (no `Last-Modified`, or a streamed body).
fn etag(headers: &HeaderMap) -> Option<HeaderValue> {
    let modified = headers.get(LAST_MODIFIED)?.to_str().ok()?;
    let seconds = httpdate::parse_http_date(modified).ok()?.duration_since(UNIX_EPOCH).ok()?.as_secs();
    let length: u64 = headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()?;
    let encoding = headers.get(CONTENT_ENCODING).and_then(|v| v.to_str().ok()).unwrap_or("identity");
    HeaderValue::from_str(&format!("W/\"{seconds:x}-{length:x}-{encoding}\"")).ok()
}

/// `If-None-Match` uses the weak comparison: opaque tags equal, `W/` ignored; `*` matches any.
fn matches(list: &HeaderValue, etag: &HeaderValue) -> bool {
    let Ok(list) = list.to_str() else { return false };
    let opaque = |tag: &str| tag.trim().trim_start_matches("W/").to_string();
    let ours = opaque(etag.to_str().unwrap_or_default());
    list.split(',').any(|tag| tag.trim() == "*" || opaque(tag) == ours)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn etag_names_time_length_and_encoding() {
        let mut headers = HeaderMap::new();
        headers.insert(LAST_MODIFIED, h("Mon, 30 Nov 2026 12:00:00 GMT"));
        headers.insert(CONTENT_LENGTH, h("1000"));
        assert_eq!(etag(&headers).unwrap(), "W/\"6b0d6540-3e8-identity\"");
        headers.insert(CONTENT_ENCODING, h("br"));
        assert_eq!(etag(&headers).unwrap(), "W/\"6b0d6540-3e8-br\"");
        headers.remove(CONTENT_LENGTH);
        assert_eq!(etag(&headers), None, "a body of unknown length has no validator");
    }

    #[test]
    fn if_none_match_uses_the_weak_comparison() {
        let tag = h("W/\"1-2-br\"");
        assert!(matches(&h("W/\"1-2-br\""), &tag));
        assert!(matches(&h("\"1-2-br\""), &tag));
        assert!(matches(&h("\"x\", W/\"1-2-br\""), &tag));
        assert!(matches(&h("*"), &tag));
        assert!(!matches(&h("W/\"1-2-gzip\""), &tag));
        assert!(!matches(&h(""), &tag));
    }
}
