//! Publishing accepted batches to RabbitMQ with publisher confirms.
//!
//! One long-lived connection and confirm-mode channel, kept alive by a supervisor task that
//! reconnects with capped exponential backoff and re-declares the topology each time. A batch
//! counts as published only when the broker has confirmed it (Ack) and has not returned it as
//! unroutable (`mandatory`); everything else is an error the handler turns into a 503.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::{oneshot, Notify, RwLock};
use tokio_util::sync::CancellationToken;
use uplink_common::amqp::ReconnectBackoff;
use uplink_common::config::AmqpConfig;
use uplink_common::envelope::ApplyOutcome;
use uplink_common::topology::Topology;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("no connection to the broker")]
    Unavailable,
    #[error("the broker did not confirm within {0:?}")]
    Timeout(Duration),
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("the broker returned the message as unroutable: {0}")]
    Returned(String),
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    /// Acknowledge-on-apply: confirmed by the broker, but no worker committed it in time. The
    /// batch stays queued and will apply; the client's retry is deduplicated.
    #[error("confirmed, but not applied within {0:?}")]
    NotApplied(Duration),
    /// Acknowledge-on-apply: the connection the reply would come back on was lost.
    #[error("confirmed, but the connection to hear back from the worker was lost")]
    ReplyLost,
}

impl PublishError {
    /// Bounded label for metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            PublishError::Unavailable => "unavailable",
            PublishError::Timeout(_) => "timeout",
            PublishError::Nacked => "nacked",
            PublishError::Returned(_) => "returned",
            PublishError::Broker(_) => "error",
            PublishError::NotApplied(_) => "not_applied",
            PublishError::ReplyLost => "reply_lost",
        }
    }
}

#[derive(Clone)]
struct Live {
    connection: Arc<Connection>,
    channel: Channel,
}

#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    amqp: AmqpConfig,
    topology: Topology,
    confirm_timeout: Duration,
    live: RwLock<Option<Live>>,
    /// Woken when a publish fails, so the supervisor checks the connection at once.
    trouble: Notify,
    /// Woken when a connection has been established.
    connected: Notify,
    connection_name: String,
    /// Acknowledge-on-apply: whether the channel listens for workers' replies.
    await_replies: bool,
    /// Batches whose commit someone is waiting for, by batch id (the `correlation_id`).
    pending: Mutex<HashMap<String, oneshot::Sender<ApplyOutcome>>>,
}

/// RabbitMQ's direct reply-to pseudo-queue: replies reach the channel that published the
/// request, with no queue to declare or clean up, so api replicas stay stateless.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

const HEALTH_POLL: Duration = Duration::from_millis(250);

impl Publisher {
    /// Starts the supervisor; it connects in the background and keeps reconnecting until
    /// `cancel` fires.
    pub fn start(
        amqp: AmqpConfig,
        confirm_timeout: Duration,
        connection_name: String,
        await_replies: bool,
        cancel: CancellationToken,
    ) -> Self {
        let topology = Topology::new(&amqp);
        let inner = Arc::new(Inner {
            amqp,
            topology,
            confirm_timeout,
            live: RwLock::new(None),
            trouble: Notify::new(),
            connected: Notify::new(),
            connection_name,
            await_replies,
            pending: Mutex::new(HashMap::new()),
        });
        tokio::spawn(supervise(inner.clone(), cancel));
        Self { inner }
    }

    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// Whether a connection with a usable confirm channel is up.
    pub async fn is_ready(&self) -> bool {
        match &*self.inner.live.read().await {
            Some(live) => live.connection.status().connected() && live.channel.status().connected(),
            None => false,
        }
    }

    /// Waits until the publisher is connected, or the timeout passes.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.is_ready().await {
                return true;
            }
            let notified = self.inner.connected.notified();
            if tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep(HEALTH_POLL) => {}
                }
            })
            .await
            .is_err()
            {
                return self.is_ready().await;
            }
        }
    }

    /// Publishes one persistent message to the uploads exchange and waits for the broker's
    /// confirm. Returns only when the broker has taken responsibility for the message.
    pub async fn publish(
        &self,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let live = self.inner.live.read().await.clone().ok_or(PublishError::Unavailable)?;
        let exchange = self.inner.topology.uploads_exchange();
        let timeout = self.inner.confirm_timeout;
        let result = tokio::time::timeout(timeout, async {
            let confirm = live
                .channel
                .basic_publish(
                    exchange.as_str().into(),
                    routing_key.into(),
                    // mandatory: an unroutable message (a missing binding) comes back instead of
                    // being silently dropped with an Ack.
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    payload,
                    properties,
                )
                .await?;
            confirm.await.map_err(PublishError::from)
        })
        .await;
        let outcome = match result {
            Err(_) => Err(PublishError::Timeout(timeout)),
            Ok(Err(e)) => Err(e),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(returned)))) => Err(PublishError::Returned(returned.reply_text.to_string())),
            Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked),
            // The channel is always in confirm mode; reaching this means it was not.
            Ok(Ok(Confirmation::NotRequested)) => Err(PublishError::Nacked),
        };
        if matches!(outcome, Err(PublishError::Broker(_) | PublishError::Timeout(_))) {
            self.inner.trouble.notify_one();
        }
        outcome
    }
}

