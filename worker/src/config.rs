//! The worker's configuration, read once at start-up. A bad or missing value stops start-up
//! with a message naming the variable.
//!
//! Variables:
//! - `MONGO_URI`: MongoDB connection string; the database is the URI's path (`powersync`
//!   when none) (required)
//! - `UPLINK_WORKER_ADMIN_ADDR`: `/healthz`, `/readyz`, `/metrics` (default `0.0.0.0:9090`)
//! - `UPLINK_WORKER_ID`: name in logs, dead-letter reasons and the broker's connection list
//!   (default: host name and process id)
//! - `UPLINK_PREFETCH`: unacknowledged batches the broker may push per partition (default 1:
//!   every batch returned to the queue by a crashed consumer counts towards its delivery limit,
//!   so a larger window lets one poisonous batch drag its innocent neighbours into the
//!   dead-letter queue)
//! - `UPLINK_TRANSACTIONS`: `auto` (use them when the server supports them), `on` (refuse to
//!   start without), `off` (default `auto`)
//! - `UPLINK_WRITE_CONCERN`: `majority` (default) or a number of nodes
//! - `UPLINK_CHECKPOINT_COLLECTION`: PowerSync write checkpoints and the dedupe high-water mark
//!   per (user, client) (default `checkpoints`)
//! - `UPLINK_RETRY_MIN_SECONDS`, `UPLINK_RETRY_MAX_SECONDS`: backoff between attempts at a
//!   batch that failed transiently (defaults 0.1 and 10)
//! - `UPLINK_UNKNOWN_ERROR_ATTEMPTS`: attempts at a batch failing with an unclassified error
//!   before it is dead-lettered (default 10)
//! - `UPLINK_COLLECTIONS_CONFIG`: path of a TOML file with per-collection settings (optional)
//! - `UPLINK_UPLOAD_ERRORS_COLLECTION`: where each dead-lettered batch is also recorded for the
//!   user's devices to see (PowerSync sync rules can stream it back); `off` disables it
//!   (default `upload_errors`)
//! - plus the shared `AMQP_URL`, `UPLINK_QUEUE_PREFIX`, `UPLINK_PARTITIONS`,
//!   `UPLINK_DELIVERY_LIMIT` and `UPLINK_LOG_FORMAT`

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::SecretString;
use uplink_common::config::{AmqpConfig, ConfigError, Env};

use crate::convert::CollectionsConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransactionMode {
    Auto,
    On,
    Off,
}

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// Attempts at an unclassified error before giving up on the batch.
    pub unknown_error_attempts: u32,
}

impl RetryPolicy {
    /// Backoff after a conflict with a concurrent transaction: a random 0..2^attempt ms
    /// (capped at the maximum), as drivers' `withTransaction` helpers retry.
    pub fn conflict_delay(&self, attempt: u32) -> Duration {
        let cap = Duration::from_millis(1u64 << attempt.min(16)).min(self.max_delay);
        cap.mul_f64(rand::random::<f64>())
    }

    /// Capped exponential backoff with full jitter: a random delay up to
    /// `min * 2^(attempt-1)`, capped at `max`, never below `min`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.min_delay.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let cap = exp.min(self.max_delay);
        let jittered = cap.mul_f64(rand::random::<f64>());
        jittered.max(self.min_delay)
    }
}

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// May carry credentials, so it is kept secret.
    pub mongo_uri: SecretString,
    pub amqp: AmqpConfig,
    pub admin_addr: SocketAddr,
    pub worker_id: String,
    pub prefetch: u16,
    pub transactions: TransactionMode,
    pub write_concern: String,
    pub checkpoint_collection: String,
    pub retry: RetryPolicy,
    pub collections: CollectionsConfig,
    /// Collection recording rejected batches per user and client, when enabled.
    pub upload_errors_collection: Option<String>,
    /// Test builds only: panic while applying any op on this collection, to prove that a
    /// batch which crashes every worker is dead-lettered by the delivery limit.
    #[cfg(feature = "fault-injection")]
    pub panic_on_collection: Option<String>,
}

