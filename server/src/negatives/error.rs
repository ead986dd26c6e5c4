//! The one error type of negative-prompt optimisation: requests, the knowledge base and
//! history files, the search and its runs.

use std::path::PathBuf;

use crate::queue::{QueueError, StoreError};
use crate::tracking::TrackingError;
use crate::ApiError;

/// What can go wrong in negative-prompt optimisation. The messages are shown to users as
/// they are (an optimisation that fails shows [`crate::error::report`] of its error).
#[derive(Debug, thiserror::Error)]
pub enum NegativesError {
    /// A request that cannot run; says what to change.
    #[error("invalid {field}: {message}")]
    Invalid { field: String, message: String },
    /// Stopped on request (the search's sink, or the cancel flag while rendering).
    #[error("cancelled")]
    Cancelled,
    /// A studio file or a run's folder could not be read or written.
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The history file does not parse.
    #[error("{path} is damaged ({error})")]
    DamagedHistory { path: PathBuf, error: serde_json::Error },
    /// The studio's copy of the knowledge base does not parse (it is never silently
    /// replaced by the shipped one).
    #[error("{path} is not a valid knowledge base ({error}); fix or delete it to use the shipped one")]
    UnreadableKnowledge { path: PathBuf, error: serde_json::Error },
    /// The studio's copy of the knowledge base breaks a rule of [`KnowledgeBase::check`](super::knowledge::KnowledgeBase::check).
    #[error("{path}: {reason}")]
    InvalidKnowledgeFile { path: PathBuf, reason: String },
    /// A knowledge base to save breaks a rule of [`KnowledgeBase::check`](super::knowledge::KnowledgeBase::check).
    #[error("{0}")]
    InvalidKnowledge(String),
    /// The run's style is not in the library.
    #[error("no style {0:?} in the library")]
    NoStyle(String),
    #[error("the generator returned no image")]
    NoImage,
    /// Rendering, scoring, encoding an image or admitting the run failed.
    #[error(transparent)]
    Engine(#[from] atelier_engine::Error),
    /// Comparing an image with the style's statistics failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// An image of the run could not be read, or the comparison sheet written.
    #[error("{action} {path}")]
    Image {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    /// The run's settings could not be recorded as params.
    #[error("recording the run's settings")]
    Settings(#[source] serde_json::Error),
    /// The experiment store could not record the run.
    #[error(transparent)]
    Tracking(#[from] TrackingError),
    /// The runs' records could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The runs' queue refused.
    #[error(transparent)]
    Queue(#[from] QueueError),
}

impl NegativesError {
    pub(crate) fn io<'a>(action: &'static str, path: &'a std::path::Path) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| NegativesError::Io { action, path: path.to_path_buf(), source }
    }
}

/// A refused request is a 400 on its field, a missing style a 404; a studio knowledge
/// base that must be fixed by hand, a full disk and a cancelled run a 503 saying so; a
/// damaged history or another failure a 500.
impl From<NegativesError> for ApiError {
    fn from(e: NegativesError) -> Self {
        match e {
            NegativesError::Invalid { field, message } => ApiError::Invalid { field, message },
            NegativesError::InvalidKnowledge(message) => ApiError::Invalid { field: "knowledge".into(), message },
            NegativesError::NoStyle(name) => ApiError::NotFound { what: "style", id: name },
            NegativesError::UnreadableKnowledge { .. } | NegativesError::InvalidKnowledgeFile { .. } => ApiError::Unavailable(e.to_string()),
            NegativesError::Cancelled => ApiError::Unavailable("the optimisation was cancelled".into()),
            NegativesError::Io { ref source, .. } | NegativesError::Store(StoreError::Io { ref source, .. }) => ApiError::storage(&e, source),
            NegativesError::Engine(e) => e.into(),
            NegativesError::Tracking(e) => e.into(),
            NegativesError::Queue(e) => e.into(),
            NegativesError::DamagedHistory { .. }
            | NegativesError::NoImage
            | NegativesError::Tensor(_)
            | NegativesError::Image { .. }
            | NegativesError::Settings(_)
            | NegativesError::Store(_) => ApiError::Internal(crate::error::report(&e)),
        }
    }
}
