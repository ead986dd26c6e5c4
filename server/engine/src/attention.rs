//! Attention implementations, selectable per run.

/// How scaled dot-product attention is computed. All give the same result within
/// floating-point tolerance; they differ in speed and peak memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AttentionKind {
    /// The plain reference: softmax(QKᵀ/√d)·V over all heads of one sample at a time,
    /// holding that sample's whole (heads, tokens, tokens) score matrix (softmax in place
    /// on the CPU).
    #[default]
    Original,
    /// Never holds the full score matrix (Apple's SPLIT_EINSUM idea): bounded memory for
    /// large images. On the CPU in f32 without a mask, the blocked kernel
    /// [`crate::cpu::attention`] (per-thread score blocks, vectorised softmax, no head
    /// copies); elsewhere per-head, query-chunked Candle operations.
    SplitEinsum,
    /// Fused flash attention (CUDA builds with the `flash-attn` feature only).
    Flash,
}

impl AttentionKind {
    pub fn id(self) -> &'static str {
        match self {
            AttentionKind::Original => "original",
            AttentionKind::SplitEinsum => "split-einsum",
            AttentionKind::Flash => "flash",
        }
    }
}

impl std::fmt::Display for AttentionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.id())
    }
}

impl std::str::FromStr for AttentionKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "original" => Ok(AttentionKind::Original),
            "split-einsum" | "split" => Ok(AttentionKind::SplitEinsum),
            "flash" => Ok(AttentionKind::Flash),
            _ => Err(crate::Error::invalid(
                "attention",
                format!("unknown attention {s:?}; use original, split-einsum or flash"),
            )),
        }
    }
}

use candle_core::{Result, Tensor, D};

/// Query rows processed at once by [`AttentionKind::SplitEinsum`]: bounds the score
/// buffer to `batch · chunk · keys` floats per head.
const SPLIT_QUERY_CHUNK: usize = 1024;

/// Multi-head attention of token-major activations, as the models hold them.
///
/// `q`: (batch, q_len, heads·head_dim); `k`, `v`: (batch, kv_len, heads·head_dim); `mask`:
/// optional additive mask broadcastable to (batch, heads, q_len, kv_len). Returns
/// (batch, q_len, heads·head_dim). [`AttentionKind::SplitEinsum`] on the CPU in f32 (no
/// mask, no gradient) runs the blocked kernel; everything else splits the heads out and
/// calls [`scaled_dot_product`].
pub fn multi_head(
    kind: AttentionKind,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, lq, width) = q.dims3()?;
    let lk = k.dim(1)?;
    if kind == AttentionKind::SplitEinsum
        && mask.is_none()
        && q.device().is_cpu()
        && q.dtype() == candle_core::DType::F32
        && !crate::layers::grad_enabled()
    {
        return crate::cpu::attention::multi_head(q, k, v, heads, scale);
    }
    let d = width / heads;
    let split = |x: &Tensor, n: usize| x.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous();
    let o = scaled_dot_product(kind, &split(q, lq)?, &split(k, lk)?, &split(v, lk)?, mask, scale)?;
    o.transpose(1, 2)?.reshape((b, lq, width))
}

/// Scaled dot-product attention over heads.
///
/// `q`: (batch, heads, q_len, head_dim); `k`, `v`: (batch, heads, kv_len, head_dim);
/// `mask`: optional additive mask broadcastable to (batch, heads, q_len, kv_len).
/// Returns (batch, heads, q_len, head_dim).
pub fn scaled_dot_product(
    kind: AttentionKind,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    match kind {
        AttentionKind::Original => original(q, k, v, mask, scale),
        AttentionKind::SplitEinsum => split(q, k, v, mask, scale),
        AttentionKind::Flash => flash(q, k, v, mask, scale),
    }
}

