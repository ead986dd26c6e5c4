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
    #[arg(long, required_unless_present = "blend")]
    pub prompt: Option<String>,
    /// Render a blend: a share link (or its code) or the name of a saved blend. Its
    /// styles, prompt, negative prompt, seed, steps, guidance, scheduler and size are used.
    #[arg(long, value_name = "LINK_OR_NAME")]
    pub blend: Option<String>,
    /// Where saved blends are kept (`DATA/blends/`).
    #[arg(long, env = "ATELIER_DATA", default_value = "data")]
    pub data_dir: PathBuf,
    /// What to steer away from.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Denoising steps (1..=150).
    #[arg(long, default_value_t = atelier_blend::defaults::generate::STEPS)]
    pub steps: usize,
    /// Classifier-free guidance scale (0..=30).
    #[arg(long, default_value_t = atelier_blend::defaults::generate::GUIDANCE)]
    pub guidance: f64,
    /// Seed; random when omitted (the one used is printed and stored in the PNG).
    #[arg(long)]
    pub seed: Option<u64>,
    /// ddim, euler, euler-a, dpmpp-2m or dpmpp-2m-karras.
    #[arg(long, default_value = atelier_blend::defaults::generate::SCHEDULER)]
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
    #[arg(long, default_value_t = atelier_blend::defaults::generate::STRENGTH)]
    pub strength: f64,
    /// original or split-einsum (flash on CUDA builds).
    #[arg(long, default_value = "original")]
    pub attention: String,
    /// Images to generate; image k uses seed + k.
    #[arg(long, default_value_t = atelier_blend::defaults::generate::BATCH_SIZE)]
    pub batch: usize,
    /// Model folder (diffusers layout), hub id, or single-file `.safetensors` checkpoint.
    #[arg(long, env = "ATELIER_MODEL", default_value = "models/starter")]
    pub model: String,
    /// LoRA file to apply, as `FILE`, `FILE:WEIGHT` (weight 1 when omitted, negative
    /// allowed) or `FILE:WEIGHT:lbw=DOWN,MID,UP` (per-block multipliers of the UNet's
    /// down, mid and up blocks); repeat for several adapters, which stay separate.
    #[arg(long = "lora", value_name = "FILE[:WEIGHT]")]
    pub loras: Vec<String>,
    /// The style library that `<lora:NAME:WEIGHT>` tags in the prompt are looked up in
    /// (besides the styles shipped in models/styles).
    #[arg(long, env = "ATELIER_STYLES", default_value = "data/styles")]
    pub library: PathBuf,
    /// Output PNG; with --batch > 1, `-k` is added before the extension.
    #[arg(long)]
    pub out: PathBuf,
    /// Memory this run may use (e.g. `12GiB`); a larger request is refused with what would
    /// fit. Default: three quarters of the machine's memory.
    #[arg(long, env = "ATELIER_MAX_MEMORY", value_parser = crate::cli::parse_budget)]
    pub max_memory: Option<atelier_engine::memory::MemoryBudget>,
    /// Colour that transparent parts of input images (datasets, img2img) are composited
    /// onto before any resize: white (as A1111), black, grey or #RRGGBB.
    #[arg(long, env = "ATELIER_ALPHA_BACKGROUND", value_parser = crate::cli::parse_background)]
    pub alpha_background: Option<[u8; 3]>,
}

