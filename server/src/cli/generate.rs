//! `atelier generate`: generate images from the command line, with a progress bar,
//! writing PNGs with A1111-compatible `parameters`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use atelier_engine::attention::AttentionKind;
use atelier_engine::metadata::{write_png_atomic, ImageMetadata};
use atelier_engine::pipeline::{GenerateParams, StableDiffusion};
use atelier_engine::scheduler::SchedulerKind;

/// Arguments of `atelier generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// What to paint.
    #[arg(long)]
    pub prompt: String,
    /// What to steer away from.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Denoising steps (1..=150).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Classifier-free guidance scale (0..=30).
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// Seed; random when omitted (the one used is printed and stored in the PNG).
    #[arg(long)]
    pub seed: Option<u64>,
    /// ddim, euler, euler-a, dpmpp-2m or dpmpp-2m-karras.
    #[arg(long, default_value = "dpmpp-2m-karras")]
    pub scheduler: String,
    /// Width in pixels (multiple of 8); the model's native size when omitted.
    #[arg(long)]
    pub width: Option<usize>,
    /// Height in pixels (multiple of 8); the model's native size when omitted.
    #[arg(long)]
    pub height: Option<usize>,
    /// img2img: the image to restyle.
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// img2img strength 0..1: how much of the schedule re-noises the input.
    #[arg(long, default_value_t = 0.6)]
    pub strength: f64,
    /// original or split-einsum (flash on CUDA builds).
    #[arg(long, default_value = "original")]
    pub attention: String,
    /// Images to generate; image k uses seed + k.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Model folder (diffusers layout) or hub id.
    #[arg(long, env = "ATELIER_MODEL", default_value = "models/starter")]
    pub model: String,
    /// Output PNG; with --batch > 1, `-k` is added before the extension.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let scheduler: SchedulerKind = args.scheduler.parse()?;
    let attention: AttentionKind = args.attention.parse()?;
    let init_image = match &args.init_image {
        Some(p) => Some(
            image::open(p)
                .with_context(|| format!("cannot read input image {} (PNG, JPEG or WebP expected)", p.display()))?
                .to_rgb8(),
        ),
        None => None,
    };
    let device = crate::cli::device()?;
    let model_dir = atelier_engine::model::resolve(&args.model)?;
    let sd = StableDiffusion::load(&model_dir, &device)
        .with_context(|| format!("loading model {}", model_dir.display()))?;
    let size = sd.default_size();
    let seed = args.seed.unwrap_or_else(|| rand::random::<u32>() as u64);
    let params = GenerateParams {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        steps: args.steps,
        guidance: args.guidance,
        seed,
        scheduler,
        width: args.width.unwrap_or(size),
        height: args.height.unwrap_or(size),
        batch_size: args.batch,
        init_image,
        strength: args.strength,
        attention,
    };
    params.validate()?;
    let bar = indicatif::ProgressBar::new(args.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {elapsed} eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let out = sd.generate(&params, &mut |p| {
        bar.set_length(p.total as u64);
        bar.set_position(p.step as u64);
        true
    })?;
    bar.finish();
    for w in &out.warnings {
        eprintln!("warning: {w}");
    }
    for (k, img) in out.images.iter().enumerate() {
        let path = if out.images.len() == 1 {
            args.out.clone()
        } else {
            let stem = args.out.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
            args.out.with_file_name(format!("{stem}-{k}.png"))
        };
        let meta = ImageMetadata {
            prompt: params.prompt.clone(),
            negative_prompt: params.negative_prompt.clone(),
            steps: params.steps,
            sampler: scheduler.a1111_name().to_string(),
            cfg_scale: params.guidance,
            seed: seed + k as u64,
            width: params.width,
            height: params.height,
            model_hash: sd.model_hash().to_string(),
            model: model_dir.file_name().map(|n| n.to_string_lossy().into_owned()),
            denoising_strength: params.init_image.as_ref().map(|_| params.strength),
            extra: vec![],
        };
        write_png_atomic(&path, img, &meta)?;
        println!("{} (seed {})", path.display(), seed + k as u64);
    }
    Ok(())
}
