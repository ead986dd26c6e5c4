//! The style library: one folder per style adapter, each with a card.
//!
//! A style folder `ROOT/NAME/` holds `NAME.safetensors` (kohya layout, what A1111 and
//! `<lora:NAME>` use), `NAME.diffusers.safetensors` (diffusers/PEFT layout),
//! `card.json`, the training record (`training_config.json`, `loss.csv`, `loss.png`,
//! `fit.json`) and `samples/`. The library has one writable root (user styles) and
//! optionally read-only roots whose styles ship with the project.

use std::path::{Path, PathBuf};

use atelier_engine::style::dataset::DatasetReport;
use atelier_engine::style::train::{StyleOutput, StyleTrainConfig};
use serde::{Deserialize, Serialize};

/// Why the library refused or failed a change. The messages are shown to users as they are.
#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    /// The name breaks [`check_name`]'s rule.
    #[error("style name {0:?} is not valid: use 1-64 letters, digits, '-' or '_', starting with a letter or digit")]
    BadName(String),
    /// A new user style may not take the name of a shipped one.
    #[error("{0} is the name of a style that ships with Atelier; choose another name")]
    ShippedName(String),
    /// Shipped styles are read-only.
    #[error("{0} ships with Atelier and cannot be changed; train a copy under another name")]
    Builtin(String),
    #[error("there is no style called {0}")]
    NotFound(String),
    /// A rename to a name another style has.
    #[error("a style called {0} exists already")]
    NameTaken(String),
    /// A style folder or file could not be created, written, renamed or deleted.
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl LibraryError {
    fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| LibraryError::Io { action, path: path.to_path_buf(), source }
    }
}

/// A refused name or change is a 400 on `name` with the library's reason, a missing style a
/// 404, a full disk a 503 saying to free space, any other I/O failure a 500.
impl From<LibraryError> for crate::ApiError {
    fn from(e: LibraryError) -> Self {
        use crate::ApiError;
        match e {
            LibraryError::BadName(_) | LibraryError::ShippedName(_) | LibraryError::Builtin(_) | LibraryError::NameTaken(_) => {
                ApiError::Invalid { field: "name".into(), message: e.to_string() }
            }
            LibraryError::NotFound(name) => ApiError::NotFound { what: "style", id: name },
            LibraryError::Io { ref source, .. } => ApiError::storage(&e, source),
        }
    }
}

/// What the library shows about a style.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StyleCard {
    pub name: String,
    pub trigger: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub base_model: String,
    pub base_model_hash: String,
    pub dataset_dir: String,
    pub dataset_hash: String,
    pub dataset_images: usize,
    pub dataset_skipped: usize,
    pub training: StyleTrainConfig,
    pub training_minutes: f64,
    /// Fixed-timestep ε-MSE on the training set: base model, then with the style.
    pub fit_loss_base: f64,
    pub fit_loss_adapter: f64,
    /// Quality metrics, when measured (style similarity, sharpness, …).
    #[serde(default)]
    pub metrics: serde_json::Value,
}

impl StyleCard {
    pub fn new(cfg: &StyleTrainConfig, report: &DatasetReport, model: &Path, out: &StyleOutput, seconds: f64) -> Self {
        Self {
            name: cfg.name.clone(),
            trigger: cfg.trigger.clone(),
            created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            base_model: model.display().to_string(),
            base_model_hash: cfg.base_model_hash.clone(),
            dataset_dir: report.dir.display().to_string(),
            dataset_hash: cfg.dataset_hash.clone(),
            dataset_images: report.items.len(),
            dataset_skipped: report.rejected.len() + report.duplicates.len(),
            training: cfg.clone(),
            training_minutes: seconds / 60.0,
            fit_loss_base: out.fit_before,
            fit_loss_adapter: out.fit_after,
            metrics: serde_json::Value::Null,
        }
    }
}

/// A style found in the library.
#[derive(Debug, Clone)]
pub struct StyleEntry {
    pub name: String,
    pub dir: PathBuf,
    pub card: Option<StyleCard>,
    /// Shipped with the project (read-only).
    pub builtin: bool,
}

impl StyleEntry {
    /// The A1111 short hash of the kohya file (what blends and share links name a style
    /// by); remembered per file, size and modification time, so listing styles does not
    /// re-read large files. `None` when the file cannot be read.
    pub fn short_hash(&self) -> Option<String> {
        use std::collections::HashMap;
        use std::sync::{Mutex, OnceLock};
        type Key = (PathBuf, u64, Option<std::time::SystemTime>);
        static CACHE: OnceLock<Mutex<HashMap<Key, String>>> = OnceLock::new();
        let path = self.adapter();
        let meta = std::fs::metadata(&path).ok()?;
        let key = (path.clone(), meta.len(), meta.modified().ok());
        let cache = CACHE.get_or_init(Default::default);
        if let Some(h) = cache.lock().ok()?.get(&key) {
            return Some(h.clone());
        }
        let hash = atelier_engine::model::short_hash(&path).ok()?;
        cache.lock().ok()?.insert(key, hash.clone());
        Some(hash)
    }

