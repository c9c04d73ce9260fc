//! The worker's Prometheus metrics. Labels are bounded (outcomes, error classes, reasons),
//! never user ids. Every failure counter has a total-attempts counter beside it.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use uplink_common::telemetry::LATENCY_BUCKETS;

#[derive(Clone)]
pub struct WorkerMetrics {
    pub registry: Registry,
    pub batches: IntCounterVec,
    pub ops_applied: IntCounter,
    pub ops_skipped: IntCounter,
    pub commands: IntCounter,
    pub apply_attempts: IntCounter,
    pub apply_failures: IntCounterVec,
    pub apply_retries: IntCounterVec,
    pub apply_duration: Histogram,
    pub end_to_end: Histogram,
    pub dead_lettered: IntCounterVec,
    pub broker_up: IntGauge,
    pub mongo_up: IntGauge,
    pub partitions_consuming: IntGauge,
}

impl WorkerMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let batches = IntCounterVec::new(
            Opts::new(
                "uplink_worker_batches_total",
                "Batches finished, by outcome (applied, dead_lettered).",
            ),
            &["outcome"],
        )?;
        let ops_applied = IntCounter::new("uplink_worker_ops_applied_total", "Operations applied to MongoDB.")?;
        let ops_skipped = IntCounter::new(
            "uplink_worker_ops_skipped_total",
            "Operations skipped because the client's checkpoint shows them applied already (redeliveries, client retries).",
        )?;
        let commands = IntCounter::new(
            "uplink_worker_commands_total",
            "MongoDB write commands sent for batch operations.",
        )?;
        let apply_attempts = IntCounter::new("uplink_worker_apply_attempts_total", "Attempts at applying a batch.")?;
        let apply_failures = IntCounterVec::new(
            Opts::new(
                "uplink_worker_apply_failures_total",
                "Failed attempts at applying a batch, by error class.",
            ),
            &["class"],
        )?;
        let apply_retries = IntCounterVec::new(
            Opts::new(
                "uplink_worker_apply_retries_total",
                "Failed attempts that will be retried in place, by error class.",
            ),
            &["class"],
        )?;
        let apply_duration = Histogram::with_opts(
            HistogramOpts::new(
                "uplink_worker_apply_duration_seconds",
                "Time of one successful attempt at applying a batch.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let end_to_end = Histogram::with_opts(
            HistogramOpts::new(
                "uplink_worker_end_to_end_seconds",
                "Time from the api accepting a batch to the worker committing it (queueing included).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let dead_lettered = IntCounterVec::new(
            Opts::new(
                "uplink_worker_dead_lettered_total",
                "Batches sent to the dead-letter queue, by reason.",
            ),
            &["reason"],
        )?;
        let broker_up = IntGauge::new(
            "uplink_worker_broker_up",
            "1 while the worker is connected to the broker.",
        )?;
        let mongo_up = IntGauge::new("uplink_worker_mongo_up", "1 while the last MongoDB ping succeeded.")?;
        let partitions_consuming = IntGauge::new(
            "uplink_worker_partitions_consuming",
            "Partition queues this worker is subscribed to (single-active-consumer decides which it serves).",
        )?;
        for c in [&ops_applied, &ops_skipped, &commands, &apply_attempts] {
            registry.register(Box::new(c.clone()))?;
        }
        for c in [&batches, &apply_failures, &apply_retries, &dead_lettered] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(apply_duration.clone()))?;
        registry.register(Box::new(end_to_end.clone()))?;
        for g in [&broker_up, &mongo_up, &partitions_consuming] {
            registry.register(Box::new(g.clone()))?;
        }
        Ok(Self {
            registry,
            batches,
            ops_applied,
            ops_skipped,
            commands,
            apply_attempts,
            apply_failures,
            apply_retries,
            apply_duration,
            end_to_end,
            dead_lettered,
            broker_up,
            mongo_up,
            partitions_consuming,
        })
    }
}
