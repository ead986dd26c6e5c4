//! `UNet2DConditionModel` for SD 1.x / 2.x, driven by the diffusers `unet/config.json`.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::attention::AttentionKind;
use crate::layers::{conv2d, Conv2d, group_norm, Activation, GroupNorm, Linear};
use crate::unet_blocks::{Downsample2D, ResnetBlock2D, ResnetConfig, Transformer2D, TransformerConfig, Upsample2D};

/// A value given either once for all blocks or per block.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Copy> PerBlock<T> {
    fn get(&self, i: usize) -> T {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Many(v) => v[i.min(v.len() - 1)],
        }
    }
}

/// The fields of a diffusers `UNet2DConditionModel` config that SD 1.x / 2.x use.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "two")]
    pub layers_per_block: usize,
    pub cross_attention_dim: usize,
    /// In SD 1.x/2.x configs this is (misleadingly) the number of heads.
    #[serde(default)]
    pub attention_head_dim: Option<PerBlock<usize>>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub transformer_layers_per_block: Option<PerBlock<usize>>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_act")]
    pub act_fn: String,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "one")]
    pub downsample_padding: usize,
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// `"text_time"` for SDXL: pooled text embeddings and the size/crop micro-conditioning
    /// are embedded and added to the timestep embedding.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of the sinusoidal embedding of each `time_ids` value (SDXL: 256).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of `add_embedding`: pooled text width + 6 × `addition_time_embed_dim`
    /// (SDXL base: 1280 + 6·256 = 2816).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_type: Option<String>,
    #[serde(default)]
    pub only_cross_attention: Option<serde_json::Value>,
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
}

fn four() -> usize {
    4
}
fn two() -> usize {
    2
}
fn one() -> usize {
    1
}
fn one_f() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn default_groups() -> usize {
    32
}
fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "silu".into()
}
fn default_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}

