//! Components shared by pages, one per file.

pub mod gallery;
pub mod progress;
