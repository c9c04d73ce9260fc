//! `/token` in each authentication mode: who may get a token, and for which user.

use jsonwebtoken::{Algorithm, EncodingKey};
use reqwest::StatusCode;
use serde_json::json;

use crate::support::*;

const OK: StatusCode = StatusCode::OK;
const UNAUTHORIZED: StatusCode = StatusCode::UNAUTHORIZED;

/// The `sub` of the PowerSync token in a 200 answer, checked with uplink's own verifier.
fn issued_subject(api: &TestApi, answer: &Answer) -> String {
    assert_eq!(answer.status, OK, "{}", answer.body);
    assert_eq!(answer.body["powersync_url"], POWERSYNC_URL);
    let token = answer.body["token"].as_str().expect("token");
    api.state.tokens.verify(token).expect("uplink's token verifies").sub
}

#[tokio::test]
async fn open_mode_in_development_issues_a_token_for_the_named_user() {
    // Arrange
    let api = spawn_api(with(base_env(), &[("UPLINK_DEV", "1"), ("UPLINK_TOKEN_AUTH", "open")])).await;

    // Act
    let named = api.get_token("?user_id=alice", None).await;
    let unnamed = api.get_token("", None).await;

    // Assert
    assert_eq!(issued_subject(&api, &named), "alice");
    assert_eq!(unnamed.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn shared_secret_mode_issues_tokens_only_to_holders_of_the_secret() {
    // Arrange
    let api = spawn_api(base_env()).await;
    let almost = &SHARED_SECRET[..SHARED_SECRET.len() - 1];
    let cases = vec![
        case("the right secret", Some(bearer(SHARED_SECRET)), OK),
        case(
            "the right secret with the `Token` scheme",
            Some(format!("Token {SHARED_SECRET}")),
            OK,
        ),
        case("no Authorization header", None, UNAUTHORIZED),
        case(
            "a wrong secret",
            Some(bearer("an-entirely-different-secret-of-length")),
            UNAUTHORIZED,
        ),
        case("a prefix of the secret", Some(bearer(almost)), UNAUTHORIZED),
        case(
            "the secret plus a byte",
            Some(bearer(&format!("{SHARED_SECRET}x"))),
            UNAUTHORIZED,
        ),
        case(
            "the secret with the Basic scheme",
            Some(format!("Basic {SHARED_SECRET}")),
            UNAUTHORIZED,
        ),
        case(
            "a token uplink issued",
            Some(bearer(&rs256(0, &uplink_claims()))),
            UNAUTHORIZED,
        ),
    ];

    // Act
    let mut results = Vec::new();
    for c in &cases {
        results.push((
            c,
            api.get_token("?user_id=bob", c.authorization.as_deref()).await.status,
        ));
    }
    let granted = api.get_token("?user_id=bob", Some(&bearer(SHARED_SECRET))).await;
    let no_user = api.get_token("", Some(&bearer(SHARED_SECRET))).await;

    // Assert
    let wrong = mismatches(&results);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(issued_subject(&api, &granted), "bob");
    assert_eq!(no_user.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn jwt_mode_issues_a_token_for_the_user_the_identity_provider_vouches_for() {
    // Arrange
    let idp = FakeIdp::start(vec![rsa_jwk(2), ec_jwk()]).await;
    let api = spawn_api(idp.env()).await;
    let rs = bearer(&rs256(2, &idp_claims()));
    let es = bearer(&sign_with(
        &ec_encoding_key(),
        Algorithm::ES256,
        Some(EC_KID),
        &idp_claims(),
    ));

    // Act
    let with_rsa = api.get_token("", Some(&rs)).await;
    let with_ec = api.get_token("", Some(&es)).await;
    let naming_themselves = api.get_token("?user_id=idp-user-7", Some(&rs)).await;
    let naming_someone_else = api.get_token("?user_id=alice", Some(&rs)).await;
    let issued = with_rsa.body["token"].as_str().unwrap_or_default().to_owned();
    let upload = api.upload(Some(&bearer(&issued)), &one_op_batch()).await;

    // Assert
    assert_eq!(issued_subject(&api, &with_rsa), "idp-user-7");
    assert_eq!(issued_subject(&api, &with_ec), "idp-user-7");
    assert_eq!(issued_subject(&api, &naming_themselves), "idp-user-7");
    assert_eq!(
        naming_someone_else.status,
        StatusCode::FORBIDDEN,
        "{}",
        naming_someone_else.body
    );
    assert_eq!(
        upload.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the issued token passes /upload's checks"
    );
}

#[tokio::test]
async fn jwt_mode_refuses_every_forged_or_misused_identity_token() {
    // Arrange
    let idp = FakeIdp::start(vec![rsa_jwk(2), ec_jwk()]).await;
    let api = spawn_api(idp.env()).await;
    let claims = idp_claims();
    let now = now();
    let kid = &rsa(2).kid;
    let valid = rs256(2, &claims);
    let with_claims = |patch: serde_json::Value| Some(bearer(&rs256(2, &patched(claims.clone(), patch))));
    let cases = vec![
        case("a valid token (control)", Some(bearer(&valid)), OK),
        case("no Authorization header", None, UNAUTHORIZED),
        case("a malformed token", Some(bearer("a.b")), UNAUTHORIZED),
        case(
            "alg none",
            Some(bearer(&unsigned(json!({"alg": "none", "kid": kid}), &claims))),
            UNAUTHORIZED,
        ),
        case(
            "HS256 keyed with the provider's public key (algorithm confusion)",
            Some(bearer(&sign_with(
                &EncodingKey::from_secret(&public_key_bytes(rsa(2))),
                Algorithm::HS256,
                Some(kid),
                &claims,
            ))),
            UNAUTHORIZED,
        ),
        case(
            "RS256 under the kid of an EC key (algorithm pinned per key)",
            Some(bearer(&sign_with(
                rsa(2).encoding_key(),
                Algorithm::RS256,
                Some(EC_KID),
                &claims,
            ))),
            UNAUTHORIZED,
        ),
        case(
            "PS256 with the right key",
            Some(bearer(&sign_with(
                rsa(2).encoding_key(),
                Algorithm::PS256,
                Some(kid),
                &claims,
            ))),
            UNAUTHORIZED,
        ),
        case(
            "an unknown kid",
            Some(bearer(&sign_with(
                rsa(2).encoding_key(),
                Algorithm::RS256,
                Some("nope"),
                &claims,
            ))),
            UNAUTHORIZED,
        ),
        case(
            "no kid",
            Some(bearer(&sign_with(
                rsa(2).encoding_key(),
                Algorithm::RS256,
                None,
                &claims,
            ))),
            UNAUTHORIZED,
        ),
        case(
            "signed by another key under the provider's kid",
            Some(bearer(&sign_with(
                rsa(4).encoding_key(),
                Algorithm::RS256,
                Some(kid),
                &claims,
            ))),
            UNAUTHORIZED,
        ),
        case(
            "the payload swapped for another user",
            Some(bearer(&with_payload(
                &valid,
                &patched(claims.clone(), json!({"sub": "alice"})),
            ))),
            UNAUTHORIZED,
        ),
        case(
            "expired",
            with_claims(json!({"iat": now - 7200, "exp": now - 3600})),
            UNAUTHORIZED,
        ),
        case(
            "not yet valid (nbf)",
            with_claims(json!({"nbf": now + 3600})),
            UNAUTHORIZED,
        ),
        case(
            "issued in the future (iat)",
            with_claims(json!({"iat": now + 3600, "exp": now + 7200})),
            UNAUTHORIZED,
        ),
        case("no exp", with_claims(json!({"exp": null})), UNAUTHORIZED),
        case(
            "a wrong audience",
            with_claims(json!({"aud": "another-app"})),
            UNAUTHORIZED,
        ),
        case(
            "an audience list without ours",
            with_claims(json!({"aud": ["a", "b"]})),
            UNAUTHORIZED,
        ),
        case(
            "an audience list with ours",
            with_claims(json!({"aud": ["a", IDP_AUDIENCE]})),
            OK,
        ),
        case("no audience", with_claims(json!({"aud": null})), UNAUTHORIZED),
        case(
            "a wrong issuer",
            with_claims(json!({"iss": "https://evil.example/"})),
            UNAUTHORIZED,
        ),
        case("no issuer", with_claims(json!({"iss": null})), UNAUTHORIZED),
        case("no sub", with_claims(json!({"sub": null})), UNAUTHORIZED),
        case("an empty sub", with_claims(json!({"sub": ""})), UNAUTHORIZED),
        case(
            "a sub that is an object",
            with_claims(json!({"sub": {"id": "x"}})),
            UNAUTHORIZED,
        ),
        case(
            "a PowerSync token uplink issued",
            Some(bearer(&rs256(0, &uplink_claims()))),
            UNAUTHORIZED,
        ),
    ];

    // Act
    let mut results = Vec::new();
    for c in &cases {
        results.push((c, api.get_token("", c.authorization.as_deref()).await.status));
    }

    // Assert
    let wrong = mismatches(&results);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn jwt_mode_refetches_the_jwks_when_the_identity_provider_rotates_its_key() {
    // Arrange
    let idp = FakeIdp::start(vec![rsa_jwk(2)]).await;
    let api = spawn_api(idp.env()).await;
    let old = bearer(&rs256(2, &idp_claims()));
    let new = bearer(&rs256(3, &idp_claims()));
    let before = api.get_token("", Some(&old)).await;
    let new_before_rotation = api.get_token("", Some(&new)).await;
    let fetches_before = idp.hits();

    // Act: the provider replaces key 2 with key 3.
    idp.set_keys(vec![rsa_jwk(3)]);
    let new_after_rotation = api.get_token("", Some(&new)).await;
    let old_after_rotation = api.get_token("", Some(&old)).await;

    // Assert
    assert_eq!(before.status, OK, "{}", before.body);
    assert_eq!(new_before_rotation.status, UNAUTHORIZED);
    assert_eq!(issued_subject(&api, &new_after_rotation), "idp-user-7");
    assert!(idp.hits() > fetches_before, "the unknown kid triggered a refetch");
    assert_eq!(
        old_after_rotation.status, UNAUTHORIZED,
        "the retired key no longer verifies"
    );
}

#[tokio::test]
async fn tokens_with_made_up_key_ids_do_not_make_uplink_hammer_the_identity_provider() {
    // Arrange
    let idp = FakeIdp::start(vec![rsa_jwk(2)]).await;
    let api = spawn_api(with(idp.env(), &[("UPLINK_TOKEN_JWKS_MIN_REFRESH_SECONDS", "60")])).await;
    let valid = api.get_token("", Some(&bearer(&rs256(2, &idp_claims())))).await;
    assert_eq!(valid.status, OK, "{}", valid.body);

    // Act
    let mut statuses = Vec::new();
    for i in 0..25 {
        let kid = format!("made-up-{i}");
        let token = sign_with(rsa(4).encoding_key(), Algorithm::RS256, Some(&kid), &idp_claims());
        statuses.push(api.get_token("", Some(&bearer(&token))).await.status);
    }

    // Assert: one fetch in all (start-up), however many unknown kids arrive.
    assert!(statuses.iter().all(|s| *s == UNAUTHORIZED), "{statuses:?}");
    assert_eq!(idp.hits(), 1);
}

#[tokio::test]
async fn jwt_mode_answers_503_while_the_identity_providers_keys_cannot_be_fetched() {
    // Arrange: the JWKS URL points at a port nothing listens on.
    let unreachable = format!("http://127.0.0.1:{}/jwks.json", closed_port());
    let env = with(
        base_env(),
        &[
            ("UPLINK_TOKEN_AUTH", "jwt"),
            ("UPLINK_TOKEN_JWKS_URL", &unreachable),
            ("UPLINK_TOKEN_JWT_ISSUER", IDP_ISSUER),
            ("UPLINK_TOKEN_JWT_AUDIENCE", IDP_AUDIENCE),
            ("UPLINK_TOKEN_JWKS_MIN_REFRESH_SECONDS", "0"),
            ("UPLINK_TOKEN_JWKS_TIMEOUT_SECONDS", "1"),
        ],
    );
    let api = spawn_api(env).await;

    // Act
    let answer = api.get_token("", Some(&bearer(&rs256(2, &idp_claims())))).await;

    // Assert: retrying can help, so the caller is told to retry rather than that it is refused.
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{}", answer.body);
    assert!(answer.retry_after.is_some());
}

#[tokio::test]
async fn jwt_mode_with_an_hs256_secret_accepts_only_hs256_tokens_made_with_that_secret() {
    // Arrange
    let api = spawn_api(hs256_env()).await;
    let claims = idp_claims();
    let cases = vec![
        case(
            "HS256 with the secret",
            Some(bearer(&hs256(IDP_HS256_SECRET, Algorithm::HS256, &claims))),
            OK,
        ),
        case(
            "HS256 with another secret",
            Some(bearer(&hs256(
                "another-secret-0123456789abcdef0123",
                Algorithm::HS256,
                &claims,
            ))),
            UNAUTHORIZED,
        ),
        case(
            "HS512 with the secret",
            Some(bearer(&hs256(IDP_HS256_SECRET, Algorithm::HS512, &claims))),
            UNAUTHORIZED,
        ),
        case(
            "RS256 from some RSA key",
            Some(bearer(&rs256(2, &claims))),
            UNAUTHORIZED,
        ),
        case(
            "alg none",
            Some(bearer(&unsigned(json!({"alg": "none"}), &claims))),
            UNAUTHORIZED,
        ),
        case(
            "expired",
            Some(bearer(&hs256(
                IDP_HS256_SECRET,
                Algorithm::HS256,
                &patched(claims.clone(), json!({"exp": now() - 3600})),
            ))),
            UNAUTHORIZED,
        ),
        case(
            "a wrong audience",
            Some(bearer(&hs256(
                IDP_HS256_SECRET,
                Algorithm::HS256,
                &patched(claims.clone(), json!({"aud": "x"})),
            ))),
            UNAUTHORIZED,
        ),
        case(
            "a wrong issuer",
            Some(bearer(&hs256(
                IDP_HS256_SECRET,
                Algorithm::HS256,
                &patched(claims.clone(), json!({"iss": "x"})),
            ))),
            UNAUTHORIZED,
        ),
    ];

    // Act
    let mut results = Vec::new();
    for c in &cases {
        results.push((c, api.get_token("", c.authorization.as_deref()).await.status));
    }
    let granted = api
        .get_token("", Some(&bearer(&hs256(IDP_HS256_SECRET, Algorithm::HS256, &claims))))
        .await;

    // Assert
    let wrong = mismatches(&results);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(issued_subject(&api, &granted), "idp-user-7");
}

#[tokio::test]
async fn the_user_claim_is_configurable() {
    // Arrange
    let claim = "https://example.com/uid";
    let api = spawn_api(with(hs256_env(), &[("UPLINK_TOKEN_USER_CLAIM", claim)])).await;
    let token = |patch: serde_json::Value| {
        bearer(&hs256(
            IDP_HS256_SECRET,
            Algorithm::HS256,
            &patched(idp_claims(), patch),
        ))
    };

    // Act
    let string_id = api
        .get_token("", Some(&token(json!({ claim: "user-from-claim" }))))
        .await;
    let numeric_id = api.get_token("", Some(&token(json!({ claim: 42 })))).await;
    let only_sub = api.get_token("", Some(&token(json!({})))).await;
    let query_disagrees = api
        .get_token("?user_id=idp-user-7", Some(&token(json!({ claim: "user-from-claim" }))))
        .await;

    // Assert
    assert_eq!(issued_subject(&api, &string_id), "user-from-claim");
    assert_eq!(issued_subject(&api, &numeric_id), "42");
    assert_eq!(
        only_sub.status, UNAUTHORIZED,
        "`sub` is not a fallback for the configured claim"
    );
    assert_eq!(query_disagrees.status, StatusCode::FORBIDDEN);
}
