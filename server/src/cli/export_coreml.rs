//! `atelier export coreml`: the model with a style, blend or LoRA merged in, written as the
//! Core ML packages Apple's `ml-stable-diffusion` Swift package loads
//! ([`atelier_engine::coreml::export`]), with a progress bar and a table of package sizes
//! and what each storage option costs.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use atelier_engine::coreml::compress::Compression;
use atelier_engine::coreml::export::{self, ExportManifest, ExportOptions, Precision, StyleComponent, StyleExport};
use atelier_engine::coreml::mil::Target;
use atelier_engine::coreml::Attention;
use atelier_engine::lora::{ActiveLora, BlockWeights, LoraAdapter};
use atelier_engine::pipeline::StableDiffusion;
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `atelier export coreml`.
#[derive(Debug, clap::Args)]
pub struct CoremlArgs {
    /// Model folder (diffusers layout), hub id, or single-file `.safetensors` checkpoint.
    #[arg(long, env = "ATELIER_MODEL", default_value = "models/starter")]
    pub model: String,
    /// A blend to bake in: a share link or a saved blend's name. Repeat for several styles
    /// in one export (multifunction packages; needs --target ios18).
    #[arg(long = "blend", value_name = "LINK|NAME")]
    pub blends: Vec<String>,
    /// A library style to bake in as its own style, `NAME[:WEIGHT]`; repeat.
    #[arg(long = "style", value_name = "NAME[:WEIGHT]")]
    pub styles: Vec<String>,
    /// A LoRA file, `FILE[:WEIGHT]`; all --lora files together make one style.
    #[arg(long = "lora", value_name = "FILE[:WEIGHT]")]
    pub loras: Vec<String>,
    /// Name of the --lora style (default: the first file's name).
    #[arg(long)]
    pub lora_name: Option<String>,
    /// Also export the model without any style, as a style called `base`.
    #[arg(long)]
    pub include_base: bool,
    /// Output folder (new, or empty).
    #[arg(long)]
    pub out: PathBuf,
    /// `split-einsum` (Neural Engine) or `original` (GPU).
    #[arg(long, default_value = "split-einsum")]
    pub attention: String,
    /// `fp16` or `fp32` weights and compute.
    #[arg(long, default_value = "fp16")]
    pub precision: String,
    /// k-means palettization of weight matrices to 4, 6 or 8 bits.
    #[arg(long, value_name = "BITS")]
    pub palettize: Option<u8>,
    /// One look-up table per this many output channels (iOS 18) instead of per tensor.
    #[arg(long, value_name = "CHANNELS", requires = "palettize")]
    pub palettize_group_size: Option<usize>,
    /// `int8`: linear quantization of weight matrices, one scale per output channel.
    #[arg(long, conflicts_with = "palettize")]
    pub quantize: Option<String>,
    /// Split the UNet into UnetChunk1 + UnetChunk2 (iOS needs it for SD-1.5-size UNets).
    #[arg(long)]
    pub chunk_unet: bool,
    /// Deployment target: ios16 (macOS 13), ios17 (macOS 14) or ios18 (macOS 15).
    #[arg(long, default_value = "ios16")]
    pub target: String,
    /// Image width in pixels (default: the model's native size).
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels (default: the model's native size).
    #[arg(long)]
    pub height: Option<usize>,
    /// A UNet that takes one latent per call (guidance then needs two calls).
    #[arg(long)]
    pub unet_batch_one: bool,
    /// Skip VAEEncoder.mlpackage (no img2img in the app).
    #[arg(long)]
    pub no_vae_encoder: bool,
    /// The style library (besides the styles shipped in models/styles).
    #[arg(long, env = "ATELIER_STYLES", default_value = "data/styles")]
    pub library: PathBuf,
    /// Where named blends are kept (`DATA/blends/`).
    #[arg(long, env = "ATELIER_DATA", default_value = "data")]
    pub data_dir: PathBuf,
}

impl CoremlArgs {
    /// The export options these flags ask for (`native` is the model's image size).
    pub fn options(&self, native: usize) -> Result<ExportOptions> {
        let attention = Attention::parse(&self.attention).with_context(|| format!("--attention {}: use split-einsum or original", self.attention))?;
        let precision = match self.precision.as_str() {
            "fp16" => Precision::Fp16,
            "fp32" => Precision::Fp32,
            other => bail!("--precision {other}: use fp16 or fp32"),
        };
        let target = Target::parse(&self.target).with_context(|| format!("--target {}: use ios16, ios17 or ios18", self.target))?;
        let compression = match (self.palettize, self.quantize.as_deref()) {
            (Some(bits), None) => Some(Compression::Palettize { bits, group_size: self.palettize_group_size }),
            (None, Some("int8")) => Some(Compression::Int8),
            (None, Some(other)) => bail!("--quantize {other}: only int8 is supported"),
            (None, None) => None,
            (Some(_), Some(_)) => bail!("use --palettize or --quantize, not both"),
        };
        Ok(ExportOptions {
            attention,
            precision,
            compression,
            target,
            chunk_unet: self.chunk_unet,
            width: self.width.unwrap_or(native),
            height: self.height.unwrap_or(native),
            unet_batch: if self.unet_batch_one { 1 } else { 2 },
            vae_encoder: !self.no_vae_encoder,
        })
    }
}

/// A style before its adapters are loaded.
struct Planned {
    name: String,
    kind: &'static str,
    link: Option<String>,
    components: Vec<StyleComponent>,
    /// Adapter files with weights and block weights.
    adapters: Vec<(PathBuf, f64, BlockWeights)>,
}

pub fn run(args: CoremlArgs) -> Result<()> {
    let model_dir = atelier_engine::model::resolve(&args.model)?;
    let model_hash = atelier_server::blends::model_hash(&model_dir)?;
    let model_name = model_dir.file_name().map_or_else(|| args.model.clone(), |n| n.to_string_lossy().into_owned());
    let native = super::blend::model_size(&model_dir)? as usize;
    let opts = args.options(native)?;
    let library = super::blend::library(&args.library);

    let mut planned = Vec::new();
    if args.include_base {
        planned.push(Planned { name: "base".into(), kind: "base", link: None, components: vec![], adapters: vec![] });
    }
    for b in &args.blends {
        let r = super::blend::resolve(b, &args.data_dir, &library, &model_hash)?;
        r.tagged_prompt()?; // says which styles are missing
        if r.other_model {
            eprintln!("warning: blend {b} was made on model {} but this export uses {model_hash}", r.blend.model_hash);
        }
        let mut adapters = Vec::new();
        let mut components = Vec::new();
        for (s, e) in r.blend.styles.iter().zip(&r.styles) {
            let e = e.as_ref().context("a style of the blend is missing")?;
            components.push(StyleComponent { name: e.name.clone(), hash: s.hash.clone(), weight: s.weight });
            if s.weight != 0.0 {
                adapters.push((e.adapter(), s.weight, s.blocks));
            }
        }
        let link = atelier_blend::encode(&r.blend)?;
        let name = if link == *b { components.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join("-") } else { b.clone() };
        planned.push(Planned { name: function_name(&name), kind: "blend", link: Some(link), components, adapters });
    }
    for s in &args.styles {
        let (name, weight) = match s.rsplit_once(':') {
            Some((n, w)) => (n, w.parse::<f64>().with_context(|| format!("--style {s}: the weight must be a number"))?),
            None => (s.as_str(), 1.0),
        };
        let e = library.resolve(name).map_err(anyhow::Error::msg)?;
        let hash = e.short_hash().unwrap_or_default();
        planned.push(Planned { name: function_name(&e.name), kind: "lora", link: None, components: vec![StyleComponent { name: e.name.clone(), hash, weight }], adapters: vec![(e.adapter(), weight, BlockWeights::default())] });
    }
    if !args.loras.is_empty() {
        let mut adapters = Vec::new();
        let mut components = Vec::new();
        for spec in &args.loras {
            let (file, weight, blocks) = super::generate::parse_lora_spec(spec)?;
            let hash = atelier_engine::model::short_hash(&file).with_context(|| format!("--lora {spec}"))?;
            let name = file.file_stem().map_or_else(|| "lora".into(), |s| s.to_string_lossy().into_owned());
            components.push(StyleComponent { name, hash, weight });
            adapters.push((file, weight, blocks));
        }
        let name = args.lora_name.clone().unwrap_or_else(|| components[0].name.clone());
        planned.push(Planned { name: function_name(&name), kind: "lora", link: None, components, adapters });
    }

    // Refuse what cannot be exported before loading anything heavy.
    let unloaded: Vec<StyleExport> = planned.iter().map(|p| StyleExport { name: p.name.clone(), kind: p.kind.into(), link: p.link.clone(), components: p.components.clone(), active: vec![] }).collect();
    export::check(&model_dir, &unloaded, &opts)?;

    let needs_adapters = planned.iter().any(|p| !p.adapters.is_empty());
    let sd = if needs_adapters { Some(StableDiffusion::load(&model_dir, &candle_core::Device::Cpu)?) } else { None };
    let mut styles = Vec::new();
    for p in planned {
        let mut active = Vec::new();
        if let Some(sd) = &sd {
            for (file, weight, blocks) in &p.adapters {
                let adapter = Arc::new(LoraAdapter::load(file).with_context(|| format!("style {}", p.name))?);
                let lora = sd.bind_lora(&adapter).with_context(|| format!("style {}: {} does not fit {}", p.name, file.display(), model_dir.display()))?;
                active.push(ActiveLora { lora, weight: *weight, blocks: *blocks });
            }
        }
        styles.push(StyleExport { name: p.name, kind: p.kind.into(), link: p.link, components: p.components, active });
    }

    let bar = ProgressBar::new(0);
    bar.set_style(ProgressStyle::with_template("exporting {msg:12} [{bar:30}] {pos}/{len} {elapsed}").expect("a valid template").progress_chars("=> "));
    let manifest = export::export(&model_dir, &model_name, &model_hash, sd.as_ref().map(|s| s.lora_slots()), &styles, &opts, &args.out, &mut |p| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
        bar.set_message(p.stage.to_string());
        true
    })?;
    bar.finish_and_clear();
    print_report(&args.out, &manifest);
    Ok(())
}

