//! Restoring one partition from the changelog: the latest record of every workflow, running ones into memory,
//! ended ones into the deduplication index; then the outbox check, which re-produces what a crash may have left
//! unproduced (see `partition`).
//!
//! Records are decoded as they are read, and only the latest one per key is kept, so memory follows the number of
//! workflows, not the length of the log.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use edow_engine::Command;
use edow_kafka::{now_millis, EVENT_ID_HEADER};
use edow_schemas::contracts::WorkflowState;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::{Message, Offset};

use crate::decode::{decode_retrying, Stalled};
use crate::partition::{PartitionState, Persisted};
use crate::{Orchestrator, RESERVED_ID_PREFIX};

/// How long a restore waits for an unreachable registry before the orchestrator gives up (and is restarted).
const RESTORE_REGISTRY_BOUND: Duration = Duration::from_secs(60);

impl Orchestrator {
    /// Rebuilds one partition's state from the changelog and re-produces what a crash may have left unproduced.
    pub(crate) async fn restore(&mut self, partition: i32) -> anyhow::Result<PartitionState> {
        let started = Instant::now();
        let kafka = self.config.kafka.clone();
        let state_topic = self.config.topics.state();
        let events_topic = self.config.topics.events();
        let records = {
            let (kafka, topic) = (kafka.clone(), state_topic.clone());
            tokio::task::spawn_blocking(move || {
                kafka.read_to_end(&topic, partition, Offset::Beginning)
            })
            .await??
        };
        let record_count = records.len();
        let give_up_at = Instant::now() + RESTORE_REGISTRY_BOUND;
        let mut latest: HashMap<String, Option<Persisted>> = HashMap::new();
        for record in records {
            let Some(key) = record
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned())
            else {
                continue;
            };
            if key.starts_with(RESERVED_ID_PREFIX) {
                continue;
            }
            if record.payload().is_none() {
                latest.insert(key, None);
                continue;
            }
            let decoded = decode_retrying::<WorkflowState>(
                &self.codec,
                record.payload(),
                give_up_at,
            )
            .await
            .map_err(|Stalled(e)| {
                anyhow::anyhow!(
                    "restoring partition {partition}: the schema registry stayed unreachable: {e}"
                )
            })?;
            match decoded
                .map_err(|e| e.to_string())
                .and_then(|r| Persisted::from_record(&r))
            {
                Ok(persisted) if persisted.instance.workflow_id == key => {
                    latest.insert(key, Some(persisted));
                }
                Ok(_) => tracing::error!(
                    partition,
                    offset = record.offset(),
                    "skipping a changelog record whose state names another workflow than its key {key}"
                ),
                Err(e) => tracing::error!(
                    partition,
                    offset = record.offset(),
                    "skipping an unreadable changelog record of {key}: {e}"
                ),
            }
        }
        let mut state = PartitionState::default();
        for persisted in latest.into_values().flatten() {
            state.put(persisted);
        }
        let (_, events_end) = {
            let (kafka, topic) = (kafka.clone(), events_topic.clone());
            tokio::task::spawn_blocking(move || {
                kafka
                    .reader()?
                    .fetch_watermarks(&topic, partition, Duration::from_secs(10))
                    .map_err(anyhow::Error::from)
            })
            .await??
        };
        state.events_end = events_end;

        // Outboxes: find which of their events reached the events topic; re-produce the rest.
        let pending: Vec<String> = state
            .instances
            .values()
            .filter(|p| !p.outbox.commands.is_empty())
            .map(|p| p.instance.workflow_id.clone())
            .collect();
        let mut replayed = 0;
        if !pending.is_empty() {
            let from = pending
                .iter()
                .filter_map(|id| state.instances.get(id))
                .map(|p| p.outbox.events_from)
                .min()
                .unwrap_or(events_end);
            let produced: HashSet<String> = {
                let (kafka, topic) = (kafka.clone(), events_topic.clone());
                tokio::task::spawn_blocking(move || {
                    kafka.read_to_end(&topic, partition, Offset::Offset(from))
                })
                .await??
                .iter()
                .filter_map(event_id_of)
                .collect()
            };
            let mut changed = BTreeSet::new();
            for id in pending {
                let Some(persisted) = state.instances.get_mut(&id) else {
                    continue;
                };
                let missing = persisted.outbox.commands.iter().any(|c| match c {
                    Command::Emit(e) => !produced.contains(&e.event_id),
                    _ => false,
                });
                if missing {
                    // Produce the whole outbox minus the events already there; duplicate tasks are harmless.
                    persisted.outbox.commands.retain(|c| match c {
                        Command::Emit(e) => !produced.contains(&e.event_id),
                        _ => true,
                    });
                    replayed += 1;
                } else {
                    persisted.outbox.commands.clear();
                }
                changed.insert((partition, id));
            }
            self.partitions.insert(partition, state);
            let outcome = self.produce_outputs(&changed, &[], now_millis()).await;
            state = self.partitions.remove(&partition).unwrap_or_default();
            outcome?;
        }
        let ended: Vec<String> = state
            .instances
            .values()
            .filter(|p| p.instance.is_terminal())
            .map(|p| p.instance.workflow_id.clone())
            .collect();
        for id in &ended {
            state.retire(id);
        }
        tracing::info!(
            partition,
            running = state.instances.len(),
            ended = state.ended.len(),
            replayed,
            records = record_count,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "restored partition from the changelog"
        );
        Ok(state)
    }
}

fn event_id_of(message: &OwnedMessage) -> Option<String> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == EVENT_ID_HEADER)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}
