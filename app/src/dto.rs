//! Data exchanged between the browser, the server functions and the JSON API.
//!
//! Plain serde structs so both the server and the WASM build use the same definitions.

use serde::{Deserialize, Serialize};

pub mod exports;
pub mod monitoring;

/// Scheduler ids the engine accepts, with the A1111 names shown in the UI, in UI order.
/// Mirrors `atelier_engine::scheduler::SchedulerKind::ALL` (the server checks they agree).
pub const SCHEDULERS: [(&str, &str); 5] = [
    ("ddim", "DDIM"),
    ("euler", "Euler"),
    ("euler-a", "Euler a"),
    ("dpmpp-2m", "DPM++ 2M"),
    ("dpmpp-2m-karras", "DPM++ 2M Karras"),
];

/// The scheduler used when a request names none.
pub const DEFAULT_SCHEDULER: &str = atelier_blend::defaults::generate::SCHEDULER;

/// Largest request body the server accepts (JSON with a base64 init image), in bytes.
pub const MAX_BODY_BYTES: usize = 20 * 1024 * 1024;

/// A generation request: the body of `POST /api/generate` and of the submit server function.
/// Every field has a default, so `{"prompt": "a cat"}` is a complete request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance: f64,
    /// `None` picks a random seed; the seed used is returned in [`JobAccepted`].
    pub seed: Option<u64>,
    /// A scheduler id from [`SCHEDULERS`].
    pub scheduler: String,
    /// Defaults to the model's native size ([`ModelInfo::default_width`]).
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub batch_size: usize,
    /// img2img strength in 0..=1; only used with `init_image`.
    pub strength: f64,
    /// img2img source: base64 PNG/JPEG/WebP, optionally as a `data:` URL.
    pub init_image: Option<String>,
}

/// The defaults of `atelier_blend::defaults::generate`, which the engine's
/// `GenerateParams::default()` uses too.
impl Default for GenerateRequest {
    fn default() -> Self {
        use atelier_blend::defaults::generate as d;
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: d::STEPS,
            guidance: d::GUIDANCE,
            seed: None,
            scheduler: DEFAULT_SCHEDULER.into(),
            width: None,
            height: None,
            batch_size: d::BATCH_SIZE,
            strength: d::STRENGTH,
            init_image: None,
        }
    }
}

/// Reply to a submitted generation (HTTP 202).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobAccepted {
    pub job_id: String,
    /// The seed the job runs with (the random one when the request gave none).
    pub seed: u64,
    /// Expected run time in seconds once it starts, from the speed of this studio's
    /// earlier jobs (scaled by steps, batch, guidance and latent pixels); absent until a
    /// job has finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_seconds: Option<f64>,
}

/// Where a job is in its life.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum JobState {
    /// Waiting; `position` 1 is next.
    Queued { position: usize },
    /// Denoising: `step` of `total` steps done.
    Running { step: usize, total: usize },
    /// Finished; the images are in the gallery.
    Done { image_ids: Vec<String>, warnings: Vec<String> },
    Failed { message: String },
    Cancelled,
}

impl JobState {
    /// True once the job will not change any more.
    pub fn is_finished(&self) -> bool {
        matches!(self, JobState::Done { .. } | JobState::Failed { .. } | JobState::Cancelled)
    }
}

/// A job's status: `GET /api/jobs/{id}` and every event of `GET /api/jobs/{id}/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub job_id: String,
    pub seed: u64,
    #[serde(flatten)]
    pub state: JobState,
    /// The latest intermediate preview as a `data:image/png;base64,...` URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<String>,
}

/// One image in the gallery, with everything needed to make it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GalleryItem {
    pub id: String,
    /// UTC time, ISO 8601.
    pub created_at: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
    pub scheduler: String,
    pub width: usize,
    pub height: usize,
    pub strength: f64,
    pub has_init_image: bool,
    pub model_name: String,
    pub model_hash: String,
    pub warnings: Vec<String>,
    /// Where the PNG is served (`/api/images/{id}.png`).
    pub url: String,
}

/// Where the server serves a gallery image: `GET /api/images/{id}.png`.
pub fn image_url(id: &str) -> String {
    format!("/api/images/{id}.png")
}

