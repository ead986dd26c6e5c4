//! Weight compression for Core ML packages: k-means palettization (a look-up table of
//! 2^bits values per tensor or per group of output channels, plus an n-bit index per
//! weight) and int8 linear quantization (per output channel, symmetric).
//!
//! Formats as Core ML's constexpr ops expect them (coremltools 9.0,
//! `mil/ops/defs/iOS16/constexpr_ops.py` and `iOS18/compression.py`):
//! - `constexpr_lut_to_dense`: indices bit-packed little-endian (index `i` takes bits
//!   `i·n … i·n+n−1` of the stream, least significant first); LUT sizes 16, 64, 256 for
//!   4, 6, 8 bits;
//! - `constexpr_affine_dequantize`: `w = scale[c] · (q − zero_point[c])` along axis 0.

/// How weight matrices are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Compression {
    /// k-means palettization to `bits` (4, 6 or 8); `group_size` output channels share one
    /// LUT (iOS 18 only; `None`: one LUT per tensor).
    Palettize { bits: u8, group_size: Option<usize> },
    /// int8, one scale per output channel.
    Int8,
}

/// A palettized tensor: `groups` LUTs of `2^bits` values, one index per weight.
#[derive(Debug, Clone)]
pub struct Palette {
    pub bits: u8,
    pub groups: usize,
    /// `groups × 2^bits` values, group-major.
    pub lut: Vec<f32>,
    pub indices: Vec<u8>,
}

impl Palette {
    /// The weights the LUTs and indices stand for.
    pub fn decode(&self) -> Vec<f32> {
        let k = 1usize << self.bits;
        let per_group = self.indices.len() / self.groups;
        self.indices.iter().enumerate().map(|(i, &ix)| self.lut[(i / per_group) * k + ix as usize]).collect()
    }
}

/// Palettizes `data` with k-means (Lloyd's algorithm on the sorted distinct values weighted
/// by their counts, started from quantiles, so it is deterministic) into `2^bits` clusters,
/// separately for `groups` equal contiguous chunks (rows of the output-channel axis).
///
/// # Panics
/// When `data.len()` is not a multiple of `groups` or `bits` is 0 or above 8.
pub fn palettize(data: &[f32], bits: u8, groups: usize) -> Palette {
    assert!((1..=8).contains(&bits), "1 to 8 bits");
    assert_eq!(data.len() % groups, 0, "groups must split the tensor evenly");
    let k = 1usize << bits;
    let chunk = data.len() / groups;
    let mut lut = Vec::with_capacity(groups * k);
    let mut indices = Vec::with_capacity(data.len());
    for g in data.chunks(chunk.max(1)) {
        let centroids = kmeans_1d(g, k);
        // Boundaries between neighbouring centroids: a value goes to the nearest one.
        let bounds: Vec<f32> = centroids.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        indices.extend(g.iter().map(|v| bounds.partition_point(|b| b < v) as u8));
        lut.extend_from_slice(&centroids);
    }
    Palette { bits, groups, lut, indices }
}

/// `k` sorted centroids of the values (padded with repeats when there are fewer distinct
/// values than `k`).
fn kmeans_1d(values: &[f32], k: usize) -> Vec<f32> {
    let mut sorted: Vec<f32> = values.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f32::total_cmp);
    let mut distinct: Vec<(f64, f64)> = Vec::new();
    for v in sorted {
        match distinct.last_mut() {
            Some((x, n)) if *x == f64::from(v) => *n += 1.0,
            _ => distinct.push((f64::from(v), 1.0)),
        }
    }
    if distinct.is_empty() {
        return vec![0.0; k];
    }
    if distinct.len() <= k {
        let mut c: Vec<f32> = distinct.iter().map(|(x, _)| *x as f32).collect();
        while c.len() < k {
            c.push(*c.last().expect("non-empty"));
        }
        return c;
    }
    // Start where an optimal quantizer puts its levels: at the quantiles of the density
    // raised to the power 1/3 (Panter and Dite, 1951), estimated from a histogram. Plain
    // quantiles crowd the levels in the middle and Lloyd's iterations stall there (4 %
    // instead of 2.4 % relative error for 6 bits on Gaussian weights).
    let (lo, hi) = (distinct[0].0, distinct[distinct.len() - 1].0);
    const BINS: usize = 4096;
    let mut hist = vec![0.0f64; BINS];
    for (x, n) in &distinct {
        let b = (((x - lo) / (hi - lo)) * BINS as f64) as usize;
        hist[b.min(BINS - 1)] += n;
    }
    let density: Vec<f64> = hist.iter().map(|h| h.cbrt()).collect();
    let total: f64 = density.iter().sum();
    let mut centroids = Vec::with_capacity(k);
    let (mut acc, mut j) = (0.0, 0);
    for (b, d) in density.iter().enumerate() {
        let before = acc;
        acc += d;
        while j < k && acc >= total * (j as f64 + 0.5) / k as f64 {
            // Linear position inside the bin.
            let t = if *d > 0.0 { (total * (j as f64 + 0.5) / k as f64 - before) / d } else { 0.5 };
            centroids.push(lo + (hi - lo) * (b as f64 + t) / BINS as f64);
            j += 1;
        }
    }
    while centroids.len() < k {
        centroids.push(hi);
    }
    for _ in 0..100 {
        let mut sums = vec![0.0f64; k];
        let mut counts = vec![0.0f64; k];
        let mut c = 0;
        for (x, n) in &distinct {
            while c + 1 < k && (x - centroids[c]).abs() > (x - centroids[c + 1]).abs() {
                c += 1;
            }
            sums[c] += x * n;
            counts[c] += n;
        }
        let mut moved = false;
        for i in 0..k {
            if counts[i] > 0.0 {
                let m = sums[i] / counts[i];
                if (m - centroids[i]).abs() > 1e-12 {
                    moved = true;
                }
                centroids[i] = m;
            }
        }
        // Empty clusters keep their place; keep the order for the boundary search.
        centroids.sort_by(f64::total_cmp);
        if !moved {
            break;
        }
    }
    centroids.into_iter().map(|c| c as f32).collect()
}

