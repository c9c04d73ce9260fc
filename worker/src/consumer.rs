//! Consuming the partition queues. Each partition gets its own channel and is processed one
//! batch at a time, in queue order; single-active-consumer (declared on the queue) makes one
//! worker at a time serve each partition, the others waiting as hot standbys.
//!
//! A batch is acknowledged only after it committed, or after its dead letter was confirmed.
//! Transient failures are retried in place, holding the partition, so a user's later batches
//! never overtake an earlier one.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uplink_common::amqp::{header_i64, header_str, ReconnectBackoff};
use uplink_common::envelope::{headers as h, ApplyOutcome};
use uplink_common::topology::Topology;
use uplink_common::trace::TraceParent;
use uplink_common::{Envelope, UploadBatch};

use crate::apply::Applier;
use crate::config::WorkerConfig;
use crate::deadletter::{self, now_ms, Reason};
use crate::errors::{ApplyError, ErrorClass};
use crate::metrics::WorkerMetrics;
use crate::Status;

#[derive(Clone)]
pub struct Consumer {
    pub(crate) cfg: Arc<WorkerConfig>,
    pub(crate) topology: Topology,
    pub(crate) applier: Arc<Applier>,
    pub(crate) metrics: WorkerMetrics,
    pub(crate) status: Arc<Status>,
}

