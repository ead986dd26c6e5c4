//! Optimisation runs: checking a request, turning it into a [`Plan`], rendering through the
//! studio's [`Generator`], keeping every image and the status in
//! `DATA/negatives/runs/{id}/`, recording the outcome in the history and the experiment
//! store. [`execute`] does one run (the CLI calls it directly); [`NegativeService`] queues
//! runs from the web on a worker thread, one at a time, with live status and cancel.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::SystemTime;

use anyhow::{Context as _, Result};
use app::dto::{NegativeAnalysis, OptimizeRequest, OptimizeState, OptimizeStatus};
use atelier_engine::pipeline::GenerateParams;
use atelier_engine::quality::{Assessment, Weights};
use candle_core::Tensor;
use image::RgbImage;
use tokio::sync::watch;

use super::analysis::analyze;
use super::history::{Entry, History};
use super::knowledge::KnowledgeFile;
use super::optimizer::{self, Event, Plan, Renderer};
use crate::generator::Generator;
use crate::styles::StyleLibrary;
use crate::tracking::{RunStatus, Tracker};
use crate::ApiError;

/// The experiment optimisation runs are recorded in.
pub const EXPERIMENT: &str = "negative-prompts";
const STATUS_FILE: &str = "status.json";
/// Limits on a request.
pub const MAX_CANDIDATES: usize = 20;
pub const MAX_SEEDS: usize = 16;
const MAX_OWN: usize = 10;
const MAX_TEXT: usize = 1000;

/// Where a studio keeps its negative-prompt data.
#[derive(Clone)]
pub struct Context {
    pub root: PathBuf,
    pub generator: Arc<dyn Generator>,
    pub styles: Arc<StyleLibrary>,
    pub tracking: PathBuf,
    /// The model's native image size.
    pub size: (usize, usize),
    pub knowledge: Arc<KnowledgeFile>,
    pub history: Arc<History>,
    /// How much memory this process may use; runs are checked against it when submitted.
    pub budget: atelier_engine::memory::MemoryBudget,
}

impl Context {
    /// The context for the data folder `root` (`DATA/negatives`).
    pub fn new(root: PathBuf, generator: Arc<dyn Generator>, styles: Arc<StyleLibrary>, tracking: PathBuf, size: (usize, usize)) -> Self {
        Self {
            knowledge: Arc::new(KnowledgeFile::new(root.join("knowledge.json"))),
            history: Arc::new(History::new(root.join("history.json"))),
            root,
            generator,
            styles,
            tracking,
            size,
            budget: atelier_engine::memory::MemoryBudget::from_machine(),
        }
    }

    /// Sets the memory budget (`--max-memory`).
    pub fn with_budget(mut self, budget: atelier_engine::memory::MemoryBudget) -> Self {
        self.budget = budget;
        self
    }

    /// The generation every render of a run starts from (the style as a `<lora:…>` tag).
    fn base_params(&self, r: &OptimizeRequest) -> GenerateParams {
        let prompt = match r.style.as_deref().filter(|s| !s.is_empty()) {
            Some(s) => format!("{} <lora:{s}:{}>", r.prompt.trim(), r.style_weight),
            None => r.prompt.trim().to_string(),
        };
        GenerateParams { prompt, steps: r.steps, guidance: r.guidance, width: self.size.0, height: self.size.1, ..Default::default() }
    }

