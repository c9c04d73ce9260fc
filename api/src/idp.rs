//! Verifying the identity provider's JWT that callers present to `/token` in `jwt` mode, so the
//! PowerSync token is minted for the user the provider vouches for, never for a user the caller
//! merely names.
//!
//! Keys come from the provider's JWKS (fetched over HTTPS, cached, refetched when a token names
//! an unknown `kid`, at most once per `jwks_min_refresh`) or from a shared HS256 secret. The
//! algorithm is pinned by the key, never taken from the token: RS256 for RSA keys, ES256 for
//! P-256 keys, HS256 for the secret. That closes `alg: none` and HMAC-keyed-with-a-public-key.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use secrecy::ExposeSecret;
use serde_json::{Map, Value};
use tokio::sync::{Mutex, RwLock};
use tokio::time::Instant;

use crate::config::{IdpKeys, JwtAuth};
use crate::keys::MIN_RSA_BITS;
use crate::tokens::now_secs;

/// Largest JWKS document read; real ones are a few kilobytes.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Why an identity token was refused. Logged in full; the caller only learns "unauthorized",
/// except for [`IdpError::KeysUnavailable`], which is ours to fix and worth retrying (503).
#[derive(Debug, thiserror::Error)]
pub enum IdpError {
    #[error("token is not a JWT: {0}")]
    Malformed(String),
    #[error("algorithm {0} is not accepted")]
    Algorithm(String),
    #[error("token has no key id (kid)")]
    NoKid,
    #[error("no key with id {0:?} in the identity provider's JWKS")]
    UnknownKid(String),
    #[error("token rejected: {0}")]
    Invalid(String),
    #[error("token issued in the future")]
    IssuedInFuture,
    #[error("claim {0:?} is missing or is not a non-empty string")]
    NoUser(String),
    #[error("the identity provider's keys could not be fetched: {0}")]
    KeysUnavailable(String),
}

/// Checks identity tokens for `/token`. Cheap to clone; clones share the key cache.
#[derive(Clone)]
pub struct IdpVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    issuer: String,
    audiences: Vec<String>,
    user_claim: String,
    leeway: Duration,
    keys: KeySource,
}

enum KeySource {
    Hs256(Arc<IdpKey>),
    Jwks(Box<JwksCache>),
}

impl IdpVerifier {
    pub fn new(auth: &JwtAuth, leeway: Duration) -> Result<Self, reqwest::Error> {
        let keys = match &auth.keys {
            IdpKeys::Hs256(secret) => KeySource::Hs256(Arc::new(IdpKey {
                alg: Algorithm::HS256,
                decoding: DecodingKey::from_secret(secret.expose_secret().as_bytes()),
            })),
            IdpKeys::Jwks(url) => KeySource::Jwks(Box::new(JwksCache::new(url.clone(), auth)?)),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                issuer: auth.issuer.clone(),
                audiences: auth.audiences.clone(),
                user_claim: auth.user_claim.clone(),
                leeway,
                keys,
            }),
        })
    }

    /// Fetches the JWKS once, so a wrong URL shows in the log at start-up and the first caller
    /// does not wait for the fetch. Failure is logged, not fatal: the provider may come up later.
    pub async fn prefetch(&self) {
        if let KeySource::Jwks(cache) = &self.inner.keys {
            cache.refresh().await;
        }
    }

    /// Verifies an identity token and returns the user it names.
    pub async fn verify(&self, token: &str) -> Result<String, IdpError> {
        let inner = &self.inner;
        let header = jsonwebtoken::decode_header(token).map_err(|e| IdpError::Malformed(e.to_string()))?;
        let key = match &inner.keys {
            KeySource::Hs256(key) => {
                if header.alg != Algorithm::HS256 {
                    return Err(IdpError::Algorithm(format!("{:?} (expected HS256)", header.alg)));
                }
                key.clone()
            }
            KeySource::Jwks(cache) => {
                // Checked before the kid lookup so that tokens which can never verify do not
                // trigger JWKS fetches.
                if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
                    return Err(IdpError::Algorithm(format!(
                        "{:?} (expected RS256 or ES256)",
                        header.alg
                    )));
                }
                let kid = header.kid.ok_or(IdpError::NoKid)?;
                let key = cache.key(&kid).await?;
                if key.alg != header.alg {
                    return Err(IdpError::Algorithm(format!("{:?} for a {:?} key", header.alg, key.alg)));
                }
                key
            }
        };

        let mut validation = Validation::new(key.alg);
        validation.set_audience(&inner.audiences);
        validation.set_issuer(&[&inner.issuer]);
        // jsonwebtoken only checks `iss`/`aud` when present; requiring them makes a token
        // without them fail instead of slipping through.
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = inner.leeway.as_secs();
        validation.validate_nbf = true;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, &validation)
            .map_err(|e| IdpError::Invalid(e.to_string()))?;
        let claims = data.claims;
        if claims
            .get("iat")
            .and_then(Value::as_f64)
            .is_some_and(|iat| iat > (now_secs() + inner.leeway.as_secs()) as f64)
        {
            return Err(IdpError::IssuedInFuture);
        }
        match claims.get(&inner.user_claim) {
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
            // Some providers use numeric user ids.
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
            _ => Err(IdpError::NoUser(inner.user_claim.clone())),
        }
    }
}

