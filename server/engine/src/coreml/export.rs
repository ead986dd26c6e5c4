//! `atelier export coreml`: a diffusers model folder, with a style or blend merged into its
//! weights, written as the Core ML packages Apple's `ml-stable-diffusion` Swift package
//! loads, plus the tokenizer files and `atelier_export.json`.
//!
//! ```text
//! OUT/
//!   TextEncoder.mlpackage   input_ids (1, 77) f32 → last_hidden_state (1, 77, C)
//!   Unet.mlpackage          sample (B, 4, h, w), timestep (B,), encoder_hidden_states (B, C, 1, 77) → noise_pred
//!     or UnetChunk1.mlpackage + UnetChunk2.mlpackage (iOS needs chunks for SD-1.5-size UNets)
//!   VAEDecoder.mlpackage    z (1, 4, h, w) → image (1, 3, 8h, 8w) in [-1, 1]
//!   VAEEncoder.mlpackage    (img2img)
//!   vocab.json, merges.txt  the CLIP tokenizer
//!   atelier_export.json     styles, hashes, settings, package sizes, compression errors
//! ```
//!
//! Everything is checked before anything is written; the export is built in a hidden
//! staging folder beside `OUT` and renamed into place at the end, so a failure (a full
//! disk, a cancelled job) leaves no half-written package. Weights stream into each
//! package's `weight.bin`; at most one component's weights are in memory at a time.
//!
//! Several styles make multifunction packages (iOS 18 / macOS 15): one function per style in
//! `TextEncoder` and `Unet`, the base weights stored once (identical blobs are shared), and
//! the app picks a style with `MLModelConfiguration.functionName`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::compress::Compression;
use super::mil::{model_spec, Dt, FnBuilder, Function, Target, WeightStats};
use super::package::PackageWriter;
use super::{text_encoder, unet, vae, Attention, Weights};
use crate::clip::ClipConfig;
use crate::error::{Error, Result};
use crate::lora::{ActiveLora, Component, ModelSlots};
use crate::model::{read_config, ModelFiles};
use crate::unet::UNetConfig;
use crate::vae::VaeConfig;

/// What the export writes and how.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportOptions {
    pub attention: Attention,
    /// `fp16` (default; what the Neural Engine runs) or `fp32`.
    pub precision: Precision,
    /// Palettization or int8 of weight matrices; `None`: plain fp16/fp32.
    pub compression: Option<Compression>,
    pub target: Target,
    /// Two UNet packages instead of one.
    pub chunk_unet: bool,
    /// Image size in pixels (multiples of 8).
    pub width: usize,
    pub height: usize,
    /// 2 (classifier-free guidance in one call) or 1.
    pub unet_batch: usize,
    /// Also write `VAEEncoder.mlpackage` (img2img).
    pub vae_encoder: bool,
}

/// Weight and activation precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp16,
    Fp32,
}

impl Precision {
    fn dt(self) -> Dt {
        match self {
            Precision::Fp16 => Dt::F16,
            Precision::Fp32 => Dt::F32,
        }
    }
}

/// One style of the export: what the user chose and the adapters to merge.
pub struct StyleExport {
    /// Function name in multifunction packages and the app's picker label.
    pub name: String,
    /// `base`, `lora` or `blend`.
    pub kind: String,
    /// The blend's share link, when it is one.
    pub link: Option<String>,
    pub components: Vec<StyleComponent>,
    /// The adapters with their weights (empty for the base model).
    pub active: Vec<ActiveLora>,
}

/// A style inside a blend (or the one LoRA), as recorded in `atelier_export.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StyleComponent {
    pub name: String,
    pub hash: String,
    pub weight: f64,
}

/// Progress of an export: `done` of `total` steps, `stage` says which package.
pub struct Progress<'a> {
    pub stage: &'a str,
    pub done: usize,
    pub total: usize,
}

