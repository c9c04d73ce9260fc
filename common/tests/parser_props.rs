//! Property tests of the upload parser, the one place untrusted bytes enter uplink: whatever
//! arrives, `Batch::parse` answers without panicking, and whatever it accepts reaches the worker
//! unchanged through the queue envelope.

use std::collections::BTreeSet;

use proptest::prelude::*;
use serde_json::{Map, Number, Value};
use uplink_common::{Batch, Envelope, Limits, OpKind, UploadBatch};
use uuid::Uuid;

/// Serialises the batch as the api publishes it and reads it back as the worker does.
fn assert_round_trips(batch: &Batch) -> Result<(), TestCaseError> {
    let sent = Envelope::V1(UploadBatch {
        batch_id: Uuid::now_v7(),
        user_id: "user-1".into(),
        client_id: batch.client_id.clone(),
        partition: 3,
        accepted_at_ms: 1_700_000_000_000,
        ops: batch.ops.clone(),
    });
    let received = Envelope::from_slice(&sent.to_vec());
    prop_assert!(
        received.is_ok(),
        "the worker cannot read what the api sent: {:?}",
        received.err()
    );
    prop_assert_eq!(received.ok(), Some(sent));
    Ok(())
}

/// Checks what every accepted batch must satisfy, then the round trip.
fn check_accepted(batch: &Batch, limits: &Limits) -> Result<(), TestCaseError> {
    prop_assert!(batch.ops.len() <= limits.max_ops);
    for op in &batch.ops {
        prop_assert_eq!(
            op.data.is_none(),
            op.op == OpKind::Delete,
            "data is None exactly for deletes"
        );
        prop_assert!(!op.id.as_str().is_empty() && op.id.as_str().len() <= limits.max_id_bytes);
        if let Some(allowed) = &limits.allowed_collections {
            prop_assert!(allowed.contains(op.collection.as_str()));
        }
        if let Some(data) = &op.data {
            prop_assert!(!data.contains_key("_id") && !data.contains_key("id"));
        }
    }
    assert_round_trips(batch)
}

/// Strings that probe the parser's rules: names with `$`, `.`, NUL, the key fields, long ones.
fn tricky_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_]{1,8}",
        any::<String>(),
        Just(String::new()),
        Just("id".to_owned()),
        Just("_id".to_owned()),
        Just("$set".to_owned()),
        Just("a.b".to_owned()),
        Just("nul\0".to_owned()),
        Just("system.users".to_owned()),
        Just(".x".to_owned()),
        "[a-z]{119,125}",
        "[a-z0-9]{250,260}",
    ]
}

/// Mostly valid field names, sometimes a tricky one, so that nested values get past the first
/// key often enough to exercise the checks below it.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![16 => "[a-z_][a-z0-9_]{0,5}", 1 => tricky_string()]
}

