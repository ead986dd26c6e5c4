//! Core ML export (issue 16), written in Rust on any OS: the weight file of an ML Program
//! package ([`blob`]), the package folder with its manifest ([`package`]), weight
//! compression ([`compress`]), the MIL program builder ([`mil`]) and the exporters of the
//! Stable Diffusion components.

pub mod blob;
pub mod compress;
pub mod export;
pub mod mil;
pub mod package;
pub mod text_encoder;
pub mod unet;
pub mod vae;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// How attention is laid out in the exported UNet, as Apple's `ml-stable-diffusion` defines
/// it (`python_coreml_stable_diffusion/attention.py`): both keep activations in the
/// `(B, C, 1, S)` layout; `Original` reshapes q/k/v to `(B, heads, dim_head, S)` for two
/// batched matmuls (best on the GPU), `SplitEinsum` runs one small matmul → softmax →
/// matmul chain per head and concatenates the heads on channels (the Neural Engine recipe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attention {
    Original,
    SplitEinsum,
}

impl Attention {
    pub fn id(self) -> &'static str {
        match self {
            Attention::Original => "original",
            Attention::SplitEinsum => "split-einsum",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "original" => Some(Attention::Original),
            "split-einsum" => Some(Attention::SplitEinsum),
            _ => None,
        }
    }
}

/// A component's weights by diffusers key (`down_blocks.0.resnets.0.conv1.weight`), as
/// loaded from its safetensors file (with any style already merged in).
pub struct Weights {
    map: HashMap<String, Tensor>,
    source: PathBuf,
}

impl Weights {
    /// Loads a safetensors file onto the CPU.
    ///
    /// # Errors
    /// The file's I/O or format error.
    pub fn load(path: &Path) -> Result<Self> {
        Ok(Self { map: crate::model::load_safetensors(path, &Device::Cpu)?, source: path.to_path_buf() })
    }

    /// Wraps tensors already in memory; `source` names them in errors.
    pub fn from_map(map: HashMap<String, Tensor>, source: impl Into<PathBuf>) -> Self {
        Self { map, source: source.into() }
    }

    /// The tensor under `key`, checked to have `dims` when given.
    ///
    /// # Errors
    /// [`Error::Weights`] naming the file and the missing key or the shapes.
    pub fn get(&self, key: &str, dims: Option<&[usize]>) -> Result<&Tensor> {
        let t = self.map.get(key).ok_or_else(|| Error::Weights { path: self.source.clone(), message: format!("has no tensor {key}") })?;
        if let Some(d) = dims {
            if t.dims() != d {
                return Err(Error::Weights { path: self.source.clone(), message: format!("{key} has shape {:?}, expected {d:?}", t.dims()) });
            }
        }
        Ok(t)
    }

    /// A copy of the tensor map (tensors are shared, not copied).
    pub fn map_clone(&self) -> HashMap<String, Tensor> {
        self.map.clone()
    }

    pub fn contains(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// Replaces or adds a tensor (a merged style's weight).
    pub fn insert(&mut self, key: String, t: Tensor) {
        self.map.insert(key, t);
    }

    pub fn source(&self) -> &Path {
        &self.source
    }
}
