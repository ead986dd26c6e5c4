//! Hydration entry point: the browser runs this once the WASM module loads.

// Leptos' view types nest deeply; the default limit (128) is reached computing their layouts.
#![recursion_limit = "256"]

/// Called by Leptos' hydration script; attaches the app to the server-rendered HTML.
#[wasm_bindgen::prelude::wasm_bindgen]
pub fn hydrate() {
    console_error_panic_hook::set_once();
    leptos::mount::hydrate_body(app::App);
}
