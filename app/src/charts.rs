//! Pure helpers behind the Experiments page's hand-made SVG charts: downsampling (LTTB),
//! smoothing (TensorBoard's debiased exponential moving average), axis scales with
//! "nice" ticks, SVG path text, and the nearest point to the cursor. No DOM, no Leptos:
//! everything here is unit-tested on the host.

/// A point of a curve: `(x, y)` in data units (step, metric value).
pub type Point = (f64, f64);

/// Largest-Triangle-Three-Buckets downsampling (S. Steinarsson, "Downsampling Time Series
/// for Visual Representation", MSc thesis, University of Iceland, 2013, §4.2).
///
/// Keeps the first and the last point; splits the points between them into
/// `threshold - 2` buckets of (almost) equal count and keeps, from each bucket, the point
/// forming the largest triangle with the point kept from the previous bucket and the
/// average of the next bucket. Returns exactly `threshold` points when `points` has more
/// (and `threshold >= 3`), else a copy of `points`. `points` must be sorted by x.
pub fn lttb(points: &[Point], threshold: usize) -> Vec<Point> {
    let n = points.len();
    if threshold >= n || threshold < 3 {
        return points.to_vec();
    }
    let mut out = Vec::with_capacity(threshold);
    out.push(points[0]);
    // Bucket size over the points between the first and the last.
    let every = (n - 2) as f64 / (threshold - 2) as f64;
    let mut a = 0usize; // index of the point kept last
    for i in 0..threshold - 2 {
        // This bucket: [start, end).
        let start = (i as f64 * every).floor() as usize + 1;
        let end = (((i + 1) as f64 * every).floor() as usize + 1).min(n - 1);
        // The next bucket's average (the last point for the last bucket).
        let next_start = end;
        let next_end = (((i + 2) as f64 * every).floor() as usize + 1).min(n);
        let (avg_x, avg_y) = if next_start < next_end && i + 1 < threshold - 2 {
            let len = (next_end - next_start) as f64;
            let (sx, sy) = points[next_start..next_end].iter().fold((0.0, 0.0), |(sx, sy), p| (sx + p.0, sy + p.1));
            (sx / len, sy / len)
        } else {
            points[n - 1]
        };
        let (ax, ay) = points[a];
        let mut best = start;
        let mut best_area = -1.0;
        for (j, &(x, y)) in points.iter().enumerate().take(end.max(start + 1)).skip(start) {
            // Twice the triangle's area; the factor does not change the winner.
            let area = ((ax - avg_x) * (y - ay) - (ax - x) * (avg_y - ay)).abs();
            if area > best_area {
                best_area = area;
                best = j;
            }
        }
        out.push(points[best]);
        a = best;
    }
    out.push(points[n - 1]);
    out
}

/// Exponential moving average with debiasing, as TensorBoard's scalar dashboard smooths
/// (and MLflow's, which copies it): `last = last·w + (1−w)·v`, shown as
/// `last / (1 − w^k)` after `k` finite values (source: TensorBoard,
/// `tensorboard/plugins/scalar/vz_line_chart2/line-chart.ts`, `resmoothDataset`).
/// Without the division the first values would be pulled towards 0.
///
/// `weight` in `[0, 1)`: 0 returns `values` unchanged; 0.99 is very smooth. Non-finite
/// values pass through unsmoothed and do not enter the average.
pub fn ema_smooth(values: &[f64], weight: f64) -> Vec<f64> {
    let w = weight.clamp(0.0, 0.999);
    let mut last = 0.0;
    let mut count = 0i32;
    values
        .iter()
        .map(|&v| {
            if !v.is_finite() {
                return v;
            }
            last = last * w + (1.0 - w) * v;
            count += 1;
            let debias = if w == 0.0 { 1.0 } else { 1.0 - w.powi(count) };
            last / debias
        })
        .collect()
}

/// Maps data values on `[d0, d1]` to pixels on `[r0, r1]`, linearly or (when `log`) by
/// log₁₀ (values ≤ 0 then map to the bottom of the range).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scale {
    pub d0: f64,
    pub d1: f64,
    pub r0: f64,
    pub r1: f64,
    pub log: bool,
}

