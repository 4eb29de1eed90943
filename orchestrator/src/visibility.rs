//! The visibility index: every workflow of every partition, with its lifecycle events, so that any orchestrator
//! instance answers reads about any workflow, whoever owns it. Fed by its own reader of `edow.state` (the latest
//! state of each workflow; tombstones remove it) and `edow.events`, all partitions, into an embedded SQLite
//! database; the read positions are stored in the same transaction as what they brought, so a restart with a kept
//! file resumes where it stopped. Eventually consistent: a workflow started a moment ago may not be in it yet.
//!
//! Bounded: ended workflows and their events leave it after `retention`; a running workflow's events beyond
//! [`MAX_EVENTS_PER_WORKFLOW`] are not kept (the state still is). Why SQLite: indexed filters and pages over
//! millions of rows on disk, not in the heap, with one file to keep or throw away (docs/architecture.md).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use edow_kafka::{now_millis, Kafka};
use edow_schemas::contracts::{LifecycleEvent, WorkflowState};
use edow_schemas::{Codec, Topics};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use crate::sealing;
use crate::RESERVED_ID_PREFIX;
use edow_auth::sealing::Keyring;

/// Most lifecycle events kept per workflow.
pub const MAX_EVENTS_PER_WORKFLOW: i64 = 10_000;
/// Most records applied per transaction.
const BATCH: usize = 2_000;
/// How often ended workflows past the retention are removed.
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// How long the feeder finds nothing to read before it counts as caught up, whatever the end offsets said.
const IDLE_IS_CAUGHT_UP: Duration = Duration::from_secs(3);

/// A workflow as the index holds it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkflowRow {
    pub id: String,
    pub name: String,
    pub version: i32,
    pub status: String,
    pub input: serde_json::Value,
    pub output: Option<serde_json::Value>,
    pub error: Option<String>,
    pub correlation_id: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    /// Steps running now, with what each is doing.
    pub running_steps: Vec<RunningStep>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RunningStep {
    pub step: String,
    pub doing: String,
}

/// One lifecycle event of a workflow.
#[derive(Debug, Clone, Serialize)]
pub struct EventRow {
    pub event_id: String,
    pub kind: String,
    pub step: Option<String>,
    pub attempt: Option<i32>,
    pub detail: Option<serde_json::Value>,
    pub at: i64,
}

/// What a list of workflows is filtered by; every field optional.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub name: Option<String>,
    pub status: Option<String>,
    pub correlation_id: Option<String>,
    /// Created at or after, epoch ms.
    pub from: Option<i64>,
    /// Created before, epoch ms.
    pub to: Option<i64>,
    /// After this position (`created_at` and id of the last row of the previous page), newest first.
    pub after: Option<(i64, String)>,
    pub limit: usize,
}

/// The statuses a workflow can have, as the index spells them.
pub const STATUSES: [&str; 8] = [
    "Running",
    "Completed",
    "Failed",
    "Cancelled",
    "Compensating",
    "Compensated",
    "CompensationFailed",
    "Filtered",
];

/// The status spelled `text` in any case, as the index spells it.
pub fn status_named(text: &str) -> Option<&'static str> {
    STATUSES
        .iter()
        .find(|s| s.eq_ignore_ascii_case(text))
        .copied()
}

/// An instant given as epoch milliseconds or RFC 3339 (`2026-11-23T10:00:00Z`), as epoch milliseconds.
pub fn parse_instant(text: &str) -> Option<i64> {
    if let Ok(ms) = text.parse::<i64>() {
        return Some(ms);
    }
    humantime::parse_rfc3339_weak(text)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_millis()).ok())
}

/// A workflow with its lifecycle events under `history`: what `GET /v1/workflows/{id}` and `edow status`
/// answer.
pub fn described(workflow: &WorkflowRow, events: &[EventRow]) -> serde_json::Value {
    let mut body = serde_json::to_value(workflow).unwrap_or_default();
    body["history"] = serde_json::to_value(events).unwrap_or_default();
    body
}