impl WorkerConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let mongo_uri = env
            .secret("MONGO_URI")
            .ok_or_else(|| ConfigError::new("MONGO_URI", "is required"))?;
        let amqp = AmqpConfig::from_env(env)?;
        uplink_common::amqp::validate_url(&amqp.url).map_err(|e| ConfigError::new("AMQP_URL", e))?;
        let transactions = match env.get("UPLINK_TRANSACTIONS").as_deref() {
            None | Some("auto") => TransactionMode::Auto,
            Some("on") => TransactionMode::On,
            Some("off") => TransactionMode::Off,
            Some(other) => {
                return Err(ConfigError::new(
                    "UPLINK_TRANSACTIONS",
                    format!("expected auto, on or off, got {other:?}"),
                ))
            }
        };
        let write_concern = env.get("UPLINK_WRITE_CONCERN").unwrap_or_else(|| "majority".into());
        if write_concern != "majority" && write_concern.parse::<u32>().is_err() {
            return Err(ConfigError::new(
                "UPLINK_WRITE_CONCERN",
                "expected `majority` or a number of nodes",
            ));
        }
        let prefetch: u16 = env.parse_or("UPLINK_PREFETCH", 1)?;
        if prefetch == 0 {
            return Err(ConfigError::new("UPLINK_PREFETCH", "must be at least 1"));
        }
        let retry = RetryPolicy {
            min_delay: env.seconds_or("UPLINK_RETRY_MIN_SECONDS", Duration::from_millis(100))?,
            max_delay: env.seconds_or("UPLINK_RETRY_MAX_SECONDS", Duration::from_secs(10))?,
            unknown_error_attempts: env.parse_or("UPLINK_UNKNOWN_ERROR_ATTEMPTS", 10)?,
        };
        if retry.min_delay.is_zero() || retry.max_delay < retry.min_delay {
            return Err(ConfigError::new(
                "UPLINK_RETRY_MAX_SECONDS",
                "retry delays must be positive, and the maximum at least the minimum",
            ));
        }
        let checkpoint_collection = env
            .get("UPLINK_CHECKPOINT_COLLECTION")
            .unwrap_or_else(|| "checkpoints".into());
        uplink_common::CollectionName::parse(&checkpoint_collection)
            .map_err(|e| ConfigError::new("UPLINK_CHECKPOINT_COLLECTION", e))?;
        let collections = match env.get("UPLINK_COLLECTIONS_CONFIG") {
            None => CollectionsConfig::default(),
            Some(path) => CollectionsConfig::load(std::path::Path::new(&path))
                .map_err(|e| ConfigError::new("UPLINK_COLLECTIONS_CONFIG", e))?,
        };
        let upload_errors_collection = match env.get("UPLINK_UPLOAD_ERRORS_COLLECTION").as_deref() {
            Some("off") | Some("none") => None,
            Some(name) => {
                uplink_common::CollectionName::parse(name)
                    .map_err(|e| ConfigError::new("UPLINK_UPLOAD_ERRORS_COLLECTION", e))?;
                Some(name.to_owned())
            }
            None => Some("upload_errors".to_owned()),
        };
        Ok(Self {
            upload_errors_collection,
            #[cfg(feature = "fault-injection")]
            panic_on_collection: env.get("UPLINK_FAULT_PANIC_ON_COLLECTION"),
            mongo_uri,
            amqp,
            admin_addr: env.parse_or("UPLINK_WORKER_ADMIN_ADDR", SocketAddr::from(([0, 0, 0, 0], 9090)))?,
            worker_id: env.get("UPLINK_WORKER_ID").unwrap_or_else(|| {
                format!(
                    "{}-{}",
                    uplink_common::shutdown::hostname().unwrap_or_else(|| "worker".to_owned()),
                    std::process::id()
                )
            }),
            prefetch,
            transactions,
            write_concern,
            checkpoint_collection,
            retry,
            collections,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mongo_uri_is_required_and_kept_out_of_debug_output() {
        let err = WorkerConfig::from_env(&Env::from_map::<&str, &str>([])).expect_err("no uri");
        assert_eq!(err.var, "MONGO_URI");
        let cfg = WorkerConfig::from_env(&Env::from_map([("MONGO_URI", "mongodb://u:sekrit@h/db")])).expect("valid");
        assert!(!format!("{cfg:?}").contains("sekrit"));
        assert_eq!(cfg.transactions, TransactionMode::Auto);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            unknown_error_attempts: 3,
        };
        for attempt in 1..30 {
            let d = p.delay(attempt);
            assert!(d >= p.min_delay && d <= p.max_delay, "attempt {attempt}: {d:?}");
        }
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (var, value) in [
            ("UPLINK_TRANSACTIONS", "sometimes"),
            ("UPLINK_WRITE_CONCERN", "all"),
            ("UPLINK_PREFETCH", "0"),
            ("UPLINK_CHECKPOINT_COLLECTION", "system.x"),
            ("UPLINK_COLLECTIONS_CONFIG", "/nonexistent/uplink.toml"),
        ] {
            let err = WorkerConfig::from_env(&Env::from_map([("MONGO_URI", "mongodb://h"), (var, value)]))
                .expect_err("invalid");
            assert_eq!(err.var, var);
        }
    }
}