    /// The kohya-layout adapter file.
    pub fn adapter(&self) -> PathBuf {
        self.dir.join(format!("{}.safetensors", self.name))
    }

    /// The diffusers-layout adapter file.
    pub fn diffusers_adapter(&self) -> PathBuf {
        self.dir.join(format!("{}.diffusers.safetensors", self.name))
    }
}

/// The style folders under a writable root and any read-only ones.
#[derive(Debug, Clone)]
pub struct StyleLibrary {
    root: PathBuf,
    shipped: Vec<PathBuf>,
    /// The experiment store whose model registry `NAME@VERSION` names resolve in.
    registry: Option<PathBuf>,
}

/// Checks a style name: 1–64 of letters, digits, `-`, `_`, starting with a letter or digit.
pub fn check_name(name: &str) -> Result<(), LibraryError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !ok {
        return Err(LibraryError::BadName(name.to_string()));
    }
    Ok(())
}

impl StyleLibrary {
    /// The library in `root`. Registered versions (`NAME@ALIAS`) are looked up in the
    /// experiment store beside it (`ROOT/../tracking`, the studio's layout) unless
    /// [`StyleLibrary::with_registry`] says otherwise.
    pub fn new(root: PathBuf) -> Self {
        let registry = root.parent().map(|p| p.join("tracking"));
        Self { root, shipped: Vec::new(), registry }
    }

    /// Resolves `NAME@VERSION` names in the experiment store in `tracking`.
    pub fn with_registry(mut self, tracking: PathBuf) -> Self {
        self.registry = Some(tracking);
        self
    }

