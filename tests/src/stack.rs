//! An in-process uplink stack for one test: the api and N workers, on the real broker (under a
//! queue prefix of the test's own) and the real MongoDB-wire server (in a database of the
//! test's own). `finish` stops everything and deletes the test's queues and database.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use mongodb::bson::{Bson, Document};
use reqwest::StatusCode;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use uplink_api::config::ApiConfig;
use uplink_api::keys::SigningKey;
use uplink_common::config::Env;
use uplink_common::topology::Topology;
use uplink_worker::config::WorkerConfig;

/// One signing key for every stack in the test process (RSA key generation is slow).
pub fn test_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate(2048).expect("generate test key"))
}

pub const POWERSYNC_URL: &str = "https://powersync.test";

#[derive(Clone, Debug)]
pub struct StackOptions {
    pub workers: usize,
    pub partitions: u16,
    /// Broker address the api connects through (a proxy), instead of the broker itself.
    pub api_amqp_via: Option<SocketAddr>,
    /// Broker address the workers connect through.
    pub worker_amqp_via: Option<SocketAddr>,
    /// MongoDB address the workers connect through.
    pub mongo_via: Option<SocketAddr>,
    pub api_env: Vec<(String, String)>,
    pub worker_env: Vec<(String, String)>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            workers: 2,
            partitions: 4,
            api_amqp_via: None,
            worker_amqp_via: None,
            mongo_via: None,
            api_env: Vec::new(),
            worker_env: Vec::new(),
        }
    }
}

struct Running {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub struct WorkerHandle {
    running: Option<Running>,
    pub admin_url: String,
    pub metrics: uplink_worker::metrics::WorkerMetrics,
}

pub struct Stack {
    /// The test's queue prefix and database name.
    pub name: String,
    pub opts: StackOptions,
    pub api_url: String,
    pub http: reqwest::Client,
    pub db: mongodb::Database,
    pub api_metrics: uplink_api::metrics::ApiMetrics,
    api: Option<Running>,
    pub workers: Vec<WorkerHandle>,
}

/// `amqp://…` with its host and port replaced.
pub fn amqp_uri_via(addr: Option<SocketAddr>) -> String {
    let base = crate::amqp_uri();
    match addr {
        None => base,
        Some(addr) => {
            let (scheme_auth, rest) = base
                .split_once('@')
                .unwrap_or(("amqp://guest:guest", "127.0.0.1:5672/%2f"));
            let path = rest.split_once('/').map(|(_, p)| p).unwrap_or("%2f");
            format!("{scheme_auth}@{addr}/{path}")
        }
    }
}

/// `mongodb://host/db?query` for the test server (or a proxy in front of it).
pub fn mongo_uri(db: &str, via: Option<SocketAddr>) -> String {
    let base = crate::mongo_base_uri();
    let (head, query) = match base.split_once('?') {
        Some((h, q)) => (h.to_owned(), Some(q.to_owned())),
        None => (base.clone(), None),
    };
    let head = head.trim_end_matches('/');
    let head = match via {
        Some(addr) => format!("mongodb://{addr}"),
        None => head.to_owned(),
    };
    // Through a proxy the driver must not discover and dial the real address.
    let query = match (via, query) {
        (Some(_), Some(q)) => Some(format!("{q}&directConnection=true")),
        (Some(_), None) => Some("directConnection=true".to_owned()),
        (None, q) => q,
    };
    match query {
        Some(q) => format!("{head}/{db}?{q}"),
        None => format!("{head}/{db}"),
    }
}

/// The broker's and the MongoDB server's socket addresses, for proxies.
pub fn amqp_socket() -> SocketAddr {
    let base = crate::amqp_uri();
    let host = base.split_once('@').map(|(_, r)| r).unwrap_or("127.0.0.1:5672/");
    let hostport = host.split('/').next().unwrap_or("127.0.0.1:5672");
    hostport
        .parse()
        .expect("AMQP host:port must be an IP socket address in tests")
}

pub fn mongo_socket() -> SocketAddr {
    let base = crate::mongo_base_uri();
    let rest = base.trim_start_matches("mongodb://");
    let hostport = rest.split(['/', '?']).next().unwrap_or("127.0.0.1:27017");
    hostport
        .parse()
        .expect("MongoDB host:port must be an IP socket address in tests")
}

impl Stack {
    pub async fn start(opts: StackOptions) -> Stack {
        crate::init_logging();
        let name = crate::unique_name("e2e");
        let client = mongodb::Client::with_uri_str(mongo_uri(&name, None))
            .await
            .expect("mongo client");
        let db = client.database(&name);
        let mut env = Env::from_map([
            ("POWERSYNC_URL", POWERSYNC_URL.to_owned()),
            ("POWERSYNC_PRIVATE_KEY", test_key().private_env_value()),
            ("UPLINK_DEV", "1".to_owned()),
            ("UPLINK_API_ADDR", "127.0.0.1:0".to_owned()),
            ("AMQP_URL", amqp_uri_via(opts.api_amqp_via)),
            ("UPLINK_QUEUE_PREFIX", name.clone()),
            ("UPLINK_PARTITIONS", opts.partitions.to_string()),
            ("UPLINK_CONFIRM_TIMEOUT_SECONDS", "2".to_owned()),
            ("UPLINK_RETRY_AFTER_SECONDS", "1".to_owned()),
        ]);
        for (k, v) in &opts.api_env {
            env.set(k, v.clone());
        }
        let config = ApiConfig::from_env(&env).expect("api config");
        let cancel = CancellationToken::new();
        let app = uplink_api::Application::build(config, cancel.clone())
            .await
            .expect("api builds");
        let api_url = format!("http://127.0.0.1:{}", app.port());
        let api_metrics = app.state().metrics.clone();
        if opts.api_amqp_via.is_none() {
            assert!(
                app.wait_ready(Duration::from_secs(20)).await,
                "api did not connect to the broker"
            );
        }
        let task = tokio::spawn(async move { app.run_until_stopped().await.map_err(anyhow::Error::from) });
        let mut stack = Stack {
            name,
            opts: opts.clone(),
            api_url,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
            db,
            api_metrics,
            api: Some(Running { cancel, task }),
            workers: Vec::new(),
        };
        for _ in 0..opts.workers {
            stack.start_worker().await;
        }
        stack
    }

