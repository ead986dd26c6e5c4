//! TAESD / TAESDXL, the tiny autoencoders by Ollin Boer Bohan (madebyollin/taesd): their
//! decoder turns latents into an image in a fraction of the VAE's time, so live previews look
//! like the image instead of the 4-colour latent approximation.
//!
//! Architecture (diffusers `DecoderTiny` / the original `taesd.py` `Decoder`): `tanh(x/3)·3`,
//! a 3×3 convolution and ReLU, then per level `Block`s (three 3×3 convolutions with ReLU between,
//! plus a 1×1 skip when the widths differ, ReLU of the sum), a 2× nearest upsampling and a
//! bias-free 3×3 convolution, the last level ending in a 3×3 convolution to RGB with bias. The
//! output is the image in [0, 1] (diffusers rescales it to [-1, 1]).
//!
//! Both weight layouts people have are read: the original `taesd_decoder.safetensors` /
//! `taesdxl_decoder.safetensors` (an `nn.Sequential`: `1.weight`, `3.conv.0.weight`, …, index 0
//! being the parameterless clamp) and diffusers' `AutoencoderTiny` file (`decoder.layers.0.weight`,
//! …; its `encoder.` tensors are ignored). The layer list is read from the keys and shapes, so
//! widths and block counts need no config.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;

use crate::layers::{conv2d, conv2d_no_bias, Conv2d};
use crate::{Error, Result};

enum Layer {
    Conv(Conv2d),
    Relu,
    Upsample,
    Block { convs: [Conv2d; 3], skip: Option<Conv2d> },
}

/// A TAESD decoder.
pub struct TinyDecoder {
    layers: Vec<Layer>,
    path: PathBuf,
}

impl std::fmt::Debug for TinyDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TinyDecoder").field("path", &self.path).field("layers", &self.layers.len()).finish()
    }
}

/// The file names TAESD ships its decoders under (SD 1.x/2.x, SDXL).
pub const SD_FILE: &str = "taesd_decoder.safetensors";
pub const SDXL_FILE: &str = "taesdxl_decoder.safetensors";

