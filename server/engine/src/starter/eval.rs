//! Measuring the starter model: prompt adherence on colour/shape/background triples
//! that were held out of training, and whether a negative prompt of quality words
//! ("blurry, noisy") makes images sharper.
//!
//! Every held-out triple is rendered as a plain, a `small` and a `large` prompt
//! (centred, so the centre/border classification applies), one image each with a
//! fixed seed. Each image is classified by [`measure::classify_colours`] (mean colour
//! of the central box vs the median of the border ring, nearest palette colour) and
//! [`measure::classify_shape`]; sharpness is the variance of the Laplacian
//! ([`laplacian_variance`]). The same prompts and seeds are generated once
//! with an empty negative prompt and once with the quality negative prompt.

use std::time::Instant;

use image::RgbImage;
use serde::Serialize;

use crate::pipeline::{GenerateParams, StableDiffusion};
use crate::quality::laplacian_variance;
use crate::scheduler::SchedulerKind;
use crate::starter::measure;
use crate::starter::shapes::{held_out_triples, Colour, Position, Quality, Scene, Shape, Size};
use crate::{Error, Result};

/// One evaluation prompt.
#[derive(Debug, Clone, Serialize)]
pub struct EvalCase {
    pub prompt: String,
    pub seed: u64,
    #[serde(serialize_with = "ser_colour")]
    pub colour: Colour,
    #[serde(serialize_with = "ser_shape")]
    pub shape: Shape,
    #[serde(serialize_with = "ser_colour")]
    pub background: Colour,
}

fn ser_colour<S: serde::Serializer>(c: &Colour, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(c.name())
}
fn ser_shape<S: serde::Serializer>(c: &Shape, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(c.name())
}

fn ser_scheduler<S: serde::Serializer>(k: &SchedulerKind, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(k.id())
}

/// The held-out prompts: every held-out triple at sizes normal, small and large,
/// with seeds `seed0 + i`.
pub fn held_out_cases(seed0: u64) -> Vec<EvalCase> {
    let mut out = Vec::new();
    for (colour, shape, background) in held_out_triples() {
        for size in [Size::Normal, Size::Small, Size::Large] {
            let scene = Scene { shape, colour, background, size, position: Position::Centre, quality: Quality::default() };
            out.push(EvalCase { prompt: scene.caption(), seed: seed0 + out.len() as u64, colour, shape, background });
        }
    }
    out
}

/// Settings of an evaluation run.
#[derive(Debug, Clone, Serialize)]
pub struct EvalSettings {
    pub steps: usize,
    pub guidance: f64,
    #[serde(serialize_with = "ser_scheduler")]
    pub scheduler: SchedulerKind,
    /// The negative prompt compared against the empty one.
    pub quality_negative: String,
}

impl Default for EvalSettings {
    fn default() -> Self {
        Self { steps: 20, guidance: 7.5, scheduler: SchedulerKind::DpmPp2mKarras, quality_negative: "blurry, noisy".into() }
    }
}

/// What one image was classified as.
#[derive(Debug, Clone, Serialize)]
pub struct Classified {
    pub colour_ok: bool,
    pub background_ok: bool,
    pub shape_ok: bool,
    pub sharpness: f64,
}

impl Classified {
    pub fn of(img: &RgbImage, case: &EvalCase) -> Self {
        let (colour, background) = measure::classify_colours(img);
        let shape = measure::classify_shape(img, case.colour, case.background);
        Classified {
            colour_ok: colour == case.colour,
            background_ok: background == case.background,
            shape_ok: shape == Some(case.shape),
            sharpness: laplacian_variance(img),
        }
    }
}

/// Fractions over a set of classified images.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Adherence {
    pub images: usize,
    pub colour: f64,
    pub background: f64,
    pub both: f64,
    pub shape: f64,
    pub mean_sharpness: f64,
}

