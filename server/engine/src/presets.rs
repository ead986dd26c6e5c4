//! The standard architectures a single-file checkpoint can be recognised as from its keys
//! and tensor shapes alone, and the diffusers config folder each one stands for (what
//! diffusers' `from_single_file` takes from the hub's reference repositories and A1111 from
//! its bundled YAML files): SD 1.x (`runwayml/stable-diffusion-v1-5`), SD 2.x
//! (`stabilityai/stable-diffusion-2-1` for v-prediction at 768 px,
//! `stabilityai/stable-diffusion-2-1-base` for epsilon at 512 px) and SDXL base
//! (`stabilityai/stable-diffusion-xl-base-1.0`).
//!
//! Weights do not say how many attention heads a layer has, which activation the text
//! encoder uses, the VAE's scaling factor or the tokenizer: a checkpoint of a standard
//! architecture gets them from its preset; anything else needs `--config` (a diffusers
//! folder of its architecture). The tokenizer files are the CLIP BPE vocabulary every SD
//! model uses (a copy ships as `models/starter/tokenizer`, compiled in).

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A standard architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// SD 1.x: CLIP ViT-L/14 (768), 512 px, epsilon prediction.
    Sd1,
    /// SD 2.x base: OpenCLIP ViT-H (1024), 512 px, epsilon prediction.
    Sd2Base,
    /// SD 2.x 768-v: OpenCLIP ViT-H, 768 px, v-prediction.
    Sd2V,
    /// SDXL base 1.0: CLIP ViT-L + OpenCLIP bigG (2048), 1024 px, micro-conditioning.
    Sdxl,
}

const VOCAB: &[u8] = include_bytes!("../../../models/starter/tokenizer/vocab.json");
const MERGES: &[u8] = include_bytes!("../../../models/starter/tokenizer/merges.txt");

/// Bumped when a preset's files change, so cached folders of an older version are not reused.
const PRESET_VERSION: u32 = 1;

