//! DPM-Solver++ 2M (Lu et al. 2022), matching diffusers' `DPMSolverMultistepScheduler`
//! with `algorithm_type="dpmsolver++"`, `solver_order=2`, `solver_type="midpoint"`.
//!
//! The solver works on data predictions x0 in log-SNR time lambda = log(alpha / sigma_t):
//! the first step (and the last, for short runs or a zero final sigma) is first order
//! (equivalent to DDIM); the others reuse the previous x0 for a second-order update.

use candle_core::{DType, Tensor};

use super::config::{FinalSigmasType, SchedulerConfig, TimestepSpacing};
use super::schedule::{self, div, mul};
use super::{PredictionType, Scheduler};
use crate::noise::Noise;
use crate::{Error, Result};

/// Below this many steps diffusers finishes with lower-order steps when `lower_order_final` is set.
const LOWER_ORDER_FINAL_BELOW: usize = 15;

/// DPM-Solver++ 2M, with Karras sigmas when `use_karras_sigmas` is set.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistep {
    /// `steps + 1` noise levels (float32), `sigma = sigma_t / alpha_t`.
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    prediction_type: PredictionType,
    /// The last step is first order (final sigma zero, `euler_at_final`, or a short run).
    lower_order_final: bool,
    /// x0 prediction of the previous step and that step's index.
    previous: Option<(usize, Tensor)>,
}

/// `alpha_t = 1 / sqrt(sigma² + 1)`, `sigma_t = sigma * alpha_t` in float32.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// Log-SNR `log(alpha_t) - log(sigma_t)`; +inf at sigma = 0.
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl DpmSolverMultistep {
    /// A DPM-Solver++ 2M sampler for `num_inference_steps` steps.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        config.validate()?;
        let n = config.num_train_timesteps;
        let steps = num_inference_steps;
        if steps == 0 || steps > n {
            return Err(Error::invalid(
                "steps",
                format!("DPM-Solver needs between 1 and {n} steps, got {steps}"),
            ));
        }
        let mut alphas_cumprod = schedule::alphas_cumprod(config);
        if config.rescale_betas_zero_snr {
            alphas_cumprod[n - 1] = 2f32.powi(-24);
        }

        // Timesteps whose log-SNR is below lambda_min_clipped are cut off the top of the range.
        let clipped = alphas_cumprod
            .iter()
            .filter(|&&a| (lambda(a.sqrt(), (1.0 - a).sqrt()) as f64) < config.lambda_min_clipped)
            .count();
        let last_timestep = n - clipped;
        if last_timestep < 2 {
            return Err(Error::invalid(
                "scheduler config",
                "lambda_min_clipped leaves no timesteps".to_string(),
            ));
        }

        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        let timesteps: Vec<f64> = match spacing {
            TimestepSpacing::Linspace => {
                let mut t: Vec<f64> =
                    schedule::np_linspace(0.0, (last_timestep - 1) as f64, steps + 1)
                        .into_iter()
                        .map(f64::round_ties_even)
                        .collect();
                t.reverse();
                t.pop();
                t
            }
            TimestepSpacing::Leading => {
                let ratio = last_timestep / (steps + 1);
                (1..=steps)
                    .rev()
                    .map(|i| (i * ratio + config.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                schedule::np_arange_down_to_zero(last_timestep as f64, n as f64 / steps as f64)
                    .into_iter()
                    .map(|t| t.round_ties_even() - 1.0)
                    .collect()
            }
        };

        let train_sigmas = schedule::train_sigmas(&alphas_cumprod);
        let (sigmas, timesteps): (Vec<f64>, Vec<f64>) = if config.use_karras_sigmas {
            let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
            let sigma_min = config.sigma_min.unwrap_or(train_sigmas[0] as f64);
            let sigma_max = config.sigma_max.unwrap_or(train_sigmas[n - 1] as f64);
            let sigmas = schedule::karras_sigmas(sigma_min, sigma_max, steps);
            let timesteps = sigmas
                .iter()
                .map(|&s| schedule::sigma_to_t(s, &log_sigmas).round_ties_even())
                .collect();
            (sigmas, timesteps)
        } else {
            let sigmas = timesteps
                .iter()
                .map(|&t| schedule::interp(t, &train_sigmas))
                .collect();
            (sigmas, timesteps)
        };
        if let Some(bad) = timesteps.iter().find(|&&t| !(0.0..n as f64).contains(&t)) {
            return Err(Error::invalid(
                "steps",
                format!("timestep {bad} falls outside the training range 0..{n}"),
            ));
        }
        let sigma_last = match config.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => train_sigmas[0],
        };
        let sigmas: Vec<f32> = sigmas
            .into_iter()
            .map(|s| s as f32)
            .chain(std::iter::once(sigma_last))
            .collect();
        let count = timesteps.len();
        let lower_order_final = config.final_sigmas_type == FinalSigmasType::Zero
            || config.euler_at_final
            || (config.lower_order_final && count < LOWER_ORDER_FINAL_BELOW);
        Ok(Self {
            sigmas,
            timesteps,
            prediction_type: config.prediction_type,
            lower_order_final,
            previous: None,
        })
    }

    /// The noise levels of this run (`steps + 1` values, float32 as diffusers keeps them).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn check_index(&self, i: usize) -> Result<()> {
        if i >= self.timesteps.len() {
            return Err(Error::invalid(
                "step",
                format!(
                    "step index {i} is past the {} steps of this run",
                    self.timesteps.len()
                ),
            ));
        }
        Ok(())
    }

    /// The data prediction x0 from the model output at step `i`.
    fn convert_model_output(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        i: usize,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        Ok(match self.prediction_type {
            PredictionType::Epsilon => div(&(sample - mul(model_output, sigma_t)?)?, alpha_t)?,
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => (mul(sample, alpha_t)? - mul(model_output, sigma_t)?)?,
        })
    }
}

