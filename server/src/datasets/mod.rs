//! Style datasets versioned in DVC 3's own layout, so `dvc` works on the studio's data
//! folder unchanged (and Atelier on folders `dvc add` tracked).
//!
//! - [`manifest`]: file hashes and the `.dir` manifest, byte for byte as DVC writes it;
//! - [`dvcfile`]: `.dvc` files;
//! - [`project`]: the DVC project (`.dvc/config`, `.dvcignore`, the cache);
//! - [`remote`]: pushing and pulling cache objects to a folder or S3 remote;
//! - [`http`]: `/api/datasets`.
//!
//! The studio's data folder `DATA` is the project. An uploaded dataset `ID` is the folder
//! `DATA/trainings/datasets/ID` with `ID.dvc` beside it; any other `.dvc` file in the
//! project is a dataset too, named by its path without `.dvc`. Beside each `.dvc` file
//! Atelier keeps a version log `NAME.versions.json` ([`VersionLog`]): every version's
//! number, folder hash, size, file count, time and a one-line summary of what changed.
//! A version is committed when the folder's content changed; identical content gives the
//! identical hash and no new version.

pub mod dvcfile;
pub mod http;
pub mod manifest;
pub mod project;
pub mod remote;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

pub use dvcfile::DvcFile;
pub use manifest::Entry;
pub use project::{Project, Remote};

/// Where uploaded datasets live inside the project.
pub const STUDIO_DATASETS: &str = "trainings/datasets";

/// Commits and checkouts of one process run one at a time.
static LOCK: Mutex<()> = Mutex::new(());

/// What went wrong with a dataset operation; every message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{} is not a DVC project: run `atelier datasets init --project {}` (or `dvc init --no-scm` there)", .0.display(), .0.display())]
    NoProject(PathBuf),
    #[error("no dataset {id:?}; the project has: {known}")]
    NotFound { id: String, known: String },
    #[error("dataset {id} has no version {version}; it has {have}")]
    NoVersion { id: String, version: u32, have: String },
    #[error("dataset {id} is damaged: {reason}; nothing was changed (restore the cache with `atelier datasets pull` or `dvc pull`)")]
    Damaged { id: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Config(String),
    #[error("remote {name} ({url}): {message}; local data untouched")]
    Remote { name: String, url: String, message: String },
}

impl From<DatasetError> for crate::ApiError {
    fn from(e: DatasetError) -> Self {
        match e {
            DatasetError::NotFound { id, .. } => crate::ApiError::NotFound { what: "dataset", id },
            DatasetError::NoVersion { .. } | DatasetError::Damaged { .. } | DatasetError::Invalid(_) => {
                crate::ApiError::Invalid { field: "dataset".into(), message: e.to_string() }
            }
            DatasetError::Remote { .. } | DatasetError::Config(_) | DatasetError::NoProject(_) => crate::ApiError::Unavailable(e.to_string()),
            DatasetError::Io { .. } => crate::ApiError::Internal(e.to_string()),
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io { path: path.to_path_buf(), source }
}

/// One version of a dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Version {
    /// 1, 2, … in the order they were committed.
    pub number: u32,
    /// The folder hash, `<md5 of the manifest>.dir`.
    pub md5: String,
    /// Bytes of all files.
    pub size: u64,
    pub nfiles: u64,
    /// When it was committed (RFC 3339, UTC).
    pub time: String,
    /// What changed since the version before, in one line.
    pub summary: String,
}

/// The version log kept beside a `.dvc` file (`NAME.versions.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VersionLog {
    pub versions: Vec<Version>,
}

/// A dataset of the project: its `.dvc` file and the folder it tracks.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Uploaded datasets: their uuid; others: the `.dvc` path relative to the project, without `.dvc`.
    pub id: String,
    pub dvc_path: PathBuf,
    pub folder: PathBuf,
}

impl Dataset {
    fn log_path(&self) -> PathBuf {
        let name = self.dvc_path.file_name().map(|n| n.to_string_lossy().trim_end_matches(".dvc").to_string()).unwrap_or_default();
        self.dvc_path.with_file_name(format!("{name}.versions.json"))
    }

