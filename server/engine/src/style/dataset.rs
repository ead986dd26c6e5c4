//! Style datasets: a folder of an artist's images checked and prepared for training.
//!
//! [`scan`] reads every file of a folder (not recursively) and reports, before any
//! training starts: the images it will use, files it cannot use with the reason (not
//! an image, cannot be decoded, too large, smaller than the training resolution, a
//! caption that cannot be read or is ambiguous), and near-duplicates (the same drawing
//! in the same colours as an earlier image, see [`Fingerprint`]; the later one is left
//! out). Every image is read through [`crate::image_input::decode`], so sizes are the
//! upright ones (EXIF orientation applied) and transparency is composited onto white.
//! Captions come from a `.txt` file beside each image (`cat.png` + `cat.txt`, any case
//! of the extension, as cameras write `IMG_0001.JPG` + `IMG_0001.TXT`), decoded by
//! [`decode_caption`], else from the trigger word. [`prepare`] centre-crops and resizes
//! the images to the training resolution and hashes the result with the captions, so
//! every run records exactly which data it saw.

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use image::imageops::FilterType;
use image::RgbImage;
use serde::Serialize;
use sha2::Digest;

use crate::image_input::{self, DecodeOptions};
use crate::{Error, Result};

/// Hamming distance (of 64 bits) of the difference hashes at or below which two images
/// can be near-duplicates (their colours must agree too, see [`DUPLICATE_COLOUR`]).
/// Loose on purpose: flat areas flip bits under JPEG noise (a small image re-saved at
/// quality 60 differs by 5), and the colour thumbnail already sees the drawing.
pub const DUPLICATE_DISTANCE: u32 = 10;

/// Largest difference of one colour channel (0..=255) between two cells of the
/// [`THUMB_SIDE`]² colour thumbnails at or below which two images can be near-duplicates.
/// Re-saves down to JPEG quality 60 and resizes by 5–50 % stay within 15; a circle in
/// red 255 against red 200 differs by 55.
pub const DUPLICATE_COLOUR: u8 = 24;

/// Side of the colour thumbnail the near-duplicate check compares, in cells.
pub const THUMB_SIDE: u32 = 16;

/// A usable image.
#[derive(Debug, Clone, Serialize)]
pub struct DatasetItem {
    pub path: PathBuf,
    pub width: u32,
    pub height: u32,
    pub caption: String,
    /// Whether the caption came from a `.txt` sidecar.
    pub caption_from_file: bool,
    /// Something a person should check about the caption (read as Windows-1252, an
    /// empty caption file), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption_note: Option<String>,
    /// 64-bit difference hash, as 16 hex digits.
    pub dhash: String,
}

/// An image left out as a near-duplicate of an earlier one.
#[derive(Debug, Clone, Serialize)]
pub struct Duplicate {
    /// The image left out.
    pub path: PathBuf,
    /// The earlier image it repeats.
    pub of: PathBuf,
    /// Differing bits of the two 64-bit difference hashes.
    pub hash_bits: u32,
    /// Largest difference of one colour channel between two thumbnail cells (0..=255).
    pub colour: u8,
}

impl Duplicate {
    /// Why the image is left out, for people.
    pub fn reason(&self) -> String {
        format!(
            "near-duplicate of {} (same drawing and colours: {} of 64 hash bits and at most {}/255 per colour differ)",
            file_name(&self.of),
            self.hash_bits,
            self.colour
        )
    }
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
    pub duplicates: Vec<Duplicate>,
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
        for d in &self.duplicates {
            s.push_str(&format!("\n  skipped {}: {}", file_name(&d.path), d.reason()));
        }
        for i in &self.items {
            if let Some(note) = &i.caption_note {
                s.push_str(&format!("\n  caption of {}: {note}", file_name(&i.path)));
            }
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
/// neighbour pair (left brighter than right). It sees the drawing, not its colours.
pub fn dhash(img: &image::DynamicImage) -> u64 {
    dhash_rgb(&img.to_rgb8())
}

fn dhash_rgb(img: &RgbImage) -> u64 {
    let small = image::DynamicImage::ImageRgb8(image::imageops::resize(img, 9, 8, FilterType::Triangle)).to_luma8();
    let mut bits = 0u64;
    for y in 0..8 {
        for x in 0..8 {
            bits = (bits << 1) | u64::from(small.get_pixel(x, y)[0] > small.get_pixel(x + 1, y)[0]);
        }
    }
    bits
}

/// What the near-duplicate check compares: the difference hash (the drawing in grey)
/// and a [`THUMB_SIDE`]² colour thumbnail (the colours, place by place). A grey hash
/// alone calls a red and a green circle on white the same picture; the thumbnail tells
/// them apart, while a re-saved JPEG or a slightly resized copy changes neither much.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub dhash: u64,
    thumb: RgbImage,
}

impl Fingerprint {
    /// The fingerprint of an (upright, opaque) picture.
    pub fn of(img: &RgbImage) -> Self {
        Self { dhash: dhash_rgb(img), thumb: image::imageops::resize(img, THUMB_SIDE, THUMB_SIDE, FilterType::Triangle) }
    }

