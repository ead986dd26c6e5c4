//! Line plots of training curves as PNG ([`plot_png`]): a canvas, axis ticks with round
//! labels, and a small built-in 5×7 bitmap font, so plots need no fonts installed.

use std::path::Path;

use image::{ImageEncoder, Rgb, RgbImage};

use crate::error::{Error, Result};

/// Plot size in pixels.
const WIDTH: u32 = 720;
const HEIGHT: u32 = 420;
/// Plot area (the axes box), in pixels.
const LEFT: i32 = 80;
const RIGHT: i32 = WIDTH as i32 - 20;
const TOP: i32 = 40;
const BOTTOM: i32 = HEIGHT as i32 - 50;

const BACKGROUND: [u8; 3] = [255, 255, 255];
const INK: [u8; 3] = [30, 30, 30];
const GRID: [u8; 3] = [225, 225, 225];
const FRAME: [u8; 3] = [120, 120, 120];
/// Line colours, one per series in turn, chosen to stay apart from each other.
const SERIES_COLOURS: [[u8; 3]; 10] = [
    [30, 100, 200],
    [210, 40, 40],
    [30, 150, 60],
    [240, 140, 20],
    [140, 70, 180],
    [0, 150, 150],
    [140, 90, 50],
    [220, 90, 170],
    [150, 150, 30],
    [100, 100, 100],
];
/// Opacity of the raw line drawn under the smoothed line of a noisy series.
const RAW_ALPHA: f32 = 0.25;

/// Renders a line plot of `series` (name, points `(x, y)`) as a 720×420 PNG at `path`.
///
/// One line per series in distinct colours, axes with numeric tick labels, axis titles,
/// a title and a legend. With `log_y` the y axis is logarithmic and points with `y <= 0`
/// are left out. A noisy series (one whose points scatter visibly around their trend) is
/// drawn as a faint raw line under its exponential moving average. Non-finite points
/// break the line. The file is written atomically (temporary file in the same folder,
/// then rename). Fails with [`Error::InvalidInput`] when there is nothing to plot.
pub fn plot_png(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
    log_y: bool,
) -> Result<()> {
    if series.is_empty() {
        return Err(Error::invalid("series", "no series to plot"));
    }
    // Points as plotted (log10 of y on a log axis); None breaks the line.
    let plotted: Vec<Vec<Option<(f64, f64)>>> = series
        .iter()
        .map(|(_, pts)| {
            pts.iter()
                .map(|&(x, y)| {
                    let y = if log_y {
                        if y > 0.0 {
                            y.log10()
                        } else {
                            f64::NAN
                        }
                    } else {
                        y
                    };
                    (x.is_finite() && y.is_finite()).then_some((x, y))
                })
                .collect()
        })
        .collect();
    let all = || plotted.iter().flatten().flatten();
    if all().next().is_none() {
        let what = if log_y { "finite points with y > 0" } else { "finite points" };
        return Err(Error::invalid("series", format!("the series hold no {what} to plot")));
    }
    let (mut x0, mut x1) = bounds(all().map(|p| p.0));
    let (mut y0, mut y1) = bounds(all().map(|p| p.1));
    widen(&mut x0, &mut x1, 0.0);
    widen(&mut y0, &mut y1, 0.05);

    let mut canvas = Canvas::new();
    let map = Mapping { x0, x1, y0, y1 };

    // Grid and tick labels.
    for (x, label) in linear_ticks(x0, x1) {
        let px = map.px(x).round() as i32;
        canvas.vline(px, TOP, BOTTOM, GRID);
        canvas.vline(px, BOTTOM, BOTTOM + 4, INK);
        canvas.text_centred(&label, px, BOTTOM + 8, 1, INK);
    }
    let y_ticks = if log_y { log_ticks(y0, y1) } else { linear_ticks(y0, y1) };
    for (y, label) in y_ticks {
        let py = map.py(y).round() as i32;
        canvas.hline(LEFT, RIGHT, py, GRID);
        canvas.hline(LEFT - 4, LEFT, py, INK);
        let w = text_width(&label, 1);
        canvas.text(&label, LEFT - 7 - w, py - 3, 1, INK);
    }
    canvas.rect_outline(LEFT, TOP, RIGHT, BOTTOM, FRAME);

    // Titles.
    canvas.text_centred(title, (LEFT + RIGHT) / 2, 12, 2, INK);
    canvas.text_centred(x_label, (LEFT + RIGHT) / 2, BOTTOM + 26, 1, INK);
    canvas.text_vertical(y_label, 12, (TOP + BOTTOM) / 2 + text_width(y_label, 1) / 2, 1, INK);

    // Lines.
    for (i, pts) in plotted.iter().enumerate() {
        let colour = SERIES_COLOURS[i % SERIES_COLOURS.len()];
        let smooth = smoothed_if_noisy(pts, y1 - y0);
        match smooth {
            Some(smooth) => {
                canvas.polyline(&map, pts, colour, 1.0, RAW_ALPHA);
                canvas.polyline(&map, &smooth, colour, 2.0, 1.0);
            }
            None => canvas.polyline(&map, pts, colour, 2.0, 1.0),
        }
    }

    // Legend, top right inside the axes.
    let names: Vec<&str> = series.iter().map(|(n, _)| *n).collect();
    let text_w = names.iter().map(|n| text_width(n, 1)).max().unwrap_or(0);
    let (lw, lh) = (text_w + 42, 14 * names.len() as i32 + 8);
    let (lx, ly) = (RIGHT - lw - 8, TOP + 8);
    canvas.fill_rect(lx, ly, lx + lw, ly + lh, BACKGROUND);
    canvas.rect_outline(lx, ly, lx + lw, ly + lh, FRAME);
    for (i, name) in names.iter().enumerate() {
        let colour = SERIES_COLOURS[i % SERIES_COLOURS.len()];
        let y = ly + 8 + 14 * i as i32;
        canvas.fill_rect(lx + 8, y + 2, lx + 30, y + 4, colour);
        canvas.text(name, lx + 36, y, 1, INK);
    }

    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(canvas.img.as_raw(), WIDTH, HEIGHT, image::ExtendedColorType::Rgb8)
        .map_err(|e| Error::Image(format!("encoding {}: {e}", path.display())))?;
    crate::files::write_atomic(path, &png).map_err(|e| Error::io(path, e))
}

