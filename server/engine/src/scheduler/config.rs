//! `SchedulerConfig`: the keys of a diffusers `scheduler_config.json` that the
//! schedulers in this module read, with diffusers' class defaults for absent keys.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use super::PredictionType;
use crate::{Error, Result};

/// How the training betas are laid out over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// Betas linear in t from `beta_start` to `beta_end`.
    Linear,
    /// Square roots of the betas linear in t (Stable Diffusion).
    ScaledLinear,
    /// Cosine schedule of Nichol & Dhariwal (2021), betas capped at 0.999.
    SquaredcosCapV2,
}

/// How the inference timesteps are picked from the training range
/// (Table 2 of Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// Evenly spaced over `[0, num_train_timesteps - 1]`, both ends included.
    Linspace,
    /// Multiples of `num_train_timesteps / steps`, counted up from 0, plus `steps_offset`.
    Leading,
    /// Multiples of `num_train_timesteps / steps`, counted down from the last timestep.
    Trailing,
}

/// The noise level after the last step of sigma-based schedulers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmasType {
    /// Denoise all the way to sigma = 0.
    #[default]
    Zero,
    /// Stop at the smallest training sigma.
    SigmaMin,
}

/// A diffusers scheduler config, as read from `scheduler/scheduler_config.json`.
///
/// Absent keys take the defaults of the diffusers scheduler classes (which agree for
/// every key they share); `timestep_spacing` stays `None` when absent so that each
/// scheduler can apply its own class default. Keys not listed here (`_class_name`,
/// `skip_prk_steps`, ...) are ignored. Floats may be written as strings (`"-inf"`),
/// and the bare `Infinity` / `-Infinity` / `NaN` tokens Python's `json` writes are accepted.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SchedulerConfig {
    /// Number of diffusion steps the model was trained with.
    #[serde(default = "default_num_train_timesteps")]
    pub num_train_timesteps: usize,
    /// First beta of the training schedule.
    #[serde(default = "default_beta_start", deserialize_with = "de_f64")]
    pub beta_start: f64,
    /// Last beta of the training schedule.
    #[serde(default = "default_beta_end", deserialize_with = "de_f64")]
    pub beta_end: f64,
    /// Shape of the training schedule.
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: BetaSchedule,
    /// Explicit training betas; when set, they replace `beta_start`/`beta_end`/`beta_schedule`.
    #[serde(default, deserialize_with = "de_opt_vec_f64")]
    pub trained_betas: Option<Vec<f64>>,
    /// What the UNet predicts.
    #[serde(default = "default_prediction_type")]
    pub prediction_type: PredictionType,
    /// Added to every timestep under "leading" spacing (SD 1.x uses 1).
    #[serde(default)]
    pub steps_offset: usize,
    /// DDIM: use alpha_cumprod = 1 after the last step (otherwise alphas_cumprod[0]).
    #[serde(default = "default_true")]
    pub set_alpha_to_one: bool,
    /// DDIM: clamp the predicted x0 to `[-clip_sample_range, clip_sample_range]`.
    #[serde(default = "default_true")]
    pub clip_sample: bool,
    /// DDIM: the clamp range used when `clip_sample` is set.
    #[serde(default = "default_one", deserialize_with = "de_f64")]
    pub clip_sample_range: f64,
    /// Timestep spacing; `None` uses the class default (DDIM "leading", others "linspace").
    #[serde(default)]
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Euler / DPM-Solver: use the noise levels of Karras et al. (2022).
    #[serde(default)]
    pub use_karras_sigmas: bool,
    /// Euler / DPM-Solver: the noise level after the last step.
    #[serde(default)]
    pub final_sigmas_type: FinalSigmasType,
    /// Rescale betas to zero terminal SNR (Lin et al. 2023).
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// Karras sigmas: overrides the smallest sigma (Euler).
    #[serde(default, deserialize_with = "de_opt_f64")]
    pub sigma_min: Option<f64>,
    /// Karras sigmas: overrides the largest sigma (Euler).
    #[serde(default, deserialize_with = "de_opt_f64")]
    pub sigma_max: Option<f64>,
    /// DPM-Solver: timesteps whose log-SNR lambda is below this are not used.
    #[serde(default = "default_lambda_min_clipped", deserialize_with = "de_f64")]
    pub lambda_min_clipped: f64,
    /// DPM-Solver: use first-order steps at the end when there are fewer than 15 steps.
    #[serde(default = "default_true")]
    pub lower_order_final: bool,
    /// DPM-Solver: always make the last step a first-order (Euler) step.
    #[serde(default)]
    pub euler_at_final: bool,
    /// Dynamic thresholding of x0 (Imagen); not supported, must be false.
    #[serde(default)]
    pub thresholding: bool,
    /// Euler: sigma interpolation between training timesteps; only "linear" is supported.
    #[serde(default = "default_interpolation_type")]
    pub interpolation_type: String,
    /// Euler: "discrete" timesteps; "continuous" is not supported.
    #[serde(default = "default_timestep_type")]
    pub timestep_type: String,
    /// Exponential sigma schedule; not supported, must be false.
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    /// Beta-distribution sigma schedule; not supported, must be false.
    #[serde(default)]
    pub use_beta_sigmas: bool,
    /// DPM-Solver log-SNR-uniform schedule; not supported, must be false.
    #[serde(default)]
    pub use_lu_lambdas: bool,
}

