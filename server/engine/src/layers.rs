//! Small building blocks shared by the models: linear and convolution layers loaded
//! under their checkpoint names, normalisation layers, and activations.
//!
//! `Linear` and `Conv2d` are our own types (not candle-nn's): each carries a
//! [`LoraSlot`] where adapters (LoRA, LoCon, LyCORIS LoHa and LoKr: [`DeltaWeights`])
//! attach at run time without being merged into the weights, so several adapters can be
//! active at once with exact, changeable weights. Building a model inside [`collect_slots`] lists every slot by its
//! checkpoint name (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`).

use std::cell::{Cell, RefCell};
use std::sync::{Arc, RwLock};

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(false) };
    static COLLECTING: RefCell<Option<Vec<SlotInfo>>> = const { RefCell::new(None) };
}

/// One low-rank update attached to a layer: `y += scale · up(down(x))`.
///
/// For a linear layer `down` is [r, in] and `up` [out, r]; for a convolution `down` is
/// a [r, in, k, k] kernel used with the layer's stride and padding and `up` a
/// [out, r, 1, 1] kernel (LoCon). The scale stays separate from `up`, so trainable
/// tensors keep their gradient path.
#[derive(Debug, Clone)]
pub struct LoraDelta {
    pub down: Tensor,
    pub up: Tensor,
    pub scale: f64,
}

/// The weight update ΔW an adapter adds to one layer, in the form the layer applies it
/// without forming `W + ΔW`.
#[derive(Debug, Clone)]
pub enum DeltaWeights {
    /// ΔW = up · down (LoRA, LoCon; a LoHa re-expressed at rank r₁·r₂): shapes as in
    /// [`LoraDelta`].
    LowRank { down: Tensor, up: Tensor },
    /// ΔW itself: [out, in] for a linear layer, [out, in, k, k] for a convolution
    /// (applied with the layer's stride and padding).
    Dense { delta: Tensor },
    /// ΔW = w1 ⊗ w2 (Kronecker product, LyCORIS LoKr): for a linear layer `w1` [a, c] and
    /// `w2` [b, d] with out = a·b, in = c·d; for a convolution `w1` [a, c] and `w2`
    /// [b, d, k, k] (ΔW[i·b+p, j·d+q] = w1[i, j] · w2[p, q], LyCORIS
    /// `functional/lokr.py` `make_kron`, which unsqueezes `w1` to [a, c, 1, 1]). Applied
    /// without forming ΔW: `y = w1 · X · w2ᵀ` on the input reshaped to X [c, d] per
    /// position, and for a convolution `conv(x_j, w2)` on each of the c input groups,
    /// mixed by `w1`.
    Kron { w1: Tensor, w2: Tensor },
}

impl DeltaWeights {
    /// ΔW as a matrix [out, in·k·k] (the kernel flattened as PyTorch stores it).
    pub fn matrix(&self) -> Result<Tensor> {
        match self {
            DeltaWeights::LowRank { down, up } => up.flatten_from(1)?.matmul(&down.flatten_from(1)?),
            DeltaWeights::Dense { delta } => delta.flatten_from(1),
            DeltaWeights::Kron { w1, w2 } => {
                // ΔW[i·b+p, j·(d·kk)+q] = w1[i, j] · w2[p, q] with w2 flattened to [b, d·kk].
                let (a, c) = w1.dims2()?;
                let w2 = w2.flatten_from(1)?;
                let (b, dk) = w2.dims2()?;
                w1.reshape((a, 1, c, 1))?.broadcast_mul(&w2.reshape((1, b, 1, dk))?)?.reshape((a * b, c * dk))
            }
        }
    }

    /// The same update with `f` applied to each tensor (e.g. moved to a device).
    pub fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(match self {
            DeltaWeights::LowRank { down, up } => DeltaWeights::LowRank { down: f(down)?, up: f(up)? },
            DeltaWeights::Dense { delta } => DeltaWeights::Dense { delta: f(delta)? },
            DeltaWeights::Kron { w1, w2 } => DeltaWeights::Kron { w1: f(w1)?, w2: f(w2)? },
        })
    }
}

/// One update attached to a layer: `y += scale · ΔW x` (see [`DeltaWeights`]).
#[derive(Debug, Clone)]
pub struct AdapterDelta {
    pub weights: DeltaWeights,
    pub scale: f64,
}

impl From<LoraDelta> for AdapterDelta {
    fn from(d: LoraDelta) -> Self {
        AdapterDelta { weights: DeltaWeights::LowRank { down: d.down, up: d.up }, scale: d.scale }
    }
}