    /// Differing bits of the two difference hashes (0..=64).
    pub fn hash_bits(&self, other: &Self) -> u32 {
        (self.dhash ^ other.dhash).count_ones()
    }

    /// The largest difference of one colour channel between the same cell of the two
    /// thumbnails (0..=255).
    pub fn colour_difference(&self, other: &Self) -> u8 {
        self.thumb.as_raw().iter().zip(other.thumb.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0)
    }

    /// Whether the two pictures are the same drawing in the same colours: at most
    /// [`DUPLICATE_DISTANCE`] hash bits and at most [`DUPLICATE_COLOUR`] per channel apart.
    pub fn is_near_duplicate(&self, other: &Self) -> bool {
        self.hash_bits(other) <= DUPLICATE_DISTANCE && self.colour_difference(other) <= DUPLICATE_COLOUR
    }
}

/// A caption file's text and what a person should know about how it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedCaption {
    /// Line breaks as `\n`, without a byte-order mark or surrounding white space.
    pub text: String,
    /// Set when the text was not plain UTF-8 (read as Windows-1252).
    pub note: Option<String>,
}

/// Decodes a caption file: UTF-8 (a byte-order mark is dropped), UTF-16 LE or BE with
/// a byte-order mark, else Windows-1252 (with a note saying so); CRLF and CR become
/// `\n`, and surrounding white space is trimmed.
///
/// Errors (the reason, for people): a byte-order mark followed by text that is not in
/// its encoding, or text holding control characters such as NUL (UTF-16 without a
/// byte-order mark, or not text at all).
pub fn decode_caption(bytes: &[u8]) -> std::result::Result<DecodedCaption, String> {
    let (text, note) = if let Some(rest) = bytes.strip_prefix(b"\xEF\xBB\xBF") {
        let text = std::str::from_utf8(rest).map_err(|e| format!("starts with a UTF-8 byte-order mark but is not UTF-8 ({e})"))?;
        (text.to_string(), None)
    } else if let Some((encoding, rest)) = match bytes {
        [0xFF, 0xFE, rest @ ..] => Some((encoding_rs::UTF_16LE, rest)),
        [0xFE, 0xFF, rest @ ..] => Some((encoding_rs::UTF_16BE, rest)),
        _ => None,
    } {
        let text = encoding
            .decode_without_bom_handling_and_without_replacement(rest)
            .ok_or_else(|| format!("starts with a {} byte-order mark but is not valid {}", encoding.name(), encoding.name()))?;
        (text.into_owned(), None)
    } else if let Ok(text) = std::str::from_utf8(bytes) {
        (text.to_string(), None)
    } else {
        let (text, _) = encoding_rs::WINDOWS_1252.decode_without_bom_handling(bytes);
        (text.into_owned(), Some("not UTF-8: read as Windows-1252; save it as UTF-8 if it does not read right".to_string()))
    };
    if let Some(c) = text.chars().find(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t')) {
        return Err(if c == '\0' {
            "holds NUL bytes (UTF-16 without a byte-order mark, or not text); save it as UTF-8".to_string()
        } else {
            format!("holds the control character U+{:04X}; save it as UTF-8 text", c as u32)
        });
    }
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    Ok(DecodedCaption { text: text.trim().trim_start_matches('\u{feff}').trim().to_string(), note })
}

fn is_caption(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("txt"))
}

fn stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The caption files of `dir`, by lower-case stem.
type Captions = BTreeMap<String, Vec<PathBuf>>;

