//! The message that carries one accepted upload batch through RabbitMQ. The body is JSON with a
//! `schema` tag, so a worker of a later release can tell (and keep reading) older messages.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::batch::Op;

/// `content_type` of every batch message.
pub const CONTENT_TYPE: &str = "application/json";
/// AMQP `type` property of a batch message; equals the body's `schema` tag.
pub const MESSAGE_TYPE_V1: &str = "uplink.batch.v1";

/// Header names carried beside the body (the body stays the source of truth).
pub mod headers {
    /// The user the batch belongs to (the token's `sub`).
    pub const USER_ID: &str = "x-uplink-user-id";
    /// The partition index the batch was routed to.
    pub const PARTITION: &str = "x-uplink-partition";
    /// W3C trace context of the request that accepted the batch.
    pub const TRACEPARENT: &str = "traceparent";
    /// How many times the batch was replayed from the dead-letter queue.
    pub const REPLAY_COUNT: &str = "x-uplink-replay-count";
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "schema")]
pub enum Envelope {
    #[serde(rename = "uplink.batch.v1")]
    V1(UploadBatch),
}

/// One accepted upload, as the worker will apply it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UploadBatch {
    /// Assigned by the api; also the AMQP `message_id`. Kept across dead-letter replays.
    pub batch_id: Uuid,
    pub user_id: String,
    /// The PowerSync client (device) the batch came from, when it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    pub partition: u16,
    /// When the api accepted the batch, milliseconds since the Unix epoch.
    pub accepted_at_ms: i64,
    pub ops: Vec<Op>,
}

/// What a worker tells an api waiting in acknowledge-on-apply mode (sent with RabbitMQ direct
/// reply-to, `correlation_id` = batch id).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ApplyOutcome {
    /// The batch committed; its documents are readable.
    Applied {
        batch_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        checkpoint: Option<i64>,
    },
    /// The batch cannot apply and went to the dead-letter queue.
    DeadLettered {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        batch_id: Option<String>,
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
}

impl Envelope {
    pub fn to_vec(&self) -> Vec<u8> {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_slice(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    pub fn batch(&self) -> &UploadBatch {
        match self {
            Envelope::V1(b) => b,
        }
    }

    pub fn into_batch(self) -> UploadBatch {
        match self {
            Envelope::V1(b) => b,
        }
    }
}

impl UploadBatch {
    /// The highest client op id: the write checkpoint this batch reaches.
    pub fn checkpoint(&self) -> Option<i64> {
        crate::batch::checkpoint_of(&self.ops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{Batch, Limits};

    #[test]
    fn a_batch_round_trips_through_the_envelope() {
        let body = br#"{"client_id":"c","batch":[{"op_id":1,"op":"PUT","type":"todos","id":"a","data":{"n":1.5,"t":"x","o":{"k":[1,null]}}},{"op":"DELETE","table":"todos","id":"b"}]}"#;
        let batch = Batch::parse(body, &Limits::default()).expect("valid");
        let env = Envelope::V1(UploadBatch {
            batch_id: Uuid::now_v7(),
            user_id: "u".into(),
            client_id: batch.client_id.clone(),
            partition: 3,
            accepted_at_ms: 1,
            ops: batch.ops.clone(),
        });
        let bytes = env.to_vec();
        let text = String::from_utf8(bytes.clone()).expect("utf-8");
        assert!(text.contains(r#""schema":"uplink.batch.v1""#), "{text}");
        assert_eq!(Envelope::from_slice(&bytes).expect("decodes"), env);
    }

    #[test]
    fn an_unknown_schema_is_an_error() {
        assert!(Envelope::from_slice(br#"{"schema":"uplink.batch.v9","batch_id":"x"}"#).is_err());
    }
}
