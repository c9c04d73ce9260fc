//! Acknowledge-on-apply (`UPLINK_ACK_MODE=apply`): `/upload` answers 200 only once a worker
//! committed the batch, so a deployment on PowerSync's managed write checkpoints sees no
//! flicker; without a commit in time it answers 503, and the queued batch still applies.

use std::time::Duration;

use mongodb::bson::{doc, Document};
use reqwest::StatusCode;
use serde_json::json;
use uplink_tests::{eventually, Stack, StackOptions};

fn apply_mode(timeout_secs: &str) -> Vec<(String, String)> {
    vec![
        ("UPLINK_ACK_MODE".into(), "apply".into()),
        ("UPLINK_APPLY_TIMEOUT_SECONDS".into(), timeout_secs.into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_200_arrives_after_the_documents_are_readable() {
    // Arrange
    let stack = Stack::start(StackOptions {
        workers: 2,
        api_env: apply_mode("10"),
        ..StackOptions::default()
    })
    .await;
    let token = stack.token("olga").await;

    for i in 0..20 {
        // Act
        let id = format!("n{i}");
        let reply = stack
            .upload_ok(
                &token,
                &json!({"client_id": "c", "batch": [
                    {"op_id": i + 1, "op": "PUT", "type": "notes", "id": id, "data": {"i": i}},
                ]}),
            )
            .await;

        // Assert: read right after the 200, no waiting.
        assert_eq!(reply["status"], "applied", "{reply}");
        assert_eq!(reply["checkpoint"], i + 1);
        let found = stack
            .db
            .collection::<Document>("notes")
            .find_one(doc! {"_id": &id})
            .await
            .expect("find");
        assert!(found.is_some(), "batch {i}: 200 before the document was readable");
    }
    assert_eq!(stack.api_metrics.apply_waits.with_label_values(&["applied"]).get(), 20);
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_commit_in_time_the_answer_is_503_and_the_batch_still_applies() {
    // Arrange: no worker yet.
    let mut stack = Stack::start(StackOptions {
        workers: 0,
        api_env: apply_mode("1"),
        ..StackOptions::default()
    })
    .await;
    let token = stack.token("pia").await;
    let body =
        json!({"client_id": "c", "batch": [{"op_id": 1, "op": "PUT", "type": "notes", "id": "late", "data": {}}]});

    // Act
    let (status, reply) = stack.upload(&token, &body).await;

    // Assert: told to retry, yet the batch is durably queued and applies once a worker runs;
    // the client's retry is then skipped as already applied.
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reply}");
    assert_eq!(stack.queue_depths().await.iter().sum::<u32>(), 1);
    stack.start_worker().await;
    eventually(Duration::from_secs(30), "queued batch applied", || async {
        (!stack.docs("notes").await.is_empty()).then_some(())
    })
    .await;
    let retry = stack.upload_ok(&token, &body).await;
    assert_eq!(retry["status"], "applied");
    assert_eq!(
        stack.workers_sum(|m| m.ops_skipped.get()),
        1,
        "the retry changed nothing"
    );
    assert_eq!(
        stack.api_metrics.apply_waits.with_label_values(&["not_applied"]).get(),
        1
    );
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_cannot_apply_is_answered_as_dead_lettered() {
    let stack = Stack::start(StackOptions {
        workers: 1,
        api_env: apply_mode("10"),
        ..StackOptions::default()
    })
    .await;
    stack
        .db
        .create_collection("strict")
        .validator(doc! {"$jsonSchema": {"bsonType": "object", "required": ["name"]}})
        .await
        .expect("validated collection");
    let token = stack.token("quinn").await;
    let reply = stack
        .upload_ok(
            &token,
            &json!({"batch": [{"op": "PUT", "table": "strict", "id": "x", "data": {}}]}),
        )
        .await;
    assert_eq!(reply["status"], "dead_lettered", "{reply}");
    assert_eq!(reply["reason"], "permanent");
    assert_eq!(stack.dead_letter_depth().await, 1);
    stack.finish().await;
}
