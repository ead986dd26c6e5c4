//! Blocked multi-head attention on the CPU: softmax(q·kᵀ·scale)·v without the
//! (heads, queries, keys) score tensor.
//!
//! Work is split into (batch, head, block of [`QUERY_BLOCK`] queries) tasks spread over
//! Rayon's threads. Each task computes its scores (block × keys) into a scratch buffer
//! that belongs to its thread and is reused by every later task (no fresh pages), with one
//! GEMM from the `gemm` crate; turns them into unnormalised probabilities with the
//! vectorised [`super::exp`] in the same pass as the row sums; multiplies by v with a
//! second GEMM straight into the output; and divides each output row by its sum. Peak
//! extra memory is threads × block × keys floats (1 MiB per thread for 64×64 latents)
//! instead of 2 × batch × heads × queries × keys.
//!
//! Tensors stay token-major, (batch, tokens, heads·head_dim) as the projections make
//! them: a head is a strided view, so splitting and merging heads copies nothing. This
//! is the memory-efficient attention of Rabe & Staats (arXiv 2112.05682) with whole key
//! rows per block, which fit in cache at Stable Diffusion's sizes, so no online rescaling
//! is needed.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Query rows per task: 64 rows × 4096 keys of scores = 1 MiB, about one L2 cache.
pub const QUERY_BLOCK: usize = 64;

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Multi-head attention of token-major tensors.
///
/// `q`: (batch, q_len, heads·head_dim); `k`, `v`: (batch, kv_len, heads·head_dim); f32 on
/// the CPU (made contiguous here). Returns (batch, q_len, heads·head_dim), heads side by side
/// as the output projection expects. `scale` multiplies the scores (1/√head_dim in SD).
///
/// # Errors
/// Mismatched shapes, another device or dtype.
pub fn multi_head(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &Blocked { heads, scale: scale as f32 })
}

struct Blocked {
    heads: usize,
    scale: f32,
}

/// A pointer to the output shared by the tasks; each writes rows × columns no other touches.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint (token, head) blocks of the buffer behind the pointer.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl CustomOp3 for Blocked {
    fn name(&self) -> &'static str {
        "blocked-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let q = super::contiguous_f32(s1, l1, "attention q")?;
        let k = super::contiguous_f32(s2, l2, "attention k")?;
        let v = super::contiguous_f32(s3, l3, "attention v")?;
        let (b, lq, width) = l1.shape().dims3()?;
        let (bk, lk, wk) = l2.shape().dims3()?;
        if l3.shape().dims3()? != (bk, lk, wk) || bk != b || wk != width || width % self.heads != 0 || lk == 0 {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit {} heads",
                l1.shape(),
                l2.shape(),
                l3.shape(),
                self.heads
            );
        }
        let d = width / self.heads;
        let mut out = vec![0f32; b * lq * width];
        let dst = Out(out.as_mut_ptr());
        let blocks = lq.div_ceil(QUERY_BLOCK);
        (0..b * self.heads * blocks).into_par_iter().for_each(|task| {
            let (bh, blk) = (task / blocks, task % blocks);
            let (bi, hi) = (bh / self.heads, bh % self.heads);
            let row0 = blk * QUERY_BLOCK;
            let rows = QUERY_BLOCK.min(lq - row0);
            let head = |batch_len: usize, row: usize| (bi * batch_len + row) * width + hi * d;
            SCRATCH.with(|cell| {
                let mut scratch = cell.borrow_mut();
                if scratch.len() < rows * lk {
                    scratch.resize(QUERY_BLOCK * lk, 0.0);
                }
                let scores = &mut scratch[..rows * lk];
                // SAFETY: every pointer and stride addresses inside its slice: `rows` query
                // rows from `row0`, all `lk` key/value rows, `d` columns from the head's
                // offset, row stride `width`; the output block is this task's alone.
                unsafe {
                    // scores (rows × lk) = scale · q_blk (rows × d) · kᵀ (d × lk)
                    gemm::gemm(
                        rows, lk, d,
                        scores.as_mut_ptr(), 1, lk as isize,
                        false,
                        q.as_ptr().add(head(lq, row0)), 1, width as isize,
                        k.as_ptr().add(head(lk, 0)), width as isize, 1,
                        0.0, self.scale,
                        false, false, false,
                        gemm::Parallelism::None,
                    );
                }
                let mut sums = [0f32; QUERY_BLOCK];
                for (row, sum) in scores.chunks_exact_mut(lk).zip(sums.iter_mut()) {
                    let m = super::exp::max(row);
                    *sum = super::exp::exp_sub_sum(row, m);
                }
                let o = dst; // the whole wrapper moves into the closure, not its raw field
                // SAFETY: as above; the output rows of this block and head are written here only.
                unsafe {
                    let out0 = o.0.add(head(lq, row0));
                    // out_blk (rows × d) = p (rows × lk) · v (lk × d)
                    gemm::gemm(
                        rows, d, lk,
                        out0, 1, width as isize,
                        false,
                        scores.as_ptr(), 1, lk as isize,
                        v.as_ptr().add(head(lk, 0)), 1, width as isize,
                        0.0, 1.0,
                        false, false, false,
                        gemm::Parallelism::None,
                    );
                    for (r, sum) in sums[..rows].iter().enumerate() {
                        let inv = 1.0 / sum;
                        let row = std::slice::from_raw_parts_mut(out0.add(r * width), d);
                        row.iter_mut().for_each(|x| *x *= inv);
                    }
                }
            });
        });
        Ok((CpuStorage::F32(out), Shape::from((b, lq, width))))
    }
}
