//! The VAE of a Stable Diffusion model as the two Core ML programs Apple's
//! `ml-stable-diffusion` Swift package loads: `VAEDecoder` (latents → image) and `VAEEncoder`
//! (image → latent distribution, for image-to-image).
//!
//! The math mirrors the engine's [`crate::vae::AutoencoderKL`] (diffusers `AutoencoderKL`:
//! `DownEncoderBlock2D` / `UpDecoderBlock2D` levels of ResNet blocks, a mid block with or
//! without single-head self-attention, group norms with ε = 1e-6, optional `quant_conv` /
//! `post_quant_conv`).
//!
//! Inputs and outputs are the ones Apple's converter writes and its Swift code reads
//! (apple/ml-stable-diffusion, `python_coreml_stable_diffusion/torch2coreml.py`
//! `convert_vae_decoder` / `convert_vae_encoder`, and `swift/StableDiffusion/pipeline/`
//! `Decoder.swift` / `Encoder.swift`, checked at commit e12202c):
//! - **VAEDecoder**: input `z` `(1, latent_channels, h, w)` float32, already divided by the
//!   scaling factor (`Decoder.decode` maps every latent to `x / scaleFactor + shiftFactor`
//!   before the prediction); output `image` `(1, 3, 8h, 8w)` float32 in about [-1, 1], not
//!   clamped (the Swift side maps it to [0, 1] and clips while converting to 8-bit pixels).
//!   The program is `decoder(post_quant_conv(z))`, as the converter's `VAEDecoder` wrapper.
//! - **VAEEncoder**: input `x` `(1, 3, 8h, 8w)` float32, RGB in [-1, 1]; output `latent`
//!   `(1, 8, h, w)` float32: the raw moments `quant_conv(encoder(x))`, mean on channels 0–3
//!   and log-variance on channels 4–7, neither clamped nor scaled. `Encoder.encode` clamps the
//!   log-variance to [-30, 20], samples `mean + exp(logvar / 2)·ε` with its own random source
//!   and multiplies by the scaling factor.
//!
//! The Swift pipeline's scaling factors default to SD's 0.18215
//! (`StableDiffusionPipeline.Configuration.encoderScaleFactor` / `decoderScaleFactor`): a
//! model with another `scaling_factor` needs the app to set both. Apple converts SD 1.x VAEs
//! with float16 inputs; float32 inputs are equally accepted by the Swift code (it hands Core ML
//! float32 arrays either way) and keep the inputs exact.

use std::io::{Seek, Write};

use candle_core::Tensor;

use super::mil::{Dt, FnBuilder, Var};
use super::Weights;
use crate::error::{Error, Result};
use crate::layers::Activation;
use crate::vae::VaeConfig;

/// The decoder's input name (Apple's `VAEDecoder`).
pub const DECODER_INPUT: &str = "z";
/// The decoder's output name.
pub const DECODER_OUTPUT: &str = "image";
/// The encoder's input name (Apple's `VAEEncoder`).
pub const ENCODER_INPUT: &str = "x";
/// The encoder's output name.
pub const ENCODER_OUTPUT: &str = "latent";

/// Descriptions of the inputs and outputs, for [`super::mil::model_spec`].
pub const DESCRIPTIONS: [(&str, &str); 4] = [
    (DECODER_INPUT, "Denoised latents divided by the VAE scaling factor, (1, C, h, w)"),
    (DECODER_OUTPUT, "Decoded image, (1, 3, H, W), RGB in about [-1, 1] (not clamped)"),
    (ENCODER_INPUT, "Input image, (1, 3, H, W), RGB normalized to [-1, 1]"),
    (ENCODER_OUTPUT, "Latent distribution moments, (1, 2C, h, w): mean, then log-variance (unclamped, unscaled)"),
];

/// diffusers' `AutoencoderKL` norm epsilon (as the engine).
const EPS: f32 = 1e-6;
/// Apple's `Encoder.swift` reads mean and log-variance as channels 0..<4 and 4..<8.
const SWIFT_LATENT_CHANNELS: usize = 4;

