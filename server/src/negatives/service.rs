//! Optimisation runs: checking a request, turning it into a [`Plan`], rendering through the
//! studio's [`Generator`], keeping every image and the status in
//! `DATA/negatives/runs/{id}/`, recording the outcome in the history and the experiment
//! store. [`execute`] does one run (the CLI calls it directly); [`NegativeService`] queues
//! runs from the web as tasks in the long lane of the one work queue ([`crate::queue`]),
//! with live status and cancel; a run pauses between denoising steps while generations run.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

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
use super::NegativesError;
use crate::generation::generator::Generator;
use crate::styles::StyleLibrary;
use crate::tracking::{RunStatus, Tracker};
use crate::queue::{Ctx, JsonDir, Lane, Layout, Phase, Queue, Task, Workers};
use crate::ApiError;

type Result<T, E = NegativesError> = std::result::Result<T, E>;

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
    pub fn admit(&self, r: &OptimizeRequest) -> atelier_engine::Result<(GenerateParams, crate::generation::generator::Admitted)> {
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
    pub fn check(&self, r: &OptimizeRequest) -> Result<Weights> {
        let invalid = |field: &str, message: String| NegativesError::Invalid { field: field.into(), message };
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
    /// Called before every denoising step (the queue pauses a web run here while
    /// generations run).
    pub pause: &'a dyn Fn(),
}

impl Renderer for GeneratorRenderer<'_> {
    fn render(&mut self, negative: &str, seed: u64) -> Result<RgbImage> {
        let params = GenerateParams { negative_prompt: negative.to_string(), seed, ..self.base.clone() };
        let cancel = self.cancel;
        let pause = self.pause;
        let out = self.generator.generate(&params, &mut |_| {
            pause();
            !cancel.load(Ordering::Relaxed)
        });
        // A generation stopped by the flag fails; that is a cancel, not an error.
        if cancel.load(Ordering::Relaxed) {
            return Err(NegativesError::Cancelled);
        }
        out?.images.into_iter().next().ok_or(NegativesError::NoImage)
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
    let entry = styles.find(name).ok_or_else(|| NegativesError::NoStyle(name.to_string()))?;
    Ok(atelier_engine::style::metrics::load_style_grams(&entry.dir, &candle_core::Device::Cpu)?)
}

fn write_status(dir: &Path, status: &OptimizeStatus) -> Result<()> {
    let path = dir.join(STATUS_FILE);
    atelier_engine::files::write_json_atomic(&path, status).map_err(NegativesError::io("writing", &path))
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
pub fn execute(ctx: &Context, status: OptimizeStatus, cancel: &AtomicBool, publish: &mut dyn FnMut(&OptimizeStatus)) -> OptimizeStatus {
    execute_pausing(ctx, status, cancel, &|| {}, publish)
}

/// [`execute`], calling `pause` before every denoising step.
pub fn execute_pausing(
    ctx: &Context,
    mut status: OptimizeStatus,
    cancel: &AtomicBool,
    pause: &dyn Fn(),
    publish: &mut dyn FnMut(&OptimizeStatus),
) -> OptimizeStatus {
    let dir = ctx.run_dir(&status.id);
    status.state = OptimizeState::Running;
    status.phase = "preparing".into();
    publish(&status);
    match execute_inner(ctx, &mut status, &dir, cancel, pause, publish) {
        Ok(()) => status.state = OptimizeState::Done,
        Err(NegativesError::Cancelled) => status.state = OptimizeState::Cancelled,
        Err(e) => status.state = OptimizeState::Failed { message: crate::error::report(&e) },
    }
    status.phase = status.state.name().into();
    if let Err(e) = write_status(&dir, &status) {
        tracing::warn!("writing the status of optimisation {}: {}", status.id, crate::error::report(&e));
    }
    if let Some(run) = &status.tracking_run {
        let end = match status.state {
            OptimizeState::Done => RunStatus::Finished,
            OptimizeState::Cancelled => RunStatus::Killed,
            _ => RunStatus::Failed,
        };
        if let Err(e) = Tracker::open(&ctx.tracking).and_then(|t| t.end_run(run, end)) {
            tracing::warn!("ending tracked run {run}: {}", crate::error::report(&e));
        }
    }
    publish(&status);
    status
}

fn execute_inner(
    ctx: &Context,
    status: &mut OptimizeStatus,
    dir: &Path,
    cancel: &AtomicBool,
    pause: &dyn Fn(),
    publish: &mut dyn FnMut(&OptimizeStatus),
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(NegativesError::io("creating", dir))?;
    let r = status.request.clone();
    let weights = ctx.check(&r)?;
    let plan = ctx.plan(&r)?;
    let style = r.style.clone().filter(|s| !s.is_empty());
    let (base, admitted) = ctx.admit(&r)?;
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
        ("candidates", serde_json::to_string(&candidates).map_err(NegativesError::Settings)?),
        ("steps", r.steps.to_string()),
        ("guidance", r.guidance.to_string()),
        ("weights", serde_json::to_string(&weights).map_err(NegativesError::Settings)?),
        ("model_hash", ctx.generator.model_hash()),
    ] {
        tracker.log_param(&run, k, &v)?;
    }
    tracker.set_tag(&run, "optimisation_id", &status.id)?;

    status.total = plan.total_images();
    write_status(dir, status)?;
    publish(status);

    let mut renderer = GeneratorRenderer { generator: ctx.generator.as_ref(), base, weights, style_grams, cancel, pause };
    let mut step = 0i64;
    // The engine's largest buffers check the admitted limit (a failed check fails the run).
    let result = atelier_engine::memory::with_limit(admitted.limit, || optimizer::run(
        &plan,
        &mut renderer,
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
            atelier_engine::files::write_atomic(&path, &atelier_engine::metadata::encode_plain_png(image)?).map_err(NegativesError::io("writing", &path))
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
                let path = dir.join(file);
                let image = image::open(&path).map_err(|source| NegativesError::Image { action: "reading", path, source })?;
                sheet.push(image.to_rgb8());
            }
        }
        let png = dir.join("comparison.png");
        atelier_engine::sheet::save_png(&png, &atelier_engine::sheet::contact_sheet(&sheet, result.comparisons.len()))?;
        tracker.log_artifact(&run, &png, None)?;
    }
    status.result = Some(result);
    write_status(dir, status)?;
    tracker.log_artifact(&run, &dir.join(STATUS_FILE), None)?;
    Ok(())
}

