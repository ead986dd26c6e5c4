//! A DVC project on disk: the `.dvc` folder, its `config` (INI, as DVC writes it), the
//! `.dvcignore`, and the content-addressed cache `.dvc/cache/files/md5/XX/REST`.
//!
//! `.dvc/config` holds `[core]` (`no_scm = True` for a project without Git, `remote = NAME`
//! for the default remote) and one `['remote "NAME"']` section per remote (`url`, and for
//! S3 `endpointurl`, `access_key_id`, `secret_access_key`, `region`). Relative remote
//! paths are relative to the `.dvc` folder, as DVC reads them.

use std::path::{Path, PathBuf};

use ini::{EscapePolicy, Ini, LineSeparator, ParseOption, WriteOption};

use super::manifest::{self, Entry};
use super::DatasetError;

/// A DVC project: the folder that holds `.dvc/`.
#[derive(Debug, Clone)]
pub struct Project {
    root: PathBuf,
}

/// One remote of `.dvc/config`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Remote {
    pub name: String,
    /// A folder path, or `s3://BUCKET/PREFIX`.
    pub url: String,
    /// S3 endpoint such as `http://127.0.0.1:9000` (path-style requests are used with it).
    pub endpointurl: Option<String>,
    pub access_key_id: Option<String>,
    #[serde(skip)]
    pub secret_access_key: Option<String>,
    pub region: Option<String>,
    /// Whether `core.remote` names it.
    pub default: bool,
}

const IGNORE_TEXT: &str = "# Paths DVC leaves alone when it walks this project (gitignore syntax).\n";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io { path: path.to_path_buf(), source }
}

fn remote_section(name: &str) -> String {
    format!("'remote \"{name}\"'")
}

