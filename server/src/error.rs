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
    #[error("request body is larger than the {} MB limit", .limit / (1024 * 1024))]
    TooLarge { limit: usize },
    #[error("no {what} with id {id:?}")]
    NotFound { what: &'static str, id: String },
    #[error("no API route {0}; see the README for the endpoints")]
    UnknownRoute(String),
    /// The request would need more memory than the studio allows; says what would fit.
    #[error("{0}")]
    OverBudget(String),
    #[error("the queue is full ({0} jobs waiting); try again later")]
    QueueFull(usize),
    /// The server cannot do this now (a feature that is off, a full disk); says what to do.
    #[error("{0}")]
    Unavailable(String),
    /// A server-side failure; the detail goes to the log only.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A server-side failure with its whole cause chain (logged, not shown to clients).
    pub fn internal(e: anyhow::Error) -> Self {
        ApiError::Internal(format!("{e:#}"))
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid { .. } | ApiError::BadImage(_) | ApiError::BadBody(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::OverBudget(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound { .. } | ApiError::UnknownRoute(_) => StatusCode::NOT_FOUND,
            ApiError::QueueFull(_) | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
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

    /// Logs once, at a level matching who is at fault.
    fn log(&self) {
        if self.status().is_server_error() {
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

impl From<crate::generation::gallery::GalleryError> for ApiError {
    fn from(e: crate::generation::gallery::GalleryError) -> Self {
        ApiError::Internal(e.to_string())
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
