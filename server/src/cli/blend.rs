//! `atelier blend`: make a share link for a blend of library styles (and save it by
//! name), show what a link or saved blend holds, and bake a blend into one LoRA file or
//! into a copy of the model.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use atelier_blend::Blend;
use atelier_engine::pipeline::StableDiffusion;
use atelier_server::blends::{self, BlendStore, Resolved};
use atelier_server::styles::StyleLibrary;

use super::train_style::SHIPPED_STYLES;

/// Arguments of `atelier blend`.
#[derive(Debug, clap::Args)]
pub struct BlendArgs {
    #[command(subcommand)]
    pub action: BlendAction,
    /// Model folder (diffusers layout), hub id, or single-file `.safetensors` checkpoint.
    #[arg(long, global = true, env = "ATELIER_MODEL", default_value = "models/starter")]
    pub model: String,
    /// The style library (besides the styles shipped in models/styles).
    #[arg(long, global = true, env = "ATELIER_STYLES", default_value = "data/styles")]
    pub library: PathBuf,
    /// Where named blends are kept (`DATA/blends/`).
    #[arg(long, global = true, env = "ATELIER_DATA", default_value = "data")]
    pub data_dir: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
pub enum BlendAction {
    /// Make a share link from styles and settings; print it (and save it with --save).
    Link {
        /// A style and its weight, `NAME:WEIGHT` or `NAME:WEIGHT:lbw=DOWN,MID,UP`; repeat.
        #[arg(long = "style", required = true)]
        styles: Vec<String>,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value = "")]
        negative_prompt: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = atelier_blend::defaults::generate::STEPS as u32)]
        steps: u32,
        #[arg(long, default_value_t = atelier_blend::defaults::generate::GUIDANCE)]
        guidance: f64,
        #[arg(long, default_value = atelier_blend::defaults::generate::SCHEDULER)]
        scheduler: String,
        /// Also save the blend under this name.
        #[arg(long)]
        save: Option<String>,
    },
    /// Print what a link or saved blend holds, and which of its styles this studio lacks.
    Show { blend: String },
    /// Bake a blend into one kohya LoRA file: exact, or compressed to --rank by SVD.
    Bake {
        blend: String,
        #[arg(long)]
        out: PathBuf,
        /// Compress to this rank per layer (reports the relative error); exact when omitted.
        #[arg(long)]
        rank: Option<usize>,
        /// Also register the baked file in the model registry as a new version of NAME
        /// (kind blend; prompts then use <lora:NAME@VERSION>), in DATA/tracking.
        #[arg(long, value_name = "NAME")]
        register: Option<String>,
    },
    /// Write a copy of the model with the blend merged into its weights (diffusers layout).
    Merge {
        blend: String,
        #[arg(long)]
        out: PathBuf,
    },
}

/// The library the CLI reads styles from.
pub fn library(dir: &std::path::Path) -> StyleLibrary {
    StyleLibrary::new(dir.to_path_buf()).with_shipped(PathBuf::from(SHIPPED_STYLES))
}

/// Loads a blend by link or name and matches it to `library` and the model `sd`.
pub fn resolve(link_or_name: &str, data_dir: &std::path::Path, library: &StyleLibrary, model_hash: &str) -> Result<Resolved> {
    let blend = blends::load(link_or_name, &blends::store_in(data_dir))?;
    Ok(blends::resolve(blend, library, model_hash))
}

fn warn_other_model(resolved: &Resolved, model_hash: &str) {
    if resolved.other_model {
        eprintln!(
            "warning: this blend was made on model {} but the loaded model is {model_hash}: the images will differ",
            resolved.blend.model_hash
        );
    }
}

