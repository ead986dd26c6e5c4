//! The whole router: JSON API, server functions, Leptos pages and static files.

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

use crate::{api, AppState};

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
        .nest("/api", api::routes())
        .fallback_service(crate::static_files::service(state.clone()))
        // HTML and JSON compressed on the fly (site files come precompressed); never event
        // streams (the default predicate skips text/event-stream) nor opaque downloads.
        .layer(CompressionLayer::new().compress_when(
            DefaultPredicate::new().and(NotForContentType::const_new("application/octet-stream")),
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
