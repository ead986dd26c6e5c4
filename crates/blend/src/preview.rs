//! The instant preview: a weighted mix of images already rendered at the blend's anchors
//! (each style alone, or the base model), computed in the browser while a control moves.

/// Mixes equally sized RGBA (or RGB) images, pixel by pixel: Σ wᵢ·imageᵢ with the weights
/// clamped to 0 and rescaled to sum 1 (all zero: the first image). `None` when the sizes
/// differ or there are no images.
pub fn mix(images: &[&[u8]], weights: &[f64]) -> Option<Vec<u8>> {
    let first = images.first()?;
    if images.len() != weights.len() || images.iter().any(|i| i.len() != first.len()) {
        return None;
    }
    let w: Vec<f32> = weights.iter().map(|w| w.max(0.0) as f32).collect();
    let sum: f32 = w.iter().sum();
    if sum <= 0.0 {
        return Some(first.to_vec());
    }
    let w: Vec<f32> = w.iter().map(|v| v / sum).collect();
    let mut out = vec![0f32; first.len()];
    for (img, &wi) in images.iter().zip(&w) {
        if wi == 0.0 {
            continue;
        }
        for (o, &p) in out.iter_mut().zip(img.iter()) {
            *o += wi * p as f32;
        }
    }
    Some(out.into_iter().map(|v| v.round().clamp(0.0, 255.0) as u8).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_by_weight() {
        let a = [0u8, 100, 200, 255];
        let b = [200u8, 100, 0, 255];
        assert_eq!(mix(&[&a, &b], &[0.5, 0.5]).unwrap(), vec![100, 100, 100, 255]);
        assert_eq!(mix(&[&a, &b], &[3.0, 1.0]).unwrap(), vec![50, 100, 150, 255]);
        assert_eq!(mix(&[&a, &b], &[1.0, -1.0]).unwrap(), a.to_vec(), "negative weights count as 0");
        assert_eq!(mix(&[&a, &b], &[0.0, 0.0]).unwrap(), a.to_vec());
        assert!(mix(&[&a, &b[..3]], &[0.5, 0.5]).is_none());
        assert!(mix(&[], &[]).is_none());
    }
}
