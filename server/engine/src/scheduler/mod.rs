//! Noise schedulers, configured from a diffusers `scheduler_config.json` the way
//! diffusers' `from_config` does: keys the file does not set take each scheduler
//! class's own defaults.

use candle_core::Tensor;

use crate::noise::Noise;
use crate::Result;

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
        let norm = s.trim().to_ascii_lowercase().replace(['_', ' ', '+'], "-");
        Ok(match norm.as_str() {
            "ddim" => SchedulerKind::Ddim,
            "euler" => SchedulerKind::Euler,
            "euler-a" | "euler-ancestral" => SchedulerKind::EulerAncestral,
            "dpmpp-2m" | "dpm--2m" | "dpmpp2m" | "dpm-2m" => SchedulerKind::DpmPp2m,
            "dpmpp-2m-karras" | "dpm--2m-karras" | "dpmpp2m-karras" | "dpm-2m-karras" => {
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
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, noise: &mut Noise) -> Result<Tensor>;
    /// Noises clean latents `original` to the noise level of step `i` (img2img start point).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor>;
}
