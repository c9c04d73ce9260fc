//! The HTTP handlers: `/token`, `/jwks`, `/upload`, `/healthz`, `/readyz`, `/metrics`.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{MatchedPath, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq;
use uplink_common::amqp::text;
use uplink_common::envelope::{headers as h, CONTENT_TYPE, MESSAGE_TYPE_V1};
use uplink_common::partition::partition_for;
use uplink_common::trace::TraceParent;
use uplink_common::{Batch, Envelope, UploadBatch};
use uuid::Uuid;

use crate::config::{AckMode, TokenAuth, UploadAuth};
use crate::error::ApiError;
use crate::idp::IdpError;
use crate::publisher::PublishError;
use crate::tokens::{bearer, TokenError};
use crate::AppState;
use uplink_common::envelope::ApplyOutcome;

#[derive(Debug, Deserialize)]
pub struct UserQuery {
    user_id: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TokenResponse {
    token: String,
    powersync_url: String,
    /// Expiry, seconds since the epoch (CloudCode clients ignore it; others may use it).
    expires_at: u64,
}

/// Longest user id accepted on `/token`.
const MAX_USER_ID_BYTES: usize = 256;

/// Mints a PowerSync token. Who may ask, and for whom, is the configured [`TokenAuth`] mode's
/// decision: the user comes from `?user_id=` only in `open` and `shared-secret` modes, where the
/// caller is trusted to name it; in `jwt` mode it comes from the verified identity token.
pub async fn token(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<UserQuery>,
) -> Result<Json<TokenResponse>, ApiError> {
    let result = authorize_token_request(&state, &headers, query).await;
    if matches!(
        result,
        Err(ApiError::Unauthorized(_)
            | ApiError::TokenEndpointUnauthorized
            | ApiError::IdentityToken(_)
            | ApiError::Forbidden(_))
    ) {
        state.metrics.auth_failures.with_label_values(&["/token"]).inc();
    }
    let user_id = result?;
    let (token, expires_at) = state
        .tokens
        .issue(&user_id)
        .map_err(|e| ApiError::internal(format!("signing failed: {e}")))?;
    state.metrics.tokens_issued.inc();
    Ok(Json(TokenResponse {
        token,
        powersync_url: state.config.powersync_url.clone(),
        expires_at,
    }))
}

/// The user a `/token` request may get a token for.
async fn authorize_token_request(state: &AppState, headers: &HeaderMap, query: UserQuery) -> Result<String, ApiError> {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let asked = query.user_id.as_deref().map(str::trim).filter(|u| !u.is_empty());
    let user_id = match &state.config.token_auth {
        TokenAuth::Open => asked
            .ok_or_else(|| ApiError::BadRequest("user_id is required".into()))?
            .to_owned(),
        TokenAuth::SharedSecret(secret) => {
            let ok = bearer(authorization)
                .map(|p| bool::from(p.as_bytes().ct_eq(secret.expose_secret().as_bytes())))
                .unwrap_or(false);
            if !ok {
                return Err(ApiError::TokenEndpointUnauthorized);
            }
            asked
                .ok_or_else(|| ApiError::BadRequest("user_id is required".into()))?
                .to_owned()
        }
        TokenAuth::Jwt(_) => {
            let verifier = state
                .idp
                .as_ref()
                .ok_or_else(|| ApiError::internal("jwt token auth configured without a verifier"))?;
            let presented = bearer(authorization)?;
            let user = verifier.verify(presented).await.map_err(|e| match e {
                IdpError::KeysUnavailable(_) => ApiError::IdentityProviderUnavailable {
                    source: e,
                    retry_after: state.config.retry_after,
                },
                other => ApiError::IdentityToken(other),
            })?;
            // Answering with a token for the verified user instead would hide the caller's bug,
            // and honouring the parameter would let any user read any other user's data.
            if asked.is_some_and(|a| a != user) {
                return Err(ApiError::Forbidden(
                    "user_id does not match the authenticated user".into(),
                ));
            }
            user
        }
    };
    if user_id.len() > MAX_USER_ID_BYTES || user_id.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(format!(
            "user_id must be at most {MAX_USER_ID_BYTES} bytes without control characters"
        )));
    }
    Ok(user_id)
}

pub async fn jwks(State(state): State<AppState>) -> Response {
    (
        [(header::CACHE_CONTROL, "public, max-age=300")],
        Json(json!({ "keys": state.tokens.keys().jwks() })),
    )
        .into_response()
}