/// Sizes of an export, in latent cells (the image is `scale_factor` times larger: 8 for SD).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaeExport {
    pub height: usize,
    pub width: usize,
}

impl VaeExport {
    /// The latent size of images of `width` × `height` pixels.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when a side is zero or not a multiple of the VAE's scale factor
    /// (8 for SD).
    pub fn from_image(cfg: &VaeConfig, width: usize, height: usize) -> Result<Self> {
        let f = scale_factor(cfg)?;
        if width == 0 || height == 0 || width % f != 0 || height % f != 0 {
            return Err(Error::invalid("size", format!("image size {width}×{height} must be a positive multiple of {f} (the VAE's scale factor)")));
        }
        Ok(Self { height: height / f, width: width / f })
    }

    /// The image size `(height, width)` in pixels.
    pub fn image_size(&self, cfg: &VaeConfig) -> (usize, usize) {
        let f = 1 << cfg.block_out_channels.len().saturating_sub(1);
        (self.height * f, self.width * f)
    }
}

fn scale_factor(cfg: &VaeConfig) -> Result<usize> {
    if cfg.block_out_channels.is_empty() {
        return Err(Error::invalid("model", "the VAE config has no block_out_channels"));
    }
    Ok(cfg.scale_factor())
}

/// Which half of the autoencoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Encoder,
    Decoder,
}

/// The MIL form of the config's activation.
#[derive(Debug, Clone, Copy)]
enum Act {
    Silu,
    Gelu(&'static str),
}

fn activation(cfg: &VaeConfig) -> Result<Act> {
    Ok(match Activation::from_name(&cfg.act_fn) {
        Some(Activation::Silu) => Act::Silu,
        Some(Activation::Gelu) => Act::Gelu("EXACT"),
        Some(Activation::GeluTanh) => Act::Gelu("TANH_APPROXIMATION"),
        Some(Activation::QuickGelu) => Act::Gelu("SIGMOID_APPROXIMATION"),
        None => return Err(Error::invalid("model", format!("the VAE's act_fn {:?} cannot be exported", cfg.act_fn))),
    })
}

/// Checks what the exporter can express, before anything is built: the config (block types,
/// channel counts divisible by the norm groups, RGB images, the Swift encoder's 4 latent
/// channels), the sizes, and every tensor `part` reads (present, with the expected shape).
/// Returns the tensors by key with their shapes, in build order.
fn check(part: Part, cfg: &VaeConfig, w: &Weights, opts: &VaeExport) -> Result<Vec<(String, Vec<usize>)>> {
    scale_factor(cfg)?;
    activation(cfg)?;
    let n = cfg.block_out_channels.len();
    if opts.height == 0 || opts.width == 0 {
        return Err(Error::invalid("size", format!("latent size {}×{} must be positive", opts.width, opts.height)));
    }
    let (types, expected) = match part {
        Part::Encoder => (&cfg.down_block_types, "DownEncoderBlock2D"),
        Part::Decoder => (&cfg.up_block_types, "UpDecoderBlock2D"),
    };
    if !types.is_empty() && types.len() != n {
        return Err(Error::invalid("model", format!("the VAE config lists {} block types for {n} levels", types.len())));
    }
    if let Some(t) = types.iter().find(|t| *t != expected) {
        return Err(Error::invalid("model", format!("VAE block type {t} cannot be exported (only {expected})")));
    }
    let g = cfg.norm_num_groups;
    if g == 0 || cfg.block_out_channels.iter().any(|&c| c == 0 || c % g != 0) {
        return Err(Error::invalid("model", format!("VAE channels {:?} are not all positive multiples of norm_num_groups {g}", cfg.block_out_channels)));
    }
    if cfg.latent_channels == 0 || cfg.layers_per_block == 0 {
        return Err(Error::invalid("model", "the VAE config has no latent channels or no layers per block"));
    }
    match part {
        Part::Encoder => {
            if cfg.in_channels != 3 {
                return Err(Error::invalid("model", format!("the VAE encoder takes {} channels; Apple's Encoder.swift feeds RGB (3)", cfg.in_channels)));
            }
            if cfg.latent_channels != SWIFT_LATENT_CHANNELS {
                return Err(Error::invalid("model", format!("the VAE has {} latent channels; Apple's Encoder.swift reads exactly 4", cfg.latent_channels)));
            }
            if cfg.shift_factor.is_some_and(|s| s != 0.0) {
                return Err(Error::invalid("model", "the VAE has a shift_factor, which Apple's Encoder.swift does not apply"));
            }
        }
        Part::Decoder => {
            if cfg.out_channels != 3 {
                return Err(Error::invalid("model", format!("the VAE decoder makes {} channels; Apple's Decoder.swift reads RGB (3)", cfg.out_channels)));
            }
        }
    }
    let mut keys = Keys { w, list: Vec::new() };
    walk(part, cfg, &mut keys);
    for (key, dims) in &keys.list {
        w.get(key, Some(dims))?;
    }
    Ok(keys.list)
}

/// Collects the tensors a part reads, in the order the builder reads them.
struct Keys<'a> {
    w: &'a Weights,
    list: Vec<(String, Vec<usize>)>,
}

