//! The UNet as a Core ML ML Program: SD 1.x / 2.x diffusers `UNet2DConditionModel`
//! (`CrossAttnDownBlock2D` / `DownBlock2D`, `UNetMidBlock2DCrossAttn`,
//! `CrossAttnUpBlock2D` / `UpBlock2D`) written op by op with the [`FnBuilder`], mirroring
//! the engine's own UNet (`crate::unet`, `crate::unet_blocks`) so the exported program
//! computes the engine's numbers.
//!
//! Inputs and outputs are the ones Apple's Swift package (`apple/ml-stable-diffusion`,
//! `Unet.swift`) passes and reads, all fp32:
//! - `sample` `(B, 4, h, w)`: the latents (`h`, `w` the latent size, pixels / 8);
//! - `timestep` `(B,)`: one timestep per batch item (the same twice under CFG);
//! - `encoder_hidden_states` `(B, C, 1, 77)`: the text encoder's hidden states transposed
//!   to Apple's `(B, channels, 1, tokens)` layout (`C` = `cross_attention_dim`);
//! - output `noise_pred` `(B, 4, h, w)`.
//!
//! `B` is 2 (classifier-free guidance: unconditional and conditional in one call) or 1
//! (Apple's `--unet-batch-one`). Inside, the program computes in the builder's precision
//! (inputs cast in, the output cast out); group norms run in fp32.
//!
//! Layout, as Apple's `python_coreml_stable_diffusion/unet.py`: resnets work on
//! `(B, C, h, w)`; transformer blocks on `(B, C, 1, S)` with `S = h·w` tokens. Every linear
//! projection inside a transformer block (q/k/v/out, feed-forward, and `proj_in`/`proj_out`
//! whether the checkpoint stores them as linear `(C, C)` or 1×1-conv `(C, C, 1, 1)`) is a
//! 1×1 `conv` on that layout; layer norms are `layer_norm` over axis 1 (channels). The time
//! embedding's two layers and the resnets' time projections are `linear` ops on `(B, C)`.
//!
//! Attention ([`Attention`]):
//! - `Original`: q, k, v reshaped to `(B, heads, dim_head, S)`; scores
//!   `qᵀk` `(B, heads, S, S_k)` by one batched `matmul`, `softmax` over keys (last axis),
//!   `v · probsᵀ` back to `(B, heads, dim_head, S)`, reshaped to `(B, C, 1, S)`.
//! - `SplitEinsum`: q, k, v `split` on channels into one `(B, dim_head, 1, ·)` tensor per
//!   head; per head `kᵀq` `(B, S_k, S)` (rank 3), `softmax` over keys (axis 1, as Apple's),
//!   `v · probs` `(B, dim_head, S)`, back to `(B, dim_head, 1, S)`; heads `concat`enated on
//!   channels. No tensor has rank 5.
//!
//! Both scale q by `dim_head^-½` before the scores, as the engine does.
//!
//! Chunking ([`UnetPart`]): iOS needs SD-1.5-size UNets in two packages, `UnetChunk1` and
//! `UnetChunk2`, cut between two layers ([`Stage`]) near half of the parameters
//! ([`chunk_split`]; SD 1.5: after the second resnet of `up_blocks.0`, 52 % / 48 %, so each
//! chunk's fp16 weights stay under 1 GB, the size Apple's `--chunk-unet` aims at).
//! Chunk 1 takes the three inputs and returns `hidden_states` (the activation after the
//! cut), `time_embedding` `(B, 4·C₀)` and the skip connections the later blocks still need,
//! `skip_K` (`K` = position on the skip stack, 0 = `conv_in`'s output). Chunk 2 takes those
//! names plus `encoder_hidden_states` and returns `noise_pred`. Apple's Swift `Unet.swift`
//! feeds chunk 2 with chunk 1's outputs merged with the original inputs, by name. The
//! tensors between the chunks are fp32 whatever the precision (lossless for fp16 values,
//! and the array type every Core ML version takes). When the cut falls right after a down
//! layer or a downsampler, the top of the skip stack is the hidden state itself and is
//! passed once, as `hidden_states`.
//!
//! Limits, as the engine: the sinusoidal time embedding is computed in fp32 (its arguments
//! reach 1000); attention runs in the program's precision (`upcast_attention` is not
//! honoured, as in the engine); the latent size must be a multiple of 2^(blocks−1) (the
//! engine's odd-size path resizes to the skip's size, which a fixed-factor upsample cannot);
//! config fields the engine does not read (`center_input_sample`) are ignored by both.

use std::collections::HashMap;
use std::io::{Seek, Write};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::compress::Compression;
use super::mil::{model_spec, Dt, FnBuilder, Target, Var};
use super::package::PackageWriter;
use super::{Attention, Weights};
use crate::error::{Error, Result};
use crate::layers::Activation;
use crate::unet::{PerBlock, UNetConfig};

/// Tokens of the text encoder's output (CLIP's context length), fixed by Apple's I/O.
pub const TOKENS: usize = 77;

/// What the exported UNet takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnetExport {
    /// 2 for classifier-free guidance in one call, 1 for `--unet-batch-one`.
    pub batch: usize,
    /// Latent height and width (pixels / 8).
    pub height: usize,
    pub width: usize,
    pub attention: Attention,
}

/// Which program to build: the whole UNet, or one of the two chunks iOS needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnetPart {
    Whole,
    Chunk1,
    Chunk2,
}

