//! edow's Kafka edges, shared by orchestrator, worker and CLI: client settings ([`Kafka`]), topic creation and
//! checks, Kafka's murmur2 partitioning, reading a partition to its end, and dead-letter publishing.

pub mod args;
pub mod dead_letters;
pub mod headers;
pub mod murmur2;
pub mod process;
pub mod settings;

use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureProducer;
use rdkafka::{Message, Offset, TopicPartitionList};

/// Most bytes (keys and values) of one chunk of [`Kafka::stream_to_end`], give or take its last record: with a
/// channel of two, a reader holds at most a few of these, however large the records (up to a broker's 1 MiB).
pub const CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// Header carrying a lifecycle event's id, so that a reader can deduplicate without decoding.
pub const EVENT_ID_HEADER: &str = "edow.event-id";
/// Header carrying the correlation id of a workflow.
pub const CORRELATION_ID_HEADER: &str = "edow.correlation-id";

/// How to reach the cluster, and the settings every edow client shares. Its `Debug` shows no secret.
#[derive(Clone)]
pub struct Kafka {
    pub bootstrap_servers: String,
    /// Consumer group session timeout: how long a dead member keeps its partitions.
    pub session_timeout: Duration,
    /// librdkafka settings given by the operator (`--kafka-option`), applied over edow's own to every client
    /// (security settings, tuning).
    pub options: Vec<(String, String)>,
}

impl std::fmt::Debug for Kafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kafka")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("session_timeout", &self.session_timeout)
            .field("options", &settings::redacted(&self.options))
            .finish()
    }
}

impl Kafka {
    pub fn new(bootstrap_servers: impl Into<String>) -> Kafka {
        Kafka {
            bootstrap_servers: bootstrap_servers.into(),
            session_timeout: Duration::from_secs(6),
            options: Vec::new(),
        }
    }

    /// What to check when the cluster cannot be reached: where, and how edow is told to log in (no secret).
    fn reach_hint(&self) -> String {
        let setting = |key: &str| {
            self.options
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map_or("-", |(_, v)| v.as_str())
                .to_string()
        };
        format!(
            "check that {} is reachable and that the security settings match the listener (security.protocol={}, \
             sasl.mechanism={}, sasl.username={}; a wrong password shows as all brokers down)",
            self.bootstrap_servers,
            setting("security.protocol"),
            match setting("sasl.mechanism").as_str() {
                "-" => setting("sasl.mechanisms"),
                named => named.to_string(),
            },
            setting("sasl.username")
        )
    }

    /// `config` with the operator's options over it.
    fn finish(&self, mut config: ClientConfig) -> ClientConfig {
        for (key, value) in self.options.iter().filter(|(key, _)| !key.is_empty()) {
            config.set(key, value);
        }
        config
    }

