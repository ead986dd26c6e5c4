//! No-reference image quality: six measurements of one 8-bit RGB image (seven with a style
//! active), each mapped to a score in [0, 1] where 1 is better, and one combined score.
//!
//! All measurements work on the luma `Y = 0.299 R + 0.587 G + 0.114 B` (0..255) unless said.
//!
//! | metric | raw value | score |
//! |---|---|---|
//! | noise | `σ = median |Y ∗ N| / (0.6745 · 6)` over the interior pixels, `N = [1 −2 1; −2 4 −2; 1 −2 1]` (Immerkær's mask, which cancels flat areas and linear ramps; for Gaussian noise `Y ∗ N ~ N(0, 36σ²)`, and the median keeps the few pixels on edges from counting as noise), 0..255 units | `1 − min(σ / 20, 1)` |
//! | sharpness | variance of the 4-neighbour Laplacian of `Y` minus the `20 σ²` that noise of level `σ` adds to it (the kernel's squared weights sum to 20), floored at 0 | `min(ln(1 + s) / ln(1 + 4000), 1)` |
//! | contrast | RMS contrast: mean over R, G, B of the channel's standard deviation, / 255 | `min(c / 0.3, 1)` |
//! | exposure | clipped fraction: pixels with a channel at ≤ 2 or ≥ 253 (crushed shadows, blown highlights) | `1 − clipped` |
//! | colourfulness | Hasler & Süsstrunk's `M` ([`colourfulness`]) | `min(M / 109, 1)` (109: their "extremely colourful") |
//! | blockiness | `R = (mean |ΔY| across the 8-pixel block grid + 1) / (mean |ΔY| elsewhere + 1)`, horizontal and vertical together (JPEG-style block edges make `R > 1`) | `1 − min(max(R − 1, 0) / 2, 1)` |
//! | style | style similarity to the active style's training images ([`crate::style::metrics::style_similarity`]), in (0, 1] | the similarity itself |
//!
//! The combined score is the weighted mean of the scores present, with [`Weights`]
//! (defaults: sharpness 0.25, noise 0.25, contrast 0.15, exposure 0.15, colourfulness 0.1,
//! blockiness 0.1, style 0.3); a metric whose weight is 0 takes no part.
//!
//! Two of the measurements are used on their own elsewhere (starter evaluation, style
//! metrics): [`laplacian_variance`] (sharpness before the noise correction) and
//! [`colourfulness`].

use image::RgbImage;
use serde::{Deserialize, Serialize};

/// One value per metric: raw measurements, scores in [0, 1], weights, or differences of these.
/// `style` is `None` when no style is active.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Metrics {
    pub sharpness: f64,
    pub noise: f64,
    pub contrast: f64,
    pub exposure: f64,
    pub colourfulness: f64,
    pub blockiness: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub style: Option<f64>,
}

/// The metric names, in the order [`Metrics::values`] lists them.
pub const METRIC_NAMES: [&str; 7] = ["sharpness", "noise", "contrast", "exposure", "colourfulness", "blockiness", "style"];

impl Metrics {
    /// `(name, value)` for every metric present.
    pub fn values(&self) -> Vec<(&'static str, f64)> {
        let all = [
            Some(self.sharpness),
            Some(self.noise),
            Some(self.contrast),
            Some(self.exposure),
            Some(self.colourfulness),
            Some(self.blockiness),
            self.style,
        ];
        METRIC_NAMES.iter().zip(all).filter_map(|(n, v)| v.map(|v| (*n, v))).collect()
    }

