//! LoRA adapters: reading kohya and diffusers/PEFT files, checking them against a
//! loaded model, and the per-layer updates they attach.
//!
//! A file is read into an [`LoraAdapter`]: one [`LoraModule`] per adapted layer, with its
//! [`ModuleWeights`] and scale. For a LoRA: `down` (kohya `lora_down`, PEFT `lora_A`),
//! `up` (`lora_up`, `lora_B`) and the scale `alpha / rank` (kohya: the module's `.alpha`
//! tensor; PEFT: `lora_alpha`, `r`, `alpha_pattern`, `use_rslora` from the
//! `lora_adapter_metadata` JSON that diffusers' `save_lora_weights` writes). Linear and
//! convolution layers (LoCon: a k×k `down` kernel and a 1×1 `up` kernel) are both supported.
//!
//! LyCORIS LoHa and LoKr files in kohya naming (`lora_unet_…`, `lora_te_…`/`lora_te1_…`/
//! `lora_te2_…` + `.hada_w1_a` …, `.lokr_w1` …, `.alpha`; LyCORIS `modules/loha.py`,
//! `modules/lokr.py` `weight_list`) are read too, for linear and convolution layers:
//! - LoHa: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/r, r = `hada_w1_b`'s rows (LyCORIS
//!   `make_module_from_state_dict` takes `lora_dim = w1b.size(0)`).
//! - LoKr: ΔW = (w1 ⊗ w2) · scale with w1 = `lokr_w1` or `lokr_w1_a`·`lokr_w1_b`, w2 likewise
//!   (`lokr_w2_b` may be [r, d·k·k] or [r, d, k, k]); scale = alpha/r with r the rank of the
//!   low-rank factor, w1's if both are (LyCORIS takes `w1a.size(1)`, else `w2a.size(1)`),
//!   and scale = 1 when neither factor is low-rank (LyCORIS `LokrModule.__init__`: `if
//!   self.use_w2 and self.use_w1: alpha = lora_dim`; `functional/lokr.py` `diff_weight`:
//!   `rank = gamma` then).
//! - A missing alpha or alpha 0 means alpha = r (scale 1) for both (`alpha = lora_dim if
//!   alpha is None or alpha == 0`), as for kohya LoRA.
//!
//! For a convolution ΔW is reshaped to [out, in, k, k]. The scale is applied once, as
//! LyCORIS' `forward` and `bypass_forward` do. The CP-decomposed (Tucker) conv variants
//! (`hada_t1`/`hada_t2`, `lokr_t2`) and LoHa/LoKr keys in PEFT naming are refused naming
//! the key. How each is applied without merging: see [`crate::layers::DeltaWeights`].
//!
//! Alpha follows kohya's loader (sd-scripts `networks/lora.py`, `LoRAModule.__init__`:
//! `alpha = lora_dim if alpha is None or alpha == 0 else alpha`): a missing alpha and an
//! alpha of 0 both mean alpha = rank, scale 1. The same rule is applied to PEFT's
//! `lora_alpha`, since an adapter scaled by 0 could not have been trained. A negative
//! alpha is loaded as kohya loads it (the adapter acts inverted) with a warning; a
//! non-finite alpha or weight refuses the file, naming the key.
//!
//! Text-encoder keys: `lora_te_` (SD 1.x/2.x) and `lora_te1_` (the first text encoder,
//! written by several trainers for SD 1.x files too) are the model's (first) text encoder;
//! `lora_te2_` / `text_encoder_2.` are SDXL's second. UNet modules may use diffusers' names
//! (`down_blocks_1_attentions_0_…`) or the original LDM/SGM block names kohya writes for
//! SDXL (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`, see [`crate::ldm_names`]).
//! An SDXL LoRA on an SD 1.x/2.x model, or the reverse, is refused at [`LoraAdapter::bind`]
//! naming both sides.
//!
//! The file container is checked before it is read (see [`check_container`]): bytes
//! after the last tensor are ignored with a warning in [`LoraAdapter::warnings`]; a file
//! that ends inside a tensor or a damaged header is refused, saying which.
//!
//! [`LoraAdapter::bind`] resolves every module against the layers of a model (see
//! [`crate::layers::collect_slots`]) and refuses the file, naming what does not fit,
//! when a module does not exist or has the wrong shape (for example an SDXL LoRA on an
//! SD 1.5 model). The bound adapter is then attached, with a weight per adapter and
//! optional per-block weights, by [`crate::pipeline::StableDiffusion::set_loras`]:
//! each layer computes `W x + Σᵢ wᵢ · sᵢ · ΔWᵢ x` (for a LoRA `upᵢ(downᵢ(x))`), so adapters
//! are never merged into each other or into the base weights.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::layers::{AdapterDelta, DeltaWeights, SlotInfo, SlotShape};
use crate::{Error, Result};

/// The model part a module belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder (OpenCLIP bigG).
    TextEncoder2,
}

impl Component {
    /// The key prefix in diffusers/PEFT files.
    pub fn peft_prefix(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }

    /// The key prefix in kohya files.
    pub fn kohya_prefix(self) -> &'static str {
        match self {
            Component::Unet => "lora_unet",
            Component::TextEncoder => "lora_te",
            Component::TextEncoder2 => "lora_te2",
        }
    }
}

/// The two file layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraFormat {
    /// `lora_unet_…` / `lora_te_…` keys with `lora_down` / `lora_up` / `alpha`.
    Kohya,
    /// `unet.…` / `text_encoder.…` keys with `lora_A` / `lora_B`, alpha in the metadata.
    Diffusers,
}

/// How a module is named in its file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum ModuleName {
    /// The layer's checkpoint name (`down_blocks.1.attentions.0…to_q`).
    Dotted(String),
    /// kohya's form: the checkpoint name with `.` replaced by `_`.
    Underscored(String),
}

impl ModuleName {
    fn as_str(&self) -> &str {
        match self {
            ModuleName::Dotted(s) | ModuleName::Underscored(s) => s,
        }
    }
}

/// One factor of a LoKr update: a full matrix or a low-rank product `a · b`.
#[derive(Debug, Clone)]
pub enum KronFactor {
    /// `lokr_w1` [a, c], or `lokr_w2` [b, d] / [b, d, k, k].
    Full(Tensor),
    /// `lokr_w1_a` [a, r] · `lokr_w1_b` [r, c], or `lokr_w2_a` [b, r] · `lokr_w2_b`
    /// [r, d·k·k] (or [r, d, k, k]).
    LowRank { a: Tensor, b: Tensor },
}

impl KronFactor {
    /// The factor as one matrix: [rows, cols] (a kernel [b, d, k, k] stays 4-D).
    pub fn matrix(&self) -> candle_core::Result<Tensor> {
        match self {
            KronFactor::Full(t) => Ok(t.clone()),
            KronFactor::LowRank { a, b } => a.matmul(&b.flatten_from(1)?),
        }
    }

    /// The rank of a low-rank factor (`b`'s rows), `None` for a full matrix.
    pub fn rank(&self) -> Option<usize> {
        match self {
            KronFactor::Full(_) => None,
            KronFactor::LowRank { b, .. } => Some(b.dims()[0]),
        }
    }

    /// Rows and columns (all but the first axis flattened) of the factor.
    fn dims(&self) -> (usize, usize) {
        match self {
            KronFactor::Full(t) => (t.dims()[0], t.elem_count() / t.dims()[0].max(1)),
            KronFactor::LowRank { a, b } => (a.dims()[0], b.elem_count() / b.dims()[0].max(1)),
        }
    }
}

