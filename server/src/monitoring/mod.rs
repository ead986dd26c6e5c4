//! Watching a running studio from outside: [`metrics`] exports what the studio does in the
//! Prometheus text exposition format at `GET /metrics`; [`drift`] scores what deployments
//! serve against the reference measured when they were made, and raises quality-drift
//! alerts with retraining suggestions. The alerting rules over these metrics and an example
//! scrape configuration are in `monitoring/` at the repository root (README: "Monitoring").

pub mod drift;
pub mod metrics;
