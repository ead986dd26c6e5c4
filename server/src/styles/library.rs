//! The style library: one folder per style adapter, each with a card.
//!
//! A style folder `ROOT/NAME/` holds `NAME.safetensors` (kohya layout, what A1111 and
//! `<lora:NAME>` use), `NAME.diffusers.safetensors` (diffusers/PEFT layout),
//! `card.json`, the training record (`training_config.json`, `loss.csv`, `loss.png`,
//! `fit.json`) and `samples/`. The library has one writable root (user styles) and
//! optionally read-only roots whose styles ship with the project.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use atelier_engine::style::dataset::DatasetReport;
use atelier_engine::style::train::{StyleOutput, StyleTrainConfig};
use serde::{Deserialize, Serialize};

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
}

/// Checks a style name: 1–64 of letters, digits, `-`, `_`, starting with a letter or digit.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !ok {
        bail!("style name {name:?} is not valid: use 1-64 letters, digits, '-' or '_', starting with a letter or digit");
    }
    Ok(())
}

impl StyleLibrary {
    pub fn new(root: PathBuf) -> Self {
        Self { root, shipped: Vec::new() }
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
    pub fn style_dir(&self, name: &str) -> Result<PathBuf> {
        check_name(name)?;
        if self.shipped.iter().any(|r| r != &self.root && r.join(name).is_dir()) {
            bail!("{name} is the name of a style that ships with Atelier; choose another name");
        }
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// Writes a style's card (atomically).
    pub fn write_card(&self, name: &str, card: &StyleCard) -> Result<()> {
        let path = self.style_dir(name)?.join("card.json");
        atelier_engine::files::write_json_atomic(&path, card).with_context(|| format!("writing {}", path.display()))?;
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
    pub fn find(&self, name: &str) -> Option<StyleEntry> {
        let all = self.list();
        all.iter().find(|s| s.name == name).cloned().or_else(|| all.into_iter().find(|s| s.name.eq_ignore_ascii_case(name)))
    }

    fn user_style(&self, name: &str) -> Result<StyleEntry> {
        match self.find(name) {
            Some(s) if s.builtin => bail!("{name} ships with Atelier and cannot be changed; train a copy under another name"),
            Some(s) => Ok(s),
            None => bail!("there is no style called {name}"),
        }
    }

    /// Renames a user style (folder and adapter files).
    pub fn rename(&self, name: &str, new_name: &str) -> Result<()> {
        check_name(new_name)?;
        let s = self.user_style(name)?;
        if self.find(new_name).is_some() {
            bail!("a style called {new_name} exists already");
        }
        let new_dir = self.root.join(new_name);
        std::fs::rename(&s.dir, &new_dir).with_context(|| format!("renaming {}", s.dir.display()))?;
        for (old, new) in [
            (format!("{name}.safetensors"), format!("{new_name}.safetensors")),
            (format!("{name}.diffusers.safetensors"), format!("{new_name}.diffusers.safetensors")),
        ] {
            if new_dir.join(&old).is_file() {
                std::fs::rename(new_dir.join(&old), new_dir.join(&new))?;
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
    pub fn delete(&self, name: &str) -> Result<()> {
        let s = self.user_style(name)?;
        std::fs::remove_dir_all(&s.dir).with_context(|| format!("deleting {}", s.dir.display()))
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
        assert!(lib.style_dir("stripes").unwrap_err().to_string().contains("ships with Atelier"));
        assert!(lib.delete("stripes").unwrap_err().to_string().contains("cannot be changed"));
        lib.rename("mine", "ours").unwrap();
        assert!(lib.find("mine").is_none());
        assert!(user.join("ours/ours.safetensors").is_file());
        assert!(lib.rename("ours", "stripes").is_err());
        lib.delete("ours").unwrap();
        assert!(lib.find("ours").is_none());
        for bad in ["", "../x", "a b", "-x", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
