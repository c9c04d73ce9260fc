//! Test harness: an in-process api on port 0 whose broker URL points at a closed port (so an
//! upload that gets past authentication and validation answers 503, proving it got that far),
//! a fake identity provider serving a JWKS the test can rotate, and token builders.

use std::net::TcpListener as StdListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uplink_api::config::ApiConfig;
use uplink_api::keys::SigningKey;
use uplink_api::{AppState, Application};
use uplink_common::config::Env;

pub const POWERSYNC_URL: &str = "https://ps.example";
pub const SHARED_SECRET: &str = "test-shared-secret-0123456789abcdef";
pub const IDP_ISSUER: &str = "https://idp.example/";
pub const IDP_AUDIENCE: &str = "uplink-app";
pub const IDP_HS256_SECRET: &str = "idp-hs256-secret-0123456789abcdef";

/// A P-256 key for ES256 identity tokens (a test fixture, never used elsewhere).
pub const EC_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgnSKov+TxDe+zI5lB
7QPN2ZFXGmCCF+kgEL1UmDVnTuOhRANCAASs0TDOaMZpltq9Hq/L8mt+G/F6L03I
SfXNGF7nzG4GUSotenIszu6vTp1m8UBEERM18I+dR4CD11UortwU/qpu
-----END PRIVATE KEY-----
";
pub const EC_KID: &str = "idp-ec-1";

/// RSA keys shared by all tests of this binary: generating 2048-bit keys is slow.
/// 0 and 1 are uplink signing keys (old and new during a rotation); 2 and 3 are the identity
/// provider's keys (before and after its rotation); 4 is an attacker's.
pub fn rsa(i: usize) -> &'static SigningKey {
    static KEYS: OnceLock<Vec<SigningKey>> = OnceLock::new();
    &KEYS.get_or_init(|| {
        (0..5)
            .map(|_| SigningKey::generate(2048).expect("generates a key"))
            .collect()
    })[i]
}

pub fn now() -> u64 {
    uplink_api::tokens::now_secs()
}

/// A port nothing listens on: the api's broker connection fails fast there.
pub fn closed_port() -> u16 {
    let listener = StdListener::bind("127.0.0.1:0").expect("binds");
    listener.local_addr().expect("addr").port()
}

/// The variables every test api needs: not development mode, uplink's key 0, a closed broker.
pub fn base_env() -> Env {
    Env::from_map([
        ("POWERSYNC_URL", POWERSYNC_URL.to_owned()),
        ("POWERSYNC_PRIVATE_KEY", rsa(0).private_env_value()),
        ("UPLINK_API_ADDR", "127.0.0.1:0".to_owned()),
        (
            "AMQP_URL",
            format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed_port()),
        ),
        ("UPLINK_TOKEN_AUTH", "shared-secret".to_owned()),
        ("UPLINK_TOKEN_SHARED_SECRET", SHARED_SECRET.to_owned()),
    ])
}

pub fn with(mut env: Env, vars: &[(&str, &str)]) -> Env {
    for (k, v) in vars {
        env.set(k, *v);
    }
    env
}

/// A running api; stops (with its broker supervisor and JWKS prefetch) when dropped.
pub struct TestApi {
    pub base: String,
    pub state: AppState,
    pub client: reqwest::Client,
    cancel: CancellationToken,
}

impl Drop for TestApi {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

pub async fn spawn_api(env: Env) -> TestApi {
    let config = ApiConfig::from_env(&env).expect("valid configuration");
    let cancel = CancellationToken::new();
    let app = Application::build(config, cancel.clone()).await.expect("builds");
    let base = format!("http://{}", app.local_addr());
    let state = app.state().clone();
    tokio::spawn(app.run_until_stopped());
    TestApi {
        base,
        state,
        client: reqwest::Client::new(),
        cancel,
    }
}

pub struct Answer {
    pub status: StatusCode,
    pub retry_after: Option<String>,
    pub body: Value,
}

impl TestApi {
    pub async fn get_token(&self, query: &str, authorization: Option<&str>) -> Answer {
        let mut request = self.client.get(format!("{}/token{query}", self.base));
        if let Some(a) = authorization {
            request = request.header("authorization", a);
        }
        answer(request.send().await.expect("request")).await
    }

    pub async fn upload(&self, authorization: Option<&str>, body: &Value) -> Answer {
        let mut request = self.client.post(format!("{}/upload", self.base)).json(body);
        if let Some(a) = authorization {
            request = request.header("authorization", a);
        }
        answer(request.send().await.expect("request")).await
    }

    pub async fn jwks_kids(&self) -> Vec<String> {
        let body: Value = self
            .client
            .get(format!("{}/jwks", self.base))
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json");
        body["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .map(|k| k["kid"].as_str().expect("kid").to_owned())
            .collect()
    }
}

async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer {
        status,
        retry_after,
        body,
    }
}

/// A one-op batch: with no broker, an upload that passes authentication and validation
/// answers 503 (an empty batch would answer 200 without publishing and prove less).
pub fn one_op_batch() -> Value {
    json!({"batch": [{"op": "PUT", "table": "todos", "id": "t1", "data": {"title": "x"}}]})
}

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Claims of a valid uplink token for `alice`.
pub fn uplink_claims() -> Value {
    let now = now();
    json!({"sub": "alice", "aud": POWERSYNC_URL, "iat": now, "exp": now + 600})
}

/// Claims of a valid identity-provider token for `idp-user-7`.
pub fn idp_claims() -> Value {
    let now = now();
    json!({"sub": "idp-user-7", "iss": IDP_ISSUER, "aud": IDP_AUDIENCE, "iat": now, "exp": now + 600})
}

/// Patches `claims`: `null` values remove the claim.
pub fn patched(mut claims: Value, patch: Value) -> Value {
    let map = claims.as_object_mut().expect("object");
    for (k, v) in patch.as_object().expect("object") {
        if v.is_null() {
            map.remove(k);
        } else {
            map.insert(k.clone(), v.clone());
        }
    }
    claims
}

pub fn sign_with(encoding: &EncodingKey, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, encoding).expect("signs")
}

