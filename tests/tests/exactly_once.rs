//! A change applies once even when its batch arrives twice, and clients' write checkpoints
//! follow their highest applied op id.

use std::time::Duration;

use serde_json::{json, Value};
use uplink_common::{Batch, Limits, UploadBatch};
use uplink_tests::{eventually, Stack, StackOptions};

const TIMEOUT: Duration = Duration::from_secs(60);

fn sdk_batch(client: &str, ops: Value) -> Value {
    json!({"client_id": client, "batch": ops})
}

async fn wait_for_checkpoint(stack: &Stack, user: &str, client: &str, checkpoint: i64) {
    eventually(TIMEOUT, "checkpoint reached", || async {
        let cps = stack.checkpoints().await;
        (cps.get(&(user.to_owned(), client.to_owned())) == Some(&checkpoint)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_uploaded_twice_applies_once_even_after_another_device_wrote() {
    // Arrange
    let stack = Stack::start(StackOptions {
        workers: 1,
        ..StackOptions::default()
    })
    .await;
    let token = stack.token("hana").await;
    let first = sdk_batch(
        "phone",
        json!([
            {"op_id": 1, "op": "PUT", "type": "docs", "id": "d1", "data": {"v": "phone-1"}},
            {"op_id": 2, "op": "PATCH", "type": "docs", "id": "d1", "data": {"w": "phone-2"}},
        ]),
    );

    // Act: the phone uploads; the laptop (same user, other client) overwrites the document; the
    // phone, having lost the first 200, uploads the same batch again.
    let reply = stack.upload_ok(&token, &first).await;
    assert_eq!(reply["checkpoint"], 2);
    wait_for_checkpoint(&stack, "hana", "phone", 2).await;
    stack
        .upload_ok(
            &token,
            &sdk_batch(
                "laptop",
                json!([{"op_id": 1, "op": "PUT", "type": "docs", "id": "d1", "data": {"v": "laptop"}}]),
            ),
        )
        .await;
    wait_for_checkpoint(&stack, "hana", "laptop", 1).await;
    stack.upload_ok(&token, &first).await;
    stack
        .upload_ok(
            &token,
            &sdk_batch(
                "phone",
                json!([{"op_id": 3, "op": "PUT", "type": "marker", "id": "m", "data": {}}]),
            ),
        )
        .await;
    wait_for_checkpoint(&stack, "hana", "phone", 3).await;

    // Assert: the retry changed nothing; the laptop's write stands.
    let docs = stack.docs("docs").await;
    assert_eq!(Value::Object(docs["d1"].clone()), json!({"v": "laptop"}));
    assert_eq!(
        stack.workers_sum(|m| m.ops_skipped.get()),
        2,
        "both ops of the retried batch were skipped"
    );
    assert_eq!(stack.workers_sum(|m| m.ops_applied.get()), 4);
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_delivered_twice_applies_once() {
    // Arrange: a batch as the api would publish it.
    let stack = Stack::start(StackOptions {
        workers: 1,
        partitions: 2,
        ..StackOptions::default()
    })
    .await;
    let body = sdk_batch(
        "tablet",
        json!([
            {"op_id": 10, "op": "PUT", "type": "docs", "id": "d2", "data": {"v": "tablet"}},
        ]),
    );
    let parsed = Batch::parse(body.to_string().as_bytes(), &Limits::default()).expect("valid");
    let batch = UploadBatch {
        batch_id: uuid::Uuid::now_v7(),
        user_id: "ivan".into(),
        client_id: parsed.client_id,
        partition: uplink_common::partition::partition_for("ivan", 2),
        accepted_at_ms: 0,
        ops: parsed.ops,
    };

    // Act: delivered, then another client of the user writes, then the same message again
    // (what the broker does when a worker dies before its ack reaches the broker).
    stack.publish_raw(&batch).await;
    wait_for_checkpoint(&stack, "ivan", "tablet", 10).await;
    let token = stack.token("ivan").await;
    stack
        .upload_ok(
            &token,
            &sdk_batch(
                "desktop",
                json!([{"op_id": 1, "op": "PUT", "type": "docs", "id": "d2", "data": {"v": "desktop"}}]),
            ),
        )
        .await;
    wait_for_checkpoint(&stack, "ivan", "desktop", 1).await;
    stack.publish_raw(&batch).await;
    eventually(TIMEOUT, "redelivery processed", || async {
        (stack.workers_sum(|m| m.batches.with_label_values(&["applied"]).get()) == 3).then_some(())
    })
    .await;

    // Assert
    assert_eq!(
        Value::Object(stack.docs("docs").await["d2"].clone()),
        json!({"v": "desktop"})
    );
    assert_eq!(stack.workers_sum(|m| m.ops_skipped.get()), 1);
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_is_the_highest_op_id_and_never_goes_down() {
    let stack = Stack::start(StackOptions {
        workers: 1,
        ..StackOptions::default()
    })
    .await;
    let token = stack.token("jun").await;
    let reply = stack
        .upload_ok(
            &token,
            &sdk_batch(
                "c1",
                json!([
                    {"op_id": 5, "op": "PUT", "type": "t", "id": "a", "data": {"n": 1}},
                    {"op_id": 7, "op": "PUT", "type": "t", "id": "b", "data": {"n": 2}},
                ]),
            ),
        )
        .await;
    assert_eq!(reply["checkpoint"], 7, "/upload returns the batch's highest op id");
    wait_for_checkpoint(&stack, "jun", "c1", 7).await;

    // An older batch arriving late (a client retry) neither applies nor lowers the checkpoint.
    stack
        .upload_ok(
            &token,
            &sdk_batch(
                "c1",
                json!([{"op_id": 6, "op": "PUT", "type": "t", "id": "a", "data": {"n": 99}}]),
            ),
        )
        .await;
    stack
        .upload_ok(
            &token,
            &sdk_batch(
                "c1",
                json!([{"op_id": 8, "op": "PUT", "type": "marker", "id": "m", "data": {}}]),
            ),
        )
        .await;
    wait_for_checkpoint(&stack, "jun", "c1", 8).await;
    assert_eq!(stack.docs("t").await["a"]["n"], 1);
    let raw = stack.docs("checkpoints").await;
    let doc = raw.values().next().expect("one checkpoint document");
    assert_eq!(doc["user_id"], "jun");
    assert_eq!(doc["client_id"], "c1");
    stack.finish().await;
}