/// The index, shared by the API's handlers (reads) and its feeder (writes).
#[derive(Clone)]
pub struct Visibility {
    /// The feeder's connection. Reads have their own: in WAL mode they see the last committed batch while the
    /// next one is written, so a large batch or a purge never holds a request up.
    writer: Arc<Mutex<rusqlite::Connection>>,
    reader: Arc<Mutex<rusqlite::Connection>>,
    /// Whether the feeder has read every partition up to where it stood when the feeder started.
    caught_up: Arc<AtomicBool>,
    /// Removed when the index is dropped, for a file made for this process only.
    _temporary: Option<Arc<TemporaryFile>>,
}

struct TemporaryFile(PathBuf);

impl Drop for TemporaryFile {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.0.display()));
        }
    }
}

impl Visibility {
    /// Opens (or creates) the index at `path`; `None`: a file of this process's own in the temporary directory,
    /// removed when it stops.
    pub fn open(path: Option<&Path>) -> anyhow::Result<Visibility> {
        static OPENED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let (path, temporary) = match path {
            Some(path) => (path.to_path_buf(), None),
            None => {
                let path = std::env::temp_dir().join(format!(
                    "edow-visibility-{}-{}-{}.sqlite",
                    std::process::id(),
                    now_millis(),
                    OPENED.fetch_add(1, Ordering::Relaxed)
                ));
                (path.clone(), Some(Arc::new(TemporaryFile(path))))
            }
        };
        let open = || -> anyhow::Result<rusqlite::Connection> {
            let db = rusqlite::Connection::open(&path)
                .with_context(|| format!("opening the visibility index {}", path.display()))?;
            db.busy_timeout(Duration::from_secs(5))?;
            Ok(db)
        };
        let writer = open()?;
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS workflows (
                 id TEXT PRIMARY KEY, name TEXT NOT NULL, version INTEGER NOT NULL, status TEXT NOT NULL,
                 input TEXT NOT NULL, output TEXT, error TEXT, correlation_id TEXT,
                 created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, running TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS workflows_by_created ON workflows (created_at DESC, id DESC);
             CREATE INDEX IF NOT EXISTS workflows_by_name ON workflows (name, created_at DESC);
             CREATE INDEX IF NOT EXISTS workflows_by_correlation ON workflows (correlation_id);
             CREATE INDEX IF NOT EXISTS workflows_by_status ON workflows (status, updated_at);
             CREATE INDEX IF NOT EXISTS workflows_by_status_created ON workflows (status, created_at DESC, id DESC);
             CREATE TABLE IF NOT EXISTS events (
                 event_id TEXT PRIMARY KEY, workflow_id TEXT NOT NULL, kind TEXT NOT NULL, step TEXT,
                 attempt INTEGER, detail TEXT, at INTEGER NOT NULL, seq INTEGER NOT NULL);
             CREATE INDEX IF NOT EXISTS events_by_workflow ON events (workflow_id, seq);
             CREATE TABLE IF NOT EXISTS positions (
                 topic TEXT NOT NULL, partition INTEGER NOT NULL, next INTEGER NOT NULL,
                 PRIMARY KEY (topic, partition));",
            )
            .context("creating the visibility index's tables")?;
        let reader = open()?;
        reader
            .execute_batch("PRAGMA query_only = ON;")
            .context("opening the visibility index for reading")?;
        Ok(Visibility {
            writer: Arc::new(Mutex::new(writer)),
            reader: Arc::new(Mutex::new(reader)),
            caught_up: Arc::new(AtomicBool::new(false)),
            _temporary: temporary,
        })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read_db(&self) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
        self.reader.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the index holds everything the topics held when its feeder started (readiness waits for it).
    pub fn is_caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Relaxed)
    }

    /// Where to read `topic`'s `partition` from next.
    fn position(&self, topic: &str, partition: i32) -> anyhow::Result<Option<i64>> {
        Ok(self
            .db()
            .query_row(
                "SELECT next FROM positions WHERE topic = ?1 AND partition = ?2",
                params![topic, partition],
                |row| row.get(0),
            )
            .optional()?)
    }

    /// Applies one batch of decoded records and the positions after them, in one transaction.
    fn apply(&self, changes: &[Change], positions: &[(String, i32, i64)]) -> anyhow::Result<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        for change in changes {
            match change {
                Change::State(row) => {
                    tx.execute(
                        "INSERT INTO workflows (id, name, version, status, input, output, error,
                             correlation_id, created_at, updated_at, running)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                         ON CONFLICT (id) DO UPDATE SET name = ?2, version = ?3, status = ?4, input = ?5,
                             output = ?6, error = ?7, correlation_id = ?8, created_at = ?9, updated_at = ?10,
                             running = ?11
                         WHERE excluded.updated_at >= workflows.updated_at",
                        params![
                            row.id,
                            row.name,
                            row.version,
                            row.status,
                            row.input.to_string(),
                            row.output.as_ref().map(|o| o.to_string()),
                            row.error,
                            row.correlation_id,
                            row.created_at,
                            row.updated_at,
                            serde_json::to_string(&row.running_steps)?,
                        ],
                    )?;
                }
                Change::Removed(id) => {
                    tx.execute("DELETE FROM workflows WHERE id = ?1", params![id])?;
                    tx.execute("DELETE FROM events WHERE workflow_id = ?1", params![id])?;
                }
                Change::Event(workflow_id, event, seq) => {
                    let kept: i64 = tx.query_row(
                        "SELECT count(*) FROM events WHERE workflow_id = ?1",
                        params![workflow_id],
                        |row| row.get(0),
                    )?;
                    if kept >= MAX_EVENTS_PER_WORKFLOW {
                        continue;
                    }
                    tx.execute(
                        "INSERT OR IGNORE INTO events (event_id, workflow_id, kind, step, attempt, detail, at, seq)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                        params![
                            event.event_id,
                            workflow_id,
                            format!("{:?}", event.kind),
                            event.step,
                            event.attempt,
                            event.detail,
                            event.at,
                            seq,
                        ],
                    )?;
                }
            }
        }
        for (topic, partition, next) in positions {
            tx.execute(
                "INSERT INTO positions (topic, partition, next) VALUES (?1, ?2, ?3)
                 ON CONFLICT (topic, partition) DO UPDATE SET next = ?3",
                params![topic, partition, next],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Removes ended workflows (and their events) last changed before `cutoff`, epoch ms.
    pub fn purge(&self, cutoff: i64) -> anyhow::Result<usize> {
        let db = self.db();
        let removed = db.execute(
            "DELETE FROM workflows WHERE status NOT IN ('Running', 'Compensating') AND updated_at < ?1",
            params![cutoff],
        )?;
        db.execute(
            "DELETE FROM events WHERE at < ?1 AND workflow_id NOT IN (SELECT id FROM workflows)",
            params![cutoff],
        )?;
        Ok(removed)
    }

    /// The workflow `id`, with its events (oldest first), if the index has it.
    pub fn get(&self, id: &str) -> anyhow::Result<Option<(WorkflowRow, Vec<EventRow>)>> {
        let db = self.read_db();
        let row = db
            .query_row(
                &format!("SELECT {COLUMNS} FROM workflows WHERE id = ?1"),
                params![id],
                workflow_row,
            )
            .optional()?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut statement = db.prepare(
            "SELECT event_id, kind, step, attempt, detail, at FROM events WHERE workflow_id = ?1 ORDER BY seq LIMIT ?2",
        )?;
        let events = statement
            .query_map(params![id, MAX_EVENTS_ANSWERED], |row| {
                let detail: Option<String> = row.get(4)?;
                Ok(EventRow {
                    event_id: row.get(0)?,
                    kind: row.get(1)?,
                    step: row.get(2)?,
                    attempt: row.get(3)?,
                    detail: detail
                        .map(|d| serde_json::from_str(&d).unwrap_or(serde_json::Value::String(d))),
                    at: row.get(5)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some((row, events)))
    }

    /// Workflows matching `filter`, newest first, at most `filter.limit`.
    pub fn list(&self, filter: &Filter) -> anyhow::Result<Vec<WorkflowRow>> {
        let mut clauses = Vec::new();
        let mut values: Vec<rusqlite::types::Value> = Vec::new();
        let mut add = |clause: &str, value: rusqlite::types::Value| {
            values.push(value);
            clauses.push(clause.replace('?', &format!("?{}", values.len())));
        };
        if let Some(name) = &filter.name {
            add("name = ?", name.clone().into());
        }
        if let Some(status) = &filter.status {
            add("status = ?", status.clone().into());
        }
        if let Some(correlation_id) = &filter.correlation_id {
            add("correlation_id = ?", correlation_id.clone().into());
        }
        if let Some(from) = filter.from {
            add("created_at >= ?", from.into());
        }
        if let Some(to) = filter.to {
            add("created_at < ?", to.into());
        }
        if let Some((created_at, id)) = &filter.after {
            values.push((*created_at).into());
            values.push(id.clone().into());
            let (c, i) = (values.len() - 1, values.len());
            clauses.push(format!(
                "(created_at < ?{c} OR (created_at = ?{c} AND id < ?{i}))"
            ));
        }
        let condition = if clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", clauses.join(" AND "))
        };
        // Without input and output: a page of large payloads would be a large answer; GET by id has them.
        let sql = format!(
            "SELECT {LIST_COLUMNS} FROM workflows {condition} ORDER BY created_at DESC, id DESC LIMIT {}",
            filter.limit
        );
        let db = self.read_db();
        let mut statement = db.prepare(&sql)?;
        let rows = statement
            .query_map(rusqlite::params_from_iter(values), workflow_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// How many workflows the index holds.
    pub fn len(&self) -> anyhow::Result<i64> {
        Ok(self
            .read_db()
            .query_row("SELECT count(*) FROM workflows", [], |row| row.get(0))?)
    }

    pub fn is_empty(&self) -> anyhow::Result<bool> {
        Ok(self.len()? == 0)
    }
}

const COLUMNS: &str =
    "id, name, version, status, input, output, error, correlation_id, created_at, updated_at, running";
const LIST_COLUMNS: &str =
    "id, name, version, status, 'null', NULL, error, correlation_id, created_at, updated_at, running";
/// Most events a read of one workflow answers (the oldest first).
pub const MAX_EVENTS_ANSWERED: i64 = 1_000;

fn workflow_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<WorkflowRow> {
    let json =
        |text: String| serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    let input: String = row.get(4)?;
    let output: Option<String> = row.get(5)?;
    let running: String = row.get(10)?;
    Ok(WorkflowRow {
        id: row.get(0)?,
        name: row.get(1)?,
        version: row.get(2)?,
        status: row.get(3)?,
        input: json(input),
        output: output.map(json),
        error: row.get(6)?,
        correlation_id: row.get(7)?,
        created_at: row.get(8)?,
        updated_at: row.get(9)?,
        running_steps: serde_json::from_str(&running).unwrap_or_default(),
    })
}

/// One decoded record for the index.
enum Change {
    State(WorkflowRow),
    Removed(String),
    /// (workflow id, event, order among the workflow's events)
    Event(String, LifecycleEvent, i64),
}

/// Where the index is fed from.
#[derive(Clone)]
pub struct Source {
    pub kafka: Kafka,
    pub codec: Arc<Codec>,
    /// Opens records sealed at rest.
    pub keys: Option<Arc<Keyring>>,
    pub topics: Topics,
}

/// What one record brings to the index: a change, nothing (a record of edow's own, or one that does not decode:
/// the orchestrator dead-letters bad inputs, and these topics hold only what it wrote), or `Err` when the
/// registry cannot be reached now, and the record must be read again later.
async fn change_of(
    codec: &Codec,
    keys: Option<&Keyring>,
    state_topic: &str,
    events_topic: &str,
    msg: &impl Message,
) -> Result<Option<Change>, String> {
    let Some(key) = msg
        .key()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .filter(|k| !k.starts_with(RESERVED_ID_PREFIX))
    else {
        return Ok(None);
    };
    let offset = msg.offset();
    let is_state = msg.topic() == state_topic;
    match (is_state, msg.payload()) {
        (true, None) => Ok(Some(Change::Removed(key))),
        (true, Some(payload)) => match codec.decode::<WorkflowState>(Some(payload)).await {
            Ok(state) if state.workflow_name.starts_with(RESERVED_ID_PREFIX) => Ok(None),
            Ok(state) => Ok(Some(Change::State(row_of(state, keys)))),
            Err(e) if e.is_transient() => Err(e.to_string()),
            Err(e) => {
                tracing::debug!(offset, "skipping a state record: {e}");
                Ok(None)
            }
        },
        (false, Some(payload)) if msg.topic() == events_topic => {
            match codec.decode::<LifecycleEvent>(Some(payload)).await {
                Ok(mut event) => {
                    if let Some(detail) = event.detail.take() {
                        let opened = sealing::open_text(keys, &event.event_id, "detail", detail);
                        event.detail = Some(opened.unwrap_or_else(|e| {
                            serde_json::Value::String(format!("[unreadable: {e}]")).to_string()
                        }));
                    }
                    Ok(Some(Change::Event(key, event, offset)))
                }
                Err(e) if e.is_transient() => Err(e.to_string()),
                Err(e) => {
                    tracing::debug!(offset, "skipping an event record: {e}");
                    Ok(None)
                }
            }
        }
        _ => Ok(None),
    }
}

/// The first and end offsets of every partition the feeder reads, when it starts: it is caught up once past all
/// the ends.
fn watermarks_now(
    kafka: &Kafka,
    assignment: &TopicPartitionList,
) -> anyhow::Result<HashMap<(String, i32), (i64, i64)>> {
    let reader = kafka.reader()?;
    let mut marks = HashMap::new();
    for element in assignment.elements() {
        let (topic, partition) = (element.topic(), element.partition());
        let watermarks = reader
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .with_context(|| format!("reading the end of {topic}/{partition}"))?;
        marks.insert((topic.to_string(), partition), watermarks);
    }
    Ok(marks)
}

/// Keeps `index` fed from the state and events topics until `stop` resolves, and marks it caught up once it has
/// read every partition to the end it had at the start (or its polls found nothing, no record and no error, for
/// [`IDLE_IS_CAUGHT_UP`]: compaction can leave a partition's last offsets empty, so that no record reaches its
/// end; then readiness waits for a quiet moment of every partition).
pub async fn feed(
    index: Visibility,
    source: Source,
    partitions: i32,
    retention: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let Source {
        kafka,
        codec,
        keys,
        topics,
    } = source;
    let consumer: StreamConsumer = kafka
        .trailing_reader_config(Duration::from_millis(200))
        .set("enable.partition.eof", "false")
        .create()
        .context("creating the visibility index's reader")?;
    let mut assignment = TopicPartitionList::new();
    let mut read_from = HashMap::new();
    for topic in [topics.state(), topics.events()] {
        for partition in 0..partitions {
            let next = index.position(&topic, partition)?;
            read_from.insert((topic.clone(), partition), next.unwrap_or(0));
            let offset = next.map_or(Offset::Beginning, Offset::Offset);
            assignment.add_partition_offset(&topic, partition, offset)?;
        }
    }
    // Partitions with records to read up to the end they have now: a partition emptied by retention (its first
    // offset at its end) has none.
    let mut behind: HashMap<(String, i32), i64> = if index.is_caught_up() {
        HashMap::new()
    } else {
        let (kafka, assignment) = (kafka.clone(), assignment.clone());
        tokio::task::spawn_blocking(move || watermarks_now(&kafka, &assignment))
            .await??
            .into_iter()
            .filter(|(at, (low, high))| {
                read_from.get(at).is_some_and(|from| *from.max(low) < *high)
            })
            .map(|(at, (_, high))| (at, high))
            .collect()
    };
    consumer.assign(&assignment)?;
    let (state_topic, events_topic) = (topics.state(), topics.events());
    let mut last_purge = std::time::Instant::now();
    // Since when every poll found nothing (no record, no error); `None` while records come.
    let mut idle_since: Option<std::time::Instant> = None;
    tokio::pin!(stop);
    loop {
        let idle_long = idle_since.is_some_and(|since| since.elapsed() > IDLE_IS_CAUGHT_UP);
        if !index.is_caught_up() && (behind.is_empty() || idle_long) {
            index.caught_up.store(true, Ordering::Relaxed);
            tracing::info!(
                behind = behind.len(),
                "the visibility index is caught up with what the topics held at start"
            );
        }
        let first = tokio::select! {
            _ = &mut stop => return Ok(()),
            polled = tokio::time::timeout(Duration::from_millis(200), consumer.recv()) => polled,
        };
        let mut messages = Vec::new();
        match first {
            Ok(Ok(msg)) => messages.push(msg),
            Ok(Err(e)) => {
                idle_since = None;
                tracing::warn!("reading for the visibility index: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(_) => {
                idle_since.get_or_insert_with(std::time::Instant::now);
            }
        }
        while !messages.is_empty() && messages.len() < BATCH {
            match tokio::time::timeout(Duration::ZERO, consumer.recv()).await {
                Ok(Ok(msg)) => messages.push(msg),
                _ => break,
            }
        }
        if !messages.is_empty() {
            idle_since = None;
        }
        let mut changes = Vec::with_capacity(messages.len());
        let mut unreachable_registry = None;
        let mut positions: HashMap<(String, i32), i64> = Default::default();
        for msg in &messages {
            positions.insert((msg.topic().to_string(), msg.partition()), msg.offset() + 1);
            match change_of(&codec, keys.as_deref(), &state_topic, &events_topic, msg).await {
                Ok(Some(change)) => changes.push(change),
                Ok(None) => {}
                Err(e) => {
                    unreachable_registry = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = unreachable_registry {
            // Nothing of this batch is applied: each partition is read again from its first record in it.
            let mut first: HashMap<(String, i32), i64> = Default::default();
            for msg in &messages {
                first
                    .entry((msg.topic().to_string(), msg.partition()))
                    .or_insert(msg.offset());
            }
            drop(messages);
            for ((topic, partition), offset) in first {
                consumer.seek(&topic, partition, Offset::Offset(offset), Duration::ZERO)?;
            }
            tracing::warn!("the visibility index waits for the schema registry: {e}");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        drop(messages);
        if !positions.is_empty() {
            behind.retain(|at, end| positions.get(at).is_none_or(|next| next < end));
            let positions: Vec<(String, i32, i64)> =
                positions.into_iter().map(|((t, p), n)| (t, p, n)).collect();
            let index = index.clone();
            tokio::task::spawn_blocking(move || index.apply(&changes, &positions)).await??;
        }
        if last_purge.elapsed() > PURGE_EVERY {
            last_purge = std::time::Instant::now();
            let retention = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
            let cutoff = now_millis().saturating_sub(retention);
            let index = index.clone();
            match tokio::task::spawn_blocking(move || index.purge(cutoff)).await? {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "ended workflows left the visibility index"),
                Err(e) => tracing::warn!("purging the visibility index: {e:#}"),
            }
        }
    }
}

/// A one-off index of `partitions` as they are now, read from `edow.state` (and `edow.events` with `events`) to
/// their ends, of every workflow or `only` one: what the CLI lists and shows without an orchestrator's API. Held
/// in a temporary file, one chunk of records in memory at a time.
pub async fn snapshot(
    kafka: &Kafka,
    codec: &Codec,
    keys: Option<&Keyring>,
    topics: &Topics,
    partitions: &[i32],
    events: bool,
    only: Option<&str>,
) -> anyhow::Result<Visibility> {
    let index = Visibility::open(None)?;
    let (state_topic, events_topic) = (topics.state(), topics.events());
    let mut topics_read = vec![state_topic.clone()];
    if events {
        topics_read.push(events_topic.clone());
    }
    for topic in &topics_read {
        for &partition in partitions {
            let mut chunks = kafka.stream_to_end(topic, partition, Offset::Beginning, BATCH);
            while let Some(chunk) = chunks.recv().await {
                let mut changes = Vec::with_capacity(BATCH);
                for msg in chunk? {
                    if only.is_some_and(|id| msg.key() != Some(id.as_bytes())) {
                        continue;
                    }
                    match change_of(codec, keys, &state_topic, &events_topic, &msg).await {
                        Ok(Some(change)) => changes.push(change),
                        Ok(None) => {}
                        Err(e) => anyhow::bail!("reading {topic}: the schema registry: {e}"),
                    }
                }
                let writer = index.clone();
                tokio::task::spawn_blocking(move || writer.apply(&changes, &[])).await??;
            }
        }
    }
    index.caught_up.store(true, Ordering::Relaxed);
    Ok(index)
}

/// The index's row of a state record, opened with `keys` when it is sealed, and with what the definition marks
/// sensitive masked: the index shows what the API and the CLI show, and holds nothing more.
fn row_of(mut state: WorkflowState, keys: Option<&Keyring>) -> WorkflowRow {
    let json =
        |text: &str| serde_json::from_str(text).unwrap_or(serde_json::Value::String(text.into()));
    if let Err(e) = sealing::open_state(keys, &mut state) {
        let unreadable = serde_json::Value::String(format!("[unreadable: {e}]"));
        state.input = unreadable.to_string();
        state.output = state.output.map(|_| unreadable.to_string());
        state.error = state.error.map(|_| format!("[unreadable: {e}]"));
        state.engine_state = String::new();
    }
    let running = matches!(
        state.status,
        edow_schemas::contracts::WorkflowStatus::Running
            | edow_schemas::contracts::WorkflowStatus::Compensating
    );
    // Parsed for what runs, and for the values to mask (the engine keeps them under `secrets`).
    let instance = (running || state.engine_state.contains("\"secrets\""))
        .then(|| {
            serde_json::from_str::<serde_json::Value>(&state.engine_state)
                .ok()
                .and_then(|mut engine| {
                    serde_json::from_value::<edow_engine::Instance>(engine["instance"].take()).ok()
                })
        })
        .flatten();
    let running_steps = match (&instance, running) {
        (Some(instance), true) => instance
            .running_steps()
            .into_iter()
            .map(|(step, doing)| RunningStep { step, doing })
            .collect(),
        _ => Vec::new(),
    };
    let shown = |value: serde_json::Value| match &instance {
        Some(instance) => instance.redact(&value),
        None => value,
    };
    WorkflowRow {
        id: state.workflow_id,
        name: state.workflow_name,
        version: state.workflow_version,
        status: format!("{:?}", state.status),
        input: shown(json(&state.input)),
        output: state.output.as_deref().map(|o| shown(json(o))),
        error: state
            .error
            .map(|e| instance.as_ref().map_or(e.clone(), |i| i.redact_text(&e))),
        correlation_id: state.correlation_id,
        created_at: state.created_at,
        updated_at: state.updated_at,
        running_steps,
    }
}
