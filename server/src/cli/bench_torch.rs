//! `atelier bench --against-torch`: the PyTorch + diffusers side of the engine-speed
//! comparison, run back to back with Atelier's own cases in one invocation.
//!
//! The Python program is `tests/torch/bench_torch.py`, compiled into the binary and written
//! to a temporary file, so the comparison works from any folder. It runs in the Python named
//! by `ATELIER_TORCH_PYTHON`, else in a venv in the user cache folder
//! (`~/.cache/atelier/torch-venv` on Linux), which is made and filled with torch and
//! diffusers from PyPI on first use.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The cases both engines run.
pub const CASES: &[&str] = &["sd15-unet", "sdxl-unet", "sd15-vae"];

const SCRIPT: &str = include_str!("../../../tests/torch/bench_torch.py");

/// One of Atelier's results, to set beside PyTorch's.
pub struct Ours {
    pub case: String,
    pub attention: &'static str,
    pub seconds: f64,
    pub peak_bytes: u64,
    /// Peak minus the resident memory before the first step (weights, inputs).
    pub step_bytes: u64,
}

/// PyTorch's result for one case, as the script prints it.
#[derive(Debug, serde::Deserialize)]
struct Theirs {
    case: String,
    #[serde(alias = "seconds_per_step", alias = "seconds_per_decode")]
    seconds: f64,
    peak_bytes: u64,
    /// Resident memory after building the model and inputs (0 where the script cannot tell).
    #[serde(default)]
    resident_bytes: u64,
    threads: usize,
    torch: String,
    diffusers: String,
}

fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS").ok().and_then(|n| n.parse().ok()).unwrap_or(1)
}

/// The Python that has torch and diffusers, installing them into the cache venv when needed.
fn python() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ATELIER_TORCH_PYTHON") {
        return Ok(PathBuf::from(p));
    }
    let venv = dirs::cache_dir().context("no user cache folder; set ATELIER_TORCH_PYTHON to a Python with torch and diffusers")?.join("atelier/torch-venv");
    let python = venv.join("bin/python");
    let ready = venv.join(".atelier-ready");
    if !ready.exists() {
        eprintln!("Installing torch and diffusers from PyPI into {} (once; a few GB)…", venv.display());
        let status = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().context("running python3 -m venv")?;
        if !status.success() {
            bail!("python3 -m venv {} failed; install Python's venv module (Debian: apt-get install python3-venv)", venv.display());
        }
        let status = Command::new(&python)
            .args(["-m", "pip", "install", "--disable-pip-version-check", "torch", "diffusers"])
            .status()
            .context("running pip")?;
        if !status.success() {
            bail!("pip could not install torch and diffusers into {}; see its output above", venv.display());
        }
        std::fs::write(&ready, "torch diffusers\n")?;
    }
    Ok(python)
}

/// Runs `cases` on PyTorch with as many threads as Atelier used and prints the comparison:
/// a markdown table (or JSON lines) with both timings, the ratio Atelier ÷ PyTorch (below 1
/// means Atelier is faster) and both peaks.
///
/// # Errors
/// No Python with torch and diffusers could be had, or the script failed.
pub fn compare(cases: &[&str], steps: usize, ours: &[Ours], json: bool) -> Result<()> {
    let python = python()?;
    let script = tempfile::Builder::new().prefix("atelier-bench-torch").suffix(".py").tempfile()?;
    std::fs::write(script.path(), SCRIPT)?;
    let mut theirs = Vec::new();
    for case in cases {
        let out = Command::new(&python)
            .arg(script.path())
            .args(["--case", case, "--steps", &steps.to_string(), "--threads", &threads().to_string()])
            .output()
            .with_context(|| format!("running {}", python.display()))?;
        if !out.status.success() {
            bail!("PyTorch's {case} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        let line = String::from_utf8_lossy(&out.stdout);
        let line = line.lines().last().unwrap_or_default();
        let t: Theirs = serde_json::from_str(line).with_context(|| format!("reading PyTorch's result {line:?}"))?;
        theirs.push(t);
    }
    print_comparison(ours, &theirs, json);
    Ok(())
}

fn print_comparison(ours: &[Ours], theirs: &[Theirs], json: bool) {
    let mib = |b: u64| b as f64 / 1048576.0;
    if !json {
        if let Some(t) = theirs.first() {
            println!("\nPyTorch {} + diffusers {}, {} threads:", t.torch, t.diffusers, t.threads);
        }
        println!("| case | Atelier attention | Atelier s | PyTorch s | ratio | Atelier peak | PyTorch peak | peak ratio | Atelier step memory | PyTorch step memory | step memory ratio |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
    }
    for t in theirs {
        for o in ours.iter().filter(|o| o.case == t.case) {
            let ratio = o.seconds / t.seconds;
            let peak_ratio = o.peak_bytes as f64 / t.peak_bytes.max(1) as f64;
            let their_step = t.peak_bytes.saturating_sub(t.resident_bytes);
            let step_ratio = o.step_bytes as f64 / their_step.max(1) as f64;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"case": t.case, "attention": o.attention, "atelier_seconds": o.seconds, "pytorch_seconds": t.seconds,
                        "ratio": ratio, "atelier_peak_bytes": o.peak_bytes, "pytorch_peak_bytes": t.peak_bytes,
                        "atelier_step_bytes": o.step_bytes, "pytorch_step_bytes": their_step, "torch": t.torch, "threads": t.threads})
                );
            } else {
                println!(
                    "| {} | {} | {:.3} | {:.3} | {:.2}× | {:.0} MiB | {:.0} MiB | {:.2}× | {:.0} MiB | {:.0} MiB | {:.2}× |",
                    t.case, o.attention, o.seconds, t.seconds, ratio, mib(o.peak_bytes), mib(t.peak_bytes), peak_ratio,
                    mib(o.step_bytes), mib(their_step), step_ratio
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_scripts_json_line() {
        let t: Theirs = serde_json::from_str(
            r#"{"case": "sd15-vae", "engine": "pytorch", "seconds_per_decode": 2.5, "peak_bytes": 1048576, "threads": 2, "torch": "2.9.0", "diffusers": "0.35.2"}"#,
        )
        .unwrap();
        assert_eq!((t.case.as_str(), t.seconds, t.peak_bytes, t.threads), ("sd15-vae", 2.5, 1048576, 2));
        assert!(SCRIPT.contains("def main()") && SCRIPT.contains("sd15-vae"), "the script is compiled in");
        for case in CASES {
            assert!(SCRIPT.contains(case), "the script knows {case}");
        }
    }
}