/// A page of the gallery, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GalleryPage {
    pub items: Vec<GalleryItem>,
    pub total: usize,
    pub offset: usize,
    pub limit: usize,
}

/// The loaded model: `GET /api/model`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub hash: String,
    pub default_width: usize,
    pub default_height: usize,
    /// Set for the built-in test model, whose images are coloured noise.
    pub note: Option<String>,
    pub schedulers: Vec<String>,
    /// The device the model computes on: `cpu`, `cuda:N` or `metal:N`.
    #[serde(default)]
    pub device: String,
    /// The dtype the networks compute in: `f32` on the CPU, `f16` on GPUs.
    #[serde(default)]
    pub dtype: String,
}

/// Error body of every failed JSON API call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// A style of the library, as the Styles page shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StyleSummary {
    pub name: String,
    /// Shipped with Atelier (read-only).
    pub builtin: bool,
    pub trigger: String,
    pub base_model_hash: String,
    pub dataset_hash: String,
    pub dataset_images: usize,
    pub steps: u64,
    pub rank: usize,
    /// Style similarity of the base model and of the style on the evaluation prompts.
    pub similarity: Option<(f64, f64)>,
    /// A1111 short hash of the kohya file (how blends and share links name the style).
    #[serde(default)]
    pub hash: Option<String>,
    /// Files under `/api/styles/{name}/files/`.
    pub files: Vec<String>,
}

/// Largest style-dataset upload (images, captions or zips in one request), in bytes.
pub const MAX_UPLOAD_BYTES: usize = 512 * 1024 * 1024;

/// Settings of a style training: the body of `POST /api/style-trainings`, and what the
/// CLI's `atelier train-style` flags fill. Every field but `name` (and, on the web,
/// `dataset_id`) has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StyleTrainingRequest {
    /// The uploaded dataset to train on (web and API; the CLI names a folder instead).
    pub dataset_id: String,
    /// Name in the style library (letters, digits, `-`, `_`).
    pub name: String,
    /// Word that calls the style up; empty means the name.
    pub trigger: String,
    pub rank: usize,
    /// LoRA alpha; `None` means the rank (scale 1).
    pub alpha: Option<f64>,
    pub steps: u64,
    pub lr: f64,
    pub batch: usize,
    pub seed: u64,
    pub text_encoder: bool,
    pub convs: bool,
    pub min_snr_gamma: f64,
    pub noise_offset: f64,
    pub flip: bool,
    pub checkpoint_every: u64,
    /// Steps between sample sheets; 0 for none.
    pub sample_every: u64,
    /// Prompts of the sample sheets; empty means the first four captions.
    pub sample_prompts: Vec<String>,
    pub min_images: usize,
    /// Prompts of the before/after metrics; empty means held-out starter-world prompts.
    pub eval_prompts: Vec<String>,
}

/// The defaults of `atelier_blend::defaults::style_training`, which the engine's
/// `StyleTrainConfig::new` uses too.
impl Default for StyleTrainingRequest {
    fn default() -> Self {
        use atelier_blend::defaults::style_training as d;
        Self {
            dataset_id: String::new(),
            name: String::new(),
            trigger: String::new(),
            rank: d::RANK,
            alpha: None,
            steps: d::STEPS,
            lr: d::LR,
            batch: d::BATCH,
            seed: d::SEED,
            text_encoder: d::TEXT_ENCODER,
            convs: d::CONVS,
            min_snr_gamma: d::MIN_SNR_GAMMA,
            noise_offset: d::NOISE_OFFSET,
            flip: d::FLIP,
            checkpoint_every: d::CHECKPOINT_EVERY,
            sample_every: d::SAMPLE_EVERY,
            sample_prompts: Vec::new(),
            min_images: d::MIN_IMAGES,
            eval_prompts: Vec::new(),
        }
    }
}

impl StyleTrainingRequest {
    /// The trigger word in use (the name when none was given).
    pub fn trigger_word(&self) -> &str {
        if self.trigger.trim().is_empty() {
            &self.name
        } else {
            self.trigger.trim()
        }
    }
}