    /// The value named `name` (one of [`METRIC_NAMES`]).
    pub fn get(&self, name: &str) -> Option<f64> {
        self.values().into_iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    fn zip_with(&self, other: &Metrics, f: impl Fn(f64, f64) -> f64) -> Metrics {
        Metrics {
            sharpness: f(self.sharpness, other.sharpness),
            noise: f(self.noise, other.noise),
            contrast: f(self.contrast, other.contrast),
            exposure: f(self.exposure, other.exposure),
            colourfulness: f(self.colourfulness, other.colourfulness),
            blockiness: f(self.blockiness, other.blockiness),
            style: self.style.zip(other.style).map(|(a, b)| f(a, b)),
        }
    }

    /// `self − other`, metric by metric.
    pub fn minus(&self, other: &Metrics) -> Metrics {
        self.zip_with(other, |a, b| a - b)
    }

    /// The mean of a set (all zeros for an empty one; `style` only if every item has it).
    pub fn mean(items: &[Metrics]) -> Metrics {
        let Some(first) = items.first() else { return Metrics::default() };
        let mut sum = items[1..].iter().fold(*first, |acc, m| acc.zip_with(m, |a, b| a + b));
        let n = items.len() as f64;
        sum = sum.zip_with(&sum, |a, _| a / n);
        sum
    }
}

/// Weights of the combined score; configurable per request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Weights {
    pub sharpness: f64,
    pub noise: f64,
    pub contrast: f64,
    pub exposure: f64,
    pub colourfulness: f64,
    pub blockiness: f64,
    pub style: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Self { sharpness: 0.25, noise: 0.25, contrast: 0.15, exposure: 0.15, colourfulness: 0.1, blockiness: 0.1, style: 0.3 }
    }
}

impl Weights {
    /// The field of the metric `name`: the one place metric names meet weight fields.
    fn slot(&mut self, name: &str) -> Option<&mut f64> {
        Some(match name {
            "sharpness" => &mut self.sharpness,
            "noise" => &mut self.noise,
            "contrast" => &mut self.contrast,
            "exposure" => &mut self.exposure,
            "colourfulness" => &mut self.colourfulness,
            "blockiness" => &mut self.blockiness,
            "style" => &mut self.style,
            _ => return None,
        })
    }

    /// The weight of the metric `name`.
    pub fn get(&self, name: &str) -> Option<f64> {
        let mut copy = *self;
        copy.slot(name).map(|w| *w)
    }

    /// Sets one weight; refuses unknown names and negative or non-finite values.
    pub fn set(&mut self, name: &str, value: f64) -> Result<(), String> {
        if !(value.is_finite() && value >= 0.0) {
            return Err(format!("the weight of {name} must be a number ≥ 0, not {value}"));
        }
        let slot = self.slot(name).ok_or_else(|| format!("no metric named {name:?} (known: {})", METRIC_NAMES.join(", ")))?;
        *slot = value;
        Ok(())
    }

    /// Parses `name=value,name=value` over the defaults.
    pub fn parse(text: &str) -> Result<Weights, String> {
        let mut w = Weights::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part.split_once('=').ok_or_else(|| format!("expected name=value, got {part:?}"))?;
            let value: f64 = value.trim().parse().map_err(|_| format!("{:?} is not a number", value.trim()))?;
            w.set(name.trim(), value)?;
        }
        w.check()?;
        Ok(w)
    }

    /// Refuses weights that are all zero (or invalid).
    pub fn check(&self) -> Result<(), String> {
        for name in METRIC_NAMES {
            let v = self.get(name).unwrap_or(0.0);
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("the weight of {name} must be a number ≥ 0, not {v}"));
            }
        }
        if METRIC_NAMES.iter().all(|n| self.get(n) == Some(0.0)) {
            return Err("at least one metric needs a weight above 0".into());
        }
        Ok(())
    }

    /// The weighted mean of the scores present (metrics with weight 0 take no part).
    pub fn combine(&self, scores: &Metrics) -> f64 {
        let (mut sum, mut total) = (0.0, 0.0);
        for (name, s) in scores.values() {
            let w = self.get(name).unwrap_or(0.0);
            sum += w * s;
            total += w;
        }
        if total > 0.0 { sum / total } else { 0.0 }
    }
}

/// What [`assess`] finds in one image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Assessment {
    pub raw: Metrics,
    pub scores: Metrics,
    pub combined: f64,
}

const NOISE_SCALE: f64 = 20.0;
const SHARPNESS_REF: f64 = 4000.0;
const CONTRAST_REF: f64 = 0.3;
const COLOURFULNESS_REF: f64 = 109.0;
const BLOCK: u32 = 8;

/// Measures `img`; `style` is the style similarity when a style is active.
pub fn assess(img: &RgbImage, style: Option<f64>, weights: &Weights) -> Assessment {
    let raw = measure(img, style);
    let scores = score(&raw);
    Assessment { raw, scores, combined: weights.combine(&scores) }
}