impl Consumer {
    /// Connects, consumes every partition, and reconnects whenever the connection breaks,
    /// until `cancel` fires; then finishes the batches in hand and closes.
    pub async fn run(self, cancel: CancellationToken) {
        let mut backoff = ReconnectBackoff::new();
        while !cancel.is_cancelled() {
            match self.open().await {
                Ok(connection) => {
                    backoff.reset();
                    self.status.set_broker(true, &self.metrics);
                    tracing::info!(
                        partitions = self.topology.partitions,
                        "connected to the broker; consuming every partition"
                    );
                    self.consume(&connection, &cancel).await;
                    self.status.set_broker(false, &self.metrics);
                    let _ = connection
                        .close(200, "uplink-worker stopping or reconnecting".into())
                        .await;
                }
                Err(e) => tracing::warn!(error = %e, retry_in = ?backoff.current(), "cannot connect to the broker"),
            }
            if cancel.is_cancelled() {
                break;
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
        tracing::info!("consumer stopped");
    }

    async fn open(&self) -> lapin::Result<Connection> {
        let name = format!("uplink-worker@{}", self.cfg.worker_id);
        let connection = uplink_common::amqp::connect(&self.cfg.amqp.url, &name).await?;
        let channel = connection.create_channel().await?;
        self.topology.declare(&channel).await?;
        let _ = channel.close(200, "topology declared".into()).await;
        Ok(connection)
    }

    /// Runs one consumer task per partition on this connection until one of them fails (the
    /// connection is then presumed broken) or `cancel` fires.
    async fn consume(&self, connection: &Connection, cancel: &CancellationToken) {
        let outbox = match Outbox::open(connection).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the dead-letter and reply channels");
                return;
            }
        };
        let stop = cancel.child_token();
        let mut tasks = JoinSet::new();
        for partition in 0..self.topology.partitions {
            let channel = match connection.create_channel().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open a partition channel");
                    stop.cancel();
                    break;
                }
            };
            let me = self.clone();
            let outbox = outbox.clone();
            let stop = stop.clone();
            tasks.spawn(async move { me.consume_partition(channel, partition, outbox, stop).await });
        }
        while let Some(result) = tasks.join_next().await {
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    if !stop.is_cancelled() {
                        tracing::warn!(error = %e, "partition consumer failed; reconnecting");
                    }
                    stop.cancel();
                }
                Err(e) => {
                    tracing::error!(error = %e, "partition consumer task panicked; reconnecting");
                    stop.cancel();
                }
            }
        }
    }

    async fn consume_partition(
        &self,
        channel: Channel,
        partition: u16,
        outbox: Outbox,
        stop: CancellationToken,
    ) -> lapin::Result<()> {
        let queue = self.topology.partition_queue(partition);
        // Batches are processed strictly one after another whatever the prefetch; see
        // `UPLINK_PREFETCH` for why it defaults to 1.
        channel.basic_qos(self.cfg.prefetch, BasicQosOptions::default()).await?;
        let tag = format!("{}.{partition}", self.cfg.worker_id);
        let mut deliveries = channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.metrics.partitions_consuming.inc();
        let result = loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break Ok(()),
                next = deliveries.next() => match next {
                    Some(Ok(delivery)) => {
                        if let Err(e) = self.handle(delivery, partition, &queue, &outbox, &stop).await {
                            break Err(e);
                        }
                    }
                    Some(Err(e)) => break Err(e),
                    None => break Err(lapin::Error::from(std::io::Error::other("consumer cancelled by the broker"))),
                }
            }
        };
        self.metrics.partitions_consuming.dec();
        // Closing the channel cancels the consumer; an unacknowledged batch returns to the head
        // of the queue, in order, for whichever consumer becomes active next.
        let _ = channel.close(200, "partition consumer stopping".into()).await;
        result
    }

    /// Applies one delivery and acknowledges it. Returns an error only when the broker
    /// connection is unusable (the ack failed).
    async fn handle(
        &self,
        delivery: Delivery,
        partition: u16,
        queue: &str,
        outbox: &Outbox,
        stop: &CancellationToken,
    ) -> lapin::Result<()> {
        let headers = delivery.properties.headers().as_ref();
        let trace_id = header_str(headers, h::TRACEPARENT)
            .and_then(|t| TraceParent::parse(&t))
            .map(|t| t.trace_id_hex())
            .unwrap_or_default();
        let delivery_count = header_i64(headers, "x-delivery-count").unwrap_or(0);
        let batch = match Envelope::from_slice(&delivery.data) {
            Ok(envelope) => envelope.into_batch(),
            Err(e) => {
                let message_id = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.to_string())
                    .unwrap_or_default();
                tracing::error!(%message_id, partition, error = %e, "undecodable message; dead-lettering it");
                let reason = Reason {
                    reason: "undecodable",
                    error: None,
                    detail: Some(format!("cannot decode the message body: {e}")),
                    attempts: 1,
                    first_failure_ms: now_ms(),
                    worker_id: &self.cfg.worker_id,
                    queue,
                };
                return self.dead_letter(&delivery, None, &reason, outbox, stop).await;
            }
        };
        let span = tracing::info_span!(
            "batch",
            batch_id = %batch.batch_id,
            user_id = %batch.user_id,
            partition,
            trace_id = %trace_id,
            delivery_count,
            ops = batch.ops.len(),
        );
        self.apply_with_retries(&delivery, &batch, queue, outbox, stop)
            .instrument(span)
            .await
    }

    async fn apply_with_retries(
        &self,
        delivery: &Delivery,
        batch: &UploadBatch,
        queue: &str,
        outbox: &Outbox,
        stop: &CancellationToken,
    ) -> lapin::Result<()> {
        let mut attempt: u32 = 0;
        let mut first_failure_ms = None;
        loop {
            attempt += 1;
            self.metrics.apply_attempts.inc();
            let started = Instant::now();
            let error = match self.applier.apply(batch).await {
                Ok(applied) => {
                    self.status.set_mongo(true, &self.metrics);
                    self.metrics.apply_duration.observe(started.elapsed().as_secs_f64());
                    self.metrics.ops_applied.inc_by(applied.ops_applied as u64);
                    self.metrics.ops_skipped.inc_by(applied.ops_skipped as u64);
                    self.metrics.commands.inc_by(applied.commands as u64);
                    delivery.ack(BasicAckOptions::default()).await?;
                    outbox
                        .reply(
                            delivery,
                            &ApplyOutcome::Applied {
                                batch_id: batch.batch_id.to_string(),
                                checkpoint: batch.checkpoint(),
                            },
                        )
                        .await;
                    self.metrics.batches.with_label_values(&["applied"]).inc();
                    let lag_ms = now_ms().saturating_sub(batch.accepted_at_ms).max(0);
                    self.metrics.end_to_end.observe(lag_ms as f64 / 1000.0);
                    tracing::debug!(
                        applied = applied.ops_applied,
                        skipped = applied.ops_skipped,
                        commands = applied.commands,
                        transactional = applied.transactional,
                        attempts = attempt,
                        "batch applied"
                    );
                    return Ok(());
                }
                Err(e) => e,
            };
            self.metrics
                .apply_failures
                .with_label_values(&[error.class.as_str()])
                .inc();
            let first = *first_failure_ms.get_or_insert_with(now_ms);
            let give_up = match error.class {
                ErrorClass::Permanent => true,
                ErrorClass::Unknown => attempt >= self.cfg.retry.unknown_error_attempts,
                ErrorClass::Transient => false,
            };
            if give_up {
                let reason_name = if error.class == ErrorClass::Permanent {
                    "permanent"
                } else {
                    "attempts_exhausted"
                };
                tracing::error!(error = %error, attempts = attempt, op_index = ?error.op_index, "batch cannot be applied; dead-lettering it");
                let reason = Reason {
                    reason: reason_name,
                    error: Some(&error),
                    detail: None,
                    attempts: attempt,
                    first_failure_ms: first,
                    worker_id: &self.cfg.worker_id,
                    queue,
                };
                return self.dead_letter(delivery, Some(batch), &reason, outbox, stop).await;
            }
            if is_connectivity(&error) {
                self.status.set_mongo(false, &self.metrics);
            }
            self.metrics
                .apply_retries
                .with_label_values(&[error.class.as_str()])
                .inc();
            let delay = if error.is_conflict() {
                self.cfg.retry.conflict_delay(attempt)
            } else {
                self.cfg.retry.delay(attempt)
            };
            if error.is_conflict() && attempt < 5 {
                // Routine under concurrency; only a conflict that keeps coming back is news.
                tracing::debug!(error = %error, attempt, retry_in = ?delay, "write conflict; retrying");
            } else {
                tracing::warn!(error = %error, attempt, retry_in = ?delay, "batch failed; retrying in place");
            }
            tokio::select! {
                _ = stop.cancelled() => {
                    // Left unacknowledged: it returns to the head of its queue when the channel
                    // closes, for the next active consumer.
                    tracing::info!("stopping while a batch waits for a retry; leaving it in its queue");
                    return Ok(());
                }
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Dead-letters the delivery (retrying the publish while the broker refuses it) and acks it.
    async fn dead_letter(
        &self,
        delivery: &Delivery,
        batch: Option<&UploadBatch>,
        reason: &Reason<'_>,
        outbox: &Outbox,
        stop: &CancellationToken,
    ) -> lapin::Result<()> {
        if let Some(batch) = batch {
            let message = reason
                .error
                .map(|e| e.message.clone())
                .or_else(|| reason.detail.clone())
                .unwrap_or_default();
            self.applier
                .record_upload_error(batch, reason.reason, reason.error, &message)
                .await;
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match deadletter::publish(&outbox.dead_letters, &self.topology, delivery, reason).await {
                Ok(()) => break,
                Err(deadletter::DeadLetterError::Broker(e)) => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "dead letter not confirmed; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(self.cfg.retry.delay(attempt)) => {}
                    }
                }
            }
        }
        delivery.ack(BasicAckOptions::default()).await?;
        let message = reason.error.map(|e| e.to_string()).or_else(|| reason.detail.clone());
        outbox
            .reply(
                delivery,
                &ApplyOutcome::DeadLettered {
                    batch_id: batch.map(|b| b.batch_id.to_string()),
                    reason: reason.reason.to_owned(),
                    message,
                },
            )
            .await;
        self.metrics.dead_lettered.with_label_values(&[reason.reason]).inc();
        self.metrics.batches.with_label_values(&["dead_lettered"]).inc();
        Ok(())
    }
}

