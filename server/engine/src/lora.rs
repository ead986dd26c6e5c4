//! LoRA adapters: reading kohya and diffusers/PEFT files, checking them against a
//! loaded model, and the per-layer updates they attach.
//!
//! A file is read into an [`LoraAdapter`]: one [`LoraModule`] per adapted layer, with
//! `down` (kohya `lora_down`, PEFT `lora_A`), `up` (`lora_up`, `lora_B`) and the scale
//! `alpha / rank` (kohya: the module's `.alpha` tensor; PEFT: `lora_alpha`, `r`,
//! `alpha_pattern`, `use_rslora` from the `lora_adapter_metadata` JSON that diffusers'
//! `save_lora_weights` writes; without alpha the scale is 1). Linear and convolution
//! layers (LoCon: a k×k `down` kernel and a 1×1 `up` kernel) are both supported.
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
}

impl Component {
    /// The key prefix in diffusers/PEFT files.
    pub fn peft_prefix(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
        }
    }

    /// The key prefix in kohya files.
    pub fn kohya_prefix(self) -> &'static str {
        match self {
            Component::Unet => "lora_unet",
            Component::TextEncoder => "lora_te",
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
}

fn lora_err(name: &str, message: impl Into<String>) -> Error {
    Error::Lora { name: name.to_string(), message: message.into() }
}

/// Suffixes of the two matrices and of alpha, per layout.
const KOHYA_DOWN: &str = ".lora_down.weight";
const KOHYA_UP: &str = ".lora_up.weight";
const ALPHA: &str = ".alpha";
const PEFT_DOWN: [&str; 2] = [".lora_A.weight", ".lora.down.weight"];
const PEFT_UP: [&str; 2] = [".lora_B.weight", ".lora.up.weight"];

/// Names of LoRA variants that are recognised but not supported, by a key fragment.
const UNSUPPORTED: [(&str, &str); 5] = [
    ("hada_w1", "LyCORIS LoHa"),
    ("lokr_w1", "LyCORIS LoKr"),
    (".lora_mid.", "LyCORIS LoCon with a CP-decomposed kernel (lora_mid)"),
    ("lora_magnitude_vector", "DoRA"),
    (".oft_", "OFT"),
];

/// The unsupported variant a key belongs to, if any.
fn unsupported(key: &str) -> Option<&'static str> {
    if key.ends_with(".diff") || key.ends_with(".diff_b") {
        return Some("a full weight difference (LyCORIS 'full')");
    }
    UNSUPPORTED.iter().find(|(frag, _)| key.contains(frag)).map(|(_, what)| *what)
}