impl Project {
    /// The project at `root`, which must hold `.dvc/`.
    ///
    /// # Errors
    /// [`DatasetError::NoProject`] when `root/.dvc` is not a folder.
    pub fn open(root: &Path) -> Result<Self, DatasetError> {
        if root.join(".dvc").is_dir() {
            Ok(Self { root: std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf()) })
        } else {
            Err(DatasetError::NoProject(root.to_path_buf()))
        }
    }

    /// The nearest project at or above `path`.
    pub fn find(path: &Path) -> Option<Self> {
        let abs = std::path::absolute(path).ok()?;
        abs.ancestors().find(|p| p.join(".dvc").is_dir()).map(|p| Self { root: p.to_path_buf() })
    }

    /// Makes `root` a DVC project without Git (what `dvc init --no-scm` makes: `.dvc/config`
    /// with `[core] no_scm = True`, `.dvc/tmp`, `.dvcignore`), or opens the one there.
    ///
    /// # Errors
    /// The files cannot be written.
    pub fn init(root: &Path) -> Result<Self, DatasetError> {
        let dvc = root.join(".dvc");
        std::fs::create_dir_all(dvc.join("tmp")).map_err(io(&dvc))?;
        let project = Self { root: std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf()) };
        let config = dvc.join("config");
        if !config.exists() {
            let mut ini = Ini::new();
            ini.with_section(Some("core")).set("no_scm", "True");
            project.write_config(&ini)?;
        }
        let ignore = root.join(".dvcignore");
        if !ignore.exists() {
            atelier_engine::files::write_atomic(&ignore, IGNORE_TEXT.as_bytes()).map_err(io(&ignore))?;
        }
        Ok(project)
    }

    /// The project folder (absolute).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The cache folder: `core`'s `[cache] dir` when set (relative to `.dvc/`), else `.dvc/cache`.
    pub fn cache_dir(&self) -> PathBuf {
        let dvc = self.root.join(".dvc");
        match self.config().ok().and_then(|c| c.section(Some("cache")).and_then(|s| s.get("dir")).map(str::to_string)) {
            Some(dir) => dvc.join(dir),
            None => dvc.join("cache"),
        }
    }

    /// Where the object `hash` (32 hex digits, plus `.dir` for a manifest) lies in the cache.
    pub fn object_path(&self, hash: &str) -> PathBuf {
        object_relpath(hash).split('/').fold(self.cache_dir(), |p, part| p.join(part))
    }

    /// Stores the file `src`, whose MD5 is `md5`, in the cache (atomically; an object
    /// already there is kept).
    ///
    /// # Errors
    /// The copy fails.
    pub fn store_file(&self, src: &Path, md5: &str) -> Result<(), DatasetError> {
        let dest = self.object_path(md5);
        if dest.is_file() {
            return Ok(());
        }
        let parent = dest.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(io(&parent))?;
        atelier_engine::files::write_atomic_with(&dest, |tmp| std::fs::copy(src, tmp).map(|_| ()), |e| e).map_err(io(&dest))
    }

    /// Stores `bytes` under `hash` in the cache (atomically; an object already there is kept).
    ///
    /// # Errors
    /// The write fails.
    pub fn store_bytes(&self, hash: &str, bytes: &[u8]) -> Result<(), DatasetError> {
        let dest = self.object_path(hash);
        if dest.is_file() {
            return Ok(());
        }
        let parent = dest.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(io(&parent))?;
        atelier_engine::files::write_atomic(&dest, bytes).map_err(io(&dest))
    }

    /// The manifest `dir_hash` (`<md5>.dir`) from the cache, checked: present, its MD5
    /// matching its name, parseable.
    ///
    /// # Errors
    /// `Err(reason)` saying what is wrong.
    pub fn read_manifest(&self, dir_hash: &str) -> Result<Vec<Entry>, String> {
        let md5 = dir_hash.strip_suffix(".dir").filter(|m| manifest::is_md5(m)).ok_or_else(|| format!("{dir_hash:?} is not a folder hash (<md5>.dir)"))?;
        let path = self.object_path(dir_hash);
        let bytes = std::fs::read(&path).map_err(|_| format!("its manifest {dir_hash} is missing from the cache"))?;
        if manifest::md5_bytes(&bytes) != md5.to_ascii_lowercase() {
            return Err(format!("its manifest {dir_hash} in the cache does not match its hash"));
        }
        manifest::parse_manifest(&bytes).map_err(|e| format!("manifest {dir_hash}: {e}"))
    }

    /// Checks that the folder version `dir_hash` is whole in the cache: its manifest, and
    /// every file object present with the MD5 of its name.
    ///
    /// # Errors
    /// `Err(reason)` for the first problem found.
    pub fn verify(&self, dir_hash: &str) -> Result<Vec<Entry>, String> {
        let entries = self.read_manifest(dir_hash)?;
        for e in &entries {
            let path = self.object_path(&e.md5);
            match manifest::md5_file(&path, &mut |_| {}) {
                Ok(m) if m == e.md5 => {}
                Ok(_) => return Err(format!("the cache object of {} ({}) is damaged (its content does not match its hash)", e.relpath, e.md5)),
                Err(_) => return Err(format!("the cache object of {} ({}) is missing", e.relpath, e.md5)),
            }
        }
        Ok(entries)
    }

    /// `.dvc/config` as read (values verbatim).
    ///
    /// # Errors
    /// The file cannot be read or parsed.
    pub fn config(&self) -> Result<Ini, DatasetError> {
        let path = self.root.join(".dvc").join("config");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(&path)(e)),
        };
        Ini::load_from_str_opt(&text, ParseOption { enabled_quote: false, enabled_escape: false, ..ParseOption::default() })
            .map_err(|e| DatasetError::Config(format!("{}: {e}", path.display())))
    }

    fn write_config(&self, ini: &Ini) -> Result<(), DatasetError> {
        let path = self.root.join(".dvc").join("config");
        let mut out = Vec::new();
        ini.write_to_opt(&mut out, WriteOption { escape_policy: EscapePolicy::Nothing, line_separator: LineSeparator::CR, kv_separator: " = " })
            .map_err(io(&path))?;
        // Indent keys as DVC (configobj) does.
        let text = String::from_utf8_lossy(&out)
            .lines()
            .map(|l| if l.is_empty() || l.starts_with('[') { l.to_string() } else { format!("    {l}") })
            .collect::<Vec<_>>()
            .join("\n");
        atelier_engine::files::write_atomic(&path, format!("{text}\n").as_bytes()).map_err(io(&path))
    }

    /// The remotes of `.dvc/config`.
    ///
    /// # Errors
    /// The config cannot be read.
    pub fn remotes(&self) -> Result<Vec<Remote>, DatasetError> {
        let ini = self.config()?;
        let default = ini.section(Some("core")).and_then(|s| s.get("remote")).map(str::to_string);
        let mut out = Vec::new();
        for (name, props) in ini.iter() {
            let Some(name) = name.and_then(|n| n.strip_prefix("'remote \"")).and_then(|n| n.strip_suffix("\"'")) else { continue };
            let get = |k: &str| props.get(k).map(str::to_string);
            out.push(Remote {
                name: name.to_string(),
                url: get("url").unwrap_or_default(),
                endpointurl: get("endpointurl"),
                access_key_id: get("access_key_id"),
                secret_access_key: get("secret_access_key"),
                region: get("region"),
                default: default.as_deref() == Some(name),
            });
        }
        Ok(out)
    }

    /// The remote `name`, or the default one (`core.remote`, else the only one).
    ///
    /// # Errors
    /// No such remote, or none configured, saying how to add one.
    pub fn remote(&self, name: Option<&str>) -> Result<Remote, DatasetError> {
        let remotes = self.remotes()?;
        let names = || remotes.iter().map(|r| r.name.clone()).collect::<Vec<_>>().join(", ");
        let found = match name {
            Some(n) => remotes.iter().find(|r| r.name == n),
            None => remotes.iter().find(|r| r.default).or(if remotes.len() == 1 { remotes.first() } else { None }),
        };
        found.cloned().ok_or_else(|| match (name, remotes.is_empty()) {
            (_, true) => DatasetError::Config("no remote configured: add one with `atelier datasets remote add NAME URL --default`".into()),
            (Some(n), false) => DatasetError::Config(format!("no remote {n:?}; configured: {}", names())),
            (None, false) => DatasetError::Config(format!("no default remote (core.remote); configured: {}; pass --remote NAME", names())),
        })
    }

    /// Adds (or replaces) a remote; `default` makes it `core.remote`.
    ///
    /// # Errors
    /// A bad name, or the config cannot be written.
    pub fn set_remote(&self, remote: &Remote, default: bool) -> Result<(), DatasetError> {
        if remote.name.is_empty() || remote.name.contains(['"', '\'', '[', ']', '\n']) {
            return Err(DatasetError::Invalid(format!("{:?} is not a usable remote name", remote.name)));
        }
        if remote.url.trim().is_empty() {
            return Err(DatasetError::Invalid("a remote needs a url (a folder or s3://BUCKET/PREFIX)".into()));
        }
        let mut ini = self.config()?;
        let section = remote_section(&remote.name);
        ini.delete(Some(section.as_str()));
        {
            let mut s = ini.with_section(Some(section.as_str()));
            s.set("url", remote.url.as_str());
            for (k, v) in [("endpointurl", &remote.endpointurl), ("access_key_id", &remote.access_key_id), ("secret_access_key", &remote.secret_access_key), ("region", &remote.region)] {
                if let Some(v) = v {
                    s.set(k, v.as_str());
                }
            }
        }
        if default {
            ini.with_section(Some("core")).set("remote", remote.name.as_str());
        }
        self.write_config(&ini)
    }

    /// Makes `name` the default remote.
    ///
    /// # Errors
    /// No such remote, or the config cannot be written.
    pub fn set_default_remote(&self, name: &str) -> Result<(), DatasetError> {
        self.remote(Some(name))?;
        let mut ini = self.config()?;
        ini.with_section(Some("core")).set("remote", name);
        self.write_config(&ini)
    }
}

/// The path of object `hash` inside a cache or remote: `files/md5/XX/REST`.
pub fn object_relpath(hash: &str) -> String {
    let (head, rest) = hash.split_at(2.min(hash.len()));
    format!("files/md5/{head}/{rest}")
}
