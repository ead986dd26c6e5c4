//! The procedural shapes world the starter model learns from.
//!
//! A [`Scene`] is one coloured shape (circle, square or triangle) on a flat background,
//! with a size, a position and optional degradations (blur, noise, low contrast). Every
//! scene has a caption in a small fixed grammar ([`Scene::caption`], [`Scene::parse`]) and
//! renders to a 64×64 image ([`Scene::render`]).
//!
//! [`World`] is the training stream: sample `i` for a seed is a pure function of
//! `(seed, i)`, so a resumed run sees exactly the data it would have seen. The
//! (colour, shape, background) triples of [`held_out_triples`] never occur in that
//! stream; they are kept for measuring whether the model composes attributes it has only
//! seen separately.

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// Side of every rendered image, in pixels.
pub const IMAGE_SIZE: u32 = 64;

/// Shape extent (circle diameter, square side, triangle side) as a fraction of the image side.
const EXTENT_SMALL: f32 = 0.45;
const EXTENT_NORMAL: f32 = 0.58;
const EXTENT_LARGE: f32 = 0.72;
/// Relative size jitter (± this fraction).
const SIZE_JITTER: f32 = 0.08;
/// Centre jitter, in pixels (± this, on each axis).
const POSITION_JITTER: f32 = 3.0;
/// Horizontal shift of `Left` / `Right` placements, as a fraction of the image side.
const SIDE_SHIFT: f32 = 0.2;
/// Rotation jitter for squares and triangles, in degrees (±).
const ROTATION_JITTER_DEG: f32 = 15.0;
/// Supersampling factor per axis for anti-aliased edges.
const SUPERSAMPLE: u32 = 4;
/// Gaussian blur sigma of the `blurry` degradation, in pixels.
const BLUR_SIGMA: f32 = 2.0;
/// How far `low contrast` pulls each pixel toward mid grey.
const LOW_CONTRAST_MIX: f32 = 0.55;
/// Mid grey that `low contrast` pulls toward.
const MID_GREY: f32 = 128.0;
/// Standard deviation of the `noisy` degradation, in 0..255 units (28/255 of full scale).
const NOISE_SIGMA: f32 = 28.0;

/// The eight palette colours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
    White,
    Black,
}

impl Colour {
    /// Every colour, in a fixed order (the order used by [`held_out_triples`]).
    pub const ALL: [Colour; 8] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
        Colour::Orange,
        Colour::White,
        Colour::Black,
    ];

    /// The word used in captions.
    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
            Colour::White => "white",
            Colour::Black => "black",
        }
    }

    /// The exact sRGB value shapes and backgrounds are filled with.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 40, 40],
            Colour::Green => [40, 170, 60],
            Colour::Blue => [40, 80, 220],
            Colour::Yellow => [235, 200, 40],
            Colour::Purple => [140, 60, 180],
            Colour::Orange => [240, 130, 30],
            Colour::White => [240, 240, 240],
            Colour::Black => [20, 20, 20],
        }
    }

    /// The colour whose caption word is `s` (exact, lower case).
    pub fn from_name(s: &str) -> Option<Colour> {
        Colour::ALL.into_iter().find(|c| c.name() == s)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The three shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    /// Every shape, in a fixed order.
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    /// The word used in captions.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }

    /// The shape whose caption word is `s` (exact, lower case).
    pub fn from_name(s: &str) -> Option<Shape> {
        Shape::ALL.into_iter().find(|sh| sh.name() == s)
    }
}

/// Shape size class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Size {
    Normal,
    Small,
    Large,
}

impl Size {
    /// Shape extent as a fraction of the image side, before jitter.
    fn extent(self) -> f32 {
        match self {
            Size::Small => EXTENT_SMALL,
            Size::Normal => EXTENT_NORMAL,
            Size::Large => EXTENT_LARGE,
        }
    }
}

/// Horizontal placement of the shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Position {
    Centre,
    Left,
    Right,
}

impl Position {
    /// Horizontal offset of the shape centre from the image centre, in pixels.
    fn shift(self) -> f32 {
        let s = SIDE_SHIFT * IMAGE_SIZE as f32;
        match self {
            Position::Centre => 0.0,
            Position::Left => -s,
            Position::Right => s,
        }
    }
}

