//! Every way a request can fail, and the response each one gets. Clients (PowerSync
//! connectors) retry any non-2xx answer, so the status must say whether retrying can help.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use uplink_common::batch::{BatchError, BatchErrorKind};

use crate::idp::IdpError;
use crate::publisher::PublishError;
use crate::tokens::TokenError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request names no user or otherwise lacks a parameter.
    #[error("{0}")]
    BadRequest(String),
    /// The upload body is malformed, breaks the schema or is too large.
    #[error(transparent)]
    Batch(#[from] BatchError),
    /// Credentials missing or not accepted.
    #[error("unauthorized: {0}")]
    Unauthorized(#[from] TokenError),
    /// Credentials for the token endpoint missing or wrong.
    #[error("unauthorized")]
    TokenEndpointUnauthorized,
    /// The identity provider's token (`jwt` mode) was refused.
    #[error("identity token: {0}")]
    IdentityToken(IdpError),
    /// The identity provider's keys cannot be fetched, so no identity token can be checked;
    /// retrying later can succeed.
    #[error("identity provider unavailable: {source}")]
    IdentityProviderUnavailable { source: IdpError, retry_after: Duration },
    /// Authenticated, but asking for something this caller may not have.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The body is bigger than the limit (rejected while reading it).
    #[error("request body is larger than {0} bytes")]
    BodyTooLarge(usize),
    /// The broker did not take the batch; retrying later can succeed.
    #[error("broker unavailable: {source}")]
    Unavailable {
        source: PublishError,
        retry_after: Duration,
    },
    /// Anything unexpected: logged in full, answered opaquely.
    #[error("internal error at {location}: {message}")]
    Internal {
        message: String,
        location: &'static std::panic::Location<'static>,
    },
}

impl ApiError {
    #[track_caller]
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::Internal {
            message: message.into(),
            location: std::panic::Location::caller(),
        }
    }

    /// Bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Batch(e) => match e.kind {
                BatchErrorKind::Malformed => "malformed",
                BatchErrorKind::Invalid => "invalid",
                BatchErrorKind::TooLarge => "too_large",
            },
            ApiError::Unauthorized(_) | ApiError::TokenEndpointUnauthorized => "unauthorized",
            ApiError::IdentityToken(_) => "unauthorized",
            ApiError::IdentityProviderUnavailable { .. } => "unavailable",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::BodyTooLarge(_) => "too_large",
            ApiError::Unavailable { .. } => "unavailable",
            ApiError::Internal { .. } => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match &self {
            ApiError::BadRequest(message) => (
                StatusCode::BAD_REQUEST,
                json!({"error": {"code": "bad_request", "message": message}}),
            ),
            ApiError::Batch(e) => {
                let (status, code) = match e.kind {
                    BatchErrorKind::Malformed => (StatusCode::BAD_REQUEST, "malformed_batch"),
                    BatchErrorKind::Invalid => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_batch"),
                    BatchErrorKind::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "batch_too_large"),
                };
                (
                    status,
                    json!({"error": {"code": code, "message": e.to_string(), "op_index": e.op_index, "field": e.field}}),
                )
            }
            ApiError::IdentityProviderUnavailable { retry_after, .. } => {
                tracing::warn!(error = %self, "cannot check identity tokens");
                let mut response = (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({"error": {"code": "unavailable", "message": "cannot check credentials right now; retry later"}})),
                )
                    .into_response();
                let secs = retry_after.as_secs().max(1).to_string();
                if let Ok(v) = HeaderValue::from_str(&secs) {
                    response.headers_mut().insert(header::RETRY_AFTER, v);
                }
                return response;
            }
            ApiError::Forbidden(message) => {
                tracing::info!(error = %self, "request refused");
                (
                    StatusCode::FORBIDDEN,
                    json!({"error": {"code": "forbidden", "message": message}}),
                )
            }
            ApiError::Unauthorized(_) | ApiError::TokenEndpointUnauthorized | ApiError::IdentityToken(_) => {
                // The precise reason is logged, not told to a possibly hostile caller.
                tracing::info!(error = %self, "request refused");
                (
                    StatusCode::UNAUTHORIZED,
                    json!({"error": {"code": "unauthorized", "message": "missing or invalid credentials"}}),
                )
            }
            ApiError::BodyTooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": {"code": "batch_too_large", "message": format!("request body is larger than {limit} bytes")}}),
            ),
            ApiError::Unavailable { source, retry_after } => {
                tracing::warn!(error = %source, "upload not accepted: broker did not confirm");
                let mut response = (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({"error": {"code": "unavailable", "message": "the upload was not accepted; retry later"}})),
                )
                    .into_response();
                let secs = retry_after.as_secs().max(1).to_string();
                if let Ok(v) = HeaderValue::from_str(&secs) {
                    response.headers_mut().insert(header::RETRY_AFTER, v);
                }
                return response;
            }
            ApiError::Internal { .. } => {
                tracing::error!(error = %self, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": {"code": "internal", "message": "internal error"}}),
                )
            }
        };
        (status, Json(body)).into_response()
    }
}
