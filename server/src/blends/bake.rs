//! Baking a blend into one kohya LoRA file, as a task in the interactive lane of the one
//! work queue ([`crate::queue`]), after generations. The bake reads the layer shapes of the
//! served model, resolves the blend's styles in the library by hash
//! ([`crate::blends::resolve`]), and reports each layer as it goes
//! ([`atelier_engine::bake::bake`]). Each bake keeps `DATA/bakes/ID/status.json` and, when
//! done, `DATA/bakes/ID/blend.safetensors`; the newest [`KEEP_BAKES`] are kept.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use app::dto::{BakeRequest, BakeState, BakeStatus};

use crate::generation::generator::Generator;
use crate::queue::{Ctx, JsonDir, Lane, Layout, Phase, Queue, Task, Workers};
use crate::styles::StyleLibrary;
use crate::ApiError;

/// Most bakes that may wait at once.
pub const MAX_QUEUED: usize = 16;
/// Ended bakes kept with their files.
pub const KEEP_BAKES: usize = 32;
/// Highest rank a compressed bake may ask for.
pub const MAX_RANK: usize = 1024;
const STATUS_FILE: &str = "status.json";
const FILE: &str = "blend.safetensors";

/// The bake task kind.
pub struct Bake {
    generator: Arc<dyn Generator>,
    styles: RwLock<Arc<StyleLibrary>>,
    root: PathBuf,
}

impl Bake {
    fn styles(&self) -> Arc<StyleLibrary> {
        self.styles.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn file(&self, id: &str) -> PathBuf {
        self.root.join(id).join(FILE)
    }

    fn bake(&self, ctx: &Ctx<'_, Self>) -> Result<BakeState, ApiError> {
        let status = ctx.status();
        let sd = self.generator.pipeline().ok_or_else(|| ApiError::Unavailable("this studio's generator has no model to bake against".into()))?;
        let blend = atelier_blend::decode(&status.request.link).map_err(|e| ApiError::Invalid { field: "link".into(), message: e.to_string() })?;
        let resolved = crate::blends::resolve(blend, &self.styles(), sd.model_hash());
        let active = resolved.active(sd).map_err(|e| ApiError::Invalid { field: "link".into(), message: crate::error::report(&e) })?;
        let baked = atelier_engine::bake::bake(&active, sd.lora_slots(), status.request.rank, &mut |done, total| {
            ctx.update(|s| {
                s.done = done;
                s.total = total;
            });
            !ctx.is_cancelled()
        })?;
        let meta = HashMap::from([
            ("atelier_blend".to_string(), status.request.link.clone()),
            ("ss_sd_model_hash".to_string(), sd.model_hash().to_string()),
        ]);
        let path = self.file(&status.id);
        atelier_engine::bake::save_kohya(&baked, &meta, &path)?;
        let bytes = std::fs::metadata(&path).map_err(|e| ApiError::Internal(format!("{}: {e}", path.display())))?.len();
        Ok(BakeState::Done { relative_error: baked.relative_error, bytes })
    }
}

impl Task for Bake {
    type Input = ();
    type Status = BakeStatus;
    const NOUN: &'static str = "bake";
    const LANE: Lane = Lane::Interactive;
    /// After generations.
    const PRIORITY: u8 = 1;
    const MAX_WAITING: usize = MAX_QUEUED;
    const KEEP_ENDED: Option<usize> = Some(KEEP_BAKES);

    fn id(s: &BakeStatus) -> &str {
        &s.id
    }

    fn phase(s: &BakeStatus) -> Phase {
        match s.state {
            BakeState::Queued { .. } => Phase::Waiting,
            BakeState::Running => Phase::Running,
            _ => Phase::Ended,
        }
    }

    fn set_waiting(s: &mut BakeStatus, position: usize) {
        s.state = BakeState::Queued { position };
    }

    fn set_started(s: &mut BakeStatus, _input: Option<&()>) {
        s.state = BakeState::Running;
    }

    fn set_cancelled(s: &mut BakeStatus) {
        s.state = BakeState::Cancelled;
    }

    fn set_interrupted(s: &mut BakeStatus) {
        s.state = BakeState::Failed { message: "the server stopped during this bake; bake the blend again".into() };
    }

    fn set_crashed(s: &mut BakeStatus, message: &str) {
        s.state = BakeState::Failed { message: message.into() };
    }

