//! Memory admission: what a generation or a training step will need before it starts,
//! how much this process may use, and a per-thread limit that the engine's largest
//! allocations check before they happen.
//!
//! Why: Rust aborts the whole process when an allocation fails, so one request for a
//! 2048×2048 batch of 8 (about 1 TiB of attention scores on the built-in model) used to
//! take the studio down. Requests are now estimated and refused before they are queued
//! ([`admit_generation`]), and the allocations that grow fastest with the image size
//! (attention scores, Candle's im2col buffer in convolutions) call [`check`] first, so a
//! request that slipped past the estimate fails its own job with a message instead.
//!
//! The estimate mirrors what this engine allocates (not what PyTorch would):
//! - UNet, at each resolution level `i` with `C_i` channels and `T_i` latent pixels, for
//!   `B` = batch × 2 with classifier-free guidance: the attention score matrix and its
//!   softmax, `2·heads·T_i²` values for `original` attention (one sample at a time; the CPU
//!   computes the softmax in place, GPUs and training keep both) and `2·B·min(1024, T_i)·T_i`
//!   for `split-einsum` (one head and 1024 queries at a time); the transformer's
//!   projections and GEGLU feed-forward, about 12 feature maps; Candle's im2col buffer of a
//!   3×3 convolution over the concatenated skip input, `9·3·C_i` values per pixel; and
//!   the skip connections kept from the down path.
//! - VAE decoder (the whole batch at once): per resolution level, the im2col buffer of
//!   its widest 3×3 convolution plus four feature maps, and the mid-block attention
//!   (one head, one sample at a time for `original`) at latent resolution.
//! - VAE encoder for img2img: the same at the encoder's levels.
//!
//! `server/tests/memory.rs` checks the estimate against the peak RSS of real runs.

use std::cell::Cell;

use crate::attention::AttentionKind;
use crate::unet::UNetConfig;
use crate::vae::VaeConfig;

/// Queries per head that [`AttentionKind::SplitEinsum`] processes at once
/// (`attention::SPLIT_QUERY_CHUNK`).
const SPLIT_CHUNK: u64 = 1024;

/// Allocator slack and small buffers not modelled: 10 % plus 32 MiB.
fn with_slack(bytes: u64) -> u64 {
    bytes + bytes / 10 + (32 << 20)
}

/// The shape of one generation, as far as memory is concerned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerationShape {
    /// Image size in pixels.
    pub width: usize,
    pub height: usize,
    /// Images generated together.
    pub batch: usize,
    /// Whether classifier-free guidance doubles the UNet batch (guidance > 1).
    pub cfg: bool,
    /// Whether an init image is encoded by the VAE (img2img).
    pub img2img: bool,
    pub attention: AttentionKind,
    /// Text tokens the UNet attends to: 77 per prompt chunk (A1111's chunking makes long
    /// prompts and `BREAK` longer contexts).
    pub context_tokens: usize,
}

/// Bytes a run is expected to need at its peak, beyond the model's weights.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryEstimate {
    pub bytes: u64,
    /// The stage that needs the most, e.g. "attention in the UNet at 256×256 latents".
    pub peak_stage: String,
}