/// Min and max of finite values (callers guarantee at least one).
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

/// Pads a range by `frac` of its span on each side; a zero span becomes ±0.5 (or ±5 %).
fn widen(lo: &mut f64, hi: &mut f64, frac: f64) {
    let span = *hi - *lo;
    if span <= f64::EPSILON * lo.abs().max(1.0) {
        let pad = if *lo == 0.0 { 0.5 } else { 0.05 * lo.abs() };
        *lo -= pad;
        *hi += pad;
    } else {
        *lo -= frac * span;
        *hi += frac * span;
    }
}

/// Debiased exponential moving average of a noisy series, or `None` when the series is
/// short (under 20 points) or not noisy: its point-to-point scatter, estimated from second
/// differences (which a smooth trend hardly changes, and which for independent noise of
/// deviation σ have deviation √6·σ), is under 1.5 % of the plotted range.
fn smoothed_if_noisy(pts: &[Option<(f64, f64)>], y_range: f64) -> Option<Vec<Option<(f64, f64)>>> {
    let ys: Vec<f64> = pts.iter().flatten().map(|p| p.1).collect();
    let n = ys.len();
    if n < 20 {
        return None;
    }
    let d2: f64 = ys.windows(3).map(|w| (w[0] - 2.0 * w[1] + w[2]).powi(2)).sum::<f64>() / (n - 2) as f64;
    if (d2 / 6.0).sqrt() < 0.015 * y_range {
        return None;
    }
    let span = (n as f64 / 30.0).clamp(3.0, 200.0);
    let beta = 1.0 - 2.0 / (span + 1.0);
    let (mut avg, mut weight) = (0.0, 0.0);
    let smooth = pts
        .iter()
        .map(|p| {
            p.map(|(x, y)| {
                avg = beta * avg + (1.0 - beta) * y;
                weight = beta * weight + (1.0 - beta);
                (x, avg / weight)
            })
        })
        .collect();
    Some(smooth)
}

