//! Baking a blend of adapters into one file, or into the model's weights.
//!
//! For a layer W with adapters i (weight wᵢ, block multiplier bᵢ, file scale sᵢ = alpha/r),
//! the blend adds ΔW = Σᵢ cᵢ·upᵢ·downᵢ with cᵢ = wᵢ·bᵢ·sᵢ. A LoHa or LoKr module enters as
//! its ΔWᵢ [out, n] written exactly as a pair of rank min(out, n) (ΔWᵢ with the identity on
//! the shorter side). Three ways to keep it:
//!
//! - **exact**: one LoRA whose rank is Σ rᵢ: `down` is the downᵢ stacked, `up` the cᵢ·upᵢ side
//!   by side, alpha = rank (scale 1). Each cᵢ is applied on one side only, so nothing is
//!   squared, and the file reproduces the runtime blend to rounding.
//! - **compressed** to rank R: the best rank-R approximation of ΔW (truncated SVD, computed
//!   from thin QR factors of the stacked matrices, so never forming the full ΔW), with the
//!   relative Frobenius error ‖ΔW − ΔW_R‖/‖ΔW‖ = √(Σ_{k>R} σₖ²/Σ σₖ²) reported per layer and
//!   over the whole adapter.
//! - **merged**: W + ΔW written into a copy of the model folder (diffusers layout).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::layers::{DeltaWeights, SlotShape};
use crate::lora::{ActiveLora, Component, ModelSlots};
use crate::model::{load_safetensors, save_safetensors_atomic, save_safetensors_with_metadata_atomic};
use crate::{Error, Result};

/// One layer of a baked adapter: where it goes, and its (down, up) pair with scale 1.
#[derive(Debug, Clone)]
pub struct BakedModule {
    pub component: Component,
    /// The layer's diffusers name (`down_blocks.0.attentions.0…to_q`).
    pub name: String,
    pub down: Tensor,
    pub up: Tensor,
}

/// A baked adapter and, for a compressed one, how much of the blend it lost.
#[derive(Debug, Clone)]
pub struct Baked {
    pub modules: Vec<BakedModule>,
    /// ‖ΔW − ΔW_R‖_F / ‖ΔW‖_F over all layers together (0 for an exact bake).
    pub relative_error: f64,
    /// The largest per-layer relative error.
    pub worst_layer_error: f64,
}

/// The stacked factors of every layer the active adapters touch: (slot, down [k, in·kk], up [out, k]) in f32 on the CPU,
/// with each adapter's coefficient folded into its `up` columns.
fn stacked(active: &[ActiveLora]) -> Result<BTreeMap<usize, (Tensor, Tensor)>> {
    let mut parts: BTreeMap<usize, (Vec<Tensor>, Vec<Tensor>)> = BTreeMap::new();
    for a in active {
        for m in &a.lora.modules {
            let c = atelier_blend::weights::effective_scale(a.weight, &a.blocks, m.block) * m.scale;
            if c == 0.0 {
                continue;
            }
            let (down, up) = match &m.delta {
                DeltaWeights::LowRank { down, up } => {
                    let r = down.dims()[0];
                    let down = down.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.reshape((r, ()))?;
                    let up = up.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                    (down, (up.reshape((up.dims()[0], r))? * c)?)
                }
                // LoHa/LoKr: ΔW [out, n] exactly as a rank-min(out, n) pair, the identity on
                // the shorter side.
                other => {
                    let delta = (other.map(|t| t.to_device(&Device::Cpu)?.to_dtype(DType::F32))?.matrix()? * c)?;
                    let (out, n) = delta.dims2()?;
                    if out <= n {
                        (delta, Tensor::eye(out, DType::F32, &Device::Cpu)?)
                    } else {
                        (Tensor::eye(n, DType::F32, &Device::Cpu)?, delta)
                    }
                }
            };
            let e = parts.entry(m.slot()).or_default();
            e.0.push(down);
            e.1.push(up);
        }
    }
    parts.into_iter().map(|(slot, (d, u))| Ok((slot, (Tensor::cat(&d, 0)?, Tensor::cat(&u, 1)?)))).collect()
}

