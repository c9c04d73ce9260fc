//! With the broker unreachable, `/upload` answers 503 with `Retry-After` (never 200) within the
//! confirm timeout, and recovers by itself once the broker is back; every batch that got a 200
//! is applied.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use uplink_tests::stack::amqp_socket;
use uplink_tests::{eventually, Proxy, Stack, StackOptions};

const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);

fn put(id: &str) -> Value {
    json!({"batch": [{"op": "PUT", "table": "events", "id": id, "data": {"n": id}}]})
}

async fn upload_timed(stack: &Stack, token: &str, id: &str) -> (StatusCode, Option<String>, Duration) {
    let started = Instant::now();
    let response = stack
        .http
        .post(format!("{}/upload", stack.api_url))
        .bearer_auth(token)
        .json(&put(id))
        .send()
        .await
        .expect("request");
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (response.status(), retry_after, started.elapsed())
}

/// Retries the upload of `id` until the api accepts it again (it reconnects by itself).
async fn accepted_again(stack: &Stack, token: &str, id: &str) {
    eventually(
        Duration::from_secs(30),
        &format!("uploads accepted again ({id})"),
        || async {
            let (status, _, _) = upload_timed(stack, token, id).await;
            (status == StatusCode::OK).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_get_503_while_the_broker_is_unreachable_and_200_again_after() {
    // Arrange: the api reaches the broker through a proxy the test controls.
    let proxy = Proxy::start(amqp_socket()).await;
    let stack = Stack::start(StackOptions {
        workers: 1,
        api_amqp_via: Some(proxy.addr()),
        ..StackOptions::default()
    })
    .await;
    let token = stack.token("grace").await;
    let mut accepted = Vec::new();
    eventually(Duration::from_secs(20), "api connected through the proxy", || async {
        let (status, _, _) = upload_timed(&stack, &token, "before").await;
        (status == StatusCode::OK).then_some(())
    })
    .await;
    accepted.push("before".to_owned());

    // Act + Assert 1: connections cut and refused.
    proxy.cut();
    for i in 0..3 {
        let id = format!("cut-{i}");
        let (status, retry_after, elapsed) = upload_timed(&stack, &token, &id).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{id}");
        assert_eq!(retry_after.as_deref(), Some("1"), "{id}: Retry-After");
        assert!(
            elapsed < CONFIRM_TIMEOUT + Duration::from_secs(3),
            "{id}: answered after {elapsed:?}"
        );
    }
    let readyz = stack
        .http
        .get(format!("{}/readyz", stack.api_url))
        .send()
        .await
        .expect("readyz");
    assert_eq!(readyz.status(), StatusCode::SERVICE_UNAVAILABLE);

    // Act + Assert 2: the broker comes back; the api reconnects by itself.
    proxy.restore();
    accepted_again(&stack, &token, "after-cut").await;
    accepted.push("after-cut".to_owned());

    // Act + Assert 3: the connection stays open but stops moving bytes: the confirm never
    // comes, and the answer is a 503 after the confirm timeout, not a hang and not a 200.
    proxy.stall();
    let (status, retry_after, elapsed) = upload_timed(&stack, &token, "stalled").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(retry_after.is_some());
    assert!(elapsed >= CONFIRM_TIMEOUT, "waited for the confirm: {elapsed:?}");
    assert!(
        elapsed < CONFIRM_TIMEOUT + Duration::from_secs(3),
        "answered after {elapsed:?}"
    );
    proxy.restore();
    accepted_again(&stack, &token, "after-stall").await;
    accepted.push("after-stall".to_owned());

    // Every batch that got a 200 is applied. (A batch answered 503 may still have reached the
    // broker — the client retries it, and replays are idempotent — so extra documents are
    // allowed, missing ones are not.)
    eventually(Duration::from_secs(60), "accepted batches applied", || async {
        let docs = stack.docs("events").await;
        accepted.iter().all(|id| docs.contains_key(id)).then_some(())
    })
    .await;
    let unavailable = stack
        .api_metrics
        .batches_published
        .with_label_values(&["unavailable"])
        .get()
        + stack
            .api_metrics
            .batches_published
            .with_label_values(&["timeout"])
            .get()
        + stack.api_metrics.batches_published.with_label_values(&["error"]).get();
    assert!(unavailable >= 4, "failed publishes are counted: {unavailable}");
    stack.finish().await;
}

/// Applies (or replaces) a `max-length` policy on one queue; whether rabbitmqctl succeeded.
fn set_max_length(policy: &str, queue: &str, max_length: u32) -> bool {
    std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "set_policy",
            "--apply-to",
            "queues",
            policy,
            &format!("^{queue}$"),
        ])
        .arg(format!(r#"{{"max-length": {max_length}}}"#))
        .status()
        .expect("rabbitmqctl runs")
        .success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returned_or_nacked_publish_is_a_503_never_a_200() {
    use lapin::options::QueueBindOptions;
    use lapin::types::FieldTable;

    // Arrange: one partition, no worker, so the queue's state is ours to break.
    let stack = Stack::start(StackOptions {
        workers: 0,
        partitions: 1,
        ..StackOptions::default()
    })
    .await;
    let token = stack.token("sam").await;
    let queue = stack.topology().partition_queue(0);
    let exchange = stack.topology().uploads_exchange();
    let connection = uplink_common::amqp::connect(&uplink_tests::amqp_uri().into(), "uplink-tests")
        .await
        .expect("amqp");
    let channel = connection.create_channel().await.expect("channel");

    // Act 1: no binding, so the mandatory message comes back unroutable.
    channel
        .queue_unbind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "0".into(),
            FieldTable::default(),
        )
        .await
        .expect("unbind");
    let (returned, _, _) = upload_timed(&stack, &token, "returned").await;
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "0".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("rebind");

    // Act 2: the queue is full (a max-length policy with the queue's reject-publish overflow),
    // so the broker nacks the message.
    let policy = format!("{}-full", stack.name);
    assert!(set_max_length(&policy, &queue, 0));
    let nacked = eventually(Duration::from_secs(10), "the policy takes effect", || async {
        let (status, _, _) = upload_timed(&stack, &token, "nacked").await;
        (status == StatusCode::SERVICE_UNAVAILABLE).then_some(status)
    })
    .await;
    // Room again. (A quorum queue that started rejecting only re-evaluates its limit when it
    // changes, so the limit is raised rather than removed.)
    set_max_length(&policy, &queue, 1000);

    // Assert
    assert_eq!(returned, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(nacked, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        stack
            .api_metrics
            .batches_published
            .with_label_values(&["returned"])
            .get(),
        1
    );
    assert!(stack.api_metrics.batches_published.with_label_values(&["nacked"]).get() >= 1);
    accepted_again(&stack, &token, "after").await;
    let _ = std::process::Command::new("rabbitmqctl")
        .args(["-q", "clear_policy", &policy])
        .status();
    let _ = connection.close(200, "done".into()).await;
    stack.finish().await;
}
