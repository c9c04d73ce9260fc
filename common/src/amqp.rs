//! Connecting to RabbitMQ and reading message headers.

use lapin::types::{AMQPValue, FieldTable};
use std::time::Duration;

use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};

/// Heartbeat interval used when the URL does not set one: a broker that silently vanishes
/// (a cut network path) is noticed within two intervals instead of the server's 60 s default.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;
/// Connection timeout used when the URL does not set one.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;

/// Capped exponential backoff between attempts to (re)connect to the broker, with up to 25 %
/// random jitter so replicas that lost the broker together do not reconnect in lockstep.
#[derive(Debug)]
pub struct ReconnectBackoff {
    next: Duration,
}

impl ReconnectBackoff {
    pub const MIN: Duration = Duration::from_millis(100);
    pub const MAX: Duration = Duration::from_secs(5);

    pub fn new() -> Self {
        Self { next: Self::MIN }
    }

    /// Back to the shortest delay, after a connection that worked.
    pub fn reset(&mut self) {
        self.next = Self::MIN;
    }

    /// The delay the next wait is based on (for logs).
    pub fn current(&self) -> Duration {
        self.next
    }

    /// The delay to wait now; the one after it doubles, up to [`Self::MAX`].
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next.mul_f64(1.0 + rand::random::<f64>() * 0.25);
        self.next = (self.next * 2).min(Self::MAX);
        delay
    }
}

impl Default for ReconnectBackoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Opens a connection, named so operators can tell replicas apart in the management UI.
pub async fn connect(url: &SecretString, connection_name: &str) -> lapin::Result<Connection> {
    let mut uri: AMQPUri = url
        .expose_secret()
        .parse()
        .map_err(|_: String| lapin::Error::from(std::io::Error::other("invalid AMQP URL")))?;
    uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
    uri.query.connection_timeout.get_or_insert(DEFAULT_CONNECT_TIMEOUT_MS);
    let props = ConnectionProperties::default().with_connection_name(connection_name.into());
    Connection::connect_uri(uri, props).await
}

/// Checks that a URL parses, for start-up validation (the message never echoes the URL,
/// which may hold a password).
pub fn validate_url(url: &SecretString) -> Result<(), String> {
    // The parser's message may quote the URL, password included, so it is not passed on.
    url.expose_secret()
        .parse::<AMQPUri>()
        .map(|_| ())
        .map_err(|_| "is not a valid amqp:// or amqps:// URL".to_owned())
}

/// A header's value as text, whatever string-like AMQP type carries it.
pub fn header_str(headers: Option<&FieldTable>, key: &str) -> Option<String> {
    match headers?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// A header's value as an integer, whatever integer AMQP type carries it.
pub fn header_i64(headers: Option<&FieldTable>, key: &str) -> Option<i64> {
    match headers?.inner().get(key)? {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        _ => None,
    }
}

/// A string header value.
pub fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.as_bytes().to_vec().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delays_double_up_to_the_cap_with_bounded_jitter_and_reset() {
        let mut backoff = ReconnectBackoff::new();
        let mut base = ReconnectBackoff::MIN;
        for _ in 0..10 {
            let delay = backoff.next_delay();
            assert!(
                delay >= base && delay <= base.mul_f64(1.25),
                "{delay:?} around {base:?}"
            );
            base = (base * 2).min(ReconnectBackoff::MAX);
            assert_eq!(backoff.current(), base);
        }
        backoff.reset();
        assert_eq!(backoff.current(), ReconnectBackoff::MIN);
    }
}