impl UnetPart {
    /// The package name Apple's Swift package loads (`Unet`, `UnetChunk1`, `UnetChunk2`).
    pub fn package_name(self) -> &'static str {
        match self {
            UnetPart::Whole => "Unet",
            UnetPart::Chunk1 => "UnetChunk1",
            UnetPart::Chunk2 => "UnetChunk2",
        }
    }
}

/// A step of the UNet between two points where it can be cut, in execution order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Layer `layer` of down block `block`: a resnet, then (in cross-attention blocks) a
    /// transformer; its output goes on the skip stack.
    Down { block: usize, layer: usize },
    /// The stride-2 convolution closing down block `block` (output on the skip stack).
    Downsample(usize),
    /// The mid block: resnet, transformer, resnet.
    Mid,
    /// Layer `layer` of up block `block`: concatenation with the top skip, a resnet, then
    /// (in cross-attention blocks) a transformer.
    Up { block: usize, layer: usize },
    /// The 2× nearest upsampling and convolution closing up block `block`.
    Upsample(usize),
}

impl Stage {
    /// The diffusers key prefixes of the stage's tensors.
    fn prefixes(self) -> Vec<String> {
        match self {
            Stage::Down { block, layer } => vec![format!("down_blocks.{block}.resnets.{layer}."), format!("down_blocks.{block}.attentions.{layer}.")],
            Stage::Downsample(b) => vec![format!("down_blocks.{b}.downsamplers.")],
            Stage::Mid => vec!["mid_block.".into()],
            Stage::Up { block, layer } => vec![format!("up_blocks.{block}.resnets.{layer}."), format!("up_blocks.{block}.attentions.{layer}.")],
            Stage::Upsample(b) => vec![format!("up_blocks.{b}.upsamplers.")],
        }
    }
}

/// The UNet's stages in order: the layers and downsamplers of every down block, the mid
/// block, the layers and upsamplers of every up block.
pub fn stages(cfg: &UNetConfig) -> Vec<Stage> {
    let n = cfg.block_out_channels.len();
    let mut out = Vec::new();
    for block in 0..n {
        out.extend((0..cfg.layers_per_block).map(|layer| Stage::Down { block, layer }));
        if block + 1 < n {
            out.push(Stage::Downsample(block));
        }
    }
    out.push(Stage::Mid);
    for block in 0..n {
        out.extend((0..=cfg.layers_per_block).map(|layer| Stage::Up { block, layer }));
        if block + 1 < n {
            out.push(Stage::Upsample(block));
        }
    }
    out
}

/// Where the chunked UNet is cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkSplit {
    /// Chunk 1 runs `stages(cfg)[..=after]`, chunk 2 the rest.
    pub after: usize,
    /// The last stage of chunk 1.
    pub stage: Stage,
    /// Parameters (elements) in each chunk: chunk 1 also holds `conv_in` and the time
    /// embedding, chunk 2 `conv_norm_out` and `conv_out`.
    pub chunk1_params: u64,
    pub chunk2_params: u64,
}

/// The cut of the chunked UNet: after the stage (a layer boundary, see [`Stage`]) whose
/// cumulative parameter count is closest to half of the total (parameter bytes are proportional to it whatever the
/// compression, which is uniform over the matrices).
///
/// # Errors
/// [`Error::InvalidInput`] for a config [`UNetConfig::check_supported`] refuses.
pub fn chunk_split(cfg: &UNetConfig) -> Result<ChunkSplit> {
    check_config(cfg)?;
    let st = stages(cfg);
    let mut per_stage = vec![0u64; st.len()];
    let (mut pre, mut post) = (0u64, 0u64);
    for (key, shape) in tensor_shapes(cfg) {
        let n: u64 = shape.iter().product::<usize>() as u64;
        match st.iter().position(|s| s.prefixes().iter().any(|p| key.starts_with(p))) {
            Some(i) => per_stage[i] += n,
            None if key.starts_with("conv_in.") || key.starts_with("time_embedding.") => pre += n,
            None => post += n,
        }
    }
    let total: u64 = pre + post + per_stage.iter().sum::<u64>();
    let mut best = (u64::MAX, 0usize, 0u64);
    let mut acc = pre;
    for (i, p) in per_stage.iter().enumerate().take(st.len() - 1) {
        acc += p;
        let dist = acc.abs_diff(total - acc);
        if dist < best.0 {
            best = (dist, i, acc);
        }
    }
    Ok(ChunkSplit { after: best.1, stage: st[best.1], chunk1_params: best.2, chunk2_params: total - best.2 })
}

fn per_block(p: &Option<PerBlock<usize>>, i: usize) -> Option<usize> {
    match p.as_ref()? {
        PerBlock::One(v) => Some(*v),
        PerBlock::Many(v) => v.get(i.min(v.len().saturating_sub(1))).copied(),
    }
}

/// Transformer layers of block `i` (diffusers' `transformer_layers_per_block`, default 1).
fn transformer_layers(cfg: &UNetConfig, i: usize) -> usize {
    per_block(&cfg.transformer_layers_per_block, i).unwrap_or(1)
}

fn invalid(message: impl Into<String>) -> Error {
    Error::invalid("model", message)
}

