//! Reading configuration from the environment. Each binary builds one typed config struct at
//! start-up through an [`Env`]; a bad value fails start-up with a message naming the variable.
//!
//! Variables read here (shared by api and worker):
//! - `AMQP_URL`: RabbitMQ URL (default `amqp://guest:guest@127.0.0.1:5672/%2f`)
//! - `UPLINK_QUEUE_PREFIX`: prefix of every exchange and queue (default `uplink`)
//! - `UPLINK_PARTITIONS`: number of partition queues, fixed per deployment (default `8`)
//! - `UPLINK_DELIVERY_LIMIT`: deliveries before the broker dead-letters a batch (default `20`)

use std::collections::HashMap;
use std::fmt::Display;
use std::str::FromStr;

use secrecy::SecretString;

/// A configuration value that is missing or does not parse. The message names the variable.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    pub var: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(var: &str, message: impl Into<String>) -> Self {
        Self {
            var: var.to_owned(),
            message: message.into(),
        }
    }
}

/// Where configuration comes from: the process environment in production, a map in tests
/// (mutating the real environment from concurrent tests is racy).
#[derive(Clone, Default)]
pub struct Env {
    overrides: Option<HashMap<String, String>>,
}

impl Env {
    /// The process environment.
    pub fn process() -> Self {
        Self { overrides: None }
    }

    /// Only the given variables; the process environment is not consulted.
    pub fn from_map<K: Into<String>, V: Into<String>>(vars: impl IntoIterator<Item = (K, V)>) -> Self {
        Self {
            overrides: Some(vars.into_iter().map(|(k, v)| (k.into(), v.into())).collect()),
        }
    }

    /// Sets one variable (only meaningful for map-backed environments).
    pub fn set(&mut self, key: &str, value: impl Into<String>) -> &mut Self {
        self.overrides
            .get_or_insert_with(HashMap::new)
            .insert(key.to_owned(), value.into());
        self
    }

    /// The variable's value, treating an empty value as unset.
    pub fn get(&self, key: &str) -> Option<String> {
        let value = match &self.overrides {
            Some(map) => map.get(key).cloned(),
            None => std::env::var(key).ok(),
        };
        value.filter(|v| !v.trim().is_empty())
    }

    pub fn require(&self, key: &str) -> Result<String, ConfigError> {
        self.get(key)
            .ok_or_else(|| ConfigError::new(key, "is required but not set"))
    }

    pub fn secret(&self, key: &str) -> Option<SecretString> {
        self.get(key).map(SecretString::from)
    }

    /// A comma-separated list, trimmed, without empty items (empty when unset).
    pub fn list(&self, key: &str) -> Vec<String> {
        self.get(key)
            .map(|raw| {
                raw.split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Parses the variable, or returns `default` when it is unset.
    pub fn parse_or<T>(&self, key: &str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        match self.get(key) {
            None => Ok(default),
            Some(raw) => raw
                .trim()
                .parse()
                .map_err(|e| ConfigError::new(key, format!("cannot parse {raw:?}: {e}"))),
        }
    }

    /// `1`/`true`/`yes`/`on` or `0`/`false`/`no`/`off`, case-insensitive.
    pub fn flag(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(raw) => match raw.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" => Ok(false),
                _ => Err(ConfigError::new(
                    key,
                    format!("expected 1/true/yes/on or 0/false/no/off, got {raw:?}"),
                )),
            },
        }
    }

    /// A duration given in (possibly fractional) seconds.
    pub fn seconds_or(&self, key: &str, default: std::time::Duration) -> Result<std::time::Duration, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(raw) => {
                let secs: f64 = raw
                    .trim()
                    .parse()
                    .map_err(|e| ConfigError::new(key, format!("cannot parse {raw:?} as seconds: {e}")))?;
                if !secs.is_finite() || secs < 0.0 {
                    return Err(ConfigError::new(
                        key,
                        format!("{raw:?} is not a non-negative number of seconds"),
                    ));
                }
                Ok(std::time::Duration::from_secs_f64(secs))
            }
        }
    }
}

/// RabbitMQ settings both binaries share.
#[derive(Clone, Debug)]
pub struct AmqpConfig {
    /// Connection URL; it may carry a password, so it is kept secret.
    pub url: SecretString,
    /// Prefix of every exchange and queue name.
    pub prefix: String,
    /// Number of partition queues. Changing it re-routes users, so it is fixed per deployment.
    pub partitions: u16,
    /// How many times the broker delivers a batch before dead-lettering it (a batch that
    /// crashes every worker that takes it must not loop forever).
    pub delivery_limit: u32,
}

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

impl AmqpConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let prefix = env.get("UPLINK_QUEUE_PREFIX").unwrap_or_else(|| "uplink".to_owned());
        if !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(ConfigError::new(
                "UPLINK_QUEUE_PREFIX",
                "may only contain ASCII letters, digits, '-', '_' and '.'",
            ));
        }
        let partitions: u16 = env.parse_or("UPLINK_PARTITIONS", 8)?;
        if partitions == 0 || partitions > 1024 {
            return Err(ConfigError::new("UPLINK_PARTITIONS", "must be between 1 and 1024"));
        }
        let delivery_limit: u32 = env.parse_or("UPLINK_DELIVERY_LIMIT", 20)?;
        if delivery_limit == 0 {
            return Err(ConfigError::new("UPLINK_DELIVERY_LIMIT", "must be at least 1"));
        }
        Ok(Self {
            url: env
                .secret("AMQP_URL")
                .unwrap_or_else(|| SecretString::from(DEFAULT_AMQP_URL)),
            prefix,
            partitions,
            delivery_limit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let cfg = AmqpConfig::from_env(&Env::from_map::<&str, &str>([])).expect("defaults are valid");
        assert_eq!(cfg.prefix, "uplink");
        assert_eq!(cfg.partitions, 8);
        assert_eq!(cfg.url.expose_secret(), DEFAULT_AMQP_URL);
    }

    #[test]
    fn a_bad_value_names_the_variable() {
        let err = AmqpConfig::from_env(&Env::from_map([("UPLINK_PARTITIONS", "many")])).expect_err("invalid");
        assert_eq!(err.var, "UPLINK_PARTITIONS");
        assert!(err.to_string().starts_with("UPLINK_PARTITIONS:"), "{err}");
        let err = AmqpConfig::from_env(&Env::from_map([("UPLINK_PARTITIONS", "0")])).expect_err("invalid");
        assert_eq!(err.var, "UPLINK_PARTITIONS");
    }

    #[test]
    fn the_amqp_password_is_not_in_debug_output() {
        let cfg = AmqpConfig::from_env(&Env::from_map([("AMQP_URL", "amqp://u:hunter2@h/%2f")])).expect("valid");
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }

    #[test]
    fn flags_accept_common_spellings_and_reject_others() {
        let env = Env::from_map([("A", "TRUE"), ("B", "0"), ("C", "maybe")]);
        assert!(env.flag("A", false).expect("valid"));
        assert!(!env.flag("B", true).expect("valid"));
        assert!(env.flag("C", true).is_err());
        assert!(env.flag("D", true).expect("default"));
    }
}