    fn base(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers);
        config
    }

    /// An idempotent producer that partitions keys with murmur2, as Java clients do, so that records keyed by
    /// workflow id land in the same partition whoever writes them.
    pub fn producer(&self) -> anyhow::Result<FutureProducer> {
        self.producer_lingering(2)
    }

    /// A [`Kafka::producer`] that sends at once (`linger.ms=0`), for a caller that gathers its own batches and
    /// waits for them: the orchestrator produces a whole batch's records in one go, so lingering only delays
    /// them (measured at one workflow in flight: 70 ms end to end with 2 ms, 57 ms with 0; under load the
    /// throughput stays within run-to-run noise, since once librdkafka has its requests in flight, at most five
    /// with idempotence, the records queued meanwhile travel together in the next ones).
    pub fn producer_for_batches(&self) -> anyhow::Result<FutureProducer> {
        self.producer_lingering(0)
    }

    fn producer_lingering(&self, linger_ms: u32) -> anyhow::Result<FutureProducer> {
        let mut config = self.base();
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", linger_ms.to_string())
            .set("message.timeout.ms", "30000")
            // On by default: JSON payloads in Avro strings compress well, and lz4 costs little CPU. An operator
            // may choose zstd or none (`--kafka-option compression.type=zstd`).
            .set("compression.type", "lz4");
        self.finish(config)
            .create()
            .context("creating a Kafka producer")
    }

    /// Settings of a consumer in `group` (classic protocol) that commits only what the caller commits.
    pub fn group_consumer_config(&self, group: &str) -> ClientConfig {
        self.finish(self.group_settings(group))
    }

    /// A [`Kafka::group_consumer_config`] that has librdkafka report statistics every
    /// [`edow_telemetry::lag::STATISTICS_INTERVAL_MS`], for a consumer whose context exports its lag (see
    /// [`edow_telemetry::lag::LagReporter`]; any other context would log them).
    pub fn group_consumer_config_reporting_lag(&self, group: &str) -> ClientConfig {
        let mut config = self.group_settings(group);
        config.set(
            "statistics.interval.ms",
            edow_telemetry::lag::STATISTICS_INTERVAL_MS,
        );
        self.finish(config)
    }

    fn group_settings(&self, group: &str) -> ClientConfig {
        let mut config = self.base();
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set(
                "session.timeout.ms",
                self.session_timeout.as_millis().to_string(),
            )
            .set("heartbeat.interval.ms", "500")
            .set("fetch.wait.max.ms", "20");
        config
    }

    /// A consumer that reads assigned partitions only (no group membership, no commits).
    pub fn reader(&self) -> anyhow::Result<BaseConsumer> {
        self.reader_config()
            .create()
            .context("creating a Kafka reader")
    }

    /// The settings of [`Kafka::reader`], for a caller that wants another kind of consumer.
    pub fn reader_config(&self) -> ClientConfig {
        let mut config = self.base();
        config
            .set("group.id", "edow-reader")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", "20")
            // librdkafka prefetches up to 64 MiB per partition by default; restore runs a reader per partition
            // at once, and 8 MiB keeps it fed as well.
            .set("queued.max.messages.kbytes", "8192");
        self.finish(config)
    }

    /// A [`Kafka::reader_config`] for a reader that may trail by up to `max_wait` (schedules, the visibility
    /// index): the broker holds each fetch of an idle partition up to that long instead of 20 ms. Every fetch
    /// round costs the broker reads of each partition asked for, with or without data, so a reader that asks ten
    /// times less often leaves that CPU to the steps' own consumers.
    pub fn trailing_reader_config(&self, max_wait: Duration) -> ClientConfig {
        let mut config = self.reader_config();
        config.set("fetch.wait.max.ms", max_wait.as_millis().to_string());
        // The operator's options still win, as everywhere.
        self.finish(config)
    }

    /// Creates the topics that are missing and checks the partition count of those that exist.
    pub async fn ensure_topics(&self, topics: &[TopicSpec]) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> = self
            .finish(self.base())
            .create()
            .context("creating a Kafka admin client")?;
        let new_topics: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|t| {
                let topic = NewTopic::new(
                    &t.name,
                    t.partitions,
                    TopicReplication::Fixed(t.replication_factor),
                );
                if t.compacted {
                    topic.set("cleanup.policy", "compact")
                } else {
                    topic
                }
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = admin
            .create_topics(new_topics.iter(), &options)
            .await
            .with_context(|| {
                format!(
                    "creating topics on {}; {}",
                    self.bootstrap_servers,
                    self.reach_hint()
                )
            })?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => bail!("creating topic {name}: {code}"),
            }
        }
        // A cluster may take a moment to show a topic it has just created.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let counts: std::collections::HashMap<String, usize> = loop {
            let metadata = admin
                .inner()
                .fetch_metadata(None, Duration::from_secs(10))
                .with_context(|| format!("reading topic metadata; {}", self.reach_hint()))?;
            let counts: std::collections::HashMap<String, usize> = metadata
                .topics()
                .iter()
                .map(|t| (t.name().to_string(), t.partitions().len()))
                .collect();
            let all_visible = topics
                .iter()
                .all(|t| counts.get(&t.name).is_some_and(|n| *n > 0));
            if all_visible || std::time::Instant::now() > deadline {
                break counts;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for spec in topics {
            let actual = counts.get(&spec.name).copied().unwrap_or(0);
            if actual != spec.partitions as usize {
                bail!(
                    "topic {} has {actual} partitions but {} are configured; partition counts cannot change \
                     (the broker cannot add partitions, and keyed state would move). Configure {actual}, or \
                     use a new topic prefix.",
                    spec.name,
                    spec.partitions
                );
            }
        }
        Ok(())
    }

    /// The name of every topic of the cluster. Blocking: call it from a blocking context.
    pub fn topic_names(&self) -> anyhow::Result<Vec<String>> {
        let metadata = self
            .reader()?
            .fetch_metadata(None, Duration::from_secs(10))
            .with_context(|| format!("reading the cluster's topics; {}", self.reach_hint()))?;
        Ok(metadata
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| t.name().to_string())
            .collect())
    }

    /// Number of partitions of `topic` (0 when it does not exist).
    pub fn partition_count(&self, topic: &str) -> anyhow::Result<usize> {
        let reader = self.reader()?;
        let metadata = reader
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .with_context(|| format!("reading metadata of {topic}; {}", self.reach_hint()))?;
        Ok(metadata
            .topics()
            .first()
            .filter(|t| t.error().is_none())
            .map(|t| t.partitions().len())
            .unwrap_or(0))
    }

    /// Streams the records of one partition from `from` up to the end it had when called, in chunks of at most
    /// `chunk` records and about [`CHUNK_BYTES`] (a chunk ends after the record that reaches it), through a
    /// channel of two chunks: memory stays bounded whatever the partition's length or its records' sizes.
    /// The read runs on a blocking thread; it fails only when no record arrives for a minute, never because a
    /// long partition takes long.
    pub fn stream_to_end(
        &self,
        topic: &str,
        partition: i32,
        from: Offset,
        chunk: usize,
    ) -> tokio::sync::mpsc::Receiver<anyhow::Result<Vec<OwnedMessage>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let (kafka, topic) = (self.clone(), topic.to_string());
        tokio::task::spawn_blocking(move || {
            let bounds = (chunk.max(1), CHUNK_BYTES);
            let sent = kafka.read_chunks(&topic, partition, from, bounds, |records| {
                tx.blocking_send(Ok(records)).is_ok()
            });
            if let Err(e) = sent {
                let _ = tx.blocking_send(Err(e));
            }
        });
        rx
    }

    /// Reads like [`Kafka::stream_to_end`], handing each chunk of at most `(records, bytes)` to `deliver`; stops
    /// early when it returns false.
    fn read_chunks(
        &self,
        topic: &str,
        partition: i32,
        from: Offset,
        (chunk, chunk_bytes): (usize, usize),
        mut deliver: impl FnMut(Vec<OwnedMessage>) -> bool,
    ) -> anyhow::Result<()> {
        const STALL: Duration = Duration::from_secs(60);
        let reader = self.reader()?;
        let (low, high) = reader
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .with_context(|| {
                format!(
                    "reading the end offsets of {topic}/{partition}; {}",
                    self.reach_hint()
                )
            })?;
        let start = match from {
            Offset::Offset(o) => o.max(low),
            _ => low,
        };
        if start >= high {
            return Ok(());
        }
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, partition, Offset::Offset(start))?;
        reader.assign(&assignment)?;
        let mut records = Vec::with_capacity(chunk.min(4096));
        let mut bytes = 0usize;
        let mut last_progress = std::time::Instant::now();
        loop {
            match reader.poll(Duration::from_millis(200)) {
                Some(Ok(msg)) => {
                    last_progress = std::time::Instant::now();
                    let offset = msg.offset();
                    bytes += msg.payload_len() + msg.key_len();
                    records.push(msg.detach());
                    if offset + 1 >= high {
                        deliver(records);
                        return Ok(());
                    }
                    if records.len() >= chunk || bytes >= chunk_bytes {
                        bytes = 0;
                        if !deliver(std::mem::take(&mut records)) {
                            return Ok(());
                        }
                    }
                }
                // Compaction can leave the last offsets empty: the end of the partition ends the read too.
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {
                    deliver(records);
                    return Ok(());
                }
                Some(Err(e)) => {
                    return Err(e).with_context(|| format!("reading {topic}/{partition}"))
                }
                None => {}
            }
            if last_progress.elapsed() > STALL {
                bail!("reading {topic}/{partition}: no record for {STALL:?} before offset {high}");
            }
        }
    }

    /// Every record of one partition from `from` up to the end it had when called. Blocking: call it from a
    /// blocking context.
    pub fn read_to_end(
        &self,
        topic: &str,
        partition: i32,
        from: Offset,
    ) -> anyhow::Result<Vec<OwnedMessage>> {
        let mut all = Vec::new();
        self.read_chunks(
            topic,
            partition,
            from,
            (usize::MAX, usize::MAX),
            |records| {
                all.extend(records);
                true
            },
        )?;
        Ok(all)
    }
}

