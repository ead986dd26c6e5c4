//! Atelier's application library, laid out by feature as the pages are:
//!
//! - [`generation`]: the Generate page: requests, the generator around the engine, the
//!   generation task, the gallery;
//! - [`styles`]: the Styles and Train pages: the style library, datasets, style training;
//! - [`blends`]: the Blend page: saved blends, share links, bakes;
//! - [`negatives`]: the Negatives page: negative-prompt analysis and optimisation;
//! - [`queue`]: the one work queue every heavy task runs on;
//! - [`http`]: the router, the shared extractors and the server functions;
//! - [`tracking`]: the embedded experiment store;
//! - [`monitoring`]: Prometheus metrics at `GET /metrics`;
//! - [`deployments`]: serving endpoints bound to registry versions, and the A1111 API.
//!
//! [`app`] builds the whole router from an [`AppState`], so tests can drive it with
//! `tower::ServiceExt::oneshot` and no socket. The `atelier` binary (`main.rs`, `cli/`,
//! `serve.rs`) uses this library.

pub mod blends;
pub mod datasets;
pub mod deployments;
pub mod error;
pub mod exports;
pub mod generation;
pub mod http;
pub mod monitoring;
pub mod negatives;
pub mod queue;
pub mod state;
pub mod styles;
pub mod tracking;

pub use error::ApiError;
pub use generation::generator::{Generator, LoadedModel, Throttled};
pub use http::app;
pub use state::AppState;
