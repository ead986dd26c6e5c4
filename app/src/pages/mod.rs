//! One module per page.

pub mod generate;
