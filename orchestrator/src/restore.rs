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
use edow_engine::{Command, Millis};
use edow_kafka::{now_millis, produce_all, EVENT_ID_HEADER};
use edow_schemas::contracts::{WorkflowState, WorkflowStatus};
use rdkafka::consumer::Consumer;
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, Offset};

use crate::decode::{decode_retrying, Stalled};
use crate::partition::{
    Early, Marker, Packed, PartitionState, Persisted, EARLY_NAME, EPOCH_HEADER, MARKER_KEY,
    OUTBOX_HEADER, TIMER_HEADER,
};
use crate::produce::marker_record;
use crate::sealing;
use crate::{Orchestrator, RESERVED_ID_PREFIX};
use edow_kafka::Kafka;
use edow_schemas::{Codec, Topics};
use rdkafka::producer::FutureProducer;
use std::sync::Arc;

/// How long a restore waits for an unreachable registry before the orchestrator gives up (and is restarted).
const RESTORE_REGISTRY_BOUND: Duration = Duration::from_secs(60);

/// The latest state of one key as restore reads it.
struct Kept {
    epoch: u64,
    offset: i64,
    /// A zombie's record came after this one: write this one again.
    overwritten_by_zombie: bool,
    /// The record's [`TIMER_HEADER`]: `None` for a record written before it existed.
    timer: Option<Option<Millis>>,
    /// The record's [`OUTBOX_HEADER`].
    outbox: Option<Vec<u8>>,
    state: KeptState,
}

enum KeptState {
    /// The record's bytes, decoded once it is known to win.
    Raw(Vec<u8>),
    /// The record as decoded; its engine state is parsed once it is known to win.
    Workflow(Box<WorkflowState>),
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

/// A partition read back and checked, ready for its owner to take: the state, the workflows whose outboxes
/// (or zombie-overwritten records) must be produced again, and the figures for the log line.
pub(crate) struct Prepared {
    partition: i32,
    state: PartitionState,
    changed: BTreeSet<(i32, String)>,
    /// The changelog offset after the last record read, and the marker found.
    read_end: i64,
    marker: Marker,
    replayed: usize,
    zombies: usize,
    records: usize,
    started: Instant,
}

/// What restoring a partition needs of the orchestrator: its clients, cloned, so that the partitions of one
/// assignment are prepared concurrently.
#[derive(Clone)]
pub(crate) struct Clients {
    pub kafka: Kafka,
    pub producer: FutureProducer,
    pub codec: Arc<Codec>,
    pub topics: Topics,
    pub keys: Option<Arc<edow_auth::sealing::Keyring>>,
}

/// Reads and checks one partition.
pub(crate) async fn prepare(clients: Clients, partition: i32) -> anyhow::Result<Prepared> {
    let started = Instant::now();
    let Clients {
        kafka,
        codec,
        topics,
        keys,
        ..
    } = &clients;
    let keys = keys.as_deref();
    let read = read_changelog(kafka, codec, topics, partition).await?;
    let mut state = PartitionState::default();
    let mut changed = BTreeSet::new();
    let mut ended = Vec::new();
    let give_up_at = Instant::now() + RESTORE_REGISTRY_BOUND;
    let mut highest_epoch = read.highest_epoch;
    for (key, mut kept) in read.latest {
        if let KeptState::Raw(payload) = &kept.state {
            match decode_winner(codec, keys, partition, &key, &kept, payload, give_up_at).await? {
                Some(decoded) => kept.state = decoded,
                None => continue,
            }
        }
        if !matches!(kept.state, KeptState::Tombstone) {
            highest_epoch = highest_epoch.max(kept.epoch);
        }
        let mut persisted = match kept.state {
            KeptState::Workflow(record) => {
                let produced = kept.offset < read.marker.outboxes_done_below;
                if produced && !kept.overwritten_by_zombie && is_ended(record.status) {
                    // Ended, its outbox produced: only the id is needed, for deduplication.
                    ended.push((record.updated_at, key));
                    continue;
                }
                let at_rest = !kept.overwritten_by_zombie
                    && !is_ended(record.status)
                    && (produced || kept.outbox.is_none());
                let parsed = match kept.timer {
                    // Most records: held as read, parsed when an input reaches the workflow.
                    Some(next_timer) if at_rest => {
                        Packed::from_record(*record, next_timer).map(|packed| {
                            state.put_packed(key.clone(), packed);
                            None
                        })
                    }
                    _ => kept
                        .outbox
                        .as_deref()
                        .map(|outbox| sealing::open_outbox(keys, &key, outbox))
                        .transpose()
                        .and_then(|outbox| Persisted::from_record(&record, outbox.as_deref()))
                        .map(Some),
                };
                match parsed {
                    Ok(Some(persisted)) => persisted,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::error!(
                            partition,
                            offset = kept.offset,
                            "skipping the changelog record of {key}: {e}"
                        );
                        continue;
                    }
                }
            }
            KeptState::Early(early) => {
                let id = early.signals.first().map(|s| s.signal.workflow_id.clone());
                if let Some(id) = id {
                    state.early.insert(id, early);
                }
                continue;
            }
            KeptState::Tombstone | KeptState::Raw(_) => continue,
        };
        if kept.overwritten_by_zombie {
            changed.insert((partition, persisted.instance.workflow_id.clone()));
        }
        if kept.offset < read.marker.outboxes_done_below {
            persisted.outbox.commands.clear();
        }
        state.put(persisted);
    }
    state.epoch = highest_epoch.max(read.marker.epoch).saturating_add(1);
    ended.sort();
    for (ended_at, id) in ended {
        state.ended.insert(id, ended_at);
    }
    let (events_low, events_end) = {
        let (kafka, topic) = (kafka.clone(), topics.events());
        tokio::task::spawn_blocking(move || {
            kafka
                .reader()?
                .fetch_watermarks(&topic, partition, Duration::from_secs(10))
                .map_err(anyhow::Error::from)
        })
        .await??
    };
    state.events_end = events_end;
    let replayed = check_outboxes(
        kafka,
        topics,
        partition,
        &mut state,
        events_low,
        &mut changed,
    )
    .await?;
    // What needs no producing is settled now: ended workflows leave memory (oldest end first: the index
    // forgets, and purges, from its front), running ones are packed. The rest is settled once produced.
    let to_produce = |id: &String| changed.contains(&(partition, id.clone()));
    for (_, id) in state.ended_held() {
        if !to_produce(&id) {
            state.retire(&id);
        }
    }
    for id in state.live_ids() {
        if !to_produce(&id) {
            state.settle(&id, None);
        }
    }
    Ok(Prepared {
        partition,
        state,
        changed,
        read_end: read.end,
        marker: read.marker,
        replayed,
        zombies: read.zombies,
        records: read.records,
        started,
    })
}