/// The adapters currently attached to one layer (shared by clones of the layer).
#[derive(Debug, Clone, Default)]
pub struct LoraSlot(Arc<RwLock<Vec<AdapterDelta>>>);

impl LoraSlot {
    /// Replaces the attached updates with low-rank ones.
    pub fn set(&self, deltas: Vec<LoraDelta>) {
        self.set_deltas(deltas.into_iter().map(AdapterDelta::from).collect());
    }

    /// Replaces the attached updates.
    pub fn set_deltas(&self, deltas: Vec<AdapterDelta>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = deltas;
    }

    /// Detaches every update.
    pub fn clear(&self) {
        self.set_deltas(Vec::new());
    }

    /// The attached updates.
    pub fn get(&self) -> Vec<AdapterDelta> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn is_empty(&self) -> bool {
        self.0.read().unwrap_or_else(|e| e.into_inner()).is_empty()
    }
}

/// The shape of a layer an adapter can attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotShape {
    Linear { in_dim: usize, out_dim: usize },
    Conv { in_c: usize, out_c: usize, kernel: usize },
}

/// A layer that adapters can attach to: its checkpoint name, shape and slot.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub name: String,
    pub shape: SlotShape,
    pub slot: LoraSlot,
}

/// Runs `build` and returns what it built with every adapter slot created inside it.
pub fn collect_slots<R>(build: impl FnOnce() -> R) -> (R, Vec<SlotInfo>) {
    let previous = COLLECTING.with(|c| c.replace(Some(Vec::new())));
    let built = build();
    let slots = COLLECTING.with(|c| c.replace(previous)).unwrap_or_default();
    (built, slots)
}

fn register(name: String, shape: SlotShape) -> LoraSlot {
    let slot = LoraSlot::default();
    COLLECTING.with(|c| {
        if let Some(list) = c.borrow_mut().as_mut() {
            list.push(SlotInfo { name, shape, slot: slot.clone() });
        }
    });
    slot
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

/// Whether the CPU kernels that write over a fresh output apply: inference (no
/// gradient) on the CPU in f32.
pub(crate) fn in_place_ok(xs: &Tensor) -> bool {
    !grad_enabled() && xs.device().is_cpu() && xs.dtype() == candle_core::DType::F32
}

/// A fully connected layer `y = x Wᵀ + b`, weights named `weight` / `bias`.
///
/// Inference on the CPU in f32 adds the bias (and with [`Linear::forward_residual`] the
/// residual) over the product in one pass ([`crate::cpu::add`]) instead of allocating a
/// tensor per addition.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
    /// The same weight without the bias: the product alone.
    product: candle_nn::Linear,
    lora: LoraSlot,
}

impl Linear {
    /// Loads `weight` [out, in] and `bias` [out] from `vb`.
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let lora = register(vb.prefix(), SlotShape::Linear { in_dim, out_dim });
        Ok(Self::wrap(candle_nn::linear(in_dim, out_dim, vb)?, lora))
    }

    /// Loads `weight` only.
    pub fn new_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let lora = register(vb.prefix(), SlotShape::Linear { in_dim, out_dim });
        Ok(Self::wrap(candle_nn::linear_no_bias(in_dim, out_dim, vb)?, lora))
    }

    fn wrap(inner: candle_nn::Linear, lora: LoraSlot) -> Self {
        let product = candle_nn::Linear::new(inner.weight().clone(), None);
        Self { inner, product, lora }
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// The bias [out], if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    /// The adapters attached to this layer.
    pub fn lora(&self) -> &LoraSlot {
        &self.lora
    }

    /// `x Wᵀ` plus the attached adapters, without the bias.
    pub fn forward_no_bias(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = self.product.forward(xs)?;
        self.add_lora(xs, ys)
    }

    /// `x Wᵀ + b + residual` (residual of the output's shape), in one pass over the
    /// product on the CPU.
    pub fn forward_residual(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if !in_place_ok(xs) {
            return self.forward(xs)? + residual;
        }
        let ys = self.forward_no_bias(xs)?;
        crate::cpu::add::add_in_place(&ys, self.bias().map(|b| (b, 1)), Some(residual))?;
        Ok(ys)
    }

    fn add_lora(&self, xs: &Tensor, mut ys: Tensor) -> Result<Tensor> {
        if !self.lora.is_empty() {
            for d in self.lora.get() {
                match &d.weights {
                    DeltaWeights::LowRank { down, up } => {
                        let low = (matmul_t(xs, down)? * d.scale)?;
                        ys = (ys + matmul_t(&low, up)?)?;
                    }
                    DeltaWeights::Dense { delta } => ys = (ys + (matmul_t(xs, delta)? * d.scale)?)?,
                    DeltaWeights::Kron { w1, w2 } => ys = (ys + (kron_linear(xs, w1, w2)? * d.scale)?)?,
                }
            }
        }
        Ok(ys)
    }
}

