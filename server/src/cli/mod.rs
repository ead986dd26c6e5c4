//! The command-line subcommands other than `serve`.

pub mod bench;
pub mod generate;
pub mod reference;
