//! An exponential moving average of the weights, which is what gets shipped: it
//! smooths out the last steps' noise.

use std::collections::HashMap;

use candle_core::{Result, Tensor, Var};
use candle_nn::VarMap;

/// Shadow copies of every variable of a [`VarMap`].
pub struct Ema {
    decay: f64,
    shadow: Vec<(String, Var, Tensor)>,
}

impl Ema {
    /// Starts the average at the current weights.
    pub fn new(varmap: &VarMap, decay: f64) -> Result<Self> {
        let data = varmap.data().lock().map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        let mut shadow: Vec<_> = data.iter().map(|(n, v)| (n.clone(), v.clone(), v.as_tensor().detach())).collect();
        shadow.sort_by(|a, b| a.0.cmp(&b.0));
        for s in &mut shadow {
            s.2 = s.2.copy()?;
        }
        Ok(Self { decay, shadow })
    }

    /// The decay used after `step` updates: warms up as (1+step)/(10+step) so early
    /// random weights are forgotten quickly.
    pub fn decay_at(&self, step: u64) -> f64 {
        self.decay.min((1.0 + step as f64) / (10.0 + step as f64))
    }

    /// Folds the current weights in, after optimiser update number `step`.
    pub fn update(&mut self, step: u64) -> Result<()> {
        let d = self.decay_at(step);
        for (_, var, avg) in &mut self.shadow {
            *avg = ((&*avg * d)? + (var.as_tensor().detach() * (1.0 - d))?)?;
        }
        Ok(())
    }

    /// The averaged weights by variable name.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.shadow.iter().map(|(n, _, t)| (n.clone(), t.clone())).collect()
    }

    /// Restores averages saved by [`tensors`](Self::tensors).
    pub fn load(&mut self, saved: &HashMap<String, Tensor>) -> Result<()> {
        for (name, _, avg) in &mut self.shadow {
            let t = saved.get(name).ok_or_else(|| candle_core::Error::Msg(format!("EMA state lacks {name}")))?;
            if t.shape() != avg.shape() {
                candle_core::bail!("EMA state {name} has shape {:?}, expected {:?}", t.shape(), avg.shape());
            }
            *avg = t.clone();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn average_follows_the_weights_with_warmup() -> Result<()> {
        let vm = VarMap::new();
        vm.get(1, "w", candle_nn::Init::Const(0.0), DType::F32, &Device::Cpu)?;
        let mut ema = Ema::new(&vm, 0.9)?;
        vm.data().lock().unwrap()["w"].set(&Tensor::new(&[1f32], &Device::Cpu)?)?;
        ema.update(0)?; // decay 0.1
        let a = ema.tensors()["w"].to_vec1::<f32>()?[0];
        assert!((a - 0.9).abs() < 1e-6, "{a}");
        ema.update(100)?; // decay min(0.9, 101/110) = 0.9
        let a = ema.tensors()["w"].to_vec1::<f32>()?[0];
        assert!((a - 0.91).abs() < 1e-6, "{a}");
        Ok(())
    }
}
