//! Single-file checkpoints: the one `.safetensors` file per model that A1111, ComfyUI and
//! Civitai use, in the key layout of the original Stable Diffusion code (CompVis LDM for
//! SD 1.x, Stability's SGM for SDXL base), turned into the diffusers folder the engine loads.
//!
//! [`convert`] streams the file's tensors from a memory map straight into the component
//! files (three for SD 1.x, four for SDXL; no copy of the weights in memory except the one
//! transposed SDXL text projection), renaming every key to diffusers' name, and copies the
//! configs and tokenizers from a diffusers folder of the same architecture (what diffusers'
//! `from_single_file(path, config=folder)` reads: heads, group counts, activations,
//! scheduler and tokenizers are not in the weights). [`materialize`] does that once per file
//! into a cache folder keyed by the file's hash.
//!
//! Key layout (see `../shared/fixtures/single-file/README.md` for the whole table): UNet
//! under `model.diffusion_model.` with `input_blocks.{1 + (L+1)·i + j}.{0,1}` for
//! `down_blocks.i.{resnets,attentions}.j`, `input_blocks.{(L+1)(i+1)}.0.op` for the
//! downsamplers, `middle_block.{0,1,2}`, `output_blocks.{(L+1)·i + j}.{0,1}` for
//! `up_blocks.i.{resnets,attentions}.j` and the upsampler after the last of them, resnets
//! with `in_layers.{0,2}`/`emb_layers.1`/`out_layers.{0,3}`/`skip_connection`; VAE under
//! `first_stage_model.` with `down.i.block.j`, `up.{N-1-i}.block.j` (reversed levels),
//! `mid.block_{1,2}`, `mid.attn_1.{norm,q,k,v,proj_out}` as 1×1 convolutions; CLIP text
//! encoder under `cond_stage_model.transformer.` with transformers' own names.
//!
//! SDXL base (SGM) uses the same UNet and VAE layout (the UNet adds `label_emb.0.{0,2}` for
//! `add_embedding.linear_{1,2}`; its proj_in / proj_out are Linear [C,C], kept as stored),
//! text encoder 1 under `conditioner.embedders.0.transformer.` with transformers' names, and
//! text encoder 2 under `conditioner.embedders.1.model.` with OpenCLIP's names:
//! `token_embedding`, `positional_embedding`, `transformer.resblocks.i.{ln_1, attn.in_proj_*,
//! attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}` (q, k, v stacked on axis 0 of `in_proj_*`),
//! `ln_final` and `text_projection` [C,P], the transpose of transformers' `[P,C]`.
//!
//! Pickled checkpoints (`.ckpt`, `.pt`, `.bin`) are refused, never unpickled: unpickling
//! runs arbitrary code.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView, View};

use crate::model::{read_config, ModelFiles};
use crate::unet::UNetConfig;
use crate::vae::VaeConfig;
use crate::{Error, Result};

/// What a single-file checkpoint holds, recognised from its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x: CLIP ViT-L text encoder under `cond_stage_model.transformer.`.
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H text encoder under `cond_stage_model.model.`.
    Sd2,
    /// SDXL base: two text encoders under `conditioner.embedders.`.
    Sdxl,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "SD 1.x",
            Family::Sd2 => "SD 2.x",
            Family::Sdxl => "SDXL",
        }
    }
}

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const TEXT: &str = "cond_stage_model.transformer.";
/// SDXL's CLIP ViT-L text encoder (transformers names follow).
const XL_TEXT: &str = "conditioner.embedders.0.transformer.";
/// SDXL's OpenCLIP ViT-bigG text encoder (OpenCLIP names follow).
const XL_TEXT_2: &str = "conditioner.embedders.1.model.";

