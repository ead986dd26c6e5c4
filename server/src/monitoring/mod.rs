//! Watching a running studio from outside: [`metrics`] exports what the studio does in the
//! Prometheus text exposition format at `GET /metrics`. The alerting rules over these
//! metrics and an example scrape configuration are in `monitoring/` at the repository root
//! (README: "Monitoring").

pub mod metrics;
