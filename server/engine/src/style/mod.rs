//! Style adapters: the datasets they are trained from, training, and the style library.

pub mod dataset;
pub mod metrics;
pub mod train;