/// The caption of `image`: its `.txt` sidecar (any case of extension and stem), else the
/// default caption. `Err` is the reason the image cannot be used: a caption that cannot
/// be read or decoded, or two captions that differ and neither matches the image's name
/// exactly.
fn caption_for(image: &Path, captions: &Captions, trigger: &str) -> std::result::Result<(String, bool, Option<String>), String> {
    let s = stem(image);
    let found: &[PathBuf] = captions.get(&s.to_lowercase()).map_or(&[], Vec::as_slice);
    let read = |p: &PathBuf| -> std::result::Result<DecodedCaption, String> {
        let bytes = std::fs::read(p).map_err(|e| format!("its caption {} cannot be read ({e})", file_name(p)))?;
        decode_caption(&bytes).map_err(|why| format!("its caption {} cannot be decoded: {why}", file_name(p)))
    };
    let chosen = match found {
        [] => None,
        [one] => Some((one, read(one)?)),
        several => {
            let exact: Vec<&PathBuf> = several.iter().filter(|p| stem(p) == s).collect();
            if let [one] = exact.as_slice() {
                Some((*one, read(one)?))
            } else {
                let mut decoded = several.iter().map(read).collect::<std::result::Result<Vec<_>, _>>()?;
                if decoded.iter().any(|d| d.text != decoded[0].text) {
                    let names: Vec<String> = several.iter().map(|p| file_name(p)).collect();
                    return Err(format!("its captions {} differ; keep one", names.join(" and ")));
                }
                // All the same text: any of them will do.
                Some((&several[0], decoded.swap_remove(0)))
            }
        }
    };
    Ok(match chosen {
        None => (default_caption(trigger), false, None),
        Some((path, d)) if d.text.is_empty() => {
            (default_caption(trigger), false, Some(format!("{} is empty; the default caption is used", file_name(path))))
        }
        Some((path, d)) => (d.text, true, d.note.map(|n| format!("{}: {n}", file_name(path)))),
    })
}

