//! The mobile-vs-desktop benchmark. `atelier bench --case coreml-e2e --models EXPORT` runs
//! the workload of a Core ML export (its base model, size and default style, a fixed prompt,
//! seed and guidance, DPM++ 2M Karras) on this machine's engine and prints one JSON line per
//! timed image in the shape the generated iOS app's Benchmark screen writes
//! ([`BenchRecord`], schema "atelier-bench-v1"); `atelier bench compare FILE…` reads any
//! number of such files and prints a side-by-side markdown table.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use atelier_engine::pipeline::{GenerateParams, StableDiffusion};
use atelier_engine::scheduler::SchedulerKind;
use serde::{Deserialize, Serialize};

use super::export_ios::{workload, ExportManifest};

/// The `schema` value of every line.
pub const SCHEMA: &str = "atelier-bench-v1";

/// One timed image, as a JSON line. The generated app writes the same fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchRecord {
    /// Always "atelier-bench-v1".
    pub schema: String,
    /// "coreml-e2e".
    pub case: String,
    /// The CPU model on a desktop, the model identifier on a phone ("iPhone15,2") or the chip
    /// on a Mac ("Apple M2").
    pub device: String,
    pub os: String,
    /// "atelier-candle-cpu" here, "coreml" in the app.
    pub engine: String,
    /// "cpu" here; MLComputeUnits' name in the app (cpuOnly, cpuAndGPU, cpuAndNeuralEngine, all).
    pub compute_units: String,
    /// The export's base model name.
    pub model: String,
    /// The style baked into the timed image.
    pub style: String,
    /// Image size in pixels.
    pub width: u64,
    pub height: u64,
    /// Denoising steps.
    pub steps: u64,
    /// Median interval between consecutive step callbacks, in seconds (with one step: from
    /// the call to that step).
    pub seconds_per_step: f64,
    /// Wall time of the whole image (text encoding, steps, decoding), in seconds.
    pub seconds_per_image: f64,
    /// Peak memory of the process in bytes (Linux VmHWM; the app's peak physical footprint).
    pub peak_memory_bytes: u64,
    /// Sum of the export's package sizes from atelier_export.json, in bytes.
    pub package_bytes: u64,
    /// When the image was timed, UTC RFC 3339.
    pub date: String,
    pub atelier_version: String,
}

/// Median of the intervals between consecutive step times; with one step, the time from
/// `start` to it (the rule the app uses too).
pub fn seconds_per_step(start: f64, step_times: &[f64]) -> f64 {
    if step_times.len() < 2 {
        return step_times.first().map_or(0.0, |t| t - start);
    }
    let mut gaps: Vec<f64> = step_times.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort_by(f64::total_cmp);
    gaps[gaps.len() / 2]
}

fn cpu_name() -> String {
    let from_cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|text| {
        text.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string())
    });
    from_cpuinfo
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()))
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn os_name() -> String {
    let pretty = std::fs::read_to_string("/etc/os-release").ok().and_then(|text| {
        text.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=")).map(|v| v.trim_matches('"').to_string())
    });
    pretty.unwrap_or_else(|| std::env::consts::OS.to_string())
}

/// Whether two short hashes name the same file (one may be a prefix of the other).
fn same_hash(a: &str, b: &str) -> bool {
    !a.is_empty() && !b.is_empty() && (a.starts_with(b) || b.starts_with(a))
}

/// The base model folder: the export's `base_model.name` resolved as `generate --model`
/// resolves it (a folder or a cached hub id), then `models/NAME`, then `fallback`
/// (`--model`); the first whose UNet hash matches `base_model.hash` wins. When none
/// matches, `fallback` is used with a warning (timings need the same architecture, not
/// the same weights).
fn resolve_base(manifest: &ExportManifest, fallback: &Path) -> Result<PathBuf> {
    let name = &manifest.base_model.name;
    let want = manifest.base_model.hash.as_deref().unwrap_or("");
    let mut candidates = Vec::new();
    if let Ok(p) = atelier_engine::model::resolve(name) {
        candidates.push(p);
    }
    candidates.push(Path::new("models").join(name));
    candidates.push(fallback.to_path_buf());
    let mut seen = Vec::new();
    for dir in candidates {
        if !dir.is_dir() || seen.contains(&dir) {
            continue;
        }
        if let Ok(hash) = atelier_server::blends::model_hash(&dir) {
            if want.is_empty() || same_hash(&hash, want) {
                return Ok(dir);
            }
            seen.push(dir.clone());
            eprintln!("note: {} has UNet hash {hash}, not the export's {want}", dir.display());
        }
    }
    if fallback.is_dir() {
        eprintln!(
            "warning: no model with the export's base model hash {want} was found (looked for {name:?}); timing {} instead",
            fallback.display()
        );
        return Ok(fallback.to_path_buf());
    }
    bail!("the export's base model {name:?} (hash {want}) was not found; pass its folder with --model")
}