impl TinyDecoder {
    /// Reads a decoder file (either layout) onto `device`, in f32.
    ///
    /// # Errors
    /// An unreadable file, or keys that are not a TAESD decoder (named in the message).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let tensors = crate::model::load_safetensors(path, device)?;
        let bad = |message: String| Error::Weights { path: path.to_path_buf(), message };
        // diffusers' layout, else the original Sequential (keys start with a digit).
        let prefix = if tensors.keys().any(|k| k.starts_with("decoder.layers.")) { "decoder.layers." } else { "" };
        let mut by_index: BTreeMap<usize, HashMap<String, Tensor>> = BTreeMap::new();
        for (key, t) in tensors {
            let Some(rest) = key.strip_prefix(prefix) else { continue };
            let Some((i, tail)) = rest.split_once('.') else { continue };
            let Ok(i) = i.parse::<usize>() else {
                if prefix.is_empty() {
                    return Err(bad(format!("is not a TAESD decoder (key {key}; expected taesd_decoder.safetensors or a diffusers AutoencoderTiny file)")));
                }
                continue;
            };
            by_index.entry(i).or_default().insert(tail.to_string(), t);
        }
        let Some(&last) = by_index.keys().next_back() else {
            return Err(bad("holds no TAESD decoder layers (expected keys like 1.weight or decoder.layers.0.weight)".into()));
        };
        let mut layers = Vec::new();
        for i in 0..=last {
            let parts = by_index.remove(&i).unwrap_or_default();
            let what = |e: candle_core::Error| bad(format!("layer {i}: {e}"));
            let layer = if parts.contains_key("conv.0.weight") {
                let vb = VarBuilder::from_tensors(parts, DType::F32, device);
                let conv = |name: &str| -> Result<Conv2d> {
                    let w = vb.get_unchecked_dtype(&format!("{name}.weight"), DType::F32).map_err(what)?;
                    let (o, c, _, _) = w.dims4()?;
                    conv2d(c, o, 3, 1, 1, vb.pp(name)).map_err(what)
                };
                let convs = [conv("conv.0")?, conv("conv.2")?, conv("conv.4")?];
                let skip = match vb.get_unchecked_dtype("skip.weight", DType::F32) {
                    Ok(w) => {
                        let (o, c, _, _) = w.dims4()?;
                        Some(conv2d_no_bias(c, o, 1, 1, 0, vb.pp("skip")).map_err(what)?)
                    }
                    Err(_) => None,
                };
                Layer::Block { convs, skip }
            } else if let Some(w) = parts.get("weight") {
                let (o, c, k, _) = w.dims4().map_err(what)?;
                let has_bias = parts.contains_key("bias");
                let vb = VarBuilder::from_tensors(parts, DType::F32, device);
                Layer::Conv(if has_bias { conv2d(c, o, k, 1, k / 2, vb) } else { conv2d_no_bias(c, o, k, 1, k / 2, vb) }.map_err(what)?)
            } else {
                // A layer without weights: the clamp (first in the original layout), the ReLU
                // after a convolution, the upsampling after a level's blocks.
                match layers.last() {
                    None => continue,
                    Some(Layer::Conv(_)) => Layer::Relu,
                    Some(Layer::Block { .. }) => Layer::Upsample,
                    Some(_) => return Err(bad(format!("layer {i}: two layers without weights in a row is not TAESD's layout"))),
                }
            };
            layers.push(layer);
        }
        if !matches!(layers.last(), Some(Layer::Conv(c)) if c.weight().dim(0)? == 3) {
            return Err(bad("does not end in a convolution to 3 colour channels: not a TAESD decoder".into()));
        }
        Ok(Self { layers, path: path.to_path_buf() })
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Decodes latents (b, 4, h, w), as the denoiser sees them (already multiplied by the VAE's
    /// scaling factor), to images (b, 3, 8h, 8w) in [-1, 1] — diffusers'
    /// `AutoencoderTiny.decode(latents).sample`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let mut x = ((latents.to_dtype(DType::F32)? / 3.0)?.tanh()? * 3.0)?;
        for layer in &self.layers {
            x = match layer {
                Layer::Conv(c) => c.forward(&x)?,
                Layer::Relu => x.relu()?,
                Layer::Upsample => {
                    let (_, _, h, w) = x.dims4()?;
                    x.upsample_nearest2d(2 * h, 2 * w)?
                }
                Layer::Block { convs, skip } => {
                    let y = convs[2].forward(&convs[1].forward(&convs[0].forward(&x)?.relu()?)?.relu()?)?;
                    let s = match skip {
                        Some(s) => s.forward(&x)?,
                        None => x.clone(),
                    };
                    (y + s)?.relu()?
                }
            };
        }
        Ok(((x * 2.0)? - 1.0)?)
    }

    /// A preview of the first latent of a batch as an 8-bit image.
    pub fn preview(&self, latents: &Tensor) -> Result<RgbImage> {
        let decoded = self.decode(&latents.narrow(0, 0, 1)?)?;
        Ok(crate::pipeline::tensor_to_images(&decoded)?.remove(0))
    }

    /// The decoder for a model, when its file is present: `vae_approx/<file>` in the model's
    /// folder or the folder above it (a models folder, as ComfyUI keeps `models/vae_approx`),
    /// `taesdxl_decoder.safetensors` for SDXL and `taesd_decoder.safetensors` otherwise.
    /// A file that is there but unreadable is an error (a broken download should be told).
    pub fn find(model_dir: &Path, sdxl: bool, device: &Device) -> Result<Option<Self>> {
        let name = if sdxl { SDXL_FILE } else { SD_FILE };
        let mut places = vec![model_dir.join("vae_approx").join(name)];
        if let Some(parent) = model_dir.parent() {
            places.push(parent.join("vae_approx").join(name));
        }
        match places.into_iter().find(|p| p.is_file()) {
            Some(p) => Self::load(&p, device).map(Some),
            None => Ok(None),
        }
    }
}
