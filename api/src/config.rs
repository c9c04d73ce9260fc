//! The api's configuration, read once at start-up. A bad or missing value stops start-up with
//! a message naming the variable.
//!
//! Variables:
//! - `POWERSYNC_PRIVATE_KEY`: signing key, base64 of a private RSA JWK JSON or a PEM (required
//!   unless `UPLINK_DEV` is on, which then generates a temporary key and warns)
//! - `POWERSYNC_PUBLIC_KEY`: its public half; checked against the private key when given
//! - `UPLINK_PREVIOUS_PUBLIC_KEYS`: previous public keys still accepted and listed in the JWKS
//!   during a rotation, separated by commas or whitespace
//! - `POWERSYNC_URL`: the PowerSync instance URL, the tokens' `aud` (required)
//! - `UPLINK_TOKEN_ISSUER`: the tokens' `iss` (optional)
//! - `UPLINK_TOKEN_LIFETIME_SECONDS`: token lifetime (default 3600, at most 86400)
//! - `UPLINK_CLOCK_LEEWAY_SECONDS`: clock tolerance when verifying tokens (default 30)
//! - `UPLINK_DEV`: development mode (open `/token`, generated keys)
//! - `UPLINK_TOKEN_AUTH`: who may ask `/token`: `shared-secret` or `jwt` (required outside
//!   development mode; development mode defaults to `open`)
//! - `UPLINK_TOKEN_SHARED_SECRET`: the secret for `shared-secret` mode (at least 32 bytes)
//! - `jwt` mode (the caller presents its identity provider's JWT as `Authorization: Bearer`):
//!   - `UPLINK_TOKEN_JWKS_URL`: the identity provider's JWKS (RS256 and ES256 keys; tokens must
//!     carry a `kid`); `https://` unless the host is loopback or development mode is on
//!   - `UPLINK_TOKEN_HS256_SECRET`: instead of a JWKS, the provider's HMAC secret (HS256 only,
//!     at least 32 bytes, used as raw bytes); set exactly one of the two
//!   - `UPLINK_TOKEN_JWT_ISSUER`: the `iss` the provider's tokens must carry (required)
//!   - `UPLINK_TOKEN_JWT_AUDIENCE`: the `aud` they must carry; a comma-separated list accepts
//!     any of them (required)
//!   - `UPLINK_TOKEN_USER_CLAIM`: the claim that names the user, which becomes the PowerSync
//!     token's `sub` (default `sub`); a `user_id` query parameter that disagrees gets 403
//!   - `UPLINK_TOKEN_JWKS_CACHE_SECONDS`: how long fetched keys are used before refetching
//!     (default 300; stale keys keep working while the provider is unreachable)
//!   - `UPLINK_TOKEN_JWKS_MIN_REFRESH_SECONDS`: least time between two fetches, whatever
//!     triggers them, so tokens with made-up key ids cannot make uplink hammer the provider
//!     (default 30)
//!   - `UPLINK_TOKEN_JWKS_TIMEOUT_SECONDS`: timeout of one JWKS fetch (default 5)
//! - `UPLINK_UPLOAD_AUTH`: `verify` (default) or `none` (development mode only)
//! - `UPLINK_API_ADDR`: listen address (default `0.0.0.0:8080`)
//! - `UPLINK_MAX_BODY_BYTES`, `UPLINK_MAX_OPS`, `UPLINK_MAX_ID_BYTES`, `UPLINK_MAX_DEPTH`:
//!   upload limits (defaults 4 MiB, 1000, 256, 32)
//! - `UPLINK_ALLOWED_COLLECTIONS`: collections clients may write to, comma-separated (default:
//!   any valid name); other collections get 422 naming the op and its `table`/`type` field
//! - `UPLINK_ACK_MODE`: `confirm` (default: `/upload` answers 200 once the broker confirmed the
//!   batch) or `apply` (once a worker committed it, for deployments on managed write
//!   checkpoints)
//! - `UPLINK_APPLY_TIMEOUT_SECONDS`: in `apply` mode, how long `/upload` waits for the commit
//!   before answering 503 (the batch stays queued; the retry is deduplicated) (default 10)
//! - `UPLINK_CONFIRM_TIMEOUT_SECONDS`: how long `/upload` waits for the broker's confirm
//!   before answering 503 (default 5)
//! - `UPLINK_RETRY_AFTER_SECONDS`: `Retry-After` on 503 answers (default 2)
//! - `UPLINK_REQUEST_TIMEOUT_SECONDS`: overall request timeout (default 30)
//! - `UPLINK_CORS_ORIGINS`: allowed browser origins, comma-separated, or `*` (default: none)
//! - plus the shared `AMQP_URL`, `UPLINK_QUEUE_PREFIX`, `UPLINK_PARTITIONS`,
//!   `UPLINK_DELIVERY_LIMIT` and `UPLINK_LOG_FORMAT`

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use uplink_common::config::{AmqpConfig, ConfigError, Env};
use uplink_common::{CollectionName, Limits};

