//! Shared by the Core ML export tests: runs `tests/coreml/milcheck.py` (coremltools' MIL
//! loader for structure and types, the project's numpy evaluator for numbers) with the
//! Python that `ATELIER_COREMLTOOLS_PYTHON` names (`cargo run -p xtask -- test` makes a venv
//! with coremltools from PyPI). Without it the checks are skipped with a message, unless
//! `ATELIER_REQUIRE_SERVICES=1` (CI), where that is a failure.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};

/// The repository root (shared by the engine's and the server's tests).
fn root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.ancestors().find(|d| d.join("tests/coreml/milcheck.py").is_file()).expect("tests/coreml/milcheck.py above the crate").to_path_buf()
}

/// The Python with coremltools, or `None` (skip) when not configured.
pub fn python() -> Option<PathBuf> {
    match std::env::var_os("ATELIER_COREMLTOOLS_PYTHON") {
        Some(p) => Some(PathBuf::from(p)),
        None if std::env::var("ATELIER_REQUIRE_SERVICES").as_deref() == Ok("1") => {
            panic!("ATELIER_COREMLTOOLS_PYTHON is not set; `cargo run -p xtask -- test` installs coremltools")
        }
        None => {
            eprintln!("skipping the coremltools checks: ATELIER_COREMLTOOLS_PYTHON is not set");
            None
        }
    }
}

fn milcheck(python: &Path, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(python).arg(root().join("tests/coreml/milcheck.py")).args(args).output().expect("running milcheck.py");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "milcheck.py {args:?} failed:\n{text}");
    text
}

/// Loads every package through coremltools' MIL loader (type and shape inference of every
/// op against the declared types); panics with the loader's message on failure.
pub fn validate(python: &Path, packages: &[&Path]) -> String {
    let mut args: Vec<&std::ffi::OsStr> = vec!["validate".as_ref()];
    args.extend(packages.iter().map(|p| p.as_os_str()));
    milcheck(python, &args)
}

/// Runs `package` (its `function`, or the default) on `inputs` with the numpy evaluator;
/// returns every output by name (f32, on the CPU).
pub fn run(python: &Path, package: &Path, inputs: &[(&str, &Tensor)], function: Option<&str>) -> HashMap<String, Tensor> {
    let dir = tempfile::tempdir().unwrap();
    let (inp, out) = (dir.path().join("in.safetensors"), dir.path().join("out.safetensors"));
    let map: HashMap<String, Tensor> = inputs.iter().map(|(k, v)| (k.to_string(), v.to_dtype(candle_core::DType::F32).unwrap())).collect();
    candle_core::safetensors::save(&map, &inp).unwrap();
    let mut args: Vec<&std::ffi::OsStr> = vec!["run".as_ref(), package.as_os_str(), "--inputs".as_ref(), inp.as_os_str(), "--out".as_ref(), out.as_os_str()];
    if let Some(f) = function {
        args.extend([std::ffi::OsStr::new("--function"), std::ffi::OsStr::new(f)]);
    }
    milcheck(python, &args);
    candle_core::safetensors::load(&out, &Device::Cpu).unwrap()
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}
