//! Applying one batch to MongoDB.
//!
//! Ops apply in order. Contiguous ops on one collection that map to the same command (`PUT`
//! and `PATCH` are both `update` statements, `DELETE` a `delete` statement) go out as one
//! ordered multi-statement command, so a batch of a hundred edits to one table costs one round
//! trip, not a hundred. Only commands MongoDB 6.0 supports are used.
//!
//! When the server supports transactions, the writes and the (user, client) write checkpoint
//! commit together. The checkpoint document doubles as the dedupe ledger: its `checkpoint` is
//! the highest op id applied for that client, so a redelivered batch skips every op at or below
//! it and changes nothing twice.

use mongodb::bson::{doc, Bson, Document};
use mongodb::options::{ClientOptions, WriteConcern};
use mongodb::{Client, ClientSession, Database};
use secrecy::ExposeSecret;
use tokio::sync::OnceCell;
use uplink_common::{OpKind, UploadBatch};

use crate::config::{TransactionMode, WorkerConfig};
use crate::convert::CollectionsConfig;
use crate::errors::{ApplyError, ErrorClass};

/// Most statements sent in one command (MongoDB accepts 100 000, but smaller commands keep
/// each reply and each retry small).
const MAX_STATEMENTS: usize = 1000;

/// What applying a batch did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Ops written (or found already in the requested state).
    pub ops_applied: usize,
    /// Ops skipped because the client's checkpoint showed them applied already.
    pub ops_skipped: usize,
    /// Commands sent.
    pub commands: usize,
    /// Whether the batch committed in a transaction.
    pub transactional: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CommandKind {
    Update,
    Delete,
}

/// One multi-statement command and, for each statement, the index of its op in the batch.
#[derive(Debug)]
struct Command {
    collection: String,
    kind: CommandKind,
    statements: Vec<Document>,
    op_indices: Vec<usize>,
}

impl Command {
    fn to_document(&self, write_concern: Option<&Document>) -> Document {
        let mut cmd = match self.kind {
            CommandKind::Update => {
                doc! { "update": &self.collection, "updates": self.statements.clone(), "ordered": true }
            }
            CommandKind::Delete => {
                doc! { "delete": &self.collection, "deletes": self.statements.clone(), "ordered": true }
            }
        };
        if let Some(wc) = write_concern {
            cmd.insert("writeConcern", wc.clone());
        }
        cmd
    }
}

/// The commands a batch turns into.
#[derive(Debug, Default)]
struct Plan {
    commands: Vec<Command>,
    applied: usize,
    skipped: usize,
}

fn plan(batch: &UploadBatch, collections: &CollectionsConfig, applied_up_to: Option<i64>) -> Result<Plan, ApplyError> {
    let mut plan = Plan::default();
    for (index, op) in batch.ops.iter().enumerate() {
        if let (Some(op_id), Some(done)) = (op.op_id, applied_up_to) {
            if op_id <= done {
                plan.skipped += 1;
                continue;
            }
        }
        let collection = op.collection.as_str();
        let permanent =
            |e: crate::convert::ConversionError| ApplyError::permanent(e.to_string()).at_op(index, collection);
        let id = collections.id(collection, op.id.as_str()).map_err(permanent)?;
        let empty = serde_json::Map::new();
        let row = collections
            .row(collection, op.data.as_ref().unwrap_or(&empty))
            .map_err(permanent)?;
        let (kind, statement) = match op.op {
            OpKind::Put => (
                CommandKind::Update,
                doc! { "q": { "_id": id }, "u": row, "upsert": true },
            ),
            OpKind::Patch if row.is_empty() => {
                // Nothing to set; MongoDB rejects an empty `$set`.
                plan.applied += 1;
                continue;
            }
            OpKind::Patch => (CommandKind::Update, doc! { "q": { "_id": id }, "u": { "$set": row } }),
            OpKind::Delete => (CommandKind::Delete, doc! { "q": { "_id": id }, "limit": 1 }),
        };
        plan.applied += 1;
        match plan.commands.last_mut() {
            Some(last)
                if last.collection == collection && last.kind == kind && last.statements.len() < MAX_STATEMENTS =>
            {
                last.statements.push(statement);
                last.op_indices.push(index);
            }
            _ => plan.commands.push(Command {
                collection: collection.to_owned(),
                kind,
                statements: vec![statement],
                op_indices: vec![index],
            }),
        }
    }
    Ok(plan)
}