impl Adherence {
    pub fn of(rows: &[Classified]) -> Self {
        let n = rows.len().max(1) as f64;
        let frac = |f: &dyn Fn(&Classified) -> bool| rows.iter().filter(|r| f(r)).count() as f64 / n;
        Adherence {
            images: rows.len(),
            colour: frac(&|r| r.colour_ok),
            background: frac(&|r| r.background_ok),
            both: frac(&|r| r.colour_ok && r.background_ok),
            shape: frac(&|r| r.shape_ok),
            mean_sharpness: rows.iter().map(|r| r.sharpness).sum::<f64>() / n,
        }
    }
}

/// The result of [`evaluate`].
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub settings: EvalSettings,
    /// Empty negative prompt.
    pub plain: Adherence,
    /// The quality negative prompt.
    pub with_negative: Adherence,
    /// Fraction of prompts whose image got sharper with the negative prompt.
    pub sharper_fraction: f64,
    /// Mean seconds per image (one image, `steps` steps, guidance).
    pub seconds_per_image: f64,
    /// Per prompt: (case, plain, with negative).
    pub rows: Vec<(EvalCase, Classified, Classified)>,
}

/// Generates and classifies every case twice (empty and quality negative prompt).
/// `progress(done, total)` returning false cancels. `keep` receives every image pair.
pub fn evaluate(
    sd: &StableDiffusion,
    cases: &[EvalCase],
    settings: &EvalSettings,
    progress: &mut dyn FnMut(usize, usize) -> bool,
    keep: &mut dyn FnMut(&EvalCase, &RgbImage, &RgbImage),
) -> Result<EvalReport> {
    let size = sd.default_size();
    let mut rows = Vec::with_capacity(cases.len());
    let mut seconds = 0.0;
    for (i, case) in cases.iter().enumerate() {
        if !progress(i, cases.len()) {
            return Err(Error::Cancelled);
        }
        let mut images = Vec::with_capacity(2);
        for negative in ["", settings.quality_negative.as_str()] {
            let params = GenerateParams {
                prompt: case.prompt.clone(),
                negative_prompt: negative.into(),
                steps: settings.steps,
                guidance: settings.guidance,
                seed: case.seed,
                scheduler: settings.scheduler,
                width: size,
                height: size,
                ..Default::default()
            };
            let t = Instant::now();
            let mut out = sd.generate(&params, &mut |_| true)?;
            seconds += t.elapsed().as_secs_f64();
            images.push(out.images.remove(0));
        }
        keep(case, &images[0], &images[1]);
        rows.push((case.clone(), Classified::of(&images[0], case), Classified::of(&images[1], case)));
    }
    progress(cases.len(), cases.len());
    let plain: Vec<_> = rows.iter().map(|r| r.1.clone()).collect();
    let neg: Vec<_> = rows.iter().map(|r| r.2.clone()).collect();
    let sharper = rows.iter().filter(|r| r.2.sharpness > r.1.sharpness).count() as f64 / rows.len().max(1) as f64;
    Ok(EvalReport {
        settings: settings.clone(),
        plain: Adherence::of(&plain),
        with_negative: Adherence::of(&neg),
        sharper_fraction: sharper,
        seconds_per_image: seconds / (2 * cases.len()).max(1) as f64,
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::starter::shapes::is_held_out;

    #[test]
    fn cases_cover_held_out_triples_only() {
        let cases = held_out_cases(1000);
        assert!(cases.len() >= 100, "{} cases", cases.len());
        for c in &cases {
            assert!(is_held_out(c.colour, c.shape, c.background), "{}", c.prompt);
            let scene = Scene::parse(&c.prompt).expect("grammar prompt");
            assert_eq!((scene.colour, scene.shape, scene.background), (c.colour, c.shape, c.background));
        }
        let seeds: std::collections::HashSet<u64> = cases.iter().map(|c| c.seed).collect();
        assert_eq!(seeds.len(), cases.len());
    }

    #[test]
    fn classification_of_rendered_truth_is_perfect() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let cases = held_out_cases(0);
        let rows: Vec<_> = cases
            .iter()
            .map(|c| {
                let scene = Scene::parse(&c.prompt).expect("grammar prompt");
                Classified::of(&scene.render(&mut rng), c)
            })
            .collect();
        let a = Adherence::of(&rows);
        assert_eq!(a.both, 1.0);
        assert!(a.shape >= 0.97, "{}", a.shape);
    }
}
