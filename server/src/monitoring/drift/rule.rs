//! The statistical rule that decides whether a deployment's served images have drifted from
//! the reference measured when it was deployed.
//!
//! Every scored image gives two numbers, both in [0, 1] where higher is better: its **style
//! similarity** to the training images of the version the deployment was measured with
//! ([`atelier_engine::style::metrics::style_similarity`] of the image's own mean Grams against
//! the version's `style_grams.safetensors`), and its combined no-reference **quality** score
//! ([`atelier_engine::quality::assess`], default weights).
//!
//! For each of the two measures the rule runs a one-sided **Welch's t-test** (unequal
//! variances; Welch 1947, "The generalization of 'Student's' problem when several different
//! population variances are involved", Biometrika 34) of
//!
//! - H0: the mean over the window (the last [`DriftRule::window`] scored images) is at least
//!   the reference mean,
//! - H1: it is lower,
//!
//! with `t = (m_w − m_r) / sqrt(s_w²/n_w + s_r²/n_r)`, the Welch–Satterthwaite degrees of
//! freedom, and `p = P(T_df ≤ t)`. A measure has **drifted** when `p < α / 2` (Bonferroni over
//! the two measures) **and** the window mean is below the reference mean by at least
//! [`DriftRule::min_drop`] of it (a tiny but significant change is no reason to retrain). No
//! decision is made before the window holds [`DriftRule::min_samples`] images.

pub use app::dto::monitoring::{DriftRule, MeasureCheck};
use statrs::distribution::{ContinuousCDF, StudentsT};

/// Rule `rule`'s test of one measure: `reference` values against `window` values.
pub fn test(rule: &DriftRule, measure: &str, reference: &[f64], window: &[f64]) -> MeasureCheck {
    let (m_r, v_r) = mean_var(reference);
    let (m_w, v_w) = mean_var(window);
    let (n_r, n_w) = (reference.len() as f64, window.len() as f64);
    let drop = if m_r > 0.0 { (m_r - m_w) / m_r } else { 0.0 };
    let mut check = MeasureCheck {
        measure: measure.to_string(),
        reference_mean: m_r,
        window_mean: m_w,
        n_reference: reference.len(),
        n_window: window.len(),
        drop,
        t: 0.0,
        df: 0.0,
        p: 1.0,
        drifted: false,
    };
    if reference.len() < 2 || window.len() < rule.min_samples {
        return check;
    }
    let se2 = v_w / n_w + v_r / n_r;
    if se2 <= 0.0 {
        // Both sets constant: a lower mean is certain, an equal one is not a drop.
        check.p = if m_w < m_r { 0.0 } else { 1.0 };
    } else {
        let t = (m_w - m_r) / se2.sqrt();
        // Welch–Satterthwaite; a zero-variance side contributes nothing.
        let part = |v: f64, n: f64| if v > 0.0 { (v / n).powi(2) / (n - 1.0) } else { 0.0 };
        let df = (se2 * se2 / (part(v_w, n_w) + part(v_r, n_r))).max(1.0);
        check.t = t;
        check.df = df;
        check.p = StudentsT::new(0.0, 1.0, df).map(|d| d.cdf(t)).unwrap_or(1.0);
    }
    check.drifted = check.p < rule.alpha / 2.0 && drop >= rule.min_drop;
    check
}

/// Mean and unbiased sample variance (0 for fewer than two values).
fn mean_var(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let v = if xs.len() < 2 { 0.0 } else { xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0) };
    (m, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn welch_matches_a_worked_value() {
        // scipy.stats.ttest_ind(w, r, equal_var=False, alternative="less") on these values
        // gives t = -4.91935, df = 13.46154, p = 0.000126608 (scipy 1.x).
        let r = [0.52, 0.55, 0.49, 0.51, 0.53, 0.50, 0.54, 0.52];
        let w = [0.45, 0.47, 0.44, 0.49, 0.46, 0.50, 0.43, 0.48];
        let rule = DriftRule::default();
        let c = test(&rule, "style", &r, &w);
        assert!((c.t - -4.91935).abs() < 1e-4, "{c:?}");
        assert!((c.df - 13.46154).abs() < 1e-4, "{c:?}");
        assert!((c.p - 0.000126608).abs() < 1e-8, "{c:?}");
        assert!(c.drifted);
        assert!((c.drop - 0.055 / 0.52).abs() < 1e-9);
    }

    #[test]
    fn the_same_distribution_does_not_drift_and_small_drops_do_not_count() {
        let r = [0.52, 0.55, 0.49, 0.51, 0.53, 0.50, 0.54, 0.52];
        let rule = DriftRule::default();
        let same = test(&rule, "style", &r, &[0.53, 0.50, 0.52, 0.54, 0.51, 0.49, 0.55, 0.52]);
        assert!(!same.drifted && same.p > 0.3, "{same:?}");
        // Significant (p tiny) but a 2 % drop: below min_drop.
        let tight = [0.500, 0.5001, 0.4999, 0.5, 0.5002, 0.4998];
        let small = test(&rule, "style", &tight, &[0.490, 0.4901, 0.4899, 0.49]);
        assert!(small.p < 1e-4 && !small.drifted, "{small:?}");
        // Too few samples: no decision.
        let few = test(&rule, "style", &r, &[0.1, 0.1, 0.1]);
        assert!(!few.drifted && few.p == 1.0);
        // Higher is never drift.
        assert!(!test(&rule, "quality", &r, &[0.9, 0.91, 0.92, 0.9]).drifted);
    }

    #[test]
    fn rules_out_of_range_are_refused() {
        assert!(DriftRule::default().check().is_ok());
        assert!(DriftRule { window: 1, ..Default::default() }.check().unwrap_err().contains("window"));
        assert!(DriftRule { alpha: 0.7, ..Default::default() }.check().unwrap_err().contains("alpha"));
        assert!(DriftRule { sample_fraction: 0.0, ..Default::default() }.check().unwrap_err().contains("sample_fraction"));
    }
}
