//! DDIM (Song et al. 2020) with eta = 0, matching diffusers' `DDIMScheduler`.

use candle_core::{DType, Tensor};

use super::config::{SchedulerConfig, TimestepSpacing};
use super::schedule::{self, mul};
use super::{PredictionType, Scheduler};
use crate::noise::Noise;
use crate::{Error, Result};

/// Deterministic DDIM sampler (eta = 0).
#[derive(Debug, Clone)]
pub struct Ddim {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<f64>,
    /// Integer training timesteps, as diffusers stores them (int64).
    train_timesteps: Vec<usize>,
    /// diffusers steps back by `num_train_timesteps / steps` whatever the spacing.
    step_ratio: usize,
    prediction_type: PredictionType,
    clip_range: Option<f32>,
}

impl Ddim {
    /// A DDIM sampler for `num_inference_steps` steps.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        config.validate()?;
        let n = config.num_train_timesteps;
        if num_inference_steps == 0 || num_inference_steps > n {
            return Err(Error::invalid(
                "steps",
                format!("DDIM needs between 1 and {n} steps, got {num_inference_steps}"),
            ));
        }
        let alphas_cumprod = schedule::alphas_cumprod(config);
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Leading);
        let train_timesteps = ddim_timesteps(spacing, n, num_inference_steps, config.steps_offset)?;
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: train_timesteps.iter().map(|&t| t as f64).collect(),
            train_timesteps,
            step_ratio: n / num_inference_steps,
            prediction_type: config.prediction_type,
            clip_range: config
                .clip_sample
                .then_some(config.clip_sample_range as f32),
        })
    }

    fn timestep(&self, i: usize) -> Result<usize> {
        self.train_timesteps.get(i).copied().ok_or_else(|| {
            Error::invalid(
                "step",
                format!(
                    "step index {i} is past the {} steps of this run",
                    self.train_timesteps.len()
                ),
            )
        })
    }
}

