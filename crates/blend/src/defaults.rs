//! Default settings, stated once for the browser and the server: the web request types
//! (`app::dto::GenerateRequest`, `app::dto::StyleTrainingRequest`) and the engine's own
//! (`atelier_engine::pipeline::GenerateParams`, `atelier_engine::style::train::StyleTrainConfig`)
//! are all built from these. The app cannot depend on the engine (Candle does not build for
//! WASM), so they live in this crate, which both sides share.

/// A generation (txt2img and img2img).
pub mod generate {
    /// Denoising steps.
    pub const STEPS: usize = 20;
    /// Classifier-free guidance scale.
    pub const GUIDANCE: f64 = 7.5;
    /// Scheduler id (as `atelier_engine::scheduler::SchedulerKind::id` writes it): DPM++ 2M
    /// Karras.
    pub const SCHEDULER: &str = "dpmpp-2m-karras";
    /// Images generated together.
    pub const BATCH_SIZE: usize = 1;
    /// img2img strength: the share of the schedule that is re-noised.
    pub const STRENGTH: f64 = 0.6;
}

/// A style (LoRA) training. The LoRA alpha defaults to the rank (scale 1).
pub mod style_training {
    /// LoRA rank.
    pub const RANK: usize = 8;
    /// Optimiser steps.
    pub const STEPS: u64 = 400;
    /// Peak learning rate.
    pub const LR: f64 = 1e-3;
    /// Images per step.
    pub const BATCH: usize = 4;
    /// Random seed of the run.
    pub const SEED: u64 = 0;
    /// Also adapt the text encoder's attention.
    pub const TEXT_ENCODER: bool = false;
    /// Also adapt the UNet resnets' 3×3 convolutions (LoCon).
    pub const CONVS: bool = false;
    /// Min-SNR loss weighting γ (0 disables).
    pub const MIN_SNR_GAMMA: f64 = 5.0;
    /// Noise offset (0 disables).
    pub const NOISE_OFFSET: f64 = 0.0;
    /// Train on horizontal mirror images too.
    pub const FLIP: bool = true;
    /// Steps between checkpoints.
    pub const CHECKPOINT_EVERY: u64 = 50;
    /// Steps between sample sheets (0: none).
    pub const SAMPLE_EVERY: u64 = 100;
    /// Fewest usable dataset images a training accepts.
    pub const MIN_IMAGES: usize = 5;
}
