//! Euler and Euler ancestral samplers (Karras et al. 2022 / k-diffusion), matching
//! diffusers' `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler`.
//!
//! Both walk a decreasing list of noise levels sigma (float32, as diffusers stores them)
//! with the latents kept at scale `x = x0 + sigma * eps`; the ancestral variant steps
//! to a lower sigma and adds fresh noise back up to the next level.

use candle_core::{DType, Tensor};

use super::config::{FinalSigmasType, SchedulerConfig, TimestepSpacing};
use super::schedule::{self, div, mul};
use super::{PredictionType, Scheduler};
use crate::noise::Noise;
use crate::{Error, Result};

/// Euler (deterministic) or Euler ancestral sampler.
#[derive(Debug, Clone)]
pub struct Euler {
    /// `steps + 1` noise levels; the last is the final one (0 by default).
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    init_noise_sigma: f32,
    prediction_type: PredictionType,
    ancestral: bool,
}

impl Euler {
    /// The deterministic Euler sampler (`EulerDiscreteScheduler`), Karras sigmas when
    /// `use_karras_sigmas` is set.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        Self::build(config, num_inference_steps, false)
    }

    /// The Euler ancestral sampler (`EulerAncestralDiscreteScheduler`). Like diffusers,
    /// it ignores `use_karras_sigmas` and `final_sigmas_type` (always ends at sigma 0).
    pub fn ancestral(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        Self::build(config, num_inference_steps, true)
    }

    fn build(config: &SchedulerConfig, steps: usize, ancestral: bool) -> Result<Self> {
        config.validate()?;
        let n = config.num_train_timesteps;
        if steps == 0 || steps > n {
            return Err(Error::invalid(
                "steps",
                format!("Euler needs between 1 and {n} steps, got {steps}"),
            ));
        }
        let mut alphas_cumprod = schedule::alphas_cumprod(config);
        if config.rescale_betas_zero_snr {
            // diffusers keeps the last sigma finite this way.
            alphas_cumprod[n - 1] = 2f32.powi(-24);
        }
        let train_sigmas = schedule::train_sigmas(&alphas_cumprod);
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);

        let timesteps: Vec<f32> = match spacing {
            TimestepSpacing::Linspace => schedule::np_linspace(0.0, (n - 1) as f64, steps)
                .into_iter()
                .rev()
                .map(|t| t as f32)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = n / steps;
                (0..steps)
                    .rev()
                    .map(|i| (i * ratio) as f32 + config.steps_offset as f32)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                schedule::np_arange_down_to_zero(n as f64, n as f64 / steps as f64)
                    .into_iter()
                    .map(|t| t.round_ties_even() as f32 - 1.0)
                    .collect()
            }
        };
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| schedule::interp(t as f64, &train_sigmas))
            .collect();
        let mut timesteps: Vec<f64> = timesteps.into_iter().map(f64::from).collect();

        let use_karras = config.use_karras_sigmas && !ancestral;
        if use_karras {
            let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
            let sigma_min = config.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let sigma_max = config.sigma_max.unwrap_or(sigmas[0]);
            sigmas = schedule::karras_sigmas(sigma_min, sigma_max, steps);
            timesteps = sigmas
                .iter()
                .map(|&s| schedule::sigma_to_t(s, &log_sigmas) as f32 as f64)
                .collect();
        }
        let sigma_last = match config.final_sigmas_type {
            FinalSigmasType::SigmaMin if !ancestral => train_sigmas[0] as f64,
            _ => 0.0,
        };
        let sigmas: Vec<f32> = sigmas
            .into_iter()
            .chain(std::iter::once(sigma_last))
            .map(|s| s as f32)
            .collect();

        let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        Ok(Self {
            sigmas,
            timesteps,
            init_noise_sigma,
            prediction_type: config.prediction_type,
            ancestral,
        })
    }

    /// The noise levels of this run (`steps + 1` values, float32 as diffusers keeps them).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn sigma(&self, i: usize) -> Result<f32> {
        if i + 1 >= self.sigmas.len() {
            return Err(Error::invalid(
                "step",
                format!(
                    "step index {i} is past the {} steps of this run",
                    self.sigmas.len() - 1
                ),
            ));
        }
        Ok(self.sigmas[i])
    }

    /// The denoised estimate x0 from the model output at noise level `sigma`.
    fn predict_original(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        sigma: f32,
    ) -> Result<Tensor> {
        Ok(match self.prediction_type {
            PredictionType::Epsilon => (sample - mul(model_output, sigma)?)?,
            PredictionType::VPrediction => {
                let s2p1 = sigma * sigma + 1.0;
                (mul(model_output, -sigma / s2p1.sqrt())? + div(sample, s2p1)?)?
            }
            PredictionType::Sample => model_output.clone(),
        })
    }
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let sigma = self.sigma(i)?;
        div(sample, (sigma * sigma + 1.0).sqrt())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut Noise,
    ) -> Result<Tensor> {
        let sigma = self.sigma(i)?;
        let sigma_next = self.sigmas[i + 1];
        let dtype = sample.dtype();
        let sample = sample.to_dtype(DType::F32)?;
        let model_output = model_output.to_dtype(DType::F32)?;

        let pred_original = self.predict_original(&model_output, &sample, sigma)?;
        let derivative = div(&(&sample - pred_original)?, sigma)?;
        let prev = if self.ancestral {
            let (from2, to2) = (sigma * sigma, sigma_next * sigma_next);
            let sigma_up = (to2 * (from2 - to2) / from2).max(0.0).sqrt();
            let sigma_down = (to2 - sigma_up * sigma_up).max(0.0).sqrt();
            let prev = (&sample + mul(&derivative, sigma_down - sigma)?)?;
            // Drawn on every step (also the last, where sigma_up is 0) like diffusers,
            // so a seed gives the same noise stream whatever the step count.
            let fresh = noise.randn(model_output.dims(), model_output.device())?;
            (prev + mul(&fresh, sigma_up)?)?
        } else {
            (&sample + mul(&derivative, sigma_next - sigma)?)?
        };
        Ok(prev.to_dtype(dtype)?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        let sigma = self.sigma(i)?;
        let dtype = original.dtype();
        let noisy = (original.to_dtype(DType::F32)? + mul(&noise.to_dtype(DType::F32)?, sigma)?)?;
        Ok(noisy.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::scheduler::test_util::{self, Fixture};

    #[test]
    fn matches_diffusers_fixture() {
        let fx = Fixture::load("pipeline_euler");
        let config = SchedulerConfig::load(test_util::fixture_scheduler_config()).unwrap();
        let mut s = Euler::new(&config, fx.steps()).unwrap();
        fx.check_timesteps(s.timesteps());
        fx.check_sigmas(s.sigmas());
        fx.check_init_noise_sigma(s.init_noise_sigma());
        fx.check_scale_model_input(&s);
        fx.check_steps(&mut s);
        let mut s = Euler::new(&config, fx.steps()).unwrap();
        fx.check_chain(&mut s);
    }

    #[test]
    fn ancestral_shares_the_euler_schedule() {
        let config = SchedulerConfig::sd_v1_5();
        let e = Euler::new(&config, 6).unwrap();
        let a = Euler::ancestral(&config, 6).unwrap();
        assert_eq!(e.sigmas(), a.sigmas());
        assert_eq!(e.timesteps(), a.timesteps());
        assert_eq!(e.init_noise_sigma(), a.init_noise_sigma());
    }

    #[test]
    fn ancestral_is_deterministic_per_seed_and_adds_noise() {
        let config = SchedulerConfig::sd_v1_5();
        let dev = Device::Cpu;
        let x = Noise::new(1).randn(&[1, 4, 4, 4], &dev).unwrap();
        let eps = Noise::new(2).randn(&[1, 4, 4, 4], &dev).unwrap();
        let run = |seed: u64| {
            let mut s = Euler::ancestral(&config, 5).unwrap();
            let mut noise = Noise::new(seed);
            let mut x = (&x * s.init_noise_sigma()).unwrap();
            for i in 0..s.timesteps().len() {
                x = s.step(&eps, i, &x, &mut noise).unwrap();
            }
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let (a, b, c) = (run(7), run(7), run(8));
        assert_eq!(a, b);
        assert!(
            a.iter().zip(&c).any(|(p, q)| (p - q).abs() > 1e-3),
            "different seeds must differ"
        );
    }

    #[test]
    fn ancestral_step_by_hand() {
        let config = SchedulerConfig::sd_v1_5();
        let mut s = Euler::ancestral(&config, 4).unwrap();
        let dev = Device::Cpu;
        let x = Tensor::new(&[3.0f32, -1.5, 0.25], &dev).unwrap();
        let eps = Tensor::new(&[0.5f32, -0.25, 1.0], &dev).unwrap();
        let out = s
            .step(&eps, 1, &x, &mut Noise::new(42))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let z = Noise::new(42)
            .randn(&[3], &dev)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (from, to) = (s.sigmas()[1] as f64, s.sigmas()[2] as f64);
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let down = (to * to - up * up).sqrt();
        for k in 0..3 {
            let (xv, ev) = ([3.0, -1.5, 0.25][k], [0.5, -0.25, 1.0][k]);
            let expected = xv + ev * (down - from) + z[k] as f64 * up;
            assert!(
                (out[k] as f64 - expected).abs() < 1e-5,
                "{k}: {} vs {expected}",
                out[k]
            );
        }
        assert!(up > 0.1, "the middle step must add noise (sigma_up = {up})");
    }

    #[test]
    fn v_prediction_by_hand() {
        // With sigma = s: x0 = -s/sqrt(s²+1) v + x/(s²+1), then an Euler step to sigma'.
        let mut config = SchedulerConfig::sd_v1_5();
        config.prediction_type = PredictionType::VPrediction;
        let mut s = Euler::new(&config, 3).unwrap();
        let (sig, next) = (s.sigmas()[0] as f64, s.sigmas()[1] as f64);
        let dev = Device::Cpu;
        let x = Tensor::new(&[10.0f32, -4.0], &dev).unwrap();
        let v = Tensor::new(&[0.5f32, 2.0], &dev).unwrap();
        let out = s
            .step(&v, 0, &x, &mut Noise::new(0))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (k, (xv, vv)) in [(10.0f64, 0.5f64), (-4.0, 2.0)].into_iter().enumerate() {
            let x0 = -sig / (sig * sig + 1.0).sqrt() * vv + xv / (sig * sig + 1.0);
            let expected = xv + (xv - x0) / sig * (next - sig);
            assert!(
                (out[k] as f64 - expected).abs() < 1e-4 * expected.abs().max(1.0),
                "{k}: {} vs {expected}",
                out[k]
            );
        }
    }

    #[test]
    fn spacing_leading_and_trailing() {
        let mut config = SchedulerConfig::sd_v1_5();
        config.timestep_spacing = Some(TimestepSpacing::Trailing);
        let s = Euler::new(&config, 4).unwrap();
        // np.arange(1000, 0, -250).round() - 1
        assert_eq!(s.timesteps(), &[999.0, 749.0, 499.0, 249.0]);
        assert_eq!(s.init_noise_sigma(), s.sigmas()[0] as f64);
        config.timestep_spacing = Some(TimestepSpacing::Leading);
        let s = Euler::new(&config, 4).unwrap();
        assert_eq!(s.timesteps(), &[751.0, 501.0, 251.0, 1.0]);
        let smax = s.sigmas()[0] as f64;
        assert!((s.init_noise_sigma() - (smax * smax + 1.0).sqrt()).abs() < 1e-5);
    }

    #[test]
    fn karras_and_sigma_min_final() {
        let mut config = SchedulerConfig::sd_v1_5();
        config.use_karras_sigmas = true;
        config.final_sigmas_type = FinalSigmasType::SigmaMin;
        let s = Euler::new(&config, 10).unwrap();
        let train = schedule::train_sigmas(&schedule::alphas_cumprod(&config));
        let sig = s.sigmas();
        assert_eq!(sig.len(), 11);
        assert!((sig[0] / train[999] - 1.0).abs() < 1e-6);
        assert!((sig[9] / train[0] - 1.0).abs() < 1e-5);
        assert_eq!(sig[10], train[0]);
        assert!((s.timesteps()[0] - 999.0).abs() < 1e-3 && s.timesteps()[9].abs() < 1e-3);
    }

    #[test]
    fn step_index_past_the_end_is_an_error() {
        let mut s = Euler::new(&SchedulerConfig::sd_v1_5(), 2).unwrap();
        let x = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        assert!(s.step(&x, 2, &x, &mut Noise::new(0)).is_err());
        assert!(s.scale_model_input(&x, 5).is_err());
        assert!(Euler::new(&SchedulerConfig::sd_v1_5(), 0).is_err());
    }
}
