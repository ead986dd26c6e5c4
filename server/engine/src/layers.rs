//! Small building blocks shared by the models: linear and convolution layers loaded
//! under their checkpoint names, normalisation layers, and activations.
//!
//! `Linear` is our own type (not candle-nn's) so that later features can attach
//! adapters to it without touching the model code.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// A fully connected layer `y = x Wᵀ + b`, weights named `weight` / `bias`.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
}

impl Linear {
    /// Loads `weight` [out, in] and `bias` [out] from `vb`.
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { inner: candle_nn::linear(in_dim, out_dim, vb)? })
    }

    /// Loads `weight` only.
    pub fn new_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { inner: candle_nn::linear_no_bias(in_dim, out_dim, vb)? })
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.inner.forward(xs)
    }
}

/// A 2-D convolution with bias, square kernel.
pub fn conv2d(
    in_c: usize,
    out_c: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<candle_nn::Conv2d> {
    let cfg = candle_nn::Conv2dConfig { padding, stride, dilation: 1, groups: 1, cudnn_fwd_algo: None };
    candle_nn::conv2d(in_c, out_c, kernel, cfg, vb)
}

/// GroupNorm with affine weight and bias.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<candle_nn::GroupNorm> {
    candle_nn::group_norm(groups, channels, eps, vb)
}

/// LayerNorm with affine weight and bias.
pub fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<candle_nn::LayerNorm> {
    candle_nn::layer_norm(dim, eps, vb)
}

/// The activations found in SD configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// Exact (erf) GELU.
    Gelu,
    /// tanh-approximated GELU.
    GeluTanh,
    /// CLIP's `x·σ(1.702x)`.
    QuickGelu,
}

impl Activation {
    /// Parses a diffusers/transformers activation name.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_tanh" => Activation::GeluTanh,
            "quick_gelu" => Activation::QuickGelu,
            _ => return None,
        })
    }
}

impl Module for Activation {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Silu => candle_nn::ops::silu(xs),
            Activation::Gelu => xs.gelu_erf(),
            Activation::GeluTanh => xs.gelu(),
            Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
        }
    }
}