fn number() -> impl Strategy<Value = Number> {
    prop_oneof![
        4 => any::<i64>().prop_map(Number::from),
        1 => any::<u64>().prop_map(Number::from),
        4 => any::<f64>().prop_filter_map("finite", Number::from_f64),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number().prop_map(Value::Number),
        prop_oneof![12 => "[ -~]{0,12}", 1 => tricky_string()].prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Mostly a plausible value for the field, sometimes anything at all, sometimes absent.
fn field(plausible: impl Strategy<Value = Value> + 'static) -> impl Strategy<Value = Option<Value>> {
    prop::option::weighted(0.97, prop_oneof![25 => plausible, 1 => json_value()])
}

/// An object shaped like an op, in either spelling, each field present or not, plausible or not.
fn op_like() -> impl Strategy<Value = Value> {
    let kind = prop_oneof![
        8 => Just("PUT"),
        8 => Just("PATCH"),
        8 => Just("DELETE"),
        1 => Just("put"),
        1 => Just("UPSERT")
    ]
    .prop_map(|s| Value::String(s.to_owned()));
    let collection = prop_oneof![12 => Just("todos".to_owned()), 4 => Just("lists".to_owned()), 1 => tricky_string()];
    // Which of `table` / `type` carry the name: one, the other, both agreeing, or both not.
    let spelling = prop_oneof![6 => Just("table"), 6 => Just("type"), 3 => Just("both"), 1 => Just("clash")];
    let id = prop_oneof![16 => "[a-z0-9-]{1,12}", 1 => tricky_string()].prop_map(Value::String);
    let data =
        prop::collection::btree_map(key(), json_value(), 0..5).prop_map(|m| Value::Object(m.into_iter().collect()));
    let int = prop_oneof![1 => any::<i64>(), 8 => 0i64..100].prop_map(|n| Value::Number(n.into()));
    (
        (
            field(kind),
            prop::option::weighted(0.95, collection),
            spelling,
            field(id),
        ),
        (
            field(data),
            field(int.clone()),
            field(int),
            field(json_value()),
            field(json_value()),
        ),
        prop::collection::btree_map("[a-z_]{1,6}", json_value(), 0..2),
    )
        .prop_map(
            |((op, collection, spelling, id), (data, op_id, tx_id, old, metadata), extra)| {
                let mut map: Map<String, Value> = extra.into_iter().collect();
                let (table, type_) = match (collection, spelling) {
                    (None, _) => (None, None),
                    (Some(c), "table") => (Some(Value::String(c)), None),
                    (Some(c), "type") => (None, Some(Value::String(c))),
                    (Some(c), "both") => (Some(Value::String(c.clone())), Some(Value::String(c))),
                    (Some(c), _) => (Some(Value::String(c.clone())), Some(Value::String(format!("{c}2")))),
                };
                for (name, value) in [
                    ("op", op),
                    ("table", table),
                    ("type", type_),
                    ("id", id),
                    ("data", data),
                    ("op_id", op_id),
                    ("tx_id", tx_id),
                    ("old", old),
                    ("metadata", metadata),
                ] {
                    if let Some(value) = value {
                        map.insert(name.to_owned(), value);
                    }
                }
                Value::Object(map)
            },
        )
}

fn body_like() -> impl Strategy<Value = Value> {
    let batch = prop_oneof![8 => prop::collection::vec(op_like(), 0..4).prop_map(Value::Array), 1 => json_value()];
    let client_id = prop::option::of(prop_oneof![12 => "[a-f0-9-]{0,36}".prop_map(Value::String), 1 => json_value()]);
    (prop::option::weighted(0.95, batch), client_id).prop_map(|(batch, client_id)| {
        let mut map = Map::new();
        if let Some(batch) = batch {
            map.insert("batch".into(), batch);
        }
        if let Some(client_id) = client_id {
            map.insert("client_id".into(), client_id);
        }
        Value::Object(map)
    })
}

/// The default limits, or tight ones (with an allowlist) that the generators can exceed.
fn limits() -> impl Strategy<Value = Limits> {
    prop_oneof![
        Just(Limits::default()),
        Just(Limits {
            max_body_bytes: 2048,
            max_ops: 3,
            max_id_bytes: 8,
            max_depth: 3,
            max_field_name_bytes: 6,
            allowed_collections: Some(BTreeSet::from(["todos".to_owned()])),
        }),
    ]
}

/// A value the parser must accept: valid names, no NUL, integers within i64, finite floats.
fn valid_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        any::<f64>()
            .prop_filter_map("finite", Number::from_f64)
            .prop_map(Value::Number),
        "[^\\x00]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z_][a-zA-Z0-9_ -]{0,10}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid op in either spelling, as JSON.
fn valid_op() -> impl Strategy<Value = Value> {
    let row = prop::collection::btree_map("[a-z][a-z0-9_]{0,10}", valid_value(), 0..6)
        .prop_map(|m| m.into_iter().filter(|(k, _)| k != "id").collect::<Map<String, Value>>());
    (
        prop_oneof![Just("PUT"), Just("PATCH"), Just("DELETE")],
        "[a-zA-Z][a-zA-Z0-9_]{0,30}",
        "[a-zA-Z0-9-]{1,64}",
        row,
        any::<bool>(),
        prop::option::of(0i64..i64::MAX),
        prop::option::of(any::<i64>()),
    )
        .prop_map(|(op, collection, id, row, sdk_form, op_id, tx_id)| {
            let mut map = Map::new();
            map.insert("op".into(), op.into());
            map.insert(if sdk_form { "type" } else { "table" }.into(), collection.into());
            map.insert("id".into(), id.into());
            if op != "DELETE" {
                map.insert("data".into(), Value::Object(row));
            }
            if sdk_form {
                if let Some(n) = op_id {
                    map.insert("op_id".into(), n.into());
                }
                if let Some(n) = tx_id {
                    map.insert("tx_id".into(), n.into());
                }
            }
            Value::Object(map)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_and_what_is_accepted_round_trips(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        limits in limits(),
    ) {
        if let Ok(batch) = Batch::parse(&bytes, &limits) {
            check_accepted(&batch, &limits)?;
        }
    }

    #[test]
    fn arbitrary_json_never_panics_and_what_is_accepted_round_trips(value in json_value(), limits in limits()) {
        if let Ok(batch) = Batch::parse(value.to_string().as_bytes(), &limits) {
            check_accepted(&batch, &limits)?;
        }
    }

    #[test]
    fn op_like_bodies_never_panic_and_what_is_accepted_round_trips(body in body_like(), limits in limits()) {
        if let Ok(batch) = Batch::parse(body.to_string().as_bytes(), &limits) {
            check_accepted(&batch, &limits)?;
        }
    }

    #[test]
    fn mutated_valid_bodies_never_panic_and_what_is_accepted_round_trips(
        ops in prop::collection::vec(valid_op(), 1..4),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = serde_json::to_vec(&serde_json::json!({"batch": ops})).expect("serialises");
        for (index, byte) in flips {
            let i = index.index(bytes.len());
            bytes[i] = byte;
        }
        if let Ok(batch) = Batch::parse(&bytes, &Limits::default()) {
            check_accepted(&batch, &Limits::default())?;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn valid_batches_are_accepted_with_every_value_as_sent(
        ops in prop::collection::vec(valid_op(), 0..8),
        client_id in prop::option::of("[a-f0-9-]{1,36}"),
    ) {
        let mut body = serde_json::json!({"batch": ops});
        if let Some(c) = &client_id {
            body["client_id"] = c.clone().into();
        }

        let parsed = Batch::parse(body.to_string().as_bytes(), &Limits::default());

        prop_assert!(parsed.is_ok(), "valid body refused: {:?}\n{}", parsed.as_ref().err(), body);
        let batch = parsed.expect("checked");
        prop_assert_eq!(&batch.client_id, &client_id);
        prop_assert_eq!(batch.ops.len(), ops.len());
        for (op, sent) in batch.ops.iter().zip(&ops) {
            prop_assert_eq!(op.op.as_str(), sent["op"].as_str().expect("op"));
            let collection = sent.get("table").or_else(|| sent.get("type")).and_then(Value::as_str);
            prop_assert_eq!(Some(op.collection.as_str()), collection);
            prop_assert_eq!(Some(op.id.as_str()), sent["id"].as_str());
            prop_assert_eq!(op.op_id, sent.get("op_id").and_then(Value::as_i64));
            prop_assert_eq!(op.tx_id, sent.get("tx_id").and_then(Value::as_i64));
            prop_assert_eq!(op.data.as_ref(), sent.get("data").and_then(Value::as_object));
        }
        check_accepted(&batch, &Limits::default())?;
    }
}
