//! The engine's error type: every failure a user can cause names what is wrong.

use std::path::PathBuf;

/// Errors from loading models and running them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (shape mismatch inside a model, device error, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A model folder lacks a component or a config file.
    #[error("model folder {dir} is missing {what}; a diffusers folder needs model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/")]
    MissingComponent { dir: PathBuf, what: String },
    /// A config file could not be parsed or holds unsupported values.
    #[error("bad config {path}: {message}")]
    Config { path: PathBuf, message: String },
    /// A weight file is corrupt, truncated, or does not match the config.
    #[error("weights {path}: {message}")]
    Weights { path: PathBuf, message: String },
    /// A request parameter is out of range.
    #[error("invalid {field}: {message}")]
    InvalidInput { field: &'static str, message: String },
    /// An input image could not be decoded.
    #[error("cannot read image: {0}")]
    Image(String),
    /// The caller cancelled the run.
    #[error("cancelled")]
    Cancelled,
    /// A tokenizer file is missing or malformed.
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// Image metadata (the A1111 `parameters` text, PNG chunks) could not be written or parsed.
    #[error("image metadata: {0}")]
    Metadata(String),
    /// A LoRA file is malformed or does not fit the loaded model.
    #[error("LoRA {name}: {message}")]
    Lora { name: String, message: String },
    /// A run would need more memory than this process may use; says what would fit.
    #[error("{0}")]
    OutOfMemory(String),
    /// A hub model id could not be resolved.
    #[error("model {id}: {message}")]
    Hub { id: String, message: String },
}

/// Result alias for the engine.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidInput { field, message: message.into() }
    }
}
