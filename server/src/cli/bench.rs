//! `atelier bench`: seconds per UNet step and peak memory for the model's UNet and a
//! full-size SD-1.5 UNet (random weights, batch 2 as with CFG, 64×64 latents) for each
//! attention implementation, and end-to-end seconds per image for the built-in model.
//! Prints a table, or one JSON object per case with `--json`. `--case coreml-e2e` and
//! `atelier bench compare` are the mobile-vs-desktop benchmark ([`super::bench_coreml`]).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use atelier_engine::attention::AttentionKind;
use atelier_engine::model::{random_var_builder, read_config, ModelFiles};
use atelier_engine::pipeline::{GenerateParams, StableDiffusion};
use atelier_engine::scheduler::SchedulerKind;
use atelier_engine::unet::{UNet2DConditionModel, UNetConfig};
use candle_core::{DType, Device, Tensor};

/// Arguments of `atelier bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// One case only: model-unet (the --model's UNet at its native size), starter-unet,
    /// sd15-unet, sdxl-unet (SDXL base's UNet, batch 2, 128×128 latents, with the added
    /// conditioning), sd15-vae (SD-1.5's VAE decoding a 64×64 latent to 512×512),
    /// sd-turbo-1step (an SD-Turbo-size 512×512 image in one step: text encoder, UNet, VAE), e2e, blend (e2e with two shipped styles attached) or coreml-e2e (the
    /// workload of a Core ML export, --models, printed as the iOS app's Benchmark screen
    /// writes it: one "atelier-bench-v1" JSON line per timed image); default: model-unet,
    /// sd15-unet and e2e.
    #[arg(long)]
    pub case: Option<String>,
    /// One attention implementation only (default: original and split-einsum).
    #[arg(long)]
    pub attention: Option<String>,
    /// Timed steps per case (the median is reported; one warm-up step is not timed);
    /// default 3. For coreml-e2e: denoising steps per image, default 20.
    #[arg(long)]
    pub steps: Option<usize>,
    /// coreml-e2e: the export folder `atelier export coreml` wrote (atelier_export.json).
    #[arg(long, value_name = "DIR")]
    pub models: Option<PathBuf>,
    /// coreml-e2e: timed images after one untimed warm-up (one JSON line each).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// coreml-e2e: the style library the export's style components are looked up in
    /// (besides the styles shipped in models/styles).
    #[arg(long, env = "ATELIER_STYLES", default_value = "data/styles")]
    pub library: PathBuf,
    /// The model used by model-unet and e2e (coreml-e2e: used when the export's base model
    /// is not found by name and hash).
    #[arg(long, env = "ATELIER_MODEL", default_value = "models/starter")]
    pub model: PathBuf,
    /// starter-unet: a UNet config.json to time instead of the starter model's.
    #[arg(long)]
    pub unet_config: Option<PathBuf>,
    /// starter-unet: latent size for --unet-config.
    #[arg(long, default_value_t = atelier_engine::starter::model::LATENT_SIZE)]
    pub latent_size: usize,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also time sd15-unet and sd15-vae on PyTorch + diffusers (same configs, random weights,
    /// as many threads as this run), back to back, and print both with the ratio. Uses the
    /// Python in ATELIER_TORCH_PYTHON, else a venv under the user cache folder, installing
    /// torch and diffusers from PyPI into it on first use (a few GB).
    #[arg(long)]
    pub against_torch: bool,
    /// Recorded in experiment "bench": a run per invocation, a child run per case and
    /// attention (so results can be compared over commits).
    #[command(flatten)]
    pub track: super::Tracking,
    #[command(subcommand)]
    pub mode: Option<BenchMode>,
}

