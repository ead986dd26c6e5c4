//! Saved blends and how a blend (named or from a share link) is matched to what this
//! studio has: the model by hash, each style by hash (found under any name), so a blend
//! renders exactly what it rendered for the person who shared it, or says what is missing.

pub mod bake;
pub mod http;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use atelier_blend::Blend;
use serde::{Deserialize, Serialize};

use crate::styles::{check_name, StyleEntry, StyleLibrary};

/// Named blends, one JSON file each (`ROOT/NAME.json`), written atomically.
#[derive(Debug, Clone)]
pub struct BlendStore {
    root: PathBuf,
}

/// A saved blend as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedBlend {
    pub name: String,
    pub blend: Blend,
    /// Its share link code.
    pub link: String,
}

impl BlendStore {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    fn path(&self, name: &str) -> Result<PathBuf> {
        check_name(name)?;
        Ok(self.root.join(format!("{name}.json")))
    }

    /// Saves (or replaces) the blend `name`.
    pub fn save(&self, name: &str, blend: &Blend) -> Result<SavedBlend> {
        let link = atelier_blend::encode(blend)?;
        let path = self.path(name)?;
        std::fs::create_dir_all(&self.root).with_context(|| format!("creating {}", self.root.display()))?;
        atelier_engine::files::write_json_atomic(&path, blend).with_context(|| format!("writing {}", path.display()))?;
        Ok(SavedBlend { name: name.to_string(), blend: blend.clone(), link })
    }

    pub fn get(&self, name: &str) -> Result<Option<SavedBlend>> {
        let path = self.path(name)?;
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let blend: Blend = serde_json::from_slice(&bytes).with_context(|| format!("{} is not a saved blend", path.display()))?;
        let link = atelier_blend::encode(&blend)?;
        Ok(Some(SavedBlend { name: name.to_string(), blend, link }))
    }

    /// Every saved blend, by name.
    pub fn list(&self) -> Vec<SavedBlend> {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return Vec::new() };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".json").map(str::to_string))
            .filter(|n| check_name(n).is_ok())
            .collect();
        names.sort();
        names.into_iter().filter_map(|n| self.get(&n).ok().flatten()).collect()
    }

    /// Deletes `name`; false when there is none.
    pub fn delete(&self, name: &str) -> Result<bool> {
        let path = self.path(name)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).with_context(|| format!("deleting {}", path.display())),
        }
    }
}

/// A style of a blend that this studio does not have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MissingStyle {
    pub name: String,
    pub hash: String,
    /// A style here has the name but other weights.
    pub name_taken_by_other_version: bool,
}

/// A blend matched against this studio.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub blend: Blend,
    /// The library style used for each blend style (same order), where found.
    pub styles: Vec<Option<StyleEntry>>,
    pub missing: Vec<MissingStyle>,
    /// The blend was made on another model (by hash) than `model_hash`.
    pub other_model: bool,
}

impl Resolved {
    /// The prompt with `<lora:…>` tags naming the local styles.
    pub fn tagged_prompt(&self) -> Result<String> {
        if let Some(m) = self.missing.first() {
            bail!(
                "this blend needs the style {} (hash {}), which this studio does not have{}; get it from whoever shared the blend",
                m.name,
                m.hash,
                if m.name_taken_by_other_version { " (a different style has that name here)" } else { "" }
            );
        }
        let mut local = self.blend.clone();
        for (s, entry) in local.styles.iter_mut().zip(&self.styles) {
            if let Some(e) = entry {
                s.name = e.name.clone();
            }
        }
        Ok(local.tagged_prompt())
    }
}

