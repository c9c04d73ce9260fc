//! The dead-letter tool behind `uplink-worker dlq list | show | replay | purge | export`: it
//! inspects the dead-letter queue and moves only the messages a [`Selection`] picks.
//!
//! Reading without removing: every message of the dead queue is taken with `basic.get` and left
//! unacknowledged while the tool decides. The broker never hands an unacknowledged message to
//! the same channel twice, so one pass sees each message exactly once; the pass stops after the
//! number of messages the queue held when it started, so dead letters arriving meanwhile cannot
//! keep it going. Only what the tool removes (a replayed batch once the broker has confirmed its
//! new copy, a purged one once the operator confirmed) is acknowledged; everything else is
//! requeued in the order it was taken. If the tool dies at any point the broker requeues what it
//! held: nothing is lost, and at worst a batch was replayed and is still in the queue, which is
//! harmless because the worker's apply is idempotent (replace-upserts, and ops at or below the
//! client's checkpoint are skipped).
//!
//! Configuration: the broker settings of the worker's environment, `AMQP_URL`,
//! `UPLINK_QUEUE_PREFIX`, `UPLINK_PARTITIONS` (and `UPLINK_DELIVERY_LIMIT`), read by
//! [`AmqpConfig::from_env`]. The tool never talks to MongoDB, so `MONGO_URI` is not needed: an
//! operator can run it from anywhere that reaches the broker.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::time::Duration;

use base64::Engine;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Acker;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use secrecy::SecretString;
use serde::Serialize;
use serde_json::{Map, Value};
use uplink_common::amqp::{header_i64, header_str};
use uplink_common::config::AmqpConfig;
use uplink_common::envelope::headers as h;
use uplink_common::topology::Topology;
use uplink_common::{Envelope, UploadBatch};

use crate::deadletter::{headers as dh, now_ms};

/// Reasons a dead letter can carry. The first three are set by the worker; the last is the
/// broker's, for a batch delivered more often than the partition queue's delivery limit.
pub mod reasons {
    pub const PERMANENT: &str = "permanent";
    pub const ATTEMPTS_EXHAUSTED: &str = "attempts_exhausted";
    pub const UNDECODABLE: &str = "undecodable";
    pub const DELIVERY_LIMIT: &str = "delivery_limit";
}

/// Key under which dead letters without a known collection are counted.
pub const NO_COLLECTION: &str = "(none)";

/// Headers that describe a death rather than the batch; a replayed copy goes without them.
const DEATH_HEADERS: &[&str] = &[
    dh::REASON,
    dh::ERROR_CLASS,
    dh::ERROR_CODE,
    dh::ERROR_MESSAGE,
    dh::OP_INDEX,
    dh::COLLECTION,
    dh::ATTEMPTS,
    dh::FIRST_FAILURE_MS,
    dh::LAST_FAILURE_MS,
    dh::WORKER_ID,
    dh::ORIGINAL_QUEUE,
    dh::DEAD_AT_MS,
    // The broker's own dead-lettering record.
    "x-death",
    // Set by quorum queues on redelivery; a stale copy would mislead the worker's logs.
    "x-delivery-count",
];

fn is_death_header(name: &str) -> bool {
    DEATH_HEADERS.contains(&name) || name.starts_with("x-first-death-") || name.starts_with("x-last-death-")
}

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the dead-letter queue `{0}` does not exist (is UPLINK_QUEUE_PREFIX right?)")]
    NoDeadQueue(String),
    #[error("cannot write: {0}")]
    Io(#[from] std::io::Error),
}

/// Which dead letters a command acts on. Values of one flag are alternatives (any may match);
/// different flags must all match. An empty selection picks everything.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub batch_ids: Vec<String>,
    pub reasons: Vec<String>,
    /// Matches the failing op's collection, or the collection of any op in the batch.
    pub collections: Vec<String>,
    pub users: Vec<String>,
    /// Only dead letters that died at least this long ago (those of unknown age never match).
    pub older_than: Option<Duration>,
    /// At most this many dead letters (in queue order).
    pub limit: Option<usize>,
}

impl Selection {
    /// True when no filter is set (a limit alone still selects "everything, up to N").
    pub fn is_unfiltered(&self) -> bool {
        self.batch_ids.is_empty()
            && self.reasons.is_empty()
            && self.collections.is_empty()
            && self.users.is_empty()
            && self.older_than.is_none()
    }

    pub fn matches(&self, letter: &Summary, now_ms: i64) -> bool {
        fn any(wanted: &[String], value: Option<&str>) -> bool {
            wanted.is_empty() || value.is_some_and(|v| wanted.iter().any(|w| w == v))
        }
        let collection_ok = self.collections.is_empty()
            || self
                .collections
                .iter()
                .any(|c| letter.collection.as_deref() == Some(c.as_str()) || letter.collections.iter().any(|l| l == c));
        let age_ok = match self.older_than {
            None => true,
            Some(min) => letter
                .dead_at_ms
                .is_some_and(|at| now_ms.saturating_sub(at) >= i64::try_from(min.as_millis()).unwrap_or(i64::MAX)),
        };
        any(&self.batch_ids, letter.batch_id.as_deref())
            && any(&self.reasons, Some(letter.reason.as_str()))
            && any(&self.users, letter.user_id.as_deref())
            && collection_ok
            && age_ok
    }
}

