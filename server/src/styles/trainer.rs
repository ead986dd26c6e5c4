//! Style training from the web: uploaded datasets, and a queue of trainings run one at a
//! time on a worker thread with its own copy of the model (generation keeps running).
//!
//! On disk, under `DATA/trainings/`:
//! - `datasets/ID/`: the uploaded images and `.txt` captions (zips are unpacked here);
//! - `runs/ID.json`: each training's last status (settings, step, loss history, samples),
//!   written atomically, so a restarted server lists its trainings; one that was running
//!   comes back as stopped and resumes from its last checkpoint.
//!
//! The training itself writes into the style's folder in the library, exactly as
//! `atelier train-style` does ([`crate::styles::training::run_training`]).

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use app::dto::{DatasetImage, DatasetSkip, DatasetSummary, StyleTrainingRequest, TrainingSample, TrainingState, TrainingStatus};
use atelier_engine::pipeline::StableDiffusion;
use atelier_engine::style::dataset::scan;
use atelier_engine::style::train::StyleEvent;
use tokio::sync::watch;

use crate::styles::training::{run_training, RunError, RunEvent};
use crate::styles::{check_name, StyleLibrary};
use crate::ApiError;

/// Most files one dataset may hold (after unpacking zips).
pub const MAX_DATASET_FILES: usize = 2000;
/// Most bytes the files of one zip may unpack to.
pub const MAX_UNZIPPED_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// Loss points kept per training for the chart.
const MAX_LOSS_POINTS: usize = 300;
/// How often a running training's status is written to disk.
const PERSIST_EVERY: Duration = Duration::from_secs(2);

/// Where the trainer gets its model.
#[derive(Clone)]
pub struct ModelSource {
    pub dir: PathBuf,
    pub device: candle_core::Device,
    /// Side of the square images the model makes (datasets are checked against it).
    pub resolution: u32,
    /// How much memory this process may use (`--max-memory`); trainings are checked
    /// against it before they are queued.
    pub budget: atelier_engine::memory::MemoryBudget,
}

struct Entry {
    status: watch::Sender<TrainingStatus>,
    cancel: Arc<AtomicBool>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<String>,
    trainings: HashMap<String, Entry>,
    shutdown: bool,
}

struct Shared {
    root: PathBuf,
    library: Arc<StyleLibrary>,
    tracking: PathBuf,
    model: ModelSource,
    queue: Mutex<Queue>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn datasets(&self) -> PathBuf {
        self.root.join("datasets")
    }

    fn runs(&self) -> PathBuf {
        self.root.join("runs")
    }

    fn dataset_dir(&self, id: &str) -> Result<PathBuf, ApiError> {
        let dir = self.datasets().join(id);
        if uuid::Uuid::parse_str(id).is_err() || !dir.is_dir() {
            return Err(ApiError::NotFound { what: "dataset", id: id.to_string() });
        }
        Ok(dir)
    }

    fn persist(&self, status: &TrainingStatus) {
        let path = self.runs().join(format!("{}.json", status.id));
        let tmp = path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(self.runs())?;
            std::fs::write(&tmp, serde_json::to_vec_pretty(status)?)?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            tracing::error!(training = %status.id, error = %e, "cannot save the training status");
        }
    }

    /// Changes a training's status, publishes it and (when `save`) writes it to disk.
    fn update(&self, id: &str, save: bool, change: impl FnOnce(&mut TrainingStatus)) {
        let q = self.lock();
        let Some(entry) = q.trainings.get(id) else { return };
        entry.status.send_modify(change);
        let status = entry.status.borrow().clone();
        drop(q);
        if save {
            self.persist(&status);
        }
    }

    /// Renumbers the queue positions after a change to the waiting list.
    fn renumber(&self, q: &Queue) {
        for (i, id) in q.waiting.iter().enumerate() {
            if let Some(e) = q.trainings.get(id) {
                e.status.send_modify(|s| s.state = TrainingState::Queued { position: i + 1 });
            }
        }
    }
}