/// The raw measurements of `img` (see the module documentation).
pub fn measure(img: &RgbImage, style: Option<f64>) -> Metrics {
    let y = luma(img);
    let (w, h) = img.dimensions();
    let sigma = noise_sigma(&y, w, h);
    let lap = laplacian_variance_of(&y, w, h);
    Metrics {
        sharpness: (lap - 20.0 * sigma * sigma).max(0.0),
        noise: sigma,
        contrast: rms_contrast(img),
        exposure: clipped_fraction(img),
        colourfulness: colourfulness(img),
        blockiness: blockiness(&y, w, h),
        style,
    }
}

/// Maps raw measurements to scores in [0, 1] (1 = better).
pub fn score(raw: &Metrics) -> Metrics {
    Metrics {
        sharpness: ((1.0 + raw.sharpness).ln() / (1.0 + SHARPNESS_REF).ln()).clamp(0.0, 1.0),
        noise: 1.0 - (raw.noise / NOISE_SCALE).clamp(0.0, 1.0),
        contrast: (raw.contrast / CONTRAST_REF).clamp(0.0, 1.0),
        exposure: (1.0 - raw.exposure).clamp(0.0, 1.0),
        colourfulness: (raw.colourfulness / COLOURFULNESS_REF).clamp(0.0, 1.0),
        blockiness: 1.0 - ((raw.blockiness - 1.0).max(0.0) / 2.0).min(1.0),
        style: raw.style.map(|s| s.clamp(0.0, 1.0)),
    }
}

fn luma(img: &RgbImage) -> Vec<f64> {
    img.pixels().map(|p| 0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64).collect()
}

/// Variance of the 3×3 Laplacian `[0,1,0; 1,-4,1; 0,1,0]` of the luma
/// (0.299 R + 0.587 G + 0.114 B, in 0..255 units) over the interior pixels (those with all
/// four neighbours). Low values mean a blurry image, high values edges or noise. Images
/// smaller than 3×3 give 0.
pub fn laplacian_variance(img: &RgbImage) -> f64 {
    let (w, h) = img.dimensions();
    laplacian_variance_of(&luma(img), w, h)
}

/// [`laplacian_variance`] of a luma plane `y` of `w` × `h` pixels.
fn laplacian_variance_of(y: &[f64], w: u32, h: u32) -> f64 {
    if w < 3 || h < 3 {
        return 0.0;
    }
    let at = |x: u32, r: u32| y[(r * w + x) as usize];
    let (mut sum, mut sum_sq, mut n) = (0.0, 0.0, 0.0);
    for r in 1..h - 1 {
        for x in 1..w - 1 {
            let v = at(x - 1, r) + at(x + 1, r) + at(x, r - 1) + at(x, r + 1) - 4.0 * at(x, r);
            sum += v;
            sum_sq += v * v;
            n += 1.0;
        }
    }
    let mean = sum / n;
    (sum_sq / n - mean * mean).max(0.0)
}

/// Hasler & Süsstrunk's (2003) colourfulness `M`: with `rg = R − G`, `yb = (R + G)/2 − B`,
/// `M = √(σ_rg² + σ_yb²) + 0.3·√(μ_rg² + μ_yb²)` (0 for grey images).
pub fn colourfulness(img: &RgbImage) -> f64 {
    let n = img.pixels().len().max(1) as f64;
    let (mut s_rg, mut s_yb, mut q_rg, mut q_yb) = (0.0, 0.0, 0.0, 0.0);
    for p in img.pixels() {
        let (r, g, b) = (p[0] as f64, p[1] as f64, p[2] as f64);
        let rg = r - g;
        let yb = 0.5 * (r + g) - b;
        s_rg += rg;
        s_yb += yb;
        q_rg += rg * rg;
        q_yb += yb * yb;
    }
    let (m_rg, m_yb) = (s_rg / n, s_yb / n);
    let (v_rg, v_yb) = ((q_rg / n - m_rg * m_rg).max(0.0), (q_yb / n - m_yb * m_yb).max(0.0));
    (v_rg + v_yb).sqrt() + 0.3 * (m_rg * m_rg + m_yb * m_yb).sqrt()
}