fn default_num_train_timesteps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> BetaSchedule {
    BetaSchedule::Linear
}
fn default_prediction_type() -> PredictionType {
    PredictionType::Epsilon
}
fn default_true() -> bool {
    true
}
fn default_one() -> f64 {
    1.0
}
fn default_lambda_min_clipped() -> f64 {
    f64::NEG_INFINITY
}
fn default_interpolation_type() -> String {
    "linear".to_string()
}
fn default_timestep_type() -> String {
    "discrete".to_string()
}

impl Default for SchedulerConfig {
    /// The diffusers class defaults (what an empty `{}` config gives).
    fn default() -> Self {
        Self {
            num_train_timesteps: default_num_train_timesteps(),
            beta_start: default_beta_start(),
            beta_end: default_beta_end(),
            beta_schedule: default_beta_schedule(),
            trained_betas: None,
            prediction_type: default_prediction_type(),
            steps_offset: 0,
            set_alpha_to_one: true,
            clip_sample: true,
            clip_sample_range: 1.0,
            timestep_spacing: None,
            use_karras_sigmas: false,
            final_sigmas_type: FinalSigmasType::Zero,
            rescale_betas_zero_snr: false,
            sigma_min: None,
            sigma_max: None,
            lambda_min_clipped: f64::NEG_INFINITY,
            lower_order_final: true,
            euler_at_final: false,
            thresholding: false,
            interpolation_type: default_interpolation_type(),
            timestep_type: default_timestep_type(),
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
        }
    }
}

impl SchedulerConfig {
    /// The scheduler config shipped with Stable Diffusion 1.x
    /// (`runwayml/stable-diffusion-v1-5/scheduler/scheduler_config.json`).
    pub fn sd_v1_5() -> Self {
        Self {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            steps_offset: 1,
            set_alpha_to_one: false,
            clip_sample: false,
            ..Self::default()
        }
    }

    /// Reads and parses a `scheduler_config.json`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    /// Parses the text of a `scheduler_config.json`; `path` only names it in errors.
    pub fn parse(json: &str, path: impl Into<PathBuf>) -> Result<Self> {
        let cleaned = quote_non_finite_tokens(json);
        let config: Self = serde_json::from_str(&cleaned).map_err(|e| Error::Config {
            path: path.into(),
            message: e.to_string(),
        })?;
        Ok(config)
    }