/// What `atelier bench --case coreml-e2e` needs from `atelier bench`'s arguments.
pub struct E2eOptions<'a> {
    /// The export folder (atelier_export.json).
    pub models: &'a Path,
    /// `--model`: used when the export's base model cannot be found by name and hash.
    pub model: &'a Path,
    /// The style library `<lora:NAME>` tags resolve in (plus the shipped styles).
    pub library: &'a Path,
    /// Denoising steps (default 20).
    pub steps: Option<usize>,
    /// Timed images after one untimed warm-up.
    pub runs: usize,
    pub attention: atelier_engine::attention::AttentionKind,
}

/// Times the export's workload on the CPU engine; calls `emit` with each timed image's
/// line as soon as it is measured.
///
/// # Errors
/// A missing or foreign manifest, a base model or style that cannot be found, or a
/// generation error.
pub fn run_e2e(opts: &E2eOptions, emit: &mut dyn FnMut(&BenchRecord)) -> Result<Vec<BenchRecord>> {
    let manifest = ExportManifest::read(opts.models)?;
    let model_dir = resolve_base(&manifest, opts.model)?;
    let _ = std::fs::write("/proc/self/clear_refs", "5"); // reset VmHWM
    let sd = StableDiffusion::load(&model_dir, &crate::cli::device()?).with_context(|| format!("loading {}", model_dir.display()))?;
    let style = manifest.default_style();
    let library = atelier_server::styles::StyleLibrary::new(opts.library.to_path_buf())
        .with_shipped(PathBuf::from(super::train_style::SHIPPED_STYLES));
    let mut loras = Vec::new();
    // The style as `<lora:NAME:WEIGHT>` tags would apply it: each component from the library
    // at its export weight.
    for c in style.map(|s| s.components.as_slice()).unwrap_or_default() {
        let entry = library.resolve(&c.name).map_err(anyhow::Error::msg).with_context(|| format!("the export's style component {}", c.name))?;
        if let (Some(want), Some(have)) = (c.hash.as_deref(), entry.short_hash()) {
            if !same_hash(want, &have) {
                eprintln!("warning: style {} in the library has hash {have}, the export used {want}", c.name);
            }
        }
        let adapter = std::sync::Arc::new(atelier_engine::lora::LoraAdapter::load(&entry.adapter())?);
        let lora = sd.bind_lora(&adapter).with_context(|| format!("applying style {} to {}", c.name, model_dir.display()))?;
        loras.push(atelier_engine::lora::ActiveLora { lora, weight: c.weight.unwrap_or(1.0), blocks: Default::default() });
    }
    let steps = opts.steps.unwrap_or(workload::STEPS);
    let params = GenerateParams {
        prompt: workload::PROMPT.into(),
        negative_prompt: String::new(),
        steps,
        guidance: workload::GUIDANCE,
        seed: workload::SEED.into(),
        scheduler: SchedulerKind::DpmPp2mKarras,
        attention: opts.attention,
        width: manifest.settings.width,
        height: manifest.settings.height,
        loras,
        ..Default::default()
    };
    params.validate()?;
    sd.generate(&params, &mut |_| true)?; // warm-up, as the app's first run
    let mut out = Vec::new();
    for _ in 0..opts.runs.max(1) {
        let origin = Instant::now();
        let mut step_times = Vec::with_capacity(steps);
        sd.generate(&params, &mut |_| {
            step_times.push(origin.elapsed().as_secs_f64());
            true
        })?;
        let seconds_per_image = origin.elapsed().as_secs_f64();
        let record = BenchRecord {
            schema: SCHEMA.into(),
            case: "coreml-e2e".into(),
            device: cpu_name(),
            os: os_name(),
            engine: "atelier-candle-cpu".into(),
            compute_units: "cpu".into(),
            model: manifest.base_model.name.clone(),
            style: style.map(|s| s.name.clone()).unwrap_or_default(),
            width: manifest.settings.width as u64,
            height: manifest.settings.height as u64,
            steps: steps as u64,
            seconds_per_step: seconds_per_step(0.0, &step_times),
            seconds_per_image,
            peak_memory_bytes: atelier_engine::memory::peak_rss().unwrap_or(0),
            package_bytes: manifest.package_bytes(),
            date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            atelier_version: env!("CARGO_PKG_VERSION").into(),
        };
        emit(&record);
        out.push(record);
    }
    Ok(out)
}