/// The web trainer. Dropping it stops the running training (with a checkpoint).
pub struct Trainer {
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Trainer {
    /// Opens the trainer's folder `root` (listing earlier trainings) and starts its worker.
    pub fn open(root: &Path, library: Arc<StyleLibrary>, tracking: PathBuf, model: ModelSource) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root.join("datasets"))?;
        std::fs::create_dir_all(root.join("runs"))?;
        // Uploads cut off by a crash or restart left their pieces here.
        let _ = std::fs::remove_dir_all(root.join("incoming"));
        let shared = Arc::new(Shared {
            root: root.to_path_buf(),
            library,
            tracking,
            model,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
        });
        let mut loaded = Vec::new();
        for entry in std::fs::read_dir(shared.runs())?.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                match std::fs::read(&path).map_err(|e| e.to_string()).and_then(|b| serde_json::from_slice::<TrainingStatus>(&b).map_err(|e| e.to_string())) {
                    Ok(mut s) => {
                        if s.state.is_active() {
                            s.state = TrainingState::Stopped;
                            s.steps_per_s = None;
                            s.eta_s = None;
                            s.note = Some("the server stopped during this training; resume continues from its last checkpoint".into());
                            shared.persist(&s);
                        }
                        loaded.push(s);
                    }
                    Err(e) => tracing::warn!(file = %path.display(), error = %e, "skipping an unreadable training record"),
                }
            }
        }
        {
            let mut q = shared.lock();
            for s in loaded {
                let (tx, _) = watch::channel(s.clone());
                q.trainings.insert(s.id.clone(), Entry { status: tx, cancel: Arc::new(AtomicBool::new(false)) });
            }
        }
        let worker = {
            let shared = shared.clone();
            std::thread::Builder::new().name("atelier-trainer".into()).spawn(move || worker_loop(&shared))?
        };
        Ok(Self { shared, worker: Mutex::new(Some(worker)) })
    }

    /// The model the trainer (and blend baking) loads.
    pub fn model_source(&self) -> &ModelSource {
        &self.shared.model
    }

    /// Where uploads are received before [`Trainer::add_files`] takes them.
    pub fn incoming_dir(&self) -> PathBuf {
        self.shared.root.join("incoming")
    }

    /// Adds uploaded files (images, `.txt` captions, or zips of them) to the dataset `into`,
    /// or to a new one, and reports what it holds. `files` are (name as uploaded, temporary
    /// file); the temporary files are moved or removed. Blocking: decodes every image.
    pub fn add_files(&self, into: Option<&str>, files: Vec<(String, PathBuf)>) -> Result<DatasetSummary, ApiError> {
        let (id, dir) = match into {
            Some(id) => (id.to_string(), self.shared.dataset_dir(id)?),
            None => {
                let id = uuid::Uuid::new_v4().to_string();
                let dir = self.shared.datasets().join(&id);
                std::fs::create_dir_all(&dir).map_err(|e| ApiError::Internal(format!("{}: {e}", dir.display())))?;
                (id, dir)
            }
        };
        let result = add_uploaded(&dir, &files);
        for (_, tmp) in &files {
            let _ = std::fs::remove_file(tmp);
        }
        result?;
        self.dataset(&id)
    }

    /// What the dataset `id` holds, as the training will see it.
    pub fn dataset(&self, id: &str) -> Result<DatasetSummary, ApiError> {
        let dir = self.shared.dataset_dir(id)?;
        let min_images = StyleTrainingRequest::default().min_images;
        let report = scan(&dir, "TRIGGER", self.shared.model.resolution, min_images)?;
        let name = |p: &Path| p.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let mut skipped: Vec<DatasetSkip> = report.rejected.iter().map(|r| DatasetSkip { file: name(&r.path), reason: r.reason.clone() }).collect();
        skipped.extend(report.duplicates.iter().map(|d| DatasetSkip { file: name(&d.path), reason: d.reason() }));
        Ok(DatasetSummary {
            id: id.to_string(),
            images: report
                .items
                .iter()
                .map(|i| DatasetImage {
                    file: name(&i.path),
                    width: i.width,
                    height: i.height,
                    caption: i.caption_from_file.then(|| i.caption.clone()),
                    caption_note: i.caption_note.clone(),
                })
                .collect(),
            skipped,
            resolution: report.resolution,
            min_images,
            usable: report.is_usable(),
        })
    }

    /// A file of a dataset (for thumbnails).
    pub fn dataset_file(&self, id: &str, file: &str) -> Result<PathBuf, ApiError> {
        let dir = self.shared.dataset_dir(id)?;
        let not_found = || ApiError::NotFound { what: "dataset file", id: format!("{id}/{file}") };
        if file.is_empty() || file.contains(['/', '\\']) || file.starts_with('.') {
            return Err(not_found());
        }
        let path = dir.join(file);
        if path.is_file() { Ok(path) } else { Err(not_found()) }
    }

    /// Checks `req` and queues the training.
    pub fn start(&self, mut req: StyleTrainingRequest) -> Result<TrainingStatus, ApiError> {
        let invalid = |field: &str, message: String| ApiError::Invalid { field: field.into(), message };
        req.name = req.name.trim().to_string();
        req.trigger = req.trigger.trim().to_string();
        check_name(&req.name).map_err(|e| invalid("name", e.to_string()))?;
        if self.shared.library.find(&req.name).is_some_and(|s| s.name.eq_ignore_ascii_case(&req.name)) {
            return Err(invalid("name", format!("a style called {} already exists: delete or rename it, or choose another name", req.name)));
        }
        if req.trigger.chars().count() > 64 || req.trigger.contains(['\n', '<', '>']) {
            return Err(invalid("trigger", "use one short word or phrase (at most 64 characters, no line breaks or < >)".into()));
        }
        let ranges: [(&str, f64, f64, f64); 5] = [
            ("steps", req.steps as f64, 1.0, 100_000.0),
            ("rank", req.rank as f64, 1.0, 256.0),
            ("batch", req.batch as f64, 1.0, 64.0),
            ("lr", req.lr, 1e-7, 1.0),
            ("min_snr_gamma", req.min_snr_gamma, 0.0, 100.0),
        ];
        for (field, v, lo, hi) in ranges {
            if !(lo..=hi).contains(&v) || !v.is_finite() {
                return Err(invalid(field, format!("{v} is outside {lo}..={hi}")));
            }
        }
        if req.alpha.is_some_and(|a| !(a > 0.0 && a <= 1024.0)) {
            return Err(invalid("alpha", "must be in (0, 1024]".into()));
        }
        if !(0.0..=1.0).contains(&req.noise_offset) {
            return Err(invalid("noise_offset", "must be in 0..=1".into()));
        }
        let summary = self.dataset(&req.dataset_id).map_err(|e| match e {
            ApiError::NotFound { .. } => invalid("dataset_id", format!("no uploaded dataset {:?}: upload the images first", req.dataset_id)),
            other => other,
        })?;
        if summary.images.len() < req.min_images.max(1) {
            return Err(invalid(
                "dataset_id",
                format!("{} usable image(s), at least {} are needed: add more images", summary.images.len(), req.min_images.max(1)),
            ));
        }
        let m = &self.shared.model;
        let dtype_bytes = atelier_engine::pipeline::compute_dtype(&m.device).size_in_bytes() as u64;
        atelier_engine::memory::admit_training(&m.dir, dtype_bytes, m.resolution as usize, req.batch as usize, summary.images.len(), &m.budget)?;
        let mut q = self.shared.lock();
        if let Some(other) = q.trainings.values().map(|e| e.status.borrow().clone()).find(|s| {
            s.request.name.eq_ignore_ascii_case(&req.name) && !matches!(s.state, TrainingState::Done { .. })
        }) {
            return Err(invalid(
                "name",
                format!("training {} already trains {}: resume or delete it, or choose another name", other.id, other.request.name),
            ));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let status = TrainingStatus {
            id: id.clone(),
            total: req.steps,
            request: req,
            created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            state: TrainingState::Queued { position: q.waiting.len() + 1 },
            step: 0,
            loss: None,
            steps_per_s: None,
            eta_s: None,
            losses: Vec::new(),
            samples: Vec::new(),
            note: None,
        };
        let (tx, _) = watch::channel(status.clone());
        q.trainings.insert(id.clone(), Entry { status: tx, cancel: Arc::new(AtomicBool::new(false)) });
        q.waiting.push_back(id.clone());
        drop(q);
        self.shared.persist(&status);
        self.shared.wake.notify_one();
        tracing::info!(training = %id, name = %status.request.name, "style training queued");
        Ok(status)
    }

    /// Stops a training: a queued one at once, a running one after writing a checkpoint.
    pub fn stop(&self, id: &str) -> Result<TrainingStatus, ApiError> {
        let mut q = self.shared.lock();
        let entry = q.trainings.get(id).ok_or_else(|| not_found(id))?;
        entry.cancel.store(true, Ordering::SeqCst);
        let state = entry.status.borrow().state.clone();
        match state {
            TrainingState::Queued { .. } => {
                entry.status.send_modify(|s| s.state = TrainingState::Stopped);
                let _ = entry;
                q.waiting.retain(|w| w != id);
                self.shared.renumber(&q);
            }
            TrainingState::Preparing | TrainingState::Running => entry.status.send_modify(|s| s.state = TrainingState::Stopping),
            _ => {}
        }
        let status = q.trainings[id].status.borrow().clone();
        drop(q);
        self.shared.persist(&status);
        Ok(status)
    }

    /// Queues a stopped (or failed) training again; it continues from its last checkpoint.
    pub fn resume(&self, id: &str) -> Result<TrainingStatus, ApiError> {
        let mut q = self.shared.lock();
        let entry = q.trainings.get(id).ok_or_else(|| not_found(id))?;
        let state = entry.status.borrow().state.clone();
        if !state.can_resume() {
            return Err(ApiError::Invalid { field: "state".into(), message: format!("a training that is {} cannot be resumed", state.name()) });
        }
        entry.cancel.store(false, Ordering::SeqCst);
        let position = q.waiting.len() + 1;
        entry.status.send_modify(|s| {
            s.state = TrainingState::Queued { position };
            s.note = Some("resuming from the last checkpoint".into());
        });
        let status = entry.status.borrow().clone();
        q.waiting.push_back(id.to_string());
        drop(q);
        self.shared.persist(&status);
        self.shared.wake.notify_one();
        Ok(status)
    }

    /// Forgets a training that is not running; a training that did not finish also loses
    /// its checkpoints (the style folder without an adapter).
    pub fn delete(&self, id: &str) -> Result<(), ApiError> {
        let mut q = self.shared.lock();
        let entry = q.trainings.get(id).ok_or_else(|| not_found(id))?;
        let status = entry.status.borrow().clone();
        if status.state.is_active() {
            return Err(ApiError::Invalid { field: "state".into(), message: "stop the training before deleting it".into() });
        }
        q.trainings.remove(id);
        drop(q);
        let _ = std::fs::remove_file(self.shared.runs().join(format!("{id}.json")));
        if !matches!(status.state, TrainingState::Done { .. }) {
            let dir = self.shared.library.root().join(&status.request.name);
            let adapter = dir.join(format!("{}.safetensors", status.request.name));
            if check_name(&status.request.name).is_ok() && dir.is_dir() && !adapter.exists() {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        Ok(())
    }

    /// Every training, newest first.
    pub fn list(&self) -> Vec<TrainingStatus> {
        let q = self.shared.lock();
        let mut all: Vec<TrainingStatus> = q.trainings.values().map(|e| e.status.borrow().clone()).collect();
        all.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| b.id.cmp(&a.id)));
        all
    }

    pub fn status(&self, id: &str) -> Result<TrainingStatus, ApiError> {
        let q = self.shared.lock();
        let status = q.trainings.get(id).ok_or_else(|| not_found(id))?.status.borrow().clone();
        Ok(status)
    }

    /// A receiver that sees every later status change.
    pub fn subscribe(&self, id: &str) -> Result<watch::Receiver<TrainingStatus>, ApiError> {
        let q = self.shared.lock();
        Ok(q.trainings.get(id).ok_or_else(|| not_found(id))?.status.subscribe())
    }

    /// The sample sheet a training wrote at `step`.
    pub fn sample_path(&self, id: &str, step: u64) -> Result<PathBuf, ApiError> {
        let status = self.status(id)?;
        let path = self.shared.library.root().join(&status.request.name).join("samples").join(format!("step-{step:05}.png"));
        if status.samples.iter().any(|s| s.step == step) && path.is_file() {
            Ok(path)
        } else {
            Err(ApiError::NotFound { what: "sample sheet", id: format!("{id}/{step}") })
        }
    }

    /// Asks the worker to stop: the running training writes a checkpoint and stops,
    /// queued ones are marked stopped (all resume after a restart). Does not wait.
    pub fn begin_shutdown(&self) {
        let mut q = self.shared.lock();
        q.shutdown = true;
        let waiting: Vec<String> = q.waiting.drain(..).collect();
        for (id, e) in &q.trainings {
            e.cancel.store(true, Ordering::SeqCst);
            if waiting.contains(id) {
                e.status.send_modify(|s| s.state = TrainingState::Stopped);
                self.shared.persist(&e.status.borrow());
            }
        }
        drop(q);
        self.shared.wake.notify_all();
    }

    /// [`Trainer::begin_shutdown`], then waits for the worker.
    pub fn shutdown(&self) {
        self.begin_shutdown();
        if let Some(worker) = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = worker.join();
        }
    }
}

