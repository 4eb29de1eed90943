//! The consuming edge: the group consumer's rebalance notes, and collecting a batch of inputs. Assignment and
//! revocation are only recorded in the callbacks; the loop acts on them between batches, so a partition is never
//! restored or forgotten while a batch of it is being applied.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use edow_telemetry::lag::LagReporter;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureProducer;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Message, TopicPartitionList};

/// Partition changes seen by the consumer, handled between batches. Before partitions are given up, every
/// output produced so far is flushed: their next owner reads the events topic to find what is missing, and an
/// event still in flight would be emitted twice. Also exports the member's consumer lag from librdkafka's
/// statistics.
pub struct RebalanceTracker {
    changes: Mutex<Vec<(bool, BTreeSet<i32>)>>,
    producer: FutureProducer,
    flush_failed: Mutex<Option<String>>,
    lag: LagReporter,
}

/// How long a revocation waits for the outputs in flight.
const FLUSH_ON_REVOKE: Duration = Duration::from_secs(30);

impl RebalanceTracker {
    pub fn new(producer: FutureProducer, group: &str) -> RebalanceTracker {
        RebalanceTracker {
            changes: Mutex::default(),
            producer,
            flush_failed: Mutex::default(),
            lag: LagReporter::new(group),
        }
    }

    /// Why outputs could not be flushed before a revocation, if they could not: the process must stop, so that
    /// a restart produces them again from the changelog.
    pub fn flush_failure(&self) -> Option<String> {
        self.flush_failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn record(&self, assigned: bool, list: &TopicPartitionList) {
        let partitions: BTreeSet<i32> = list.elements().iter().map(|e| e.partition()).collect();
        self.changes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((assigned, partitions));
    }

    /// The changes since the last call: (assigned or revoked, partitions), in order.
    pub fn take(&self) -> Vec<(bool, BTreeSet<i32>)> {
        std::mem::take(&mut *self.changes.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl ClientContext for RebalanceTracker {
    fn stats(&self, statistics: Statistics) {
        self.lag.report(&statistics);
    }
}

impl ConsumerContext for RebalanceTracker {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            use rdkafka::producer::Producer;
            if let Err(e) = self.producer.flush(FLUSH_ON_REVOKE) {
                *self.flush_failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!(
                    "the outputs in flight were not acknowledged within {FLUSH_ON_REVOKE:?} of a revocation: {e}"
                ));
            }
            self.record(false, list);
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            self.record(true, list);
        }
    }
}

pub type InputConsumer = StreamConsumer<RebalanceTracker>;

/// Waits up to `tick` for the first input, then takes what else is ready, up to `max_batch`.
pub async fn collect_batch(
    consumer: &InputConsumer,
    tick: Duration,
    max_batch: usize,
) -> Vec<OwnedMessage> {
    let mut batch = Vec::new();
    match tokio::time::timeout(tick, consumer.recv()).await {
        Ok(Ok(msg)) => batch.push(msg.detach()),
        Ok(Err(e)) => {
            tracing::warn!("consuming: {e}");
            return batch;
        }
        Err(_) => return batch,
    }
    while batch.len() < max_batch {
        match tokio::time::timeout(Duration::ZERO, consumer.recv()).await {
            Ok(Ok(msg)) => batch.push(msg.detach()),
            _ => break,
        }
    }
    batch
}

/// The partitions of `topic` this consumer is assigned now, as librdkafka knows it.
pub fn assigned(consumer: &InputConsumer, topic: &str) -> BTreeSet<i32> {
    use rdkafka::consumer::Consumer;
    consumer
        .assignment()
        .map(|list| {
            list.elements()
                .iter()
                .filter(|e| e.topic() == topic)
                .map(|e| e.partition())
                .collect()
        })
        .unwrap_or_default()
}

/// Moves the consumer back to `message`, so a batch that could not be applied is read again. If it cannot, the
/// caller must not go on: a later commit would skip the inputs never applied.
pub fn rewind(consumer: &InputConsumer, message: &OwnedMessage) -> anyhow::Result<()> {
    use anyhow::Context;
    use rdkafka::consumer::Consumer;
    let to = rdkafka::Offset::Offset(message.offset());
    consumer
        .seek(
            message.topic(),
            message.partition(),
            to,
            Duration::from_secs(5),
        )
        .with_context(|| {
            format!(
                "rewinding {}/{} to offset {} after a registry stall",
                message.topic(),
                message.partition(),
                message.offset()
            )
        })
}