/// An image a dataset will train on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetImage {
    pub file: String,
    pub width: u32,
    pub height: u32,
    /// The caption from the image's `.txt` file, if it has one (else the default caption
    /// "TRIGGER style" is used).
    pub caption: Option<String>,
    /// Something to check about the caption file (read as Windows-1252, empty), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption_note: Option<String>,
}

/// A file a dataset leaves out, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetSkip {
    pub file: String,
    pub reason: String,
}

/// An uploaded style dataset and its report: `POST /api/style-datasets` and
/// `GET /api/style-datasets/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetSummary {
    pub id: String,
    pub images: Vec<DatasetImage>,
    /// Files that are not images, cannot be decoded, are too small, or are near-duplicates.
    pub skipped: Vec<DatasetSkip>,
    /// Images are centre-cropped and resized to this square size.
    pub resolution: u32,
    pub min_images: usize,
    /// Enough images to train.
    pub usable: bool,
}

/// Where a style training is in its life.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TrainingState {
    /// Waiting for the training before it; `position` 1 is next.
    Queued { position: usize },
    /// Loading the model and preparing the dataset.
    Preparing,
    Running,
    /// Rendering the before/after comparison and measuring the style.
    Measuring,
    /// Asked to stop: writing a checkpoint.
    Stopping,
    /// Stopped with a checkpoint; resume continues from it.
    Stopped,
    /// Finished; the style is in the library under `style`.
    Done { style: String },
    Failed { message: String },
}

impl TrainingState {
    /// Whether the worker is on it or it waits for the worker.
    pub fn is_active(&self) -> bool {
        matches!(
            self,
            TrainingState::Queued { .. } | TrainingState::Preparing | TrainingState::Running | TrainingState::Measuring | TrainingState::Stopping
        )
    }

    /// The state's name, as in the JSON `state` field.
    pub fn name(&self) -> &'static str {
        match self {
            TrainingState::Queued { .. } => "queued",
            TrainingState::Preparing => "preparing",
            TrainingState::Running => "running",
            TrainingState::Measuring => "measuring",
            TrainingState::Stopping => "stopping",
            TrainingState::Stopped => "stopped",
            TrainingState::Done { .. } => "done",
            TrainingState::Failed { .. } => "failed",
        }
    }

    /// Whether `resume` can pick it up again.
    pub fn can_resume(&self) -> bool {
        matches!(self, TrainingState::Stopped | TrainingState::Failed { .. })
    }
}

/// A sample sheet written during training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSample {
    pub step: u64,
    /// `/api/style-trainings/{id}/samples/{step}.png`
    pub url: String,
}

/// A style training: `GET /api/style-trainings/{id}` and every event of its stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingStatus {
    pub id: String,
    pub request: StyleTrainingRequest,
    /// UTC time, ISO 8601.
    pub created_at: String,
    #[serde(flatten)]
    pub state: TrainingState,
    /// Steps done of `total`.
    pub step: u64,
    pub total: u64,
    /// Smoothed training loss.
    pub loss: Option<f64>,
    pub steps_per_s: Option<f64>,
    pub eta_s: Option<f64>,
    /// (step, loss) pairs, thinned to at most a few hundred points.
    pub losses: Vec<(u64, f64)>,
    pub samples: Vec<TrainingSample>,
    /// What the worker is doing or last said.
    pub note: Option<String>,
}

// ---- Negative-prompt optimisation ----

/// Body of `POST /api/negatives/analyze`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct NegativeAnalysisRequest {
    pub prompt: String,
    pub negative_prompt: String,
}

/// What earlier optimisations measured for a suggestion on similar prompts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuggestionEvidence {
    /// Similarity-weighted mean change of the combined score.
    pub mean_delta: f64,
    /// How many measurements on similar prompts.
    pub runs: usize,
    /// The most similar prompt's similarity (0..1).
    pub similarity: f64,
}

/// A suggested negative prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Suggestion {
    pub negative: String,
    /// The knowledge-base category, or "history".
    pub category: String,
    pub reason: String,
    pub evidence: Option<SuggestionEvidence>,
}