/// diffusers' `DDIMScheduler.set_timesteps`: integer timesteps in visiting order.
fn ddim_timesteps(
    spacing: TimestepSpacing,
    n: usize,
    steps: usize,
    offset: usize,
) -> Result<Vec<usize>> {
    let raw: Vec<i64> = match spacing {
        TimestepSpacing::Linspace => schedule::np_linspace(0.0, (n - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(|t| t.round_ties_even() as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = n / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + offset) as i64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            schedule::np_arange_down_to_zero(n as f64, n as f64 / steps as f64)
                .into_iter()
                .map(|t| t.round_ties_even() as i64 - 1)
                .collect()
        }
    };
    raw.into_iter()
        .map(|t| {
            usize::try_from(t).ok().filter(|&t| t < n).ok_or_else(|| {
                Error::invalid(
                    "steps",
                    format!("timestep {t} falls outside the training range 0..{n}"),
                )
            })
        })
        .collect()
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _i: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        _noise: &mut Noise,
    ) -> Result<Tensor> {
        let t = self.timestep(i)?;
        let dtype = sample.dtype();
        let sample = sample.to_dtype(DType::F32)?;
        let model_output = model_output.to_dtype(DType::F32)?;
        let alpha_prod_t = self.alphas_cumprod[t];
        let alpha_prod_t_prev = match t.checked_sub(self.step_ratio) {
            Some(prev) => self.alphas_cumprod[prev],
            None => self.final_alpha_cumprod,
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let (sqrt_a, sqrt_b) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());

        let (pred_original, pred_epsilon) = match self.prediction_type {
            PredictionType::Epsilon => {
                let x0 = schedule::div(&(&sample - mul(&model_output, sqrt_b)?)?, sqrt_a)?;
                (x0, model_output)
            }
            PredictionType::Sample => {
                let eps = schedule::div(&(&sample - mul(&model_output, sqrt_a)?)?, sqrt_b)?;
                (model_output, eps)
            }
            PredictionType::VPrediction => {
                let x0 = (mul(&sample, sqrt_a)? - mul(&model_output, sqrt_b)?)?;
                let eps = (mul(&model_output, sqrt_a)? + mul(&sample, sqrt_b)?)?;
                (x0, eps)
            }
        };
        let pred_original = match self.clip_range {
            Some(r) => pred_original.clamp(-r, r)?,
            None => pred_original,
        };
        let direction = mul(&pred_epsilon, (1.0 - alpha_prod_t_prev).sqrt())?;
        let prev = (mul(&pred_original, alpha_prod_t_prev.sqrt())? + direction)?;
        Ok(prev.to_dtype(dtype)?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        let alpha_prod = self.alphas_cumprod[self.timestep(i)?];
        let dtype = original.dtype();
        let x0 = original.to_dtype(DType::F32)?;
        let noise = noise.to_dtype(DType::F32)?;
        let noisy = (mul(&x0, alpha_prod.sqrt())? + mul(&noise, (1.0 - alpha_prod).sqrt())?)?;
        Ok(noisy.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::test_util::{self, Fixture};

    #[test]
    fn matches_diffusers_fixture() {
        let fx = Fixture::load("pipeline_ddim");
        let config = SchedulerConfig::load(test_util::fixture_scheduler_config()).unwrap();
        let mut s = Ddim::new(&config, fx.steps()).unwrap();
        fx.check_timesteps(s.timesteps());
        fx.check_init_noise_sigma(s.init_noise_sigma());
        fx.check_scale_model_input(&s);
        fx.check_steps(&mut s);
        let mut s = Ddim::new(&config, fx.steps()).unwrap();
        fx.check_chain(&mut s);
    }

    #[test]
    fn spacings_match_diffusers() {
        // DDIMScheduler(steps_offset=1).set_timesteps(10) with each spacing.
        let lead = ddim_timesteps(TimestepSpacing::Leading, 1000, 10, 1).unwrap();
        assert_eq!(lead, vec![901, 801, 701, 601, 501, 401, 301, 201, 101, 1]);
        let lin = ddim_timesteps(TimestepSpacing::Linspace, 1000, 10, 1).unwrap();
        assert_eq!(lin, vec![999, 888, 777, 666, 555, 444, 333, 222, 111, 0]);
        // trailing: round(arange(1000, 0, -1000/3)) - 1 = [999, 666, 332]
        let trail = ddim_timesteps(TimestepSpacing::Trailing, 1000, 3, 1).unwrap();
        assert_eq!(trail, vec![999, 666, 332]);
    }

    #[test]
    fn v_prediction_step_by_hand() {
        // One training step of a 4-step schedule with hand-picked alphas:
        // alpha_cumprod[t] = 0.25, alpha_cumprod[prev] = 0.64.
        let mut config = SchedulerConfig::sd_v1_5();
        config.num_train_timesteps = 4;
        config.prediction_type = PredictionType::VPrediction;
        config.trained_betas = Some(vec![0.2, 0.0, 0.0, 1.0 - 0.25 / 0.8]);
        config.timestep_spacing = Some(TimestepSpacing::Trailing);
        config.steps_offset = 0;
        let mut s = Ddim::new(&config, 4).unwrap();
        assert_eq!(s.timesteps(), &[3.0, 2.0, 1.0, 0.0]);
        // ᾱ = [0.8, 0.8, 0.8, 0.25]; step 0 goes from t=3 (ᾱ=0.25) to t=2 (ᾱ=0.8).
        let x = Tensor::new(&[2.0f32, -1.0], &candle_core::Device::Cpu).unwrap();
        let v = Tensor::new(&[0.5f32, 1.0], &candle_core::Device::Cpu).unwrap();
        let out = s
            .step(&v, 0, &x, &mut Noise::new(0))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // x0 = 0.5 x - sqrt(0.75) v; eps = 0.5 v + sqrt(0.75) x; prev = sqrt(0.8) x0 + sqrt(0.2) eps
        let (a, b) = (0.5f64, 0.75f64.sqrt());
        for (k, (&xv, &vv)) in [2.0f64, -1.0].iter().zip(&[0.5f64, 1.0]).enumerate() {
            let x0 = a * xv - b * vv;
            let eps = a * vv + b * xv;
            let expected = 0.8f64.sqrt() * x0 + 0.2f64.sqrt() * eps;
            assert!(
                (out[k] as f64 - expected).abs() < 1e-5,
                "{k}: {} vs {expected}",
                out[k]
            );
        }
    }

    #[test]
    fn add_noise_uses_alpha_cumprod_of_the_step() {
        let config = SchedulerConfig::sd_v1_5();
        let s = Ddim::new(&config, 8).unwrap();
        let ac = schedule::alphas_cumprod(&config);
        let dev = candle_core::Device::Cpu;
        let x0 = Tensor::new(&[1.0f32, -2.0], &dev).unwrap();
        let eps = Tensor::new(&[0.5f32, 0.25], &dev).unwrap();
        let out = s.add_noise(&x0, &eps, 2).unwrap().to_vec1::<f32>().unwrap();
        let a = ac[626] as f64; // leading, steps_offset 1: timesteps 876, 751, 626, ...
        assert_eq!(s.timesteps()[2], 626.0);
        assert!((out[0] as f64 - (a.sqrt() * 1.0 + (1.0 - a).sqrt() * 0.5)).abs() < 1e-6);
        assert!((out[1] as f64 - (a.sqrt() * -2.0 + (1.0 - a).sqrt() * 0.25)).abs() < 1e-6);
        assert!(s.add_noise(&x0, &eps, 8).is_err());
    }
}