/// `w1 · t[i]` for each i: w1 [a, c], t [n, c, m] → [n, a, m], as one matrix product.
fn mix_groups(w1: &Tensor, t: &Tensor) -> Result<Tensor> {
    let (a, _) = w1.dims2()?;
    let (n, c, m) = t.dims3()?;
    if n == 1 {
        return w1.matmul(&t.reshape((c, m))?)?.reshape((1, a, m));
    }
    let flat = t.transpose(0, 1)?.contiguous()?.reshape((c, n * m))?;
    w1.matmul(&flat)?.reshape((a, n, m))?.transpose(0, 1)?.contiguous()
}

/// `x · (w1 ⊗ w2)ᵀ` for x [.., c·d], w1 [a, c], w2 [b, d], without forming the product:
/// with x's last axis read as X [c, d] (index j·d + q), the result is w1 · X · w2ᵀ [a, b]
/// read as [a·b] (index i·b + p), since (w1 ⊗ w2)[i·b+p, j·d+q] = w1[i, j] · w2[p, q].
fn kron_linear(xs: &Tensor, w1: &Tensor, w2: &Tensor) -> Result<Tensor> {
    let (a, c) = w1.dims2()?;
    let (b, d) = w2.dims2()?;
    let lead: Vec<usize> = xs.dims()[..xs.rank() - 1].to_vec();
    let n: usize = lead.iter().product();
    // [n·c, d] · w2ᵀ → [n, c, b]; then w1 [a, c] mixes the c groups → [n, a, b].
    let xw2 = xs.reshape((n * c, d))?.matmul(&w2.t()?)?.reshape((n, c, b))?;
    let ys = mix_groups(w1, &xw2)?;
    let mut out = lead;
    out.push(a * b);
    ys.reshape(out)
}

/// `x · mᵀ` for x of rank 2 or more and a matrix m.
fn matmul_t(xs: &Tensor, m: &Tensor) -> Result<Tensor> {
    match xs.rank() {
        2 => xs.matmul(&m.t()?),
        _ => xs.broadcast_matmul(&m.t()?),
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if in_place_ok(xs) {
            let ys = self.forward_no_bias(xs)?;
            if let Some(b) = self.bias() {
                crate::cpu::add::add_in_place(&ys, Some((b, 1)), None)?;
            }
            return Ok(ys);
        }
        let ys = self.inner.forward(xs)?;
        self.add_lora(xs, ys)
    }
}

/// A 2-D convolution with bias and a square kernel. Inference on the CPU in f32 uses
/// [`crate::cpu::conv`] for 3×3 and 1×1 stride-1 kernels and Candle's kernel otherwise;
/// training on the CPU uses [`crate::conv::conv2d_im2col`], whose backward pass is
/// much faster than Candle's.
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    geometry: crate::conv::ConvGeometry,
    lora: LoraSlot,
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
    conv_layer(in_c, out_c, kernel, stride, padding, true, vb)
}

/// A convolution without bias (as [`conv2d`]).
pub fn conv2d_no_bias(in_c: usize, out_c: usize, kernel: usize, stride: usize, padding: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv_layer(in_c, out_c, kernel, stride, padding, false, vb)
}

fn conv_layer(in_c: usize, out_c: usize, kernel: usize, stride: usize, padding: usize, bias: bool, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = candle_nn::Conv2dConfig { padding, stride, dilation: 1, groups: 1, cudnn_fwd_algo: None };
    let lora = register(vb.prefix(), SlotShape::Conv { in_c, out_c, kernel });
    let inner = if bias { candle_nn::conv2d(in_c, out_c, kernel, cfg, vb)? } else { candle_nn::conv2d_no_bias(in_c, out_c, kernel, cfg, vb)? };
    Ok(Conv2d { inner, geometry: crate::conv::ConvGeometry { kernel, stride, padding }, lora })
}

impl Conv2d {
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// The adapters attached to this layer.
    pub fn lora(&self) -> &LoraSlot {
        &self.lora
    }

    fn conv(&self, xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>, geometry: crate::conv::ConvGeometry) -> Result<Tensor> {
        if grad_enabled() && xs.device().is_cpu() && xs.dtype() == candle_core::DType::F32 {
            crate::conv::conv2d_im2col(xs, weight, bias, geometry)
        } else {
            // Candle's kernel unfolds the input first: an (n, ho·wo, c·k·k) buffer.
            if let Ok((n, c, h, w)) = xs.dims4() {
                let k = geometry.kernel;
                let (ho, wo) = ((h + 2 * geometry.padding).saturating_sub(k) / geometry.stride + 1, (w + 2 * geometry.padding).saturating_sub(k) / geometry.stride + 1);
                let bytes = (n * ho * wo) as u64 * (c * k * k) as u64 * xs.dtype().size_in_bytes() as u64;
                crate::memory::check("a convolution's im2col buffer", bytes)?;
            }
            let ys = xs.conv2d(weight, geometry.padding, geometry.stride, 1, 1)?;
            match bias {
                Some(b) => ys.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
                None => Ok(ys),
            }
        }
    }
}

