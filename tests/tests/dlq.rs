//! The dead-letter tool (`uplink-worker dlq …`) against real dead letters: batches the worker
//! dead-lettered because a collection validator refused them, a body it could not decode, and a
//! batch the broker dead-lettered after its delivery limit. Each check compares the tool's
//! answer with what is really in the queues and in the database.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation};
use mongodb::bson::doc;
use serde_json::{json, Value};
use uplink_common::amqp::{header_i64, header_str};
use uplink_common::config::{AmqpConfig, Env};
use uplink_common::envelope::headers as h;
use uplink_common::partition::partition_for;
use uplink_tests::process::binary;
use uplink_tests::stack::broker_channel;
use uplink_tests::{eventually, Stack, StackOptions};
use uplink_worker::deadletter::headers as dh;
use uplink_worker::dlq::{reasons, Dlq, Replayed, Selection, NO_COLLECTION};

const TIMEOUT: Duration = Duration::from_secs(30);
const PARTITIONS: u16 = 4;

async fn start(opts: StackOptions) -> Stack {
    Stack::start(StackOptions {
        partitions: PARTITIONS,
        ..opts
    })
    .await
}

/// The tool, configured from the same variables the stack's workers read.
fn tool(stack: &Stack) -> Dlq {
    let env = Env::from_map(tool_env(stack));
    Dlq::new(&AmqpConfig::from_env(&env).expect("tool config"))
}

fn tool_env(stack: &Stack) -> Vec<(String, String)> {
    vec![
        ("AMQP_URL".into(), uplink_tests::amqp_uri()),
        ("UPLINK_QUEUE_PREFIX".into(), stack.name.clone()),
        ("UPLINK_PARTITIONS".into(), PARTITIONS.to_string()),
    ]
}

/// Creates a collection whose validator refuses documents without `name`.
async fn strict(stack: &Stack, collection: &str) {
    let schema = doc! { "$jsonSchema": { "bsonType": "object", "required": ["name"] } };
    stack
        .db
        .create_collection(collection)
        .validator(schema)
        .await
        .expect("create collection with validator");
}

/// Fixes the cause: drops the collection's validator.
async fn relax(stack: &Stack, collection: &str) {
    stack
        .db
        .run_command(doc! { "collMod": collection, "validator": {} })
        .await
        .expect("collMod");
}

fn put(collection: &str, id: &str, data: Value) -> Value {
    json!({"batch": [{"op": "PUT", "table": collection, "id": id, "data": data}]})
}

async fn upload(stack: &Stack, user: &str, body: &Value) -> String {
    let token = stack.token(user).await;
    let reply = stack.upload_ok(&token, body).await;
    reply["batch_id"].as_str().expect("batch_id in the reply").to_owned()
}

async fn wait_dead(stack: &Stack, n: u32) {
    eventually(TIMEOUT, &format!("{n} dead letter(s)"), || async {
        (stack.dead_letter_depth().await == n).then_some(())
    })
    .await;
}

async fn wait_doc(stack: &Stack, collection: &str, id: &str) -> serde_json::Map<String, Value> {
    eventually(TIMEOUT, &format!("{collection}/{id} written"), || async {
        stack.docs(collection).await.remove(id)
    })
    .await
}

