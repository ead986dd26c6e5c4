//! `exp` over f32 slices, vectorised, for softmax.
//!
//! Method (Cephes `expf`, S. L. Moshier): x = n·ln 2 + r with n = round(x / ln 2) and
//! |r| ≤ ln 2 / 2 (Cody–Waite: ln 2 split in a high part exact in float and a low
//! correction), eʳ ≈ 1 + r + r²·P(r) with Cephes' degree-5 P, and 2ⁿ built from the
//! exponent bits. Relative error ≤ 2·10⁻⁷ over [-87.3, 88.3] (tested against `f64::exp`);
//! inputs below −87.3 give the smallest normal float instead of a denormal or 0, which
//! softmax cannot tell apart, and inputs above 88.37 give +∞ (2ⁿ with n = 128), though e^x
//! is finite up to 88.72: softmax only takes x ≤ 0. Plain arithmetic in fixed-width lanes, so the compiler
//! vectorises it (16 lanes with AVX-512); scalar `expf` costs ~16× more here.

use super::dispatch;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5·2²³: adding then subtracting it rounds a float of magnitude < 2²² to an integer.
const ROUND: f32 = 12_582_912.0;
/// ln(2⁻¹²⁶): the smallest exponent kept normal.
const MIN_X: f32 = -87.336_55;
/// Just below ln(2¹²⁸).
const MAX_X: f32 = 88.722_83;
/// Lanes processed together: one AVX-512 register.
const LANES: usize = 16;

/// exp of one float; inlined into vectorised loops (here and in [`super::norm`]).
#[inline(always)]
pub(crate) fn exp1(x: f32) -> f32 {
    let x = x.max(MIN_X).min(MAX_X);
    // t holds n = round(x / ln 2) in its low mantissa bits (its ulp is 1).
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r
        + 5.000_000_1e-1;
    let e = p * (r * r) + r + 1.0;
    // 2ⁿ for n in [-126, 128]: the biased exponent n + 127 (1..=255) is the low byte of
    // t + 127's bits; shifted into the exponent field it is 2ⁿ (n = 128 gives +∞, as
    // e^88.72… overflows anyway). All float and bit operations, no integer conversion or
    // checked add: that keeps the loop vectorised in builds with overflow checks (a
    // checked `n as i32 + 127` made it scalar, 3.5 ns per element).
    e * f32::from_bits((t + 127.0).to_bits() << 23)
}

#[inline(always)]
fn exp_sub_sum_generic(xs: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (a, x) in acc.iter_mut().zip(chunk.iter_mut()) {
            *x = exp1(*x - shift);
            *a += *x;
        }
    }
    let mut sum = 0f32;
    for x in chunks.into_remainder() {
        *x = exp1(*x - shift);
        sum += *x;
    }
    acc.iter().sum::<f32>() + sum
}

#[inline(always)]
fn max_generic(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, x) in acc.iter_mut().zip(chunk) {
            *a = a.max(*x);
        }
    }
    chunks.remainder().iter().chain(acc.iter()).fold(f32::NEG_INFINITY, |m, x| m.max(*x))
}

#[inline(always)]
fn exp_generic(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = exp1(*x);
    }
}

#[inline(always)]
fn exp_columns_generic(xs: &mut [f32], maxes: &mut [f32], sums: &mut [f32]) {
    let rows = sums.len();
    maxes.fill(f32::NEG_INFINITY);
    for col in xs.chunks_exact(rows) {
        for (m, x) in maxes.iter_mut().zip(col) {
            *m = m.max(*x);
        }
    }
    sums.fill(0.0);
    for col in xs.chunks_exact_mut(rows) {
        for ((s, x), m) in sums.iter_mut().zip(col.iter_mut()).zip(maxes.iter()) {
            *x = exp1(*x - *m);
            *s += *x;
        }
    }
}