impl Prepared {
    pub(crate) fn partition(&self) -> i32 {
        self.partition
    }
}

/// Fences a prepared partition: writes the marker of a new epoch, which goes first: from here on, whatever an
/// older owner still writes is ignored. Another instance restoring at the same moment (one evicted mid-restore)
/// may have picked the same epoch; its marker would then stand between what this one read and its own. Then this
/// one fences again, above it. The caller checks, just before, that the group still assigns it the partition: a
/// later marker wins, so one written by an instance that lost the partition would shut its new owner out.
pub(crate) async fn fence(clients: Clients, mut prepared: Prepared) -> anyhow::Result<Prepared> {
    let partition = prepared.partition;
    let (outboxes_done_below, read_end) = (prepared.marker.outboxes_done_below, prepared.read_end);
    let mut epoch = prepared.state.epoch;
    for _ in 0..5 {
        let marker = Marker {
            epoch,
            outboxes_done_below,
        };
        let record = marker_record(
            &clients.codec,
            &clients.topics,
            partition,
            marker,
            now_millis(),
        )
        .await?;
        let written = produce_all(&clients.producer, &[record])
            .await
            .context("writing the partition marker")?;
        let ours = written.first().map_or(i64::MAX, |(_, offset)| *offset);
        let between = {
            let (kafka, topic) = (clients.kafka.clone(), clients.topics.state());
            tokio::task::spawn_blocking(move || {
                kafka.read_to_end(&topic, partition, Offset::Offset(read_end))
            })
            .await??
        };
        let mut rival = None;
        for record in between.iter().filter(|r| r.offset() < ours) {
            if record.key() != Some(MARKER_KEY.as_bytes()) {
                continue;
            }
            if let Ok(Ok(other)) = clients
                .codec
                .decode::<WorkflowState>(record.payload())
                .await
                .map(|r| Marker::from_record(&r))
            {
                rival = rival.max(Some(other.epoch));
            }
        }
        match rival {
            Some(theirs) if theirs >= epoch => {
                tracing::warn!(
                    partition,
                    epoch,
                    theirs,
                    "another instance fenced this partition at the same time; fencing above it"
                );
                epoch = theirs.saturating_add(1);
            }
            _ => {
                prepared.state.epoch = epoch;
                return Ok(prepared);
            }
        }
    }
    anyhow::bail!(
        "partition {partition}: could not take an epoch above racing instances in 5 tries"
    )
}

