//! The text encoder (transformers' `CLIPTextModel`, as [`crate::clip`] runs it) as a MIL
//! function with the I/O Apple's Swift package reads (`TextEncoder.swift`; facts in
//! `shared/notes/coreml-export.md`):
//! - input `input_ids`: `(1, 77)` **float32** token ids (float because of coremltools issue
//!   1423; cast to int32 inside);
//! - output `last_hidden_state`: `(1, 77, C)` float32, after the final layer norm — SD's
//!   `encoder_hidden_states` before the UNet's `(B, C, 1, 77)` transpose, which the Swift
//!   pipeline does.
//!
//! Activations stay `(B, S, C)`; attention is the plain causal scaled dot product per head.

use std::io::{Seek, Write};

use super::mil::{Dt, FnBuilder, Var};
use super::Weights;
use crate::clip::ClipConfig;
use crate::error::{Error, Result};

/// Token sequence length of SD's text encoders.
pub const TOKENS: usize = 77;

/// Checks that the config is one the exporter can write.
///
/// # Errors
/// [`Error::InvalidInput`] naming the field.
pub fn check(cfg: &ClipConfig) -> Result<()> {
    if !matches!(cfg.hidden_act.as_str(), "quick_gelu" | "gelu" | "gelu_new" | "gelu_pytorch_tanh" | "gelu_tanh") {
        return Err(Error::invalid("model", format!("the text encoder's activation {:?} cannot be exported to Core ML", cfg.hidden_act)));
    }
    if cfg.max_position_embeddings < TOKENS || cfg.hidden_size % cfg.num_attention_heads != 0 {
        return Err(Error::invalid("model", "the text encoder's shape is not one of SD's CLIP encoders"));
    }
    Ok(())
}

/// Declares `input_ids` → `last_hidden_state` on `f` from the weights (keys `text_model.…`).
///
/// # Errors
/// A missing or mis-shaped weight (naming the key), or the weight file's I/O error.
pub fn build<W: Write + Seek>(f: &mut FnBuilder<W>, cfg: &ClipConfig, w: &Weights) -> Result<()> {
    check(cfg)?;
    let (c, heads) = (cfg.hidden_size, cfg.num_attention_heads);
    let d = c / heads;
    let p = f.precision;
    let ids = f.input("input_ids", Dt::F32, &[1, TOKENS]);
    let ids = f.cast(&ids, Dt::I32);
    let tok = f.weight("token_embedding", w.get("text_model.embeddings.token_embedding.weight", Some(&[cfg.vocab_size, c]))?)?;
    let x = f.gather(&tok, &ids);
    let pos = w.get("text_model.embeddings.position_embedding.weight", Some(&[cfg.max_position_embeddings, c]))?.narrow(0, 0, TOKENS)?;
    let pos = f.param("position_embedding", &pos)?;
    let mut x = f.add(&x, &pos)?;
    // Causal mask: a large negative above the diagonal (exp gives exactly 0 in either dtype).
    let neg = if p == Dt::F16 { -1e4 } else { -1e9 };
    let mask: Vec<f32> = (0..TOKENS).flat_map(|i| (0..TOKENS).map(move |j| if j > i { neg } else { 0.0 })).collect();
    let mask = f.floats("causal_mask", &mask, &[1, 1, TOKENS, TOKENS], None)?;
    let eps = cfg.layer_norm_eps as f32;
    let gelu = match cfg.hidden_act.as_str() {
        "quick_gelu" => "SIGMOID_APPROXIMATION",
        "gelu" => "EXACT",
        _ => "TANH_APPROXIMATION",
    };
    for i in 0..cfg.num_hidden_layers {
        let pre = format!("text_model.encoder.layers.{i}");
        x = f.scoped(format!("layers_{i}"), |f| {
            let linear = |f: &mut FnBuilder<W>, x: &Var, name: &str, out: usize, inp: usize| -> Result<Var> {
                let wt = f.weight(name, w.get(&format!("{pre}.{name}.weight"), Some(&[out, inp]))?)?;
                let b = f.param(&format!("{name}_bias"), w.get(&format!("{pre}.{name}.bias"), Some(&[out]))?)?;
                f.linear(x, &wt, Some(&b))
            };
            let norm = |f: &mut FnBuilder<W>, x: &Var, name: &str| -> Result<Var> {
                let g = f.param(&format!("{name}_gamma"), w.get(&format!("{pre}.{name}.weight"), Some(&[c]))?)?;
                let b = f.param(&format!("{name}_beta"), w.get(&format!("{pre}.{name}.bias"), Some(&[c]))?)?;
                Ok(f.layer_norm(x, &g, &b, eps))
            };
            let h = norm(f, &x, "layer_norm1")?;
            let split = |f: &mut FnBuilder<W>, v: &Var| -> Result<Var> {
                let r = f.reshape(v, &[1, TOKENS, heads, d])?;
                Ok(f.transpose(&r, &[0, 2, 1, 3]))
            };
            let q = linear(f, &h, "self_attn.q_proj", c, c)?;
            let q = f.mul_scalar(&q, (d as f32).powf(-0.5))?;
            let q = split(f, &q)?;
            let k = linear(f, &h, "self_attn.k_proj", c, c)?;
            let k = split(f, &k)?;
            let v = linear(f, &h, "self_attn.v_proj", c, c)?;
            let v = split(f, &v)?;
            let scores = f.matmul(&q, &k, false, true)?;
            let scores = f.add(&scores, &mask)?;
            let probs = f.softmax(&scores, -1);
            let o = f.matmul(&probs, &v, false, false)?;
            let o = f.transpose(&o, &[0, 2, 1, 3]);
            let o = f.reshape(&o, &[1, TOKENS, c])?;
            let o = linear(f, &o, "self_attn.out_proj", c, c)?;
            let x = f.add(&x, &o)?;
            let h = norm(f, &x, "layer_norm2")?;
            let h = linear(f, &h, "mlp.fc1", cfg.intermediate_size, c)?;
            let h = f.gelu(&h, gelu);
            let h = linear(f, &h, "mlp.fc2", c, cfg.intermediate_size)?;
            f.add(&x, &h)
        })?;
    }
    let g = f.param("final_layer_norm_gamma", w.get("text_model.final_layer_norm.weight", Some(&[c]))?)?;
    let b = f.param("final_layer_norm_beta", w.get("text_model.final_layer_norm.bias", Some(&[c]))?)?;
    let x = f.layer_norm(&x, &g, &b, eps);
    let x = f.cast(&x, Dt::F32);
    // A float32 model's last op may already be the layer norm; name it the output either way.
    f.output(&x, "last_hidden_state")?;
    Ok(())
}
