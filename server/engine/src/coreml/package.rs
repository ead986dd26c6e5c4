//! The `.mlpackage` folder of an ML Program, laid out as coremltools 9.0 writes it (facts in
//! `shared/notes/coreml-export.md`):
//!
//! ```text
//! NAME.mlpackage/
//!   Manifest.json
//!   Data/com.apple.CoreML/model.mlmodel        (a CoreML.Specification.Model protobuf)
//!   Data/com.apple.CoreML/weights/weight.bin   (MIL blob storage, see [`super::blob`])
//! ```
//!
//! `Manifest.json` has `fileFormatVersion` "1.0.0", `itemInfoEntries` keyed by UUID (author
//! `com.apple.CoreML`, a description, the name, and the path relative to `Data/`), and
//! `rootModelIdentifier`, the UUID of the model entry.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::blob::BlobWriter;

/// Relative to the package's `Data/` folder.
pub const MODEL_PATH: &str = "com.apple.CoreML/model.mlmodel";
pub const WEIGHTS_PATH: &str = "com.apple.CoreML/weights";

/// The `Manifest.json` text for a package with a model entry `model_id` and a weights
/// entry `weights_id` (UUIDs).
pub fn manifest(model_id: &str, weights_id: &str) -> String {
    let entry = |description: &str, name: &str, path: &str| json!({ "author": "com.apple.CoreML", "description": description, "name": name, "path": path });
    let value = json!({
        "fileFormatVersion": "1.0.0",
        "itemInfoEntries": {
            model_id: entry("CoreML Model Specification", "model.mlmodel", MODEL_PATH),
            weights_id: entry("CoreML Model Weights", "weights", WEIGHTS_PATH),
        },
        "rootModelIdentifier": model_id,
    });
    serde_json::to_string_pretty(&value).expect("a JSON value always serializes")
}

/// A package being written: built in a hidden staging folder beside `dir`, its weight file
/// streamed blob by blob ([`PackageWriter::weights`]), then renamed into place by
/// [`PackageWriter::finish`]. Dropped unfinished (an error, a full disk, a cancelled export),
/// it removes the staging folder, so the output folder never holds half a package.
pub struct PackageWriter {
    dir: PathBuf,
    staging: PathBuf,
    weights: Option<BlobWriter<BufWriter<File>>>,
}

impl PackageWriter {
    /// Starts the package that will be `dir` (e.g. `out/Unet.mlpackage`).
    ///
    /// # Errors
    /// The I/O error of making the staging folder or the weight file.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        let name = dir.file_name().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a package path needs a folder name"))?;
        let parent = dir.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        std::fs::create_dir_all(&parent)?;
        let staging = parent.join(format!(".{}.partial", name.to_string_lossy()));
        let _ = std::fs::remove_dir_all(&staging);
        let mut writer = Self { dir: dir.to_path_buf(), staging: staging.clone(), weights: None };
        let weights_dir = staging.join("Data").join(WEIGHTS_PATH);
        std::fs::create_dir_all(&weights_dir)?;
        writer.weights = Some(BlobWriter::create(&weights_dir.join("weight.bin"))?);
        Ok(writer)
    }

    /// The weight file being written.
    pub fn weights(&mut self) -> &mut BlobWriter<BufWriter<File>> {
        self.weights.as_mut().expect("weights are present until finish")
    }

    /// Writes the model specification and the manifest, syncs, and moves the package into
    /// place (replacing any package at `dir`). Returns the package's size in bytes.
    ///
    /// # Errors
    /// The I/O error; the staging folder is removed and `dir` keeps what it held.
    pub fn finish(mut self, model_spec: &[u8]) -> std::io::Result<u64> {
        let weights = self.weights.take().expect("weights are present until finish");
        let file = weights.finish()?.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let data = self.staging.join("Data");
        crate::files::write_atomic(&data.join(MODEL_PATH), model_spec)?;
        let (model_id, weights_id) = (new_id(), new_id());
        crate::files::write_atomic(&self.staging.join("Manifest.json"), manifest(&model_id, &weights_id).as_bytes())?;
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir)?;
        }
        std::fs::rename(&self.staging, &self.dir)?;
        Ok(dir_size(&self.dir))
    }
}

impl Drop for PackageWriter {
    fn drop(&mut self) {
        if self.staging.exists() {
            self.weights = None;
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

/// Total size of the files under `path`, in bytes.
pub fn dir_size(path: &Path) -> u64 {
    let Ok(meta) = std::fs::metadata(path) else { return 0 };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path).map(|it| it.flatten().map(|e| dir_size(&e.path())).sum()).unwrap_or(0)
}

/// A random (v4) UUID in the upper-case form Apple's package writer uses.
fn new_id() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string().to_uppercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_are_laid_out_as_coremltools_writes_them() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("Unet.mlpackage");
        let mut w = PackageWriter::create(&dir).unwrap();
        w.weights().add_f32(&[0.25; 16]).unwrap();
        let size = w.finish(b"spec-bytes").unwrap();
        assert!(size > 128 + 64, "{size}");
        assert_eq!(std::fs::read(dir.join("Data/com.apple.CoreML/model.mlmodel")).unwrap(), b"spec-bytes");
        let blobs = std::fs::read(dir.join("Data/com.apple.CoreML/weights/weight.bin")).unwrap();
        assert_eq!(super::super::blob::read(&blobs).unwrap().len(), 1);
        let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("Manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest["fileFormatVersion"], "1.0.0");
        let root = manifest["rootModelIdentifier"].as_str().unwrap();
        assert_eq!(root.len(), 36);
        assert_eq!(root, root.to_uppercase());
        let entries = manifest["itemInfoEntries"].as_object().unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[root]["path"], "com.apple.CoreML/model.mlmodel");
        assert_eq!(entries[root]["author"], "com.apple.CoreML");
        let weights = entries.iter().find(|(k, _)| k.as_str() != root).unwrap().1;
        assert_eq!((weights["name"].as_str(), weights["path"].as_str()), (Some("weights"), Some("com.apple.CoreML/weights")));

        // Written again: replaced whole, no staging folder left.
        PackageWriter::create(&dir).unwrap().finish(b"second").unwrap();
        assert_eq!(std::fs::read(dir.join("Data/com.apple.CoreML/model.mlmodel")).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);

        // Dropped unfinished (an error mid-export): nothing half-written is left.
        let other = tmp.path().join("VAEDecoder.mlpackage");
        let mut w = PackageWriter::create(&other).unwrap();
        w.weights().add_f32(&[1.0; 16]).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1, "only Unet.mlpackage");
    }
}