/// What an operator needs to decide about a dead letter, read from its headers and body.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// The AMQP `message_id` (the api's batch id), or the body's when the property is missing.
    pub batch_id: Option<String>,
    pub user_id: Option<String>,
    pub client_id: Option<String>,
    /// The partition the batch came from, where a replay sends it back to.
    pub partition: Option<u16>,
    pub original_queue: Option<String>,
    /// `permanent`, `attempts_exhausted`, `undecodable` or `delivery_limit` (see [`reasons`]).
    pub reason: String,
    pub error_class: Option<String>,
    /// MongoDB error code, when the server gave one.
    pub error_code: Option<i64>,
    pub error_message: Option<String>,
    pub op_index: Option<i64>,
    /// The failing op's collection, or the batch's only collection when that is unknown.
    pub collection: Option<String>,
    /// Every collection the batch writes to, in order of first appearance.
    pub collections: Vec<String>,
    pub ops: Option<usize>,
    pub attempts: Option<i64>,
    pub first_failure_ms: Option<i64>,
    pub last_failure_ms: Option<i64>,
    /// When the batch was dead-lettered, milliseconds since the Unix epoch.
    pub dead_at_ms: Option<i64>,
    pub worker_id: Option<String>,
    /// How many times the batch was replayed before.
    pub replay_count: i64,
}

/// One dead letter in full: the summary, every property and header, and the body.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeadLetter {
    #[serde(flatten)]
    pub summary: Summary,
    pub properties: Map<String, Value>,
    pub headers: Map<String, Value>,
    /// The body as JSON; `null` when it is not JSON, in which case `body_base64` holds it.
    pub body: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
}

impl DeadLetter {
    /// Reads a message of the dead queue. Never fails: whatever cannot be read stays unknown.
    pub fn read(properties: &BasicProperties, data: &[u8], topology: &Topology) -> Self {
        let headers = properties.headers().as_ref();
        let batch: Option<UploadBatch> = Envelope::from_slice(data).ok().map(Envelope::into_batch);
        let death = XDeath::read(headers);
        let reason = header_str(headers, dh::REASON)
            .or_else(|| death.as_ref().and_then(|d| d.reason.clone()))
            .unwrap_or_else(|| "unknown".to_owned());
        let original_queue =
            header_str(headers, dh::ORIGINAL_QUEUE).or_else(|| death.as_ref().and_then(|d| d.queue.clone()));
        let partition = original_queue
            .as_deref()
            .and_then(|q| partition_in_queue_name(topology, q))
            .or_else(|| header_i64(headers, h::PARTITION).and_then(|p| u16::try_from(p).ok()))
            .or_else(|| batch.as_ref().map(|b| b.partition));
        let mut collections: Vec<String> = Vec::new();
        for op in batch.iter().flat_map(|b| &b.ops) {
            if !collections.iter().any(|c| c == op.collection.as_str()) {
                collections.push(op.collection.as_str().to_owned());
            }
        }
        let collection = header_str(headers, dh::COLLECTION).or_else(|| match collections.as_slice() {
            [only] => Some(only.clone()),
            _ => None,
        });
        let summary = Summary {
            batch_id: properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned())
                .or_else(|| batch.as_ref().map(|b| b.batch_id.to_string())),
            user_id: header_str(headers, h::USER_ID).or_else(|| batch.as_ref().map(|b| b.user_id.clone())),
            client_id: batch.as_ref().and_then(|b| b.client_id.clone()),
            partition,
            original_queue,
            reason,
            error_class: header_str(headers, dh::ERROR_CLASS),
            error_code: header_i64(headers, dh::ERROR_CODE),
            error_message: header_str(headers, dh::ERROR_MESSAGE),
            op_index: header_i64(headers, dh::OP_INDEX),
            collection,
            collections,
            ops: batch.as_ref().map(|b| b.ops.len()),
            attempts: header_i64(headers, dh::ATTEMPTS),
            first_failure_ms: header_i64(headers, dh::FIRST_FAILURE_MS),
            last_failure_ms: header_i64(headers, dh::LAST_FAILURE_MS),
            dead_at_ms: header_i64(headers, dh::DEAD_AT_MS).or_else(|| death.as_ref().and_then(|d| d.time_ms)),
            worker_id: header_str(headers, dh::WORKER_ID),
            replay_count: header_i64(headers, h::REPLAY_COUNT).unwrap_or(0),
        };
        let (body, body_base64) = match serde_json::from_slice::<Value>(data) {
            Ok(v) => (v, None),
            Err(_) => (
                Value::Null,
                Some(base64::engine::general_purpose::STANDARD.encode(data)),
            ),
        };
        Self {
            summary,
            properties: properties_json(properties),
            headers: properties.headers().as_ref().map(table_json).unwrap_or_default(),
            body,
            body_base64,
        }
    }
}