impl LoraAdapter {
    /// Reads a `.safetensors` LoRA file (kohya or diffusers/PEFT layout, detected from its keys).
    pub fn load(path: &Path) -> Result<Self> {
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("lora").to_string();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let not_readable = |e: &dyn std::fmt::Display| {
            lora_err(&name, format!("{} is not a readable safetensors file ({e}); it may be truncated — download it again", path.display()))
        };
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| not_readable(&e))?;
        let metadata: BTreeMap<String, String> =
            meta.metadata().as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| not_readable(&e))?;
        let hash = {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(&bytes);
            digest.iter().take(5).map(|b| format!("{b:02x}")).collect()
        };
        let mut adapter = Self::from_tensors(&name, tensors, metadata)?;
        adapter.path = Some(path.to_path_buf());
        adapter.hash = hash;
        Ok(adapter)
    }

    /// Builds an adapter from a file's tensors and metadata.
    pub fn from_tensors(name: &str, tensors: HashMap<String, Tensor>, metadata: BTreeMap<String, String>) -> Result<Self> {
        if tensors.is_empty() {
            return Err(lora_err(name, "the file holds no tensors"));
        }
        for key in tensors.keys() {
            if let Some(what) = unsupported(key) {
                return Err(lora_err(name, format!("{what} files are not supported (key {key}); use a plain LoRA or LoCon file")));
            }
            if key.starts_with("lora_te1_") || key.starts_with("lora_te2_") || key.starts_with("text_encoder_2.") {
                return Err(lora_err(
                    name,
                    format!("made for SDXL (key {key} belongs to SDXL's second text encoder); it cannot be used with an SD 1.x/2.x model"),
                ));
            }
        }
        let format = if tensors.keys().any(|k| k.starts_with("lora_unet_") || k.starts_with("lora_te_")) {
            LoraFormat::Kohya
        } else {
            LoraFormat::Diffusers
        };
        let peft = PeftConfigs::from_metadata(name, &metadata)?;
        // Group keys by module.
        let mut groups: BTreeMap<(Component, ModuleName), [Option<Tensor>; 3]> = BTreeMap::new();
        let mut unknown = Vec::new();
        for (key, t) in &tensors {
            match split_key(key, format) {
                Some((component, module, part)) => groups.entry((component, module)).or_default()[part] = Some(t.clone()),
                None => unknown.push(key.clone()),
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
        for ((component, module), [down, up, alpha]) in groups {
            let what = format!("{}.{}", component.peft_prefix(), module.as_str());
            let (Some(down), Some(up)) = (down, up) else {
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
            let alpha = match alpha {
                Some(a) => Some(a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?.first().copied().unwrap_or(rank as f64)),
                None => peft.get(&component).and_then(|c| c.alpha_for(module.as_str())),
            };
            let rslora = peft.get(&component).is_some_and(|c| c.use_rslora);
            let scale = match alpha {
                Some(a) if rslora => a / (rank as f64).sqrt(),
                Some(a) => a / rank as f64,
                None => 1.0,
            };
            modules.push(LoraModule { component, name: module, down, up, scale });
        }
        Ok(Self { name: name.to_string(), path: None, format, hash: String::new(), metadata, modules })
    }

    /// Checks every module against the layers of a model and prepares it on `device`.
    /// `slots` are the model's layers per component. Fails, naming the modules, when
    /// any module has no layer or a layer of another shape.
    pub fn bind(this: &Arc<Self>, slots: &ModelSlots, device: &Device, dtype: DType) -> Result<BoundLora> {
        let s = this.as_ref();
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
        if !missing.is_empty() {
            let hint = if missing.iter().any(|n| n.contains("input_blocks") || n.contains("output_blocks") || n.contains("middle_block")) {
                "it uses the original (LDM) layer names, which are not supported; convert it to kohya or diffusers names"
            } else if s.modules.iter().any(|m| m.component == Component::Unet && m.name.as_str().contains("add_embedding")) {
                "it was made for SDXL"
            } else {
                "it was made for a different base model architecture"
            };
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
            for c in [Component::Unet, Component::TextEncoder] {
                if let Some(rest) = stem.strip_prefix(c.kohya_prefix()).and_then(|r| r.strip_prefix('_')) {
                    return Some((c, ModuleName::Underscored(rest.to_string()), part));
                }
            }
            None
        }
        LoraFormat::Diffusers => {
            let (stem, part) = if let Some(s) = PEFT_DOWN.iter().find_map(|suf| key.strip_suffix(suf)) {
                (s, 0)
            } else if let Some(s) = PEFT_UP.iter().find_map(|suf| key.strip_suffix(suf)) {
                (s, 1)
            } else {
                (key.strip_suffix(ALPHA)?, 2)
            };
            for c in [Component::Unet, Component::TextEncoder] {
                if let Some(rest) = stem.strip_prefix(c.peft_prefix()).and_then(|r| r.strip_prefix('.')) {
                    return Some((c, ModuleName::Dotted(rest.to_string()), part));
                }
            }
            None
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
        for c in [Component::Unet, Component::TextEncoder] {
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
    Block::of_layer(component == Component::TextEncoder, name)
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
