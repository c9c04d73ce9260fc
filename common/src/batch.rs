//! The upload body, parsed. `Batch::parse` turns the bytes a PowerSync connector posts into a
//! list of [`Op`]s, accepting both spellings in use (the seed/CloudCode `{op, table, id, data}`
//! and the SDK's `CrudEntry.toJSON()` `{op_id, op, type, id, tx_id, data, old, metadata}`), and
//! rejects anything MongoDB or PowerSync would choke on, naming the op index and field.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Size and shape limits for one upload. Defaults suit PowerSync's upload batches (the
/// SDK sends at most a few hundred CRUD entries at a time) with generous headroom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Most ops in one batch.
    pub max_ops: usize,
    /// Longest document id, in bytes.
    pub max_id_bytes: usize,
    /// Deepest nesting of objects/arrays inside one op's `data`.
    pub max_depth: usize,
    /// Longest field name, in bytes.
    pub max_field_name_bytes: usize,
    /// Collections clients may write to; `None` allows any valid name. A deployment that syncs
    /// only a few tables lists them, so a client cannot create or overwrite other collections.
    pub allowed_collections: Option<BTreeSet<String>>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 * 1024 * 1024,
            max_ops: 1000,
            max_id_bytes: 256,
            max_depth: 32,
            max_field_name_bytes: 256,
            allowed_collections: None,
        }
    }
}

/// Longest collection name accepted. MongoDB limits a namespace (`db.collection`) to 255
/// bytes; this leaves room for the database name.
pub const MAX_COLLECTION_BYTES: usize = 120;

/// Longest PowerSync client id accepted (they are UUIDs in practice).
pub const MAX_CLIENT_ID_BYTES: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OpKind {
    /// Insert or replace the whole row.
    #[serde(rename = "PUT")]
    Put,
    /// Set the given columns.
    #[serde(rename = "PATCH")]
    Patch,
    /// Remove the row.
    #[serde(rename = "DELETE")]
    Delete,
}

impl OpKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Put => "PUT",
            OpKind::Patch => "PATCH",
            OpKind::Delete => "DELETE",
        }
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A MongoDB collection name a client may write to: non-empty, at most
/// [`MAX_COLLECTION_BYTES`], no `$` or NUL, not a `system.` collection.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct CollectionName(String);

impl CollectionName {
    pub fn parse(name: &str) -> Result<Self, String> {
        if name.is_empty() {
            return Err("must not be empty".into());
        }
        if name.len() > MAX_COLLECTION_BYTES {
            return Err(format!("is longer than {MAX_COLLECTION_BYTES} bytes"));
        }
        if name.contains('$') || name.contains('\0') {
            return Err("must not contain '$' or NUL".into());
        }
        if name.starts_with("system.") {
            return Err("must not name a system.* collection".into());
        }
        if name.starts_with('.') || name.ends_with('.') {
            return Err("must not start or end with '.'".into());
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for CollectionName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Self::parse(&raw).map_err(|e| serde::de::Error::custom(format!("collection {raw:?} {e}")))
    }
}

impl fmt::Display for CollectionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A row id: a non-empty string without NUL. PowerSync ids are text (usually UUIDs).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DocId(String);

impl DocId {
    pub fn parse(id: &str, max_bytes: usize) -> Result<Self, String> {
        if id.is_empty() {
            return Err("must be a non-empty string".into());
        }
        if id.len() > max_bytes {
            return Err(format!("is longer than {max_bytes} bytes"));
        }
        if id.contains('\0') {
            return Err("must not contain NUL".into());
        }
        Ok(Self(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One change to apply. `data` holds the row's columns (never `id`, which is the key);
/// it is `None` exactly for deletes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Op {
    /// The client's monotonically increasing CRUD entry id (SDK form only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op_id: Option<i64>,
    /// The client-side transaction the change belongs to (SDK form only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_id: Option<i64>,
    pub op: OpKind,
    pub collection: CollectionName,
    pub id: DocId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Map<String, Value>>,
}

/// A validated upload: ops in the order the client queued them.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub client_id: Option<String>,
    pub ops: Vec<Op>,
}

/// The highest client op id among `ops`: the PowerSync write checkpoint they reach.
pub fn checkpoint_of(ops: &[Op]) -> Option<i64> {
    ops.iter().filter_map(|op| op.op_id).max()
}

impl Batch {
    /// The highest client op id in the batch: the PowerSync write checkpoint it reaches.
    pub fn checkpoint(&self) -> Option<i64> {
        checkpoint_of(&self.ops)
    }
}

/// How a rejected upload should be answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchErrorKind {
    /// Not JSON, or not the documented shape (400).
    Malformed,
    /// Well-formed but breaks a rule of the schema (422).
    Invalid,
    /// Over a size limit (413).
    TooLarge,
}

/// Why an upload was rejected: which op, which field, what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct BatchError {
    pub kind: BatchErrorKind,
    /// Index of the offending op in `batch`, when one op is at fault.
    pub op_index: Option<usize>,
    /// The offending field (`op`, `table`, `id`, `data.<name>`, …), when one is at fault.
    pub field: Option<String>,
    pub message: String,
}

impl BatchError {
    fn new(kind: BatchErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            op_index: None,
            field: None,
            message: message.into(),
        }
    }

