//! Reproducible weight initialisation: Candle's initialisers draw from an unseeded
//! thread RNG, so a training run from the same seed would start from different
//! weights. [`seeded_var_builder`] creates each variable from an RNG seeded with the
//! run seed and the variable's name, following the same `Init` hints.

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::SeedableRng;
use rand_distr::Distribution;

struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

fn name_seed(seed: u64, name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64 ^ seed, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

fn values(shape: &Shape, init: Init, rng: &mut rand::rngs::StdRng) -> Vec<f32> {
    let n = shape.elem_count();
    let normal = |mean: f64, std: f64, rng: &mut rand::rngs::StdRng| -> Vec<f32> {
        let d = rand_distr::Normal::new(mean, std.max(0.0)).expect("finite normal");
        (0..n).map(|_| d.sample(rng) as f32).collect()
    };
    let uniform = |lo: f64, up: f64, rng: &mut rand::rngs::StdRng| -> Vec<f32> {
        let d = rand_distr::Uniform::new_inclusive(lo, up).expect("ordered bounds");
        (0..n).map(|_| d.sample(rng) as f32).collect()
    };
    match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Randn { mean, stdev } => normal(mean, stdev, rng),
        Init::Uniform { lo, up } => uniform(lo, up, rng),
        Init::Kaiming { dist, fan, non_linearity } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(-bound, bound, rng)
                }
                NormalOrUniform::Normal => normal(0.0, std, rng),
            }
        }
    }
}

impl candle_nn::var_builder::SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut data = self.varmap.data().lock().map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        if let Some(var) = data.get(name) {
            if var.shape() != &s {
                candle_core::bail!("variable {name} exists with shape {:?}, asked for {s:?}", var.shape());
            }
            return Ok(var.as_tensor().clone());
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(name_seed(self.seed, name));
        let t = Tensor::from_vec(values(&s, h, &mut rng), s, &Device::Cpu)?.to_dtype(dtype)?.to_device(dev)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        let data = self.varmap.data().lock().map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        data.get(name).map(|v| v.as_tensor().clone()).ok_or_else(|| candle_core::Error::Msg(format!("no variable {name}")))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().map(|d| d.contains_key(name)).unwrap_or(false)
    }
}

/// A `VarBuilder` that creates trainable variables in `varmap`, each initialised as its
/// hint asks but from an RNG seeded by `seed` and the variable's full name.
pub fn seeded_var_builder(varmap: &VarMap, seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    let backend: Box<dyn candle_nn::var_builder::SimpleBackend> = Box::new(SeededVarMap { varmap: varmap.clone(), seed });
    VarBuilder::from_backend(backend, dtype, device.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(seed: u64) -> candle_core::Result<(VarMap, Vec<f32>, Vec<f32>)> {
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, seed, DType::F32, &Device::Cpu);
        let lin = candle_nn::linear(256, 64, vb.pp("proj"))?;
        let w = lin.weight().flatten_all()?.to_vec1::<f32>()?;
        let b = lin.bias().expect("bias").to_vec1::<f32>()?;
        Ok((vm, w, b))
    }

    #[test]
    fn same_seed_same_weights_following_the_init_hints() -> candle_core::Result<()> {
        let (vm, a, bias) = build(3)?;
        let (_, b, _) = build(3)?;
        let (_, c, _) = build(4)?;
        assert_eq!(a, b);
        assert_ne!(a, c);
        // candle's linear: weight Kaiming normal (fan-in 256, ReLU gain √2), bias U(±1/√256).
        let std = (a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32).sqrt();
        let want = 2f32.sqrt() / 16.0;
        assert!((std - want).abs() < 0.05 * want, "std {std}, want {want}");
        assert!(bias.iter().all(|v| v.abs() <= 1.0 / 16.0) && bias.iter().any(|v| v.abs() > 1.0 / 32.0));
        assert_eq!(vm.all_vars().len(), 2);
        assert!(vm.all_vars().iter().all(|v| v.as_tensor().is_variable()));
        Ok(())
    }
}
