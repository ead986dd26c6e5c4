//! Style datasets: a folder of an artist's images checked and prepared for training.
//!
//! [`scan`] reads every file of a folder (not recursively) and reports, before any
//! training starts: the images it will use, files it cannot use with the reason (not
//! an image, cannot be decoded, smaller than the training resolution), and
//! near-duplicates (difference hash within [`DUPLICATE_DISTANCE`] bits of an earlier
//! image; the later one is left out). Captions come from a `.txt` file beside each
//! image (`cat.png` + `cat.txt`), else from the trigger word. [`prepare`] centre-crops
//! and resizes the images to the training resolution and hashes the result with the
//! captions, so every run records exactly which data it saw.

use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::Serialize;
use sha2::Digest;

use crate::{Error, Result};

/// Hamming distance (of 64 bits) at or below which two images count as near-duplicates.
pub const DUPLICATE_DISTANCE: u32 = 4;

/// Largest accepted side, to refuse decompression bombs.
const MAX_SIDE: u32 = 16384;

/// A usable image.
#[derive(Debug, Clone, Serialize)]
pub struct DatasetItem {
    pub path: PathBuf,
    pub width: u32,
    pub height: u32,
    pub caption: String,
    /// Whether the caption came from a `.txt` sidecar.
    pub caption_from_file: bool,
    /// 64-bit difference hash, as 16 hex digits.
    pub dhash: String,
}

/// A file that will not be used, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Rejected {
    pub path: PathBuf,
    pub reason: String,
}

/// What [`scan`] found.
#[derive(Debug, Clone, Serialize)]
pub struct DatasetReport {
    pub dir: PathBuf,
    pub items: Vec<DatasetItem>,
    pub rejected: Vec<Rejected>,
    /// (left out, duplicate of, distance in bits).
    pub duplicates: Vec<(PathBuf, PathBuf, u32)>,
    pub min_images: usize,
    pub resolution: u32,
}

impl DatasetReport {
    /// Whether there are enough usable images to train.
    pub fn is_usable(&self) -> bool {
        self.items.len() >= self.min_images
    }

    /// A short human summary, one line per finding.
    pub fn summary(&self) -> String {
        let mut s = format!("{} usable image(s) in {}", self.items.len(), self.dir.display());
        let from_files = self.items.iter().filter(|i| i.caption_from_file).count();
        s.push_str(&format!(" ({from_files} with .txt captions)"));
        for r in &self.rejected {
            s.push_str(&format!("\n  skipped {}: {}", file_name(&r.path), r.reason));
        }
        for (dup, of, d) in &self.duplicates {
            s.push_str(&format!("\n  skipped {}: near-duplicate of {} ({d} of 64 bits differ)", file_name(dup), file_name(of)));
        }
        if !self.is_usable() {
            s.push_str(&format!("\n  not enough images: at least {} are needed", self.min_images));
        }
        s
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned())
}

/// The 64-bit difference hash: the image in grey at 9×8, one bit per horizontal
/// neighbour pair (left brighter than right).
pub fn dhash(img: &image::DynamicImage) -> u64 {
    let small = img.resize_exact(9, 8, image::imageops::FilterType::Triangle).to_luma8();
    let mut bits = 0u64;
    for y in 0..8 {
        for x in 0..8 {
            bits = (bits << 1) | u64::from(small.get_pixel(x, y)[0] > small.get_pixel(x + 1, y)[0]);
        }
    }
    bits
}