#[derive(Debug, Serialize)]
pub struct UploadResponse {
    batch_id: Uuid,
    ops: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint: Option<i64>,
    /// Acknowledge-on-apply only: `applied`, or `dead_lettered` for a batch that can never
    /// apply (answered 2xx so it does not block the client's upload queue forever).
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

#[tracing::instrument(name = "upload", skip_all, fields(batch_id, user_id, partition, ops))]
pub async fn upload(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<UserQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<UploadResponse>, ApiError> {
    let started = Instant::now();
    let result = accept_upload(&state, &headers, query, body).await;
    state.metrics.upload_duration.observe(started.elapsed().as_secs_f64());
    if let Err(e) = &result {
        state.metrics.uploads_rejected.with_label_values(&[e.reason()]).inc();
        if matches!(e, ApiError::Unauthorized(_)) {
            state.metrics.auth_failures.with_label_values(&["/upload"]).inc();
        }
    }
    result
}

async fn accept_upload(
    state: &AppState,
    headers: &HeaderMap,
    query: UserQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<UploadResponse>, ApiError> {
    let user_id = match state.config.upload_auth {
        UploadAuth::Verify => {
            let token = bearer(headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()))?;
            state.tokens.verify(token)?.sub
        }
        UploadAuth::None => query
            .user_id
            .filter(|u| !u.trim().is_empty())
            .ok_or_else(|| ApiError::Unauthorized(TokenError::Missing))?,
    };
    let span = tracing::Span::current();
    span.record("user_id", user_id.as_str());

    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::BodyTooLarge(state.config.limits.max_body_bytes)
        } else {
            ApiError::BadRequest(format!("could not read the request body: {rejection}"))
        }
    })?;
    let batch = Batch::parse(&body, &state.config.limits)?;
    let batch_id = Uuid::now_v7();
    let checkpoint = batch.checkpoint();
    let op_count = batch.ops.len();
    span.record("batch_id", tracing::field::display(batch_id));
    span.record("ops", op_count);
    if batch.ops.is_empty() {
        return Ok(Json(UploadResponse {
            batch_id,
            ops: 0,
            checkpoint,
            status: None,
            reason: None,
        }));
    }

    let topology = state.publisher.topology();
    let partition = partition_for(&user_id, topology.partitions);
    span.record("partition", partition);
    let trace = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse)
        .map(|tp| tp.child())
        .unwrap_or_else(TraceParent::new_root);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let kinds: Vec<&'static str> = batch.ops.iter().map(|op| op.op.as_str()).collect();
    let envelope = Envelope::V1(UploadBatch {
        batch_id,
        user_id: user_id.clone(),
        client_id: batch.client_id,
        partition,
        accepted_at_ms: i64::try_from(now.as_millis()).unwrap_or(i64::MAX),
        ops: batch.ops,
    });
    let mut amqp_headers = FieldTable::default();
    amqp_headers.insert(h::USER_ID.into(), text(&user_id));
    amqp_headers.insert(
        h::PARTITION.into(),
        lapin::types::AMQPValue::LongInt(i32::from(partition)),
    );
    amqp_headers.insert(h::TRACEPARENT.into(), text(&trace.to_string()));
    let properties = BasicProperties::default()
        // Persistent: the message survives a broker restart once confirmed.
        .with_delivery_mode(2)
        .with_content_type(CONTENT_TYPE.into())
        .with_message_id(batch_id.to_string().into())
        .with_timestamp(now.as_secs())
        .with_type(MESSAGE_TYPE_V1.into())
        .with_app_id("uplink-api".into())
        .with_headers(amqp_headers);

    state.metrics.publish_attempts.inc();
    let routing_key = topology.routing_key(partition);
    let payload = envelope.to_vec();
    let published = match state.config.ack_mode {
        AckMode::Confirm => state
            .publisher
            .publish(&routing_key, &payload, properties)
            .await
            .map(|()| None),
        AckMode::Apply => state
            .publisher
            .publish_and_wait_applied(
                &routing_key,
                &payload,
                properties,
                &batch_id.to_string(),
                state.config.apply_timeout,
            )
            .await
            .map(Some),
    };
    let confirmed = matches!(
        published,
        Ok(_) | Err(PublishError::NotApplied(_) | PublishError::ReplyLost)
    );
    if confirmed {
        state.metrics.batches_published.with_label_values(&["confirmed"]).inc();
        for kind in &kinds {
            state.metrics.ops_accepted.with_label_values(&[kind]).inc();
        }
    }
    let mut response = UploadResponse {
        batch_id,
        ops: op_count,
        checkpoint,
        status: None,
        reason: None,
    };
    match published {
        Ok(None) => {
            tracing::debug!(trace_id = %trace.trace_id_hex(), "batch accepted");
            Ok(Json(response))
        }
        Ok(Some(ApplyOutcome::Applied { .. })) => {
            state.metrics.apply_waits.with_label_values(&["applied"]).inc();
            response.status = Some("applied");
            Ok(Json(response))
        }
        Ok(Some(ApplyOutcome::DeadLettered { reason, .. })) => {
            state.metrics.apply_waits.with_label_values(&["dead_lettered"]).inc();
            tracing::warn!(%reason, "batch dead-lettered while the client waited");
            response.status = Some("dead_lettered");
            response.reason = Some(reason);
            Ok(Json(response))
        }
        Err(e) => {
            if confirmed {
                state.metrics.apply_waits.with_label_values(&[e.outcome()]).inc();
            } else {
                state.metrics.batches_published.with_label_values(&[e.outcome()]).inc();
            }
            Err(ApiError::Unavailable {
                source: e,
                retry_after: state.config.retry_after,
            })
        }
    }
}

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<AppState>) -> Response {
    let broker = state.publisher.is_ready().await;
    state.metrics.broker_up.set(i64::from(broker));
    let status = if broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if broker { "ready" } else { "not ready" },
        "checks": { "broker": if broker { "up" } else { "down" } },
    });
    (status, Json(body)).into_response()
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    state.metrics.broker_up.set(i64::from(state.publisher.is_ready().await));
    (
        [(header::CONTENT_TYPE, uplink_common::telemetry::METRICS_CONTENT_TYPE)],
        uplink_common::telemetry::render_metrics(&state.metrics.registry),
    )
        .into_response()
}

/// Counts and times every request by its route template (bounded cardinality).
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    state
        .metrics
        .http_requests
        .with_label_values(&[route.as_str(), method.as_str(), response.status().as_str()])
        .inc();
    state
        .metrics
        .http_duration
        .with_label_values(&[route.as_str()])
        .observe(started.elapsed().as_secs_f64());
    response
}