    /// The version log (empty when there is none).
    pub fn log(&self) -> VersionLog {
        std::fs::read(self.log_path()).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    fn write_log(&self, log: &VersionLog) -> Result<(), DatasetError> {
        let path = self.log_path();
        atelier_engine::files::write_json_atomic(&path, log).map_err(io(&path))
    }

    /// The `.dvc` file's first out, if the file exists.
    fn out(&self) -> Result<Option<dvcfile::Out>, DatasetError> {
        if !self.dvc_path.is_file() {
            return Ok(None);
        }
        Ok(DvcFile::read(&self.dvc_path)?.outs.into_iter().next())
    }
}

/// One dataset as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetInfo {
    pub id: String,
    /// The `.dvc` file, relative to the project.
    pub dvc_file: String,
    /// The hash the `.dvc` file records.
    pub md5: Option<String>,
    pub size: Option<u64>,
    pub nfiles: Option<u64>,
    /// The version the `.dvc` file points at (its number in the log).
    pub version: Option<u32>,
    pub versions: usize,
    /// Why the `.dvc` file does not match the cache; `None` when it does.
    pub damaged: Option<String>,
}

/// What differs between two versions. Captions are the `.txt` files; a caption is paired
/// with the image of the same path and stem (`x.png` with `x.txt`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VersionDiff {
    pub from: Option<u32>,
    pub to: Option<u32>,
    pub from_md5: Option<String>,
    pub to_md5: String,
    pub images_added: Vec<String>,
    pub images_removed: Vec<String>,
    pub images_changed: Vec<String>,
    pub captions_changed: Vec<CaptionChange>,
}

/// A caption added, removed or edited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptionChange {
    /// The caption file.
    pub caption: String,
    /// Its image, when the version has one of the same stem.
    pub image: Option<String>,
    /// The text before (`None`: there was no caption).
    pub before: Option<String>,
    /// The text after (`None`: the caption was removed).
    pub after: Option<String>,
}

fn is_caption(relpath: &str) -> bool {
    relpath.to_ascii_lowercase().ends_with(".txt")
}

fn stem(relpath: &str) -> String {
    let (dir, name) = relpath.rsplit_once('/').map_or(("", relpath), |(d, n)| (d, n));
    let stem = match name.rfind('.') {
        Some(i) if i > 0 => &name[..i],
        _ => name,
    };
    format!("{dir}/{}", stem.to_lowercase())
}

/// The difference between two manifests; `text` reads a caption's text by its MD5.
pub fn diff_entries(from: &[Entry], to: &[Entry], text: &dyn Fn(&str) -> Option<String>) -> VersionDiff {
    let a: BTreeMap<&str, &str> = from.iter().map(|e| (e.relpath.as_str(), e.md5.as_str())).collect();
    let b: BTreeMap<&str, &str> = to.iter().map(|e| (e.relpath.as_str(), e.md5.as_str())).collect();
    let mut d = VersionDiff::default();
    let paths: BTreeSet<&str> = a.keys().chain(b.keys()).copied().collect();
    let image_of = |caption: &str, m: &BTreeMap<&str, &str>| m.keys().find(|p| !is_caption(p) && stem(p) == stem(caption)).map(|p| p.to_string());
    for p in paths {
        let (x, y) = (a.get(p), b.get(p));
        if x == y {
            continue;
        }
        if is_caption(p) {
            d.captions_changed.push(CaptionChange {
                caption: p.to_string(),
                image: image_of(p, &b).or_else(|| image_of(p, &a)),
                before: x.and_then(|m| text(m)),
                after: y.and_then(|m| text(m)),
            });
        } else {
            match (x, y) {
                (None, Some(_)) => d.images_added.push(p.to_string()),
                (Some(_), None) => d.images_removed.push(p.to_string()),
                _ => d.images_changed.push(p.to_string()),
            }
        }
    }
    d
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

impl VersionDiff {
    /// One line: `2 images added, 1 caption changed`, or `no changes`.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = [
            (self.images_added.len(), "added"),
            (self.images_removed.len(), "removed"),
            (self.images_changed.len(), "changed"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{} {what}", plural(*n, "image", "images")))
        .chain((!self.captions_changed.is_empty()).then(|| format!("{} changed", plural(self.captions_changed.len(), "caption", "captions"))))
        .collect();
        if parts.is_empty() { "no changes".into() } else { parts.join(", ") }
    }
}

/// A folder's files as manifest entries (recursive; `.dvc`-internal and `.git` folders
/// are left out), with their total size. `progress` gets bytes hashed.
///
/// # Errors
/// A file cannot be read; a name is not UTF-8.
pub fn hash_folder(folder: &Path, progress: &mut dyn FnMut(u64)) -> Result<(Vec<Entry>, u64), DatasetError> {
    let mut entries = Vec::new();
    let mut size = 0;
    if !folder.is_dir() {
        return Ok((entries, 0));
    }
    let walk = walkdir::WalkDir::new(folder).follow_links(true).sort_by_file_name().into_iter().filter_entry(|e| e.depth() == 0 || !(e.file_type().is_dir() && matches!(e.file_name().to_str(), Some(".dvc" | ".git"))));
    for item in walk {
        let item = item.map_err(|e| DatasetError::Invalid(format!("{}: {e}", folder.display())))?;
        if !item.file_type().is_file() {
            continue;
        }
        let rel = item.path().strip_prefix(folder).unwrap_or(item.path());
        let relpath = rel.to_str().ok_or_else(|| DatasetError::Invalid(format!("{} is not a UTF-8 name", rel.display())))?.replace(std::path::MAIN_SEPARATOR, "/");
        let md5 = manifest::md5_file(item.path(), progress).map_err(io(item.path()))?;
        size += item.metadata().map(|m| m.len()).unwrap_or(0);
        entries.push(Entry { md5, relpath });
    }
    entries.sort_by(|a, b| a.relpath.cmp(&b.relpath));
    Ok((entries, size))
}

/// Bytes in a folder (for progress bars).
pub fn folder_bytes(folder: &Path) -> u64 {
    walkdir::WalkDir::new(folder).into_iter().flatten().filter(|e| e.file_type().is_file()).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()
}

/// What a commit did.
#[derive(Debug, Clone, Serialize)]
pub struct Commit {
    pub version: Version,
    /// Whether it made a new version (false: the content was already the current version).
    pub new: bool,
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root).unwrap_or(path).to_string_lossy().replace(std::path::MAIN_SEPARATOR, "/")
}

