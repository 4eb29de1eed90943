//! Acting on assignment changes between batches: a revoked partition is forgotten, an assigned one restored from
//! the changelog. While partitions are restored the consumer keeps being polled, so that a long restore neither
//! exceeds `max.poll.interval.ms` (and gets this instance evicted) nor misses a rebalance; what it delivers is
//! held for the next batch, and the loop goes on until no change is left, so that every partition an input was
//! held for is restored before that input is applied.

use std::collections::BTreeSet;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::JoinSet;

use crate::consume::{self, InputConsumer};
use crate::{restore, Orchestrator};

/// Most inputs held while partitions are restored; beyond it the assigned partitions are paused until the
/// restore is done (the consumer is still polled).
const MAX_HELD_WHILE_RESTORING: usize = 5_000;

/// Inputs polled while restoring, and the partitions paused to bound them.
struct Holding<'a> {
    held: &'a mut Vec<OwnedMessage>,
    /// Every (topic, partition) paused, resumed together at the end: librdkafka keeps a partition paused across
    /// a revoke and a new assignment, so resuming only the assignment of the moment could leave one paused.
    paused: BTreeSet<(String, i32)>,
}

impl Holding<'_> {
    fn keep(
        &mut self,
        consumer: &InputConsumer,
        polled: KafkaResult<BorrowedMessage<'_>>,
    ) -> anyhow::Result<()> {
        match polled {
            Ok(message) => self.held.push(message.detach()),
            Err(e) => {
                tracing::warn!("consuming while restoring: {e}");
                return Ok(());
            }
        }
        // Again every thousand: a partition assigned since the last pause is not paused yet.
        let over = self.held.len().saturating_sub(MAX_HELD_WHILE_RESTORING);
        if self.held.len() >= MAX_HELD_WHILE_RESTORING
            && (self.paused.is_empty() || over % 1_000 == 0)
        {
            let assignment = consumer.assignment()?;
            consumer.pause(&assignment)?;
            for element in assignment.elements() {
                self.paused
                    .insert((element.topic().to_string(), element.partition()));
            }
        }
        Ok(())
    }

    fn resume(self, consumer: &InputConsumer) -> anyhow::Result<()> {
        if self.paused.is_empty() {
            return Ok(());
        }
        let mut list = TopicPartitionList::new();
        for (topic, partition) in &self.paused {
            list.add_partition_offset(topic, *partition, Offset::Invalid)?;
        }
        consumer.resume(&list)?;
        Ok(())
    }
}

impl Orchestrator {
    /// Handles the assignment changes recorded since the last batch, and those that arrive meanwhile. Inputs
    /// polled meanwhile are added to `held`. Returns whether anything changed.
    pub(crate) async fn handle_rebalances(
        &mut self,
        consumer: &InputConsumer,
        held: &mut Vec<OwnedMessage>,
    ) -> anyhow::Result<bool> {
        let mut holding = Holding {
            held,
            paused: BTreeSet::new(),
        };
        let mut changed = false;
        loop {
            let changes = consumer.context().take();
            if changes.is_empty() {
                break;
            }
            changed = true;
            // The last batch's outputs land before any partition is read back: a restore that read the events
            // topic while they were in flight would emit them again.
            self.confirm_outputs().await?;
            for (assigned, partitions) in changes {
                if assigned {
                    self.restore(consumer, &mut holding, partitions).await?;
                } else {
                    for partition in partitions {
                        self.forget(partition, "revoked");
                    }
                }
            }
        }
        holding.resume(consumer)?;
        Ok(changed)
    }

    /// Restores `partitions`: each is read concurrently, fenced as soon as it is read (if the group still
    /// assigns it: a marker written by an instance that lost the partition would outrank its new owner's), then
    /// taken over one by one.
    async fn restore(
        &mut self,
        consumer: &InputConsumer,
        holding: &mut Holding<'_>,
        partitions: BTreeSet<i32>,
    ) -> anyhow::Result<()> {
        let mut reads = JoinSet::new();
        for partition in partitions {
            if !self.partitions.contains_key(&partition) {
                reads.spawn(restore::prepare(self.restore_clients(), partition));
            }
        }
        let mut fences = JoinSet::new();
        let mut fenced = Vec::new();
        let triggers = self.config.topics.triggers();
        while !reads.is_empty() || !fences.is_empty() {
            tokio::select! {
                Some(read) = reads.join_next(), if !reads.is_empty() => {
                    let prepared = read??;
                    let partition = prepared.partition();
                    if consume::assigned(consumer, &triggers).contains(&partition) {
                        fences.spawn(restore::fence(self.restore_clients(), prepared));
                    } else {
                        tracing::info!(partition, "revoked while it was being restored; not taken");
                    }
                }
                Some(fence) = fences.join_next(), if !fences.is_empty() => fenced.push(fence??),
                polled = consumer.recv() => {
                    holding.keep(consumer, polled)?;
                    if holding.held.len() >= MAX_HELD_WHILE_RESTORING {
                        // Paused: what still arrives was fetched before; do not spin on it.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }
        for prepared in fenced {
            self.take_over(prepared).await?;
        }
        Ok(())
    }

    fn restore_clients(&self) -> restore::Clients {
        restore::Clients {
            kafka: self.config.kafka.clone(),
            producer: self.producer.clone(),
            codec: self.codec.clone(),
            topics: self.config.topics.clone(),
            keys: self.config.keys.clone(),
        }
    }

    pub(crate) fn forget(&mut self, partition: i32, why: &str) {
        // Its offsets are its new owner's to commit, its markers its new owner's to write.
        self.to_commit.retain(|(_, p), _| *p != partition);
        self.markers_due.remove(&partition);
        let _ = edow_telemetry::metrics::WORKFLOWS_IN_FLIGHT
            .remove_label_values(&[&partition.to_string()]);
        if let Some(state) = self.partitions.remove(&partition) {
            tracing::info!(
                partition,
                running = state.held(),
                ended = state.ended.len(),
                "partition {why}; its state is forgotten"
            );
        }
    }
}
