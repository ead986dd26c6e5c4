//! Atelier's Stable Diffusion engine, built on Candle.
//!
//! Loads diffusers-layout SD 1.x / 2.x models ([`model`]), tokenizes prompts
//! ([`tokenizer`]), encodes them ([`clip`]), denoises with a [`unet`] under one of
//! the [`scheduler`]s and decodes with the [`vae`]. [`pipeline`] ties them together.
//! This crate never downloads outside [`hub`], never prints, and never parses flags.

pub mod attention;
pub mod bake;
pub mod error;
pub mod files;
pub mod image_input;
pub mod memory;
pub mod metadata;
pub mod noise;
pub mod pipeline;
pub mod scheduler;
pub mod tokenizer;

pub use error::{Error, Result};
pub mod clip;
pub mod conv;
pub mod layers;
pub mod lora;
pub mod prompt;
pub mod unet;
pub mod unet_blocks;
pub mod vae;
pub mod model;
pub mod reference;
pub mod quality;
pub mod sheet;
pub mod starter;
pub mod style;
pub mod train;