impl Drop for Trainer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound { what: "training", id: id.to_string() }
}

/// A safe file name for an uploaded file: its last path part, with anything but
/// letters, digits, `.`, `-`, `_` and spaces replaced.
fn safe_name(name: &str) -> Option<String> {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("");
    let clean: String = base.chars().map(|c| if c.is_alphanumeric() || ".-_ ".contains(c) { c } else { '_' }).collect();
    let clean = clean.trim().trim_start_matches('.').to_string();
    (!clean.is_empty()).then_some(clean)
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

fn is_zip(name: &str, tmp: &Path) -> bool {
    let mut magic = [0u8; 4];
    let starts_like_zip = std::fs::File::open(tmp).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == *b"PK\x03\x04";
    starts_like_zip || name.to_ascii_lowercase().ends_with(".zip")
}

/// Adds one upload's files to `dir`: the loose files together (so a caption travels with
/// its image when a name is taken), then each zip. All or nothing per zip and for the
/// loose files.
fn add_uploaded(dir: &Path, files: &[(String, PathBuf)]) -> Result<(), ApiError> {
    let (zips, loose): (Vec<_>, Vec<_>) = files.iter().partition(|(name, tmp)| is_zip(name, tmp));
    let loose: Vec<(&str, &Path)> = loose.iter().map(|(n, t)| (n.as_str(), t.as_path())).collect();
    add_loose(dir, &loose)?;
    for (name, tmp) in zips {
        unzip(dir, name, tmp)?;
    }
    Ok(())
}

/// Where a file goes when it is added to a dataset folder.
struct Incoming {
    /// The folders it sat in (inside a zip), each made safe; empty for loose files.
    folder: Vec<String>,
    /// Its safe file name.
    name: String,
    /// Its path as uploaded, for messages.
    shown: String,
}

impl Incoming {
    fn new(path: &str) -> Option<Self> {
        let name = safe_name(path)?;
        let mut parts: Vec<&str> = path.split(['/', '\\']).collect();
        parts.pop();
        let folder = parts.into_iter().filter_map(safe_name).collect();
        Some(Self { folder, name, shown: path.to_string() })
    }
}

/// `name` as (stem, extension with its dot); a name without a stem is all stem.
fn split_name(name: &str) -> (&str, &str) {
    match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    }
}

