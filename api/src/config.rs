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
//! - `UPLINK_TOKEN_AUTH`: who may ask `/token`: `shared-secret` (required outside development
//!   mode; development mode defaults to `open`)
//! - `UPLINK_TOKEN_SHARED_SECRET`: the secret for `shared-secret` mode (at least 32 bytes)
//! - `UPLINK_UPLOAD_AUTH`: `verify` (default) or `none` (development mode only)
//! - `UPLINK_API_ADDR`: listen address (default `0.0.0.0:8080`)
//! - `UPLINK_MAX_BODY_BYTES`, `UPLINK_MAX_OPS`, `UPLINK_MAX_ID_BYTES`, `UPLINK_MAX_DEPTH`:
//!   upload limits (defaults 4 MiB, 1000, 256, 32)
//! - `UPLINK_CONFIRM_TIMEOUT_SECONDS`: how long `/upload` waits for the broker's confirm
//!   before answering 503 (default 5)
//! - `UPLINK_RETRY_AFTER_SECONDS`: `Retry-After` on 503 answers (default 2)
//! - `UPLINK_REQUEST_TIMEOUT_SECONDS`: overall request timeout (default 30)
//! - `UPLINK_CORS_ORIGINS`: allowed browser origins, comma-separated, or `*` (default: none)
//! - plus the shared `AMQP_URL`, `UPLINK_QUEUE_PREFIX`, `UPLINK_PARTITIONS`,
//!   `UPLINK_DELIVERY_LIMIT` and `UPLINK_LOG_FORMAT`

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use uplink_common::config::{AmqpConfig, ConfigError, Env};
use uplink_common::Limits;

use crate::keys::{KeySet, SigningKey, VerifyingKey};
use crate::tokens::MAX_TOKEN_LIFETIME;

/// Who may obtain a PowerSync token, and for which user.
#[derive(Clone)]
pub enum TokenAuth {
    /// Anyone, for any `user_id` (development mode only).
    Open,
    /// A trusted backend presents `Authorization: Bearer <secret>` and names the user.
    SharedSecret(SecretString),
}

impl fmt::Debug for TokenAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenAuth::Open => f.write_str("Open"),
            TokenAuth::SharedSecret(_) => f.write_str("SharedSecret([redacted])"),
        }
    }
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
            None => {
                return Err(ConfigError::new(
                    "POWERSYNC_PRIVATE_KEY",
                    "is required (generate one with `uplink-api keys generate`, or set UPLINK_DEV=1 for a temporary key)",
                ))
            }
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
                    .map(|k| VerifyingKey::parse(k).map_err(|e| ConfigError::new("UPLINK_PREVIOUS_PUBLIC_KEYS", e.to_string())))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        let keys = KeySet::new(signing, public, previous).map_err(|e| ConfigError::new("POWERSYNC_PUBLIC_KEY", e.to_string()))?;

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
                if secret.expose_secret().len() < 32 {
                    return Err(ConfigError::new("UPLINK_TOKEN_SHARED_SECRET", "must be at least 32 bytes long"));
                }
                TokenAuth::SharedSecret(secret)
            }
            Some("open") if dev => TokenAuth::Open,
            Some("open") => {
                return Err(ConfigError::new("UPLINK_TOKEN_AUTH", "`open` is only allowed in development mode (UPLINK_DEV=1)"))
            }
            None if dev => TokenAuth::Open,
            None => {
                return Err(ConfigError::new(
                    "UPLINK_TOKEN_AUTH",
                    "is required outside development mode: set it to `shared-secret` (with UPLINK_TOKEN_SHARED_SECRET), or set UPLINK_DEV=1 on a developer machine",
                ))
            }
            Some(other) => {
                return Err(ConfigError::new("UPLINK_TOKEN_AUTH", format!("unknown mode {other:?}; expected shared-secret")))
            }
        };

        let upload_auth = match env.get("UPLINK_UPLOAD_AUTH").as_deref() {
            None | Some("verify") => UploadAuth::Verify,
            Some("none") if dev => UploadAuth::None,
            Some("none") => {
                return Err(ConfigError::new("UPLINK_UPLOAD_AUTH", "`none` is only allowed in development mode (UPLINK_DEV=1)"))
            }
            Some(other) => {
                return Err(ConfigError::new("UPLINK_UPLOAD_AUTH", format!("unknown mode {other:?}; expected verify or none")))
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
        };

        let addr: SocketAddr = env.parse_or("UPLINK_API_ADDR", SocketAddr::from(([0, 0, 0, 0], 8080)))?;
        let cors_origins = env
            .get("UPLINK_CORS_ORIGINS")
            .map(|raw| raw.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect())
            .unwrap_or_default();

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
            retry_after: env.seconds_or("UPLINK_RETRY_AFTER_SECONDS", Duration::from_secs(2))?,
            request_timeout: env.seconds_or("UPLINK_REQUEST_TIMEOUT_SECONDS", Duration::from_secs(30))?,
            cors_origins,
        })
    }
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
        let env = Env::from_map([("POWERSYNC_URL", "https://ps.example"), ("POWERSYNC_PRIVATE_KEY", key.private_env_value().as_str())]);
        let err = ApiConfig::from_env(&env).expect_err("no auth mode");
        assert_eq!(err.var, "UPLINK_TOKEN_AUTH");
        let mut env = env;
        env.set("UPLINK_TOKEN_AUTH", "shared-secret");
        assert_eq!(ApiConfig::from_env(&env).expect_err("no secret").var, "UPLINK_TOKEN_SHARED_SECRET");
        env.set("UPLINK_TOKEN_SHARED_SECRET", "0123456789abcdef0123456789abcdef");
        let cfg = ApiConfig::from_env(&env).expect("valid");
        assert!(!format!("{cfg:?}").contains("0123456789abcdef"));
        env.set("UPLINK_UPLOAD_AUTH", "none");
        assert_eq!(ApiConfig::from_env(&env).expect_err("none needs dev").var, "UPLINK_UPLOAD_AUTH");
    }

    #[test]
    fn token_lifetime_above_a_day_is_refused() {
        let mut env = base();
        env.set("UPLINK_TOKEN_LIFETIME_SECONDS", "86401");
        assert_eq!(ApiConfig::from_env(&env).expect_err("too long").var, "UPLINK_TOKEN_LIFETIME_SECONDS");
        env.set("UPLINK_TOKEN_LIFETIME_SECONDS", "86400");
        assert!(ApiConfig::from_env(&env).is_ok());
    }
}