/// A "nice" step (1, 2 or 5 × 10^p) giving about six ticks over `span`, as (m, p).
fn nice_step(span: f64) -> (i64, i32) {
    let raw = span / 6.0;
    let p = raw.log10().floor() as i32;
    let f = raw / 10f64.powi(p);
    match f {
        f if f < 1.5 => (1, p),
        f if f < 3.5 => (2, p),
        f if f < 7.5 => (5, p),
        _ => (1, p + 1),
    }
}

/// Ticks at multiples of a nice step within `[lo, hi]`, with labels.
fn linear_ticks(lo: f64, hi: f64) -> Vec<(f64, String)> {
    let (m, p) = nice_step(hi - lo);
    let step = m as f64 * 10f64.powi(p);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|k| (k as f64 * step, number_label(k * m, p))).collect()
}

/// Ticks for a log axis over `[lo, hi]` (log10 units): the powers of ten, every few of
/// them over a wide range, with 2× and 5× added over a narrow one.
fn log_ticks(lo: f64, hi: f64) -> Vec<(f64, String)> {
    let (e0, e1) = (lo.floor() as i32, hi.ceil() as i32);
    let decades = (e1 - e0).max(1);
    let every = (decades + 7) / 8;
    let multiples: &[i64] = if hi - lo < 1.5 { &[1, 2, 5] } else { &[1] };
    let mut out = Vec::new();
    for e in e0..=e1 {
        for &m in multiples {
            let v = (m as f64).log10() + e as f64;
            if v >= lo && v <= hi && (m != 1 || e.rem_euclid(every) == 0) {
                out.push((v, number_label(m, e)));
            }
        }
    }
    if out.len() < 2 {
        // Less than a factor of ~2.5 in range: evenly spaced values read better.
        return linear_ticks(10f64.powf(lo), 10f64.powf(hi))
            .into_iter()
            .filter(|(v, _)| *v > 0.0)
            .map(|(v, label)| (v.log10(), label))
            .collect();
    }
    out
}

/// The label of `n × 10^p`: plain decimals between 0.001 and 100 000, else `2.5e-6` style.
fn number_label(n: i64, p: i32) -> String {
    // Plain labels keep the step's decimals, so an axis reads 0.00, 0.05, 0.10.
    let decimals = (-p).max(0) as usize;
    if n == 0 {
        return if p >= -3 { format!("{:.*}", decimals, 0.0) } else { "0".into() };
    }
    let (mut n, mut p) = (n, p);
    while n % 10 == 0 {
        n /= 10;
        p += 1;
    }
    let digits = n.unsigned_abs().to_string();
    let exp = p + digits.len() as i32 - 1;
    let sign = if n < 0 { "-" } else { "" };
    if (-3..5).contains(&exp) {
        format!("{:.*}", decimals, n as f64 * 10f64.powi(p))
    } else {
        let (head, tail) = digits.split_at(1);
        let mantissa = if tail.is_empty() { head.to_string() } else { format!("{head}.{tail}") };
        format!("{sign}{mantissa}e{exp}")
    }
}

/// Data to pixel coordinates.
struct Mapping {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Mapping {
    fn px(&self, x: f64) -> f64 {
        LEFT as f64 + (x - self.x0) / (self.x1 - self.x0) * (RIGHT - LEFT) as f64
    }
    fn py(&self, y: f64) -> f64 {
        BOTTOM as f64 - (y - self.y0) / (self.y1 - self.y0) * (BOTTOM - TOP) as f64
    }
}

struct Canvas {
    img: RgbImage,
}

impl Canvas {
    fn new() -> Self {
        Self { img: RgbImage::from_pixel(WIDTH, HEIGHT, Rgb(BACKGROUND)) }
    }

