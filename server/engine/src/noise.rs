//! Seeded Gaussian noise: the same seed gives the same latents on every machine.

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use crate::Result;

/// A deterministic source of standard-normal noise (ChaCha-based `StdRng`).
pub struct Noise {
    rng: rand::rngs::StdRng,
}

impl Noise {
    /// A noise source seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { rng: rand::rngs::StdRng::seed_from_u64(seed) }
    }

    /// A float32 tensor of the given shape filled with N(0, 1) samples, generated on the
    /// CPU (so results do not depend on the device's RNG) and moved to `device`.
    pub fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut self.rng)).collect();
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?.to_device(device)?)
    }
}
