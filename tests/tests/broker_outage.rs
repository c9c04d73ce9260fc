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
    eventually(
        Duration::from_secs(30),
        "uploads accepted again after the broker returned",
        || async {
            let (status, _, _) = upload_timed(&stack, &token, "after-cut").await;
            (status == StatusCode::OK).then_some(())
        },
    )
    .await;
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
    eventually(
        Duration::from_secs(30),
        "uploads accepted again after the stall",
        || async {
            let (status, _, _) = upload_timed(&stack, &token, "after-stall").await;
            (status == StatusCode::OK).then_some(())
        },
    )
    .await;
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