pub fn run(mut args: GenerateArgs) -> Result<()> {
    if let Some(rgb) = args.alpha_background {
        atelier_engine::image_input::set_background(rgb);
    }
    if let Some(link) = args.blend.clone() {
        let model_dir = atelier_engine::model::resolve(&args.model)?;
        let model_hash = atelier_server::blends::model_hash(&model_dir)?;
        let library = crate::cli::blend::library(&args.library);
        let r = crate::cli::blend::resolve(&link, &args.data_dir, &library, &model_hash)?;
        if r.other_model {
            eprintln!("warning: this blend was made on model {} but the loaded model is {model_hash}: the images will differ", r.blend.model_hash);
        }
        args.prompt = Some(r.tagged_prompt()?);
        args.negative_prompt = r.blend.negative_prompt.clone();
        args.seed = Some(r.blend.seed);
        args.steps = r.blend.steps as usize;
        args.guidance = r.blend.guidance;
        args.scheduler = r.blend.scheduler.clone();
        args.width = Some(r.blend.width as usize);
        args.height = Some(r.blend.height as usize);
    }
    let prompt = args.prompt.clone().context("give --prompt or --blend")?;
    let scheduler: SchedulerKind = args.scheduler.parse()?;
    let attention: AttentionKind = args.attention.parse()?;
    // The engine's one image reader: upright by EXIF orientation, transparency on white.
    let init_image = match &args.init_image {
        Some(p) => {
            let bytes = std::fs::read(p).with_context(|| format!("cannot read input image {}", p.display()))?;
            let img = atelier_engine::image_input::decode(&bytes, &atelier_engine::image_input::DecodeOptions::default())
                .with_context(|| format!("input image {}", p.display()))?;
            Some(img)
        }
        None => None,
    };
    let device = crate::cli::device()?;
    let model_dir = atelier_engine::model::resolve(&args.model)?;
    let sd = StableDiffusion::load(&model_dir, &device)
        .with_context(|| format!("loading model {}", model_dir.display()))?;
    let size = sd.default_size();
    let mut specs: Vec<(PathBuf, f64, atelier_engine::lora::BlockWeights)> =
        args.loras.iter().map(|s| parse_lora_spec(s)).collect::<Result<_>>()?;
    // `<lora:NAME:WEIGHT>` tags: styles from the library; the tags stay in the saved prompt, as in A1111.
    let (engine_prompt, tags) = atelier_engine::prompt::extract_lora_tags(&prompt)?;
    if !tags.is_empty() {
        let library = atelier_server::styles::StyleLibrary::new(args.library.clone()).with_shipped(PathBuf::from(crate::cli::train_style::SHIPPED_STYLES));
        for tag in tags {
            let entry = library.resolve(&tag.name).map_err(anyhow::Error::msg)?;
            let blocks = tag.blocks.map_or_else(Default::default, |[down, mid, up]| atelier_engine::lora::BlockWeights { down, mid, up });
            specs.push((entry.adapter(), tag.weight, blocks));
        }
    }
    let mut loras = Vec::new();
    for (file, weight, blocks) in specs {
        let adapter = std::sync::Arc::new(atelier_engine::lora::LoraAdapter::load(&file)?);
        let bound = sd.bind_lora(&adapter).with_context(|| format!("applying {} to {}", file.display(), model_dir.display()))?;
        loras.push(atelier_engine::lora::ActiveLora { lora: bound, weight, blocks });
    }
    let seed = args.seed.unwrap_or_else(|| rand::random::<u32>() as u64);
    let mut params = GenerateParams {
        prompt: engine_prompt,
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
        loras,
    };
    params.validate()?;
    let budget = args.max_memory.unwrap_or_else(atelier_engine::memory::MemoryBudget::from_machine);
    let available = budget.available(sd.weights_bytes());
    let admission = sd.admit(&params, available)?;
    params.attention = admission.attention;
    if let Some(note) = &admission.note {
        eprintln!("note: {note}");
    }
    let bar = indicatif::ProgressBar::new(args.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {elapsed} eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let out = atelier_engine::memory::with_limit(Some(available), || {
        sd.generate(&params, &mut |p| {
            bar.set_length(p.total as u64);
            bar.set_position(p.step as u64);
            true
        })
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
        // A converted single file is named after the file, as A1111 names it.
        let model_name = atelier_engine::single_file::source_of(&model_dir)
            .map(|(name, _)| name)
            .or_else(|| model_dir.file_name().map(|n| n.to_string_lossy().into_owned()));
        let meta = ImageMetadata::for_generation(&params, &prompt, seed + k as u64, sd.model_hash(), model_name.as_deref(), &out.adapters);
        write_png_atomic(&path, img, &meta)?;
        println!("{} (seed {})", path.display(), seed + k as u64);
    }
    Ok(())
}

/// Splits `FILE[:WEIGHT[:lbw=D,M,U]]`; a suffix that is not a number belongs to the file name.
pub fn parse_lora_spec(spec: &str) -> Result<(PathBuf, f64, atelier_engine::lora::BlockWeights)> {
    let mut rest = spec;
    let mut blocks = atelier_engine::lora::BlockWeights::default();
    if let Some((head, last)) = spec.rsplit_once(':') {
        if last.trim().starts_with("lbw=") {
            let [down, mid, up] = atelier_engine::prompt::parse_block_weights(last.trim())
                .with_context(|| format!("--lora {spec}: write the block weights as lbw=DOWN,MID,UP, e.g. lbw=1,0.5,0"))?;
            blocks = atelier_engine::lora::BlockWeights { down, mid, up };
            rest = head;
        }
    }
    if let Some((file, w)) = rest.rsplit_once(':') {
        if let Ok(weight) = w.trim().parse::<f64>() {
            anyhow::ensure!(weight.is_finite() && weight.abs() <= 10.0, "--lora {spec}: the weight must be between -10 and 10");
            return Ok((PathBuf::from(file), weight, blocks));
        }
    }
    anyhow::ensure!(rest == spec, "--lora {spec}: block weights need a weight before them (FILE:WEIGHT:lbw=D,M,U)");
    Ok((PathBuf::from(spec), 1.0, blocks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_specs() {
        use atelier_engine::lora::BlockWeights;
        let all = BlockWeights::default();
        assert_eq!(parse_lora_spec("a.safetensors").unwrap(), (PathBuf::from("a.safetensors"), 1.0, all));
        assert_eq!(parse_lora_spec("dir/a.safetensors:0.5").unwrap(), (PathBuf::from("dir/a.safetensors"), 0.5, all));
        assert_eq!(parse_lora_spec("a.safetensors:-0.25").unwrap(), (PathBuf::from("a.safetensors"), -0.25, all));
        assert_eq!(parse_lora_spec("C:x.safetensors").unwrap(), (PathBuf::from("C:x.safetensors"), 1.0, all));
        assert_eq!(
            parse_lora_spec("a.safetensors:0.8:lbw=1,0.5,0").unwrap(),
            (PathBuf::from("a.safetensors"), 0.8, BlockWeights { down: 1.0, mid: 0.5, up: 0.0 })
        );
        assert!(parse_lora_spec("a.safetensors:1e9").is_err());
        assert!(parse_lora_spec("a.safetensors:1:lbw=1,2").is_err());
        assert!(parse_lora_spec("a.safetensors:lbw=1,1,1").is_err());
    }
}