/// `atelier_export.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportManifest {
    /// Always `atelier-coreml-export`.
    pub format: String,
    pub version: u32,
    pub atelier_version: String,
    /// RFC 3339.
    pub created: String,
    pub base_model: BaseModel,
    pub styles: Vec<StyleEntry>,
    pub default_style: String,
    pub settings: Settings,
    pub packages: Vec<PackageEntry>,
    pub compression_errors: Vec<CompressionError>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseModel {
    pub name: String,
    pub hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StyleEntry {
    pub name: String,
    /// The function holding it (`main` when there is one style).
    pub function: String,
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    pub components: Vec<StyleComponent>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub attention: Attention,
    pub precision: Precision,
    pub palettize: Option<u8>,
    pub palettize_group_size: Option<usize>,
    pub quantize: Option<String>,
    pub chunk_unet: bool,
    pub target: Target,
    pub width: usize,
    pub height: usize,
    pub unet_batch: usize,
    pub latent_scaling_factor: f64,
    pub multifunction: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PackageEntry {
    pub name: String,
    pub path: String,
    pub bytes: u64,
    pub functions: Vec<String>,
    pub ops: usize,
    pub params: u64,
}

/// What storing the weights cost, per package and option (weight space: the reconstruction
/// error of the weights themselves; output-space errors are measured by the tests).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompressionError {
    pub package: String,
    pub option: String,
    /// ‖W − Ŵ‖ / ‖W‖ over the stored tensors.
    pub relative_error: f64,
    pub max_abs_error: f64,
}

/// The components an export writes, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    TextEncoder,
    Unet,
    UnetChunk1,
    UnetChunk2,
    VaeDecoder,
    VaeEncoder,
}

impl Part {
    fn package(self) -> &'static str {
        match self {
            Part::TextEncoder => "TextEncoder",
            Part::Unet => "Unet",
            Part::UnetChunk1 => "UnetChunk1",
            Part::UnetChunk2 => "UnetChunk2",
            Part::VaeDecoder => "VAEDecoder",
            Part::VaeEncoder => "VAEEncoder",
        }
    }
    /// Whether styles change this component (one function per style).
    fn styled(self) -> bool {
        matches!(self, Part::TextEncoder | Part::Unet | Part::UnetChunk1 | Part::UnetChunk2)
    }
}

struct Configs {
    files: ModelFiles,
    clip: ClipConfig,
    unet: UNetConfig,
    vae: VaeConfig,
}

fn configs(model_dir: &Path) -> Result<Configs> {
    let files = ModelFiles::locate(model_dir)?;
    Ok(Configs { clip: read_config(&files.text_encoder_config)?, unet: read_config(&files.unet_config)?, vae: read_config(&files.vae_config)?, files })
}

/// Everything that can be refused before writing: sizes, options, architectures, style
/// names.
///
/// # Errors
/// [`Error::InvalidInput`] saying what to change.
pub fn check(model_dir: &Path, styles: &[StyleExport], opts: &ExportOptions) -> Result<()> {
    let c = configs(model_dir)?;
    check_configs(&c, styles, opts)
}

fn check_configs(c: &Configs, styles: &[StyleExport], opts: &ExportOptions) -> Result<()> {
    if c.unet.addition_embed_type.is_some() {
        return Err(Error::invalid(
            "model",
            "this is an SDXL model: the Core ML export converts SD 1.x/2.x models (one text encoder, no added conditioning); export an SD 1.x/2.x model",
        ));
    }
    if opts.width == 0 || opts.height == 0 || opts.width % 8 != 0 || opts.height % 8 != 0 {
        return Err(Error::invalid("size", format!("{}×{} is not a multiple of 8 pixels; Stable Diffusion works on 8×8-pixel latents", opts.width, opts.height)));
    }
    let down = 1usize << c.unet.block_out_channels.len().saturating_sub(1);
    if (opts.width / 8) % down != 0 || (opts.height / 8) % down != 0 {
        return Err(Error::invalid("size", format!("{}×{} must be a multiple of {} pixels for this UNet ({} down blocks)", opts.width, opts.height, 8 * down, c.unet.block_out_channels.len())));
    }
    if !matches!(opts.unet_batch, 1 | 2) {
        return Err(Error::invalid("unet_batch", "the UNet batch is 2 (guidance in one call) or 1"));
    }
    if let Some(Compression::Palettize { bits, group_size }) = opts.compression {
        if !matches!(bits, 4 | 6 | 8) {
            return Err(Error::invalid("palettize", format!("{bits} bits: Core ML's look-up tables hold 16, 64 or 256 values (4, 6 or 8 bits)")));
        }
        if group_size.is_some() && opts.target != Target::Ios18 {
            return Err(Error::invalid("palettize", "per-grouped-channel palettization needs --target ios18"));
        }
    }
    if styles.len() > 1 && opts.target != Target::Ios18 {
        return Err(Error::invalid("target", "several styles in one export are multifunction packages, which need --target ios18 (iOS 18 / macOS 15)"));
    }
    let mut names = std::collections::HashSet::new();
    for s in styles {
        if s.name.is_empty() || !s.name.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-') {
            return Err(Error::invalid("style", format!("style name {:?}: use letters, digits, - and _ (it names a function in the package)", s.name)));
        }
        if !names.insert(&s.name) {
            return Err(Error::invalid("style", format!("style {} is listed twice", s.name)));
        }
    }
    c.unet.check_supported().map_err(|e| Error::invalid("model", format!("this UNet cannot be exported: {e}")))?;
    if c.unet.addition_embed_type.is_some() {
        return Err(Error::invalid("model", "SDXL models cannot be exported to Core ML by Atelier yet (two text encoders and micro-conditioning); export an SD 1.x or 2.x model"));
    }
    text_encoder::check(&c.clip)?;
    Ok(())
}