fn check_config(cfg: &UNetConfig) -> Result<()> {
    cfg.check_supported().map_err(|m| invalid(format!("the UNet cannot be exported to Core ML: {m}")))?;
    match &cfg.only_cross_attention {
        None | Some(serde_json::Value::Bool(false)) => {}
        Some(serde_json::Value::Array(a)) if a.iter().all(|v| v == &serde_json::Value::Bool(false)) => {}
        Some(v) => return Err(invalid(format!("the UNet cannot be exported to Core ML: only_cross_attention {v} is not supported"))),
    }
    let c0 = cfg.block_out_channels[0];
    if c0 % 2 == 1 {
        return Err(invalid(format!("the UNet cannot be exported to Core ML: an odd time embedding width {c0}")));
    }
    let n = cfg.block_out_channels.len();
    for (i, kind) in cfg.down_block_types.iter().enumerate() {
        let heads = cfg.heads_of(i);
        if kind.starts_with("CrossAttn") && (heads == 0 || cfg.block_out_channels[i] % heads != 0) {
            return Err(invalid(format!("the UNet cannot be exported to Core ML: {} channels of down block {i} do not split into {heads} heads", cfg.block_out_channels[i])));
        }
    }
    let heads = cfg.heads_of(n - 1);
    if heads == 0 || cfg.block_out_channels[n - 1] % heads != 0 {
        return Err(invalid(format!("the UNet cannot be exported to Core ML: {} mid-block channels do not split into {heads} heads", cfg.block_out_channels[n - 1])));
    }
    Ok(())
}

/// Refuses what the exporter cannot express, before anything is written: configs the
/// engine does not implement ([`UNetConfig::check_supported`]: SDXL-style addition
/// embeddings, class embeddings, other block types), `only_cross_attention`, a batch of 0,
/// latent sizes the down/up path cannot halve and double exactly (a multiple of
/// 2^(blocks−1): 8 latents = 64 pixels for SD 1.x/2.x), and weights missing or shaped
/// otherwise than the config says.
///
/// # Errors
/// [`Error::InvalidInput`] naming the problem, or [`Error::Weights`] naming the tensor.
pub fn check(cfg: &UNetConfig, w: &Weights, opts: &UnetExport) -> Result<()> {
    check_config(cfg)?;
    if opts.batch == 0 {
        return Err(Error::invalid("batch", "the UNet batch must be 1 or more (2 for classifier-free guidance)"));
    }
    let m = 1usize << (cfg.block_out_channels.len() - 1);
    if opts.height == 0 || opts.width == 0 || opts.height % m != 0 || opts.width % m != 0 {
        return Err(Error::invalid(
            "size",
            format!(
                "{}×{} pixels ({}×{} latents) cannot go through this UNet's down and up blocks exactly; use a multiple of {} pixels",
                opts.width * 8,
                opts.height * 8,
                opts.width,
                opts.height,
                m * 8
            ),
        ));
    }
    for (key, shape) in tensor_shapes(cfg) {
        w.get(&key, Some(&shape))?;
    }
    Ok(())
}