/// The weights of one adapted layer as its file gives them. ΔW is what each adds to the
/// layer's weight before the scale.
#[derive(Debug, Clone)]
pub enum ModuleWeights {
    /// LoRA / LoCon: ΔW = up · down; `down` [r, in] or [r, in, k, k], `up` [out, r] or
    /// [out, r, 1, 1].
    LowRank { down: Tensor, up: Tensor },
    /// LyCORIS LoHa (`hada_w1_a` [out, r₁], `hada_w1_b` [r₁, in·k·k], `hada_w2_a`
    /// [out, r₂], `hada_w2_b` [r₂, in·k·k]): ΔW = (w1a · w1b) ⊙ (w2a · w2b), reshaped to
    /// [out, in, k, k] for a convolution (LyCORIS `functional/loha.py` `diff_weight`,
    /// `modules/loha.py` `get_weight`). `w1b`/`w2b` may also be given as [r, in, k, k].
    Hadamard { w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor },
    /// LyCORIS LoKr: ΔW = w1 ⊗ w2 (Kronecker product; `w1` [a, c], `w2` [b, d] or
    /// [b, d, k, k], out = a·b, in = c·d; LyCORIS `functional/lokr.py` `make_kron`).
    Kronecker { w1: KronFactor, w2: KronFactor },
}

impl ModuleWeights {
    /// "LoRA", "LoHa" or "LoKr".
    pub fn kind(&self) -> &'static str {
        match self {
            ModuleWeights::LowRank { .. } => "LoRA",
            ModuleWeights::Hadamard { .. } => "LoHa",
            ModuleWeights::Kronecker { .. } => "LoKr",
        }
    }

    /// The width of the input the module reads (in·k·k for a convolution).
    fn input_width(&self) -> usize {
        let cols = |t: &Tensor| t.elem_count() / t.dims()[0].max(1);
        match self {
            ModuleWeights::LowRank { down, .. } => down.dims().get(1).copied().unwrap_or(0),
            ModuleWeights::Hadamard { w1b, .. } => cols(w1b),
            ModuleWeights::Kronecker { w1, w2 } => w1.dims().1 * w2.dims().1,
        }
    }
}

/// One adapted layer.
#[derive(Debug, Clone)]
pub struct LoraModule {
    pub component: Component,
    name: ModuleName,
    pub weights: ModuleWeights,
    /// `alpha / r` (or `alpha / √r` for rsLoRA); 1 for a LoKr of two full matrices.
    pub scale: f64,
}

impl LoraModule {
    /// The module's name as written in its file (without the component prefix).
    pub fn file_name(&self) -> &str {
        self.name.as_str()
    }

    /// The module's key stem as its file writes it (`lora_te2_text_model_…` in kohya files,
    /// `text_encoder_2.text_model.…` in diffusers files), for messages.
    pub fn file_key(&self, format: LoraFormat) -> String {
        match format {
            LoraFormat::Kohya => format!("{}_{}", self.component.kohya_prefix(), self.name.as_str()),
            LoraFormat::Diffusers => format!("{}.{}", self.component.peft_prefix(), self.name.as_str()),
        }
    }

    /// The rank `alpha` is divided by: LoRA `down`'s rows, LoHa `hada_w1_b`'s rows, LoKr
    /// the low-rank factor's (`lokr_w1_b`'s rows, else `lokr_w2_b`'s), 0 for a LoKr of
    /// two full matrices.
    pub fn rank(&self) -> usize {
        match &self.weights {
            ModuleWeights::LowRank { down, .. } => down.dims()[0],
            ModuleWeights::Hadamard { w1b, .. } => w1b.dims()[0],
            ModuleWeights::Kronecker { w1, w2 } => w1.rank().or(w2.rank()).unwrap_or(0),
        }
    }

    /// A LoRA module's `down` matrix (`None` for LoHa/LoKr).
    pub fn down(&self) -> Option<&Tensor> {
        match &self.weights {
            ModuleWeights::LowRank { down, .. } => Some(down),
            _ => None,
        }
    }

    /// A LoRA module's `up` matrix (`None` for LoHa/LoKr).
    pub fn up(&self) -> Option<&Tensor> {
        match &self.weights {
            ModuleWeights::LowRank { up, .. } => Some(up),
            _ => None,
        }
    }
}

/// A LoRA file, read but not yet checked against a model.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// The adapter's name (the file stem unless given).
    pub name: String,
    pub path: Option<PathBuf>,
    pub format: LoraFormat,
    /// A1111-style short hash of the file (first 10 hex digits of its sha256).
    pub hash: String,
    /// The file's safetensors metadata.
    pub metadata: BTreeMap<String, String>,
    pub modules: Vec<LoraModule>,
    /// Things the user should know about the file that did not stop it from loading
    /// (extra bytes after the tensors, a negative alpha); shown with each generation.
    pub warnings: Vec<String>,
}

/// The tensors a module can have. kohya files name them by key suffix (LoRA:
/// sd-scripts `networks/lora.py`; LoHa/LoKr: LyCORIS `modules/loha.py` and
/// `modules/lokr.py` `weight_list`, saved as `{lora_name}.{part}`); diffusers/PEFT files
/// have only the first three.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
    HadaW1A,
    HadaW1B,
    HadaW2A,
    HadaW2B,
    LokrW1,
    LokrW1A,
    LokrW1B,
    LokrW2,
    LokrW2A,
    LokrW2B,
}

const PART_COUNT: usize = 13;

/// kohya key suffixes, per part.
const KOHYA_PARTS: [(&str, Part); PART_COUNT] = [
    (".lora_down.weight", Part::Down),
    (".lora_up.weight", Part::Up),
    (".alpha", Part::Alpha),
    (".hada_w1_a", Part::HadaW1A),
    (".hada_w1_b", Part::HadaW1B),
    (".hada_w2_a", Part::HadaW2A),
    (".hada_w2_b", Part::HadaW2B),
    (".lokr_w1", Part::LokrW1),
    (".lokr_w1_a", Part::LokrW1A),
    (".lokr_w1_b", Part::LokrW1B),
    (".lokr_w2", Part::LokrW2),
    (".lokr_w2_a", Part::LokrW2A),
    (".lokr_w2_b", Part::LokrW2B),
];

/// A module's tensors by [`Part`], each with the key it was read from.
type ModuleParts = [Option<(String, Tensor)>; PART_COUNT];

fn lora_err(name: &str, message: impl Into<String>) -> Error {
    Error::Lora { name: name.to_string(), message: message.into() }
}

/// Suffixes of the two matrices and of alpha in diffusers/PEFT files.
const ALPHA: &str = ".alpha";
const PEFT_DOWN: [&str; 3] = [".lora_A.weight", ".lora_A.default.weight", ".lora.down.weight"];
const PEFT_UP: [&str; 3] = [".lora_B.weight", ".lora_B.default.weight", ".lora.up.weight"];
/// kohya key prefixes; `lora_te1_` is the first (here: the only) text encoder.
const KOHYA_PREFIXES: [(&str, Component); 4] = [
    ("lora_unet_", Component::Unet),
    ("lora_te1_", Component::TextEncoder),
    ("lora_te2_", Component::TextEncoder2),
    ("lora_te_", Component::TextEncoder),
];
/// First parts of UNet layer names, for keys without a component prefix.
const UNET_ROOTS: [&str; 6] = ["down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding."];

/// Rewrites the older diffusers spellings of a LoRA key to the current one: PEFT's
/// `base_model.model.` wrapper, `save_attn_procs`' `processor.to_q_lora.down.weight`
/// (diffusers `models/attention_processor.py` LoRAAttnProcessor: `to_q_lora`, …,
/// `to_out_lora` for `to_out.0`) and the text encoder's `lora_linear_layer`
/// (diffusers `models/lora.py` PatchedLoraProjection).
fn normalize_diffusers_key(key: &str) -> String {
    let key = key.strip_prefix("base_model.model.").unwrap_or(key);
    let mut out = key.replace(".lora_linear_layer.", ".lora.");
    for (old, new) in [
        (".processor.to_q_lora.", ".to_q.lora."),
        (".processor.to_k_lora.", ".to_k.lora."),
        (".processor.to_v_lora.", ".to_v.lora."),
        (".processor.to_out_lora.", ".to_out.0.lora."),
    ] {
        out = out.replace(old, new);
    }
    out
}

