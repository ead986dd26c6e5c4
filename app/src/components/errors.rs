//! What a page shows when loading its data failed.

use leptos::error::Errors;
use leptos::prelude::*;

/// The fallback of a page's `ErrorBoundary`: every error, on one line.
pub fn error_line(errors: ArcRwSignal<Errors>) -> impl IntoView {
    view! { <p class="error">{move || errors.get().into_iter().map(|(_, e)| e.to_string()).collect::<Vec<_>>().join("; ")}</p> }
}
