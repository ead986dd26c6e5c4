//! Blocked multi-head attention on the CPU: softmax(q·kᵀ·scale)·v without the
//! (heads, queries, keys) score tensor.
//!
//! Work is split into (batch, head, block of [`QUERY_BLOCK`] queries) tasks spread over
//! Rayon's threads. Each task computes its scores (block × keys) into a scratch buffer
//! that belongs to its thread and is reused by every later task (no fresh pages), with one
//! GEMM from the `gemm` crate; turns them into unnormalised probabilities with the
//! vectorised [`super::exp`] in the same pass as the row sums; multiplies by v with a
//! second GEMM; and writes each output row divided by its sum. Peak extra memory is
//! threads × block × (keys + head_dim) floats (2 MiB per thread for 64×64 latents) plus
//! one transposed copy of v, instead of 2 × batch × heads × queries × keys.
//!
//! Layouts are chosen so the `gemm` crate never re-packs k or v for each block (that
//! copy cost as much as the arithmetic at head_dim 40): the score block and the block's
//! output are column-major (queries consecutive, gemm's native layout), k is read in place
//! as kᵀ with unit row stride, and v is transposed once per call so it is read with unit
//! row stride too. The softmax then runs across queries ([`super::exp::exp_columns`]).
//!
//! Tensors stay token-major, (batch, tokens, heads·head_dim) as the projections make
//! them: a head is a strided view, so splitting and merging heads copies nothing. This
//! is the memory-efficient attention of Rabe & Staats (arXiv 2112.05682) with whole key
//! rows per block, which fit in cache at Stable Diffusion's sizes, so no online rescaling
//! is needed.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Query rows per task: 128 rows × 4096 keys of scores = 2 MiB. Larger blocks give the
/// score GEMM more rows per pass over k (fewer loads of k per FLOP).
pub const QUERY_BLOCK: usize = 128;

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
        // vᵀ per sample: (width, lk), so a head's v (lk × d) has unit row stride.
        let mut vt = vec![0f32; b * width * lk];
        vt.par_chunks_mut(width * lk).zip(v.par_chunks(lk * width)).for_each(|(dst, src)| {
            for (j, row) in src.chunks_exact(width).enumerate() {
                for (i, x) in row.iter().enumerate() {
                    dst[i * lk + j] = *x;
                }
            }
        });
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
                if scratch.len() < QUERY_BLOCK * (lk + d) {
                    scratch.resize(QUERY_BLOCK * (lk + d), 0.0);
                }
                let (scores, block_out) = scratch.split_at_mut(rows * lk);
                let block_out = &mut block_out[..rows * d];
                // SAFETY: every pointer and stride addresses inside its slice: `rows` query
                // rows from `row0`, all `lk` key rows, `d` columns from the head's offset
                // (row stride `width`); this head's `d` rows of vᵀ (row stride `lk`); the
                // scratch blocks are this thread's.
                unsafe {
                    // scores (rows × lk, column-major) = scale · q_blk (rows × d) · kᵀ (d × lk)
                    gemm::gemm(
                        rows, lk, d,
                        scores.as_mut_ptr(), rows as isize, 1,
                        false,
                        q.as_ptr().add(head(lq, row0)), 1, width as isize,
                        k.as_ptr().add(head(lk, 0)), width as isize, 1,
                        0.0, self.scale,
                        false, false, false,
                        gemm::Parallelism::None,
                    );
                }
                let mut maxes = [0f32; QUERY_BLOCK];
                let mut sums = [0f32; QUERY_BLOCK];
                super::exp::exp_columns(scores, &mut maxes[..rows], &mut sums[..rows]);
                // SAFETY: as above.
                unsafe {
                    // block_out (rows × d, column-major) = p (rows × lk) · v (lk × d)
                    gemm::gemm(
                        rows, d, lk,
                        block_out.as_mut_ptr(), rows as isize, 1,
                        false,
                        scores.as_ptr(), rows as isize, 1,
                        vt.as_ptr().add((bi * width + hi * d) * lk), lk as isize, 1,
                        0.0, 1.0,
                        false, false, false,
                        gemm::Parallelism::None,
                    );
                }
                let o = dst; // the whole wrapper moves into the closure, not its raw field
                for (r, sum) in sums[..rows].iter().enumerate() {
                    let inv = 1.0 / sum;
                    // SAFETY: row `row0 + r` of this head: `d` floats this task alone writes.
                    let row = unsafe { std::slice::from_raw_parts_mut(o.0.add(head(lq, row0 + r)), d) };
                    for (i, x) in row.iter_mut().enumerate() {
                        *x = block_out[i * rows + r] * inv;
                    }
                }
            });
        });
        Ok((CpuStorage::F32(out), Shape::from((b, lq, width))))
    }
}
