//! Where a queue keeps its records. [`Store`] is the seam: the embedded default
//! ([`JsonDir`]) writes one JSON file per task; a shared database can implement the same
//! three calls so that several studio processes (and remote workers) see one queue.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A store could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a task record ({source})")]
    Decode { path: PathBuf, source: serde_json::Error },
}

impl StoreError {
    /// True when the disk is full (ENOSPC): the user can fix it by freeing space.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::Io { source, .. } if source.raw_os_error() == Some(28))
    }
}

/// The records of one kind of task, keyed by task id.
pub trait Store<S>: Send + Sync + 'static {
    /// Every record, oldest first; unreadable ones are skipped with a warning.
    fn load(&self) -> Result<Vec<S>, StoreError>;
    /// Writes (or replaces) the record `id`, atomically: a reader sees the old or the new one.
    fn save(&self, id: &str, record: &S) -> Result<(), StoreError>;
    /// Forgets the record `id` (absent is not an error).
    fn remove(&self, id: &str) -> Result<(), StoreError>;
}

/// How a [`JsonDir`] names its files.
#[derive(Debug, Clone, Copy)]
pub enum Layout {
    /// `DIR/ID.json`.
    Flat,
    /// `DIR/ID/NAME`, beside the task's other files (images of an optimisation run).
    Folder(&'static str),
}

/// The embedded store: one pretty-printed JSON file per task under `dir`.
#[derive(Debug, Clone)]
pub struct JsonDir {
    dir: PathBuf,
    layout: Layout,
}

impl JsonDir {
    /// Creates `dir` if needed.
    pub fn open(dir: impl Into<PathBuf>, layout: Layout) -> Result<Self, StoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io { path: dir.clone(), source })?;
        Ok(Self { dir, layout })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: &str) -> PathBuf {
        match self.layout {
            Layout::Flat => self.dir.join(format!("{id}.json")),
            Layout::Folder(name) => self.dir.join(id).join(name),
        }
    }
}

/// Task ids become file names: only letters, digits, `-` and `_`.
fn safe_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl<S: Serialize + DeserializeOwned + Send + Sync + 'static> Store<S> for JsonDir {
    fn load(&self) -> Result<Vec<S>, StoreError> {
        let io = |source| StoreError::Io { path: self.dir.clone(), source };
        let mut found: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io)?.flatten() {
            let path = match self.layout {
                Layout::Flat => entry.path(),
                Layout::Folder(name) => entry.path().join(name),
            };
            let is_record = match self.layout {
                Layout::Flat => path.extension().is_some_and(|e| e == "json"),
                Layout::Folder(_) => path.is_file(),
            };
            if is_record {
                let modified = std::fs::metadata(&path).and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
                found.push((modified, path));
            }
        }
        found.sort();
        let mut records = Vec::with_capacity(found.len());
        for (_, path) in found {
            let decoded = std::fs::read(&path)
                .map_err(|source| StoreError::Io { path: path.clone(), source })
                .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|source| StoreError::Decode { path: path.clone(), source }));
            match decoded {
                Ok(record) => records.push(record),
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable task record"),
            }
        }
        Ok(records)
    }

    fn save(&self, id: &str, record: &S) -> Result<(), StoreError> {
        let path = self.path(id);
        if !safe_id(id) {
            let source = std::io::Error::new(std::io::ErrorKind::InvalidInput, "task ids are letters, digits, - and _");
            return Err(StoreError::Io { path, source });
        }
        let io = |source| StoreError::Io { path: path.clone(), source };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| io(std::io::Error::other(e)))?;
        atelier_engine::files::write_atomic(&path, &bytes).map_err(io)
    }

    fn remove(&self, id: &str) -> Result<(), StoreError> {
        if !safe_id(id) {
            return Ok(());
        }
        let path = self.path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }
}