/// Publishes a body the worker cannot decode straight into partition 0.
async fn publish_garbage(stack: &Stack, message_id: &str) {
    let (connection, channel) = broker_channel("uplink-tests-garbage").await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let confirm = channel
        .basic_publish(
            stack.topology().uploads_exchange().as_str().into(),
            "0".into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            b"this is not an envelope",
            BasicProperties::default()
                .with_message_id(message_id.into())
                .with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert_eq!(confirm, Confirmation::Ack(None));
    let _ = connection.close(200, "done".into()).await;
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

async fn listed(tool: &Dlq, selection: &Selection) -> Vec<String> {
    let listing = tool.list(selection).await.expect("list");
    sorted(
        listing
            .dead_letters
            .into_iter()
            .map(|s| s.batch_id.expect("batch id"))
            .collect(),
    )
}

/// Four real dead letters: two users' batches refused by the `strict` validator, one refused by
/// the `audited` validator, and one undecodable message.
struct Fixture {
    stack: Stack,
    alice_strict: String,
    bob_strict: String,
    alice_audited: String,
    garbage: String,
}

impl Fixture {
    async fn new() -> Self {
        let stack = start(StackOptions {
            workers: 1,
            ..StackOptions::default()
        })
        .await;
        strict(&stack, "strict").await;
        strict(&stack, "audited").await;
        let alice_strict = upload(&stack, "alice", &put("strict", "a1", json!({"x": 1}))).await;
        let bob_strict = upload(&stack, "bob", &put("strict", "b1", json!({"x": 2}))).await;
        let alice_audited = upload(&stack, "alice", &put("audited", "a2", json!({"x": 3}))).await;
        let garbage = "not-a-batch-1".to_owned();
        publish_garbage(&stack, &garbage).await;
        wait_dead(&stack, 4).await;
        Self {
            stack,
            alice_strict,
            bob_strict,
            alice_audited,
            garbage,
        }
    }

    fn all(&self) -> Vec<String> {
        sorted(vec![
            self.alice_strict.clone(),
            self.bob_strict.clone(),
            self.alice_audited.clone(),
            self.garbage.clone(),
        ])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_shows_every_dead_letter_once_with_counts_by_reason_and_collection() {
    // Arrange
    let f = Fixture::new().await;
    let tool = tool(&f.stack);

    // Act
    let listing = tool.list(&Selection::default()).await.expect("list");
    let again = tool.list(&Selection::default()).await.expect("list again");

    // Assert: each message exactly once, and the counts match the queue's real contents.
    let ids: Vec<String> = listing
        .dead_letters
        .iter()
        .map(|s| s.batch_id.clone().expect("id"))
        .collect();
    assert_eq!(sorted(ids.clone()), f.all(), "each dead letter once");
    assert_eq!((listing.scanned, listing.matched), (4, 4));
    assert_eq!(
        listing.by_reason,
        BTreeMap::from([(reasons::PERMANENT.to_owned(), 3), (reasons::UNDECODABLE.to_owned(), 1)])
    );
    assert_eq!(
        listing.by_collection,
        BTreeMap::from([
            ("audited".to_owned(), 1),
            ("strict".to_owned(), 2),
            (NO_COLLECTION.to_owned(), 1)
        ])
    );
    let row = |id: &str| {
        listing
            .dead_letters
            .iter()
            .find(|s| s.batch_id.as_deref() == Some(id))
            .expect("row")
    };
    let alice = row(&f.alice_strict);
    assert_eq!(alice.user_id.as_deref(), Some("alice"));
    assert_eq!(alice.reason, reasons::PERMANENT);
    assert_eq!(alice.collection.as_deref(), Some("strict"));
    assert_eq!(alice.error_code, Some(121), "document validation failure");
    assert_eq!(alice.op_index, Some(0));
    assert_eq!(alice.partition, Some(partition_for("alice", PARTITIONS)));
    assert_eq!(alice.replay_count, 0);
    assert!(alice.dead_at_ms.is_some() && alice.attempts.is_some());
    let garbage = row(&f.garbage);
    assert_eq!(garbage.reason, reasons::UNDECODABLE);
    assert_eq!(garbage.partition, Some(0));
    assert_eq!(garbage.collection, None);
    // Listing requeued everything, in the order it was.
    let again_ids: Vec<String> = again
        .dead_letters
        .iter()
        .map(|s| s.batch_id.clone().expect("id"))
        .collect();
    assert_eq!(again_ids, ids, "a second list sees the same messages in the same order");
    assert_eq!(f.stack.dead_letter_depth().await, 4, "listing removes nothing");
    f.stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_selection_flag_picks_exactly_the_matching_dead_letters() {
    // Arrange: the fixture's four, then, some seconds later, a fifth (bob, `audited`).
    let f = Fixture::new().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let late = upload(&f.stack, "bob", &put("audited", "b2", json!({"x": 4}))).await;
    wait_dead(&f.stack, 5).await;
    let tool = tool(&f.stack);
    let sel = |edit: &dyn Fn(&mut Selection)| {
        let mut s = Selection::default();
        edit(&mut s);
        s
    };
    let ids = |v: &[&String]| sorted(v.iter().map(|s| (*s).clone()).collect());

    // Act + Assert, one flag at a time.
    assert_eq!(
        listed(&tool, &sel(&|s| s.reasons = vec!["permanent".into()])).await,
        ids(&[&f.alice_strict, &f.bob_strict, &f.alice_audited, &late]),
        "--reason permanent"
    );
    assert_eq!(
        listed(&tool, &sel(&|s| s.reasons = vec!["undecodable".into()])).await,
        ids(&[&f.garbage]),
        "--reason undecodable"
    );
    assert_eq!(
        listed(&tool, &sel(&|s| s.collections = vec!["strict".into()])).await,
        ids(&[&f.alice_strict, &f.bob_strict]),
        "--collection strict"
    );
    assert_eq!(
        listed(&tool, &sel(&|s| s.collections = vec!["audited".into()])).await,
        ids(&[&f.alice_audited, &late]),
        "--collection audited"
    );
    assert_eq!(
        listed(&tool, &sel(&|s| s.users = vec!["alice".into()])).await,
        ids(&[&f.alice_strict, &f.alice_audited]),
        "--user alice"
    );
    assert_eq!(
        listed(&tool, &sel(&|s| s.users = vec!["bob".into()])).await,
        ids(&[&f.bob_strict, &late]),
        "--user bob"
    );
    assert_eq!(
        listed(&tool, &sel(&|s| s.batch_ids = vec![f.bob_strict.clone()])).await,
        ids(&[&f.bob_strict]),
        "--batch-id"
    );
    assert_eq!(
        listed(&tool, &sel(&|s| s.older_than = Some(Duration::from_secs(2)))).await,
        f.all(),
        "--older-than 2s leaves out the one dead-lettered just now"
    );
    assert!(
        listed(&tool, &sel(&|s| s.older_than = Some(Duration::from_secs(3_600))))
            .await
            .is_empty(),
        "--older-than 1h"
    );
    assert_eq!(
        listed(
            &tool,
            &sel(&|s| {
                s.users = vec!["alice".into()];
                s.collections = vec!["audited".into()];
            })
        )
        .await,
        ids(&[&f.alice_audited]),
        "flags combine"
    );
    let limited = tool
        .list(&sel(&|s| {
            s.reasons = vec!["permanent".into()];
            s.limit = Some(2);
        }))
        .await
        .expect("list");
    assert_eq!(
        (limited.dead_letters.len(), limited.matched),
        (2, 4),
        "--limit bounds the rows, not the counts"
    );
    assert_eq!(f.stack.dead_letter_depth().await, 5, "selecting removes nothing");
    f.stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_replay_reports_the_target_partition_and_changes_nothing() {
    // Arrange: a dead letter whose cause is fixed.
    let stack = start(StackOptions {
        workers: 1,
        ..StackOptions::default()
    })
    .await;
    strict(&stack, "strict").await;
    let batch_id = upload(&stack, "alice", &put("strict", "a1", json!({"x": 1}))).await;
    wait_dead(&stack, 1).await;
    relax(&stack, "strict").await;
    let tool = tool(&stack);
    let before = tool.read(&Selection::default()).await.expect("read");
    let partition = partition_for("alice", PARTITIONS);

    // Act
    let report = tool.replay(&Selection::default(), true).await.expect("dry run");

    // Assert: it says where the batch would go …
    assert!(report.dry_run);
    assert_eq!(
        report.replayed,
        vec![Replayed {
            batch_id: Some(batch_id.clone()),
            user_id: Some("alice".into()),
            partition,
            routing_key: partition.to_string(),
            queue: stack.topology().partition_queue(partition),
            replay_count: 1,
        }]
    );
    assert!(report.failed.is_empty() && report.aborted.is_none());
    // … and nothing moved: the dead letter is still there, unchanged, and no copy was applied.
    // A later batch of the same user (same partition) applying proves the partition drained.
    assert_eq!(stack.dead_letter_depth().await, 1);
    let after = tool.read(&Selection::default()).await.expect("read");
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].summary, before[0].summary);
    assert_eq!(after[0].body, before[0].body);
    upload(&stack, "alice", &put("todos", "t1", json!({"name": "later"}))).await;
    wait_doc(&stack, "todos", "t1").await;
    assert!(
        stack.docs("strict").await.is_empty(),
        "a dry run must not apply the batch"
    );
    assert_eq!(stack.queue_depths().await, vec![0; PARTITIONS as usize]);
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_after_fixing_the_cause_applies_the_batch_under_its_id_with_replay_count_one() {
    // Arrange: a dead letter, its cause fixed, and no worker running so the copy can be seen.
    let mut stack = start(StackOptions {
        workers: 1,
        ..StackOptions::default()
    })
    .await;
    strict(&stack, "strict").await;
    let batch_id = upload(&stack, "alice", &put("strict", "a1", json!({"x": 1}))).await;
    wait_dead(&stack, 1).await;
    relax(&stack, "strict").await;
    stack.stop_worker(0).await;
    let tool = tool(&stack);
    let dead = tool.read(&Selection::default()).await.expect("read").remove(0);
    let partition = partition_for("alice", PARTITIONS);

    // Act
    let report = tool
        .replay(
            &Selection {
                batch_ids: vec![batch_id.clone()],
                ..Selection::default()
            },
            false,
        )
        .await
        .expect("replay");

    // Assert: moved from the dead-letter queue to its partition …
    assert_eq!(report.replayed.len(), 1, "{report:?}");
    assert!(report.failed.is_empty() && report.aborted.is_none(), "{report:?}");
    assert_eq!(stack.dead_letter_depth().await, 0);
    let mut expected_depths = vec![0; PARTITIONS as usize];
    expected_depths[partition as usize] = 1;
    assert_eq!(stack.queue_depths().await, expected_depths);
    // … as the same batch, counted as a replay, without the reason headers.
    // (basic.get is refused on single-active-consumer queues; a consumer takes one instead.)
    let (connection, ch) = broker_channel("uplink-tests-peek").await;
    ch.basic_qos(1, BasicQosOptions::default()).await.expect("qos");
    let mut consumer = ch
        .basic_consume(
            stack.topology().partition_queue(partition).as_str().into(),
            "peek".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let copy = tokio::time::timeout(TIMEOUT, consumer.next())
        .await
        .expect("a delivery in time")
        .expect("the replayed copy")
        .expect("delivery");
    let headers = copy.properties.headers().as_ref();
    assert_eq!(
        copy.properties.message_id().as_ref().map(|m| m.as_str()),
        Some(batch_id.as_str())
    );
    assert_eq!(header_i64(headers, h::REPLAY_COUNT), Some(1));
    assert_eq!(header_str(headers, h::USER_ID).as_deref(), Some("alice"));
    assert_eq!(
        header_str(headers, h::TRACEPARENT).as_deref(),
        dead.headers[h::TRACEPARENT].as_str()
    );
    for gone in [
        dh::REASON,
        dh::ERROR_CODE,
        dh::ERROR_MESSAGE,
        dh::ORIGINAL_QUEUE,
        "x-death",
    ] {
        assert!(!headers.is_some_and(|t| t.contains_key(gone)), "{gone} kept");
    }
    assert_eq!(copy.properties.delivery_mode(), &Some(2));
    assert_eq!(
        serde_json::from_slice::<Value>(&copy.data).expect("json body"),
        dead.body
    );
    copy.nack(BasicNackOptions {
        requeue: true,
        multiple: false,
    })
    .await
    .expect("requeue");
    let _ = connection.close(200, "done".into()).await;
    // … which a worker then applies.
    stack.start_worker().await;
    let doc = wait_doc(&stack, "strict", "a1").await;
    assert_eq!(doc["x"], 1);
    eventually(TIMEOUT, "partition drained", || async {
        (stack.queue_depths().await == vec![0; PARTITIONS as usize]).then_some(())
    })
    .await;
    assert_eq!(stack.dead_letter_depth().await, 0, "not dead-lettered again");
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_batch_that_already_applied_changes_nothing() {
    // Arrange: the same dead letter twice (what a tool crash between the replay's confirm and
    // the dead letter's removal leaves behind), the cause fixed, one copy replayed and applied,
    // then a newer change from the same client to the same document.
    let stack = start(StackOptions {
        workers: 1,
        ..StackOptions::default()
    })
    .await;
    strict(&stack, "strict").await;
    let first = json!({"client_id": "c1", "batch": [{"op_id": 1, "op": "PUT", "type": "strict", "id": "a1", "data": {"x": 1}}]});
    upload(&stack, "alice", &first).await;
    wait_dead(&stack, 1).await;
    duplicate_dead_letter(&stack).await;
    wait_dead(&stack, 2).await;
    relax(&stack, "strict").await;
    let tool = tool(&stack);
    let once = tool
        .replay(
            &Selection {
                limit: Some(1),
                ..Selection::default()
            },
            false,
        )
        .await
        .expect("replay one");
    assert_eq!(once.replayed.len(), 1, "{once:?}");
    wait_doc(&stack, "strict", "a1").await;
    let newer = json!({"client_id": "c1", "batch": [{"op_id": 2, "op": "PATCH", "type": "strict", "id": "a1", "data": {"x": 2, "name": "n"}}]});
    upload(&stack, "alice", &newer).await;
    eventually(TIMEOUT, "newer change applied", || async {
        (stack.docs("strict").await.get("a1").is_some_and(|d| d["x"] == 2)).then_some(())
    })
    .await;
    let documents = stack.docs("strict").await;
    let checkpoints = stack.docs("checkpoints").await;
    let skipped = stack.workers[0].metrics.ops_skipped.get();

    // Act: replay the other copy.
    let twice = tool.replay(&Selection::default(), false).await.expect("replay again");

    // Assert: it was replayed, and once a later batch of the same user (same partition) has
    // applied, the worker had skipped it: nothing changed, the newer change was not reverted.
    assert_eq!(twice.replayed.len(), 1, "{twice:?}");
    upload(&stack, "alice", &put("todos", "t1", json!({"name": "barrier"}))).await;
    wait_doc(&stack, "todos", "t1").await;
    assert_eq!(stack.docs("strict").await, documents);
    assert_eq!(stack.docs("checkpoints").await, checkpoints);
    assert_eq!(
        stack.workers[0].metrics.ops_skipped.get(),
        skipped + 1,
        "the replayed op was skipped"
    );
    assert_eq!(stack.dead_letter_depth().await, 0);
    stack.finish().await;
}

/// Copies the only dead letter back into the dead-letter queue, leaving the original.
async fn duplicate_dead_letter(stack: &Stack) {
    let (connection, ch) = broker_channel("uplink-tests-duplicate").await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let original = ch
        .basic_get(
            stack.topology().dead_queue().as_str().into(),
            BasicGetOptions { no_ack: false },
        )
        .await
        .expect("get")
        .expect("a dead letter");
    let confirm = ch
        .basic_publish(
            stack.topology().dead_exchange().as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            &original.data,
            original.properties.clone(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert_eq!(confirm, Confirmation::Ack(None));
    original
        .nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await
        .expect("requeue");
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_writes_one_json_line_per_selected_dead_letter_and_removes_nothing() {
    // Arrange
    let f = Fixture::new().await;
    let tool = tool(&f.stack);
    let mut out = Vec::new();

    // Act
    let count = tool
        .export(
            &Selection {
                reasons: vec!["permanent".into()],
                ..Selection::default()
            },
            &mut out,
        )
        .await
        .expect("export");

    // Assert
    let text = String::from_utf8(out).expect("utf-8");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!((count, lines.len()), (3, 3));
    let mut ids = Vec::new();
    for line in &lines {
        let id = line["batch_id"].as_str().expect("batch_id").to_owned();
        assert_eq!(line["properties"]["message_id"], id.as_str());
        assert_eq!(line["headers"][dh::REASON], "permanent");
        assert_eq!(line["headers"][dh::ERROR_CODE], 121);
        assert_eq!(line["body"]["schema"], "uplink.batch.v1");
        assert_eq!(line["body"]["batch_id"], id.as_str(), "the body, as JSON");
        ids.push(id);
    }
    assert_eq!(
        sorted(ids),
        sorted(vec![
            f.alice_strict.clone(),
            f.bob_strict.clone(),
            f.alice_audited.clone()
        ])
    );
    assert_eq!(f.stack.dead_letter_depth().await, 4, "export removes nothing");
    assert_eq!(listed(&tool, &Selection::default()).await, f.all());
    f.stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_only_the_selected_dead_letters_and_nothing_unconfirmed() {
    // Arrange
    let f = Fixture::new().await;
    let tool = tool(&f.stack);
    let bob = Selection {
        users: vec!["bob".into()],
        ..Selection::default()
    };
    let alice_permanent = Selection {
        users: vec!["alice".into()],
        reasons: vec!["permanent".into()],
        ..Selection::default()
    };

    // Act 1: declined, with a selection and without one.
    let mut asked = Vec::new();
    let declined = tool
        .purge(&bob, |plan| {
            asked.extend(plan.selected.iter().map(|s| s.batch_id.clone().expect("id")));
            false
        })
        .await
        .expect("purge");
    let mut asked_all = 0;
    let declined_all = tool
        .purge(&Selection::default(), |plan| {
            asked_all = plan.selected.len();
            false
        })
        .await
        .expect("purge");

    // Assert 1: asked about exactly the selection, removed nothing.
    assert_eq!(asked, vec![f.bob_strict.clone()]);
    assert_eq!((declined.confirmed, declined.purged), (false, 0));
    assert_eq!(asked_all, 4, "no selection: asks about everything, and says how many");
    assert_eq!(declined_all.purged, 0);
    assert_eq!(f.stack.dead_letter_depth().await, 4);

    // Act 2: confirmed.
    let purged = tool.purge(&alice_permanent, |_| true).await.expect("purge");

    // Assert 2: exactly those two are gone, the others remain.
    assert_eq!((purged.selected, purged.purged), (2, 2));
    assert_eq!(
        listed(&tool, &Selection::default()).await,
        sorted(vec![f.bob_strict.clone(), f.garbage.clone()])
    );
    assert_eq!(f.stack.dead_letter_depth().await, 2);
    f.stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_lists_dead_letters_as_json_without_mongo_uri() {
    // Arrange
    let f = Fixture::new().await;

    // Act
    let output = Command::new(binary("uplink-worker"))
        .args(["dlq", "list", "--json"])
        .envs(tool_env(&f.stack))
        .env_remove("MONGO_URI")
        .output()
        .expect("uplink-worker runs");

    // Assert
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let listing: Value = serde_json::from_slice(&output.stdout).expect("stdout is JSON");
    let ids: Vec<String> = listing["dead_letters"]
        .as_array()
        .expect("dead_letters")
        .iter()
        .map(|d| d["batch_id"].as_str().expect("batch_id").to_owned())
        .collect();
    assert_eq!(sorted(ids), f.all());
    assert_eq!(listing["by_reason"], json!({"permanent": 3, "undecodable": 1}));
    assert_eq!(
        listing["by_collection"],
        json!({"audited": 1, "strict": 2, NO_COLLECTION: 1})
    );
    assert_eq!(f.stack.dead_letter_depth().await, 4);
    f.stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_refuses_to_purge_without_yes_when_stdin_is_not_a_terminal() {
    // Arrange
    let f = Fixture::new().await;
    let purge = |extra: &[&str]| {
        let mut cmd = Command::new(binary("uplink-worker"));
        cmd.args(["dlq", "purge", "--user", "bob"])
            .args(extra)
            .envs(tool_env(&f.stack));
        cmd
    };

    // Act 1: `yes` piped in is not a confirmation.
    let mut child = purge(&[])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"yes\n")
        .expect("write stdin");
    let refused = child.wait_with_output().expect("finishes");

    // Assert 1
    assert!(
        !refused.status.success(),
        "purge without --yes must fail when stdin is not a terminal"
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--yes") && stderr.contains("1 dead letter"), "{stderr}");
    assert_eq!(f.stack.dead_letter_depth().await, 4);

    // Act 2
    let done = purge(&["--yes"]).stdin(Stdio::null()).output().expect("runs");

    // Assert 2: only bob's dead letter went.
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    let tool = tool(&f.stack);
    assert_eq!(
        listed(&tool, &Selection::default()).await,
        sorted(vec![f.alice_strict.clone(), f.alice_audited.clone(), f.garbage.clone()])
    );
    f.stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_broker_dead_lettered_at_its_delivery_limit_is_listed_and_replayed_to_its_partition() {
    // Arrange: no worker; the test itself refuses the batch until the broker gives up on it.
    let limit = vec![("UPLINK_DELIVERY_LIMIT".to_owned(), "1".to_owned())];
    let mut stack = start(StackOptions {
        workers: 0,
        api_env: limit.clone(),
        worker_env: limit,
        ..StackOptions::default()
    })
    .await;
    let batch_id = upload(&stack, "alice", &put("todos", "t1", json!({"name": "eventually"}))).await;
    let partition = partition_for("alice", PARTITIONS);
    let queue = stack.topology().partition_queue(partition);
    let (connection, ch) = broker_channel("uplink-tests-refuser").await;
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "refuser".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let refuse = tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await
                .expect("nack");
        }
    });
    wait_dead(&stack, 1).await;
    let _ = connection.close(200, "done".into()).await;
    let _ = refuse.await;
    let tool = tool(&stack);

    // Act 1
    let listing = tool
        .list(&Selection {
            reasons: vec![reasons::DELIVERY_LIMIT.into()],
            ..Selection::default()
        })
        .await
        .expect("list");

    // Assert 1: the reason, partition and queue come from the broker's x-death record.
    assert_eq!(listing.dead_letters.len(), 1, "{listing:?}");
    let dead = &listing.dead_letters[0];
    assert_eq!(dead.batch_id.as_deref(), Some(batch_id.as_str()));
    assert_eq!(dead.reason, reasons::DELIVERY_LIMIT);
    assert_eq!(dead.original_queue.as_deref(), Some(queue.as_str()));
    assert_eq!(dead.partition, Some(partition));
    assert_eq!(dead.user_id.as_deref(), Some("alice"));
    assert_eq!(dead.collection.as_deref(), Some("todos"));
    assert!(dead.dead_at_ms.is_some());

    // Act 2
    let report = tool.replay(&Selection::default(), false).await.expect("replay");
    stack.start_worker().await;

    // Assert 2
    assert_eq!(
        report.replayed.iter().map(|r| r.partition).collect::<Vec<_>>(),
        vec![partition]
    );
    assert_eq!(wait_doc(&stack, "todos", "t1").await["name"], "eventually");
    assert_eq!(stack.dead_letter_depth().await, 0);
    stack.finish().await;
}
