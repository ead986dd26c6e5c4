//! Training machinery shared by the starter model and style adapters: the optimiser,
//! the weight average, checkpoints, loss curves (the CSV log) and their plots.

pub mod checkpoint;
pub mod curves;
pub mod diffusion;
pub mod ema;
pub mod init;
pub mod optim;
pub mod plot;

pub use ema::Ema;
pub use init::seeded_var_builder;
pub use optim::{AdamW, OptimConfig, StepStats};
