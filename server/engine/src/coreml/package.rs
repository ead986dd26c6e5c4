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

/// Writes the package at `dir` (replacing any package there) from the serialized model
/// specification and its weights. Built beside it and renamed into place, so a failed
/// write (a full disk) leaves the old package, or none, never half of one.
///
/// # Errors
/// The I/O error, with nothing left at `dir` but what was there before.
pub fn write_package(dir: &Path, model_spec: &[u8], weights: BlobWriter) -> std::io::Result<()> {
    let name = dir.file_name().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a package path needs a folder name"))?;
    let parent = dir.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&parent)?;
    let staging = parent.join(format!(".{}.partial", name.to_string_lossy()));
    let _ = std::fs::remove_dir_all(&staging);
    let result = (|| {
        let data = staging.join("Data");
        std::fs::create_dir_all(data.join(WEIGHTS_PATH))?;
        std::fs::write(data.join(MODEL_PATH), model_spec)?;
        std::fs::write(data.join(WEIGHTS_PATH).join("weight.bin"), weights.finish())?;
        let (model_id, weights_id) = (new_id(), new_id());
        std::fs::write(staging.join("Manifest.json"), manifest(&model_id, &weights_id))?;
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::rename(&staging, dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
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
        let mut w = BlobWriter::new();
        w.add_f32(&[0.25; 16]);
        write_package(&dir, b"spec-bytes", w).unwrap();
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
        write_package(&dir, b"second", BlobWriter::new()).unwrap();
        assert_eq!(std::fs::read(dir.join("Data/com.apple.CoreML/model.mlmodel")).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }
}