/// Estimates the peak working memory of one generation (bytes beyond the weights).
/// `dtype_bytes` is the compute dtype's size (4 for f32 on the CPU, 2 for f16).
pub fn estimate_generation(unet: &UNetConfig, vae: &VaeConfig, dtype_bytes: u64, shape: &GenerationShape) -> MemoryEstimate {
    let f = vae.scale_factor();
    let (h, w) = ((shape.height / f).max(1) as u64, (shape.width / f).max(1) as u64);
    let s = dtype_bytes;
    let b = shape.batch as u64 * if shape.cfg { 2 } else { 1 };
    let n = unet.block_out_channels.len();

    let mut skips = 0u64;
    let mut unet_peak = (0u64, String::new());
    for i in 0..n {
        let (hi, wi) = (h.div_ceil(1 << i), w.div_ceil(1 << i));
        let t = hi * wi;
        let c = unet.block_out_channels[i] as u64;
        let fmap = b * c * t * s;
        skips += (unet.layers_per_block as u64 + 1) * fmap;
        let conv = 27 * fmap + 3 * fmap;
        let mut level = (conv, format!("convolutions in the UNet at {wi}×{hi} latents"));
        let has_attn = unet.down_block_types.get(i).is_some_and(|t| t.contains("CrossAttn"))
            || (i + 1 == n && unet.mid_block_type.as_deref().is_some_and(|t| t.contains("CrossAttn")));
        if has_attn {
            let heads = unet.heads_of(i) as u64;
            let scores = match shape.attention {
                AttentionKind::SplitEinsum => 2 * b * SPLIT_CHUNK.min(t) * t * s,
                // Flash attention holds no score matrix on CUDA; elsewhere it falls back.
                AttentionKind::Original | AttentionKind::Flash => 2 * heads * t * t * s,
            };
            // Cross-attention over the text runs after self-attention, not beside it.
            let l = shape.context_tokens.max(1) as u64;
            let cross = match shape.attention {
                AttentionKind::SplitEinsum => 2 * b * SPLIT_CHUNK.min(t) * l * s,
                AttentionKind::Original | AttentionKind::Flash => 2 * heads * t * l * s,
            };
            let attn = scores.max(cross) + 12 * fmap;
            if attn > level.0 {
                level = (attn, format!("attention in the UNet at {wi}×{hi} latents"));
            }
        }
        if level.0 > unet_peak.0 {
            unet_peak = level;
        }
    }
    let unet_total = (unet_peak.0 + skips, unet_peak.1);

    let decode = vae_peak(vae, h, w, shape.batch as u64, s, shape.attention, "VAE decoder");
    let mut best = if decode.0 > unet_total.0 { decode } else { unet_total };
    if shape.img2img {
        let encode = vae_peak(vae, h, w, shape.batch as u64, s, shape.attention, "VAE encoder");
        if encode.0 > best.0 {
            best = encode;
        }
    }
    MemoryEstimate { bytes: with_slack(best.0), peak_stage: best.1 }
}

/// The VAE's peak at latent size `h`×`w`: per level, its widest convolution's im2col
/// buffer plus four feature maps, and the one-head mid-block attention at latent size.
fn vae_peak(vae: &VaeConfig, h: u64, w: u64, batch: u64, s: u64, attention: AttentionKind, name: &str) -> (u64, String) {
    let ch = &vae.block_out_channels;
    let n = ch.len();
    let mut best = (0u64, String::new());
    for level in 0..n {
        // Level 0 is the latent resolution, n-1 the image resolution.
        let (hl, wl) = (h << level, w << level);
        let t = hl * wl;
        let hi = n - 1 - level; // index into block_out_channels at this resolution
        let widest = ch[hi].max(if hi + 1 < n { ch[hi + 1] } else { 0 }) as u64;
        let bytes = batch * t * widest * s * (9 + 4);
        if bytes > best.0 {
            best = (bytes, format!("convolutions in the {name} at {wl}×{hl}"));
        }
    }
    if vae.mid_block_add_attention {
        let t = h * w;
        let c = ch[n - 1] as u64;
        let scores = match attention {
            AttentionKind::SplitEinsum => 2 * batch * SPLIT_CHUNK.min(t) * t * s,
            _ => 2 * t * t * s,
        };
        let bytes = scores + 4 * batch * c * t * s;
        if bytes > best.0 {
            best = (bytes, format!("attention in the {name} at {w}×{h} latents"));
        }
    }
    best
}

/// Estimates one training step of a LoRA/LoCon style adapter at `resolution` with
/// `batch` images: the forward activations at guidance-free batch, kept for the backward
/// pass (×3: activations, their gradients, temporaries), plus a second copy of the model
/// weights (`weights` bytes) that the trainer owns and the `images` of the prepared dataset.
pub fn estimate_training(unet: &UNetConfig, vae: &VaeConfig, dtype_bytes: u64, resolution: usize, batch: usize, weights: u64, images: usize) -> MemoryEstimate {
    let shape = GenerationShape {
        width: resolution,
        height: resolution,
        // One sample, times the batch below: the backward pass keeps every sample's
        // attention probabilities, so the one-sample-at-a-time bound of inference does not hold.
        batch: 1,
        cfg: false,
        img2img: true,
        attention: AttentionKind::Original,
        context_tokens: 77,
    };
    let forward = estimate_generation(unet, vae, dtype_bytes, &shape);
    // The prepared dataset stays in memory: 8-bit RGB at the training resolution.
    let dataset = (images * resolution * resolution * 3) as u64;
    MemoryEstimate { bytes: forward.bytes * batch.max(1) as u64 * 3 + weights + dataset, peak_stage: format!("training ({})", forward.peak_stage) }
}

