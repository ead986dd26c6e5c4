//! Small building blocks shared by the models: linear and convolution layers loaded
//! under their checkpoint names, normalisation layers, and activations.
//!
//! `Linear` is our own type (not candle-nn's) so that later features can attach
//! adapters to it without touching the model code.

use std::cell::Cell;

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(false) };
}

/// Whether the current thread builds graphs for backpropagation (see [`enable_grad`]).
pub fn grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Restores the previous gradient mode when dropped.
#[must_use = "gradient mode is restored when the guard is dropped"]
pub struct GradGuard(bool);

impl Drop for GradGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.0));
    }
}

/// Switches this thread to differentiable implementations until the guard drops.
///
/// Candle's fused CPU kernels for softmax and layer norm are faster but record no
/// gradient, so inference uses them and training (inside this guard) uses versions
/// composed of differentiable operations.
pub fn enable_grad() -> GradGuard {
    GradGuard(GRAD_ENABLED.with(|g| g.replace(true)))
}

/// Softmax over the last dimension: fused kernel for inference, differentiable in training.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if grad_enabled() {
        candle_nn::ops::softmax(xs, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(xs)
    }
}

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

/// A 2-D convolution with bias and a square kernel. Inference uses Candle's kernel;
/// training on the CPU uses [`crate::conv::conv2d_im2col`], whose backward pass is
/// much faster than Candle's.
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    geometry: crate::conv::ConvGeometry,
}

/// Loads a [`Conv2d`] (`weight` [out, in, k, k], `bias` [out]).
pub fn conv2d(
    in_c: usize,
    out_c: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = candle_nn::Conv2dConfig { padding, stride, dilation: 1, groups: 1, cudnn_fwd_algo: None };
    Ok(Conv2d {
        inner: candle_nn::conv2d(in_c, out_c, kernel, cfg, vb)?,
        geometry: crate::conv::ConvGeometry { kernel, stride, padding },
    })
}

impl Conv2d {
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if grad_enabled() && xs.device().is_cpu() && xs.dtype() == candle_core::DType::F32 {
            crate::conv::conv2d_im2col(xs, self.inner.weight(), self.inner.bias(), self.geometry)
        } else {
            self.inner.forward(xs)
        }
    }
}

/// GroupNorm with affine weight and bias.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<candle_nn::GroupNorm> {
    candle_nn::group_norm(groups, channels, eps, vb)
}

/// LayerNorm over the last dimension with affine `weight` and `bias`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

/// Loads a [`LayerNorm`] of width `dim`.
pub fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.))?;
    Ok(LayerNorm { weight, bias, eps })
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if !grad_enabled() && xs.is_contiguous() {
            return candle_nn::ops::layer_norm(xs, &self.weight, &self.bias, self.eps as f32);
        }
        let n = xs.dim(D::Minus1)? as f64;
        let centred = xs.broadcast_sub(&(xs.sum_keepdim(D::Minus1)? / n)?)?;
        let var = (centred.sqr()?.sum_keepdim(D::Minus1)? / n)?;
        centred.broadcast_div(&(var + self.eps)?.sqrt()?)?.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
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