/// Packs `bits`-bit indices little-endian into bytes. Returns the bytes and the number of
/// unused bits in the last byte.
pub fn pack_bits(indices: &[u8], bits: u8) -> (Vec<u8>, u8) {
    let total = indices.len() * bits as usize;
    let mut out = vec![0u8; total.div_ceil(8)];
    for (i, &ix) in indices.iter().enumerate() {
        for b in 0..bits as usize {
            if (ix >> b) & 1 == 1 {
                let pos = i * bits as usize + b;
                out[pos / 8] |= 1 << (pos % 8);
            }
        }
    }
    (out, ((8 - total % 8) % 8) as u8)
}

/// An int8 tensor with one scale per row (output channel).
#[derive(Debug, Clone)]
pub struct Quantized {
    pub values: Vec<i8>,
    pub scales: Vec<f32>,
}

impl Quantized {
    pub fn decode(&self) -> Vec<f32> {
        let per_row = self.values.len() / self.scales.len();
        self.values.iter().enumerate().map(|(i, &q)| f32::from(q) * self.scales[i / per_row]).collect()
    }
}

/// Symmetric int8 quantization per row: `scale = max|w| / 127`, `q = round(w / scale)`.
pub fn quantize_int8(data: &[f32], rows: usize) -> Quantized {
    let per_row = data.len() / rows;
    let mut values = Vec::with_capacity(data.len());
    let mut scales = Vec::with_capacity(rows);
    for row in data.chunks(per_row) {
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
        scales.push(scale);
        values.extend(row.iter().map(|v| (v / scale).round().clamp(-127.0, 127.0) as i8));
    }
    Quantized { values, scales }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_pack_little_endian() {
        // 4-bit indices 1, 2, 3 → bytes 0x21, 0x03 (4 bits unused).
        assert_eq!(pack_bits(&[1, 2, 3], 4), (vec![0x21, 0x03], 4));
        // 6-bit 63, 1 → bits 111111 100000 → 0b0111_1111, 0b0000_0000 | ..
        assert_eq!(pack_bits(&[63, 1], 6), (vec![0x7F, 0x00], 4));
        assert_eq!(pack_bits(&[255, 0], 8), (vec![0xFF, 0x00], 0));
    }

    #[test]
    fn kmeans_finds_the_clusters() {
        // Four tight clusters → their means, indices pointing at them.
        let mut data = Vec::new();
        for c in [-1.0f32, 0.0, 0.5, 2.0] {
            data.extend([c - 0.01, c, c + 0.01]);
        }
        let p = palettize(&data, 2, 1);
        for (got, want) in p.lut.iter().zip([-1.0f32, 0.0, 0.5, 2.0]) {
            assert!((got - want).abs() < 1e-6, "{:?}", p.lut);
        }
        assert_eq!(p.indices, vec![0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]);
        let err = data.iter().zip(p.decode()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err <= 0.0100001, "{err}");
        // Per-group LUTs: each half gets its own table.
        let two = palettize(&[0.0, 1.0, 10.0, 11.0], 1, 2);
        assert_eq!(two.lut, vec![0.0, 1.0, 10.0, 11.0]);
        assert_eq!(two.decode(), vec![0.0, 1.0, 10.0, 11.0]);
    }

    #[test]
    fn six_bits_on_gaussian_weights_reach_the_optimal_quantizer() {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let data: Vec<f32> = (0..16384).map(|_| rand_distr::StandardNormal.sample(&mut rng)).collect();
        let p = palettize(&data, 6, 1);
        let (e, n) = data.iter().zip(p.decode()).fold((0f64, 0f64), |(e, n), (a, b)| (e + f64::from(a - b).powi(2), n + f64::from(*a).powi(2)));
        let rel = (e / n).sqrt();
        // Lloyd–Max for a Gaussian at 64 levels: MSE 6.4e-4 σ², i.e. 2.5 % relative.
        assert!(rel < 0.027, "relative error {rel}");
    }

    #[test]
    fn int8_is_symmetric_per_row() {
        let q = quantize_int8(&[1.27, -0.635, 0.0, 0.5, 0.25, -0.5], 2);
        assert_eq!(q.values, vec![127, -64, 0, 127, 64, -127]);
        assert!((q.scales[0] - 0.01).abs() < 1e-7 && (q.scales[1] - 0.5 / 127.0).abs() < 1e-9);
    }
}