/// The number of values in a safetensors file, from its header alone (the format: an
/// 8-byte little-endian header length, then a JSON map of name → `{dtype, shape,
/// data_offsets}`, see the `safetensors` crate's README).
pub fn safetensors_elements(path: &std::path::Path) -> crate::Result<u64> {
    use std::io::Read;
    let bad = |message: String| crate::Error::Weights { path: path.to_path_buf(), message };
    let mut file = std::fs::File::open(path).map_err(|e| crate::Error::io(path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(bad(format!("header of {len} bytes: not a safetensors file")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(|e| bad(format!("header cut short ({e}); the file may be truncated")))?;
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON ({e})")))?;
    Ok(map
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .filter_map(|(_, v)| v["shape"].as_array())
        .map(|shape| shape.iter().map(|d| d.as_u64().unwrap_or(0)).product::<u64>())
        .sum())
}

/// Checks that training a style on the model in `dir` at `resolution` with `batch`
/// images per step fits `budget` while the model in `dir` is also loaded for generation
/// (the trainer holds its own copy). Returns the bytes the training may use (for
/// [`with_limit`]), or an [`crate::Error::OutOfMemory`] naming the largest batch that fits.
pub fn admit_training(dir: &std::path::Path, dtype_bytes: u64, resolution: usize, batch: usize, images: usize, budget: &MemoryBudget) -> crate::Result<u64> {
    let files = crate::model::ModelFiles::locate(dir)?;
    let unet: UNetConfig = crate::model::read_config(&files.unet_config)?;
    let vae: VaeConfig = crate::model::read_config(&files.vae_config)?;
    let weights = weights_bytes(&files, dtype_bytes)?;
    let available = budget.available(weights);
    let need = |b: usize| estimate_training(&unet, &vae, dtype_bytes, resolution, b, weights, images);
    let asked = need(batch);
    if asked.bytes <= available {
        return Ok(available);
    }
    let fits = (1..batch).rev().find(|&b| need(b).bytes <= available);
    Err(crate::Error::OutOfMemory(format!(
        "training at {resolution}×{resolution} with batch {batch} on {images} image(s) needs ≈{} ({}); this studio allows {} beside the loaded model (--max-memory): {}",
        format_bytes(asked.bytes),
        asked.peak_stage,
        format_bytes(available),
        match fits {
            Some(b) => format!("use a batch of at most {b}"),
            None => "not even a batch of 1 fits; raise --max-memory".to_string(),
        }
    )))
}

/// Bytes the weights of a model folder take once loaded with `dtype_bytes` per value
/// (text encoder, UNet and VAE), from the safetensors headers alone.
pub fn weights_bytes(files: &crate::model::ModelFiles, dtype_bytes: u64) -> crate::Result<u64> {
    [&files.text_encoder_weights, &files.unet_weights, &files.vae_weights]
        .into_iter()
        .chain(files.text_encoder_2.as_ref().map(|t| &t.weights))
        .map(|p| safetensors_elements(p).map(|n| n * dtype_bytes))
        .sum()
}

/// How much memory this process may use for its work, and what the loaded model takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBudget {
    /// The limit for the whole process (`--max-memory`), in bytes.
    pub limit: u64,
}

impl MemoryBudget {
    /// The default: three quarters of the machine's memory (or of the container's limit),
    /// 8 GiB when neither can be read.
    pub fn from_machine() -> Self {
        let total = machine_memory().unwrap_or(32 << 30);
        Self { limit: total / 4 * 3 }
    }

    /// Bytes left for one run's working memory when `resident` bytes (the model's
    /// weights) are already in use.
    pub fn available(&self, resident: u64) -> u64 {
        self.limit.saturating_sub(resident)
    }
}

impl Default for MemoryBudget {
    fn default() -> Self {
        Self::from_machine()
    }
}

/// Physical memory of this machine in bytes, lowered to the cgroup (container) limit
/// when there is one.
pub fn machine_memory() -> Option<u64> {
    let physical = physical_memory();
    let cgroup = cgroup_limit();
    match (physical, cgroup) {
        (Some(p), Some(c)) => Some(p.min(c)),
        (p, c) => p.or(c),
    }
}

#[cfg(unix)]
fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    (pages > 0 && size > 0).then(|| pages as u64 * size as u64)
}

#[cfg(not(unix))]
fn physical_memory() -> Option<u64> {
    None
}

/// cgroup v2 `memory.max` (or v1 `memory.limit_in_bytes`) of this process, if limited.
fn cgroup_limit() -> Option<u64> {
    ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|t| t.trim().parse::<u64>().ok())
        .find(|&v| v < (1 << 60))
}

/// Parses a size such as `12GiB`, `12G`, `512MiB`, `1.5TiB` or a plain byte count.
/// Units are binary (`G` = `GiB` = 2³⁰ bytes), as memory is sold.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().trim_end_matches("ib").trim_end_matches('b') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return None,
    };
    let bytes = value * (1u64 << shift) as f64;
    (value.is_finite() && value > 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// A byte count for people: `1.0 TiB`, `12.0 GiB`, `640 MiB`, `512 KiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (name, shift) in UNITS {
        let v = bytes as f64 / (1u64 << shift) as f64;
        if v >= 1.0 {
            return if v >= 100.0 || name == "MiB" || name == "KiB" { format!("{v:.0} {name}") } else { format!("{v:.1} {name}") };
        }
    }
    format!("{bytes} bytes")
}