impl Preset {
    pub fn name(self) -> &'static str {
        match self {
            Preset::Sd1 => "sd1",
            Preset::Sd2Base => "sd2-base",
            Preset::Sd2V => "sd2-v",
            Preset::Sdxl => "sdxl-base",
        }
    }

    /// What people call it.
    pub fn title(self) -> &'static str {
        match self {
            Preset::Sd1 => "SD 1.x",
            Preset::Sd2Base => "SD 2.x (512, epsilon)",
            Preset::Sd2V => "SD 2.x (768, v-prediction)",
            Preset::Sdxl => "SDXL base",
        }
    }

    /// Recognises a single-file checkpoint (original LDM / SGM keys) from its tensor names
    /// and shapes. `yaml` is the text of an A1111-style `NAME.yaml` beside the file, which
    /// decides SD 2.x's prediction type (`parameterization: "v"`); without one an SD 2.x
    /// file is taken as the 768-v model, the common one.
    ///
    /// # Errors
    /// A message naming what the file looks like when it is not one of the standard
    /// architectures (other widths, an inpainting or refiner UNet, missing parts).
    pub fn detect(tensors: &[(&str, Vec<usize>)], yaml: Option<&str>) -> std::result::Result<Self, String> {
        let shape = |name: &str| tensors.iter().find(|(n, _)| *n == name).map(|(_, s)| s.clone());
        let has_prefix = |p: &str| tensors.iter().any(|(n, _)| n.starts_with(p));
        let conv_in = shape("model.diffusion_model.input_blocks.0.0.weight")
            .ok_or("it has no UNet (model.diffusion_model.input_blocks.0.0.weight is missing): a VAE, text encoder or LoRA file alone?")?;
        if conv_in.get(1).is_some_and(|c| *c != 4) {
            return Err(format!(
                "its UNet reads {} latent channels (an inpainting, depth or instruct-pix2pix model; standard text-to-image models read 4)",
                conv_in[1]
            ));
        }
        let width = conv_in.first().copied().unwrap_or(0);
        let context = tensors
            .iter()
            .find(|(n, _)| n.starts_with("model.diffusion_model.") && n.ends_with("attn2.to_k.weight"))
            .and_then(|(_, s)| s.get(1).copied())
            .unwrap_or(0);
        let sdxl_text = has_prefix("conditioner.embedders.0.transformer.") && has_prefix("conditioner.embedders.1.model.");
        let found = match (width, context, sdxl_text) {
            (320, 768, false) if has_prefix("cond_stage_model.transformer.") => Preset::Sd1,
            (320, 1024, false) if has_prefix("cond_stage_model.model.") => {
                let v = match yaml {
                    Some(text) => text.lines().any(|l| {
                        let l = l.trim();
                        l.starts_with("parameterization:") && l.trim_start_matches("parameterization:").trim().trim_matches(['"', '\'']) == "v"
                    }),
                    None => true,
                };
                if v {
                    Preset::Sd2V
                } else {
                    Preset::Sd2Base
                }
            }
            (320, 2048, true) if shape("model.diffusion_model.label_emb.0.0.weight").is_some_and(|s| s.get(1) == Some(&2816)) => Preset::Sdxl,
            (384, 1280, _) => return Err("it is an SDXL refiner (UNet width 384, one OpenCLIP bigG text encoder), which is not supported".into()),
            _ => {
                return Err(format!(
                    "it is not a standard SD 1.x, SD 2.x or SDXL base model (UNet width {width}, cross-attention reads {context}-wide text features{}): pass --config with a diffusers folder of its architecture",
                    if sdxl_text { ", two text encoders" } else { "" }
                ))
            }
        };
        Ok(found)
    }

    /// The preset's config folder under `root` (`root/<name>-v<version>`), written once
    /// (atomically: staged beside it, then renamed) and reused.
    ///
    /// # Errors
    /// I/O errors writing it.
    pub fn config_dir(self, root: &Path) -> Result<PathBuf> {
        let dir = root.join(format!("{}-v{PRESET_VERSION}", self.name()));
        if dir.join("model_index.json").is_file() {
            return Ok(dir);
        }
        std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        let staging = root.join(format!(".{}.partial-{}", self.name(), std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        let written = self.write(&staging).and_then(|()| match std::fs::rename(&staging, &dir) {
            Ok(()) => Ok(()),
            // Another process wrote it meanwhile: theirs is as good.
            Err(_) if dir.join("model_index.json").is_file() => Ok(()),
            Err(e) => Err(Error::io(&dir, e)),
        });
        let _ = std::fs::remove_dir_all(&staging);
        written.map(|()| dir)
    }

    /// Writes the diffusers config files (no weights) into `dir`.
    fn write(self, dir: &Path) -> Result<()> {
        let put = |rel: &str, bytes: &[u8]| -> Result<()> {
            let path = dir.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))
        };
        let sdxl = self == Preset::Sdxl;
        let pipeline = if sdxl { "StableDiffusionXLPipeline" } else { "StableDiffusionPipeline" };
        let mut index = serde_json::json!({
            "_class_name": pipeline,
            "scheduler": ["diffusers", if sdxl { "EulerDiscreteScheduler" } else { "PNDMScheduler" }],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        });
        if sdxl {
            index["text_encoder_2"] = serde_json::json!(["transformers", "CLIPTextModelWithProjection"]);
            index["tokenizer_2"] = serde_json::json!(["transformers", "CLIPTokenizer"]);
            index["force_zeros_for_empty_prompt"] = serde_json::json!(true);
        }
        put("model_index.json", index.to_string().as_bytes())?;
        put("unet/config.json", self.unet_config().as_bytes())?;
        put("vae/config.json", self.vae_config().to_string().as_bytes())?;
        put("scheduler/scheduler_config.json", self.scheduler_config().to_string().as_bytes())?;
        let (te, pad) = match self {
            Preset::Sd1 | Preset::Sdxl => (clip_l(), "<|endoftext|>"),
            Preset::Sd2Base | Preset::Sd2V => (open_clip_h(), "!"),
        };
        put("text_encoder/config.json", te.to_string().as_bytes())?;
        write_tokenizer(dir, "tokenizer", pad, &put)?;
        if sdxl {
            put("text_encoder_2/config.json", open_clip_big_g().to_string().as_bytes())?;
            // SDXL base's tokenizer_2 pads with "!" (an added special token, id 0).
            write_tokenizer(dir, "tokenizer_2", "!", &put)?;
        }
        Ok(())
    }

    fn unet_config(self) -> &'static str {
        match self {
            Preset::Sd1 => {
                r#"{"_class_name":"UNet2DConditionModel","block_out_channels":[320,640,1280,1280],
"down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
"up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"],
"cross_attention_dim":768,"attention_head_dim":8,"layers_per_block":2,"sample_size":64,"in_channels":4,"out_channels":4}"#
            }
            Preset::Sd2Base | Preset::Sd2V => {
                if self == Preset::Sd2V {
                    r#"{"_class_name":"UNet2DConditionModel","block_out_channels":[320,640,1280,1280],
"down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
"up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"],
"cross_attention_dim":1024,"attention_head_dim":[5,10,20,20],"layers_per_block":2,"use_linear_projection":true,
"upcast_attention":true,"sample_size":96,"in_channels":4,"out_channels":4}"#
                } else {
                    r#"{"_class_name":"UNet2DConditionModel","block_out_channels":[320,640,1280,1280],
"down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
"up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"],
"cross_attention_dim":1024,"attention_head_dim":[5,10,20,20],"layers_per_block":2,"use_linear_projection":true,
"sample_size":64,"in_channels":4,"out_channels":4}"#
                }
            }
            Preset::Sdxl => {
                r#"{"_class_name":"UNet2DConditionModel","block_out_channels":[320,640,1280],
"down_block_types":["DownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D"],
"up_block_types":["CrossAttnUpBlock2D","CrossAttnUpBlock2D","UpBlock2D"],
"cross_attention_dim":2048,"attention_head_dim":[5,10,20],"layers_per_block":2,
"transformer_layers_per_block":[1,2,10],"use_linear_projection":true,"sample_size":128,"in_channels":4,"out_channels":4,
"addition_embed_type":"text_time","addition_time_embed_dim":256,"projection_class_embeddings_input_dim":2816}"#
            }
        }
    }

    fn vae_config(self) -> serde_json::Value {
        let (scaling, size) = match self {
            Preset::Sd1 | Preset::Sd2Base => (0.18215, 512),
            Preset::Sd2V => (0.18215, 768),
            Preset::Sdxl => (0.13025, 1024),
        };
        serde_json::json!({
            "_class_name": "AutoencoderKL",
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32, "act_fn": "silu",
            "in_channels": 3, "out_channels": 3, "sample_size": size, "scaling_factor": scaling,
            // SDXL's VAE overflows in fp16: diffusers keeps it in f32 (`force_upcast`).
            "force_upcast": true
        })
    }

    fn scheduler_config(self) -> serde_json::Value {
        let mut c = serde_json::json!({
            "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": false, "skip_prk_steps": true,
            "clip_sample": false, "prediction_type": "epsilon"
        });
        match self {
            Preset::Sd1 | Preset::Sd2Base => {}
            Preset::Sd2V => {
                c["_class_name"] = "DDIMScheduler".into();
                c["prediction_type"] = "v_prediction".into();
            }
            Preset::Sdxl => {
                c["_class_name"] = "EulerDiscreteScheduler".into();
                c["timestep_spacing"] = "leading".into();
                c["interpolation_type"] = "linear".into();
            }
        }
        c
    }
}

