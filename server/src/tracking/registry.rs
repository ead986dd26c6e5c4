//! The model registry, with MLflow's data model: a *registered model* per style; each
//! finished training of it is a new *model version* (1, 2, …) holding a frozen copy of
//! its adapter files, the run that made it, and its metadata as version tags (trigger
//! word, base model and hash, dataset hash, rank/alpha, steps, before/after metrics);
//! *aliases* (`production`, `staging`, any name) point at one version each and are moved
//! by setting them again. Prompts use a version as `<lora:NAME@ALIAS:W>` or
//! `<lora:NAME@3:W>` (see [`crate::styles::StyleLibrary::find`]).
//!
//! Stored in the experiment store's database (tables below) with the version files in
//! `TRACKING/registry/NAME/VERSION/`; mirrored to MLflow's registry by
//! [`super::mlflow::Mirror::sync_registry`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{params, OptionalExtension};

use super::{now_ms, Tracker, TrackingError};

pub use app::dto::{ModelVersion, RegisteredModel};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS registered_models (
    name              TEXT PRIMARY KEY,
    creation_time     INTEGER NOT NULL,
    last_updated_time INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS model_versions (
    name          TEXT NOT NULL REFERENCES registered_models(name),
    version       INTEGER NOT NULL,
    creation_time INTEGER NOT NULL,
    kind          TEXT NOT NULL,          -- style | blend
    run_uuid      TEXT,
    source        TEXT NOT NULL,          -- the folder holding the version's files
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS model_version_tags (
    name    TEXT NOT NULL,
    version INTEGER NOT NULL,
    key     TEXT NOT NULL,
    value   TEXT NOT NULL,
    PRIMARY KEY (name, version, key)
);
CREATE TABLE IF NOT EXISTS registered_model_aliases (
    name    TEXT NOT NULL,
    alias   TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (name, alias)
);
";

/// Checks an alias as MLflow does: 1–255 of letters, digits, `-`, `_`, `.`; not
/// `latest` (it means the newest version) and not `vN` or a bare number (they read as
/// version numbers).
pub fn check_alias(alias: &str) -> Result<(), TrackingError> {
    let ok = !alias.is_empty()
        && alias.len() <= 255
        && alias.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !alias.eq_ignore_ascii_case("latest")
        && !alias.chars().all(|c| c.is_ascii_digit())
        && !(alias.len() > 1 && alias.starts_with(['v', 'V']) && alias[1..].chars().all(|c| c.is_ascii_digit()));
    if ok {
        Ok(())
    } else {
        Err(TrackingError::BadAlias(alias.to_string()))
    }
}

impl Tracker {
    /// The folder of a version's files.
    pub fn version_dir(&self, name: &str, version: i64) -> PathBuf {
        self.root.join("registry").join(name).join(version.to_string())
    }

    /// Registers a new version of `name` (creating the registered model the first time):
    /// copies `files` into the version's folder, records the run and the tags. Returns
    /// the version.
    ///
    /// # Errors
    /// A file that cannot be copied (nothing is registered then), or the database.
    pub fn register_version(&self, name: &str, kind: &str, files: &[PathBuf], run: Option<&str>, tags: &[(String, String)]) -> Result<ModelVersion, TrackingError> {
        let version: i64 = self.db().query_row("SELECT COALESCE(MAX(version), 0) + 1 FROM model_versions WHERE name = ?1", [name], |r| r.get(0))?;
        // Files first, into a temporary folder renamed into place: a version is listed only
        // once its files are complete.
        let dir = self.version_dir(name, version);
        let parent = dir.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(|source| TrackingError::Io { path: parent.clone(), source })?;
        let tmp = parent.join(format!(".{version}.partial"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|source| TrackingError::Io { path: tmp.clone(), source })?;
        for f in files {
            let file_name = f.file_name().ok_or_else(|| TrackingError::NoFileName(f.clone()))?;
            std::fs::copy(f, tmp.join(file_name)).map_err(|source| TrackingError::Artifact { path: f.clone(), source })?;
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).map_err(|source| TrackingError::Io { path: dir.clone(), source })?;

        let now = now_ms();
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute(
            "INSERT INTO registered_models (name, creation_time, last_updated_time) VALUES (?1, ?2, ?2) \
             ON CONFLICT (name) DO UPDATE SET last_updated_time = ?2",
            params![name, now],
        )?;
        tx.execute(
            "INSERT INTO model_versions (name, version, creation_time, kind, run_uuid, source) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![name, version, now, kind, run, dir.display().to_string()],
        )?;
        for (k, v) in tags {
            tx.execute("INSERT OR REPLACE INTO model_version_tags (name, version, key, value) VALUES (?1, ?2, ?3, ?4)", params![name, version, k, v])?;
        }
        tx.commit()?;
        drop(db);
        Ok(self.model_version(name, version)?.expect("just registered"))
    }

    /// One version with its tags and aliases.
    pub fn model_version(&self, name: &str, version: i64) -> Result<Option<ModelVersion>, TrackingError> {
        let db = self.db();
        let row = db
            .query_row(
                "SELECT creation_time, kind, run_uuid, source FROM model_versions WHERE name = ?1 AND version = ?2",
                params![name, version],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, Option<String>>(2)?, r.get::<_, String>(3)?)),
            )
            .optional()?;
        let Some((creation_time, kind, run_id, source)) = row else { return Ok(None) };
        let mut st = db.prepare("SELECT key, value FROM model_version_tags WHERE name = ?1 AND version = ?2 ORDER BY key")?;
        let tags: BTreeMap<String, String> = st.query_map(params![name, version], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?;
        let mut st = db.prepare("SELECT alias FROM registered_model_aliases WHERE name = ?1 AND version = ?2 ORDER BY alias")?;
        let aliases: Vec<String> = st.query_map(params![name, version], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
        Ok(Some(ModelVersion { name: name.to_string(), version, creation_time, kind, run_id, source, tags, aliases }))
    }

    /// Every registered model, by name, with its versions (newest first) and aliases.
    pub fn registered_models(&self) -> Result<Vec<RegisteredModel>, TrackingError> {
        let names: Vec<String> = {
            let db = self.db();
            let mut st = db.prepare("SELECT name FROM registered_models ORDER BY name")?;
            let rows = st.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
            rows
        };
        names.iter().filter_map(|n| self.registered_model(n).transpose()).collect()
    }

    /// One registered model (exact name, else case-insensitive).
    pub fn registered_model(&self, name: &str) -> Result<Option<RegisteredModel>, TrackingError> {
        let row = {
            let db = self.db();
            db.query_row(
                "SELECT name, creation_time, last_updated_time FROM registered_models WHERE name = ?1 \
                 UNION ALL SELECT name, creation_time, last_updated_time FROM registered_models WHERE name = ?1 COLLATE NOCASE LIMIT 1",
                [name],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)),
            )
            .optional()?
        };
        let Some((name, creation_time, last_updated_time)) = row else { return Ok(None) };
        let numbers: Vec<i64> = {
            let db = self.db();
            let mut st = db.prepare("SELECT version FROM model_versions WHERE name = ?1 ORDER BY version DESC")?;
            let rows = st.query_map([&name], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
            rows
        };
        let versions = numbers.iter().filter_map(|v| self.model_version(&name, *v).transpose()).collect::<Result<Vec<_>, _>>()?;
        let aliases: BTreeMap<String, i64> = {
            let db = self.db();
            let mut st = db.prepare("SELECT alias, version FROM registered_model_aliases WHERE name = ?1 ORDER BY alias")?;
            let rows = st.query_map([&name], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?;
            rows
        };
        Ok(Some(RegisteredModel { name, creation_time, last_updated_time, aliases, versions }))
    }

    /// Points `alias` of `name` at `version` (moving it if it pointed elsewhere).
    ///
    /// # Errors
    /// [`TrackingError::BadAlias`], or [`TrackingError::NoVersion`] when the version does
    /// not exist.
    pub fn set_alias(&self, name: &str, alias: &str, version: i64) -> Result<(), TrackingError> {
        check_alias(alias)?;
        let model = self.registered_model(name)?.ok_or_else(|| TrackingError::NoModel(name.to_string()))?;
        if !model.versions.iter().any(|v| v.version == version) {
            return Err(TrackingError::NoVersion { name: model.name, version: version.to_string() });
        }
        self.db().execute(
            "INSERT INTO registered_model_aliases (name, alias, version) VALUES (?1, ?2, ?3) ON CONFLICT (name, alias) DO UPDATE SET version = ?3",
            params![model.name, alias, version],
        )?;
        self.db().execute("UPDATE registered_models SET last_updated_time = ?2 WHERE name = ?1", params![model.name, now_ms()])?;
        Ok(())
    }

    /// Removes `alias` of `name`; `false` when it was not set.
    pub fn delete_alias(&self, name: &str, alias: &str) -> Result<bool, TrackingError> {
        let model = self.registered_model(name)?.ok_or_else(|| TrackingError::NoModel(name.to_string()))?;
        let n = self.db().execute("DELETE FROM registered_model_aliases WHERE name = ?1 AND alias = ?2", params![model.name, alias])?;
        Ok(n > 0)
    }

    /// The version `selector` of `name` names: a number (`3`, `v3`), `latest`, or an alias.
    ///
    /// # Errors
    /// [`TrackingError::NoModel`] or [`TrackingError::NoVersion`] (listing what exists).
    pub fn resolve_version(&self, name: &str, selector: &str) -> Result<ModelVersion, TrackingError> {
        let model = self.registered_model(name)?.ok_or_else(|| TrackingError::NoModel(name.to_string()))?;
        let number = selector.strip_prefix(['v', 'V']).unwrap_or(selector).parse::<i64>().ok();
        let version = if selector.eq_ignore_ascii_case("latest") {
            model.versions.first().map(|v| v.version)
        } else if let Some(n) = number.filter(|_| selector.chars().last().is_some_and(|c| c.is_ascii_digit())) {
            model.versions.iter().find(|v| v.version == n).map(|v| v.version)
        } else {
            model.aliases.get(selector).copied()
        };
        let missing = || {
            let mut known: Vec<String> = model.versions.iter().map(|v| v.version.to_string()).collect();
            known.extend(model.aliases.keys().cloned());
            TrackingError::NoVersion { name: model.name.clone(), version: format!("{selector} (known: {})", known.join(", ")) }
        };
        let version = version.ok_or_else(missing)?;
        self.model_version(&model.name, version)?.ok_or_else(missing)
    }

    /// Registers a baked blend (a kohya LoRA file, `atelier blend bake` or the Blend page's
    /// bake) as a new version of `name`, kind `blend`, with its components as tags
    /// (`components` "NAME:WEIGHT, …", `component_hashes`, `base_model_hash`, `rank`
    /// ("exact" or R), `relative_error`, and the blend's share `link`). The file is stored
    /// as `NAME.safetensors`, so prompts use it as `<lora:NAME@VERSION>`.
    ///
    /// # Errors
    /// A name that is not a valid style name, an unreadable file, or the database.
    pub fn register_blend(&self, name: &str, file: &Path, blend: &atelier_blend::Blend, rank: Option<usize>, relative_error: f64) -> Result<ModelVersion, TrackingError> {
        crate::styles::check_name(name).map_err(|e| TrackingError::BadName(e.to_string()))?;
        let staging = tempfile::tempdir_in(&self.root).map_err(|source| TrackingError::Io { path: self.root.clone(), source })?;
        let named = staging.path().join(format!("{name}.safetensors"));
        std::fs::copy(file, &named).map_err(|source| TrackingError::Artifact { path: file.to_path_buf(), source })?;
        let join = |f: &dyn Fn(&atelier_blend::BlendStyle) -> String| blend.styles.iter().map(f).collect::<Vec<_>>().join(", ");
        let tags: Vec<(String, String)> = vec![
            ("components".into(), join(&|s| format!("{}:{}", s.name, s.weight))),
            ("component_hashes".into(), join(&|s| format!("{}={}", s.name, s.hash))),
            ("base_model_hash".into(), blend.model_hash.clone()),
            ("rank".into(), rank.map_or_else(|| "exact".to_string(), |r| r.to_string())),
            ("relative_error".into(), format!("{relative_error:.6}")),
            ("link".into(), atelier_blend::encode(blend).unwrap_or_default()),
        ];
        self.register_version(name, "blend", &[named], None, &tags)
    }

    /// The store's folder.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_aliases_and_selectors() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tracker::open(dir.path()).unwrap();
        let f = dir.path().join("ink.safetensors");
        std::fs::write(&f, b"v1").unwrap();
        let v1 = t.register_version("ink", "style", std::slice::from_ref(&f), None, &[("rank".into(), "4".into())]).unwrap();
        std::fs::write(&f, b"v2").unwrap();
        let v2 = t.register_version("ink", "style", std::slice::from_ref(&f), None, &[("rank".into(), "8".into())]).unwrap();
        assert_eq!((v1.version, v2.version), (1, 2));
        assert_eq!(std::fs::read(Path::new(&v1.source).join("ink.safetensors")).unwrap(), b"v1", "versions keep their own files");
        assert_eq!(v2.tags["rank"], "8");

        t.set_alias("ink", "production", 1).unwrap();
        assert_eq!(t.resolve_version("ink", "production").unwrap().version, 1);
        t.set_alias("ink", "production", 2).unwrap();
        assert_eq!(t.resolve_version("INK", "production").unwrap().version, 2, "moved; names case-insensitive");
        assert_eq!(t.resolve_version("ink", "1").unwrap().version, 1);
        assert_eq!(t.resolve_version("ink", "v1").unwrap().version, 1);
        assert_eq!(t.resolve_version("ink", "latest").unwrap().version, 2);
        assert_eq!(t.model_version("ink", 2).unwrap().unwrap().aliases, vec!["production".to_string()]);
        let e = t.resolve_version("ink", "staging").unwrap_err().to_string();
        assert!(e.contains("staging") && e.contains("known: 2, 1, production"), "{e}");
        assert!(matches!(t.set_alias("ink", "staging", 9), Err(TrackingError::NoVersion { .. })));
        for bad in ["latest", "v2", "3", "a b", ""] {
            assert!(matches!(t.set_alias("ink", bad, 1), Err(TrackingError::BadAlias(_))), "{bad}");
        }
        assert!(matches!(t.resolve_version("nope", "1"), Err(TrackingError::NoModel(_))));
        assert!(t.delete_alias("ink", "production").unwrap());
        assert!(!t.delete_alias("ink", "production").unwrap());
        let all = t.registered_models().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].versions.iter().map(|v| v.version).collect::<Vec<_>>(), vec![2, 1], "newest first");
    }
}