/// Writes batches to one MongoDB database.
pub struct Applier {
    client: Client,
    db: Database,
    mode: TransactionMode,
    supports_transactions: OnceCell<bool>,
    write_concern: WriteConcern,
    write_concern_doc: Document,
    checkpoints: String,
    collections: CollectionsConfig,
    upload_errors: Option<String>,
    #[cfg(feature = "fault-injection")]
    panic_on_collection: Option<String>,
}

impl Applier {
    /// Builds the client. It does not wait for the server: the first batch finds out whether it
    /// is reachable (and retries if not).
    pub async fn new(cfg: &WorkerConfig) -> Result<Self, mongodb::error::Error> {
        let mut options = ClientOptions::parse(cfg.mongo_uri.expose_secret()).await?;
        options.app_name.get_or_insert_with(|| "uplink-worker".to_owned());
        // Fail fast while the server is unreachable, so the retry loop (with its metrics and
        // logs) is in charge rather than a silent 30 s driver wait.
        options
            .server_selection_timeout
            .get_or_insert(std::time::Duration::from_secs(5));
        options.connect_timeout.get_or_insert(std::time::Duration::from_secs(5));
        let database = options
            .default_database
            .clone()
            .unwrap_or_else(|| "powersync".to_owned());
        let client = Client::with_options(options)?;
        let (write_concern, write_concern_doc) = match cfg.write_concern.parse::<u32>() {
            Ok(n) => (WriteConcern::nodes(n), doc! { "w": n }),
            Err(_) => (WriteConcern::majority(), doc! { "w": "majority" }),
        };
        Ok(Self {
            db: client.database(&database),
            client,
            mode: cfg.transactions,
            supports_transactions: OnceCell::new(),
            write_concern,
            write_concern_doc,
            checkpoints: cfg.checkpoint_collection.clone(),
            collections: cfg.collections.clone(),
            upload_errors: cfg.upload_errors_collection.clone(),
            #[cfg(feature = "fault-injection")]
            panic_on_collection: cfg.panic_on_collection.clone(),
        })
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Pings the server.
    pub async fn ping(&self) -> Result<(), ApplyError> {
        self.db
            .run_command(doc! { "ping": 1 })
            .await
            .map(|_| ())
            .map_err(|e| ApplyError::from_mongo(&e))
    }

    /// Whether batches commit in transactions. Asks the server once.
    pub async fn transactional(&self) -> Result<bool, ApplyError> {
        if self.mode == TransactionMode::Off {
            return Ok(false);
        }
        let supported = *self
            .supports_transactions
            .get_or_try_init(|| async {
                let hello = self
                    .db
                    .run_command(doc! { "hello": 1 })
                    .await
                    .map_err(|e| ApplyError::from_mongo(&e))?;
                // Transactions need a replica set member or a mongos.
                let supported = hello.get_str("setName").is_ok() || hello.get_str("msg") == Ok("isdbgrid");
                if supported {
                    tracing::info!("MongoDB supports transactions: each batch commits atomically with its write checkpoint");
                } else {
                    tracing::warn!(
                        "MongoDB is a standalone server without transactions: batches apply op by op; a crash mid-batch leaves its prefix applied until redelivery re-applies the batch (ops are idempotent)"
                    );
                }
                Ok::<bool, ApplyError>(supported)
            })
            .await?;
        if !supported && self.mode == TransactionMode::On {
            return Err(ApplyError {
                class: ErrorClass::Transient,
                code: None,
                message: "UPLINK_TRANSACTIONS=on but the server does not support transactions".into(),
                op_index: None,
                collection: None,
            });
        }
        Ok(supported)
    }

    /// Records a rejected batch in the upload-errors collection, keyed by batch id (so a
    /// redelivery or replay does not record it twice), for sync rules to stream back to the
    /// user's devices. Best effort: the dead letter, not this record, is what keeps the batch.
    pub async fn record_upload_error(
        &self,
        batch: &UploadBatch,
        reason: &str,
        error: Option<&ApplyError>,
        message: &str,
    ) {
        let Some(collection) = &self.upload_errors else {
            return;
        };
        let op = error.and_then(|e| e.op_index).and_then(|i| batch.ops.get(i));
        let mut record = doc! {
            "user_id": &batch.user_id,
            "client_id": batch.client_id.clone().map(Bson::String).unwrap_or(Bson::Null),
            "batch_id": batch.batch_id.to_string(),
            "reason": reason,
            "message": message,
            "created_at": mongodb::bson::DateTime::now(),
        };
        if let Some(e) = error {
            record.insert("error_class", e.class.as_str());
            record.insert("error_code", e.code.map(Bson::Int32).unwrap_or(Bson::Null));
            record.insert(
                "op_index",
                e.op_index.map(|i| Bson::Int64(i as i64)).unwrap_or(Bson::Null),
            );
        }
        if let Some(op) = op {
            record.insert("op", op.op.as_str());
            record.insert("collection", op.collection.as_str());
            record.insert("document_id", op.id.as_str());
            record.insert("op_id", op.op_id.map(Bson::Int64).unwrap_or(Bson::Null));
        }
        let command = doc! {
            "update": collection,
            "updates": [{ "q": { "_id": batch.batch_id.to_string() }, "u": record, "upsert": true }],
            "ordered": true,
            "writeConcern": self.write_concern_doc.clone(),
        };
        let result = tokio::time::timeout(std::time::Duration::from_secs(5), self.run_raw(command, None)).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not record the upload error"),
            Err(_) => tracing::warn!("timed out recording the upload error"),
        }
    }