impl Orchestrator {
    /// Takes a prepared (and fenced) partition: re-produces what a crash left unproduced, records that every
    /// outbox read is produced, and keeps the state.
    pub(crate) async fn take_over(&mut self, prepared: Prepared) -> anyhow::Result<()> {
        let Prepared {
            partition,
            state,
            changed,
            read_end,
            marker: _,
            replayed,
            zombies,
            records,
            started,
        } = prepared;
        let now = now_millis();
        let epoch = state.epoch;
        self.partitions.insert(partition, state);
        self.produce_outputs(&changed, &[], now, crate::traces::Made::Again)
            .await?;
        self.confirm_outputs().await?;
        // Every outbox read, and every record just written again, is produced now; the next restore starts its
        // check after them.
        let rewritten = self.markers_due.remove(&partition).unwrap_or(0);
        let checked = Marker {
            epoch,
            outboxes_done_below: read_end.max(rewritten),
        };
        let checked = self.marker_record(partition, checked, now).await?;
        produce_all(&self.producer, &[checked])
            .await
            .context("writing the partition marker")?;
        let Some(state) = self.partitions.get(&partition) else {
            return Ok(());
        };
        edow_telemetry::metrics::RESTORE_DURATION.observe(started.elapsed().as_secs_f64());
        edow_telemetry::metrics::WORKFLOWS_RESTORED.inc_by(state.held() as u64);
        edow_telemetry::metrics::WORKFLOWS_IN_FLIGHT
            .with_label_values(&[&partition.to_string()])
            .set(state.held() as i64);
        tracing::info!(
            partition,
            epoch,
            running = state.held(),
            ended = state.ended.len(),
            early = state.early.len(),
            replayed,
            zombies,
            records,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "restored partition from the changelog"
        );
        Ok(())
    }
}

/// Records read per chunk while restoring.
const RESTORE_CHUNK: usize = 1_000;

/// Reads the changelog of `partition` from the beginning, keeping the winning record of each key.
async fn read_changelog(
    kafka: &Kafka,
    codec: &Codec,
    topics: &Topics,
    partition: i32,
) -> anyhow::Result<Read> {
    let mut chunks =
        kafka.stream_to_end(&topics.state(), partition, Offset::Beginning, RESTORE_CHUNK);
    let give_up_at = Instant::now() + RESTORE_REGISTRY_BOUND;
    let mut read = Read::default();
    while let Some(chunk) = chunks.recv().await {
        for record in chunk? {
            read.records += 1;
            read_record(codec, partition, record, give_up_at, &mut read).await?;
        }
    }
    Ok(read)
}

