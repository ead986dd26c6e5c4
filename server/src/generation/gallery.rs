//! The gallery: generated images as PNG files under `<data>/images/<id>.png` (written
//! atomically, with an A1111 `parameters` chunk) and their settings in SQLite
//! (`<data>/gallery.sqlite`). Survives restarts.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use app::dto::{GalleryItem, GalleryPage};
use atelier_engine::pipeline::GenerateParams;
use image::RgbImage;
use rusqlite::{params, Connection, OptionalExtension, Row};

use atelier_engine::metadata::ImageMetadata;

use atelier_engine::files::write_atomic;
use atelier_engine::metadata::encode_png;

/// Gallery failures: storage problems only (bad ids are simply "not found").
#[derive(Debug, thiserror::Error)]
pub enum GalleryError {
    #[error("gallery database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding PNG: {0}")]
    Png(#[from] atelier_engine::Error),
}

/// Largest page [`Gallery::list`] returns.
pub const MAX_PAGE: usize = 200;

/// Images on disk plus their metadata in SQLite.
pub struct Gallery {
    images_dir: PathBuf,
    db: Mutex<Connection>,
}

/// What is stored with one image besides its pixels.
pub struct NewImage<'a> {
    pub params: &'a GenerateParams,
    /// This image's seed (`params.seed + batch index`).
    pub seed: u64,
    pub model_name: &'a str,
    pub model_hash: &'a str,
    /// (name, short hash) of the LoRA adapters used, for A1111's `Lora hashes`.
    pub adapters: &'a [(String, String)],
    pub warnings: &'a [String],
    /// More `Key: value` pairs for the `parameters` chunk, after the standard ones.
    pub extra: &'a [(String, String)],
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS images (
    id              TEXT PRIMARY KEY,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    prompt          TEXT NOT NULL,
    negative_prompt TEXT NOT NULL,
    steps           INTEGER NOT NULL,
    guidance        REAL NOT NULL,
    seed            TEXT NOT NULL,      -- u64 as decimal text: SQLite integers are i64
    scheduler       TEXT NOT NULL,
    width           INTEGER NOT NULL,
    height          INTEGER NOT NULL,
    strength        REAL NOT NULL,
    has_init_image  INTEGER NOT NULL,
    model_name      TEXT NOT NULL,
    model_hash      TEXT NOT NULL,
    file            TEXT NOT NULL,      -- relative to the data dir
    warnings        TEXT NOT NULL       -- JSON array of strings
);
CREATE INDEX IF NOT EXISTS images_created ON images (created_at);
";

const COLUMNS: &str = "id, created_at, prompt, negative_prompt, steps, guidance, seed, scheduler, \
                       width, height, strength, has_init_image, model_name, model_hash, warnings";

impl Gallery {
    /// Opens (creating if needed) the gallery in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, GalleryError> {
        let images_dir = data_dir.join("images");
        std::fs::create_dir_all(&images_dir)
            .map_err(|source| GalleryError::Io { path: images_dir.clone(), source })?;
        let db = Connection::open(data_dir.join("gallery.sqlite"))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.execute_batch(SCHEMA)?;
        Ok(Self { images_dir, db: Mutex::new(db) })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (it has its own
        // transactions), so a poisoned lock is still usable.
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The PNG path of image `id`, or `None` if `id` is not a well-formed image id.
    pub fn image_path(&self, id: &str) -> Option<PathBuf> {
        uuid::Uuid::parse_str(id).ok()?;
        Some(self.images_dir.join(format!("{id}.png")))
    }

    /// Writes the PNG (with its `parameters` chunk), then records it. Returns the new id.
    pub fn save(&self, img: &RgbImage, meta: &NewImage<'_>) -> Result<String, GalleryError> {
        let id = uuid::Uuid::new_v4().to_string();
        let mut text = ImageMetadata::for_generation(meta.params, &meta.params.prompt, meta.seed, meta.model_hash, Some(meta.model_name), meta.adapters);
        text.extra.extend(meta.extra.iter().cloned());
        let bytes = encode_png(img, &text)?;
        let path = self.images_dir.join(format!("{id}.png"));
        write_atomic(&path, &bytes).map_err(|source| GalleryError::Io { path: path.clone(), source })?;
        let p = meta.params;
        let warnings = serde_json::to_string(meta.warnings).unwrap_or_else(|_| "[]".into());
        let inserted = self.db().execute(
            "INSERT INTO images (id, prompt, negative_prompt, steps, guidance, seed, scheduler, width, \
             height, strength, has_init_image, model_name, model_hash, file, warnings) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            params![
                id,
                p.prompt,
                p.negative_prompt,
                p.steps as i64,
                p.guidance,
                meta.seed.to_string(),
                p.scheduler.to_string(),
                p.width as i64,
                p.height as i64,
                p.strength,
                p.init_image.is_some(),
                meta.model_name,
                meta.model_hash,
                format!("images/{id}.png"),
                warnings,
            ],
        );
        if let Err(e) = inserted {
            let _ = std::fs::remove_file(&path);
            return Err(e.into());
        }
        Ok(id)
    }