/// Back to the layer's own shapes: conv down [k, in, kh, kw], up [out, k, 1, 1].
fn shaped(shape: &SlotShape, down: Tensor, up: Tensor) -> Result<(Tensor, Tensor)> {
    Ok(match *shape {
        SlotShape::Linear { .. } => (down, up),
        SlotShape::Conv { in_c, kernel, .. } => {
            let k = down.dims()[0];
            let out = up.dims()[0];
            (down.reshape((k, in_c, kernel, kernel))?, up.reshape((out, k, 1, 1))?)
        }
    })
}

/// Bakes the blend exactly (rank = sum of the adapters' ranks on each layer).
pub fn bake_exact(active: &[ActiveLora], slots: &ModelSlots) -> Result<Baked> {
    bake(active, slots, None, &mut |_, _| true)
}

/// Bakes the blend into one adapter of at most `rank` per layer (layers whose blend has a
/// lower rank keep it exactly).
pub fn bake_compressed(active: &[ActiveLora], slots: &ModelSlots, rank: usize) -> Result<Baked> {
    bake(active, slots, Some(rank), &mut |_, _| true)
}

/// Bakes exactly (`rank` `None`) or compressed to `rank`, calling `progress(done, total)`
/// before each of the `total` layers and once at the end; returning `false` stops with
/// [`Error::Cancelled`].
pub fn bake(active: &[ActiveLora], slots: &ModelSlots, rank: Option<usize>, progress: &mut dyn FnMut(usize, usize) -> bool) -> Result<Baked> {
    if rank == Some(0) {
        return Err(Error::invalid("rank", "must be at least 1"));
    }
    let layers = stacked(active)?;
    let count = layers.len();
    let (mut lost, mut total, mut worst) = (0.0f64, 0.0f64, 0.0f64);
    let mut modules = Vec::with_capacity(count);
    for (i, (slot, (down, up))) in layers.into_iter().enumerate() {
        if !progress(i, count) {
            return Err(Error::Cancelled);
        }
        let (component, info) = slots.get(slot).ok_or_else(|| Error::invalid("blend", "an adapter points at a layer the model lacks"))?;
        let (down, up) = match rank {
            None => (down, up),
            Some(rank) => {
                let c = compress_layer(&down, &up, rank)?;
                total += c.total;
                lost += c.lost;
                if c.total > 0.0 {
                    worst = worst.max((c.lost / c.total).sqrt());
                }
                (c.down, c.up)
            }
        };
        let (down, up) = shaped(&info.shape, down, up)?;
        modules.push(BakedModule { component, name: info.name.clone(), down, up });
    }
    if !progress(count, count) {
        return Err(Error::Cancelled);
    }
    let relative_error = if total > 0.0 { (lost / total).sqrt() } else { 0.0 };
    Ok(Baked { modules, relative_error, worst_layer_error: worst })
}

fn to_matrix(t: &Tensor) -> Result<nalgebra::DMatrix<f64>> {
    let (r, c) = t.dims2()?;
    let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
    Ok(nalgebra::DMatrix::from_row_iterator(r, c, v.into_iter().map(f64::from)))
}

fn from_matrix(m: &nalgebra::DMatrix<f64>) -> Result<Tensor> {
    let data: Vec<f32> = (0..m.nrows()).flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)] as f32)).collect();
    Ok(Tensor::from_vec(data, (m.nrows(), m.ncols()), &Device::Cpu)?)
}

/// One layer compressed: its new factors and the squared singular values it had and lost.
struct Compressed {
    down: Tensor,
    up: Tensor,
    total: f64,
    lost: f64,
}

/// The best rank-`rank` approximation of ΔW = up·down (down [k, in], up [out, k]).
fn compress_layer(down: &Tensor, up: &Tensor, rank: usize) -> Result<Compressed> {
    // ΔW = U·D with U [out, k], D [k, in]. U = Qu·Ru, Dᵀ = Qd·Rd, so ΔW = Qu·(Ru·Rdᵀ)·Qdᵀ
    // and the SVD of the small k×k middle gives that of ΔW.
    let u = to_matrix(up)?;
    let d = to_matrix(down)?;
    let qr_u = u.qr();
    let qr_d = d.transpose().qr();
    let middle = qr_u.r() * qr_d.r().transpose();
    let svd = middle.svd(true, true);
    let (a, b) = (svd.u.as_ref().expect("asked for U"), svd.v_t.as_ref().expect("asked for Vᵀ"));
    // nalgebra does not sort singular values.
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&i, &j| svd.singular_values[j].total_cmp(&svd.singular_values[i]));
    let keep = rank.min(order.len());
    let s2: Vec<f64> = order.iter().map(|&i| svd.singular_values[i].powi(2)).collect();
    let qu = qr_u.q();
    let qd = qr_d.q();
    let mut new_up = nalgebra::DMatrix::<f64>::zeros(qu.nrows(), keep);
    let mut new_down = nalgebra::DMatrix::<f64>::zeros(keep, qd.nrows());
    for (col, &i) in order[..keep].iter().enumerate() {
        let left = &qu * a.column(i) * svd.singular_values[i];
        let right = &qd * b.row(i).transpose();
        new_up.set_column(col, &left);
        new_down.set_row(col, &right.transpose());
    }
    Ok(Compressed { down: from_matrix(&new_down)?, up: from_matrix(&new_up)?, total: s2.iter().sum(), lost: s2[keep..].iter().sum() })
}