/// The first (most recent) entry of the broker's `x-death` header.
struct XDeath {
    reason: Option<String>,
    queue: Option<String>,
    time_ms: Option<i64>,
}

impl XDeath {
    fn read(headers: Option<&FieldTable>) -> Option<Self> {
        let AMQPValue::FieldArray(entries) = headers?.inner().get("x-death")? else {
            return None;
        };
        let AMQPValue::FieldTable(first) = entries.as_slice().first()? else {
            return None;
        };
        Some(Self {
            reason: header_str(Some(first), "reason"),
            queue: header_str(Some(first), "queue"),
            // An AMQP timestamp is in seconds.
            time_ms: header_i64(Some(first), "time").map(|s| s.saturating_mul(1000)),
        })
    }
}

/// The partition index in `{prefix}.uploads.{i}`, whatever the configured partition count.
fn partition_in_queue_name(topology: &Topology, queue: &str) -> Option<u16> {
    queue
        .strip_prefix(&topology.prefix)?
        .strip_prefix(".uploads.")?
        .parse()
        .ok()
}

/// An AMQP field value as JSON (byte arrays as base64, decimals as `{scale, value}`).
pub fn amqp_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(v) => Value::from(*v),
        AMQPValue::ShortShortUInt(v) => Value::from(*v),
        AMQPValue::ShortInt(v) => Value::from(*v),
        AMQPValue::ShortUInt(v) => Value::from(*v),
        AMQPValue::LongInt(v) => Value::from(*v),
        AMQPValue::LongUInt(v) => Value::from(*v),
        AMQPValue::LongLongInt(v) => Value::from(*v),
        AMQPValue::Float(v) => Value::from(*v),
        AMQPValue::Double(v) => Value::from(*v),
        AMQPValue::DecimalValue(d) => serde_json::json!({"scale": d.scale, "value": d.value}),
        AMQPValue::ShortString(s) => Value::from(s.as_str()),
        AMQPValue::LongString(s) => Value::from(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_json).collect()),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::FieldTable(t) => Value::Object(table_json(t)),
        AMQPValue::ByteArray(b) => Value::from(base64::engine::general_purpose::STANDARD.encode(b.as_slice())),
        AMQPValue::Void => Value::Null,
    }
}

fn table_json(table: &FieldTable) -> Map<String, Value> {
    table
        .inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), amqp_json(v)))
        .collect()
}

fn properties_json(p: &BasicProperties) -> Map<String, Value> {
    let mut map = Map::new();
    let mut put = |key: &str, value: Option<Value>| {
        if let Some(v) = value {
            map.insert(key.to_owned(), v);
        }
    };
    let text = |s: &Option<lapin::types::ShortString>| s.as_ref().map(|s| Value::from(s.as_str()));
    put("message_id", text(p.message_id()));
    put("timestamp", p.timestamp().map(Value::from));
    put("type", text(p.kind()));
    put("content_type", text(p.content_type()));
    put("content_encoding", text(p.content_encoding()));
    put("delivery_mode", p.delivery_mode().map(Value::from));
    put("priority", p.priority().map(Value::from));
    put("correlation_id", text(p.correlation_id()));
    put("reply_to", text(p.reply_to()));
    put("expiration", text(p.expiration()));
    put("user_id", text(p.user_id()));
    put("app_id", text(p.app_id()));
    put("cluster_id", text(p.cluster_id()));
    map
}

/// The properties of a replayed copy: the original's (message id, timestamp, user, trace
/// context…), without the death headers, with the replay count raised, persistent.
pub fn replay_properties(original: &BasicProperties, replay_count: i64) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(old) = original.headers() {
        for (k, v) in old.inner() {
            if !is_death_header(k.as_str()) {
                headers.insert(k.clone(), v.clone());
            }
        }
    }
    headers.insert(h::REPLAY_COUNT.into(), AMQPValue::LongLongInt(replay_count));
    original.clone().with_headers(headers).with_delivery_mode(2)
}

/// `list`: the selected dead letters and counts.
#[derive(Clone, Debug, Serialize)]
pub struct Listing {
    pub queue: String,
    /// Messages looked at (the queue's depth when the pass started, unless it shrank).
    pub scanned: usize,
    /// Messages the selection matched (before the limit).
    pub matched: usize,
    /// Counts of the matched dead letters by reason and by collection ([`NO_COLLECTION`] when
    /// unknown).
    pub by_reason: BTreeMap<String, usize>,
    pub by_collection: BTreeMap<String, usize>,
    /// The matched dead letters in queue order, at most `limit` of them.
    pub dead_letters: Vec<Summary>,
}

/// Where a replayed batch went (or, in a dry run, would go).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Replayed {
    pub batch_id: Option<String>,
    pub user_id: Option<String>,
    pub partition: u16,
    pub routing_key: String,
    pub queue: String,
    /// The replay count the copy carries.
    pub replay_count: i64,
}