/// Most optimisation runs that may wait at once.
pub const MAX_QUEUED: usize = 16;

/// The optimisation task kind.
pub struct Optimisation {
    ctx: Context,
}

impl Task for Optimisation {
    type Input = ();
    type Status = OptimizeStatus;
    const NOUN: &'static str = "optimisation";
    const LANE: Lane = Lane::Long;
    const MAX_WAITING: usize = MAX_QUEUED;

    fn id(s: &OptimizeStatus) -> &str {
        &s.id
    }

    fn phase(s: &OptimizeStatus) -> Phase {
        match s.state {
            OptimizeState::Queued { .. } => Phase::Waiting,
            OptimizeState::Running => Phase::Running,
            _ => Phase::Ended,
        }
    }

    fn set_waiting(s: &mut OptimizeStatus, position: usize) {
        s.state = OptimizeState::Queued { position };
    }

    fn set_started(s: &mut OptimizeStatus, _input: Option<&()>) {
        s.state = OptimizeState::Running;
        s.phase = "preparing".into();
    }

    fn set_cancelled(s: &mut OptimizeStatus) {
        s.state = OptimizeState::Cancelled;
        s.phase = s.state.name().into();
    }

    fn set_interrupted(s: &mut OptimizeStatus) {
        s.state = OptimizeState::Failed { message: "the server stopped during this run; start it again".into() };
        s.phase = s.state.name().into();
    }

    fn set_crashed(s: &mut OptimizeStatus, message: &str) {
        s.state = OptimizeState::Failed { message: message.into() };
        s.phase = s.state.name().into();
    }

    fn run(&self, _input: Option<()>, ctx: &mut Ctx<'_, Self>) {
        let status = ctx.status();
        let pause = || {
            ctx.wait_turn(|| ctx.update(|s| s.phase = "paused while generations run (they go first)".into()));
        };
        let end = execute_pausing(&self.ctx, status, ctx.cancel_flag(), &pause, &mut |s| ctx.update(|x| *x = s.clone()));
        if end.state == OptimizeState::Cancelled && ctx.is_shutting_down() {
            ctx.save(Self::set_interrupted);
        }
    }
}

/// Optimisation runs from the web, on the one work queue.
pub struct NegativeService {
    queue: Queue<Optimisation>,
}

impl NegativeService {
    /// Opens the runs in `ctx.root` (runs a stopped server left unfinished are marked
    /// failed) on `workers`.
    pub fn start(ctx: Context, workers: &Workers) -> Result<Self> {
        let store = JsonDir::open(ctx.root.join("runs"), Layout::Folder(STATUS_FILE))?;
        Ok(Self { queue: Queue::open(Optimisation { ctx }, store, workers)? })
    }

    pub fn context(&self) -> &Context {
        &self.queue.task().ctx
    }

    /// Checks and queues a run.
    pub fn submit(&self, request: OptimizeRequest) -> Result<OptimizeStatus, ApiError> {
        self.context().check(&request)?;
        self.context().admit(&request)?;
        Ok(self.queue.submit(new_status(request), Some(()))?)
    }

    pub fn status(&self, id: &str) -> Result<OptimizeStatus, ApiError> {
        Ok(self.queue.status(id)?)
    }

    pub fn subscribe(&self, id: &str) -> Result<watch::Receiver<OptimizeStatus>, ApiError> {
        Ok(self.queue.subscribe(id)?)
    }

    /// Every run, newest first.
    pub fn list(&self) -> Vec<OptimizeStatus> {
        self.queue.list()
    }

    /// Cancels a queued or running run.
    pub fn cancel(&self, id: &str) -> Result<OptimizeStatus, ApiError> {
        Ok(self.queue.cancel(id)?)
    }

    /// A file of a run (an image or `comparison.png`).
    pub fn file(&self, id: &str, name: &str) -> Result<PathBuf, ApiError> {
        self.queue.status(id)?;
        let ok = name.ends_with(".png") && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') && !name.starts_with('.');
        let path = self.context().run_dir(id).join(name);
        if ok && path.is_file() { Ok(path) } else { Err(ApiError::NotFound { what: "image", id: format!("{id}/{name}") }) }
    }
}
