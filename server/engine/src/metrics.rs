//! Image measurements (to be written).
