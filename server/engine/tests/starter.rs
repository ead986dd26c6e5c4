//! The shipped starter model loads through the ordinary model path and follows
//! grammar prompts: checked on the pixels of fixed-seed generations.

use std::path::PathBuf;

use atelier_engine::metrics::classify_colours;
use atelier_engine::pipeline::{GenerateParams, StableDiffusion};
use atelier_engine::starter::shapes::Colour;
use candle_core::Device;

fn starter() -> StableDiffusion {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/starter");
    StableDiffusion::load(&dir, &Device::Cpu).expect("the shipped starter model loads")
}

#[test]
fn fixed_seed_generations_get_the_colours_right() {
    let sd = starter();
    assert_eq!(sd.default_size(), 64);
    let cases = [
        ("a red circle on a blue background", Colour::Red, Colour::Blue, 1),
        ("a yellow square on a black background", Colour::Yellow, Colour::Black, 2),
        ("a white triangle on a green background", Colour::White, Colour::Green, 3),
    ];
    for (prompt, colour, background, seed) in cases {
        let params = GenerateParams { prompt: prompt.into(), seed, width: 64, height: 64, ..Default::default() };
        let img = sd.generate(&params, &mut |_| true).expect("generation").images.remove(0);
        let (c, b) = classify_colours(&img);
        assert_eq!((c, b), (colour, background), "{prompt} (seed {seed}) came out as {} on {}", c.name(), b.name());
        // The centre really is the shape colour, not merely the nearest palette entry.
        let px = img.get_pixel(32, 34).0;
        let want = colour.rgb();
        let dist = (0..3).map(|i| (px[i] as f64 - want[i] as f64).powi(2)).sum::<f64>().sqrt();
        assert!(dist < 80.0, "{prompt}: centre pixel {px:?} is far from {want:?}");
    }
}
