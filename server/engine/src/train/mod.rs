//! Training machinery shared by the starter model and style adapters.

pub mod curves;