    fn at(kind: BatchErrorKind, op_index: usize, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind,
            op_index: Some(op_index),
            field: Some(field.into()),
            message: message.into(),
        }
    }

    fn describe(&self) -> String {
        match (self.op_index, &self.field) {
            (Some(i), Some(f)) => format!("batch[{i}].{f}: {}", self.message),
            (Some(i), None) => format!("batch[{i}]: {}", self.message),
            (None, Some(f)) => format!("{f}: {}", self.message),
            (None, None) => self.message.clone(),
        }
    }
}

use BatchErrorKind::{Invalid, Malformed, TooLarge};

impl Batch {
    /// Parses and validates an upload body.
    pub fn parse(body: &[u8], limits: &Limits) -> Result<Self, BatchError> {
        if body.len() > limits.max_body_bytes {
            return Err(BatchError::new(
                TooLarge,
                format!("body is {} bytes, the limit is {}", body.len(), limits.max_body_bytes),
            ));
        }
        let root: Value = serde_json::from_slice(body)
            .map_err(|e| BatchError::new(Malformed, format!("body is not valid JSON: {e}")))?;
        let Value::Object(mut root) = root else {
            return Err(BatchError::new(
                Malformed,
                "body must be a JSON object with a `batch` array",
            ));
        };
        let client_id = match root.remove("client_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) if s.len() > MAX_CLIENT_ID_BYTES || s.contains('\0') => {
                return Err(BatchError {
                    field: Some("client_id".into()),
                    ..BatchError::new(
                        Invalid,
                        format!("must be at most {MAX_CLIENT_ID_BYTES} bytes without NUL"),
                    )
                })
            }
            Some(Value::String(s)) => Some(s),
            Some(_) => {
                return Err(BatchError {
                    field: Some("client_id".into()),
                    ..BatchError::new(Malformed, "must be a string")
                })
            }
        };
        let raw_ops = match root.remove("batch") {
            Some(Value::Array(ops)) => ops,
            Some(_) => {
                return Err(BatchError {
                    field: Some("batch".into()),
                    ..BatchError::new(Malformed, "must be an array of operations")
                })
            }
            None => {
                return Err(BatchError {
                    field: Some("batch".into()),
                    ..BatchError::new(Malformed, "is required")
                })
            }
        };
        if raw_ops.len() > limits.max_ops {
            return Err(BatchError {
                field: Some("batch".into()),
                ..BatchError::new(
                    TooLarge,
                    format!("has {} operations, the limit is {}", raw_ops.len(), limits.max_ops),
                )
            });
        }
        let ops = raw_ops
            .into_iter()
            .enumerate()
            .map(|(i, raw)| parse_op(i, raw, limits))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Batch { client_id, ops })
    }
}

