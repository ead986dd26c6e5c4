//! The API's one error type: logs the detail once and answers JSON `{"error": "..."}`.

use app::dto::ErrorBody;
use app::AppError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Everything a request can fail with. Messages name the problem and are safe to show.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A parameter is out of range or unknown.
    #[error("invalid {field}: {message}")]
    Invalid { field: String, message: String },
    /// The init image is not base64 or not a PNG/JPEG/WebP.
    #[error("cannot read init_image: {0}")]
    BadImage(String),
    /// The body is not the JSON the endpoint expects.
    #[error("bad request body: {0}")]
    BadBody(String),
    /// The query string does not parse (a field of the wrong type).
    #[error("bad query string: {0}")]
    BadQuery(String),
    #[error("request body is larger than the {} MB limit", .limit / (1024 * 1024))]
    TooLarge { limit: usize },
    #[error("no {what} with id {id:?}")]
    NotFound { what: &'static str, id: String },
    #[error("no API route {0}; see the README for the endpoints")]
    UnknownRoute(String),
    /// The path exists but not with this method.
    #[error("{0} is not allowed here; see the README for the endpoint's methods")]
    WrongMethod(String),
    /// The request would need more memory than the studio allows; says what would fit.
    #[error("{0}")]
    OverBudget(String),
    #[error("the {noun} queue is full ({waiting} waiting); try again later")]
    QueueFull { noun: &'static str, waiting: usize },
    /// The server cannot do this now (a feature that is off, a full disk); says what to do.
    #[error("{0}")]
    Unavailable(String),
    /// A server-side failure; the detail goes to the log only.
    #[error("internal error: {0}")]
    Internal(String),
}

/// `e` and its causes as one line, `error: cause: cause`, the way `anyhow` shows a chain
/// with `{:#}`; a cause whose text the line already holds (an error that shows its source
/// in its own message) is not repeated.
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

/// True when `e` says the disk is full (ENOSPC): the user can fix it by freeing space.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(28)
}

impl ApiError {
    /// A failure to read or write the studio's files (`io` is the I/O error under `e`): a
    /// full disk is the user's to fix (503, "free some space"), anything else is internal.
    pub fn storage(e: &(dyn std::error::Error + 'static), io: &std::io::Error) -> Self {
        if is_disk_full(io) {
            ApiError::Unavailable(format!("the server's disk is full ({}); free some space and try again", report(e)))
        } else {
            ApiError::Internal(report(e))
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid { .. } | ApiError::BadImage(_) | ApiError::BadBody(_) | ApiError::BadQuery(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::OverBudget(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound { .. } | ApiError::UnknownRoute(_) => StatusCode::NOT_FOUND,
            ApiError::WrongMethod(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::QueueFull { .. } | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The message sent to the client: internal details stay in the log.
    fn public_message(&self) -> String {
        match self {
            ApiError::Internal(_) => "internal server error; see the server log".into(),
            other => other.to_string(),
        }
    }

    /// Logs once, at a level matching who is at fault (a full queue or a feature that is
    /// off is not a failure of the server).
    fn log(&self) {
        if matches!(self, ApiError::QueueFull { .. } | ApiError::Unavailable(_)) {
            tracing::warn!(error = %self, "request refused");
        } else if self.status().is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::info!(error = %self, "request rejected");
        }
    }
}

impl From<atelier_engine::Error> for ApiError {
    fn from(e: atelier_engine::Error) -> Self {
        match e {
            atelier_engine::Error::InvalidInput { field, message } => {
                ApiError::Invalid { field: field.into(), message }
            }
            atelier_engine::Error::Image(m) => ApiError::BadImage(m),
            atelier_engine::Error::OutOfMemory(m) => ApiError::OverBudget(m),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        (self.status(), Json(ErrorBody { error: self.public_message() })).into_response()
    }
}

/// Server functions report the same errors, through the UI's error type.
impl From<ApiError> for AppError {
    fn from(e: ApiError) -> Self {
        e.log();
        let message = e.public_message();
        match e.status() {
            StatusCode::NOT_FOUND => AppError::NotFound(message),
            StatusCode::PAYLOAD_TOO_LARGE => AppError::TooLarge(message),
            s if s.is_client_error() || s == StatusCode::SERVICE_UNAVAILABLE => AppError::BadRequest(message),
            _ => AppError::Internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::styles::LibraryError;

    fn io(code: i32) -> std::io::Error {
        std::io::Error::from_raw_os_error(code)
    }

    #[test]
    fn report_shows_each_cause_once() {
        let e = LibraryError::Io { action: "creating", path: "/data/styles/ink".into(), source: io(13) };
        assert_eq!(report(&e), format!("creating /data/styles/ink: {}", io(13)));
        // The engine's I/O error shows its source in its own message: not repeated.
        let e = atelier_engine::Error::Io { path: "/m/unet".into(), source: io(2) };
        assert_eq!(report(&e), format!("/m/unet: {}", io(2)));
    }

    #[test]
    fn library_errors_get_the_status_of_what_went_wrong() {
        let status = |e: LibraryError| ApiError::from(e).status();
        assert_eq!(status(LibraryError::BadName("a b".into())), StatusCode::BAD_REQUEST);
        assert_eq!(status(LibraryError::Builtin("ink".into())), StatusCode::BAD_REQUEST);
        assert_eq!(status(LibraryError::NameTaken("ink".into())), StatusCode::BAD_REQUEST);
        assert_eq!(status(LibraryError::NotFound("ink".into())), StatusCode::NOT_FOUND);
        assert_eq!(status(LibraryError::Io { action: "renaming", path: "/s/ink".into(), source: io(13) }), StatusCode::INTERNAL_SERVER_ERROR);
        let full = ApiError::from(LibraryError::Io { action: "writing", path: "/s/ink/card.json".into(), source: io(28) });
        assert_eq!(full.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(full.to_string().contains("writing /s/ink/card.json") && full.to_string().contains("free some space"), "{full}");
    }

    #[test]
    fn a_studio_knowledge_base_to_fix_by_hand_is_a_503_saying_so() {
        use crate::negatives::NegativesError;
        let error = serde_json::from_str::<serde_json::Value>("{ not json").unwrap_err();
        let e = ApiError::from(NegativesError::UnreadableKnowledge { path: "/d/negatives/knowledge.json".into(), error });
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(e.public_message().contains("fix or delete it"), "{e}");
        let e = ApiError::from(NegativesError::Invalid { field: "seeds".into(), message: "between 1 and 16, not 0".into() });
        assert_eq!((e.status(), e.to_string()), (StatusCode::BAD_REQUEST, "invalid seeds: between 1 and 16, not 0".to_string()));
    }
}
