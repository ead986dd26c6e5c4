//! The blocks a diffusers UNet and VAE are made of: ResNet blocks, down/up samplers,
//! spatial transformers (self- and cross-attention with a GEGLU feed-forward) and the
//! VAE's single-head mid-block attention. Tensor names follow diffusers exactly.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::attention::{multi_head, AttentionKind};
use crate::layers::{conv2d, in_place_ok, Conv2d, group_norm, layer_norm, Activation, GroupNorm, LayerNorm, Linear};

/// `fresh + residual`, written over `fresh` on the CPU in f32 inference. `fresh` must be a
/// tensor just computed and held by nobody else (a layer's output).
fn add_residual(fresh: Tensor, residual: &Tensor) -> Result<Tensor> {
    if in_place_ok(&fresh) && fresh.is_contiguous() && fresh.dims() == residual.dims() {
        crate::cpu::add::add_in_place(&fresh, None, Some(residual))?;
        Ok(fresh)
    } else {
        fresh + residual
    }
}

/// diffusers `ResnetBlock2D` (time-embedding scale-shift "default" only).
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    act: Activation,
    output_scale_factor: f64,
}

/// Shape of a [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub act: Activation,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(c: ResnetConfig, vb: VarBuilder) -> Result<Self> {
        let conv_shortcut = if c.in_channels != c.out_channels {
            Some(conv2d(c.in_channels, c.out_channels, 1, 1, 0, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(c.groups, c.in_channels, c.eps, vb.pp("norm1"))?,
            conv1: conv2d(c.in_channels, c.out_channels, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: match c.temb_channels {
                Some(t) => Some(Linear::new(t, c.out_channels, vb.pp("time_emb_proj"))?),
                None => None,
            },
            norm2: group_norm(c.groups, c.out_channels, c.eps, vb.pp("norm2"))?,
            conv2: conv2d(c.out_channels, c.out_channels, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut,
            act: c.act,
            output_scale_factor: c.output_scale_factor,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_act(xs, self.act)?)?;
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                let t = proj.forward(&self.act.forward(t)?)?;
                let (_, _, hh, ww) = h.dims4()?;
                if in_place_ok(&h) && h.is_contiguous() && t.dims2()? == (h.dim(0)?, h.dim(1)?) {
                    // One value per (sample, channel), repeated over the map.
                    crate::cpu::add::add_in_place(&h, Some((&t, hh * ww)), None)?;
                    h
                } else {
                    h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?
                }
            }
            _ => h,
        };
        let h = self.conv2.forward(&self.norm2.forward_act(&h, self.act)?)?;
        let out = match &self.conv_shortcut {
            Some(c) => add_residual(h, &c.forward(xs)?)?,
            None => add_residual(h, xs)?,
        };
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// Stride-2 3×3 convolution (`downsamplers.0.conv`). With `padding == 0` diffusers pads
/// right/bottom by one first (the VAE encoder does this).
pub struct Downsample2D {
    conv: Conv2d,
    padding: usize,
}

impl Downsample2D {
    pub fn new(channels: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { conv: conv2d(channels, channels, 3, 2, padding, vb.pp("conv"))?, padding })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            let xs = xs.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// Nearest-neighbour 2× upsampling followed by a 3×3 convolution (`upsamplers.0.conv`).
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { conv: conv2d(channels, channels, 3, 1, 1, vb.pp("conv"))? })
    }

    /// Upsamples to `size` (h, w) when given (the UNet passes the skip connection's
    /// size so odd latent sizes line up), else by 2.
    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&xs.upsample_nearest2d(th, tw)?)
    }
}

/// diffusers `Attention` as used inside transformer blocks: bias-free q/k/v, `to_out.0` with bias.
pub struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
}

impl CrossAttention {
    pub fn new(query_dim: usize, context_dim: usize, heads: usize, head_dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::new_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: Linear::new_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: Linear::new_no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: Linear::new(inner, query_dim, vb.pp("to_out.0"))?,
            heads,
            head_dim,
        })
    }

    /// The heads' attention before the output projection: (batch, tokens, heads·head_dim).
    fn attend(&self, xs: &Tensor, context: Option<&Tensor>, attn: AttentionKind) -> Result<Tensor> {
        let ctx = context.unwrap_or(xs);
        let q = self.to_q.forward(xs)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        multi_head(attn, &q, &k, &v, self.heads, None, (self.head_dim as f64).powf(-0.5))
    }

    /// `xs`: (batch, tokens, dim); `context`: (batch, ctx_tokens, ctx_dim), or `None` for self-attention.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>, attn: AttentionKind) -> Result<Tensor> {
        self.to_out.forward(&self.attend(xs, context, attn)?)
    }

    /// [`CrossAttention::forward`] plus `residual`, added in the output projection's pass.
    pub fn forward_residual(&self, xs: &Tensor, context: Option<&Tensor>, attn: AttentionKind, residual: &Tensor) -> Result<Tensor> {
        self.to_out.forward_residual(&self.attend(xs, context, attn)?, residual)
    }
}