/// Writes `baked` as a kohya LoRA file (`lora_unet_…`/`lora_te_…`, alpha = rank so the
/// scale is 1), with `metadata` added to kohya's own keys.
pub fn save_kohya(baked: &Baked, metadata: &HashMap<String, String>, path: &Path) -> Result<()> {
    let mut tensors = HashMap::new();
    let mut max_rank = 0;
    for m in &baked.modules {
        let stem = format!("{}_{}", m.component.kohya_prefix(), m.name.replace('.', "_"));
        let r = m.down.dims()[0];
        max_rank = max_rank.max(r);
        tensors.insert(format!("{stem}.lora_down.weight"), m.down.clone());
        tensors.insert(format!("{stem}.lora_up.weight"), m.up.clone());
        tensors.insert(format!("{stem}.alpha"), Tensor::new(r as f32, &Device::Cpu)?);
    }
    let mut md: HashMap<String, String> = HashMap::from([
        ("format".into(), "pt".into()),
        ("ss_network_module".into(), "networks.lora".into()),
        ("ss_network_dim".into(), max_rank.to_string()),
        ("ss_network_alpha".into(), max_rank.to_string()),
        ("atelier_bake_relative_error".into(), baked.relative_error.to_string()),
    ]);
    md.extend(metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
    save_safetensors_with_metadata_atomic(&tensors, &md, path)
}

/// Merges the adapters of `active` that touch `component` into its weights (diffusers keys,
/// as loaded from `source`): `W ← W + Σ up·down·scale`, computed in fp32 and stored back in
/// the weight's own dtype. Returns how many tensors changed.
///
/// # Errors
/// When an adapter points at a layer the weights lack (naming the key and `source`).
pub fn merge_into(active: &[ActiveLora], slots: &ModelSlots, component: Component, weights: &mut HashMap<String, Tensor>, source: &Path) -> Result<usize> {
    let deltas = stacked(active)?;
    let mut changed = 0;
    for (slot, (down, up)) in &deltas {
        let (c, info) = slots.get(*slot).ok_or_else(|| Error::invalid("blend", "an adapter points at a layer the model lacks"))?;
        if c != component {
            continue;
        }
        let key = format!("{}.weight", info.name);
        let w = weights.get(&key).ok_or_else(|| Error::invalid("model", format!("{} has no tensor {key}", source.display())))?;
        let delta = up.matmul(down)?.reshape(w.dims())?;
        let merged = (w.to_dtype(DType::F32)? + delta)?.to_dtype(w.dtype())?;
        weights.insert(key, merged);
        changed += 1;
    }
    Ok(changed)
}

/// Writes a copy of the diffusers folder `model_dir` into `out` with the blend merged into
/// the UNet and text-encoder weights (W + ΔW, in the weights' own dtype).
pub fn save_merged(active: &[ActiveLora], slots: &ModelSlots, model_dir: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        return Err(Error::invalid("out", format!("{} already exists; choose a new folder", out.display())));
    }
    let tmp = out.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    copy_dir(model_dir, &tmp)?;
    let files = [(Component::Unet, "unet/diffusion_pytorch_model.safetensors"), (Component::TextEncoder, "text_encoder/model.safetensors")];
    for (component, file) in files {
        let path = tmp.join(file);
        let mut weights = load_safetensors(&model_dir.join(file), &Device::Cpu)?;
        if merge_into(active, slots, component, &mut weights, &model_dir.join(file))? > 0 {
            save_safetensors_atomic(&weights, &path)?;
        }
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let entry = entry.map_err(|e| Error::io(from, e))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if src.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
        }
    }
    Ok(())
}