impl Scale {
    /// A scale for data from `lo` to `hi` (widened when empty or equal) drawn on `r0..r1`.
    /// A log scale needs `lo > 0`; a non-positive `lo` is replaced by `hi / 1000`.
    pub fn new(lo: f64, hi: f64, r0: f64, r1: f64, log: bool) -> Self {
        let (mut lo, mut hi) = if lo.is_finite() && hi.is_finite() && lo <= hi { (lo, hi) } else { (0.0, 1.0) };
        if log {
            if hi <= 0.0 {
                hi = 1.0;
            }
            if lo <= 0.0 {
                lo = hi / 1000.0;
            }
            if lo == hi {
                lo /= 10.0;
                hi *= 10.0;
            }
        } else if lo == hi {
            let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
            lo -= pad;
            hi += pad;
        }
        Scale { d0: lo, d1: hi, r0, r1, log }
    }

    fn t(&self, v: f64) -> f64 {
        if self.log {
            v.max(self.d0 * 1e-3).log10()
        } else {
            v
        }
    }

    /// The pixel of value `v`.
    pub fn map(&self, v: f64) -> f64 {
        let (a, b) = (self.t(self.d0), self.t(self.d1));
        self.r0 + (self.t(v) - a) / (b - a) * (self.r1 - self.r0)
    }

    /// The value at pixel `p` (the inverse of [`Scale::map`]).
    pub fn invert(&self, p: f64) -> f64 {
        let (a, b) = (self.t(self.d0), self.t(self.d1));
        let t = a + (p - self.r0) / (self.r1 - self.r0) * (b - a);
        if self.log {
            10f64.powf(t)
        } else {
            t
        }
    }

    /// About `count` round tick values inside the domain: multiples of 1, 2 or 5 × 10ⁿ
    /// (linear), or powers of ten (log; with 2× and 5× when fewer than 3 decades).
    pub fn ticks(&self, count: usize) -> Vec<f64> {
        if self.log {
            let (a, b) = (self.d0.log10().floor() as i32, self.d1.log10().ceil() as i32);
            let mults: &[f64] = if b - a < 3 { &[1.0, 2.0, 5.0] } else { &[1.0] };
            let mut out = Vec::new();
            for e in a..=b {
                for m in mults {
                    let v = m * 10f64.powi(e);
                    if v >= self.d0 * (1.0 - 1e-9) && v <= self.d1 * (1.0 + 1e-9) {
                        out.push(v);
                    }
                }
            }
            return out;
        }
        let step = nice_step((self.d1 - self.d0) / count.max(1) as f64);
        let first = (self.d0 / step).ceil() as i64;
        let last = (self.d1 / step).floor() as i64;
        (first..=last).map(|i| i as f64 * step).collect()
    }
}

/// The round step (1, 2 or 5 × 10ⁿ) nearest `raw` (the same cut points as d3's `tickStep`:
/// √50, √10, √2 between the steps), so that about the asked number of ticks appears.
pub fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let m = if f >= 50f64.sqrt() {
        10.0
    } else if f >= 10f64.sqrt() {
        5.0
    } else if f >= 2f64.sqrt() {
        2.0
    } else {
        1.0
    };
    m * mag
}