/// `openai/clip-vit-large-patch14` as SD 1.x and SDXL's first encoder use it.
fn clip_l() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["CLIPTextModel"], "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
        "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "projection_dim": 768
    })
}

/// OpenCLIP ViT-H/14 as SD 2.x converts it: 23 of its 24 layers (SD 2.x reads the
/// penultimate layer, so the last one is dropped), GELU.
fn open_clip_h() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["CLIPTextModel"], "vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096,
        "num_hidden_layers": 23, "num_attention_heads": 16, "max_position_embeddings": 77,
        "hidden_act": "gelu", "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "projection_dim": 512
    })
}

/// OpenCLIP ViT-bigG/14, SDXL's second encoder, with its text projection.
fn open_clip_big_g() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["CLIPTextModelWithProjection"], "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120,
        "num_hidden_layers": 32, "num_attention_heads": 20, "max_position_embeddings": 77,
        "hidden_act": "gelu", "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "projection_dim": 1280
    })
}

fn write_tokenizer(_dir: &Path, sub: &str, pad: &str, put: &dyn Fn(&str, &[u8]) -> Result<()>) -> Result<()> {
    put(&format!("{sub}/vocab.json"), VOCAB)?;
    put(&format!("{sub}/merges.txt"), MERGES)?;
    let config = serde_json::json!({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad
    });
    put(&format!("{sub}/tokenizer_config.json"), config.to_string().as_bytes())
}