/// Reads `dir` and reports what can be trained on. `trigger` builds the caption of
/// images without a `.txt` file; images smaller than `resolution` on either side are
/// refused; fewer than `min_images` usable images makes the report unusable.
pub fn scan(dir: &Path, trigger: &str, resolution: u32, min_images: usize) -> Result<DatasetReport> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect();
    paths.sort();
    let mut items: Vec<(DatasetItem, u64)> = Vec::new();
    let mut rejected = Vec::new();
    let mut duplicates = Vec::new();
    for path in paths {
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
        if ext == "txt" || path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
            continue;
        }
        let img = match open_image(&path) {
            Ok(img) => img,
            Err(reason) => {
                rejected.push(Rejected { path, reason });
                continue;
            }
        };
        let (w, h) = (img.width(), img.height());
        if w < resolution || h < resolution {
            rejected.push(Rejected { path, reason: format!("{w}×{h} is smaller than the training resolution {resolution}×{resolution}") });
            continue;
        }
        let hash = dhash(&img);
        if let Some((first, h2)) = items.iter().find(|(_, h2)| (hash ^ h2).count_ones() <= DUPLICATE_DISTANCE) {
            duplicates.push((path, first.path.clone(), (hash ^ h2).count_ones()));
            continue;
        }
        let sidecar = path.with_extension("txt");
        let (caption, from_file) = match std::fs::read_to_string(&sidecar) {
            Ok(text) if !text.trim().is_empty() => (text.trim().to_string(), true),
            _ => (default_caption(trigger), false),
        };
        items.push((
            DatasetItem { path, width: w, height: h, caption, caption_from_file: from_file, dhash: format!("{hash:016x}") },
            hash,
        ));
    }
    Ok(DatasetReport {
        dir: dir.to_path_buf(),
        items: items.into_iter().map(|(i, _)| i).collect(),
        rejected,
        duplicates,
        min_images,
        resolution,
    })
}

/// The caption of an image without a `.txt` file.
pub fn default_caption(trigger: &str) -> String {
    let t = trigger.trim();
    if t.is_empty() {
        String::new()
    } else {
        format!("{t} style")
    }
}

/// Opens an image by its content (not its extension), with size limits; the error is
/// the reason a person would want to read.
fn open_image(path: &Path) -> std::result::Result<image::DynamicImage, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot be read ({e})"))?;
    let format = image::guess_format(&bytes).map_err(|_| "not an image (PNG, JPEG or WebP expected)".to_string())?;
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP) {
        return Err(format!("{format:?} images are not supported; use PNG, JPEG or WebP"));
    }
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    reader.limits(limits);
    reader.decode().map_err(|e| format!("cannot be decoded ({e}); the file may be truncated or corrupt"))
}

/// The images and captions a run trains on, at the training resolution.
#[derive(Debug, Clone)]
pub struct PreparedDataset {
    pub images: Vec<RgbImage>,
    pub captions: Vec<String>,
    /// sha256 (first 16 hex digits) of the resolution, every caption and every
    /// prepared pixel, in order.
    pub hash: String,
}

