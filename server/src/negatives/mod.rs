//! Negative-prompt optimisation: prompt analysis and suggestions ([`analysis`]) from a
//! curated knowledge base ([`knowledge`]) and from what earlier runs measured
//! ([`history`]); the paired search over candidates on fixed seeds ([`optimizer`]); and
//! the runs behind the CLI, the API and the Negatives page ([`service`]). Images are scored
//! with [`atelier_engine::quality`].

pub mod analysis;
pub mod error;
pub mod http;
pub mod history;
pub mod knowledge;
pub mod optimizer;
pub mod service;

pub use error::NegativesError;
pub use service::{Context, NegativeService};