/// Image degradations; each one is named in the caption when set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Quality {
    /// Gaussian blur, sigma 2 px.
    pub blurry: bool,
    /// Additive Gaussian noise, sigma 28/255 per channel.
    pub noisy: bool,
    /// Every pixel pulled 55 % toward mid grey.
    pub low_contrast: bool,
}

impl Quality {
    /// True when no degradation is set.
    pub fn is_clean(&self) -> bool {
        !(self.blurry || self.noisy || self.low_contrast)
    }
}

/// One scene of the shapes world.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub shape: Shape,
    pub colour: Colour,
    pub background: Colour,
    pub size: Size,
    pub position: Position,
    pub quality: Quality,
}

impl Scene {
    /// The caption, in the grammar
    /// `a [small |large ]{colour} {shape}[ on the left| on the right] on a {bg} background[, blurry][, noisy][, low contrast]`,
    /// e.g. `a red circle on a blue background` or
    /// `a small green square on the left on a black background, blurry, low contrast`.
    pub fn caption(&self) -> String {
        let mut s = String::from("a ");
        match self.size {
            Size::Small => s.push_str("small "),
            Size::Large => s.push_str("large "),
            Size::Normal => {}
        }
        s.push_str(self.colour.name());
        s.push(' ');
        s.push_str(self.shape.name());
        match self.position {
            Position::Left => s.push_str(" on the left"),
            Position::Right => s.push_str(" on the right"),
            Position::Centre => {}
        }
        s.push_str(" on a ");
        s.push_str(self.background.name());
        s.push_str(" background");
        if self.quality.blurry {
            s.push_str(", blurry");
        }
        if self.quality.noisy {
            s.push_str(", noisy");
        }
        if self.quality.low_contrast {
            s.push_str(", low contrast");
        }
        s
    }

    /// Parses a caption of exactly the [`Scene::caption`] grammar (same words, order and
    /// spacing); anything else gives `None`.
    pub fn parse(caption: &str) -> Option<Scene> {
        let mut parts = caption.split(", ");
        let main = parts.next()?;
        let mut quality = Quality::default();
        for part in parts {
            match part {
                "blurry" => quality.blurry = true,
                "noisy" => quality.noisy = true,
                "low contrast" => quality.low_contrast = true,
                _ => return None,
            }
        }
        let mut words = main.split(' ').peekable();
        if words.next()? != "a" {
            return None;
        }
        let size = match words.peek().copied()? {
            "small" => Some(Size::Small),
            "large" => Some(Size::Large),
            _ => None,
        };
        if size.is_some() {
            words.next();
        }
        let colour = Colour::from_name(words.next()?)?;
        let shape = Shape::from_name(words.next()?)?;
        if words.next()? != "on" {
            return None;
        }
        let mut position = Position::Centre;
        let mut next = words.next()?;
        if next == "the" {
            position = match words.next()? {
                "left" => Position::Left,
                "right" => Position::Right,
                _ => return None,
            };
            if words.next()? != "on" {
                return None;
            }
            next = words.next()?;
        }
        if next != "a" {
            return None;
        }
        let background = Colour::from_name(words.next()?)?;
        if words.next()? != "background" || words.next().is_some() {
            return None;
        }
        let scene = Scene { shape, colour, background, size: size.unwrap_or(Size::Normal), position, quality };
        // The degradations must also come in the canonical order, once each.
        (scene.caption() == caption).then_some(scene)
    }