impl Scheduler for DpmSolverMultistep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        self.check_index(i)?;
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        _noise: &mut Noise,
    ) -> Result<Tensor> {
        self.check_index(i)?;
        let dtype = sample.dtype();
        let sample = sample.to_dtype(DType::F32)?;
        let model_output = model_output.to_dtype(DType::F32)?;
        let x0 = self.convert_model_output(&model_output, &sample, i)?;

        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s0, sigma_s0);
        // alpha_t * (exp(-h) - 1); at sigma_t = 0, h = inf and this is -1 (the step returns x0).
        let phi = alpha_t * ((-h).exp() - 1.0);
        let base = (mul(&sample, sigma_t / sigma_s0)? - mul(&x0, phi)?)?;

        // Second order needs the x0 of the step just before this one (a run may start
        // mid-schedule for img2img, or be restarted): otherwise fall back to first order.
        let is_last = i + 1 == self.timesteps.len();
        let previous = self.previous.take().filter(|(j, _)| j + 1 == i);
        let prev = match previous {
            Some((_, m1)) if !(is_last && self.lower_order_final) => {
                let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
                let h_0 = lambda(alpha_s0, sigma_s0) - lambda(alpha_s1, sigma_s1);
                let r0 = h_0 / h;
                let d1 = mul(&(&x0 - m1)?, 1.0 / r0)?;
                (base - mul(&d1, 0.5 * phi)?)?
            }
            _ => base,
        };
        self.previous = Some((i, x0));
        Ok(prev.to_dtype(dtype)?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        self.check_index(i)?;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        let dtype = original.dtype();
        let noisy = (mul(&original.to_dtype(DType::F32)?, alpha_t)?
            + mul(&noise.to_dtype(DType::F32)?, sigma_t)?)?;
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
        let fx = Fixture::load("pipeline_dpmpp2m");
        let config = SchedulerConfig::load(test_util::fixture_scheduler_config()).unwrap();
        let mut s = DpmSolverMultistep::new(&config, fx.steps()).unwrap();
        fx.check_timesteps(s.timesteps());
        fx.check_sigmas(s.sigmas());
        fx.check_init_noise_sigma(s.init_noise_sigma());
        fx.check_scale_model_input(&s);
        fx.check_steps(&mut s);
        let mut s = DpmSolverMultistep::new(&config, fx.steps()).unwrap();
        fx.check_chain(&mut s);
    }

    #[test]
    fn karras_sigmas_follow_the_formula() {
        let mut config = SchedulerConfig::sd_v1_5();
        config.use_karras_sigmas = true;
        let steps = 20;
        let s = DpmSolverMultistep::new(&config, steps).unwrap();
        let train = schedule::train_sigmas(&schedule::alphas_cumprod(&config));
        let (smin, smax) = (train[0] as f64, train[999] as f64);
        let sig = s.sigmas();
        assert_eq!(sig.len(), steps + 1);
        assert_eq!(sig[0], smax as f32, "first sigma is sigma_max");
        assert!(
            (sig[steps - 1] as f64 / smin - 1.0).abs() < 1e-6,
            "last sigma is sigma_min"
        );
        assert_eq!(sig[steps], 0.0);
        assert!(
            sig.windows(2).all(|w| w[1] < w[0]),
            "strictly decreasing: {sig:?}"
        );
        // Interior points: sigma_i = (smax^(1/7) + i/(n-1) (smin^(1/7) - smax^(1/7)))^7.
        for i in [1usize, 7, 13] {
            let r = i as f64 / (steps - 1) as f64;
            let expected =
                (smax.powf(1.0 / 7.0) + r * (smin.powf(1.0 / 7.0) - smax.powf(1.0 / 7.0))).powi(7);
            assert!(
                (sig[i] as f64 / expected - 1.0).abs() < 1e-6,
                "{i}: {} vs {expected}",
                sig[i]
            );
        }
        // Karras timesteps are the rounded training timesteps of those sigmas.
        assert_eq!(s.timesteps()[0], 999.0);
        assert_eq!(s.timesteps()[steps - 1], 0.0);
        assert!(s.timesteps().windows(2).all(|w| w[1] <= w[0]));
        // Karras spends more steps at low noise than the linear spacing.
        let plain = DpmSolverMultistep::new(&SchedulerConfig::sd_v1_5(), steps).unwrap();
        assert!(s.timesteps()[steps / 2] < plain.timesteps()[steps / 2]);
    }

    #[test]
    fn spacings_match_diffusers() {
        let mut config = SchedulerConfig::sd_v1_5();
        let s = DpmSolverMultistep::new(&config, 6).unwrap();
        // np.linspace(0, 999, 7).round()[::-1][:-1]: 832.5 and 499.5 round to even.
        assert_eq!(s.timesteps(), &[999.0, 832.0, 666.0, 500.0, 333.0, 166.0]);
        config.timestep_spacing = Some(TimestepSpacing::Leading);
        let s = DpmSolverMultistep::new(&config, 4).unwrap();
        // step_ratio = 1000 // 5 = 200: [800, 600, 400, 200] + 1
        assert_eq!(s.timesteps(), &[801.0, 601.0, 401.0, 201.0]);
        config.timestep_spacing = Some(TimestepSpacing::Trailing);
        let s = DpmSolverMultistep::new(&config, 4).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 749.0, 499.0, 249.0]);
    }

    #[test]
    fn first_step_is_ddim_and_sample_prediction_by_hand() {
        // With x0 predicted directly, a first-order step is x_t = (sigma_t/sigma_s) x + (1 - e^-h) alpha_t x0.
        let mut config = SchedulerConfig::sd_v1_5();
        config.prediction_type = PredictionType::Sample;
        let mut s = DpmSolverMultistep::new(&config, 5).unwrap();
        let dev = Device::Cpu;
        let x = Tensor::new(&[4.0f32, -2.0], &dev).unwrap();
        let x0 = Tensor::new(&[0.5f32, 0.75], &dev).unwrap();
        let out = s
            .step(&x0, 0, &x, &mut Noise::new(0))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let ab = |sig: f64| {
            (
                1.0 / (sig * sig + 1.0).sqrt(),
                sig / (sig * sig + 1.0).sqrt(),
            )
        };
        let (a_s, s_s) = ab(s.sigmas()[0] as f64);
        let (a_t, s_t) = ab(s.sigmas()[1] as f64);
        let h = (a_t / s_t).ln() - (a_s / s_s).ln();
        for (k, (xv, x0v)) in [(4.0f64, 0.5f64), (-2.0, 0.75)].into_iter().enumerate() {
            let expected = s_t / s_s * xv - a_t * ((-h).exp() - 1.0) * x0v;
            assert!(
                (out[k] as f64 - expected).abs() < 1e-5,
                "{k}: {} vs {expected}",
                out[k]
            );
        }
    }

    #[test]
    fn v_prediction_converts_to_x0() {
        let mut config = SchedulerConfig::sd_v1_5();
        config.prediction_type = PredictionType::VPrediction;
        let s = DpmSolverMultistep::new(&config, 5).unwrap();
        let dev = Device::Cpu;
        let x = Tensor::new(&[3.0f32, -1.0], &dev).unwrap();
        let v = Tensor::new(&[0.25f32, 2.0], &dev).unwrap();
        let got = s
            .convert_model_output(&v, &x, 2)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let sig = s.sigmas()[2] as f64;
        let (a, st) = (
            1.0 / (sig * sig + 1.0).sqrt(),
            sig / (sig * sig + 1.0).sqrt(),
        );
        for (k, (xv, vv)) in [(3.0f64, 0.25f64), (-1.0, 2.0)].into_iter().enumerate() {
            let expected = a * xv - st * vv;
            assert!(
                (got[k] as f64 - expected).abs() < 1e-5,
                "{k}: {} vs {expected}",
                got[k]
            );
        }
    }

    #[test]
    fn last_step_returns_x0_with_zero_final_sigma() {
        let mut s = DpmSolverMultistep::new(&SchedulerConfig::sd_v1_5(), 3).unwrap();
        let dev = Device::Cpu;
        let x = Tensor::new(&[1.0f32, 2.0], &dev).unwrap();
        let eps = Tensor::new(&[0.1f32, -0.3], &dev).unwrap();
        let x0 = s
            .convert_model_output(&eps, &x, 2)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let out = s
            .step(&eps, 2, &x, &mut Noise::new(0))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(out, x0);
        assert!(s.step(&eps, 3, &x, &mut Noise::new(0)).is_err());
    }
}
