//! The registry's storage: a single-partition compacted Kafka topic (`_schemas` by default) read from the
//! beginning into a [`Store`]. Writes are appended and then awaited until this instance has applied them, so a
//! write is visible to its own next read; reads before a write first append a NOOP and await it, which makes the
//! store reflect everything any instance wrote before (Confluent's KafkaStore works the same way).

use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

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
    pub async fn open(bootstrap: &str, topic: &str, replication: i32) -> anyhow::Result<SchemaLog> {
        ensure_topic(bootstrap, topic, replication).await?;

        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "0")
            .create()
            .context("creating the registry's Kafka producer")?;

        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "edow-registry-reader")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "10")
            .create()
            .context("creating the registry's Kafka consumer")?;
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, 0, Offset::Beginning)?;
        consumer
            .assign(&assignment)
            .with_context(|| format!("assigning {topic} partition 0"))?;

        let store = Arc::new(RwLock::new(Store::default()));
        let (applied_tx, applied) = watch::channel(0);
        let reader = tokio::spawn(read_forever(consumer, store.clone(), applied_tx));

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
        let delivery = self
            .producer
            .send(record, WRITE_TIMEOUT)
            .await
            .map_err(|(e, _)| anyhow::anyhow!("writing to {}: {e}", self.topic))?;
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

async fn read_forever(
    consumer: StreamConsumer,
    store: Arc<RwLock<Store>>,
    applied: watch::Sender<i64>,
) {
    loop {
        match consumer.recv().await {
            Ok(msg) => {
                let key = msg.key().unwrap_or_default();
                let outcome = store
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .apply(key, msg.payload());
                match outcome {
                    Ok(Applied::Done) => {}
                    Ok(Applied::Lost(why)) => tracing::debug!(offset = msg.offset(), "{why}"),
                    Err(why) => tracing::warn!(offset = msg.offset(), "{why}"),
                }
                applied.send_replace(msg.offset() + 1);
            }
            Err(e) => {
                tracing::warn!("reading the schemas topic: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn ensure_topic(bootstrap: &str, topic: &str, replication: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
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