    /// Admission of a run's renders (styles exist, memory fits): the base params to
    /// render with and what admission decided.
    pub fn admit(&self, r: &OptimizeRequest) -> Result<(GenerateParams, crate::generator::Admitted), ApiError> {
        let mut base = self.base_params(r);
        let admitted = self.generator.admit(&mut base, &self.budget)?;
        Ok((base, admitted))
    }

    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.root.join("runs").join(id)
    }

    /// Analyses a prompt with the current knowledge base and history.
    pub fn analyze(&self, prompt: &str, negative: &str) -> Result<NegativeAnalysis> {
        Ok(analyze(prompt, negative, &self.knowledge.load()?, &self.history.entries()?))
    }

    /// Refuses what cannot run, saying what to change; returns the combined-score weights.
    pub fn check(&self, r: &OptimizeRequest) -> Result<Weights, ApiError> {
        let invalid = |field: &str, message: String| ApiError::Invalid { field: field.into(), message };
        if r.prompt.trim().is_empty() {
            return Err(invalid("prompt", "type a prompt to optimise the negative prompt for".into()));
        }
        if r.prompt.len() > MAX_TEXT || r.negative_prompt.len() > MAX_TEXT {
            return Err(invalid("prompt", format!("prompts are limited to {MAX_TEXT} characters")));
        }
        atelier_engine::prompt::extract_lora_tags(&r.prompt).map_err(|e| invalid("prompt", e.to_string()))?;
        if r.candidates > MAX_CANDIDATES {
            return Err(invalid("candidates", format!("at most {MAX_CANDIDATES} suggestions per run, not {}", r.candidates)));
        }
        if r.own.len() > MAX_OWN || r.own.iter().any(|o| o.len() > MAX_TEXT) {
            return Err(invalid("own", format!("at most {MAX_OWN} own candidates of up to {MAX_TEXT} characters")));
        }
        if r.candidates == 0 && r.own.iter().all(|o| o.trim().is_empty()) {
            return Err(invalid("candidates", "nothing to try: ask for suggestions (candidates ≥ 1) or give your own".into()));
        }
        if !(1..=MAX_SEEDS).contains(&r.seeds) {
            return Err(invalid("seeds", format!("between 1 and {MAX_SEEDS}, not {}", r.seeds)));
        }
        if r.holdout_seeds > MAX_SEEDS {
            return Err(invalid("holdout_seeds", format!("at most {MAX_SEEDS}, not {}", r.holdout_seeds)));
        }
        if !(1..=150).contains(&r.steps) {
            return Err(invalid("steps", format!("between 1 and 150, not {}", r.steps)));
        }
        if !(r.guidance.is_finite() && (0.0..=30.0).contains(&r.guidance)) {
            return Err(invalid("guidance", format!("between 0 and 30, not {}", r.guidance)));
        }
        if !(r.style_weight.is_finite() && (-2.0..=2.0).contains(&r.style_weight)) {
            return Err(invalid("style_weight", format!("between -2 and 2, not {}", r.style_weight)));
        }
        if let Some(style) = r.style.as_deref().filter(|s| !s.is_empty()) {
            if self.styles.find(style).is_none() {
                let known: Vec<String> = self.styles.list().into_iter().map(|s| s.name).collect();
                return Err(invalid("style", format!("no style {style:?} in the library (known: {})", known.join(", "))));
            }
        }
        let mut weights = Weights::default();
        for (k, v) in &r.weights {
            weights.set(k, *v).map_err(|e| invalid("weights", e))?;
        }
        weights.check().map_err(|e| invalid("weights", e))?;
        Ok(weights)
    }

    /// The candidates of a request: the best `candidates` suggestions (each added to the
    /// baseline negative), then the user's own, without repeats.
    pub fn plan(&self, r: &OptimizeRequest) -> Result<Plan> {
        let analysis = self.analyze(&r.prompt, &r.negative_prompt)?;
        let mut candidates: Vec<(String, String)> = Vec::new();
        let mut seen = vec![super::history::canonical(&r.negative_prompt)];
        let mut push = |negative: String, source: &str, candidates: &mut Vec<(String, String)>| {
            let key = super::history::canonical(&negative);
            if !key.is_empty() && !seen.contains(&key) {
                seen.push(key);
                candidates.push((negative, source.to_string()));
            }
        };
        for s in analysis.suggestions.iter().take(r.candidates) {
            let source = if s.category == "history" { "history" } else { "suggestion" };
            push(optimizer::join(&[&r.negative_prompt, &s.negative]), source, &mut candidates);
        }
        for own in &r.own {
            push(own.trim().to_string(), "yours", &mut candidates);
        }
        let search_seeds: Vec<u64> = (0..r.seeds as u64).map(|i| r.seed + i).collect();
        let holdout_seeds: Vec<u64> = (0..r.holdout_seeds as u64).map(|i| r.seed + 10_000 + i).collect();
        Ok(Plan { baseline: r.negative_prompt.trim().to_string(), candidates, search_seeds, holdout_seeds, combine: true })
    }
}