    fn blend(&mut self, x: i32, y: i32, rgb: [u8; 3], alpha: f32) {
        if x < 0 || y < 0 || x >= WIDTH as i32 || y >= HEIGHT as i32 {
            return;
        }
        let p = self.img.get_pixel_mut(x as u32, y as u32);
        for k in 0..3 {
            p[k] = (p[k] as f32 + alpha * (rgb[k] as f32 - p[k] as f32)).round() as u8;
        }
    }

    fn fill_rect(&mut self, x0: i32, y0: i32, x1: i32, y1: i32, rgb: [u8; 3]) {
        for y in y0..=y1 {
            for x in x0..=x1 {
                self.blend(x, y, rgb, 1.0);
            }
        }
    }

    fn hline(&mut self, x0: i32, x1: i32, y: i32, rgb: [u8; 3]) {
        self.fill_rect(x0, y, x1, y, rgb);
    }

    fn vline(&mut self, x: i32, y0: i32, y1: i32, rgb: [u8; 3]) {
        self.fill_rect(x, y0, x, y1, rgb);
    }

    fn rect_outline(&mut self, x0: i32, y0: i32, x1: i32, y1: i32, rgb: [u8; 3]) {
        self.hline(x0, x1, y0, rgb);
        self.hline(x0, x1, y1, rgb);
        self.vline(x0, y0, y1, rgb);
        self.vline(x1, y0, y1, rgb);
    }

    /// Strokes the line through `pts` (None breaks it) with the given width, clipped to
    /// the axes. Pixels are covered once per call, so a translucent line does not darken
    /// where its segments overlap.
    fn polyline(&mut self, map: &Mapping, pts: &[Option<(f64, f64)>], rgb: [u8; 3], width: f64, alpha: f32) {
        let (w, h) = ((RIGHT - LEFT + 1) as usize, (BOTTOM - TOP + 1) as usize);
        let mut mask = vec![false; w * h];
        let r = width / 2.0;
        let mut stamp = |x: f64, y: f64| {
            let (xa, xb) = ((x - r).round() as i32, (x + r).round() as i32 - i32::from(width <= 1.0));
            let (ya, yb) = ((y - r).round() as i32, (y + r).round() as i32 - i32::from(width <= 1.0));
            for py in ya.max(TOP)..=yb.min(BOTTOM) {
                for px in xa.max(LEFT)..=xb.min(RIGHT) {
                    mask[(py - TOP) as usize * w + (px - LEFT) as usize] = true;
                }
            }
        };
        let mut prev: Option<(f64, f64)> = None;
        for p in pts {
            let Some((x, y)) = *p else {
                prev = None;
                continue;
            };
            let (cx, cy) = (map.px(x), map.py(y));
            match prev {
                None => stamp(cx, cy),
                Some((ax, ay)) => {
                    let steps = ((cx - ax).abs().max((cy - ay).abs()) * 4.0).ceil().max(1.0) as usize;
                    for s in 1..=steps {
                        let f = s as f64 / steps as f64;
                        stamp(ax + f * (cx - ax), ay + f * (cy - ay));
                    }
                }
            }
            prev = Some((cx, cy));
        }
        for (i, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
            self.blend(LEFT + (i % w) as i32, TOP + (i / w) as i32, rgb, alpha);
        }
    }

    /// Draws `s` with its top-left corner at `(x, y)`, each font pixel `scale`² pixels.
    fn text(&mut self, s: &str, x: i32, y: i32, scale: i32, rgb: [u8; 3]) {
        self.glyphs(s, scale, |gx, gy| (x + gx, y + gy), rgb);
    }

    fn text_centred(&mut self, s: &str, cx: i32, y: i32, scale: i32, rgb: [u8; 3]) {
        self.text(s, cx - text_width(s, scale) / 2, y, scale, rgb);
    }