/// Every tensor the UNet reads, by diffusers key, with its shape, as the engine builds the
/// model from `cfg` (`crate::unet::UNet2DConditionModel::new`).
pub fn tensor_shapes(cfg: &UNetConfig) -> Vec<(String, Vec<usize>)> {
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    let boc = &cfg.block_out_channels;
    let n = boc.len();
    let temb = boc[0] * 4;
    let ctx = cfg.cross_attention_dim;
    let mut add = |k: String, s: Vec<usize>| out.push((k, s));
    fn conv(add: &mut dyn FnMut(String, Vec<usize>), p: &str, o: usize, i: usize, k: usize) {
        add(format!("{p}.weight"), vec![o, i, k, k]);
        add(format!("{p}.bias"), vec![o]);
    }
    fn lin(add: &mut dyn FnMut(String, Vec<usize>), p: &str, o: usize, i: usize, bias: bool) {
        add(format!("{p}.weight"), vec![o, i]);
        if bias {
            add(format!("{p}.bias"), vec![o]);
        }
    }
    fn norm(add: &mut dyn FnMut(String, Vec<usize>), p: &str, c: usize) {
        add(format!("{p}.weight"), vec![c]);
        add(format!("{p}.bias"), vec![c]);
    }
    let resnet = |add: &mut dyn FnMut(String, Vec<usize>), p: &str, i: usize, o: usize| {
        norm(add, &format!("{p}.norm1"), i);
        conv(add, &format!("{p}.conv1"), o, i, 3);
        lin(add, &format!("{p}.time_emb_proj"), o, temb, true);
        norm(add, &format!("{p}.norm2"), o);
        conv(add, &format!("{p}.conv2"), o, o, 3);
        if i != o {
            conv(add, &format!("{p}.conv_shortcut"), o, i, 1);
        }
    };
    let transformer = |add: &mut dyn FnMut(String, Vec<usize>), p: &str, c: usize, layers: usize| {
        norm(add, &format!("{p}.norm"), c);
        for proj in ["proj_in", "proj_out"] {
            if cfg.use_linear_projection {
                lin(add, &format!("{p}.{proj}"), c, c, true);
            } else {
                conv(add, &format!("{p}.{proj}"), c, c, 1);
            }
        }
        for l in 0..layers {
            let b = format!("{p}.transformer_blocks.{l}");
            for k in ["norm1", "norm2", "norm3"] {
                norm(add, &format!("{b}.{k}"), c);
            }
            for (a, kv) in [("attn1", c), ("attn2", ctx)] {
                lin(add, &format!("{b}.{a}.to_q"), c, c, false);
                lin(add, &format!("{b}.{a}.to_k"), c, kv, false);
                lin(add, &format!("{b}.{a}.to_v"), c, kv, false);
                lin(add, &format!("{b}.{a}.to_out.0"), c, c, true);
            }
            lin(add, &format!("{b}.ff.net.0.proj"), 8 * c, c, true);
            lin(add, &format!("{b}.ff.net.2"), c, 4 * c, true);
        }
    };
    conv(&mut add, "conv_in", boc[0], cfg.in_channels, 3);
    lin(&mut add, "time_embedding.linear_1", temb, boc[0], true);
    lin(&mut add, "time_embedding.linear_2", temb, temb, true);
    let mut out_ch = boc[0];
    for (i, kind) in cfg.down_block_types.iter().enumerate() {
        let in_ch = out_ch;
        out_ch = boc[i];
        for j in 0..cfg.layers_per_block {
            resnet(&mut add, &format!("down_blocks.{i}.resnets.{j}"), if j == 0 { in_ch } else { out_ch }, out_ch);
            if kind == "CrossAttnDownBlock2D" {
                transformer(&mut add, &format!("down_blocks.{i}.attentions.{j}"), out_ch, transformer_layers(cfg, i));
            }
        }
        if i + 1 < n {
            conv(&mut add, &format!("down_blocks.{i}.downsamplers.0.conv"), out_ch, out_ch, 3);
        }
    }
    let mid = boc[n - 1];
    resnet(&mut add, "mid_block.resnets.0", mid, mid);
    transformer(&mut add, "mid_block.attentions.0", mid, transformer_layers(cfg, n - 1));
    resnet(&mut add, "mid_block.resnets.1", mid, mid);
    let rev: Vec<usize> = boc.iter().rev().copied().collect();
    let mut out_ch = rev[0];
    for (i, kind) in cfg.up_block_types.iter().enumerate() {
        let prev_out = out_ch;
        out_ch = rev[i];
        let in_ch = rev[(i + 1).min(n - 1)];
        let layers = cfg.layers_per_block + 1;
        for j in 0..layers {
            let skip = if j == layers - 1 { in_ch } else { out_ch };
            let rin = if j == 0 { prev_out } else { out_ch };
            resnet(&mut add, &format!("up_blocks.{i}.resnets.{j}"), rin + skip, out_ch);
            if kind == "CrossAttnUpBlock2D" {
                transformer(&mut add, &format!("up_blocks.{i}.attentions.{j}"), out_ch, transformer_layers(cfg, n - 1 - i));
            }
        }
        if i + 1 < n {
            conv(&mut add, &format!("up_blocks.{i}.upsamplers.0.conv"), out_ch, out_ch, 3);
        }
    }
    norm(&mut add, "conv_norm_out", boc[0]);
    conv(&mut add, "conv_out", cfg.out_channels, boc[0], 3);
    out
}

/// The activation and skip stack after the first `done` stages: `(hidden (C, h, w), skips)`.
fn shapes_after(cfg: &UNetConfig, opts: &UnetExport, done: usize) -> ((usize, usize, usize), Vec<(usize, usize, usize)>) {
    let boc = &cfg.block_out_channels;
    let n = boc.len();
    let (mut c, mut h, mut w) = (boc[0], opts.height, opts.width);
    let mut skips = vec![(c, h, w)];
    for s in stages(cfg).into_iter().take(done) {
        match s {
            Stage::Down { block, .. } => {
                c = boc[block];
                skips.push((c, h, w));
            }
            Stage::Downsample(_) => {
                h /= 2;
                w /= 2;
                skips.push((c, h, w));
            }
            Stage::Mid => {}
            Stage::Up { block, .. } => {
                c = boc[n - 1 - block];
                skips.pop();
            }
            Stage::Upsample(_) => {
                h *= 2;
                w *= 2;
            }
        }
    }
    ((c, h, w), skips)
}

/// The tensors passed from chunk 1 to chunk 2, by name, with their fp32 shapes, in the
/// order chunk 2 declares them (then `encoder_hidden_states`).
///
/// # Errors
/// As [`chunk_split`].
pub fn chunk_interface(cfg: &UNetConfig, opts: &UnetExport) -> Result<Vec<(String, Vec<usize>)>> {
    chunk_interface_at(cfg, opts, chunk_split(cfg)?.after)
}

/// As [`chunk_interface`] for a cut after `stages(cfg)[after]` instead of the balanced one.
///
/// # Errors
/// As [`chunk_split`]; [`Error::InvalidInput`] when `after` leaves chunk 2 empty.
pub fn chunk_interface_at(cfg: &UNetConfig, opts: &UnetExport, after: usize) -> Result<Vec<(String, Vec<usize>)>> {
    check_config(cfg)?;
    let st = stages(cfg);
    if after + 1 >= st.len() {
        return Err(invalid(format!("the UNet has {} stages: a cut after stage {after} leaves chunk 2 empty", st.len())));
    }
    let ((c, h, w), skips) = shapes_after(cfg, opts, after + 1);
    let b = opts.batch;
    let mut out = vec![("hidden_states".to_string(), vec![b, c, h, w])];
    let top_is_hidden = matches!(st[after], Stage::Down { .. } | Stage::Downsample(_));
    for (k, (sc, sh, sw)) in skips.iter().enumerate() {
        if !(top_is_hidden && k + 1 == skips.len()) {
            out.push((format!("skip_{k}"), vec![b, *sc, *sh, *sw]));
        }
    }
    out.push(("time_embedding".into(), vec![b, cfg.block_out_channels[0] * 4]));
    Ok(out)
}

