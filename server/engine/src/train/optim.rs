//! AdamW with linear warm-up, cosine decay and global-norm gradient clipping, with
//! state that can be saved and restored exactly (for resuming a killed run).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

/// Optimiser hyper-parameters; saved with every training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    /// Peak learning rate, reached after `warmup_steps`.
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices and kernels (not to biases, norms or embeddings).
    pub weight_decay: f64,
    pub warmup_steps: u64,
    /// The step where the cosine decay reaches `final_lr_fraction · lr`.
    pub total_steps: u64,
    pub final_lr_fraction: f64,
    /// Gradients are rescaled so that their global L2 norm is at most this (0 disables).
    pub grad_clip: f64,
}

impl OptimConfig {
    /// A common starting point: β = (0.9, 0.999), ε = 1e-8, weight decay 0.01, clip 1.0.
    pub fn new(lr: f64, warmup_steps: u64, total_steps: u64) -> Self {
        Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            warmup_steps,
            total_steps,
            final_lr_fraction: 0.1,
            grad_clip: 1.0,
        }
    }

    /// The learning rate used for update number `step` (1-based): linear warm-up from
    /// `lr / warmup_steps`, then cosine decay to `final_lr_fraction · lr`.
    pub fn learning_rate(&self, step: u64) -> f64 {
        if self.warmup_steps > 0 && step <= self.warmup_steps {
            return self.lr * step as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps.min(step)) as f64 / span).min(1.0);
        let floor = self.lr * self.final_lr_fraction;
        floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// What one optimiser step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// The learning rate of this update.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

struct Param {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// AdamW over every variable of a [`VarMap`], in name order.
pub struct AdamW {
    config: OptimConfig,
    params: Vec<Param>,
    step: u64,
}

fn decays(name: &str, rank: usize) -> bool {
    rank >= 2 && !name.contains("embedding") && !name.contains("norm")
}

impl AdamW {
    pub fn new(varmap: &VarMap, config: OptimConfig) -> Result<Self> {
        let data = varmap.data().lock().map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let mut params = Vec::with_capacity(names.len());
        for name in names {
            let var = data[name].clone();
            let zeros = var.as_tensor().zeros_like()?;
            params.push(Param { name: name.clone(), decay: decays(name, var.rank()), var, m: zeros.clone(), v: zeros });
        }
        Ok(Self { config, params, step: 0 })
    }

    pub fn config(&self) -> &OptimConfig {
        &self.config
    }

    /// Updates done so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Clips the gradients by global norm and applies one AdamW update.
    pub fn step(&mut self, grads: &GradStore) -> Result<StepStats> {
        let mut sq = 0f64;
        for p in &self.params {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        let grad_norm = sq.sqrt();
        if !grad_norm.is_finite() {
            candle_core::bail!("gradient norm is {grad_norm}: training diverged (lower the learning rate)");
        }
        let c = &self.config;
        let clip = if c.grad_clip > 0.0 && grad_norm > c.grad_clip { c.grad_clip / grad_norm } else { 1.0 };
        self.step += 1;
        let lr = c.learning_rate(self.step);
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for p in &mut self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else { continue };
            let g = (g * clip)?;
            p.m = ((&p.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            p.v = ((&p.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&p.m / bc1)? / ((&p.v / bc2)?.sqrt()? + c.eps)?)?;
            let mut theta = p.var.as_tensor().detach();
            if p.decay && c.weight_decay > 0.0 {
                theta = (theta * (1.0 - lr * c.weight_decay))?;
            }
            p.var.set(&(theta - (update * lr)?)?)?;
        }
        Ok(StepStats { lr, grad_norm })
    }

    /// The moment estimates, named `m.{var}` and `v.{var}`.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::with_capacity(self.params.len() * 2);
        for p in &self.params {
            out.insert(format!("m.{}", p.name), p.m.clone());
            out.insert(format!("v.{}", p.name), p.v.clone());
        }
        out
    }

    /// Restores moments saved by [`state`](Self::state) and the update count.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for p in &mut self.params {
            for (prefix, slot) in [("m", &mut p.m), ("v", &mut p.v)] {
                let key = format!("{prefix}.{}", p.name);
                let t = state.get(&key).ok_or_else(|| candle_core::Error::Msg(format!("optimiser state lacks {key}")))?;
                if t.shape() != slot.shape() {
                    candle_core::bail!("optimiser state {key} has shape {:?}, expected {:?}", t.shape(), slot.shape());
                }
                *slot = t.clone();
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let c = OptimConfig::new(1e-3, 10, 110);
        assert!((c.learning_rate(1) - 1e-4).abs() < 1e-12);
        assert!((c.learning_rate(10) - 1e-3).abs() < 1e-12);
        assert!((c.learning_rate(60) - 0.55e-3).abs() < 1e-9);
        assert!((c.learning_rate(110) - 1e-4).abs() < 1e-12);
        assert!((c.learning_rate(500) - 1e-4).abs() < 1e-12);
    }

    #[test]
    fn first_update_matches_adamw_by_hand() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let w = vm.get((1, 2), "w", candle_nn::Init::Const(1.0), DType::F32, &dev)?;
        let mut c = OptimConfig::new(0.1, 0, 1);
        c.final_lr_fraction = 1.0;
        c.grad_clip = 0.0;
        let mut opt = AdamW::new(&vm, c)?;
        let x = Tensor::new(&[[2f32], [-1.]], &dev)?;
        let loss = w.matmul(&x)?.sum_all()?; // d/dw = [2, -1]
        let stats = opt.step(&loss.backward()?)?;
        assert!((stats.grad_norm - 5f64.sqrt()).abs() < 1e-6);
        // m̂/√v̂ = sign(g) on the first step; decay 0.01·0.1 shrinks w first.
        let got = w.flatten_all()?.to_vec1::<f32>()?;
        let shrink = 1.0 - 0.1 * 0.01;
        assert!((got[0] - (shrink - 0.1) as f32).abs() < 1e-6, "{got:?}");
        assert!((got[1] - (shrink + 0.1) as f32).abs() < 1e-6, "{got:?}");
        Ok(())
    }

    #[test]
    fn clipping_bounds_the_update_direction_not_adam_scale() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let w = vm.get(3, "w", candle_nn::Init::Const(0.0), DType::F32, &dev)?;
        let mut opt = AdamW::new(&vm, OptimConfig::new(0.01, 0, 10))?;
        let loss = (w.as_ref() * Tensor::new(&[300f32, 400., 0.], &dev)?)?.sum_all()?;
        let stats = opt.step(&loss.backward()?)?;
        assert!((stats.grad_norm - 500.0).abs() < 1e-3);
        let state = opt.state();
        let m = state["m.w"].to_vec1::<f32>()?;
        // Clipped gradient (0.6, 0.8, 0) times (1 - β1).
        assert!((m[0] - 0.06).abs() < 1e-6 && (m[1] - 0.08).abs() < 1e-6 && m[2] == 0.0, "{m:?}");
        Ok(())
    }
}
