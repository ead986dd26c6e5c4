//! The one work queue (being written).
