//! Training checkpoints: one folder per saved step (`step-00000500/`) holding named
//! safetensors files and a `state.json`. A folder is written under a temporary name
//! and renamed into place, so a run killed mid-save leaves the previous checkpoint
//! intact; resuming picks the newest complete folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::model::save_safetensors_atomic;
use crate::{Error, Result};

const STATE: &str = "state.json";

fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:08}"))
}

/// Saves `tensors` (file stem → tensors) and `state` as the checkpoint of `step`
/// under `root`, then deletes all but the newest `keep` checkpoints.
pub fn save<S: Serialize>(root: &Path, step: u64, tensors: &[(&str, &HashMap<String, Tensor>)], state: &S, keep: usize) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    let tmp = root.join(format!(".step-{step:08}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    for (stem, t) in tensors {
        save_safetensors_atomic(t, &tmp.join(format!("{stem}.safetensors")))?;
    }
    crate::files::write_json_atomic(&tmp.join(STATE), state).map_err(|e| Error::io(tmp.join(STATE), e))?;
    let dest = step_dir(root, step);
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(|e| Error::io(&dest, e))?;
    }
    std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))?;
    let all = list(root)?;
    for (_, dir) in all.iter().rev().skip(keep.max(1)) {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(dest)
}

/// Complete checkpoints under `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(root, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(root, e))?;
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(|n| n.strip_prefix("step-")).and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        if entry.path().join(STATE).is_file() {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint, if any.
pub fn latest(root: &Path) -> Result<Option<(u64, PathBuf)>> {
    Ok(list(root)?.pop())
}

/// Reads a checkpoint's `state.json`.
pub fn read_state<S: DeserializeOwned>(dir: &Path) -> Result<S> {
    let path = dir.join(STATE);
    let text = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_slice(&text).map_err(|e| Error::Config { path, message: e.to_string() })
}

/// Reads one of a checkpoint's tensor files.
pub fn read_tensors(dir: &Path, stem: &str, device: &Device) -> Result<HashMap<String, Tensor>> {
    crate::model::load_safetensors(&dir.join(format!("{stem}.safetensors")), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_and_ignores_partial_folders() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let root = dir.path().join("ckpt");
        let t: HashMap<String, Tensor> = [("w".to_string(), Tensor::new(&[1f32, 2.], &Device::Cpu)?)].into();
        for step in [10, 20, 30] {
            save(&root, step, &[("model", &t)], &serde_json::json!({"step": step}), 2)?;
        }
        // A save that died before its rename leaves only a temp folder behind.
        std::fs::create_dir_all(root.join(".step-00000040.tmp")).map_err(|e| Error::io("tmp", e))?;
        let steps: Vec<u64> = list(&root)?.into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![20, 30]);
        let (step, last) = latest(&root)?.expect("a checkpoint");
        assert_eq!(step, 30);
        let state: serde_json::Value = read_state(&last)?;
        assert_eq!(state["step"], 30);
        assert_eq!(read_tensors(&last, "model", &Device::Cpu)?["w"].to_vec1::<f32>()?, vec![1., 2.]);
        Ok(())
    }
}