use crate::keys::{KeySet, SigningKey, VerifyingKey};
use crate::tokens::MAX_TOKEN_LIFETIME;

/// Who may obtain a PowerSync token, and for which user.
#[derive(Clone)]
pub enum TokenAuth {
    /// Anyone, for any `user_id` (development mode only).
    Open,
    /// A trusted backend presents `Authorization: Bearer <secret>` and names the user.
    SharedSecret(SecretString),
    /// The caller presents its identity provider's JWT; the user is the one it names.
    Jwt(JwtAuth),
}

impl fmt::Debug for TokenAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenAuth::Open => f.write_str("Open"),
            TokenAuth::SharedSecret(_) => f.write_str("SharedSecret([redacted])"),
            TokenAuth::Jwt(jwt) => f.debug_tuple("Jwt").field(jwt).finish(),
        }
    }
}

/// How `jwt` mode checks the identity provider's tokens.
#[derive(Clone, Debug)]
pub struct JwtAuth {
    pub keys: IdpKeys,
    /// The `iss` every accepted token must carry.
    pub issuer: String,
    /// Accepted `aud` values; a token must name at least one.
    pub audiences: Vec<String>,
    /// The claim whose value becomes the PowerSync token's `sub`.
    pub user_claim: String,
    /// How long fetched JWKS keys are used before a refetch.
    pub jwks_cache_ttl: Duration,
    /// Least time between two JWKS fetches.
    pub jwks_min_refresh: Duration,
    /// Timeout of one JWKS fetch (connect included).
    pub jwks_timeout: Duration,
}

/// Where the identity provider's verification keys come from.
#[derive(Clone)]
pub enum IdpKeys {
    /// The provider's JWKS document (asymmetric keys: RS256, ES256).
    Jwks(reqwest::Url),
    /// A shared HMAC secret (HS256).
    Hs256(SecretString),
}

impl fmt::Debug for IdpKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdpKeys::Jwks(url) => f.debug_tuple("Jwks").field(&url.as_str()).finish(),
            IdpKeys::Hs256(_) => f.write_str("Hs256([redacted])"),
        }
    }
}

/// Shortest secret accepted for `shared-secret` and HS256: 256 bits, the HS256 key size.
const MIN_SECRET_BYTES: usize = 32;

/// When `/upload` answers 200.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckMode {
    /// Once the broker confirmed the batch (durably queued).
    Confirm,
    /// Once a worker committed the batch (its documents are readable).
    Apply,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadAuth {
    /// Require a valid token uplink issued; the batch belongs to its `sub`.
    Verify,
    /// No authentication; the user comes from `?user_id=` (development mode only).
    None,
}

#[derive(Clone, Debug)]
pub struct ApiConfig {
    pub addr: SocketAddr,
    pub keys: Arc<KeySet>,
    /// True when the signing key was generated at start-up (tokens die with the process).
    pub generated_key: bool,
    pub powersync_url: String,
    pub issuer: Option<String>,
    pub token_lifetime: Duration,
    pub clock_leeway: Duration,
    pub dev: bool,
    pub token_auth: TokenAuth,
    pub upload_auth: UploadAuth,
    pub amqp: AmqpConfig,
    pub limits: Limits,
    pub confirm_timeout: Duration,
    pub ack_mode: AckMode,
    pub apply_timeout: Duration,
    pub retry_after: Duration,
    pub request_timeout: Duration,
    pub cors_origins: Vec<String>,
}