impl Keys<'_> {
    fn add(&mut self, key: String, dims: &[usize]) {
        self.list.push((key, dims.to_vec()));
    }
    fn conv(&mut self, prefix: &str, cout: usize, cin: usize, k: usize) {
        self.add(format!("{prefix}.weight"), &[cout, cin, k, k]);
        self.add(format!("{prefix}.bias"), &[cout]);
    }
    fn norm(&mut self, prefix: &str, c: usize) {
        self.add(format!("{prefix}.weight"), &[c]);
        self.add(format!("{prefix}.bias"), &[c]);
    }
    fn resnet(&mut self, prefix: &str, cin: usize, cout: usize) {
        self.norm(&format!("{prefix}.norm1"), cin);
        self.conv(&format!("{prefix}.conv1"), cout, cin, 3);
        self.norm(&format!("{prefix}.norm2"), cout);
        self.conv(&format!("{prefix}.conv2"), cout, cout, 3);
        if cin != cout {
            self.conv(&format!("{prefix}.conv_shortcut"), cout, cin, 1);
        }
    }
    fn attention(&mut self, prefix: &str, c: usize) {
        self.norm(&format!("{prefix}.group_norm"), c);
        for name in attention_names(self.w, prefix) {
            self.add(format!("{prefix}.{name}.weight"), &[c, c]);
            self.add(format!("{prefix}.{name}.bias"), &[c]);
        }
    }
    fn mid(&mut self, prefix: &str, cfg: &VaeConfig, c: usize) {
        self.resnet(&format!("{prefix}.resnets.0"), c, c);
        if cfg.mid_block_add_attention {
            self.attention(&format!("{prefix}.attentions.0"), c);
        }
        self.resnet(&format!("{prefix}.resnets.1"), c, c);
    }
}

/// q, k, v and output projection names: diffusers' current ones, or the legacy
/// `query`/`key`/`value`/`proj_attn` of older checkpoints (as the engine accepts).
fn attention_names(w: &Weights, prefix: &str) -> [&'static str; 4] {
    if !w.contains(&format!("{prefix}.to_q.weight")) && w.contains(&format!("{prefix}.query.weight")) {
        ["query", "key", "value", "proj_attn"]
    } else {
        ["to_q", "to_k", "to_v", "to_out.0"]
    }
}

