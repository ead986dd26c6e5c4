//! Noise-schedule arithmetic shared by the schedulers: training betas and
//! alphas_cumprod, timestep spacing helpers, sigma interpolation and Karras sigmas.
//!
//! diffusers builds the training schedule with float32 torch tensors and the inference
//! schedule with float64 numpy arrays that are cast to float32 at the end; the helpers
//! here repeat those roundings so that sigmas and timesteps match to the last bit or two.

use candle_core::Tensor;

use super::config::{BetaSchedule, SchedulerConfig};
use crate::Result;

/// `torch.linspace(start, end, steps, dtype=float32)` as PyTorch's CPU kernel computes
/// it: a float32 step, counting up from `start` for the first half and down from `end`
/// for the second.
pub(crate) fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    match steps {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (steps - 1) as f32;
            let halfway = steps / 2;
            (0..steps)
                .map(|i| {
                    if i < halfway {
                        start + step * i as f32
                    } else {
                        end - step * (steps - i - 1) as f32
                    }
                })
                .collect()
        }
    }
}

/// `numpy.linspace(start, stop, num)` (float64, endpoint included).
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (num - 1) as f64;
            let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
            y[num - 1] = stop;
            y
        }
    }
}

/// `numpy.arange(start, 0.0, -step)` for a positive float `step`, with numpy's length
/// rule and its fill rule (`start + i * delta`, `delta` taken from the first two values).
pub(crate) fn np_arange_down_to_zero(start: f64, step: f64) -> Vec<f64> {
    let len = ((0.0 - start) / -step).ceil().max(0.0) as usize;
    if len == 0 {
        return Vec::new();
    }
    let delta = (start - step) - start;
    (0..len)
        .map(|i| {
            if i == 0 {
                start
            } else {
                start + i as f64 * delta
            }
        })
        .collect()
}

/// The training betas as float32, as diffusers' `__init__` computes them.
pub(crate) fn betas(config: &SchedulerConfig) -> Vec<f32> {
    let n = config.num_train_timesteps;
    if let Some(trained) = &config.trained_betas {
        return trained.iter().map(|&b| b as f32).collect();
    }
    match config.beta_schedule {
        BetaSchedule::Linear => {
            torch_linspace_f32(config.beta_start as f32, config.beta_end as f32, n)
        }
        BetaSchedule::ScaledLinear => torch_linspace_f32(
            config.beta_start.sqrt() as f32,
            config.beta_end.sqrt() as f32,
            n,
        )
        .into_iter()
        .map(|b| b * b)
        .collect(),
        BetaSchedule::SquaredcosCapV2 => {
            let alpha_bar = |t: f64| {
                ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                    .cos()
                    .powi(2)
            };
            (0..n)
                .map(|i| {
                    let t1 = i as f64 / n as f64;
                    let t2 = (i + 1) as f64 / n as f64;
                    (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                })
                .collect()
        }
    }
}

/// Rescales betas to zero terminal SNR (Lin et al. 2023, Algorithm 1), in float32.
pub(crate) fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas_cumprod = cumprod(&betas.iter().map(|b| 1.0 - b).collect::<Vec<_>>());
    let sqrt_ac: Vec<f32> = alphas_cumprod.iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt_ac[0], sqrt_ac[sqrt_ac.len() - 1]);
    let scale = first / (first - last);
    let alphas_bar: Vec<f32> = sqrt_ac
        .iter()
        .map(|a| ((a - last) * scale).powi(2))
        .collect();
    let mut alphas = Vec::with_capacity(alphas_bar.len());
    alphas.push(alphas_bar[0]);
    alphas.extend(alphas_bar.windows(2).map(|w| w[1] / w[0]));
    alphas.into_iter().map(|a| 1.0 - a).collect()
}

/// `torch.cumprod` of a float32 tensor on the CPU: the running product is kept in
/// float64 (PyTorch's CPU accumulation type for float) and each output rounded to float32.
fn cumprod(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// The training alphas_cumprod (float32), including the zero-SNR rescale when configured.
pub(crate) fn alphas_cumprod(config: &SchedulerConfig) -> Vec<f32> {
    let mut betas = betas(config);
    if config.rescale_betas_zero_snr {
        betas = rescale_zero_terminal_snr(&betas);
    }
    cumprod(&betas.iter().map(|b| 1.0 - b).collect::<Vec<_>>())
}

/// Training sigmas `sqrt((1 - ᾱ) / ᾱ)` per training timestep, in float32 as diffusers computes them.
pub(crate) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// `numpy.interp(x, arange(len(fp)), fp)` in float64.
pub(crate) fn interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    let slope = fp[j + 1] as f64 - fp[j] as f64;
    slope * (x - j as f64) + fp[j] as f64
}