fn is_caption_name(name: &str) -> bool {
    split_name(name).1.eq_ignore_ascii_case(".txt")
}

/// The flat names under which `files` join the dataset folder that already holds
/// `existing`, in the order of `files`.
///
/// The dataset pairs an image with the caption of the same stem (any case), so names are
/// given per (folder, stem) group, never per file: an image and its caption keep one stem.
/// Groups whose stem repeats in another folder are all named after their folders
/// (`a/1.png` → `a_1.png`; `b/1.png` + `b/1.txt` → `b_1.png` + `b_1.txt`), and a stem that
/// is still taken (in the folder, or by the batch) gets `-2`, `-3`, … for the whole group,
/// so the result does not depend on the order of the entries. A caption alone joins an
/// existing image of its stem that has none; a lone image and a lone caption of one stem
/// in two folders (`images/1.png`, `captions/1.txt`) stay a pair.
///
/// Errors (the message for people): two captions for one image, or two images of the same
/// name sharing one caption; no guess is made about which belongs to which.
fn plan_names(existing: &[String], files: &[Incoming]) -> Result<Vec<String>, String> {
    // (folder, stem) in lower case, as the dataset pairs names → indices into `files`.
    let mut groups: std::collections::BTreeMap<(Vec<String>, String), Vec<usize>> = std::collections::BTreeMap::new();
    for (i, f) in files.iter().enumerate() {
        let key = (f.folder.iter().map(|p| p.to_lowercase()).collect(), split_name(&f.name).0.to_lowercase());
        groups.entry(key).or_default().push(i);
    }
    // Units share one stem; a group is one unit unless it holds same-named images and no caption.
    let mut units: Vec<(Vec<String>, String, Vec<usize>)> = Vec::new();
    for ((_, stem), members) in groups {
        let folder = files[members[0]].folder.clone();
        let (captions, contents): (Vec<usize>, Vec<usize>) = members.iter().partition(|&&i| is_caption_name(&files[i].name));
        if let [a, b, ..] = captions.as_slice() {
            return Err(format!("{} and {} are both captions of the same image; keep one", files[*a].shown, files[*b].shown));
        }
        let mut names: Vec<(String, usize)> = contents.iter().map(|&i| (files[i].name.to_lowercase(), i)).collect();
        names.sort();
        let same_name = names.windows(2).find(|w| w[0].0 == w[1].0).map(|w| (w[0].1, w[1].1));
        match (same_name, captions.first()) {
            (Some((a, b)), Some(c)) => {
                return Err(format!(
                    "{} and {} have the same name and would share the caption {}; rename one",
                    files[a].shown, files[b].shown, files[*c].shown
                ))
            }
            (Some(_), None) => units.extend(names.into_iter().map(|(_, i)| (folder.clone(), stem.clone(), vec![i]))),
            (None, _) => units.push((folder, stem, members)),
        }
    }
    let kinds = |unit: &[usize]| {
        let captions = unit.iter().filter(|&&i| is_caption_name(&files[i].name)).count();
        (captions > 0, captions < unit.len())
    };
    let mut by_stem: HashMap<String, Vec<usize>> = HashMap::new();
    for (k, (_, stem, _)) in units.iter().enumerate() {
        by_stem.entry(stem.clone()).or_default().push(k);
    }
    // A lone image and a lone caption of one stem, in two folders: one pair.
    for ks in by_stem.values_mut() {
        if let [a, b] = ks[..] {
            let (ka, kb) = (kinds(&units[a].2), kinds(&units[b].2));
            if (ka == (false, true) && kb == (true, false)) || (ka == (true, false) && kb == (false, true)) {
                let (image, caption) = if ka.1 { (a, b) } else { (b, a) };
                let moved = std::mem::take(&mut units[caption].2);
                units[image].2.extend(moved);
                ks.retain(|&k| k == image);
            }
        }
    }
    units.retain(|u| !u.2.is_empty());
    let repeated: std::collections::HashSet<String> = {
        let mut count: HashMap<&str, usize> = HashMap::new();
        for (_, stem, _) in &units {
            *count.entry(stem.as_str()).or_default() += 1;
        }
        count.into_iter().filter(|(_, n)| *n > 1).map(|(s, _)| s.to_string()).collect()
    };
    // What the folder holds, by lower-case stem: (has a caption, has anything else).
    let mut held: HashMap<String, (bool, bool)> = HashMap::new();
    let held_names: std::collections::HashSet<String> = existing.iter().map(|n| n.to_lowercase()).collect();
    for n in existing {
        let e = held.entry(split_name(n).0.to_lowercase()).or_default();
        if is_caption_name(n) {
            e.0 = true;
        } else {
            e.1 = true;
        }
    }
    let mut taken: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut out = vec![String::new(); files.len()];
    for (folder, _, members) in &units {
        let (has_caption, has_content) = kinds(members);
        // The image's spelling of the stem (then the caption's), whatever the entry order.
        let named = members.iter().min_by_key(|&&i| (is_caption_name(&files[i].name), &files[i].name)).copied().unwrap_or(members[0]);
        let stem = split_name(&files[named].name).0;
        let base = if repeated.contains(&stem.to_lowercase()) && !folder.is_empty() {
            format!("{}_{stem}", folder.join("_"))
        } else {
            stem.to_string()
        };
        let free = |candidate: &str| {
            let lc = candidate.to_lowercase();
            let (held_caption, held_content) = held.get(&lc).copied().unwrap_or_default();
            let clash = (has_content && (held_caption || held_content)) || (has_caption && held_caption);
            !clash
                && !taken.contains(&lc)
                && members.iter().all(|&i| !held_names.contains(&format!("{lc}{}", split_name(&files[i].name).1.to_lowercase())))
        };
        let chosen = std::iter::once(base.clone()).chain((2..).map(|k| format!("{base}-{k}"))).find(|c| free(c)).unwrap_or_default();
        taken.insert(chosen.to_lowercase());
        for &i in members {
            out[i] = format!("{chosen}{}", split_name(&files[i].name).1);
        }
    }
    Ok(out)
}

