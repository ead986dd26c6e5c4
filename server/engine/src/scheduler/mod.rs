//! Noise schedulers, configured from a diffusers `scheduler_config.json` the way
//! diffusers' `from_config` does: keys the file does not set take each scheduler
//! class's own defaults.

use candle_core::Tensor;

use crate::noise::Noise;
use crate::Result;

mod config;
pub mod ddim;
pub mod dpmsolver;
pub mod euler;
mod schedule;
#[cfg(test)]
mod test_util;

pub use config::{BetaSchedule, FinalSigmasType, SchedulerConfig, TimestepSpacing};
pub use ddim::Ddim;
pub use dpmsolver::DpmSolverMultistep;
pub use euler::Euler;
pub use schedule::karras_sigmas;

/// A scheduler of the given kind for `num_inference_steps` steps, set up from a
/// diffusers scheduler config the way `from_config` + `set_timesteps` do.
///
/// `DpmPp2m` and `DpmPp2mKarras` are DPM-Solver++ 2M whose kind decides the sigmas
/// (`use_karras_sigmas` forced off / on); Euler follows the config's `use_karras_sigmas`
/// as diffusers does, and Euler ancestral ignores it as diffusers does.
pub fn build(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>> {
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(Ddim::new(config, num_inference_steps)?),
        SchedulerKind::Euler => Box::new(Euler::new(config, num_inference_steps)?),
        SchedulerKind::EulerAncestral => Box::new(Euler::ancestral(config, num_inference_steps)?),
        SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras => {
            let karras = kind == SchedulerKind::DpmPp2mKarras;
            let config = SchedulerConfig {
                use_karras_sigmas: karras,
                ..config.clone()
            };
            Box::new(DpmSolverMultistep::new(&config, num_inference_steps)?)
        }
    })
}

/// Which sampler to run. Names follow A1111 in [`SchedulerKind::a1111_name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    Ddim,
    Euler,
    EulerAncestral,
    DpmPp2m,
    DpmPp2mKarras,
}

impl SchedulerKind {
    /// Every scheduler, in the order the UI lists them.
    pub const ALL: [SchedulerKind; 5] = [
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
    ];

    /// The short id used in the CLI and API (`ddim`, `euler`, `euler-a`, `dpmpp-2m`, `dpmpp-2m-karras`).
    pub fn id(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmPp2m => "dpmpp-2m",
            SchedulerKind::DpmPp2mKarras => "dpmpp-2m-karras",
        }
    }

    /// The sampler name A1111 writes in PNG `parameters`.
    pub fn a1111_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIM",
            SchedulerKind::Euler => "Euler",
            SchedulerKind::EulerAncestral => "Euler a",
            SchedulerKind::DpmPp2m => "DPM++ 2M",
            SchedulerKind::DpmPp2mKarras => "DPM++ 2M Karras",
        }
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.id())
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        // "DPM++ 2M" -> "dpmpp-2m": spell "++" out before separators become dashes.
        let norm = s
            .trim()
            .to_ascii_lowercase()
            .replace("++", "pp")
            .replace(['_', ' ', '+'], "-");
        Ok(match norm.as_str() {
            "ddim" => SchedulerKind::Ddim,
            "euler" => SchedulerKind::Euler,
            "euler-a" | "euler-ancestral" => SchedulerKind::EulerAncestral,
            "dpmpp-2m" | "dpmpp2m" | "dpm-2m" => SchedulerKind::DpmPp2m,
            "dpmpp-2m-karras" | "dpmpp2m-karras" | "dpm-2m-karras" => {
                SchedulerKind::DpmPp2mKarras
            }
            _ => {
                return Err(crate::Error::invalid(
                    "scheduler",
                    format!("unknown scheduler {s:?}; use one of ddim, euler, euler-a, dpmpp-2m, dpmpp-2m-karras"),
                ))
            }
        })
    }
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