/// Adapter formats that are recognised but not supported, by a key fragment. Key names
/// from LyCORIS (`lycoris/modules/*.py`: LoHa and LoKr with CP-decomposed (Tucker)
/// convolution kernels `hada_t1`/`hada_t2`, `lokr_t1`/`lokr_t2`, IA³ `on_input`, GLoRA `a1`/`a2`/`b1`/`b2`, OFT/BOFT `oft_blocks`/`oft_diag`, norm
/// tuning `w_norm`/`b_norm`, CP kernels `lora_mid`), kohya sd-scripts (DoRA `dora_scale`)
/// and PEFT (DoRA `lora_magnitude_vector`, IA³ `ia3_l`, OFT `oft_r`, BOFT `boft_R`,
/// VeRA `vera_lambda`).
const UNSUPPORTED: [(&str, &str); 20] = [
    (".hada_t1", "LyCORIS LoHa with CP-decomposed (Tucker) convolution kernels (hada_t1/hada_t2)"),
    (".hada_t2", "LyCORIS LoHa with CP-decomposed (Tucker) convolution kernels (hada_t1/hada_t2)"),
    (".lokr_t1", "LyCORIS LoKr with a CP-decomposed (Tucker) convolution kernel (lokr_t2)"),
    (".lokr_t2", "LyCORIS LoKr with a CP-decomposed (Tucker) convolution kernel (lokr_t2)"),
    (".lora_mid.", "LyCORIS LoCon with a CP-decomposed kernel (lora_mid)"),
    (".dora_scale", "DoRA (weight-decomposed LoRA)"),
    ("lora_magnitude_vector", "DoRA (weight-decomposed LoRA)"),
    (".on_input", "LyCORIS (IA)³"),
    (".ia3_l", "(IA)³"),
    (".a1.weight", "LyCORIS GLoRA"),
    (".b1.weight", "LyCORIS GLoRA"),
    (".oft_blocks", "OFT/BOFT"),
    (".oft_diag", "OFT/BOFT"),
    (".oft_r", "OFT"),
    (".boft_", "BOFT"),
    (".vera_lambda", "VeRA"),
    (".w_norm", "LyCORIS norm tuning"),
    (".b_norm", "LyCORIS norm tuning"),
    (".scalar", "LyCORIS with a trained scalar"),
    (".lora_embedding_A", "PEFT embedding LoRA"),
];

/// The unsupported format a key belongs to, if any.
fn unsupported(key: &str) -> Option<&'static str> {
    if key.ends_with(".diff") || key.ends_with(".diff_b") {
        return Some("a full weight difference (LyCORIS 'full')");
    }
    UNSUPPORTED.iter().find(|(frag, _)| key.contains(frag)).map(|(_, what)| *what)
}

/// What to do with a file in an unsupported format.
const CONVERT_HINT: &str = "only plain LoRA, LoCon and LyCORIS LoHa/LoKr files (without CP-decomposed kernels) are supported; merge it into its base model and extract a plain LoRA \
     (e.g. kohya sd-scripts networks/extract_lora_from_models.py), or use a plain LoRA/LoCon version of it";

/// Evidence in a key that a file was made for SDXL: its second text encoder, its extra
/// embeddings, or transformer depth above 1 (SD 1.x/2.x have one transformer block per
/// attention, SDXL up to ten; diffusers `stable-diffusion-xl-base-1.0/unet/config.json`).
fn sdxl_key(key: &str) -> Option<&'static str> {
    if key.starts_with("lora_te2_") || key.starts_with("text_encoder_2.") {
        return Some("it has keys for SDXL's second text encoder");
    }
    if key.contains("add_embedding") || key.contains("label_emb") {
        return Some("it has keys for SDXL's added (size/crop) embeddings");
    }
    let deep = ["transformer_blocks_", "transformer_blocks."].iter().any(|p| {
        key.match_indices(p).any(|(i, _)| key[i + p.len()..].split(['_', '.']).next().and_then(|n| n.parse::<u32>().ok()).is_some_and(|n| n >= 1))
    });
    deep.then_some("it has transformer blocks deeper than SD 1.x/2.x have")
}

/// The width of SDXL's concatenated text features (768 + 1280), which its UNet's
/// cross-attention keys and values read (diffusers SDXL `unet/config.json`
/// `cross_attention_dim`); SD 1.x reads 768, SD 2.x 1024.
const SDXL_CONTEXT_DIM: usize = 2048;

fn sdxl_refusal(key: &str, why: &str) -> String {
    format!("this is an SDXL LoRA ({why}, e.g. {key}); the loaded model is SD 1.x/2.x — use a LoRA made for SD 1.x/2.x")
}

/// An adapter whose cross-attention reads `width`-wide text features on an SDXL model
/// that reads `context`.
fn sd1_on_sdxl_refusal(key: &str, width: usize, context: usize) -> String {
    let family = match width {
        768 => "an SD 1.x LoRA",
        1024 => "an SD 2.x LoRA",
        _ => "a LoRA for a one-text-encoder (SD 1.x/2.x-style) model",
    };
    format!(
        "this is {family} (its cross-attention reads {width}-wide text features, e.g. {key}); the loaded model is SDXL, which reads {context} — use a LoRA made for SDXL"
    )
}

/// The first non-finite value of a tensor, if any.
fn first_non_finite(t: &Tensor) -> Result<Option<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.into_iter().find(|v| !v.is_finite()))
}

/// Checks the container of a safetensors file (format: an 8-byte little-endian header
/// length N, N bytes of JSON giving each tensor's `data_offsets` [begin, end) relative
/// to byte 8 + N, and the tensor data; <https://github.com/huggingface/safetensors#format>)
/// and returns how many bytes of it hold the header and the tensors, with a warning when
/// bytes follow the last tensor. A file that ends inside its header or a tensor, or whose
/// header is not JSON, is refused with what exactly is wrong.
pub fn check_container(bytes: &[u8]) -> std::result::Result<(usize, Option<String>), String> {
    let len = bytes.len();
    let Some(n) = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]))) else {
        return Err(format!("the file is {len} bytes, too short for a safetensors header: truncated or not a safetensors file — download it again"));
    };
    let looks_like_json = bytes.get(8) == Some(&b'{');
    let header_end = 8u64.saturating_add(n);
    if header_end > len as u64 {
        return Err(if looks_like_json {
            format!("its header needs bytes 8..{header_end} but the file ends at {len}: truncated — download it again")
        } else {
            format!("not a safetensors file (its first 8 bytes give a header length of {n}, the file is {len} bytes; is it a .ckpt/.pt file?)")
        });
    }
    let header_end = header_end as usize;
    let header: Value = serde_json::from_slice(&bytes[8..header_end])
        .map_err(|e| format!("its header is damaged (bytes 8..{header_end} are not valid JSON: {e}) — download it again"))?;
    let Some(entries) = header.as_object() else {
        return Err(format!("its header is damaged (bytes 8..{header_end} are not a JSON object) — download it again"));
    };
    let data_len = (len - header_end) as u64;
    let mut tensors_end = 0;
    // The first tensor (in file order) that runs past the end of the file.
    let mut cut: Option<(&str, u64, u64)> = None;
    for (key, entry) in entries.iter().filter(|(k, _)| k.as_str() != "__metadata__") {
        let offsets = entry.get("data_offsets").and_then(Value::as_array).and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)));
        let Some((begin, end)) = offsets.filter(|(b, e)| b <= e) else {
            return Err(format!("its header is damaged (tensor {key} has no valid data_offsets) — download it again"));
        };
        tensors_end = tensors_end.max(end);
        if end > data_len && cut.is_none_or(|(_, b, _)| begin < b) {
            cut = Some((key, begin, end));
        }
    }
    if let Some((key, begin, end)) = cut {
        let at = |o: u64| header_end as u64 + o;
        return Err(format!("tensor {key} needs bytes {}..{} but the file ends at {len}: truncated — download it again", at(begin), at(end)));
    }
    let used = header_end + tensors_end as usize;
    let warning = (used < len).then(|| {
        format!("{} bytes after the last tensor (file is {len} bytes, tensors end at {used}): loaded, the extra bytes are ignored", len - used)
    });
    Ok((used, warning))
}