/// Lists the tensors of `part` with their shapes (the layout the builder follows).
fn walk(part: Part, cfg: &VaeConfig, k: &mut Keys) {
    let boc = &cfg.block_out_channels;
    let n = boc.len();
    let lat = cfg.latent_channels;
    match part {
        Part::Encoder => {
            k.conv("encoder.conv_in", boc[0], cfg.in_channels, 3);
            let mut out = boc[0];
            for (i, &c) in boc.iter().enumerate() {
                let cin = out;
                out = c;
                for j in 0..cfg.layers_per_block {
                    k.resnet(&format!("encoder.down_blocks.{i}.resnets.{j}"), if j == 0 { cin } else { out }, out);
                }
                if i + 1 < n {
                    k.conv(&format!("encoder.down_blocks.{i}.downsamplers.0.conv"), out, out, 3);
                }
            }
            k.mid("encoder.mid_block", cfg, boc[n - 1]);
            k.norm("encoder.conv_norm_out", boc[n - 1]);
            k.conv("encoder.conv_out", 2 * lat, boc[n - 1], 3);
            if cfg.use_quant_conv {
                k.conv("quant_conv", 2 * lat, 2 * lat, 1);
            }
        }
        Part::Decoder => {
            if cfg.use_post_quant_conv {
                k.conv("post_quant_conv", lat, lat, 1);
            }
            k.conv("decoder.conv_in", boc[n - 1], lat, 3);
            k.mid("decoder.mid_block", cfg, boc[n - 1]);
            let mut out = boc[n - 1];
            for (i, &c) in boc.iter().rev().enumerate() {
                let prev = out;
                out = c;
                for j in 0..=cfg.layers_per_block {
                    k.resnet(&format!("decoder.up_blocks.{i}.resnets.{j}"), if j == 0 { prev } else { out }, out);
                }
                if i + 1 < n {
                    k.conv(&format!("decoder.up_blocks.{i}.upsamplers.0.conv"), out, out, 3);
                }
            }
            k.norm("decoder.conv_norm_out", boc[0]);
            k.conv("decoder.conv_out", cfg.out_channels, boc[0], 3);
        }
    }
}

/// Emits the layers; every tensor was checked by [`check`].
struct Emit<'a, 'f, 'w, W: Write + Seek> {
    f: &'f mut FnBuilder<'w, W>,
    w: &'a Weights,
    cfg: &'a VaeConfig,
    act: Act,
}