fn parse_op(index: usize, raw: Value, limits: &Limits) -> Result<Op, BatchError> {
    let Value::Object(mut raw) = raw else {
        return Err(BatchError {
            op_index: Some(index),
            ..BatchError::new(Malformed, "operation must be a JSON object")
        });
    };
    let op = match raw.remove("op") {
        Some(Value::String(s)) => match s.as_str() {
            "PUT" => OpKind::Put,
            "PATCH" => OpKind::Patch,
            "DELETE" => OpKind::Delete,
            other => {
                return Err(BatchError::at(
                    Invalid,
                    index,
                    "op",
                    format!("unknown operation {other:?}; expected PUT, PATCH or DELETE"),
                ))
            }
        },
        Some(_) => return Err(BatchError::at(Malformed, index, "op", "must be a string")),
        None => return Err(BatchError::at(Malformed, index, "op", "is required")),
    };

    let table = optional_string(index, "table", raw.remove("table"))?;
    let type_ = optional_string(index, "type", raw.remove("type"))?;
    let (field, name) = match (table, type_) {
        (Some(t), Some(ty)) if t != ty => {
            return Err(BatchError::at(
                Invalid,
                index,
                "type",
                format!("names collection {ty:?} but `table` names {t:?}"),
            ))
        }
        (Some(t), _) => ("table", t),
        (None, Some(ty)) => ("type", ty),
        (None, None) => {
            return Err(BatchError::at(
                Malformed,
                index,
                "table",
                "is required (or `type`, in the SDK form)",
            ))
        }
    };
    let collection = CollectionName::parse(&name)
        .map_err(|e| BatchError::at(Invalid, index, field, format!("collection {name:?} {e}")))?;
    if let Some(allowed) = &limits.allowed_collections {
        if !allowed.contains(collection.as_str()) {
            return Err(BatchError::at(
                Invalid,
                index,
                field,
                format!("collection {name:?} is not in the list of collections clients may write to"),
            ));
        }
    }

    let id = match raw.remove("id") {
        Some(Value::String(s)) => {
            DocId::parse(&s, limits.max_id_bytes).map_err(|e| BatchError::at(Invalid, index, "id", e))?
        }
        Some(Value::Null) | None => return Err(BatchError::at(Invalid, index, "id", "is required")),
        Some(_) => return Err(BatchError::at(Invalid, index, "id", "must be a non-empty string")),
    };

    let op_id = optional_int(index, "op_id", raw.remove("op_id"))?;
    if op_id.is_some_and(|v| v < 0) {
        return Err(BatchError::at(Invalid, index, "op_id", "must not be negative"));
    }
    let tx_id = optional_int(index, "tx_id", raw.remove("tx_id"))?;

    let data = match (op, raw.remove("data")) {
        (OpKind::Delete, _) => None,
        (_, Some(Value::Object(map))) => Some(parse_row(index, &id, map, limits)?),
        (_, None | Some(Value::Null)) => {
            return Err(BatchError::at(Invalid, index, "data", format!("is required for {op}")))
        }
        (_, Some(_)) => return Err(BatchError::at(Invalid, index, "data", "must be a JSON object")),
    };
    // `old` and `metadata` (SDK form) are accepted and not stored: uplink applies the new
    // values as sent, last writer wins.
    Ok(Op {
        op_id,
        tx_id,
        op,
        collection,
        id,
        data,
    })
}

fn optional_string(index: usize, field: &str, value: Option<Value>) -> Result<Option<String>, BatchError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(BatchError::at(Malformed, index, field, "must be a string")),
    }
}

fn optional_int(index: usize, field: &str, value: Option<Value>) -> Result<Option<i64>, BatchError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| BatchError::at(Invalid, index, field, "must be an integer")),
        Some(_) => Err(BatchError::at(Malformed, index, field, "must be an integer")),
    }
}

/// Validates the row's columns. `id` is the row key: it is dropped from the columns when it
/// repeats the op's id and rejected when it contradicts it; `_id` is MongoDB's key and may not
/// be set through a column.
fn parse_row(
    index: usize,
    id: &DocId,
    mut row: Map<String, Value>,
    limits: &Limits,
) -> Result<Map<String, Value>, BatchError> {
    match row.remove("id") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == id.as_str() => {}
        Some(_) => {
            return Err(BatchError::at(
                Invalid,
                index,
                "data.id",
                "contradicts the operation's id",
            ))
        }
    }
    if row.contains_key("_id") {
        return Err(BatchError::at(
            Invalid,
            index,
            "data._id",
            "must not be set; the operation's `id` becomes the document's _id",
        ));
    }
    for (name, value) in &row {
        check_field(index, &format!("data.{name}"), name, value, 1, limits)?;
    }
    Ok(row)
}

fn check_field(
    index: usize,
    path: &str,
    name: &str,
    value: &Value,
    depth: usize,
    limits: &Limits,
) -> Result<(), BatchError> {
    if name.is_empty() {
        return Err(BatchError::at(Invalid, index, path, "field names must not be empty"));
    }
    if name.starts_with('$') {
        return Err(BatchError::at(
            Invalid,
            index,
            path,
            "field names must not start with '$'",
        ));
    }
    if name.contains('.') {
        // `$set` would read a dotted name as a path into a sub-document.
        return Err(BatchError::at(Invalid, index, path, "field names must not contain '.'"));
    }
    if name.contains('\0') {
        return Err(BatchError::at(Invalid, index, path, "field names must not contain NUL"));
    }
    if name.len() > limits.max_field_name_bytes {
        return Err(BatchError::at(
            Invalid,
            index,
            path,
            format!("field name is longer than {} bytes", limits.max_field_name_bytes),
        ));
    }
    check_value(index, path, value, depth, limits)
}