fn parts(opts: &ExportOptions) -> Vec<Part> {
    let mut p = vec![Part::TextEncoder];
    if opts.chunk_unet {
        p.extend([Part::UnetChunk1, Part::UnetChunk2]);
    } else {
        p.push(Part::Unet);
    }
    p.push(Part::VaeDecoder);
    if opts.vae_encoder {
        p.push(Part::VaeEncoder);
    }
    p
}

fn build_part<W: std::io::Write + std::io::Seek>(f: &mut FnBuilder<W>, part: Part, c: &Configs, w: &Weights, opts: &ExportOptions) -> Result<()> {
    match part {
        Part::TextEncoder => text_encoder::build(f, &c.clip, w),
        Part::Unet | Part::UnetChunk1 | Part::UnetChunk2 => {
            let p = match part {
                Part::Unet => unet::UnetPart::Whole,
                Part::UnetChunk1 => unet::UnetPart::Chunk1,
                _ => unet::UnetPart::Chunk2,
            };
            unet::build_unet(f, &c.unet, w, &unet_options(opts), p)
        }
        Part::VaeDecoder => vae::build_decoder(f, &c.vae, w, &vae::VaeExport::from_image(&c.vae, opts.width, opts.height)?),
        Part::VaeEncoder => vae::build_encoder(f, &c.vae, w, &vae::VaeExport::from_image(&c.vae, opts.width, opts.height)?),
    }
}

fn unet_options(opts: &ExportOptions) -> unet::UnetExport {
    unet::UnetExport { batch: opts.unet_batch, height: opts.height / 8, width: opts.width / 8, attention: opts.attention }
}

fn weights_of(c: &Configs, part: Part) -> (&Path, Option<Component>) {
    match part {
        Part::TextEncoder => (&c.files.text_encoder_weights, Some(Component::TextEncoder)),
        Part::Unet | Part::UnetChunk1 | Part::UnetChunk2 => (&c.files.unet_weights, Some(Component::Unet)),
        Part::VaeDecoder | Part::VaeEncoder => (&c.files.vae_weights, None),
    }
}