/// Recognises the family from tensor names, or says what the file looks like instead.
///
/// # Errors
/// [`Error::Weights`] naming what the keys look like (a LoRA, an embedding, a diffusers
/// component, a VAE alone) when they are no SD 1.x / 2.x / SDXL checkpoint.
pub fn detect(path: &Path, names: &[&str]) -> Result<Family> {
    let any = |p: &str| names.iter().any(|n| n.starts_with(p));
    let has_unet = any(UNET);
    if has_unet && any("conditioner.embedders.") {
        return Ok(Family::Sdxl);
    }
    if has_unet && any("cond_stage_model.model.") {
        return Ok(Family::Sd2);
    }
    if has_unet && any(TEXT) {
        return Ok(Family::Sd1);
    }
    let looks = if any("lora_unet_") || any("lora_te") || names.iter().any(|n| n.contains(".lora_down.") || n.contains("lora_A")) {
        "a LoRA / LyCORIS adapter (put it in the styles folder, not the model)".to_string()
    } else if any("emb_params") || any("clip_l") || any("clip_g") || any("string_to_param") {
        "a textual-inversion embedding".to_string()
    } else if any("conv_in.") && any("down_blocks.") {
        "one diffusers component (a UNet or VAE file from a model folder); pass the whole folder".to_string()
    } else if any("encoder.down.") || any("decoder.up.") || any(&format!("{VAE}encoder.")) {
        "a VAE alone".to_string()
    } else if any("text_model.") {
        "a text encoder alone".to_string()
    } else {
        let mut prefixes: Vec<&str> = names.iter().map(|n| n.split('.').next().unwrap_or(n)).collect();
        prefixes.sort_unstable();
        prefixes.dedup();
        prefixes.truncate(6);
        format!("none of SD 1.x, SD 2.x or SDXL (top-level names: {})", prefixes.join(", "))
    };
    Err(Error::Weights { path: path.to_path_buf(), message: format!("is not a Stable Diffusion checkpoint: it looks like {looks}") })
}

/// Refuses pickled PyTorch checkpoints by extension or content, with how to convert them.
///
/// # Errors
/// [`Error::Weights`] for a `.ckpt`/`.pt`/`.pth`/`.bin` file or one starting with a pickle or
/// zip header.
pub fn refuse_pickle(path: &Path, head: &[u8]) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let pickled = matches!(ext.as_str(), "ckpt" | "pt" | "pth" | "bin") || head.starts_with(&[0x80]) || head.starts_with(b"PK\x03\x04");
    if pickled {
        return Err(Error::Weights {
            path: path.to_path_buf(),
            message: "is a pickled PyTorch checkpoint, which Atelier never loads (unpickling runs arbitrary code); \
                      convert it to .safetensors where you trust it, e.g. `python -c \"import torch, safetensors.torch as s; \
                      sd = torch.load('MODEL.ckpt', weights_only=True); s.save_file({k: v.contiguous() for k, v in sd.get('state_dict', sd).items() if hasattr(v, 'contiguous')}, 'MODEL.safetensors')\"`"
                .into(),
        });
    }
    Ok(())
}

/// Which diffusers component a checkpoint key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    Unet,
    Vae,
    TextEncoder,
    TextEncoder2,
}

impl Part {
    /// The weight file diffusers keeps this component in, relative to the folder.
    fn file(self) -> &'static str {
        match self {
            Part::Unet => "unet/diffusion_pytorch_model.safetensors",
            Part::Vae => "vae/diffusion_pytorch_model.safetensors",
            Part::TextEncoder => "text_encoder/model.safetensors",
            Part::TextEncoder2 => "text_encoder_2/model.safetensors",
        }
    }
}