thread_local! {
    static LIMIT: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Runs `f` with a limit on single allocations that [`check`] enforces on this thread
/// (the job's worker thread); the previous limit is restored afterwards, also on panic.
pub fn with_limit<R>(limit: Option<u64>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<u64>);
    impl Drop for Restore {
        fn drop(&mut self) {
            LIMIT.with(|l| l.set(self.0));
        }
    }
    let _restore = Restore(LIMIT.with(|l| l.replace(limit)));
    f()
}

/// Fails, instead of letting the process abort, when one buffer of `bytes` for `what`
/// would exceed this thread's limit (see [`with_limit`]). Called before the engine's
/// largest allocations.
pub fn check(what: &str, bytes: u64) -> candle_core::Result<()> {
    match LIMIT.with(Cell::get) {
        // A plain message: `bail!` would append a backtrace when RUST_BACKTRACE is set.
        Some(limit) if bytes > limit => Err(candle_core::Error::Msg(format!(
            "out of memory: {what} needs {} but this job may use {} (--max-memory); lower the size or batch, or use split-einsum attention",
            format_bytes(bytes),
            format_bytes(limit)
        ))),
        _ => Ok(()),
    }
}

/// What [`admit_generation`] decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Admission {
    /// The attention to run with (switched to split-einsum when only that fits).
    pub attention: AttentionKind,
    pub estimate: MemoryEstimate,
    /// Said to the user when the request was changed to fit.
    pub note: Option<String>,
}

