//! Contact sheets: many images of one size tiled into one, for looking at a set at a
//! glance (training samples, before/after comparisons, evaluation renders).

use std::path::Path;

use image::RgbImage;

use crate::{Error, Result};

/// Tiles images into a contact sheet, `columns` wide, with a 2-pixel white gap. Every
/// cell has the size of the first image.
pub fn contact_sheet(images: &[RgbImage], columns: usize) -> RgbImage {
    let (w, h) = images.first().map_or((1, 1), |i| (i.width(), i.height()));
    let columns = columns.max(1) as u32;
    let rows = (images.len() as u32).div_ceil(columns).max(1);
    let gap = 2;
    let mut sheet = RgbImage::from_pixel(columns * (w + gap) + gap, rows * (h + gap) + gap, image::Rgb([255, 255, 255]));
    for (i, img) in images.iter().enumerate() {
        let (cx, cy) = (i as u32 % columns, i as u32 / columns);
        image::imageops::replace(&mut sheet, img, (gap + cx * (w + gap)) as i64, (gap + cy * (h + gap)) as i64);
    }
    sheet
}

/// Writes `img` (a sheet, or any image) to `path` as PNG, atomically
/// ([`crate::files::write_atomic_with`]).
pub fn save_png(path: &Path, img: &RgbImage) -> Result<()> {
    crate::files::write_atomic_with(
        path,
        |tmp| img.save_with_format(tmp, image::ImageFormat::Png).map_err(|e| Error::Image(e.to_string())),
        |e| Error::io(path, e),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_row_by_row_with_gaps() {
        let red = RgbImage::from_pixel(3, 2, image::Rgb([255, 0, 0]));
        let blue = RgbImage::from_pixel(3, 2, image::Rgb([0, 0, 255]));
        let sheet = contact_sheet(&[red.clone(), blue, red], 2);
        // 2 columns × 2 rows of 3×2 cells, 2-pixel gaps around and between.
        assert_eq!(sheet.dimensions(), (2 * 5 + 2, 2 * 4 + 2));
        assert_eq!(sheet.get_pixel(2, 2).0, [255, 0, 0]);
        assert_eq!(sheet.get_pixel(7, 2).0, [0, 0, 255]);
        assert_eq!(sheet.get_pixel(2, 6).0, [255, 0, 0]);
        assert_eq!(sheet.get_pixel(7, 6).0, [255, 255, 255]);
        assert_eq!(sheet.get_pixel(5, 2).0, [255, 255, 255]);
        // No images: one empty row of 1×1 cells.
        assert_eq!(contact_sheet(&[], 3).dimensions(), (3 * 3 + 2, 3 + 2));
    }
}