/// Renders through a [`Generator`] and scores with [`atelier_engine::quality`].
pub struct GeneratorRenderer<'a> {
    pub generator: &'a dyn Generator,
    pub base: GenerateParams,
    pub weights: Weights,
    /// The active style's training-image statistics, for style similarity.
    pub style_grams: Option<Vec<Tensor>>,
    pub cancel: &'a AtomicBool,
}

impl Renderer for GeneratorRenderer<'_> {
    fn render(&mut self, negative: &str, seed: u64) -> Result<RgbImage> {
        let params = GenerateParams { negative_prompt: negative.to_string(), seed, ..self.base.clone() };
        let cancel = self.cancel;
        let out = self.generator.generate(&params, &mut |_| !cancel.load(Ordering::Relaxed));
        // A generation stopped by the flag fails; that is a cancel, not an error.
        if cancel.load(Ordering::Relaxed) {
            return Err(optimizer::Cancelled.into());
        }
        out?.images.into_iter().next().context("the generator returned no image")
    }

    fn assess(&mut self, image: &RgbImage) -> Result<Assessment> {
        let style = match &self.style_grams {
            Some(reference) => {
                let grams = self.generator.encoder_grams(std::slice::from_ref(image))?;
                let device = grams.first().map(|g| g.device().clone()).unwrap_or(candle_core::Device::Cpu);
                let reference = reference.iter().map(|r| r.to_device(&device)).collect::<candle_core::Result<Vec<_>>>()?;
                Some(atelier_engine::style::metrics::style_similarity(&grams, &reference)?)
            }
            None => None,
        };
        Ok(atelier_engine::quality::assess(image, style, &self.weights))
    }
}

/// The statistics kept with the style `name`.
fn style_grams(styles: &StyleLibrary, name: &str) -> Result<Vec<Tensor>> {
    let entry = styles.find(name).with_context(|| format!("no style {name:?} in the library"))?;
    crate::style_training::load_style_grams(&entry.dir, &candle_core::Device::Cpu)
}

fn write_status(dir: &Path, status: &OptimizeStatus) -> Result<()> {
    crate::png::write_atomic(&dir.join(STATUS_FILE), &serde_json::to_vec_pretty(status)?)?;
    Ok(())
}

/// A new run for `request`, queued, with a fresh id.
pub fn new_status(request: OptimizeRequest) -> OptimizeStatus {
    OptimizeStatus {
        id: uuid::Uuid::new_v4().simple().to_string()[..12].to_string(),
        request,
        created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        state: OptimizeState::Queued { position: 1 },
        done: 0,
        total: 0,
        phase: String::new(),
        partial: Vec::new(),
        result: None,
        tracking_run: None,
    }
}

/// Runs one optimisation to its end, reporting every change of its status through
/// `publish` and keeping it in `DATA/negatives/runs/{id}/status.json`. Setting `cancel`
/// stops it at the next denoising step.
pub fn execute(ctx: &Context, mut status: OptimizeStatus, cancel: &AtomicBool, publish: &mut dyn FnMut(&OptimizeStatus)) -> OptimizeStatus {
    let dir = ctx.run_dir(&status.id);
    status.state = OptimizeState::Running;
    status.phase = "preparing".into();
    publish(&status);
    match execute_inner(ctx, &mut status, &dir, cancel, publish) {
        Ok(()) => status.state = OptimizeState::Done,
        Err(e) if e.is::<optimizer::Cancelled>() => status.state = OptimizeState::Cancelled,
        Err(e) => status.state = OptimizeState::Failed { message: format!("{e:#}") },
    }
    status.phase = status.state.name().into();
    if let Err(e) = write_status(&dir, &status) {
        tracing::warn!("writing the status of optimisation {}: {e:#}", status.id);
    }
    if let Some(run) = &status.tracking_run {
        let end = match status.state {
            OptimizeState::Done => RunStatus::Finished,
            OptimizeState::Cancelled => RunStatus::Killed,
            _ => RunStatus::Failed,
        };
        if let Err(e) = Tracker::open(&ctx.tracking).and_then(|t| t.end_run(run, end)) {
            tracing::warn!("ending tracked run {run}: {e:#}");
        }
    }
    publish(&status);
    status
}

