//! What uplink's api and worker must agree on: the upload batch model and its parser, the
//! queue envelope, the partitioning function, the RabbitMQ topology, environment
//! configuration helpers and telemetry set-up.
#![doc = include_str!("../README.md")]

pub mod amqp;
pub mod batch;
pub mod config;
pub mod envelope;
pub mod partition;
pub mod shutdown;
pub mod telemetry;
pub mod topology;
pub mod trace;

pub use batch::{Batch, BatchError, CollectionName, DocId, Limits, Op, OpKind};
pub use envelope::{Envelope, UploadBatch};
