//! Attention implementations, selectable per run.

/// How scaled dot-product attention is computed. All give the same result within
/// floating-point tolerance; they differ in speed and peak memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AttentionKind {
    /// One batched softmax(QKᵀ/√d)·V over all heads: fastest for small images,
    /// materialises the full (batch·heads, tokens, tokens) score matrix.
    #[default]
    Original,
    /// Per-head, query-chunked computation that never holds the full score matrix
    /// (Apple's SPLIT_EINSUM idea): bounded memory for large images.
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

fn original(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4()?;
    let lk = k.dim(2)?;
    // The scores and their softmax: two (b·h, lq, lk) matrices.
    crate::memory::check("attention scores", 2 * (b * h * lq) as u64 * lk as u64 * q.dtype().size_in_bytes() as u64)?;
    let q = (q * scale)?.reshape((b * h, lq, d))?;
    let k = k.reshape((b * h, lk, d))?;
    let v = v.reshape((b * h, lk, d))?;
    let scores = q.matmul(&k.t()?)?;
    let scores = match mask {
        Some(m) => scores.reshape((b, h, lq, lk))?.broadcast_add(m)?.reshape((b * h, lq, lk))?,
        None => scores,
    };
    let probs = crate::layers::softmax_last_dim(&scores)?;
    probs.matmul(&v)?.reshape((b, h, lq, d))
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

    #[test]
    fn attention_kind_parses() {
        assert_eq!("split-einsum".parse::<AttentionKind>().unwrap(), AttentionKind::SplitEinsum);
        assert_eq!("ORIGINAL".parse::<AttentionKind>().unwrap(), AttentionKind::Original);
        assert!("fast".parse::<AttentionKind>().is_err());
    }
}