dispatch! {
    /// The unnormalised softmax of each row of a column-major (rows × cols) block, in
    /// place: `xs[j·rows + r] = exp(xs[j·rows + r] − max_j xs[j·rows + r])`, with
    /// `rows = sums.len()`, each row's max left in `maxes` and its sum in `sums`. Vectorised
    /// across rows (consecutive in memory), which is how the attention kernel's GEMM writes
    /// its scores. `xs.len()` must be a multiple of `rows`; `maxes` as long as `sums`.
    pub fn exp_columns(xs: &mut [f32], maxes: &mut [f32], sums: &mut [f32]) -> () => exp_columns_generic
}

dispatch! {
    /// In place `xs[i] = exp(xs[i] - shift)`; returns the sum of the results (f32, summed
    /// in 16 partial sums).
    pub fn exp_sub_sum(xs: &mut [f32], shift: f32) -> f32 => exp_sub_sum_generic
}

dispatch! {
    /// The largest element (−∞ for an empty slice; NaNs are skipped).
    pub fn max(xs: &[f32]) -> f32 => max_generic
}

dispatch! {
    /// In place `xs[i] = exp(xs[i])`.
    pub fn exp(xs: &mut [f32]) -> () => exp_generic
}

/// Softmax of each `row_len`-long row of `xs`, in place; rows spread over Rayon's threads.
pub fn softmax_rows(xs: &mut [f32], row_len: usize) {
    use rayon::prelude::*;
    xs.par_chunks_exact_mut(row_len).for_each(|row| {
        let m = max(row);
        let inv = 1.0 / exp_sub_sum(row, m);
        row.iter_mut().for_each(|x| *x *= inv);
    });
}