/// Karras et al. (2022) noise levels: `num` sigmas from `sigma_max` down to `sigma_min`,
/// evenly spaced in `sigma^(1/7)`.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, num: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / RHO);
    let max_inv_rho = sigma_max.powf(1.0 / RHO);
    np_linspace(0.0, 1.0, num)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(RHO))
        .collect()
}

/// The (fractional) training timestep whose sigma is `sigma`, by linear interpolation
/// in log-sigma (diffusers' `_sigma_to_t`). `log_sigmas` are float32 and increasing.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // Index of the last log-sigma not above `log_sigma` (0 if none), capped at n - 2.
    let low_idx = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx] as f64;
    let high = log_sigmas[high_idx] as f64;
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// Multiplies a tensor by a float32 scalar (`x * s` with float32 rounding for float32 tensors).
pub(crate) fn mul(x: &Tensor, s: f32) -> Result<Tensor> {
    Ok(x.affine(s as f64, 0.0)?)
}

/// Divides a tensor by a scalar with a true division (not a multiplication by the reciprocal),
/// as PyTorch does for `tensor / scalar_tensor`.
pub(crate) fn div(x: &Tensor, s: f32) -> Result<Tensor> {
    let s = Tensor::new(s, x.device())?.to_dtype(x.dtype())?;
    Ok(x.broadcast_div(&s)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn np_linspace_matches_numpy() {
        assert_eq!(
            np_linspace(0.0, 999.0, 7),
            vec![0.0, 166.5, 333.0, 499.5, 666.0, 832.5, 999.0]
        );
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        // numpy: np.linspace(0, 1, 3) -> [0, 0.5, 1]
        assert_eq!(np_linspace(0.0, 1.0, 3), vec![0.0, 0.5, 1.0]);
    }

    #[test]
    fn np_arange_down_matches_numpy() {
        // np.arange(1000, 0, -250.0) -> [1000, 750, 500, 250]
        assert_eq!(
            np_arange_down_to_zero(1000.0, 250.0),
            vec![1000.0, 750.0, 500.0, 250.0]
        );
        // np.arange(1000, 0, -1000/3) has 3 values: 1000, 666.67, 333.33
        let v = np_arange_down_to_zero(1000.0, 1000.0 / 3.0);
        assert_eq!(v.len(), 3);
        assert!((v[2] - 333.333_333_333_333_3).abs() < 1e-9);
    }

    #[test]
    fn torch_linspace_endpoints_exact() {
        let v = torch_linspace_f32(0.1, 0.2, 1000);
        assert_eq!(v.len(), 1000);
        assert_eq!(v[0], 0.1f32);
        assert_eq!(v[999], 0.2f32);
        assert!(v.windows(2).all(|w| w[1] > w[0]));
    }

    #[test]
    fn cosine_betas_are_capped_and_increasing() {
        let c = SchedulerConfig {
            beta_schedule: BetaSchedule::SquaredcosCapV2,
            ..SchedulerConfig::default()
        };
        let b = betas(&c);
        assert_eq!(b.len(), 1000);
        assert_eq!(*b.last().unwrap(), 0.999f32);
        assert!(b.windows(2).all(|w| w[1] >= w[0]));
        assert!(b[0] > 0.0 && b[0] < 1e-4, "first cosine beta {}", b[0]);
    }

    #[test]
    fn zero_snr_rescale_gives_zero_terminal_alpha() {
        let mut c = SchedulerConfig::sd_v1_5();
        let plain = alphas_cumprod(&c);
        c.rescale_betas_zero_snr = true;
        let ac = alphas_cumprod(&c);
        assert_eq!(*ac.last().unwrap(), 0.0);
        // The first alpha_cumprod is unchanged by construction.
        assert!((ac[0] - plain[0]).abs() < 1e-6);
    }

    #[test]
    fn sigma_to_t_inverts_interp() {
        let c = SchedulerConfig::sd_v1_5();
        let sig = train_sigmas(&alphas_cumprod(&c));
        let logs: Vec<f32> = sig.iter().map(|s| s.ln()).collect();
        for t in [0.0, 1.0, 250.0, 998.0, 999.0] {
            let s = sig[t as usize] as f64;
            assert!((sigma_to_t(s, &logs) - t).abs() < 1e-3, "t {t}");
        }
        // Halfway in log space between two training sigmas lands halfway between the timesteps.
        let mid = ((logs[500] as f64 + logs[501] as f64) / 2.0).exp();
        assert!((sigma_to_t(mid, &logs) - 500.5).abs() < 1e-6);
    }
}