impl<'a, W: Write + Seek> Emit<'a, '_, '_, W> {
    fn t(&self, key: &str) -> Result<&'a Tensor> {
        self.w.get(key, None)
    }

    /// A `k`×`k` convolution with bias; `pad` is `[top, bottom, left, right]`.
    fn conv(&mut self, x: &Var, prefix: &str, stride: usize, pad: [usize; 4]) -> Result<Var> {
        let (weight, bias) = (self.t(&format!("{prefix}.weight"))?, self.t(&format!("{prefix}.bias"))?);
        let hint = prefix.replace('.', "_");
        let wv = self.f.weight(&format!("{hint}_weight"), weight)?;
        let bv = self.f.param(&format!("{hint}_bias"), bias)?;
        self.f.conv(x, &wv, Some(&bv), [stride, stride], pad, 1)
    }

    fn conv3(&mut self, x: &Var, prefix: &str) -> Result<Var> {
        self.conv(x, prefix, 1, [1, 1, 1, 1])
    }

    fn conv1(&mut self, x: &Var, prefix: &str) -> Result<Var> {
        self.conv(x, prefix, 1, [0, 0, 0, 0])
    }

    fn norm(&mut self, x: &Var, prefix: &str) -> Result<Var> {
        let (gamma, beta) = (self.t(&format!("{prefix}.weight"))?, self.t(&format!("{prefix}.bias"))?);
        self.f.group_norm(x, self.cfg.norm_num_groups, gamma, beta, EPS)
    }

    fn act(&mut self, x: &Var) -> Var {
        match self.act {
            Act::Silu => self.f.silu(x),
            Act::Gelu(mode) => self.f.gelu(x, mode),
        }
    }

    fn norm_act(&mut self, x: &Var, prefix: &str) -> Result<Var> {
        let h = self.norm(x, prefix)?;
        Ok(self.act(&h))
    }

    /// `ResnetBlock2D` without a time embedding: `shortcut(x) + conv2(act(norm2(conv1(act(norm1(x))))))`.
    fn resnet(&mut self, x: &Var, prefix: &str) -> Result<Var> {
        let h = self.norm_act(x, &format!("{prefix}.norm1"))?;
        let h = self.conv3(&h, &format!("{prefix}.conv1"))?;
        let h = self.norm_act(&h, &format!("{prefix}.norm2"))?;
        let h = self.conv3(&h, &format!("{prefix}.conv2"))?;
        // As diffusers: a 1×1 shortcut convolution only where the channel count changes.
        let shortcut = if x.shape[1] != h.shape[1] {
            self.conv1(x, &format!("{prefix}.conv_shortcut"))?
        } else {
            x.clone()
        };
        self.f.add(&shortcut, &h)
    }

    /// The mid block's single-head self-attention over the `h·w` positions, residual added.
    /// The projections are 1×1 convolutions in the `(B, C, h, w)` layout (the same math as
    /// diffusers' linear layers on `(B, h·w, C)`, without transposes).
    fn attention(&mut self, x: &Var, prefix: &str) -> Result<Var> {
        let (b, c, h, w) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
        let t = h * w;
        let [q_name, k_name, v_name, out_name] = attention_names(self.w, prefix);
        let hs = self.norm(x, &format!("{prefix}.group_norm"))?;
        let project = |e: &mut Self, input: &Var, name: &str| -> Result<Var> {
            let key = format!("{prefix}.{name}");
            let weight = e.t(&format!("{key}.weight"))?.reshape((c, c, 1, 1))?;
            let bias = e.t(&format!("{key}.bias"))?;
            let hint = key.replace('.', "_");
            let wv = e.f.weight(&format!("{hint}_weight"), &weight)?;
            let bv = e.f.param(&format!("{hint}_bias"), bias)?;
            e.f.conv(input, &wv, Some(&bv), [1, 1], [0, 0, 0, 0], 1)
        };
        let q = project(self, &hs, q_name)?;
        let k = project(self, &hs, k_name)?;
        let v = project(self, &hs, v_name)?;
        let q = self.f.reshape(&q, &[b, c, t])?;
        let k = self.f.reshape(&k, &[b, c, t])?;
        let v = self.f.reshape(&v, &[b, c, t])?;
        // One head of dimension C: scores = (q·C^-1/2)ᵀ k, (B, T, T), softmax over keys.
        let q = self.f.mul_scalar(&q, (c as f32).powf(-0.5))?;
        let scores = self.f.matmul(&q, &k, true, false)?;
        let probs = self.f.softmax(&scores, -1);
        // o[c, i] = Σ_j v[c, j] p[i, j]: (B, C, T).
        let o = self.f.matmul(&v, &probs, false, true)?;
        let o = self.f.reshape(&o, &[b, c, h, w])?;
        let o = project(self, &o, out_name)?;
        self.f.add(&o, x)
    }

    fn mid(&mut self, x: &Var, prefix: &str) -> Result<Var> {
        let mut x = self.resnet(x, &format!("{prefix}.resnets.0"))?;
        if self.cfg.mid_block_add_attention {
            x = self.attention(&x, &format!("{prefix}.attentions.0"))?;
        }
        self.resnet(&x, &format!("{prefix}.resnets.1"))
    }

    fn encoder(&mut self, x: &Var) -> Result<Var> {
        let cfg = self.cfg;
        let n = cfg.block_out_channels.len();
        let mut x = self.conv3(x, "encoder.conv_in")?;
        for i in 0..n {
            for j in 0..cfg.layers_per_block {
                x = self.resnet(&x, &format!("encoder.down_blocks.{i}.resnets.{j}"))?;
            }
            if i + 1 < n {
                // diffusers' Downsample2D with padding 0: pad right and bottom by one, then a
                // stride-2 3×3 convolution.
                x = self.conv(&x, &format!("encoder.down_blocks.{i}.downsamplers.0.conv"), 2, [0, 1, 0, 1])?;
            }
        }
        x = self.mid(&x, "encoder.mid_block")?;
        x = self.norm_act(&x, "encoder.conv_norm_out")?;
        x = self.conv3(&x, "encoder.conv_out")?;
        if cfg.use_quant_conv {
            x = self.conv1(&x, "quant_conv")?;
        }
        Ok(x)
    }

    fn decoder(&mut self, z: &Var) -> Result<Var> {
        let cfg = self.cfg;
        let n = cfg.block_out_channels.len();
        let mut x = z.clone();
        if cfg.use_post_quant_conv {
            x = self.conv1(&x, "post_quant_conv")?;
        }
        x = self.conv3(&x, "decoder.conv_in")?;
        x = self.mid(&x, "decoder.mid_block")?;
        for i in 0..n {
            for j in 0..=cfg.layers_per_block {
                x = self.resnet(&x, &format!("decoder.up_blocks.{i}.resnets.{j}"))?;
            }
            if i + 1 < n {
                x = self.f.upsample_nearest(&x, 2);
                x = self.conv3(&x, &format!("decoder.up_blocks.{i}.upsamplers.0.conv"))?;
            }
        }
        x = self.norm_act(&x, "decoder.conv_norm_out")?;
        self.conv3(&x, "decoder.conv_out")
    }
}