/// `atelier bench compare …`.
#[derive(Debug, clap::Subcommand)]
pub enum BenchMode {
    /// Side-by-side markdown table of benchmark files ("atelier-bench-v1" JSON lines from
    /// `atelier bench --case coreml-e2e` and the iOS app's Benchmark screen), one column per
    /// file and device: seconds per step and per image, peak memory, package size.
    Compare {
        /// The JSON-lines files, e.g. desktop.jsonl iphone.jsonl.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

struct Row {
    case: String,
    attention: AttentionKind,
    seconds: f64,
    peak_bytes: u64,
    /// Resident memory once the model and inputs were built, before the first step: the
    /// step's own working memory is `peak_bytes − resident_bytes`.
    resident_bytes: u64,
    unit: &'static str,
}

impl Row {
    /// The step's working memory: peak minus what was resident before it.
    fn step_bytes(&self) -> u64 {
        self.peak_bytes.saturating_sub(self.resident_bytes)
    }

    /// The JSON key of the timing: seconds_per_step, seconds_per_decode or seconds_per_image.
    fn json_key(&self) -> &'static str {
        match self.unit {
            "s/step" => "seconds_per_step",
            "s/decode" => "seconds_per_decode",
            _ => "seconds_per_image",
        }
    }
}

/// Peak resident set size of this process (Linux `VmHWM`), in bytes.
fn peak_rss() -> u64 {
    atelier_engine::memory::peak_rss().unwrap_or(0)
}

/// Starts a case's peak afresh: freed memory goes back to the system first (the studio keeps
/// it, see `memory::keep_freed_memory`), else the previous case's would count here.
fn reset_peak() {
    atelier_engine::memory::release_freed_memory();
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn resident() -> u64 {
    atelier_engine::memory::resident_rss().unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn unet_case(name: &str, cfg: &UNetConfig, vb: candle_nn::VarBuilder, attn: AttentionKind, hw: usize, steps: usize, dev: &Device) -> Result<Row> {
    reset_peak();
    let unet = UNet2DConditionModel::new(cfg, vb)?;
    let x = Tensor::randn(0f32, 1., (2, cfg.in_channels, hw, hw), dev)?;
    let ctx = Tensor::randn(0f32, 1., (2, 77, cfg.cross_attention_dim), dev)?;
    // SDXL: pooled text embeds and the micro-conditioning of a square image of this size.
    let added = match cfg.pooled_text_dim() {
        Some(p) => {
            let px = (hw * 8) as f32;
            let ids = Tensor::new(&[[px, px, 0., 0., px, px], [px, px, 0., 0., px, px]], dev)?;
            Some(atelier_engine::unet::AddedConditioning { text_embeds: Tensor::randn(0f32, 1., (2, p), dev)?, time_ids: ids })
        }
        None => None,
    };
    let t = Tensor::new(&[500f32, 500.], dev)?;
    let resident_bytes = resident();
    let seconds = time_median(steps, || {
        let y = unet.forward_added(&x, &t, &ctx, added.as_ref(), attn)?;
        y.flatten_all()?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        Ok(())
    })?;
    Ok(Row { case: name.into(), attention: attn, seconds, peak_bytes: peak_rss(), resident_bytes, unit: "s/step" })
}

/// SD-1.5's VAE (random weights) decoding one 4×64×64 latent into a 512×512 image.
fn vae_case(attn: AttentionKind, steps: usize, dev: &Device) -> Result<Row> {
    reset_peak();
    let vae = atelier_engine::vae::AutoencoderKL::new(&atelier_engine::vae::VaeConfig::sd(), random_var_builder(DType::F32, dev))?;
    let z = Tensor::randn(0f32, 1., (1, 4, 64, 64), dev)?;
    let resident_bytes = resident();
    let seconds = time_median(steps, || {
        vae.decode(&z, attn)?.flatten_all()?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        Ok(())
    })?;
    Ok(Row { case: "sd15-vae".into(), attention: attn, seconds, peak_bytes: peak_rss(), resident_bytes, unit: "s/decode" })
}

/// An SD-Turbo-size one-step image with random weights: SD 2.1-base's architecture (OpenCLIP
/// ViT-H text encoder of 23 layers, UNet with 1024-wide cross-attention, the SD VAE), a 512×512
/// image: tokenize and encode the prompt, one UNet step at batch 1 (guidance 0, Euler ancestral
/// with trailing spacing: the last step ends at σ = 0), VAE decode — the whole of what a Turbo
/// image costs.
fn turbo_case(attn: AttentionKind, steps: usize, dev: &Device) -> Result<Row> {
    use atelier_engine::presets::Preset;
    reset_peak();
    let dir = Preset::Sd2Base.config_dir(&atelier_engine::presets::default_root())?;
    let clip_cfg: atelier_engine::clip::ClipConfig = read_config(&dir.join("text_encoder/config.json"))?;
    let unet_cfg: UNetConfig = read_config(&dir.join("unet/config.json"))?;
    let vae_cfg: atelier_engine::vae::VaeConfig = read_config(&dir.join("vae/config.json"))?;
    let sched_cfg = atelier_engine::scheduler::SchedulerConfig {
        timestep_spacing: Some(atelier_engine::scheduler::TimestepSpacing::Trailing),
        ..atelier_engine::scheduler::SchedulerConfig::load(&dir.join("scheduler/scheduler_config.json"))?
    };
    let tok = atelier_engine::tokenizer::ClipTokenizer::from_dir(&dir.join("tokenizer"))?;
    let te = atelier_engine::clip::ClipTextModel::new(&clip_cfg, random_var_builder(DType::F32, dev))?;
    let unet = UNet2DConditionModel::new(&unet_cfg, random_var_builder(DType::F32, dev))?;
    let vae = atelier_engine::vae::AutoencoderKL::new(&vae_cfg, random_var_builder(DType::F32, dev))?;
    let resident_bytes = resident();
    let seconds = time_median(steps, || {
        let ids = Tensor::new(tok.encode("a photograph of a lighthouse at dawn").ids.as_slice(), dev)?.unsqueeze(0)?;
        let ctx = te.forward(&ids, attn)?.last_hidden_state;
        let mut sched = atelier_engine::scheduler::build(SchedulerKind::EulerAncestral, &sched_cfg, 1)?;
        let mut noise = atelier_engine::noise::Noise::new(1);
        let x = (noise.randn(&[1, 4, 64, 64], dev)? * sched.init_noise_sigma())?;
        let t = sched.timesteps()[0];
        let input = sched.scale_model_input(&x, 0)?;
        let pred = unet.forward(&input, t, &ctx, attn)?;
        let latents = sched.step(&pred, 0, &x, &mut noise)?;
        let image = vae.decode(&(latents / vae_cfg.scaling_factor)?, attn)?;
        image.flatten_all()?.sum_all()?.to_scalar::<f32>()?;
        Ok(())
    })?;
    Ok(Row { case: "sd-turbo-1step".into(), attention: attn, seconds, peak_bytes: peak_rss(), resident_bytes, unit: "s/image (512², 1 step)" })
}

/// Runs `f` once untimed, then `steps` timed times; the median in seconds.
fn time_median(steps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::new();
    for _ in 0..steps.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(BenchMode::Compare { files }) = &args.mode {
        return super::bench_coreml::compare(files);
    }
    if args.case.as_deref() == Some("coreml-e2e") {
        return coreml_e2e(&args);
    }
    let steps = args.steps.unwrap_or(3);
    let attns: Vec<AttentionKind> = match &args.attention {
        Some(a) => vec![a.parse()?],
        None => vec![AttentionKind::Original, AttentionKind::SplitEinsum],
    };
    let cases: Vec<&str> = match &args.case {
        Some(c) => vec![c.as_str()],
        None => vec!["model-unet", "sd15-unet", "e2e"],
    };
    let dev = crate::cli::device()?;
    let mut rows = Vec::new();
    for case in cases.iter().copied() {
        for &attn in &attns {
            let row = match case {
                "model-unet" => {
                    let files = ModelFiles::locate(&args.model)?;
                    let cfg: UNetConfig = read_config(&files.unet_config)?;
                    let vb = random_var_builder(DType::F32, &dev);
                    let hw = cfg.sample_size.unwrap_or(64);
                    unet_case(case, &cfg, vb, attn, hw, steps, &dev)?
                }
                "starter-unet" => {
                    let vb = random_var_builder(DType::F32, &dev);
                    let cfg = match &args.unet_config {
                        Some(p) => read_config(p)?,
                        None => atelier_engine::starter::model::unet_config(),
                    };
                    unet_case(case, &cfg, vb, attn, args.latent_size, steps, &dev)?
                }
                "sd15-unet" => {
                    let vb = random_var_builder(DType::F32, &dev);
                    unet_case(case, &UNetConfig::v1_5(), vb, attn, 64, steps, &dev)?
                }
                "sdxl-unet" => {
                    let vb = random_var_builder(DType::F32, &dev);
                    unet_case(case, &UNetConfig::sdxl(), vb, attn, 128, steps, &dev)?
                }
                "sd15-vae" => vae_case(attn, steps, &dev)?,
                "sd-turbo-1step" => turbo_case(attn, steps, &dev)?,
                "e2e" | "blend" => {
                    reset_peak();
                    let sd = StableDiffusion::load(&args.model, &dev)
                        .with_context(|| format!("loading {}", args.model.display()))?;
                    // "blend": two shipped styles attached unmerged (0.6 / 0.4), as the Blend
                    // page's exact render uses them.
                    let loras = if case == "blend" {
                        let load = |name: &str, weight: f64| -> Result<atelier_engine::lora::ActiveLora> {
                            let file = std::path::Path::new(crate::cli::train_style::SHIPPED_STYLES).join(name).join(format!("{name}.safetensors"));
                            let lora = sd.bind_lora(&std::sync::Arc::new(atelier_engine::lora::LoraAdapter::load(&file)?))?;
                            Ok(atelier_engine::lora::ActiveLora { lora, weight, blocks: Default::default() })
                        };
                        vec![load("inkline", 0.6)?, load("pastel", 0.4)?]
                    } else {
                        Vec::new()
                    };
                    let params = GenerateParams {
                        prompt: "a red circle on a blue background".into(),
                        steps: 20,
                        scheduler: SchedulerKind::DpmPp2mKarras,
                        attention: attn,
                        width: sd.default_size(),
                        height: sd.default_size(),
                        loras,
                        ..Default::default()
                    };
                    let resident_bytes = resident();
                    sd.generate(&params, &mut |_| true)?; // warm-up
                    let mut times = Vec::new();
                    for _ in 0..steps.max(1) {
                        let t = Instant::now();
                        sd.generate(&params, &mut |_| true)?;
                        times.push(t.elapsed().as_secs_f64());
                    }
                    Row { case: case.into(), attention: attn, seconds: median(times), peak_bytes: peak_rss(), resident_bytes, unit: "s/image (20 steps, CFG)" }
                }
                other => anyhow::bail!("unknown case {other}; use model-unet, starter-unet, sd15-unet, sdxl-unet, sd15-vae, sd-turbo-1step, e2e, blend or coreml-e2e"),
            };
            if args.json {
                let key = row.json_key();
                println!(
                    "{}",
                    serde_json::json!({"case": row.case, "attention": row.attention.id(), key: row.seconds, "peak_bytes": row.peak_bytes, "resident_bytes": row.resident_bytes})
                );
            }
            rows.push(row);
        }
    }
    if let Some(t) = args.track.open() {
        let parent = t.record(
            "bench",
            &format!("bench {}", args.case.as_deref().unwrap_or("all")),
            &serde_json::json!({ "cases": rows.iter().map(|r| r.case.clone()).collect::<Vec<_>>(), "steps": steps, "model": args.model, "latent_size": args.latent_size, "threads": std::env::var("RAYON_NUM_THREADS").unwrap_or_default() }),
            &super::run_tags(&dev),
        )?;
        for r in &rows {
            let child = parent.child(
                &format!("{} {}", r.case, r.attention.id()),
                &serde_json::json!({ "case": r.case, "attention": r.attention.id(), "unit": r.unit }),
                &super::run_tags(&dev),
            )?;
            let key = r.json_key();
            child.metrics(&[(key, r.seconds), ("peak_rss_mib", r.peak_bytes as f64 / 1048576.0), ("step_memory_mib", r.step_bytes() as f64 / 1048576.0)], 0)?;
            child.finish()?;
        }
        parent.finish()?;
        args.track.finish();
    }
    if !args.json {
        println!("| case | attention | seconds | unit | peak RSS | step memory (peak − resident before) |");
        println!("|---|---|---|---|---|---|");
        for r in &rows {
            let mib = |b: u64| b as f64 / 1048576.0;
            println!("| {} | {} | {:.4} | {} | {:.1} MiB | {:.1} MiB |", r.case, r.attention, r.seconds, r.unit, mib(r.peak_bytes), mib(r.step_bytes()));
        }
    }
    if args.against_torch {
        let torch_cases: Vec<&str> = cases.iter().copied().filter(|c| super::bench_torch::CASES.contains(c)).collect();
        if torch_cases.is_empty() {
            anyhow::bail!("--against-torch compares {}; add --case with one of them", super::bench_torch::CASES.join(" or "));
        }
        let ours: Vec<super::bench_torch::Ours> =
            rows.iter().map(|r| super::bench_torch::Ours { case: r.case.clone(), attention: r.attention.id(), seconds: r.seconds, peak_bytes: r.peak_bytes, step_bytes: r.step_bytes() }).collect();
        super::bench_torch::compare(&torch_cases, steps, &ours, args.json)?;
    }
    Ok(())
}

/// `--case coreml-e2e`: one JSON line per timed image on stdout, recorded in experiment
/// "bench" like the other cases.
fn coreml_e2e(args: &BenchArgs) -> Result<()> {
    let models = args.models.as_deref().context("--case coreml-e2e needs --models DIR (the folder `atelier export coreml` wrote)")?;
    let attention: AttentionKind = match &args.attention {
        Some(a) => a.parse()?,
        None => AttentionKind::Original,
    };
    let opts = super::bench_coreml::E2eOptions { models, model: &args.model, library: &args.library, steps: args.steps, runs: args.runs, attention };
    let records = super::bench_coreml::run_e2e(&opts, &mut |r| println!("{}", serde_json::to_string(r).expect("plain fields serialise")))?;
    if let Some(t) = args.track.open() {
        let run = t.record(
            "bench",
            "bench coreml-e2e",
            &serde_json::json!({ "case": "coreml-e2e", "models": models, "steps": records[0].steps, "runs": records.len(), "style": records[0].style, "width": records[0].width, "height": records[0].height }),
            &super::run_tags(&crate::cli::device()?),
        )?;
        for (i, r) in records.iter().enumerate() {
            run.metrics(&[("seconds_per_step", r.seconds_per_step), ("seconds_per_image", r.seconds_per_image), ("peak_rss_mib", r.peak_memory_bytes as f64 / 1048576.0)], i as i64)?;
        }
        run.finish()?;
        args.track.finish();
    }
    Ok(())
}