/// RS256 with RSA key `i`, under its own kid.
pub fn rs256(i: usize, claims: &Value) -> String {
    sign_with(rsa(i).encoding_key(), Algorithm::RS256, Some(&rsa(i).kid), claims)
}

/// A token with the given header and no signature (`alg: none` and friends).
pub fn unsigned(header: Value, claims: &Value) -> String {
    let encode = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).expect("json"));
    format!("{}.{}.", encode(&header), encode(claims))
}

/// The public key's bytes as an attacker would find them (the JWKS modulus): the classic
/// algorithm-confusion attack signs HS256 with these as the HMAC secret.
pub fn public_key_bytes(key: &SigningKey) -> Vec<u8> {
    let jwk = key.verifying_key().jwk();
    serde_json::to_vec(&jwk).expect("json")
}

/// Replaces the payload of a signed token, keeping header and signature.
pub fn with_payload(token: &str, claims: &Value) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("json"));
    parts.join(".")
}

pub fn ec_encoding_key() -> EncodingKey {
    EncodingKey::from_ec_pem(EC_PRIVATE_PEM.as_bytes()).expect("EC key")
}

/// The identity provider's JWKS entry for the EC fixture key.
pub fn ec_jwk() -> Value {
    let mut jwk = Jwk::from_encoding_key(&ec_encoding_key(), Algorithm::ES256).expect("jwk");
    jwk.common.key_id = Some(EC_KID.to_owned());
    serde_json::to_value(jwk).expect("json")
}

/// The identity provider's JWKS entry for RSA key `i`.
pub fn rsa_jwk(i: usize) -> Value {
    serde_json::to_value(rsa(i).verifying_key().jwk()).expect("json")
}

/// A fake identity provider: serves a JWKS the test can replace, and counts fetches.
pub struct FakeIdp {
    pub jwks_url: String,
    keys: Arc<Mutex<Value>>,
    hits: Arc<AtomicUsize>,
    cancel: CancellationToken,
}

#[derive(Clone)]
struct IdpState {
    keys: Arc<Mutex<Value>>,
    hits: Arc<AtomicUsize>,
}

impl FakeIdp {
    pub async fn start(keys: Vec<Value>) -> Self {
        let state = IdpState {
            keys: Arc::new(Mutex::new(json!({"keys": keys}))),
            hits: Arc::new(AtomicUsize::new(0)),
        };
        let router = Router::new()
            .route(
                "/.well-known/jwks.json",
                get(|State(s): State<IdpState>| async move {
                    s.hits.fetch_add(1, Ordering::SeqCst);
                    let body = s.keys.lock().expect("lock").clone();
                    Json(body)
                }),
            )
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let jwks_url = format!("http://{}/.well-known/jwks.json", listener.local_addr().expect("addr"));
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        });
        Self {
            jwks_url,
            keys: state.keys,
            hits: state.hits,
            cancel,
        }
    }

    /// Rotates: from now on the JWKS holds exactly these keys.
    pub fn set_keys(&self, keys: Vec<Value>) {
        *self.keys.lock().expect("lock") = json!({ "keys": keys });
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Environment for `jwt` mode against this provider. The refresh interval is zero so a
    /// rotation is picked up at once; the rate-limit test sets its own.
    pub fn env(&self) -> Env {
        with(
            base_env(),
            &[
                ("UPLINK_TOKEN_AUTH", "jwt"),
                ("UPLINK_TOKEN_JWKS_URL", &self.jwks_url),
                ("UPLINK_TOKEN_JWT_ISSUER", IDP_ISSUER),
                ("UPLINK_TOKEN_JWT_AUDIENCE", IDP_AUDIENCE),
                ("UPLINK_TOKEN_JWKS_MIN_REFRESH_SECONDS", "0"),
            ],
        )
    }
}

impl Drop for FakeIdp {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Environment for `jwt` mode with the HS256 secret instead of a JWKS.
pub fn hs256_env() -> Env {
    with(
        base_env(),
        &[
            ("UPLINK_TOKEN_AUTH", "jwt"),
            ("UPLINK_TOKEN_HS256_SECRET", IDP_HS256_SECRET),
            ("UPLINK_TOKEN_JWT_ISSUER", IDP_ISSUER),
            ("UPLINK_TOKEN_JWT_AUDIENCE", IDP_AUDIENCE),
        ],
    )
}

pub fn hs256(secret: &str, alg: Algorithm, claims: &Value) -> String {
    sign_with(&EncodingKey::from_secret(secret.as_bytes()), alg, None, claims)
}

/// One row of a table-driven test: what is sent and the status it must get.
pub struct Case {
    pub name: &'static str,
    pub authorization: Option<String>,
    pub expected: StatusCode,
}

pub fn case(name: &'static str, authorization: Option<String>, expected: StatusCode) -> Case {
    Case {
        name,
        authorization,
        expected,
    }
}

/// Formats every row whose status differs, so one run shows all failures at once.
pub fn mismatches(results: &[(&Case, StatusCode)]) -> Vec<String> {
    results
        .iter()
        .filter(|(c, got)| c.expected != *got)
        .map(|(c, got)| format!("{}: expected {}, got {}", c.name, c.expected, got))
        .collect()
}
