//! Reading a shapes-world image ([`crate::starter::shapes`]) back: region colours
//! ([`region_means`], [`classify_colours`]) and the drawn shape ([`classify_shape`]), for
//! evaluating the starter model ([`super::eval`]). Sharpness is the generic
//! [`crate::quality::laplacian_variance`].
//!
//! The classifiers are built to read generated images, not only clean renders: they use
//! medians rather than means where a few stray pixels could mislead, accept images whose
//! colours were pulled toward grey (the `low contrast` degradation), and read shapes from
//! edge orientations, which survive blur, noise and shapes cut off by the image border.

use image::RgbImage;

use crate::starter::shapes::{Colour, Shape};

/// Side of the central box [`classify_colours`] reads, as a fraction of the image side.
const CENTRE_FRAC: f32 = 0.2;
/// Width of the border ring [`classify_colours`] reads, in pixels.
const RING: u32 = 4;
/// How far the `low contrast` degradation pulls colours toward mid grey.
const LOW_CONTRAST_MIX: f32 = 0.55;
const MID_GREY: f32 = 128.0;

/// The pixels of the central box (side `frac` of the image side, rounded down, at least
/// 1, centred) and of the border ring `ring` pixels wide.
fn regions(img: &RgbImage, frac: f32, ring: u32) -> (Vec<[f32; 3]>, Vec<[f32; 3]>) {
    let (w, h) = img.dimensions();
    let bw = ((w as f32 * frac.clamp(0.0, 1.0)) as u32).clamp(1, w.max(1));
    let bh = ((h as f32 * frac.clamp(0.0, 1.0)) as u32).clamp(1, h.max(1));
    let (x0, y0) = ((w - bw) / 2, (h - bh) / 2);
    let mut centre = Vec::with_capacity((bw * bh) as usize);
    let mut border = Vec::new();
    for (x, y, p) in img.enumerate_pixels() {
        let rgb = [p[0] as f32, p[1] as f32, p[2] as f32];
        if (x0..x0 + bw).contains(&x) && (y0..y0 + bh).contains(&y) {
            centre.push(rgb);
        }
        if x < ring || y < ring || x + ring >= w || y + ring >= h {
            border.push(rgb);
        }
    }
    (centre, border)
}

fn mean(px: &[[f32; 3]]) -> [f32; 3] {
    if px.is_empty() {
        return [0.0; 3];
    }
    let mut m = [0f32; 3];
    for p in px {
        for k in 0..3 {
            m[k] += p[k];
        }
    }
    m.map(|v| v / px.len() as f32)
}

/// Per-channel median ([0; 3] for no pixels).
fn median(px: &[[f32; 3]]) -> [f32; 3] {
    if px.is_empty() {
        return [0.0; 3];
    }
    let mut out = [0f32; 3];
    for (k, o) in out.iter_mut().enumerate() {
        let mut v: Vec<f32> = px.iter().map(|p| p[k]).collect();
        v.sort_by(f32::total_cmp);
        *o = v[v.len() / 2];
    }
    out
}

fn dist2(a: [f32; 3], b: [f32; 3]) -> f32 {
    (0..3).map(|k| (a[k] - b[k]).powi(2)).sum()
}

fn palette(c: Colour) -> [f32; 3] {
    c.rgb().map(f32::from)
}

/// Mean RGB (0..255) of the central box (side `frac` of the image side, rounded down,
/// centred) and of the border ring `ring` pixels wide. A 64×64 image with `frac` 0.2 has a
/// 12×12 box, pixels 26..38 on each axis.
pub fn region_means(img: &RgbImage, frac: f32, ring: u32) -> ([f32; 3], [f32; 3]) {
    let (centre, border) = regions(img, frac, ring);
    (mean(&centre), mean(&border))
}

/// The palette colour nearest to `rgb` (Euclidean distance in sRGB, 0..255 units).
pub fn nearest_colour(rgb: [f32; 3]) -> Colour {
    nearest_in(rgb, palette)
}

fn nearest_in(rgb: [f32; 3], look: impl Fn(Colour) -> [f32; 3]) -> Colour {
    let mut best = (Colour::ALL[0], f32::INFINITY);
    for c in Colour::ALL {
        let d = dist2(rgb, look(c));
        if d < best.1 {
            best = (c, d);
        }
    }
    best.0
}