/// Softmax over the last dimension of a contiguous f32 CPU tensor, written over its own
/// storage (Candle's `softmax_last_dim` allocates a second tensor as large as the input:
/// 512 MiB per sample for SD-1.5's 4096-token self-attention scores).
///
/// # Errors
/// Another device or dtype, or a strided layout.
pub fn softmax_last_dim_in_place(xs: &candle_core::Tensor) -> candle_core::Result<()> {
    struct Softmax;
    impl candle_core::InplaceOp1 for Softmax {
        fn name(&self) -> &'static str {
            "softmax-in-place"
        }
        fn cpu_fwd(&self, storage: &mut candle_core::CpuStorage, layout: &candle_core::Layout) -> candle_core::Result<()> {
            let row_len = layout.dims().last().copied().unwrap_or(1).max(1);
            softmax_rows(super::contiguous_f32_mut(storage, layout, "softmax in place")?, row_len);
            Ok(())
        }
    }
    xs.inplace_op1(&Softmax)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_f64_exp_to_two_ulp_over_the_whole_range() {
        let mut xs: Vec<f32> = (0..200_001).map(|i| -87.3 + 175.6 * i as f32 / 200_000.0).collect();
        xs.extend([0.0, -0.0, 1.0, -1.0, 1e-8, -1e-8, 0.5 * std::f32::consts::LN_2, 88.3, -87.33]);
        let mut ys = xs.clone();
        exp(&mut ys);
        let mut worst = 0f64;
        for (x, y) in xs.iter().zip(&ys) {
            let want = (*x as f64).exp();
            let rel = ((*y as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 2e-7, "worst relative error {worst:e}");
        // Hand-checked values.
        let mut v = [0f32, 1.0, -1.0, 10.0];
        exp(&mut v);
        assert_eq!(v[0], 1.0);
        assert!((v[1] - std::f32::consts::E).abs() < 4e-7, "{}", v[1]);
        assert!((v[2] - 0.367_879_44).abs() < 1e-7, "{}", v[2]);
        assert!((v[3] - 22_026.465).abs() < 0.01, "{}", v[3]);
    }

    #[test]
    fn extremes_saturate_instead_of_wrapping() {
        let mut v = [-1000f32, -88.0, 89.0, f32::NEG_INFINITY];
        exp(&mut v);
        assert!(v[0] >= 0.0 && v[0] < 1.2e-38, "{}", v[0]);
        assert!(v[1] < 1.2e-38 * 1.01, "{}", v[1]);
        assert!(v[2].is_infinite() || v[2] > 3e38, "{}", v[2]);
        assert!(v[3] < 1.2e-38, "{}", v[3]);
    }

    #[test]
    fn every_compiled_variant_agrees_with_the_baseline() {
        // Lengths around the lane count exercise the remainder loop.
        for n in [0usize, 1, 15, 16, 17, 100, 4099] {
            let xs: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0).collect();
            let mut a = xs.clone();
            let sa = exp_sub_sum(&mut a, 2.5);
            let mut b = xs.clone();
            let sb = exp_sub_sum_generic(&mut b, 2.5);
            assert_eq!(a, b, "n={n}");
            assert!((sa - sb).abs() <= 1e-6 * sb.abs().max(1.0), "n={n}: {sa} vs {sb}");
            assert_eq!(max(&xs), max_generic(&xs));
            let want = xs.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x));
            assert_eq!(max(&xs), want);
        }
    }

    #[test]
    fn column_block_softmax_matches_the_row_softmax() {
        // A column-major 37 × 53 block against its row-major transpose.
        let (rows, cols) = (37, 53);
        let col_major: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.71).sin() * 30.0).collect();
        let mut row_major = vec![0f32; rows * cols];
        for j in 0..cols {
            for r in 0..rows {
                row_major[r * cols + j] = col_major[j * rows + r];
            }
        }
        let mut got = col_major.clone();
        let (mut maxes, mut sums) = (vec![0f32; rows], vec![0f32; rows]);
        exp_columns(&mut got, &mut maxes, &mut sums);
        for r in 0..rows {
            let row = &mut row_major[r * cols..(r + 1) * cols];
            let m = max(row);
            assert_eq!(maxes[r], m);
            let s = exp_sub_sum(row, m);
            assert!((sums[r] - s).abs() <= 1e-6 * s, "row {r}: {} vs {s}", sums[r]);
            for j in 0..cols {
                assert_eq!(got[j * rows + r], row[j], "({r}, {j})");
            }
        }
        let mut baseline = col_major.clone();
        let (mut m2, mut s2) = (vec![0f32; rows], vec![0f32; rows]);
        exp_columns_generic(&mut baseline, &mut m2, &mut s2);
        assert_eq!(got, baseline);
        assert_eq!(sums, s2);
    }

    #[test]
    fn softmax_in_place_matches_candle() -> candle_core::Result<()> {
        let xs = candle_core::Tensor::randn(0f32, 5., (3, 4, 257), &candle_core::Device::Cpu)?;
        let want = candle_nn::ops::softmax_last_dim(&xs)?;
        let ys = xs.copy()?;
        softmax_last_dim_in_place(&ys)?;
        let diff = (&ys - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        // Probabilities ≤ 1: a few float ulps (6·10⁻⁸ each) from another exp and sum order.
        assert!(diff < 1e-6, "differs by {diff}");
        assert!(softmax_last_dim_in_place(&xs.transpose(1, 2)?).is_err(), "a strided view is refused");
        Ok(())
    }

    #[test]
    fn softmax_rows_sum_to_one_and_match_the_definition() {
        let mut xs: Vec<f32> = (0..3 * 37).map(|i| (i as f32 * 0.37).sin() * 20.0).collect();
        let orig = xs.clone();
        softmax_rows(&mut xs, 37);
        for (row, src) in xs.chunks(37).zip(orig.chunks(37)) {
            let m = src.iter().cloned().fold(f64::NEG_INFINITY, |a, b| a.max(b as f64));
            let z: f64 = src.iter().map(|x| (*x as f64 - m).exp()).sum();
            for (p, x) in row.iter().zip(src) {
                let want = ((*x as f64 - m).exp() / z) as f32;
                assert!((p - want).abs() < 1e-6, "{p} vs {want}");
            }
        }
    }
}
