//! Test helpers: the diffusers reference runs in `shared/fixtures/sd-tiny` and the
//! checks every scheduler must pass against them.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::Scheduler;
use crate::noise::Noise;

/// The fixture folder, relative to this crate (`server/engine` → `/work/shared/...`).
pub(crate) const FIXTURE_DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/fixtures/sd-tiny"
);

/// The `scheduler_config.json` every fixture run was built from (with `from_config`).
pub(crate) fn fixture_scheduler_config() -> String {
    format!("{FIXTURE_DIR}/pipeline/scheduler/scheduler_config.json")
}

/// Largest |a - b| over all elements.
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len(), "element counts differ");
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Largest |x| over all elements.
pub(crate) fn max_abs(a: &Tensor) -> f32 {
    a.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.abs())
        .fold(0.0, f32::max)
}

/// One `pipeline_*.safetensors` run: per-step latents and guided noise predictions.
pub(crate) struct Fixture {
    name: &'static str,
    tensors: HashMap<String, Tensor>,
}

impl Fixture {
    pub(crate) fn load(name: &'static str) -> Self {
        let path = format!("{FIXTURE_DIR}/{name}.safetensors");
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
            .unwrap_or_else(|e| panic!("cannot load fixture {path}: {e}"));
        Self { name, tensors }
    }

    fn get(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("{}: no tensor {key}", self.name))
    }

    fn per_step(&self, key: &str, i: usize) -> Tensor {
        self.get(key).get(i).unwrap()
    }

    pub(crate) fn steps(&self) -> usize {
        self.get("timesteps").dims1().unwrap()
    }

    /// Timesteps equal diffusers' within 1e-4.
    pub(crate) fn check_timesteps(&self, got: &[f64]) {
        let want = self.get("timesteps").to_vec1::<f32>().unwrap();
        assert_eq!(got.len(), want.len(), "{}: timestep count", self.name);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - *w as f64).abs() <= 1e-4,
                "{}: timestep {i}: {g} vs {w}",
                self.name
            );
        }
    }

    /// Sigmas equal diffusers' within 1e-5 relative (exactly, where diffusers' is 0).
    pub(crate) fn check_sigmas(&self, got: &[f32]) {
        let want = self.get("sigmas").to_vec1::<f32>().unwrap();
        assert_eq!(got.len(), want.len(), "{}: sigma count", self.name);
        let mut worst = 0.0f32;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let rel = if *w == 0.0 {
                g.abs()
            } else {
                (g - w).abs() / w.abs()
            };
            worst = worst.max(rel);
            assert!(rel <= 1e-5, "{}: sigma {i}: {g} vs {w}", self.name);
        }
        eprintln!("{}: sigmas max rel err {worst:e}", self.name);
    }

    /// `init_noise_sigma` equals diffusers' within 1e-5 relative.
    pub(crate) fn check_init_noise_sigma(&self, got: f64) {
        let want = self.get("init_noise_sigma").to_vec1::<f32>().unwrap()[0] as f64;
        assert!(
            (got - want).abs() <= 1e-5 * want.abs(),
            "{}: init_noise_sigma {got} vs {want}",
            self.name
        );
        // The pipeline starts from init_latents * init_noise_sigma.
        let start = (self.get("init_latents") * got).unwrap();
        let first = self.per_step("latents_before_step", 0);
        let rel = max_abs_diff(&start, &first) / max_abs(&first);
        assert!(
            rel <= 1e-6,
            "{}: init_latents * init_noise_sigma is off by {rel:e}",
            self.name
        );
    }

    /// `scale_model_input(latents_before_step[i])` equals both UNet batch rows within
    /// 1e-5 of the larger of 1 and the row's magnitude.
    pub(crate) fn check_scale_model_input(&self, s: &dyn Scheduler) {
        let mut worst = 0.0f32;
        for i in 0..self.steps() {
            let got = s
                .scale_model_input(&self.per_step("latents_before_step", i), i)
                .unwrap();
            let unet_input = self.per_step("unet_input_per_step", i);
            for row in 0..2 {
                let want = unet_input.narrow(0, row, 1).unwrap();
                let err = max_abs_diff(&got, &want);
                worst = worst.max(err);
                assert!(
                    err <= 1e-5 * max_abs(&want).max(1.0),
                    "{}: scale_model_input step {i} row {row}: {err}",
                    self.name
                );
            }
        }
        eprintln!("{}: scale_model_input max abs err {worst:e}", self.name);
    }

    /// Each step from diffusers' latents and noise prediction gives diffusers' next
    /// latents within 1e-4 of their magnitude. Steps run in order (multistep history).
    pub(crate) fn check_steps(&self, s: &mut dyn Scheduler) {
        let mut noise = Noise::new(0);
        let mut worst = 0.0f32;
        for i in 0..self.steps() {
            let before = self.per_step("latents_before_step", i);
            let eps = self.per_step("guided_noise_pred_per_step", i);
            let want = self.per_step("latents_after_step", i);
            let got = s.step(&eps, i, &before, &mut noise).unwrap();
            assert_eq!(got.dims(), want.dims());
            let rel = max_abs_diff(&got, &want) / max_abs(&want);
            worst = worst.max(rel);
            assert!(
                rel <= 1e-4,
                "{}: step {i}: error {rel:e} of max |x|",
                self.name
            );
        }
        eprintln!("{}: per-step max err / max|x| = {worst:e}", self.name);
    }

    /// The whole loop from the first latents with diffusers' noise predictions ends
    /// within 1e-3 of the final latents' magnitude.
    pub(crate) fn check_chain(&self, s: &mut dyn Scheduler) {
        let mut noise = Noise::new(0);
        let mut x = self.per_step("latents_before_step", 0);
        for i in 0..self.steps() {
            x = s
                .step(
                    &self.per_step("guided_noise_pred_per_step", i),
                    i,
                    &x,
                    &mut noise,
                )
                .unwrap();
        }
        let want = self.get("final_latents");
        let last = self.per_step("latents_after_step", self.steps() - 1);
        assert_eq!(
            max_abs_diff(want, &last),
            0.0,
            "{}: final_latents is the last step's output",
            self.name
        );
        let rel = max_abs_diff(&x, want) / max_abs(want);
        assert!(
            rel <= 1e-3,
            "{}: chained loop error {rel:e} of max |x|",
            self.name
        );
        eprintln!("{}: chained final max err / max|x| = {rel:e}", self.name);
    }
}