/// A conflict between the prompt and the negative prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contradiction {
    pub word: String,
    /// `both`: the word is in both prompts; `subject`: the negative removes the subject.
    pub kind: String,
    pub message: String,
}

/// Reply of `POST /api/negatives/analyze`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NegativeAnalysis {
    /// Subject cue words found in the prompt.
    pub subject: Vec<String>,
    /// Style cue words and `<lora:…>` style names.
    pub style_cues: Vec<String>,
    /// Knowledge-base categories the prompt falls in.
    pub categories: Vec<String>,
    /// Best first: negatives that helped similar prompts, then the knowledge base's.
    pub suggestions: Vec<Suggestion>,
    pub contradictions: Vec<Contradiction>,
}

/// Body of `POST /api/negatives/optimize`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OptimizeRequest {
    pub prompt: String,
    /// The baseline negative prompt (empty: compare against no negative prompt).
    pub negative_prompt: String,
    /// A style from the library, applied at `style_weight` and scored for style similarity.
    pub style: Option<String>,
    pub style_weight: f64,
    /// How many suggestions to try (the user's own candidates and combinations come on top).
    pub candidates: usize,
    /// The user's own candidate negative prompts.
    pub own: Vec<String>,
    /// Seeds used in the search.
    pub seeds: usize,
    /// New seeds the winner is checked on afterwards.
    pub holdout_seeds: usize,
    /// First search seed; held-out seeds start at `seed + 10000`.
    pub seed: u64,
    pub steps: usize,
    pub guidance: f64,
    /// Weights of the combined score by metric name (missing ones keep their defaults).
    pub weights: std::collections::BTreeMap<String, f64>,
}

impl Default for OptimizeRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            style: None,
            style_weight: 1.0,
            candidates: 6,
            own: Vec::new(),
            seeds: 4,
            holdout_seeds: 4,
            seed: 1000,
            steps: 20,
            guidance: 7.5,
            weights: Default::default(),
        }
    }
}

/// One negative prompt's results on the search seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateResult {
    pub negative: String,
    /// `baseline`, `suggestion`, `history`, `yours` or `combination`.
    pub source: String,
    /// Combined score per search seed.
    pub scores: Vec<f64>,
    pub mean: f64,
    /// Mean paired change against the baseline.
    pub mean_delta: f64,
    /// Seeds on which it beat the baseline.
    pub improved: usize,
    /// One-sided sign-test p-value of `improved` (chance of as many by luck).
    pub p_value: f64,
    /// Mean change of each metric's score against the baseline.
    pub metric_deltas: std::collections::BTreeMap<String, f64>,
    /// Image file per search seed (`/api/negatives/runs/{id}/images/{file}`).
    pub images: Vec<String>,
}

/// Baseline against winner on one seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedComparison {
    pub seed: u64,
    pub held_out: bool,
    pub baseline_image: String,
    pub winner_image: String,
    pub baseline_score: f64,
    pub winner_score: f64,
    /// Winner minus baseline, per metric score.
    pub metric_deltas: std::collections::BTreeMap<String, f64>,
}

/// The outcome of an optimisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizeResult {
    pub baseline: CandidateResult,
    pub candidates: Vec<CandidateResult>,
    /// Index into `candidates` of the best one, when one beat the baseline on the search seeds.
    pub winner: Option<usize>,
    pub search_seeds: Vec<u64>,
    pub holdout_seeds: Vec<u64>,
    /// Winner minus baseline on the held-out seeds.
    pub holdout_mean_delta: Option<f64>,
    pub holdout_improved: Option<usize>,
    pub holdout_metric_deltas: std::collections::BTreeMap<String, f64>,
    /// Per seed, search then held-out (empty without a winner).
    pub comparisons: Vec<SeedComparison>,
    /// True when the winner also beat the baseline on the held-out seeds.
    pub helped: bool,
    /// One plain sentence on the outcome.
    pub verdict: String,
}

/// Where an optimisation is in its life.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum OptimizeState {
    Queued { position: usize },
    Running,
    Done,
    Failed { message: String },
    Cancelled,
}