    /// Checks the values the schedulers rely on; `build` calls this.
    pub fn validate(&self) -> Result<()> {
        let bad = |message: String| Err(Error::invalid("scheduler config", message));
        if self.num_train_timesteps < 2 {
            return bad(format!(
                "num_train_timesteps must be at least 2, got {}",
                self.num_train_timesteps
            ));
        }
        if let Some(betas) = &self.trained_betas {
            if betas.len() != self.num_train_timesteps {
                return bad(format!(
                    "trained_betas has {} values but num_train_timesteps is {}",
                    betas.len(),
                    self.num_train_timesteps
                ));
            }
            if betas
                .iter()
                .any(|b| !(b.is_finite() && *b >= 0.0 && *b < 1.0))
            {
                return bad("trained_betas must lie in [0, 1)".to_string());
            }
        } else if self.beta_schedule != BetaSchedule::SquaredcosCapV2
            && !(self.beta_start.is_finite()
                && self.beta_end.is_finite()
                && self.beta_start >= 0.0
                && self.beta_end < 1.0
                && self.beta_start <= self.beta_end)
        {
            return bad(format!(
                "beta_start {} / beta_end {} must satisfy 0 <= beta_start <= beta_end < 1",
                self.beta_start, self.beta_end
            ));
        }
        if self.steps_offset >= self.num_train_timesteps {
            return bad(format!(
                "steps_offset {} is not below num_train_timesteps",
                self.steps_offset
            ));
        }
        let unsupported = [
            (self.thresholding, "thresholding"),
            (self.use_exponential_sigmas, "use_exponential_sigmas"),
            (self.use_beta_sigmas, "use_beta_sigmas"),
            (self.use_lu_lambdas, "use_lu_lambdas"),
        ];
        for (on, key) in unsupported {
            if on {
                return bad(format!("{key} = true is not supported"));
            }
        }
        if self.interpolation_type != "linear" {
            return bad(format!(
                "interpolation_type {:?} is not supported (only \"linear\")",
                self.interpolation_type
            ));
        }
        if self.timestep_type != "discrete" {
            return bad(format!(
                "timestep_type {:?} is not supported (only \"discrete\")",
                self.timestep_type
            ));
        }
        if self.clip_sample && !(self.clip_sample_range.is_finite() && self.clip_sample_range > 0.0)
        {
            return bad(format!(
                "clip_sample_range must be positive, got {}",
                self.clip_sample_range
            ));
        }
        for (value, key) in [(self.sigma_min, "sigma_min"), (self.sigma_max, "sigma_max")] {
            if let Some(v) = value {
                if !(v.is_finite() && v > 0.0) {
                    return bad(format!("{key} must be positive, got {v}"));
                }
            }
        }
        Ok(())
    }
}

/// Python's `json` writes non-finite floats as the bare tokens `NaN`, `Infinity` and
/// `-Infinity`, which are not JSON; this turns them (outside strings) into strings that
/// the float fields accept.
fn quote_non_finite_tokens(json: &str) -> std::borrow::Cow<'_, str> {
    if !(json.contains("Infinity") || json.contains("NaN")) {
        return std::borrow::Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = json;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        let replaced = [
            ("-Infinity", "\"-inf\""),
            ("Infinity", "\"inf\""),
            ("NaN", "\"nan\""),
        ]
        .into_iter()
        .find(|(token, _)| rest.starts_with(token));
        if let Some((token, quoted)) = replaced {
            out.push_str(quoted);
            rest = &rest[token.len()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    std::borrow::Cow::Owned(out)
}

/// A float written as a JSON number or as a string such as `"-inf"` or `"1e-4"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum FloatRepr {
    Number(f64),
    Text(String),
}

impl FloatRepr {
    fn value<E: serde::de::Error>(self) -> std::result::Result<f64, E> {
        match self {
            FloatRepr::Number(v) => Ok(v),
            FloatRepr::Text(s) => match s.trim().to_ascii_lowercase().as_str() {
                "inf" | "+inf" | "infinity" | "+infinity" => Ok(f64::INFINITY),
                "-inf" | "-infinity" => Ok(f64::NEG_INFINITY),
                "nan" => Ok(f64::NAN),
                other => other
                    .parse()
                    .map_err(|_| E::custom(format!("expected a number, got {s:?}"))),
            },
        }
    }
}

fn de_f64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    FloatRepr::deserialize(d)?.value()
}