/// Robust noise level: the median absolute response to Immerkær's (1996) mask, scaled to σ
/// for Gaussian noise (the mask's squared weights sum to 36; a normal's median absolute
/// value is 0.6745 σ).
fn noise_sigma(y: &[f64], w: u32, h: u32) -> f64 {
    if w < 3 || h < 3 {
        return 0.0;
    }
    let (w, h) = (w as usize, h as usize);
    let at = |x: usize, yy: usize| y[yy * w + x];
    let mut responses = Vec::with_capacity((w - 2) * (h - 2));
    for r in 1..h - 1 {
        for c in 1..w - 1 {
            let v = at(c - 1, r - 1) - 2.0 * at(c, r - 1) + at(c + 1, r - 1) - 2.0 * at(c - 1, r) + 4.0 * at(c, r)
                - 2.0 * at(c + 1, r)
                + at(c - 1, r + 1)
                - 2.0 * at(c, r + 1)
                + at(c + 1, r + 1);
            responses.push(v.abs());
        }
    }
    let mid = responses.len() / 2;
    let (_, median, _) = responses.select_nth_unstable_by(mid, f64::total_cmp);
    *median / (0.6745 * 6.0)
}

fn rms_contrast(img: &RgbImage) -> f64 {
    let n = img.pixels().len().max(1) as f64;
    let mut total = 0.0;
    for c in 0..3 {
        let (mut s, mut q) = (0.0, 0.0);
        for p in img.pixels() {
            let v = p[c] as f64;
            s += v;
            q += v * v;
        }
        let m = s / n;
        total += (q / n - m * m).max(0.0).sqrt();
    }
    total / 3.0 / 255.0
}

fn clipped_fraction(img: &RgbImage) -> f64 {
    let n = img.pixels().len();
    if n == 0 {
        return 0.0;
    }
    img.pixels().filter(|p| p.0.iter().any(|&v| v <= 2 || v >= 253)).count() as f64 / n as f64
}