    pub fn worker_config(&self, index: usize) -> WorkerConfig {
        let mut env = Env::from_map([
            ("MONGO_URI", mongo_uri(&self.name, self.opts.mongo_via)),
            ("AMQP_URL", amqp_uri_via(self.opts.worker_amqp_via)),
            ("UPLINK_QUEUE_PREFIX", self.name.clone()),
            ("UPLINK_PARTITIONS", self.opts.partitions.to_string()),
            ("UPLINK_WORKER_ADMIN_ADDR", "127.0.0.1:0".to_owned()),
            ("UPLINK_WORKER_ID", format!("{}-w{index}", self.name)),
            ("UPLINK_RETRY_MIN_SECONDS", "0.05".to_owned()),
            ("UPLINK_RETRY_MAX_SECONDS", "0.5".to_owned()),
        ]);
        for (k, v) in &self.opts.worker_env {
            env.set(k, v.clone());
        }
        WorkerConfig::from_env(&env).expect("worker config")
    }

    /// Starts one more in-process worker; returns its index.
    pub async fn start_worker(&mut self) -> usize {
        let index = self.workers.len();
        let cancel = CancellationToken::new();
        let worker = uplink_worker::Worker::build(self.worker_config(index), cancel.clone())
            .await
            .expect("worker builds");
        let admin_url = format!("http://127.0.0.1:{}", worker.admin_port());
        let metrics = worker.metrics();
        let task = tokio::spawn(worker.run_until_stopped());
        self.workers.push(WorkerHandle {
            running: Some(Running { cancel, task }),
            admin_url,
            metrics,
        });
        index
    }