fn file_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default()
}

fn too_many(dir: &Path, adding: usize) -> Option<String> {
    (count_files(dir) + adding > MAX_DATASET_FILES).then(|| format!("a dataset holds at most {MAX_DATASET_FILES} files"))
}

/// Moves uploaded files (not zips) into `dir` under the names [`plan_names`] gives them.
fn add_loose(dir: &Path, files: &[(&str, &Path)]) -> Result<(), ApiError> {
    let invalid = |message: String| ApiError::Invalid { field: "files".into(), message };
    let kept: Vec<(Incoming, &Path)> = files.iter().filter_map(|(name, tmp)| Some((Incoming::new(name.rsplit(['/', '\\']).next().unwrap_or(""))?, *tmp))).collect();
    if kept.is_empty() {
        return Ok(());
    }
    if let Some(m) = too_many(dir, kept.len()) {
        return Err(invalid(m));
    }
    let incoming: Vec<Incoming> = kept.iter().map(|(i, _)| Incoming { folder: Vec::new(), name: i.name.clone(), shown: i.shown.clone() }).collect();
    let targets = plan_names(&file_names(dir), &incoming).map_err(invalid)?;
    let mut written = Vec::new();
    for ((_, tmp), target) in kept.iter().zip(&targets) {
        let target = dir.join(target);
        if std::fs::rename(tmp, &target).is_err() {
            if let Err(e) = std::fs::copy(tmp, &target) {
                for p in written {
                    let _ = std::fs::remove_file(p);
                }
                return Err(ApiError::Internal(format!("{}: {e}", target.display())));
            }
        }
        written.push(target);
    }
    Ok(())
}

