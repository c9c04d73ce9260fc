//! Error classification against real server errors, injected with MongoDB's `failCommand`
//! fail point (the server runs with test commands enabled; the fail point is limited to this
//! test's worker by its `appName`): a transient error is retried until it clears, an
//! unclassified one is retried a bounded number of times and then dead-lettered.

use std::time::Duration;

use mongodb::bson::{doc, Document};
use serde_json::json;
use uplink_tests::stack::mongo_uri;
use uplink_tests::{eventually, Stack, StackOptions};

async fn fail_point(admin: &mongodb::Database, mode: Document, data: Document) {
    admin
        .run_command(doc! {"configureFailPoint": "failCommand", "mode": mode, "data": data})
        .await
        .expect("failCommand needs the server started with test commands (deploy/local/services.sh does)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_are_retried_until_they_clear_and_unknown_ones_are_dead_lettered_after_the_attempt_limit() {
    // Arrange: a worker whose MongoDB connections carry an application name of their own.
    let app = uplink_tests::unique_name("fp");
    let mut stack = Stack::start(StackOptions {
        workers: 0,
        partitions: 1,
        worker_env: vec![("UPLINK_UNKNOWN_ERROR_ATTEMPTS".into(), "3".into())],
        ..StackOptions::default()
    })
    .await;
    let uri = format!(
        "{}{}appName={app}",
        mongo_uri(&stack.name, None),
        if mongo_uri(&stack.name, None).contains('?') {
            "&"
        } else {
            "?"
        }
    );
    stack.opts.worker_env.push(("MONGO_URI".into(), uri));
    stack.start_worker().await;
    let admin = mongodb::Client::with_uri_str(mongo_uri("admin", None))
        .await
        .expect("client")
        .database("admin");
    let token = stack.token("rosa").await;

    // Act 1: LockTimeout (24) on the next four updates, then the server recovers.
    fail_point(
        &admin,
        doc! {"times": 4},
        doc! {"failCommands": ["update"], "errorCode": 24, "appName": &app},
    )
    .await;
    stack
        .upload_ok(
            &token,
            &json!({"batch": [{"op": "PUT", "table": "t", "id": "ok", "data": {"n": 1}}]}),
        )
        .await;

    // Assert 1: applied once the errors stopped, retried in between, nothing dead-lettered.
    eventually(Duration::from_secs(30), "applied after transient errors", || async {
        (!stack.docs("t").await.is_empty()).then_some(())
    })
    .await;
    assert_eq!(
        stack.workers_sum(|m| m.apply_retries.with_label_values(&["transient"]).get()),
        4
    );
    assert_eq!(stack.dead_letter_depth().await, 0);

    // Act 2: an error code uplink does not know, on every update.
    fail_point(
        &admin,
        doc! {"times": 1000},
        doc! {"failCommands": ["update"], "errorCode": 9999, "appName": &app},
    )
    .await;
    stack
        .upload_ok(
            &token,
            &json!({"batch": [{"op": "PUT", "table": "t", "id": "never", "data": {}}]}),
        )
        .await;
    let dead = eventually(
        Duration::from_secs(30),
        "dead-lettered after the attempt limit",
        || async {
            let d = stack.dead_letters().await;
            (!d.is_empty()).then_some(d)
        },
    )
    .await;
    admin
        .run_command(doc! {"configureFailPoint": "failCommand", "mode": "off"})
        .await
        .expect("fail point off");

    // Assert 2
    let (headers, _) = &dead[0];
    assert_eq!(headers["x-uplink-dead-reason"], "attempts_exhausted");
    assert_eq!(headers["x-uplink-error-class"], "unknown");
    assert_eq!(headers["x-uplink-error-code"], "9999");
    assert_eq!(headers["x-uplink-attempts"], "3");
    assert_eq!(
        stack.workers_sum(|m| m.apply_failures.with_label_values(&["unknown"]).get()),
        3
    );
    stack.finish().await;
}
