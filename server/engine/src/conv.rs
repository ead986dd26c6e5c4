//! 2-D convolution for training on the CPU as im2col + matrix multiply.
//!
//! Candle's CPU convolution backward pass (a naive transposed convolution for the
//! input gradient and a convolution with an image-sized kernel for the weight
//! gradient) is an order of magnitude slower than the forward pass. Here the
//! convolution is `unfold(x) · Wᵀ`: the unfold ([`Im2Col`]) is a custom op whose
//! backward is the matching fold ([`Col2Im`]), and the matrix multiply brings its own
//! fast gradients.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// Geometry of a square-kernel convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvGeometry {
    fn out_len(&self, len: usize) -> usize {
        (len + 2 * self.padding - self.kernel) / self.stride + 1
    }
}

/// Calls `f(pixel, column)` for every kernel tap that lands inside the image: `pixel`
/// indexes the (n, c, h, w) image, `column` the (n, ho·wo, c·k·k) unfolded matrix.
/// [`Im2Col`] copies pixel → column along these pairs, [`Col2Im`] sums column → pixel.
fn for_each_tap(g: ConvGeometry, n: usize, c: usize, h: usize, w: usize, mut f: impl FnMut(usize, usize)) {
    let (ho, wo) = (g.out_len(h), g.out_len(w));
    let k = g.kernel;
    let row = c * k * k;
    for b in 0..n {
        for ci in 0..c {
            let plane = (b * c + ci) * h * w;
            for ky in 0..k {
                for kx in 0..k {
                    let col = (ci * k + ky) * k + kx;
                    for oy in 0..ho {
                        let iy = (oy * g.stride + ky) as isize - g.padding as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        let src_row = plane + iy as usize * w;
                        let base = (b * ho * wo + oy * wo) * row + col;
                        for ox in 0..wo {
                            let ix = (ox * g.stride + kx) as isize - g.padding as isize;
                            if ix >= 0 && ix < w as isize {
                                f(src_row + ix as usize, base + ox * row);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// (n, c, h, w) → (n, ho·wo, c·k·k), columns ordered (c, ky, kx) like a conv weight.
struct Im2Col(ConvGeometry);

/// The adjoint of [`Im2Col`]: sums columns back into an (n, c, h, w) image.
struct Col2Im {
    g: ConvGeometry,
    c: usize,
    h: usize,
    w: usize,
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = crate::cpu::contiguous_f32(storage, layout, "im2col")?;
        let (n, c, h, w) = layout.shape().dims4()?;
        let g = self.0;
        let (ho, wo) = (g.out_len(h), g.out_len(w));
        let k = g.kernel;
        let row = c * k * k;
        let mut dst = vec![0f32; n * ho * wo * row];
        for_each_tap(g, n, c, h, w, |pixel, column| dst[column] = src[pixel]);
        Ok((CpuStorage::F32(dst), Shape::from((n, ho * wo, row))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (_, c, h, w) = arg.dims4()?;
        let folded = grad_res.contiguous()?.apply_op1_no_bwd(&Col2Im { g: self.0, c, h, w })?;
        Ok(Some(folded))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = crate::cpu::contiguous_f32(storage, layout, "col2im")?;
        let (n, l, row) = layout.shape().dims3()?;
        let (g, c, h, w) = (self.g, self.c, self.h, self.w);
        let (ho, wo) = (g.out_len(h), g.out_len(w));
        let k = g.kernel;
        if l != ho * wo || row != c * k * k {
            candle_core::bail!("col2im: columns {:?} do not fit an image of {c}×{h}×{w}", layout.shape());
        }
        let mut dst = vec![0f32; n * c * h * w];
        for_each_tap(g, n, c, h, w, |pixel, column| dst[pixel] += src[column]);
        Ok((CpuStorage::F32(dst), Shape::from((n, c, h, w))))
    }
}

/// `conv2d(x, weight) + bias` with differentiable, matmul-based gradients (f32, CPU).
pub fn conv2d_im2col(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, g: ConvGeometry) -> Result<Tensor> {
    let (n, _c, h, w) = x.dims4()?;
    let (o, ci, k, _) = weight.dims4()?;
    let (ho, wo) = (g.out_len(h), g.out_len(w));
    let cols = x.contiguous()?.apply_op1(Im2Col(g))?; // (n, ho·wo, ci·k·k)
    let y = cols.reshape((n * ho * wo, ci * k * k))?.matmul(&weight.reshape((o, ci * k * k))?.t()?)?;
    let y = y.reshape((n, ho * wo, o))?.transpose(1, 2)?.reshape((n, o, ho, wo))?;
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, o, 1, 1))?),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn check(stride: usize, padding: usize, k: usize) -> Result<()> {
        let dev = Device::Cpu;
        // Even sizes: Candle's own conv backward (the reference here) mis-sizes the
        // input gradient for some odd sizes with stride 2, which ours handles.
        let x = Var::randn(0f32, 1., (2, 3, 8, 6), &dev)?;
        let w = Var::randn(0f32, 1., (4, 3, k, k), &dev)?;
        let b = Var::randn(0f32, 1., 4, &dev)?;
        let g = ConvGeometry { kernel: k, stride, padding };
        let ours = conv2d_im2col(&x, &w, Some(&b), g)?;
        let theirs = x.conv2d(&w, padding, stride, 1, 1)?.broadcast_add(&b.reshape((1, 4, 1, 1))?)?;
        let diff = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "forward differs by {diff}");
        // Gradients of a weighted sum must match candle's own conv backward.
        let r = Tensor::randn(0f32, 1., ours.shape(), &dev)?;
        let ga = (ours * &r)?.sum_all()?.backward()?;
        let gb = (theirs * &r)?.sum_all()?.backward()?;
        for v in [&x, &w, &b] {
            let d = (ga.get(v).unwrap() - gb.get(v).unwrap())?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-3, "gradient differs by {d} (stride {stride}, padding {padding}, k {k})");
        }
        Ok(())
    }

    #[test]
    fn matches_candle_conv_and_its_gradients() -> Result<()> {
        check(1, 1, 3)?;
        check(2, 1, 3)?;
        check(2, 0, 3)?;
        check(1, 0, 1)
    }
}