/// Where preset config folders are kept: `~/.cache/atelier/presets`.
pub fn default_root() -> PathBuf {
    dirs::cache_dir().unwrap_or_else(std::env::temp_dir).join("atelier/presets")
}

/// The tensor names and shapes of a safetensors file, read from its header only.
///
/// # Errors
/// A pickle (`.ckpt`), a file that is not safetensors or is truncated, I/O errors.
pub fn header_shapes(file: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    let handle = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
    // SAFETY: read-only map, used while this function runs.
    let map = unsafe { memmap2::Mmap::map(&handle) }.map_err(|e| Error::io(file, e))?;
    crate::single_file::refuse_pickle(file, &map[..map.len().min(8)])?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| Error::Weights {
        path: file.to_path_buf(),
        message: format!("is not a readable safetensors file ({e}); it may be truncated or corrupt — download it again"),
    })?;
    crate::lora::check_container(&map).map_err(|why| Error::Weights { path: file.to_path_buf(), message: why })?;
    Ok(meta.tensors().into_iter().map(|(name, info)| (name, info.shape.clone())).collect())
}

/// A single-file checkpoint as a diffusers folder: with `config` (a diffusers folder of its
/// architecture) as given, else with the preset its keys and shapes show (and a `NAME.yaml`
/// beside it for SD 2.x's prediction type); converted once into `cache`
/// ([`crate::single_file::materialize`]).
///
/// # Errors
/// As [`header_shapes`], [`Preset::detect`] (as [`Error::Weights`] naming the file) and
/// [`crate::single_file::materialize`].
pub fn materialize_checkpoint(file: &Path, config: Option<&Path>, cache: &Path) -> Result<PathBuf> {
    let config = match config {
        Some(c) => c.to_path_buf(),
        None => preset_for(file)?.config_dir(&default_root())?,
    };
    crate::single_file::materialize(file, &config, cache)
}