impl UNetConfig {
    /// SD 1.5's UNet (`runwayml/stable-diffusion-v1-5`, `unet/config.json`).
    pub fn v1_5() -> Self {
        let json = r#"{"block_out_channels":[320,640,1280,1280],
            "down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
            "up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"],
            "cross_attention_dim":768,"attention_head_dim":8,"layers_per_block":2,"sample_size":64}"#;
        serde_json::from_str(json).expect("static config")
    }

    /// SD 2.1's UNet (`stabilityai/stable-diffusion-2-1`): per-block head counts, linear projections.
    pub fn v2_1() -> Self {
        let json = r#"{"block_out_channels":[320,640,1280,1280],
            "down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
            "up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"],
            "cross_attention_dim":1024,"attention_head_dim":[5,10,20,20],"layers_per_block":2,
            "use_linear_projection":true,"upcast_attention":true,"sample_size":96}"#;
        serde_json::from_str(json).expect("static config")
    }

    /// Rejects configs for architectures this UNet does not implement, naming the field.
    pub fn check_supported(&self) -> std::result::Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err("block_out_channels, down_block_types and up_block_types must have the same non-zero length".into());
        }
        for t in self.down_block_types.iter().chain(&self.up_block_types) {
            if !matches!(t.as_str(), "DownBlock2D" | "CrossAttnDownBlock2D" | "UpBlock2D" | "CrossAttnUpBlock2D") {
                return Err(format!("block type {t} is not supported (SD 1.x/2.x blocks only)"));
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") | None => {}
            Some(t) => return Err(format!("mid_block_type {t} is not supported")),
        }
        if self.class_embed_type.is_some() {
            return Err("class embeddings (upscalers, unCLIP) are not supported".into());
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") => {
                let (Some(t), Some(p)) = (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim) else {
                    return Err("addition_embed_type text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim".into());
                };
                if p <= 6 * t {
                    return Err(format!("projection_class_embeddings_input_dim {p} leaves no room for the pooled text embeddings beside 6 × {t} time values"));
                }
            }
            Some(t) => return Err(format!("addition_embed_type {t} is not supported (SDXL's text_time is)")),
        }
        if let Some(t) = &self.time_embedding_type {
            if t != "positional" {
                return Err(format!("time_embedding_type {t} is not supported"));
            }
        }
        if let Some(s) = &self.resnet_time_scale_shift {
            if s != "default" {
                return Err(format!("resnet_time_scale_shift {s} is not supported"));
            }
        }
        if Activation::from_name(&self.act_fn).is_none() {
            return Err(format!("act_fn {} is not supported", self.act_fn));
        }
        for c in &self.block_out_channels {
            if c % self.norm_num_groups != 0 {
                return Err(format!("block_out_channels {c} is not divisible by norm_num_groups {}", self.norm_num_groups));
            }
        }
        Ok(())
    }

    /// Heads of block `i` as diffusers resolves them (`num_attention_heads or attention_head_dim`).
    pub fn heads_of(&self, i: usize) -> usize {
        self.heads(i)
    }

    fn heads(&self, i: usize) -> usize {
        self.num_attention_heads
            .as_ref()
            .or(self.attention_head_dim.as_ref())
            .map(|h| h.get(i))
            .unwrap_or(8)
    }

    fn transformer_layers(&self, i: usize) -> usize {
        self.transformer_layers_per_block.as_ref().map(|t| t.get(i)).unwrap_or(1)
    }

    /// Width of the pooled text embedding the SDXL added conditioning expects, `None` for
    /// UNets without it.
    pub fn pooled_text_dim(&self) -> Option<usize> {
        match (self.addition_embed_type.as_deref(), self.addition_time_embed_dim, self.projection_class_embeddings_input_dim) {
            (Some("text_time"), Some(t), Some(p)) => Some(p - 6 * t),
            _ => None,
        }
    }

    /// SDXL base's UNet (`stabilityai/stable-diffusion-xl-base-1.0`, `unet/config.json`).
    pub fn sdxl() -> Self {
        let json = r#"{"block_out_channels":[320,640,1280],
            "down_block_types":["DownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D"],
            "up_block_types":["CrossAttnUpBlock2D","CrossAttnUpBlock2D","UpBlock2D"],
            "cross_attention_dim":2048,"attention_head_dim":[5,10,20],"layers_per_block":2,
            "transformer_layers_per_block":[1,2,10],"use_linear_projection":true,"sample_size":128,
            "addition_embed_type":"text_time","addition_time_embed_dim":256,
            "projection_class_embeddings_input_dim":2816}"#;
        serde_json::from_str(json).expect("static config")
    }
}

/// SDXL's added conditioning for one UNet batch (diffusers `added_cond_kwargs`).
#[derive(Debug, Clone)]
pub struct AddedConditioning {
    /// (batch, pooled_dim): the second text encoder's projected pooled output.
    pub text_embeds: Tensor,
    /// (batch, 6): `[original_h, original_w, crop_top, crop_left, target_h, target_w]` in pixels.
    pub time_ids: Tensor,
}

/// SDXL's micro-conditioning values in pixels (SDXL paper §2.2; diffusers
/// `StableDiffusionXLPipeline._get_add_time_ids`). The default for an image of
/// height × width is `original = target = (height, width)`, crop (0, 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MicroConditioning {
    /// (height, width) the training image had before resizing.
    pub original_size: (f64, f64),
    /// (top, left) of the crop.
    pub crop_top_left: (f64, f64),
    /// (height, width) of the image asked for.
    pub target_size: (f64, f64),
}

impl MicroConditioning {
    pub fn for_size(height: usize, width: usize) -> Self {
        let hw = (height as f64, width as f64);
        Self { original_size: hw, crop_top_left: (0.0, 0.0), target_size: hw }
    }

    /// The six `time_ids` values in diffusers' order.
    pub fn time_ids(&self) -> [f32; 6] {
        let (a, b, c) = (self.original_size, self.crop_top_left, self.target_size);
        [a.0, a.1, b.0, b.1, c.0, c.1].map(|v| v as f32)
    }
}