/// (shape colour, background colour) of a shapes-world image, read from the central box
/// (a fifth of the side) and the 4-pixel border ring.
///
/// The background is the per-channel median of the ring, so a shape that touches the ring
/// does not shift it. The shape colour is the median of the central-box pixels that differ
/// clearly from the background (at least half as much as the most different ones), so a
/// triangle that does not fill the box still reads right. Both are matched against the
/// palette as drawn and against the palette pulled 55 % toward grey (the `low contrast`
/// look), whichever explains the two colours together better.
pub fn classify_colours(img: &RgbImage) -> (Colour, Colour) {
    let (centre, border) = regions(img, CENTRE_FRAC, RING);
    let bg = median(&border);
    let dists: Vec<f32> = centre.iter().map(|&p| dist2(p, bg).sqrt()).collect();
    let mut sorted = dists.clone();
    sorted.sort_by(f32::total_cmp);
    let far = sorted.get(sorted.len() * 9 / 10).copied().unwrap_or(0.0);
    let shape_px: Vec<[f32; 3]> =
        centre.iter().zip(&dists).filter(|&(_, &d)| d >= 0.5 * far).map(|(&p, _)| p).collect();
    let fg = median(&shape_px);

    let low = |c: Colour| palette(c).map(|v| v + LOW_CONTRAST_MIX * (MID_GREY - v));
    let as_drawn = (nearest_in(fg, palette), nearest_in(bg, palette));
    let faded = (nearest_in(fg, low), nearest_in(bg, low));
    let err_drawn = dist2(fg, palette(as_drawn.0)) + dist2(bg, palette(as_drawn.1));
    let err_faded = dist2(fg, low(faded.0)) + dist2(bg, low(faded.1));
    if err_faded < err_drawn {
        faded
    } else {
        as_drawn
    }
}