impl Conv2d {
    /// The convolution of x [n, c·d, h, w] with the kernel w1 ⊗ w2 (w1 [a, c], w2
    /// [b, d, k, k]; see [`DeltaWeights::Kron`]) without forming it: each of the c input
    /// groups x_j = x[:, j·d..(j+1)·d] is convolved with w2 (the layer's stride and
    /// padding), giving [n, c, b, ho, wo], and output channel i·b + p is Σⱼ w1[i, j] ·
    /// conv(x_j, w2)[p].
    fn kron_conv(&self, xs: &Tensor, w1: &Tensor, w2: &Tensor) -> Result<Tensor> {
        let (a, c) = w1.dims2()?;
        let (b, d, _, _) = w2.dims4()?;
        let (n, _, h, w) = xs.dims4()?;
        let grouped = self.conv(&xs.reshape((n * c, d, h, w))?, w2, None, self.geometry)?;
        let (_, _, ho, wo) = grouped.dims4()?;
        let mixed = mix_groups(w1, &grouped.reshape((n, c, b * ho * wo))?)?;
        mixed.reshape((n, a * b, ho, wo))
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let g = self.geometry;
        let mut ys = if grad_enabled() {
            self.conv(xs, self.inner.weight(), self.inner.bias(), g)?
        } else if xs.device().is_cpu() && xs.dtype() == candle_core::DType::F32 && crate::cpu::conv::supported(g.kernel, g.stride, g.padding) {
            match self.inner.bias() {
                Some(b) => crate::cpu::conv::conv2d(xs, self.inner.weight(), b)?,
                None => crate::cpu::conv::conv2d(xs, self.inner.weight(), &Tensor::zeros(self.inner.weight().dim(0)?, xs.dtype(), xs.device())?)?,
            }
        } else {
            self.inner.forward(xs)?
        };
        if !self.lora.is_empty() {
            let one = crate::conv::ConvGeometry { kernel: 1, stride: 1, padding: 0 };
            for d in self.lora.get() {
                match &d.weights {
                    DeltaWeights::LowRank { down, up } => {
                        let low = (self.conv(xs, down, None, self.geometry)? * d.scale)?;
                        ys = (ys + self.conv(&low, up, None, one)?)?;
                    }
                    DeltaWeights::Dense { delta } => ys = (ys + (self.conv(xs, delta, None, self.geometry)? * d.scale)?)?,
                    DeltaWeights::Kron { w1, w2 } => ys = (ys + (self.kron_conv(xs, w1, w2)? * d.scale)?)?,
                }
            }
        }
        Ok(ys)
    }
}

/// GroupNorm with affine `weight` and `bias` [channels] (PyTorch's `nn.GroupNorm`).
///
/// Inference on the CPU in f32 runs the fused kernel [`crate::cpu::norm`] (one pass to
/// write, SiLU folded in by [`GroupNorm::forward_act`]); training and other devices use
/// Candle's composite operations.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

/// Loads a [`GroupNorm`] of `channels` in `groups`.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
    Ok(GroupNorm { inner, weight, bias, groups, eps })
}

impl GroupNorm {
    fn fused(&self, xs: &Tensor) -> bool {
        !grad_enabled() && xs.device().is_cpu() && xs.dtype() == candle_core::DType::F32
    }

    /// `act(norm(xs))`, in one pass when `act` is SiLU and the fused kernel applies.
    pub fn forward_act(&self, xs: &Tensor, act: Activation) -> Result<Tensor> {
        if act == Activation::Silu && self.fused(xs) {
            return crate::cpu::norm::group_norm(xs, &self.weight, &self.bias, self.groups, self.eps, true);
        }
        act.forward(&self.forward(xs)?)
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.fused(xs) {
            return crate::cpu::norm::group_norm(xs, &self.weight, &self.bias, self.groups, self.eps, false);
        }
        self.inner.forward(xs)
    }
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
            Activation::Gelu if in_place_ok(xs) => crate::cpu::geglu::gelu_erf(xs),
            Activation::Gelu => xs.gelu_erf(),
            Activation::GeluTanh => xs.gelu(),
            Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
        }
    }
}
