//! Turning a row's JSON values into BSON, with the per-collection type conversions PowerSync
//! clients need because SQLite has no dates, booleans, embedded documents, ObjectIds or
//! decimals.
//!
//! The settings file (`UPLINK_COLLECTIONS_CONFIG`) looks like:
//!
//! ```toml
//! [collections.todos]
//! id = "objectid"               # `_id` from 24-hex text; default "string"
//!
//! [collections.todos.fields]
//! created_at = "date"           # ISO-8601 text -> BSON date
//! completed = "bool"            # 0/1 -> boolean
//! tags = "json"                 # JSON text -> embedded document/array
//! list_id = "objectid"          # 24-hex text -> ObjectId
//! price = "decimal"             # decimal text -> Decimal128
//! ```
//!
//! Collections without settings store values as sent. A value that does not convert is a
//! permanent error for its batch, naming the field: storing it wrong would be silent data loss.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use mongodb::bson::{oid::ObjectId, Bson, DateTime, Decimal128, Document};
use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdType {
    String,
    #[serde(rename = "objectid")]
    ObjectId,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    Date,
    Bool,
    Json,
    #[serde(rename = "objectid")]
    ObjectId,
    Decimal,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectionSettings {
    #[serde(default)]
    pub id: Option<IdType>,
    #[serde(default)]
    pub fields: HashMap<String, FieldType>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectionsConfig {
    #[serde(default)]
    pub collections: HashMap<String, CollectionSettings>,
}

/// A value that could not be converted as configured.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("field `{field}`: {message}")]
pub struct ConversionError {
    pub field: String,
    pub message: String,
}

impl CollectionsConfig {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    fn settings(&self, collection: &str) -> Option<&CollectionSettings> {
        self.collections.get(collection)
    }

    /// The `_id` value for a row id.
    pub fn id(&self, collection: &str, id: &str) -> Result<Bson, ConversionError> {
        match self.settings(collection).and_then(|s| s.id) {
            None | Some(IdType::String) => Ok(Bson::String(id.to_owned())),
            Some(IdType::ObjectId) => ObjectId::parse_str(id)
                .map(Bson::ObjectId)
                .map_err(|_| ConversionError {
                    field: "id".into(),
                    message: format!("{id:?} is not a 24-digit hex ObjectId"),
                }),
        }
    }

    /// The row's columns as a BSON document, converted as configured.
    pub fn row(&self, collection: &str, row: &Map<String, Value>) -> Result<Document, ConversionError> {
        let fields = self.settings(collection).map(|s| &s.fields);
        let mut doc = Document::new();
        for (name, value) in row {
            let converted = match fields.and_then(|f| f.get(name)) {
                Some(kind) => convert(name, *kind, value)?,
                None => json_to_bson(value),
            };
            doc.insert(name.clone(), converted);
        }
        Ok(doc)
    }
}

/// Plain JSON → BSON: integers that fit 32 bits become Int32 (as the Node driver stores them),
/// larger ones Int64, others Double.
pub fn json_to_bson(value: &Value) -> Bson {
    match value {
        Value::Null => Bson::Null,
        Value::Bool(b) => Bson::Boolean(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i32::try_from(i).map(Bson::Int32).unwrap_or(Bson::Int64(i))
            } else {
                Bson::Double(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => Bson::String(s.clone()),
        Value::Array(items) => Bson::Array(items.iter().map(json_to_bson).collect()),
        Value::Object(map) => Bson::Document(map.iter().map(|(k, v)| (k.clone(), json_to_bson(v))).collect()),
    }
}

fn convert(field: &str, kind: FieldType, value: &Value) -> Result<Bson, ConversionError> {
    let fail = |message: String| ConversionError {
        field: field.to_owned(),
        message,
    };
    if value.is_null() {
        return Ok(Bson::Null);
    }
    match kind {
        FieldType::Date => match value {
            Value::String(s) => {
                parse_date(s).ok_or_else(|| fail(format!("{s:?} is not an ISO-8601 date or date-time")))
            }
            other => Err(fail(format!("expected ISO-8601 text for a date, got {other}"))),
        },
        FieldType::Bool => match value {
            Value::Bool(b) => Ok(Bson::Boolean(*b)),
            Value::Number(n) if n.as_i64() == Some(0) => Ok(Bson::Boolean(false)),
            Value::Number(n) if n.as_i64() == Some(1) => Ok(Bson::Boolean(true)),
            other => Err(fail(format!("expected 0 or 1 for a boolean, got {other}"))),
        },
        FieldType::Json => match value {
            Value::String(s) => match serde_json::from_str::<Value>(s) {
                Ok(v @ (Value::Object(_) | Value::Array(_))) => Ok(json_to_bson(&v)),
                Ok(_) => Err(fail("JSON text must hold an object or an array".into())),
                Err(e) => Err(fail(format!("not valid JSON text: {e}"))),
            },
            v @ (Value::Object(_) | Value::Array(_)) => Ok(json_to_bson(v)),
            other => Err(fail(format!("expected JSON text, got {other}"))),
        },
        FieldType::ObjectId => match value {
            Value::String(s) => ObjectId::parse_str(s)
                .map(Bson::ObjectId)
                .map_err(|_| fail(format!("{s:?} is not a 24-digit hex ObjectId"))),
            other => Err(fail(format!("expected 24-digit hex text for an ObjectId, got {other}"))),
        },
        FieldType::Decimal => {
            let text = match value {
                Value::String(s) => s.trim().to_owned(),
                Value::Number(n) => n.to_string(),
                other => return Err(fail(format!("expected decimal text, got {other}"))),
            };
            let valid = !text.is_empty()
                && text
                    .trim_start_matches(['-', '+'])
                    .chars()
                    .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'))
                && text.chars().any(|c| c.is_ascii_digit());
            if !valid {
                return Err(fail(format!("{text:?} is not a decimal number")));
            }
            Decimal128::from_str(&text)
                .map(Bson::Decimal128)
                .map_err(|e| fail(format!("{text:?} is not a decimal number: {e}")))
        }
    }
}

/// ISO-8601 / RFC 3339 date-times, SQLite's `YYYY-MM-DD HH:MM:SS[.SSS]` (taken as UTC, as
/// SQLite's `datetime()` produces it) and plain dates (midnight UTC).
fn parse_date(s: &str) -> Option<Bson> {
    let s = s.trim();
    let normalised = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else {
        let mut t = s.replacen(' ', "T", 1);
        let has_offset = t.ends_with('Z') || t.ends_with('z') || {
            let tail = &t[t.len().saturating_sub(6)..];
            (tail.starts_with('+') || tail.starts_with('-')) && tail.as_bytes().get(3) == Some(&b':')
        };
        if !has_offset {
            t.push('Z');
        }
        t
    };
    DateTime::parse_rfc3339_str(&normalised).ok().map(Bson::DateTime)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config() -> CollectionsConfig {
        CollectionsConfig::parse(
            r#"
            [collections.todos]
            id = "objectid"
            [collections.todos.fields]
            created_at = "date"
            done = "bool"
            tags = "json"
            list_id = "objectid"
            price = "decimal"
            "#,
        )
        .expect("valid")
    }

    #[test]
    fn each_conversion_produces_the_bson_type() {
        let cfg = config();
        let row = json!({
            "created_at": "2024-05-01T10:20:30.123Z", "done": 1, "tags": "[\"a\",{\"b\":2}]",
            "list_id": "65f0c0ffee0000000000abcd", "price": "12.50", "title": "x", "n": 3
        });
        let doc = cfg.row("todos", row.as_object().expect("object")).expect("converts");
        assert_eq!(
            doc.get("created_at"),
            Some(&Bson::DateTime(DateTime::from_millis(1_714_558_830_123)))
        );
        assert_eq!(doc.get("done"), Some(&Bson::Boolean(true)));
        assert!(matches!(doc.get("tags"), Some(Bson::Array(a)) if a.len() == 2));
        assert!(matches!(doc.get("list_id"), Some(Bson::ObjectId(_))));
        assert_eq!(doc.get("price").map(ToString::to_string).as_deref(), Some("12.50"));
        assert_eq!(doc.get("title"), Some(&Bson::String("x".into())));
        assert_eq!(doc.get("n"), Some(&Bson::Int32(3)));
        assert!(matches!(
            cfg.id("todos", "65f0c0ffee0000000000abcd"),
            Ok(Bson::ObjectId(_))
        ));
        assert_eq!(cfg.id("other", "abc"), Ok(Bson::String("abc".into())));
    }

    #[test]
    fn sqlite_datetimes_and_plain_dates_are_utc() {
        assert_eq!(
            parse_date("2024-05-01 10:20:30"),
            Some(Bson::DateTime(DateTime::from_millis(1_714_558_830_000)))
        );
        assert_eq!(
            parse_date("2024-05-01"),
            Some(Bson::DateTime(DateTime::from_millis(1_714_521_600_000)))
        );
        assert_eq!(
            parse_date("2024-05-01T12:20:30+02:00"),
            Some(Bson::DateTime(DateTime::from_millis(1_714_558_830_000)))
        );
    }

    #[test]
    fn values_that_do_not_convert_name_their_field() {
        let cfg = config();
        for (field, value) in [
            ("created_at", json!("yesterday")),
            ("created_at", json!(1_714_558_830)),
            ("done", json!(2)),
            ("done", json!("true")),
            ("tags", json!("{not json")),
            ("tags", json!("42")),
            ("list_id", json!("xyz")),
            ("price", json!("12,50")),
            ("price", json!("abc")),
        ] {
            let row = json!({ field: value });
            let err = cfg
                .row("todos", row.as_object().expect("object"))
                .expect_err("must not convert");
            assert_eq!(err.field, field, "{value}");
        }
        assert_eq!(cfg.id("todos", "not-hex").expect_err("bad id").field, "id");
    }

    #[test]
    fn null_stays_null_whatever_the_conversion() {
        let cfg = config();
        let doc = cfg
            .row(
                "todos",
                json!({"created_at": null, "done": null}).as_object().expect("object"),
            )
            .expect("converts");
        assert_eq!(doc.get("created_at"), Some(&Bson::Null));
    }

    #[test]
    fn unknown_settings_are_refused() {
        assert!(CollectionsConfig::parse("[collections.t.fields]\na = \"uuid\"").is_err());
        assert!(CollectionsConfig::parse("[collections.t]\nidd = \"string\"").is_err());
    }
}