    /// Applies the batch once. The caller retries transient errors.
    pub async fn apply(&self, batch: &UploadBatch) -> Result<Applied, ApplyError> {
        #[cfg(feature = "fault-injection")]
        if let Some(target) = &self.panic_on_collection {
            if batch.ops.iter().any(|op| op.collection.as_str() == target) {
                panic!("fault injection: UPLINK_FAULT_PANIC_ON_COLLECTION={target}");
            }
        }
        if self.transactional().await? {
            let mut session = self
                .client
                .start_session()
                .await
                .map_err(|e| ApplyError::from_mongo(&e))?;
            session
                .start_transaction()
                .write_concern(self.write_concern.clone())
                .await
                .map_err(|e| ApplyError::from_mongo(&e))?;
            match self.apply_in(batch, Some(&mut session)).await {
                Ok(mut applied) => {
                    commit(&mut session).await?;
                    applied.transactional = true;
                    Ok(applied)
                }
                Err(e) => {
                    // Best effort: the server aborts an idle transaction by itself anyway.
                    let _ = session.abort_transaction().await;
                    Err(e)
                }
            }
        } else {
            self.apply_in(batch, None).await
        }
    }

    async fn apply_in(
        &self,
        batch: &UploadBatch,
        mut session: Option<&mut ClientSession>,
    ) -> Result<Applied, ApplyError> {
        let checkpoint_key = match (&batch.client_id, batch.checkpoint()) {
            (Some(client_id), Some(checkpoint)) => {
                Some((checkpoint_id(&batch.user_id, client_id), client_id, checkpoint))
            }
            _ => None,
        };
        let applied_up_to = match &checkpoint_key {
            Some((id, _, _)) => self.read_checkpoint(id, session.as_deref_mut()).await?,
            None => None,
        };
        let plan = plan(batch, &self.collections, applied_up_to)?;
        let write_concern = if session.is_some() {
            None
        } else {
            Some(&self.write_concern_doc)
        };
        for command in &plan.commands {
            self.run(command, write_concern, session.as_deref_mut()).await?;
        }
        if let Some((id, client_id, checkpoint)) = checkpoint_key {
            let mut raise = doc! {
                "update": &self.checkpoints,
                "updates": [{
                    "q": { "_id": &id },
                    // $max: a redelivered or replayed older batch never lowers the checkpoint.
                    "u": {
                        "$max": { "checkpoint": checkpoint },
                        "$set": { "user_id": &batch.user_id, "client_id": client_id },
                    },
                    "upsert": true,
                }],
                "ordered": true,
            };
            if let Some(wc) = write_concern {
                raise.insert("writeConcern", wc.clone());
            }
            self.run_raw(raise, session).await?;
        }
        Ok(Applied {
            ops_applied: plan.applied,
            ops_skipped: plan.skipped,
            commands: plan.commands.len(),
            transactional: false,
        })
    }