impl Project {
    /// The project of the studio data folder `data` (made if missing).
    ///
    /// # Errors
    /// It cannot be made.
    pub fn studio(data: &Path) -> Result<Self, DatasetError> {
        if data.join(".dvc").is_dir() { Project::open(data) } else { Project::init(data) }
    }

    /// Every `.dvc` file in the project (not under `.dvc/` or hidden folders), as datasets.
    pub fn all(&self) -> Vec<Dataset> {
        let root = self.root().to_path_buf();
        let walk = walkdir::WalkDir::new(&root).sort_by_file_name().into_iter().filter_entry(|e| e.depth() == 0 || !(e.file_type().is_dir() && e.file_name().to_string_lossy().starts_with('.')));
        walk.flatten()
            .filter(|e| e.file_type().is_file() && e.file_name().to_string_lossy().ends_with(".dvc"))
            .filter_map(|e| self.dataset_at(e.path()).ok())
            .collect()
    }

    fn dataset_at(&self, dvc_path: &Path) -> Result<Dataset, DatasetError> {
        let file = DvcFile::read(dvc_path)?;
        let out = &file.outs[0];
        if !manifest::safe_relpath(&out.path) {
            return Err(DatasetError::Invalid(format!("{}: out path {:?} leaves its folder", dvc_path.display(), out.path)));
        }
        let rel = relative(self.root(), dvc_path);
        let rel = rel.trim_end_matches(".dvc");
        let id = rel.strip_prefix(&format!("{STUDIO_DATASETS}/")).filter(|r| !r.contains('/')).unwrap_or(rel).to_string();
        let folder = dvc_path.parent().unwrap_or(self.root()).join(&out.path);
        Ok(Dataset { id, dvc_path: dvc_path.to_path_buf(), folder })
    }

    /// The dataset `id`: an uploaded dataset's uuid, or the path of a `.dvc` file relative
    /// to the project (with or without `.dvc`).
    ///
    /// # Errors
    /// [`DatasetError::NotFound`] naming the datasets there are.
    pub fn dataset(&self, id: &str) -> Result<Dataset, DatasetError> {
        let id = id.trim_end_matches(".dvc").trim_end_matches('/');
        if manifest::safe_relpath(id) {
            for candidate in [self.root().join(STUDIO_DATASETS).join(format!("{id}.dvc")), self.root().join(format!("{id}.dvc"))] {
                if candidate.is_file() {
                    return self.dataset_at(&candidate);
                }
            }
        }
        let known: Vec<String> = self.all().into_iter().map(|d| d.id).collect();
        Err(DatasetError::NotFound { id: id.to_string(), known: if known.is_empty() { "no datasets".into() } else { known.join(", ") } })
    }

    /// The studio's uploaded dataset folder `DATA/trainings/datasets/ID` as a dataset
    /// (its `.dvc` file need not exist yet).
    pub fn studio_dataset(&self, id: &str) -> Dataset {
        let dir = self.root().join(STUDIO_DATASETS);
        Dataset { id: id.to_string(), dvc_path: dir.join(format!("{id}.dvc")), folder: dir.join(id) }
    }