/// Sinusoidal timestep embedding, as diffusers' `get_timestep_embedding`, in f32.
pub fn timestep_embedding(t: &Tensor, dim: usize, flip_sin_to_cos: bool, shift: f64) -> Result<Tensor> {
    let half = dim / 2;
    let dev = t.device();
    let exponent = (Tensor::arange(0u32, half as u32, dev)?.to_dtype(DType::F32)? * (-(10000f64.ln())))?;
    let exponent = (exponent / (half as f64 - shift))?;
    let freqs = exponent.exp()?;
    let args = t.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs.unsqueeze(0)?)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos { Tensor::cat(&[cos, sin], 1)? } else { Tensor::cat(&[sin, cos], 1)? };
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Downsample2D>,
}

struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Upsample2D>,
}

struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
}

/// The denoising UNet.
pub struct UNet2DConditionModel {
    config: UNetConfig,
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    /// SDXL's `add_embedding` (linear_1, linear_2) and the width of each time value's embedding.
    add_embedding: Option<(Linear, Linear, usize)>,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
}

impl UNet2DConditionModel {
    /// Builds the UNet; `vb` is rooted at the checkpoint's top level (`conv_in.weight`, …).
    pub fn new(config: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        config.check_supported().map_err(candle_core::Error::Msg)?;
        let c = config;
        let act = Activation::from_name(&c.act_fn).unwrap_or(Activation::Silu);
        let boc = &c.block_out_channels;
        let n = boc.len();
        let temb = boc[0] * 4;
        let resnet = |i: usize, o: usize, scale: f64| ResnetConfig {
            in_channels: i,
            out_channels: o,
            temb_channels: Some(temb),
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            act,
            output_scale_factor: scale,
        };
        let transformer = |ch: usize, heads: usize, layers: usize| TransformerConfig {
            channels: ch,
            heads,
            context_dim: c.cross_attention_dim,
            layers,
            groups: c.norm_num_groups,
            use_linear_projection: c.use_linear_projection,
        };

        let conv_in = conv2d(c.in_channels, boc[0], 3, 1, 1, vb.pp("conv_in"))?;
        let time_linear_1 = Linear::new(boc[0], temb, vb.pp("time_embedding.linear_1"))?;
        let time_linear_2 = Linear::new(temb, temb, vb.pp("time_embedding.linear_2"))?;
        let add_embedding = match (c.pooled_text_dim(), c.addition_time_embed_dim, c.projection_class_embeddings_input_dim) {
            (Some(_), Some(t), Some(p)) => Some((
                Linear::new(p, temb, vb.pp("add_embedding.linear_1"))?,
                Linear::new(temb, temb, vb.pp("add_embedding.linear_2"))?,
                t,
            )),
            _ => None,
        };

        let mut down = Vec::with_capacity(n);
        let mut out_ch = boc[0];
        for (i, kind) in c.down_block_types.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = boc[i];
            let vbb = vb.pp(format!("down_blocks.{i}"));
            let cross = kind == "CrossAttnDownBlock2D";
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..c.layers_per_block {
                let rin = if j == 0 { in_ch } else { out_ch };
                resnets.push(ResnetBlock2D::new(resnet(rin, out_ch, 1.0), vbb.pp(format!("resnets.{j}")))?);
                if cross {
                    let t = transformer(out_ch, c.heads(i), c.transformer_layers(i));
                    attentions.push(Transformer2D::new(t, vbb.pp(format!("attentions.{j}")))?);
                }
            }
            let downsampler = if i + 1 < n {
                Some(Downsample2D::new(out_ch, c.downsample_padding, vbb.pp("downsamplers.0"))?)
            } else {
                None
            };
            down.push(DownBlock { resnets, attentions, downsampler });
        }

