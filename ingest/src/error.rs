//! The API's errors: every error a caller can cause maps to one status and one code,
//! here, and is sent as `{"error": {"code", "message"}}`.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable, machine-readable code.
    pub code: &'static str,
    /// A sentence for the human reading it.
    pub message: String,
    /// When to try again, in seconds (`Retry-After`); 503s say 1 when unset.
    pub retry_after_s: Option<u64>,
}

/// The JSON body of every error.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable, machine-readable code, e.g. `invalid_token`.
    pub code: String,
    /// A human-readable explanation.
    pub message: String,
}

impl ApiError {
    /// An error with the given status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after_s: None,
        }
    }
    /// 429: over a rate limit; a token is there again after `retry_after`.
    pub fn rate_limited(message: impl Into<String>, retry_after: std::time::Duration) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message);
        // Whole seconds, rounded up: never "0", which would invite an immediate retry.
        e.retry_after_s = Some(retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0));
        e
    }
    /// 400.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    /// 401.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }
    /// 404.
    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }
    /// 422.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }
    /// 503: herald cannot take the request now; retrying later is safe.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        let retry_after = match (self.retry_after_s, self.status) {
            (Some(s), _) => Some(s.max(1)),
            // What herald could not do now it can do shortly: say when to try again.
            (None, StatusCode::SERVICE_UNAVAILABLE) => Some(1),
            _ => None,
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(s) = retry_after {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(s),
            );
        }
        response
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::JsonDataError(e) => ApiError::invalid(e.body_text()),
            JsonRejection::JsonSyntaxError(e) => {
                ApiError::bad_request("malformed_json", e.body_text())
            }
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected Content-Type: application/json",
            ),
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "the request body exceeds the configured limit",
            ),
            other => ApiError::bad_request("bad_body", other.body_text()),
        }
    }
}

impl From<herald_projections::StoreError> for ApiError {
    fn from(e: herald_projections::StoreError) -> Self {
        tracing::error!(error = %e, "projection store failed");
        ApiError::unavailable("the store is unavailable; retry later")
    }
}

impl From<herald_eventlog::Error> for ApiError {
    fn from(e: herald_eventlog::Error) -> Self {
        match e {
            herald_eventlog::Error::RecordTooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.to_string())
            }
            herald_eventlog::Error::Exhausted(reason) => {
                tracing::debug!(%reason, "event log refused an append");
                ApiError::unavailable(
                    "the event log cannot take writes right now; nothing was accepted; retry later",
                )
            }
            herald_eventlog::Error::Unavailable(reason) => {
                tracing::warn!(%reason, "event log unavailable");
                ApiError::unavailable(
                    "the event log did not confirm the write in time; it may or may not have \
                     been accepted: retry with the same Idempotency-Key",
                )
            }
            e => {
                tracing::error!(error = %e, "event log append failed");
                ApiError::unavailable(
                    "the event log is unavailable; nothing was accepted; retry later",
                )
            }
        }
    }
}