impl OptimizeState {
    /// The state's name, as in the JSON `state` field.
    pub fn name(&self) -> &'static str {
        match self {
            OptimizeState::Queued { .. } => "queued",
            OptimizeState::Running => "running",
            OptimizeState::Done => "done",
            OptimizeState::Failed { .. } => "failed",
            OptimizeState::Cancelled => "cancelled",
        }
    }

    pub fn is_finished(&self) -> bool {
        matches!(self, OptimizeState::Done | OptimizeState::Failed { .. } | OptimizeState::Cancelled)
    }
}

/// `GET /api/negatives/runs/{id}` and every event of its stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizeStatus {
    pub id: String,
    pub request: OptimizeRequest,
    /// UTC time, ISO 8601.
    pub created_at: String,
    #[serde(flatten)]
    pub state: OptimizeState,
    /// Images rendered of `total`.
    pub done: usize,
    pub total: usize,
    /// What is being rendered now.
    pub phase: String,
    /// Candidates measured so far (the baseline first).
    pub partial: Vec<CandidateResult>,
    pub result: Option<OptimizeResult>,
    /// The run in the experiment store.
    pub tracking_run: Option<String>,
}

/// `POST /api/blends/bakes`: bake a blend into one kohya LoRA file. Unknown fields are
/// refused (a mistyped `rank` would otherwise bake exactly).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BakeRequest {
    /// The share link or its code.
    pub link: String,
    /// Compress to at most this rank per layer; exact (rank = the sum of the styles' ranks)
    /// when absent.
    #[serde(default)]
    pub rank: Option<usize>,
}

/// Where a bake is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum BakeState {
    Queued { position: usize },
    Running,
    /// The file is ready at `GET /api/blends/bakes/{id}/file`.
    Done {
        /// ‖ΔW − ΔW_R‖_F / ‖ΔW‖_F over all layers (0 for an exact bake).
        relative_error: f64,
        /// Size of the file in bytes.
        bytes: u64,
    },
    Failed { message: String },
    Cancelled,
}

impl BakeState {
    pub fn is_finished(&self) -> bool {
        matches!(self, BakeState::Done { .. } | BakeState::Failed { .. } | BakeState::Cancelled)
    }
}

/// `GET /api/blends/bakes/{id}` and every event of its stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BakeStatus {
    pub id: String,
    pub request: BakeRequest,
    /// UTC time, ISO 8601.
    pub created_at: String,
    #[serde(flatten)]
    pub state: BakeState,
    /// Layers baked so far, of `total`.
    pub done: usize,
    pub total: usize,
}

// Experiments: the embedded experiment store (MLflow's data model), `GET /api/experiments…`.

/// One run as listed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunInfo {
    pub run_id: String,
    pub experiment_id: i64,
    pub name: String,
    pub status: String,
    pub start_time: i64,
    pub end_time: Option<i64>,
    pub artifact_uri: String,
}

/// One experiment as listed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExperimentInfo {
    pub experiment_id: i64,
    pub name: String,
    /// Active runs in it.
    pub runs: usize,
    /// Start of its newest run (ms since the epoch).
    pub last_run_start: Option<i64>,
}

/// A run with its params, tags and the latest value of each metric (what the runs table
/// shows and filters match).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunSummary {
    #[serde(flatten)]
    pub info: RunInfo,
    pub params: std::collections::BTreeMap<String, String>,
    pub tags: std::collections::BTreeMap<String, String>,
    /// The value at the highest step (then the latest time) of each metric.
    pub metrics: std::collections::BTreeMap<String, f64>,
}

/// One metric value.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct MetricPoint {
    pub value: f64,
    pub timestamp: i64,
    pub step: i64,
}

// The model registry (`GET /api/registry…`): a registered model per style, a version per
// finished training, aliases pointing at versions (MLflow's registry data model).

/// One version of a registered model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelVersion {
    pub name: String,
    /// 1, 2, … in the order they were registered.
    pub version: i64,
    /// ms since the epoch.
    pub creation_time: i64,
    /// `style` (a trained LoRA) or `blend` (a baked blend).
    pub kind: String,
    /// The tracked run that made it.
    pub run_id: Option<String>,
    /// The folder holding the version's own copy of its files.
    pub source: String,
    /// Its metadata: trigger, base model and hash, dataset hash, rank, alpha, steps,
    /// before/after metrics.
    pub tags: std::collections::BTreeMap<String, String>,
    /// Aliases pointing at it.
    pub aliases: Vec<String>,
}