/// Reads a file of benchmark lines (blank lines skipped).
///
/// # Errors
/// An unreadable file, a file with no lines, or a line that is not a JSON object of the
/// "atelier-bench-v1" shape, named as `FILE:LINE`.
pub fn read_records(path: &Path) -> Result<Vec<BenchRecord>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let value: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{at}: not a JSON line"))?;
        let schema = value.get("schema").and_then(|s| s.as_str()).unwrap_or("");
        if schema != SCHEMA {
            bail!("{at}: \"schema\" is {schema:?}, expected {SCHEMA:?} (lines from `atelier bench --case coreml-e2e` or the app's Benchmark screen)");
        }
        let record: BenchRecord = serde_json::from_value(value).map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
        for (name, v) in [("seconds_per_step", record.seconds_per_step), ("seconds_per_image", record.seconds_per_image)] {
            if !v.is_finite() || v < 0.0 {
                bail!("{at}: {name} is {v}, expected a non-negative number of seconds");
            }
        }
        out.push(record);
    }
    if out.is_empty() {
        bail!("{} has no benchmark lines", path.display());
    }
    Ok(out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Bytes as MiB or GiB with one or two decimals.
pub fn human_bytes(bytes: u64) -> String {
    let mib = bytes as f64 / 1048576.0;
    if mib >= 1024.0 {
        format!("{:.2} GiB", mib / 1024.0)
    } else {
        format!("{mib:.1} MiB")
    }
}

/// One column: the lines of one file from one device, engine, compute units and workload.
struct Column<'a> {
    file: String,
    rows: Vec<&'a BenchRecord>,
}

/// The side-by-side markdown table of `files` (label, lines): one column per file and
/// device/engine/compute units/workload, rows for the workload, the median seconds per step
/// and per image, the highest peak memory and the package size.
pub fn compare_table(files: &[(String, Vec<BenchRecord>)]) -> String {
    let mut columns: Vec<Column> = Vec::new();
    for (label, records) in files {
        let start = columns.len();
        for r in records {
            let key = |c: &BenchRecord| (c.device.clone(), c.engine.clone(), c.compute_units.clone(), c.model.clone(), c.style.clone(), c.width, c.height, c.steps);
            match columns[start..].iter_mut().find(|c| key(c.rows[0]) == key(r)) {
                Some(col) => col.rows.push(r),
                None => columns.push(Column { file: label.clone(), rows: vec![r] }),
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = columns.iter().map(|c| format!("{} ({}, {})", c.rows[0].device, c.rows[0].engine, c.rows[0].compute_units)).collect();
    out.push_str(&format!("| | {} |\n", header.join(" | ")));
    out.push_str(&format!("|---|{}\n", "---|".repeat(columns.len())));
    let row = |out: &mut String, name: &str, f: &dyn Fn(&Column) -> String| {
        let cells: Vec<String> = columns.iter().map(f).collect();
        out.push_str(&format!("| {name} | {} |\n", cells.join(" | ")));
    };
    row(&mut out, "file", &|c| c.file.clone());
    row(&mut out, "OS", &|c| c.rows[0].os.clone());
    row(&mut out, "model", &|c| c.rows[0].model.clone());
    row(&mut out, "style", &|c| c.rows[0].style.clone());
    row(&mut out, "size", &|c| format!("{}×{}", c.rows[0].width, c.rows[0].height));
    row(&mut out, "steps", &|c| c.rows[0].steps.to_string());
    row(&mut out, "timed images", &|c| c.rows.len().to_string());
    row(&mut out, "s/step (median)", &|c| format!("{:.4}", median(c.rows.iter().map(|r| r.seconds_per_step).collect())));
    row(&mut out, "s/image (median)", &|c| format!("{:.3}", median(c.rows.iter().map(|r| r.seconds_per_image).collect())));
    row(&mut out, "peak memory", &|c| human_bytes(c.rows.iter().map(|r| r.peak_memory_bytes).max().unwrap_or(0)));
    row(&mut out, "package size", &|c| human_bytes(c.rows.iter().map(|r| r.package_bytes).max().unwrap_or(0)));
    let workloads: std::collections::BTreeSet<(String, u64, u64, u64)> =
        columns.iter().map(|c| (c.rows[0].model.clone(), c.rows[0].width, c.rows[0].height, c.rows[0].steps)).collect();
    if workloads.len() > 1 {
        out.push_str("\nNote: the columns ran different workloads (model, size or steps differ); compare seconds per step with care.\n");
    }
    out
}

/// `atelier bench compare FILE…`: prints the table.
pub fn compare(files: &[PathBuf]) -> Result<()> {
    let mut read = Vec::new();
    for f in files {
        let label = f.file_name().map_or_else(|| f.display().to_string(), |n| n.to_string_lossy().into_owned());
        read.push((label, read_records(f)?));
    }
    print!("{}", compare_table(&read));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_time_is_the_median_gap() {
        assert_eq!(seconds_per_step(0.0, &[1.0, 1.5, 2.5, 3.0]), 0.5);
        assert_eq!(seconds_per_step(0.5, &[2.0]), 1.5);
        assert_eq!(seconds_per_step(0.0, &[]), 0.0);
    }

    #[test]
    fn bytes_read_as_people_do() {
        assert_eq!(human_bytes(48 * 1048576), "48.0 MiB");
        assert_eq!(human_bytes(3 * 1073741824 / 2), "1.50 GiB");
    }
}
