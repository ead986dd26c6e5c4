//! GroupNorm, optionally followed by SiLU, in one kernel.
//!
//! Candle's `GroupNorm` is about ten tensor operations (mean, subtract, square, mean,
//! add, sqrt, divide, two broadcasts), each writing a full-size tensor: at SD's 64×64
//! level that is ten fresh 10 MiB buffers per norm, and a SiLU after it one more, with a
//! scalar `exp`. Here each (sample, group) block (contiguous in NCHW) is read twice for
//! its mean and variance and written once as `silu?(x·scale[c] + shift[c])`, with
//! scale = weight·(var + eps)^-½ and shift = bias − mean·scale per channel. The variance is
//! the biased one over the group's channels × pixels, as in PyTorch's `group_norm`
//! (Wu & He, arXiv 1803.08494); sums are taken in 16 f32 lanes and combined in f64.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::dispatch;

const LANES: usize = 16;

/// `silu?(group_norm(x) · weight + bias)` for x (batch, channels, …) contiguous f32 on the
/// CPU, weight and bias (channels). `channels` must divide by `groups`.
///
/// # Errors
/// Shapes that do not fit, another dtype or device.
pub fn group_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &FusedGroupNorm { groups, eps, silu })
}

struct FusedGroupNorm {
    groups: usize,
    eps: f64,
    silu: bool,
}

#[inline(always)]
fn sum_generic(xs: &[f32]) -> f64 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += *x;
        }
    }
    acc.iter().chain(chunks.remainder()).map(|v| *v as f64).sum()
}

#[inline(always)]
fn sum_sq_dev_generic(xs: &[f32], mean: f32) -> f64 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            let d = *x - mean;
            *a += d * d;
        }
    }
    acc.iter().map(|v| *v as f64).sum::<f64>() + chunks.remainder().iter().map(|x| ((*x - mean) as f64).powi(2)).sum::<f64>()
}

#[inline(always)]
fn affine_generic(dst: &mut [f32], src: &[f32], scale: f32, shift: f32) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = *s * scale + shift;
    }
}

#[inline(always)]
fn affine_silu_generic(dst: &mut [f32], src: &[f32], scale: f32, shift: f32) {
    for (d, s) in dst.iter_mut().zip(src) {
        let y = *s * scale + shift;
        *d = y / (1.0 + super::exp::exp1(-y));
    }
}

dispatch! {
    /// Σ xs, in 16 f32 partial sums added in f64.
    pub fn sum(xs: &[f32]) -> f64 => sum_generic
}
dispatch! {
    /// Σ (xs − mean)², in 16 f32 partial sums added in f64.
    pub fn sum_sq_dev(xs: &[f32], mean: f32) -> f64 => sum_sq_dev_generic
}
dispatch! {
    /// dst = src·scale + shift.
    pub fn affine(dst: &mut [f32], src: &[f32], scale: f32, shift: f32) -> () => affine_generic
}
dispatch! {
    /// dst = silu(src·scale + shift), silu(y) = y·σ(y).
    pub fn affine_silu(dst: &mut [f32], src: &[f32], scale: f32, shift: f32) -> () => affine_silu_generic
}

impl CustomOp3 for FusedGroupNorm {
    fn name(&self) -> &'static str {
        "group-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::contiguous_f32(s1, l1, "group norm")?;
        let w = super::contiguous_f32(s2, l2, "group norm weight")?;
        let b = super::contiguous_f32(s3, l3, "group norm bias")?;
        let dims = l1.shape().dims();
        if dims.len() < 2 {
            candle_core::bail!("group norm: input {:?} has no channel dimension", l1.shape());
        }
        let c = dims[1];
        let pixels: usize = dims[2..].iter().product();
        if c % self.groups != 0 || w.len() != c || b.len() != c {
            candle_core::bail!("group norm: {} channels, {} groups, weight {}, bias {}", c, self.groups, w.len(), b.len());
        }
        let per_group = c / self.groups;
        let block = per_group * pixels;
        let mut out = vec![0f32; x.len()];
        if block == 0 {
            return Ok((CpuStorage::F32(out), l1.shape().clone()));
        }
        out.par_chunks_mut(block).zip(x.par_chunks(block)).enumerate().for_each(|(i, (dst, src))| {
            let group = i % self.groups;
            let count = block as f64;
            let mean = (sum(src) / count) as f32;
            let var = sum_sq_dev(src, mean) / count;
            let inv_std = 1.0 / (var + self.eps).sqrt();
            for k in 0..per_group {
                let ch = group * per_group + k;
                let scale = (w[ch] as f64 * inv_std) as f32;
                let shift = b[ch] - mean * scale;
                let range = k * pixels..(k + 1) * pixels;
                if self.silu {
                    affine_silu(&mut dst[range.clone()], &src[range], scale, shift);
                } else {
                    affine(&mut dst[range.clone()], &src[range], scale, shift);
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    #[test]
    fn matches_candles_group_norm_and_silu() -> Result<()> {
        let dev = Device::Cpu;
        // An offset mean (variance from the mean, not from E[x²] − E[x]²), pixel counts
        // off the lane width, one group of all channels, and a 3-D input.
        for (shape, groups) in [(vec![2, 64, 9, 7], 32), (vec![1, 6, 5, 5], 1), (vec![3, 8, 33], 4)] {
            let c = shape[1];
            let x = (Tensor::randn(0f32, 2., shape.as_slice(), &dev)? + 5.0)?;
            let w = Tensor::randn(1f32, 0.5, c, &dev)?;
            let b = Tensor::randn(0f32, 0.5, c, &dev)?;
            let reference = candle_nn::GroupNorm::new(w.clone(), b.clone(), c, groups, 1e-5)?.forward(&x)?;
            let ours = group_norm(&x, &w, &b, groups, 1e-5, false)?;
            let diff = (&ours - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 2e-5, "{shape:?}: norm differs by {diff}");
            let reference = candle_nn::ops::silu(&reference)?;
            let ours = group_norm(&x, &w, &b, groups, 1e-5, true)?;
            let diff = (&ours - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 2e-5, "{shape:?}: norm+silu differs by {diff}");
        }
        Ok(())
    }

    #[test]
    fn hand_computed_group() -> Result<()> {
        // One group [1, 2, 3, 4]: mean 2.5, biased variance 1.25.
        let dev = Device::Cpu;
        let x = Tensor::new(&[[[1f32, 2.], [3., 4.]]], &dev)?;
        let w = Tensor::new(&[1f32, 2.], &dev)?;
        let b = Tensor::new(&[0f32, 1.], &dev)?;
        let y = group_norm(&x, &w, &b, 1, 0.0, false)?.flatten_all()?.to_vec1::<f32>()?;
        let s = 1.25f32.sqrt();
        let want = [-1.5 / s, -0.5 / s, 2.0 * 0.5 / s + 1.0, 2.0 * 1.5 / s + 1.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?} vs {want:?}");
        }
        Ok(())
    }
}