/// A tick label: short, without float noise (`0.30000000000000004` → `0.3`, `1e-5`).
pub fn format_tick(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e6).contains(&a) {
        return format!("{v:.0e}");
    }
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// SVG path data (`M x y L x y …`, one decimal) of `points` mapped through the scales;
/// non-finite values break the line (a new `M`).
pub fn svg_path(points: &[Point], x: &Scale, y: &Scale) -> String {
    let mut out = String::with_capacity(points.len() * 14);
    let mut pen_down = false;
    for &(px, py) in points {
        if !(px.is_finite() && py.is_finite()) || (y.log && py <= 0.0) {
            pen_down = false;
            continue;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push(if pen_down { 'L' } else { 'M' });
        out.push_str(&format!("{:.1} {:.1}", x.map(px), y.map(py)));
        pen_down = true;
    }
    out
}

/// The index of the point whose x is nearest `x` in `points` (sorted by x), or `None` when empty.
pub fn nearest(points: &[Point], x: f64) -> Option<usize> {
    if points.is_empty() {
        return None;
    }
    let i = points.partition_point(|p| p.0 < x);
    if i == 0 {
        return Some(0);
    }
    if i == points.len() {
        return Some(points.len() - 1);
    }
    Some(if (points[i].0 - x) < (x - points[i - 1].0) { i } else { i - 1 })
}

/// The smallest and largest finite y of all `curves` (and positive only, for a log scale),
/// or `None` when there is none.
pub fn y_extent<'a>(curves: impl IntoIterator<Item = &'a [Point]>, log: bool) -> Option<(f64, f64)> {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for c in curves {
        for &(_, y) in c {
            if y.is_finite() && (!log || y > 0.0) {
                lo = lo.min(y);
                hi = hi.max(y);
            }
        }
    }
    (lo <= hi).then_some((lo, hi))
}

/// A distinct colour for series `i` (a 10-colour palette, cycling).
pub fn colour(i: usize) -> &'static str {
    const PALETTE: [&str; 10] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
    PALETTE[i % PALETTE.len()]
}

/// An image of a run's gallery, named as MLflow's `log_image(key=, step=)` names it:
/// `images/KEY+step+STEP+timestamp+MS+UUID.png` (relative to the run's artifacts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GalleryImage {
    /// The artifact path, as `GET /api/runs/{id}` lists it.
    pub path: String,
    pub key: String,
    pub step: i64,
    /// When it was logged, ms since the epoch.
    pub timestamp: i64,
}

/// Reads a gallery image's name (see [`GalleryImage`]); `None` for any other artifact. The
/// key is what precedes `+step+` (it may itself hold `+`); the parts after it are read from
/// the right.
pub fn parse_gallery_name(path: &str) -> Option<GalleryImage> {
    let name = path.strip_prefix("images/")?;
    let stem = name.strip_suffix(".png")?;
    if stem.contains('/') {
        return None;
    }
    let mut parts = stem.rsplitn(6, '+');
    let (_uuid, ms, ts, step, step_word, key) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if ts != "timestamp" || step_word != "step" || key.is_empty() {
        return None;
    }
    Some(GalleryImage { path: path.to_string(), key: key.to_string(), step: step.parse().ok()?, timestamp: ms.parse().ok()? })
}

/// The images of key `key` among `artifacts`, by step (then logging time): a run's sample
/// sheets for the step slider.
pub fn gallery(artifacts: &[String], key: &str) -> Vec<GalleryImage> {
    let mut out: Vec<GalleryImage> = artifacts.iter().filter_map(|a| parse_gallery_name(a)).filter(|g| g.key == key).collect();
    out.sort_by_key(|g| (g.step, g.timestamp));
    out
}

/// The image shown at slider value `step`: the one at the highest step ≤ `step` (the last
/// logged when a step has several), or `None` when every image comes later. `images` sorted
/// as [`gallery`] returns them.
pub fn image_at(images: &[GalleryImage], step: i64) -> Option<&GalleryImage> {
    let i = images.partition_point(|g| g.step <= step);
    i.checked_sub(1).map(|i| &images[i])
}

/// Every step of any of `galleries`, sorted, without repeats: the slider's stops.
pub fn union_steps<'a>(galleries: impl IntoIterator<Item = &'a [GalleryImage]>) -> Vec<i64> {
    galleries.into_iter().flatten().map(|g| g.step).collect::<std::collections::BTreeSet<_>>().into_iter().collect()
}

