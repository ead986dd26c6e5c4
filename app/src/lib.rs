//! Atelier's user interface: the Leptos app shared by the server (SSR) and the browser (hydration).
//!
//! Only plain Rust lives here: DTOs, server functions and components. The engine never
//! enters this crate, so the WASM build stays small.

pub mod browser;
pub mod charts;
pub mod components;
pub mod dto;
pub mod error;
pub mod pages;
pub mod server_fns;

pub use error::AppError;

use leptos::prelude::*;
use leptos_meta::{provide_meta_context, MetaTags, Stylesheet, Title};
use leptos_router::{
    components::{Route, Router, Routes},
    StaticSegment,
};

/// The HTML document around the app, rendered on the server only.
pub fn shell(options: LeptosOptions) -> impl IntoView {
    view! {
        <!DOCTYPE html>
        <html lang="en">
            <head>
                <meta charset="utf-8" />
                <meta name="viewport" content="width=device-width, initial-scale=1" />
                <link rel="icon" type="image/svg+xml" href="/favicon.svg" />
                <HydrationScripts options />
                <MetaTags />
            </head>
            <body>
                <App />
            </body>
        </html>
    }
}

/// The root component: routes to the pages.
#[component]
pub fn App() -> impl IntoView {
    provide_meta_context();
    view! {
        <Stylesheet id="atelier" href="/pkg/atelier.css" />
        <Title text="Atelier" />
        <Router>
            <nav class="top">
                <a href="/">"Generate"</a>
                <a href="/styles">"Styles"</a>
                <a href="/train">"Train"</a>
                <a href="/blend">"Blend"</a>
                <a href="/negatives">"Negatives"</a>
                <a href="/experiments">"Experiments"</a>
                <a href="/deployments">"Deployments"</a>
            </nav>
            <main>
                <Routes fallback=|| view! { <p class="error">"Page not found."</p> }>
                    <Route path=StaticSegment("") view=pages::generate::GeneratePage />
                    <Route path=StaticSegment("styles") view=pages::styles::StylesPage />
                    <Route path=StaticSegment("train") view=pages::train::TrainPage />
                    <Route path=StaticSegment("blend") view=pages::blend::BlendPage />
                    <Route path=StaticSegment("negatives") view=pages::negatives::NegativesPage />
                    <Route path=StaticSegment("experiments") view=pages::experiments::ExperimentsPage />
                    <Route path=StaticSegment("deployments") view=pages::deployments::DeploymentsPage />
                </Routes>
            </main>
            <StudioFooter />
        </Router>
    }
}

/// The footer on every page: the model being served and where it computes.
#[component]
fn StudioFooter() -> impl IntoView {
    let model = Resource::new(|| (), |_| server_fns::get_model_info());
    view! {
        <footer class="studio-footer">
            <Suspense fallback=|| ()>
                {move || Suspend::new(async move {
                    model.await.ok().map(|m| {
                        let compute = if m.device.is_empty() { String::new() } else { format!(" · {} · {}", m.device, m.dtype) };
                        view! {
                            <span data-test="compute">{format!("{}{compute}", m.name)}</span>
                        }
                    })
                })}
            </Suspense>
        </footer>
    }
}