/// A selected dead letter that was not replayed, and why. It stays in the dead-letter queue.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NotReplayed {
    pub batch_id: Option<String>,
    pub error: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReplayReport {
    pub dry_run: bool,
    pub exchange: String,
    pub scanned: usize,
    pub replayed: Vec<Replayed>,
    pub failed: Vec<NotReplayed>,
    /// Set when the broker connection failed part-way; what `replayed` lists was done.
    pub aborted: Option<String>,
}

/// What a purge is about to remove, for the confirmation.
#[derive(Clone, Debug)]
pub struct PurgePlan<'a> {
    pub queue: &'a str,
    pub scanned: usize,
    pub selected: Vec<&'a Summary>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PurgeReport {
    pub scanned: usize,
    pub selected: usize,
    pub confirmed: bool,
    pub purged: usize,
}

/// The dead-letter tool, configured for one deployment.
#[derive(Clone, Debug)]
pub struct Dlq {
    url: SecretString,
    topology: Topology,
}

impl Dlq {
    pub fn new(amqp: &AmqpConfig) -> Self {
        Self {
            url: amqp.url.clone(),
            topology: Topology::new(amqp),
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The selected dead letters (up to the limit, rows) and counts of every match.
    pub async fn list(&self, selection: &Selection) -> Result<Listing, DlqError> {
        let scan = self.scan(selection, true).await?;
        let mut by_reason = BTreeMap::new();
        let mut by_collection = BTreeMap::new();
        for s in &scan.matched {
            *by_reason.entry(s.reason.clone()).or_insert(0) += 1;
            let collection = s.collection.clone().unwrap_or_else(|| NO_COLLECTION.to_owned());
            *by_collection.entry(collection).or_insert(0) += 1;
        }
        let limit = selection.limit.unwrap_or(usize::MAX);
        let listing = Listing {
            queue: scan.queue.clone(),
            scanned: scan.taken.len(),
            matched: scan.matched.len(),
            by_reason,
            by_collection,
            dead_letters: scan.matched.iter().take(limit).cloned().collect(),
        };
        scan.finish().await;
        Ok(listing)
    }

    /// The selected dead letters in full, removing nothing.
    pub async fn read(&self, selection: &Selection) -> Result<Vec<DeadLetter>, DlqError> {
        let scan = self.scan(selection, false).await?;
        let letters = scan
            .taken
            .iter()
            .filter_map(|t| t.picked.as_ref().map(|p| p.letter.clone()))
            .collect();
        scan.finish().await;
        Ok(letters)
    }

    /// Writes the selected dead letters as JSON lines, removing nothing. Returns how many.
    pub async fn export(&self, selection: &Selection, out: &mut dyn Write) -> Result<usize, DlqError> {
        let letters = self.read(selection).await?;
        for letter in &letters {
            // Plain data with string keys: serialising cannot fail.
            let line = serde_json::to_string(letter).unwrap_or_default();
            writeln!(out, "{line}")?;
        }
        out.flush()?;
        Ok(letters.len())
    }

    /// Re-publishes the selected batches to their original partition (see the module docs for
    /// why a crash loses nothing). A dry run only reports where each would go.
    pub async fn replay(&self, selection: &Selection, dry_run: bool) -> Result<ReplayReport, DlqError> {
        let mut scan = self.scan(selection, false).await?;
        let mut report = ReplayReport {
            dry_run,
            exchange: self.topology.uploads_exchange(),
            scanned: scan.taken.len(),
            replayed: Vec::new(),
            failed: Vec::new(),
            aborted: None,
        };
        if let Err(e) = self.replay_scanned(&mut scan, &mut report).await {
            report.aborted = Some(e);
        }
        scan.finish().await;
        Ok(report)
    }

    async fn replay_scanned(&self, scan: &mut Scan, report: &mut ReplayReport) -> Result<(), String> {
        let publisher = if report.dry_run {
            None
        } else {
            let open = async {
                let channel = scan.connection.create_channel().await?;
                channel.confirm_select(ConfirmSelectOptions::default()).await?;
                Ok::<_, lapin::Error>(channel)
            };
            Some(
                open.await
                    .map_err(|e| format!("cannot open a publishing channel: {e}"))?,
            )
        };
        for taken in &mut scan.taken {
            let Some(picked) = &taken.picked else {
                continue;
            };
            let summary = &picked.letter.summary;
            let partition = match summary.partition {
                Some(p) if p < self.topology.partitions => p,
                Some(p) => {
                    report.failed.push(NotReplayed {
                        batch_id: summary.batch_id.clone(),
                        error: format!(
                            "partition {p} does not exist (UPLINK_PARTITIONS is {})",
                            self.topology.partitions
                        ),
                    });
                    continue;
                }
                None => {
                    report.failed.push(NotReplayed {
                        batch_id: summary.batch_id.clone(),
                        error: "the original partition is unknown".to_owned(),
                    });
                    continue;
                }
            };
            let replayed = Replayed {
                batch_id: summary.batch_id.clone(),
                user_id: summary.user_id.clone(),
                partition,
                routing_key: self.topology.routing_key(partition),
                queue: self.topology.partition_queue(partition),
                replay_count: summary.replay_count + 1,
            };
            if let Some(channel) = &publisher {
                let id = replayed.batch_id.clone().unwrap_or_else(|| "-".to_owned());
                let publish = async {
                    channel
                        .basic_publish(
                            report.exchange.as_str().into(),
                            replayed.routing_key.as_str().into(),
                            // Mandatory: a copy no queue takes comes back instead of vanishing.
                            BasicPublishOptions {
                                mandatory: true,
                                ..BasicPublishOptions::default()
                            },
                            &picked.data,
                            replay_properties(&picked.properties, replayed.replay_count),
                        )
                        .await?
                        .await
                };
                let confirm = publish
                    .await
                    .map_err(|e| format!("publishing {id} failed ({e}); it stays in the dead-letter queue"))?;
                let refused = match confirm {
                    Confirmation::Ack(None) => None,
                    Confirmation::Ack(Some(returned)) => Some(format!("unroutable: {}", returned.reply_text.as_str())),
                    Confirmation::Nack(_) => Some("the broker refused the copy (nack)".to_owned()),
                    Confirmation::NotRequested => Some("publisher confirms are off".to_owned()),
                };
                if let Some(error) = refused {
                    report.failed.push(NotReplayed {
                        batch_id: replayed.batch_id,
                        error,
                    });
                    continue;
                }
                // Only now, with the copy confirmed, does the dead letter go.
                if let Err(e) = taken.acker.ack(BasicAckOptions::default()).await {
                    report.replayed.push(replayed);
                    return Err(format!(
                        "{id} was replayed but its dead letter could not be removed ({e}); \
                         replaying it again is harmless"
                    ));
                }
                taken.removed = true;
            }
            report.replayed.push(replayed);
        }
        if let Some(channel) = publisher {
            let _ = channel.close(200, "replay done".into()).await;
        }
        Ok(())
    }

    /// Removes the selected dead letters once `confirm` agrees. `confirm` sees exactly what
    /// will be removed: the messages stay held (unacknowledged) while it decides.
    pub async fn purge(
        &self,
        selection: &Selection,
        confirm: impl FnOnce(&PurgePlan<'_>) -> bool,
    ) -> Result<PurgeReport, DlqError> {
        let mut scan = self.scan(selection, false).await?;
        let plan = PurgePlan {
            queue: &scan.queue,
            scanned: scan.taken.len(),
            selected: scan
                .taken
                .iter()
                .filter_map(|t| t.picked.as_ref().map(|p| &p.letter.summary))
                .collect(),
        };
        let mut report = PurgeReport {
            scanned: plan.scanned,
            selected: plan.selected.len(),
            confirmed: false,
            purged: 0,
        };
        if report.selected > 0 {
            report.confirmed = confirm(&plan);
        }
        let mut result = Ok(());
        if report.confirmed {
            for taken in scan.taken.iter_mut().filter(|t| t.picked.is_some()) {
                if let Err(e) = taken.acker.ack(BasicAckOptions::default()).await {
                    result = Err(e);
                    break;
                }
                taken.removed = true;
                report.purged += 1;
            }
        }
        scan.finish().await;
        result?;
        Ok(report)
    }

    /// Takes every message of the dead queue (up to its depth at the start), unacknowledged,
    /// and picks the selected ones. With `count_all`, it goes on past the limit to count every
    /// match; otherwise it stops once the limit is reached.
    async fn scan(&self, selection: &Selection, count_all: bool) -> Result<Scan, DlqError> {
        let connection = uplink_common::amqp::connect(&self.url, "uplink-worker dlq").await?;
        let channel = match connection.create_channel().await {
            Ok(c) => c,
            Err(e) => {
                let _ = connection.close(200, "dlq: error".into()).await;
                return Err(e.into());
            }
        };
        let mut scan = Scan {
            connection,
            channel,
            queue: self.topology.dead_queue(),
            depth_at_start: 0,
            taken: Vec::new(),
            matched: Vec::new(),
        };
        match self.take_all(&mut scan, selection, count_all).await {
            Ok(()) => Ok(scan),
            Err(e) => {
                scan.finish().await;
                Err(e)
            }
        }
    }

    async fn take_all(&self, scan: &mut Scan, selection: &Selection, count_all: bool) -> Result<(), DlqError> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let depth = scan
            .channel
            .queue_declare(scan.queue.as_str().into(), passive, FieldTable::default())
            .await
            .map_err(|e| match e.kind() {
                lapin::ErrorKind::ProtocolError(p) if p.get_id() == 404 => DlqError::NoDeadQueue(scan.queue.clone()),
                _ => DlqError::Broker(e),
            })?
            .message_count();
        scan.depth_at_start = depth;
        let limit = selection.limit.unwrap_or(usize::MAX);
        let now = now_ms();
        let mut picked = 0usize;
        for _ in 0..depth {
            if picked >= limit && !count_all {
                break;
            }
            let Some(message) = scan
                .channel
                .basic_get(scan.queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await?
            else {
                break;
            };
            let delivery = message.delivery;
            let letter = DeadLetter::read(&delivery.properties, &delivery.data, &self.topology);
            let mut taken = Taken {
                acker: delivery.acker.clone(),
                picked: None,
                removed: false,
            };
            if selection.matches(&letter.summary, now) {
                scan.matched.push(letter.summary.clone());
                if picked < limit {
                    picked += 1;
                    taken.picked = Some(Picked {
                        letter,
                        properties: delivery.properties,
                        data: delivery.data,
                    });
                }
            }
            scan.taken.push(taken);
        }
        Ok(())
    }
}

/// The messages one pass holds, in queue order.
struct Scan {
    connection: Connection,
    channel: Channel,
    queue: String,
    /// Ready messages in the queue when the pass started.
    depth_at_start: u32,
    taken: Vec<Taken>,
    /// Summaries of every match, including those past the limit when counting all.
    matched: Vec<Summary>,
}

struct Taken {
    acker: Acker,
    /// Set when the selection picked the message (within the limit).
    picked: Option<Picked>,
    removed: bool,
}

struct Picked {
    letter: DeadLetter,
    properties: BasicProperties,
    data: Vec<u8>,
}

impl Scan {
    /// Requeues everything not removed, in the order taken, and closes. Failures are not
    /// errors: the broker requeues whatever a closed channel held anyway.
    async fn finish(self) {
        let requeue = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        let mut released = true;
        for taken in self.taken.iter().filter(|t| !t.removed) {
            if let Err(e) = taken.acker.nack(requeue).await {
                tracing::debug!(error = %e, "requeue failed; the broker requeues on close");
                released = false;
                break;
            }
        }
        if released {
            self.wait_until_requeued().await;
        }
        let _ = self.channel.close(200, "dlq: done".into()).await;
        let _ = self.connection.close(200, "dlq: done".into()).await;
    }

    /// A quorum queue applies requeues a moment after the nacks (through its replicated log),
    /// and until then a following command would not see those messages. So wait, briefly,
    /// until the queue holds at least what it held at the start minus what was removed.
    async fn wait_until_requeued(&self) {
        let removed = self.taken.iter().filter(|t| t.removed).count();
        let expected = u64::from(self.depth_at_start).saturating_sub(removed as u64);
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let deadline = tokio::time::Instant::now() + REQUEUE_WAIT;
        loop {
            match self
                .channel
                .queue_declare(self.queue.as_str().into(), passive, FieldTable::default())
                .await
            {
                Ok(q) if u64::from(q.message_count()) < expected => {}
                _ => return,
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::debug!("requeued dead letters not all visible yet; not waiting longer");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// How long a command waits for the messages it requeued to be visible again. Another tool
/// holding messages meanwhile can keep the count low; this bounds the wait then.
const REQUEUE_WAIT: Duration = Duration::from_secs(5);

/// Parses `90s`, `10m`, `2h`, `1d`, `1w` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 30s, 10m, 2h or 1d"))?;
    let secs_per_unit = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (use s, m, h, d or w)")),
    };
    n.checked_mul(secs_per_unit)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// Asks on `output` and reads one line of `input`; only `yes` confirms.
pub fn ask_yes(question: &str, input: &mut dyn BufRead, output: &mut dyn Write) -> std::io::Result<bool> {
    write!(output, "{question} Type `yes` to confirm: ")?;
    output.flush()?;
    let mut answer = String::new();
    input.read_line(&mut answer)?;
    Ok(answer.trim() == "yes")
}

/// `12s`, `5m`, `3h`, `2d`.
pub fn format_age(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3_599 => format!("{}m", s / 60),
        3_600..=86_399 => format!("{}h", s / 3_600),
        _ => format!("{}d", s / 86_400),
    }
}

/// `2024-06-01T12:34:56.789Z` for milliseconds since the Unix epoch (UTC).
pub fn format_utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

fn cell(value: Option<impl ToString>) -> String {
    value.map(|v| v.to_string()).unwrap_or_else(|| "-".to_owned())
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

fn counts(map: &BTreeMap<String, usize>) -> String {
    if map.is_empty() {
        return "-".to_owned();
    }
    map.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `list` table and counts, for a terminal.
pub fn render_listing(listing: &Listing, now_ms: i64) -> String {
    let header = [
        "BATCH ID",
        "USER",
        "PART",
        "REASON",
        "COLLECTION",
        "ATTEMPTS",
        "AGE",
        "ERROR",
    ];
    let rows: Vec<[String; 8]> = listing
        .dead_letters
        .iter()
        .map(|s| {
            let error = match (&s.error_code, &s.error_message) {
                (Some(code), Some(m)) => format!("{code}: {m}"),
                (None, Some(m)) => m.clone(),
                (Some(code), None) => code.to_string(),
                (None, None) => "-".to_owned(),
            };
            [
                cell(s.batch_id.as_ref()),
                cell(s.user_id.as_ref()),
                cell(s.partition),
                s.reason.clone(),
                cell(s.collection.as_ref()),
                cell(s.attempts),
                cell(s.dead_at_ms.map(|at| format_age(now_ms - at))),
                shorten(&error.replace('\n', " "), 80),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        out.trim_end().to_owned()
    };
    let mut out = String::new();
    if !rows.is_empty() {
        out.push_str(&line(&header.map(str::to_owned)));
        out.push('\n');
        for row in &rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        out.push('\n');
    }
    out.push_str(&format!(
        "{} matching dead letter(s) of {} in {}{}\n",
        listing.matched,
        listing.scanned,
        listing.queue,
        if listing.dead_letters.len() < listing.matched {
            format!(" ({} shown)", listing.dead_letters.len())
        } else {
            String::new()
        }
    ));
    out.push_str(&format!("by reason:     {}\n", counts(&listing.by_reason)));
    out.push_str(&format!("by collection: {}\n", counts(&listing.by_collection)));
    out
}

/// One dead letter in full, for a terminal.
pub fn render_letter(letter: &DeadLetter, now_ms: i64) -> String {
    let s = &letter.summary;
    let mut out = String::new();
    let mut field = |name: &str, value: String| out.push_str(&format!("{name:<16}{value}\n"));
    let when = |ms: Option<i64>| cell(ms.map(|at| format!("{} ({} ago)", format_utc(at), format_age(now_ms - at))));
    field("batch id", cell(s.batch_id.as_ref()));
    field("user", cell(s.user_id.as_ref()));
    field("client", cell(s.client_id.as_ref()));
    field("partition", cell(s.partition));
    field("original queue", cell(s.original_queue.as_ref()));
    field("reason", s.reason.clone());
    field("error class", cell(s.error_class.as_ref()));
    field("error code", cell(s.error_code));
    field("error", cell(s.error_message.as_ref()));
    field("failing op", cell(s.op_index));
    field("collection", cell(s.collection.as_ref()));
    field(
        "collections",
        if s.collections.is_empty() {
            "-".to_owned()
        } else {
            s.collections.join(", ")
        },
    );
    field("ops", cell(s.ops));
    field("attempts", cell(s.attempts));
    field("first failure", when(s.first_failure_ms));
    field("last failure", when(s.last_failure_ms));
    field("dead at", when(s.dead_at_ms));
    field("worker", cell(s.worker_id.as_ref()));
    field("replay count", s.replay_count.to_string());
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    out.push_str("\nproperties:\n");
    for (k, v) in &letter.properties {
        out.push_str(&format!("  {k}: {v}\n"));
    }
    out.push_str("\nheaders:\n");
    for (k, v) in &letter.headers {
        out.push_str(&format!("  {k}: {}\n", pretty(v).replace('\n', "\n  ")));
    }
    out.push_str("\nbody:\n");
    match &letter.body_base64 {
        Some(b64) => out.push_str(&format!("(not JSON; base64) {b64}\n")),
        None => {
            out.push_str(&pretty(&letter.body));
            out.push('\n');
        }
    }
    out
}

/// The replay report, for a terminal.
pub fn render_replay(report: &ReplayReport) -> String {
    let mut out = String::new();
    let verb = if report.dry_run { "would replay" } else { "replayed" };
    for r in &report.replayed {
        out.push_str(&format!(
            "{verb} {} (user {}) -> exchange {} key {} (queue {}), replay count {}\n",
            cell(r.batch_id.as_ref()),
            cell(r.user_id.as_ref()),
            report.exchange,
            r.routing_key,
            r.queue,
            r.replay_count
        ));
    }
    for f in &report.failed {
        out.push_str(&format!(
            "not replayed {}: {} (left in the dead-letter queue)\n",
            cell(f.batch_id.as_ref()),
            f.error
        ));
    }
    out.push_str(&format!(
        "{}: {} {}, {} not replayed, of {} dead letter(s) looked at{}\n",
        if report.dry_run {
            "dry run, nothing changed"
        } else {
            "done"
        },
        report.replayed.len(),
        if report.dry_run {
            "would be replayed"
        } else {
            "replayed"
        },
        report.failed.len(),
        report.scanned,
        match &report.aborted {
            Some(e) => format!("; STOPPED: {e} (the rest stays in the dead-letter queue)"),
            None => String::new(),
        }
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, ShortString};
    use uplink_common::amqp::text;

    fn topology() -> Topology {
        Topology {
            prefix: "up".into(),
            partitions: 4,
            delivery_limit: 5,
        }
    }

    fn summary() -> Summary {
        Summary {
            batch_id: Some("b1".into()),
            user_id: Some("alice".into()),
            client_id: None,
            partition: Some(1),
            original_queue: Some("up.uploads.1".into()),
            reason: reasons::PERMANENT.into(),
            error_class: Some("permanent".into()),
            error_code: Some(121),
            error_message: Some("Document failed validation".into()),
            op_index: Some(0),
            collection: Some("strict".into()),
            collections: vec!["strict".into(), "todos".into()],
            ops: Some(2),
            attempts: Some(1),
            first_failure_ms: Some(1_000),
            last_failure_ms: Some(1_000),
            dead_at_ms: Some(1_000),
            worker_id: Some("w".into()),
            replay_count: 0,
        }
    }

    #[test]
    fn durations_take_the_documented_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7_200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        for bad in ["", "m", "10x", "-1h", "1.5h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn a_selection_needs_every_flag_to_match_and_any_value_of_one_flag() {
        let s = summary();
        let now = 61_000;
        let sel = |f: fn(&mut Selection)| {
            let mut sel = Selection::default();
            f(&mut sel);
            sel
        };
        assert!(Selection::default().matches(&s, now));
        assert!(sel(|s| s.users = vec!["bob".into(), "alice".into()]).matches(&s, now));
        assert!(!sel(|s| s.users = vec!["bob".into()]).matches(&s, now));
        assert!(
            sel(|s| s.collections = vec!["todos".into()]).matches(&s, now),
            "any op's collection"
        );
        assert!(!sel(|s| s.collections = vec!["other".into()]).matches(&s, now));
        assert!(sel(|s| s.reasons = vec!["permanent".into()]).matches(&s, now));
        assert!(!sel(|s| s.reasons = vec!["undecodable".into()]).matches(&s, now));
        assert!(sel(|s| s.batch_ids = vec!["b1".into()]).matches(&s, now));
        assert!(!sel(|s| s.batch_ids = vec!["b2".into()]).matches(&s, now));
        assert!(sel(|s| s.older_than = Some(Duration::from_secs(60))).matches(&s, now));
        assert!(!sel(|s| s.older_than = Some(Duration::from_secs(61))).matches(&s, now));
        assert!(!sel(|s| {
            s.users = vec!["alice".into()];
            s.reasons = vec!["undecodable".into()];
        })
        .matches(&s, now));
        let unknown_age = Summary {
            dead_at_ms: None,
            ..summary()
        };
        assert!(!sel(|s| s.older_than = Some(Duration::ZERO)).matches(&unknown_age, now));
    }

    #[test]
    fn a_broker_dead_letter_reads_its_reason_queue_and_time_from_x_death() {
        let mut death = FieldTable::default();
        death.insert("reason".into(), text("delivery_limit"));
        death.insert("queue".into(), text("up.uploads.3"));
        death.insert("time".into(), AMQPValue::Timestamp(1_700_000_000));
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        headers.insert(h::USER_ID.into(), text("carol"));
        headers.insert(h::PARTITION.into(), AMQPValue::LongInt(1));
        let props = BasicProperties::default()
            .with_message_id(ShortString::from("m1"))
            .with_headers(headers);

        let letter = DeadLetter::read(&props, b"not json", &topology());

        let s = &letter.summary;
        assert_eq!(s.reason, reasons::DELIVERY_LIMIT);
        assert_eq!(s.partition, Some(3), "x-death's queue wins over the partition header");
        assert_eq!(s.dead_at_ms, Some(1_700_000_000_000));
        assert_eq!(s.user_id.as_deref(), Some("carol"));
        assert_eq!(s.batch_id.as_deref(), Some("m1"));
        assert_eq!(letter.body, Value::Null);
        assert_eq!(letter.body_base64.as_deref(), Some("bm90IGpzb24="));
        assert_eq!(letter.headers["x-death"][0]["queue"], "up.uploads.3");
    }

    #[test]
    fn a_replayed_copy_loses_the_death_headers_and_counts_the_replay() {
        let mut headers = FieldTable::default();
        headers.insert(h::USER_ID.into(), text("alice"));
        headers.insert(
            h::TRACEPARENT.into(),
            text("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        headers.insert(h::REPLAY_COUNT.into(), AMQPValue::LongLongInt(2));
        for name in DEATH_HEADERS
            .iter()
            .chain(&["x-first-death-queue", "x-last-death-reason"])
        {
            headers.insert((*name).into(), text("x"));
        }
        let original = BasicProperties::default()
            .with_message_id(ShortString::from("b1"))
            .with_timestamp(7)
            .with_headers(headers);

        let copy = replay_properties(&original, 3);

        assert_eq!(copy.message_id(), original.message_id());
        assert_eq!(copy.timestamp(), &Some(7));
        assert_eq!(copy.delivery_mode(), &Some(2));
        let copied = copy.headers().as_ref().expect("headers");
        let names: Vec<&str> = copied.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, [h::TRACEPARENT, h::REPLAY_COUNT, h::USER_ID]);
        assert_eq!(header_i64(Some(copied), h::REPLAY_COUNT), Some(3));
    }

    #[test]
    fn only_the_answer_yes_confirms() {
        for (answer, expected) in [
            ("yes\n", true),
            (" yes \n", true),
            ("y\n", false),
            ("YES\n", false),
            ("", false),
        ] {
            let mut out = Vec::new();
            let confirmed = ask_yes("Purge 2?", &mut answer.as_bytes(), &mut out).expect("io");
            assert_eq!(confirmed, expected, "{answer:?}");
            assert!(String::from_utf8_lossy(&out).contains("Purge 2?"));
        }
    }

    #[test]
    fn times_render_as_utc_and_ages_in_one_unit() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_utc(1_709_210_096_789), "2024-02-29T12:34:56.789Z");
        assert_eq!(format_age(59_999), "59s");
        assert_eq!(format_age(3_600_000), "1h");
        assert_eq!(format_age(2 * 86_400_000 + 5), "2d");
    }
}