/// Resnet sub-layer names, LDM → diffusers.
fn resnet_sub(rest: &str) -> Option<String> {
    const MAP: &[(&str, &str)] = &[
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    MAP.iter().find_map(|(from, to)| rest.strip_prefix(from).map(|tail| format!("{to}{tail}")))
}

/// `(index, rest)` of `"7.1.proj_in.weight"` → `(7, "1.proj_in.weight")`.
fn index(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// A UNet key (after `model.diffusion_model.`) in diffusers' naming.
fn unet_key(key: &str, cfg: &UNetConfig) -> Option<String> {
    let per = cfg.layers_per_block + 1;
    let levels = cfg.block_out_channels.len();
    let has_attn = |types: &[String], i: usize| types.get(i).is_some_and(|t| t.contains("CrossAttn"));
    let fixed: &[(&str, &str)] =
        &[("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."), ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")];
    if let Some(k) = fixed.iter().find_map(|(from, to)| key.strip_prefix(from).map(|t| format!("{to}{t}"))) {
        return Some(k);
    }
    // SDXL's added (pooled text + size/crop) embedding: a UNet whose config has one.
    if cfg.addition_embed_type.is_some() {
        let added: &[(&str, &str)] = &[("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2.")];
        if let Some(k) = added.iter().find_map(|(from, to)| key.strip_prefix(from).map(|t| format!("{to}{t}"))) {
            return Some(k);
        }
    }
    if let Some(rest) = key.strip_prefix("input_blocks.") {
        let (b, rest) = index(rest)?;
        if b % per == 0 {
            // The downsampler closing level b/per − 1.
            let tail = rest.strip_prefix("0.op.")?;
            return Some(format!("down_blocks.{}.downsamplers.0.conv.{tail}", b / per - 1));
        }
        let (i, j) = ((b - 1) / per, (b - 1) % per);
        let (sub, rest) = index(rest)?;
        return match sub {
            0 => Some(format!("down_blocks.{i}.resnets.{j}.{}", resnet_sub(rest)?)),
            1 if has_attn(&cfg.down_block_types, i) => Some(format!("down_blocks.{i}.attentions.{j}.{rest}")),
            _ => None,
        };
    }
    if let Some(rest) = key.strip_prefix("middle_block.") {
        let (sub, rest) = index(rest)?;
        return match sub {
            0 | 2 => Some(format!("mid_block.resnets.{}.{}", sub / 2, resnet_sub(rest)?)),
            1 => Some(format!("mid_block.attentions.0.{rest}")),
            _ => None,
        };
    }
    if let Some(rest) = key.strip_prefix("output_blocks.") {
        let (b, rest) = index(rest)?;
        let (i, j) = (b / per, b % per);
        let attn = has_attn(&cfg.up_block_types, i);
        let (sub, rest) = index(rest)?;
        let upsampler = if attn { 2 } else { 1 };
        return match sub {
            0 => Some(format!("up_blocks.{i}.resnets.{j}.{}", resnet_sub(rest)?)),
            1 if attn => Some(format!("up_blocks.{i}.attentions.{j}.{rest}")),
            s if s == upsampler && j == per - 1 && i + 1 < levels => Some(format!("up_blocks.{i}.upsamplers.0.{rest}")),
            _ => None,
        };
    }
    None
}

/// A VAE key (after `first_stage_model.`) in diffusers' naming, and whether its weight is
/// a 1×1 convolution that diffusers keeps as a linear layer.
fn vae_key(key: &str, cfg: &VaeConfig) -> Option<(String, bool)> {
    let levels = cfg.block_out_channels.len();
    let (side, rest) = key.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        // quant_conv, post_quant_conv keep their names.
        return (key.starts_with("quant_conv.") || key.starts_with("post_quant_conv.")).then(|| (key.to_string(), false));
    }
    let resnet = |r: &str| -> String { r.replacen("nin_shortcut.", "conv_shortcut.", 1) };
    for (from, to) in [("conv_in.", "conv_in."), ("conv_out.", "conv_out."), ("norm_out.", "conv_norm_out.")] {
        if let Some(t) = rest.strip_prefix(from) {
            return Some((format!("{side}.{to}{t}"), false));
        }
    }
    if let Some(r) = rest.strip_prefix("mid.") {
        if let Some(t) = r.strip_prefix("block_1.") {
            return Some((format!("{side}.mid_block.resnets.0.{}", resnet(t)), false));
        }
        if let Some(t) = r.strip_prefix("block_2.") {
            return Some((format!("{side}.mid_block.resnets.1.{}", resnet(t)), false));
        }
        let t = r.strip_prefix("attn_1.")?;
        for (from, to) in [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")] {
            if let Some(tail) = t.strip_prefix(from) {
                return Some((format!("{side}.mid_block.attentions.0.{to}{tail}"), from != "norm." && tail == "weight"));
            }
        }
        return None;
    }
    let (word, to_blocks) = if side == "encoder" { ("down.", "down_blocks") } else { ("up.", "up_blocks") };
    let (level, r) = index(rest.strip_prefix(word)?)?;
    let i = if side == "encoder" { level } else { levels.checked_sub(1 + level)? };
    if let Some(t) = r.strip_prefix("block.") {
        let (j, t) = index(t)?;
        return Some((format!("{side}.{to_blocks}.{i}.resnets.{j}.{}", resnet(t)), false));
    }
    for (from, to) in [("downsample.", "downsamplers.0."), ("upsample.", "upsamplers.0.")] {
        if let Some(t) = r.strip_prefix(from) {
            return Some((format!("{side}.{to_blocks}.{i}.{to}{t}"), false));
        }
    }
    None
}

/// How an OpenCLIP tensor of SDXL's second text encoder becomes transformers' tensor(s).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Clip2 {
    /// The same tensor under this name.
    Rename(String),
    /// `in_proj_weight` [3C,C] / `in_proj_bias` [3C]: q, k, v in that order on axis 0, written
    /// as `{prefix}{q,k,v}_proj.{suffix}`.
    SplitQkv { prefix: String, suffix: &'static str },
    /// `text_projection` [C,P] (OpenCLIP computes `x @ P`) → this name with shape [P,C].
    Transpose(String),
}

/// An SDXL text-encoder-2 key (after `conditioner.embedders.1.model.`, OpenCLIP names) in
/// transformers' `CLIPTextModelWithProjection` naming.
fn open_clip_key(key: &str) -> Option<Clip2> {
    match key {
        "token_embedding.weight" => return Some(Clip2::Rename("text_model.embeddings.token_embedding.weight".into())),
        "positional_embedding" => return Some(Clip2::Rename("text_model.embeddings.position_embedding.weight".into())),
        "text_projection" => return Some(Clip2::Transpose("text_projection.weight".into())),
        _ => {}
    }
    if let Some(t) = key.strip_prefix("ln_final.") {
        return Some(Clip2::Rename(format!("text_model.final_layer_norm.{t}")));
    }
    let (i, rest) = index(key.strip_prefix("transformer.resblocks.")?)?;
    let layer = format!("text_model.encoder.layers.{i}.");
    match rest {
        "attn.in_proj_weight" => return Some(Clip2::SplitQkv { prefix: format!("{layer}self_attn."), suffix: "weight" }),
        "attn.in_proj_bias" => return Some(Clip2::SplitQkv { prefix: format!("{layer}self_attn."), suffix: "bias" }),
        _ => {}
    }
    const MAP: &[(&str, &str)] =
        &[("attn.out_proj.", "self_attn.out_proj."), ("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2.")];
    MAP.iter().find_map(|(from, to)| rest.strip_prefix(from).map(|tail| Clip2::Rename(format!("{layer}{to}{tail}"))))
}

/// Checkpoint keys with no diffusers counterpart that real files carry: EMA copies, the
/// DDPM schedule buffers, CLIP's position ids, OpenCLIP's `logit_scale` and causal
/// `attn_mask` buffer.
fn ignorable(key: &str) -> bool {
    key.starts_with("model_ema.")
        || key.ends_with("position_ids")
        || ["logit_scale", "attn_mask", "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar"]
            .contains(&key)
}

/// A tensor written under a new name and possibly a new shape. Its bytes are a range of
/// the memory-mapped file (the whole tensor: 1×1 kernels only lose their trailing unit
/// dimensions; or one third of a stacked q/k/v projection) except for a transposed tensor,
/// the one copy.
struct Renamed<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Cow<'a, [u8]>,
}

impl<'a> Renamed<'a> {
    /// The whole tensor `view`, with `shape` (same element count).
    fn whole(view: &TensorView<'a>, shape: Vec<usize>) -> Self {
        Self { dtype: view.dtype(), shape, data: Cow::Borrowed(view.data()) }
    }

    /// `view` [3C, …] split on axis 0 into its three [C, …] parts, in order. A row-major
    /// tensor's axis-0 slices are contiguous byte ranges, so the parts stay in the map.
    fn split3(view: &TensorView<'a>) -> std::result::Result<[Self; 3], String> {
        let shape = view.shape();
        match shape.first() {
            Some(&rows) if rows % 3 == 0 && rows > 0 => {}
            _ => return Err(format!("has shape {shape:?}; q, k and v stacked on axis 0 need a first dimension divisible by 3")),
        }
        let mut part_shape = shape.to_vec();
        part_shape[0] /= 3;
        let data: &'a [u8] = view.data();
        let third = data.len() / 3;
        let part = |k: usize| Self { dtype: view.dtype(), shape: part_shape.clone(), data: Cow::Borrowed(&data[k * third..(k + 1) * third]) };
        Ok([part(0), part(1), part(2)])
    }

    /// `view` [R, C] transposed to [C, R] (a copy; any dtype of whole bytes per element).
    fn transposed(view: &TensorView<'a>) -> std::result::Result<Self, String> {
        let &[rows, cols] = view.shape() else {
            return Err(format!("has shape {:?}; a projection matrix has two dimensions", view.shape()));
        };
        let bits = view.dtype().bitsize();
        if bits % 8 != 0 {
            return Err(format!("is stored as {} ({bits} bits per element), which cannot be transposed byte-wise", view.dtype()));
        }
        let size = bits / 8;
        let src = view.data();
        let mut out = vec![0u8; src.len()];
        for r in 0..rows {
            for c in 0..cols {
                let from = (r * cols + c) * size;
                let to = (c * rows + r) * size;
                out[to..to + size].copy_from_slice(&src[from..from + size]);
            }
        }
        Ok(Self { dtype: view.dtype(), shape: vec![cols, rows], data: Cow::Owned(out) })
    }
}

impl View for Renamed<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes the diffusers folder `out` for the SD 1.x or SDXL base checkpoint `file`, with the
/// configs and tokenizer(s) of the diffusers folder `config` (of the same family). Weights
/// keep the file's dtype (fp16 files give fp16 components; the loader widens them to the
/// compute dtype). The folder appears whole or not at all (written beside it, then renamed).
///
/// # Errors
/// A pickle, a file that is not safetensors or no SD checkpoint, an SD 2.x file or SDXL
/// refiner (not supported yet), a `config` folder that is not a diffusers SD folder or is of
/// the other family (an SD 1.x folder for an SDXL file or the reverse), keys the config does
/// not explain (another architecture: the message names a few), a component with no tensors
/// at all, I/O errors.
pub fn convert(file: &Path, config: &Path, out: &Path) -> Result<()> {
    let handle = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
    // SAFETY: the map is read-only and lives while the views made from it are written; a
    // file changed by another process meanwhile could give wrong numbers, not memory errors
    // in this process beyond what any reader of a changing file sees.
    let map = unsafe { memmap2::Mmap::map(&handle) }.map_err(|e| Error::io(file, e))?;
    refuse_pickle(file, &map[..map.len().min(8)])?;
    let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| Error::Weights {
        path: file.to_path_buf(),
        message: format!("is not a readable safetensors file ({e}); it may be truncated or corrupt — download it again"),
    })?;
    let names = st.names();
    let family = detect(file, &names)?;
    let refuse = |message: String| Error::Weights { path: file.to_path_buf(), message };
    if family == Family::Sd2 {
        return Err(refuse(format!("is an {0} checkpoint; single files of {0} are not supported yet (SD 1.x and SDXL base files are): use its diffusers folder", family.name())));
    }
    if family == Family::Sdxl && !names.iter().any(|n| n.starts_with(XL_TEXT_2)) {
        // The refiner has one text encoder (OpenCLIP, at embedders.0) and another UNet.
        return Err(refuse(format!(
            "is an SDXL checkpoint without the second text encoder ({XL_TEXT_2}…): an SDXL refiner or a partial file; only SDXL base single files are supported: use its diffusers folder"
        )));
    }
    let files = ModelFiles::locate(config)?;
    let (config_family, config_says) = match files.text_encoder_2 {
        Some(_) => (Family::Sdxl, "it has text_encoder_2 and tokenizer_2"),
        None => (Family::Sd1, "it has no text_encoder_2"),
    };
    if config_family != family {
        return Err(refuse(format!(
            "is an {} checkpoint, but the config folder {} is an {} model ({config_says}): pass the diffusers folder of an {} model as the config",
            family.name(),
            config.display(),
            config_family.name(),
            family.name()
        )));
    }
    let unet_cfg: UNetConfig = read_config(&files.unet_config)?;
    let vae_cfg: VaeConfig = read_config(&files.vae_config)?;
    let text = if family == Family::Sdxl { XL_TEXT } else { TEXT };

    let mut parts: BTreeMap<Part, Vec<(String, Renamed)>> = BTreeMap::new();
    let mut unknown = Vec::new();
    for name in names {
        let view = st.tensor(name).map_err(|e| refuse(format!("tensor {name}: {e}")))?;
        let shape = view.shape().to_vec();
        let mapped: Option<Vec<(Part, String, Renamed)>> = if let Some(k) = name.strip_prefix(UNET) {
            unet_key(k, &unet_cfg).map(|n| vec![(Part::Unet, n, Renamed::whole(&view, shape))])
        } else if let Some(k) = name.strip_prefix(VAE) {
            vae_key(k, &vae_cfg).map(|(n, linear)| {
                let shape = if linear && shape.len() == 4 { shape[..2].to_vec() } else { shape };
                vec![(Part::Vae, n, Renamed::whole(&view, shape))]
            })
        } else if let Some(k) = name.strip_prefix(text) {
            Some(if ignorable(k) { Vec::new() } else { vec![(Part::TextEncoder, k.to_string(), Renamed::whole(&view, shape))] })
        } else if let Some(k) = name.strip_prefix(XL_TEXT_2).filter(|_| family == Family::Sdxl) {
            let bad = |why: String| refuse(format!("tensor {name} {why}"));
            match open_clip_key(k) {
                _ if ignorable(k) => Some(Vec::new()),
                Some(Clip2::Rename(n)) => Some(vec![(Part::TextEncoder2, n, Renamed::whole(&view, shape))]),
                Some(Clip2::SplitQkv { prefix, suffix }) => {
                    let [q, k, v] = Renamed::split3(&view).map_err(bad)?;
                    Some(vec![
                        (Part::TextEncoder2, format!("{prefix}q_proj.{suffix}"), q),
                        (Part::TextEncoder2, format!("{prefix}k_proj.{suffix}"), k),
                        (Part::TextEncoder2, format!("{prefix}v_proj.{suffix}"), v),
                    ])
                }
                Some(Clip2::Transpose(n)) => Some(vec![(Part::TextEncoder2, n, Renamed::transposed(&view).map_err(bad)?)]),
                None => None,
            }
        } else {
            None
        };
        match mapped {
            Some(tensors) => {
                for (part, new_name, tensor) in tensors {
                    parts.entry(part).or_default().push((new_name, tensor));
                }
            }
            None if ignorable(name) => {}
            None => unknown.push(name.to_string()),
        }
    }
    if !unknown.is_empty() {
        let n = unknown.len();
        unknown.truncate(4);
        return Err(refuse(format!(
            "has {n} tensor(s) that an {} model with the configs of {} does not have (e.g. {}): the file is another architecture or the config folder does not match it",
            family.name(),
            config.display(),
            unknown.join(", ")
        )));
    }
    let needed: &[(Part, &str)] = match family {
        Family::Sdxl => &[(Part::Unet, UNET), (Part::Vae, VAE), (Part::TextEncoder, XL_TEXT), (Part::TextEncoder2, XL_TEXT_2)],
        _ => &[(Part::Unet, UNET), (Part::Vae, VAE), (Part::TextEncoder, TEXT)],
    };
    if let Some((part, prefix)) = needed.iter().find(|(part, _)| !parts.contains_key(part)) {
        return Err(refuse(format!(
            "has no tensors under {prefix} for {}: an {} checkpoint without that component (e.g. a file saved without its VAE) cannot be converted on its own",
            part.file(),
            family.name()
        )));
    }

    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let leaf = out.file_name().and_then(|n| n.to_str()).unwrap_or("model");
    let staging = parent.join(format!(".{leaf}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let result = write_folder(&files, parts, &staging).and_then(|()| std::fs::rename(&staging, out).map_err(|e| Error::io(out, e)));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

/// The configs, tokenizer(s) and renamed weights under `root`.
fn write_folder(files: &ModelFiles, parts: BTreeMap<Part, Vec<(String, Renamed)>>, root: &Path) -> Result<()> {
    let mut configs = vec![
        ("model_index.json", files.root.join("model_index.json")),
        ("unet/config.json", files.unet_config.clone()),
        ("vae/config.json", files.vae_config.clone()),
        ("text_encoder/config.json", files.text_encoder_config.clone()),
        ("scheduler/scheduler_config.json", files.scheduler_config.clone()),
    ];
    let mut tokenizers = vec![("tokenizer", &files.tokenizer_dir)];
    if let Some(second) = &files.text_encoder_2 {
        configs.push(("text_encoder_2/config.json", second.config.clone()));
        tokenizers.push(("tokenizer_2", &second.tokenizer_dir));
    }
    for (rel, src) in configs {
        copy(&src, &root.join(rel))?;
    }
    for (rel, dir) in tokenizers {
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            if entry.path().is_file() {
                copy(&entry.path(), &root.join(rel).join(entry.file_name()))?;
            }
        }
    }
    for (part, tensors) in parts {
        let path = root.join(part.file());
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        safetensors::serialize_to_file(tensors, None, &path).map_err(|e| Error::Weights { path: path.clone(), message: format!("could not be written: {e}") })?;
    }
    Ok(())
}

fn copy(src: &Path, dst: &Path) -> Result<()> {
    if let Some(dir) = dst.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::copy(src, dst).map_err(|e| Error::io(src, e))?;
    Ok(())
}

/// The diffusers folder for checkpoint `file` with the configs of `config`: converted once
/// into `cache/<short hash>-<file stem>` (A1111's short hash of the file) and reused.
///
/// # Errors
/// As [`convert`].
pub fn materialize(file: &Path, config: &Path, cache: &Path) -> Result<PathBuf> {
    let hash = crate::model::short_hash(file)?;
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    let out = cache.join(format!("{hash}-{stem}"));
    if !out.join("model_index.json").is_file() {
        convert(file, config, &out)?;
    }
    // Which file the folder holds, so PNGs name the checkpoint and its hash as A1111 does.
    let source = SOURCE_FILE;
    if !out.join(source).is_file() {
        let json = serde_json::json!({ "name": stem, "short_hash": hash, "file": file.display().to_string() });
        let path = out.join(source);
        crate::files::write_atomic_with(&path, |tmp| std::fs::write(tmp, json.to_string()).map_err(|e| Error::io(tmp, e)), |e| Error::io(&path, e))?;
    }
    Ok(out)
}

/// The file [`materialize`] writes into a converted folder: `{"name", "short_hash", "file"}`
/// of the checkpoint it came from.
pub const SOURCE_FILE: &str = "atelier_checkpoint.json";

/// The checkpoint a converted folder came from: (name, A1111 short hash), if it says.
pub fn source_of(dir: &Path) -> Option<(String, String)> {
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(SOURCE_FILE)).ok()?).ok()?;
    Some((json.get("name")?.as_str()?.to_string(), json.get("short_hash")?.as_str()?.to_string()))
}

