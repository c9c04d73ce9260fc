//! Failures injected into real components: MongoDB unreachable, the workers' broker connection
//! cut, and a batch that makes the worker panic.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use uplink_tests::stack::{amqp_socket, mongo_socket};
use uplink_tests::{eventually, Model, Proxy, Stack, StackOptions};

/// `users` users × `batches` batches of PUT/PATCH/DELETE on a few shared-per-user ids.
fn plan(users: usize, batches: usize) -> (Vec<Vec<Value>>, Model) {
    let mut model = Model::default();
    let mut all = Vec::new();
    for u in 0..users {
        let mut mine = Vec::new();
        for b in 0..batches {
            let id = format!("u{u}-{}", b % 3);
            let ops = match b % 4 {
                0 | 1 => vec![json!({"op": "PUT", "table": "rows", "id": id, "data": {"b": b}})],
                2 => vec![json!({"op": "PATCH", "table": "rows", "id": id, "data": {"p": b}})],
                _ => vec![json!({"op": "DELETE", "table": "rows", "id": id})],
            };
            model.apply_batch(&ops);
            mine.push(json!({"batch": ops}));
        }
        all.push(mine);
    }
    (all, model)
}

/// Uploads every user's batches in order, pausing between batches so the stream spans the
/// outage; every upload must be a 200.
async fn steady_stream(stack: &Stack, bodies: Vec<Vec<Value>>, pause: Duration) {
    let uploads = bodies.into_iter().enumerate().map(|(u, batches)| async move {
        let token = stack.token(&format!("user-{u}")).await;
        for body in batches {
            let (status, reply) = stack.upload(&token, &body).await;
            assert_eq!(
                status,
                StatusCode::OK,
                "no 5xx while a dependency behind the queue is down: {reply}"
            );
            tokio::time::sleep(pause).await;
        }
    });
    futures::future::join_all(uploads).await;
}

