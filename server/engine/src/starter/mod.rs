//! The starter model: a small SD-architecture model that Atelier trains itself on a
//! procedural world of coloured shapes ([`shapes`]), with the architecture in
//! [`model`] and the training run in [`train`].

pub mod eval;
pub mod model;
pub mod shapes;
pub mod styles;
pub mod train;