/// Unpacks the files of a zip into `dir`, flat, each image with its caption (see
/// [`plan_names`]); hidden files and macOS resource forks are left out. Refuses archives
/// that are corrupt, encrypted, unpack to more than [`MAX_UNZIPPED_BYTES`] or pair
/// captions ambiguously, leaving the dataset as it was.
fn unzip(dir: &Path, name: &str, tmp: &Path) -> Result<(), ApiError> {
    let bad = |m: String| ApiError::Invalid { field: "files".into(), message: format!("{name}: {m}") };
    let file = std::fs::File::open(tmp).map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad(format!("not a readable zip archive ({e})")))?;
    // First the names, so captions are paired with their images before anything is written.
    let mut wanted: Vec<(usize, Incoming)> = Vec::new();
    for i in 0..archive.len() {
        let entry = archive.by_index_raw(i).map_err(|e| bad(format!("entry {i} cannot be read ({e})")))?;
        let path = entry.name().map_err(|e| bad(format!("entry {i} has an unreadable name ({e})")))?.to_string();
        let last = path.rsplit(['/', '\\']).next().unwrap_or("");
        if entry.is_dir() || last.starts_with('.') || path.split(['/', '\\']).any(|p| p == "__MACOSX") {
            continue;
        }
        if entry.encrypted() {
            return Err(bad(format!("{path} is encrypted; zip it without a password")));
        }
        if let Some(incoming) = Incoming::new(&path) {
            wanted.push((i, incoming));
        }
    }
    if let Some(m) = too_many(dir, wanted.len()) {
        return Err(bad(m));
    }
    let incoming: Vec<Incoming> = wanted.iter().map(|(_, f)| Incoming { folder: f.folder.clone(), name: f.name.clone(), shown: f.shown.clone() }).collect();
    let targets = plan_names(&file_names(dir), &incoming).map_err(bad)?;
    let mut budget = MAX_UNZIPPED_BYTES;
    let mut written = Vec::new();
    let result = (|| {
        for ((i, f), target) in wanted.iter().zip(&targets) {
            let mut entry = archive.by_index(*i).map_err(|e| bad(format!("{} cannot be read ({e})", f.shown)))?;
            let target = dir.join(target);
            let part = target.with_extension("part");
            let mut out = std::fs::File::create(&part).map_err(|e| ApiError::Internal(e.to_string()))?;
            written.push(part.clone());
            let n = std::io::copy(&mut (&mut entry).take(budget + 1), &mut out).map_err(|e| bad(format!("{} cannot be unpacked ({e})", f.shown)))?;
            if n > budget {
                return Err(bad(format!("unpacks to more than {} MB", MAX_UNZIPPED_BYTES / (1024 * 1024))));
            }
            budget -= n;
            out.flush().map_err(|e| ApiError::Internal(e.to_string()))?;
            std::fs::rename(&part, &target).map_err(|e| ApiError::Internal(e.to_string()))?;
            written.pop();
            written.push(target);
        }
        Ok(())
    })();
    if result.is_err() {
        // All or nothing: a bad archive leaves the dataset as it was.
        for p in written {
            let _ = std::fs::remove_file(p);
        }
    }
    result
}

