//! The worker's admin endpoints: `/healthz` (process alive), `/readyz` (broker and MongoDB,
//! each reported separately) and `/metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::metrics::WorkerMetrics;
use crate::Status;

#[derive(Clone)]
pub struct AdminState {
    pub status: Arc<Status>,
    pub metrics: WorkerMetrics,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let broker = state.status.broker();
    let mongo = state.status.mongo();
    let ready = broker && mongo;
    let body = json!({
        "status": if ready { "ready" } else { "not ready" },
        "checks": {
            "broker": if broker { "up" } else { "down" },
            "mongodb": if mongo { "up" } else { "down" },
        },
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, uplink_common::telemetry::METRICS_CONTENT_TYPE)],
        uplink_common::telemetry::render_metrics(&state.metrics.registry),
    )
        .into_response()
}