    /// Renders the scene as a 64×64 image. `rng` supplies the jitter (centre ±3 px, size
    /// ±8 %, rotation ±15° for squares and triangles) and the noise of degradations, in
    /// that order, so a seeded `rng` gives identical bytes on every machine.
    pub fn render(&self, rng: &mut impl Rng) -> RgbImage {
        let side = IMAGE_SIZE as f32;
        let jx = rng.random_range(-POSITION_JITTER..=POSITION_JITTER);
        let jy = rng.random_range(-POSITION_JITTER..=POSITION_JITTER);
        let scale = rng.random_range(1.0 - SIZE_JITTER..=1.0 + SIZE_JITTER);
        let rotation = match self.shape {
            Shape::Circle => 0.0,
            Shape::Square | Shape::Triangle => {
                rng.random_range(-ROTATION_JITTER_DEG..=ROTATION_JITTER_DEG).to_radians()
            }
        };
        let geometry = Geometry {
            shape: self.shape,
            cx: side / 2.0 + self.position.shift() + jx,
            cy: side / 2.0 + jy,
            extent: self.size.extent() * scale * side,
            cos: rotation.cos(),
            sin: rotation.sin(),
        };

        let mut buf = Buffer::filled(IMAGE_SIZE as usize, self.background.rgb());
        buf.draw(&geometry, self.colour.rgb());
        if self.quality.blurry {
            buf.blur(BLUR_SIGMA);
        }
        if self.quality.low_contrast {
            for v in buf.data.iter_mut() {
                *v += LOW_CONTRAST_MIX * (MID_GREY - *v);
            }
        }
        if self.quality.noisy {
            for v in buf.data.iter_mut() {
                let n: f32 = rng.sample(StandardNormal);
                *v += NOISE_SIGMA * n;
            }
        }
        buf.to_image()
    }
}

/// A shape placed in image coordinates (pixel `(x, y)` covers `[x, x+1) × [y, y+1)`).
struct Geometry {
    shape: Shape,
    cx: f32,
    cy: f32,
    /// Circle diameter, square side or triangle side, in pixels.
    extent: f32,
    cos: f32,
    sin: f32,
}

impl Geometry {
    fn contains(&self, x: f32, y: f32) -> bool {
        let dx = x - self.cx;
        let dy = y - self.cy;
        // Coordinates in the shape's own (unrotated) frame; y points down.
        let u = self.cos * dx + self.sin * dy;
        let v = -self.sin * dx + self.cos * dy;
        match self.shape {
            Shape::Circle => {
                let r = self.extent / 2.0;
                dx * dx + dy * dy <= r * r
            }
            Shape::Square => {
                let h = self.extent / 2.0;
                u.abs() <= h && v.abs() <= h
            }
            Shape::Triangle => {
                // Equilateral, pointing up, incircle centred on (cx, cy): each edge lies at
                // the inradius from the centre, its outward normal opposite a vertex.
                let r = self.extent / (2.0 * 3f32.sqrt());
                let c = 3f32.sqrt() / 2.0;
                v <= r && c * u - 0.5 * v <= r && -c * u - 0.5 * v <= r
            }
        }
    }
}

/// A float RGB image in 0..255 units, row-major, used while rendering.
struct Buffer {
    side: usize,
    data: Vec<f32>,
}

impl Buffer {
    fn filled(side: usize, rgb: [u8; 3]) -> Self {
        let mut data = Vec::with_capacity(side * side * 3);
        for _ in 0..side * side {
            data.extend(rgb.iter().map(|&c| c as f32));
        }
        Self { side, data }
    }

    /// Fills the shape with `rgb`, blending edge pixels by their supersampled coverage.
    fn draw(&mut self, g: &Geometry, rgb: [u8; 3]) {
        let n = SUPERSAMPLE;
        let samples = (n * n) as f32;
        for y in 0..self.side {
            for x in 0..self.side {
                let mut hits = 0u32;
                for sy in 0..n {
                    for sx in 0..n {
                        let px = x as f32 + (sx as f32 + 0.5) / n as f32;
                        let py = y as f32 + (sy as f32 + 0.5) / n as f32;
                        hits += u32::from(g.contains(px, py));
                    }
                }
                if hits == 0 {
                    continue;
                }
                let a = hits as f32 / samples;
                let i = (y * self.side + x) * 3;
                for (k, &c) in rgb.iter().enumerate() {
                    let v = &mut self.data[i + k];
                    *v += a * (c as f32 - *v);
                }
            }
        }
    }

    /// Separable Gaussian blur, edges clamped.
    fn blur(&mut self, sigma: f32) {
        let radius = (3.0 * sigma).ceil() as isize;
        let mut kernel: Vec<f32> =
            (-radius..=radius).map(|k| (-((k * k) as f32) / (2.0 * sigma * sigma)).exp()).collect();
        let total: f32 = kernel.iter().sum();
        kernel.iter_mut().for_each(|w| *w /= total);

        let side = self.side as isize;
        let at = |x: isize, y: isize| (y.clamp(0, side - 1) * side + x.clamp(0, side - 1)) as usize * 3;
        for horizontal in [true, false] {
            let src = self.data.clone();
            for y in 0..side {
                for x in 0..side {
                    let mut acc = [0f32; 3];
                    for (w, k) in kernel.iter().zip(-radius..=radius) {
                        let j = if horizontal { at(x + k, y) } else { at(x, y + k) };
                        for (a, s) in acc.iter_mut().zip(&src[j..j + 3]) {
                            *a += w * s;
                        }
                    }
                    let i = at(x, y);
                    self.data[i..i + 3].copy_from_slice(&acc);
                }
            }
        }
    }

