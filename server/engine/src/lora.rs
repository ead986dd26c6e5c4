//! LoRA adapters: reading kohya and diffusers/PEFT files, checking them against a
//! loaded model, and the per-layer updates they attach.
//!
//! A file is read into an [`LoraAdapter`]: one [`LoraModule`] per adapted layer, with
//! `down` (kohya `lora_down`, PEFT `lora_A`), `up` (`lora_up`, `lora_B`) and the scale
//! `alpha / rank` (kohya: the module's `.alpha` tensor; PEFT: `lora_alpha`, `r`,
//! `alpha_pattern`, `use_rslora` from the `lora_adapter_metadata` JSON that diffusers'
//! `save_lora_weights` writes). Linear and convolution layers (LoCon: a k×k `down`
//! kernel and a 1×1 `up` kernel) are both supported.
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
//! each layer computes `W x + Σᵢ wᵢ · sᵢ · upᵢ(downᵢ(x))`, so adapters are never merged
//! into each other or into the base weights.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::layers::{SlotInfo, SlotShape};
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

/// One adapted layer.
#[derive(Debug, Clone)]
pub struct LoraModule {
    pub component: Component,
    name: ModuleName,
    /// [r, in] or [r, in, k, k].
    pub down: Tensor,
    /// [out, r] or [out, r, 1, 1].
    pub up: Tensor,
    /// `alpha / r` (or `alpha / √r` for rsLoRA).
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

