//! Bias and residual additions written over a freshly computed output.
//!
//! Candle's `broadcast_add` and `+` allocate a new tensor for every bias and every
//! residual connection; in the UNet's transformer blocks that is one more pass over a
//! 10–80 MB activation each time. Here `y += bias (+ residual)` runs in one parallel pass
//! over `y`'s own storage, which must be a tensor nobody else holds (a layer's output
//! just computed).

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

/// Elements per parallel task: large enough that Rayon's overhead stays small.
const TASK: usize = 1 << 15;

/// `y += bias[(i / repeat) % bias.len()] + residual[i]` over the flat index `i`, in place.
///
/// `y`: contiguous f32 CPU tensor, freshly computed and held by nobody else. `bias`:
/// optional vector with its `repeat`: 1 for a linear layer's bias over the last dimension
/// (`bias.len()` = last dim), `h·w` for a per-(sample, channel) bias over an NCHW map
/// (`bias` (b, c) flattened). `residual`: optional tensor of `y`'s shape. Both inputs are
/// made contiguous here.
///
/// # Errors
/// Another device or dtype, a strided `y`, shapes that do not fit, or an input sharing
/// `y`'s storage (Candle refuses to alias the output).
pub fn add_in_place(y: &Tensor, bias: Option<(&Tensor, usize)>, residual: Option<&Tensor>) -> Result<()> {
    if let Some(r) = residual {
        if r.dims() != y.dims() {
            candle_core::bail!("add in place: residual {:?} does not match the output {:?}", r.shape(), y.shape());
        }
    }
    if let Some((b, repeat)) = bias {
        let n = b.elem_count();
        if n == 0 || repeat == 0 || y.elem_count() % (n * repeat) != 0 {
            candle_core::bail!("add in place: a bias of {n} values repeated {repeat}× does not tile the output {:?}", y.shape());
        }
    }
    match (bias, residual) {
        (Some((b, repeat)), Some(r)) => y.inplace_op3(&b.contiguous()?, &r.contiguous()?, &Add { repeat }),
        (Some((b, repeat)), None) => y.inplace_op2(&b.contiguous()?, &Add { repeat }),
        (None, Some(r)) => y.inplace_op2(&r.contiguous()?, &Add { repeat: 0 }),
        (None, None) => Ok(()),
    }
}

/// `repeat` = 0: the one source is a residual; otherwise the first source is a bias.
struct Add {
    repeat: usize,
}

impl Add {
    fn run(&self, y: &mut [f32], bias: Option<&[f32]>, residual: Option<&[f32]>) -> Result<()> {
        if residual.is_some_and(|r| r.len() != y.len()) {
            candle_core::bail!("add in place: residual length differs from the output's");
        }
        let repeat = self.repeat.max(1);
        y.par_chunks_mut(TASK).enumerate().for_each(|(task, chunk)| {
            let (start, len) = (task * TASK, chunk.len());
            if let Some(b) = bias {
                let period = b.len() * repeat;
                // Walk the chunk in runs of equal bias value.
                let mut i = start;
                let mut rest = &mut chunk[..];
                while !rest.is_empty() {
                    let within = i % period;
                    let value = b[within / repeat];
                    let run = (repeat - within % repeat).min(rest.len());
                    let (head, tail) = rest.split_at_mut(run);
                    head.iter_mut().for_each(|y| *y += value);
                    rest = tail;
                    i += run;
                }
            }
            // After the bias, as `(x·Wᵀ + b) + residual` is computed everywhere else.
            if let Some(r) = residual {
                chunk.iter_mut().zip(&r[start..start + len]).for_each(|(y, r)| *y += r);
            }
        });
        Ok(())
    }
}

impl InplaceOp2 for Add {
    fn name(&self) -> &'static str {
        "add-in-place"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, src: &CpuStorage, src_l: &Layout) -> Result<()> {
        let s = super::contiguous_f32(src, src_l, "add in place")?;
        let y = super::contiguous_f32_mut(dst, dst_l, "add in place")?;
        if self.repeat == 0 {
            self.run(y, None, Some(s))
        } else {
            self.run(y, Some(s), None)
        }
    }
}

impl InplaceOp3 for Add {
    fn name(&self) -> &'static str {
        "add-in-place"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, b: &CpuStorage, b_l: &Layout, r: &CpuStorage, r_l: &Layout) -> Result<()> {
        let b = super::contiguous_f32(b, b_l, "add in place")?;
        let r = super::contiguous_f32(r, r_l, "add in place")?;
        let y = super::contiguous_f32_mut(dst, dst_l, "add in place")?;
        self.run(y, Some(b), Some(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_for_linear_and_channel_biases() -> Result<()> {
        let dev = Device::Cpu;
        // A linear layer's output (2, 50_000, 7) with its bias over the last dimension:
        // several parallel chunks, runs that straddle chunk edges.
        let y = Tensor::randn(0f32, 1., (2, 50_000, 7), &dev)?;
        let bias = Tensor::randn(0f32, 1., 7, &dev)?;
        let res = Tensor::randn(0f32, 1., (2, 50_000, 7), &dev)?;
        let want = (y.broadcast_add(&bias)? + &res)?;
        let got = y.copy()?;
        add_in_place(&got, Some((&bias, 1)), Some(&res))?;
        assert_eq!((&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        // Bias only, residual only.
        let got = y.copy()?;
        add_in_place(&got, Some((&bias, 1)), None)?;
        assert_eq!((&got - y.broadcast_add(&bias)?)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        let got = y.copy()?;
        add_in_place(&got, None, Some(&res))?;
        assert_eq!((&got - (&y + &res)?)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        // A time embedding (2, 5) over an NCHW map (2, 5, 61, 67): one value per (sample, channel).
        let map = Tensor::randn(0f32, 1., (2, 5, 61, 67), &dev)?;
        let temb = Tensor::randn(0f32, 1., (2, 5), &dev)?;
        let want = map.broadcast_add(&temb.unsqueeze(2)?.unsqueeze(3)?)?;
        let got = map.copy()?;
        add_in_place(&got, Some((&temb, 61 * 67)), None)?;
        assert_eq!((&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn refuses_what_does_not_fit_or_aliases() -> Result<()> {
        let dev = Device::Cpu;
        let y = Tensor::zeros((3, 4), candle_core::DType::F32, &dev)?;
        assert!(add_in_place(&y, Some((&Tensor::zeros(5, candle_core::DType::F32, &dev)?, 1)), None).is_err());
        assert!(add_in_place(&y, None, Some(&Tensor::zeros((4, 3), candle_core::DType::F32, &dev)?)).is_err());
        assert!(add_in_place(&y, None, Some(&y)).is_err(), "the output itself as residual is refused");
        assert!(add_in_place(&y.t()?, None, Some(&Tensor::zeros((4, 3), candle_core::DType::F32, &dev)?)).is_err(), "strided output");
        Ok(())
    }
}
