//! Atelier's Stable Diffusion engine, built on Candle.
//!
//! Loads diffusers-layout SD 1.x / 2.x models ([`model`]), tokenizes prompts
//! ([`tokenizer`]), encodes them ([`clip`]), denoises with a [`unet`] under one of
//! the [`scheduler`]s and decodes with the [`vae`]. [`pipeline`] ties them together.
//! This crate never downloads (a Hugging Face id is looked up in the local hub cache by
//! [`model::resolve`]), never prints, and never parses flags.
//!
//! The modules are listed by layer: the model, inference, training, measurement, files.

pub mod error;
pub use error::{Error, Result};

// Model: loading a model folder and the networks it holds.
pub mod device; // which compute device (--device), resolved against the compiled features
pub mod model; // a diffusers folder: its files, configs, weights, the hub cache
pub mod single_file; // single-file (LDM layout) checkpoints turned into diffusers folders
pub mod ldm_names; // the original LDM/SGM names of UNet layers (kohya SDXL LoRA keys)
pub mod presets; // SD 1.x / 2.x / SDXL recognised from a checkpoint's shapes, and their config folders
pub mod layers; // linear, convolution and normalisation layers under checkpoint names
pub mod conv; // 2-D convolution as im2col + matmul, for training on the CPU
pub mod attention; // how attention is computed, selectable per run
pub mod cpu; // CPU kernels: blocked attention, vectorised exp
pub mod tokenizer; // CLIP byte-level BPE tokenizer
pub mod clip; // CLIP text encoder
pub mod unet_blocks; // ResNet, sampler and transformer blocks of the UNet and VAE
pub mod unet; // the denoising UNet
pub mod vae; // the autoencoder between images and latents
pub mod taesd; // TAESD tiny decoders for live previews that look like the image
pub mod lora; // LoRA adapter files, checked against a model and attached to it
pub mod bake; // a blend of adapters baked into one file or into the weights

// Inference: turning a prompt into images.
pub mod prompt; // A1111 prompt syntax: <lora:…> tags, attention weights, BREAK, chunks
pub mod noise; // seeded Gaussian noise, the same on every machine
pub mod scheduler; // noise schedulers, configured as diffusers does
pub mod memory; // memory admission for a generation or a training step
pub mod pipeline; // text-to-image and image-to-image

// Training: the shared machinery, the starter model and style adapters.
pub mod train; // optimiser, weight average, checkpoints, loss curves and their plots
pub mod starter; // the starter model trained on a procedural world of shapes
pub mod style; // style adapters: datasets, training, style metrics

// Measurement: how good an image, a set or the engine is.
pub mod quality; // no-reference quality of one image, and generic image measures
pub mod reference; // reproducing diffusers' reference cases, to compare with them
pub mod sheet; // contact sheets: a set of images tiled into one

// Export.
pub mod coreml; // Core ML ML Program packages (weight files so far)

// Files: images and results in and out.
pub mod files; // atomic writes (temporary file, then rename)
pub mod image_input; // the one way an image enters (format by content, EXIF orientation)
pub mod metadata; // A1111 `parameters` text in PNG files