/// The plain reference: per sample, all heads' (q_len × kv_len) scores, their softmax, and
/// the product with v. One sample at a time bounds the scores to `heads · q_len · kv_len`
/// values (512 MiB for SD-1.5's 4096-token self-attention) instead of that times the batch,
/// and on the CPU in f32 without gradients the softmax overwrites the scores
/// ([`crate::cpu::exp::softmax_last_dim_in_place`]) instead of allocating a second matrix.
fn original(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let (b, h, lq, _d) = q.dims4()?;
    let lk = k.dim(2)?;
    let in_place = q.device().is_cpu() && q.dtype() == candle_core::DType::F32 && !crate::layers::grad_enabled();
    let copies = if in_place { 1 } else { 2 };
    crate::memory::check("attention scores", copies * (h * lq) as u64 * lk as u64 * q.dtype().size_in_bytes() as u64)?;
    let q = (q * scale)?;
    let mask = match mask {
        Some(m) => Some(m.broadcast_as((b, h, lq, lk))?),
        None => None,
    };
    let mut outs = Vec::with_capacity(b);
    for bi in 0..b {
        let mut scores = q.get(bi)?.matmul(&k.get(bi)?.t()?)?;
        if let Some(m) = &mask {
            scores = (scores + m.get(bi)?)?;
        }
        let probs = if in_place {
            crate::cpu::exp::softmax_last_dim_in_place(&scores)?;
            scores
        } else {
            crate::layers::softmax_last_dim(&scores)?
        };
        outs.push(probs.matmul(&v.get(bi)?)?);
    }
    Tensor::stack(&outs, 0)
}

/// One head at a time, queries in chunks: the full (heads, q, k) score tensor never exists.
fn split(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let (b, h, lq, _d) = q.dims4()?;
    let lk = k.dim(2)?;
    let chunk = SPLIT_QUERY_CHUNK.min(lq);
    crate::memory::check("attention scores", 2 * (b * chunk) as u64 * lk as u64 * q.dtype().size_in_bytes() as u64)?;
    let mut heads = Vec::with_capacity(h);
    for hi in 0..h {
        let qh = (q.narrow(1, hi, 1)?.squeeze(1)? * scale)?;
        let kh_t = k.narrow(1, hi, 1)?.squeeze(1)?.t()?.contiguous()?;
        let vh = v.narrow(1, hi, 1)?.squeeze(1)?.contiguous()?;
        let mut chunks = Vec::with_capacity(lq.div_ceil(SPLIT_QUERY_CHUNK));
        let mut start = 0;
        while start < lq {
            let len = SPLIT_QUERY_CHUNK.min(lq - start);
            let qc = qh.narrow(1, start, len)?.contiguous()?;
            let mut scores = qc.matmul(&kh_t)?;
            if let Some(m) = mask {
                // Masks are (.., q_len, kv_len) with size-1 leading dims.
                let m = m.narrow(D::Minus2, start, len)?;
                let m = m.reshape((m.dim(D::Minus2)?, m.dim(D::Minus1)?))?;
                scores = scores.broadcast_add(&m)?;
            }
            let probs = crate::layers::softmax_last_dim(&scores)?;
            chunks.push(probs.matmul(&vh)?);
            start += len;
        }
        heads.push(Tensor::cat(&chunks, 1)?);
    }
    Tensor::stack(&heads, 1)
}

#[cfg(feature = "flash-attn")]
fn flash(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    if mask.is_some() || !q.device().is_cuda() {
        return original(q, k, v, mask, scale);
    }
    // candle-flash-attn wants (batch, seq, heads, head_dim) in f16/bf16.
    let dtype = q.dtype();
    let to = |t: &Tensor| t.transpose(1, 2)?.to_dtype(candle_core::DType::F16);
    let out = candle_flash_attn::flash_attn(&to(q)?, &to(k)?, &to(v)?, scale as f32, false)?;
    out.transpose(1, 2)?.to_dtype(dtype)
}

