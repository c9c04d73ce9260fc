//! uplink-worker: consumes upload batches from RabbitMQ and applies them to MongoDB, in order,
//! with retries, transactions and dead-lettering.
#![doc = include_str!("../README.md")]

pub mod admin;
pub mod apply;
pub mod config;
pub mod consumer;
pub mod convert;
pub mod deadletter;
pub mod dlq;
pub mod errors;
pub mod metrics;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uplink_common::topology::Topology;

use crate::apply::Applier;
use crate::config::WorkerConfig;
use crate::consumer::Consumer;
use crate::metrics::WorkerMetrics;

/// Dependency health, as the admin endpoints report it.
#[derive(Debug, Default)]
pub struct Status {
    broker: AtomicBool,
    mongo: AtomicBool,
}

impl Status {
    pub fn broker(&self) -> bool {
        self.broker.load(Ordering::Relaxed)
    }

    pub fn mongo(&self) -> bool {
        self.mongo.load(Ordering::Relaxed)
    }

    pub(crate) fn set_broker(&self, up: bool, metrics: &WorkerMetrics) {
        self.broker.store(up, Ordering::Relaxed);
        metrics.broker_up.set(i64::from(up));
    }

    pub(crate) fn set_mongo(&self, up: bool, metrics: &WorkerMetrics) {
        self.mongo.store(up, Ordering::Relaxed);
        metrics.mongo_up.set(i64::from(up));
    }
}

/// How often the worker pings MongoDB for its readiness report.
const MONGO_PING_INTERVAL: Duration = Duration::from_secs(2);

/// A built, not yet running, worker.
pub struct Worker {
    admin: TcpListener,
    consumer: Consumer,
    cancel: CancellationToken,
}

impl Worker {
    /// Binds the admin listener (port 0 picks a free port) and prepares the MongoDB client.
    pub async fn build(config: WorkerConfig, cancel: CancellationToken) -> anyhow::Result<Self> {
        let admin = TcpListener::bind(config.admin_addr).await?;
        let applier = Applier::new(&config).await?;
        let metrics = WorkerMetrics::new()?;
        let consumer = Consumer {
            topology: Topology::new(&config.amqp),
            cfg: Arc::new(config),
            applier: Arc::new(applier),
            metrics,
            status: Arc::new(Status::default()),
        };
        Ok(Self {
            admin,
            consumer,
            cancel,
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    pub fn admin_port(&self) -> u16 {
        self.admin_addr().port()
    }

    pub fn status(&self) -> Arc<Status> {
        self.consumer.status.clone()
    }

    pub fn metrics(&self) -> WorkerMetrics {
        self.consumer.metrics.clone()
    }

    /// Consumes until the cancellation token fires; then stops consuming, finishes the batch
    /// in hand, acknowledges it and closes.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Worker {
            admin,
            consumer,
            cancel,
        } = self;
        tracing::info!(
            worker_id = %consumer.cfg.worker_id,
            admin = %admin.local_addr()?,
            prefix = %consumer.topology.prefix,
            partitions = consumer.topology.partitions,
            "uplink-worker starting"
        );
        let admin_state = admin::AdminState {
            status: consumer.status.clone(),
            metrics: consumer.metrics.clone(),
        };
        let admin_stop = CancellationToken::new();
        let admin_task = {
            let stop = admin_stop.clone();
            tokio::spawn(async move {
                axum::serve(admin, admin::router(admin_state))
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await
            })
        };
        let pinger = {
            let applier = consumer.applier.clone();
            let status = consumer.status.clone();
            let metrics = consumer.metrics.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                loop {
                    let up = applier.ping().await.is_ok();
                    if up && !status.mongo() {
                        // Learn about transaction support as soon as the server is there.
                        let _ = applier.transactional().await;
                    }
                    status.set_mongo(up, &metrics);
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(MONGO_PING_INTERVAL) => {}
                    }
                }
            })
        };
        consumer.run(cancel).await;
        pinger.abort();
        admin_stop.cancel();
        admin_task.await??;
        tracing::info!("uplink-worker stopped");
        Ok(())
    }
}