/// The preset a checkpoint file's keys and shapes (and a `NAME.yaml` beside it) show.
///
/// # Errors
/// As [`header_shapes`]; [`Preset::detect`]'s refusal as [`Error::Weights`] naming the file.
pub fn preset_for(file: &Path) -> Result<Preset> {
    let shapes = header_shapes(file)?;
    let named: Vec<(&str, Vec<usize>)> = shapes.iter().map(|(n, s)| (n.as_str(), s.clone())).collect();
    let yaml = std::fs::read_to_string(file.with_extension("yaml")).ok();
    Preset::detect(&named, yaml.as_deref())
        .map_err(|why| Error::Weights { path: file.to_path_buf(), message: format!("cannot be loaded without --config: {why}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(list: &[(&'static str, &[usize])]) -> Vec<(&'static str, Vec<usize>)> {
        list.iter().map(|(n, s)| (*n, s.to_vec())).collect()
    }

    #[test]
    fn standard_architectures_are_recognised_from_shapes() {
        let sd1 = shapes(&[
            ("model.diffusion_model.input_blocks.0.0.weight", &[320, 4, 3, 3]),
            ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", &[320, 768]),
            ("cond_stage_model.transformer.text_model.final_layer_norm.weight", &[768]),
        ]);
        assert_eq!(Preset::detect(&sd1, None), Ok(Preset::Sd1));
        let sd2 = shapes(&[
            ("model.diffusion_model.input_blocks.0.0.weight", &[320, 4, 3, 3]),
            ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", &[320, 1024]),
            ("cond_stage_model.model.ln_final.weight", &[1024]),
        ]);
        assert_eq!(Preset::detect(&sd2, None), Ok(Preset::Sd2V));
        assert_eq!(Preset::detect(&sd2, Some("model:\n  params:\n    parameterization: \"v\"\n")), Ok(Preset::Sd2V));
        assert_eq!(Preset::detect(&sd2, Some("model:\n  params:\n    linear_start: 0.00085\n")), Ok(Preset::Sd2Base));
        let sdxl = shapes(&[
            ("model.diffusion_model.input_blocks.0.0.weight", &[320, 4, 3, 3]),
            ("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", &[640, 2048]),
            ("model.diffusion_model.label_emb.0.0.weight", &[1280, 2816]),
            ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight", &[768]),
            ("conditioner.embedders.1.model.ln_final.weight", &[1280]),
        ]);
        assert_eq!(Preset::detect(&sdxl, None), Ok(Preset::Sdxl));
    }

    #[test]
    fn other_architectures_are_named() {
        let inpaint = shapes(&[("model.diffusion_model.input_blocks.0.0.weight", &[320, 9, 3, 3])]);
        assert!(Preset::detect(&inpaint, None).unwrap_err().contains("inpainting"));
        let tiny = shapes(&[
            ("model.diffusion_model.input_blocks.0.0.weight", &[32, 4, 3, 3]),
            ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", &[32, 32]),
            ("cond_stage_model.transformer.text_model.final_layer_norm.weight", &[32]),
        ]);
        let e = Preset::detect(&tiny, None).unwrap_err();
        assert!(e.contains("UNet width 32") && e.contains("--config"), "{e}");
        let vae_only = shapes(&[("first_stage_model.decoder.conv_in.weight", &[512, 4, 3, 3])]);
        assert!(Preset::detect(&vae_only, None).unwrap_err().contains("no UNet"));
    }

    /// Every preset folder loads as a diffusers folder's configs and tokenizers do, and the
    /// SDXL one tokenizes "!" as diffusers does with SDXL's files (id 0 in tokenizer_2).
    #[test]
    fn preset_folders_parse() {
        let tmp = tempfile::tempdir().unwrap();
        for p in [Preset::Sd1, Preset::Sd2Base, Preset::Sd2V, Preset::Sdxl] {
            let dir = p.config_dir(tmp.path()).unwrap();
            let unet: crate::unet::UNetConfig = crate::model::read_config(&dir.join("unet/config.json")).unwrap();
            unet.check_supported().unwrap();
            let vae: crate::vae::VaeConfig = crate::model::read_config(&dir.join("vae/config.json")).unwrap();
            assert_eq!(vae.scale_factor(), 8);
            let te: crate::clip::ClipConfig = crate::model::read_config(&dir.join("text_encoder/config.json")).unwrap();
            let te2 = std::fs::read_to_string(dir.join("text_encoder_2/config.json")).ok();
            let width = te.hidden_size
                + te2.map(|t| serde_json::from_str::<crate::clip::ClipConfig>(&t).unwrap().hidden_size).unwrap_or(0);
            assert_eq!(width, unet.cross_attention_dim, "{p:?}");
            crate::scheduler::SchedulerConfig::load(&dir.join("scheduler/scheduler_config.json")).unwrap();
            let tok = crate::tokenizer::ClipTokenizer::from_dir(&dir.join("tokenizer")).unwrap();
            assert_eq!(tok.vocab_size(), 49408);
            if p == Preset::Sdxl {
                assert_eq!(unet.pooled_text_dim(), Some(1280));
                let tok2 = crate::tokenizer::ClipTokenizer::from_dir(&dir.join("tokenizer_2")).unwrap();
                assert_eq!(tok2.pad_id(), 0);
                assert_eq!(tok2.encode_unpadded("wow!!"), vec![tok.encode_unpadded("wow")[0], 0, 0]);
            }
        }
    }
}