/// Builds Apple's `VAEDecoder` into `f`: input `z` `(1, latent_channels, h, w)` float32
/// (latents already divided by the scaling factor), output `image` `(1, 3, 8h, 8w)` float32
/// in about [-1, 1], unclamped; computed in `f.precision` (cast after the input and before
/// the output). The numbers are the engine's `AutoencoderKL::decode`.
///
/// # Errors
/// [`Error::InvalidInput`] for a config or size the exporter cannot express, and
/// [`Error::Weights`] for a missing tensor or one of the wrong shape, both before any op or
/// weight is written; then the weight file's I/O error.
pub fn build_decoder<W: Write + Seek>(f: &mut FnBuilder<W>, cfg: &VaeConfig, w: &Weights, opts: &VaeExport) -> Result<()> {
    check(Part::Decoder, cfg, w, opts)?;
    let act = activation(cfg)?;
    let z = f.input(DECODER_INPUT, Dt::F32, &[1, cfg.latent_channels, opts.height, opts.width]);
    let precision = f.precision;
    let x = f.cast(&z, precision);
    let mut e = Emit { f, w, cfg, act };
    let image = e.decoder(&x)?;
    let image = e.f.cast(&image, Dt::F32);
    e.f.output(&image, DECODER_OUTPUT)?;
    Ok(())
}

/// Builds Apple's `VAEEncoder` into `f`: input `x` `(1, 3, 8h, 8w)` float32, RGB in [-1, 1];
/// output `latent` `(1, 8, h, w)` float32, the moments `quant_conv(encoder(x))` (mean on
/// channels 0–3, log-variance on 4–7, neither clamped nor scaled: Apple's `Encoder.swift`
/// clamps, samples and scales). Computed in `f.precision`. The mean and the clamped
/// log-variance are the engine's `AutoencoderKL::encode`.
///
/// # Errors
/// As [`build_decoder`]; also refused: a VAE whose latents do not have the 4 channels the Swift
/// encoder reads, one with a `shift_factor`, or one not taking RGB.
pub fn build_encoder<W: Write + Seek>(f: &mut FnBuilder<W>, cfg: &VaeConfig, w: &Weights, opts: &VaeExport) -> Result<()> {
    check(Part::Encoder, cfg, w, opts)?;
    let act = activation(cfg)?;
    let (height, width) = opts.image_size(cfg);
    let x = f.input(ENCODER_INPUT, Dt::F32, &[1, cfg.in_channels, height, width]);
    let precision = f.precision;
    let xc = f.cast(&x, precision);
    let mut e = Emit { f, w, cfg, act };
    let moments = e.encoder(&xc)?;
    let moments = e.f.cast(&moments, Dt::F32);
    e.f.output(&moments, ENCODER_OUTPUT)?;
    Ok(())
}

/// The tensor keys the decoder (`encoder == false`) or encoder reads, with their shapes,
/// after checking them as the builders do (for reports and tests).
///
/// # Errors
/// As [`build_decoder`] / [`build_encoder`].
pub fn tensors(encoder: bool, cfg: &VaeConfig, w: &Weights, opts: &VaeExport) -> Result<Vec<(String, Vec<usize>)>> {
    check(if encoder { Part::Encoder } else { Part::Decoder }, cfg, w, opts)
}