        let mid_ch = boc[n - 1];
        let vbm = vb.pp("mid_block");
        let mid = MidBlock {
            resnets: vec![
                ResnetBlock2D::new(resnet(mid_ch, mid_ch, c.mid_block_scale_factor), vbm.pp("resnets.0"))?,
                ResnetBlock2D::new(resnet(mid_ch, mid_ch, c.mid_block_scale_factor), vbm.pp("resnets.1"))?,
            ],
            attentions: vec![Transformer2D::new(
                transformer(mid_ch, c.heads(n - 1), c.transformer_layers(n - 1)),
                vbm.pp("attentions.0"),
            )?],
        };

        let mut up = Vec::with_capacity(n);
        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let mut out_ch = rev[0];
        for (i, kind) in c.up_block_types.iter().enumerate() {
            let prev_out = out_ch;
            out_ch = rev[i];
            let in_ch = rev[(i + 1).min(n - 1)];
            let block_idx = n - 1 - i; // per-block settings are listed in down-block order
            let vbb = vb.pp(format!("up_blocks.{i}"));
            let cross = kind == "CrossAttnUpBlock2D";
            let layers = c.layers_per_block + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip = if j == layers - 1 { in_ch } else { out_ch };
                let rin = if j == 0 { prev_out } else { out_ch };
                resnets.push(ResnetBlock2D::new(resnet(rin + skip, out_ch, 1.0), vbb.pp(format!("resnets.{j}")))?);
                if cross {
                    let t = transformer(out_ch, c.heads(block_idx), c.transformer_layers(block_idx));
                    attentions.push(Transformer2D::new(t, vbb.pp(format!("attentions.{j}")))?);
                }
            }
            let upsampler = if i + 1 < n { Some(Upsample2D::new(out_ch, vbb.pp("upsamplers.0"))?) } else { None };
            up.push(UpBlock { resnets, attentions, upsampler });
        }

        Ok(Self {
            config: config.clone(),
            conv_in,
            time_linear_1,
            time_linear_2,
            add_embedding,
            down,
            mid,
            up,
            conv_norm_out: group_norm(c.norm_num_groups, boc[0], c.norm_eps, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(boc[0], c.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
            act,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Predicts noise (or v) for `sample` (batch, C, h, w) at one `timestep` for the
    /// whole batch, conditioned on `context` (batch, tokens, cross_attention_dim).
    pub fn forward(&self, sample: &Tensor, timestep: f64, context: &Tensor, attn: AttentionKind) -> Result<Tensor> {
        let t = Tensor::full(timestep as f32, sample.dim(0)?, sample.device())?;
        self.forward_timesteps(sample, &t, context, attn)
    }

    /// As [`forward`](Self::forward) with one timestep per sample (`timesteps`: (batch,)),
    /// as training needs.
    pub fn forward_timesteps(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor, attn: AttentionKind) -> Result<Tensor> {
        self.forward_added(sample, timesteps, context, None, attn)
    }

    /// Whether [`Self::forward_added`] needs SDXL's [`AddedConditioning`].
    pub fn needs_added_conditioning(&self) -> bool {
        self.add_embedding.is_some()
    }

    /// The timestep embedding (batch, 4·C₀), plus SDXL's added embedding when the UNet
    /// has one: `linear_2(silu(linear_1(cat[text_embeds, sinusoid(time_ids)])))` with each
    /// of the six time values embedded to `addition_time_embed_dim` sinusoids
    /// (diffusers `UNet2DConditionModel.get_aug_embed`, "text_time").
    pub fn time_embedding(&self, timesteps: &Tensor, added: Option<&AddedConditioning>, dtype: DType) -> Result<Tensor> {
        let c = &self.config;
        let emb = timestep_embedding(timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)?.to_dtype(dtype)?;
        let emb = self.time_linear_2.forward(&self.act.forward(&self.time_linear_1.forward(&emb)?)?)?;
        match (&self.add_embedding, added) {
            (None, None) => Ok(emb),
            (Some(_), None) => {
                candle_core::bail!("this UNet (SDXL) needs the pooled text embeddings and size/crop time_ids (added conditioning)")
            }
            (None, Some(_)) => candle_core::bail!("added conditioning (text_embeds, time_ids) given to a UNet without addition embeddings"),
            (Some((l1, l2, dim)), Some(a)) => {
                let b = a.time_ids.dim(0)?;
                let ids = a.time_ids.to_dtype(DType::F32)?.flatten_all()?;
                let time = timestep_embedding(&ids, *dim, c.flip_sin_to_cos, c.freq_shift)?.reshape((b, ()))?;
                let x = Tensor::cat(&[&a.text_embeds.to_dtype(dtype)?, &time.to_dtype(dtype)?], 1)?;
                let aug = l2.forward(&self.act.forward(&l1.forward(&x)?)?)?;
                emb.broadcast_add(&aug)
            }
        }
    }

    /// The full forward with optional SDXL added conditioning (required when
    /// [`Self::needs_added_conditioning`]). `timesteps`: (batch,) or (1,) broadcast.
    pub fn forward_added(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedConditioning>,
        attn: AttentionKind,
    ) -> Result<Tensor> {
        let emb = self.time_embedding(timesteps, added, sample.dtype())?;

        let mut xs = self.conv_in.forward(sample)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down {
            for (j, resnet) in block.resnets.iter().enumerate() {
                xs = resnet.forward(&xs, Some(&emb))?;
                if let Some(a) = block.attentions.get(j) {
                    xs = a.forward(&xs, context, attn)?;
                }
                skips.push(xs.clone());
            }
            if let Some(d) = &block.downsampler {
                xs = d.forward(&xs)?;
                skips.push(xs.clone());
            }
        }

        xs = self.mid.resnets[0].forward(&xs, Some(&emb))?;
        xs = self.mid.attentions[0].forward(&xs, context, attn)?;
        xs = self.mid.resnets[1].forward(&xs, Some(&emb))?;

        for block in &self.up {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| candle_core::Error::Msg("UNet skip stack underflow".into()))?;
                xs = Tensor::cat(&[&xs, &skip], 1)?;
                xs = resnet.forward(&xs, Some(&emb))?;
                if let Some(a) = block.attentions.get(j) {
                    xs = a.forward(&xs, context, attn)?;
                }
            }
            if let Some(u) = &block.upsampler {
                // Upsample to the size of the next skip so odd latent sizes work.
                let size = match skips.last() {
                    Some(s) => {
                        let (_, _, h, w) = s.dims4()?;
                        Some((h, w))
                    }
                    None => None,
                };
                xs = u.forward(&xs, size)?;
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward_act(&xs, self.act)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Odd latent sizes (24×40 and 25×41) go through the UNet and come back the same size,
    /// and the sinusoidal embedding matches hand-computed values.
    #[test]
    fn odd_sizes_and_timestep_embedding() -> Result<()> {
        let cfg: UNetConfig = serde_json::from_str(
            r#"{"block_out_channels":[32,64],"down_block_types":["DownBlock2D","CrossAttnDownBlock2D"],
                "up_block_types":["CrossAttnUpBlock2D","UpBlock2D"],"cross_attention_dim":32,"attention_head_dim":4}"#,
        )
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let dev = Device::Cpu;
        let unet = UNet2DConditionModel::new(&cfg, crate::model::random_var_builder(DType::F32, &dev))?;
        let ctx = Tensor::randn(0f32, 1., (1, 77, 32), &dev)?;
        for (h, w) in [(24, 40), (25, 41)] {
            let x = Tensor::randn(0f32, 1., (1, 4, h, w), &dev)?;
            let y = unet.forward(&x, 500.0, &ctx, AttentionKind::Original)?;
            assert_eq!(y.dims(), &[1, 4, h, w]);
        }
        let emb = timestep_embedding(&Tensor::new(&[2f32], &dev)?, 4, true, 0.0)?.to_vec2::<f32>()?;
        // half = 2: freqs = [1, 10000^-0.5]; flip puts cos first.
        let f1 = 0.01f32;
        let want = [2f32.cos(), (2.0 * f1).cos(), 2f32.sin(), (2.0 * f1).sin()];
        for (a, b) in emb[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        Ok(())
    }
}