    pub fn rank(&self) -> usize {
        self.down.dims()[0]
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

/// A module's down, up and alpha tensors, each with the key it was read from.
type ModuleParts = [Option<(String, Tensor)>; 3];

fn lora_err(name: &str, message: impl Into<String>) -> Error {
    Error::Lora { name: name.to_string(), message: message.into() }
}

/// Suffixes of the two matrices and of alpha, per layout.
const KOHYA_DOWN: &str = ".lora_down.weight";
const KOHYA_UP: &str = ".lora_up.weight";
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
/// from LyCORIS (`lycoris/modules/*.py`: LoHa `hada_w1_a`/`hada_t1`, LoKr `lokr_w1`/`lokr_t2`,
/// IA³ `on_input`, GLoRA `a1`/`a2`/`b1`/`b2`, OFT/BOFT `oft_blocks`/`oft_diag`, norm
/// tuning `w_norm`/`b_norm`, CP kernels `lora_mid`), kohya sd-scripts (DoRA `dora_scale`)
/// and PEFT (DoRA `lora_magnitude_vector`, IA³ `ia3_l`, OFT `oft_r`, BOFT `boft_R`,
/// VeRA `vera_lambda`).
const UNSUPPORTED: [(&str, &str); 22] = [
    (".hada_w1", "LyCORIS LoHa"),
    (".hada_w2", "LyCORIS LoHa"),
    (".hada_t1", "LyCORIS LoHa"),
    (".lokr_w1", "LyCORIS LoKr"),
    (".lokr_w2", "LyCORIS LoKr"),
    (".lokr_t2", "LyCORIS LoKr"),
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
const CONVERT_HINT: &str = "only plain LoRA and LoCon files are supported; merge it into its base model and extract a plain LoRA \
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
        let peft = PeftConfigs::from_metadata(name, &metadata)?;
        // Group keys by module.
        let mut groups: BTreeMap<(Component, ModuleName), ModuleParts> = BTreeMap::new();
        let mut unknown = Vec::new();
        for key in &keys {
            let t = &tensors[*key];
            match split_key(key, format) {
                Some((component, module, part)) => {
                    let slot = &mut groups.entry((component, module.clone())).or_default()[part];
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
        for ((component, module), [down, up, alpha]) in groups {
            let what = format!("{}.{}", component.peft_prefix(), module.as_str());
            let (Some((down_key, down)), Some((up_key, up))) = (down, up) else {
                return Err(lora_err(name, format!("module {what} lacks its down or up matrix")));
            };
            let down = down.to_dtype(DType::F32)?;
            let up = up.to_dtype(DType::F32)?;
            let rank = down.dims().first().copied().unwrap_or(0);
            if rank == 0 || up.dims().get(1) != Some(&rank) || !matches!(down.rank(), 2 | 4) || down.rank() != up.rank() {
                return Err(lora_err(
                    name,
                    format!("module {what}: down {:?} and up {:?} are not a rank-r pair", down.dims(), up.dims()),
                ));
            }
            for (key, t) in [(&down_key, &down), (&up_key, &up)] {
                if let Some(v) = first_non_finite(t)? {
                    return Err(lora_err(name, format!("tensor {key} holds {v} (a non-finite weight); the file is damaged — download or re-export it")));
                }
            }
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
            let rslora = peft.get(&component).is_some_and(|c| c.use_rslora);
            let scale = match alpha.filter(|a| *a != 0.0) {
                // kohya: a missing alpha or alpha 0 means alpha = rank (see the module doc).
                None => 1.0,
                Some(a) if rslora => a / (rank as f64).sqrt(),
                Some(a) => a / rank as f64,
            };
            modules.push(LoraModule { component, name: module, down, up, scale });
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
                Ok((down, up)) => bound.push(BoundModule {
                    slot: index,
                    block: block_of(m.component, &info.name),
                    down: down.to_device(device)?.to_dtype(dtype)?,
                    up: up.to_device(device)?.to_dtype(dtype)?,
                    scale: m.scale,
                }),
                Err(why) => mismatched.push(format!("{} ({why})", info.name)),
            }
        }
        let sdxl = s.modules.iter().find(|m| {
            let n = m.name.as_str();
            (n.contains("attn2_to_k") || n.contains("attn2.to_k") || n.contains("attn2_to_v") || n.contains("attn2.to_v"))
                && m.down.dims().get(1) == Some(&SDXL_CONTEXT_DIM)
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
                let width = m.down.dims().get(1).copied()?;
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

/// Splits a key into its component, module name and part (0 down, 1 up, 2 alpha).
fn split_key(key: &str, format: LoraFormat) -> Option<(Component, ModuleName, usize)> {
    match format {
        LoraFormat::Kohya => {
            let (stem, part) = if let Some(s) = key.strip_suffix(KOHYA_DOWN) {
                (s, 0)
            } else if let Some(s) = key.strip_suffix(KOHYA_UP) {
                (s, 1)
            } else {
                (key.strip_suffix(ALPHA)?, 2)
            };
            KOHYA_PREFIXES
                .iter()
                .find_map(|(p, c)| stem.strip_prefix(p).map(|rest| (*c, ModuleName::Underscored(rest.to_string()), part)))
        }
        LoraFormat::Diffusers => {
            let key = normalize_diffusers_key(key);
            let (stem, part) = if let Some(s) = PEFT_DOWN.iter().find_map(|suf| key.strip_suffix(suf)) {
                (s, 0)
            } else if let Some(s) = PEFT_UP.iter().find_map(|suf| key.strip_suffix(suf)) {
                (s, 1)
            } else {
                (key.strip_suffix(ALPHA)?, 2)
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

/// Reshapes a module's matrices to the layer they attach to, or says why they do not fit.
fn fit(m: &LoraModule, shape: SlotShape) -> std::result::Result<(Tensor, Tensor), String> {
    let (d, u) = (m.down.dims(), m.up.dims());
    let r = d[0];
    let reshape = |t: &Tensor, s: &[usize]| t.reshape(s).map_err(|e| e.to_string());
    match shape {
        SlotShape::Linear { in_dim, out_dim } => {
            let ok_down = d == [r, in_dim] || d == [r, in_dim, 1, 1];
            let ok_up = u == [out_dim, r] || u == [out_dim, r, 1, 1];
            if !(ok_down && ok_up) {
                return Err(format!("layer is linear {in_dim}→{out_dim}, LoRA has down {d:?} up {u:?}"));
            }
            Ok((reshape(&m.down, &[r, in_dim])?, reshape(&m.up, &[out_dim, r])?))
        }
        SlotShape::Conv { in_c, out_c, kernel } => {
            let ok_down = d == [r, in_c, kernel, kernel] || (kernel == 1 && d == [r, in_c]);
            let ok_up = u == [out_c, r, 1, 1] || (u == [out_c, r]);
            if !(ok_down && ok_up) {
                return Err(format!("layer is a {kernel}×{kernel} convolution {in_c}→{out_c}, LoRA has down {d:?} up {u:?}"));
            }
            Ok((reshape(&m.down, &[r, in_c, kernel, kernel])?, reshape(&m.up, &[out_c, r, 1, 1])?))
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
        let mut per_slot: Vec<Vec<crate::layers::LoraDelta>> = vec![Vec::new(); self.slots.len()];
        for a in active {
            for m in &a.lora.modules {
                let w = atelier_blend::weights::effective_scale(a.weight, &a.blocks, m.block);
                if w != 0.0 {
                    per_slot[m.slot].push(crate::layers::LoraDelta { down: m.down.clone(), up: m.up.clone(), scale: w * m.scale });
                }
            }
        }
        for ((_, info), deltas) in self.slots.iter().zip(per_slot) {
            info.slot.set(deltas);
        }
    }
}

/// One module of a bound adapter.
#[derive(Debug, Clone)]
pub struct BoundModule {
    slot: usize,
    pub block: Block,
    pub down: Tensor,
    pub up: Tensor,
    pub scale: f64,
}

impl BoundModule {
    /// A module for the layer at `slot` of `slots` (shapes already checked by the caller).
    pub fn new(slots: &ModelSlots, slot: usize, down: Tensor, up: Tensor, scale: f64) -> Option<Self> {
        let (component, info) = slots.get(slot)?;
        Some(Self { slot, block: block_of(component, &info.name), down, up, scale })
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