    fn run(&self, _input: Option<()>, ctx: &mut Ctx<'_, Self>) {
        let state = match self.bake(ctx) {
            Ok(done) => done,
            Err(_) if ctx.is_shutting_down() => {
                let mut s = ctx.status();
                Self::set_interrupted(&mut s);
                s.state
            }
            Err(_) if ctx.is_cancelled() => BakeState::Cancelled,
            Err(e) => {
                tracing::warn!(bake = %ctx.status().id, error = %e, "bake failed");
                match e {
                    ApiError::Internal(_) => BakeState::Failed { message: "the bake failed; see the server log".into() },
                    other => BakeState::Failed { message: other.to_string() },
                }
            }
        };
        ctx.save(|s| s.state = state);
    }

    fn forgotten(&self, status: &BakeStatus) {
        let _ = std::fs::remove_dir_all(self.root.join(&status.id));
    }
}

/// The bakes of a studio.
pub struct Bakes {
    queue: Queue<Bake>,
}

impl Bakes {
    /// Opens `root` (`DATA/bakes`) on `workers`.
    pub fn open(root: PathBuf, generator: Arc<dyn Generator>, styles: Arc<StyleLibrary>, workers: &Workers) -> Result<Self, ApiError> {
        let store = JsonDir::open(&root, Layout::Folder(STATUS_FILE)).map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(Self { queue: Queue::open(Bake { generator, styles: RwLock::new(styles), root }, store, workers)? })
    }

    /// Checks `request` (the link decodes, the rank is in range, every style of the blend is
    /// in the library; errors name `field`) and queues the bake.
    pub fn submit(&self, request: BakeRequest, field: &str) -> Result<BakeStatus, ApiError> {
        let invalid = |message: String| ApiError::Invalid { field: field.into(), message };
        let blend = atelier_blend::decode(&request.link).map_err(|e| invalid(e.to_string()))?;
        if request.rank.is_some_and(|r| r == 0 || r > MAX_RANK) {
            return Err(ApiError::Invalid { field: "rank".into(), message: format!("must be in 1..={MAX_RANK}") });
        }
        let task = self.queue.task();
        let resolved = crate::blends::resolve(blend, &task.styles(), &task.generator.model_hash());
        if !resolved.missing.is_empty() {
            return Err(invalid(resolved.tagged_prompt().err().map_or_else(|| "a style of the blend is missing".into(), |e| crate::error::report(&e))));
        }
        let status = BakeStatus {
            id: uuid::Uuid::new_v4().simple().to_string(),
            request,
            created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            state: BakeState::Queued { position: 1 },
            done: 0,
            total: 0,
        };
        Ok(self.queue.submit(status, Some(()))?)
    }

    /// Resolves blends in `styles` from now on.
    pub fn set_styles(&self, styles: Arc<StyleLibrary>) {
        *self.queue.task().styles.write().unwrap_or_else(|e| e.into_inner()) = styles;
    }

    pub fn status(&self, id: &str) -> Result<BakeStatus, ApiError> {
        Ok(self.queue.status(id)?)
    }

    pub fn subscribe(&self, id: &str) -> Result<tokio::sync::watch::Receiver<BakeStatus>, ApiError> {
        Ok(self.queue.subscribe(id)?)
    }

    pub fn cancel(&self, id: &str) -> Result<BakeStatus, ApiError> {
        Ok(self.queue.cancel(id)?)
    }

    /// Every bake, newest first.
    pub fn list(&self) -> Vec<BakeStatus> {
        self.queue.list()
    }

    /// The file of a finished bake.
    pub fn file(&self, id: &str) -> Result<PathBuf, ApiError> {
        let status = self.status(id)?;
        let path = self.queue.task().file(&status.id);
        let unavailable = |why: &str| ApiError::Invalid { field: "bake".into(), message: format!("bake {id} {why}; its file exists once it is done") };
        match status.state {
            BakeState::Done { .. } if path.is_file() => Ok(path),
            BakeState::Done { .. } => Err(ApiError::NotFound { what: "baked file", id: id.to_string() }),
            BakeState::Queued { .. } | BakeState::Running => Err(unavailable("is not finished yet")),
            BakeState::Cancelled => Err(unavailable("was cancelled")),
            BakeState::Failed { .. } => Err(unavailable("failed")),
        }
    }
}