fn is_connectivity(error: &ApplyError) -> bool {
    error.class == ErrorClass::Transient && error.code.is_none()
}

/// The channels a connection publishes on besides consuming: dead letters (with publisher
/// confirms, since a dead letter must not be lost) and replies to apis waiting in
/// acknowledge-on-apply mode (best effort: a lost reply makes the api answer 503, and the
/// client's retry is skipped as already applied).
#[derive(Clone)]
pub(crate) struct Outbox {
    dead_letters: Channel,
    replies: Channel,
}

impl Outbox {
    async fn open(connection: &Connection) -> lapin::Result<Self> {
        let dead_letters = connection.create_channel().await?;
        dead_letters.confirm_select(ConfirmSelectOptions::default()).await?;
        let replies = connection.create_channel().await?;
        Ok(Self { dead_letters, replies })
    }

    /// Answers the api that published the batch, if it asked (RabbitMQ direct reply-to).
    async fn reply(&self, delivery: &Delivery, outcome: &ApplyOutcome) {
        let Some(reply_to) = delivery.properties.reply_to().as_ref() else {
            return;
        };
        let mut properties = BasicProperties::default().with_content_type("application/json".into());
        if let Some(correlation) = delivery.properties.correlation_id() {
            properties = properties.with_correlation_id(correlation.clone());
        }
        let body = serde_json::to_vec(outcome).unwrap_or_default();
        let sent = self
            .replies
            .basic_publish(
                "".into(),
                reply_to.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await;
        if let Err(e) = sent {
            tracing::debug!(error = %e, "could not send the apply acknowledgement");
        }
    }
}
