//! The search: every candidate negative prompt is rendered on the same fixed search seeds as
//! the baseline, every image is scored ([`atelier_engine::quality`]), and candidates are
//! compared with the baseline seed by seed (paired). The best two or three helpful ones are
//! then tried together. The best candidate that beat the baseline on the mean and on most
//! seeds is checked once more on held-out seeds it was not chosen on, and the verdict says
//! plainly whether it helped.

use std::collections::BTreeMap;

use app::dto::{CandidateResult, OptimizeResult, SeedComparison};
use atelier_engine::quality::Assessment;
use image::RgbImage;

use super::NegativesError;

type Result<T, E = NegativesError> = std::result::Result<T, E>;

/// What the search needs: images rendered with a negative prompt, and their scores. A
/// renderer that notices a cancel returns [`NegativesError::Cancelled`].
pub trait Renderer {
    /// Renders the prompt with `negative` on `seed`.
    fn render(&mut self, negative: &str, seed: u64) -> Result<RgbImage, NegativesError>;
    fn assess(&mut self, image: &RgbImage) -> Result<Assessment, NegativesError>;
}

/// The candidates and seeds of one search.
#[derive(Debug, Clone)]
pub struct Plan {
    pub baseline: String,
    /// `(negative prompt, source)`: source is `suggestion`, `history` or `yours`.
    pub candidates: Vec<(String, String)>,
    pub search_seeds: Vec<u64>,
    pub holdout_seeds: Vec<u64>,
    /// Whether to try the best helpful candidates together.
    pub combine: bool,
}

/// Most combinations tried (best two, best three).
const COMBINATIONS: usize = 2;

impl Plan {
    /// Images the search renders at most.
    pub fn total_images(&self) -> usize {
        let combos = if self.combine { COMBINATIONS } else { 0 };
        (1 + self.candidates.len() + combos) * self.search_seeds.len() + 2 * self.holdout_seeds.len()
    }
}

/// What the search reports while it runs. Returning `false` from the sink cancels.
pub enum Event<'a> {
    Progress { done: usize, total: usize, phase: &'a str },
    Measured(&'a CandidateResult),
}

/// File name of the image of candidate `index` (0: the baseline) on `seed`.
pub fn image_name(index: usize, seed: u64) -> String {
    format!("c{index}_s{seed}.png")
}

struct Measured {
    result: CandidateResult,
    assessments: Vec<Assessment>,
}

struct Search<'a> {
    renderer: &'a mut dyn Renderer,
    sink: &'a mut dyn FnMut(Event) -> bool,
    save: &'a mut dyn FnMut(&str, &RgbImage) -> Result<()>,
    done: usize,
    total: usize,
}

impl Search<'_> {
    fn progress(&mut self, phase: &str) -> Result<()> {
        if (self.sink)(Event::Progress { done: self.done, total: self.total, phase }) {
            Ok(())
        } else {
            Err(NegativesError::Cancelled)
        }
    }

    /// Renders and scores `negative` on `seeds`, saving each image as candidate `index`.
    fn measure(&mut self, index: usize, negative: &str, seeds: &[u64], phase: &str) -> Result<Vec<Assessment>> {
        let mut out = Vec::with_capacity(seeds.len());
        for &seed in seeds {
            self.progress(phase)?;
            let image = self.renderer.render(negative, seed)?;
            out.push(self.renderer.assess(&image)?);
            (self.save)(&image_name(index, seed), &image)?;
            self.done += 1;
        }
        Ok(out)
    }
}

