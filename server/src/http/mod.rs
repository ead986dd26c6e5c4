//! The HTTP side of the studio: [`app`] builds the whole router (the JSON API under `/api`,
//! server functions, Leptos pages, static files); each feature folder (`generation`,
//! `styles`, `blends`, `negatives`) brings its own handlers in its `http` module, and this
//! module nests them; `GET /metrics` (Prometheus) is at the root. [`extract`] holds what every handler shares.

pub mod extract;
pub mod server_fns;
pub mod static_files;

use std::sync::Arc;

use app::dto::MAX_BODY_BYTES;
use app::server_fns::ssr::SharedBackend;
use axum::Router;
use leptos::prelude::provide_context;
use leptos_axum::{generate_route_list, LeptosRoutes};
use tower_http::compression::predicate::{DefaultPredicate, NotForContentType, Predicate};
use tower_http::compression::CompressionLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::trace::TraceLayer;

use axum::extract::{DefaultBodyLimit, OriginalUri, State};
use axum::http::Method;
use axum::routing::get;
use axum::Json;

use crate::{ApiError, AppState};

/// Builds the application. Tests call this and drive it with `oneshot`.
pub fn app(state: AppState) -> Router {
    let backend: SharedBackend = Arc::new(state.clone());
    let leptos_options = state.leptos_options.clone();
    let pages = Router::new()
        .leptos_routes_with_context(
            &state,
            generate_route_list(app::App),
            move || provide_context(backend.clone()),
            move || app::shell(leptos_options.clone()),
        )
        // Server functions read their body without axum's extractor limit.
        .layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES));
    pages
        .route("/metrics", get(crate::monitoring::metrics::handler))
        .nest("/api", api_routes())
        .merge(crate::deployments::a1111::routes())
        .fallback_service(static_files::service(state.clone()))
        // Counted per route template: after routing, so on every route and the fallback.
        .layer(axum::middleware::from_fn(crate::monitoring::metrics::track_http))
        // HTML and JSON compressed on the fly (site files come precompressed); never event
        // streams (the default predicate skips text/event-stream) nor opaque downloads.
        .layer(CompressionLayer::new().compress_when(
            DefaultPredicate::new().and(NotForContentType::const_new("application/octet-stream")),
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// The `/api` routes (README: "JSON API"). Every error is JSON `{"error": ...}`.
pub fn api_routes() -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/model", get(model))
        .merge(crate::generation::http::routes())
        .merge(crate::styles::http::routes())
        .merge(crate::blends::http::routes())
        .merge(crate::exports::http::routes())
        .merge(crate::negatives::http::routes())
        .merge(crate::tracking::http::routes())
        .merge(crate::tracking::registry_http::routes())
        .merge(crate::datasets::http::routes())
        .merge(crate::deployments::http::routes())
        .merge(crate::monitoring::drift::http::routes())
        .fallback(|method: Method, OriginalUri(uri): OriginalUri| async move { ApiError::UnknownRoute(format!("{method} {}", uri.path())) })
        .method_not_allowed_fallback(|method: Method, OriginalUri(uri): OriginalUri| async move {
            ApiError::WrongMethod(format!("{method} {}", uri.path()))
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn model(State(state): State<AppState>) -> Json<app::dto::ModelInfo> {
    Json((*state.model).clone())
}