fn blockiness(y: &[f64], w: u32, h: u32) -> f64 {
    let (w, h) = (w as usize, h as usize);
    let (mut edge, mut edge_n, mut inside, mut inside_n) = (0.0, 0usize, 0.0, 0usize);
    let mut add = |d: f64, on_grid: bool| {
        if on_grid {
            edge += d;
            edge_n += 1;
        } else {
            inside += d;
            inside_n += 1;
        }
    };
    for r in 0..h {
        for c in 1..w {
            add((y[r * w + c] - y[r * w + c - 1]).abs(), c % BLOCK as usize == 0);
        }
    }
    for r in 1..h {
        for c in 0..w {
            add((y[r * w + c] - y[(r - 1) * w + c]).abs(), r % BLOCK as usize == 0);
        }
    }
    if edge_n == 0 || inside_n == 0 {
        return 1.0;
    }
    (edge / edge_n as f64 + 1.0) / (inside / inside_n as f64 + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(v: u8) -> RgbImage {
        RgbImage::from_pixel(32, 32, image::Rgb([v, v, v]))
    }

    #[test]
    fn laplacian_of_flat_and_checkerboard() {
        use image::Rgb;
        let flat = RgbImage::from_pixel(16, 16, Rgb([90, 10, 200]));
        assert_eq!(laplacian_variance(&flat), 0.0);
        // One-pixel black/white checkerboard: luma 0 or 255 (the weights sum to 1), so
        // the Laplacian is +4·255 on black and −4·255 on white pixels; a 14×14 interior
        // holds as many of each, so the mean is 0 and the variance (4·255)² = 1 040 400.
        let board = RgbImage::from_fn(16, 16, |x, y| if (x + y) % 2 == 0 { Rgb([255; 3]) } else { Rgb([0; 3]) });
        assert!((laplacian_variance(&board) - 1_040_400.0).abs() < 1e-6, "{}", laplacian_variance(&board));
        // A vertical step edge of height 100 in luma: the Laplacian is ±100 on the two
        // columns beside it (2 of 8 interior columns, 8 rows), 0 elsewhere: mean 0,
        // variance (2·8·100²)/(8·8) = 2500.
        let step = RgbImage::from_fn(10, 10, |x, _| if x < 5 { Rgb([0; 3]) } else { Rgb([100; 3]) });
        assert!((laplacian_variance(&step) - 2500.0).abs() < 1e-6, "{}", laplacian_variance(&step));
    }

    #[test]
    fn colourfulness_of_grey_and_of_colour() {
        let grey = RgbImage::from_pixel(8, 8, image::Rgb([120, 120, 120]));
        assert_eq!(colourfulness(&grey), 0.0);
        // Uniform red: rg = 255, yb = 127.5, no spread → 0.3·√(255² + 127.5²).
        let red = RgbImage::from_pixel(8, 8, image::Rgb([255, 0, 0]));
        assert!((colourfulness(&red) - 0.3 * (255f64.powi(2) + 127.5f64.powi(2)).sqrt()).abs() < 1e-9);
    }

    #[test]
    fn flat_grey_is_noiseless_flat_and_unclipped() {
        let m = measure(&flat(128), None);
        assert_eq!((m.noise, m.sharpness, m.contrast, m.exposure, m.colourfulness), (0.0, 0.0, 0.0, 0.0, 0.0));
        assert_eq!(m.blockiness, 1.0);
        assert_eq!(measure(&flat(0), None).exposure, 1.0);
    }

    #[test]
    fn noise_estimate_matches_the_added_noise() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let normal = rand_distr::Normal::new(0.0f64, 10.0).unwrap();
        let img = RgbImage::from_fn(128, 128, |_, _| {
            let v = (128.0 + rng.sample(normal)).round().clamp(0.0, 255.0) as u8;
            image::Rgb([v, v, v])
        });
        let m = measure(&img, None);
        assert!((m.noise - 10.0).abs() < 0.6, "σ̂ = {}", m.noise);
        // White noise adds 20σ² to the Laplacian variance, and the correction removes it.
        assert!(m.sharpness < 0.1 * 20.0 * 100.0, "sharpness {}", m.sharpness);
    }

    #[test]
    fn block_edges_raise_blockiness() {
        // 8×8 blocks of alternating flat values: every change lies on the grid.
        let img = RgbImage::from_fn(32, 32, |x, y| {
            let v = if (x / 8 + y / 8) % 2 == 0 { 100 } else { 140 };
            image::Rgb([v, v, v])
        });
        assert!((measure(&img, None).blockiness - 41.0).abs() < 1e-9);
        // The same pattern shifted off the grid by 4 pixels is not blocky.
        let shifted = RgbImage::from_fn(32, 32, |x, y| {
            let v = if ((x + 4) / 8 + (y + 4) / 8) % 2 == 0 { 100 } else { 140 };
            image::Rgb([v, v, v])
        });
        assert!(measure(&shifted, None).blockiness < 1.0);
    }

    #[test]
    fn weights_parse_combine_and_refuse() {
        let w = Weights::parse("sharpness=1, noise=0,contrast=0,exposure=0,colourfulness=0,blockiness=0").unwrap();
        let s = Metrics { sharpness: 0.7, noise: 0.1, ..Default::default() };
        assert!((w.combine(&s) - 0.7).abs() < 1e-12);
        // Style counts only when present.
        let w = Weights::parse("sharpness=1,noise=0,contrast=0,exposure=0,colourfulness=0,blockiness=0,style=1").unwrap();
        assert!((w.combine(&Metrics { style: Some(0.3), ..s }) - 0.5).abs() < 1e-12);
        assert!((w.combine(&s) - 0.7).abs() < 1e-12);
        assert!(Weights::parse("sharpnes=1").unwrap_err().contains("known: sharpness"));
        assert!(Weights::parse("noise=-1").is_err());
        assert!(Weights::parse("noise").is_err());
        assert!(Weights::parse("sharpness=0,noise=0,contrast=0,exposure=0,colourfulness=0,blockiness=0,style=0").is_err());
        let d = Weights::default();
        // Flat grey: perfect noise, exposure and blockiness scores, nothing else.
        assert!((d.combine(&score(&measure(&flat(128), None))) - (0.25 + 0.15 + 0.1) / 1.0).abs() < 1e-12);
    }

    #[test]
    fn mean_and_difference() {
        let a = Metrics { sharpness: 1.0, style: Some(0.5), ..Default::default() };
        let b = Metrics { sharpness: 3.0, style: Some(1.0), ..Default::default() };
        let m = Metrics::mean(&[a, b]);
        assert_eq!((m.sharpness, m.style), (2.0, Some(0.75)));
        assert_eq!(b.minus(&a).sharpness, 2.0);
        assert_eq!(Metrics::mean(&[a, Metrics::default()]).style, None);
    }
}