async fn assert_model(stack: &Stack, model: &Model, timeout: Duration) {
    let expected = model.collection("rows");
    eventually(timeout, "backlog drained into the in-order state", || async {
        let depth: u32 = stack.queue_depths().await.iter().sum();
        (depth == 0 && stack.docs("rows").await == expected).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_unreachable_for_ten_seconds_loses_nothing_and_keeps_order() {
    // Arrange: workers reach MongoDB through a proxy.
    let proxy = Proxy::start(mongo_socket()).await;
    let stack = Stack::start(StackOptions {
        workers: 2,
        partitions: 4,
        mongo_via: Some(proxy.addr()),
        ..StackOptions::default()
    })
    .await;
    let (bodies, model) = plan(20, 40);

    // Act: cut MongoDB for 10 s in the middle of a steady upload stream.
    let outage = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        proxy.cut();
        let worker = stack.workers[0].admin_url.clone();
        let ready = eventually(Duration::from_secs(8), "worker reports MongoDB down", || async {
            let r = stack.http.get(format!("{worker}/readyz")).send().await.ok()?;
            let status = r.status();
            let body: Value = r.json().await.ok()?;
            (status == StatusCode::SERVICE_UNAVAILABLE && body["checks"]["mongodb"] == "down").then_some(body)
        })
        .await;
        assert_eq!(
            ready["checks"]["broker"], "up",
            "each dependency is reported separately"
        );
        tokio::time::sleep(Duration::from_secs(8)).await;
        proxy.restore();
    };
    tokio::join!(steady_stream(&stack, bodies, Duration::from_millis(300)), outage);

    // Assert
    assert_model(&stack, &model, Duration::from_secs(120)).await;
    assert!(
        stack.workers_sum(|m| m.apply_retries.with_label_values(&["transient"]).get()) > 0,
        "the outage was retried"
    );
    assert_eq!(
        stack.dead_letter_depth().await,
        0,
        "nothing dead-lettered for an outage"
    );
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_reconnect_to_the_broker_by_themselves_and_drain_the_backlog() {
    // Arrange: workers reach the broker through a proxy; the api does not.
    let proxy = Proxy::start(amqp_socket()).await;
    let stack = Stack::start(StackOptions {
        workers: 2,
        partitions: 4,
        worker_amqp_via: Some(proxy.addr()),
        ..StackOptions::default()
    })
    .await;
    let (bodies, model) = plan(10, 30);

    // Act
    let outage = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        proxy.cut();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            stack.queue_depths().await.iter().sum::<u32>() > 0,
            "the queue absorbs uploads meanwhile"
        );
        proxy.restore();
    };
    tokio::join!(steady_stream(&stack, bodies, Duration::from_millis(200)), outage);

    // Assert
    assert_model(&stack, &model, Duration::from_secs(120)).await;
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_makes_the_worker_panic_is_dead_lettered_by_the_delivery_limit() {
    // Arrange: a test-build fault makes the worker panic on collection `boom`.
    let limit = ("UPLINK_DELIVERY_LIMIT".to_owned(), "3".to_owned());
    let stack = Stack::start(StackOptions {
        workers: 1,
        partitions: 1,
        api_env: vec![limit.clone()],
        worker_env: vec![limit, ("UPLINK_FAULT_PANIC_ON_COLLECTION".into(), "boom".into())],
        ..StackOptions::default()
    })
    .await;
    let token = stack.token("lee").await;

    // Act
    stack
        .upload_ok(
            &token,
            &json!({"batch": [{"op": "PUT", "table": "boom", "id": "1", "data": {}}]}),
        )
        .await;
    stack
        .upload_ok(
            &token,
            &json!({"batch": [{"op": "PUT", "table": "after", "id": "1", "data": {"ok": true}}]}),
        )
        .await;

    // Assert: the partition moves on once the broker gives up on the poisonous batch.
    eventually(Duration::from_secs(60), "the next batch applied", || async {
        (!stack.docs("after").await.is_empty()).then_some(())
    })
    .await;
    let dead = stack.dead_letters().await;
    assert_eq!(dead.len(), 1);
    let (headers, body) = &dead[0];
    assert!(headers.contains_key("x-death"), "{headers:?}");
    assert_eq!(headers["x-first-death-reason"], "delivery_limit", "{headers:?}");
    assert_eq!(body["ops"][0]["collection"], "boom");
    assert!(stack.docs("boom").await.is_empty());
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_is_dead_lettered_recorded_for_the_user_and_the_partition_keeps_flowing() {
    // Arrange: a collection validator the first batch breaks.
    let stack = Stack::start(StackOptions {
        workers: 1,
        partitions: 1,
        ..StackOptions::default()
    })
    .await;
    stack
        .db
        .create_collection("strict")
        .validator(mongodb::bson::doc! {"$jsonSchema": {"bsonType": "object", "required": ["name"]}})
        .await
        .expect("create validated collection");
    let token = stack.token("mia").await;

    // Act
    stack
        .upload_ok(
            &token,
            &json!({"client_id": "phone", "batch": [
                {"op_id": 1, "op": "PUT", "type": "strict", "id": "s1", "data": {"name": "ok"}},
                {"op_id": 2, "op": "PUT", "type": "strict", "id": "s2", "data": {"nameless": true}},
            ]}),
        )
        .await;
    stack
        .upload_ok(
            &token,
            &json!({"client_id": "phone", "batch": [{"op_id": 3, "op": "PUT", "type": "free", "id": "f", "data": {}}]}),
        )
        .await;

    // Assert
    eventually(Duration::from_secs(60), "the next batch applied", || async {
        (!stack.docs("free").await.is_empty()).then_some(())
    })
    .await;
    assert!(
        stack.docs("strict").await.is_empty(),
        "the failed batch committed nothing"
    );
    let dead = stack.dead_letters().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0["x-uplink-error-code"], "121");
    assert_eq!(dead[0].0["x-uplink-op-index"], "1");
    let errors = stack.docs("upload_errors").await;
    let record = errors
        .values()
        .next()
        .expect("the rejection is recorded for the user's devices");
    assert_eq!(record["user_id"], "mia");
    assert_eq!(record["client_id"], "phone");
    assert_eq!(record["document_id"], "s2");
    assert_eq!(record["collection"], "strict");
    assert_eq!(record["error_code"], 121);
    stack.finish().await;
}