    /// A folder inside the project as a dataset (`FOLDER.dvc` beside it).
    ///
    /// # Errors
    /// The folder is not inside the project or is not a folder.
    pub fn folder_dataset(&self, folder: &Path) -> Result<Dataset, DatasetError> {
        let abs = std::path::absolute(folder).map_err(io(folder))?;
        let root = std::path::absolute(self.root()).map_err(io(self.root()))?;
        if !abs.is_dir() || !abs.starts_with(&root) || abs == root {
            return Err(DatasetError::Invalid(format!("{} is not a folder inside the project {}", folder.display(), root.display())));
        }
        let name = abs.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let dvc_path = abs.with_file_name(format!("{name}.dvc"));
        if dvc_path.is_file() {
            return self.dataset_at(&dvc_path);
        }
        let rel = relative(&root, &abs);
        let id = rel.strip_prefix(&format!("{STUDIO_DATASETS}/")).filter(|r| !r.contains('/')).unwrap_or(&rel).to_string();
        Ok(Dataset { id, dvc_path, folder: abs })
    }

    /// The version the `.dvc` file records, checked against the cache.
    ///
    /// # Errors
    /// `Err(reason)` when the manifest or an object is missing or damaged.
    pub fn check(&self, ds: &Dataset) -> Result<(), String> {
        let out = ds.out().map_err(|e| e.to_string())?.ok_or_else(|| "it has no .dvc file".to_string())?;
        let md5 = out.md5.ok_or_else(|| "its .dvc file records no hash".to_string())?;
        if md5.ends_with(".dir") {
            self.verify(&md5).map(|_| ())
        } else {
            Err("it tracks a single file, not a folder".into())
        }
    }

    /// [`Project::check`] as an error, for a dataset that has a `.dvc` file: edits are
    /// refused before they touch anything while the current version is damaged.
    fn ensure_intact(&self, ds: &Dataset) -> Result<(), DatasetError> {
        if ds.dvc_path.is_file() {
            self.check(ds).map_err(|reason| DatasetError::Damaged { id: ds.id.clone(), reason })?;
        }
        Ok(())
    }

    /// The versions of `ds`: its log, plus the `.dvc` file's version when the log lacks it
    /// (a folder `dvc add` tracked).
    ///
    /// # Errors
    /// The `.dvc` file cannot be read.
    pub fn versions(&self, ds: &Dataset) -> Result<Vec<Version>, DatasetError> {
        let mut versions = ds.log().versions;
        if let Some(out) = ds.out()? {
            if let Some(md5) = out.md5.filter(|m| !versions.iter().any(|v| &v.md5 == m)) {
                let time = std::fs::metadata(&ds.dvc_path).and_then(|m| m.modified()).map(|t| humantime::format_rfc3339_seconds(t).to_string()).unwrap_or_default();
                versions.push(Version {
                    number: versions.last().map_or(1, |v| v.number + 1),
                    md5,
                    size: out.size.unwrap_or(0),
                    nfiles: out.nfiles.unwrap_or(0),
                    time,
                    summary: "recorded outside Atelier (dvc add)".into(),
                });
            }
        }
        Ok(versions)
    }

    /// The listing of every dataset.
    pub fn list(&self) -> Vec<DatasetInfo> {
        self.all().iter().map(|ds| self.info(ds)).collect()
    }

    /// One dataset as listed.
    pub fn info(&self, ds: &Dataset) -> DatasetInfo {
        let out = ds.out().ok().flatten();
        let versions = self.versions(ds).unwrap_or_default();
        let md5 = out.as_ref().and_then(|o| o.md5.clone());
        DatasetInfo {
            id: ds.id.clone(),
            dvc_file: relative(self.root(), &ds.dvc_path),
            version: versions.iter().rev().find(|v| Some(&v.md5) == md5.as_ref()).map(|v| v.number),
            md5,
            size: out.as_ref().and_then(|o| o.size),
            nfiles: out.as_ref().and_then(|o| o.nfiles),
            versions: versions.len(),
            damaged: self.check(ds).err(),
        }
    }

    /// Commits the folder of `ds` as a new version when its content differs from the
    /// current one: stores its files and manifest in the cache, writes the `.dvc` file and
    /// appends to the version log. `note` is added to the summary.
    ///
    /// # Errors
    /// The `.dvc` file does not match its cache ([`DatasetError::Damaged`]: nothing is
    /// written), or a file cannot be read or written.
    pub fn commit(&self, ds: &Dataset, note: Option<&str>, progress: &mut dyn FnMut(u64)) -> Result<Commit, DatasetError> {
        let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        self.commit_locked(ds, note, progress)
    }