    fn to_image(&self) -> RgbImage {
        let side = self.side as u32;
        RgbImage::from_fn(side, side, |x, y| {
            let i = (y as usize * self.side + x as usize) * 3;
            let q = |v: f32| v.round().clamp(0.0, 255.0) as u8;
            Rgb([q(self.data[i]), q(self.data[i + 1]), q(self.data[i + 2])])
        })
    }
}

/// Per shape: the background offset (in [`Colour::ALL`] order, mod 8) held out for every
/// colour, and a second offset held out for the colours of one parity. The six offsets are
/// distinct, so each ordered (colour, background) pair is held out with at most one shape.
const HELD_OUT_OFFSETS: [(usize, usize, usize); 3] = [(1, 4, 0), (3, 6, 1), (5, 2, 0)];

/// The (shape colour, shape, background colour) triples excluded from training, kept for
/// the held-out evaluation: 36 triples, 12 per shape, never colour == background. Every
/// colour still appears with every shape both as shape colour (at least 5 backgrounds)
/// and as background (at least 5 shape colours) in the remaining training triples, and
/// every (colour, background) pair still appears in training with at least two shapes.
pub fn held_out_triples() -> Vec<(Colour, Shape, Colour)> {
    let mut out = Vec::with_capacity(36);
    for (shape, &(all, extra, parity)) in Shape::ALL.into_iter().zip(&HELD_OUT_OFFSETS) {
        for (i, &colour) in Colour::ALL.iter().enumerate() {
            out.push((colour, shape, Colour::ALL[(i + all) % 8]));
            if i % 2 == parity {
                out.push((colour, shape, Colour::ALL[(i + extra) % 8]));
            }
        }
    }
    out
}

/// True when the triple is one of [`held_out_triples`].
pub fn is_held_out(colour: Colour, shape: Shape, background: Colour) -> bool {
    let (all, extra, parity) = HELD_OUT_OFFSETS[shape as usize];
    let i = colour.index();
    let offset = (background.index() + 8 - i) % 8;
    offset == all || (offset == extra && i % 2 == parity)
}

/// The training triples: every (colour, shape, background) with colour != background that
/// is not held out, in a fixed order.
fn training_triples() -> Vec<(Colour, Shape, Colour)> {
    let mut out = Vec::with_capacity(132);
    for colour in Colour::ALL {
        for shape in Shape::ALL {
            for background in Colour::ALL {
                if colour != background && !is_held_out(colour, shape, background) {
                    out.push((colour, shape, background));
                }
            }
        }
    }
    out
}

/// The training stream of the shapes world for one seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    seed: u64,
}

impl World {
    /// The world for `seed`.
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    /// Training sample `index`: a scene (never a held-out triple, never colour ==
    /// background; the triple uniform over the 132 training triples; size Normal 50 % /
    /// Small 25 % / Large 25 %; position Centre 60 % / Left 20 % / Right 20 %; blurry 15 %,
    /// noisy 15 %, low contrast 10 %, independently) and its rendering. A pure function of
    /// `(seed, index)`.
    pub fn training_sample(&self, index: u64) -> (Scene, RgbImage) {
        let (scene, mut rng) = self.scene(index);
        let image = scene.render(&mut rng);
        (scene, image)
    }

    /// Sample `index` without degradations (the clean version of its scene).
    pub fn clean_sample(&self, index: u64) -> (Scene, RgbImage) {
        let (mut scene, mut rng) = self.scene(index);
        scene.quality = Quality::default();
        let image = scene.render(&mut rng);
        (scene, image)
    }

