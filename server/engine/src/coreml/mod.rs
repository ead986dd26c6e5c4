//! Core ML export (issue 16), written in Rust on any OS. So far: the weight file of an ML
//! Program package ([`blob`]); the MIL program, the package layout and the exporters follow.

pub mod blob;