    fn commit_locked(&self, ds: &Dataset, note: Option<&str>, progress: &mut dyn FnMut(u64)) -> Result<Commit, DatasetError> {
        if !ds.folder.is_dir() {
            return Err(DatasetError::Invalid(format!("{} is not a folder", ds.folder.display())));
        }
        let (entries, size) = hash_folder(&ds.folder, progress)?;
        let md5 = manifest::dir_hash(&entries);
        let current = ds.out()?.and_then(|o| o.md5);
        let previous: Option<Vec<Entry>> = match &current {
            Some(m) if *m == md5 => None,
            Some(m) => Some(self.verify(m).map_err(|reason| DatasetError::Damaged { id: ds.id.clone(), reason })?),
            None => None,
        };
        let mut versions = self.versions(ds)?;
        // Store first: objects, then the manifest, then the .dvc file and the log.
        for e in &entries {
            self.store_file(&ds.folder.join(e.relpath.replace('/', std::path::MAIN_SEPARATOR_STR)), &e.md5)?;
        }
        self.store_bytes(&md5, &manifest::manifest_bytes(&entries))?;
        if current.as_deref() == Some(md5.as_str()) {
            if let Some(v) = versions.iter().rev().find(|v| v.md5 == md5) {
                let v = v.clone();
                if ds.log().versions.is_empty() {
                    ds.write_log(&VersionLog { versions })?;
                }
                return Ok(Commit { version: v, new: false });
            }
        }
        let diff = diff_entries(previous.as_deref().unwrap_or(&[]), &entries, &|_| None);
        let mut summary = if current.is_none() { format!("first version: {}", plural(entries.len(), "file", "files")) } else { diff.summary() };
        if let Some(n) = note.filter(|n| !n.is_empty()) {
            summary = format!("{summary} ({n})");
        }
        DvcFile::for_folder(&ds.folder.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), &md5, size, entries.len() as u64).write(&ds.dvc_path)?;
        let version = Version {
            number: versions.last().map_or(1, |v| v.number + 1),
            md5,
            size,
            nfiles: entries.len() as u64,
            time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            summary,
        };
        versions.push(version.clone());
        ds.write_log(&VersionLog { versions })?;
        Ok(Commit { version, new: true })
    }

    /// The version `number` of `ds` (the `.dvc` file's current one when `None`).
    ///
    /// # Errors
    /// No such version.
    pub fn version(&self, ds: &Dataset, number: Option<u32>) -> Result<Version, DatasetError> {
        let versions = self.versions(ds)?;
        let current = ds.out()?.and_then(|o| o.md5);
        let found = match number {
            Some(n) => versions.iter().find(|v| v.number == n),
            None => versions.iter().rev().find(|v| Some(&v.md5) == current.as_ref()).or(versions.last()),
        };
        found.cloned().ok_or_else(|| DatasetError::NoVersion {
            id: ds.id.clone(),
            version: number.unwrap_or(0),
            have: if versions.is_empty() { "none".into() } else { format!("1..={}", versions.last().map_or(0, |v| v.number)) },
        })
    }

    /// The files of version `number` of `ds`, checked against the cache.
    ///
    /// # Errors
    /// No such version, or it is damaged in the cache.
    pub fn files(&self, ds: &Dataset, number: Option<u32>) -> Result<(Version, Vec<Entry>), DatasetError> {
        let v = self.version(ds, number)?;
        let entries = self.read_manifest(&v.md5).map_err(|reason| DatasetError::Damaged { id: ds.id.clone(), reason: format!("version {}: {reason}", v.number) })?;
        Ok((v, entries))
    }

    /// What changed from version `from` (default: the one before `to`) to `to` (default:
    /// the current one).
    ///
    /// # Errors
    /// No such version, or a manifest is damaged.
    pub fn diff(&self, ds: &Dataset, from: Option<u32>, to: Option<u32>) -> Result<VersionDiff, DatasetError> {
        let (vt, bt) = self.files(ds, to)?;
        let from = match from {
            Some(f) => Some(f),
            None => self.versions(ds)?.iter().rev().find(|v| v.number < vt.number).map(|v| v.number),
        };
        let (vf, af) = match from {
            Some(f) => {
                let (v, e) = self.files(ds, Some(f))?;
                (Some(v), e)
            }
            None => (None, Vec::new()),
        };
        let text = |md5: &str| {
            let bytes = std::fs::read(self.object_path(md5)).ok()?;
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]).trim().to_string();
            Some(text)
        };
        let mut d = diff_entries(&af, &bt, &text);
        d.from = vf.as_ref().map(|v| v.number);
        d.from_md5 = vf.map(|v| v.md5);
        d.to = Some(vt.number);
        d.to_md5 = vt.md5;
        Ok(d)
    }

    /// The cache object of `relpath` in version `number` of `ds`.
    ///
    /// # Errors
    /// No such version or file, or the object is missing.
    pub fn version_file(&self, ds: &Dataset, number: Option<u32>, relpath: &str) -> Result<PathBuf, DatasetError> {
        let (v, entries) = self.files(ds, number)?;
        let e = entries.iter().find(|e| e.relpath == relpath).ok_or_else(|| DatasetError::NotFound { id: format!("{}/{relpath} (version {})", ds.id, v.number), known: format!("{} files in that version", entries.len()) })?;
        let path = self.object_path(&e.md5);
        if path.is_file() { Ok(path) } else { Err(DatasetError::Damaged { id: ds.id.clone(), reason: format!("the cache object of {relpath} is missing") }) }
    }

    /// Restores the folder of `ds` to version `number` (the `.dvc` file's when `None`) from
    /// the cache and points the `.dvc` file at it. Workspace files that no version holds
    /// are first committed as a version of their own, so nothing is lost; files that are
    /// only missing are restored.
    ///
    /// # Errors
    /// The version is damaged in the cache (nothing is changed), or files cannot be written.
    pub fn checkout(&self, ds: &Dataset, number: Option<u32>, progress: &mut dyn FnMut(u64)) -> Result<Version, DatasetError> {
        let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let target = self.version(ds, number)?;
        let wanted = self.verify(&target.md5).map_err(|reason| DatasetError::Damaged { id: ds.id.clone(), reason: format!("version {}: {reason}", target.number) })?;
        let (have, _) = hash_folder(&ds.folder, &mut |_| {})?;
        let committed: BTreeSet<(String, String)> = match ds.out()?.and_then(|o| o.md5) {
            Some(m) => self.read_manifest(&m).unwrap_or_default().into_iter().map(|e| (e.relpath, e.md5)).collect(),
            None => BTreeSet::new(),
        };
        if have.iter().any(|e| !committed.contains(&(e.relpath.clone(), e.md5.clone())) && !self.object_path(&e.md5).is_file()) {
            self.commit_locked(ds, Some("workspace changes saved before a checkout"), &mut |_| {})?;
        }
        std::fs::create_dir_all(&ds.folder).map_err(io(&ds.folder))?;
        let present: BTreeMap<&str, &str> = have.iter().map(|e| (e.relpath.as_str(), e.md5.as_str())).collect();
        for e in &wanted {
            let dest = ds.folder.join(e.relpath.replace('/', std::path::MAIN_SEPARATOR_STR));
            if present.get(e.relpath.as_str()) == Some(&e.md5.as_str()) {
                continue;
            }
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            let src = self.object_path(&e.md5);
            atelier_engine::files::write_atomic_with(&dest, |tmp| std::fs::copy(&src, tmp).map(|n| progress(n)), |e| e).map_err(io(&dest))?;
        }
        let keep: BTreeSet<&str> = wanted.iter().map(|e| e.relpath.as_str()).collect();
        for e in &have {
            if !keep.contains(e.relpath.as_str()) {
                let p = ds.folder.join(&e.relpath);
                std::fs::remove_file(&p).map_err(io(&p))?;
            }
        }
        let mut file = if ds.dvc_path.is_file() { DvcFile::read(&ds.dvc_path)? } else { DvcFile::for_folder(&ds.folder.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), "", 0, 0) };
        let out = &mut file.outs[0];
        out.md5 = Some(target.md5.clone());
        out.size = Some(target.size);
        out.nfiles = Some(target.nfiles);
        out.hash = Some("md5".into());
        file.write(&ds.dvc_path)?;
        Ok(target)
    }

    /// Removes files (relative paths) from the folder of `ds` and commits the result.
    ///
    /// # Errors
    /// A path that is not in the folder, or the commit fails.
    pub fn remove_files(&self, ds: &Dataset, files: &[String]) -> Result<Commit, DatasetError> {
        self.ensure_intact(ds)?;
        for f in files {
            let p = ds.folder.join(f);
            if !manifest::safe_relpath(f) || !p.is_file() {
                return Err(DatasetError::NotFound { id: format!("{}/{f}", ds.id), known: "the files of the dataset's folder".into() });
            }
        }
        for f in files {
            let p = ds.folder.join(f);
            std::fs::remove_file(&p).map_err(io(&p))?;
        }
        self.commit(ds, None, &mut |_| {})
    }

    /// Writes the caption of `image` (`x.png` → `x.txt`, keeping an existing caption file's
    /// spelling) and commits; an empty caption removes the caption file.
    ///
    /// # Errors
    /// `image` is not an image of the folder, or the commit fails.
    pub fn set_caption(&self, ds: &Dataset, image: &str, caption: &str) -> Result<Commit, DatasetError> {
        self.ensure_intact(ds)?;
        let path = ds.folder.join(image);
        if !manifest::safe_relpath(image) || is_caption(image) || !path.is_file() {
            return Err(DatasetError::NotFound { id: format!("{}/{image}", ds.id), known: "the images of the dataset's folder".into() });
        }
        let s = stem(image);
        let dir = path.parent().unwrap_or(&ds.folder).to_path_buf();
        let existing = std::fs::read_dir(&dir).ok().into_iter().flatten().flatten().map(|e| e.path()).find(|p| {
            let rel = relative(&ds.folder, p);
            is_caption(&rel) && stem(&rel) == s
        });
        let target = existing.unwrap_or_else(|| path.with_extension("txt"));
        let caption = caption.trim();
        if caption.is_empty() {
            if target.is_file() {
                std::fs::remove_file(&target).map_err(io(&target))?;
            }
        } else {
            atelier_engine::files::write_atomic(&target, format!("{caption}\n").as_bytes()).map_err(io(&target))?;
        }
        self.commit(ds, None, &mut |_| {})
    }
}