pub fn run(args: BlendArgs) -> Result<()> {
    let library = library(&args.library);
    let device = crate::cli::device()?;
    let model_dir = atelier_engine::model::resolve(&args.model)?;
    match args.action {
        BlendAction::Link { styles, prompt, negative_prompt, seed, steps, guidance, scheduler, save } => {
            let sd_hash = blends::model_hash(&model_dir)?;
            let _: atelier_engine::scheduler::SchedulerKind = scheduler.parse()?;
            let size = model_size(&model_dir)?;
            let blend = Blend {
                model_hash: sd_hash,
                styles: blends::from_specs(&styles, &library)?,
                prompt,
                negative_prompt,
                seed,
                steps,
                guidance,
                scheduler,
                width: size,
                height: size,
            };
            let link = atelier_blend::encode(&blend)?;
            if let Some(name) = save {
                BlendStore::new(args.data_dir.join("blends")).save(&name, &blend)?;
                eprintln!("saved as {name}");
            }
            println!("{link}");
        }
        BlendAction::Show { blend } => {
            let sd_hash = blends::model_hash(&model_dir)?;
            let r = resolve(&blend, &args.data_dir, &library, &sd_hash)?;
            println!("{}", serde_json::to_string_pretty(&r.blend)?);
            warn_other_model(&r, &sd_hash);
            for m in &r.missing {
                println!("missing style {} (hash {})", m.name, m.hash);
            }
        }
        BlendAction::Bake { blend, out, rank, register } => {
            let sd = StableDiffusion::load(&model_dir, &device)?;
            let r = resolve(&blend, &args.data_dir, &library, sd.model_hash())?;
            warn_other_model(&r, sd.model_hash());
            let active = r.active(&sd)?;
            let baked = match rank {
                None => atelier_engine::bake::bake_exact(&active, sd.lora_slots())?,
                Some(rank) => atelier_engine::bake::bake_compressed(&active, sd.lora_slots(), rank)?,
            };
            let meta = HashMap::from([
                ("atelier_blend".to_string(), atelier_blend::encode(&r.blend)?),
                ("ss_sd_model_hash".to_string(), sd.model_hash().to_string()),
                ("ss_output_name".to_string(), out.file_stem().map_or_else(|| "blend".into(), |s| s.to_string_lossy().into_owned())),
            ]);
            atelier_engine::bake::save_kohya(&baked, &meta, &out)?;
            match rank {
                None => println!("{}: exact bake of {} style(s), {} layers", out.display(), active.len(), baked.modules.len()),
                Some(rank) => println!(
                    "{}: rank {rank}, relative error {:.4} overall (worst layer {:.4})",
                    out.display(),
                    baked.relative_error,
                    baked.worst_layer_error
                ),
            }
            if let Some(name) = register {
                let tracker = atelier_server::tracking::Tracker::open(&args.data_dir.join("tracking"))?;
                let v = tracker.register_blend(&name, &out, &r.blend, rank, baked.relative_error)?;
                println!("registered as {name} version {} (use it as <lora:{name}@{}:1>)", v.version, v.version);
            }
        }
        BlendAction::Merge { blend, out } => {
            let sd = StableDiffusion::load(&model_dir, &device)?;
            let r = resolve(&blend, &args.data_dir, &library, sd.model_hash())?;
            warn_other_model(&r, sd.model_hash());
            let active = r.active(&sd)?;
            atelier_engine::bake::save_merged(&active, sd.lora_slots(), &model_dir, &out)?;
            println!("{}: the model with the blend merged in (diffusers layout)", out.display());
        }
    }
    Ok(())
}

/// The model's native image size, from its configs.
pub fn model_size(model_dir: &std::path::Path) -> Result<u32> {
    let read = |f: &str| -> Result<serde_json::Value> {
        let p = model_dir.join(f);
        Ok(serde_json::from_slice(&std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?)?)
    };
    let sample = read("unet/config.json")?["sample_size"].as_u64().context("unet/config.json has no sample_size")?;
    let blocks = read("vae/config.json")?["block_out_channels"].as_array().map_or(4, |a| a.len()) as u32;
    Ok(sample as u32 * (1 << (blocks - 1)))
}
