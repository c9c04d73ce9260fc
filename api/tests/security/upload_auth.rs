//! `/upload` accepts only tokens uplink issued: every forgery and misuse gets 401; a token that
//! passes gets as far as the (absent) broker and answers 503.

use std::time::Duration;

use base64::Engine;
use futures::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey};
use lapin::options::{BasicConsumeOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use reqwest::StatusCode;
use serde_json::json;
use uplink_common::Envelope;

use crate::support::*;

const UNAUTHORIZED: StatusCode = StatusCode::UNAUTHORIZED;
const PASSED: StatusCode = StatusCode::SERVICE_UNAVAILABLE;
const ISSUER: &str = "https://uplink.example";

#[tokio::test]
async fn every_forged_or_misused_upload_token_is_refused_and_a_valid_one_gets_through() {
    // Arrange: an api with an issuer configured, signing with key 0.
    let api = spawn_api(with(base_env(), &[("UPLINK_TOKEN_ISSUER", ISSUER)])).await;
    let claims = patched(uplink_claims(), json!({"iss": ISSUER}));
    let now = now();
    let kid = &rsa(0).kid;
    let valid = rs256(0, &claims);
    let cases = vec![
        case("a valid token", Some(bearer(&valid)), PASSED),
        case(
            "a valid token with the `Token` scheme",
            Some(format!("Token {valid}")),
            PASSED,
        ),
        case(
            "expired within the clock leeway",
            Some(bearer(&rs256(0, &patched(claims.clone(), json!({"exp": now - 5}))))),
            PASSED,
        ),
        case("no Authorization header", None, UNAUTHORIZED),
        case("an empty bearer", Some("Bearer ".into()), UNAUTHORIZED),
        case("the Basic scheme", Some(format!("Basic {valid}")), UNAUTHORIZED),
        case("a malformed token", Some(bearer("not-a-jwt")), UNAUTHORIZED),
        case("three garbage segments", Some(bearer("e30.e30.AAAA")), UNAUTHORIZED),
        case(
            "alg none, no signature",
            Some(bearer(&unsigned(
                json!({"alg": "none", "typ": "JWT", "kid": kid}),
                &claims,
            ))),
            UNAUTHORIZED,
        ),
        case(
            "alg none with the original signature kept",
            Some(bearer(&format!(
                "{}{}",
                unsigned(json!({"alg": "none", "kid": kid}), &claims),
                valid.rsplit('.').next().expect("sig")
            ))),
            UNAUTHORIZED,
        ),
        case(
            "HS256 keyed with the public key (algorithm confusion)",
            Some(bearer(&sign_with(
                &EncodingKey::from_secret(&public_key_bytes(rsa(0))),
                Algorithm::HS256,
                Some(kid),
                &claims,
            ))),
            UNAUTHORIZED,
        ),
        case(
            "RS512 with the right key (algorithm is pinned to RS256)",
            Some(bearer(&sign_with(
                rsa(0).encoding_key(),
                Algorithm::RS512,
                Some(kid),
                &claims,
            ))),
            UNAUTHORIZED,
        ),
        case(
            "an unknown kid",
            Some(bearer(&sign_with(
                rsa(0).encoding_key(),
                Algorithm::RS256,
                Some("powersync-0000000000"),
                &claims,
            ))),
            UNAUTHORIZED,
        ),
        case(
            "no kid",
            Some(bearer(&sign_with(
                rsa(0).encoding_key(),
                Algorithm::RS256,
                None,
                &claims,
            ))),
            UNAUTHORIZED,
        ),
        case(
            "signed by another key under our kid (wrong signature)",
            Some(bearer(&sign_with(
                rsa(4).encoding_key(),
                Algorithm::RS256,
                Some(kid),
                &claims,
            ))),
            UNAUTHORIZED,
        ),
        case(
            "a valid token whose payload was swapped for another user",
            Some(bearer(&with_payload(
                &valid,
                &patched(claims.clone(), json!({"sub": "mallory"})),
            ))),
            UNAUTHORIZED,
        ),
        case(
            "expired",
            Some(bearer(&rs256(
                0,
                &patched(claims.clone(), json!({"iat": now - 7200, "exp": now - 3600})),
            ))),
            UNAUTHORIZED,
        ),
        case(
            "not yet valid (nbf in the future)",
            Some(bearer(&rs256(0, &patched(claims.clone(), json!({"nbf": now + 3600}))))),
            UNAUTHORIZED,
        ),
        case(
            "issued far in the future (iat)",
            Some(bearer(&rs256(
                0,
                &patched(claims.clone(), json!({"iat": now + 3600, "exp": now + 7200})),
            ))),
            UNAUTHORIZED,
        ),
        case(
            "no exp",
            Some(bearer(&rs256(0, &patched(claims.clone(), json!({"exp": null}))))),
            UNAUTHORIZED,
        ),
        case(
            "a wrong aud",
            Some(bearer(&rs256(
                0,
                &patched(claims.clone(), json!({"aud": "https://other.example"})),
            ))),
            UNAUTHORIZED,
        ),
        case(
            "no aud",
            Some(bearer(&rs256(0, &patched(claims.clone(), json!({"aud": null}))))),
            UNAUTHORIZED,
        ),
        case(
            "a wrong issuer",
            Some(bearer(&rs256(
                0,
                &patched(claims.clone(), json!({"iss": "https://evil.example"})),
            ))),
            UNAUTHORIZED,
        ),
        case(
            "no issuer although one is configured",
            Some(bearer(&rs256(0, &uplink_claims()))),
            UNAUTHORIZED,
        ),
        case(
            "no sub",
            Some(bearer(&rs256(0, &patched(claims.clone(), json!({"sub": null}))))),
            UNAUTHORIZED,
        ),
        case(
            "an empty sub",
            Some(bearer(&rs256(0, &patched(claims.clone(), json!({"sub": ""}))))),
            UNAUTHORIZED,
        ),
        case(
            "a shared secret instead of a token",
            Some(bearer(SHARED_SECRET)),
            UNAUTHORIZED,
        ),
    ];

    // Act
    let mut results = Vec::new();
    for c in &cases {
        let answer = api.upload(c.authorization.as_deref(), &one_op_batch()).await;
        results.push((c, answer.status));
    }

    // Assert
    let wrong = mismatches(&results);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn a_refused_upload_token_gets_an_opaque_answer() {
    // Arrange
    let api = spawn_api(base_env()).await;
    let expired = rs256(0, &patched(uplink_claims(), json!({"exp": now() - 3600})));

    // Act
    let answer = api.upload(Some(&bearer(&expired)), &one_op_batch()).await;

    // Assert: the reason is logged, not told to a possibly hostile caller.
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.body["error"]["message"], "missing or invalid credentials");
    assert!(
        !answer.body.to_string().to_lowercase().contains("expired"),
        "{}",
        answer.body
    );
}

/// Follows the README's rotation runbook: publish the new key, switch to it, retire the old one.
#[tokio::test]
async fn a_token_from_the_previous_key_is_accepted_while_listed_and_refused_once_removed() {
    // Arrange: before the rotation the api signs with key 0 and has handed out a token.
    let (old_key, new_key) = (rsa(0), rsa(1));
    let before = spawn_api(base_env()).await;
    let old_token = token_of(&before.get_token("?user_id=alice", Some(&bearer(SHARED_SECRET))).await);
    // Step 1: still signing with the old key, the new public key is published.
    let publishing = spawn_api(with(
        base_env(),
        &[("UPLINK_PREVIOUS_PUBLIC_KEYS", &new_key.public_env_value())],
    ))
    .await;
    // Step 2: signing with the new key; the old public key, copied from the JWKS as the
    // runbook shows, stays listed.
    let old_jwk = serde_json::to_vec(&old_key.verifying_key().jwk()).expect("json");
    let old_public_from_jwks = base64::engine::general_purpose::STANDARD.encode(old_jwk);
    let new_signing = [
        ("POWERSYNC_PRIVATE_KEY", new_key.private_env_value()),
        ("POWERSYNC_PUBLIC_KEY", new_key.public_env_value()),
    ];
    let switched = spawn_api(with(
        base_env(),
        &[
            (new_signing[0].0, new_signing[0].1.as_str()),
            (new_signing[1].0, new_signing[1].1.as_str()),
            ("UPLINK_PREVIOUS_PUBLIC_KEYS", &old_public_from_jwks),
        ],
    ))
    .await;
    // Step 3: the old key is retired.
    let retired = spawn_api(with(
        base_env(),
        &[
            (new_signing[0].0, new_signing[0].1.as_str()),
            (new_signing[1].0, new_signing[1].1.as_str()),
        ],
    ))
    .await;

    // Act
    let new_token = token_of(&switched.get_token("?user_id=alice", Some(&bearer(SHARED_SECRET))).await);
    let old_while_listed = switched.upload(Some(&bearer(&old_token)), &one_op_batch()).await;
    let new_on_a_not_yet_switched_replica = publishing.upload(Some(&bearer(&new_token)), &one_op_batch()).await;
    let old_once_removed = retired.upload(Some(&bearer(&old_token)), &one_op_batch()).await;
    let new_once_removed = retired.upload(Some(&bearer(&new_token)), &one_op_batch()).await;

    // Assert
    assert_eq!(
        publishing.jwks_kids().await,
        vec![old_key.kid.clone(), new_key.kid.clone()]
    );
    assert_eq!(
        switched.jwks_kids().await,
        vec![new_key.kid.clone(), old_key.kid.clone()]
    );
    assert_eq!(retired.jwks_kids().await, vec![new_key.kid.clone()]);
    let header = jsonwebtoken::decode_header(&new_token).expect("header");
    assert_eq!(
        header.kid.as_deref(),
        Some(new_key.kid.as_str()),
        "new tokens are signed with the new key"
    );
    assert_eq!(old_while_listed.status, PASSED, "{}", old_while_listed.body);
    assert_eq!(
        new_on_a_not_yet_switched_replica.status, PASSED,
        "{}",
        new_on_a_not_yet_switched_replica.body
    );
    assert_eq!(old_once_removed.status, UNAUTHORIZED);
    assert_eq!(new_once_removed.status, PASSED);
}

fn token_of(answer: &Answer) -> String {
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    answer.body["token"].as_str().expect("token").to_owned()
}

#[tokio::test]
async fn uploads_to_a_collection_outside_the_allowlist_get_422_naming_the_op_and_field() {
    // Arrange
    let api = spawn_api(with(base_env(), &[("UPLINK_ALLOWED_COLLECTIONS", "todos, lists")])).await;
    let token = bearer(&rs256(0, &uplink_claims()));
    let allowed = json!({"batch": [
        {"op": "PUT", "table": "todos", "id": "1", "data": {"a": 1}},
        {"op": "DELETE", "type": "lists", "id": "2"},
    ]});
    let sdk_form = json!({"batch": [
        {"op": "PUT", "table": "todos", "id": "1", "data": {"a": 1}},
        {"op_id": 2, "op": "PATCH", "type": "users", "id": "u", "data": {"admin": true}},
    ]});
    let seed_form = json!({"batch": [{"op": "DELETE", "table": "secrets", "id": "1"}]});

    // Act
    let allowed = api.upload(Some(&token), &allowed).await;
    let sdk_form = api.upload(Some(&token), &sdk_form).await;
    let seed_form = api.upload(Some(&token), &seed_form).await;

    // Assert
    assert_eq!(allowed.status, PASSED, "{}", allowed.body);
    assert_eq!(sdk_form.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(sdk_form.body["error"]["op_index"], 1, "{}", sdk_form.body);
    assert_eq!(sdk_form.body["error"]["field"], "type", "{}", sdk_form.body);
    assert_eq!(seed_form.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(seed_form.body["error"]["op_index"], 0, "{}", seed_form.body);
    assert_eq!(seed_form.body["error"]["field"], "table", "{}", seed_form.body);
}

#[tokio::test]
async fn a_user_id_in_the_query_string_does_not_authenticate_an_upload() {
    // Arrange: `user_id` in the query is read only when upload auth is off (development mode).
    let api = spawn_api(base_env()).await;

    // Act
    let answer = api
        .client
        .post(format!("{}/upload?user_id=alice", api.base))
        .json(&one_op_batch())
        .send()
        .await
        .expect("request");

    // Assert
    assert_eq!(answer.status(), UNAUTHORIZED);
}

/// Publishes for real: the only test here that needs RabbitMQ (`AMQP_URL`, default
/// guest@127.0.0.1:5672). It uses its own queue prefix and deletes what it declared.
#[tokio::test]
async fn an_accepted_batch_is_attributed_to_the_token_subject_not_the_query_string() {
    // Arrange
    let amqp_url = std::env::var("AMQP_URL").unwrap_or_else(|_| uplink_common::config::DEFAULT_AMQP_URL.to_owned());
    let prefix = format!("uplink-api-test-{}", uuid::Uuid::now_v7().simple());
    let api = spawn_api(with(
        base_env(),
        &[
            ("AMQP_URL", &amqp_url),
            ("UPLINK_QUEUE_PREFIX", &prefix),
            ("UPLINK_PARTITIONS", "1"),
        ],
    ))
    .await;
    assert!(
        api.state.publisher.wait_ready(Duration::from_secs(15)).await,
        "RabbitMQ at {amqp_url} is not reachable"
    );
    let token = bearer(&rs256(0, &uplink_claims()));

    // Act
    let answer = api
        .client
        .post(format!("{}/upload?user_id=bob", api.base))
        .header("authorization", &token)
        .json(&one_op_batch())
        .send()
        .await
        .expect("request");
    let status = answer.status();
    let body: serde_json::Value = answer.json().await.expect("json");
    let topology = api.state.publisher.topology().clone();
    let connection = uplink_common::amqp::connect(&amqp_url.clone().into(), "uplink-api-test")
        .await
        .expect("connects");
    let channel = connection.create_channel().await.expect("channel");
    // Partition queues have a single active consumer, which rules out basic.get.
    let delivery = async {
        let mut consumer = channel
            .basic_consume(
                topology.partition_queue(0).as_str().into(),
                "uplink-api-test".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(Duration::from_secs(10), consumer.next()).await {
            Ok(Some(Ok(delivery))) => Ok(delivery),
            other => Err(format!("no delivery: {other:?}")),
        }
    }
    .await;
    // Clean up before asserting, so a failure does not leave queues behind. The consuming
    // channel goes first: RabbitMQ 3.10 crashes a channel that deletes a quorum queue it is
    // consuming from.
    drop(api);
    let _ = channel.close(200, "done".into()).await;
    let cleanup = connection.create_channel().await.expect("channel");
    let mut leftovers = Vec::new();
    for queue in [topology.partition_queue(0), topology.dead_queue()] {
        if let Err(e) = cleanup
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
        {
            leftovers.push(format!("queue {queue}: {e}"));
        }
    }
    for exchange in [topology.uploads_exchange(), topology.dead_exchange()] {
        if let Err(e) = cleanup
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
        {
            leftovers.push(format!("exchange {exchange}: {e}"));
        }
    }
    let _ = connection.close(200, "done".into()).await;

    // Assert
    assert_eq!(status, StatusCode::OK, "{body}");
    let delivery = delivery.expect("the batch is in the partition queue");
    let envelope = Envelope::from_slice(&delivery.data).expect("an envelope");
    assert_eq!(envelope.batch().user_id, "alice");
    assert_eq!(
        envelope.batch().batch_id.to_string(),
        body["batch_id"].as_str().expect("batch_id")
    );
    let header = uplink_common::amqp::header_str(delivery.properties.headers().as_ref(), "x-uplink-user-id");
    assert_eq!(header.as_deref(), Some("alice"));
    assert!(leftovers.is_empty(), "cleanup failed: {leftovers:?}");
}