/// The dataset version a training used, as recorded in its run and registry version.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainingDataset {
    /// The folder hash (`<md5>.dir`), as DVC computes it.
    pub md5: String,
    /// The dataset and its version number, when the folder is a versioned dataset.
    pub id: Option<String>,
    pub version: Option<u32>,
    pub nfiles: u64,
    pub size: u64,
}

impl TrainingDataset {
    /// Tags for a tracked run or a registry version: `dataset.md5`, `dataset.nfiles`,
    /// `dataset.size`, and `dataset.id` / `dataset.version` when known.
    pub fn tags(&self) -> Vec<(String, String)> {
        let mut t = vec![("dataset.md5".to_string(), self.md5.clone()), ("dataset.nfiles".into(), self.nfiles.to_string()), ("dataset.size".into(), self.size.to_string())];
        if let Some(id) = &self.id {
            t.push(("dataset.id".into(), id.clone()));
        }
        if let Some(v) = self.version {
            t.push(("dataset.version".into(), v.to_string()));
        }
        t
    }
}

/// The version of the training folder `folder`: when it is a studio dataset
/// (`DATA/trainings/datasets/ID`) or a folder with a `.dvc` file beside it in a DVC
/// project, its content is committed (a new version only if it changed) and that version
/// is returned; otherwise only the folder hash is computed.
///
/// # Errors
/// The folder cannot be read, or its dataset is damaged.
pub fn training_dataset(folder: &Path) -> Result<TrainingDataset, DatasetError> {
    let abs = std::path::absolute(folder).map_err(io(folder))?;
    let name = abs.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let beside = abs.with_file_name(format!("{name}.dvc"));
    let in_studio = abs.parent().is_some_and(|p| p.ends_with(STUDIO_DATASETS));
    if in_studio || beside.is_file() {
        let project = if in_studio {
            let root = abs.ancestors().nth(3).unwrap_or(&abs).to_path_buf();
            Some(Project::studio(&root)?)
        } else {
            Project::find(&abs)
        };
        if let Some(project) = project {
            let ds = project.folder_dataset(&abs)?;
            let c = project.commit(&ds, None, &mut |_| {})?;
            return Ok(TrainingDataset { md5: c.version.md5, id: Some(ds.id), version: Some(c.version.number), nfiles: c.version.nfiles, size: c.version.size });
        }
    }
    let (entries, size) = hash_folder(&abs, &mut |_| {})?;
    Ok(TrainingDataset { md5: manifest::dir_hash(&entries), id: None, version: None, nfiles: entries.len() as u64, size })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(relpath: &str, md5: &str) -> Entry {
        Entry { md5: md5.repeat(32 / md5.len()), relpath: relpath.into() }
    }

    #[test]
    fn diff_pairs_captions_with_images() {
        let a = [e("a.png", "1"), e("a.txt", "2"), e("b.png", "3"), e("c.jpg", "4")];
        let b = [e("a.png", "1"), e("a.txt", "5"), e("c.jpg", "6"), e("d.png", "7"), e("D.TXT", "8")];
        let d = diff_entries(&a, &b, &|m| Some(format!("text {}", &m[..1])));
        assert_eq!(d.images_added, ["d.png"]);
        assert_eq!(d.images_removed, ["b.png"]);
        assert_eq!(d.images_changed, ["c.jpg"]);
        assert_eq!(d.captions_changed.len(), 2);
        assert_eq!(d.captions_changed[0], CaptionChange { caption: "D.TXT".into(), image: Some("d.png".into()), before: None, after: Some("text 8".into()) });
        assert_eq!(d.captions_changed[1], CaptionChange { caption: "a.txt".into(), image: Some("a.png".into()), before: Some("text 2".into()), after: Some("text 5".into()) });
        assert_eq!(d.summary(), "1 image added, 1 image removed, 1 image changed, 2 captions changed");
        assert_eq!(diff_entries(&a, &a, &|_| None).summary(), "no changes");
    }

    #[test]
    fn a_training_records_the_dataset_version() {
        let tmp = tempfile::tempdir().unwrap();
        let folder = tmp.path().join("data").join(STUDIO_DATASETS).join("5d1f0c3e-8a4b-4c2d-9e6f-7a8b9c0d1e2f");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join("a.png"), b"a").unwrap();
        let t = training_dataset(&folder).unwrap();
        assert_eq!((t.version, t.id.as_deref(), t.nfiles), (Some(1), Some("5d1f0c3e-8a4b-4c2d-9e6f-7a8b9c0d1e2f"), 1));
        assert!(tmp.path().join("data/.dvc/config").is_file(), "the studio folder became a DVC project");
        let tags = t.tags();
        assert!(tags.contains(&("dataset.md5".into(), t.md5.clone())) && tags.contains(&("dataset.version".into(), "1".into())), "{tags:?}");
        // A plain folder: its DVC hash only, nothing written.
        let plain = tmp.path().join("plain");
        std::fs::create_dir_all(&plain).unwrap();
        std::fs::write(plain.join("a.png"), b"a").unwrap();
        let p = training_dataset(&plain).unwrap();
        assert_eq!((p.md5, p.version, p.id), (t.md5, None, None));
        assert!(!tmp.path().join("plain.dvc").exists());
    }

    #[test]
    fn versions_follow_content() {
        let tmp = tempfile::tempdir().unwrap();
        let project = Project::studio(tmp.path()).unwrap();
        assert!(std::fs::read_to_string(tmp.path().join(".dvc/config")).unwrap().contains("no_scm = True"));
        let ds = project.studio_dataset("0b5e5c9e-3f43-4a8b-9d1e-2c6a0f7b9d11");
        std::fs::create_dir_all(&ds.folder).unwrap();
        std::fs::write(ds.folder.join("cat.png"), b"png bytes").unwrap();
        std::fs::write(ds.folder.join("cat.txt"), b"a cat").unwrap();
        let c1 = project.commit(&ds, None, &mut |_| {}).unwrap();
        assert!(c1.new);
        assert_eq!((c1.version.number, c1.version.nfiles, c1.version.size), (1, 2, 14));
        // Same content: same hash, no new version.
        let again = project.commit(&ds, None, &mut |_| {}).unwrap();
        assert!(!again.new);
        assert_eq!(again.version.md5, c1.version.md5);
        let c2 = project.set_caption(&ds, "cat.png", "a grey cat").unwrap();
        assert_eq!((c2.version.number, c2.version.summary.as_str()), (2, "1 caption changed"));
        let d = project.diff(&ds, None, None).unwrap();
        assert_eq!(d.captions_changed[0].before.as_deref(), Some("a cat"));
        assert_eq!(d.captions_changed[0].after.as_deref(), Some("a grey cat"));
        // Back to the first content: the first hash again (a new version entry that names it).
        project.checkout(&ds, Some(1), &mut |_| {}).unwrap();
        assert_eq!(std::fs::read(ds.folder.join("cat.txt")).unwrap(), b"a cat");
        assert_eq!(project.info(&ds).version, Some(1));
        assert_eq!(project.list().len(), 1);
        // A damaged object: reported, and a commit of changed content refuses.
        std::fs::write(project.object_path(&c1.version.md5), b"[]").unwrap();
        assert!(project.info(&ds).damaged.unwrap().contains("does not match"));
        std::fs::write(ds.folder.join("dog.png"), b"dog").unwrap();
        let err = project.commit(&ds, None, &mut |_| {}).unwrap_err();
        assert!(matches!(err, DatasetError::Damaged { .. }), "{err}");
        assert_eq!(project.versions(&ds).unwrap().len(), 2);
    }
}
