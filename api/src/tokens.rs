//! Minting the PowerSync JWTs uplink hands out on `/token`, and verifying them on `/upload`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::keys::KeySet;

/// The PowerSync Service refuses tokens that live longer than a day.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(86_400);

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub aud: String,
    pub iat: u64,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

/// Why an upload's bearer token was refused. Each reason is logged; the client only learns
/// that it is unauthorised.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("missing Authorization header")]
    Missing,
    #[error("Authorization header is not `Bearer <token>` or `Token <token>`")]
    BadScheme,
    #[error("token is not a JWT: {0}")]
    Malformed(String),
    #[error("algorithm {0} is not accepted; tokens must be RS256")]
    Algorithm(String),
    #[error("unknown key id {0:?}")]
    UnknownKid(String),
    #[error("token has no key id")]
    NoKid,
    #[error("token rejected: {0}")]
    Invalid(String),
    #[error("token issued in the future")]
    IssuedInFuture,
    #[error("token has an empty subject")]
    EmptySubject,
}

#[derive(Clone)]
pub struct TokenService {
    keys: Arc<KeySet>,
    audience: String,
    issuer: Option<String>,
    lifetime: Duration,
    leeway: Duration,
}

impl TokenService {
    pub fn new(
        keys: Arc<KeySet>,
        audience: String,
        issuer: Option<String>,
        lifetime: Duration,
        leeway: Duration,
    ) -> Self {
        Self {
            keys,
            audience,
            issuer,
            lifetime,
            leeway,
        }
    }

    pub fn keys(&self) -> &KeySet {
        &self.keys
    }

    /// A signed token for `user_id`, and its expiry (seconds since the epoch).
    pub fn issue(&self, user_id: &str) -> Result<(String, u64), jsonwebtoken::errors::Error> {
        let now = now_secs();
        let claims = Claims {
            sub: user_id.to_owned(),
            aud: self.audience.clone(),
            iat: now,
            exp: now + self.lifetime.as_secs(),
            iss: self.issuer.clone(),
        };
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.keys.signing.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, self.keys.signing.encoding_key())?;
        Ok((token, claims.exp))
    }

    /// Verifies a token uplink issued: RS256 only (no `none`, no HMAC keyed with a public
    /// key), signed by a key in the current key set, for our audience, within its lifetime.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        if header.alg != Algorithm::RS256 {
            return Err(TokenError::Algorithm(format!("{:?}", header.alg)));
        }
        let kid = header.kid.ok_or(TokenError::NoKid)?;
        let key = self
            .keys
            .verifying_keys()
            .into_iter()
            .find(|k| k.kid == kid)
            .ok_or(TokenError::UnknownKid(kid))?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[&self.audience]);
        // jsonwebtoken checks `iss` only when the token carries one, so a configured issuer
        // must also be a required claim or a token without `iss` would pass.
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            validation.set_required_spec_claims(&["exp", "sub", "aud", "iat", "iss"]);
        } else {
            validation.set_required_spec_claims(&["exp", "sub", "aud", "iat"]);
        }
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        let data = jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        let claims = data.claims;
        if claims.iat > now_secs() + self.leeway.as_secs() {
            return Err(TokenError::IssuedInFuture);
        }
        if claims.sub.is_empty() {
            return Err(TokenError::EmptySubject);
        }
        Ok(claims)
    }
}

/// The token in an `Authorization: Bearer <t>` (or `Token <t>`, as the PowerSync Service
/// accepts) header value.
pub fn bearer(header: Option<&str>) -> Result<&str, TokenError> {
    let value = header.ok_or(TokenError::Missing)?.trim();
    let (scheme, token) = value.split_once(' ').ok_or(TokenError::BadScheme)?;
    if !(scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token")) {
        return Err(TokenError::BadScheme);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(TokenError::BadScheme);
    }
    Ok(token)
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningKey;

    fn service(keys: KeySet) -> TokenService {
        TokenService::new(
            Arc::new(keys),
            "https://ps.example".into(),
            None,
            Duration::from_secs(600),
            Duration::from_secs(30),
        )
    }

    #[test]
    fn an_issued_token_verifies_and_names_the_user() {
        let svc = service(KeySet::new(SigningKey::generate(2048).expect("key"), None, vec![]).expect("set"));
        let (token, exp) = svc.issue("user-1").expect("signs");
        let claims = svc.verify(&token).expect("verifies");
        assert_eq!(claims.sub, "user-1");
        assert_eq!(claims.exp, exp);
        assert_eq!(claims.exp - claims.iat, 600);
    }

    #[test]
    fn bearer_and_token_schemes_are_accepted() {
        assert_eq!(bearer(Some("Bearer abc")), Ok("abc"));
        assert_eq!(bearer(Some("token abc")), Ok("abc"));
        assert_eq!(bearer(Some("Basic abc")), Err(TokenError::BadScheme));
        assert_eq!(bearer(Some("Bearer ")), Err(TokenError::BadScheme));
        assert_eq!(bearer(None), Err(TokenError::Missing));
    }
}