/// Exits the process (code 70) when librdkafka has failed `producer` for good: an idempotent producer that
/// the broker refused (`OutOfOrderSequenceNumber`) never recovers, so retrying on it would fail for ever; a
/// restart gets a new producer, and what was not acknowledged is produced again from where the process resumes.
/// `what` names the producer in the log.
pub fn exit_if_producer_failed(producer: &FutureProducer, what: &str) {
    use rdkafka::producer::Producer;
    if let Some((code, reason)) = producer.client().fatal_error() {
        tracing::error!(
            ?code,
            "the {what} producer failed for good ({reason}); exiting so that a restart recovers"
        );
        std::process::exit(70);
    }
}

/// A topic edow needs.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    pub compacted: bool,
}

impl TopicSpec {
    pub fn new(name: impl Into<String>, partitions: i32, replication_factor: i32) -> TopicSpec {
        TopicSpec {
            name: name.into(),
            partitions,
            replication_factor,
            compacted: false,
        }
    }

    pub fn compacted(mut self) -> TopicSpec {
        self.compacted = true;
        self
    }
}

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A record to produce.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: String,
    /// Explicit partition; `None` lets the murmur2 partitioner pick by key.
    pub partition: Option<i32>,
    pub key: Vec<u8>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(&'static str, Vec<u8>)>,
}

