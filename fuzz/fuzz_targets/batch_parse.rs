//! Feeds arbitrary bytes to the upload parser, as a hostile client could. The parser must never
//! panic, and every batch it accepts must reach the worker unchanged through the queue envelope.
//! Each input is parsed under the default limits and under tight ones with an allowlist, so the
//! limit checks are fuzzed too.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use uplink_common::{Batch, Envelope, Limits, OpKind, UploadBatch};

fuzz_target!(|data: &[u8]| {
    let tight = Limits {
        max_body_bytes: 2048,
        max_ops: 3,
        max_id_bytes: 8,
        max_depth: 3,
        max_field_name_bytes: 6,
        allowed_collections: Some(BTreeSet::from(["todos".to_owned()])),
    };
    for limits in [Limits::default(), tight] {
        if let Ok(batch) = Batch::parse(data, &limits) {
            check(&batch, &limits);
        }
    }
});

fn check(batch: &Batch, limits: &Limits) {
    assert!(batch.ops.len() <= limits.max_ops);
    for op in &batch.ops {
        assert_eq!(op.data.is_none(), op.op == OpKind::Delete);
        assert!(op.id.as_str().len() <= limits.max_id_bytes);
        if let Some(allowed) = &limits.allowed_collections {
            assert!(allowed.contains(op.collection.as_str()));
        }
    }
    let sent = Envelope::V1(UploadBatch {
        batch_id: uuid::Uuid::nil(),
        user_id: "user-1".into(),
        client_id: batch.client_id.clone(),
        partition: 0,
        accepted_at_ms: 0,
        ops: batch.ops.clone(),
    });
    let received = Envelope::from_slice(&sent.to_vec()).expect("the worker can read what the api sent");
    assert_eq!(received, sent, "the batch changed on its way through the queue");
}