impl Publisher {
    /// Acknowledge-on-apply: publishes like [`Publisher::publish`], then waits until a worker
    /// reports the batch committed (or dead-lettered), at most `apply_timeout`.
    pub async fn publish_and_wait_applied(
        &self,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
        batch_id: &str,
        apply_timeout: Duration,
    ) -> Result<ApplyOutcome, PublishError> {
        let (tx, rx) = oneshot::channel();
        self.pending().insert(batch_id.to_owned(), tx);
        let properties = properties
            .with_reply_to(DIRECT_REPLY_TO.into())
            .with_correlation_id(batch_id.into());
        if let Err(e) = self.publish(routing_key, payload, properties).await {
            self.pending().remove(batch_id);
            return Err(e);
        }
        let outcome = tokio::time::timeout(apply_timeout, rx).await;
        self.pending().remove(batch_id);
        match outcome {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(_)) => Err(PublishError::ReplyLost),
            Err(_) => Err(PublishError::NotApplied(apply_timeout)),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<ApplyOutcome>>> {
        // A poisoned map only means a panic elsewhere while holding it; its contents are
        // still valid.
        self.inner.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Hands each worker reply to the request waiting for it.
async fn route_replies(inner: Arc<Inner>, mut replies: lapin::Consumer) {
    while let Some(Ok(delivery)) = replies.next().await {
        let Some(batch_id) = delivery.properties.correlation_id().as_ref().map(|c| c.to_string()) else {
            continue;
        };
        let outcome: ApplyOutcome = match serde_json::from_slice(&delivery.data) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, %batch_id, "unreadable apply acknowledgement");
                continue;
            }
        };
        let waiter = inner
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&batch_id);
        if let Some(waiter) = waiter {
            let _ = waiter.send(outcome);
        }
    }
}

async fn supervise(inner: Arc<Inner>, cancel: CancellationToken) {
    let mut backoff = ReconnectBackoff::new();
    while !cancel.is_cancelled() {
        match open(&inner).await {
            Ok((live, replies)) => {
                if let Some(replies) = replies {
                    tokio::spawn(route_replies(inner.clone(), replies));
                }
                run_connection(&inner, live, &cancel).await;
                backoff.reset();
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff.current(), "cannot connect to the broker");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
    if let Some(live) = inner.live.write().await.take() {
        let _ = live.connection.close(200, "uplink-api stopping".into()).await;
    }
}

/// Publishes through `live` until its connection breaks or `cancel` fires.
async fn run_connection(inner: &Inner, live: Live, cancel: &CancellationToken) {
    tracing::info!(prefix = %inner.topology.prefix, "connected to the broker, topology declared");
    *inner.live.write().await = Some(live.clone());
    inner.connected.notify_waiters();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = inner.trouble.notified() => {}
            _ = tokio::time::sleep(HEALTH_POLL) => {}
        }
        if !(live.connection.status().connected() && live.channel.status().connected()) {
            tracing::warn!("broker connection lost; reconnecting");
            break;
        }
    }
    *inner.live.write().await = None;
    // Replies for these would have come back on the lost channel: fail the waiters now rather
    // than at their timeout.
    inner.pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
    let _ = live
        .connection
        .close(200, "uplink-api reconnecting or stopping".into())
        .await;
}

async fn open(inner: &Inner) -> lapin::Result<(Live, Option<lapin::Consumer>)> {
    let connection = uplink_common::amqp::connect(&inner.amqp.url, &inner.connection_name).await?;
    let channel = connection.create_channel().await?;
    inner.topology.declare(&channel).await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    // Direct reply-to needs the requests published on the channel that consumes the replies,
    // in no-ack mode.
    let replies = if inner.await_replies {
        Some(
            channel
                .basic_consume(
                    DIRECT_REPLY_TO.into(),
                    "uplink-api-apply-acks".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?,
        )
    } else {
        None
    };
    Ok((
        Live {
            connection: Arc::new(connection),
            channel,
        },
        replies,
    ))
}
