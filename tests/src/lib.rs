//! Test tooling for uplink's end-to-end tests: an in-process stack (api + workers) wired to the
//! real RabbitMQ and the MongoDB-wire server, each test in its own queue prefix and database;
//! a TCP proxy to cut or stall a dependency; and the in-order model final states are checked
//! against.

pub mod model;
pub mod process;
pub mod proxy;
pub mod stack;

pub use model::Model;
pub use proxy::Proxy;
pub use stack::{Stack, StackOptions};

/// `mongodb://…` of the server tests use (each test creates its own database on it).
pub fn mongo_base_uri() -> String {
    std::env::var("UPLINK_TEST_MONGO_URI").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".to_owned())
}

/// `amqp://…` of the broker tests use (each test uses its own queue prefix on it).
pub fn amqp_uri() -> String {
    std::env::var("UPLINK_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// Logs to the test's captured output; `RUST_LOG` raises the level.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A unique, short, lowercase name for a test's prefix and database.
pub fn unique_name(tag: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("t{}_{}", &id[..12], tag)
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: std::time::Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
