//! The retraining suggestion that comes with a drift alert: why (the drift figures), what to
//! train on (the dataset's newer version and what changed since the one the served version
//! was trained on, or else the same dataset with the served images that scored worst to
//! look at), and the training request that one click starts.

use app::dto::StyleTrainingRequest;
pub use app::dto::monitoring::{DatasetFacts, Suggestion};

use super::rule::MeasureCheck;
use super::Sample;

/// The web training request that repeats `cfg` (a style's training settings, from its
/// card): the dataset and name are the caller's to set.
pub fn request_from_config(cfg: &atelier_engine::style::train::StyleTrainConfig) -> StyleTrainingRequest {
    StyleTrainingRequest {
        dataset_id: String::new(),
        name: cfg.name.clone(),
        trigger: cfg.trigger.clone(),
        rank: cfg.rank,
        alpha: Some(cfg.alpha),
        steps: cfg.steps,
        lr: cfg.optim.lr,
        batch: cfg.batch,
        seed: cfg.seed,
        text_encoder: cfg.text_encoder,
        convs: cfg.convs,
        min_snr_gamma: cfg.min_snr_gamma,
        noise_offset: cfg.noise_offset,
        flip: cfg.flip,
        checkpoint_every: cfg.checkpoint_every,
        sample_every: cfg.sample_every,
        sample_prompts: cfg.sample_prompts.clone(),
        ..Default::default()
    }
}

/// Builds the suggestion for `style` (served as `version`) from the failed `checks`, the
/// window's `samples`, what is known of its dataset, and the served version's own training
/// settings (`previous`, from its card) to start from.
pub fn suggest(
    style: &str,
    version: &str,
    checks: &[MeasureCheck],
    samples: &[Sample],
    dataset: Option<DatasetFacts>,
    previous: Option<StyleTrainingRequest>,
) -> Suggestion {
    let why = checks.iter().filter(|c| c.drifted).map(MeasureCheck::describe).collect::<Vec<_>>().join("; ");
    let mut worst: Vec<&Sample> = samples.iter().collect();
    worst.sort_by(|a, b| (a.style.unwrap_or(0.0) + a.quality).total_cmp(&(b.style.unwrap_or(0.0) + b.quality)));
    let worst_images: Vec<String> = worst.iter().take(4).map(|s| s.image_id.clone()).collect();

    let newer = dataset.as_ref().and_then(|d| match (&d.trained_on, &d.latest) {
        (Some((_, a)), Some((n, b))) if a != b => Some(*n),
        (None, Some((n, _))) => Some(*n),
        _ => None,
    });
    let headline = match (&dataset, newer) {
        (Some(d), Some(n)) => {
            let since = d.trained_on.as_ref().map_or_else(String::new, |(v, _)| format!(" since version {v}, which {version} was trained on"));
            let changed = if d.changes.is_empty() { String::new() } else { format!(" ({} change(s){since})", d.changes.len()) };
            format!("Retrain {style} on dataset version {n}{changed}.")
        }
        (Some(_), None) => format!(
            "Retrain {style} on its dataset after reviewing the {} worst-scoring served images: the dataset has not changed since {version} was trained.",
            worst_images.len()
        ),
        (None, _) => format!("Retrain {style}: no dataset is recorded for {version}; train it again from its pictures."),
    };
    let training = match (&dataset, previous) {
        (Some(DatasetFacts { id: Some(id), .. }), Some(mut req)) => {
            req.dataset_id = id.clone();
            req.name = style.to_string();
            Some(req)
        }
        (Some(DatasetFacts { id: Some(id), .. }), None) => {
            Some(StyleTrainingRequest { dataset_id: id.clone(), name: style.to_string(), ..Default::default() })
        }
        _ => None,
    };
    let command = dataset.as_ref().and_then(|d| d.path.as_ref()).map(|p| format!("atelier train-style {p} --name {style}"));
    Suggestion { headline, why, style: style.to_string(), dataset, worst_images, training, command }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(drifted: bool) -> MeasureCheck {
        MeasureCheck {
            measure: "style".into(),
            reference_mean: 0.5,
            window_mean: 0.3,
            n_reference: 8,
            n_window: 8,
            drop: 0.4,
            t: -6.0,
            df: 12.0,
            p: 1e-5,
            drifted,
        }
    }

    fn sample(id: &str, style: f64) -> Sample {
        Sample { at: 0, image_id: id.into(), version: "ink@2".into(), style: Some(style), quality: 0.5 }
    }

    #[test]
    fn a_newer_dataset_version_is_suggested_with_its_changes_and_a_request() {
        let facts = DatasetFacts {
            id: Some("d1".into()),
            path: None,
            trained_on: Some((2, "aa.dir".into())),
            latest: Some((4, "bb.dir".into())),
            changes: vec!["added x.png".into(), "caption of y.png changed".into()],
        };
        let prev = StyleTrainingRequest { steps: 123, rank: 4, ..Default::default() };
        let s = suggest("ink", "ink@2", &[check(true), MeasureCheck { measure: "quality".into(), ..check(false) }], &[sample("a", 0.4), sample("b", 0.1), sample("c", 0.3)], Some(facts), Some(prev));
        assert_eq!(s.headline, "Retrain ink on dataset version 4 (2 change(s) since version 2, which ink@2 was trained on).");
        assert!(s.why.starts_with("style similarity 0.500 → 0.300 (-40 %"), "{}", s.why);
        assert!(!s.why.contains("quality"), "only drifted measures: {}", s.why);
        assert_eq!(s.worst_images, ["b", "c", "a"]);
        let t = s.training.unwrap();
        assert_eq!((t.dataset_id.as_str(), t.name.as_str(), t.steps, t.rank), ("d1", "ink", 123, 4));
    }

    #[test]
    fn an_unchanged_dataset_points_at_the_worst_images_and_no_dataset_at_the_pictures() {
        let same = DatasetFacts { id: Some("d1".into()), trained_on: Some((2, "aa.dir".into())), latest: Some((2, "aa.dir".into())), ..Default::default() };
        let s = suggest("ink", "ink@2", &[check(true)], &[sample("a", 0.4)], Some(same), None);
        assert!(s.headline.contains("has not changed since ink@2"), "{}", s.headline);
        assert_eq!(s.training.unwrap().dataset_id, "d1");
        let none = suggest("ink", "ink@2", &[check(true)], &[], None, None);
        assert!(none.training.is_none() && none.headline.contains("no dataset is recorded"));
    }
}