    /// Stops a worker gracefully and waits for it to finish.
    pub async fn stop_worker(&mut self, index: usize) {
        if let Some(running) = self.workers[index].running.take() {
            running.cancel.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(30), running.task).await;
        }
    }

    pub async fn token(&self, user_id: &str) -> String {
        let response = self
            .http
            .get(format!("{}/token", self.api_url))
            .query(&[("user_id", user_id)])
            .send()
            .await
            .expect("token request");
        assert_eq!(response.status(), StatusCode::OK, "token for {user_id}");
        let body: Value = response.json().await.expect("token json");
        body["token"].as_str().expect("token field").to_owned()
    }

    /// POSTs an upload; returns the status and the JSON body (Null when not JSON).
    pub async fn upload(&self, token: &str, body: &Value) -> (StatusCode, Value) {
        self.upload_raw(Some(token), body.to_string().into_bytes()).await
    }

    pub async fn upload_raw(&self, token: Option<&str>, body: Vec<u8>) -> (StatusCode, Value) {
        let mut request = self
            .http
            .post(format!("{}/upload", self.api_url))
            .header("content-type", "application/json")
            .body(body);
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        let response = request.send().await.expect("upload request");
        let status = response.status();
        let body = response.json::<Value>().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// Uploads and insists on a 200.
    pub async fn upload_ok(&self, token: &str, body: &Value) -> Value {
        let (status, reply) = self.upload(token, body).await;
        assert_eq!(status, StatusCode::OK, "upload refused: {reply}");
        reply
    }

    /// A collection's documents as `_id -> fields` (relaxed extended JSON, `_id` removed).
    pub async fn docs(&self, collection: &str) -> BTreeMap<String, Map<String, Value>> {
        use futures::TryStreamExt;
        let cursor = self
            .db
            .collection::<Document>(collection)
            .find(Document::new())
            .await
            .expect("find");
        let docs: Vec<Document> = cursor.try_collect().await.expect("read docs");
        docs.into_iter()
            .map(|mut d| {
                let id = match d.remove("_id") {
                    Some(Bson::String(s)) => s,
                    Some(other) => other.to_string(),
                    None => String::new(),
                };
                let Value::Object(fields) = Bson::Document(d).into_relaxed_extjson() else {
                    unreachable!("a document converts to an object")
                };
                (id, fields)
            })
            .collect()
    }

    /// Publishes a batch straight to its partition queue, as the api would (the tests use it
    /// to deliver the very same message twice, as the broker does after a worker crash).
    pub async fn publish_raw(&self, batch: &uplink_common::UploadBatch) {
        use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
        let (connection, channel) = broker_channel("uplink-tests").await;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let body = uplink_common::Envelope::V1(batch.clone()).to_vec();
        let properties = lapin::BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(batch.batch_id.to_string().into())
            .with_content_type("application/json".into());
        let confirm = channel
            .basic_publish(
                self.topology().uploads_exchange().as_str().into(),
                self.topology().routing_key(batch.partition).as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(
            matches!(confirm, lapin::Confirmation::Ack(None)),
            "broker took the message"
        );
        let _ = connection.close(200, "done".into()).await;
    }

    /// Every message in the dead-letter queue, as `(headers, body)`, left in place (read without
    /// acknowledging; closing the channel returns them).
    pub async fn dead_letters(&self) -> Vec<(BTreeMap<String, String>, Value)> {
        use lapin::options::BasicGetOptions;
        let (connection, channel) = broker_channel("uplink-tests").await;
        let mut out = Vec::new();
        while let Some(message) = channel
            .basic_get(self.topology().dead_queue().as_str().into(), BasicGetOptions::default())
            .await
            .expect("basic.get")
        {
            let headers = message
                .delivery
                .properties
                .headers()
                .as_ref()
                .map(|t| {
                    t.inner()
                        .iter()
                        .map(|(k, v)| {
                            let text = uplink_common::amqp::header_str(Some(t), k.as_str())
                                .or_else(|| uplink_common::amqp::header_i64(Some(t), k.as_str()).map(|i| i.to_string()))
                                .unwrap_or_else(|| format!("{v:?}"));
                            (k.to_string(), text)
                        })
                        .collect()
                })
                .unwrap_or_default();
            let body = serde_json::from_slice(&message.delivery.data).unwrap_or(Value::Null);
            out.push((headers, body));
        }
        let _ = connection.close(200, "done".into()).await;
        out
    }

    /// The write checkpoint documents, as `(user_id, client_id) -> checkpoint`.
    pub async fn checkpoints(&self) -> BTreeMap<(String, String), i64> {
        self.docs("checkpoints")
            .await
            .into_values()
            .map(|d| {
                let user = d["user_id"].as_str().unwrap_or_default().to_owned();
                let client = d["client_id"].as_str().unwrap_or_default().to_owned();
                ((user, client), d["checkpoint"].as_i64().unwrap_or(-1))
            })
            .collect()
    }

    /// Sum of a worker counter over the in-process workers.
    pub fn workers_sum(&self, metric: impl Fn(&uplink_worker::metrics::WorkerMetrics) -> u64) -> u64 {
        self.workers.iter().map(|w| metric(&w.metrics)).sum()
    }

    /// The names of this test's exchanges and queues.
    pub fn topology(&self) -> Topology {
        topology(&self.name, self.opts.partitions)
    }

    /// Ready-message counts of the partition queues.
    pub async fn queue_depths(&self) -> Vec<u32> {
        let names = self.topology();
        let (connection, channel) = broker_channel("uplink-tests").await;
        let mut depths = Vec::new();
        for i in 0..self.opts.partitions {
            depths.push(message_count(&channel, &names.partition_queue(i)).await);
        }
        let _ = connection.close(200, "done".into()).await;
        depths
    }

    /// Ready-message count of the dead-letter queue.
    pub async fn dead_letter_depth(&self) -> u32 {
        let (connection, channel) = broker_channel("uplink-tests").await;
        let depth = message_count(&channel, &self.topology().dead_queue()).await;
        let _ = connection.close(200, "done".into()).await;
        depth
    }

    /// Stops the api and workers, then deletes the test's queues, exchanges and database.
    pub async fn finish(mut self) {
        for i in 0..self.workers.len() {
            self.stop_worker(i).await;
        }
        if let Some(api) = self.api.take() {
            api.cancel.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(10), api.task).await;
        }
        delete_topology(&self.name, self.opts.partitions).await;
        let _ = self.db.drop().await;
    }
}

/// The names of a test's exchanges and queues (the delivery limit does not enter into them).
pub fn topology(prefix: &str, partitions: u16) -> Topology {
    Topology {
        prefix: prefix.to_owned(),
        partitions,
        delivery_limit: 0,
    }
}

/// A connection (named for the broker's connection list) and channel to the test broker;
/// close the connection when done.
pub async fn broker_channel(name: &str) -> (lapin::Connection, lapin::Channel) {
    let connection = uplink_common::amqp::connect(&crate::amqp_uri().into(), name)
        .await
        .expect("amqp");
    let channel = connection.create_channel().await.expect("channel");
    (connection, channel)
}

/// Ready-message count of an existing queue.
async fn message_count(channel: &lapin::Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("queue {queue} exists: {e}"))
        .message_count()
}

/// Deletes every queue and exchange under `prefix`.
pub async fn delete_topology(prefix: &str, partitions: u16) {
    let names = topology(prefix, partitions);
    // Best effort: a test that failed with the broker unreachable must still end.
    let Ok(connection) = uplink_common::amqp::connect(&crate::amqp_uri().into(), "uplink-tests-cleanup").await else {
        return;
    };
    let Ok(channel) = connection.create_channel().await else {
        return;
    };
    for i in 0..partitions {
        let _ = channel
            .queue_delete(names.partition_queue(i).as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = channel
        .queue_delete(names.dead_queue().as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = channel
        .exchange_delete(
            names.uploads_exchange().as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = channel
        .exchange_delete(names.dead_exchange().as_str().into(), ExchangeDeleteOptions::default())
        .await;
    let _ = connection.close(200, "cleanup".into()).await;
}
