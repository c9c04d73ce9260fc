//! Per-collection type conversions: each conversion stores the BSON type PowerSync clients
//! cannot send, and a value that does not convert dead-letters its batch with the field named,
//! while the rest of the partition keeps flowing.

use std::time::Duration;

use mongodb::bson::{doc, Bson, Document};
use serde_json::json;
use uplink_tests::{eventually, Stack, StackOptions};

const SETTINGS: &str = r#"
[collections.orders]
id = "objectid"

[collections.orders.fields]
placed_at = "date"
paid = "bool"
items = "json"
customer_id = "objectid"
total = "decimal"
"#;

fn settings_file() -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("uplink-collections-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&path, SETTINGS).expect("write settings");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_conversion_stores_its_bson_type_and_a_failure_is_dead_lettered_with_its_field() {
    // Arrange
    let path = settings_file();
    let stack = Stack::start(StackOptions {
        workers: 1,
        partitions: 1,
        worker_env: vec![("UPLINK_COLLECTIONS_CONFIG".into(), path.display().to_string())],
        ..StackOptions::default()
    })
    .await;
    let token = stack.token("kim").await;
    let order_id = "65f0c0ffee0000000000abcd";

    // Act: a convertible row, then a row whose date does not parse, then a later batch.
    stack
        .upload_ok(
            &token,
            &json!({"batch": [{"op": "PUT", "table": "orders", "id": order_id, "data": {
                "placed_at": "2024-05-01 10:20:30", "paid": 1, "items": "[{\"sku\":\"a\",\"qty\":2}]",
                "customer_id": "65f0c0ffee00000000001234", "total": "19.99", "note": "as sent"
            }}]}),
        )
        .await;
    stack
        .upload_ok(
            &token,
            &json!({"batch": [
                {"op": "PUT", "table": "other", "id": "fine", "data": {"x": 1}},
                {"op": "PATCH", "table": "orders", "id": order_id, "data": {"placed_at": "last tuesday"}},
            ]}),
        )
        .await;
    stack
        .upload_ok(
            &token,
            &json!({"batch": [{"op": "PATCH", "table": "orders", "id": order_id, "data": {"paid": 0}}]}),
        )
        .await;

    // Assert: types as configured.
    let coll = stack.db.collection::<Document>("orders");
    let stored = eventually(Duration::from_secs(60), "later batch applied", || async {
        let d = coll.find_one(doc! {}).await.expect("find")?;
        (d.get("paid") == Some(&Bson::Boolean(false))).then_some(d)
    })
    .await;
    assert!(
        matches!(stored.get("_id"), Some(Bson::ObjectId(oid)) if oid.to_hex() == order_id),
        "{stored}"
    );
    assert!(
        matches!(stored.get("placed_at"), Some(Bson::DateTime(d)) if d.timestamp_millis() == 1_714_558_830_000),
        "{stored}"
    );
    assert!(
        matches!(stored.get("items"), Some(Bson::Array(a)) if a.len() == 1 && matches!(&a[0], Bson::Document(_))),
        "{stored}"
    );
    assert!(matches!(stored.get("customer_id"), Some(Bson::ObjectId(_))), "{stored}");
    assert!(
        matches!(stored.get("total"), Some(Bson::Decimal128(d)) if d.to_string() == "19.99"),
        "{stored}"
    );
    assert_eq!(stored.get("note"), Some(&Bson::String("as sent".into())));

    // The bad batch is in the dead-letter queue with its reason, op index and field.
    let dead = eventually(Duration::from_secs(30), "dead letter", || async {
        let d = stack.dead_letters().await;
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(dead.len(), 1);
    let (headers, body) = &dead[0];
    assert_eq!(headers["x-uplink-dead-reason"], "permanent");
    assert_eq!(headers["x-uplink-error-class"], "permanent");
    assert_eq!(headers["x-uplink-op-index"], "1");
    assert_eq!(headers["x-uplink-collection"], "orders");
    assert!(headers["x-uplink-error-message"].contains("`placed_at`"), "{headers:?}");
    assert_eq!(headers["x-uplink-attempts"], "1");
    assert_eq!(body["user_id"], "kim");
    assert_eq!(body["ops"].as_array().map(Vec::len), Some(2), "the whole batch is kept");
    assert_eq!(
        stack.workers_sum(|m| m.dead_lettered.with_label_values(&["permanent"]).get()),
        1
    );
    // Values are converted before anything is written, so nothing of the failed batch is.
    assert!(
        stack.docs("other").await.is_empty(),
        "a failed batch leaves nothing half-applied"
    );
    stack.finish().await;
    let _ = std::fs::remove_file(path);
}
