//! The denoising objective shared by the starter model and style adapters: SD's noise
//! schedule, noising a batch of latents at chosen timesteps, min-SNR loss weights, and
//! the weighted ε-prediction loss.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;

use crate::noise::Noise;
use crate::{Error, Result};

/// SD's cumulative ᾱ_t for the scaled-linear schedule (β from 0.00085 to 0.012, 1000 steps).
pub fn alphas_cumprod() -> Vec<f64> {
    let (b0, b1, n) = (0.00085f64.sqrt(), 0.012f64.sqrt(), 1000);
    let mut acc = 1.0;
    (0..n)
        .map(|i| {
            let b = b0 + (b1 - b0) * i as f64 / (n - 1) as f64;
            acc *= 1.0 - b * b;
            acc
        })
        .collect()
}

/// A batch ready for the UNet: x_t = √ᾱ·x₀ + √(1−ᾱ)·ε, the ε to predict, the timesteps
/// as a tensor and the per-sample loss weights.
pub struct NoisedBatch {
    pub xt: Tensor,
    pub eps: Tensor,
    pub timesteps: Tensor,
    pub weights: Tensor,
}

/// How a batch is noised and weighted.
#[derive(Debug, Clone, Copy)]
pub struct Objective {
    /// min-SNR-γ weighting (Hang et al. 2023): weight min(SNR, γ)/SNR; 0 turns it off.
    pub min_snr_gamma: f64,
    /// Adds this much per-channel constant noise (the "noise offset" trick); 0 turns it off.
    pub noise_offset: f64,
}

impl Objective {
    /// The weight of timestep `t` under min-SNR-γ.
    pub fn weight(&self, acp: &[f64], t: usize) -> f32 {
        let snr = acp[t] / (1.0 - acp[t]);
        if self.min_snr_gamma > 0.0 {
            (snr.min(self.min_snr_gamma) / snr) as f32
        } else {
            1.0
        }
    }

    /// Noises `x0` (batch first) at timesteps `ts`, drawing ε from `noise`.
    pub fn noise(&self, x0: &Tensor, ts: &[usize], acp: &[f64], noise: &mut Noise) -> Result<NoisedBatch> {
        let device = x0.device();
        let batch = ts.len();
        let mut eps = noise.randn(x0.dims(), device)?;
        if self.noise_offset > 0.0 {
            let (b, c, _, _) = x0.dims4()?;
            eps = eps.broadcast_add(&(noise.randn(&[b, c, 1, 1], device)? * self.noise_offset)?)?;
        }
        let col = |v: Vec<f32>| Tensor::from_vec(v, (batch, 1, 1, 1), device);
        let sa: Vec<f32> = ts.iter().map(|&t| acp[t].sqrt() as f32).collect();
        let sb: Vec<f32> = ts.iter().map(|&t| (1.0 - acp[t]).sqrt() as f32).collect();
        let xt = (x0.broadcast_mul(&col(sa)?)? + eps.broadcast_mul(&col(sb)?)?)?;
        let weights = ts.iter().map(|&t| self.weight(acp, t)).collect::<Vec<_>>();
        Ok(NoisedBatch {
            xt,
            eps,
            timesteps: timesteps_tensor(ts, device)?,
            weights: Tensor::from_vec(weights, batch, device)?,
        })
    }
}

/// Timesteps as the f32 vector the UNet takes.
pub fn timesteps_tensor(ts: &[usize], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(ts.iter().map(|&t| t as f32).collect::<Vec<_>>(), ts.len(), device)?)
}

/// The mean over the batch of weight × per-sample MSE between prediction and ε.
pub fn weighted_loss(pred: &Tensor, batch: &NoisedBatch) -> Result<Tensor> {
    let per_sample = (pred.to_dtype(DType::F32)? - &batch.eps)?.sqr()?.flatten_from(1)?.mean(D::Minus1)?;
    Ok((per_sample * &batch.weights)?.mean_all()?)
}

/// A detached copy of every variable, for checkpoints.
pub fn detached(varmap: &VarMap) -> Result<HashMap<String, Tensor>> {
    let data = varmap.data().lock().map_err(|_| Error::Metadata("VarMap lock poisoned".into()))?;
    data.iter().map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().copy()?))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_sd() {
        let a = alphas_cumprod();
        assert_eq!(a.len(), 1000);
        assert!((a[0] - (1.0 - 0.00085)).abs() < 1e-12);
        // diffusers' DDPMScheduler(scaled_linear).alphas_cumprod[-1] for SD.
        assert!((a[999] - 0.0046600).abs() < 2e-6, "{}", a[999]);
    }

    #[test]
    fn noising_and_weights_follow_the_formulas() {
        let acp = alphas_cumprod();
        let dev = Device::Cpu;
        let x0 = Tensor::ones((2, 1, 2, 2), DType::F32, &dev).unwrap();
        let obj = Objective { min_snr_gamma: 5.0, noise_offset: 0.0 };
        let b = obj.noise(&x0, &[10, 900], &acp, &mut Noise::new(3)).unwrap();
        let xt = b.xt.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let eps = b.eps.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, t) in [(0usize, 10usize), (4, 900)] {
            let want = acp[t].sqrt() as f32 + (1.0 - acp[t]).sqrt() as f32 * eps[i];
            assert!((xt[i] - want).abs() < 1e-6);
        }
        // High SNR (t = 10) is capped to γ/SNR, low SNR (t = 900) keeps weight 1.
        let w = b.weights.to_vec1::<f32>().unwrap();
        let snr10 = acp[10] / (1.0 - acp[10]);
        assert!((w[0] as f64 - 5.0 / snr10).abs() < 1e-6);
        assert_eq!(w[1], 1.0);
        assert_eq!(Objective { min_snr_gamma: 0.0, noise_offset: 0.0 }.weight(&acp, 10), 1.0);
        // Loss of a perfect prediction is zero; of a zero prediction, the weighted ε².
        assert_eq!(weighted_loss(&b.eps, &b).unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let zero = b.eps.zeros_like().unwrap();
        let l = weighted_loss(&zero, &b).unwrap().to_scalar::<f32>().unwrap();
        let want = (w[0] * eps[..4].iter().map(|e| e * e).sum::<f32>() / 4.0 + w[1] * eps[4..].iter().map(|e| e * e).sum::<f32>() / 4.0) / 2.0;
        assert!((l - want).abs() < 1e-5, "{l} vs {want}");
    }
}
