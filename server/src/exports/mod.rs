//! Core ML exports from the web: a task on the long lane of the one work queue
//! ([`crate::queue`]), like a style training. An export merges the chosen styles (a blend's
//! share link and/or library styles, one package function each; none: the base model) into
//! the served model, writes the packages with [`atelier_engine::coreml::export::export`]
//! into `DATA/exports/ID/export/`, then zips that folder into
//! `DATA/exports/ID/atelier-coreml-ID.zip` (deflate; the folder inside is
//! `Atelier-STYLE-coreml/`). Progress (package functions written of all, and which package)
//! is pushed to the status; a cancelled or failed export leaves neither folder nor zip.
//! Each export keeps `DATA/exports/ID/status.json`; the newest [`KEEP_EXPORTS`] are kept.

pub mod http;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use app::dto::exports::{
    ExportAttention, ExportCompressionError, ExportPackage, ExportPrecision, ExportRequest, ExportState, ExportStatus, ExportTarget,
};
use atelier_engine::coreml::compress::Compression;
use atelier_engine::coreml::export::{ExportOptions, Precision, Progress, StyleComponent, StyleExport};
use atelier_engine::coreml::mil::Target;
use atelier_engine::coreml::Attention;
use atelier_engine::pipeline::StableDiffusion;

use crate::generation::generator::Generator;
use crate::queue::{Ctx, JsonDir, Lane, Layout, Phase, Queue, Task, Workers};
use crate::styles::{StyleEntry, StyleLibrary};
use crate::ApiError;

/// Most exports that may wait at once.
pub const MAX_QUEUED: usize = 8;
/// Ended exports kept with their files (a zip holds a whole model).
pub const KEEP_EXPORTS: usize = 8;
/// Largest image side an export accepts, in pixels.
pub const MAX_SIDE: usize = 2048;
const STATUS_FILE: &str = "status.json";
/// The packages' folder inside `DATA/exports/ID/`.
const EXPORT_DIR: &str = "export";

/// Where a style of an export comes from, before its adapters are bound to the model.
enum Source {
    Blend(crate::blends::Resolved),
    Style(StyleEntry, f64),
}

/// One style of an export as planned at submit time (checked, not yet loaded).
struct Planned {
    name: String,
    source: Source,
    link: Option<String>,
    components: Vec<StyleComponent>,
}

impl Planned {
    fn kind(&self) -> &'static str {
        match self.source {
            Source::Blend(_) => "blend",
            Source::Style(..) => "lora",
        }
    }

    /// The style without adapters (what [`atelier_engine::coreml::export::check`] reads).
    fn unbound(&self) -> StyleExport {
        StyleExport { name: self.name.clone(), kind: self.kind().into(), link: self.link.clone(), components: self.components.clone(), active: vec![] }
    }

    /// The style with its adapters bound to `sd`.
    fn bind(&self, sd: &StableDiffusion) -> Result<StyleExport, ApiError> {
        let active = match &self.source {
            Source::Blend(resolved) => resolved.active(sd)?,
            Source::Style(entry, weight) => {
                let adapter = Arc::new(atelier_engine::lora::LoraAdapter::load(&entry.adapter())?);
                let lora = sd
                    .bind_lora(&adapter)
                    .map_err(|source| crate::blends::BlendError::Apply { name: entry.name.clone(), source })?;
                vec![atelier_engine::lora::ActiveLora { lora, weight: *weight, blocks: Default::default() }]
            }
        };
        Ok(StyleExport { active, ..self.unbound() })
    }
}

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::Invalid { field: field.into(), message: message.into() }
}