    /// A page of images, newest first. `limit` is capped at [`MAX_PAGE`].
    pub fn list(&self, offset: usize, limit: usize) -> Result<GalleryPage, GalleryError> {
        let limit = limit.min(MAX_PAGE);
        let db = self.db();
        let total: i64 = db.query_row("SELECT COUNT(*) FROM images", [], |r| r.get(0))?;
        let mut stmt = db.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM images ORDER BY created_at DESC, rowid DESC LIMIT ?1 OFFSET ?2"
        ))?;
        let items = stmt
            .query_map(params![limit as i64, offset as i64], item_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(GalleryPage { items, total: total as usize, offset, limit })
    }

    /// One image's metadata.
    pub fn get(&self, id: &str) -> Result<Option<GalleryItem>, GalleryError> {
        let item = self
            .db()
            .query_row(&format!("SELECT {COLUMNS} FROM images WHERE id = ?1"), [id], item_from_row)
            .optional()?;
        Ok(item)
    }

    /// Deletes an image's record and file. Returns false if there was no such image.
    pub fn delete(&self, id: &str) -> Result<bool, GalleryError> {
        let removed = self.db().execute("DELETE FROM images WHERE id = ?1", [id])?;
        if removed == 0 {
            return Ok(false);
        }
        if let Some(path) = self.image_path(id) {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(GalleryError::Io { path, source }),
            }
        }
        Ok(true)
    }
}

fn item_from_row(r: &Row<'_>) -> rusqlite::Result<GalleryItem> {
    let id: String = r.get(0)?;
    let seed: String = r.get(6)?;
    let warnings: String = r.get(14)?;
    Ok(GalleryItem {
        url: app::dto::image_url(&id),
        id,
        created_at: r.get(1)?,
        prompt: r.get(2)?,
        negative_prompt: r.get(3)?,
        steps: r.get::<_, i64>(4)? as usize,
        guidance: r.get(5)?,
        seed: seed.parse().unwrap_or_default(),
        scheduler: r.get(7)?,
        width: r.get::<_, i64>(8)? as usize,
        height: r.get::<_, i64>(9)? as usize,
        strength: r.get(10)?,
        has_init_image: r.get(11)?,
        model_name: r.get(12)?,
        model_hash: r.get(13)?,
        warnings: serde_json::from_str(&warnings).unwrap_or_default(),
    })
}

impl From<GalleryError> for crate::ApiError {
    fn from(e: GalleryError) -> Self {
        crate::ApiError::Internal(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_list_get_delete_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let params = GenerateParams { prompt: "a red fox".into(), seed: u64::MAX, ..Default::default() };
        let img = RgbImage::from_pixel(64, 64, image::Rgb([200, 40, 10]));
        let meta = NewImage { params: &params, seed: u64::MAX, model_name: "m", model_hash: "abc", adapters: &[], warnings: &["w".into()], extra: &[] };
        let (a, b) = {
            let g = Gallery::open(dir.path()).unwrap();
            (g.save(&img, &meta).unwrap(), g.save(&img, &meta).unwrap())
        };
        let g = Gallery::open(dir.path()).unwrap();
        let page = g.list(0, 10).unwrap();
        assert_eq!(page.total, 2);
        assert_eq!(page.items[0].id, b, "newest first");
        let item = g.get(&a).unwrap().unwrap();
        assert_eq!((item.seed, item.prompt.as_str(), item.warnings.len()), (u64::MAX, "a red fox", 1));
        assert!(g.image_path(&a).unwrap().exists());
        assert!(g.delete(&a).unwrap());
        assert!(!g.delete(&a).unwrap());
        assert!(g.image_path("../etc/passwd").is_none());
        assert_eq!(g.list(0, 10).unwrap().total, 1);
    }
}
