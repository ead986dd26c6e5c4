//! The quality metrics rank degraded renders below clean ones.
//!
//! Held-out set: the 108 scenes of the starter world's held-out colour/shape/background
//! triples (3 sizes each), none of which the starter model was trained on. Each scene is
//! rendered clean and with one degradation from the same seeded jitter, so every pair
//! differs only by the degradation: the world's own blur, noise and low contrast, plus
//! JPEG at quality 8 (block artefacts) and overexposure (gain 1.8, offset +60, clipped).
//! A metric ranks a pair right when the clean image scores strictly higher.

use atelier_engine::quality::{assess, Assessment, Weights};
use atelier_engine::starter::shapes::{held_out_triples, Position, Quality, Scene, Size};
use image::RgbImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const DEGRADATIONS: [&str; 5] = ["blurry", "noisy", "low contrast", "jpeg", "overexposed"];

fn jpeg(img: &RgbImage, quality: u8) -> RgbImage {
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, quality).encode_image(img).unwrap();
    image::load_from_memory(&bytes).unwrap().to_rgb8()
}

fn overexpose(img: &RgbImage) -> RgbImage {
    let mut out = img.clone();
    for v in out.iter_mut() {
        *v = (*v as f32 * 1.8 + 60.0).min(255.0) as u8;
    }
    out
}

fn render(scene: &Scene, quality: Quality, seed: u64) -> RgbImage {
    Scene { quality, ..scene.clone() }.render(&mut ChaCha8Rng::seed_from_u64(seed))
}

/// `(clean, [degraded in DEGRADATIONS order])` for every held-out scene.
fn held_out_pairs() -> Vec<(RgbImage, Vec<RgbImage>)> {
    let mut out = Vec::new();
    for (i, (colour, shape, background)) in held_out_triples().into_iter().enumerate() {
        for (j, size) in [Size::Normal, Size::Small, Size::Large].into_iter().enumerate() {
            let scene = Scene { shape, colour, background, size, position: Position::Centre, quality: Quality::default() };
            let seed = (i * 3 + j) as u64;
            let clean = render(&scene, Quality::default(), seed);
            let degraded = vec![
                render(&scene, Quality { blurry: true, ..Default::default() }, seed),
                render(&scene, Quality { noisy: true, ..Default::default() }, seed),
                render(&scene, Quality { low_contrast: true, ..Default::default() }, seed),
                jpeg(&clean, 8),
                overexpose(&clean),
            ];
            out.push((clean, degraded));
        }
    }
    out
}

#[test]
fn each_metric_ranks_the_degradations_it_measures_below_clean_renders() {
    let pairs = held_out_pairs();
    assert_eq!(pairs.len(), 108);
    let w = Weights::default();
    let assessed: Vec<(Assessment, Vec<Assessment>)> = pairs
        .iter()
        .map(|(c, ds)| (assess(c, None, &w), ds.iter().map(|d| assess(d, None, &w)).collect()))
        .collect();
    // Which degradations each metric is built to see.
    let duties: [(&str, &[&str]); 7] = [
        ("sharpness", &["blurry"]),
        ("noise", &["noisy"]),
        ("contrast", &["low contrast"]),
        ("colourfulness", &["low contrast"]),
        ("exposure", &["overexposed"]),
        ("blockiness", &["jpeg"]),
        ("combined", &DEGRADATIONS),
    ];
    let value = |a: &Assessment, metric: &str| if metric == "combined" { a.combined } else { a.scores.get(metric).unwrap() };
    let mut failures = Vec::new();
    println!("| metric | degradation | pairs ranked right | clean mean | degraded mean |");
    for (metric, degradations) in duties {
        for d in degradations.iter() {
            let k = DEGRADATIONS.iter().position(|x| x == d).unwrap();
            let right = assessed.iter().filter(|(c, ds)| value(c, metric) > value(&ds[k], metric)).count();
            let acc = right as f64 / assessed.len() as f64;
            let mean_c = assessed.iter().map(|(c, _)| value(c, metric)).sum::<f64>() / assessed.len() as f64;
            let mean_d = assessed.iter().map(|(_, ds)| value(&ds[k], metric)).sum::<f64>() / assessed.len() as f64;
            println!("| {metric} | {d} | {:.1} % | {mean_c:.3} | {mean_d:.3} |", 100.0 * acc);
            if acc < 0.9 {
                failures.push(format!("{metric} on {d}: {:.1} %", 100.0 * acc));
            }
        }
    }
    assert!(failures.is_empty(), "below 90 % of pairs: {failures:?}");
}

#[test]
fn raw_values_of_clean_and_degraded_renders() {
    // Spot values on one scene, so a change of formula shows up as a number that moved.
    let pairs = held_out_pairs();
    let (clean, degraded) = &pairs[0];
    let c = atelier_engine::quality::measure(clean, None);
    let noisy = atelier_engine::quality::measure(&degraded[1], None);
    // The world adds noise of σ 28 per channel: luma σ = 28 · √(0.299² + 0.587² + 0.114²) ≈ 18.7.
    assert!((noisy.noise - 18.7).abs() < 2.5, "noise σ̂ {}", noisy.noise);
    assert!(c.noise < 1.0, "clean σ̂ {}", c.noise);
    let low = atelier_engine::quality::measure(&degraded[2], None);
    // Low contrast pulls 55 % toward grey: every channel's spread × 0.45.
    assert!((low.contrast / c.contrast - 0.45).abs() < 0.02, "{} vs {}", low.contrast, c.contrast);
}