    /// The scene of sample `index` and the RNG, positioned to render it.
    fn scene(&self, index: u64) -> (Scene, ChaCha8Rng) {
        // One ChaCha key per seed, one stream per index: samples are independent and any
        // one of them can be produced without generating the ones before it.
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(index);
        let triples = training_triples();
        let (colour, shape, background) = triples[rng.random_range(0..triples.len())];
        let size = match rng.random_range(0..4u8) {
            0 => Size::Small,
            1 => Size::Large,
            _ => Size::Normal,
        };
        let position = match rng.random_range(0..5u8) {
            0 => Position::Left,
            1 => Position::Right,
            _ => Position::Centre,
        };
        let quality = Quality {
            blurry: rng.random_bool(0.15),
            noisy: rng.random_bool(0.15),
            low_contrast: rng.random_bool(0.10),
        };
        (Scene { shape, colour, background, size, position, quality }, rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn clean(shape: Shape, colour: Colour, background: Colour, size: Size) -> Scene {
        Scene { shape, colour, background, size, position: Position::Centre, quality: Quality::default() }
    }

    fn laplacian_var(img: &RgbImage) -> f64 {
        crate::quality::laplacian_variance(img)
    }

    /// Pixels of the central `box_side` box (centred) and of the `ring`-wide border.
    fn centre_and_ring(img: &RgbImage, box_side: u32, ring: u32) -> (Vec<[u8; 3]>, Vec<[u8; 3]>) {
        let start = (IMAGE_SIZE - box_side) / 2;
        let mut centre = Vec::new();
        let mut border = Vec::new();
        for (x, y, p) in img.enumerate_pixels() {
            if (start..start + box_side).contains(&x) && (start..start + box_side).contains(&y) {
                centre.push(p.0);
            }
            if x < ring || y < ring || x >= IMAGE_SIZE - ring || y >= IMAGE_SIZE - ring {
                border.push(p.0);
            }
        }
        (centre, border)
    }

    #[test]
    fn names_round_trip() {
        for c in Colour::ALL {
            assert_eq!(Colour::from_name(c.name()), Some(c));
        }
        for s in Shape::ALL {
            assert_eq!(Shape::from_name(s.name()), Some(s));
        }
        assert_eq!(Colour::from_name("Red"), None);
        assert_eq!(Colour::Orange.rgb(), [240, 130, 30]);
        assert_eq!(Shape::from_name("hexagon"), None);
    }

    #[test]
    fn captions_follow_the_grammar_and_round_trip() {
        let s = clean(Shape::Circle, Colour::Red, Colour::Blue, Size::Normal);
        assert_eq!(s.caption(), "a red circle on a blue background");
        let s = Scene {
            shape: Shape::Square,
            colour: Colour::Green,
            background: Colour::Black,
            size: Size::Small,
            position: Position::Left,
            quality: Quality { blurry: true, noisy: false, low_contrast: true },
        };
        assert_eq!(s.caption(), "a small green square on the left on a black background, blurry, low contrast");
        assert_eq!(Scene::parse(&s.caption()), Some(s));

        let mut n = 0;
        for shape in Shape::ALL {
            for colour in Colour::ALL {
                for size in [Size::Normal, Size::Small, Size::Large] {
                    for position in [Position::Centre, Position::Left, Position::Right] {
                        for q in 0..8u8 {
                            let quality = Quality { blurry: q & 1 != 0, noisy: q & 2 != 0, low_contrast: q & 4 != 0 };
                            let background = Colour::ALL[(colour as usize + 3) % 8];
                            let s = Scene { shape, colour, background, size, position, quality };
                            assert_eq!(Scene::parse(&s.caption()).as_ref(), Some(&s), "{}", s.caption());
                            n += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(n, 3 * 8 * 3 * 3 * 8);

        for bad in [
            "",
            "a red circle",
            "a red circle on a blue background,",
            "a red circle on a blue background, noisy, blurry",
            "a red circle on a blue background, blurry, blurry",
            "a  red circle on a blue background",
            "a normal red circle on a blue background",
            "a red circle on the top on a blue background",
            "a red circle on a blue background extra",
            "an red circle on a blue background",
            "a red hexagon on a blue background",
            "a red circle on a cyan background",
            "A red circle on a blue background",
        ] {
            assert_eq!(Scene::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn held_out_triples_are_balanced() {
        let held = held_out_triples();
        assert_eq!(held.len(), 36);
        let unique: HashSet<_> = held.iter().copied().collect();
        assert_eq!(unique.len(), 36);
        for &(c, s, b) in &held {
            assert_ne!(c, b);
            assert!(is_held_out(c, s, b));
        }
        // is_held_out agrees with the list everywhere.
        let mut count = 0;
        for c in Colour::ALL {
            for s in Shape::ALL {
                for b in Colour::ALL {
                    assert_eq!(is_held_out(c, s, b), unique.contains(&(c, s, b)));
                    count += usize::from(is_held_out(c, s, b));
                }
            }
        }
        assert_eq!(count, 36);
        assert_eq!(held, held_out_triples(), "deterministic");

        let train = training_triples();
        assert_eq!(train.len(), 8 * 3 * 7 - 36);
        for c in Colour::ALL {
            for s in Shape::ALL {
                let as_colour = train.iter().filter(|t| t.0 == c && t.1 == s).count();
                let as_background = train.iter().filter(|t| t.2 == c && t.1 == s).count();
                assert!(as_colour >= 5, "{c:?} {s:?}: {as_colour}");
                assert!(as_background >= 5, "{c:?} {s:?}: {as_background}");
            }
            for b in Colour::ALL {
                if b != c {
                    let shapes = train.iter().filter(|t| t.0 == c && t.2 == b).count();
                    assert!(shapes >= 2, "{c:?} on {b:?}: {shapes}");
                }
            }
        }
    }

    #[test]
    fn training_stream_avoids_held_out_and_matches_the_mix() {
        let world = World::new(42);
        let n = 2000;
        let (mut small, mut large, mut left, mut right, mut blurry, mut noisy, mut low) = (0, 0, 0, 0, 0, 0, 0);
        let mut triples = HashSet::new();
        for i in 0..n {
            let (s, _) = world.scene(i);
            assert_ne!(s.colour, s.background);
            assert!(!is_held_out(s.colour, s.shape, s.background), "{}", s.caption());
            triples.insert((s.colour, s.shape, s.background));
            small += usize::from(s.size == Size::Small);
            large += usize::from(s.size == Size::Large);
            left += usize::from(s.position == Position::Left);
            right += usize::from(s.position == Position::Right);
            blurry += usize::from(s.quality.blurry);
            noisy += usize::from(s.quality.noisy);
            low += usize::from(s.quality.low_contrast);
        }
        // 2000 draws over 132 triples: all of them show up.
        assert_eq!(triples.len(), 132);
        let frac = |k: usize| k as f64 / n as f64;
        // Binomial standard errors are ≤ 0.011 here; allow about 4 of them.
        for (got, want) in
            [(small, 0.25), (large, 0.25), (left, 0.2), (right, 0.2), (blurry, 0.15), (noisy, 0.15), (low, 0.10)]
        {
            assert!((frac(got) - want).abs() < 0.04, "{} vs {want}", frac(got));
        }
    }

    #[test]
    fn samples_are_a_pure_function_of_seed_and_index() {
        let a = World::new(7).training_sample(123);
        let b = World::new(7).training_sample(123);
        assert_eq!(a.0, b.0);
        assert_eq!(a.1.as_raw(), b.1.as_raw());
        assert_eq!(a.1.dimensions(), (IMAGE_SIZE, IMAGE_SIZE));
        let c = World::new(7).training_sample(124);
        assert_ne!(a.1.as_raw(), c.1.as_raw());
        let d = World::new(8).training_sample(123);
        assert_ne!(a.1.as_raw(), d.1.as_raw());
    }

    #[test]
    fn centred_shapes_fill_the_centre_and_leave_the_border() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut ring_shape_pixels = [0usize; 3];
        let mut ring_total = 0usize;
        for i in 0..240 {
            let shape = Shape::ALL[i % 3];
            let size = [Size::Small, Size::Normal, Size::Large][(i / 3) % 3];
            let colour = Colour::ALL[(i / 9) % 8];
            let background = Colour::ALL[(i / 9 + 1 + i % 7) % 8];
            let background = if background == colour { Colour::ALL[(colour as usize + 1) % 8] } else { background };
            let img = clean(shape, colour, background, size).render(&mut rng);
            // Circles and squares cover the whole central 12×12 box; a triangle's
            // incircle is too small for that, but always covers the central 4×4.
            let box_side = if shape == Shape::Triangle { 4 } else { 12 };
            let (centre, ring) = centre_and_ring(&img, box_side, 4);
            assert!(centre.iter().all(|&p| p == colour.rgb()), "{shape:?} {size:?}");
            let intruding = ring.iter().filter(|&&p| p != background.rgb()).count();
            // A large square turned by up to 15° spans up to 0.72·1.08·(cos 15° + sin 15°)
            // = 95 % of the side, and a large triangle's top vertex lies 0.72·1.08/√3 of
            // the side above its centre, so those two reach into the ring (at worst 130
            // and 20 of its 960 pixels, with the jitter at its extremes). Everything else
            // stays clear of it.
            let allowed = match (shape, size) {
                (Shape::Square, Size::Large) => ring.len() * 14 / 100,
                (Shape::Triangle, Size::Large) => ring.len() * 3 / 100,
                _ => 0,
            };
            assert!(intruding <= allowed, "{shape:?} {size:?}: {intruding}");
            ring_shape_pixels[shape as usize] += intruding;
            ring_total += ring.len();
        }
        assert_eq!(ring_shape_pixels[Shape::Circle as usize], 0);
        // On average the ring is almost all background.
        assert!(ring_shape_pixels.iter().sum::<usize>() * 100 < ring_total * 2, "{ring_shape_pixels:?}");
    }

    #[test]
    fn clean_centred_training_samples_have_the_shape_colour_in_the_middle() {
        let world = World::new(11);
        let mut seen = 0;
        for i in 0..400 {
            let (s, img) = world.training_sample(i);
            if s.position != Position::Centre || !s.quality.is_clean() {
                continue;
            }
            seen += 1;
            let (centre, ring) = centre_and_ring(&img, 4, 4);
            let mean = |px: &[[u8; 3]], k: usize| px.iter().map(|p| p[k] as f32).sum::<f32>() / px.len() as f32;
            for k in 0..3 {
                assert!((mean(&centre, k) - s.colour.rgb()[k] as f32).abs() < 1.0, "{}", s.caption());
            }
            // At least 86 % of the ring is background (see the test above).
            let bg = ring.iter().filter(|&&p| p == s.background.rgb()).count();
            assert!(bg * 100 >= ring.len() * 86, "{}: {bg}", s.caption());
        }
        assert!(seen > 100, "{seen}");
    }

    #[test]
    fn degradations_change_the_image_measurably() {
        let base = Scene {
            shape: Shape::Square,
            colour: Colour::Yellow,
            background: Colour::Blue,
            size: Size::Normal,
            position: Position::Centre,
            quality: Quality::default(),
        };
        let render = |quality: Quality| {
            let mut rng = ChaCha8Rng::seed_from_u64(5);
            Scene { quality, ..base.clone() }.render(&mut rng)
        };
        let clean_img = render(Quality::default());
        let blurry = render(Quality { blurry: true, ..Default::default() });
        let noisy = render(Quality { noisy: true, ..Default::default() });
        let low = render(Quality { low_contrast: true, ..Default::default() });
        let (lc, lb, ln) = (laplacian_var(&clean_img), laplacian_var(&blurry), laplacian_var(&noisy));
        assert!(lb < 0.2 * lc, "blur {lb} vs {lc}");
        assert!(ln > 2.0 * lc, "noise {ln} vs {lc}");
        // Low contrast: the background moves 55 % toward grey.
        let bg = low.get_pixel(0, 0).0;
        let want = Colour::Blue.rgb().map(|c| (c as f32 + 0.55 * (128.0 - c as f32)).round() as u8);
        assert_eq!(bg, want);
        // Blur leaves flat regions alone and noise has about the stated sigma.
        assert_eq!(blurry.get_pixel(0, 0).0, Colour::Blue.rgb());
        let diffs: Vec<f64> = noisy
            .pixels()
            .zip(clean_img.pixels())
            .take(64 * 4)
            .flat_map(|(a, b)| (0..3).map(move |k| a[k] as f64 - b[k] as f64))
            .collect();
        let sd = (diffs.iter().map(|d| d * d).sum::<f64>() / diffs.len() as f64).sqrt();
        assert!((sd - 28.0).abs() < 4.0, "noise sd {sd}");
    }
}