/// What every layer needs while the program is built.
struct Ctx<'a> {
    cfg: &'a UNetConfig,
    w: &'a Weights,
    act: Activation,
    attention: Attention,
    /// Time embedding `(B, 4·C₀)` in the program's precision.
    emb: Var,
    /// Text context `(B, C_ctx, 1, 77)` in the program's precision.
    context: Var,
}

fn act<W: Write + Seek>(f: &mut FnBuilder<W>, a: Activation, x: &Var) -> Var {
    match a {
        Activation::Silu => f.silu(x),
        Activation::Gelu => f.gelu(x, "EXACT"),
        Activation::GeluTanh => f.gelu(x, "TANH_APPROXIMATION"),
        Activation::QuickGelu => f.gelu(x, "SIGMOID_APPROXIMATION"),
    }
}

/// `conv` with the checkpoint's `{key}.weight` / `{key}.bias`; `pad` on every side.
fn conv<W: Write + Seek>(f: &mut FnBuilder<W>, c: &Ctx, key: &str, x: &Var, stride: usize, pad: [usize; 4]) -> Result<Var> {
    let wt = f.weight("weight", c.w.get(&format!("{key}.weight"), None)?)?;
    let b = f.param("bias", c.w.get(&format!("{key}.bias"), None)?)?;
    f.conv(x, &wt, Some(&b), [stride, stride], pad, 1)
}

/// A linear layer (`(out, in)` weight, or an already 1×1 conv kernel) as a 1×1 `conv` on
/// `(B, C, 1, S)`.
fn proj<W: Write + Seek>(f: &mut FnBuilder<W>, c: &Ctx, key: &str, x: &Var, bias: bool) -> Result<Var> {
    let t = c.w.get(&format!("{key}.weight"), None)?;
    let t = if t.rank() == 2 { t.unsqueeze(2)?.unsqueeze(3)? } else { t.clone() };
    let wt = f.weight("weight", &t)?;
    let b = if bias { Some(f.param("bias", c.w.get(&format!("{key}.bias"), None)?)?) } else { None };
    f.conv(x, &wt, b.as_ref(), [1, 1], [0; 4], 1)
}

/// `linear` on `(B, in)`.
fn linear<W: Write + Seek>(f: &mut FnBuilder<W>, c: &Ctx, key: &str, x: &Var) -> Result<Var> {
    let wt = f.weight("weight", c.w.get(&format!("{key}.weight"), None)?)?;
    let b = f.param("bias", c.w.get(&format!("{key}.bias"), None)?)?;
    f.linear(x, &wt, Some(&b))
}

fn group_norm<W: Write + Seek>(f: &mut FnBuilder<W>, c: &Ctx, key: &str, x: &Var, eps: f64) -> Result<Var> {
    let g = c.w.get(&format!("{key}.weight"), None)?;
    let b = c.w.get(&format!("{key}.bias"), None)?;
    f.group_norm(x, c.cfg.norm_num_groups, g, b, eps as f32)
}

/// diffusers `ResnetBlock2D` (as `crate::unet_blocks::ResnetBlock2D::forward`).
fn resnet<W: Write + Seek>(f: &mut FnBuilder<W>, c: &Ctx, key: &str, x: &Var, scale: f64) -> Result<Var> {
    f.scoped(key.replace('.', "_"), |f| {
        let eps = c.cfg.norm_eps;
        let h = group_norm(f, c, &format!("{key}.norm1"), x, eps)?;
        let h = act(f, c.act, &h);
        let h = conv(f, c, &format!("{key}.conv1"), &h, 1, [1; 4])?;
        let t = act(f, c.act, &c.emb);
        let t = linear(f, c, &format!("{key}.time_emb_proj"), &t)?;
        let t = f.reshape(&t, &[t.shape[0], t.shape[1], 1, 1])?;
        let h = f.add(&h, &t)?;
        let h = group_norm(f, c, &format!("{key}.norm2"), &h, eps)?;
        let h = act(f, c.act, &h);
        let h = conv(f, c, &format!("{key}.conv2"), &h, 1, [1; 4])?;
        let shortcut = if c.w.contains(&format!("{key}.conv_shortcut.weight")) { conv(f, c, &format!("{key}.conv_shortcut"), x, 1, [0; 4])? } else { x.clone() };
        let out = f.add(&shortcut, &h)?;
        if scale == 1.0 {
            Ok(out)
        } else {
            let s = f.scalar(out.dtype, scale as f32);
            f.div(&out, &s)
        }
    })
}