#[cfg(not(feature = "flash-attn"))]
fn flash(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let _ = (q, k, v, mask, scale);
    candle_core::bail!("flash attention needs a CUDA build with the `flash-attn` feature; use original or split-einsum")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn split_matches_original_with_and_without_mask() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 3, 1500, 8), &dev)?;
        let k = Tensor::randn(0f32, 1., (2, 3, 1500, 8), &dev)?;
        let v = Tensor::randn(0f32, 1., (2, 3, 1500, 8), &dev)?;
        let a = original(&q, &k, &v, None, 0.3)?;
        let b = split(&q, &k, &v, None, 0.3)?;
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "diff {diff}");
        let mask = Tensor::randn(0f32, 1., (1, 1, 1500, 1500), &dev)?;
        let a = original(&q, &k, &v, Some(&mask), 0.3)?;
        let b = split(&q, &k, &v, Some(&mask), 0.3)?;
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "diff {diff}");
        Ok(())
    }

    /// Heads side by side, as the projections make them: (b, h, l, d) → (b, l, h·d).
    fn tokens(x: &Tensor) -> Result<Tensor> {
        let (b, h, l, d) = x.dims4()?;
        x.transpose(1, 2)?.contiguous()?.reshape((b, l, h * d))
    }

    #[test]
    fn blocked_kernel_matches_the_plain_path() -> Result<()> {
        let dev = Device::Cpu;
        // Self-attention with a partial last query block, cross-attention with CLIP's 77
        // keys, one query, one head: each against `original` in f32.
        for (b, h, lq, lk, d) in [(2, 8, 300, 300, 40), (2, 8, 130, 77, 40), (1, 1, 1, 5, 8), (1, 3, 64, 1500, 16)] {
            let q = Tensor::randn(0f32, 1., (b, h, lq, d), &dev)?;
            let k = Tensor::randn(0f32, 1., (b, h, lk, d), &dev)?;
            let v = Tensor::randn(0f32, 1., (b, h, lk, d), &dev)?;
            let scale = (d as f64).powf(-0.5);
            let want = tokens(&original(&q, &k, &v, None, scale)?)?;
            let got = multi_head(AttentionKind::SplitEinsum, &tokens(&q)?, &tokens(&k)?, &tokens(&v)?, h, None, scale)?;
            assert_eq!(got.dims(), want.dims());
            let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 2e-6, "({b},{h},{lq},{lk},{d}): differs by {diff}");
            let plain = multi_head(AttentionKind::Original, &tokens(&q)?, &tokens(&k)?, &tokens(&v)?, h, None, scale)?;
            let diff = (&plain - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "the plain path is the reference itself");
        }
        Ok(())
    }

    #[test]
    fn blocked_kernel_keeps_large_scores_finite() -> Result<()> {
        // Scores in the hundreds: a softmax without the max shift would overflow.
        let dev = Device::Cpu;
        let q = (Tensor::randn(0f32, 1., (1, 2, 70, 8), &dev)? * 30.0)?;
        let k = (Tensor::randn(0f32, 1., (1, 2, 90, 8), &dev)? * 30.0)?;
        let v = Tensor::randn(0f32, 1., (1, 2, 90, 8), &dev)?;
        let want = tokens(&original(&q, &k, &v, None, 1.0)?)?;
        let got = multi_head(AttentionKind::SplitEinsum, &tokens(&q)?, &tokens(&k)?, &tokens(&v)?, 2, None, 1.0)?;
        let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "differs by {diff}");
        Ok(())
    }

    #[test]
    fn masked_or_differentiable_split_einsum_takes_the_chunked_path() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (1, 2, 20, 4), &dev)?;
        let mask = Tensor::randn(0f32, 1., (1, 1, 20, 20), &dev)?;
        let want = tokens(&original(&q, &q, &q, Some(&mask), 0.5)?)?;
        let t = tokens(&q)?;
        let got = multi_head(AttentionKind::SplitEinsum, &t, &t, &t, 2, Some(&mask), 0.5)?;
        assert!((&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
        let _grad = crate::layers::enable_grad();
        let qv = candle_core::Var::from_tensor(&t)?;
        let y = multi_head(AttentionKind::SplitEinsum, &qv, &qv, &qv, 2, None, 0.5)?;
        let grads = y.sum_all()?.backward()?;
        assert!(grads.get(&qv).is_some(), "training must get gradients through split-einsum");
        Ok(())
    }

    #[test]
    fn attention_kind_parses() {
        assert_eq!("split-einsum".parse::<AttentionKind>().unwrap(), AttentionKind::SplitEinsum);
        assert_eq!("ORIGINAL".parse::<AttentionKind>().unwrap(), AttentionKind::Original);
        assert!("fast".parse::<AttentionKind>().is_err());
    }
}
