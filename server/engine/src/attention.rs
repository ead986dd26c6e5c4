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