/// A name usable as a Core ML function name: letters, digits, `-` and `_`.
fn function_name(name: &str) -> String {
    let s: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    if s.is_empty() {
        "style".into()
    } else {
        s
    }
}

/// The table printed after an export.
pub fn print_report(out: &std::path::Path, m: &ExportManifest) {
    println!("{}: Core ML packages of {} ({}×{}, {:?}, {}, target {})", out.display(), m.base_model.name, m.settings.width, m.settings.height, m.settings.precision, m.settings.attention.id(), m.settings.target.id());
    println!("styles: {}", m.styles.iter().map(|s| format!("{} ({})", s.name, s.kind)).collect::<Vec<_>>().join(", "));
    println!();
    println!("| package | size | functions | parameters | storage | weight error (rel.) | max abs |");
    println!("|---|---:|---|---:|---|---:|---:|");
    for (p, e) in m.packages.iter().zip(&m.compression_errors) {
        println!(
            "| {} | {:.2} MiB | {} | {} | {} | {:.2e} | {:.2e} |",
            p.path,
            p.bytes as f64 / 1048576.0,
            p.functions.join(", "),
            p.params,
            e.option,
            e.relative_error,
            e.max_abs_error
        );
    }
    let total: u64 = m.packages.iter().map(|p| p.bytes).sum();
    println!("| total | {:.2} MiB | | | | | |", total as f64 / 1048576.0);
    println!();
    println!("On a Mac: `xcrun coremlcompiler compile {}/Unet.mlpackage OUT/` (each package), or let the app compile them at first launch (`atelier export ios-app --models {}`).", out.display(), out.display());
}
