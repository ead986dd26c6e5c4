//! One module per page.

pub mod blend;
pub mod generate;
pub mod negatives;
pub mod styles;
pub mod train;
