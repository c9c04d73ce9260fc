//! The whole pipeline, end to end: token → upload → RabbitMQ → worker → MongoDB.

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine;
use jwt_simple::prelude::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uplink_tests::{eventually, Model, Stack, StackOptions};

const APPLY_TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_token_verifies_against_jwks_with_an_independent_library() {
    // Arrange
    let stack = Stack::start(StackOptions {
        workers: 0,
        ..StackOptions::default()
    })
    .await;

    // Act
    let token_reply: Value = stack
        .http
        .get(format!("{}/token?user_id=alice", stack.api_url))
        .send()
        .await
        .expect("token")
        .json()
        .await
        .expect("json");
    let jwks: Value = stack
        .http
        .get(format!("{}/jwks", stack.api_url))
        .send()
        .await
        .expect("jwks")
        .json()
        .await
        .expect("json");

    // Assert
    assert_eq!(token_reply["powersync_url"], uplink_tests::stack::POWERSYNC_URL);
    let token = token_reply["token"].as_str().expect("token");
    let metadata = Token::decode_metadata(token).expect("a JWT");
    assert_eq!(metadata.algorithm(), "RS256");
    let kid = metadata.key_id().expect("kid in header");
    let jwk = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["kid"] == kid)
        .expect("kid listed in JWKS");
    assert_eq!(
        (jwk["kty"].as_str(), jwk["alg"].as_str(), jwk["use"].as_str()),
        (Some("RSA"), Some("RS256"), Some("sig"))
    );
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let n = jwk["n"].as_str().expect("n");
    assert!(
        !n.contains('=') && !n.contains('+') && !n.contains('/'),
        "base64url without padding"
    );
    let public = RS256PublicKey::from_components(
        &b64.decode(n).expect("n"),
        &b64.decode(jwk["e"].as_str().expect("e")).expect("e"),
    )
    .expect("public key");
    let options = VerificationOptions {
        allowed_audiences: Some(HashSet::from_strings(&[uplink_tests::stack::POWERSYNC_URL])),
        ..VerificationOptions::default()
    };
    let claims = public
        .verify_token::<NoCustomClaims>(token, Some(options))
        .expect("signature and audience verify");
    assert_eq!(claims.subject.as_deref(), Some("alice"));
    let lifetime = claims.expires_at.expect("exp") - claims.issued_at.expect("iat");
    assert_eq!(lifetime.as_secs(), 3600, "default lifetime");
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_lifetime_is_configurable_and_a_missing_user_id_is_refused() {
    let stack = Stack::start(StackOptions {
        workers: 0,
        api_env: vec![("UPLINK_TOKEN_LIFETIME_SECONDS".into(), "120".into())],
        ..StackOptions::default()
    })
    .await;
    let token = stack.token("bob").await;
    let claims: Value = {
        let payload = token.split('.').nth(1).expect("payload");
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .expect("b64"),
        )
        .expect("json")
    };
    assert_eq!(
        claims["exp"].as_u64().expect("exp") - claims["iat"].as_u64().expect("iat"),
        120
    );
    for query in ["", "?user_id=", "?user_id=%20"] {
        let status = stack
            .http
            .get(format!("{}/token{query}", stack.api_url))
            .send()
            .await
            .expect("token")
            .status();
        assert_eq!(status, StatusCode::BAD_REQUEST, "query {query:?}");
    }
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_in_both_spellings_across_two_collections_end_as_documents() {
    // Arrange
    let stack = Stack::start(StackOptions::default()).await;
    let token = stack.token("carol").await;
    let seed = json!({"batch": [
        {"op": "PUT", "table": "lists", "id": "l1", "data": {"id": "l1", "name": "Groceries", "owner": "carol"}},
        {"op": "PUT", "table": "todos", "id": "t1", "data": {"list_id": "l1", "title": "milk", "done": 0}},
        {"op": "PUT", "table": "todos", "id": "t2", "data": {"list_id": "l1", "title": "eggs", "done": 0}},
    ]});
    let sdk = json!({"client_id": "device-1", "batch": [
        {"op_id": 1, "op": "PATCH", "type": "todos", "id": "t1", "tx_id": 1, "data": {"done": 1, "note": null}},
        {"op_id": 2, "op": "DELETE", "type": "todos", "id": "t2", "tx_id": 1},
        {"op_id": 3, "op": "PATCH", "type": "lists", "id": "l1", "tx_id": 2, "data": {"name": "Shopping"}, "old": {"name": "Groceries"}},
    ]});

    // Act
    let first = stack.upload_ok(&token, &seed).await;
    let second = stack.upload_ok(&token, &sdk).await;

    // Assert
    assert_eq!(first["ops"], 3);
    assert!(first.get("checkpoint").is_none(), "no op ids, no checkpoint: {first}");
    assert_eq!(second["checkpoint"], 3);
    let todos = eventually(APPLY_TIMEOUT, "both batches applied", || async {
        let todos = stack.docs("todos").await;
        (todos.len() == 1 && todos.get("t1").map(|t| t["done"] == 1).unwrap_or(false)).then_some(todos)
    })
    .await;
    assert_eq!(
        Value::Object(todos["t1"].clone()),
        json!({"list_id": "l1", "title": "milk", "done": 1, "note": null})
    );
    let lists = eventually(APPLY_TIMEOUT, "list renamed", || async {
        let lists = stack.docs("lists").await;
        (lists.get("l1").map(|l| l["name"] == "Shopping").unwrap_or(false)).then_some(lists)
    })
    .await;
    assert_eq!(
        Value::Object(lists["l1"].clone()),
        json!({"name": "Shopping", "owner": "carol"})
    );
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_of_one_batch_apply_in_order() {
    let stack = Stack::start(StackOptions::default()).await;
    let token = stack.token("dave").await;

    // PUT, PATCH, DELETE of one id: nothing remains. DELETE then PUT: the document exists.
    stack
        .upload_ok(
            &token,
            &json!({"batch": [
                {"op": "PUT", "table": "notes", "id": "gone", "data": {"text": "a"}},
                {"op": "PATCH", "table": "notes", "id": "gone", "data": {"text": "b"}},
                {"op": "DELETE", "table": "notes", "id": "gone"},
                {"op": "DELETE", "table": "notes", "id": "kept"},
                {"op": "PUT", "table": "notes", "id": "kept", "data": {"text": "c"}},
                {"op": "PUT", "table": "marker", "id": "done", "data": {}},
            ]}),
        )
        .await;

    eventually(APPLY_TIMEOUT, "batch applied", || async {
        (!stack.docs("marker").await.is_empty()).then_some(())
    })
    .await;
    let notes = stack.docs("notes").await;
    assert_eq!(notes.keys().collect::<Vec<_>>(), vec!["kept"]);
    assert_eq!(notes["kept"]["text"], "c");
    stack.finish().await;
}

/// Random ops for one user's batch: a handful of ids in two collections, so batches of one user
/// overwrite, patch and delete each other's rows and only in-order application gives the model.
fn random_batch(user: usize, batch: usize, rng: &mut impl rand::Rng) -> Vec<Value> {
    let ops = rng.gen_range(1..=5);
    (0..ops)
        .map(|i| {
            let table = if rng.gen_bool(0.5) { "items" } else { "tags" };
            let id = format!("u{user}-{}", rng.gen_range(0..4));
            let seq = batch * 10 + i;
            match rng.gen_range(0..10) {
                0..=4 => json!({"op": "PUT", "table": table, "id": id, "data": {"v": seq, "user": user}}),
                5..=7 => json!({"op": "PATCH", "table": table, "id": id, "data": {"p": seq}}),
                _ => json!({"op": "DELETE", "table": table, "id": id}),
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_users_with_sequential_batches_end_in_the_in_order_state() {
    // Arrange: 50 users × 20 sequential batches, two workers.
    const USERS: usize = 50;
    const BATCHES: usize = 20;
    let stack = Stack::start(StackOptions {
        workers: 2,
        partitions: 4,
        ..StackOptions::default()
    })
    .await;
    let mut model = Model::default();
    let mut plans = Vec::new();
    {
        let mut rng = rand::thread_rng();
        for user in 0..USERS {
            let batches: Vec<Vec<Value>> = (0..BATCHES).map(|b| random_batch(user, b, &mut rng)).collect();
            for b in &batches {
                model.apply_batch(b);
            }
            plans.push(batches);
        }
    }

    // Act: every user uploads concurrently, each user's batches one after another.
    let started = std::time::Instant::now();
    let uploads = plans.into_iter().enumerate().map(|(user, batches)| {
        let stack = &stack;
        async move {
            let token = stack.token(&format!("user-{user}")).await;
            for ops in batches {
                stack.upload_ok(&token, &json!({ "batch": ops })).await;
            }
        }
    });
    futures::future::join_all(uploads).await;
    let accepted = started.elapsed();

    // Assert
    let expected_items = model.collection("items");
    let expected_tags = model.collection("tags");
    eventually(Duration::from_secs(120), "all batches applied", || async {
        let depth: u32 = stack.queue_depths().await.iter().sum();
        (depth == 0 && stack.docs("items").await == expected_items && stack.docs("tags").await == expected_tags)
            .then_some(())
    })
    .await;
    let applied: u64 = stack
        .workers
        .iter()
        .map(|w| w.metrics.batches.with_label_values(&["applied"]).get())
        .sum();
    assert_eq!(applied, (USERS * BATCHES) as u64, "every batch applied exactly once");
    eprintln!(
        "{} batches accepted in {:.2?} ({:.0} uploads/s through the api)",
        USERS * BATCHES,
        accepted,
        (USERS * BATCHES) as f64 / accepted.as_secs_f64()
    );
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_get_the_documented_status_and_publish_nothing() {
    // Arrange: no workers, so anything published stays in the queues where we can count it.
    let stack = Stack::start(StackOptions {
        workers: 0,
        partitions: 2,
        api_env: vec![
            ("UPLINK_MAX_OPS".into(), "3".into()),
            ("UPLINK_MAX_BODY_BYTES".into(), "2048".into()),
        ],
        ..StackOptions::default()
    })
    .await;
    let token = stack.token("eve").await;
    let op = |o: Value| json!({"batch": [o]});
    let cases: Vec<(&str, Vec<u8>, StatusCode, Option<&str>)> = vec![
        ("not JSON", b"{not json".to_vec(), StatusCode::BAD_REQUEST, None),
        ("no batch", br#"{"ops": []}"#.to_vec(), StatusCode::BAD_REQUEST, Some("batch")),
        ("batch not an array", br#"{"batch": {}}"#.to_vec(), StatusCode::BAD_REQUEST, Some("batch")),
        ("unknown op kind", op(json!({"op": "MERGE", "table": "t", "id": "1", "data": {}})).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, Some("op")),
        ("missing id", op(json!({"op": "PUT", "table": "t", "data": {}})).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, Some("id")),
        ("$-field", op(json!({"op": "PUT", "table": "t", "id": "1", "data": {"$where": "1"}})).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, Some("data.$where")),
        ("system collection", op(json!({"op": "PUT", "table": "system.js", "id": "1", "data": {}})).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, Some("table")),
        (
            "too many ops",
            json!({"batch": (0..4).map(|i| json!({"op": "DELETE", "table": "t", "id": i.to_string()})).collect::<Vec<_>>()}).to_string().into_bytes(),
            StatusCode::PAYLOAD_TOO_LARGE,
            Some("batch"),
        ),
        (
            "body too large",
            op(json!({"op": "PUT", "table": "t", "id": "1", "data": {"blob": "x".repeat(4096)}})).to_string().into_bytes(),
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
        ),
    ];

    // Act + Assert
    for (what, body, expected, field) in cases {
        let (status, reply) = stack.upload_raw(Some(&token), body).await;
        assert_eq!(status, expected, "{what}: {reply}");
        assert!(
            reply["error"]["message"].is_string(),
            "{what}: JSON error body expected, got {reply}"
        );
        if let Some(field) = field {
            assert_eq!(reply["error"]["field"], field, "{what}: {reply}");
        }
        if expected == StatusCode::UNPROCESSABLE_ENTITY {
            assert_eq!(reply["error"]["op_index"], 0, "{what}: {reply}");
        }
    }
    let (status, _) = stack
        .upload_raw(
            None,
            op(json!({"op": "DELETE", "table": "t", "id": "1"}))
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no token");
    assert_eq!(
        stack.queue_depths().await.iter().sum::<u32>(),
        0,
        "nothing was published"
    );

    // The counting itself works: one good upload shows up as one message.
    stack
        .upload_ok(&token, &op(json!({"op": "DELETE", "table": "t", "id": "1"})))
        .await;
    assert_eq!(stack.queue_depths().await.iter().sum::<u32>(), 1);
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_endpoints_report_each_component() {
    let stack = Stack::start(StackOptions {
        workers: 1,
        ..StackOptions::default()
    })
    .await;
    let token = stack.token("frank").await;
    stack
        .upload_ok(
            &token,
            &json!({"batch": [{"op": "PUT", "table": "m", "id": "1", "data": {"a": 1}}]}),
        )
        .await;
    eventually(APPLY_TIMEOUT, "applied", || async {
        (!stack.docs("m").await.is_empty()).then_some(())
    })
    .await;

    let get = |url: String| {
        let http = stack.http.clone();
        async move {
            let r = http.get(url).send().await.expect("request");
            (r.status(), r.text().await.expect("body"))
        }
    };
    assert_eq!(get(format!("{}/healthz", stack.api_url)).await.0, StatusCode::OK);
    let (status, body) = get(format!("{}/readyz", stack.api_url)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let worker = &stack.workers[0].admin_url;
    let (status, body) = eventually(Duration::from_secs(15), "worker ready", || {
        let url = format!("{worker}/readyz");
        async move {
            let (s, b) = get(url).await;
            (s == StatusCode::OK).then_some((s, b))
        }
    })
    .await;
    assert_eq!(status, StatusCode::OK);
    let ready: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(ready["checks"], json!({"broker": "up", "mongodb": "up"}));

    let (_, api_metrics) = get(format!("{}/metrics", stack.api_url)).await;
    for needle in [
        r#"uplink_http_requests_total{method="POST",route="/upload",status="200"} 1"#,
        "uplink_upload_duration_seconds_count 1",
        r#"uplink_batches_published_total{outcome="confirmed"} 1"#,
        "uplink_publish_attempts_total 1",
        r#"uplink_upload_ops_total{op="PUT"} 1"#,
        "uplink_broker_up 1",
    ] {
        assert!(
            api_metrics.contains(needle),
            "api metrics lack {needle}:\n{api_metrics}"
        );
    }
    let (_, worker_metrics) = get(format!("{worker}/metrics")).await;
    for needle in [
        r#"uplink_worker_batches_total{outcome="applied"} 1"#,
        "uplink_worker_ops_applied_total 1",
        "uplink_worker_apply_attempts_total 1",
        "uplink_worker_apply_duration_seconds_count 1",
        "uplink_worker_broker_up 1",
        "uplink_worker_mongo_up 1",
    ] {
        assert!(
            worker_metrics.contains(needle),
            "worker metrics lack {needle}:\n{worker_metrics}"
        );
    }
    stack.finish().await;
}
