//! One module per page.

pub mod generate;
pub mod styles;
pub mod train;
