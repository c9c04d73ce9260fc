//! Every error the worker meets while applying a batch, classified — here and nowhere else —
//! as transient (retry in place, holding the partition), permanent (dead-letter at once) or
//! unknown (retry a bounded number of times, then dead-letter).

use std::fmt;

use mongodb::error::{Error as MongoError, ErrorKind, WriteFailure};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    Transient,
    Permanent,
    Unknown,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
            ErrorClass::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a batch did not apply.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{class} error{}: {message}", code.map(|c| format!(" (code {c})")).unwrap_or_default())]
pub struct ApplyError {
    pub class: ErrorClass,
    /// MongoDB error code, when the server gave one.
    pub code: Option<i32>,
    pub message: String,
    /// Index in the batch of the op that failed, when one did.
    pub op_index: Option<usize>,
    /// Collection of the failing op.
    pub collection: Option<String>,
}

impl ApplyError {
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Permanent,
            code: None,
            message: message.into(),
            op_index: None,
            collection: None,
        }
    }

    pub fn at_op(mut self, index: usize, collection: &str) -> Self {
        self.op_index = Some(index);
        self.collection = Some(collection.to_owned());
        self
    }

    /// A MongoDB driver error.
    pub fn from_mongo(error: &MongoError) -> Self {
        let transient_label = [
            "TransientTransactionError",
            "RetryableWriteError",
            "UnknownTransactionCommitResult",
        ]
        .iter()
        .any(|l| error.contains_label(l));
        let (class, code, message) = match &*error.kind {
            ErrorKind::Io(_)
            | ErrorKind::ConnectionPoolCleared { .. }
            | ErrorKind::ServerSelection { .. }
            | ErrorKind::DnsResolve { .. } => (ErrorClass::Transient, None, error.to_string()),
            // Credentials an operator can fix: keep the partition waiting rather than
            // dead-lettering every batch.
            ErrorKind::Authentication { .. } => (ErrorClass::Transient, None, error.to_string()),
            ErrorKind::Command(c) => (
                classify_code(c.code),
                Some(c.code),
                format!("{} ({}): {}", c.code_name, c.code, c.message),
            ),
            ErrorKind::Write(WriteFailure::WriteConcernError(wc)) => (
                ErrorClass::Transient,
                Some(wc.code),
                format!("write concern: {}", wc.message),
            ),
            ErrorKind::Write(WriteFailure::WriteError(we)) => {
                (classify_code(we.code), Some(we.code), we.message.clone())
            }
            _ => (ErrorClass::Unknown, None, error.to_string()),
        };
        let class = if transient_label { ErrorClass::Transient } else { class };
        Self {
            class,
            code,
            message,
            op_index: None,
            collection: None,
        }
    }

    /// Whether the error is a conflict with a concurrent transaction (WriteConflict, or a
    /// transaction the server aborted because of one). Such conflicts clear as soon as the
    /// other transaction commits, so they are retried after a few milliseconds rather than
    /// after the outage backoff.
    pub fn is_conflict(&self) -> bool {
        self.class == ErrorClass::Transient && matches!(self.code, Some(112) | Some(251))
    }

    /// A `writeErrors` entry of a command reply.
    pub fn from_write_error(code: i32, message: String) -> Self {
        Self {
            class: classify_code(code),
            code: Some(code),
            message,
            op_index: None,
            collection: None,
        }
    }

    /// A `writeConcernError` of a command reply: the write happened on the primary but was not
    /// acknowledged as required; retrying the (idempotent) batch is safe.
    pub fn from_write_concern_error(code: i32, message: String) -> Self {
        Self {
            class: ErrorClass::Transient,
            code: Some(code),
            message: format!("write concern: {message}"),
            op_index: None,
            collection: None,
        }
    }
}

/// MongoDB server error codes (see the server's `error_codes.yml`).
pub fn classify_code(code: i32) -> ErrorClass {
    match code {
        // Network, elections, shutdown, stale routing, lock contention, timeouts, aborted
        // transactions, auth that an operator can fix: retrying can succeed.
        6 | 7 | 13 | 18 | 24 | 46 | 50 | 63 | 64 | 89 | 91 | 112 | 133 | 134 | 150 | 189 | 202 | 251 | 262 | 9001
        | 10107 | 11600 | 11601 | 11602 | 13388 | 13435 | 13436 => ErrorClass::Transient,
        // The data or the command is wrong: retrying cannot help.
        2 | 4 | 9 | 14 | 17 | 22 | 26 | 28 | 40 | 52 | 55 | 56 | 57 | 66 | 72 | 73 | 121 | 10334 | 11000 | 11001
        | 12582 | 17419 | 17280 => ErrorClass::Permanent,
        _ => ErrorClass::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_fall_into_the_expected_classes() {
        assert_eq!(classify_code(121), ErrorClass::Permanent, "document validation");
        assert_eq!(classify_code(11000), ErrorClass::Permanent, "duplicate key");
        assert_eq!(classify_code(112), ErrorClass::Transient, "write conflict");
        assert_eq!(classify_code(10107), ErrorClass::Transient, "not writable primary");
        assert_eq!(classify_code(91), ErrorClass::Transient, "shutdown in progress");
        assert_eq!(classify_code(123_456), ErrorClass::Unknown);
    }
}
