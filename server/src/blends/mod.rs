//! Saved blends and how a blend (named or from a share link) is matched to what this
//! studio has: the model by hash, each style by hash (found under any name), so a blend
//! renders exactly what it rendered for the person who shared it, or says what is missing.

pub mod bake;
pub mod http;

use std::path::{Path, PathBuf};

use atelier_blend::{Blend, LinkError};
use serde::{Deserialize, Serialize};

use crate::styles::{check_name, LibraryError, StyleEntry, StyleLibrary};

/// What can go wrong with saved blends, links and matching a blend to this studio. The
/// messages are shown to users as they are.
#[derive(Debug, thiserror::Error)]
pub enum BlendError {
    /// A blend name breaks the style-name rule.
    #[error(transparent)]
    BadName(#[from] LibraryError),
    /// The link cannot be read, or the blend cannot be made into one.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The blends folder or a blend's file could not be created, read, written or deleted.
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A saved blend's file does not hold a blend.
    #[error("{path} is not a saved blend")]
    NotABlend {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A saved blend's file holds a blend that no link can carry.
    #[error("{path} holds a blend that cannot be shared")]
    Unshareable {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    /// Neither a link nor the name of a saved blend.
    #[error("{input:?} is neither a saved blend nor a blend link ({link_error})")]
    Unknown { input: String, link_error: LinkError },
    /// The blend uses a style this studio does not have.
    #[error(
        "this blend needs the style {} (hash {}), which this studio does not have{}; get it from whoever shared the blend",
        .0.name,
        .0.hash,
        if .0.name_taken_by_other_version { " (a different style has that name here)" } else { "" }
    )]
    MissingStyle(MissingStyle),
    /// A style of the blend does not fit the model.
    #[error("applying style {name}")]
    Apply {
        name: String,
        #[source]
        source: atelier_engine::Error,
    },
    /// A style's adapter could not be loaded.
    #[error(transparent)]
    Engine(#[from] atelier_engine::Error),
    /// A `--style NAME:WEIGHT[:lbw=D,M,U]` argument that does not parse.
    #[error("--style {spec}: write NAME:WEIGHT or NAME:WEIGHT:lbw=DOWN,MID,UP")]
    BadSpec {
        spec: String,
        #[source]
        source: atelier_blend::tags::TagError,
    },
    #[error("no style {0} in the library")]
    NoStyle(String),
    #[error("cannot read the adapter of {0}")]
    UnreadableAdapter(String),
}

impl BlendError {
    fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| BlendError::Io { action, path: path.to_path_buf(), source }
    }
}

/// What the blend itself gets wrong is a 400 on `blend`, a bad name what
/// [`LibraryError`] maps to, a missing style a 404, a full disk a 503 saying to free
/// space, a damaged saved blend or another failure a 500.
impl From<BlendError> for crate::ApiError {
    fn from(e: BlendError) -> Self {
        use crate::ApiError;
        match e {
            BlendError::BadName(e) => e.into(),
            BlendError::Engine(e) => e.into(),
            BlendError::Link(_) | BlendError::Unknown { .. } | BlendError::MissingStyle(_) | BlendError::Apply { .. } | BlendError::BadSpec { .. } => {
                ApiError::Invalid { field: "blend".into(), message: crate::error::report(&e) }
            }
            BlendError::NoStyle(name) => ApiError::NotFound { what: "style", id: name },
            BlendError::Io { ref source, .. } => ApiError::storage(&e, source),
            BlendError::NotABlend { .. } | BlendError::Unshareable { .. } | BlendError::UnreadableAdapter(_) => {
                ApiError::Internal(crate::error::report(&e))
            }
        }
    }
}

type Result<T, E = BlendError> = std::result::Result<T, E>;

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
        std::fs::create_dir_all(&self.root).map_err(BlendError::io("creating", &self.root))?;
        atelier_engine::files::write_json_atomic(&path, blend).map_err(BlendError::io("writing", &path))?;
        Ok(SavedBlend { name: name.to_string(), blend: blend.clone(), link })
    }

    pub fn get(&self, name: &str) -> Result<Option<SavedBlend>> {
        let path = self.path(name)?;
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(BlendError::io("reading", &path)(e)),
        };
        let blend: Blend = serde_json::from_slice(&bytes).map_err(|source| BlendError::NotABlend { path: path.clone(), source })?;
        let link = atelier_blend::encode(&blend).map_err(|source| BlendError::Unshareable { path: path.clone(), source })?;
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
            Err(e) => Err(BlendError::io("deleting", &path)(e)),
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
            return Err(BlendError::MissingStyle(m.clone()));
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
            let lora = sd.bind_lora(&adapter).map_err(|source| BlendError::Apply { name: e.name.clone(), source })?;
            active.push(atelier_engine::lora::ActiveLora { lora, weight: s.weight, blocks: s.blocks });
        }
        Ok(active)
    }
}

/// The A1111 short hash of a diffusers model folder (of its UNet weights), as
/// `StableDiffusion::model_hash` gives once loaded.
pub fn model_hash(model_dir: &Path) -> atelier_engine::Result<String> {
    atelier_engine::model::short_hash(&model_dir.join("unet/diffusion_pytorch_model.safetensors"))
}

/// Matches `blend` against `library` (by [`atelier_blend::resolve::match_styles`], the
/// rule the Blend page uses too) and the loaded model's hash.
pub fn resolve(blend: Blend, library: &StyleLibrary, model_hash: &str) -> Resolved {
    use atelier_blend::resolve::{match_styles, StyleMatch};
    let all = library.list();
    let hashes: Vec<Option<String>> = all.iter().map(StyleEntry::short_hash).collect();
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
                return Err(BlendError::Unknown { input: link_or_name.to_string(), link_error });
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
            let t = atelier_blend::tags::parse_lora_args(spec).map_err(|source| BlendError::BadSpec { spec: spec.clone(), source })?;
            let entry = library.find(&t.name).ok_or_else(|| BlendError::NoStyle(t.name.clone()))?;
            let hash = StyleEntry::short_hash(&entry).ok_or_else(|| BlendError::UnreadableAdapter(entry.name.clone()))?;
            Ok(atelier_blend::BlendStyle { name: entry.name, hash, weight: t.weight, blocks: t.block_weights() })
        })
        .collect()
}

/// The store of saved blends in `data_dir`.
pub fn store_in(data_dir: &Path) -> BlendStore {
    BlendStore::new(data_dir.join("blends"))
}