/// The shape drawn in `colour` on `background`, or `None` when there is no clear shape.
///
/// Works on the soft mask `t`: each pixel's position between the background colour
/// (`t = 0`) and the shape colour (`t = 1`), i.e. pixels with `t > 0.5` are those nearer
/// to the shape colour than to the background. For a clean render `t` is the anti-aliased
/// coverage. The mask is rescaled between the levels of the border ring and of the
/// brightest part of the image, so a low-contrast image reads like a clean one.
///
/// The decision uses the orientation of the mask's edges (its gradient, lightly smoothed),
/// which does not depend on rotation, position, or the shape being cut off by the image
/// border: a square's edge normals repeat every 90° (strong 4th circular harmonic), a
/// triangle's every 120° (strong 3rd harmonic), and a circle's cover all directions
/// evenly (both weak). `None` when the mask is empty, covers nearly the whole image, or
/// has too little edge to measure.
pub fn classify_shape(img: &RgbImage, colour: Colour, background: Colour) -> Option<Shape> {
    let (w, h) = img.dimensions();
    if w < 8 || h < 8 || colour == background {
        return None;
    }
    let (c, b) = (palette(colour), palette(background));
    let d: [f32; 3] = std::array::from_fn(|k| c[k] - b[k]);
    let dd: f32 = d.iter().map(|v| v * v).sum();
    let mut t: Vec<f32> = img.pixels().map(|p| (0..3).map(|k| (p[k] as f32 - b[k]) * d[k]).sum::<f32>() / dd).collect();

    // Rescale so the ring (background) sits at 0 and the shape's own level at 1.
    let (w, h) = (w as usize, h as usize);
    let ring = RING as usize;
    let mut ring_t = Vec::new();
    for y in 0..h {
        for x in 0..w {
            if x < ring || y < ring || x + ring >= w || y + ring >= h {
                ring_t.push(t[y * w + x]);
            }
        }
    }
    ring_t.sort_by(f32::total_cmp);
    let lo = ring_t[ring_t.len() / 2];
    let mut sorted = t.clone();
    sorted.sort_by(f32::total_cmp);
    // The shape covers at least ~4 % of the image; its level is a high quantile.
    let hi = sorted[sorted.len() * 99 / 100];
    if hi - lo < 0.2 {
        return None;
    }
    t.iter_mut().for_each(|v| *v = ((*v - lo) / (hi - lo)).clamp(0.0, 1.0));
    let covered = t.iter().filter(|&&v| v > 0.5).count();
    if covered < 16 || covered * 100 > w * h * 97 {
        return None;
    }

    // Smooth with a 3×3 binomial filter (tames noise), then Sobel.
    let at = |v: &[f32], x: isize, y: isize| {
        v[(y.clamp(0, h as isize - 1) as usize) * w + x.clamp(0, w as isize - 1) as usize]
    };
    let mut s = vec![0f32; w * h];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let mut acc = 0.0;
            for (dy, wy) in [(-1, 1.0), (0, 2.0), (1, 1.0)] {
                for (dx, wx) in [(-1, 1.0), (0, 2.0), (1, 1.0)] {
                    acc += wx * wy * at(&t, x + dx, y + dy);
                }
            }
            s[y as usize * w + x as usize] = acc / 16.0;
        }
    }
    let (mut h3, mut h4, mut total) = ([0f64; 2], [0f64; 2], 0f64);
    // Skip the outermost pixels: the clamped image border is not an edge of the shape.
    for y in 1..h as isize - 1 {
        for x in 1..w as isize - 1 {
            let gx = (at(&s, x + 1, y - 1) + 2.0 * at(&s, x + 1, y) + at(&s, x + 1, y + 1))
                - (at(&s, x - 1, y - 1) + 2.0 * at(&s, x - 1, y) + at(&s, x - 1, y + 1));
            let gy = (at(&s, x - 1, y + 1) + 2.0 * at(&s, x, y + 1) + at(&s, x + 1, y + 1))
                - (at(&s, x - 1, y - 1) + 2.0 * at(&s, x, y - 1) + at(&s, x + 1, y - 1));
            // Weight by squared magnitude, so faint noise gradients count for little.
            let m2 = (gx * gx + gy * gy) as f64;
            if m2 == 0.0 {
                continue;
            }
            let phi = (gy as f64).atan2(gx as f64);
            h3[0] += m2 * (3.0 * phi).cos();
            h3[1] += m2 * (3.0 * phi).sin();
            h4[0] += m2 * (4.0 * phi).cos();
            h4[1] += m2 * (4.0 * phi).sin();
            total += m2;
        }
    }
    if total < 1.0 {
        return None;
    }
    let h3 = h3[0].hypot(h3[1]) / total;
    let h4 = h4[0].hypot(h4[1]) / total;
    Some(decide(h3, h4))
}

/// Thresholds on the 3rd / 4th harmonic strengths (0 = no preferred orientation, 1 = all
/// edges at the shape's angles), chosen from rendered training samples.
fn decide(h3: f64, h4: f64) -> Shape {
    if h3.max(h4) < SHAPE_EDGE_THRESHOLD {
        Shape::Circle
    } else if h3 > h4 {
        Shape::Triangle
    } else {
        Shape::Square
    }
}