/// Writes the export into `out` (which must not exist, or be an empty folder). `slots` are
/// the model's LoRA slots (needed when a style has adapters). `progress` is called after
/// each package function; returning `false` cancels (nothing is left behind).
///
/// # Errors
/// A refusal from [`check`], a weight problem naming the file and key, an I/O error (the
/// staging folder is removed), or [`Error::InvalidInput`] "cancelled".
pub fn export(model_dir: &Path, model_name: &str, model_hash: &str, slots: Option<&ModelSlots>, styles: &[StyleExport], opts: &ExportOptions, out: &Path, progress: &mut dyn FnMut(Progress) -> bool) -> Result<ExportManifest> {
    let c = configs(model_dir)?;
    check_configs(&c, styles, opts)?;
    if out.exists() && std::fs::read_dir(out).map_err(|e| Error::io(out, e))?.next().is_some() {
        return Err(Error::invalid("out", format!("{} exists and is not empty; choose a new folder", out.display())));
    }
    if styles.iter().any(|s| !s.active.is_empty()) && slots.is_none() {
        return Err(Error::invalid("style", "merging a style needs the model's LoRA slots"));
    }
    let name = out.file_name().ok_or_else(|| Error::invalid("out", "the output needs a folder name"))?.to_string_lossy().into_owned();
    let parent = out.parent().map(Path::to_path_buf).filter(|p| !p.as_os_str().is_empty()).unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let staging = parent.join(format!(".{name}.partial"));
    let _ = std::fs::remove_dir_all(&staging);
    let guard = Staging(staging.clone());
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;

    let base_only = [StyleExport { name: "base".into(), kind: "base".into(), link: None, components: vec![], active: vec![] }];
    let styles: &[StyleExport] = if styles.is_empty() { &base_only } else { styles };
    let multi = styles.len() > 1;
    let parts = parts(opts);
    let total: usize = parts.iter().map(|p| if p.styled() { styles.len() } else { 1 }).sum();
    let mut done = 0;
    let mut packages = Vec::new();
    let mut errors = Vec::new();
    // Every key and shape each package reads, checked before the first package is written.
    for part in &parts {
        let (file, _) = weights_of(&c, *part);
        let w = Weights::load(file)?;
        match part {
            Part::Unet | Part::UnetChunk1 | Part::UnetChunk2 => unet::check(&c.unet, &w, &unet_options(opts))?,
            Part::VaeDecoder => {
                vae::tensors(false, &c.vae, &w, &vae::VaeExport::from_image(&c.vae, opts.width, opts.height)?)?;
            }
            Part::VaeEncoder => {
                vae::tensors(true, &c.vae, &w, &vae::VaeExport::from_image(&c.vae, opts.width, opts.height)?)?;
            }
            Part::TextEncoder => {}
        }
    }
    for part in parts {
        let (file, component) = weights_of(&c, part);
        let base = Weights::load(file)?;
        let dir = staging.join(format!("{}.mlpackage", part.package()));
        let mut pkg = PackageWriter::create(&dir).map_err(|e| Error::io(&dir, e))?;
        let variants: Vec<&StyleExport> = if part.styled() { styles.iter().collect() } else { vec![&styles[0]] };
        let mut functions: Vec<(String, Function)> = Vec::new();
        let mut stats = WeightStats::default();
        for style in variants {
            let merged;
            let w = match (component, slots) {
                (Some(comp), Some(slots)) if !style.active.is_empty() => {
                    let mut map = base.map_clone();
                    super::super::bake::merge_into(&style.active, slots, comp, &mut map, file)?;
                    merged = Weights::from_map(map, file);
                    &merged
                }
                _ => &base,
            };
            let mut f = FnBuilder::new(pkg.weights(), opts.precision.dt(), opts.compression, opts.target);
            build_part(&mut f, part, &c, w, opts)?;
            let func = f.finish();
            stats.merge(&func.stats);
            let fname = if multi && part.styled() { style.name.clone() } else { "main".to_string() };
            functions.push((fname, func));
            done += 1;
            if !progress(Progress { stage: part.package(), done, total }) {
                return Err(Error::invalid("export", "cancelled"));
            }
        }
        let ops = functions.iter().map(|(_, f)| f.op_count()).sum();
        let names: Vec<String> = functions.iter().map(|(n, _)| n.clone()).collect();
        let metadata = HashMap::from([
            ("com.github.apple.ml-stable-diffusion.version".to_string(), "atelier".to_string()),
            ("atelier.base_model".to_string(), model_name.to_string()),
            ("atelier.base_model_hash".to_string(), model_hash.to_string()),
            ("atelier.styles".to_string(), styles.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(",")),
        ]);
        let spec = model_spec(opts.target, functions, &descriptions(), metadata, &format!("Stable Diffusion {} exported by Atelier", part.package()))?;
        let bytes = pkg.finish(&spec).map_err(|e| Error::io(&dir, e))?;
        packages.push(PackageEntry { name: part.package().into(), path: format!("{}.mlpackage", part.package()), bytes, functions: names, ops, params: stats.params });
        let option = match opts.compression {
            Some(Compression::Palettize { bits, group_size: None }) => format!("palettize {bits}-bit"),
            Some(Compression::Palettize { bits, group_size: Some(g) }) => format!("palettize {bits}-bit, groups of {g} channels"),
            Some(Compression::Int8) => "int8".into(),
            None => opts.precision_name().into(),
        };
        errors.push(CompressionError { package: part.package().into(), option, relative_error: stats.relative_error(), max_abs_error: stats.max_abs_error });
    }
    for file in ["vocab.json", "merges.txt"] {
        let src = c.files.tokenizer_dir.join(file);
        let dst = staging.join(file);
        std::fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
    }
    let manifest = ExportManifest {
        format: "atelier-coreml-export".into(),
        version: 1,
        atelier_version: env!("CARGO_PKG_VERSION").into(),
        created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        base_model: BaseModel { name: model_name.into(), hash: model_hash.into() },
        styles: styles
            .iter()
            .map(|s| StyleEntry { name: s.name.clone(), function: if multi { s.name.clone() } else { "main".into() }, kind: s.kind.clone(), link: s.link.clone(), components: s.components.clone() })
            .collect(),
        default_style: styles[0].name.clone(),
        settings: Settings {
            attention: opts.attention,
            precision: opts.precision,
            palettize: match opts.compression {
                Some(Compression::Palettize { bits, .. }) => Some(bits),
                _ => None,
            },
            palettize_group_size: match opts.compression {
                Some(Compression::Palettize { group_size, .. }) => group_size,
                _ => None,
            },
            quantize: matches!(opts.compression, Some(Compression::Int8)).then(|| "int8".to_string()),
            chunk_unet: opts.chunk_unet,
            target: opts.target,
            width: opts.width,
            height: opts.height,
            unet_batch: opts.unet_batch,
            latent_scaling_factor: c.vae.scaling_factor,
            multifunction: multi,
        },
        packages,
        compression_errors: errors,
    };
    crate::files::write_json_atomic(&staging.join("atelier_export.json"), &manifest).map_err(|e| Error::io(&staging, e))?;
    if out.exists() {
        std::fs::remove_dir(out).map_err(|e| Error::io(out, e))?;
    }
    std::fs::rename(&staging, out).map_err(|e| Error::io(out, e))?;
    std::mem::forget(guard);
    Ok(manifest)
}