    /// A registered version of a style, named `NAME@ALIAS`, `NAME@3` or `NAME@latest` (its
    /// own frozen copy of the adapter, which later trainings of the style do not change).
    ///
    /// # Errors
    /// A message naming what is missing (the model, or the version with the known ones).
    pub fn find_version(&self, name: &str) -> Result<StyleEntry, String> {
        let (base, selector) = name.split_once('@').ok_or_else(|| format!("{name} names no version (write NAME@ALIAS or NAME@NUMBER)"))?;
        let store = self.registry.as_ref().filter(|d| d.join("tracking.sqlite").is_file()).ok_or_else(|| {
            format!("{name}: there is no model registry yet (every finished style training registers a version)")
        })?;
        let tracker = crate::tracking::Tracker::open(store).map_err(|e| crate::error::report(&e))?;
        let version = tracker.resolve_version(base, selector).map_err(|e| e.to_string())?;
        let dir = PathBuf::from(&version.source);
        let entry = StyleEntry {
            card: std::fs::read(dir.join("card.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()),
            name: version.name.clone(),
            dir,
            builtin: true,
        };
        if !entry.adapter().is_file() {
            return Err(format!("{name} (version {}) has no adapter file in {}", version.version, entry.dir.display()));
        }
        Ok(entry)
    }

    /// The folder of user styles.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Adds a read-only root of shipped styles.
    pub fn with_shipped(mut self, dir: PathBuf) -> Self {
        if dir != self.root {
            self.shipped.push(dir);
        }
        self
    }

    /// The folder of the user style `name` (created if needed).
    pub fn style_dir(&self, name: &str) -> Result<PathBuf, LibraryError> {
        check_name(name)?;
        if self.shipped.iter().any(|r| r != &self.root && r.join(name).is_dir()) {
            return Err(LibraryError::ShippedName(name.to_string()));
        }
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).map_err(LibraryError::io("creating", &dir))?;
        Ok(dir)
    }

    /// Writes a style's card (atomically).
    pub fn write_card(&self, name: &str, card: &StyleCard) -> Result<(), LibraryError> {
        let path = self.style_dir(name)?.join("card.json");
        atelier_engine::files::write_json_atomic(&path, card).map_err(LibraryError::io("writing", &path))?;
        Ok(())
    }

    /// Every style that has an adapter file, shipped ones first, each list sorted by name.
    pub fn list(&self) -> Vec<StyleEntry> {
        let mut out = Vec::new();
        let roots = self.shipped.iter().map(|r| (r, true)).chain(std::iter::once((&self.root, false)));
        for (root, builtin) in roots {
            let Ok(entries) = std::fs::read_dir(root) else { continue };
            let mut found: Vec<StyleEntry> = entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let dir = e.path();
                    let name = dir.file_name()?.to_str()?.to_string();
                    check_name(&name).ok()?;
                    let entry = StyleEntry {
                        card: std::fs::read(dir.join("card.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()),
                        name,
                        dir,
                        builtin,
                    };
                    entry.adapter().is_file().then_some(entry)
                })
                .collect();
            found.sort_by(|a, b| a.name.cmp(&b.name));
            out.extend(found);
        }
        out
    }

    /// The style called `name` (exact, else case-insensitive).
    ///
    /// `NAME@ALIAS` and `NAME@NUMBER` name a registered version ([`StyleLibrary::find_version`]).
    pub fn find(&self, name: &str) -> Option<StyleEntry> {
        if name.contains('@') {
            return self.find_version(name).ok();
        }
        let all = self.list();
        all.iter().find(|s| s.name == name).cloned().or_else(|| all.into_iter().find(|s| s.name.eq_ignore_ascii_case(name)))
    }

    /// The style a `<lora:NAME>` tag names ([`StyleLibrary::find`]), or a message saying
    /// what is missing: the known styles, or the registered versions and aliases.
    pub fn resolve(&self, name: &str) -> Result<StyleEntry, String> {
        if name.contains('@') {
            return self.find_version(name).map_err(|m| format!("<lora:{name}>: {m}"));
        }
        self.find(name).ok_or_else(|| {
            let known: Vec<String> = self.list().into_iter().map(|s| s.name).collect();
            format!("<lora:{name}> names no style in the library (known: {})", if known.is_empty() { "none".into() } else { known.join(", ") })
        })
    }

    fn user_style(&self, name: &str) -> Result<StyleEntry, LibraryError> {
        match self.find(name) {
            Some(s) if s.builtin => Err(LibraryError::Builtin(name.to_string())),
            Some(s) => Ok(s),
            None => Err(LibraryError::NotFound(name.to_string())),
        }
    }

    /// Renames a user style (folder and adapter files).
    pub fn rename(&self, name: &str, new_name: &str) -> Result<(), LibraryError> {
        check_name(new_name)?;
        let s = self.user_style(name)?;
        if self.find(new_name).is_some() {
            return Err(LibraryError::NameTaken(new_name.to_string()));
        }
        let new_dir = self.root.join(new_name);
        std::fs::rename(&s.dir, &new_dir).map_err(LibraryError::io("renaming", &s.dir))?;
        for (old, new) in [
            (format!("{name}.safetensors"), format!("{new_name}.safetensors")),
            (format!("{name}.diffusers.safetensors"), format!("{new_name}.diffusers.safetensors")),
        ] {
            let old = new_dir.join(&old);
            if old.is_file() {
                std::fs::rename(&old, new_dir.join(&new)).map_err(LibraryError::io("renaming", &old))?;
            }
        }
        let card_path = new_dir.join("card.json");
        if let Ok(bytes) = std::fs::read(&card_path) {
            if let Ok(mut card) = serde_json::from_slice::<StyleCard>(&bytes) {
                card.name = new_name.to_string();
                self.write_card(new_name, &card)?;
            }
        }
        Ok(())
    }

    /// Deletes a user style and everything in its folder.
    pub fn delete(&self, name: &str) -> Result<(), LibraryError> {
        let s = self.user_style(name)?;
        std::fs::remove_dir_all(&s.dir).map_err(LibraryError::io("deleting", &s.dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_style(root: &Path, name: &str) {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("{name}.safetensors")), b"x").unwrap();
    }

    #[test]
    fn list_find_rename_delete() {
        let tmp = tempfile::tempdir().unwrap();
        let (user, shipped) = (tmp.path().join("user"), tmp.path().join("shipped"));
        fake_style(&shipped, "stripes");
        fake_style(&user, "mine");
        std::fs::create_dir_all(user.join("empty")).unwrap(); // no adapter: not listed
        let lib = StyleLibrary::new(user.clone()).with_shipped(shipped);
        let names: Vec<_> = lib.list().iter().map(|s| (s.name.clone(), s.builtin)).collect();
        assert_eq!(names, [("stripes".to_string(), true), ("mine".to_string(), false)]);
        assert_eq!(lib.find("MINE").unwrap().name, "mine");
        let shipped_name = lib.style_dir("stripes").unwrap_err();
        assert!(matches!(shipped_name, LibraryError::ShippedName(_)) && shipped_name.to_string().contains("ships with Atelier"));
        let builtin = lib.delete("stripes").unwrap_err();
        assert!(matches!(builtin, LibraryError::Builtin(_)) && builtin.to_string().contains("cannot be changed"));
        assert!(matches!(lib.delete("nosuch"), Err(LibraryError::NotFound(_))));
        lib.rename("mine", "ours").unwrap();
        assert!(lib.find("mine").is_none());
        assert!(user.join("ours/ours.safetensors").is_file());
        assert!(matches!(lib.rename("ours", "stripes"), Err(LibraryError::NameTaken(_))));
        assert!(matches!(lib.rename("ours", "a b"), Err(LibraryError::BadName(_))));
        lib.delete("ours").unwrap();
        assert!(lib.find("ours").is_none());
        for bad in ["", "../x", "a b", "-x", &"x".repeat(65)] {
            assert!(matches!(check_name(bad), Err(LibraryError::BadName(_))), "{bad:?}");
        }
    }
}