impl LoraAdapter {
    /// Reads a `.safetensors` LoRA file (kohya or diffusers/PEFT layout, detected from its keys).
    pub fn load(path: &Path) -> Result<Self> {
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("lora").to_string();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (used, warning) = check_container(&bytes).map_err(|why| lora_err(&name, format!("{}: {why}", path.display())))?;
        let not_readable = |e: &dyn std::fmt::Display| {
            lora_err(&name, format!("{} is not a readable safetensors file: its header is damaged ({e}) — download it again", path.display()))
        };
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes[..used]).map_err(|e| not_readable(&e))?;
        let metadata: BTreeMap<String, String> =
            meta.metadata().as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(&bytes[..used], &Device::Cpu).map_err(|e| not_readable(&e))?;
        let hash = {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(&bytes);
            digest.iter().take(5).map(|b| format!("{b:02x}")).collect()
        };
        let mut adapter = Self::from_tensors(&name, tensors, metadata)?;
        adapter.path = Some(path.to_path_buf());
        adapter.hash = hash;
        adapter.warnings.splice(0..0, warning.map(|w| format!("LoRA {name}: {w}")));
        Ok(adapter)
    }

    /// Builds an adapter from a file's tensors and metadata.
    pub fn from_tensors(name: &str, tensors: HashMap<String, Tensor>, metadata: BTreeMap<String, String>) -> Result<Self> {
        if tensors.is_empty() {
            return Err(lora_err(name, "the file holds no tensors"));
        }
        let mut keys: Vec<&String> = tensors.keys().collect();
        keys.sort();
        for key in &keys {
            if let Some(what) = unsupported(key) {
                return Err(lora_err(name, format!("this is a {what} file (key {key}), which is not supported: {CONVERT_HINT}")));
            }
        }
        let format = if tensors.keys().any(|k| KOHYA_PREFIXES.iter().any(|(p, _)| k.starts_with(p))) {
            LoraFormat::Kohya
        } else {
            LoraFormat::Diffusers
        };
        if format == LoraFormat::Diffusers {
            if let Some(key) = keys.iter().find(|k| k.contains(".hada_") || k.contains(".lokr_")) {
                let what = if key.contains(".hada_") { "LoHa" } else { "LoKr" };
                return Err(lora_err(
                    name,
                    format!(
                        "this is a LyCORIS {what} file in diffusers/PEFT naming (key {key}), which is not supported: LoHa/LoKr files are read in kohya/LyCORIS naming (lora_unet_…, lora_te_… keys)"
                    ),
                ));
            }
        }
        let peft = PeftConfigs::from_metadata(name, &metadata)?;
        // Group keys by module.
        let mut groups: BTreeMap<(Component, ModuleName), ModuleParts> = BTreeMap::new();
        let mut unknown = Vec::new();
        for key in &keys {
            let t = &tensors[*key];
            match split_key(key, format) {
                Some((component, module, part)) => {
                    let slot = &mut groups.entry((component, module.clone())).or_default()[part as usize];
                    if slot.is_some() {
                        return Err(lora_err(
                            name,
                            format!("key {key} repeats a tensor already given for {}.{} (e.g. under both lora_te_ and lora_te1_)", component.peft_prefix(), module.as_str()),
                        ));
                    }
                    *slot = Some(((*key).clone(), t.clone()));
                }
                None => unknown.push((*key).clone()),
            }
        }
        if !unknown.is_empty() {
            unknown.sort();
            return Err(lora_err(
                name,
                format!(
                    "{} key(s) are not LoRA weights for a UNet or text encoder in the {} layout, e.g. {}",
                    unknown.len(),
                    match format {
                        LoraFormat::Kohya => "kohya",
                        LoraFormat::Diffusers => "diffusers/PEFT",
                    },
                    unknown.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        let mut modules = Vec::with_capacity(groups.len());
        let mut warnings = Vec::new();
        let mut negative = Vec::new();
        for ((component, module), mut parts) in groups {
            let what = format!("{}.{}", component.peft_prefix(), module.as_str());
            for (key, t) in parts.iter().flatten().filter(|(k, _)| !k.ends_with(ALPHA)) {
                if let Some(v) = first_non_finite(t)? {
                    return Err(lora_err(name, format!("tensor {key} holds {v} (a non-finite weight); the file is damaged — download or re-export it")));
                }
            }
            let alpha = parts[Part::Alpha as usize].take();
            let (alpha, alpha_source) = match alpha {
                Some((key, a)) => {
                    let values = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                    match values.as_slice() {
                        [v] => (Some(*v), key),
                        _ => return Err(lora_err(name, format!("tensor {key} should hold one alpha but holds {} values", values.len()))),
                    }
                }
                None => (
                    peft.get(&component).and_then(|c| c.alpha_for(module.as_str())),
                    format!("{}.lora_alpha in lora_adapter_metadata", component.peft_prefix()),
                ),
            };
            if let Some(a) = alpha.filter(|a| !a.is_finite()) {
                return Err(lora_err(name, format!("alpha {alpha_source} is {a} (not a finite number); the file is damaged — download or re-export it")));
            }
            if alpha.is_some_and(|a| a < 0.0) {
                negative.push(alpha_source);
            }
            let weights = module_weights(name, &what, &mut parts)?;
            let rslora = peft.get(&component).is_some_and(|c| c.use_rslora);
            // kohya and LyCORIS: a missing alpha or alpha 0 means alpha = rank (see the
            // module doc); a LoKr without a low-rank factor has scale 1.
            let rank = match &weights {
                ModuleWeights::LowRank { down, .. } => Some(down.dims()[0]),
                ModuleWeights::Hadamard { w1b, .. } => Some(w1b.dims()[0]),
                ModuleWeights::Kronecker { w1, w2 } => w1.rank().or(w2.rank()),
            };
            let scale = match (alpha.filter(|a| *a != 0.0), rank) {
                (None, _) | (_, None) => 1.0,
                (Some(a), Some(r)) if rslora => a / (r as f64).sqrt(),
                (Some(a), Some(r)) => a / r as f64,
            };
            modules.push(LoraModule { component, name: module, weights, scale });
        }
        if !negative.is_empty() {
            warnings.push(format!(
                "LoRA {name}: {} module(s) have a negative alpha (e.g. {}): they act inverted, as kohya's loader applies them",
                negative.len(),
                negative[0]
            ));
        }
        Ok(Self { name: name.to_string(), path: None, format, hash: String::new(), metadata, modules, warnings })
    }

    /// Checks every module against the layers of a model and prepares it on `device`.
    /// `slots` are the model's layers per component. Fails, naming the modules, when
    /// any module has no layer or a layer of another shape.
    pub fn bind(this: &Arc<Self>, slots: &ModelSlots, device: &Device, dtype: DType) -> Result<BoundLora> {
        let s = this.as_ref();
        if !slots.has(Component::TextEncoder2) {
            // An SDXL LoRA on an SD 1.x/2.x model: say so rather than list missing layers.
            for m in &s.modules {
                let key = m.file_key(s.format);
                if let Some(why) = sdxl_key(&key) {
                    return Err(lora_err(&s.name, sdxl_refusal(&key, why)));
                }
            }
        }
        let mut bound = Vec::with_capacity(s.modules.len());
        let mut missing = Vec::new();
        let mut mismatched = Vec::new();
        for m in &s.modules {
            let Some(index) = slots.find(m.component, &m.name) else {
                missing.push(format!("{}.{}", m.component.peft_prefix(), m.name.as_str()));
                continue;
            };
            let info = &slots.slots[index].1;
            match fit(m, info.shape) {
                Ok(delta) => bound.push(BoundModule {
                    slot: index,
                    block: block_of(m.component, &info.name),
                    delta: delta.map(|t| t.to_device(device)?.to_dtype(dtype))?,
                    scale: m.scale,
                }),
                Err(why) => mismatched.push(format!("{} ({why})", info.name)),
            }
        }
        let sdxl = s.modules.iter().find(|m| {
            let n = m.name.as_str();
            (n.contains("attn2_to_k") || n.contains("attn2.to_k") || n.contains("attn2_to_v") || n.contains("attn2.to_v"))
                && m.weights.input_width() == SDXL_CONTEXT_DIM
        });
        let broken = !missing.is_empty() || !mismatched.is_empty();
        if let Some(m) = sdxl.filter(|_| broken && !slots.has(Component::TextEncoder2)) {
            let why = format!("its cross-attention reads {SDXL_CONTEXT_DIM}-wide text features, SDXL's width");
            return Err(lora_err(&s.name, sdxl_refusal(&m.file_key(s.format), &why)));
        }
        if broken && slots.has(Component::TextEncoder2) {
            // The width the model's cross-attention reads (its text features).
            let context = slots.iter().find_map(|(c, info)| match info.shape {
                SlotShape::Linear { in_dim, .. } if c == Component::Unet && info.name.ends_with("attn2.to_k") => Some(in_dim),
                _ => None,
            });
            let narrow = s.modules.iter().find_map(|m| {
                let n = m.name.as_str();
                let kv = n.contains("attn2_to_k") || n.contains("attn2.to_k") || n.contains("attn2_to_v") || n.contains("attn2.to_v");
                let width = m.weights.input_width();
                (kv && Some(width) != context && m.component == Component::Unet).then(|| (m.file_key(s.format), width))
            });
            if let (Some((key, width)), Some(context)) = (narrow, context) {
                return Err(lora_err(&s.name, sd1_on_sdxl_refusal(&key, width, context)));
            }
        }
        if !missing.is_empty() {
            let hint = "it was made for a different base model architecture";
            return Err(lora_err(
                &s.name,
                format!(
                    "{} of {} module(s) do not exist in this model ({hint}), e.g. {}",
                    missing.len(),
                    s.modules.len(),
                    missing.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        if !mismatched.is_empty() {
            return Err(lora_err(
                &s.name,
                format!(
                    "{} module(s) have shapes that do not fit this model (it was made for a different base model), e.g. {}",
                    mismatched.len(),
                    mismatched.iter().take(3).cloned().collect::<Vec<_>>().join("; ")
                ),
            ));
        }
        Ok(BoundLora { adapter: this.clone(), modules: bound })
    }
}

/// Takes a part of a module, as f32.
fn take(parts: &mut ModuleParts, part: Part) -> Result<Option<Tensor>> {
    Ok(match parts[part as usize].take() {
        Some((_, t)) => Some(t.to_dtype(DType::F32)?),
        None => None,
    })
}

/// Columns of a tensor read as a matrix (all axes after the first flattened).
fn cols(t: &Tensor) -> usize {
    t.elem_count() / t.dims().first().copied().unwrap_or(1).max(1)
}

/// Builds a module's weights from its parts: one LoRA, LoHa or LoKr module whose
/// matrices multiply, or an error naming the module, the tensors and their shapes.
fn module_weights(name: &str, what: &str, parts: &mut ModuleParts) -> Result<ModuleWeights> {
    use Part::*;
    let first_key = |parts: &ModuleParts, ps: &[Part]| ps.iter().find_map(|p| parts[*p as usize].as_ref().map(|(k, _)| k.clone()));
    let kinds: Vec<(&str, String)> = [
        ("LoRA (lora_down/lora_up)", first_key(parts, &[Down, Up])),
        ("LyCORIS LoHa (hada_…)", first_key(parts, &[HadaW1A, HadaW1B, HadaW2A, HadaW2B])),
        ("LyCORIS LoKr (lokr_…)", first_key(parts, &[LokrW1, LokrW1A, LokrW1B, LokrW2, LokrW2A, LokrW2B])),
    ]
    .into_iter()
    .filter_map(|(kind, key)| key.map(|k| (kind, k)))
    .collect();
    if let [(a, ka), (b, kb), ..] = kinds.as_slice() {
        return Err(lora_err(name, format!("module {what} mixes {a} keys ({ka}) with {b} keys ({kb}), which is not supported: each module must be one kind of adapter")));
    }
    let err = |m: String| lora_err(name, format!("module {what}: {m}"));
    match kinds.first().map(|(k, _)| *k) {
        Some(k) if k.contains("LoHa") => {
            let t = [take(parts, HadaW1A)?, take(parts, HadaW1B)?, take(parts, HadaW2A)?, take(parts, HadaW2B)?];
            let missing: Vec<&str> = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"].into_iter().zip(&t).filter(|(_, t)| t.is_none()).map(|(n, _)| n).collect();
            let [Some(w1a), Some(w1b), Some(w2a), Some(w2b)] = t else {
                return Err(err(format!("a LoHa needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b; {} missing", missing.join(", "))));
            };
            for (n, a, b) in [("1", &w1a, &w1b), ("2", &w2a, &w2b)] {
                if a.rank() != 2 || !matches!(b.rank(), 2 | 4) || a.dims()[1] != b.dims()[0] || a.dims()[1] == 0 {
                    return Err(err(format!(
                        "LoHa hada_w{n}_a {:?} and hada_w{n}_b {:?} do not multiply (hada_w{n}_a must be [out, r] and hada_w{n}_b [r, in] or [r, in, k, k])",
                        a.dims(),
                        b.dims()
                    )));
                }
            }
            if w1a.dims()[0] != w2a.dims()[0] || w1b.dims()[1..] != w2b.dims()[1..] {
                return Err(err(format!(
                    "LoHa hada_w1_a·hada_w1_b is {:?} but hada_w2_a·hada_w2_b is {:?} (from hada_w1_a {:?}, hada_w1_b {:?}, hada_w2_a {:?}, hada_w2_b {:?}); the two products must have one shape",
                    [&w1a.dims()[..1], &w1b.dims()[1..]].concat(),
                    [&w2a.dims()[..1], &w2b.dims()[1..]].concat(),
                    w1a.dims(),
                    w1b.dims(),
                    w2a.dims(),
                    w2b.dims()
                )));
            }
            Ok(ModuleWeights::Hadamard { w1a, w1b, w2a, w2b })
        }
        Some(k) if k.contains("LoKr") => {
            let mut factor = |n: &str, full: Part, a: Part, b: Part, kernel_ok: bool| -> Result<KronFactor> {
                match (take(parts, full)?, take(parts, a)?, take(parts, b)?) {
                    (Some(f), None, None) => {
                        if f.rank() == 2 || (kernel_ok && f.rank() == 4) {
                            Ok(KronFactor::Full(f))
                        } else {
                            Err(err(format!("LoKr lokr_w{n} is {:?}, not a matrix{}", f.dims(), if kernel_ok { " or a [b, d, k, k] kernel" } else { "" })))
                        }
                    }
                    (None, Some(fa), Some(fb)) => {
                        let b_ok = fb.rank() == 2 || (kernel_ok && fb.rank() == 4);
                        if fa.rank() != 2 || !b_ok || fa.dims()[1] != fb.dims()[0] || fb.dims()[0] == 0 {
                            return Err(err(format!("LoKr lokr_w{n}_a {:?} and lokr_w{n}_b {:?} do not multiply (lokr_w{n}_a must be [rows, r] and lokr_w{n}_b [r, cols])", fa.dims(), fb.dims())));
                        }
                        Ok(KronFactor::LowRank { a: fa, b: fb })
                    }
                    (None, None, None) => Err(err(format!("a LoKr needs lokr_w{n}, or lokr_w{n}_a and lokr_w{n}_b; none is given"))),
                    (Some(_), _, _) => Err(err(format!("LoKr gives both lokr_w{n} and lokr_w{n}_a/lokr_w{n}_b; a file has one or the other"))),
                    (None, fa, _) => Err(err(format!("LoKr lokr_w{n}_{} is given without lokr_w{n}_{}", if fa.is_some() { "a" } else { "b" }, if fa.is_some() { "b" } else { "a" }))),
                }
            };
            let w1 = factor("1", LokrW1, LokrW1A, LokrW1B, false)?;
            let w2 = factor("2", LokrW2, LokrW2A, LokrW2B, true)?;
            Ok(ModuleWeights::Kronecker { w1, w2 })
        }
        _ => {
            let (Some(down), Some(up)) = (take(parts, Down)?, take(parts, Up)?) else {
                return Err(lora_err(name, format!("module {what} lacks its down or up matrix")));
            };
            let rank = down.dims().first().copied().unwrap_or(0);
            if rank == 0 || up.dims().get(1) != Some(&rank) || !matches!(down.rank(), 2 | 4) || down.rank() != up.rank() {
                return Err(lora_err(name, format!("module {what}: down {:?} and up {:?} are not a rank-r pair", down.dims(), up.dims())));
            }
            Ok(ModuleWeights::LowRank { down, up })
        }
    }
}

/// Splits a key into its component, module name and part.
fn split_key(key: &str, format: LoraFormat) -> Option<(Component, ModuleName, Part)> {
    match format {
        LoraFormat::Kohya => {
            let (stem, part) = KOHYA_PARTS.iter().find_map(|(suffix, part)| key.strip_suffix(suffix).map(|s| (s, *part)))?;
            KOHYA_PREFIXES
                .iter()
                .find_map(|(p, c)| stem.strip_prefix(p).map(|rest| (*c, ModuleName::Underscored(rest.to_string()), part)))
        }
        LoraFormat::Diffusers => {
            let key = normalize_diffusers_key(key);
            let (stem, part) = if let Some(s) = PEFT_DOWN.iter().find_map(|suf| key.strip_suffix(suf)) {
                (s, Part::Down)
            } else if let Some(s) = PEFT_UP.iter().find_map(|suf| key.strip_suffix(suf)) {
                (s, Part::Up)
            } else {
                (key.strip_suffix(ALPHA)?, Part::Alpha)
            };
            for c in [Component::Unet, Component::TextEncoder, Component::TextEncoder2] {
                if let Some(rest) = stem.strip_prefix(c.peft_prefix()).and_then(|r| r.strip_prefix('.')) {
                    return Some((c, ModuleName::Dotted(rest.to_string()), part));
                }
            }
            // Files saved from one component alone (PEFT `get_peft_model_state_dict`,
            // diffusers `save_attn_procs`) have no component prefix.
            let component = if UNET_ROOTS.iter().any(|r| stem.starts_with(r)) {
                Component::Unet
            } else if stem.starts_with("text_model.") {
                Component::TextEncoder
            } else {
                return None;
            };
            Some((component, ModuleName::Dotted(stem.to_string()), part))
        }
    }
}

/// The update a module adds to a layer of `shape`, in the form the layer applies it (see
/// [`DeltaWeights`]), or why it does not fit.
fn fit(m: &LoraModule, shape: SlotShape) -> std::result::Result<DeltaWeights, String> {
    let e = |e: candle_core::Error| e.to_string();
    let layer = match shape {
        SlotShape::Linear { in_dim, out_dim } => format!("layer is linear {in_dim}→{out_dim}"),
        SlotShape::Conv { in_c, out_c, kernel } => format!("layer is a {kernel}×{kernel} convolution {in_c}→{out_c}"),
    };
    match &m.weights {
        ModuleWeights::LowRank { down, up } => {
            let (d, u) = (down.dims(), up.dims());
            let r = d[0];
            let reshape = |t: &Tensor, s: &[usize]| t.reshape(s).map_err(e);
            let (down, up) = match shape {
                SlotShape::Linear { in_dim, out_dim } => {
                    let ok_down = d == [r, in_dim] || d == [r, in_dim, 1, 1];
                    let ok_up = u == [out_dim, r] || u == [out_dim, r, 1, 1];
                    if !(ok_down && ok_up) {
                        return Err(format!("{layer}, LoRA has down {d:?} up {u:?}"));
                    }
                    (reshape(down, &[r, in_dim])?, reshape(up, &[out_dim, r])?)
                }
                SlotShape::Conv { in_c, out_c, kernel } => {
                    let ok_down = d == [r, in_c, kernel, kernel] || (kernel == 1 && d == [r, in_c]);
                    let ok_up = u == [out_c, r, 1, 1] || (u == [out_c, r]);
                    if !(ok_down && ok_up) {
                        return Err(format!("{layer}, LoRA has down {d:?} up {u:?}"));
                    }
                    (reshape(down, &[r, in_c, kernel, kernel])?, reshape(up, &[out_c, r, 1, 1])?)
                }
            };
            Ok(DeltaWeights::LowRank { down, up })
        }
        ModuleWeights::Hadamard { w1a, w1b, w2a, w2b } => {
            let (out, n) = (w1a.dims()[0], cols(w1b));
            let kernel_of_b = w1b.dims().get(2..).filter(|k| !k.is_empty()).map(|k| k.to_vec());
            let (expected_out, expected_n, kernel, full) = match shape {
                SlotShape::Linear { in_dim, out_dim } => (out_dim, in_dim, 1, vec![out_dim, in_dim]),
                SlotShape::Conv { in_c, out_c, kernel } => (out_c, in_c * kernel * kernel, kernel, vec![out_c, in_c, kernel, kernel]),
            };
            let kernel_ok = kernel_of_b.as_ref().is_none_or(|k| k == &[kernel, kernel]);
            if out != expected_out || n != expected_n || !kernel_ok {
                return Err(format!(
                    "{layer}, LoHa ΔW is {:?} (hada_w1_a {:?}, hada_w1_b {:?})",
                    [&w1a.dims()[..1], &w1b.dims()[1..]].concat(),
                    w1a.dims(),
                    w1b.dims()
                ));
            }
            let (r1, r2) = (w1b.dims()[0], w2b.dims()[0]);
            let (b1, b2) = (w1b.flatten_from(1).map_err(e)?, w2b.flatten_from(1).map_err(e)?);
            let conv = matches!(shape, SlotShape::Conv { .. });
            if r1 * r2 * (out + n) < out * n {
                // (A₁B₁) ⊙ (A₂B₂) = Σᵢⱼ (A₁[:, i] ⊙ A₂[:, j]) (B₁[i, :] ⊙ B₂[j, :]): a rank r₁·r₂ LoRA
                // with up[:, i·r₂+j] = A₁[:, i]·A₂[:, j] and down[i·r₂+j, :] = B₁[i, :]·B₂[j, :].
                let up = w1a.reshape((out, r1, 1)).and_then(|a| a.broadcast_mul(&w2a.reshape((out, 1, r2))?)).map_err(e)?;
                let down = b1.reshape((r1, 1, n)).and_then(|b| b.broadcast_mul(&b2.reshape((1, r2, n))?)).map_err(e)?;
                let r = r1 * r2;
                let (up, down) = if conv {
                    (up.reshape((out, r, 1, 1)).map_err(e)?, down.reshape([&[r][..], &full[1..]].concat()).map_err(e)?)
                } else {
                    (up.reshape((out, r)).map_err(e)?, down.reshape((r, n)).map_err(e)?)
                };
                Ok(DeltaWeights::LowRank { down, up })
            } else {
                let w1 = w1a.matmul(&b1).map_err(e)?;
                let w2 = w2a.matmul(&b2).map_err(e)?;
                Ok(DeltaWeights::Dense { delta: (w1 * w2).and_then(|d| d.reshape(full)).map_err(e)? })
            }
        }
        ModuleWeights::Kronecker { w1, w2 } => {
            let w1 = w1.matrix().map_err(e)?;
            let w2 = w2.matrix().map_err(e)?;
            let (a, c) = (w1.dims()[0], w1.dims()[1]);
            let b = w2.dims()[0];
            let refuse = || format!("{layer}, LoKr has w1 {:?} ⊗ w2 {:?}", w1.dims(), w2.dims());
            match shape {
                SlotShape::Linear { in_dim, out_dim } => {
                    let d = cols(&w2);
                    let w2_ok = w2.rank() == 2 || w2.dims()[2..].iter().all(|k| *k == 1);
                    if a * b != out_dim || c * d != in_dim || !w2_ok {
                        return Err(refuse());
                    }
                    Ok(DeltaWeights::Kron { w1, w2: w2.reshape((b, d)).map_err(e)? })
                }
                SlotShape::Conv { in_c, out_c, kernel } => {
                    let fits = a * b == out_c
                        && c > 0
                        && in_c % c == 0
                        && match w2.dims() {
                            [_, d, kh, kw] => c * d == in_c && *kh == kernel && *kw == kernel,
                            [_, n] => *n == in_c / c * kernel * kernel,
                            _ => false,
                        };
                    if !fits {
                        return Err(refuse());
                    }
                    Ok(DeltaWeights::Kron { w1, w2: w2.reshape((b, in_c / c, kernel, kernel)).map_err(e)? })
                }
            }
        }
    }
}

/// The alpha settings of one component from diffusers' `lora_adapter_metadata`.
#[derive(Debug, Clone, Default)]
struct PeftConfig {
    lora_alpha: Option<f64>,
    alpha_pattern: Vec<(String, f64)>,
    use_rslora: bool,
}

impl PeftConfig {
    /// `alpha_pattern` entries match a module whose name is the pattern or ends with
    /// `.pattern`; otherwise `lora_alpha`.
    fn alpha_for(&self, module: &str) -> Option<f64> {
        self.alpha_pattern
            .iter()
            .find(|(p, _)| module == p || module.ends_with(&format!(".{p}")))
            .map(|(_, a)| *a)
            .or(self.lora_alpha)
    }
}

struct PeftConfigs(HashMap<Component, PeftConfig>);

impl PeftConfigs {
    fn from_metadata(name: &str, metadata: &BTreeMap<String, String>) -> Result<Self> {
        let mut out = HashMap::new();
        let Some(text) = metadata.get("lora_adapter_metadata") else { return Ok(Self(out)) };
        let json: Value = serde_json::from_str(text)
            .map_err(|e| lora_err(name, format!("its lora_adapter_metadata is not valid JSON ({e})")))?;
        for c in [Component::Unet, Component::TextEncoder, Component::TextEncoder2] {
            let get = |k: &str| json.get(format!("{}.{k}", c.peft_prefix()));
            let Some(alpha) = get("lora_alpha") else { continue };
            if get("use_dora").and_then(Value::as_bool) == Some(true) {
                return Err(lora_err(name, "DoRA adapters are not supported; use a plain LoRA"));
            }
            let alpha_pattern = get("alpha_pattern")
                .and_then(Value::as_object)
                .map(|m| m.iter().filter_map(|(k, v)| v.as_f64().map(|a| (k.clone(), a))).collect())
                .unwrap_or_default();
            out.insert(
                c,
                PeftConfig {
                    lora_alpha: alpha.as_f64(),
                    alpha_pattern,
                    use_rslora: get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
                },
            );
        }
        Ok(Self(out))
    }

    fn get(&self, c: &Component) -> Option<&PeftConfig> {
        self.0.get(c)
    }
}

pub use atelier_blend::{Block, BlockWeights};

fn block_of(component: Component, name: &str) -> Block {
    Block::of_layer(component != Component::Unet, name)
}

/// The layers of a loaded model that adapters can attach to.
#[derive(Debug, Default)]
pub struct ModelSlots {
    slots: Vec<(Component, SlotInfo)>,
    dotted: HashMap<(Component, String), usize>,
    underscored: HashMap<(Component, String), usize>,
}

impl ModelSlots {
    pub fn new(parts: Vec<(Component, Vec<SlotInfo>)>) -> Self {
        let mut out = Self::default();
        for (component, infos) in parts {
            for info in infos {
                let i = out.slots.len();
                out.dotted.insert((component, info.name.clone()), i);
                out.underscored.insert((component, info.name.replace('.', "_")), i);
                out.slots.push((component, info));
            }
        }
        out
    }

    /// The index of the layer `name` (checkpoint name) of `component`.
    pub fn index_of(&self, component: Component, name: &str) -> Option<usize> {
        self.dotted.get(&(component, name.to_string())).copied()
    }

    /// The layer at `index` (from [`Self::index_of`]).
    pub fn get(&self, index: usize) -> Option<(Component, &SlotInfo)> {
        self.slots.get(index).map(|(c, s)| (*c, s))
    }

    /// Registers the original LDM/SGM names of the UNet's layers (`input_blocks.4.1.…`,
    /// see [`crate::ldm_names::unet_to_ldm`]) as aliases, dotted and underscored, so kohya
    /// files that name SDXL blocks that way find their layers.
    pub fn add_ldm_aliases(&mut self, config: &crate::unet::UNetConfig) {
        for (i, (component, info)) in self.slots.iter().enumerate() {
            if *component != Component::Unet {
                continue;
            }
            if let Some(ldm) = crate::ldm_names::unet_to_ldm(&info.name, config) {
                self.underscored.entry((Component::Unet, ldm.replace('.', "_"))).or_insert(i);
                self.dotted.entry((Component::Unet, ldm)).or_insert(i);
            }
        }
    }

    /// Whether the model has layers of `component` (SDXL models have `TextEncoder2`).
    pub fn has(&self, component: Component) -> bool {
        self.slots.iter().any(|(c, _)| *c == component)
    }

    fn find(&self, component: Component, name: &ModuleName) -> Option<usize> {
        match name {
            ModuleName::Dotted(n) => self.dotted.get(&(component, n.clone())).copied(),
            ModuleName::Underscored(n) => self.underscored.get(&(component, n.clone())).copied(),
        }
    }

    /// Every layer, with its component.
    pub fn iter(&self) -> impl Iterator<Item = (Component, &SlotInfo)> {
        self.slots.iter().map(|(c, s)| (*c, s))
    }

    /// Attaches the given adapters (replacing whatever was attached before).
    pub fn attach(&self, active: &[ActiveLora]) {
        let mut per_slot: Vec<Vec<AdapterDelta>> = vec![Vec::new(); self.slots.len()];
        for a in active {
            for m in &a.lora.modules {
                let w = atelier_blend::weights::effective_scale(a.weight, &a.blocks, m.block);
                if w != 0.0 {
                    per_slot[m.slot].push(AdapterDelta { weights: m.delta.clone(), scale: w * m.scale });
                }
            }
        }
        for ((_, info), deltas) in self.slots.iter().zip(per_slot) {
            info.slot.set_deltas(deltas);
        }
    }
}

/// One module of a bound adapter.
#[derive(Debug, Clone)]
pub struct BoundModule {
    slot: usize,
    pub block: Block,
    /// ΔW in the layer's shapes, on the model's device and in its dtype.
    pub delta: DeltaWeights,
    pub scale: f64,
}

impl BoundModule {
    /// A low-rank module for the layer at `slot` of `slots` (shapes already checked by the caller).
    pub fn new(slots: &ModelSlots, slot: usize, down: Tensor, up: Tensor, scale: f64) -> Option<Self> {
        let (component, info) = slots.get(slot)?;
        Some(Self { slot, block: block_of(component, &info.name), delta: DeltaWeights::LowRank { down, up }, scale })
    }

    /// The index of the layer this module attaches to.
    pub fn slot(&self) -> usize {
        self.slot
    }
}

/// An adapter checked against one model, on that model's device.
#[derive(Debug, Clone)]
pub struct BoundLora {
    pub adapter: Arc<LoraAdapter>,
    pub modules: Vec<BoundModule>,
}

/// An adapter with its weight and block weights, as a generation uses it.
#[derive(Debug, Clone)]
pub struct ActiveLora {
    pub lora: Arc<BoundLora>,
    /// May be negative (steers away from the style).
    pub weight: f64,
    pub blocks: BlockWeights,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], offset: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + offset).sin()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn module(weights: ModuleWeights) -> LoraModule {
        LoraModule { component: Component::Unet, name: ModuleName::Underscored("x".into()), weights, scale: 1.0 }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn lycoris_keys_split_into_module_and_part() {
        let q = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
        let te = "text_model_encoder_layers_0_self_attn_q_proj";
        for (key, component, name, part) in [
            (format!("lora_unet_{q}.hada_w1_a"), Component::Unet, q, Part::HadaW1A),
            (format!("lora_unet_{q}.hada_w2_b"), Component::Unet, q, Part::HadaW2B),
            (format!("lora_te_{te}.lokr_w1"), Component::TextEncoder, te, Part::LokrW1),
            (format!("lora_te1_{te}.lokr_w1_a"), Component::TextEncoder, te, Part::LokrW1A),
            (format!("lora_te2_{te}.lokr_w2_b"), Component::TextEncoder2, te, Part::LokrW2B),
            (format!("lora_unet_{q}.alpha"), Component::Unet, q, Part::Alpha),
            (format!("lora_unet_{q}.lora_down.weight"), Component::Unet, q, Part::Down),
        ] {
            assert_eq!(split_key(&key, LoraFormat::Kohya), Some((component, ModuleName::Underscored(name.into()), part)), "{key}");
        }
        assert_eq!(split_key(&format!("lora_unet_{q}.hada_t1"), LoraFormat::Kohya), None);
        assert_eq!(split_key(&format!("unet.{q}.hada_w1_a"), LoraFormat::Diffusers), None);
    }

    #[test]
    fn loha_becomes_a_rank_r1r2_lora_when_smaller_else_a_dense_update() {
        // Linear 64→64 at r 4: 16·128 < 64·64, a rank-16 pair; the same ΔW either way.
        let h = |out: usize, n: usize, r: usize| ModuleWeights::Hadamard { w1a: t(&[out, r], 0.1), w1b: t(&[r, n], 0.2), w2a: t(&[out, r], 0.3), w2b: t(&[r, n], 0.4) };
        let dense_of = |w: &ModuleWeights| match w {
            ModuleWeights::Hadamard { w1a, w1b, w2a, w2b } => {
                (w1a.matmul(&w1b.flatten_from(1).unwrap()).unwrap() * w2a.matmul(&w2b.flatten_from(1).unwrap()).unwrap()).unwrap()
            }
            _ => unreachable!(),
        };
        let m = module(h(64, 64, 4));
        let fitted = fit(&m, SlotShape::Linear { in_dim: 64, out_dim: 64 }).unwrap();
        let DeltaWeights::LowRank { down, .. } = &fitted else { panic!("{fitted:?}") };
        assert_eq!(down.dims(), [16, 64]);
        assert!(max_diff(&fitted.matrix().unwrap(), &dense_of(&m.weights)) < 1e-5);
        // Linear 32→32 at r 4: 16·64 = 32·32, dense.
        let m = module(h(32, 32, 4));
        let fitted = fit(&m, SlotShape::Linear { in_dim: 32, out_dim: 32 }).unwrap();
        assert!(matches!(&fitted, DeltaWeights::Dense { delta } if delta.dims() == [32, 32]), "{fitted:?}");
        assert!(max_diff(&fitted.matrix().unwrap(), &dense_of(&m.weights)) < 1e-6);
        // A 3×3 convolution 32→64: rank-16 kernels [16, 32, 3, 3] and [64, 16, 1, 1].
        let m = module(h(64, 288, 4));
        let fitted = fit(&m, SlotShape::Conv { in_c: 32, out_c: 64, kernel: 3 }).unwrap();
        let DeltaWeights::LowRank { down, up } = &fitted else { panic!("{fitted:?}") };
        assert_eq!((down.dims(), up.dims()), (&[16, 32, 3, 3][..], &[64, 16, 1, 1][..]));
        assert!(max_diff(&fitted.matrix().unwrap(), &dense_of(&m.weights)) < 1e-5);
        // At r 8 the same convolution is dense [64, 32, 3, 3].
        let fitted = fit(&module(h(64, 288, 8)), SlotShape::Conv { in_c: 32, out_c: 64, kernel: 3 }).unwrap();
        assert!(matches!(&fitted, DeltaWeights::Dense { delta } if delta.dims() == [64, 32, 3, 3]), "{fitted:?}");
        // The wrong kernel size does not fit.
        let err = fit(&module(h(64, 288, 4)), SlotShape::Conv { in_c: 32, out_c: 64, kernel: 1 }).unwrap_err();
        assert!(err.contains("1×1 convolution 32→64") && err.contains("LoHa ΔW is [64, 288]"), "{err}");
    }

    #[test]
    fn lokr_fits_linear_and_conv_layers_as_a_kronecker_pair() {
        // A conv 3×3 48→32 with w1 [4, 4] (full) ⊗ w2_a [8, 2] · w2_b [2, 12·9].
        let w = ModuleWeights::Kronecker {
            w1: KronFactor::Full(t(&[4, 4], 0.5)),
            w2: KronFactor::LowRank { a: t(&[8, 2], 0.6), b: t(&[2, 108], 0.7) },
        };
        let fitted = fit(&module(w.clone()), SlotShape::Conv { in_c: 48, out_c: 32, kernel: 3 }).unwrap();
        let DeltaWeights::Kron { w1, w2 } = &fitted else { panic!("{fitted:?}") };
        assert_eq!((w1.dims(), w2.dims()), (&[4, 4][..], &[8, 12, 3, 3][..]));
        // ΔW[i·8+p, (j·12+q)·9+s] = w1[i, j] · w2[p, q, s].
        let dense = fitted.matrix().unwrap();
        assert_eq!(dense.dims(), [32, 48 * 9]);
        let get = |t: &Tensor, idx: &[usize]| idx.iter().fold(t.clone(), |t, &i| t.get(i).unwrap()).to_scalar::<f32>().unwrap();
        let w2f = w2.flatten_from(2).unwrap();
        for (i, p, j, q, s) in [(0, 0, 0, 0, 0), (3, 7, 2, 11, 8), (1, 4, 3, 5, 2)] {
            let want = get(w1, &[i, j]) * get(&w2f, &[p, q, s]);
            assert!((get(&dense, &[i * 8 + p, (j * 12 + q) * 9 + s]) - want).abs() < 1e-6);
        }
        // The same module on a linear layer does not fit: it says both factors.
        let err = fit(&module(w), SlotShape::Linear { in_dim: 48, out_dim: 32 }).unwrap_err();
        assert!(err.contains("linear 48→32") && err.contains("w1 [4, 4] ⊗ w2 [8, 108]"), "{err}");
    }
}
