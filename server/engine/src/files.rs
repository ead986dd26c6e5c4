//! Writing files so that a reader (or a crash) never sees half of one: [`write_atomic`]
//! for bytes, [`write_json_atomic`] for pretty JSON, and [`write_atomic_with`] for writers
//! that want a path of their own (safetensors, which streams large weight files).
//!
//! All three write a temporary file in the destination's folder (`.NAME.PID-N.tmp`: hidden,
//! unique per process and per write, so two writers never share one), sync it to disk and
//! rename it over the destination, so the path holds either its old content or the complete
//! new one. On any error the temporary file is removed and the old file is left as it was.
//! No folder is created: the destination's folder must exist.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Writes `bytes` to `path` atomically (see the [module documentation](self)).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(
        path,
        |tmp| {
            let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(tmp)?;
            file.write_all(bytes)
        },
        |e| e,
    )
}

/// Writes `value` to `path` as pretty JSON followed by a newline, atomically (see the
/// [module documentation](self)).
pub fn write_json_atomic<T: Serialize + ?Sized>(path: &Path, value: &T) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// [`write_json_atomic`] for the engine's own files: creates the folder first, and errors
/// name the file.
pub(crate) fn save_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> crate::Result<()> {
    let dir = folder(path);
    std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    write_json_atomic(path, value).map_err(|e| crate::Error::io(path, e))
}

/// The general form of [`write_atomic`]: `fill` writes the complete file at the temporary
/// path it is given (creating it); this then syncs it, renames it over `path`, and syncs the
/// folder where the platform allows. Errors of `fill` are returned as they are; those of
/// the file system are turned into `E` by `io_error`. On any error the temporary file is
/// removed.
pub fn write_atomic_with<E>(
    path: &Path,
    fill: impl FnOnce(&Path) -> Result<(), E>,
    io_error: impl FnOnce(std::io::Error) -> E,
) -> Result<(), E> {
    let tmp = match temp_path(path) {
        Ok(tmp) => tmp,
        Err(e) => return Err(io_error(e)),
    };
    let result = match fill(&tmp) {
        Ok(()) => sync_and_rename(&tmp, path).map_err(io_error),
        Err(e) => Err(e),
    };
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Folder of `path` (`.` for a bare file name).
fn folder(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `.NAME.PID-N.tmp` beside `path`, N counting this process's writes.
fn temp_path(path: &Path) -> std::io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{} is not a file path", path.display()))
    })?;
    Ok(folder(path).join(format!(
        ".{}.{}-{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )))
}

fn sync_and_rename(tmp: &Path, path: &Path) -> std::io::Result<()> {
    // Opened for writing: some platforms (Windows) sync only files open for writing.
    std::fs::OpenOptions::new().write(true).open(tmp)?.sync_all()?;
    std::fs::rename(tmp, path)?;
    // Make the rename itself durable. Folders cannot be opened for syncing everywhere, and
    // the file is already complete, so this is best effort.
    #[cfg(unix)]
    if let Ok(dir) = std::fs::File::open(folder(path)) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn round_trip_and_overwrite_leave_only_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        write_atomic(&path, b"first").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        write_atomic(&path, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second, longer");

        let json = dir.path().join("b.json");
        let value = serde_json::json!({ "name": "ink", "steps": [1, 2, 3] });
        write_json_atomic(&json, &value).unwrap();
        let text = std::fs::read_to_string(&json).unwrap();
        assert!(text.ends_with("}\n") && text.contains("\n  \"name\": \"ink\""), "{text}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), value);
        assert_eq!(names(dir.path()), ["a.bin", "b.json"]);
    }

    #[test]
    fn a_failed_write_leaves_no_temporary_file_and_the_old_content() {
        let dir = tempfile::tempdir().unwrap();
        // Into a missing folder: nothing is created.
        let err = write_atomic(&dir.path().join("missing").join("x.json"), b"{}").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        assert!(names(dir.path()).is_empty());

        // A writer that fails half-way: the old file stays, the partial one goes.
        let path = dir.path().join("w.safetensors");
        write_atomic(&path, b"old").unwrap();
        let err = write_atomic_with(
            &path,
            |tmp| {
                std::fs::write(tmp, b"half")?;
                Err(std::io::Error::other("disk full"))
            },
            |e| e,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "disk full");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["w.safetensors"]);

        // Renaming over a folder fails after the temporary file was written.
        let folder = dir.path().join("taken");
        std::fs::create_dir(&folder).unwrap();
        std::fs::write(folder.join("inside"), b"x").unwrap();
        assert!(write_atomic(&folder, b"new").is_err());
        assert_eq!(names(dir.path()), ["taken", "w.safetensors"]);

        // A path without a file name is refused.
        assert_eq!(write_atomic(Path::new("/"), b"x").unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
    }
}
