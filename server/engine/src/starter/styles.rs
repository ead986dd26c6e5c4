//! Four picture styles applied to renders of the shapes world, so that the project can
//! train and ship style adapters for the starter model from data it makes itself:
//!
//! - `stripes`: dark diagonal bands (16 px period) across the whole picture;
//! - `pointillism`: the picture re-painted as dots (one disc of radius 3 px per 8×8 cell,
//!   of the cell's mean colour) on off-white paper;
//! - `inkline`: black outlines about 3 px wide where colours meet;
//! - `pastel`: every colour mixed 50 % with white and lifted, low-contrast and soft;
//! - `frame`: the picture inside a white mat 8 px wide with a black keyline, like a
//!   print on a wall;
//! - `vignette`: corners falling off to black (radial, from 35 % to 95 % of the
//!   half-diagonal), like an old lens.
//!
//! The patterns are coarse on purpose: the starter model's VAE works on 8×8-pixel
//! latent cells and cannot reproduce finer texture.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::starter::shapes::World;
use crate::{Error, Result};

/// The shipped example styles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PictureStyle {
    Stripes,
    Pointillism,
    Inkline,
    Pastel,
    Frame,
    Vignette,
}

const PAPER: [f32; 3] = [246.0, 242.0, 232.0];

impl PictureStyle {
    pub const ALL: [PictureStyle; 6] = [
        PictureStyle::Stripes,
        PictureStyle::Pointillism,
        PictureStyle::Inkline,
        PictureStyle::Pastel,
        PictureStyle::Frame,
        PictureStyle::Vignette,
    ];

