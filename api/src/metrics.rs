//! The api's Prometheus metrics. Labels are bounded: routes, methods, status codes, outcomes
//! and op kinds, never user ids.

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use uplink_common::telemetry::LATENCY_BUCKETS;

#[derive(Clone)]
pub struct ApiMetrics {
    pub registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub upload_duration: Histogram,
    pub publish_attempts: IntCounter,
    pub batches_published: IntCounterVec,
    pub ops_accepted: IntCounterVec,
    pub uploads_rejected: IntCounterVec,
    pub tokens_issued: IntCounter,
    pub auth_failures: IntCounterVec,
    pub broker_up: IntGauge,
    pub apply_waits: IntCounterVec,
}

impl ApiMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new(
                "uplink_http_requests_total",
                "HTTP requests answered, by route, method and status.",
            ),
            &["route", "method", "status"],
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "uplink_http_request_duration_seconds",
                "Time to answer an HTTP request, by route.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )?;
        let upload_duration = Histogram::with_opts(
            HistogramOpts::new(
                "uplink_upload_duration_seconds",
                "Time from receiving an upload to answering it (parse, publish, broker confirm).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let publish_attempts = IntCounter::new("uplink_publish_attempts_total", "Batches the api tried to publish.")?;
        let batches_published = IntCounterVec::new(
            Opts::new(
                "uplink_batches_published_total",
                "Publish attempts by outcome: confirmed, or why not (timeout, nacked, returned, unavailable, error).",
            ),
            &["outcome"],
        )?;
        let ops_accepted = IntCounterVec::new(
            Opts::new(
                "uplink_upload_ops_total",
                "Operations in batches the broker confirmed, by kind.",
            ),
            &["op"],
        )?;
        let uploads_rejected = IntCounterVec::new(
            Opts::new(
                "uplink_uploads_rejected_total",
                "Uploads refused before publishing, by reason.",
            ),
            &["reason"],
        )?;
        let tokens_issued = IntCounter::new("uplink_tokens_issued_total", "PowerSync tokens issued.")?;
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "uplink_auth_failures_total",
                "Requests refused for bad or missing credentials, by route.",
            ),
            &["route"],
        )?;
        let apply_waits = IntCounterVec::new(
            Opts::new(
                "uplink_apply_waits_total",
                "Acknowledge-on-apply: waits for a worker's commit, by outcome (applied, dead_lettered, not_applied, reply_lost).",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(apply_waits.clone()))?;
        let broker_up = IntGauge::new("uplink_broker_up", "1 when the api has a usable broker connection.")?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_duration.clone()))?;
        registry.register(Box::new(upload_duration.clone()))?;
        registry.register(Box::new(publish_attempts.clone()))?;
        registry.register(Box::new(batches_published.clone()))?;
        registry.register(Box::new(ops_accepted.clone()))?;
        registry.register(Box::new(uploads_rejected.clone()))?;
        registry.register(Box::new(tokens_issued.clone()))?;
        registry.register(Box::new(auth_failures.clone()))?;
        registry.register(Box::new(broker_up.clone()))?;
        Ok(Self {
            registry,
            http_requests,
            http_duration,
            upload_duration,
            publish_attempts,
            batches_published,
            ops_accepted,
            uploads_rejected,
            tokens_issued,
            auth_failures,
            broker_up,
            apply_waits,
        })
    }
}
