//! The RabbitMQ topology: names and arguments of the upload exchange, the partition queues and
//! the dead-letter exchange and queue. Both binaries declare it at start-up; declarations are
//! idempotent as long as every replica passes the same arguments, which this module ensures.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use crate::config::AmqpConfig;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    pub prefix: String,
    pub partitions: u16,
    pub delivery_limit: u32,
}

impl Topology {
    pub fn new(cfg: &AmqpConfig) -> Self {
        Self {
            prefix: cfg.prefix.clone(),
            partitions: cfg.partitions,
            delivery_limit: cfg.delivery_limit,
        }
    }

    /// Direct exchange the api publishes every batch to.
    pub fn uploads_exchange(&self) -> String {
        format!("{}.uploads", self.prefix)
    }

    /// Queue of partition `i`.
    pub fn partition_queue(&self, i: u16) -> String {
        format!("{}.uploads.{i}", self.prefix)
    }

    /// Routing key binding partition `i`'s queue to the uploads exchange.
    pub fn routing_key(&self, i: u16) -> String {
        i.to_string()
    }

    /// Fanout exchange receiving dead letters (from the broker and from workers).
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// Queue holding dead letters until an operator inspects, replays or purges them.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// Which partition a queue name belongs to, if it is one of ours.
    pub fn partition_of_queue(&self, queue: &str) -> Option<u16> {
        let rest = queue.strip_prefix(&self.prefix)?.strip_prefix(".uploads.")?;
        let i: u16 = rest.parse().ok()?;
        (i < self.partitions).then_some(i)
    }

    fn partition_queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        // Quorum queues replicate across the cluster (an acknowledged publish survives the loss
        // of a minority of nodes) and count deliveries, which the delivery limit needs.
        args.insert("x-queue-type".into(), long_string("quorum"));
        // One consumer at a time per partition keeps each user's batches in order; the other
        // workers' consumers wait as hot standbys and take over when the active one goes.
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        // A batch that kills every worker that takes it is dead-lettered after this many
        // deliveries rather than blocking its partition forever.
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        args.insert("x-dead-letter-exchange".into(), long_string(&self.dead_exchange()));
        // At-least-once dead-lettering: the broker keeps the message until the dead-letter
        // queue has confirmed it. It requires the reject-publish overflow behaviour.
        args.insert("x-dead-letter-strategy".into(), long_string("at-least-once"));
        args.insert("x-overflow".into(), long_string("reject-publish"));
        args
    }

    /// Declares everything, idempotently.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable_exchange = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.dead_exchange().as_str().into(),
                ExchangeKind::Fanout,
                durable_exchange,
                FieldTable::default(),
            )
            .await?;
        let mut dead_args = FieldTable::default();
        dead_args.insert("x-queue-type".into(), long_string("quorum"));
        channel
            .queue_declare(self.dead_queue().as_str().into(), durable_queue, dead_args)
            .await?;
        channel
            .queue_bind(
                self.dead_queue().as_str().into(),
                self.dead_exchange().as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.uploads_exchange().as_str().into(),
                ExchangeKind::Direct,
                durable_exchange,
                FieldTable::default(),
            )
            .await?;
        for i in 0..self.partitions {
            let queue = self.partition_queue(i);
            channel
                .queue_declare(queue.as_str().into(), durable_queue, self.partition_queue_arguments())
                .await?;
            channel
                .queue_bind(
                    queue.as_str().into(),
                    self.uploads_exchange().as_str().into(),
                    self.routing_key(i).as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology() -> Topology {
        Topology {
            prefix: "uplink".into(),
            partitions: 4,
            delivery_limit: 5,
        }
    }

    #[test]
    fn names_follow_the_documented_scheme() {
        let t = topology();
        assert_eq!(t.uploads_exchange(), "uplink.uploads");
        assert_eq!(t.partition_queue(3), "uplink.uploads.3");
        assert_eq!(t.dead_exchange(), "uplink.dead");
        assert_eq!(t.partition_of_queue("uplink.uploads.3"), Some(3));
        assert_eq!(t.partition_of_queue("uplink.uploads.4"), None);
        assert_eq!(t.partition_of_queue("other.uploads.1"), None);
    }
}