impl ApiConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let dev = env.flag("UPLINK_DEV", false)?;

        let (signing, generated_key) = match env.get("POWERSYNC_PRIVATE_KEY") {
            Some(raw) => (
                SigningKey::parse(&raw).map_err(|e| ConfigError::new("POWERSYNC_PRIVATE_KEY", e.to_string()))?,
                false,
            ),
            None if dev => (
                SigningKey::generate(2048).map_err(|e| ConfigError::new("POWERSYNC_PRIVATE_KEY", e.to_string()))?,
                true,
            ),
            None => return Err(ConfigError::new(
                "POWERSYNC_PRIVATE_KEY",
                "is required (generate one with `uplink-api keys generate`, or set UPLINK_DEV=1 for a temporary key)",
            )),
        };
        let public = env
            .get("POWERSYNC_PUBLIC_KEY")
            .map(|raw| VerifyingKey::parse(&raw).map_err(|e| ConfigError::new("POWERSYNC_PUBLIC_KEY", e.to_string())))
            .transpose()?;
        let previous = env
            .get("UPLINK_PREVIOUS_PUBLIC_KEYS")
            .map(|raw| {
                raw.split(|c: char| c == ',' || c.is_whitespace())
                    .filter(|s| !s.is_empty())
                    .map(|k| {
                        VerifyingKey::parse(k)
                            .map_err(|e| ConfigError::new("UPLINK_PREVIOUS_PUBLIC_KEYS", e.to_string()))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        let keys = KeySet::new(signing, public, previous)
            .map_err(|e| ConfigError::new("POWERSYNC_PUBLIC_KEY", e.to_string()))?;

        let powersync_url = env.require("POWERSYNC_URL")?;
        if !(powersync_url.starts_with("http://") || powersync_url.starts_with("https://")) {
            return Err(ConfigError::new("POWERSYNC_URL", "must be an http:// or https:// URL"));
        }

        let token_lifetime = Duration::from_secs(env.parse_or("UPLINK_TOKEN_LIFETIME_SECONDS", 3600u64)?);
        if token_lifetime > MAX_TOKEN_LIFETIME || token_lifetime.is_zero() {
            return Err(ConfigError::new(
                "UPLINK_TOKEN_LIFETIME_SECONDS",
                "must be between 1 and 86400 (the PowerSync Service rejects longer-lived tokens)",
            ));
        }

        let token_auth = match env.get("UPLINK_TOKEN_AUTH").as_deref() {
            Some("shared-secret") => {
                let secret = env.secret("UPLINK_TOKEN_SHARED_SECRET").ok_or_else(|| {
                    ConfigError::new("UPLINK_TOKEN_SHARED_SECRET", "is required when UPLINK_TOKEN_AUTH=shared-secret")
                })?;
                if secret.expose_secret().len() < MIN_SECRET_BYTES {
                    return Err(ConfigError::new(
                        "UPLINK_TOKEN_SHARED_SECRET",
                        format!("must be at least {MIN_SECRET_BYTES} bytes long"),
                    ));
                }
                TokenAuth::SharedSecret(secret)
            }
            Some("jwt") => TokenAuth::Jwt(jwt_auth(env, dev)?),
            Some("open") if dev => TokenAuth::Open,
            Some("open") => {
                return Err(ConfigError::new("UPLINK_TOKEN_AUTH", "`open` is only allowed in development mode (UPLINK_DEV=1)"))
            }
            None if dev => TokenAuth::Open,
            None => {
                return Err(ConfigError::new(
                    "UPLINK_TOKEN_AUTH",
                    "is required outside development mode: set it to `shared-secret` (with UPLINK_TOKEN_SHARED_SECRET) or `jwt` (with UPLINK_TOKEN_JWKS_URL or UPLINK_TOKEN_HS256_SECRET, UPLINK_TOKEN_JWT_ISSUER and UPLINK_TOKEN_JWT_AUDIENCE), or set UPLINK_DEV=1 on a developer machine",
                ))
            }
            Some(other) => {
                return Err(ConfigError::new("UPLINK_TOKEN_AUTH", format!("unknown mode {other:?}; expected shared-secret or jwt")))
            }
        };

        let upload_auth = match env.get("UPLINK_UPLOAD_AUTH").as_deref() {
            None | Some("verify") => UploadAuth::Verify,
            Some("none") if dev => UploadAuth::None,
            Some("none") => {
                return Err(ConfigError::new(
                    "UPLINK_UPLOAD_AUTH",
                    "`none` is only allowed in development mode (UPLINK_DEV=1)",
                ))
            }
            Some(other) => {
                return Err(ConfigError::new(
                    "UPLINK_UPLOAD_AUTH",
                    format!("unknown mode {other:?}; expected verify or none"),
                ))
            }
        };

        let amqp = AmqpConfig::from_env(env)?;
        uplink_common::amqp::validate_url(&amqp.url).map_err(|e| ConfigError::new("AMQP_URL", e))?;

        let defaults = Limits::default();
        let limits = Limits {
            max_body_bytes: env.parse_or("UPLINK_MAX_BODY_BYTES", defaults.max_body_bytes)?,
            max_ops: env.parse_or("UPLINK_MAX_OPS", defaults.max_ops)?,
            max_id_bytes: env.parse_or("UPLINK_MAX_ID_BYTES", defaults.max_id_bytes)?,
            max_depth: env.parse_or("UPLINK_MAX_DEPTH", defaults.max_depth)?,
            max_field_name_bytes: defaults.max_field_name_bytes,
            allowed_collections: allowed_collections(env)?,
        };

        let addr: SocketAddr = env.parse_or("UPLINK_API_ADDR", SocketAddr::from(([0, 0, 0, 0], 8080)))?;
        let cors_origins = env.list("UPLINK_CORS_ORIGINS");

        Ok(Self {
            addr,
            keys: Arc::new(keys),
            generated_key,
            powersync_url,
            issuer: env.get("UPLINK_TOKEN_ISSUER"),
            token_lifetime,
            clock_leeway: Duration::from_secs(env.parse_or("UPLINK_CLOCK_LEEWAY_SECONDS", 30u64)?),
            dev,
            token_auth,
            upload_auth,
            amqp,
            limits,
            confirm_timeout: env.seconds_or("UPLINK_CONFIRM_TIMEOUT_SECONDS", Duration::from_secs(5))?,
            ack_mode: match env.get("UPLINK_ACK_MODE").as_deref() {
                None | Some("confirm") => AckMode::Confirm,
                Some("apply") => AckMode::Apply,
                Some(other) => {
                    return Err(ConfigError::new(
                        "UPLINK_ACK_MODE",
                        format!("expected confirm or apply, got {other:?}"),
                    ))
                }
            },
            apply_timeout: env.seconds_or("UPLINK_APPLY_TIMEOUT_SECONDS", Duration::from_secs(10))?,
            retry_after: env.seconds_or("UPLINK_RETRY_AFTER_SECONDS", Duration::from_secs(2))?,
            request_timeout: env.seconds_or("UPLINK_REQUEST_TIMEOUT_SECONDS", Duration::from_secs(30))?,
            cors_origins,
        })
    }
}

fn jwt_auth(env: &Env, dev: bool) -> Result<JwtAuth, ConfigError> {
    let keys = match (env.get("UPLINK_TOKEN_JWKS_URL"), env.secret("UPLINK_TOKEN_HS256_SECRET")) {
        (Some(raw), None) => IdpKeys::Jwks(jwks_url(&raw, dev)?),
        (None, Some(secret)) => {
            if secret.expose_secret().len() < MIN_SECRET_BYTES {
                return Err(ConfigError::new(
                    "UPLINK_TOKEN_HS256_SECRET",
                    format!("must be at least {MIN_SECRET_BYTES} bytes long"),
                ));
            }
            IdpKeys::Hs256(secret)
        }
        // Accepting both would let a leaked HMAC secret forge tokens even for deployments
        // that believe they trust only the provider's asymmetric keys.
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                "UPLINK_TOKEN_HS256_SECRET",
                "set either UPLINK_TOKEN_JWKS_URL or UPLINK_TOKEN_HS256_SECRET, not both",
            ))
        }
        (None, None) => {
            return Err(ConfigError::new(
                "UPLINK_TOKEN_JWKS_URL",
                "UPLINK_TOKEN_AUTH=jwt needs the identity provider's keys: set UPLINK_TOKEN_JWKS_URL (or UPLINK_TOKEN_HS256_SECRET)",
            ))
        }
    };
    let issuer = env.get("UPLINK_TOKEN_JWT_ISSUER").ok_or_else(|| {
        ConfigError::new(
            "UPLINK_TOKEN_JWT_ISSUER",
            "is required when UPLINK_TOKEN_AUTH=jwt (the `iss` of your identity provider's tokens)",
        )
    })?;
    let audiences = env.list("UPLINK_TOKEN_JWT_AUDIENCE");
    if audiences.is_empty() {
        return Err(ConfigError::new(
            "UPLINK_TOKEN_JWT_AUDIENCE",
            "is required when UPLINK_TOKEN_AUTH=jwt (the `aud` your identity provider puts in tokens meant for this app)",
        ));
    }
    let user_claim = env
        .get("UPLINK_TOKEN_USER_CLAIM")
        .unwrap_or_else(|| "sub".to_owned())
        .trim()
        .to_owned();
    let jwks_timeout = env.seconds_or("UPLINK_TOKEN_JWKS_TIMEOUT_SECONDS", Duration::from_secs(5))?;
    if jwks_timeout.is_zero() {
        return Err(ConfigError::new(
            "UPLINK_TOKEN_JWKS_TIMEOUT_SECONDS",
            "must be above zero",
        ));
    }
    Ok(JwtAuth {
        keys,
        issuer,
        audiences,
        user_claim,
        jwks_cache_ttl: env.seconds_or("UPLINK_TOKEN_JWKS_CACHE_SECONDS", Duration::from_secs(300))?,
        jwks_min_refresh: env.seconds_or("UPLINK_TOKEN_JWKS_MIN_REFRESH_SECONDS", Duration::from_secs(30))?,
        jwks_timeout,
    })
}