async fn read_record(
    codec: &Codec,
    partition: i32,
    record: OwnedMessage,
    give_up_at: Instant,
    read: &mut Read,
) -> anyhow::Result<()> {
    let Some(key) = record
        .key()
        .map(|k| String::from_utf8_lossy(k).into_owned())
    else {
        return Ok(());
    };
    if key.starts_with(RESERVED_ID_PREFIX) && key != MARKER_KEY {
        return Ok(());
    }
    read.end = read.end.max(record.offset() + 1);
    let headers = StateHeaders::of(&record);
    let epoch = headers.epoch();
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
        return Ok(());
    }
    let offset = record.offset();
    if record.payload().is_none() {
        let kept = Kept {
            epoch,
            offset,
            overwritten_by_zombie: false,
            timer: None,
            outbox: None,
            state: KeptState::Tombstone,
        };
        read.latest.insert(key, kept);
        return Ok(());
    }
    if key != MARKER_KEY {
        // Decoded once it is known to win (see `prepare`): most records are superseded by a later one. A value
        // that is not even framed would shadow the good record before it: skipped here already.
        let payload = record.payload().map(<[u8]>::to_vec).unwrap_or_default();
        if edow_schemas::codec::schema_id(&payload).is_none() {
            tracing::error!(
                partition,
                offset,
                "skipping a changelog record of {key} that is not Avro"
            );
            return Ok(());
        }
        let kept = Kept {
            epoch,
            offset,
            overwritten_by_zombie: false,
            timer: headers.timer(),
            outbox: headers.outbox.flatten().map(<[u8]>::to_vec),
            state: KeptState::Raw(payload),
        };
        read.latest.insert(key, kept);
        return Ok(());
    }
    let decoded = decode_state(codec, partition, record.payload(), give_up_at).await?;
    match decoded.and_then(|r| Marker::from_record(&r)) {
        Ok(marker) => {
            // Epochs count only from records that decode: a garbage header cannot move fencing.
            read.highest_epoch = read.highest_epoch.max(epoch).max(marker.epoch);
            if marker.epoch >= read.marker.epoch {
                read.marker = marker;
            }
        }
        Err(e) => tracing::error!(partition, offset, "{e}"),
    }
    Ok(())
}

/// Decodes a changelog value, waiting a bounded time for the registry.
async fn decode_state(
    codec: &Codec,
    partition: i32,
    payload: Option<&[u8]>,
    give_up_at: Instant,
) -> anyhow::Result<Result<WorkflowState, String>> {
    Ok(decode_retrying::<WorkflowState>(codec, payload, give_up_at)
        .await
        .map_err(|Stalled(e)| {
            anyhow::anyhow!(
                "restoring partition {partition}: the schema registry stayed unreachable: {e}"
            )
        })?
        .map_err(|e| e.to_string()))
}

/// Decodes the winning record of `key`: a workflow, early signals, or (unreadable, or naming another key) nothing.
async fn decode_winner(
    codec: &Codec,
    keys: Option<&edow_auth::sealing::Keyring>,
    partition: i32,
    key: &str,
    kept: &Kept,
    payload: &[u8],
    give_up_at: Instant,
) -> anyhow::Result<Option<KeptState>> {
    let decoded = decode_state(codec, partition, Some(payload), give_up_at).await?;
    let state = decoded.and_then(|mut r| {
        sealing::open_state(keys, &mut r)?;
        if r.workflow_name == EARLY_NAME {
            Early::from_record(&r).map(KeptState::Early)
        } else {
            Ok(KeptState::Workflow(Box::new(r)))
        }
    });
    let belongs = match &state {
        Ok(KeptState::Early(early)) => early.signals.iter().all(|s| s.signal.workflow_id == key),
        Ok(KeptState::Workflow(record)) => record.workflow_id == key,
        _ => false,
    };
    match state {
        Ok(state) if belongs => return Ok(Some(state)),
        Ok(_) => tracing::error!(
            partition,
            offset = kept.offset,
            "skipping a changelog record whose state names another workflow than its key {key}"
        ),
        Err(e) => tracing::error!(
            partition,
            offset = kept.offset,
            "skipping an unreadable changelog record of {key}: {e}"
        ),
    }
    Ok(None)
}

