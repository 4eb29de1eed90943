//! Dead letters, read and replayed, as `edow dlq` and `/v1/dead-letters` do: list them by origin topic and
//! reason, show one with its original record (decoded when its topic's contract is known) and triage facts, and
//! replay one, a filtered set or all of a topic's to the origin topic byte for byte (key, value and headers as
//! they were), with an `edow.replay` header naming the replay. A replayed record the orchestrator or a worker has
//! already taken is dropped by their deduplication (a trigger whose id exists starts nothing; a result whose task
//! was answered changes nothing), so replaying twice is harmless.

use std::collections::BTreeMap;

use edow_kafka::now_millis;
use edow_schemas::contracts::{
    DeadLetter, TaskRequested, TaskResult, WorkflowSignal, WorkflowTrigger,
};
use edow_schemas::Topics;
use rdkafka::{Message, Offset};
use serde::Serialize;
use serde_json::{json, Value};

use crate::client::{new_id, Client, ClientError};

/// The header a replayed record carries: which replay, and which dead letter it came from.
pub const REPLAY_HEADER: &str = "edow.replay";
/// Records read per chunk while scanning a dead-letter topic.
const SCAN_CHUNK: usize = 100;
/// Most dead letters one replay sends.
pub const MAX_SELECTED: usize = 10_000;
/// Most dead letters one list answers.
pub const MAX_LISTED: usize = 1_000;

/// Where a dead letter is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
pub struct Position {
    pub partition: i32,
    pub offset: i64,
}

/// A dead letter's triage facts.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The dead-letter topic and where in it.
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub origin_topic: String,
    pub origin_partition: i32,
    pub origin_offset: i64,
    pub key: Option<String>,
    pub reason: String,
    pub error: String,
    pub attempts: i32,
    pub first_failed_at: i64,
    pub dead_lettered_at: i64,
    pub service: String,
    /// Whether the original value is kept (a too large one is not, and cannot be replayed).
    pub replayable: bool,
}

/// Which dead letters of one origin topic.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub reason: Option<String>,
    /// Only these positions in the dead-letter topic; `None`: all (that match `reason`).
    pub positions: Option<Vec<Position>>,
    pub limit: usize,
}

/// What a replay did.
#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    pub replay_id: String,
    pub replayed: Vec<Position>,
    /// Dead letters selected but not replayed, and why.
    pub skipped: Vec<(Position, String)>,
}

impl Client {
    /// The dead-letter topics that exist, by origin topic.
    pub async fn dead_letter_topics(&self) -> Result<Vec<String>, ClientError> {
        let kafka = self.kafka.clone();
        let prefix = self.topics.prefix().to_string();
        let names = tokio::task::spawn_blocking(move || kafka.topic_names())
            .await
            .map_err(anyhow::Error::from)??;
        Ok(names
            .into_iter()
            .filter(|t| t.starts_with(&prefix))
            .filter_map(|t| t.strip_suffix(".dlq").map(str::to_string))
            .collect())
    }

    /// Summaries of the dead letters of `origin` (a topic such as `edow.triggers`) matching `selection`, oldest
    /// first, at most `selection.limit` (up to [`MAX_LISTED`]).
    pub async fn dead_letters(
        &self,
        origin: &str,
        selection: &Selection,
    ) -> Result<Vec<Summary>, ClientError> {
        let limit = selection.limit.clamp(1, MAX_LISTED);
        let mut found = Vec::new();
        let mut scan = self.scan(origin, selection).await?;
        while found.len() < limit {
            let Some(chunk) = scan.next(self).await? else {
                break;
            };
            found.extend(
                chunk
                    .into_iter()
                    .map(|(summary, _)| summary)
                    .take(limit - found.len()),
            );
        }
        Ok(found)
    }