const SHAPE_EDGE_THRESHOLD: f64 = 0.3;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::starter::shapes::{Position, Quality, Scene, Size, World};
    use image::Rgb;
    use rand::SeedableRng;

    #[test]
    fn region_means_read_the_box_and_the_ring() {
        let img = RgbImage::from_fn(64, 64, |x, y| {
            if (26..38).contains(&x) && (26..38).contains(&y) {
                Rgb([200, 100, 0])
            } else if x < 4 || y < 4 || x >= 60 || y >= 60 {
                Rgb([10, 20, 30])
            } else {
                Rgb([255, 255, 255])
            }
        });
        let (centre, ring) = region_means(&img, 0.2, 4);
        assert_eq!(centre, [200.0, 100.0, 0.0]);
        assert_eq!(ring, [10.0, 20.0, 30.0]);
        assert_eq!(nearest_colour([210.0, 50.0, 30.0]), Colour::Red);
        assert_eq!(nearest_colour([0.0, 0.0, 0.0]), Colour::Black);
        for c in Colour::ALL {
            assert_eq!(nearest_colour(c.rgb().map(f32::from)), c);
        }
    }

    #[test]
    fn degenerate_images_have_no_shape() {
        let flat = RgbImage::from_pixel(64, 64, Rgb(Colour::Blue.rgb()));
        assert_eq!(classify_shape(&flat, Colour::Red, Colour::Blue), None);
        let full = RgbImage::from_pixel(64, 64, Rgb(Colour::Red.rgb()));
        assert_eq!(classify_shape(&full, Colour::Red, Colour::Blue), None);
        assert_eq!(classify_shape(&flat, Colour::Blue, Colour::Blue), None);
    }

    #[test]
    fn shapes_are_recognised_on_clean_training_samples() {
        let world = World::new(2024);
        let (mut right, mut total, mut index) = (0, 0, 0u64);
        let mut wrong = Vec::new();
        while total < 300 {
            let (scene, img) = world.training_sample(index);
            index += 1;
            if !scene.quality.is_clean() {
                continue;
            }
            total += 1;
            match classify_shape(&img, scene.colour, scene.background) {
                Some(s) if s == scene.shape => right += 1,
                got => wrong.push(format!("{} -> {got:?}", scene.caption())),
            }
        }
        let acc = right as f64 / total as f64;
        eprintln!("classify_shape on {total} clean training samples: {:.1} % ({wrong:?})", 100.0 * acc);
        assert!(acc >= 0.97, "{acc}: {wrong:?}");
    }

    /// Colour accuracy and shape accuracy on centred renders of every training-style
    /// combination with the given quality.
    fn accuracies(quality: Quality) -> (f64, f64) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (mut colours_ok, mut shapes_ok, mut n) = (0, 0, 0);
        for (i, colour) in Colour::ALL.into_iter().enumerate() {
            for shape in Shape::ALL {
                for j in 1..8 {
                    let background = Colour::ALL[(i + j) % 8];
                    let size = [Size::Small, Size::Normal, Size::Large][(i + j) % 3];
                    let scene = Scene { shape, colour, background, size, position: Position::Centre, quality };
                    let img = scene.render(&mut rng);
                    n += 1;
                    colours_ok += usize::from(classify_colours(&img) == (colour, background));
                    shapes_ok += usize::from(classify_shape(&img, colour, background) == Some(shape));
                }
            }
        }
        (colours_ok as f64 / n as f64, shapes_ok as f64 / n as f64)
    }

    #[test]
    fn colours_are_read_on_centred_samples() {
        let (clean, clean_shapes) = accuracies(Quality::default());
        let (blurry, blurry_shapes) = accuracies(Quality { blurry: true, ..Default::default() });
        let (noisy, noisy_shapes) = accuracies(Quality { noisy: true, ..Default::default() });
        let (low, low_shapes) = accuracies(Quality { low_contrast: true, ..Default::default() });
        eprintln!(
            "colours / shapes on 168 centred renders: clean {clean:.3}/{clean_shapes:.3} blurry {blurry:.3}/{blurry_shapes:.3} \
             noisy {noisy:.3}/{noisy_shapes:.3} low contrast {low:.3}/{low_shapes:.3}"
        );
        assert_eq!(clean, 1.0);
        assert!(blurry >= 0.9, "{blurry}");
        assert!(noisy >= 0.9, "{noisy}");
        // Matching against the faded palette keeps low-contrast images readable too.
        assert!(low >= 0.9, "{low}");
        for acc in [clean_shapes, blurry_shapes, noisy_shapes, low_shapes] {
            assert!(acc >= 0.9, "{acc}");
        }
    }

    #[test]
    fn shapes_are_recognised_on_degraded_training_samples() {
        let world = World::new(77);
        let (mut right, mut total, mut index) = (0, 0, 0u64);
        while total < 200 {
            let (scene, img) = world.training_sample(index);
            index += 1;
            if scene.quality.is_clean() {
                continue;
            }
            total += 1;
            right += usize::from(classify_shape(&img, scene.colour, scene.background) == Some(scene.shape));
        }
        let acc = right as f64 / total as f64;
        eprintln!("classify_shape on {total} degraded training samples: {:.1} %", 100.0 * acc);
        assert!(acc >= 0.9, "{acc}");
    }
}