/// The JWKS URL must be `https://`: whoever can alter the document can mint identities.
/// Plain HTTP is allowed for loopback (a sidecar, tests) and in development mode.
fn jwks_url(raw: &str, dev: bool) -> Result<reqwest::Url, ConfigError> {
    let url = reqwest::Url::parse(raw.trim())
        .map_err(|e| ConfigError::new("UPLINK_TOKEN_JWKS_URL", format!("is not a URL: {e}")))?;
    let loopback = url.host_str().is_some_and(|host| {
        host.eq_ignore_ascii_case("localhost")
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    });
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback || dev => Ok(url),
        "http" => Err(ConfigError::new(
            "UPLINK_TOKEN_JWKS_URL",
            "must be an https:// URL (plain http is only allowed for loopback hosts or with UPLINK_DEV=1)",
        )),
        other => Err(ConfigError::new(
            "UPLINK_TOKEN_JWKS_URL",
            format!("unsupported scheme {other:?}; use https://"),
        )),
    }
}

fn allowed_collections(env: &Env) -> Result<Option<BTreeSet<String>>, ConfigError> {
    let Some(raw) = env.get("UPLINK_ALLOWED_COLLECTIONS") else {
        return Ok(None);
    };
    let names = raw
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|name| {
            CollectionName::parse(name)
                .map(|c| c.as_str().to_owned())
                .map_err(|e| ConfigError::new("UPLINK_ALLOWED_COLLECTIONS", format!("collection {name:?} {e}")))
        })
        .collect::<Result<BTreeSet<_>, _>>()?;
    if names.is_empty() {
        return Err(ConfigError::new(
            "UPLINK_ALLOWED_COLLECTIONS",
            "lists no collection; unset it to allow any",
        ));
    }
    Ok(Some(names))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Env {
        Env::from_map([("POWERSYNC_URL", "https://ps.example"), ("UPLINK_DEV", "1")])
    }

    #[test]
    fn development_mode_generates_a_key_and_opens_the_token_endpoint() {
        let cfg = ApiConfig::from_env(&base()).expect("valid");
        assert!(cfg.generated_key);
        assert!(matches!(cfg.token_auth, TokenAuth::Open));
        assert_eq!(cfg.upload_auth, UploadAuth::Verify);
    }

    #[test]
    fn outside_development_mode_a_key_and_a_token_auth_mode_are_required() {
        let err = ApiConfig::from_env(&Env::from_map([("POWERSYNC_URL", "https://ps.example")])).expect_err("no key");
        assert_eq!(err.var, "POWERSYNC_PRIVATE_KEY");
        let key = SigningKey::generate(2048).expect("key");
        let env = Env::from_map([
            ("POWERSYNC_URL", "https://ps.example"),
            ("POWERSYNC_PRIVATE_KEY", key.private_env_value().as_str()),
        ]);
        let err = ApiConfig::from_env(&env).expect_err("no auth mode");
        assert_eq!(err.var, "UPLINK_TOKEN_AUTH");
        let mut env = env;
        env.set("UPLINK_TOKEN_AUTH", "shared-secret");
        assert_eq!(
            ApiConfig::from_env(&env).expect_err("no secret").var,
            "UPLINK_TOKEN_SHARED_SECRET"
        );
        env.set("UPLINK_TOKEN_SHARED_SECRET", "0123456789abcdef0123456789abcdef");
        let cfg = ApiConfig::from_env(&env).expect("valid");
        assert!(!format!("{cfg:?}").contains("0123456789abcdef"));
        env.set("UPLINK_UPLOAD_AUTH", "none");
        assert_eq!(
            ApiConfig::from_env(&env).expect_err("none needs dev").var,
            "UPLINK_UPLOAD_AUTH"
        );
    }

    #[test]
    fn token_lifetime_above_a_day_is_refused() {
        let mut env = base();
        env.set("UPLINK_TOKEN_LIFETIME_SECONDS", "86401");
        assert_eq!(
            ApiConfig::from_env(&env).expect_err("too long").var,
            "UPLINK_TOKEN_LIFETIME_SECONDS"
        );
        env.set("UPLINK_TOKEN_LIFETIME_SECONDS", "86400");
        assert!(ApiConfig::from_env(&env).is_ok());
    }
}
