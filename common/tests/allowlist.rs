//! The collection allowlist in `Limits`: unset allows any valid name; set, it refuses the rest
//! with a 422-class error naming the op and the field the client used.

use std::collections::BTreeSet;

use serde_json::json;
use uplink_common::batch::BatchErrorKind;
use uplink_common::{Batch, Limits};

fn allowing(names: &[&str]) -> Limits {
    Limits {
        allowed_collections: Some(names.iter().map(|n| (*n).to_owned()).collect::<BTreeSet<_>>()),
        ..Limits::default()
    }
}

#[test]
fn without_an_allowlist_any_valid_collection_is_accepted() {
    let body = json!({"batch": [{"op": "DELETE", "table": "anything", "id": "1"}]}).to_string();

    let batch = Batch::parse(body.as_bytes(), &Limits::default()).expect("accepted");

    assert_eq!(batch.ops[0].collection.as_str(), "anything");
}

#[test]
fn a_listed_collection_is_accepted_in_either_spelling() {
    let body = json!({"batch": [
        {"op": "DELETE", "table": "todos", "id": "1"},
        {"op_id": 1, "op": "DELETE", "type": "lists", "id": "2"},
    ]})
    .to_string();

    let batch = Batch::parse(body.as_bytes(), &allowing(&["todos", "lists"])).expect("accepted");

    assert_eq!(batch.ops.len(), 2);
}

#[test]
fn an_unlisted_collection_is_refused_naming_the_op_index_and_the_field_used() {
    let limits = allowing(&["todos"]);
    let seed = json!({"batch": [{"op": "DELETE", "table": "todos", "id": "1"}, {"op": "DELETE", "table": "users", "id": "2"}]});
    let sdk = json!({"batch": [{"op_id": 1, "op": "PUT", "type": "users", "id": "2", "data": {}}]});

    let seed = Batch::parse(seed.to_string().as_bytes(), &limits).expect_err("refused");
    let sdk = Batch::parse(sdk.to_string().as_bytes(), &limits).expect_err("refused");

    assert_eq!(
        (seed.kind, seed.op_index, seed.field.as_deref()),
        (BatchErrorKind::Invalid, Some(1), Some("table"))
    );
    assert_eq!(
        (sdk.kind, sdk.op_index, sdk.field.as_deref()),
        (BatchErrorKind::Invalid, Some(0), Some("type"))
    );
    assert!(seed.to_string().contains("\"users\""), "{seed}");
}