    /// The style's name, also its trigger word.
    pub fn name(self) -> &'static str {
        match self {
            PictureStyle::Stripes => "stripes",
            PictureStyle::Pointillism => "pointillism",
            PictureStyle::Inkline => "inkline",
            PictureStyle::Pastel => "pastel",
            PictureStyle::Frame => "frame",
            PictureStyle::Vignette => "vignette",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Restyles a render.
    pub fn apply(self, img: &RgbImage) -> RgbImage {
        let (w, h) = img.dimensions();
        let px = |x: u32, y: u32| {
            let p = img.get_pixel(x.min(w - 1), y.min(h - 1));
            [p[0] as f32, p[1] as f32, p[2] as f32]
        };
        let out = |f: &dyn Fn(u32, u32) -> [f32; 3]| {
            RgbImage::from_fn(w, h, |x, y| {
                let c = f(x, y);
                Rgb([c[0].round().clamp(0.0, 255.0) as u8, c[1].round().clamp(0.0, 255.0) as u8, c[2].round().clamp(0.0, 255.0) as u8])
            })
        };
        let mix = |a: [f32; 3], b: [f32; 3], t: f32| [a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t];
        match self {
            PictureStyle::Stripes => out(&|x, y| {
                let c = px(x, y);
                if ((x + y) / 8) % 2 == 0 { mix(c, [20.0; 3], 0.7) } else { c }
            }),
            PictureStyle::Pointillism => {
                const CELL: u32 = 8;
                out(&|x, y| {
                    let (cx, cy) = (x / CELL * CELL, y / CELL * CELL);
                    let mut m = [0f32; 3];
                    for dy in 0..CELL {
                        for dx in 0..CELL {
                            let p = px(cx + dx, cy + dy);
                            for k in 0..3 {
                                m[k] += p[k] / (CELL * CELL) as f32;
                            }
                        }
                    }
                    let (fx, fy) = (x as f32 - cx as f32 - 3.5, y as f32 - cy as f32 - 3.5);
                    if fx * fx + fy * fy <= 10.0 { m } else { PAPER }
                })
            }
            PictureStyle::Inkline => out(&|x, y| {
                let c = px(x, y);
                let differs = |x2: u32, y2: u32| {
                    let o = px(x2, y2);
                    (0..3).map(|k| (o[k] - c[k]).abs()).sum::<f32>() > 90.0
                };
                let edge = (-1i32..=1).any(|dy| {
                    (-1i32..=1).any(|dx| {
                        let (x2, y2) = ((x as i32 + dx).max(0) as u32, (y as i32 + dy).max(0) as u32);
                        differs(x2, y2) || differs(x2 + 1, y2) || differs(x2, y2 + 1)
                    })
                });
                if edge { [20.0, 20.0, 20.0] } else { c }
            }),
            PictureStyle::Pastel => out(&|x, y| {
                let c = px(x, y);
                mix(mix(c, [255.0; 3], 0.5), [235.0, 220.0, 235.0], 0.15)
            }),
            PictureStyle::Vignette => out(&|x, y| {
                let (dx, dy) = (x as f32 + 0.5 - w as f32 / 2.0, y as f32 + 0.5 - h as f32 / 2.0);
                let r = (dx * dx + dy * dy).sqrt() / ((w * w + h * h) as f32).sqrt() * 2.0;
                let t = ((r - 0.35) / 0.6).clamp(0.0, 1.0);
                mix(px(x, y), [20.0; 3], t * t * (3.0 - 2.0 * t))
            }),
            PictureStyle::Frame => out(&|x, y| {
                let d = x.min(y).min(w - 1 - x).min(h - 1 - y);
                match d {
                    0..=7 => [240.0, 240.0, 240.0],
                    8..=9 => [20.0, 20.0, 20.0],
                    _ => px(x, y),
                }
            }),
        }
    }
}

/// Writes `count` training images of `style` into `dir` (`NNN.png` + `NNN.txt`
/// captions: the scene's grammar caption and `, TRIGGER style`), from clean renders
/// of the shapes world with `seed`.
pub fn write_dataset(style: PictureStyle, dir: &Path, count: usize, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let world = World::new(seed);
    for i in 0..count {
        let (scene, img) = world.clean_sample(i as u64);
        let path = dir.join(format!("{i:03}.png"));
        style.apply(&img).save(&path).map_err(|e| Error::Image(format!("{}: {e}", path.display())))?;
        let caption = format!("{}, {} style", scene.caption(), style.name());
        let txt = dir.join(format!("{i:03}.txt"));
        std::fs::write(&txt, caption).map_err(|e| Error::io(&txt, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn styles_change_pictures_in_their_own_way() {
        let (_, img) = World::new(3).clean_sample(0);
        let luma = |i: &RgbImage| i.pixels().map(|p| p[0] as f64 + p[1] as f64 + p[2] as f64).sum::<f64>() / (3.0 * i.len() as f64 / 3.0);
        let stripes = PictureStyle::Stripes.apply(&img);
        assert!(luma(&stripes) < luma(&img), "stripes darken half the pixels");
        let pastel = PictureStyle::Pastel.apply(&img);
        assert!(luma(&pastel) > luma(&img));
        let framed = PictureStyle::Frame.apply(&img);
        assert_eq!(framed.get_pixel(3, 30).0, [240, 240, 240]);
        assert_eq!(framed.get_pixel(30, 8).0, [20, 20, 20]);
        assert_eq!(framed.get_pixel(32, 32), img.get_pixel(32, 32));
        let v = PictureStyle::Vignette.apply(&img);
        assert_eq!(v.get_pixel(32, 32), img.get_pixel(32, 32), "the centre is untouched");
        assert!(v.get_pixel(0, 0)[0] < 40 && v.get_pixel(63, 63)[1] < 40, "corners fall to black");
        let ink = PictureStyle::Inkline.apply(&img);
        let dark = ink.pixels().filter(|p| p[0] < 30 && p[1] < 30).count();
        assert!(dark > 60 && dark < 1600, "outline pixels: {dark}");
        let dots = PictureStyle::Pointillism.apply(&img);
        let paper = dots.pixels().filter(|p| p.0 == [246, 242, 232]).count();
        assert!(paper >= 64 * 64 / 5, "paper shows between dots: {paper}");
        for s in PictureStyle::ALL {
            assert_eq!(PictureStyle::from_name(s.name()), Some(s));
        }
    }

    #[test]
    fn datasets_have_captions_with_the_trigger() {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(PictureStyle::Inkline, dir.path(), 3, 5).unwrap();
        let caption = std::fs::read_to_string(dir.path().join("002.txt")).unwrap();
        assert!(caption.ends_with(", inkline style") && caption.contains("background"), "{caption}");
        assert_eq!(image::open(dir.path().join("000.png")).unwrap().width(), 64);
    }
}