    async fn read_checkpoint(&self, id: &str, session: Option<&mut ClientSession>) -> Result<Option<i64>, ApplyError> {
        let coll = self.db.collection::<Document>(&self.checkpoints);
        let found = match session {
            Some(s) => coll.find_one(doc! { "_id": id }).session(s).await,
            None => coll.find_one(doc! { "_id": id }).await,
        }
        .map_err(|e| ApplyError::from_mongo(&e))?;
        Ok(found.and_then(|d| match d.get("checkpoint") {
            Some(Bson::Int64(v)) => Some(*v),
            Some(Bson::Int32(v)) => Some(i64::from(*v)),
            Some(Bson::Double(v)) => Some(*v as i64),
            _ => None,
        }))
    }

    async fn run(
        &self,
        command: &Command,
        write_concern: Option<&Document>,
        session: Option<&mut ClientSession>,
    ) -> Result<(), ApplyError> {
        self.run_raw(command.to_document(write_concern), session)
            .await
            .map_err(|mut e| {
                // A statement index in the reply maps back to the op that failed.
                if let Some(i) = e.op_index {
                    e.op_index = command.op_indices.get(i).copied();
                }
                e.collection = Some(command.collection.clone());
                e
            })
    }

    /// Runs a write command and checks its reply: `writeErrors` and `writeConcernError` are
    /// failures even when the reply says `ok: 1`. A `writeErrors` entry's `index` is returned as
    /// the statement index in `op_index`.
    async fn run_raw(&self, command: Document, session: Option<&mut ClientSession>) -> Result<(), ApplyError> {
        let reply = match session {
            Some(s) => self.db.run_command(command).session(s).await,
            None => self.db.run_command(command).await,
        }
        .map_err(|e| ApplyError::from_mongo(&e))?;
        if let Ok(errors) = reply.get_array("writeErrors") {
            if let Some(Bson::Document(first)) = errors.first() {
                let code = first.get_i32("code").unwrap_or_default();
                let message = first.get_str("errmsg").unwrap_or("write error").to_owned();
                let mut err = ApplyError::from_write_error(code, message);
                err.op_index = first.get_i32("index").ok().and_then(|i| usize::try_from(i).ok());
                return Err(err);
            }
        }
        if let Ok(wce) = reply.get_document("writeConcernError") {
            let code = wce.get_i32("code").unwrap_or_default();
            let message = wce.get_str("errmsg").unwrap_or("write concern error").to_owned();
            return Err(ApplyError::from_write_concern_error(code, message));
        }
        Ok(())
    }
}

/// Commits, retrying a commit whose outcome is unknown (the driver labels those; retrying a
/// commit is safe by design of the protocol).
async fn commit(session: &mut ClientSession) -> Result<(), ApplyError> {
    let mut attempts = 0;
    loop {
        match session.commit_transaction().await {
            Ok(()) => return Ok(()),
            Err(e) if e.contains_label("UnknownTransactionCommitResult") && attempts < 3 => {
                attempts += 1;
                tracing::warn!(error = %e, "commit outcome unknown; retrying the commit");
            }
            Err(e) => return Err(ApplyError::from_mongo(&e)),
        }
    }
}

