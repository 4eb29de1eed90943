//! The registry's storage: a single-partition compacted Kafka topic (`_schemas` by default) read from the
//! beginning into a [`Store`]. Writes are appended and then awaited until this instance has applied them, so a
//! write is visible to its own next read; reads before a write first append a NOOP and await it, which makes the
//! store reflect everything any instance wrote before (Confluent's KafkaStore works the same way).
//!
//! Records are applied strictly in offset order with no offset skipped unless it is known to hold no record
//! any more (see [`Sequencer`]): the first claim in log order wins, so a reader that skipped a claim would
//! pick another winner than every other instance.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::store::{Applied, LogKey, Store};

const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an offset must have been seen missing before a read that begins after that, and still finds it
/// missing, takes it for a record compaction removed rather than one still being written. Kafka never shows
/// an offset past one it has not stored, but nisshi's in-memory storage does: it hands out an offset before
/// it stores the record, so a fetch can return offset N+1 while N is being written (seen under load: a few
/// milliseconds). Kafka's compaction leaves offsets that hold nothing for good; waiting for them costs a
/// reader that meets them this long, once, not per offset.
const GAP_SETTLE: Duration = Duration::from_secs(3);
/// First and longest wait before reading a gap again to see whether its record has been stored since.
const REREAD_FIRST: Duration = Duration::from_millis(10);
const REREAD_MAX: Duration = Duration::from_millis(500);

pub struct SchemaLog {
    producer: FutureProducer,
    topic: String,
    store: Arc<RwLock<Store>>,
    /// Offset of the next record to apply: everything below it is in `store`.
    applied: watch::Receiver<i64>,
    reader: JoinHandle<()>,
}

impl SchemaLog {
    /// Creates the topic when missing, starts reading it from the beginning, and returns once the whole
    /// existing log has been applied.
    /// `options` are the operator's librdkafka settings (security, tuning), applied over the registry's own.
    pub async fn open(
        bootstrap: &str,
        options: &[(String, String)],
        topic: &str,
        replication: i32,
    ) -> anyhow::Result<SchemaLog> {
        ensure_topic(bootstrap, options, topic, replication).await?;

        let mut producer = ClientConfig::new();
        producer
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "0")
            // One request at a time: schemas are written rarely, and nisshi has refused pipelined idempotent
            // batches as out of order under load (OutOfOrderSequenceNumber, fatal to the producer).
            .set("max.in.flight.requests.per.connection", "1");
        let producer: FutureProducer = with_options(producer, options)
            .create()
            .context("creating the registry's Kafka producer")?;

        let mut consumer_config = ClientConfig::new();
        consumer_config
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "edow-registry-reader")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "10");
        let reader = Reader {
            config: with_options(consumer_config, options),
            topic: topic.to_string(),
        };
        // The first read is started here so that a consumer that cannot be created fails `open`.
        let consumer = reader.read_from(0)?;

        let store = Arc::new(RwLock::new(Store::default()));
        let (applied_tx, applied) = watch::channel(0);
        let reader = tokio::spawn(read_forever(reader, consumer, store.clone(), applied_tx));

        let log = SchemaLog {
            producer,
            topic: topic.to_string(),
            store,
            applied,
            reader,
        };
        log.sync().await.context("reading the existing schemas")?;
        Ok(log)
    }

    /// The state as applied so far.
    pub fn read(&self) -> RwLockReadGuard<'_, Store> {
        self.store.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns once every record written before this call, by any instance, has been applied; with the offset
    /// of the NOOP written to learn that.
    pub async fn sync(&self) -> anyhow::Result<i64> {
        self.append(&LogKey::Noop { magic: 0 }, None::<&()>).await
    }

    /// Rather than answer 500 to every registration once its producer has failed for good, the registry exits
    /// for its supervisor to start it again. Nothing is lost: a registration either reached the log (and is read
    /// back by the next instance) or was answered with an error.
    fn exit_if_fatal(&self) {
        edow_kafka::exit_if_producer_failed(&self.producer, "schemas");
    }

    /// Appends a record (a tombstone when `value` is None, except for NOOPs, which carry an empty object)
    /// and returns its offset once this instance has applied it.
    pub async fn append<V: serde::Serialize>(
        &self,
        key: &LogKey,
        value: Option<&V>,
    ) -> anyhow::Result<i64> {
        let key_bytes = serde_json::to_vec(key)?;
        let value_bytes = match (key, value) {
            (LogKey::Noop { .. }, _) => Some(b"{}".to_vec()),
            (_, Some(v)) => Some(serde_json::to_vec(v)?),
            (_, None) => None,
        };
        let mut record = FutureRecord::to(&self.topic).key(&key_bytes).partition(0);
        if let Some(v) = value_bytes.as_deref() {
            record = record.payload(v);
        }
        let delivery = match self.producer.send(record, WRITE_TIMEOUT).await {
            Ok(delivery) => delivery,
            Err((e, _)) => {
                self.exit_if_fatal();
                return Err(anyhow::anyhow!("writing to {}: {e}", self.topic));
            }
        };
        let offset = delivery.offset;
        let mut applied = self.applied.clone();
        tokio::time::timeout(WRITE_TIMEOUT, applied.wait_for(|next| *next > offset))
            .await
            .with_context(|| {
                format!(
                    "record at offset {offset} of {} was written but not read back within {WRITE_TIMEOUT:?}",
                    self.topic
                )
            })?
            .context("the registry's log reader stopped")?;
        Ok(offset)
    }
}