/// A registered model (a style), its versions newest first and its aliases.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RegisteredModel {
    pub name: String,
    pub creation_time: i64,
    pub last_updated_time: i64,
    /// Alias → version.
    pub aliases: std::collections::BTreeMap<String, i64>,
    pub versions: Vec<ModelVersion>,
}

/// How the mirror of the experiment store to an MLflow server stands
/// (`GET /api/tracking/sync`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MirrorStatus {
    /// The server's URI; `None` when runs are kept locally only.
    pub uri: Option<String>,
    /// Runs with something not yet on the server.
    pub pending: usize,
    /// Runs the server refused: (run id, the server's message).
    pub refused: Vec<(String, String)>,
    /// The last transient failure, while it lasts.
    pub last_error: Option<String>,
    /// When the last sync pass completed (ms since the epoch).
    pub last_sync: Option<i64>,
}

/// One event of `GET /api/runs/{id}/metrics/{key}/stream`: the points logged since the
/// previous event (the whole history so far in the first) and the run's status; the
/// stream ends after the first event whose status is not `RUNNING`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MetricStreamEvent {
    pub points: Vec<MetricPoint>,
    pub status: String,
}

/// A deployment (Deployments page, `/api/deployments`): a named serving endpoint bound to a
/// registry reference, with the generation settings its requests start from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Deployment {
    /// 1–64 of letters, digits, `-`, `_` (a style name's rule).
    pub name: String,
    /// `STYLE@ALIAS` (follows the alias as it moves), `STYLE@3` (one version), or a
    /// registered baked blend `BLEND@VERSION`.
    pub target: String,
    /// The adapter's weight in every prompt (`<lora:STYLE@N:WEIGHT>`).
    pub weight: f64,
    pub defaults: DeploymentDefaults,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// Another Atelier server this deployment was pushed to (its base URL), if any.
    #[serde(default)]
    pub remote: Option<String>,
    /// Whether what it serves is scored for quality drift (see [`monitoring`]).
    #[serde(default = "yes")]
    pub monitor: bool,
}

/// The generation settings a deployment's requests start from (each may be overridden per
/// request).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DeploymentDefaults {
    /// Pixels; `None` is the model's native size.
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: usize,
    /// Classifier-free guidance scale (A1111's CFG scale).
    pub guidance: f64,
    /// A scheduler id from [`SCHEDULERS`].
    pub scheduler: String,
    pub negative_prompt: String,
}

impl Default for DeploymentDefaults {
    fn default() -> Self {
        let g = GenerateRequest::default();
        Self { width: None, height: None, steps: g.steps, guidance: g.guidance, scheduler: g.scheduler, negative_prompt: String::new() }
    }
}

/// A deployment as listed: with the registry version its target names right now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeploymentInfo {
    #[serde(flatten)]
    pub deployment: Deployment,
    /// The version number the target resolves to now; `None` with `problem` when it does
    /// not resolve (the style or alias was removed since).
    pub version: Option<i64>,
    pub problem: Option<String>,
}

/// `POST /api/deployments`: what a new deployment needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NewDeployment {
    pub name: String,
    pub target: String,
    #[serde(default = "one")]
    pub weight: f64,
    #[serde(default)]
    pub defaults: DeploymentDefaults,
    /// Push the version and create the deployment on this other Atelier server instead
    /// (its base URL, e.g. `http://serving:3000`), authenticated with `token`.
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
    /// Score what the deployment serves and alert on drift (on unless `false`; see
    /// [`monitoring`]). Not for deployments pushed to another server.
    #[serde(default = "yes")]
    pub monitor: bool,
    /// The drift rule, when not the default one.
    #[serde(default)]
    pub monitoring: Option<monitoring::DriftRule>,
}

fn yes() -> bool {
    true
}

fn one() -> f64 {
    1.0
}