    /// Draws `s` rotated a quarter turn anticlockwise (reading upward), starting at the
    /// bottom-left `(x, y)`.
    fn text_vertical(&mut self, s: &str, x: i32, y: i32, scale: i32, rgb: [u8; 3]) {
        self.glyphs(s, scale, |gx, gy| (x + gy, y - gx), rgb);
    }

    fn glyphs(&mut self, s: &str, scale: i32, place: impl Fn(i32, i32) -> (i32, i32), rgb: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            let drop = if DESCENDERS.contains(ch) { 2 } else { 0 };
            for (gy, row) in rows.iter().enumerate() {
                let gy = gy + drop;
                for (gx, cell) in row.bytes().enumerate() {
                    if cell != b'#' {
                        continue;
                    }
                    for sy in 0..scale {
                        for sx in 0..scale {
                            let ux = (i as i32 * GLYPH_ADVANCE + gx as i32) * scale + sx;
                            let uy = gy as i32 * scale + sy;
                            let (px, py) = place(ux, uy);
                            self.blend(px, py, rgb, 1.0);
                        }
                    }
                }
            }
        }
    }
}

/// Lower-case letters whose glyph starts at the x-height and hangs below the baseline.
const DESCENDERS: &str = "gpqy";

/// Horizontal advance per character, in font pixels (5 wide + 1 space).
const GLYPH_ADVANCE: i32 = 6;

fn text_width(s: &str, scale: i32) -> i32 {
    let n = s.chars().count() as i32;
    if n == 0 {
        0
    } else {
        (n * GLYPH_ADVANCE - 1) * scale
    }
}

/// The 5×7 bitmap of `ch` (`#` = ink); characters without a glyph show as `?`.
fn glyph(ch: char) -> &'static [&'static str; 7] {
    FONT.iter()
        .find(|(c, _)| *c == ch)
        .or_else(|| FONT.iter().find(|(c, _)| *c == '?'))
        .map(|(_, g)| g)
        .unwrap_or(&BLANK)
}

const BLANK: [&str; 7] = ["....."; 7];