fn execute_inner(ctx: &Context, status: &mut OptimizeStatus, dir: &Path, cancel: &AtomicBool, publish: &mut dyn FnMut(&OptimizeStatus)) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let r = status.request.clone();
    let weights = ctx.check(&r).map_err(|e| anyhow::anyhow!("{e}"))?;
    let plan = ctx.plan(&r)?;
    let style = r.style.clone().filter(|s| !s.is_empty());
    let (base, admitted) = ctx.admit(&r).map_err(|e| anyhow::anyhow!("{e}"))?;
    let style_grams = style.as_deref().map(|s| style_grams(&ctx.styles, s)).transpose()?;

    let tracker = Tracker::open(&ctx.tracking)?;
    let run = tracker.start_run(tracker.experiment(EXPERIMENT)?, &format!("negatives {}", status.id))?;
    status.tracking_run = Some(run.clone());
    let candidates: Vec<&str> = plan.candidates.iter().map(|(c, _)| c.as_str()).collect();
    for (k, v) in [
        ("prompt", r.prompt.clone()),
        ("baseline_negative", plan.baseline.clone()),
        ("style", style.clone().unwrap_or_default()),
        ("style_weight", r.style_weight.to_string()),
        ("search_seeds", format!("{:?}", plan.search_seeds)),
        ("holdout_seeds", format!("{:?}", plan.holdout_seeds)),
        ("candidates", serde_json::to_string(&candidates)?),
        ("steps", r.steps.to_string()),
        ("guidance", r.guidance.to_string()),
        ("weights", serde_json::to_string(&weights)?),
        ("model_hash", ctx.generator.model_hash()),
    ] {
        tracker.log_param(&run, k, &v)?;
    }
    tracker.set_tag(&run, "optimisation_id", &status.id)?;

    status.total = plan.total_images();
    write_status(dir, status)?;
    publish(status);

    let mut studio = GeneratorRenderer { generator: ctx.generator.as_ref(), base, weights, style_grams, cancel };
    let mut step = 0i64;
    // The engine's largest buffers check the admitted limit (a failed check fails the run).
    let result = atelier_engine::memory::with_limit(admitted.limit, || optimizer::run(
        &plan,
        &mut studio,
        &mut |event| {
            match event {
                Event::Progress { done, total, phase } => {
                    status.done = done;
                    status.total = total;
                    status.phase = phase.to_string();
                }
                Event::Measured(c) => {
                    let _ = tracker.log_metric(&run, "candidate_mean_score", c.mean, step);
                    let _ = tracker.log_metric(&run, "candidate_mean_delta", c.mean_delta, step);
                    step += 1;
                    status.partial.push(c.clone());
                }
            }
            publish(status);
            !cancel.load(Ordering::Relaxed)
        },
        &mut |name, image| {
            let path = dir.join(name);
            crate::png::write_atomic(&path, &crate::png::encode_png(image, None)?).with_context(|| format!("writing {}", path.display()))
        },
    ))?;

    // Every candidate's measurement is evidence for later suggestions.
    let entries: Vec<Entry> = result
        .candidates
        .iter()
        .map(|c| Entry { prompt: r.prompt.clone(), negative: c.negative.clone(), delta: c.mean_delta, seeds: c.scores.len(), run: status.id.clone() })
        .collect();
    ctx.history.record(&entries)?;

    if let Some(d) = result.holdout_mean_delta {
        tracker.log_metric(&run, "holdout_mean_delta", d, 0)?;
    }
    tracker.log_metric(&run, "baseline_mean_score", result.baseline.mean, 0)?;
    tracker.set_tag(&run, "helped", &result.helped.to_string())?;
    tracker.set_tag(&run, "verdict", &result.verdict)?;
    if let Some(w) = result.winner {
        tracker.set_tag(&run, "winner", &result.candidates[w].negative)?;
        // Baseline row over winner row, every seed compared.
        let mut sheet = Vec::new();
        for row in [0, 1] {
            for c in &result.comparisons {
                let file = if row == 0 { &c.baseline_image } else { &c.winner_image };
                sheet.push(image::open(dir.join(file))?.to_rgb8());
            }
        }
        let png = dir.join("comparison.png");
        atelier_engine::starter::eval::contact_sheet(&sheet, result.comparisons.len()).save(&png)?;
        tracker.log_artifact(&run, &png, None)?;
    }
    status.result = Some(result);
    write_status(dir, status)?;
    tracker.log_artifact(&run, &dir.join(STATUS_FILE), None)?;
    Ok(())
}