fn check_value(index: usize, path: &str, value: &Value, depth: usize, limits: &Limits) -> Result<(), BatchError> {
    match value {
        Value::Number(n) if n.is_u64() && n.as_i64().is_none() => Err(BatchError::at(
            Invalid,
            index,
            path,
            "integer does not fit in a signed 64-bit integer",
        )),
        Value::String(s) if s.contains('\0') => {
            // BSON strings may hold NUL, but many drivers and tools mishandle it.
            Err(BatchError::at(Invalid, index, path, "strings must not contain NUL"))
        }
        Value::Object(map) => {
            if depth >= limits.max_depth {
                return Err(BatchError::at(
                    Invalid,
                    index,
                    path,
                    format!("nested deeper than {} levels", limits.max_depth),
                ));
            }
            for (name, v) in map {
                check_field(index, &format!("{path}.{name}"), name, v, depth + 1, limits)?;
            }
            Ok(())
        }
        Value::Array(items) => {
            if depth >= limits.max_depth {
                return Err(BatchError::at(
                    Invalid,
                    index,
                    path,
                    format!("nested deeper than {} levels", limits.max_depth),
                ));
            }
            for (i, v) in items.iter().enumerate() {
                check_value(index, &format!("{path}[{i}]"), v, depth + 1, limits)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Batch, BatchError> {
        Batch::parse(v.to_string().as_bytes(), &Limits::default())
    }

    #[test]
    fn the_seed_spelling_parses() {
        let batch = parse(json!({"batch": [
            {"op": "PUT", "table": "todos", "id": "t1", "data": {"id": "t1", "title": "a", "done": 0}},
            {"op": "PATCH", "table": "todos", "id": "t1", "data": {"done": 1}},
            {"op": "DELETE", "table": "lists", "id": "l1"},
        ]}))
        .expect("valid");
        assert_eq!(batch.client_id, None);
        assert_eq!(batch.ops.len(), 3);
        assert_eq!(batch.ops[0].op, OpKind::Put);
        assert_eq!(
            batch.ops[0].data,
            Some(json!({"title": "a", "done": 0}).as_object().cloned().expect("object"))
        );
        assert_eq!(batch.ops[2].collection.as_str(), "lists");
        assert_eq!(batch.ops[2].data, None);
        assert_eq!(batch.checkpoint(), None);
    }

    #[test]
    fn the_sdk_spelling_parses() {
        let batch = parse(json!({"client_id": "c1", "batch": [
            {"op_id": 7, "op": "PUT", "type": "todos", "id": "t1", "tx_id": 3, "data": {"title": "a"}, "old": null, "metadata": "m"},
            {"op_id": 9, "op": "DELETE", "type": "todos", "id": "t1", "tx_id": 4},
        ]}))
        .expect("valid");
        assert_eq!(batch.client_id.as_deref(), Some("c1"));
        assert_eq!(batch.ops[0].op_id, Some(7));
        assert_eq!(batch.ops[0].tx_id, Some(3));
        assert_eq!(batch.checkpoint(), Some(9));
    }

    fn rejected(v: Value) -> BatchError {
        parse(v).expect_err("must be rejected")
    }

    #[test]
    fn each_bad_op_is_named_with_its_index_and_field() {
        let cases = [
            (
                json!({"batch": [{"op": "UPSERT", "table": "t", "id": "1", "data": {}}]}),
                Invalid,
                "op",
            ),
            (
                json!({"batch": [{"op": "PUT", "table": "t", "data": {}}]}),
                Invalid,
                "id",
            ),
            (
                json!({"batch": [{"op": "PUT", "table": "t", "id": "", "data": {}}]}),
                Invalid,
                "id",
            ),
            (
                json!({"batch": [{"op": "PUT", "table": "t", "id": 5, "data": {}}]}),
                Invalid,
                "id",
            ),
            (
                json!({"batch": [{"op": "PUT", "id": "1", "data": {}}]}),
                Malformed,
                "table",
            ),
            (
                json!({"batch": [{"op": "PUT", "table": "system.users", "id": "1", "data": {}}]}),
                Invalid,
                "table",
            ),
            (
                json!({"batch": [{"op": "PUT", "table": "a$b", "id": "1", "data": {}}]}),
                Invalid,
                "table",
            ),
            (
                json!({"batch": [{"op": "PUT", "table": "a", "type": "b", "id": "1", "data": {}}]}),
                Invalid,
                "type",
            ),
            (
                json!({"batch": [{"op": "PUT", "table": "t", "id": "1", "data": {"$set": 1}}]}),
                Invalid,
                "data.$set",
            ),
            (
                json!({"batch": [{"op": "PUT", "table": "t", "id": "1", "data": {"a": {"$gt": 1}}}]}),
                Invalid,
                "data.a.$gt",
            ),
            (
                json!({"batch": [{"op": "PUT", "table": "t", "id": "1", "data": {"a.b": 1}}]}),
                Invalid,
                "data.a.b",
            ),
            (
                json!({"batch": [{"op": "PUT", "table": "t", "id": "1", "data": {"_id": "x"}}]}),
                Invalid,
                "data._id",
            ),
            (
                json!({"batch": [{"op": "PUT", "table": "t", "id": "1", "data": {"id": "2"}}]}),
                Invalid,
                "data.id",
            ),
            (
                json!({"batch": [{"op": "PATCH", "table": "t", "id": "1"}]}),
                Invalid,
                "data",
            ),
            (
                json!({"batch": [{"op": "PUT", "table": "t", "id": "1", "data": [1]}]}),
                Invalid,
                "data",
            ),
            (
                json!({"batch": [{"op": "PUT", "table": "t", "id": "1", "data": {"n": 18446744073709551615u64}}]}),
                Invalid,
                "data.n",
            ),
            (
                json!({"batch": [{"op_id": -1, "op": "PUT", "table": "t", "id": "1", "data": {}}]}),
                Invalid,
                "op_id",
            ),
            (
                json!({"batch": [{"op_id": "7", "op": "PUT", "table": "t", "id": "1", "data": {}}]}),
                Malformed,
                "op_id",
            ),
        ];
        for (body, kind, field) in cases {
            let err = rejected(body.clone());
            assert_eq!(err.kind, kind, "{body}: {err}");
            assert_eq!(err.op_index, Some(0), "{body}: {err}");
            assert_eq!(err.field.as_deref(), Some(field), "{body}: {err}");
        }
    }

    #[test]
    fn the_index_points_at_the_first_bad_op() {
        let err = rejected(json!({"batch": [
            {"op": "DELETE", "table": "t", "id": "1"},
            {"op": "DELETE", "table": "t", "id": "2"},
            {"op": "DELETE", "table": "t"},
        ]}));
        assert_eq!(err.op_index, Some(2));
        assert_eq!(err.to_string(), "batch[2].id: is required");
    }

    #[test]
    fn malformed_bodies_are_400_class() {
        for body in [
            &b"not json"[..],
            b"[]",
            b"{}",
            b"{\"batch\": {}}",
            b"{\"batch\": [1]}",
            b"{\"batch\": [], \"client_id\": 5}",
        ] {
            let err = Batch::parse(body, &Limits::default()).expect_err("malformed");
            assert_eq!(err.kind, Malformed, "{}: {err}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn limits_are_enforced() {
        let limits = Limits {
            max_ops: 2,
            max_depth: 3,
            max_id_bytes: 4,
            ..Limits::default()
        };
        let op = json!({"op": "DELETE", "table": "t", "id": "1"});
        let err = Batch::parse(json!({"batch": [op, op, op]}).to_string().as_bytes(), &limits).expect_err("too many");
        assert_eq!(err.kind, TooLarge);
        let err = Batch::parse(
            json!({"batch": [{"op": "DELETE", "table": "t", "id": "12345"}]})
                .to_string()
                .as_bytes(),
            &limits,
        )
        .expect_err("long id");
        assert_eq!(err.field.as_deref(), Some("id"));
        let deep = json!({"batch": [{"op": "PUT", "table": "t", "id": "1", "data": {"a": {"b": {"c": {"d": 1}}}}}]});
        let err = Batch::parse(deep.to_string().as_bytes(), &limits).expect_err("too deep");
        assert_eq!(err.field.as_deref(), Some("data.a.b.c"));
        let small = Limits {
            max_body_bytes: 10,
            ..Limits::default()
        };
        assert_eq!(Batch::parse(&[b' '; 11], &small).expect_err("big").kind, TooLarge);
    }

    #[test]
    fn an_empty_batch_is_valid() {
        assert!(parse(json!({"batch": []})).expect("valid").ops.is_empty());
    }
}