/// Scaled dot-product attention on `(B, C, 1, S)` (see the module docs for the layouts).
fn attention<W: Write + Seek>(f: &mut FnBuilder<W>, c: &Ctx, key: &str, x: &Var, context: Option<&Var>, heads: usize) -> Result<Var> {
    let kv = context.unwrap_or(x);
    let q = proj(f, c, &format!("{key}.to_q"), x, false)?;
    let k = proj(f, c, &format!("{key}.to_k"), kv, false)?;
    let v = proj(f, c, &format!("{key}.to_v"), kv, false)?;
    let (b, inner, s, sk) = (q.shape[0], q.shape[1], q.shape[3], k.shape[3]);
    let dh = inner / heads;
    let q = f.mul_scalar(&q, (dh as f64).powf(-0.5) as f32)?;
    let o = match c.attention {
        Attention::Original => {
            let q = f.reshape(&q, &[b, heads, dh, s])?;
            let k = f.reshape(&k, &[b, heads, dh, sk])?;
            let v = f.reshape(&v, &[b, heads, dh, sk])?;
            let scores = f.matmul(&q, &k, true, false)?; // (B, heads, S, S_k)
            let probs = f.softmax(&scores, -1);
            let o = f.matmul(&v, &probs, false, true)?; // (B, heads, dh, S)
            f.reshape(&o, &[b, inner, 1, s])?
        }
        Attention::SplitEinsum => {
            let sizes = vec![dh; heads];
            let qs = f.split(&q, &sizes, 1)?;
            let ks = f.split(&k, &sizes, 1)?;
            let vs = f.split(&v, &sizes, 1)?;
            let mut outs = Vec::with_capacity(heads);
            for ((qh, kh), vh) in qs.iter().zip(&ks).zip(&vs) {
                let qh = f.reshape(qh, &[b, dh, s])?;
                let kh = f.reshape(kh, &[b, dh, sk])?;
                let vh = f.reshape(vh, &[b, dh, sk])?;
                let scores = f.matmul(&kh, &qh, true, false)?; // (B, S_k, S)
                let probs = f.softmax(&scores, 1);
                let o = f.matmul(&vh, &probs, false, false)?; // (B, dh, S)
                outs.push(f.reshape(&o, &[b, dh, 1, s])?);
            }
            let refs: Vec<&Var> = outs.iter().collect();
            f.concat(&refs, 1)?
        }
    };
    proj(f, c, &format!("{key}.to_out.0"), &o, true)
}

/// Layer norm over channels of `(B, C, 1, S)` (the engine's `LayerNorm`, eps 1e-5).
fn layer_norm<W: Write + Seek>(f: &mut FnBuilder<W>, c: &Ctx, key: &str, x: &Var) -> Result<Var> {
    let g = f.param("gamma", c.w.get(&format!("{key}.weight"), None)?)?;
    let b = f.param("beta", c.w.get(&format!("{key}.bias"), None)?)?;
    Ok(f.layer_norm_axes(x, &[1], &g, &b, 1e-5))
}

/// diffusers `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward.
fn transformer_block<W: Write + Seek>(f: &mut FnBuilder<W>, c: &Ctx, key: &str, x: &Var, heads: usize) -> Result<Var> {
    let h = layer_norm(f, c, &format!("{key}.norm1"), x)?;
    let a = attention(f, c, &format!("{key}.attn1"), &h, None, heads)?;
    let x = f.add(&a, x)?;
    let h = layer_norm(f, c, &format!("{key}.norm2"), &x)?;
    let a = attention(f, c, &format!("{key}.attn2"), &h, Some(&c.context), heads)?;
    let x = f.add(&a, &x)?;
    let h = layer_norm(f, c, &format!("{key}.norm3"), &x)?;
    let h = proj(f, c, &format!("{key}.ff.net.0.proj"), &h, true)?;
    let half = h.shape[1] / 2;
    let parts = f.split(&h, &[half, half], 1)?;
    let gate = f.gelu(&parts[1], "EXACT");
    let h = f.mul(&parts[0], &gate)?;
    let h = proj(f, c, &format!("{key}.ff.net.2"), &h, true)?;
    f.add(&h, &x)
}

/// diffusers `Transformer2DModel` (continuous input): group norm (eps 1e-6), `proj_in`,
/// the blocks on `(B, C, 1, h·w)`, `proj_out`, residual.
fn transformer<W: Write + Seek>(f: &mut FnBuilder<W>, c: &Ctx, key: &str, x: &Var, heads: usize, layers: usize) -> Result<Var> {
    f.scoped(key.replace('.', "_"), |f| {
        let (b, ch, h, w) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
        let n = group_norm(f, c, &format!("{key}.norm"), x, 1e-6)?;
        let n = f.reshape(&n, &[b, ch, 1, h * w])?;
        let mut t = proj(f, c, &format!("{key}.proj_in"), &n, true)?;
        for l in 0..layers {
            t = transformer_block(f, c, &format!("{key}.transformer_blocks.{l}"), &t, heads)?;
        }
        let o = proj(f, c, &format!("{key}.proj_out"), &t, true)?;
        let o = f.reshape(&o, &[b, ch, h, w])?;
        f.add(&o, x)
    })
}

/// The sinusoidal frequencies of `crate::unet::timestep_embedding`, computed the same way.
fn timestep_freqs(half: usize, shift: f64) -> Result<Vec<f32>> {
    let exponent = (Tensor::arange(0u32, half as u32, &Device::Cpu)?.to_dtype(DType::F32)? * (-(10000f64.ln())))?;
    let exponent = (exponent / (half as f64 - shift))?;
    Ok(exponent.exp()?.to_vec1::<f32>()?)
}

/// Builds the UNet (or one chunk of it) into `f`, declaring its inputs and outputs (see the
/// module docs for names, shapes and layouts). Everything is checked ([`check`]) before the
/// first constant is written.
///
/// # Errors
/// [`check`]'s refusals; the weight file's I/O error.
pub fn build_unet<W: Write + Seek>(f: &mut FnBuilder<W>, cfg: &UNetConfig, w: &Weights, opts: &UnetExport, part: UnetPart) -> Result<()> {
    build_unet_at(f, cfg, w, opts, part, None)
}