/// `out` as an rdkafka record, borrowing its key and payload.
pub fn future_record(out: &Outgoing) -> rdkafka::producer::FutureRecord<'_, [u8], [u8]> {
    use rdkafka::message::{Header, OwnedHeaders};

    let mut headers = OwnedHeaders::new_with_capacity(out.headers.len());
    for (key, value) in &out.headers {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_slice()),
        });
    }
    let mut record = rdkafka::producer::FutureRecord::to(&out.topic)
        .key(out.key.as_slice())
        .headers(headers);
    if let Some(payload) = out.payload.as_deref() {
        record = record.payload(payload);
    }
    if let Some(partition) = out.partition {
        record = record.partition(partition);
    }
    record
}

/// Cuts `text` to at most `max` bytes, on a character boundary.
pub fn truncate_utf8(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

/// Produces every record, then waits for all acknowledgements; returns (partition, offset) of each, in order.
/// Fails if any record is not acknowledged, so a caller that commits only after this loses nothing.
pub async fn produce_all(
    producer: &FutureProducer,
    records: &[Outgoing],
) -> anyhow::Result<Vec<(i32, i64)>> {
    let pending = send_all(producer, records).await?;
    acknowledged(pending).await
}

/// A record handed to the producer, with where it goes (for errors).
pub struct Sent {
    pub topic: String,
    pub delivery: rdkafka::producer::DeliveryFuture,
}

/// Hands every record to the producer, in order, waiting while its queue is full, without waiting for
/// acknowledgements: see [`acknowledged`].
pub async fn send_all(
    producer: &FutureProducer,
    records: &[Outgoing],
) -> anyhow::Result<Vec<Sent>> {
    let mut pending = Vec::with_capacity(records.len());
    for out in records {
        let mut record = future_record(out);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(Sent {
                        topic: out.topic.clone(),
                        delivery,
                    });
                    break;
                }
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    back,
                )) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    return Err(e).with_context(|| format!("producing to {}", out.topic))
                }
            }
        }
    }
    Ok(pending)
}

/// Waits for the acknowledgement of every record sent; returns (partition, offset) of each, in order. Fails on
/// the first record not acknowledged (librdkafka gave up after `message.timeout.ms`).
pub async fn acknowledged(pending: Vec<Sent>) -> anyhow::Result<Vec<(i32, i64)>> {
    let mut positions = Vec::with_capacity(pending.len());
    let mut pending_topics: Vec<(String, u64)> = Vec::new();
    for sent in pending {
        match pending_topics.last_mut() {
            Some((topic, n)) if *topic == sent.topic => *n += 1,
            _ => pending_topics.push((sent.topic.clone(), 1)),
        }
        let delivered = sent
            .delivery
            .await
            .context("the producer was dropped before acknowledging")?
            .map_err(|(e, _)| e)
            .with_context(|| format!("producing to {}", sent.topic))?;
        positions.push((delivered.partition, delivered.offset));
    }
    count_produced(pending_topics);
    Ok(positions)
}

/// Adds acknowledged records to `edow_records_produced_total`, a run of records to one topic at a time.
fn count_produced(runs: Vec<(String, u64)>) {
    for (topic, n) in runs {
        edow_telemetry::metrics::RECORDS_PRODUCED
            .with_label_values(&[&topic])
            .inc_by(n);
    }
}

/// Adds one acknowledged record to `edow_records_produced_total`.
pub fn count_produced_one(topic: &str) {
    edow_telemetry::metrics::RECORDS_PRODUCED
        .with_label_values(&[topic])
        .inc();
}