fn worker_loop(shared: &Arc<Shared>) {
    let mut model: Option<Arc<StableDiffusion>> = None;
    loop {
        let (id, request, cancel) = {
            let mut q = shared.lock();
            loop {
                if q.shutdown {
                    return;
                }
                if let Some(id) = q.waiting.pop_front() {
                    shared.renumber(&q);
                    let e = &q.trainings[&id];
                    let req = e.status.borrow().request.clone();
                    e.status.send_modify(|s| {
                        s.state = TrainingState::Preparing;
                        s.note = Some("loading the model and the images".into());
                    });
                    break (id, req, e.cancel.clone());
                }
                // Nothing waiting: free the model's memory until the next training.
                model = None;
                q = shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        tracing::info!(training = %id, name = %request.name, "style training started");
        // The engine's largest buffers check this limit: an allocation that would not fit
        // fails the training with a message instead of aborting the process.
        let limit = shared.model.budget.limit;
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            atelier_engine::memory::with_limit(Some(limit), || run_one(shared, &id, &request, &cancel, &mut model))
        }));
        let state = match outcome {
            Ok(Ok(style)) => TrainingState::Done { style },
            Ok(Err(RunError::Stopped)) => TrainingState::Stopped,
            Ok(Err(RunError::Dataset(m))) => TrainingState::Failed { message: m },
            Ok(Err(RunError::Other(e))) => {
                tracing::error!(training = %id, error = %format!("{e:#}"), "style training failed");
                TrainingState::Failed { message: format!("{e:#}") }
            }
            Err(_) => TrainingState::Failed { message: "the trainer crashed; see the server log".into() },
        };
        tracing::info!(training = %id, state = state.name(), "style training ended");
        shared.update(&id, true, |s| {
            s.note = match &state {
                TrainingState::Stopped => Some(format!("stopped at step {} with a checkpoint; resume continues from it", s.step)),
                _ => None,
            };
            s.state = state;
            s.steps_per_s = None;
            s.eta_s = None;
        });
    }
}