/// As [`build_unet`], with chunks cut after `stages(cfg)[after]` when `after` is given
/// (instead of [`chunk_split`]'s balanced cut; both chunks must use the same).
///
/// # Errors
/// As [`build_unet`] and [`chunk_interface_at`].
pub fn build_unet_at<W: Write + Seek>(f: &mut FnBuilder<W>, cfg: &UNetConfig, w: &Weights, opts: &UnetExport, part: UnetPart, after: Option<usize>) -> Result<()> {
    check(cfg, w, opts)?;
    let st = stages(cfg);
    let split = match part {
        UnetPart::Whole => None,
        _ => Some(match after {
            Some(a) => a,
            None => chunk_split(cfg)?.after,
        }),
    };
    if let Some(a) = split {
        chunk_interface_at(cfg, opts, a)?;
    }
    let p = f.precision;
    let b = opts.batch;
    let boc = &cfg.block_out_channels;
    let n = boc.len();
    let act_fn = Activation::from_name(&cfg.act_fn).unwrap_or(Activation::Silu);
    let context_shape = [b, cfg.cross_attention_dim, 1, TOKENS];

    let (range, mut xs, mut skips, c) = match (part, &split) {
        (UnetPart::Chunk2, Some(sp)) => {
            let sp = *sp;
            let interface = chunk_interface_at(cfg, opts, sp)?;
            let mut vars: HashMap<String, Var> = HashMap::new();
            for (name, shape) in &interface {
                let v = f.input(name, Dt::F32, shape);
                vars.insert(name.clone(), f.cast(&v, p));
            }
            let ehs = f.input("encoder_hidden_states", Dt::F32, &context_shape);
            let context = f.cast(&ehs, p);
            let hidden = vars["hidden_states"].clone();
            let (_, skip_shapes) = shapes_after(cfg, opts, sp + 1);
            let skips: Vec<Var> = (0..skip_shapes.len()).map(|k| vars.get(&format!("skip_{k}")).cloned().unwrap_or_else(|| hidden.clone())).collect();
            let c = Ctx { cfg, w, act: act_fn, attention: opts.attention, emb: vars["time_embedding"].clone(), context };
            (sp + 1..st.len(), hidden, skips, c)
        }
        _ => {
            let sample = f.input("sample", Dt::F32, &[b, cfg.in_channels, opts.height, opts.width]);
            let timestep = f.input("timestep", Dt::F32, &[b]);
            let ehs = f.input("encoder_hidden_states", Dt::F32, &context_shape);
            let context = f.cast(&ehs, p);
            // The sinusoidal embedding in fp32 (arguments reach 1000: fp16 cannot hold them).
            let half = boc[0] / 2;
            let emb = f.scoped("time_embedding", |f| {
                let freqs = f.floats("freqs", &timestep_freqs(half, cfg.freq_shift)?, &[1, half], Some(Dt::F32))?;
                let t = f.reshape(&timestep, &[b, 1])?;
                let args = f.mul(&t, &freqs)?;
                let (sin, cos) = (f.sin(&args), f.cos(&args));
                let e = if cfg.flip_sin_to_cos { f.concat(&[&cos, &sin], 1)? } else { f.concat(&[&sin, &cos], 1)? };
                Ok(f.cast(&e, p))
            })?;
            let c0 = Ctx { cfg, w, act: act_fn, attention: opts.attention, emb: emb.clone(), context: context.clone() };
            let emb = f.scoped("time_embedding", |f| {
                let e = linear(f, &c0, "time_embedding.linear_1", &emb)?;
                let e = act(f, act_fn, &e);
                linear(f, &c0, "time_embedding.linear_2", &e)
            })?;
            let c = Ctx { emb, ..c0 };
            let x = f.cast(&sample, p);
            let x = f.scoped("conv_in", |f| conv(f, &c, "conv_in", &x, 1, [1; 4]))?;
            let end = split.map_or(st.len(), |sp| sp + 1);
            (0..end, x.clone(), vec![x], c)
        }
    };

    for &stage in &st[range.clone()] {
        match stage {
            Stage::Down { block: i, layer: j } => {
                xs = resnet(f, &c, &format!("down_blocks.{i}.resnets.{j}"), &xs, 1.0)?;
                if cfg.down_block_types[i] == "CrossAttnDownBlock2D" {
                    xs = transformer(f, &c, &format!("down_blocks.{i}.attentions.{j}"), &xs, cfg.heads_of(i), transformer_layers(cfg, i))?;
                }
                skips.push(xs.clone());
            }
            Stage::Downsample(i) => {
                let pad = match cfg.downsample_padding {
                    0 => [0, 1, 0, 1],
                    d => [d; 4],
                };
                let key = format!("down_blocks.{i}.downsamplers.0.conv");
                xs = f.scoped(key.replace('.', "_"), |f| conv(f, &c, &key, &xs, 2, pad))?;
                skips.push(xs.clone());
            }
            Stage::Mid => {
                let scale = cfg.mid_block_scale_factor;
                xs = resnet(f, &c, "mid_block.resnets.0", &xs, scale)?;
                xs = transformer(f, &c, "mid_block.attentions.0", &xs, cfg.heads_of(n - 1), transformer_layers(cfg, n - 1))?;
                xs = resnet(f, &c, "mid_block.resnets.1", &xs, scale)?;
            }
            Stage::Up { block: i, layer: j } => {
                // Per-block settings are listed in down-block order.
                let bi = n - 1 - i;
                let skip = skips.pop().ok_or_else(|| invalid("UNet skip stack underflow"))?;
                xs = f.concat(&[&xs, &skip], 1)?;
                xs = resnet(f, &c, &format!("up_blocks.{i}.resnets.{j}"), &xs, 1.0)?;
                if cfg.up_block_types[i] == "CrossAttnUpBlock2D" {
                    xs = transformer(f, &c, &format!("up_blocks.{i}.attentions.{j}"), &xs, cfg.heads_of(bi), transformer_layers(cfg, bi))?;
                }
            }
            Stage::Upsample(i) => {
                let key = format!("up_blocks.{i}.upsamplers.0.conv");
                xs = f.scoped(key.replace('.', "_"), |f| {
                    let u = f.upsample_nearest(&xs, 2);
                    conv(f, &c, &key, &u, 1, [1; 4])
                })?;
            }
        }
    }

    if part == UnetPart::Chunk1 {
        let top_is_hidden = skips.last().is_some_and(|s| s.name == xs.name);
        let interface = chunk_interface_at(cfg, opts, split.unwrap_or_default())?;
        let hidden = f.cast(&xs, Dt::F32);
        f.output(&hidden, "hidden_states")?;
        for (k, s) in skips.iter().enumerate() {
            if top_is_hidden && k + 1 == skips.len() {
                continue;
            }
            let v = f.cast(s, Dt::F32);
            f.output(&v, &format!("skip_{k}"))?;
        }
        let e = f.cast(&c.emb, Dt::F32);
        f.output(&e, "time_embedding")?;
        // The names and shapes chunk 2 declares must be the ones produced here.
        let mut made: Vec<(String, Vec<usize>)> = vec![("hidden_states".into(), hidden.shape.clone())];
        for (k, s) in skips.iter().enumerate() {
            if !(top_is_hidden && k + 1 == skips.len()) {
                made.push((format!("skip_{k}"), s.shape.clone()));
            }
        }
        made.push(("time_embedding".into(), e.shape.clone()));
        if made != interface {
            return Err(invalid(format!("chunk 1 produces {made:?} but chunk 2 expects {interface:?}")));
        }
        return Ok(());
    }

    let out = f.scoped("conv_norm_out", |f| {
        let h = group_norm(f, &c, "conv_norm_out", &xs, cfg.norm_eps)?;
        Ok(act(f, act_fn, &h))
    })?;
    let out = f.scoped("conv_out", |f| conv(f, &c, "conv_out", &out, 1, [1; 4]))?;
    let out = f.cast(&out, Dt::F32);
    f.output(&out, "noise_pred")?;
    Ok(())
}

