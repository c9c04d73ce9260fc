//! Logging and metrics set-up shared by both binaries.
//!
//! Variables read here:
//! - `UPLINK_LOG_FORMAT`: `json` (default outside a terminal) or `pretty`
//! - `RUST_LOG`: the usual `tracing` filter (default `info`)

use prometheus::{Encoder, Registry, TextEncoder};
use tracing_subscriber::EnvFilter;

use crate::config::{ConfigError, Env};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

impl LogFormat {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        match env.get("UPLINK_LOG_FORMAT").as_deref() {
            None => Ok(if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                LogFormat::Pretty
            } else {
                LogFormat::Json
            }),
            Some("json") => Ok(LogFormat::Json),
            Some("pretty") | Some("text") => Ok(LogFormat::Pretty),
            Some(other) => Err(ConfigError::new(
                "UPLINK_LOG_FORMAT",
                format!("expected json or pretty, got {other:?}"),
            )),
        }
    }
}

/// Installs the global tracing subscriber. Call once, from `main`.
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(true);
    // A second initialisation (tests running in one process) is not an error worth failing on.
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

/// The registry's metrics in the Prometheus text exposition format.
pub fn render_metrics(registry: &Registry) -> String {
    let mut buf = Vec::new();
    // Encoding gathered families into a Vec only fails on inconsistent families, which the
    // registry already refuses at registration.
    let _ = TextEncoder::new().encode(&registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

/// Latency buckets in seconds, from 1 ms to 30 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The content type of the Prometheus text format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
