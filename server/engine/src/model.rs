//! Locating and loading a diffusers-layout model folder: which files make up each
//! component, reading their configs, and turning weight-file problems into errors that
//! name the file and what does not fit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// The files of one diffusers pipeline folder.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub root: PathBuf,
    pub unet_config: PathBuf,
    pub unet_weights: PathBuf,
    pub vae_config: PathBuf,
    pub vae_weights: PathBuf,
    pub text_encoder_config: PathBuf,
    pub text_encoder_weights: PathBuf,
    pub tokenizer_dir: PathBuf,
    pub scheduler_config: PathBuf,
}

/// Weight file names diffusers / transformers write, in order of preference.
const WEIGHT_NAMES: &[&str] = &[
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
];

impl ModelFiles {
    /// Finds every component of the pipeline in `root`, or says which one is missing.
    pub fn locate(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::MissingComponent { dir: root.to_path_buf(), what: "the folder itself (it does not exist or is not a folder)".into() });
        }
        let need = |rel: &str| -> Result<PathBuf> {
            let p = root.join(rel);
            if p.exists() {
                Ok(p)
            } else {
                Err(Error::MissingComponent { dir: root.to_path_buf(), what: rel.to_string() })
            }
        };
        let weights = |sub: &str| -> Result<PathBuf> {
            let dir = need(sub)?;
            for name in WEIGHT_NAMES {
                let p = dir.join(name);
                if p.is_file() {
                    return Ok(p);
                }
            }
            let has_bin = dir.join("diffusion_pytorch_model.bin").exists() || dir.join("pytorch_model.bin").exists();
            let what = if has_bin {
                format!("{sub}/*.safetensors (only a PyTorch .bin file is there; convert it to safetensors, e.g. by re-saving with diffusers' save_pretrained(safe_serialization=True))")
            } else {
                format!("{sub}/diffusion_pytorch_model.safetensors or {sub}/model.safetensors")
            };
            Err(Error::MissingComponent { dir: root.to_path_buf(), what })
        };
        need("model_index.json")?;
        Ok(Self {
            root: root.to_path_buf(),
            unet_config: need("unet/config.json")?,
            unet_weights: weights("unet")?,
            vae_config: need("vae/config.json")?,
            vae_weights: weights("vae")?,
            text_encoder_config: need("text_encoder/config.json")?,
            text_encoder_weights: weights("text_encoder")?,
            tokenizer_dir: need("tokenizer")?,
            scheduler_config: need("scheduler/scheduler_config.json")?,
        })
    }
}

/// Reads and parses a JSON config, naming the file on failure.
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config { path: path.to_path_buf(), message: e.to_string() })
}

/// Loads all tensors of a safetensors file onto `device`, with a clear error for
/// truncated or corrupt files.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        message: format!("not a readable safetensors file ({e}); the file may be truncated or corrupt — download it again"),
    })
}

/// Builds a model from a weight file, turning missing or mis-shaped tensors into
/// [`Error::Weights`] naming the file and the tensor.
pub fn build_from_file<T>(
    path: &Path,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<T>,
) -> Result<T> {
    let tensors = load_safetensors(path, device)?;
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    build(vb).map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        message: format!("does not match its config.json: {e}"),
    })
}

/// A1111's short model hash: the first 10 hex digits of the sha256 of a weight file.
pub fn short_hash(path: &Path) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let digest = h.finalize();
    Ok(digest.iter().take(5).map(|b| format!("{b:02x}")).collect())
}