    /// Summaries of dead letters of `origin`, or of every topic with dead letters when `None`, with `reason` if
    /// given, oldest first per topic, at most `limit` (up to [`MAX_LISTED`]).
    pub async fn dead_letters_of(
        &self,
        origin: Option<&str>,
        reason: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Summary>, ClientError> {
        let origins = match origin {
            Some(origin) => vec![origin.to_string()],
            None => self.dead_letter_topics().await?,
        };
        let limit = limit.clamp(1, MAX_LISTED);
        let mut found = Vec::new();
        for origin in origins {
            let selection = Selection {
                reason: reason.map(str::to_string),
                positions: None,
                limit: limit - found.len(),
            };
            found.extend(self.dead_letters(&origin, &selection).await?);
            if found.len() >= limit {
                break;
            }
        }
        Ok(found)
    }

    /// A reader of the dead letters of `origin` matching `selection`, oldest first per partition, a chunk at a
    /// time (memory holds one chunk).
    async fn scan(&self, origin: &str, selection: &Selection) -> Result<Scan, ClientError> {
        let topic = self.dead_letter_topic(origin).await?;
        let partitions = {
            let (kafka, topic) = (self.kafka.clone(), topic.clone());
            tokio::task::spawn_blocking(move || kafka.partition_count(&topic))
                .await
                .map_err(anyhow::Error::from)??
        };
        let wanted = selection.positions.as_ref().map(|ps| {
            let mut by_partition: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
            for p in ps {
                by_partition.entry(p.partition).or_default().push(p.offset);
            }
            by_partition
        });
        Ok(Scan {
            topic,
            partitions: partitions as i32,
            next_partition: 0,
            wanted,
            reason: selection.reason.clone(),
            chunks: None,
        })
    }

    /// One dead letter with its original record, decoded when its topic's contract is known.
    pub async fn dead_letter(
        &self,
        origin: &str,
        at: Position,
    ) -> Result<Option<Value>, ClientError> {
        if at.partition < 0 || at.offset < 0 {
            return Err(ClientError::invalid(
                "offset",
                "partitions and offsets are 0 or more",
            ));
        }
        let selection = Selection {
            positions: Some(vec![at]),
            limit: 1,
            ..Selection::default()
        };
        let mut scan = self.scan(origin, &selection).await?;
        let one = scan.next(self).await?.and_then(|mut chunk| chunk.pop());
        let Some((summary, letter)) = one else {
            return Ok(None);
        };
        let mut shown = serde_json::to_value(&summary).map_err(anyhow::Error::from)?;
        let mut original = self.decoded(&letter).await;
        if let Some(record) = original.get_mut("record") {
            let definitions = self.parsed_definitions().await?;
            mask_original(record, self.origin_kind(&letter.origin_topic), &definitions);
        }
        shown["original"] = original;
        shown["headers"] = letter
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    Value::String(String::from_utf8_lossy(&v.0).into_owned()),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into();
        Ok(Some(shown))
    }

    /// Produces the selected dead letters of `origin` to `origin` again, byte for byte, a chunk at a time (each
    /// acknowledged before the next is read), at most [`MAX_SELECTED`].
    pub async fn replay(
        &self,
        origin: &str,
        selection: &Selection,
    ) -> Result<Replayed, ClientError> {
        if selection
            .positions
            .iter()
            .flatten()
            .any(|p| p.partition < 0 || p.offset < 0)
        {
            return Err(ClientError::invalid(
                "offsets",
                "partitions and offsets are 0 or more",
            ));
        }
        let replay_id = new_id("replay");
        let mut replayed = Vec::new();
        let mut skipped = Vec::new();
        let mut scan = self.scan(origin, selection).await?;
        while replayed.len() + skipped.len() < MAX_SELECTED {
            let Some(chunk) = scan.next(self).await? else {
                break;
            };
            let mut prepared = Vec::new();
            for (summary, letter) in chunk {
                if replayed.len() + skipped.len() >= MAX_SELECTED {
                    break;
                }
                let at = Position {
                    partition: summary.partition,
                    offset: summary.offset,
                };
                if letter.origin_topic != origin {
                    skipped.push((
                        at,
                        format!("it came from {}, not {origin}", letter.origin_topic),
                    ));
                    continue;
                }
                let Some(value) = letter.value else {
                    skipped.push((
                        at,
                        format!(
                            "the original was too large to keep; it is at {}/{}@{} until that topic's retention",
                            letter.origin_topic, letter.origin_partition, letter.origin_offset
                        ),
                    ));
                    continue;
                };
                let mut headers =
                    rdkafka::message::OwnedHeaders::new_with_capacity(letter.headers.len() + 1);
                let mut named: Vec<(String, Vec<u8>)> = letter
                    .headers
                    .into_iter()
                    .filter(|(k, _)| k != REPLAY_HEADER)
                    .map(|(k, v)| (k, v.0))
                    .collect();
                named.sort();
                for (key, value) in &named {
                    headers = headers.insert(rdkafka::message::Header {
                        key,
                        value: Some(value),
                    });
                }
                let replay = format!(
                    "{replay_id} of {}/{}@{} at {}",
                    summary.topic,
                    summary.partition,
                    summary.offset,
                    now_millis()
                );
                headers = headers.insert(rdkafka::message::Header {
                    key: REPLAY_HEADER,
                    value: Some(&replay),
                });
                prepared.push((letter.key, value, headers));
                replayed.push(at);
            }
            let mut deliveries = Vec::with_capacity(prepared.len());
            for (key, value, headers) in &prepared {
                let mut record = rdkafka::producer::FutureRecord::to(origin)
                    .payload(value)
                    .headers(headers.clone());
                if let Some(key) = key {
                    record = record.key(key);
                }
                deliveries.push(
                    self.producer
                        .send(record, std::time::Duration::from_secs(30)),
                );
            }
            for delivery in deliveries {
                delivery.await.map_err(|(e, _)| {
                    ClientError::Unavailable(anyhow::anyhow!("replaying to {origin}: {e}"))
                })?;
                edow_kafka::count_produced_one(origin);
            }
        }
        tracing::info!(
            replay = %replay_id,
            origin,
            replayed = replayed.len(),
            skipped = skipped.len(),
            "replayed dead letters"
        );
        Ok(Replayed {
            replay_id,
            replayed,
            skipped,
        })
    }

    /// `origin`'s dead-letter topic, or why it is not one.
    async fn dead_letter_topic(&self, origin: &str) -> Result<String, ClientError> {
        if origin.trim().is_empty() {
            return Err(ClientError::invalid(
                "topic",
                "name the topic the dead letters came from, e.g. edow.triggers",
            ));
        }
        let known = self.dead_letter_topics().await?;
        if !known.iter().any(|t| t == origin) {
            return Err(ClientError::invalid(
                "topic",
                format!(
                    "{origin} has no dead-letter topic; topics with dead letters: {}",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        Ok(Topics::dead_letters(origin))
    }

    /// Every deployed definition that marks something sensitive.
    async fn parsed_definitions(&self) -> Result<Vec<edow_engine::Definition>, ClientError> {
        Ok(self
            .definitions()
            .await?
            .into_iter()
            .filter_map(|((name, _), source)| {
                edow_engine::Definition::parse_with_limits(&name, &source?, &self.limits).ok()
            })
            .filter(|d| !d.sensitive.is_empty())
            .collect())
    }

    fn origin_kind(&self, origin: &str) -> Origin {
        let topics = &self.topics;
        if origin == topics.triggers() {
            Origin::Trigger
        } else if origin == topics.signals() {
            Origin::Signal
        } else if origin == topics.results() {
            Origin::Result
        } else {
            Origin::Task
        }
    }

    /// The original record of `letter` as JSON, when its origin's contract is known and it decodes.
    async fn decoded(&self, letter: &DeadLetter) -> Value {
        let Some(value) = letter.value.as_deref() else {
            return json!({"kept": false});
        };
        let topics = &self.topics;
        let origin = letter.origin_topic.as_str();
        let codec = &self.codec;
        let decoded = if origin == topics.triggers() {
            codec
                .decode::<WorkflowTrigger>(Some(value))
                .await
                .map(|v| json!(v))
        } else if origin == topics.signals() {
            codec
                .decode::<WorkflowSignal>(Some(value))
                .await
                .map(|v| json!(v))
        } else if origin == topics.results() {
            codec
                .decode::<TaskResult>(Some(value))
                .await
                .map(|v| json!(v))
        } else if origin.starts_with(&format!("{}tasks.", topics.prefix())) {
            codec
                .decode::<TaskRequested>(Some(value))
                .await
                .map(|v| json!(v))
        } else {
            return json!({"kept": true, "bytes": value.len()});
        };
        match decoded {
            Ok(record) => json!({"kept": true, "bytes": value.len(), "record": record}),
            Err(e) => json!({"kept": true, "bytes": value.len(), "decode_error": e.to_string()}),
        }
    }
}

/// Which contract a dead letter's original record has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Trigger,
    Signal,
    Result,
    Task,
}

/// Masks in a decoded original record what the definitions mark sensitive, as the workflow's own displays would:
/// a trigger's input by its definition's `input.` paths, a result's output by the `steps.<its step>.` paths and
/// a signal's payload by the `signals.<its name>.` paths of every definition (their records do not name the
/// workflow), and a task's whole input when its definition marks anything (a task input has no paths of its own
/// to mark). The JSON text fields are shown parsed, so that a marked number is masked as a whole leaf.
fn mask_original(record: &mut Value, origin: Origin, definitions: &[edow_engine::Definition]) {
    use edow_engine::redact::{Root, Secrets, MASK};
    let text_field = match origin {
        Origin::Trigger | Origin::Task => "input",
        Origin::Result => "output",
        Origin::Signal => "payload",
    };
    let parsed = record
        .get(text_field)
        .and_then(Value::as_str)
        .and_then(|text| serde_json::from_str::<Value>(text).ok());
    let named = |field: &str| {
        record
            .get(field)
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let workflow = named("workflow_name");
    let own = || {
        definitions
            .iter()
            .filter(|d| Some(&d.name) == workflow.as_ref())
    };
    let mut secrets = Secrets::default();
    let Some(parsed) = parsed else {
        return;
    };
    match origin {
        Origin::Trigger => own().for_each(|d| secrets.collect(&d.sensitive, &Root::Input, &parsed)),
        Origin::Result => {
            let step = named("step").unwrap_or_default();
            let step = step.rsplit('/').next().unwrap_or_default().to_string();
            definitions
                .iter()
                .for_each(|d| secrets.collect(&d.sensitive, &Root::Step(step.clone()), &parsed));
        }
        Origin::Signal => {
            let name = named("name").unwrap_or_default();
            definitions
                .iter()
                .for_each(|d| secrets.collect(&d.sensitive, &Root::Signal(name.clone()), &parsed));
        }
        Origin::Task => {
            if own().next().is_some() {
                record[text_field] = Value::String(MASK.into());
            }
            return;
        }
    }
    record[text_field] = parsed;
    secrets.scrub_in_place(record);
}

fn summary(topic: &str, partition: i32, offset: i64, letter: &DeadLetter) -> Summary {
    Summary {
        topic: topic.to_string(),
        partition,
        offset,
        origin_topic: letter.origin_topic.clone(),
        origin_partition: letter.origin_partition,
        origin_offset: letter.origin_offset,
        key: letter
            .key
            .as_ref()
            .map(|k| String::from_utf8_lossy(k).into_owned()),
        reason: letter.error_kind.clone(),
        error: letter.error.clone(),
        attempts: letter.attempts,
        first_failed_at: letter.first_failed_at,
        dead_lettered_at: letter.dead_lettered_at,
        service: letter.service.clone(),
        replayable: letter.value.is_some(),
    }
}

/// Reading a dead-letter topic, partition by partition, chunk by chunk.
struct Scan {
    topic: String,
    partitions: i32,
    next_partition: i32,
    wanted: Option<BTreeMap<i32, Vec<i64>>>,
    reason: Option<String>,
    /// The partition being read, and its chunks.
    chunks: Option<(
        i32,
        tokio::sync::mpsc::Receiver<anyhow::Result<Vec<rdkafka::message::OwnedMessage>>>,
    )>,
}

impl Scan {
    /// The next chunk's matching dead letters (maybe none); `None` at the end.
    async fn next(
        &mut self,
        client: &Client,
    ) -> Result<Option<Vec<(Summary, DeadLetter)>>, ClientError> {
        loop {
            if self.chunks.is_none() {
                let Some(partition) = self.next_start() else {
                    return Ok(None);
                };
                let from = match &self.wanted {
                    Some(w) => Offset::Offset(
                        w.get(&partition)
                            .and_then(|o| o.iter().min())
                            .copied()
                            .unwrap_or(0),
                    ),
                    None => Offset::Beginning,
                };
                let chunks = client
                    .kafka
                    .stream_to_end(&self.topic, partition, from, SCAN_CHUNK);
                self.chunks = Some((partition, chunks));
            }
            let Some((partition, chunks)) = &mut self.chunks else {
                continue;
            };
            let partition = *partition;
            let Some(chunk) = chunks.recv().await else {
                self.chunks = None;
                continue;
            };
            let mut matching = Vec::new();
            for record in chunk? {
                if let Some(w) = &self.wanted {
                    if !w
                        .get(&partition)
                        .is_some_and(|o| o.contains(&record.offset()))
                    {
                        continue;
                    }
                }
                let letter = match client.codec.decode::<DeadLetter>(record.payload()).await {
                    Ok(letter) => letter,
                    // Not a dead letter edow wrote: nothing to list or replay.
                    Err(e) if !e.is_transient() => continue,
                    Err(e) => return Err(ClientError::Unavailable(e.into())),
                };
                if self
                    .reason
                    .as_ref()
                    .is_some_and(|r| *r != letter.error_kind)
                {
                    continue;
                }
                matching.push((
                    summary(&self.topic, partition, record.offset(), &letter),
                    letter,
                ));
            }
            return Ok(Some(matching));
        }
    }

    /// The next partition to read: every one, or those with wanted positions.
    fn next_start(&mut self) -> Option<i32> {
        while self.next_partition < self.partitions {
            let partition = self.next_partition;
            self.next_partition += 1;
            if self
                .wanted
                .as_ref()
                .is_none_or(|w| w.contains_key(&partition))
            {
                return Some(partition);
            }
        }
        None
    }
}