impl ExportOptions {
    fn precision_name(&self) -> &'static str {
        match self.precision {
            Precision::Fp16 => "fp16",
            Precision::Fp32 => "fp32",
        }
    }
}

/// Input/output descriptions shown in Xcode's model viewer.
fn descriptions() -> HashMap<&'static str, &'static str> {
    HashMap::from([
        ("input_ids", "Token ids from the CLIP tokenizer, padded to 77, as float32"),
        ("last_hidden_state", "Text embeddings after the final layer norm"),
        ("sample", "Noisy latents (batch, 4, h, w)"),
        ("timestep", "Diffusion timestep per batch item"),
        ("encoder_hidden_states", "Text embeddings in (batch, channels, 1, 77) layout"),
        ("noise_pred", "Predicted noise (epsilon)"),
        ("z", "Latents divided by the VAE scaling factor"),
        ("image", "Image in [-1, 1], (1, 3, H, W)"),
        ("x", "Image in [-1, 1], (1, 3, H, W)"),
        ("latent", "Latent moments: mean (channels 0-3) and log-variance (4-7), unscaled"),
        ("hidden_states", "UNet activations passed from UnetChunk1 to UnetChunk2"),
        ("time_embedding", "Timestep embedding passed from UnetChunk1 to UnetChunk2"),
    ])
}

/// Removes the staging folder unless the export finished.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl WeightStats {
    fn merge(&mut self, o: &WeightStats) {
        self.params += o.params;
        self.compressed_tensors += o.compressed_tensors;
        self.error_sq += o.error_sq;
        self.weight_sq += o.weight_sq;
        self.max_abs_error = self.max_abs_error.max(o.max_abs_error);
    }
}
