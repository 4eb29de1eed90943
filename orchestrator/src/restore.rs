//! Restoring one partition from the changelog: the latest record of every workflow, running ones into memory,
//! ended ones into the deduplication index; then the outbox check, which re-produces what a crash may have left
//! unproduced (see `partition`).
//!
//! Records are decoded as they are read, and only the latest one per key is kept, so memory follows the number of
//! workflows, not the length of the log.
//!
//! Fencing: every record carries its writer's owner epoch, and each owner writes a marker with a new, higher epoch
//! when it restores. Per key the record of the highest epoch wins (the latest of those); a record of a lower epoch
//! written after it came from an instance that had lost the partition without noticing, and is ignored. When such
//! a zombie record is the latest of its key, the winner is written again, so compaction cannot keep the zombie's.
//! The last marker also says below which changelog offset every outbox was produced: only outboxes after it are
//! checked, and events below the events topic's low watermark (deleted by retention) count as produced.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use edow_engine::Command;
use edow_kafka::{now_millis, produce_all, EVENT_ID_HEADER};
use edow_schemas::contracts::WorkflowState;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::{Message, Offset};

use crate::decode::{decode_retrying, Stalled};
use crate::partition::{
    Early, Marker, PartitionState, Persisted, EARLY_NAME, EPOCH_HEADER, MARKER_KEY,
};
use crate::{Orchestrator, RESERVED_ID_PREFIX};

/// How long a restore waits for an unreachable registry before the orchestrator gives up (and is restarted).
const RESTORE_REGISTRY_BOUND: Duration = Duration::from_secs(60);

/// The latest state of one key as restore reads it.
struct Kept {
    epoch: u64,
    offset: i64,
    /// A zombie's record came after this one: write this one again.
    overwritten_by_zombie: bool,
    state: KeptState,
}

enum KeptState {
    Workflow(Box<Persisted>),
    /// Signals waiting for the workflow's start.
    Early(Early),
    Tombstone,
}

/// What the changelog of one partition says, read once.
#[derive(Default)]
struct Read {
    latest: HashMap<String, Kept>,
    marker: Marker,
    highest_epoch: u64,
    zombies: usize,
    records: usize,
    /// The offset after the last record read.
    end: i64,
}

