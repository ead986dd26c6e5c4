//! 3×3 (padding 1) and 1×1 convolutions with stride 1, as GEMMs on the NCHW tensor itself.
//!
//! Candle's CPU convolution unfolds the input element by element into an im2col matrix
//! (47 MiB per sample for a 320-channel 64×64 map), transposes and copies the kernel on
//! every call, then multiplies. Here nothing is unfolded: a 1×1 convolution is one GEMM,
//! out (O × HW) = W (O × C) · x (C × HW); a 3×3 one is nine GEMMs accumulating into the same
//! output, one per kernel tap, each reading the zero-padded input shifted by the tap
//! ("shifted GEMMs", an implicit-GEMM convolution). Computed on the padded width W+2, each
//! tap's input is a plain strided matrix (row stride (H+3)(W+2), the extra row absorbing the
//! last tap's overrun) and the two padding columns of each output row are dropped when the
//! bias is added (3 % extra work at W = 64). Scratch buffers are kept per thread, so steady
//! state allocates only the output. The kernel is read in place through GEMM strides.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

thread_local! {
    static PADDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static ACC: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether [`conv2d`] handles this geometry: stride 1, a 1×1 kernel without padding or a
/// 3×3 kernel with padding 1.
pub fn supported(kernel: usize, stride: usize, padding: usize) -> bool {
    stride == 1 && ((kernel == 1 && padding == 0) || (kernel == 3 && padding == 1))
}

/// `conv2d(x, weight) + bias` for x (N, C, H, W), weight (O, C, k, k), bias (O), f32 on the
/// CPU, in a geometry [`supported`] accepts. Returns (N, O, H, W).
///
/// # Errors
/// Shapes that do not fit, another dtype or device.
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &ShiftedGemmConv)
}

struct ShiftedGemmConv;

/// Grows `buf` to at least `len` (contents unspecified) and hands out the first `len`.
fn scratch(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

impl CustomOp3 for ShiftedGemmConv {
    fn name(&self) -> &'static str {
        "conv2d-shifted-gemm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::contiguous_f32(s1, l1, "conv2d input")?;
        let w = super::contiguous_f32(s2, l2, "conv2d weight")?;
        let b = super::contiguous_f32(s3, l3, "conv2d bias")?;
        let (n, c, h, wd) = l1.shape().dims4()?;
        let (o, wc, k, k2) = l2.shape().dims4()?;
        if wc != c || k != k2 || !(k == 1 || k == 3) || b.len() != o {
            candle_core::bail!("conv2d: input {:?}, weight {:?}, bias {} do not fit", l1.shape(), l2.shape(), b.len());
        }
        let hw = h * wd;
        let mut out = vec![0f32; n * o * hw];
        let threads = rayon::current_num_threads();
        for (xi, yi) in x.chunks_exact(c * hw).zip(out.chunks_exact_mut(o * hw)) {
            if k == 1 {
                // SAFETY: dst is o × hw, lhs o × c (row stride c), rhs c × hw, all in bounds.
                unsafe {
                    gemm::gemm(
                        o, hw, c,
                        yi.as_mut_ptr(), 1, hw as isize,
                        false,
                        w.as_ptr(), 1, c as isize,
                        xi.as_ptr(), 1, hw as isize,
                        0.0, 1.0,
                        false, false, false,
                        gemm::Parallelism::Rayon(threads),
                    );
                }
                yi.par_chunks_mut(hw).zip(b.par_iter()).for_each(|(row, bias)| row.iter_mut().for_each(|v| *v += bias));
                continue;
            }
            let pw = wd + 2;
            let plane = (h + 3) * pw;
            PADDED.with(|p| {
                ACC.with(|a| {
                    let mut p = p.borrow_mut();
                    let mut a = a.borrow_mut();
                    let padded = scratch(&mut p, c * plane);
                    padded.par_chunks_mut(plane).zip(xi.par_chunks(hw)).for_each(|(dst, src)| {
                        dst.fill(0.0);
                        for (y, row) in src.chunks_exact(wd).enumerate() {
                            let at = (y + 1) * pw + 1;
                            dst[at..at + wd].copy_from_slice(row);
                        }
                    });
                    let acc = scratch(&mut a, o * h * pw);
                    for tap in 0..9 {
                        let (ky, kx) = (tap / 3, tap % 3);
                        // SAFETY: dst o × (h·pw) in `acc`; lhs the tap's o × c kernel slice
                        // (row stride c·9, column stride 9) inside `w`; rhs c × (h·pw) starting
                        // at the tap's shift, the furthest element (c-1)·plane + 2·pw + 2 +
                        // h·pw − 1 < c·plane because of the extra row.
                        unsafe {
                            gemm::gemm(
                                o, h * pw, c,
                                acc.as_mut_ptr(), 1, (h * pw) as isize,
                                tap > 0,
                                w.as_ptr().add(tap), 9, (c * 9) as isize,
                                padded.as_ptr().add(ky * pw + kx), 1, plane as isize,
                                1.0, 1.0,
                                false, false, false,
                                gemm::Parallelism::Rayon(threads),
                            );
                        }
                    }
                    yi.par_chunks_mut(hw).zip(acc.par_chunks(h * pw)).zip(b.par_iter()).for_each(|((dst, src), bias)| {
                        for (drow, srow) in dst.chunks_exact_mut(wd).zip(src.chunks_exact(pw)) {
                            for (d, s) in drow.iter_mut().zip(srow) {
                                *d = s + bias;
                            }
                        }
                    });
                })
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((n, o, h, wd))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candles_convolution() -> Result<()> {
        let dev = Device::Cpu;
        // Odd sizes, one channel, a 1×1 map, batch 3: against Candle's im2col kernel.
        for (n, c, o, h, w, k) in [(2, 5, 7, 9, 6, 3), (1, 1, 1, 1, 1, 3), (3, 4, 2, 5, 8, 1), (1, 16, 24, 8, 8, 3), (2, 3, 3, 1, 7, 3)] {
            let x = Tensor::randn(0f32, 1., (n, c, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1., (o, c, k, k), &dev)?;
            let b = Tensor::randn(0f32, 1., o, &dev)?;
            let pad = k / 2;
            let want = x.conv2d(&wt, pad, 1, 1, 1)?.broadcast_add(&b.reshape((1, o, 1, 1))?)?;
            let got = conv2d(&x, &wt, &b)?;
            assert_eq!(got.dims(), want.dims());
            let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "({n},{c},{o},{h},{w},k{k}): differs by {diff}");
        }
        assert!(supported(3, 1, 1) && supported(1, 1, 0));
        assert!(!supported(3, 2, 1) && !supported(3, 1, 0) && !supported(5, 1, 2));
        Ok(())
    }

    #[test]
    fn hand_computed_3x3() -> Result<()> {
        // A 2×2 image [[1,2],[3,4]], an all-ones kernel: each output sums its neighbourhood
        // inside the zero padding, i.e. the whole image (10) everywhere; bias 0.5.
        let dev = Device::Cpu;
        let x = Tensor::new(&[[[[1f32, 2.], [3., 4.]]]], &dev)?;
        let w = Tensor::ones((1, 1, 3, 3), candle_core::DType::F32, &dev)?;
        let b = Tensor::new(&[0.5f32], &dev)?;
        let y = conv2d(&x, &w, &b)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(y, vec![10.5; 4]);
        Ok(())
    }
}