/// The paired comparison of `cand` against `base` (same seeds, same order).
fn compare(negative: &str, source: &str, index: usize, seeds: &[u64], cand: Vec<Assessment>, base: &[Assessment]) -> Measured {
    let scores: Vec<f64> = cand.iter().map(|a| a.combined).collect();
    let deltas: Vec<f64> = cand.iter().zip(base).map(|(c, b)| c.combined - b.combined).collect();
    let improved = deltas.iter().filter(|d| **d > 0.0).count();
    Measured {
        result: CandidateResult {
            negative: negative.to_string(),
            source: source.to_string(),
            mean: mean(&scores),
            mean_delta: mean(&deltas),
            improved,
            p_value: sign_test(improved, deltas.len()),
            metric_deltas: metric_deltas(&cand, base),
            images: seeds.iter().map(|&s| image_name(index, s)).collect(),
            scores,
        },
        assessments: cand,
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 }
}

/// Mean per-metric score change, `cand − base`, seed by seed.
pub fn metric_deltas(cand: &[Assessment], base: &[Assessment]) -> BTreeMap<String, f64> {
    let diffs: Vec<_> = cand.iter().zip(base).map(|(c, b)| c.scores.minus(&b.scores)).collect();
    by_name(&atelier_engine::quality::Metrics::mean(&diffs))
}