struct Slot {
    status: Arc<watch::Sender<OptimizeStatus>>,
    cancel: Arc<AtomicBool>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<String>,
    slots: HashMap<String, Slot>,
    shutdown: bool,
}

struct Shared {
    ctx: Context,
    queue: Mutex<Queue>,
    wake: Condvar,
}

/// Optimisation runs from the web: a FIFO run by one worker thread.
pub struct NegativeService {
    shared: Arc<Shared>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl NegativeService {
    /// Opens the runs in `ctx.root` (runs a stopped server left unfinished are marked failed)
    /// and starts the worker.
    pub fn start(ctx: Context) -> Result<Self> {
        let runs = ctx.root.join("runs");
        std::fs::create_dir_all(&runs).with_context(|| format!("creating {}", runs.display()))?;
        let mut queue = Queue::default();
        for entry in std::fs::read_dir(&runs)?.flatten() {
            let Ok(bytes) = std::fs::read(entry.path().join(STATUS_FILE)) else { continue };
            let Ok(mut status) = serde_json::from_slice::<OptimizeStatus>(&bytes) else {
                tracing::warn!("skipping {}: unreadable status", entry.path().display());
                continue;
            };
            if !status.state.is_finished() {
                status.state = OptimizeState::Failed { message: "the server stopped during this run; start it again".into() };
                let _ = write_status(&entry.path(), &status);
            }
            let (tx, _) = watch::channel(status.clone());
            queue.slots.insert(status.id.clone(), Slot { status: Arc::new(tx), cancel: Arc::new(AtomicBool::new(false)) });
        }
        let shared = Arc::new(Shared { ctx, queue: Mutex::new(queue), wake: Condvar::new() });
        let worker_shared = shared.clone();
        let worker = std::thread::Builder::new().name("negatives".into()).spawn(move || worker(worker_shared))?;
        Ok(Self { shared, worker: Mutex::new(Some(worker)) })
    }

    pub fn context(&self) -> &Context {
        &self.shared.ctx
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.shared.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks and queues a run.
    pub fn submit(&self, request: OptimizeRequest) -> Result<OptimizeStatus, ApiError> {
        self.shared.ctx.check(&request)?;
        self.shared.ctx.admit(&request)?;
        let mut status = new_status(request);
        let id = status.id.clone();
        let dir = self.shared.ctx.run_dir(&id);
        let mut q = self.lock();
        if q.shutdown {
            return Err(ApiError::Unavailable("the server is shutting down".into()));
        }
        if q.waiting.len() >= 16 {
            return Err(ApiError::QueueFull(q.waiting.len()));
        }
        status.state = OptimizeState::Queued { position: q.waiting.len() + 1 };
        std::fs::create_dir_all(&dir).and_then(|_| write_status(&dir, &status).map_err(std::io::Error::other)).map_err(|e| {
            ApiError::Unavailable(format!("cannot write {} ({e}); free some disk space and try again", dir.display()))
        })?;
        let (tx, _) = watch::channel(status.clone());
        q.slots.insert(id.clone(), Slot { status: Arc::new(tx), cancel: Arc::new(AtomicBool::new(false)) });
        q.waiting.push_back(id);
        self.shared.wake.notify_all();
        Ok(status)
    }

    pub fn status(&self, id: &str) -> Result<OptimizeStatus, ApiError> {
        self.lock().slots.get(id).map(|s| s.status.borrow().clone()).ok_or_else(|| not_found(id))
    }

    pub fn subscribe(&self, id: &str) -> Result<watch::Receiver<OptimizeStatus>, ApiError> {
        self.lock().slots.get(id).map(|s| s.status.subscribe()).ok_or_else(|| not_found(id))
    }

    /// Every run, newest first.
    pub fn list(&self) -> Vec<OptimizeStatus> {
        let mut all: Vec<OptimizeStatus> = self.lock().slots.values().map(|s| s.status.borrow().clone()).collect();
        all.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| b.id.cmp(&a.id)));
        all
    }

