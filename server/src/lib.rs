//! Atelier's web server: the job queue around the engine, the on-disk gallery, the JSON API
//! and the Leptos pages. [`app`] builds the whole router from an [`AppState`], so tests can
//! drive it with `tower::ServiceExt::oneshot` and no socket.

pub mod api;
pub mod blends;
pub mod blends_api;
pub mod error;
pub mod gallery;
pub mod generator;
pub mod jobs;
pub mod negatives;
pub mod negatives_api;
pub mod png;
pub mod request;
pub mod routes;
pub mod state;
pub mod static_files;
pub mod studio;
pub mod style_training;
pub mod styles;
pub mod trainer;
pub mod tracking;
pub mod training_api;

pub use error::ApiError;
pub use generator::{Generator, LoadedModel, Throttled};
pub use routes::app;
pub use state::AppState;
