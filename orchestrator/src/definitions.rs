//! The deployed workflow definitions, read from the compacted `edow.definitions` topic into memory and kept
//! current by a background reader. Instances look up the exact version they are pinned to.
//!
//! The first record of a (name, version) wins: a later record under the same key (a racing deploy, a replayed
//! or forged record) is ignored and logged, so a running instance never finds its definition changed under it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use edow_engine::{Definition, Limits};
use edow_kafka::Kafka;
use edow_schemas::contracts::WorkflowDefinition;
use edow_schemas::Codec;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Default)]
struct Catalog {
    versions: HashMap<(String, i32), Arc<Definition>>,
    latest: HashMap<String, i32>,
}

pub struct Definitions {
    catalog: Arc<RwLock<Catalog>>,
    /// Offset of the next record to read.
    applied: watch::Receiver<i64>,
    kafka: Kafka,
    topic: String,
    reader: JoinHandle<()>,
}

impl Definitions {
    /// Starts reading `topic` from the beginning and returns once everything in it has been read.
    pub async fn open(
        kafka: &Kafka,
        codec: Arc<Codec>,
        topic: &str,
        limits: Limits,
    ) -> anyhow::Result<Definitions> {
        let consumer: StreamConsumer = kafka
            .group_consumer_config("edow-definitions-reader")
            .create()
            .context("creating the definitions reader")?;
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, 0, Offset::Beginning)?;
        consumer.assign(&assignment)?;
        let catalog = Arc::new(RwLock::new(Catalog::default()));
        let (applied_tx, applied) = watch::channel(0);
        let reader = tokio::spawn(read_forever(
            consumer,
            codec,
            catalog.clone(),
            applied_tx,
            limits,
        ));
        let definitions = Definitions {
            catalog,
            applied,
            kafka: kafka.clone(),
            topic: topic.to_string(),
            reader,
        };
        definitions.catch_up().await?;
        Ok(definitions)
    }

    /// Returns once every definition deployed before this call has been read.
    pub async fn catch_up(&self) -> anyhow::Result<()> {
        let kafka = self.kafka.clone();
        let topic = self.topic.clone();
        let end = tokio::task::spawn_blocking(move || {
            let reader = kafka.reader()?;
            reader
                .fetch_watermarks(&topic, 0, Duration::from_secs(10))
                .map(|(_, high)| high)
                .with_context(|| format!("reading the end of {topic}"))
        })
        .await??;
        let mut applied = self.applied.clone();
        tokio::time::timeout(
            Duration::from_secs(60),
            applied.wait_for(|next| *next >= end),
        )
        .await
        .context("the definitions topic was not read to its end within 60 s")?
        .context("the definitions reader stopped")?;
        Ok(())
    }

    /// The definition `name` at `version` (the latest deployed for `None`), with its version.
    pub fn get(&self, name: &str, version: Option<i32>) -> Option<(i32, Arc<Definition>)> {
        let catalog = self.catalog.read().unwrap_or_else(|e| e.into_inner());
        let version = version.or_else(|| catalog.latest.get(name).copied())?;
        catalog
            .versions
            .get(&(name.to_string(), version))
            .map(|d| (version, d.clone()))
    }
}

impl Drop for Definitions {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn read_forever(
    consumer: StreamConsumer,
    codec: Arc<Codec>,
    catalog: Arc<RwLock<Catalog>>,
    applied: watch::Sender<i64>,
    limits: Limits,
) {
    loop {
        let msg = match consumer.recv().await {
            Ok(msg) => msg,
            Err(e) => {
                tracing::warn!("reading definitions: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let offset = msg.offset();
        loop {
            match codec.decode::<WorkflowDefinition>(msg.payload()).await {
                Ok(deployed) => {
                    let label = format!("{}:{}", deployed.name, deployed.version);
                    match Definition::parse_with_limits(&label, &deployed.source, &limits) {
                        Ok(definition) if definition.name != deployed.name => tracing::error!(
                            offset,
                            "skipping definition record {label}: its source is named '{}'",
                            definition.name
                        ),
                        Ok(definition) => {
                            let mut catalog = catalog.write().unwrap_or_else(|e| e.into_inner());
                            let key = (deployed.name.clone(), deployed.version);
                            if catalog.versions.contains_key(&key) {
                                tracing::warn!(
                                    offset,
                                    "ignoring a second record of definition {label}: the first one deployed wins"
                                );
                            } else {
                                let latest = catalog.latest.entry(deployed.name).or_insert(0);
                                *latest = (*latest).max(deployed.version);
                                catalog.versions.insert(key, Arc::new(definition));
                            }
                        }
                        Err(e) => {
                            tracing::error!(offset, "skipping an invalid deployed definition: {e}")
                        }
                    }
                    break;
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!("decoding a definition: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    tracing::error!(offset, "skipping an undecodable definition record: {e}");
                    break;
                }
            }
        }
        applied.send_replace(offset + 1);
    }
}