/// Where [`materialize`] keeps converted checkpoints: `~/.cache/atelier/checkpoints`.
pub fn default_cache() -> PathBuf {
    dirs::cache_dir().unwrap_or_else(std::env::temp_dir).join("atelier/checkpoints")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors buffer holding one tensor `t` of `dtype` / `shape` with these bytes.
    fn file(dtype: Dtype, shape: &[usize], bytes: &[u8]) -> Vec<u8> {
        let view = TensorView::new(dtype, shape.to_vec(), bytes).unwrap();
        safetensors::serialize([("t", view)], None).unwrap()
    }

    #[test]
    fn transpose_moves_whole_elements_of_any_width() {
        // [2,3] of 2-byte elements (f16 / bf16): element (r,c) holds bytes [10r+c, 100+10r+c].
        let src: Vec<u8> = (0..2u8).flat_map(|r| (0..3u8).flat_map(move |c| [10 * r + c, 100 + 10 * r + c])).collect();
        for dtype in [Dtype::F16, Dtype::BF16] {
            let buf = file(dtype, &[2, 3], &src);
            let st = safetensors::SafeTensors::deserialize(&buf).unwrap();
            let t = Renamed::transposed(&st.tensor("t").unwrap()).unwrap();
            assert_eq!((t.dtype, t.shape.as_slice()), (dtype, &[3usize, 2][..]));
            let want: Vec<u8> = (0..3u8).flat_map(|c| (0..2u8).flat_map(move |r| [10 * r + c, 100 + 10 * r + c])).collect();
            assert_eq!(&*t.data, &want[..]);
        }
        // f32: the numbers themselves.
        let m: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let buf = file(Dtype::F32, &[3, 2], &m.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>());
        let st = safetensors::SafeTensors::deserialize(&buf).unwrap();
        let t = Renamed::transposed(&st.tensor("t").unwrap()).unwrap();
        let got: Vec<f32> = t.data.chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!((t.shape.as_slice(), got), (&[2usize, 3][..], vec![1.0, 3.0, 5.0, 2.0, 4.0, 6.0]));
        assert!(matches!(t.data, Cow::Owned(_)));
    }

    #[test]
    fn qkv_split_stays_in_the_buffer() {
        let src: Vec<u8> = (0..6 * 2 * 2).map(|i| i as u8).collect();
        let buf = file(Dtype::F16, &[6, 2], &src);
        let st = safetensors::SafeTensors::deserialize(&buf).unwrap();
        let [q, k, v] = Renamed::split3(&st.tensor("t").unwrap()).unwrap();
        for (n, part) in [q, k, v].iter().enumerate() {
            assert_eq!(part.shape, vec![2, 2]);
            assert_eq!(&*part.data, &src[8 * n..8 * (n + 1)]);
            assert!(matches!(part.data, Cow::Borrowed(_)));
        }
        let buf = file(Dtype::F16, &[4], &src[..8]);
        let st = safetensors::SafeTensors::deserialize(&buf).unwrap();
        assert!(Renamed::split3(&st.tensor("t").unwrap()).is_err());
    }

    #[test]
    fn open_clip_names() {
        assert_eq!(open_clip_key("positional_embedding"), Some(Clip2::Rename("text_model.embeddings.position_embedding.weight".into())));
        assert_eq!(open_clip_key("transformer.resblocks.11.mlp.c_proj.bias"), Some(Clip2::Rename("text_model.encoder.layers.11.mlp.fc2.bias".into())));
        assert_eq!(open_clip_key("transformer.resblocks.3.attn.in_proj_bias"), Some(Clip2::SplitQkv { prefix: "text_model.encoder.layers.3.self_attn.".into(), suffix: "bias" }));
        assert_eq!(open_clip_key("text_projection"), Some(Clip2::Transpose("text_projection.weight".into())));
        assert_eq!(open_clip_key("transformer.resblocks.3.attn.something"), None);
        assert!(ignorable("logit_scale") && ignorable("attn_mask"));
    }
}
