//! What the Styles and Train pages need: the style library ([`library`]), uploaded
//! training datasets ([`datasets`]), one style training ([`training`], shared with
//! `atelier train-style`), style training as a queued task ([`trainer`]) and their HTTP
//! handlers ([`http`]).

pub mod datasets;
pub mod http;
pub mod library;
pub mod trainer;
pub mod training;

pub use library::*;

use crate::ApiError;

/// Files of a style folder the API serves, with their content types.
pub const SERVED_FILES: [(&str, &str); 5] = [
    ("compare.png", "image/png"),
    ("loss.png", "image/png"),
    ("card.json", "application/json"),
    ("adapter.safetensors", "application/octet-stream"),
    ("adapter.diffusers.safetensors", "application/octet-stream"),
];

/// The files of a style that `/api/styles/{name}/files/{file}` serves.
pub fn served_files(s: &StyleEntry) -> Vec<String> {
    SERVED_FILES.iter().map(|(f, _)| f.to_string()).filter(|f| served_path(s, f).is_some_and(|p| p.is_file())).collect()
}

/// The path behind an API file name (`adapter.safetensors` is the kohya file `NAME.safetensors`).
pub fn served_path(s: &StyleEntry, file: &str) -> Option<std::path::PathBuf> {
    match file {
        "adapter.safetensors" => Some(s.adapter()),
        "adapter.diffusers.safetensors" => Some(s.diffusers_adapter()),
        f if SERVED_FILES.iter().any(|(n, _)| *n == f) => Some(s.dir.join(f)),
        _ => None,
    }
}

/// Renames or deletes through `change` after the check both doors (the JSON API and the
/// server functions) make: the style `name` must exist (404); a refused change is a 400
/// on `name` with the library's reason, a failed one what [`LibraryError`] maps to.
pub fn change(
    library: &StyleLibrary,
    name: &str,
    change: impl FnOnce(&StyleLibrary) -> Result<(), LibraryError>,
) -> Result<(), ApiError> {
    if library.find(name).is_none() {
        return Err(ApiError::NotFound { what: "style", id: name.to_string() });
    }
    Ok(change(library)?)
}
