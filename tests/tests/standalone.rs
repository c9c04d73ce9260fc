//! Without transactions (a standalone server, or `UPLINK_TRANSACTIONS=off`) the worker still
//! applies every batch in order, and a redelivered batch is still skipped once its checkpoint
//! was written.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use uplink_tests::{eventually, Stack, StackOptions};

/// The MongoDB-wire server `deploy/local/services.sh` installs.
fn secantusd() -> PathBuf {
    std::env::var("UPLINK_TEST_SECANTUSD")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.local/venv/bin/secantusd-py"))
}

struct Server(Child, PathBuf);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

async fn exercise(stack: &Stack) {
    let token = stack.token("nora").await;
    let first = json!({"client_id": "c", "batch": [
        {"op_id": 1, "op": "PUT", "type": "t", "id": "a", "data": {"v": 1}},
        {"op_id": 2, "op": "PATCH", "type": "t", "id": "a", "data": {"w": 2}},
    ]});
    stack.upload_ok(&token, &first).await;
    stack.upload_ok(&token, &json!({"client_id": "other", "batch": [{"op_id": 1, "op": "PUT", "type": "t", "id": "a", "data": {"v": 9}}]})).await;
    stack.upload_ok(&token, &first).await; // a client retry
    stack
        .upload_ok(
            &token,
            &json!({"client_id": "c", "batch": [{"op_id": 3, "op": "DELETE", "type": "t", "id": "gone"}]}),
        )
        .await;
    eventually(Duration::from_secs(60), "checkpoint 3", || async {
        (stack.checkpoints().await.get(&("nora".to_owned(), "c".to_owned())) == Some(&3)).then_some(())
    })
    .await;
    assert_eq!(
        Value::Object(stack.docs("t").await["a"].clone()),
        json!({"v": 9}),
        "the retry was skipped"
    );
    assert_eq!(stack.workers_sum(|m| m.ops_skipped.get()), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_transactions_turned_off_batches_still_apply_once_and_in_order() {
    let stack = Stack::start(StackOptions {
        workers: 1,
        worker_env: vec![("UPLINK_TRANSACTIONS".into(), "off".into())],
        ..StackOptions::default()
    })
    .await;
    exercise(&stack).await;
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_a_standalone_server_the_worker_detects_no_transactions_and_still_works() {
    // Arrange: a standalone server of our own on a free port.
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    let dir = std::env::temp_dir().join(format!("uplink-standalone-{port}"));
    let child = Command::new(secantusd())
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--storage-path"])
        .arg(&dir)
        .arg("--standalone")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("secantusd-py starts (run deploy/local/services.sh first)");
    let _server = Server(child, dir);
    let uri = format!("mongodb://127.0.0.1:{port}");
    let client = mongodb::Client::with_uri_str(format!("{uri}/?directConnection=true"))
        .await
        .expect("client");
    eventually(Duration::from_secs(30), "standalone server up", || async {
        client
            .database("admin")
            .run_command(mongodb::bson::doc! {"ping": 1})
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    let hello = client
        .database("admin")
        .run_command(mongodb::bson::doc! {"hello": 1})
        .await
        .expect("hello");
    assert!(
        hello.get("setName").is_none(),
        "the server really is standalone: {hello}"
    );

    // The stack's own database helpers point at the shared server; the worker writes to the
    // standalone one, so read its results from there.
    let stack = Stack::start(StackOptions {
        workers: 0,
        worker_env: vec![("MONGO_URI".into(), format!("{uri}/standalone?directConnection=true"))],
        ..StackOptions::default()
    })
    .await;
    let mut stack = stack;
    stack.db = client.database("standalone");
    stack.start_worker().await;

    // Act + Assert
    exercise(&stack).await;
    let _ = stack.db.drop().await;
    stack.finish().await;
}
