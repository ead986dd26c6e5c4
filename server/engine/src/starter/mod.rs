//! The starter model: a small SD-architecture model that Atelier trains itself on a
//! procedural world of coloured shapes ([`shapes`]).

pub mod shapes;