/// Whether `name` can name a package function (and a folder in the zip).
fn function_name_ok(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Reads the request's styles against `library` and the model (by `model_hash`): a blend
/// link that does not decode or needs a style this studio lacks is a 400 on `blend`, an
/// unknown library style a 404.
fn plan(request: &ExportRequest, library: &StyleLibrary, model_hash: &str) -> Result<Vec<Planned>, ApiError> {
    let mut planned = Vec::new();
    if let Some(link) = &request.blend {
        let blend = atelier_blend::decode(link).map_err(|e| invalid("blend", e.to_string()))?;
        let code = atelier_blend::encode(&blend).map_err(|e| invalid("blend", e.to_string()))?;
        let resolved = crate::blends::resolve(blend, library, model_hash);
        if let Err(e) = resolved.tagged_prompt() {
            return Err(invalid("blend", crate::error::report(&e)));
        }
        let name = request.blend_name.clone().unwrap_or_else(|| "blend".into());
        if !function_name_ok(&name) {
            return Err(invalid("blend_name", format!("{name:?}: use up to 64 letters, digits, - and _ (it names a function in the packages)")));
        }
        let components = resolved
            .blend
            .styles
            .iter()
            .zip(&resolved.styles)
            .filter(|(s, _)| s.weight != 0.0)
            .map(|(s, e)| StyleComponent { name: e.as_ref().map_or_else(|| s.name.clone(), |e| e.name.clone()), hash: s.hash.clone(), weight: s.weight })
            .collect();
        planned.push(Planned { name, source: Source::Blend(resolved), link: Some(code), components });
    } else if request.blend_name.is_some() {
        return Err(invalid("blend_name", "names the blend; give the blend's link in `blend` too"));
    }
    for s in &request.styles {
        if !s.weight.is_finite() || s.weight.abs() > 10.0 {
            return Err(invalid("styles", format!("style {} has weight {}; use a number between -10 and 10", s.name, s.weight)));
        }
        let entry = library.find(&s.name).ok_or_else(|| ApiError::NotFound { what: "style", id: s.name.clone() })?;
        let hash = entry.short_hash().ok_or_else(|| ApiError::Internal(format!("cannot read the adapter of style {}", entry.name)))?;
        let components = vec![StyleComponent { name: entry.name.clone(), hash, weight: s.weight }];
        planned.push(Planned { name: entry.name.clone(), source: Source::Style(entry, s.weight), link: None, components });
    }
    Ok(planned)
}

/// The engine's options for `request` on a model whose native image side is `native`
/// pixels; errors name the request's field.
fn options(request: &ExportRequest, native: usize) -> Result<ExportOptions, ApiError> {
    let side = |field: &str, v: Option<usize>| -> Result<usize, ApiError> {
        let v = v.unwrap_or(native);
        if v == 0 || v % 8 != 0 {
            return Err(invalid(field, format!("{v} pixels is not a multiple of 8; Stable Diffusion works on 8×8-pixel latents")));
        }
        if v > MAX_SIDE {
            return Err(invalid(field, format!("{v} pixels is more than {MAX_SIDE}")));
        }
        Ok(v)
    };
    let (width, height) = (side("width", request.width)?, side("height", request.height)?);
    let compression = match (request.palettize, request.quantize.as_deref()) {
        (Some(_), Some(_)) => return Err(invalid("quantize", "choose palettize or quantize, not both")),
        (Some(bits @ (4 | 6 | 8)), None) => Some(Compression::Palettize { bits, group_size: None }),
        (Some(bits), None) => return Err(invalid("palettize", format!("{bits} bits: Core ML's look-up tables hold 16, 64 or 256 values (4, 6 or 8 bits)"))),
        (None, Some("int8")) => Some(Compression::Int8),
        (None, Some(other)) => return Err(invalid("quantize", format!("{other:?}: the one quantization is int8"))),
        (None, None) => None,
    };
    Ok(ExportOptions {
        attention: match request.attention {
            ExportAttention::SplitEinsum => Attention::SplitEinsum,
            ExportAttention::Original => Attention::Original,
        },
        precision: match request.precision {
            ExportPrecision::Fp16 => Precision::Fp16,
            ExportPrecision::Fp32 => Precision::Fp32,
        },
        compression,
        target: match request.target {
            ExportTarget::Ios16 => Target::Ios16,
            ExportTarget::Ios17 => Target::Ios17,
            ExportTarget::Ios18 => Target::Ios18,
        },
        chunk_unet: request.chunk_unet,
        width,
        height,
        unet_batch: if request.unet_batch_one { 1 } else { 2 },
        vae_encoder: request.vae_encoder,
    })
}

/// The folder name inside the zip: `Atelier-<styles joined by +>-coreml` (`base` for none).
fn folder_name(planned: &[Planned]) -> String {
    let mut label = planned.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join("+");
    if label.is_empty() {
        label = "base".into();
    }
    if label.len() > 80 {
        label.truncate(80);
        label.push_str("+more");
    }
    format!("Atelier-{label}-coreml")
}

/// An engine error as the API says it: a full disk is the user's to fix (503).
fn engine_error(e: atelier_engine::Error) -> ApiError {
    match &e {
        atelier_engine::Error::Io { source, .. } if crate::error::is_disk_full(source) => ApiError::storage(&e, source),
        _ => e.into(),
    }
}

fn io_error(what: &Path, e: std::io::Error) -> ApiError {
    #[derive(Debug, thiserror::Error)]
    #[error("writing {0}")]
    struct Writing(String, #[source] std::io::Error);
    let wrapped = Writing(what.display().to_string(), e);
    ApiError::storage(&wrapped, &wrapped.1)
}

/// Every file and folder under `dir`, relative, sorted (folders before their contents).
fn walk(dir: &Path, rel: &Path, out: &mut Vec<(PathBuf, bool)>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let r = rel.join(e.file_name());
        if e.file_type()?.is_dir() {
            out.push((r.clone(), true));
            walk(&e.path(), &r, out)?;
        } else {
            out.push((r, false));
        }
    }
    Ok(())
}

/// Zips `src` into `dest` under the folder `folder/` (deflate), through `dest.partial` and
/// a rename, so `dest` is whole or absent; `cancelled` is asked between files. Returns the
/// zip's size in bytes.
fn write_zip(src: &Path, folder: &str, dest: &Path, cancelled: &dyn Fn() -> bool) -> Result<u64, ApiError> {
    let partial = dest.with_extension("zip.partial");
    let result = (|| -> Result<u64, ApiError> {
        let mut files = Vec::new();
        walk(src, Path::new(""), &mut files).map_err(|e| io_error(src, e))?;
        let file = std::fs::File::create(&partial).map_err(|e| io_error(&partial, e))?;
        let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
        let zip_err = |e: zip::result::ZipError| match e {
            zip::result::ZipError::Io(io) => io_error(&partial, io),
            other => ApiError::Internal(format!("writing {}: {other}", partial.display())),
        };
        let base = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        zip.add_directory(format!("{folder}/"), base.unix_permissions(0o755)).map_err(zip_err)?;
        let mut buf = vec![0u8; 1 << 20];
        for (rel, is_dir) in files {
            if cancelled() {
                return Err(invalid("export", "cancelled"));
            }
            let name = format!("{folder}/{}", rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/"));
            if is_dir {
                zip.add_directory(format!("{name}/"), base.unix_permissions(0o755)).map_err(zip_err)?;
                continue;
            }
            let path = src.join(&rel);
            let mut input = std::fs::File::open(&path).map_err(|e| io_error(&path, e))?;
            let len = input.metadata().map_err(|e| io_error(&path, e))?.len();
            zip.start_file(name, base.unix_permissions(0o644).large_file(len >= u32::MAX as u64)).map_err(zip_err)?;
            loop {
                let n = input.read(&mut buf).map_err(|e| io_error(&path, e))?;
                if n == 0 {
                    break;
                }
                zip.write_all(&buf[..n]).map_err(|e| io_error(&partial, e))?;
            }
        }
        let writer = zip.finish().map_err(zip_err)?;
        let file = writer.into_inner().map_err(|e| io_error(&partial, e.into_error()))?;
        file.sync_all().map_err(|e| io_error(&partial, e))?;
        drop(file);
        std::fs::rename(&partial, dest).map_err(|e| io_error(dest, e))?;
        std::fs::metadata(dest).map(|m| m.len()).map_err(|e| io_error(dest, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// The export task kind.
pub struct Export {
    generator: Arc<dyn Generator>,
    styles: RwLock<Arc<StyleLibrary>>,
    root: PathBuf,
}

impl Export {
    fn styles(&self) -> Arc<StyleLibrary> {
        self.styles.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn zip_path(&self, id: &str) -> PathBuf {
        self.root.join(id).join(format!("atelier-coreml-{id}.zip"))
    }

    /// Removes what an unfinished export of `id` wrote (packages, staging, zip).
    fn clean(&self, id: &str) {
        let dir = self.root.join(id);
        let _ = std::fs::remove_dir_all(dir.join(EXPORT_DIR));
        let _ = std::fs::remove_dir_all(dir.join(format!(".{EXPORT_DIR}.partial")));
        let zip = self.zip_path(id);
        let _ = std::fs::remove_file(zip.with_extension("zip.partial"));
        let _ = std::fs::remove_file(zip);
    }

    fn model(&self) -> Result<&StableDiffusion, ApiError> {
        self.generator.pipeline().ok_or_else(|| ApiError::Unavailable("this studio's generator has no model to export".into()))
    }

    fn export(&self, ctx: &Ctx<'_, Self>) -> Result<ExportState, ApiError> {
        let status = ctx.status();
        let sd = self.model()?;
        let planned = plan(&status.request, &self.styles(), sd.model_hash())?;
        let styles = planned.iter().map(|p| p.bind(sd)).collect::<Result<Vec<_>, _>>()?;
        let opts = options(&status.request, sd.default_size())?;
        self.clean(&status.id);
        let out = self.root.join(&status.id).join(EXPORT_DIR);
        let mut progress = |p: Progress| {
            ctx.update(|s| {
                s.done = p.done;
                s.total = p.total;
                s.stage = p.stage.to_string();
            });
            // Generations go first: pause here while one waits or runs, and say so.
            if ctx.wait_turn(|| ctx.update(|s| s.note = Some("paused while generations run (they go first); continues after them".into()))) {
                ctx.update(|s| s.note = None);
            }
            !ctx.is_cancelled()
        };
        let manifest = atelier_engine::coreml::export::export(
            sd.dir(),
            &self.generator.model_name(),
            sd.model_hash(),
            Some(sd.lora_slots()),
            &styles,
            &opts,
            &out,
            &mut progress,
        )
        .map_err(engine_error)?;
        drop(styles);
        ctx.update(|s| s.stage = "zip".into());
        let bytes = write_zip(&out, &status.name, &self.zip_path(&status.id), &|| ctx.is_cancelled())?;
        Ok(ExportState::Done {
            bytes,
            packages: manifest.packages.iter().map(|p| ExportPackage { name: p.name.clone(), bytes: p.bytes, functions: p.functions.clone() }).collect(),
            compression_errors: manifest
                .compression_errors
                .iter()
                .map(|e| ExportCompressionError { package: e.package.clone(), option: e.option.clone(), relative_error: e.relative_error, max_abs_error: e.max_abs_error })
                .collect(),
        })
    }
}

impl Task for Export {
    type Input = ();
    type Status = ExportStatus;
    const NOUN: &'static str = "export";
    /// Heavy like a training: one at a time, pausing for generations.
    const LANE: Lane = Lane::Long;
    const MAX_WAITING: usize = MAX_QUEUED;
    const KEEP_ENDED: Option<usize> = Some(KEEP_EXPORTS);

    fn id(s: &ExportStatus) -> &str {
        &s.id
    }

    fn phase(s: &ExportStatus) -> Phase {
        match s.state {
            ExportState::Queued { .. } => Phase::Waiting,
            ExportState::Running => Phase::Running,
            _ => Phase::Ended,
        }
    }

    fn set_waiting(s: &mut ExportStatus, position: usize) {
        s.state = ExportState::Queued { position };
    }

    fn set_started(s: &mut ExportStatus, _input: Option<&()>) {
        s.state = ExportState::Running;
    }

    fn set_cancelled(s: &mut ExportStatus) {
        s.state = ExportState::Cancelled;
        s.note = None;
    }

    fn set_interrupted(s: &mut ExportStatus) {
        s.state = ExportState::Failed { message: "the server stopped during this export; export again".into() };
        s.note = None;
    }

    fn set_crashed(s: &mut ExportStatus, message: &str) {
        s.state = ExportState::Failed { message: message.into() };
        s.note = None;
    }

    fn run(&self, _input: Option<()>, ctx: &mut Ctx<'_, Self>) {
        let state = match self.export(ctx) {
            Ok(done) => done,
            Err(_) if ctx.is_shutting_down() => {
                let mut s = ctx.status();
                Self::set_interrupted(&mut s);
                s.state
            }
            Err(_) if ctx.is_cancelled() => ExportState::Cancelled,
            Err(e) => {
                tracing::warn!(export = %ctx.status().id, error = %e, "export failed");
                match e {
                    ApiError::Internal(_) => ExportState::Failed { message: "the export failed; see the server log".into() },
                    other => ExportState::Failed { message: other.to_string() },
                }
            }
        };
        if !matches!(state, ExportState::Done { .. }) {
            self.clean(&ctx.status().id);
        }
        ctx.save(|s| {
            s.state = state;
            s.note = None;
        });
    }

    fn forgotten(&self, status: &ExportStatus) {
        let _ = std::fs::remove_dir_all(self.root.join(&status.id));
    }
}

/// The Core ML exports of a studio.
pub struct Exports {
    queue: Queue<Export>,
}

impl Exports {
    /// Opens `root` (`DATA/exports`) on `workers`; exports that were running when the studio
    /// stopped are failed and their partial files removed.
    pub fn open(root: PathBuf, generator: Arc<dyn Generator>, styles: Arc<StyleLibrary>, workers: &Workers) -> Result<Self, ApiError> {
        let store = JsonDir::open(&root, Layout::Folder(STATUS_FILE)).map_err(|e| ApiError::Internal(e.to_string()))?;
        let exports = Self { queue: Queue::open(Export { generator, styles: RwLock::new(styles), root }, store, workers)? };
        for s in exports.queue.list() {
            if !matches!(s.state, ExportState::Done { .. }) && s.state.is_finished() {
                exports.queue.task().clean(&s.id);
            }
        }
        Ok(exports)
    }

    /// Checks `request` (styles exist and fit, options and sizes are ones Core ML and the
    /// model take; errors name the field) and queues the export.
    pub fn submit(&self, request: ExportRequest) -> Result<ExportStatus, ApiError> {
        let task = self.queue.task();
        let sd = task.model()?;
        let opts = options(&request, sd.default_size())?;
        let planned = plan(&request, &task.styles(), sd.model_hash())?;
        let unbound: Vec<StyleExport> = planned.iter().map(Planned::unbound).collect();
        atelier_engine::coreml::export::check(sd.dir(), &unbound, &opts).map_err(engine_error)?;
        let status = ExportStatus {
            id: uuid::Uuid::new_v4().simple().to_string(),
            name: folder_name(&planned),
            request,
            created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            state: ExportState::Queued { position: 1 },
            done: 0,
            total: 0,
            stage: String::new(),
            note: None,
        };
        Ok(self.queue.submit(status, Some(()))?)
    }

    /// Resolves styles in `styles` from now on.
    pub fn set_styles(&self, styles: Arc<StyleLibrary>) {
        *self.queue.task().styles.write().unwrap_or_else(|e| e.into_inner()) = styles;
    }

    pub fn status(&self, id: &str) -> Result<ExportStatus, ApiError> {
        Ok(self.queue.status(id)?)
    }

    pub fn subscribe(&self, id: &str) -> Result<tokio::sync::watch::Receiver<ExportStatus>, ApiError> {
        Ok(self.queue.subscribe(id)?)
    }

    pub fn cancel(&self, id: &str) -> Result<ExportStatus, ApiError> {
        Ok(self.queue.cancel(id)?)
    }

    /// Every export, newest first.
    pub fn list(&self) -> Vec<ExportStatus> {
        self.queue.list()
    }

    /// The zip of a finished export and the name to download it as (`NAME.zip`).
    pub fn file(&self, id: &str) -> Result<(PathBuf, String), ApiError> {
        let status = self.status(id)?;
        let path = self.queue.task().zip_path(&status.id);
        let unavailable = |why: &str| invalid("export", format!("export {id} {why}; its zip exists once it is done"));
        match status.state {
            ExportState::Done { .. } if path.is_file() => Ok((path, format!("{}.zip", status.name))),
            ExportState::Done { .. } => Err(ApiError::NotFound { what: "export zip", id: id.to_string() }),
            ExportState::Queued { .. } | ExportState::Running => Err(unavailable("is not finished yet")),
            ExportState::Cancelled => Err(unavailable("was cancelled")),
            ExportState::Failed { .. } => Err(unavailable("failed")),
        }
    }

    /// The packages folder of a finished export (`DATA/exports/ID/export`).
    pub fn folder(&self, id: &str) -> Result<PathBuf, ApiError> {
        let status = self.status(id)?;
        Ok(self.queue.task().root.join(&status.id).join(EXPORT_DIR))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> ExportRequest {
        serde_json::from_str("{}").unwrap()
    }

    #[test]
    fn defaults_are_fp16_split_einsum_ios16_native_size() {
        let r = request();
        assert!(r.vae_encoder && !r.chunk_unet && !r.unet_batch_one);
        let o = options(&r, 512).unwrap();
        assert_eq!((o.width, o.height, o.unet_batch), (512, 512, 2));
        assert_eq!(o.precision, Precision::Fp16);
        assert_eq!(o.attention, Attention::SplitEinsum);
        assert_eq!(o.target, Target::Ios16);
        assert!(o.compression.is_none());
    }

    #[test]
    fn options_name_the_bad_field() {
        let field = |r: ExportRequest| match options(&r, 64) {
            Err(ApiError::Invalid { field, .. }) => field,
            other => panic!("{:?}", other.map(|_| ())),
        };
        assert_eq!(field(ExportRequest { width: Some(100), ..request() }), "width");
        assert_eq!(field(ExportRequest { height: Some(0), ..request() }), "height");
        assert_eq!(field(ExportRequest { height: Some(4096), ..request() }), "height");
        assert_eq!(field(ExportRequest { palettize: Some(5), ..request() }), "palettize");
        assert_eq!(field(ExportRequest { quantize: Some("int4".into()), ..request() }), "quantize");
        assert_eq!(field(ExportRequest { palettize: Some(4), quantize: Some("int8".into()), ..request() }), "quantize");
        let o = options(&ExportRequest { palettize: Some(6), ..request() }, 64).unwrap();
        assert_eq!(o.compression, Some(Compression::Palettize { bits: 6, group_size: None }));
    }

    #[test]
    fn zips_a_folder_atomically_under_a_readable_name() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("export");
        std::fs::create_dir_all(src.join("A.mlpackage/Data")).unwrap();
        std::fs::write(src.join("A.mlpackage/Data/weight.bin"), vec![7u8; 300_000]).unwrap();
        std::fs::write(src.join("vocab.json"), b"{}").unwrap();
        let dest = tmp.path().join("out.zip");
        let bytes = write_zip(&src, "Atelier-x-coreml", &dest, &|| false).unwrap();
        assert_eq!(bytes, std::fs::metadata(&dest).unwrap().len());
        assert!(bytes < 300_000, "deflated: {bytes}");
        let mut zip = zip::ZipArchive::new(std::fs::File::open(&dest).unwrap()).unwrap();
        let names: Vec<String> = zip.file_names().map(|n| n.unwrap().into_owned()).collect();
        for n in ["Atelier-x-coreml/", "Atelier-x-coreml/A.mlpackage/Data/weight.bin", "Atelier-x-coreml/vocab.json"] {
            assert!(names.iter().any(|x| x == n), "{n} in {names:?}");
        }
        let mut data = Vec::new();
        zip.by_name("Atelier-x-coreml/A.mlpackage/Data/weight.bin").unwrap().read_to_end(&mut data).unwrap();
        assert_eq!(data, vec![7u8; 300_000]);
        // Cancelled: no zip, no partial file.
        let dest2 = tmp.path().join("two.zip");
        assert!(write_zip(&src, "x", &dest2, &|| true).is_err());
        assert!(!dest2.exists() && !dest2.with_extension("zip.partial").exists());
    }
}