    /// Cancels a queued or running run.
    pub fn cancel(&self, id: &str) -> Result<OptimizeStatus, ApiError> {
        let mut q = self.lock();
        let slot = q.slots.get(id).ok_or_else(|| not_found(id))?;
        slot.cancel.store(true, Ordering::Relaxed);
        if let Some(pos) = q.waiting.iter().position(|w| w == id) {
            q.waiting.remove(pos);
            let slot = &q.slots[id];
            let mut s = slot.status.borrow().clone();
            s.state = OptimizeState::Cancelled;
            let _ = write_status(&self.shared.ctx.run_dir(id), &s);
            slot.status.send_replace(s);
            renumber(&q);
        }
        let status = q.slots[id].status.borrow().clone();
        Ok(status)
    }

    /// A file of a run (an image or `comparison.png`); `None` for names that are not one.
    pub fn file(&self, id: &str, name: &str) -> Result<PathBuf, ApiError> {
        if !self.lock().slots.contains_key(id) {
            return Err(not_found(id));
        }
        let ok = name.ends_with(".png") && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') && !name.starts_with('.');
        let path = self.shared.ctx.run_dir(id).join(name);
        if ok && path.is_file() { Ok(path) } else { Err(ApiError::NotFound { what: "image", id: format!("{id}/{name}") }) }
    }

    /// Stops taking runs and cancels the running one (its stream ends as cancelled).
    pub fn shutdown_soon(&self) {
        {
            let mut q = self.lock();
            q.shutdown = true;
            for s in q.slots.values() {
                s.cancel.store(true, Ordering::Relaxed);
            }
        }
        self.shared.wake.notify_all();
    }

    /// [`Self::shutdown_soon`], then waits for the worker.
    pub fn shutdown(&self) {
        self.shutdown_soon();
        if let Some(w) = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = w.join();
        }
    }
}

impl Drop for NegativeService {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound { what: "optimisation", id: id.to_string() }
}

fn renumber(q: &Queue) {
    for (i, id) in q.waiting.iter().enumerate() {
        if let Some(slot) = q.slots.get(id) {
            slot.status.send_modify(|s| s.state = OptimizeState::Queued { position: i + 1 });
        }
    }
}

fn worker(shared: Arc<Shared>) {
    loop {
        let (id, status, tx, cancel) = {
            let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if q.shutdown {
                    return;
                }
                if let Some(id) = q.waiting.pop_front() {
                    renumber(&q);
                    let slot = &q.slots[&id];
                    let status = slot.status.borrow().clone();
                    break (id, status, slot.status.clone(), slot.cancel.clone());
                }
                q = shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        let ctx = shared.ctx.clone();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            execute(&ctx, status.clone(), &cancel, &mut |s| {
                tx.send_replace(s.clone());
            })
        }));
        if outcome.is_err() {
            let mut s = status;
            s.state = OptimizeState::Failed { message: "internal error (see the server log)".into() };
            let _ = write_status(&ctx.run_dir(&id), &s);
            tx.send_replace(s);
        }
    }
}