/// `_id` of a (user, client) checkpoint document: a JSON array, so no user or client id can
/// collide with another pair.
pub fn checkpoint_id(user_id: &str, client_id: &str) -> String {
    serde_json::to_string(&[user_id, client_id]).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use uuid::Uuid;

    fn batch(ops: serde_json::Value) -> UploadBatch {
        let body = json!({"client_id": "c", "batch": ops});
        let parsed =
            uplink_common::Batch::parse(body.to_string().as_bytes(), &uplink_common::Limits::default()).expect("valid");
        UploadBatch {
            batch_id: Uuid::now_v7(),
            user_id: "u".into(),
            client_id: parsed.client_id,
            partition: 0,
            accepted_at_ms: 0,
            ops: parsed.ops,
        }
    }

    #[test]
    fn contiguous_ops_on_one_collection_share_a_command() {
        let b = batch(json!([
            {"op_id": 1, "op": "PUT", "type": "a", "id": "1", "data": {"x": 1}},
            {"op_id": 2, "op": "PATCH", "type": "a", "id": "1", "data": {"y": 2}},
            {"op_id": 3, "op": "DELETE", "type": "a", "id": "2"},
            {"op_id": 4, "op": "DELETE", "type": "a", "id": "3"},
            {"op_id": 5, "op": "PUT", "type": "b", "id": "1", "data": {}},
            {"op_id": 6, "op": "PUT", "type": "a", "id": "4", "data": {}},
        ]));
        let p = plan(&b, &CollectionsConfig::default(), None).expect("plans");
        let shape: Vec<(&str, CommandKind, Vec<usize>)> = p
            .commands
            .iter()
            .map(|c| (c.collection.as_str(), c.kind, c.op_indices.clone()))
            .collect();
        assert_eq!(
            shape,
            vec![
                ("a", CommandKind::Update, vec![0, 1]),
                ("a", CommandKind::Delete, vec![2, 3]),
                ("b", CommandKind::Update, vec![4]),
                ("a", CommandKind::Update, vec![5]),
            ]
        );
        assert_eq!(p.applied, 6);
        assert_eq!(
            p.commands[0].statements[0],
            doc! {"q": {"_id": "1"}, "u": {"x": 1}, "upsert": true}
        );
        assert_eq!(
            p.commands[0].statements[1],
            doc! {"q": {"_id": "1"}, "u": {"$set": {"y": 2}}}
        );
        assert_eq!(p.commands[1].statements[0], doc! {"q": {"_id": "2"}, "limit": 1});
    }

    #[test]
    fn ops_at_or_below_the_checkpoint_are_skipped() {
        let b = batch(json!([
            {"op_id": 4, "op": "PUT", "type": "a", "id": "1", "data": {"x": 1}},
            {"op_id": 5, "op": "PUT", "type": "a", "id": "2", "data": {"x": 1}},
            {"op_id": 6, "op": "PUT", "type": "a", "id": "3", "data": {"x": 1}},
        ]));
        let p = plan(&b, &CollectionsConfig::default(), Some(5)).expect("plans");
        assert_eq!((p.applied, p.skipped), (1, 2));
        assert_eq!(p.commands[0].op_indices, vec![2]);
    }

    #[test]
    fn a_conversion_failure_names_the_op_and_field() {
        let cfg = CollectionsConfig::parse("[collections.a.fields]\nwhen = \"date\"").expect("valid");
        let b = batch(json!([
            {"op_id": 1, "op": "PUT", "type": "a", "id": "1", "data": {"when": "2024-01-01"}},
            {"op_id": 2, "op": "PATCH", "type": "a", "id": "1", "data": {"when": "soon"}},
        ]));
        let err = plan(&b, &cfg, None).expect_err("does not convert");
        assert_eq!(err.class, ErrorClass::Permanent);
        assert_eq!(err.op_index, Some(1));
        assert!(err.message.contains("`when`"), "{}", err.message);
    }

    #[test]
    fn checkpoint_ids_cannot_collide() {
        assert_ne!(checkpoint_id("a/b", "c"), checkpoint_id("a", "b/c"));
        assert_eq!(checkpoint_id("u", "c"), r#"["u","c"]"#);
    }
}