fn run_one(
    shared: &Arc<Shared>,
    id: &str,
    request: &StyleTrainingRequest,
    cancel: &AtomicBool,
    model: &mut Option<Arc<StableDiffusion>>,
) -> Result<String, RunError> {
    let sd = match model {
        Some(sd) => sd.clone(),
        None => {
            let sd = Arc::new(StableDiffusion::load(&shared.model.dir, &shared.model.device)?);
            *model = Some(sd.clone());
            sd
        }
    };
    let images = shared.dataset_dir(&request.dataset_id).map_err(|_| {
        RunError::Dataset(format!("the uploaded dataset {} is gone: upload the images again and start a new training", request.dataset_id))
    })?;
    let stride = (request.steps as usize).div_ceil(MAX_LOSS_POINTS).max(1) as u64;
    let mut window: Option<(Instant, u64)> = None;
    let mut last_save = Instant::now();
    let mut progress = |ev: &RunEvent| -> bool {
        match ev {
            RunEvent::Report(r) => shared.update(id, false, |s| s.note = Some(format!("{} usable images; preparing", r.items.len()))),
            RunEvent::Prepared { hash, images, resolution } => shared.update(id, false, |s| {
                s.note = Some(format!("dataset {hash}: {images} images at {resolution}×{resolution}"));
            }),
            RunEvent::Train(StyleEvent::Start { step, total }) => {
                window = Some((Instant::now(), *step));
                let (step, total) = (*step, *total);
                shared.update(id, true, |s| {
                    // A resumed run restarts at its checkpoint: forget what came after it.
                    s.losses.retain(|(k, _)| *k <= step);
                    s.samples.retain(|x| x.step <= step);
                    s.step = step;
                    s.total = total;
                    if !matches!(s.state, TrainingState::Stopping) {
                        s.state = TrainingState::Running;
                    }
                    s.note = (step > 0).then(|| format!("resumed at step {step}"));
                });
            }
            RunEvent::Train(StyleEvent::Step { step, total, loss, .. }) => {
                let (step, total, loss) = (*step, *total, *loss);
                let rate = window.map(|(t, s0)| (step - s0) as f64 / t.elapsed().as_secs_f64().max(1e-9));
                let save = last_save.elapsed() > PERSIST_EVERY || step == total;
                if save {
                    last_save = Instant::now();
                }
                shared.update(id, save, |s| {
                    s.step = step;
                    s.total = total;
                    s.loss = Some(s.loss.map_or(loss, |m| 0.9 * m + 0.1 * loss));
                    if step % stride == 0 || step == total {
                        s.losses.push((step, loss));
                    }
                    s.steps_per_s = rate;
                    s.eta_s = rate.filter(|r| *r > 0.0).map(|r| (total - step) as f64 / r);
                });
            }
            RunEvent::Train(StyleEvent::Samples { step, .. }) => {
                let step = *step;
                shared.update(id, true, |s| {
                    s.samples.retain(|x| x.step != step);
                    s.samples.push(TrainingSample { step, url: format!("/api/style-trainings/{}/samples/{step}.png", s.id) });
                });
            }
            RunEvent::Train(StyleEvent::Note(m)) => shared.update(id, false, |s| s.note = Some(m.clone())),
            RunEvent::Measuring => shared.update(id, true, |s| {
                s.state = TrainingState::Measuring;
                s.steps_per_s = None;
                s.eta_s = None;
                s.note = Some("rendering the base model and the style on the same prompts and seeds".into());
            }),
        }
        !cancel.load(Ordering::SeqCst)
    };
    run_training(request, &images, &sd, &shared.model.dir, &shared.library, &shared.tracking, &mut progress)?;
    Ok(request.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploaded_names_are_made_safe() {
        assert_eq!(safe_name("../../etc/passwd").as_deref(), Some("passwd"));
        assert_eq!(safe_name("C:\\Users\\me\\cat 1.png").as_deref(), Some("cat 1.png"));
        assert_eq!(safe_name(".hidden").as_deref(), Some("hidden"));
        assert_eq!(safe_name("a;b|c.png").as_deref(), Some("a_b_c.png"));
        assert_eq!(safe_name("dir/"), None);
    }

    fn plan(existing: &[&str], paths: &[&str]) -> Result<Vec<String>, String> {
        let existing: Vec<String> = existing.iter().map(|s| s.to_string()).collect();
        let files: Vec<Incoming> = paths.iter().map(|p| Incoming::new(p).unwrap()).collect();
        plan_names(&existing, &files)
    }

    #[test]
    fn an_image_and_its_caption_keep_one_name() {
        // Folders repeat a name: every such group is named after its folder, whatever the order.
        assert_eq!(plan(&[], &["a/1.png", "b/1.png", "b/1.txt"]).unwrap(), ["a_1.png", "b_1.png", "b_1.txt"]);
        assert_eq!(plan(&[], &["b/1.txt", "b/1.png", "a/1.png"]).unwrap(), ["b_1.txt", "b_1.png", "a_1.png"]);
        assert_eq!(plan(&[], &["a/1.png", "b/1.txt"]).unwrap(), ["1.png", "1.txt"], "a lone image and a lone caption stay a pair");
        assert_eq!(plan(&[], &["set/IMG_0001.JPG", "set/IMG_0001.TXT", "set/2.png"]).unwrap(), ["IMG_0001.JPG", "IMG_0001.TXT", "2.png"]);
        // Names taken in the dataset move the whole group.
        assert_eq!(plan(&["cat.png"], &["cat.png", "cat.txt"]).unwrap(), ["cat-2.png", "cat-2.txt"]);
        assert_eq!(plan(&["cat.png", "cat-2.txt"], &["cat.txt", "cat.png"]).unwrap(), ["cat-3.txt", "cat-3.png"]);
        assert_eq!(plan(&["dog.TXT"], &["dog.png"]).unwrap(), ["dog-2.png"], "an old caption does not take a new image");
        assert_eq!(plan(&["cat.png"], &["CAT.txt"]).unwrap(), ["CAT.txt"], "a caption alone joins its image");
        assert_eq!(plan(&["cat.png", "cat.txt"], &["cat.txt"]).unwrap(), ["cat-2.txt"]);
        // Same-named images without a caption are told apart; with one, nobody can tell.
        assert_eq!(plan(&[], &["a.png", "a.png"]).unwrap(), ["a.png", "a-2.png"]);
        let e = plan(&[], &["x/a.png", "y/a.png", "x/A.png", "x/a.txt"]).unwrap_err();
        assert_eq!(e, "x/a.png and x/A.png have the same name and would share the caption x/a.txt; rename one");
        let e = plan(&[], &["x/1.png", "x/1.txt", "x/1.TXT"]).unwrap_err();
        assert_eq!(e, "x/1.txt and x/1.TXT are both captions of the same image; keep one");
        // Climbing folders are dropped.
        assert_eq!(plan(&[], &["../../escape.png"]).unwrap(), ["escape.png"]);
    }
}
