//! Sending a batch that cannot apply to the dead-letter exchange, with the reason attached as
//! headers, so an operator can see why and replay it after fixing the cause.

use std::time::{SystemTime, UNIX_EPOCH};

use lapin::message::Delivery;
use lapin::options::BasicPublishOptions;
use lapin::types::AMQPValue;
use lapin::{Channel, Confirmation};
use uplink_common::amqp::text;
use uplink_common::topology::Topology;

use crate::errors::ApplyError;

/// Header names of a dead letter's reason.
pub mod headers {
    /// `permanent`, `attempts_exhausted` or `undecodable` (the broker's own dead-lettering,
    /// after the delivery limit, shows as `x-death` with reason `delivery_limit`).
    pub const REASON: &str = "x-uplink-dead-reason";
    pub const ERROR_CLASS: &str = "x-uplink-error-class";
    pub const ERROR_CODE: &str = "x-uplink-error-code";
    pub const ERROR_MESSAGE: &str = "x-uplink-error-message";
    pub const OP_INDEX: &str = "x-uplink-op-index";
    pub const COLLECTION: &str = "x-uplink-collection";
    pub const ATTEMPTS: &str = "x-uplink-attempts";
    pub const FIRST_FAILURE_MS: &str = "x-uplink-first-failure-ms";
    pub const LAST_FAILURE_MS: &str = "x-uplink-last-failure-ms";
    pub const WORKER_ID: &str = "x-uplink-worker-id";
    pub const ORIGINAL_QUEUE: &str = "x-uplink-original-queue";
    pub const DEAD_AT_MS: &str = "x-uplink-dead-at-ms";
}

/// Why a batch is being dead-lettered.
pub struct Reason<'a> {
    pub reason: &'static str,
    pub error: Option<&'a ApplyError>,
    /// Message for errors that are not `ApplyError`s (an undecodable body).
    pub detail: Option<String>,
    pub attempts: u32,
    pub first_failure_ms: i64,
    pub worker_id: &'a str,
    pub queue: &'a str,
}

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker did not accept the dead letter (nack or unroutable)")]
    NotConfirmed,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// Publishes a copy of the delivery, reason attached, to the dead-letter exchange and waits
/// for the broker's confirm. The caller acks the original only after this succeeds, so a
/// crash in between leaves the batch in its partition (to be dead-lettered again), never lost.
pub async fn publish(
    channel: &Channel,
    topology: &Topology,
    delivery: &Delivery,
    reason: &Reason<'_>,
) -> Result<(), DeadLetterError> {
    let mut table = delivery.properties.headers().clone().unwrap_or_default();
    let mut set = |k: &str, v: AMQPValue| {
        table.insert(k.into(), v);
    };
    set(headers::REASON, text(reason.reason));
    if let Some(e) = reason.error {
        set(headers::ERROR_CLASS, text(e.class.as_str()));
        if let Some(code) = e.code {
            set(headers::ERROR_CODE, AMQPValue::LongInt(code));
        }
        set(headers::ERROR_MESSAGE, text(&truncate(&e.message, 2000)));
        if let Some(i) = e.op_index {
            set(
                headers::OP_INDEX,
                AMQPValue::LongLongInt(i64::try_from(i).unwrap_or(i64::MAX)),
            );
        }
        if let Some(c) = &e.collection {
            set(headers::COLLECTION, text(c));
        }
    } else if let Some(detail) = &reason.detail {
        set(headers::ERROR_CLASS, text("permanent"));
        set(headers::ERROR_MESSAGE, text(&truncate(detail, 2000)));
    }
    set(headers::ATTEMPTS, AMQPValue::LongLongInt(i64::from(reason.attempts)));
    let now = now_ms();
    set(
        headers::FIRST_FAILURE_MS,
        AMQPValue::LongLongInt(reason.first_failure_ms),
    );
    set(headers::LAST_FAILURE_MS, AMQPValue::LongLongInt(now));
    set(headers::DEAD_AT_MS, AMQPValue::LongLongInt(now));
    set(headers::WORKER_ID, text(reason.worker_id));
    set(headers::ORIGINAL_QUEUE, text(reason.queue));
    let properties = delivery.properties.clone().with_headers(table).with_delivery_mode(2);
    let confirm = channel
        .basic_publish(
            topology.dead_exchange().as_str().into(),
            reason.queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &delivery.data,
            properties,
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        _ => Err(DeadLetterError::NotConfirmed),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
