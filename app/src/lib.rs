//! Atelier UI.
