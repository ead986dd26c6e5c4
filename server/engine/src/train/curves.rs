//! Loss curves (to be written).