/// Reads `dir` and reports what can be trained on. `trigger` builds the caption of
/// images without a `.txt` file; images smaller than `resolution` on either side (once
/// upright) are refused; fewer than `min_images` usable images makes the report unusable.
///
/// Errors: only when the folder itself cannot be listed; problems with single files are
/// in the report.
pub fn scan(dir: &Path, trigger: &str, resolution: u32, min_images: usize) -> Result<DatasetReport> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    paths.sort();
    let mut captions = Captions::new();
    for p in paths.iter().filter(|p| is_caption(p)) {
        captions.entry(stem(p).to_lowercase()).or_default().push(p.clone());
    }
    let mut items: Vec<(DatasetItem, Fingerprint)> = Vec::new();
    let mut rejected = Vec::new();
    let mut duplicates = Vec::new();
    for path in paths.into_iter().filter(|p| !is_caption(p)) {
        let img = match open_image(&path) {
            Ok(img) => img,
            Err(reason) => {
                rejected.push(Rejected { path, reason });
                continue;
            }
        };
        let (w, h) = img.dimensions();
        if w < resolution || h < resolution {
            rejected.push(Rejected { path, reason: format!("{w}×{h} is smaller than the training resolution {resolution}×{resolution}") });
            continue;
        }
        let print = Fingerprint::of(&img);
        drop(img);
        if let Some((first, p2)) = items.iter().find(|(_, p2)| print.is_near_duplicate(p2)) {
            duplicates.push(Duplicate { path, of: first.path.clone(), hash_bits: print.hash_bits(p2), colour: print.colour_difference(p2) });
            continue;
        }
        let (caption, from_file, note) = match caption_for(&path, &captions, trigger) {
            Ok(c) => c,
            Err(reason) => {
                rejected.push(Rejected { path, reason });
                continue;
            }
        };
        let dhash = format!("{:016x}", print.dhash);
        items.push((DatasetItem { path, width: w, height: h, caption, caption_from_file: from_file, caption_note: note, dhash }, print));
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

/// Opens an image through [`image_input::decode`] (by content, upright, alpha on
/// white, size limits); the error is the reason a person would want to read.
fn open_image(path: &Path) -> std::result::Result<RgbImage, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot be read ({e})"))?;
    image_input::decode(&bytes, &DecodeOptions::default()).map_err(|e| e.to_string())
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
///
/// Errors: [`Error::InvalidInput`] with the report's summary when it has too few
/// images, [`Error::Image`] when an image changed since the scan and can no longer be read.
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
        let cropped = image::imageops::crop_imm(&img, (img.width() - side) / 2, (img.height() - side) / 2, side, side).to_image();
        let rgb = image::imageops::resize(&cropped, s, s, FilterType::Lanczos3);
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
        assert_eq!((file_name(&r.duplicates[0].path), file_name(&r.duplicates[0].of)), ("zz_copy.png".into(), "img1.png".into()));
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

    fn circle(fg: [u8; 3], bg: [u8; 3], size: u32) -> RgbImage {
        RgbImage::from_fn(size, size, |x, y| {
            let (u, v) = (x as f32 / size as f32 - 0.5, y as f32 / size as f32 - 0.5);
            image::Rgb(if u * u + v * v < 0.09 { fg } else { bg })
        })
    }

    fn square(fg: [u8; 3], size: u32) -> RgbImage {
        RgbImage::from_fn(size, size, |x, y| {
            let inside = (size / 4..size * 3 / 4).contains(&x) && (size / 4..size * 3 / 4).contains(&y);
            image::Rgb(if inside { fg } else { [255, 255, 255] })
        })
    }

    fn resave_jpeg(img: &RgbImage, quality: u8) -> RgbImage {
        image::load_from_memory(&crate::image_input::tests::jpeg(img, quality)).unwrap().to_rgb8()
    }

    fn scaled(img: &RgbImage, factor: f32) -> RgbImage {
        let side = (img.width() as f32 * factor).round() as u32;
        image::imageops::resize(img, side, side, FilterType::Lanczos3)
    }

    const WHITE: [u8; 3] = [255, 255, 255];

    #[test]
    fn near_duplicates_need_the_same_drawing_in_the_same_colours() {
        let print = |img: &RgbImage| Fingerprint::of(img);
        // Another colour is another picture, although the grey hashes agree.
        let different = [
            ("red vs green circle on white", circle([255, 0, 0], WHITE, 96), circle([0, 255, 0], WHITE, 96)),
            ("purple on yellow vs red on white", circle([128, 0, 128], [255, 255, 0], 96), circle([255, 0, 0], WHITE, 96)),
            ("blue vs orange square", square([0, 0, 255], 96), square([255, 165, 0], 96)),
            ("flat blue vs flat white", RgbImage::from_pixel(96, 96, image::Rgb([0, 0, 255])), RgbImage::from_pixel(96, 96, image::Rgb(WHITE))),
        ];
        for (what, a, b) in &different {
            let (fa, fb) = (print(a), print(b));
            assert!(fa.hash_bits(&fb) <= DUPLICATE_DISTANCE, "{what}: {} bits", fa.hash_bits(&fb));
            assert_eq!(fa.colour_difference(&fb), 255, "{what}");
            assert!(!fa.is_near_duplicate(&fb), "{what}");
        }
        // A darker red (255 → 200) is a colour variation too; a moved circle another drawing.
        let red = circle([255, 0, 0], WHITE, 96);
        assert_eq!(print(&red).colour_difference(&print(&circle([200, 0, 0], WHITE, 96))), 55);
        assert!(!print(&red).is_near_duplicate(&print(&circle([200, 0, 0], WHITE, 96))));
        assert!(!print(&pattern(1, 96)).is_near_duplicate(&print(&pattern(4, 96))));
        // Copies of one picture are still caught: JPEG re-saves, 5 % resizes, both.
        for (what, img) in [("red circle", red.clone()), ("pattern", pattern(3, 96)), ("green circle", circle([0, 255, 0], WHITE, 200))] {
            let p = print(&img);
            for (how, copy) in [
                ("jpeg q85", resave_jpeg(&img, 85)),
                ("jpeg q75", resave_jpeg(&img, 75)),
                ("95 %", scaled(&img, 0.95)),
                ("105 %", scaled(&img, 1.05)),
                ("95 % + jpeg q85", resave_jpeg(&scaled(&img, 0.95), 85)),
            ] {
                let c = print(&copy);
                assert!(p.is_near_duplicate(&c), "{what} {how}: {} bits, colour {}", p.hash_bits(&c), p.colour_difference(&c));
            }
        }
    }

    #[test]
    fn scan_leaves_out_copies_but_keeps_colour_variations() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        save(d, "a_red.png", &circle([255, 0, 0], WHITE, 96));
        save(d, "b_green.png", &circle([0, 255, 0], WHITE, 96));
        save(d, "c_blue.png", &RgbImage::from_pixel(96, 96, image::Rgb([0, 0, 255])));
        save(d, "d_white.png", &RgbImage::from_pixel(96, 96, image::Rgb(WHITE)));
        std::fs::write(d.join("e_red_resaved.jpg"), crate::image_input::tests::jpeg(&circle([255, 0, 0], WHITE, 96), 85)).unwrap();
        save(d, "f_red_smaller.png", &scaled(&circle([255, 0, 0], WHITE, 96), 0.95));
        let r = scan(d, "x", 64, 1).unwrap();
        let names: Vec<String> = r.items.iter().map(|i| file_name(&i.path)).collect();
        assert_eq!(names, ["a_red.png", "b_green.png", "c_blue.png", "d_white.png"]);
        let dups: Vec<(String, String)> = r.duplicates.iter().map(|d| (file_name(&d.path), file_name(&d.of))).collect();
        assert_eq!(dups, [("e_red_resaved.jpg".to_string(), "a_red.png".to_string()), ("f_red_smaller.png".into(), "a_red.png".into())]);
        let text = r.summary();
        assert!(text.contains("skipped e_red_resaved.jpg: near-duplicate of a_red.png (same drawing and colours"), "{text}");
        assert!(!text.contains("b_green.png: near-duplicate"), "{text}");
    }

    /// `w`×`h`, the left third red and the rest blue.
    fn red_left(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, _| image::Rgb(if x < w / 3 { [255, 0, 0] } else { [0, 0, 255] }))
    }

    #[test]
    fn images_enter_upright_opaque_and_within_limits() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // A 96×64 JPEG stored sideways with EXIF Orientation 6 is 64×96 upright.
        let sideways = crate::image_input::tests::with_exif_orientation(&crate::image_input::tests::jpeg(&red_left(96, 64), 95), 6);
        std::fs::write(d.join("phone.jpg"), sideways).unwrap();
        // An RGBA PNG whose transparent left half stores magenta.
        let rgba = image::RgbaImage::from_fn(64, 64, |x, _| image::Rgba(if x < 32 { [255, 0, 255, 0] } else { [0, 0, 0, 255] }));
        image::DynamicImage::ImageRgba8(rgba).save(d.join("cutout.png")).unwrap();
        // 12000×12000, 0.6 MB or less on disk: too large, not corrupt.
        std::fs::write(d.join("huge.png"), crate::image_input::tests::huge_png()).unwrap();

        let r = scan(d, "x", 64, 2).unwrap();
        let phone = r.items.iter().find(|i| file_name(&i.path) == "phone.jpg").unwrap();
        assert_eq!((phone.width, phone.height), (64, 96));
        let huge = r.rejected.iter().find(|x| file_name(&x.path) == "huge.png").unwrap();
        assert_eq!(huge.reason, "12000×12000 is larger than the 8192-pixel limit per side; downscale it first");
        assert!(!huge.reason.contains("corrupt"));

        let p = prepare(&r).unwrap();
        let at = |name: &str| r.items.iter().position(|i| file_name(&i.path) == name).unwrap();
        // Upright: the red stored left edge is now the top (centre crop keeps rows 16..80).
        let phone = &p.images[at("phone.jpg")];
        assert!(phone.get_pixel(32, 0).0[0] > 200 && phone.get_pixel(32, 0).0[2] < 60, "{:?}", phone.get_pixel(32, 0));
        assert!(phone.get_pixel(32, 63).0[2] > 200, "{:?}", phone.get_pixel(32, 63));
        // Transparent pixels are white, not magenta.
        let cutout = &p.images[at("cutout.png")];
        assert_eq!(cutout.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(cutout.get_pixel(20, 40).0, [255, 255, 255]);
        assert_eq!(cutout.get_pixel(60, 10).0, [0, 0, 0]);
    }

    #[test]
    fn captions_are_decoded_whatever_wrote_them() {
        let ok = |bytes: &[u8]| decode_caption(bytes).unwrap();
        let utf8_bom = ok("\u{feff}inkline, red circle\r\n".as_bytes());
        assert_eq!(utf8_bom, DecodedCaption { text: "inkline, red circle".into(), note: None });
        let mut utf16le = vec![0xFF, 0xFE];
        utf16le.extend("inkline,\r\nred circle\r\n".encode_utf16().flat_map(u16::to_le_bytes));
        assert_eq!(ok(&utf16le), DecodedCaption { text: "inkline,\nred circle".into(), note: None });
        let mut utf16be = vec![0xFE, 0xFF];
        utf16be.extend("crème\rbrûlée".encode_utf16().flat_map(u16::to_be_bytes));
        assert_eq!(ok(&utf16be).text, "crème\nbrûlée");
        let cp1252 = ok(b"caf\xE9, \x93ink\x94 style");
        assert_eq!(cp1252.text, "café, \u{201c}ink\u{201d} style");
        assert!(cp1252.note.as_deref().unwrap().contains("Windows-1252"));
        assert_eq!(ok(b"  plain text \n\n").text, "plain text");
        // What cannot be read is an error, never the default caption.
        let no_bom: Vec<u8> = "inkline".encode_utf16().flat_map(u16::to_le_bytes).collect();
        assert!(decode_caption(&no_bom).unwrap_err().contains("NUL"));
        assert!(decode_caption(&[0xFF, 0xFE, 0x00, 0xD8, 0x41, 0x00]).unwrap_err().contains("not valid UTF-16LE"));
        assert!(decode_caption(b"\xEF\xBB\xBFcaf\xE9").unwrap_err().contains("not UTF-8"));
    }

    #[test]
    fn captions_pair_whatever_the_case_and_clashes_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (i, name) in ["IMG_0001.JPG", "IMG_0002.jpg", "bom.png", "cp.png", "clash.png", "same.png", "bad.png", "Mixed.png"].iter().enumerate() {
            save(d, name, &pattern(i as u32 + 10, 64));
        }
        std::fs::write(d.join("IMG_0001.TXT"), "camera caption").unwrap();
        std::fs::write(d.join("IMG_0002.Txt"), "second caption").unwrap();
        std::fs::write(d.join("bom.txt"), "\u{feff}inkline, red circle\r\n").unwrap();
        std::fs::write(d.join("cp.txt"), b"caf\xE9 au lait").unwrap();
        std::fs::write(d.join("clash.txt"), "one").unwrap();
        std::fs::write(d.join("clash.TXT"), "two").unwrap();
        std::fs::write(d.join("same.txt"), "twin").unwrap();
        std::fs::write(d.join("same.TXT"), "twin\r\n").unwrap();
        std::fs::write(d.join("bad.txt"), "bad".encode_utf16().flat_map(u16::to_le_bytes).collect::<Vec<u8>>()).unwrap();
        std::fs::write(d.join("mixed.txt"), "lower-case name").unwrap();

        let r = scan(d, "inkwash", 64, 1).unwrap();
        let caption = |n: &str| {
            let i = r.items.iter().find(|i| file_name(&i.path) == n).unwrap_or_else(|| panic!("{n}: {r:?}"));
            (i.caption.as_str(), i.caption_from_file)
        };
        assert_eq!(caption("IMG_0001.JPG"), ("camera caption", true));
        assert_eq!(caption("IMG_0002.jpg"), ("second caption", true));
        assert_eq!(caption("bom.png"), ("inkline, red circle", true));
        assert_eq!(caption("cp.png"), ("café au lait", true));
        assert_eq!(caption("same.png"), ("twin", true));
        assert_eq!(caption("Mixed.png"), ("lower-case name", true));
        let reason = |n: &str| r.rejected.iter().find(|x| file_name(&x.path) == n).map(|x| x.reason.clone()).unwrap_or_default();
        assert_eq!(reason("clash.png"), "its captions clash.TXT and clash.txt differ; keep one");
        assert!(reason("bad.png").starts_with("its caption bad.txt cannot be decoded: holds NUL bytes"), "{}", reason("bad.png"));
        let text = r.summary();
        assert!(text.contains("caption of cp.png: cp.txt: not UTF-8: read as Windows-1252"), "{text}");
        assert_eq!(r.items.len(), 6);
    }
}
