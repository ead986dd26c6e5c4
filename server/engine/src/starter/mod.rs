//! The starter model: a small SD-architecture model that Atelier trains itself on a
//! procedural world of coloured shapes ([`shapes`]), with the architecture in
//! [`model`], the training run in [`train`], and its evaluation in [`eval`] (reading the
//! images back with [`measure`]).

pub mod eval;
pub mod measure;
pub mod model;
pub mod shapes;
pub mod styles;
pub mod train;