/// GEGLU feed-forward: `net.0.proj` → x·GELU(gate) → `net.2`.
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj_in: Linear::new(dim, inner * 2, vb.pp("net.0.proj"))?,
            proj_out: Linear::new(inner, dim, vb.pp("net.2"))?,
        })
    }

    /// `proj_out(GEGLU(proj_in(xs))) + residual`. On the CPU in f32 inference the gate
    /// runs fused ([`crate::cpu::geglu`]) and the residual joins the last projection's pass.
    fn forward_residual(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let gated = match self.proj_in.bias() {
            Some(bias) if in_place_ok(xs) => crate::cpu::geglu::geglu(&self.proj_in.forward_no_bias(xs)?, bias)?,
            _ => {
                let h = self.proj_in.forward(xs)?;
                let half = h.dim(2)? / 2;
                let (x, gate) = (h.narrow(2, 0, half)?, h.narrow(2, half, half)?);
                (x * gate.gelu_erf()?)?
            }
        };
        self.proj_out.forward_residual(&gated, residual)
    }
}

/// diffusers `BasicTransformerBlock`: self-attention, cross-attention, feed-forward.
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(dim: usize, context_dim: usize, heads: usize, head_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: CrossAttention::new(dim, dim, heads, head_dim, vb.pp("attn1"))?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: CrossAttention::new(dim, context_dim, heads, head_dim, vb.pp("attn2"))?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor, attn: AttentionKind) -> Result<Tensor> {
        let xs = self.attn1.forward_residual(&self.norm1.forward(xs)?, None, attn, xs)?;
        let xs = self.attn2.forward_residual(&self.norm2.forward(&xs)?, Some(context), attn, &xs)?;
        self.ff.forward_residual(&self.norm3.forward(&xs)?, &xs)
    }
}

/// Shape of a [`Transformer2D`].
#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub context_dim: usize,
    pub layers: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
}

enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers `Transformer2DModel` for continuous (image) input.
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

impl Transformer2D {
    pub fn new(c: TransformerConfig, vb: VarBuilder) -> Result<Self> {
        let ch = c.channels;
        let head_dim = ch / c.heads;
        let proj = |name: &str| -> Result<Proj> {
            Ok(if c.use_linear_projection {
                Proj::Linear(Linear::new(ch, ch, vb.pp(name))?)
            } else {
                Proj::Conv(conv2d(ch, ch, 1, 1, 0, vb.pp(name))?)
            })
        };
        let blocks = (0..c.layers)
            .map(|i| {
                BasicTransformerBlock::new(ch, c.context_dim, c.heads, head_dim, vb.pp(format!("transformer_blocks.{i}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(c.groups, ch, 1e-6, vb.pp("norm"))?,
            proj_in: proj("proj_in")?,
            blocks,
            proj_out: proj("proj_out")?,
        })
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor, attn: AttentionKind) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let residual = xs;
        let xs = self.norm.forward(xs)?;
        let to_tokens = |x: Tensor| x.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let mut tokens = match &self.proj_in {
            Proj::Conv(conv) => to_tokens(conv.forward(&xs)?)?,
            Proj::Linear(lin) => lin.forward(&to_tokens(xs)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context, attn)?;
        }
        let to_image = |x: Tensor| x.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous();
        let out = match &self.proj_out {
            Proj::Conv(conv) => conv.forward(&to_image(tokens)?)?,
            Proj::Linear(lin) => to_image(lin.forward(&tokens)?)?,
        };
        add_residual(out, residual)
    }
}

/// The VAE mid-block's single-head spatial self-attention (diffusers `Attention` with
/// group norm and residual). Accepts both current (`to_q`…) and legacy (`query`…) names.
pub struct VaeAttention {
    group_norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl VaeAttention {
    pub fn new(channels: usize, heads: usize, groups: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let name = |new: &'static str, old: &'static str| if legacy { old } else { new };
        Ok(Self {
            group_norm: group_norm(groups, channels, eps, vb.pp("group_norm"))?,
            q: Linear::new(channels, channels, vb.pp(name("to_q", "query")))?,
            k: Linear::new(channels, channels, vb.pp(name("to_k", "key")))?,
            v: Linear::new(channels, channels, vb.pp(name("to_v", "value")))?,
            out: Linear::new(channels, channels, vb.pp(name("to_out.0", "proj_attn")))?,
            heads,
        })
    }

    pub fn forward(&self, xs: &Tensor, attn: AttentionKind) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let t = h * w;
        let hs = self.group_norm.forward(xs)?.reshape((b, c, t))?.transpose(1, 2)?;
        let d = c / self.heads;
        let q = self.q.forward(&hs)?;
        let k = self.k.forward(&hs)?;
        let v = self.v.forward(&hs)?;
        let kind = if attn == AttentionKind::Flash { AttentionKind::Original } else { attn };
        let o = self.out.forward(&multi_head(kind, &q, &k, &v, self.heads, None, (d as f64).powf(-0.5))?)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        add_residual(o, xs)
    }
}
