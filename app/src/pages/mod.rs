//! One module per page.

pub mod blend;
pub mod generate;
pub mod styles;
pub mod train;
