//! Style adapters (LoRA): the datasets they are trained from ([`dataset`]), training
//! ([`train`]), and measuring a trained style against its base model ([`metrics`]).
//! The style library, where trained styles are kept and listed, is the server's
//! (`server/src/styles.rs`).

pub mod dataset;
pub mod metrics;
pub mod train;
