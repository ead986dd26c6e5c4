//! The whole router: JSON API, server functions, Leptos pages and static files.

use std::sync::Arc;

use app::dto::MAX_BODY_BYTES;
use app::studio::ssr::SharedStudio;
use axum::Router;
use leptos::prelude::provide_context;
use leptos_axum::{generate_route_list, LeptosRoutes};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::trace::TraceLayer;

use crate::{api, AppState};

/// Builds the application. Tests call this and drive it with `oneshot`.
pub fn app(state: AppState) -> Router {
    let studio: SharedStudio = Arc::new(state.clone());
    let leptos_options = state.leptos_options.clone();
    let pages = Router::new()
        .leptos_routes_with_context(
            &state,
            generate_route_list(app::App),
            move || provide_context(studio.clone()),
            move || app::shell(leptos_options.clone()),
        )
        // Server functions read their body without axum's extractor limit.
        .layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES));
    pages
        .nest("/api", api::routes())
        .fallback(leptos_axum::file_and_error_handler::<AppState, _>(app::shell))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