/// A provider key with the one algorithm it may verify.
struct IdpKey {
    alg: Algorithm,
    decoding: DecodingKey,
}

struct JwksCache {
    url: reqwest::Url,
    client: reqwest::Client,
    ttl: Duration,
    min_refresh: Duration,
    snapshot: RwLock<Snapshot>,
    /// Time of the last fetch attempt. Held across a fetch, so concurrent requests for an
    /// unknown kid wait for one fetch instead of starting their own.
    last_attempt: Mutex<Option<Instant>>,
}

#[derive(Default)]
struct Snapshot {
    keys: HashMap<String, Arc<IdpKey>>,
    fetched_at: Option<Instant>,
    last_error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("answered HTTP {0}")]
    Status(reqwest::StatusCode),
    #[error("document is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("not a JWKS document: {0}")]
    Json(#[from] serde_json::Error),
    #[error("holds no usable RS256 or ES256 signing key with a kid")]
    NoKeys,
}

#[derive(serde::Deserialize)]
struct RawJwks {
    keys: Vec<Value>,
}

impl JwksCache {
    fn new(url: reqwest::Url, auth: &JwtAuth) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(auth.jwks_timeout)
            .timeout(auth.jwks_timeout)
            // A JWKS should not move; a few redirects cover a CDN, more smells of a loop.
            .redirect(reqwest::redirect::Policy::limited(3))
            .user_agent(concat!("uplink-api/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            url,
            client,
            ttl: auth.jwks_cache_ttl,
            min_refresh: auth.jwks_min_refresh,
            snapshot: RwLock::new(Snapshot::default()),
            last_attempt: Mutex::new(None),
        })
    }

    async fn key(&self, kid: &str) -> Result<Arc<IdpKey>, IdpError> {
        {
            let snapshot = self.snapshot.read().await;
            let fresh = snapshot.fetched_at.is_some_and(|t| t.elapsed() < self.ttl);
            if let (true, Some(key)) = (fresh, snapshot.keys.get(kid)) {
                return Ok(key.clone());
            }
        }
        // An unknown kid may mean the provider rotated its keys; stale keys need a refetch.
        self.refresh().await;
        let snapshot = self.snapshot.read().await;
        match snapshot.keys.get(kid) {
            // A stale key still verifies when the provider is unreachable: an outage of the
            // provider should not lock out users whose keys have not changed.
            Some(key) => Ok(key.clone()),
            // The key may be new and the provider unreachable: retrying later can help.
            None if snapshot.fetched_at.is_none() || snapshot.last_error.is_some() => Err(IdpError::KeysUnavailable(
                snapshot
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "not fetched yet".to_owned()),
            )),
            None => Err(IdpError::UnknownKid(kid.to_owned())),
        }
    }

    /// Refetches the JWKS unless a fetch was attempted less than `min_refresh` ago.
    async fn refresh(&self) {
        let mut last_attempt = self.last_attempt.lock().await;
        if last_attempt.is_some_and(|t| t.elapsed() < self.min_refresh) {
            return;
        }
        *last_attempt = Some(Instant::now());
        let outcome = self.fetch().await;
        let mut snapshot = self.snapshot.write().await;
        match outcome {
            Ok(keys) => {
                tracing::info!(url = %self.url, kids = ?keys.keys().collect::<Vec<_>>(), "fetched the identity provider's JWKS");
                snapshot.keys = keys;
                snapshot.fetched_at = Some(Instant::now());
                snapshot.last_error = None;
            }
            Err(e) => {
                tracing::warn!(url = %self.url, error = %e, "cannot fetch the identity provider's JWKS; keeping the keys fetched before");
                snapshot.last_error = Some(e.to_string());
            }
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, Arc<IdpKey>>, FetchError> {
        let mut response = self.client.get(self.url.clone()).send().await?;
        if !response.status().is_success() {
            return Err(FetchError::Status(response.status()));
        }
        if response.content_length().is_some_and(|n| n > MAX_JWKS_BYTES as u64) {
            return Err(FetchError::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(FetchError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        let raw: RawJwks = serde_json::from_slice(&body)?;
        let keys: HashMap<String, Arc<IdpKey>> = raw
            .keys
            .into_iter()
            .filter_map(|value| match usable_key(value) {
                Ok(pair) => Some(pair),
                Err(reason) => {
                    tracing::debug!(reason, "skipping a JWKS entry");
                    None
                }
            })
            .collect();
        if keys.is_empty() {
            return Err(FetchError::NoKeys);
        }
        Ok(keys)
    }
}

/// Turns one JWKS entry into a key, or says why it is skipped. Providers list keys uplink
/// must not use (encryption keys, other algorithms); skipping them keeps the rest usable.
fn usable_key(value: Value) -> Result<(String, Arc<IdpKey>), String> {
    let jwk: Jwk = serde_json::from_value(value).map_err(|e| format!("unsupported JWK: {e}"))?;
    let kid = jwk.common.key_id.clone().ok_or("no kid")?;
    if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
        return Err(format!("{kid}: not a signing key"));
    }
    let (alg, key_alg) = match &jwk.algorithm {
        AlgorithmParameters::RSA(rsa) => {
            let modulus = URL_SAFE_NO_PAD
                .decode(rsa.n.trim_end_matches('='))
                .map_err(|e| format!("{kid}: bad modulus: {e}"))?;
            let bits = modulus.iter().skip_while(|b| **b == 0).count() * 8;
            if bits < MIN_RSA_BITS {
                return Err(format!("{kid}: RSA key of about {bits} bits is too short"));
            }
            (Algorithm::RS256, KeyAlgorithm::RS256)
        }
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            (Algorithm::ES256, KeyAlgorithm::ES256)
        }
        // Symmetric keys in a published JWKS would let anyone who reads it forge tokens.
        _ => return Err(format!("{kid}: only RSA and P-256 keys are used")),
    };
    if jwk.common.key_algorithm.is_some_and(|declared| declared != key_alg) {
        return Err(format!(
            "{kid}: declared for {:?}, uplink accepts {key_alg:?} only",
            jwk.common.key_algorithm
        ));
    }
    let decoding = DecodingKey::from_jwk(&jwk).map_err(|e| format!("{kid}: {e}"))?;
    Ok((kid, Arc::new(IdpKey { alg, decoding })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_rsa_and_p256_signing_keys_are_used() {
        let rsa = crate::keys::SigningKey::generate(2048)
            .expect("key")
            .verifying_key()
            .jwk();
        let rsa = serde_json::to_value(rsa).expect("json");
        assert!(usable_key(rsa.clone()).is_ok());

        let mut enc = rsa.clone();
        enc["use"] = json!("enc");
        let mut ps256 = rsa.clone();
        ps256["alg"] = json!("PS256");
        let mut no_kid = rsa.clone();
        no_kid.as_object_mut().expect("object").remove("kid");
        let oct = json!({"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"});
        let short = json!({"kty": "RSA", "n": URL_SAFE_NO_PAD.encode([0xffu8; 128]), "e": "AQAB", "kid": "short"});
        for (what, jwk) in [
            ("enc", enc),
            ("ps256", ps256),
            ("no kid", no_kid),
            ("oct", oct),
            ("short", short),
        ] {
            assert!(usable_key(jwk).is_err(), "{what} should be skipped");
        }
    }
}