impl Drop for SchemaLog {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// How to start a read of the topic's only partition.
struct Reader {
    config: ClientConfig,
    topic: String,
}

impl Reader {
    /// A consumer of its own reading from `offset`: one per read, so that no record fetched for an earlier
    /// read can be taken for one of this read.
    fn read_from(&self, offset: i64) -> anyhow::Result<StreamConsumer> {
        let consumer: StreamConsumer = self
            .config
            .create()
            .context("creating the registry's Kafka consumer")?;
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(&self.topic, 0, Offset::Offset(offset))?;
        consumer
            .assign(&assignment)
            .with_context(|| format!("assigning {} partition 0", self.topic))?;
        Ok(consumer)
    }
}

async fn read_forever(
    reader: Reader,
    mut consumer: StreamConsumer,
    store: Arc<RwLock<Store>>,
    applied: watch::Sender<i64>,
) {
    let mut order = Sequencer::default();
    loop {
        loop {
            let received = match order.reread_at() {
                None => consumer.recv().await,
                Some(at) => {
                    match tokio::time::timeout_at(at.into(), consumer.recv()).await {
                        Ok(received) => received,
                        // Records wait behind a gap: read again from it.
                        Err(_) => break,
                    }
                }
            };
            match received {
                Ok(msg) => {
                    let ready = order.deliver(
                        msg.offset(),
                        msg.key().unwrap_or_default(),
                        msg.payload(),
                        Instant::now(),
                    );
                    if ready.is_empty() {
                        continue;
                    }
                    let mut store = store.write().unwrap_or_else(|e| e.into_inner());
                    for record in ready {
                        match store.apply(&record.key, record.value.as_deref()) {
                            Ok(Applied::Done) => {}
                            Ok(Applied::Lost(why)) => {
                                tracing::debug!(offset = record.offset, "{why}")
                            }
                            Err(why) => tracing::warn!(offset = record.offset, "{why}"),
                        }
                    }
                    drop(store);
                    applied.send_replace(order.next());
                }
                Err(e) => {
                    tracing::warn!("reading the schemas topic: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        let from = order.reread(Instant::now());
        tracing::debug!(
            offset = from,
            "reading the schemas topic again from a gap in its offsets"
        );
        let next = loop {
            match reader.read_from(from) {
                Ok(next) => break next,
                Err(e) => {
                    tracing::warn!("{e:#}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        // Closing a consumer blocks until its threads have stopped.
        let done = std::mem::replace(&mut consumer, next);
        tokio::task::spawn_blocking(move || drop(done));
    }
}

/// A record read from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogRecord {
    pub offset: i64,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// Puts what a consumer delivers into the log's order: every offset, in order, none skipped. Pure: the
/// caller passes the time.
///
/// A record delivered past an offset not delivered (a gap) waits, and the reader reads again from the gap,
/// soon at first, then less often. An offset comes to count as holding no record (compaction removed it)
/// only when a read that began [`GAP_SETTLE`] or more after some read first went past the offset goes past
/// it too. The broker may show a record at N+1 while it is still storing N, and N may be the claim that wins
/// the id the record at N+1 claims: a reader that moved past N would bind the id to the loser, and its
/// instance would answer a client with an id that another schema won.
#[derive(Debug, Default)]
pub(crate) struct Sequencer {
    /// Offset of the next record to apply: every offset below it has been applied or holds no record.
    next: i64,
    /// Records delivered past a gap, by offset.
    ahead: BTreeMap<i64, LogRecord>,
    /// When reads first went past offsets: `(end, at)` means that at `at` an offset at `end - 1` had been
    /// delivered, and none at `end` or past it. Both rise; entries with `end <= next` are dropped.
    passed: VecDeque<(i64, Instant)>,
    /// When the current read began (`None`: the first read, begun with the reader), and the offset after the
    /// last one it delivered: it went past every offset from `next` below this that `ahead` lacks.
    read_began: Option<Instant>,
    read_next: i64,
}

impl Sequencer {
    /// The offset of the next record to apply.
    pub fn next(&self) -> i64 {
        self.next
    }

    /// Takes a record the current read delivered; returns the records that can be applied now, in order.
    pub fn deliver(
        &mut self,
        offset: i64,
        key: &[u8],
        value: Option<&[u8]>,
        now: Instant,
    ) -> Vec<LogRecord> {
        if offset >= self.next {
            self.ahead.entry(offset).or_insert_with(|| LogRecord {
                offset,
                key: key.to_vec(),
                value: value.map(<[u8]>::to_vec),
            });
        }
        self.read_next = self.read_next.max(offset + 1);
        if self.passed.back().is_none_or(|&(end, _)| end <= offset) {
            self.passed.push_back((offset + 1, now));
        }
        let mut ready = Vec::new();
        loop {
            if let Some(record) = self.ahead.remove(&self.next) {
                ready.push(record);
                self.next += 1;
                continue;
            }
            // Offsets this read went past and `ahead` lacks, that a read went past long enough before this
            // one began: no record will come for them.
            let limit = self
                .ahead
                .keys()
                .next()
                .map_or(self.read_next, |&first| first.min(self.read_next));
            let settled = match self.read_began {
                Some(began) => self
                    .passed
                    .iter()
                    .take_while(|&&(_, at)| at + GAP_SETTLE <= began)
                    .last()
                    .map_or(self.next, |&(end, _)| end),
                None => self.next,
            };
            let to = limit.min(settled);
            if to <= self.next {
                break;
            }
            self.next = to;
        }
        while self
            .passed
            .front()
            .is_some_and(|&(end, _)| end <= self.next)
        {
            self.passed.pop_front();
        }
        ready
    }

    /// When to give up the current read for one from `next`, to see whether the offsets it went past hold
    /// records by now; `None` while there is no gap, or while the current read has not gone past `next` yet
    /// (a new consumer takes a while to deliver; giving it up before it has would never get further).
    pub fn reread_at(&self) -> Option<Instant> {
        if self.read_next <= self.next {
            return None;
        }
        // When a read first went past `next`.
        let since = self
            .passed
            .iter()
            .find(|&&(end, _)| end > self.next)
            .map(|&(_, at)| at)?;
        let Some(began) = self.read_began else {
            return Some(since + REREAD_FIRST);
        };
        let backoff = began
            .saturating_duration_since(since)
            .clamp(REREAD_FIRST, REREAD_MAX);
        Some(
            (began + backoff)
                .min(since + GAP_SETTLE)
                .max(began + REREAD_FIRST),
        )
    }

    /// Starts a new read at `now`; returns the offset it must begin at.
    pub fn reread(&mut self, now: Instant) -> i64 {
        self.read_began = Some(now);
        self.read_next = self.next;
        self.next
    }
}

/// `config` with the operator's settings over it.
fn with_options(mut config: ClientConfig, options: &[(String, String)]) -> ClientConfig {
    for (key, value) in options.iter().filter(|(k, _)| !k.is_empty()) {
        config.set(key, value);
    }
    config
}

async fn ensure_topic(
    bootstrap: &str,
    options: &[(String, String)],
    topic: &str,
    replication: i32,
) -> anyhow::Result<()> {
    let mut admin = ClientConfig::new();
    admin.set("bootstrap.servers", bootstrap);
    let admin: AdminClient<DefaultClientContext> = with_options(admin, options)
        .create()
        .context("creating the registry's Kafka admin client")?;
    let new_topic = NewTopic::new(topic, 1, TopicReplication::Fixed(replication))
        .set("cleanup.policy", "compact");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics([&new_topic], &options)
        .await
        .with_context(|| format!("creating topic {topic} on {bootstrap}"))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => bail!("creating topic {name}: {code}"),
        }
    }
    let metadata = admin
        .inner()
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("reading metadata of {topic}"))?;
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    if partitions != 1 {
        bail!(
            "topic {topic} has {partitions} partitions; the registry needs exactly 1 so that every instance \
             applies records in one order. Delete it or point --topic at another topic."
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(records: &[LogRecord]) -> Vec<i64> {
        records.iter().map(|r| r.offset).collect()
    }

    #[test]
    fn a_record_delivered_past_one_still_being_written_waits_for_it() {
        let t = Instant::now();
        let mut order = Sequencer::default();
        assert_eq!(offsets(&order.deliver(0, b"a", Some(b"{}"), t)), vec![0]);
        assert_eq!(order.reread_at(), None);
        // Offset 1 is being written; the broker already shows 2.
        assert!(order.deliver(2, b"c", Some(b"{}"), t).is_empty());
        assert_eq!(order.next(), 1);
        assert_eq!(order.reread_at(), Some(t + REREAD_FIRST));
        // Read again: 1 is stored by now and comes first. The new read is not given up before it delivers.
        assert_eq!(order.reread(t + REREAD_FIRST), 1);
        assert_eq!(order.reread_at(), None);
        let ready = order.deliver(1, b"b", None, t + REREAD_FIRST);
        assert_eq!(offsets(&ready), vec![1, 2]);
        assert_eq!(
            (ready[0].key.as_slice(), ready[0].value.as_deref()),
            (&b"b"[..], None)
        );
        assert_eq!(order.next(), 3);
        assert_eq!(order.reread_at(), None);
        // The rest of the new read delivers what is already applied.
        assert!(order
            .deliver(2, b"c", Some(b"{}"), t + REREAD_FIRST)
            .is_empty());
        assert_eq!(offsets(&order.deliver(3, b"d", None, t)), vec![3]);
    }

    #[test]
    fn offsets_compaction_emptied_are_passed_only_after_the_gap_settled() {
        let t = Instant::now();
        let mut order = Sequencer::default();
        assert_eq!(offsets(&order.deliver(0, b"a", None, t)), vec![0]);
        // 1 and 2 are gone for good (or still being written: the reader cannot tell yet).
        assert!(order.deliver(3, b"d", None, t).is_empty());
        assert!(order.deliver(5, b"f", None, t).is_empty());
        // Reads again, sooner and then less often, find the gaps still there.
        let mut now = t;
        let mut waits = Vec::new();
        while let Some(at) = order.reread_at() {
            assert!(at > now, "{at:?} {now:?}");
            waits.push(at - now);
            now = at;
            assert_eq!(order.reread(now), 1);
            assert_eq!(order.reread_at(), None);
            // A new consumer may take long to deliver; the read that began is the one that counts.
            let ready = offsets(&order.deliver(3, b"d", None, now + Duration::from_secs(1)));
            if now < t + GAP_SETTLE {
                assert!(ready.is_empty(), "passed a gap after {:?}", now - t);
                assert!(order.deliver(5, b"f", None, now).is_empty());
            } else {
                // Only a read begun when the gaps had been known for GAP_SETTLE passes them.
                assert_eq!(ready, vec![3]);
                assert_eq!(offsets(&order.deliver(5, b"f", None, now)), vec![5]);
            }
        }
        assert_eq!(now, t + GAP_SETTLE);
        assert_eq!(order.next(), 6);
        assert_eq!(waits[0], REREAD_FIRST);
        // Less and less often, up to REREAD_MAX; the last read is when the gaps settle.
        let (last, before) = waits.split_last().unwrap();
        assert!(before.windows(2).all(|w| w[1] >= w[0]), "{waits:?}");
        assert!(waits.iter().all(|w| *w <= REREAD_MAX));
        assert!(*last <= REREAD_MAX);
        assert!(waits.len() < 20, "{waits:?}");
    }

    #[test]
    fn a_record_written_late_fills_its_gap_in_order() {
        let t = Instant::now();
        let mut order = Sequencer::default();
        assert!(order.deliver(1, b"b", None, t).is_empty());
        assert!(order.deliver(2, b"c", None, t).is_empty());
        // Offset 0 takes a second to be stored; the reads before find it missing.
        let late = t + Duration::from_secs(1);
        while let Some(at) = order.reread_at() {
            assert!(at < t + GAP_SETTLE);
            assert_eq!(order.reread(at), 0);
            let first = if at >= late { 0 } else { 1 };
            let ready = order.deliver(first, b"x", None, at);
            if first == 0 {
                assert_eq!(offsets(&ready), vec![0, 1, 2]);
            } else {
                assert!(ready.is_empty());
            }
        }
        assert_eq!(order.next(), 3);
    }

    #[test]
    fn a_gap_a_read_began_before_it_settled_is_not_passed() {
        let t = Instant::now();
        let mut order = Sequencer::default();
        assert!(order.deliver(2, b"c", None, t).is_empty());
        // A read begun before the gap settled, long-lived: it may not pass the gap however late it delivers.
        order.reread(t + GAP_SETTLE - Duration::from_millis(1));
        assert!(order.deliver(2, b"c", None, t + GAP_SETTLE * 10).is_empty());
        let at = order.reread_at().unwrap();
        assert!(at >= t + GAP_SETTLE);
        order.reread(at);
        assert_eq!(offsets(&order.deliver(2, b"c", None, at)), vec![2]);
    }
}
