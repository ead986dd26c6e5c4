//! Core ML export (issue 16), written in Rust on any OS. So far: the weight file of an ML
//! Program package ([`blob`]) and the package folder with its manifest ([`package`]); the
//! MIL program and the exporters follow.

pub mod blob;
pub mod package;