fn de_opt_f64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<f64>, D::Error> {
    Option::<FloatRepr>::deserialize(d)?
        .map(FloatRepr::value)
        .transpose()
}

fn de_opt_vec_f64<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Vec<f64>>, D::Error> {
    match Option::<Vec<FloatRepr>>::deserialize(d)? {
        None => Ok(None),
        Some(values) => values
            .into_iter()
            .map(FloatRepr::value)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_takes_class_defaults() {
        let c = SchedulerConfig::parse("{}", "x.json").unwrap();
        assert_eq!(c, SchedulerConfig::default());
        assert_eq!(c.beta_schedule, BetaSchedule::Linear);
        assert_eq!(c.timestep_spacing, None);
        assert!(c.lambda_min_clipped == f64::NEG_INFINITY);
    }

    #[test]
    fn fixture_config_loads() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/fixtures/sd-tiny/pipeline/scheduler/scheduler_config.json"
        );
        let c = SchedulerConfig::load(path).unwrap();
        assert_eq!(c, SchedulerConfig::sd_v1_5());
    }

    #[test]
    fn resolved_dpm_config_with_string_inf_parses() {
        let json = r#"{"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "squaredcos_cap_v2",
            "lambda_min_clipped": "-inf", "variance_type": null, "timestep_spacing": "trailing",
            "final_sigmas_type": "sigma_min", "prediction_type": "v_prediction", "trained_betas": null,
            "use_karras_sigmas": true, "some_future_key": [1, 2]}"#;
        let c = SchedulerConfig::parse(json, "x.json").unwrap();
        assert_eq!(c.beta_schedule, BetaSchedule::SquaredcosCapV2);
        assert_eq!(c.lambda_min_clipped, f64::NEG_INFINITY);
        assert_eq!(c.timestep_spacing, Some(TimestepSpacing::Trailing));
        assert_eq!(c.final_sigmas_type, FinalSigmasType::SigmaMin);
        assert_eq!(c.prediction_type, PredictionType::VPrediction);
        assert!(c.use_karras_sigmas);
    }

    #[test]
    fn python_bare_infinity_is_accepted_outside_strings_only() {
        let json = r#"{"lambda_min_clipped": -Infinity, "_note": "NaN and -Infinity stay text", "sigma_max": Infinity}"#;
        let c = SchedulerConfig::parse(json, "x.json").unwrap();
        assert_eq!(c.lambda_min_clipped, f64::NEG_INFINITY);
        assert_eq!(c.sigma_max, Some(f64::INFINITY));
        assert!(
            c.validate().is_err(),
            "an infinite sigma_max must be rejected"
        );
        let quoted = quote_non_finite_tokens(json);
        assert!(quoted.contains(r#""NaN and -Infinity stay text""#));
    }

    #[test]
    fn bad_json_and_bad_values_are_config_errors() {
        let err = SchedulerConfig::parse("{\"beta_schedule\": \"sigmoid\"}", "s.json").unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err}");
        assert!(err.to_string().contains("s.json"));
        let err = SchedulerConfig::parse("{not json", "s.json").unwrap_err();
        assert!(matches!(err, Error::Config { .. }));
        let err = SchedulerConfig::parse("{\"beta_start\": \"abc\"}", "s.json").unwrap_err();
        assert!(matches!(err, Error::Config { .. }));
        let missing = SchedulerConfig::load("/nonexistent/scheduler_config.json").unwrap_err();
        assert!(matches!(missing, Error::Io { .. }));
    }

    #[test]
    fn validate_rejects_unsupported_options() {
        let mut c = SchedulerConfig::sd_v1_5();
        assert!(c.validate().is_ok());
        c.thresholding = true;
        assert!(c.validate().is_err());
        let mut c = SchedulerConfig::sd_v1_5();
        c.trained_betas = Some(vec![0.1; 10]);
        assert!(c.validate().is_err());
        let mut c = SchedulerConfig::sd_v1_5();
        c.beta_end = 0.0;
        assert!(c.validate().is_err());
    }
}
