//! What every handler shares: [`AppJson`] and [`AppQuery`], extractors whose rejection is
//! the app's [`ApiError`] (so a body over the limit is a 413 and a malformed one a 400 with
//! the parser's message, on every endpoint), and [`status_stream`], the SSE stream of a
//! task's status. Follows axum's `examples/error-handling` (an extractor per input kind
//! whose rejection is the application's error).

use std::convert::Infallible;
use std::time::Duration;

use app::dto::MAX_BODY_BYTES;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use futures::Stream;
use serde::de::DeserializeOwned;

use crate::ApiError;

/// A JSON body; any rejection becomes an [`ApiError`]: `TooLarge` (413) over the body
/// limit, `BadBody` (400) otherwise.
pub struct AppJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for AppJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(AppJson(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge { limit: MAX_BODY_BYTES }
    } else {
        ApiError::BadBody(rejection.body_text())
    }
}

/// A query string; a malformed one is a `BadQuery` (400) naming the field.
pub struct AppQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for AppQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(AppQuery(value)),
            Err(rejection) => Err(ApiError::BadQuery(rejection.body_text())),
        }
    }
}

/// An SSE stream of a `watch` channel: the current value first, then each change, ending
/// after a value for which `last` holds. Comments keep idle connections alive (15 s).
pub fn status_stream<T>(rx: tokio::sync::watch::Receiver<T>, last: fn(&T) -> bool) -> Sse<impl Stream<Item = Result<Event, Infallible>>>
where
    T: serde::Serialize + Clone + Send + Sync + 'static,
{
    let stream = futures::stream::unfold((rx, true, false), move |(mut rx, first, done)| async move {
        if done {
            return None;
        }
        if !first && rx.changed().await.is_err() {
            return None; // forgotten, or the server is shutting down
        }
        let value = rx.borrow_and_update().clone();
        let finished = last(&value);
        let event = Event::default().json_data(&value).unwrap_or_else(|_| Event::default().comment("encode error"));
        Some((Ok(event), (rx, false, finished)))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