impl Resolved {
    /// The blend's adapters bound to `sd` (styles at weight 0 left out); fails naming the
    /// first missing style.
    pub fn active(&self, sd: &atelier_engine::pipeline::StableDiffusion) -> Result<Vec<atelier_engine::lora::ActiveLora>> {
        self.tagged_prompt()?; // says what is missing
        let mut active = Vec::new();
        for (s, e) in self.blend.styles.iter().zip(&self.styles).filter(|(s, _)| s.weight != 0.0) {
            let e = e.as_ref().expect("tagged_prompt checked that none is missing");
            let adapter = std::sync::Arc::new(atelier_engine::lora::LoraAdapter::load(&e.adapter())?);
            let lora = sd.bind_lora(&adapter).with_context(|| format!("applying style {}", e.name))?;
            active.push(atelier_engine::lora::ActiveLora { lora, weight: s.weight, blocks: s.blocks });
        }
        Ok(active)
    }
}

/// The A1111 short hash of a diffusers model folder (of its UNet weights), as
/// `StableDiffusion::model_hash` gives once loaded.
pub fn model_hash(model_dir: &Path) -> Result<String> {
    Ok(atelier_engine::model::short_hash(&model_dir.join("unet/diffusion_pytorch_model.safetensors"))?)
}

/// The A1111 short hash of a style's kohya file (remembered per file, size and
/// modification time, so listing styles does not re-read large files).
pub fn style_hash(entry: &StyleEntry) -> Option<String> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    type Key = (PathBuf, u64, Option<std::time::SystemTime>);
    static CACHE: OnceLock<Mutex<HashMap<Key, String>>> = OnceLock::new();
    let path = entry.adapter();
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

/// Matches `blend` against `library` (by [`atelier_blend::resolve::match_styles`], the
/// rule the Blend page uses too) and the loaded model's hash.
pub fn resolve(blend: Blend, library: &StyleLibrary, model_hash: &str) -> Resolved {
    use atelier_blend::resolve::{match_styles, StyleMatch};
    let all = library.list();
    let hashes: Vec<Option<String>> = all.iter().map(style_hash).collect();
    let local: Vec<(&str, Option<&str>)> = all.iter().zip(&hashes).map(|(e, h)| (e.name.as_str(), h.as_deref())).collect();
    let mut styles = Vec::new();
    let mut missing = Vec::new();
    for (s, m) in blend.styles.iter().zip(match_styles(&blend.styles, &local)) {
        if let StyleMatch::Missing { name_taken } = m {
            missing.push(MissingStyle { name: s.name.clone(), hash: s.hash.clone(), name_taken_by_other_version: name_taken });
        }
        styles.push(m.found().map(|i| all[i].clone()));
    }
    let other_model = !blend.model_hash.is_empty() && blend.model_hash != model_hash;
    Resolved { blend, styles, missing, other_model }
}

/// Reads `link_or_name`: a share link (or its code) first, else a saved blend's name.
pub fn load(link_or_name: &str, store: &BlendStore) -> Result<Blend> {
    match atelier_blend::decode(link_or_name) {
        Ok(b) => Ok(b),
        Err(link_error) => {
            if check_name(link_or_name).is_ok() {
                if let Some(saved) = store.get(link_or_name)? {
                    return Ok(saved.blend);
                }
                bail!("{link_or_name:?} is neither a saved blend nor a blend link ({link_error})");
            }
            Err(link_error.into())
        }
    }
}

/// Builds a blend from styles in `library` given as `NAME:WEIGHT[:lbw=D,M,U]`.
pub fn from_specs(specs: &[String], library: &StyleLibrary) -> Result<Vec<atelier_blend::BlendStyle>> {
    specs
        .iter()
        .map(|spec| {
            let t = atelier_blend::tags::parse_lora_args(spec)
                .with_context(|| format!("--style {spec}: write NAME:WEIGHT or NAME:WEIGHT:lbw=DOWN,MID,UP"))?;
            let entry = library.find(&t.name).with_context(|| format!("no style {} in the library", t.name))?;
            let hash = style_hash(&entry).with_context(|| format!("cannot read the adapter of {}", entry.name))?;
            Ok(atelier_blend::BlendStyle { name: entry.name, hash, weight: t.weight, blocks: t.block_weights() })
        })
        .collect()
}

/// The store of saved blends in `data_dir`.
pub fn store_in(data_dir: &Path) -> BlendStore {
    BlendStore::new(data_dir.join("blends"))
}
