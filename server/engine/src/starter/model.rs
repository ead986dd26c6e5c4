//! The starter model's architecture and its diffusers folder layout.
//!
//! Every component is an ordinary SD-1.x building block, only small: a two-level
//! UNet2DConditionModel on 8×8×4 latents, an AutoencoderKL with SD's spatial factor of
//! 8 (64×64 images), and a CLIP text encoder with the real CLIP BPE vocabulary. The
//! sizes were chosen so one image (20 steps, guidance) takes well under half a second
//! on two CPU cores; `atelier bench --case starter-unet` times alternatives. The
//! configs below are written verbatim as the components' `config.json`, so the saved
//! folder loads through [`crate::pipeline::StableDiffusion`] and in diffusers.

use std::path::Path;

use serde_json::{json, Value};

use crate::clip::ClipConfig;
use crate::unet::UNetConfig;
use crate::vae::VaeConfig;
use crate::{Error, Result};

/// Pixels per side of the images the starter model makes.
pub const IMAGE_SIZE: usize = 64;
/// Latent cells per side (`IMAGE_SIZE / 8`).
pub const LATENT_SIZE: usize = 8;

const DIFFUSERS_VERSION: &str = "0.30.0";

/// `unet/config.json`.
pub fn unet_config_json() -> Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": LATENT_SIZE,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": false,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "only_cross_attention": false,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 8,
        "norm_eps": 1e-5,
        "cross_attention_dim": 64,
        "transformer_layers_per_block": 1,
        "attention_head_dim": 4,
        "use_linear_projection": true,
        "upcast_attention": false,
        "resnet_time_scale_shift": "default",
        "time_embedding_type": "positional"
    })
}

/// `vae/config.json`; `scaling_factor` is measured after the VAE is trained.
///
/// Few norm groups: with one channel per group, GroupNorm removes every channel's
/// mean, and with it the flat colours that make up most of these images.
pub fn vae_config_json(scaling_factor: f64) -> Value {
    json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [8, 16, 32, 64],
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 2,
        "sample_size": IMAGE_SIZE,
        "scaling_factor": scaling_factor,
        "mid_block_add_attention": false,
        "use_quant_conv": true,
        "use_post_quant_conv": true,
        "force_upcast": false
    })
}

/// `text_encoder/config.json`.
pub fn text_encoder_config_json() -> Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": 49408,
        "hidden_size": 64,
        "intermediate_size": 256,
        "projection_dim": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
        "torch_dtype": "float32"
    })
}

/// `scheduler/scheduler_config.json`: SD's noise schedule, used for training too.
pub fn scheduler_config_json() -> Value {
    json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "clip_sample": false,
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "trained_betas": null
    })
}

/// `model_index.json`.
pub fn model_index_json() -> Value {
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [null, null],
        "safety_checker": [null, null],
        "requires_safety_checker": false,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    })
}

fn parse<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> T {
    serde_json::from_value(v).unwrap_or_else(|e| panic!("the built-in {what} config does not parse: {e}"))
}

/// The parsed configs the engine builds the components from.
pub fn unet_config() -> UNetConfig {
    parse(unet_config_json(), "UNet")
}
pub fn vae_config(scaling_factor: f64) -> VaeConfig {
    parse(vae_config_json(scaling_factor), "VAE")
}
pub fn text_encoder_config() -> ClipConfig {
    parse(text_encoder_config_json(), "text encoder")
}

/// What the studio tells people about the starter model (saved as `atelier.json`).
pub const STARTER_NOTE: &str = "The built-in starter model was trained by Atelier itself on a \
procedural world of coloured shapes, so it paints only that world. It understands prompts like \
\"a red circle on a blue background\": shapes circle, square and triangle; colours red, green, \
blue, yellow, purple, orange, white and black; \"small\" / \"large\"; \"on the left\" / \
\"on the right\"; and the quality words blurry, noisy and low contrast (try them as a negative \
prompt). For real images, start Atelier with --model pointing at a Stable Diffusion 1.x/2.x \
diffusers folder or hub id.";

/// `atelier.json`: the model card the studio shows.
pub fn card_json() -> Value {
    json!({
        "name": "Atelier starter",
        "note": STARTER_NOTE,
        "example_prompts": [
            "a red circle on a blue background",
            "a small yellow triangle on the left on a purple background",
            "a large white square on a black background"
        ]
    })
}

/// Copies the CLIP tokenizer files (`vocab.json`, `merges.txt`) from `src` and writes
/// the tokenizer config, into `dest`.
pub fn write_tokenizer(src: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    for f in ["vocab.json", "merges.txt"] {
        let from = src.join(f);
        if !from.is_file() {
            return Err(Error::Tokenizer { path: from, message: "missing; point --tokenizer at a CLIP tokenizer folder".into() });
        }
        let to = dest.join(f);
        crate::files::write_atomic_with(
            &to,
            |tmp| std::fs::copy(&from, tmp).map(drop).map_err(|e| Error::io(&from, e)),
            |e| Error::io(&to, e),
        )?;
    }
    crate::files::save_json(
        &dest.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": 77,
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "do_lower_case": true
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse_and_fit_the_image_size() {
        let vae = vae_config(1.0);
        assert_eq!(IMAGE_SIZE / vae.scale_factor(), LATENT_SIZE);
        let unet = unet_config();
        assert_eq!(unet.cross_attention_dim, text_encoder_config().hidden_size);
        assert_eq!(unet.in_channels, vae.latent_channels);
    }
}