/// The centre of band `i` of `n` equal bands splitting `[r0, r1]` (bar and dot charts over
/// categories such as run names).
pub fn band_centre(i: usize, n: usize, r0: f64, r1: f64) -> f64 {
    r0 + (i as f64 + 0.5) * (r1 - r0) / n.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn lttb_returns_the_threshold_keeps_ends_and_spikes() {
        let pts: Vec<Point> = (0..5000).map(|i| (i as f64, if i == 3217 { 100.0 } else { (i as f64 * 0.01).sin() })).collect();
        let d = lttb(&pts, 1000);
        assert_eq!(d.len(), 1000);
        assert_eq!(d[0], (0.0, 0.0));
        assert_eq!(*d.last().unwrap(), pts[4999]);
        assert!(d.contains(&(3217.0, 100.0)), "the spike survives");
        assert!(d.windows(2).all(|w| w[0].0 < w[1].0), "still sorted, no duplicates");
        // Fewer points than the threshold, or a degenerate threshold: unchanged.
        assert_eq!(lttb(&pts[..10], 1000), pts[..10].to_vec());
        assert_eq!(lttb(&pts[..10], 2), pts[..10].to_vec());
        assert_eq!(lttb(&pts[..10], 3).len(), 3);
    }

    #[test]
    fn lttb_picks_the_largest_triangle() {
        // 5 points, threshold 3: one bucket of points 1..4, previous = (0,0), next = last (4,0).
        // The area against the base (0,0)-(4,0) is largest for the highest |y|: point 2.
        let pts = [(0.0, 0.0), (1.0, 1.0), (2.0, -3.0), (3.0, 2.0), (4.0, 0.0)];
        assert_eq!(lttb(&pts, 3), vec![(0.0, 0.0), (2.0, -3.0), (4.0, 0.0)]);
    }

    #[test]
    fn ema_is_tensorboards_debiased_average() {
        // w = 0.5 on 1, 2, 3: last = 0.5, 1.25, 2.125; debias 0.5, 0.75, 0.875.
        let s = ema_smooth(&[1.0, 2.0, 3.0], 0.5);
        assert!(close(s[0], 1.0) && close(s[1], 1.25 / 0.75) && close(s[2], 2.125 / 0.875), "{s:?}");
        assert!(close(s[1], 5.0 / 3.0) && close(s[2], 17.0 / 7.0));
        assert_eq!(ema_smooth(&[1.0, 2.0, 3.0], 0.0), vec![1.0, 2.0, 3.0]);
        // A constant stays constant (debiasing), NaN passes through and is skipped.
        let c = ema_smooth(&[4.0, f64::NAN, 4.0, 4.0], 0.9);
        assert!(close(c[0], 4.0) && c[1].is_nan() && close(c[2], 4.0) && close(c[3], 4.0), "{c:?}");
    }

    #[test]
    fn scales_map_invert_and_tick() {
        let s = Scale::new(0.0, 10.0, 0.0, 100.0, false);
        assert!(close(s.map(2.5), 25.0) && close(s.invert(75.0), 7.5));
        assert_eq!(s.ticks(5), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        // Inverted range (SVG y grows downwards).
        let y = Scale::new(0.0, 1.0, 200.0, 0.0, false);
        assert!(close(y.map(1.0), 0.0) && close(y.map(0.25), 150.0));
        let l = Scale::new(0.001, 10.0, 0.0, 400.0, true);
        assert!(close(l.map(0.01), 100.0) && close(l.map(1.0), 300.0));
        assert!(close(l.invert(200.0), 0.1));
        assert_eq!(l.ticks(5), vec![0.001, 0.01, 0.1, 1.0, 10.0]);
        assert_eq!(Scale::new(0.5, 3.0, 0.0, 1.0, true).ticks(5), vec![0.5, 1.0, 2.0]);
        // Empty and flat domains widen; a log scale never takes log(0).
        let flat = Scale::new(3.0, 3.0, 0.0, 1.0, false);
        assert!(flat.d0 < 3.0 && flat.d1 > 3.0);
        assert!(Scale::new(0.0, 10.0, 0.0, 1.0, true).d0 > 0.0);
        assert_eq!(nice_step(0.37), 0.5);
        assert_eq!(nice_step(1.2), 1.0);
        assert_eq!(nice_step(1.5), 2.0);
        assert_eq!(nice_step(0.514), 0.5, "0.08..2.65 in 5 ticks: every 0.5, not every 1");
        assert_eq!((nice_step(700.0), nice_step(800.0)), (500.0, 1000.0));
        assert_eq!(Scale::new(0.08, 2.65, 0.0, 1.0, false).ticks(5), vec![0.5, 1.0, 1.5, 2.0, 2.5]);
        assert_eq!((format_tick(0.30000000000000004), format_tick(2000.0), format_tick(1e-5)), ("0.3".into(), "2000".into(), "1e-5".into()));
    }

    #[test]
    fn paths_and_nearest_points() {
        let x = Scale::new(0.0, 10.0, 0.0, 100.0, false);
        let y = Scale::new(0.0, 1.0, 50.0, 0.0, false);
        assert_eq!(svg_path(&[(0.0, 0.0), (5.0, 0.5), (10.0, 1.0)], &x, &y), "M0.0 50.0 L50.0 25.0 L100.0 0.0");
        assert_eq!(svg_path(&[(0.0, 0.0), (5.0, f64::NAN), (10.0, 1.0)], &x, &y), "M0.0 50.0 M100.0 0.0");
        let pts = [(1.0, 0.0), (4.0, 0.0), (10.0, 0.0)];
        assert_eq!((nearest(&pts, -3.0), nearest(&pts, 2.4), nearest(&pts, 2.6), nearest(&pts, 99.0)), (Some(0), Some(0), Some(1), Some(2)));
        assert_eq!(nearest(&[], 1.0), None);
        let a = [(0.0, 2.0), (1.0, -1.0)];
        let b = [(0.0, 5.0)];
        assert_eq!(y_extent([&a[..], &b[..]], false), Some((-1.0, 5.0)));
        assert_eq!(y_extent([&a[..], &b[..]], true), Some((2.0, 5.0)));
    }

    #[test]
    fn gallery_names_parse_and_the_slider_picks_the_last_sheet_at_or_before() {
        let names: Vec<String> = [
            "images/samples+step+150+timestamp+1700000000300+ab12.png",
            "images/samples+step+50+timestamp+1700000000100+cd34.png",
            "images/other+step+50+timestamp+1700000000100+ef56.png",
            "images/samples+step+100+timestamp+1700000000200+0a0b.png",
            "images/samples+step+100+timestamp+1700000000250+0c0d.png",
            "card.json",
            "images/notes.png",
            "images/samples+step+x+timestamp+1+u.png",
            "images/sub/samples+step+1+timestamp+1+u.png",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let g = parse_gallery_name(&names[0]).unwrap();
        assert_eq!((g.key.as_str(), g.step, g.timestamp), ("samples", 150, 1_700_000_000_300));
        assert_eq!(parse_gallery_name("images/a+b+step+7+timestamp+9+u.png").map(|g| (g.key, g.step)), Some(("a+b".into(), 7)));
        for bad in &names[5..] {
            assert_eq!(parse_gallery_name(bad), None, "{bad}");
        }
        let sheets = gallery(&names, "samples");
        assert_eq!(sheets.iter().map(|g| (g.step, g.timestamp % 1000)).collect::<Vec<_>>(), vec![(50, 100), (100, 200), (100, 250), (150, 300)]);
        assert_eq!(image_at(&sheets, 49), None, "nothing logged yet");
        assert_eq!(image_at(&sheets, 50).map(|g| g.step), Some(50));
        assert_eq!(image_at(&sheets, 120).map(|g| (g.step, g.timestamp % 1000)), Some((100, 250)), "the last logged at that step");
        assert_eq!(image_at(&sheets, 1000).map(|g| g.step), Some(150));
        let other = gallery(&names, "other");
        assert_eq!(union_steps([sheets.as_slice(), other.as_slice()]), vec![50, 100, 150]);
        assert!(close(band_centre(0, 4, 0.0, 400.0), 50.0) && close(band_centre(3, 4, 0.0, 400.0), 350.0));
    }
}