/// Decides whether a generation of `shape` fits in `available` bytes: as asked; else with
/// split-einsum attention (same images within float tolerance, bounded memory); else it
/// is refused with a message giving the need, the limit and what would fit.
pub fn admit_generation(unet: &UNetConfig, vae: &VaeConfig, dtype_bytes: u64, shape: &GenerationShape, available: u64) -> crate::Result<Admission> {
    let asked = estimate_generation(unet, vae, dtype_bytes, shape);
    if asked.bytes <= available {
        return Ok(Admission { attention: shape.attention, estimate: asked, note: None });
    }
    let split_shape = GenerationShape { attention: AttentionKind::SplitEinsum, ..*shape };
    let split = estimate_generation(unet, vae, dtype_bytes, &split_shape);
    if shape.attention != AttentionKind::SplitEinsum && split.bytes <= available {
        let note = format!(
            "{}×{} × {} needs ≈{} with original attention; ran with split-einsum attention (≈{}) to fit the {} this studio allows",
            shape.width,
            shape.height,
            shape.batch,
            format_bytes(asked.bytes),
            format_bytes(split.bytes),
            format_bytes(available)
        );
        return Ok(Admission { attention: AttentionKind::SplitEinsum, estimate: split, note: Some(note) });
    }
    let fits = |s: &GenerationShape| estimate_generation(unet, vae, dtype_bytes, s).bytes <= available;
    let step = vae.scale_factor().max(8);
    // Largest square side (a multiple of the latent step) at this batch, best attention.
    let mut side = None;
    let mut x = step;
    while x <= 4096 {
        if fits(&GenerationShape { width: x, height: x, ..split_shape }) {
            side = Some(x);
            x += step;
        } else {
            break;
        }
    }
    let batch = (1..shape.batch).rev().find(|&n| fits(&GenerationShape { batch: n, ..split_shape }));
    let mut hints = Vec::new();
    if let Some(n) = batch {
        hints.push(format!("at {}×{} at most {n} image(s) fit", shape.width, shape.height));
    }
    match side {
        Some(sd) => hints.push(format!("{} image(s) fit up to {sd}×{sd}", shape.batch)),
        None if batch.is_none() && shape.batch > 1 => {}
        None => hints.push(format!("not even {step}×{step} fits")),
    }
    Err(crate::Error::OutOfMemory(format!(
        "{}×{} × {} needs ≈{} for {} (≈{} with split-einsum attention); this studio allows {} for a job (--max-memory): lower the size or batch{}",
        shape.width,
        shape.height,
        shape.batch,
        format_bytes(asked.bytes),
        asked.peak_stage,
        format_bytes(split.bytes),
        format_bytes(available),
        if hints.is_empty() { String::new() } else { format!(" ({})", hints.join("; ")) }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn starter() -> (UNetConfig, VaeConfig) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/starter");
        let unet = serde_json::from_str(&std::fs::read_to_string(dir.join("unet/config.json")).unwrap()).unwrap();
        let vae = serde_json::from_str(&std::fs::read_to_string(dir.join("vae/config.json")).unwrap()).unwrap();
        (unet, vae)
    }

    fn shape(side: usize, batch: usize, attention: AttentionKind) -> GenerationShape {
        GenerationShape { width: side, height: side, batch, cfg: true, img2img: false, attention, context_tokens: 77 }
    }

    #[test]
    fn the_reported_case_needs_over_a_hundred_gibibytes_of_attention() {
        let (unet, vae) = starter();
        let e = estimate_generation(&unet, &vae, 4, &shape(2048, 8, AttentionKind::Original));
        // One of the 16 UNet rows (8 images × CFG) at a time: 4 heads × 65536² scores × 4
        // bytes = 64 GiB, and the softmax output a second such matrix.
        let scores = 2u64 * 4 * 65536 * 65536 * 4;
        assert!(e.bytes >= scores && e.bytes < scores + scores / 5, "{}", e.bytes);
        assert!(e.peak_stage.contains("attention in the UNet at 256×256"), "{}", e.peak_stage);
        let split = estimate_generation(&unet, &vae, 4, &shape(2048, 8, AttentionKind::SplitEinsum));
        assert!(split.bytes < e.bytes / 4, "{}", split.bytes);
    }

    #[test]
    fn refusal_names_need_limit_and_what_fits() {
        let (unet, vae) = starter();
        let err = admit_generation(&unet, &vae, 4, &shape(2048, 8, AttentionKind::Original), 12 << 30).unwrap_err().to_string();
        assert!(err.contains("2048×2048 × 8 needs ≈143 GiB"), "{err}");
        assert!(err.contains("12.0 GiB"), "{err}");
        assert!(err.contains("fit up to"), "{err}");
        // What it says fits, fits; one step more does not.
        let side: usize = err.split("fit up to ").nth(1).unwrap().split('×').next().unwrap().parse().unwrap();
        let fits = admit_generation(&unet, &vae, 4, &shape(side, 8, AttentionKind::Original), 12 << 30).unwrap();
        assert_eq!(fits.attention, AttentionKind::SplitEinsum);
        assert!(fits.note.unwrap().contains("split-einsum"));
        assert!(admit_generation(&unet, &vae, 4, &shape(side + 8, 8, AttentionKind::Original), 12 << 30).is_err());
        // A default request fits as asked.
        let small = admit_generation(&unet, &vae, 4, &shape(64, 1, AttentionKind::Original), 12 << 30).unwrap();
        assert_eq!((small.attention, small.note), (AttentionKind::Original, None));
    }

    #[test]
    fn long_prompts_cost_cross_attention_memory() {
        let (unet, vae) = starter();
        let short = estimate_generation(&unet, &vae, 4, &shape(512, 1, AttentionKind::Original));
        // 130 chunks of 77 tokens (a 10 000-character prompt) at 64×64 latents: the
        // cross-attention scores of one row, 2 × 4 heads × 4096 × 10010 × 4 bytes, outgrow
        // the self-attention ones (4096²).
        let long = estimate_generation(&unet, &vae, 4, &GenerationShape { context_tokens: 130 * 77, ..shape(512, 1, AttentionKind::Original) });
        assert!(long.bytes > short.bytes + 2 * 4 * 4096 * (130 * 77 - 4096) * 4, "{} vs {}", long.bytes, short.bytes);
        assert!(long.peak_stage.contains("attention in the UNet at 64×64"), "{}", long.peak_stage);
    }

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("12GiB"), Some(12 << 30));
        assert_eq!(parse_size("12g"), Some(12 << 30));
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("1.5T"), Some(3 << 39));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("-1G"), None);
        assert_eq!(parse_size("12 parsecs"), None);
        assert_eq!(format_bytes(1 << 40), "1.0 TiB");
        assert_eq!(format_bytes(640 << 20), "640 MiB");
    }

    #[test]
    fn check_refuses_over_the_thread_limit_only() {
        assert!(check("x", u64::MAX).is_ok());
        with_limit(Some(1 << 20), || {
            let e = check("attention scores", 2 << 20).unwrap_err().to_string();
            assert!(e.contains("attention scores needs 2 MiB") && e.contains("may use 1 MiB"), "{e}");
            assert!(check("small", 1 << 10).is_ok());
        });
        assert!(check("x", u64::MAX).is_ok());
    }
}