/// Centre-crops every usable image of `report` to a square and resizes it to the
/// report's resolution.
pub fn prepare(report: &DatasetReport) -> Result<PreparedDataset> {
    if !report.is_usable() {
        return Err(Error::invalid("images", report.summary()));
    }
    let s = report.resolution;
    let mut images = Vec::with_capacity(report.items.len());
    let mut captions = Vec::with_capacity(report.items.len());
    let mut h = sha2::Sha256::new();
    h.update(s.to_le_bytes());
    for item in &report.items {
        let img = open_image(&item.path).map_err(|reason| Error::Image(format!("{}: {reason}", item.path.display())))?;
        let side = img.width().min(img.height());
        let cropped = img.crop_imm((img.width() - side) / 2, (img.height() - side) / 2, side, side);
        let rgb = cropped.resize_exact(s, s, image::imageops::FilterType::Lanczos3).to_rgb8();
        h.update((item.caption.len() as u64).to_le_bytes());
        h.update(item.caption.as_bytes());
        h.update(rgb.as_raw());
        images.push(rgb);
        captions.push(item.caption.clone());
    }
    let hash = h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    Ok(PreparedDataset { images, captions, hash })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn save(dir: &Path, name: &str, img: &RgbImage) {
        img.save(dir.join(name)).unwrap();
    }

    /// A picture with coarse structure that differs per seed: a gradient at an angle
    /// and a dark disc at a seed-dependent place.
    fn pattern(seed: u32, size: u32) -> RgbImage {
        let theta = seed as f32 * 1.3;
        let (cx, cy) = ((seed * 37 % 100) as f32 / 100.0, (seed * 61 % 100) as f32 / 100.0);
        RgbImage::from_fn(size, size, |x, y| {
            let (u, v) = (x as f32 / size as f32, y as f32 / size as f32);
            let g = ((u - 0.5) * theta.cos() + (v - 0.5) * theta.sin() + 0.75).clamp(0.0, 1.0);
            let disc = ((u - cx).powi(2) + (v - cy).powi(2)) < 0.04;
            let l = if disc { 0.1 } else { g };
            image::Rgb([(l * 250.0) as u8, (l * 200.0) as u8, 90])
        })
    }

    #[test]
    fn report_lists_what_is_used_and_why_the_rest_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for i in 0..5 {
            save(d, &format!("img{i}.png"), &pattern(i, 80));
        }
        std::fs::write(d.join("img0.txt"), "a red circle, ink style\n").unwrap();
        // A near-duplicate (same picture, slightly brighter), a corrupt PNG, a text file
        // pretending to be an image, a too-small image.
        let mut bright = pattern(1, 80);
        for p in bright.pixels_mut() {
            p[0] = p[0].saturating_add(3);
        }
        save(d, "zz_copy.png", &bright);
        let good = std::fs::read(d.join("img2.png")).unwrap();
        std::fs::write(d.join("broken.png"), &good[..good.len() / 3]).unwrap();
        std::fs::write(d.join("notes.jpg"), "not a picture").unwrap();
        save(d, "tiny.png", &pattern(9, 32));

        let r = scan(d, "inkwash", 64, 5).unwrap();
        let names: Vec<String> = r.items.iter().map(|i| file_name(&i.path)).collect();
        assert_eq!(names, ["img0.png", "img1.png", "img2.png", "img3.png", "img4.png"]);
        assert_eq!(r.items[0].caption, "a red circle, ink style");
        assert!(r.items[0].caption_from_file);
        assert_eq!(r.items[1].caption, "inkwash style");
        let reasons: Vec<(String, String)> = r.rejected.iter().map(|x| (file_name(&x.path), x.reason.clone())).collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(reasons.iter().any(|(n, why)| n == "broken.png" && why.contains("cannot be decoded")));
        assert!(reasons.iter().any(|(n, why)| n == "notes.jpg" && why.contains("not an image")));
        assert!(reasons.iter().any(|(n, why)| n == "tiny.png" && why.contains("smaller than")));
        assert_eq!(r.duplicates.len(), 1);
        assert_eq!((file_name(&r.duplicates[0].0), file_name(&r.duplicates[0].1)), ("zz_copy.png".into(), "img1.png".into()));
        assert!(r.is_usable());
        let text = r.summary();
        assert!(text.contains("5 usable") && text.contains("near-duplicate of img1.png"), "{text}");

        let p = prepare(&r).unwrap();
        assert_eq!(p.images.len(), 5);
        assert_eq!(p.images[0].dimensions(), (64, 64));
        assert_eq!(p.hash.len(), 16);
        // The hash follows the data: another caption gives another hash.
        std::fs::write(d.join("img0.txt"), "another caption").unwrap();
        assert_ne!(prepare(&scan(d, "inkwash", 64, 5).unwrap()).unwrap().hash, p.hash);
        assert_eq!(prepare(&scan(d, "inkwash", 64, 5).unwrap()).unwrap().hash, prepare(&scan(d, "inkwash", 64, 5).unwrap()).unwrap().hash);
    }

    #[test]
    fn too_few_images_is_refused_with_the_report() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), "one.png", &pattern(0, 64));
        let r = scan(dir.path(), "x", 64, 5).unwrap();
        assert!(!r.is_usable());
        let err = prepare(&r).unwrap_err().to_string();
        assert!(err.contains("at least 5"), "{err}");
    }

    #[test]
    fn dhash_ignores_small_changes_and_sees_different_images() {
        let a = image::DynamicImage::ImageRgb8(pattern(1, 64));
        let b = image::DynamicImage::ImageRgb8(pattern(4, 64));
        let resized = image::DynamicImage::ImageRgb8(image::imageops::resize(&pattern(1, 64), 128, 128, image::imageops::FilterType::Triangle));
        assert!((dhash(&a) ^ dhash(&resized)).count_ones() <= DUPLICATE_DISTANCE);
        assert!((dhash(&a) ^ dhash(&b)).count_ones() > DUPLICATE_DISTANCE);
    }
}