/// Metric values keyed by name, as the DTOs carry them.
fn by_name(m: &atelier_engine::quality::Metrics) -> BTreeMap<String, f64> {
    m.values().into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// One-sided sign test: the chance of at least `k` improvements in `n` seeds if the
/// candidate made no difference (each seed a fair coin).
pub fn sign_test(k: usize, n: usize) -> f64 {
    let mut p = 0.0;
    for i in k..=n {
        p += binomial(n, i);
    }
    p / 2f64.powi(n as i32)
}

fn binomial(n: usize, k: usize) -> f64 {
    (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
}

/// Joins negative prompts with commas, skipping empty parts.
pub fn join(parts: &[&str]) -> String {
    parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()).collect::<Vec<_>>().join(", ")
}

/// Runs the search. [`NegativesError::Cancelled`] when the sink stopped it.
pub fn run(
    plan: &Plan,
    renderer: &mut dyn Renderer,
    sink: &mut dyn FnMut(Event) -> bool,
    save: &mut dyn FnMut(&str, &RgbImage) -> Result<(), NegativesError>,
) -> Result<OptimizeResult, NegativesError> {
    let total = plan.total_images();
    let mut s = Search { renderer, sink, save, done: 0, total };
    let seeds = &plan.search_seeds;
    let base_label = if plan.baseline.trim().is_empty() { "(no negative prompt)".to_string() } else { plan.baseline.clone() };

    let base_a = s.measure(0, &plan.baseline, seeds, &format!("baseline: {base_label}"))?;
    let base = compare(&plan.baseline, "baseline", 0, seeds, base_a.clone(), &base_a);
    (s.sink)(Event::Measured(&base.result));

    let mut measured: Vec<Measured> = Vec::new();
    for (negative, source) in &plan.candidates {
        let index = measured.len() + 1;
        let a = s.measure(index, negative, seeds, &format!("candidate {index}: {negative}"))?;
        let m = compare(negative, source, index, seeds, a, &base_a);
        (s.sink)(Event::Measured(&m.result));
        measured.push(m);
    }

    if plan.combine {
        let mut helpful: Vec<usize> = (0..measured.len()).filter(|&i| measured[i].result.mean_delta > 0.0).collect();
        helpful.sort_by(|&a, &b| measured[b].result.mean_delta.total_cmp(&measured[a].result.mean_delta));
        let mut tried: Vec<String> = measured.iter().map(|m| super::history::canonical(&m.result.negative)).collect();
        for n in 2..=(1 + COMBINATIONS).min(helpful.len()) {
            // A combination adds the parts the best ones add to the baseline.
            let mut parts: Vec<String> = Vec::new();
            for &i in &helpful[..n] {
                for p in super::analysis::phrases(&measured[i].result.negative) {
                    if !parts.contains(&p) {
                        parts.push(p);
                    }
                }
            }
            let negative = parts.join(", ");
            if tried.contains(&super::history::canonical(&negative)) {
                continue;
            }
            tried.push(super::history::canonical(&negative));
            let index = measured.len() + 1;
            let a = s.measure(index, &negative, seeds, &format!("combination: {negative}"))?;
            let m = compare(&negative, "combination", index, seeds, a, &base_a);
            (s.sink)(Event::Measured(&m.result));
            measured.push(m);
        }
    }
    // Combinations not tried (too few helpful candidates) are not waited for.
    s.total = s.done + 2 * plan.holdout_seeds.len();

    let best = (0..measured.len()).max_by(|&a, &b| measured[a].result.mean.total_cmp(&measured[b].result.mean));
    let winner = pick_winner(&measured.iter().map(|m| &m.result).collect::<Vec<_>>(), seeds.len());

    let mut comparisons = Vec::new();
    let (mut holdout_mean_delta, mut holdout_improved, mut holdout_metric_deltas) = (None, None, BTreeMap::new());
    if let Some(w) = winner {
        let win = &measured[w];
        for (k, &seed) in seeds.iter().enumerate() {
            comparisons.push(comparison(seed, false, 0, w + 1, &base_a[k], &win.assessments[k]));
        }
        let hs = &plan.holdout_seeds;
        if !hs.is_empty() {
            let hb = s.measure(0, &plan.baseline, hs, "held-out seeds: baseline")?;
            let hw = s.measure(w + 1, &win.result.negative, hs, "held-out seeds: winner")?;
            let deltas: Vec<f64> = hw.iter().zip(&hb).map(|(a, b)| a.combined - b.combined).collect();
            holdout_mean_delta = Some(mean(&deltas));
            holdout_improved = Some(deltas.iter().filter(|d| **d > 0.0).count());
            holdout_metric_deltas = metric_deltas(&hw, &hb);
            for (k, &seed) in hs.iter().enumerate() {
                comparisons.push(comparison(seed, true, 0, w + 1, &hb[k], &hw[k]));
            }
        }
    }
    s.progress("done")?;

    let helped = match (winner, holdout_mean_delta, holdout_improved) {
        (Some(_), Some(d), Some(k)) => d > 0.0 && 2 * k > plan.holdout_seeds.len(),
        (Some(_), None, _) => true,
        _ => false,
    };
    let verdict = verdict(&base_label, &measured.iter().map(|m| &m.result).collect::<Vec<_>>(), best, winner, holdout_mean_delta, holdout_improved, plan, helped);
    Ok(OptimizeResult {
        baseline: base.result,
        candidates: measured.into_iter().map(|m| m.result).collect(),
        winner,
        search_seeds: seeds.clone(),
        holdout_seeds: if winner.is_some() { plan.holdout_seeds.clone() } else { Vec::new() },
        holdout_mean_delta,
        holdout_improved,
        holdout_metric_deltas,
        comparisons,
        helped,
        verdict,
    })
}

/// Share of the best gain a shorter candidate must reach to be preferred to it.
const SIMPLER_SHARE: f64 = 0.95;

/// The winner: among the candidates that beat the baseline on the mean and on most seeds,
/// the one with the fewest comma-separated parts among those reaching
/// [`SIMPLER_SHARE`] of the best gain (a combination must earn its extra words), ties
/// going to the higher mean.
pub fn pick_winner(candidates: &[&CandidateResult], seeds: usize) -> Option<usize> {
    let qualified: Vec<usize> = (0..candidates.len()).filter(|&i| candidates[i].mean_delta > 0.0 && 2 * candidates[i].improved > seeds).collect();
    let top = qualified.iter().map(|&i| candidates[i].mean_delta).fold(f64::NEG_INFINITY, f64::max);
    let parts = |i: usize| super::analysis::phrases(&candidates[i].negative).len();
    qualified
        .into_iter()
        .filter(|&i| candidates[i].mean_delta >= SIMPLER_SHARE * top)
        .min_by(|&a, &b| parts(a).cmp(&parts(b)).then(candidates[b].mean.total_cmp(&candidates[a].mean)))
}

fn comparison(seed: u64, held_out: bool, base_index: usize, win_index: usize, b: &Assessment, w: &Assessment) -> SeedComparison {
    SeedComparison {
        seed,
        held_out,
        baseline_image: image_name(base_index, seed),
        winner_image: image_name(win_index, seed),
        baseline_score: b.combined,
        winner_score: w.combined,
        metric_deltas: by_name(&w.scores.minus(&b.scores)),
    }
}

#[allow(clippy::too_many_arguments)]
fn verdict(
    base_label: &str,
    candidates: &[&CandidateResult],
    best: Option<usize>,
    winner: Option<usize>,
    holdout_delta: Option<f64>,
    holdout_improved: Option<usize>,
    plan: &Plan,
    helped: bool,
) -> String {
    let k = plan.search_seeds.len();
    let Some(b) = best else {
        return format!("No candidates to try: keep {base_label}.");
    };
    let best = candidates[b];
    let Some(w) = winner else {
        return format!(
            "No candidate helped: the best, “{}”, changed the combined score by {:+.4} ({} of {k} seeds better). Keep {base_label}.",
            best.negative, best.mean_delta, best.improved
        );
    };
    let win = candidates[w];
    match (holdout_delta, holdout_improved) {
        (Some(d), Some(i)) if helped => format!(
            "“{}” raises the combined score by {d:+.4} on {} new seeds ({i} of {} better), after {:+.4} on the {k} search seeds ({} of {k} better).",
            win.negative,
            plan.holdout_seeds.len(),
            plan.holdout_seeds.len(),
            win.mean_delta,
            win.improved
        ),
        (Some(d), Some(i)) => format!(
            "“{}” looked better on the {k} search seeds ({:+.4}, {} of {k}) but not on {} new seeds ({d:+.4}, {i} of {} better): not a reliable improvement. Keep {base_label}.",
            win.negative,
            win.mean_delta,
            win.improved,
            plan.holdout_seeds.len(),
            plan.holdout_seeds.len()
        ),
        _ => format!("“{}” raises the combined score by {:+.4} ({} of {k} seeds better; not checked on new seeds).", win.negative, win.mean_delta, win.improved),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atelier_engine::quality::{assess, Weights};

    /// A renderer whose images get blurrier with "bad" in the negative and cleaner with "good":
    /// a colour ramp whose edge (off the 8-pixel grid) is smeared over `width` pixels.
    struct Fake {
        renders: usize,
    }

    impl Renderer for Fake {
        fn render(&mut self, negative: &str, seed: u64) -> Result<RgbImage> {
            self.renders += 1;
            let mut width = 3.0 + (seed % 3) as f32;
            if negative.contains("good") {
                width -= 2.0;
            }
            if negative.contains("bad") {
                width += 4.0;
            }
            if negative.contains("fine") {
                width -= 0.5;
            }
            Ok(RgbImage::from_fn(32, 32, |x, _| {
                let t = ((x as f32 - 13.5) / width).clamp(-1.0, 1.0) * 0.5 + 0.5;
                let v = (40.0 + 160.0 * t) as u8;
                image::Rgb([v, v / 2, 255 - v])
            }))
        }
        fn assess(&mut self, image: &RgbImage) -> Result<Assessment> {
            Ok(assess(image, None, &Weights::default()))
        }
    }

    fn plan(candidates: &[&str]) -> Plan {
        Plan {
            baseline: String::new(),
            candidates: candidates.iter().map(|c| (c.to_string(), "yours".to_string())).collect(),
            search_seeds: vec![1, 2, 3, 4],
            holdout_seeds: vec![11, 12, 13],
            combine: true,
        }
    }

    #[test]
    fn picks_the_good_candidate_combines_and_confirms_on_new_seeds() {
        let mut renderer = Fake { renders: 0 };
        let mut saved = Vec::new();
        let mut events = 0;
        let r = run(&plan(&["bad", "good", "fine"]), &mut renderer, &mut |_| {
            events += 1;
            true
        }, &mut |name, _| {
            saved.push(name.to_string());
            Ok(())
        })
        .unwrap();
        assert_eq!(r.candidates[0].improved, 0);
        assert!(r.candidates[0].mean_delta < 0.0);
        assert_eq!(r.candidates[1].improved, 4);
        assert_eq!(r.candidates[1].p_value, 1.0 / 16.0);
        // "good, fine" is tried as a combination and wins.
        assert_eq!(r.candidates[3].negative, "good, fine");
        assert_eq!(r.candidates[3].source, "combination");
        assert_eq!(r.winner, Some(3));
        assert!(r.helped && r.holdout_improved == Some(3));
        assert!(r.verdict.starts_with("“good, fine” raises the combined score"), "{}", r.verdict);
        assert_eq!(r.comparisons.len(), 7);
        assert!(r.candidates[3].metric_deltas["sharpness"] > 0.0);
        // baseline + 3 candidates + 1 combination on 4 seeds, then 2 × 3 held out.
        assert_eq!(renderer.renders, 5 * 4 + 6);
        assert_eq!(saved.len(), renderer.renders);
        assert!(saved.contains(&"c4_s13.png".to_string()) && saved.contains(&"c0_s13.png".to_string()));
        assert!(events > renderer.renders);
    }

    #[test]
    fn says_plainly_when_nothing_helps_and_stops_when_cancelled() {
        let mut renderer = Fake { renders: 0 };
        let r = run(&plan(&["bad", "worse bad"]), &mut renderer, &mut |_| true, &mut |_, _| Ok(())).unwrap();
        assert_eq!(r.winner, None);
        assert!(!r.helped);
        assert!(r.verdict.starts_with("No candidate helped"), "{}", r.verdict);
        assert!(r.comparisons.is_empty() && r.holdout_seeds.is_empty());
        assert_eq!(renderer.renders, 3 * 4, "no combination of unhelpful ones, nothing held out");

        let mut renderer = Fake { renders: 0 };
        let mut n = 0;
        let err = run(&plan(&["good"]), &mut renderer, &mut |e| {
            if matches!(e, Event::Progress { .. }) {
                n += 1;
            }
            n < 6
        }, &mut |_, _| Ok(()))
        .unwrap_err();
        assert!(matches!(err, NegativesError::Cancelled), "{err:?}");
        assert_eq!(renderer.renders, 5);
    }

    #[test]
    fn a_combination_must_earn_its_extra_words() {
        let c = |negative: &str, mean_delta: f64, improved: usize| CandidateResult {
            negative: negative.into(),
            source: "x".into(),
            scores: vec![],
            mean: 0.5 + mean_delta,
            mean_delta,
            improved,
            p_value: 1.0,
            metric_deltas: Default::default(),
            images: vec![],
        };
        let (a, ab, b) = (c("low contrast", 0.0185, 4), c("low contrast, cut off", 0.0186, 3), c("noisy", 0.03, 2));
        // "noisy" has the largest gain but wins on only 2 of 4 seeds; the combination adds
        // less than 5 % to "low contrast" alone.
        assert_eq!(pick_winner(&[&a, &ab, &b], 4), Some(0));
        let ab = c("low contrast, cut off", 0.03, 3);
        assert_eq!(pick_winner(&[&a, &ab, &b], 4), Some(1));
        assert_eq!(pick_winner(&[&b], 4), None);
    }

    #[test]
    fn sign_test_values() {
        assert_eq!(sign_test(4, 4), 1.0 / 16.0);
        assert_eq!(sign_test(3, 4), 5.0 / 16.0);
        assert_eq!(sign_test(0, 4), 1.0);
    }
}