/// The process's peak resident memory so far (Linux `VmHWM` in `/proc/self/status`), in
/// bytes; `None` where the system does not say.
pub fn peak_rss() -> Option<u64> {
    proc_status_bytes("VmHWM:")
}

/// Resident set size of this process now (Linux `VmRSS`), in bytes; `None` elsewhere.
pub fn resident_rss() -> Option<u64> {
    proc_status_bytes("VmRSS:")
}

fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// Hands freed heap memory back to the system (glibc `malloc_trim(0)`), undoing what
/// [`keep_freed_memory`] keeps: benchmarks call it between cases so one case's peak does
/// not count the memory the previous one freed. A no-op elsewhere.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the heap to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Tells the C allocator to keep freed memory for reuse instead of returning it to the
/// system; call once at start-up, before other threads start.
///
/// glibc serves every block over its mmap threshold (up to 32 MiB, adaptive) with a fresh
/// `mmap` and unmaps it on `free`, and trims the heap top past 128 KiB. Inference
/// allocates and frees feature maps of 10–100 MiB hundreds of times per UNet step, so
/// every one of them was faulted in page by page: ~1 GB/s on the machines measured, against
/// ~20 GB/s for reused memory (BENCHMARKS.md, "allocator"). With `M_MMAP_MAX = 0` large
/// blocks come from the heap and with `M_TRIM_THRESHOLD` at its maximum (2 GiB) freed
/// blocks stay there, so the next step reuses pages that are already mapped. The cost:
/// the process keeps up to its peak working set between generations. Setting
/// `GLIBC_TUNABLES` (glibc.malloc.*) in the environment overrides this. Returns whether the
/// settings were applied (glibc on Linux only).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("GLIBC_TUNABLES").is_some_and(|t| t.to_string_lossy().contains("glibc.malloc.")) {
            return false;
        }
        // SAFETY: mallopt only changes allocator parameters; called before threads exist.
        unsafe { libc::mallopt(libc::M_MMAP_MAX, 0) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
