//! uplink-api: mints PowerSync JWTs, serves the JWKS, validates upload batches and publishes
//! them to RabbitMQ, answering 200 only once the broker has confirmed them.
#![doc = include_str!("../README.md")]

pub mod config;
pub mod error;
pub mod idp;
pub mod keys;
pub mod metrics;
pub mod publisher;
pub mod routes;
pub mod tokens;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};

use crate::config::{ApiConfig, TokenAuth, UploadAuth};
use crate::idp::IdpVerifier;
use crate::metrics::ApiMetrics;
use crate::publisher::Publisher;
use crate::tokens::TokenService;

/// Everything a handler needs: cheap handles, cloned per request.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<ApiConfig>,
    pub tokens: TokenService,
    pub publisher: Publisher,
    pub metrics: ApiMetrics,
    /// Checks identity-provider tokens on `/token`; present exactly in `jwt` mode.
    pub idp: Option<IdpVerifier>,
}

impl AppState {
    /// Builds the handles and starts their background tasks (broker supervisor, JWKS
    /// prefetch), which stop when `cancel` fires.
    pub async fn new(config: ApiConfig, cancel: CancellationToken) -> anyhow::Result<Self> {
        let metrics = ApiMetrics::new()?;
        let publisher = Publisher::start(
            config.amqp.clone(),
            config.confirm_timeout,
            format!(
                "uplink-api@{}",
                uplink_common::shutdown::hostname().unwrap_or_else(|| "unknown".to_owned())
            ),
            config.ack_mode == config::AckMode::Apply,
            cancel.clone(),
        );
        let tokens = TokenService::new(
            config.keys.clone(),
            config.powersync_url.clone(),
            config.issuer.clone(),
            config.token_lifetime,
            config.clock_leeway,
        );
        let idp = match &config.token_auth {
            TokenAuth::Jwt(jwt) => {
                let verifier = IdpVerifier::new(jwt, config.clock_leeway)?;
                let prefetch = verifier.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = prefetch.prefetch() => {}
                    }
                });
                Some(verifier)
            }
            _ => None,
        };
        Ok(Self {
            config: Arc::new(config),
            tokens,
            publisher,
            metrics,
            idp,
        })
    }
}

/// A bound, not yet serving, api.
pub struct Application {
    listener: TcpListener,
    router: Router,
    state: AppState,
    cancel: CancellationToken,
}

impl Application {
    /// Binds the listener (port 0 picks a free port) and starts connecting to the broker.
    pub async fn build(config: ApiConfig, cancel: CancellationToken) -> anyhow::Result<Self> {
        if config.dev {
            tracing::warn!("DEVELOPMENT MODE (UPLINK_DEV): do not run this configuration in production");
        }
        if config.generated_key {
            tracing::warn!(
                kid = %config.keys.signing.kid,
                "POWERSYNC_PRIVATE_KEY is not set: signing with a TEMPORARY key generated at start-up; its tokens stop verifying when this process exits"
            );
        }
        match &config.token_auth {
            TokenAuth::Open => {
                tracing::warn!("/token is OPEN: anyone can obtain a token for any user id (development mode)")
            }
            TokenAuth::SharedSecret(_) => {
                tracing::info!("/token requires the shared secret (UPLINK_TOKEN_AUTH=shared-secret)")
            }
            TokenAuth::Jwt(jwt) => tracing::info!(
                keys = ?jwt.keys,
                issuer = %jwt.issuer,
                audiences = ?jwt.audiences,
                user_claim = %jwt.user_claim,
                "/token requires an identity provider's token (UPLINK_TOKEN_AUTH=jwt)"
            ),
        }
        if config.upload_auth == UploadAuth::None {
            tracing::warn!("/upload does NOT authenticate callers (UPLINK_UPLOAD_AUTH=none, development mode)");
        }
        let listener = TcpListener::bind(config.addr).await?;
        let state = AppState::new(config, cancel.clone()).await?;
        let router = router(state.clone());
        Ok(Self {
            listener,
            router,
            state,
            cancel,
        })
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Waits until the broker connection is up (for tests and orderly start-up scripts).
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        self.state.publisher.wait_ready(timeout).await
    }

    /// Serves until the cancellation token fires, then finishes in-flight requests.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        tracing::info!(addr = %self.local_addr(), "uplink-api listening");
        let cancel = self.cancel.clone();
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await
    }
}

pub fn router(state: AppState) -> Router {
    let config = state.config.clone();
    let cors = cors_layer(&config.cors_origins);
    Router::new()
        .route("/token", get(routes::token))
        .route("/jwks", get(routes::jwks))
        .route("/api/auth/keys", get(routes::jwks))
        .route("/upload", post(routes::upload).put(routes::upload))
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::metrics))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), routes::track))
        .layer(DefaultBodyLimit::max(config.limits.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            config.request_timeout,
        ))
        .layer(cors)
        // A 503 during a broker outage is expected and already logged with its cause; ERROR is
        // kept for what needs a human.
        .layer(TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(tracing::Level::WARN)))
        .with_state(state)
}

fn cors_layer(origins: &[String]) -> CorsLayer {
    let base = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::HeaderName::from_static("traceparent"),
        ])
        .max_age(Duration::from_secs(600));
    if origins.iter().any(|o| o == "*") {
        base.allow_origin(AllowOrigin::any())
    } else {
        let list: Vec<HeaderValue> = origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect();
        base.allow_origin(AllowOrigin::list(list))
    }
}
