//! Components shared by pages, one per file.

pub mod bake;
pub mod errors;
pub mod export_coreml;
pub mod gallery;
pub mod monitoring;
pub mod progress;
pub mod registry;
pub mod sync_status;