impl Orchestrator {
    /// Rebuilds one partition's state from the changelog and re-produces what a crash may have left unproduced.
    pub(crate) async fn restore(&mut self, partition: i32) -> anyhow::Result<PartitionState> {
        let started = Instant::now();
        let read = self.read_changelog(partition).await?;
        let mut state = PartitionState {
            epoch: read.highest_epoch.max(read.marker.epoch) + 1,
            ..PartitionState::default()
        };
        let mut changed = BTreeSet::new();
        for kept in read.latest.into_values() {
            let mut persisted = match kept.state {
                KeptState::Workflow(persisted) => *persisted,
                KeptState::Early(early) => {
                    let id = early.signals.first().map(|s| s.signal.workflow_id.clone());
                    if let Some(id) = id {
                        state.early.insert(id, early);
                    }
                    continue;
                }
                KeptState::Tombstone => continue,
            };
            if kept.overwritten_by_zombie {
                changed.insert((partition, persisted.instance.workflow_id.clone()));
            }
            if kept.offset < read.marker.outboxes_done_below {
                persisted.outbox.commands.clear();
            }
            state.put(persisted);
        }
        let (events_low, events_end) = {
            let (kafka, topic) = (self.config.kafka.clone(), self.config.topics.events());
            tokio::task::spawn_blocking(move || {
                kafka
                    .reader()?
                    .fetch_watermarks(&topic, partition, Duration::from_secs(10))
                    .map_err(anyhow::Error::from)
            })
            .await??
        };
        state.events_end = events_end;
        let replayed = self
            .check_outboxes(partition, &mut state, events_low, &mut changed)
            .await?;

        // The new epoch's marker goes first: from here on, whatever an older owner still writes is ignored.
        let now = now_millis();
        let fence = Marker {
            epoch: state.epoch,
            outboxes_done_below: read.marker.outboxes_done_below,
        };
        let marker = self.marker_record(partition, fence, now).await?;
        produce_all(&self.producer, &[marker])
            .await
            .context("writing the partition marker")?;
        self.partitions.insert(partition, state);
        let outcome = self.produce_outputs(&changed, &[], now).await;
        let mut state = self.partitions.remove(&partition).unwrap_or_default();
        outcome?;
        // Every outbox read is produced now; the next restore starts its check after them.
        let checked = Marker {
            epoch: state.epoch,
            outboxes_done_below: read.end,
        };
        let marker = self.marker_record(partition, checked, now).await?;
        produce_all(&self.producer, &[marker])
            .await
            .context("writing the partition marker")?;

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
            epoch = state.epoch,
            running = state.instances.len(),
            ended = state.ended.len(),
            replayed,
            zombies = read.zombies,
            records = read.records,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "restored partition from the changelog"
        );
        Ok(state)
    }

    /// Reads the changelog of `partition` from the beginning, keeping the winning record of each key.
    async fn read_changelog(&self, partition: i32) -> anyhow::Result<Read> {
        let records = {
            let (kafka, topic) = (self.config.kafka.clone(), self.config.topics.state());
            tokio::task::spawn_blocking(move || {
                kafka.read_to_end(&topic, partition, Offset::Beginning)
            })
            .await??
        };
        let give_up_at = Instant::now() + RESTORE_REGISTRY_BOUND;
        let mut read = Read {
            records: records.len(),
            ..Read::default()
        };
        for record in records {
            let Some(key) = record
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned())
            else {
                continue;
            };
            if key.starts_with(RESERVED_ID_PREFIX) && key != MARKER_KEY {
                continue;
            }
            read.end = read.end.max(record.offset() + 1);
            let epoch = epoch_of(&record);
            read.highest_epoch = read.highest_epoch.max(epoch);
            let superseded = read.latest.get(&key).is_some_and(|k| epoch < k.epoch);
            if epoch < read.marker.epoch || superseded {
                read.zombies += 1;
                if let Some(kept) = read.latest.get_mut(&key) {
                    kept.overwritten_by_zombie = true;
                }
                tracing::warn!(
                    partition,
                    offset = record.offset(),
                    epoch,
                    "ignoring a changelog record of {key} written by an instance that had lost the partition"
                );
                continue;
            }
            let offset = record.offset();
            if record.payload().is_none() {
                let kept = Kept {
                    epoch,
                    offset,
                    overwritten_by_zombie: false,
                    state: KeptState::Tombstone,
                };
                read.latest.insert(key, kept);
                continue;
            }
            let decoded =
                decode_retrying::<WorkflowState>(&self.codec, record.payload(), give_up_at)
                    .await
                    .map_err(|Stalled(e)| {
                        anyhow::anyhow!(
                    "restoring partition {partition}: the schema registry stayed unreachable: {e}"
                )
                    })?
                    .map_err(|e| e.to_string());
            if key == MARKER_KEY {
                match decoded.and_then(|r| Marker::from_record(&r)) {
                    Ok(marker) if marker.epoch >= read.marker.epoch => read.marker = marker,
                    Ok(_) => {}
                    Err(e) => tracing::error!(partition, offset, "{e}"),
                }
                continue;
            }
            let kept = decoded.and_then(|r| {
                if r.workflow_name == EARLY_NAME {
                    Early::from_record(&r).map(KeptState::Early)
                } else {
                    Persisted::from_record(&r).map(|p| KeptState::Workflow(Box::new(p)))
                }
            });
            match kept {
                Ok(KeptState::Early(early))
                    if early.signals.iter().all(|s| s.signal.workflow_id == key) =>
                {
                    let kept = Kept {
                        epoch,
                        offset,
                        overwritten_by_zombie: false,
                        state: KeptState::Early(early),
                    };
                    read.latest.insert(key, kept);
                }
                Ok(KeptState::Workflow(persisted)) if persisted.instance.workflow_id == key => {
                    let kept = Kept {
                        epoch,
                        offset,
                        overwritten_by_zombie: false,
                        state: KeptState::Workflow(persisted),
                    };
                    read.latest.insert(key, kept);
                }
                Ok(_) => tracing::error!(
                    partition,
                    offset,
                    "skipping a changelog record whose state names another workflow than its key {key}"
                ),
                Err(e) => tracing::error!(
                    partition,
                    offset,
                    "skipping an unreadable changelog record of {key}: {e}"
                ),
            }
        }
        Ok(read)
    }

    /// Finds which outbox events reached the events topic; marks the outboxes with something missing for
    /// production (adding them to `changed`) and clears the rest. Returns how many are re-produced.
    async fn check_outboxes(
        &self,
        partition: i32,
        state: &mut PartitionState,
        events_low: i64,
        changed: &mut BTreeSet<(i32, String)>,
    ) -> anyhow::Result<usize> {
        let pending: Vec<String> = state
            .instances
            .values()
            .filter(|p| !p.outbox.commands.is_empty())
            .map(|p| p.instance.workflow_id.clone())
            .collect();
        if pending.is_empty() {
            return Ok(0);
        }
        // Events below the low watermark were deleted by retention: they were produced, long ago.
        let from = pending
            .iter()
            .filter_map(|id| state.instances.get(id))
            .map(|p| p.outbox.events_from)
            .min()
            .unwrap_or(state.events_end)
            .max(events_low);
        let produced: HashSet<String> = {
            let (kafka, topic) = (self.config.kafka.clone(), self.config.topics.events());
            tokio::task::spawn_blocking(move || {
                kafka.read_to_end(&topic, partition, Offset::Offset(from))
            })
            .await??
            .iter()
            .filter_map(event_id_of)
            .collect()
        };
        let mut replayed = 0;
        for id in pending {
            let Some(persisted) = state.instances.get_mut(&id) else {
                continue;
            };
            if persisted.outbox.events_from < events_low {
                persisted.outbox.commands.clear();
                continue;
            }
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
                changed.insert((partition, id));
            } else {
                persisted.outbox.commands.clear();
            }
        }
        Ok(replayed)
    }
}

fn epoch_of(message: &OwnedMessage) -> u64 {
    message
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == EPOCH_HEADER))
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn event_id_of(message: &OwnedMessage) -> Option<String> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == EVENT_ID_HEADER)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}