/// A 5×7 font drawn for this module: letters, digits and the punctuation plots need.
/// The glyphs of [`DESCENDERS`] are drawn two rows lower, so their tails hang below the
/// line.
#[rustfmt::skip]
const FONT: &[(char, [&str; 7])] = &[
    (' ', BLANK),
    ('A', [".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"]),
    ('B', ["####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."]),
    ('C', [".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."]),
    ('D', ["####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."]),
    ('E', ["#####", "#....", "#....", "####.", "#....", "#....", "#####"]),
    ('F', ["#####", "#....", "#....", "####.", "#....", "#....", "#...."]),
    ('G', [".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"]),
    ('H', ["#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"]),
    ('I', [".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."]),
    ('J', ["..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."]),
    ('K', ["#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"]),
    ('L', ["#....", "#....", "#....", "#....", "#....", "#....", "#####"]),
    ('M', ["#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"]),
    ('N', ["#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"]),
    ('O', [".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."]),
    ('P', ["####.", "#...#", "#...#", "####.", "#....", "#....", "#...."]),
    ('Q', [".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"]),
    ('R', ["####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"]),
    ('S', [".####", "#....", "#....", ".###.", "....#", "....#", "####."]),
    ('T', ["#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."]),
    ('U', ["#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."]),
    ('V', ["#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."]),
    ('W', ["#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."]),
    ('X', ["#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"]),
    ('Y', ["#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."]),
    ('Z', ["#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"]),
    ('a', [".....", ".....", ".###.", "....#", ".####", "#...#", ".####"]),
    ('b', ["#....", "#....", "#.##.", "##..#", "#...#", "#...#", "####."]),
    ('c', [".....", ".....", ".###.", "#....", "#....", "#...#", ".###."]),
    ('d', ["....#", "....#", ".##.#", "#..##", "#...#", "#...#", ".####"]),
    ('e', [".....", ".....", ".###.", "#...#", "#####", "#....", ".###."]),
    ('f', ["..##.", ".#..#", ".#...", "###..", ".#...", ".#...", ".#..."]),
    ('g', [".####", "#...#", "#...#", "#...#", ".####", "....#", ".###."]),
    ('h', ["#....", "#....", "#.##.", "##..#", "#...#", "#...#", "#...#"]),
    ('i', ["..#..", ".....", ".##..", "..#..", "..#..", "..#..", ".###."]),
    ('j', ["...#.", ".....", "..##.", "...#.", "...#.", "#..#.", ".##.."]),
    ('k', ["#....", "#....", "#..#.", "#.#..", "##...", "#.#..", "#..#."]),
    ('l', [".##..", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."]),
    ('m', [".....", ".....", "##.#.", "#.#.#", "#.#.#", "#...#", "#...#"]),
    ('n', [".....", ".....", "#.##.", "##..#", "#...#", "#...#", "#...#"]),
    ('o', [".....", ".....", ".###.", "#...#", "#...#", "#...#", ".###."]),
    ('p', ["#.##.", "##..#", "#...#", "##..#", "#.##.", "#....", "#...."]),
    ('q', [".##.#", "#..##", "#...#", "#..##", ".##.#", "....#", "....#"]),
    ('r', [".....", ".....", "#.##.", "##..#", "#....", "#....", "#...."]),
    ('s', [".....", ".....", ".####", "#....", ".###.", "....#", "####."]),
    ('t', [".#...", ".#...", "###..", ".#...", ".#...", ".#..#", "..##."]),
    ('u', [".....", ".....", "#...#", "#...#", "#...#", "#..##", ".##.#"]),
    ('v', [".....", ".....", "#...#", "#...#", "#...#", ".#.#.", "..#.."]),
    ('w', [".....", ".....", "#...#", "#...#", "#.#.#", "#.#.#", ".#.#."]),
    ('x', [".....", ".....", "#...#", ".#.#.", "..#..", ".#.#.", "#...#"]),
    ('y', ["#...#", "#...#", "#...#", "#..##", ".##.#", "....#", ".###."]),
    ('z', [".....", ".....", "#####", "...#.", "..#..", ".#...", "#####"]),
    ('0', [".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."]),
    ('1', ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."]),
    ('2', [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"]),
    ('3', ["#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."]),
    ('4', ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."]),
    ('5', ["#####", "#....", "####.", "....#", "....#", "#...#", ".###."]),
    ('6', ["..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."]),
    ('7', ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."]),
    ('8', [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."]),
    ('9', [".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."]),
    ('.', [".....", ".....", ".....", ".....", ".....", ".##..", ".##.."]),
    (',', [".....", ".....", ".....", ".....", ".##..", "..#..", ".#..."]),
    ('-', [".....", ".....", ".....", ".###.", ".....", ".....", "....."]),
    ('+', [".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."]),
    ('/', [".....", "....#", "...#.", "..#..", ".#...", "#....", "....."]),
    (':', [".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."]),
    ('(', ["...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."]),
    (')', [".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."]),
    ('[', [".###.", ".#...", ".#...", ".#...", ".#...", ".#...", ".###."]),
    (']', [".###.", "...#.", "...#.", "...#.", "...#.", "...#.", ".###."]),
    ('_', [".....", ".....", ".....", ".....", ".....", ".....", "#####"]),
    ('%', ["##...", "##..#", "...#.", "..#..", ".#...", "#..##", "...##"]),
    ('=', [".....", ".....", "#####", ".....", "#####", ".....", "....."]),
    ('*', [".....", "#.#.#", ".###.", "#####", ".###.", "#.#.#", "....."]),
    ('\'', ["..#..", "..#..", ".#...", ".....", ".....", ".....", "....."]),
    ('?', [".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#.."]),
];

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn tick_labels_are_round_numbers() {
        assert_eq!(number_label(0, 3), "0");
        assert_eq!(number_label(0, -6), "0");
        assert_eq!(number_label(25, -1), "2.5");
        assert_eq!(number_label(5, -2), "0.05");
        assert_eq!(number_label(2000, 0), "2000");
        assert_eq!(number_label(1, -4), "1e-4");
        assert_eq!(number_label(25, -6), "2.5e-5");
        assert_eq!(number_label(-3, 5), "-3e5");
        let labels: Vec<String> = linear_ticks(0.0, 1000.0).into_iter().map(|t| t.1).collect();
        assert_eq!(labels, ["0", "200", "400", "600", "800", "1000"]);
        let labels: Vec<String> = linear_ticks(-0.013, 0.31).into_iter().map(|t| t.1).collect();
        assert_eq!(labels, ["0.00", "0.05", "0.10", "0.15", "0.20", "0.25", "0.30"]);
        let labels: Vec<String> = log_ticks(-4.2, 0.1).into_iter().map(|t| t.1).collect();
        assert_eq!(labels, ["1e-4", "0.001", "0.01", "0.1", "1"]);
        let labels: Vec<String> = log_ticks(-1.1, -0.2).into_iter().map(|t| t.1).collect();
        assert_eq!(labels, ["0.1", "0.2", "0.5"]);
    }

    fn count(img: &RgbImage, rgb: [u8; 3]) -> usize {
        img.pixels().filter(|p| p.0 == rgb).count()
    }

    #[test]
    fn plot_draws_two_series_in_their_colours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        // A noisy falling loss (drawn smoothed over a faint raw line) and a smooth one.
        let mut state = 12345u64;
        let mut jitter = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 40) as f64 / (1u64 << 24) as f64 - 0.5
        };
        let train: Vec<(f64, f64)> =
            (1..=400).map(|s| (s as f64, (1.0 / (1.0 + s as f64 / 50.0)) * (1.0 + 0.6 * jitter()))).collect();
        let val: Vec<(f64, f64)> = (1..=8).map(|k| (k as f64 * 50.0, 0.9 / (1.0 + k as f64))).collect();
        let series = [("train loss", train), ("val loss", val)];
        for log_y in [false, true] {
            plot_png(&path, "Starter model: loss", "step", "loss (mse)", &series, log_y).unwrap();
            let img = image::open(&path).unwrap().to_rgb8();
            assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
            let ink = img.pixels().filter(|p| p.0 != BACKGROUND).count();
            assert!(ink > 5000, "{ink}");
            // The legend swatch alone has 23×3 = 69 pixels; the lines add far more.
            let (a, b) = (count(&img, SERIES_COLOURS[0]), count(&img, SERIES_COLOURS[1]));
            assert!(a > 400 && b > 300, "log_y {log_y}: {a} {b}");
            // The faint raw line of the noisy series is there too.
            let faint = SERIES_COLOURS[0].map(|c| (255.0 + RAW_ALPHA * (c as f32 - 255.0)).round() as u8);
            assert!(count(&img, faint) > 200, "log_y {log_y}");
            // Some text: the title row holds ink in the font's colour.
            assert!((12..26).any(|y| (0..WIDTH).any(|x| img.get_pixel(x, y).0 == INK)));
        }
        // Nothing left behind but the plot.
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("loss.png")]);
    }

    #[test]
    fn plot_rejects_empty_input() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        let err = plot_png(&path, "t", "x", "y", &[], false).unwrap_err();
        assert!(matches!(err, Error::InvalidInput { field: "series", .. }), "{err}");
        let err = plot_png(&path, "t", "x", "y", &[("a", vec![])], false).unwrap_err();
        assert!(matches!(err, Error::InvalidInput { field: "series", .. }), "{err}");
        let err = plot_png(&path, "t", "x", "y", &[("a", vec![(1.0, 0.0), (2.0, -1.0)])], true).unwrap_err();
        assert!(err.to_string().contains("y > 0"), "{err}");
        assert!(!path.exists());
        // A single point and a flat series still plot.
        plot_png(&path, "t", "x", "y", &[("a", vec![(3.0, 2.0)]), ("b", vec![])], false).unwrap();
        plot_png(&path, "t", "x", "y", &[("a", vec![(0.0, 1.0), (1.0, 1.0)])], true).unwrap();
    }
}
