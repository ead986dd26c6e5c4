//! `AutoencoderKL`: encodes images to latents and decodes them back, driven by the
//! diffusers `vae/config.json`. The spatial factor is 2^(blocks−1): 8 for SD, 2 for
//! the tiny test pipeline.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::attention::AttentionKind;
use crate::layers::{conv2d, Conv2d, group_norm, Activation, GroupNorm};
use crate::unet_blocks::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D, VaeAttention};

/// The fields of a diffusers `AutoencoderKL` config.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    /// `DownEncoderBlock2D` per level (empty when the config does not say).
    #[serde(default)]
    pub down_block_types: Vec<String>,
    /// `UpDecoderBlock2D` per level (empty when the config does not say).
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// diffusers' `force_upcast` (default true): in a half-precision pipeline the VAE keeps
    /// f32 weights and runs in f32, as diffusers upcasts it to avoid overflow in decoding.
    #[serde(default = "yes")]
    pub force_upcast: bool,
}

fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn groups() -> usize {
    32
}
fn silu() -> String {
    "silu".into()
}
fn scaling() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

impl VaeConfig {
    /// SD 1.x/2.x VAE (`runwayml/stable-diffusion-v1-5`, `vae/config.json`).
    pub fn sd() -> Self {
        serde_json::from_str(r#"{"block_out_channels":[128,256,512,512],"layers_per_block":2}"#).expect("static config")
    }

    /// Pixels per latent cell along each axis.
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

const VAE_EPS: f64 = 1e-6;

struct Mid {
    resnet0: ResnetBlock2D,
    attention: Option<VaeAttention>,
    resnet1: ResnetBlock2D,
}

impl Mid {
    fn new(c: &VaeConfig, act: Activation, vb: VarBuilder) -> Result<Self> {
        let ch = *c.block_out_channels.last().unwrap_or(&0);
        let rc = ResnetConfig {
            in_channels: ch,
            out_channels: ch,
            temb_channels: None,
            groups: c.norm_num_groups,
            eps: VAE_EPS,
            act,
            output_scale_factor: 1.0,
        };
        Ok(Self {
            resnet0: ResnetBlock2D::new(rc, vb.pp("resnets.0"))?,
            attention: if c.mid_block_add_attention {
                Some(VaeAttention::new(ch, 1, c.norm_num_groups, VAE_EPS, vb.pp("attentions.0"))?)
            } else {
                None
            },
            resnet1: ResnetBlock2D::new(rc, vb.pp("resnets.1"))?,
        })
    }

    fn forward(&self, xs: &Tensor, attn: AttentionKind) -> Result<Tensor> {
        let mut xs = self.resnet0.forward(xs, None)?;
        if let Some(a) = &self.attention {
            xs = a.forward(&xs, attn)?;
        }
        self.resnet1.forward(&xs, None)
    }
}

/// The posterior of an encoded image.
pub struct LatentDist {
    pub mean: Tensor,
    /// Clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
}

impl LatentDist {
    /// Draws `mean + std·ε` with the given standard-normal `noise`.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        let std = (&self.logvar * 0.5)?.exp()?;
        &self.mean + (std * noise)?
    }
}

/// Encoder and decoder with their quantisation convolutions.
pub struct AutoencoderKL {
    config: VaeConfig,
    act: Activation,
    enc_conv_in: Conv2d,
    enc_blocks: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    enc_mid: Mid,
    enc_norm_out: GroupNorm,
    enc_conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    dec_conv_in: Conv2d,
    dec_mid: Mid,
    dec_blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    dec_norm_out: GroupNorm,
    dec_conv_out: Conv2d,
}

impl AutoencoderKL {
    pub fn new(config: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let c = config;
        let act = Activation::from_name(&c.act_fn)
            .ok_or_else(|| candle_core::Error::Msg(format!("unsupported act_fn {}", c.act_fn)))?;
        let boc = &c.block_out_channels;
        if boc.is_empty() {
            candle_core::bail!("block_out_channels is empty");
        }
        let n = boc.len();
        let lat = c.latent_channels;
        let rc = |i: usize, o: usize| ResnetConfig {
            in_channels: i,
            out_channels: o,
            temb_channels: None,
            groups: c.norm_num_groups,
            eps: VAE_EPS,
            act,
            output_scale_factor: 1.0,
        };

        let enc = vb.pp("encoder");
        let enc_conv_in = conv2d(c.in_channels, boc[0], 3, 1, 1, enc.pp("conv_in"))?;
        let mut enc_blocks = Vec::new();
        let mut out_ch = boc[0];
        for i in 0..n {
            let in_ch = out_ch;
            out_ch = boc[i];
            let vbb = enc.pp(format!("down_blocks.{i}"));
            let resnets = (0..c.layers_per_block)
                .map(|j| ResnetBlock2D::new(rc(if j == 0 { in_ch } else { out_ch }, out_ch), vbb.pp(format!("resnets.{j}"))))
                .collect::<Result<Vec<_>>>()?;
            let down = if i + 1 < n { Some(Downsample2D::new(out_ch, 0, vbb.pp("downsamplers.0"))?) } else { None };
            enc_blocks.push((resnets, down));
        }
        let enc_mid = Mid::new(c, act, enc.pp("mid_block"))?;
        let enc_norm_out = group_norm(c.norm_num_groups, boc[n - 1], VAE_EPS, enc.pp("conv_norm_out"))?;
        let enc_conv_out = conv2d(boc[n - 1], 2 * lat, 3, 1, 1, enc.pp("conv_out"))?;

        let quant_conv = if c.use_quant_conv { Some(conv2d(2 * lat, 2 * lat, 1, 1, 0, vb.pp("quant_conv"))?) } else { None };
        let post_quant_conv =
            if c.use_post_quant_conv { Some(conv2d(lat, lat, 1, 1, 0, vb.pp("post_quant_conv"))?) } else { None };

        let dec = vb.pp("decoder");
        let dec_conv_in = conv2d(lat, boc[n - 1], 3, 1, 1, dec.pp("conv_in"))?;
        let dec_mid = Mid::new(c, act, dec.pp("mid_block"))?;
        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let mut dec_blocks = Vec::new();
        let mut out_ch = rev[0];
        for i in 0..n {
            let prev = out_ch;
            out_ch = rev[i];
            let vbb = dec.pp(format!("up_blocks.{i}"));
            let resnets = (0..=c.layers_per_block)
                .map(|j| ResnetBlock2D::new(rc(if j == 0 { prev } else { out_ch }, out_ch), vbb.pp(format!("resnets.{j}"))))
                .collect::<Result<Vec<_>>>()?;
            let up = if i + 1 < n { Some(Upsample2D::new(out_ch, vbb.pp("upsamplers.0"))?) } else { None };
            dec_blocks.push((resnets, up));
        }
        let dec_norm_out = group_norm(c.norm_num_groups, boc[0], VAE_EPS, dec.pp("conv_norm_out"))?;
        let dec_conv_out = conv2d(boc[0], c.out_channels, 3, 1, 1, dec.pp("conv_out"))?;

        Ok(Self {
            config: config.clone(),
            act,
            enc_conv_in,
            enc_blocks,
            enc_mid,
            enc_norm_out,
            enc_conv_out,
            quant_conv,
            post_quant_conv,
            dec_conv_in,
            dec_mid,
            dec_blocks,
            dec_norm_out,
            dec_conv_out,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The device the weights are on.
    pub fn device(&self) -> candle_core::Device {
        self.enc_conv_in.weight().device().clone()
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> candle_core::DType {
        self.enc_conv_in.weight().dtype()
    }

    /// The encoder's activations after each down block's resnets (batch, C, h, w), for
    /// feature statistics such as the style metrics' Gram matrices.
    pub fn encoder_features(&self, xs: &Tensor) -> Result<Vec<Tensor>> {
        let mut xs = self.enc_conv_in.forward(xs)?;
        let mut out = Vec::with_capacity(self.enc_blocks.len());
        for (resnets, down) in &self.enc_blocks {
            for r in resnets {
                xs = r.forward(&xs, None)?;
            }
            out.push(xs.clone());
            if let Some(d) = down {
                xs = d.forward(&xs)?;
            }
        }
        Ok(out)
    }

    /// Encodes images (batch, 3, H, W) in [-1, 1] to the latent distribution (unscaled).
    pub fn encode(&self, xs: &Tensor, attn: AttentionKind) -> Result<LatentDist> {
        let mut xs = self.enc_conv_in.forward(xs)?;
        for (resnets, down) in &self.enc_blocks {
            for r in resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(d) = down {
                xs = d.forward(&xs)?;
            }
        }
        xs = self.enc_mid.forward(&xs, attn)?;
        xs = self.enc_conv_out.forward(&self.enc_norm_out.forward_act(&xs, self.act)?)?;
        if let Some(q) = &self.quant_conv {
            xs = q.forward(&xs)?;
        }
        let lat = self.config.latent_channels;
        let mean = xs.narrow(1, 0, lat)?;
        let logvar = xs.narrow(1, lat, lat)?.clamp(-30f32, 20f32)?;
        Ok(LatentDist { mean, logvar })
    }

    /// Decodes unscaled latents (batch, C, h, w) to images in roughly [-1, 1] (not clamped).
    pub fn decode(&self, z: &Tensor, attn: AttentionKind) -> Result<Tensor> {
        let mut xs = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        xs = self.dec_conv_in.forward(&xs)?;
        xs = self.dec_mid.forward(&xs, attn)?;
        for (resnets, up) in &self.dec_blocks {
            for r in resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(u) = up {
                xs = u.forward(&xs, None)?;
            }
        }
        self.dec_conv_out.forward(&self.dec_norm_out.forward_act(&xs, self.act)?)
    }
}