/// Finds which outbox events reached the events topic; marks the outboxes with something missing for
/// production (adding them to `changed`) and clears the rest. Returns how many are re-produced.
async fn check_outboxes(
    kafka: &Kafka,
    topics: &Topics,
    partition: i32,
    state: &mut PartitionState,
    events_low: i64,
    changed: &mut BTreeSet<(i32, String)>,
) -> anyhow::Result<usize> {
    let pending = state.with_outbox();
    if pending.is_empty() {
        return Ok(0);
    }
    // Events below the low watermark were deleted by retention: they were produced, long ago.
    let from = pending
        .iter()
        .filter_map(|id| state.live(id))
        .map(|p| p.outbox.events_from)
        .min()
        .unwrap_or(state.events_end)
        .max(events_low);
    // (workflow id, event id) of what is there, for the pending workflows only: ids are matched under their
    // record's key, so one workflow's id can never stand for another's. Streamed: payloads are not kept.
    let wanted: HashSet<&str> = pending.iter().map(String::as_str).collect();
    let mut produced: HashSet<(String, String)> = HashSet::new();
    let mut chunks = kafka.stream_to_end(
        &topics.events(),
        partition,
        Offset::Offset(from),
        RESTORE_CHUNK,
    );
    while let Some(chunk) = chunks.recv().await {
        for record in chunk? {
            let Some(key) = record.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                continue;
            };
            if wanted.contains(key) {
                if let Some(event_id) = event_id_of(&record) {
                    produced.insert((key.to_string(), event_id));
                }
            }
        }
    }
    let is_produced =
        |id: &str, event_id: &str| produced.contains(&(id.to_string(), event_id.to_string()));
    let mut replayed = 0;
    for id in pending {
        let Some(persisted) = state.live_mut(&id) else {
            continue;
        };
        if persisted.outbox.events_from < events_low {
            persisted.outbox.commands.clear();
            continue;
        }
        // Tasks and events of one outbox are produced concurrently, so an event present says nothing of the
        // tasks: what addresses tasks and other workflows is produced again (duplicates are harmless: task ids
        // are deterministic, triggers and signals deduplicated), events only when missing (they must not
        // repeat).
        persisted.outbox.commands.retain(|c| match c {
            Command::Emit(e) => !is_produced(&id, &e.event_id),
            _ => true,
        });
        if !persisted.outbox.commands.is_empty() {
            replayed += 1;
            changed.insert((partition, id));
        }
    }
    Ok(replayed)
}

fn is_ended(status: WorkflowStatus) -> bool {
    matches!(
        status,
        WorkflowStatus::Completed
            | WorkflowStatus::Failed
            | WorkflowStatus::Cancelled
            | WorkflowStatus::Compensated
            | WorkflowStatus::CompensationFailed
            | WorkflowStatus::Filtered
    )
}

/// The headers of a changelog record that restore reads, found in one pass (this runs for every record).
/// Each field: `None` when the record has no such header, `Some(value)` for the first of that name.
#[derive(Default)]
struct StateHeaders<'a> {
    epoch: Option<Option<&'a [u8]>>,
    timer: Option<Option<&'a [u8]>>,
    outbox: Option<Option<&'a [u8]>>,
}

impl<'a> StateHeaders<'a> {
    fn of(message: &'a OwnedMessage) -> StateHeaders<'a> {
        let mut found = StateHeaders::default();
        let Some(headers) = message.headers() else {
            return found;
        };
        // Keys are compared as bytes: one that is not UTF-8 is only another name, never a panic.
        edow_kafka::headers::visit(headers, |key, value| {
            let slot = if key == EPOCH_HEADER.as_bytes() {
                &mut found.epoch
            } else if key == TIMER_HEADER.as_bytes() {
                &mut found.timer
            } else if key == OUTBOX_HEADER.as_bytes() {
                &mut found.outbox
            } else {
                return;
            };
            // The first of a name counts, as a lookup by name would find it.
            if slot.is_none() {
                *slot = Some(value);
            }
        });
        found
    }

    fn epoch(&self) -> u64 {
        self.epoch
            .flatten()
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// The next timer the [`TIMER_HEADER`] names: `None` without the header, `Some(None)` for no timer. A value
    /// that is not a number counts as no header, so the state is parsed for its timer instead.
    fn timer(&self) -> Option<Option<Millis>> {
        let value = self.timer.flatten()?;
        if value.is_empty() {
            return Some(None);
        }
        std::str::from_utf8(value).ok()?.parse().ok().map(Some)
    }
}

fn header<'a>(message: &'a OwnedMessage, name: &str) -> Option<&'a [u8]> {
    let mut found = None;
    edow_kafka::headers::visit(message.headers()?, |key, value| {
        if found.is_none() && key == name.as_bytes() {
            found = Some(value);
        }
    });
    found.flatten()
}

fn event_id_of(message: &OwnedMessage) -> Option<String> {
    header(message, EVENT_ID_HEADER).map(|v| String::from_utf8_lossy(v).into_owned())
}