/// A sampler for one run: fixed step count, mutable multistep state.
///
/// The denoising loop is
/// ```text
/// x = init_noise * init_noise_sigma()          (txt2img)
/// for i in 0..timesteps().len():
///     eps = unet(scale_model_input(x, i), timesteps()[i])
///     x = step(eps, i, x, noise)
/// ```
pub trait Scheduler: Send {
    /// The model timesteps of this run, in the order they are visited.
    fn timesteps(&self) -> &[f64];
    /// Standard deviation of the initial noise (1 for DDIM, sigma_max-based for Euler-type).
    fn init_noise_sigma(&self) -> f64;
    /// Scales the UNet input at step `i` (identity for DDIM; divides by sqrt(sigma²+1) for Euler-type).
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor>;
    /// One denoising step from step `i`; ancestral samplers draw fresh noise from `noise`.
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut Noise,
    ) -> Result<Tensor>;
    /// Noises clean latents `original` to the noise level of step `i` (img2img start point).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor>;
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn kind_parsing_accepts_ids_and_a1111_names() {
        for kind in SchedulerKind::ALL {
            assert_eq!(kind.id().parse::<SchedulerKind>().unwrap(), kind);
            assert_eq!(
                kind.a1111_name().parse::<SchedulerKind>().unwrap(),
                kind,
                "{}",
                kind.a1111_name()
            );
            assert_eq!(kind.to_string(), kind.id());
        }
        assert_eq!(
            " Euler_Ancestral ".parse::<SchedulerKind>().unwrap(),
            SchedulerKind::EulerAncestral
        );
        assert_eq!(
            "DPMPP2M_KARRAS".parse::<SchedulerKind>().unwrap(),
            SchedulerKind::DpmPp2mKarras
        );
        let err = "plms".parse::<SchedulerKind>().unwrap_err();
        assert!(
            matches!(
                err,
                crate::Error::InvalidInput {
                    field: "scheduler",
                    ..
                }
            ),
            "{err}"
        );
        assert!("".parse::<SchedulerKind>().is_err());
    }

    #[test]
    fn build_gives_each_kind_its_schedule() {
        let config = SchedulerConfig::sd_v1_5();
        let steps = 10;
        let all: Vec<Box<dyn Scheduler>> = SchedulerKind::ALL
            .iter()
            .map(|&k| build(k, &config, steps).unwrap())
            .collect();
        for s in &all {
            assert_eq!(s.timesteps().len(), steps);
        }
        // DDIM: leading spacing with steps_offset 1, no input scaling.
        assert_eq!(all[0].timesteps()[0], 901.0);
        assert_eq!(all[0].init_noise_sigma(), 1.0);
        // Euler and Euler a: linspace from 999, init sigma = sigma_max (~14.6 for SD).
        assert_eq!(all[1].timesteps()[0], 999.0);
        assert!(
            (all[1].init_noise_sigma() - 14.6146).abs() < 1e-3,
            "{}",
            all[1].init_noise_sigma()
        );
        assert_eq!(all[2].init_noise_sigma(), all[1].init_noise_sigma());
        // DPM++ 2M and its Karras variant differ only in the sigmas / timesteps.
        assert_eq!(all[3].init_noise_sigma(), 1.0);
        assert_eq!(all[3].timesteps()[0], 999.0);
        assert_ne!(all[3].timesteps(), all[4].timesteps());
        let karras_config = SchedulerConfig {
            use_karras_sigmas: true,
            ..config.clone()
        };
        let plain = build(SchedulerKind::DpmPp2m, &karras_config, steps).unwrap();
        assert_eq!(
            plain.timesteps(),
            all[3].timesteps(),
            "dpmpp-2m never uses Karras sigmas"
        );

        let x = Tensor::ones((1, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let scaled = all[1]
            .scale_model_input(&x, 0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let sigma = all[1].init_noise_sigma();
        assert!((scaled[0][0] as f64 - 1.0 / (sigma * sigma + 1.0).sqrt()).abs() < 1e-6);
        assert!(build(SchedulerKind::Ddim, &config, 0).is_err());
        assert!(build(SchedulerKind::Ddim, &config, 1001).is_err());
    }

    #[test]
    fn build_rejects_an_unsupported_config() {
        let config = SchedulerConfig {
            use_lu_lambdas: true,
            ..SchedulerConfig::sd_v1_5()
        };
        for kind in SchedulerKind::ALL {
            assert!(build(kind, &config, 10).is_err(), "{kind}");
        }
    }
}