/// Writes the UNet (or one chunk) as the package `dir` (e.g. `out/Unet.mlpackage`):
/// checks first, streams the weights, and leaves nothing behind on failure. Returns the
/// package's size in bytes and the function's weight statistics.
///
/// # Errors
/// [`check`]'s refusals; I/O errors.
#[allow(clippy::too_many_arguments)]
pub fn write_package(dir: &Path, cfg: &UNetConfig, w: &Weights, opts: &UnetExport, part: UnetPart, precision: Dt, compression: Option<Compression>, target: Target) -> Result<(u64, super::mil::WeightStats)> {
    write_package_at(dir, cfg, w, opts, part, precision, compression, target, None)
}

/// As [`write_package`], with chunks cut after `stages(cfg)[after]` when given (see
/// [`build_unet_at`]).
///
/// # Errors
/// As [`write_package`] and [`chunk_interface_at`].
#[allow(clippy::too_many_arguments)]
pub fn write_package_at(dir: &Path, cfg: &UNetConfig, w: &Weights, opts: &UnetExport, part: UnetPart, precision: Dt, compression: Option<Compression>, target: Target, after: Option<usize>) -> Result<(u64, super::mil::WeightStats)> {
    check(cfg, w, opts)?;
    if let (Some(a), UnetPart::Chunk1 | UnetPart::Chunk2) = (after, part) {
        chunk_interface_at(cfg, opts, a)?;
    }
    let mut pkg = PackageWriter::create(dir).map_err(|e| Error::io(dir, e))?;
    let func = {
        let mut f = FnBuilder::new(pkg.weights(), precision, compression, target);
        build_unet_at(&mut f, cfg, w, opts, part, after)?;
        f.finish()
    };
    let stats = func.stats.clone();
    let descriptions: HashMap<&str, &str> = HashMap::from([
        ("sample", "latents (B, 4, h, w)"),
        ("timestep", "timestep per batch item (B,)"),
        ("encoder_hidden_states", "text encoder hidden states (B, C, 1, 77)"),
        ("noise_pred", "predicted noise (B, 4, h, w)"),
        ("hidden_states", "activation between the UNet chunks"),
        ("time_embedding", "time embedding between the UNet chunks"),
    ]);
    let metadata = HashMap::from([
        ("atelier.unet.attention".to_string(), opts.attention.id().to_string()),
        ("atelier.unet.part".to_string(), part.package_name().to_string()),
    ]);
    let spec = model_spec(target, vec![("main".into(), func)], &descriptions, metadata, "Stable Diffusion UNet (Atelier export)")?;
    let size = pkg.finish(&spec).map_err(|e| Error::io(dir, e))?;
    Ok((size, stats))
}
