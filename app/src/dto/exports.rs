//! Core ML exports as the API and the "Export for iOS/Mac" action see them: the request
//! (`POST /api/exports`), where an export is, and what it wrote. The server's `exports`
//! module runs them on the long lane of the work queue; the engine's
//! `atelier_engine::coreml::export` writes the packages (its docs give the folder layout).

use serde::{Deserialize, Serialize};

/// A library style in an export, at a weight (one function of the packages per style).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportStyle {
    /// The style's name in this studio's library.
    pub name: String,
    /// The LoRA weight merged into the model; 1 when absent.
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

fn yes() -> bool {
    true
}

/// How attention is laid out in the UNet, as Apple's `ml-stable-diffusion` names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExportAttention {
    /// Per-head operations for the Neural Engine (Apple's `SPLIT_EINSUM`).
    #[default]
    SplitEinsum,
    /// Batched matmuls, best on the GPU (Apple's `ORIGINAL`).
    Original,
}

/// Weight and activation precision of the packages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportPrecision {
    #[default]
    Fp16,
    Fp32,
}

/// The oldest OS the packages load on (iOS 16 / macOS 13, iOS 17 / macOS 14, iOS 18 /
/// macOS 15). Several styles in one export need `ios18` (multifunction packages).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportTarget {
    #[default]
    Ios16,
    Ios17,
    Ios18,
}

/// The body of `POST /api/exports`. Every field has a default: `{}` exports the base model
/// in fp16 with split-einsum attention for iOS 16 at the model's native size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// A blend's share link (or its code): one function holding the whole blend.
    #[serde(default)]
    pub blend: Option<String>,
    /// The function name of the blend (letters, digits, `-`, `_`); `blend` when absent.
    #[serde(default)]
    pub blend_name: Option<String>,
    /// Library styles, one function each (after the blend's, when there is one).
    #[serde(default)]
    pub styles: Vec<ExportStyle>,
    #[serde(default)]
    pub attention: ExportAttention,
    #[serde(default)]
    pub precision: ExportPrecision,
    /// k-means palettization of weight matrices to 4, 6 or 8 bits.
    #[serde(default)]
    pub palettize: Option<u8>,
    /// `int8`: linear quantization of weight matrices (not with `palettize`).
    #[serde(default)]
    pub quantize: Option<String>,
    /// Two UNet packages instead of one (what iOS needs for SD-1.5-size UNets).
    #[serde(default)]
    pub chunk_unet: bool,
    #[serde(default)]
    pub target: ExportTarget,
    /// Image size in pixels (multiples of 8); the model's native size when absent.
    #[serde(default)]
    pub width: Option<usize>,
    #[serde(default)]
    pub height: Option<usize>,
    /// A UNet that takes one latent per call instead of two (guidance in two calls).
    #[serde(default)]
    pub unet_batch_one: bool,
    /// Also write `VAEEncoder.mlpackage` (image-to-image).
    #[serde(default = "yes")]
    pub vae_encoder: bool,
}

/// A package of a finished export and its size on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportPackage {
    /// `TextEncoder`, `Unet` (or `UnetChunk1`, `UnetChunk2`), `VAEDecoder`, `VAEEncoder`.
    pub name: String,
    pub bytes: u64,
    /// Its functions (`main`, or one per style).
    pub functions: Vec<String>,
}

/// What storing a package's weights cost (weight space), from `atelier_export.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportCompressionError {
    pub package: String,
    /// `fp16`, `fp32`, `palettize 6-bit`, `int8`, …
    pub option: String,
    /// ‖W − Ŵ‖ / ‖W‖ over the stored tensors.
    pub relative_error: f64,
    pub max_abs_error: f64,
}

/// Where an export is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ExportState {
    Queued {
        position: usize,
    },
    Running,
    /// The zip is ready at `GET /api/exports/{id}/file`.
    Done {
        /// Size of the zip in bytes.
        bytes: u64,
        packages: Vec<ExportPackage>,
        compression_errors: Vec<ExportCompressionError>,
    },
    Failed {
        message: String,
    },
    Cancelled,
}

impl ExportState {
    pub fn is_finished(&self) -> bool {
        matches!(self, ExportState::Done { .. } | ExportState::Failed { .. } | ExportState::Cancelled)
    }
}

/// `GET /api/exports/{id}` and every event of its stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportStatus {
    pub id: String,
    pub request: ExportRequest,
    /// UTC time, ISO 8601.
    pub created_at: String,
    /// The folder name inside the zip (`Atelier-STYLE-coreml`).
    pub name: String,
    #[serde(flatten)]
    pub state: ExportState,
    /// Package functions written so far, of `total`; `stage` is the package being written
    /// (`zip` while the zip is written).
    pub done: usize,
    pub total: usize,
    pub stage: String,
    /// Set while the export waits for generations (they go first).
    #[serde(default)]
    pub note: Option<String>,
}
