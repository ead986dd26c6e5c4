//! `.dvc` files: YAML with one `outs` entry per tracked path, as DVC 3 writes them:
//!
//! ```yaml
//! outs:
//! - md5: 3863d0e317dee0a55c4e59d2ec0eef33.dir
//!   size: 143
//!   nfiles: 2
//!   hash: md5
//!   path: images
//! ```
//!
//! `md5` ends in `.dir` for a folder; `hash: md5` marks DVC 3 hashing (plain MD5). `path`
//! is relative to the `.dvc` file's folder. Keys Atelier does not know are kept.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::DatasetError;

/// A `.dvc` file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DvcFile {
    pub outs: Vec<Out>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_yaml::Value>,
}

/// One tracked output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Out {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub md5: Option<String>,
    /// Bytes of all its files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Files in the folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nfiles: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    pub path: String,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_yaml::Value>,
}

impl DvcFile {
    /// A `.dvc` file for the folder `path` at version `md5` (`<md5>.dir`).
    pub fn for_folder(path: &str, md5: &str, size: u64, nfiles: u64) -> Self {
        Self {
            outs: vec![Out { md5: Some(md5.to_string()), size: Some(size), nfiles: Some(nfiles), hash: Some("md5".into()), path: path.to_string(), extra: BTreeMap::new() }],
            extra: BTreeMap::new(),
        }
    }

    /// Reads and parses `path`.
    ///
    /// # Errors
    /// Unreadable, not YAML of this shape, or without outs.
    pub fn read(path: &Path) -> Result<Self, DatasetError> {
        let text = std::fs::read_to_string(path).map_err(|source| DatasetError::Io { path: path.to_path_buf(), source })?;
        let file: Self = serde_yaml::from_str(&text).map_err(|e| DatasetError::Invalid(format!("{} is not a .dvc file: {e}", path.display())))?;
        if file.outs.is_empty() {
            return Err(DatasetError::Invalid(format!("{} has no outs", path.display())));
        }
        Ok(file)
    }

    /// Writes `path` atomically.
    ///
    /// # Errors
    /// The write fails.
    pub fn write(&self, path: &Path) -> Result<(), DatasetError> {
        let text = serde_yaml::to_string(self).map_err(|e| DatasetError::Invalid(e.to_string()))?;
        atelier_engine::files::write_atomic(path, text.as_bytes()).map_err(|source| DatasetError::Io { path: path.to_path_buf(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_layout_dvc_writes_and_keeps_unknown_keys() {
        let f = DvcFile::for_folder("images", "3863d0e317dee0a55c4e59d2ec0eef33.dir", 143, 2);
        let text = serde_yaml::to_string(&f).unwrap();
        assert_eq!(text, "outs:\n- md5: 3863d0e317dee0a55c4e59d2ec0eef33.dir\n  size: 143\n  nfiles: 2\n  hash: md5\n  path: images\n");
        let back: DvcFile = serde_yaml::from_str("outs:\n- md5: a.dir\n  size: 1\n  nfiles: 1\n  hash: md5\n  path: x\n  desc: mine\nmeta:\n  k: v\n").unwrap();
        let again = serde_yaml::to_string(&back).unwrap();
        assert!(again.contains("  desc: mine\n") && again.contains("meta:\n  k: v\n"), "{again}");
    }
}
