//! The orchestrator: one consume-process-produce-commit loop over `edow.triggers`, `edow.signals` and
//! `edow.results`, with the state of every owned partition restored from the changelog `edow.state` before the
//! partition is processed.
//!
//! Per batch, in phases: decode every input (`decode`; a registry outage past a bound rewinds the batch and
//! nothing is applied); apply them and due timers to the pure engine (`apply`); wait until the previous batch's
//! outputs are acknowledged, write the changelog record of every changed workflow, with its outbox, and wait for
//! the acks: the one acknowledged write on the critical path; hand the tasks, then the lifecycle events, to a
//! background task that produces them while the next batch is applied (`produce`); commit the input offsets
//! asynchronously. See `partition` for how the outbox makes a crash at any point lose nothing and emit nothing
//! twice, and `restore` for the way back.
//!
//! Guarantee: nothing that belongs to one workflow ends the loop. A bad input is dead-lettered with its reason;
//! a workflow whose state cannot go on (an engine error, a record past the size limit) is failed with a lifecycle
//! event. The process exits only when Kafka itself fails it (a write not acknowledged within the producer's
//! timeout), and then a restart restores from the changelog.

pub mod api;
mod apply;
mod blob_purge;
pub mod client;
mod consume;
mod decode;
pub mod definitions;
pub mod dlq;
pub mod http;
mod observe;
pub mod partition;
mod produce;
mod rebalance;
mod restore;
pub mod schedules;
pub mod sealing;
mod traces;
pub mod visibility;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use edow_engine::Limits;
use edow_kafka::dead_letters::{self, Reason};
use edow_kafka::{now_millis, Kafka, TopicSpec};
use edow_schemas::{Codec, Topics};
use edow_telemetry::metrics;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureProducer;
use rdkafka::{Message, Offset, TopicPartitionList};

use consume::InputConsumer;
use decode::Stalled;
use definitions::Definitions;
use partition::PartitionState;

const SERVICE: &str = "orchestrator";

/// How often freed memory is handed back to the operating system.
const TRIM_EVERY: Duration = Duration::from_secs(60);

/// Hands freed heap pages back to the operating system. glibc keeps them after a burst (a restore, a purge of
/// ended workflows), so without this the process's memory would follow its high-water mark, not what it holds.
fn trim_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Trigger attribute naming the parent of a child workflow.
pub const PARENT_ATTRIBUTE: &str = "edow.parent";
/// Trigger attribute: how many ancestors a child workflow has.
pub const DEPTH_ATTRIBUTE: &str = "edow.depth";
/// Workflow ids starting with this are edow's own keys in the changelog; triggers may not use them.
pub const RESERVED_ID_PREFIX: &str = "__edow.";
/// Longest workflow id accepted, in bytes: ids become keys, task ids and event ids.
pub const MAX_WORKFLOW_ID_BYTES: usize = 512;

/// What is wrong with `id` as a workflow id, if anything: the one rule for ids from records and from requests.
pub fn workflow_id_problem(id: &str) -> Option<String> {
    if id.is_empty() || id.len() > MAX_WORKFLOW_ID_BYTES || id.starts_with(RESERVED_ID_PREFIX) {
        return Some(format!(
            "must be 1 to {MAX_WORKFLOW_ID_BYTES} bytes and not start with '{RESERVED_ID_PREFIX}'; got {} bytes",
            id.len()
        ));
    }
    None
}

/// How the orchestrator reaches Kafka and the registry, and the shape of its topics.
#[derive(Debug, Clone)]
pub struct Config {
    pub kafka: Kafka,
    pub registry_url: String,
    pub topics: Topics,
    /// Partitions of triggers, signals, results, state and events.
    pub partitions: i32,
    /// Partitions of each task topic it creates.
    pub task_partitions: i32,
    pub replication_factor: i32,
    pub group: String,
    /// Most inputs applied per batch.
    pub max_batch: usize,
    /// Resolution of retry timers.
    pub tick: Duration,
    /// Bounds on payloads and definitions.
    pub limits: Limits,
    /// How long an ended workflow stays in the changelog (and deduplicates its id) before a tombstone purges it.
    pub ended_retention: Duration,
    /// Most ended workflows remembered per partition; past it the oldest are purged early.
    pub max_ended_per_partition: usize,
    /// Largest record the orchestrator produces, in bytes; a workflow whose state or output would exceed it
    /// fails with `state_too_large`. Keep it below the broker's `message.max.bytes`.
    pub max_record_bytes: usize,
    /// How long a batch waits for an unreachable registry before it is rewound and tried again later.
    pub registry_stall_bound: Duration,
    /// How long a signal for a workflow not started yet waits for its trigger before it is dead-lettered.
    pub early_signal_ttl: Duration,
    /// Most workflows per partition with signals waiting for their trigger.
    pub max_early_per_partition: usize,
    /// Where to serve the API (`/v1`), `/metrics`, `/healthz` and `/readyz`; nothing is served without it.
    pub http_addr: Option<std::net::SocketAddr>,
    /// The visibility index's file; `None`: one of this process's own in the temporary directory.
    pub visibility_path: Option<std::path::PathBuf>,
    /// How long ended workflows stay in the visibility index.
    pub visibility_retention: Duration,
    /// The API's token file (`ROLE SHA256 [NAME]` lines); `None`: the API takes every request.
    pub api_tokens: Option<std::path::PathBuf>,
    /// A directory with one secret file per webhook, named after its workflow.
    pub hook_secrets: Option<std::path::PathBuf>,
    /// Serve the API on a non-loopback address without tokens (something in front of it authenticates).
    pub api_allow_unauthenticated: bool,
    /// Serve the listener with TLS, and with client certificates (mTLS) when it names a client CA.
    pub http_tls: Option<edow_telemetry::http::TlsFiles>,
    /// Keys to encrypt workflow data at rest with (see [`sealing`]); `None`: written plain.
    pub keys: Option<Arc<edow_auth::sealing::Keyring>>,
    /// Where values passed by reference are stored: the API stores large inputs and signal payloads there, and
    /// a purged workflow's are deleted. `None`: no blob store.
    pub blobs: Option<edow_blobs::Blobs>,
}

impl Config {
    /// The defaults for everything but where Kafka and the registry are.
    pub fn new(kafka: Kafka, registry_url: String, topics: Topics) -> Config {
        Config {
            kafka,
            registry_url,
            topics,
            partitions: 6,
            task_partitions: 6,
            replication_factor: 1,
            group: "edow-orchestrator".into(),
            max_batch: 500,
            tick: Duration::from_millis(50),
            limits: Limits::default(),
            ended_retention: Duration::from_secs(7 * 24 * 3600),
            max_ended_per_partition: 100_000,
            max_record_bytes: 900 * 1024,
            registry_stall_bound: Duration::from_secs(20),
            early_signal_ttl: Duration::from_secs(3600),
            max_early_per_partition: 10_000,
            http_addr: None,
            visibility_path: None,
            visibility_retention: Duration::from_secs(7 * 24 * 3600),
            api_tokens: None,
            hook_secrets: None,
            api_allow_unauthenticated: false,
            http_tls: None,
            keys: None,
            blobs: None,
        }
    }
}

/// The outputs of one batch, in the order they are produced.
#[derive(Default)]
struct BatchOutput {
    /// Workflows changed in this batch, by partition.
    changed: BTreeSet<(i32, String)>,
    /// Ended workflows whose retention is over, and early signals that waited too long: a tombstone each.
    purged: Vec<(i32, String)>,
    /// Workflows whose early signals changed.
    early: BTreeSet<(i32, String)>,
    /// Early signals that waited too long, to dead-letter.
    expired: Vec<partition::EarlySignal>,
    dead_letters: Vec<edow_schemas::contracts::DeadLetter>,
    /// Child triggers that were refused: (parent id, child id, why), reported to the parent as a failed result.
    refused_children: Vec<(String, String, Reason)>,
    /// The trace context of the last input applied to each workflow: its records are sent below it.
    trace_parents: HashMap<String, edow_telemetry::trace::TraceContext>,
}

struct Orchestrator {
    config: Config,
    codec: Arc<Codec>,
    producer: FutureProducer,
    definitions: Definitions,
    partitions: HashMap<i32, PartitionState>,
    task_topics: HashSet<String>,
    /// The last batch's tasks and events being produced, with their positions in the events topic once done.
    outputs_in_flight: Option<tokio::task::JoinHandle<anyhow::Result<produce::Confirmed>>>,
    /// Offsets of applied inputs not committed yet, and when the last commit was.
    to_commit: HashMap<(String, i32), i64>,
    last_commit: Instant,
    /// When each partition's marker was last written, and the markers confirmed but not written yet.
    last_marker: HashMap<i32, Instant>,
    markers_due: HashMap<i32, i64>,
    /// Batches rewound because the registry stayed unreachable past `registry_stall_bound`, since start.
    registry_stalls: u64,
    /// Where purged workflows' ids go to have their blobs deleted, with a blob store.
    blob_purges: Option<blob_purge::BlobPurges>,
}

/// The API's shared parts, with the visibility index opened and its feeder started (until `stop` changes).
fn serve_api(
    config: &Config,
    client: &client::Client,
    schedules: &schedules::Table,
    stop: tokio::sync::watch::Receiver<()>,
) -> anyhow::Result<api::Api> {
    let client_certificates = config
        .http_tls
        .as_ref()
        .is_some_and(|tls| tls.client_ca.is_some());
    let auth = api::auth::Auth::new(
        config.api_tokens.as_deref(),
        config.hook_secrets.as_deref(),
        client_certificates,
    )?;
    let visibility = visibility::Visibility::open(config.visibility_path.as_deref())?;
    let index = visibility.clone();
    let source = visibility::Source {
        kafka: config.kafka.clone(),
        codec: client.codec.clone(),
        keys: config.keys.clone(),
        topics: config.topics.clone(),
    };
    let (partitions, retention) = (config.partitions, config.visibility_retention);
    // An error (a full disk, a broker gone for long) stops one run; the next resumes from the stored positions.
    keep_running("the visibility index", move || {
        visibility::feed(
            index.clone(),
            source.clone(),
            partitions,
            retention,
            stopped(stop.clone()),
        )
    });
    Ok(api::Api {
        client: client.clone(),
        visibility,
        hooks: Default::default(),
        schedules: schedules.clone(),
        auth,
    })
}

/// Refuses to serve the API to the network without authentication, unless told that something in front of it
/// authenticates: an open API lets anyone start, cancel and deploy.
fn refuse_open_api(addr: std::net::SocketAddr, config: &Config) -> anyhow::Result<()> {
    let mutual_tls = config
        .http_tls
        .as_ref()
        .is_some_and(|tls| tls.client_ca.is_some());
    if addr.ip().is_loopback()
        || config.api_tokens.is_some()
        || mutual_tls
        || config.api_allow_unauthenticated
    {
        return Ok(());
    }
    anyhow::bail!(
        "refusing to serve the API on {addr} without authentication: anyone reaching it could start, cancel and \
         deploy workflows. Give --api-tokens FILE (lines `ROLE SHA256 NAME`; `edow token new --role admin` makes \
         one), require client certificates (--http-tls-client-ca), listen on 127.0.0.1, or pass --api-allow-unauthenticated when a proxy in front authenticates"
    )
}

/// Runs the task `start` makes until it ends well (it was stopped), starting it again 5 s after each error.
fn keep_running<F, Fut>(what: &'static str, mut start: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match start().await {
                Ok(()) => return,
                Err(e) => tracing::error!("{what} stopped: {e:#}; restarting it in 5 s"),
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
}

/// Resolves when `stop`'s sender is dropped (when `run` returns).
async fn stopped(mut stop: tokio::sync::watch::Receiver<()>) {
    let _ = stop.changed().await;
}

/// Adds a batch to `edow_records_consumed_total`, per topic.
fn count_consumed(batch: &[OwnedMessage]) {
    let mut per_topic: HashMap<&str, u64> = HashMap::new();
    for message in batch {
        *per_topic.entry(message.topic()).or_default() += 1;
    }
    for (topic, n) in per_topic {
        metrics::RECORDS_CONSUMED
            .with_label_values(&[topic])
            .inc_by(n);
    }
}

/// How often input offsets are committed.
const COMMIT_EVERY: Duration = Duration::from_millis(100);

/// Runs the orchestrator until `shutdown` resolves; then finishes the batch in hand, commits, and leaves the group.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    if let Some(addr) = config.http_addr {
        refuse_open_api(addr, &config)?;
    }
    let topics = &config.topics;
    let (n, rf) = (config.partitions, config.replication_factor);
    let mut specs = vec![
        TopicSpec::new(topics.triggers(), n, rf),
        TopicSpec::new(topics.signals(), n, rf),
        TopicSpec::new(topics.results(), n, rf),
        TopicSpec::new(topics.state(), n, rf).compacted(),
        TopicSpec::new(topics.events(), n, rf),
        TopicSpec::new(topics.definitions(), 1, rf).compacted(),
    ];
    for input in [topics.triggers(), topics.signals(), topics.results()] {
        specs.push(TopicSpec::new(Topics::dead_letters(&input), n, rf));
    }
    config.kafka.ensure_topics(&specs).await?;
    edow_telemetry::metrics::init(edow_telemetry::metrics::Exporter::Orchestrator);

    let codec = Arc::new(Codec::new(&config.registry_url)?);
    let definitions = Definitions::open(
        &config.kafka,
        codec.clone(),
        &topics.definitions(),
        config.limits.clone(),
    )
    .await?;
    let producer = config.kafka.producer_for_batches()?;
    let readiness = http::Readiness::default();
    // Dropped when `run` returns, which stops the listener, the index's feeder and the scheduler.
    let (_listener_stop, stop_listener) = tokio::sync::watch::channel(());
    let client = client::Client {
        kafka: config.kafka.clone(),
        // Its own producer: requests (a replay of many dead letters, say) never queue ahead of the changelog.
        producer: config.kafka.producer()?,
        codec: codec.clone(),
        topics: config.topics.clone(),
        limits: config.limits.clone(),
        replication_factor: config.replication_factor,
        keys: config.keys.clone(),
        blobs: config.blobs.clone(),
    };
    let schedule_table = schedules::Table::default();
    let (owned_partitions, owned) = tokio::sync::watch::channel(BTreeSet::new());
    {
        let (client, table, partitions, stop) = (
            client.clone(),
            schedule_table.clone(),
            config.partitions,
            stop_listener.clone(),
        );
        // An error (the topic not creatable yet, the broker away) stops one run; the next reads again.
        keep_running("the scheduler", move || {
            schedules::run(
                client.clone(),
                table.clone(),
                partitions,
                owned.clone(),
                stopped(stop.clone()),
            )
        });
    }
    if let Some(addr) = config.http_addr {
        let api = serve_api(&config, &client, &schedule_table, stop_listener.clone())?;
        let router = http::router(readiness.clone(), api);
        let stop = stopped(stop_listener.clone());
        match &config.http_tls {
            Some(tls) => edow_telemetry::http::serve_tls(addr, tls, router, "http", stop).await?,
            None => edow_telemetry::http::serve(addr, router, "http", stop).await?,
        };
    }
    let consumer: InputConsumer = config
        .kafka
        .group_consumer_config_reporting_lag(&config.group)
        .set("partition.assignment.strategy", "range")
        // Every batch, restore and registry wait is bounded well below this (see `registry_stall_bound`).
        .set("max.poll.interval.ms", "300000")
        .create_with_context(consume::RebalanceTracker::new(
            producer.clone(),
            &config.group,
        ))
        .context("creating the orchestrator's consumer")?;
    consumer.subscribe(&[&topics.triggers(), &topics.signals(), &topics.results()])?;
    tracing::info!(group = %config.group, partitions = n, "orchestrator started");

    let mut orchestrator = Orchestrator {
        config,
        codec,
        producer,
        definitions,
        partitions: HashMap::new(),
        task_topics: HashSet::new(),
        outputs_in_flight: None,
        to_commit: HashMap::new(),
        last_commit: Instant::now(),
        last_marker: HashMap::new(),
        markers_due: HashMap::new(),
        registry_stalls: 0,
        blob_purges: None,
    };
    orchestrator.blob_purges = orchestrator
        .config
        .blobs
        .clone()
        .map(blob_purge::BlobPurges::start);
    tokio::pin!(shutdown);
    let mut last_trim = Instant::now();
    loop {
        let (tick, max_batch) = (orchestrator.config.tick, orchestrator.config.max_batch);
        let mut batch = tokio::select! {
            _ = &mut shutdown => break,
            batch = consume::collect_batch(&consumer, tick, max_batch) => batch,
        };
        let rebalanced = orchestrator
            .handle_rebalances(&consumer, &mut batch)
            .await?;
        // Also after a batch forgot a lost partition: the scheduler fires only what this instance owns.
        let owned_now: BTreeSet<i32> = orchestrator.partitions.keys().copied().collect();
        if *owned_partitions.borrow() != owned_now {
            owned_partitions.send_replace(owned_now);
        }
        if rebalanced && !readiness.is_ready() {
            readiness.set_ready();
            tracing::info!(
                partitions = orchestrator.partitions.len(),
                "ready: the first assignment is restored"
            );
        }
        if rebalanced || last_trim.elapsed() > TRIM_EVERY {
            trim_memory();
            last_trim = Instant::now();
        }
        if let Some(failure) = consumer.context().flush_failure() {
            anyhow::bail!("{failure}; stopping so that a restart produces them from the changelog");
        }
        if orchestrator.outputs_settled() {
            orchestrator.confirm_outputs().await?;
        }
        orchestrator.write_markers(false).await?;
        orchestrator.process(&consumer, batch).await?;
    }
    tracing::info!("shutting down: leaving the consumer group");
    orchestrator.confirm_outputs().await?;
    orchestrator.write_markers(true).await?;
    orchestrator.commit(&consumer, true)?;
    {
        use rdkafka::producer::Producer;
        if let Err(e) = orchestrator.producer.flush(Duration::from_secs(10)) {
            tracing::warn!("flushing the last partition markers: {e}");
        }
    }
    consumer.unsubscribe();
    Ok(())
}

impl Orchestrator {
    async fn process(
        &mut self,
        consumer: &InputConsumer,
        batch: Vec<OwnedMessage>,
    ) -> anyhow::Result<()> {
        let now = now_millis();
        let began = Instant::now();
        // A partition revoked while the batch was collected belongs to another instance now.
        let batch: Vec<OwnedMessage> = batch
            .into_iter()
            .filter(|m| self.partitions.contains_key(&m.partition()))
            .collect();

        // Decode everything first: a registry outage then leaves the state untouched, and the batch is rewound.
        let give_up_at = Instant::now() + self.config.registry_stall_bound;
        let mut inputs = Vec::with_capacity(batch.len());
        for msg in &batch {
            match decode::decode(&self.codec, &self.config.topics, msg, give_up_at).await {
                Ok(decoded) => inputs.push((msg, decoded)),
                Err(Stalled(e)) => {
                    self.registry_stalls += 1;
                    metrics::REGISTRY_STALLS.inc();
                    tracing::error!(
                        inputs = batch.len(),
                        registry_stalls = self.registry_stalls,
                        "the schema registry has been unreachable for {:?} ({e}); the batch is rewound and \
                         tried again; nothing was applied",
                        self.config.registry_stall_bound
                    );
                    let mut first_of = HashMap::new();
                    for m in &batch {
                        first_of.entry((m.topic(), m.partition())).or_insert(m);
                    }
                    for m in first_of.into_values() {
                        consume::rewind(consumer, m)?;
                    }
                    return Ok(());
                }
            }
        }
        // Counted once decoded: a rewound batch is counted when it comes again.
        count_consumed(&batch);
        self.catch_up_definitions(&inputs).await;
        let decoded = began.elapsed();

        let mut out = BatchOutput::default();
        let mut offsets: HashMap<(String, i32), i64> = HashMap::new();
        for (msg, decoded) in inputs {
            offsets.insert((msg.topic().to_string(), msg.partition()), msg.offset() + 1);
            let (partition, offset) = (msg.partition(), msg.offset());
            let mut traced = traces::InputTrace::begin(msg, &decoded, &self.config.group);
            let log = traced.log.clone();
            let _in_span = log.enter();
            let context = &traced.process.context;
            let applied = decoded
                .and_then(|input| self.apply(partition, offset, input, context, now, &mut out));
            match applied {
                Ok(()) => {
                    if let Some(id) = traced.workflow_id.take() {
                        out.trace_parents.insert(id, context.clone());
                    }
                }
                Err(reason) => {
                    traced.process.fail(&reason.error);
                    out.dead_letters
                        .push(dead_letters::dead_letter(msg, &reason, SERVICE));
                }
            }
        }
        self.fire_timers(now, &mut out);
        self.purge_ended(now, &mut out);
        self.expire_early(now, &mut out);
        self.drop_lost_partitions(consumer, &mut out, &mut offsets);
        if out.changed.is_empty()
            && out.purged.is_empty()
            && out.early.is_empty()
            && out.expired.is_empty()
            && out.dead_letters.is_empty()
            && offsets.is_empty()
        {
            // The offsets of the last inputs are committed even when no more come.
            self.commit(consumer, false)?;
            return Ok(());
        }
        // Expired early signals are dead-lettered before their tombstone is written: a crash between the two
        // then duplicates a dead letter rather than losing a signal.
        for expired in std::mem::take(&mut out.expired) {
            let letter = self.expired_letter(expired).await?;
            dead_letters::publish(&self.producer, &self.codec, &letter).await?;
        }
        let applied = began.elapsed();
        let made = traces::Made::Now(&out.trace_parents);
        self.produce_outputs(&out.changed, &out.purged, now, made)
            .await?;
        let produced = began.elapsed();
        self.produce_early(&out.early, now).await?;
        self.report_refused_children(&out.refused_children).await?;
        for letter in &out.dead_letters {
            dead_letters::publish(&self.producer, &self.codec, letter).await?;
        }
        self.to_commit.extend(offsets.drain());
        let committing = began.elapsed();
        self.commit(consumer, false)?;
        self.report_in_flight();
        metrics::BATCH_INPUTS.observe(batch.len() as f64);
        for (stage, took) in [
            ("decode", decoded),
            ("apply", applied - decoded),
            ("produce", produced - applied),
            ("commit", began.elapsed() - committing),
        ] {
            metrics::BATCH_STAGE
                .with_label_values(&[stage])
                .observe(took.as_secs_f64());
        }
        tracing::debug!(
            inputs = batch.len(),
            changed = out.changed.len(),
            decode_us = decoded.as_micros() as u64,
            apply_us = (applied - decoded).as_micros() as u64,
            produce_us = (produced - applied).as_micros() as u64,
            total_us = began.elapsed().as_micros() as u64,
            "batch"
        );
        Ok(())
    }

    /// Sets `edow_workflows_in_flight` of every owned partition.
    fn report_in_flight(&self) {
        for (partition, state) in &self.partitions {
            metrics::WORKFLOWS_IN_FLIGHT
                .with_label_values(&[&partition.to_string()])
                .set(state.held() as i64);
        }
    }

    /// Commits the offsets of the inputs applied so far, at most every [`COMMIT_EVERY`] unless `now`.
    /// Asynchronous: a commit that is lost only makes inputs be redelivered, and recognised as applied; spacing
    /// them spares the broker a request per batch.
    fn commit(&mut self, consumer: &InputConsumer, now: bool) -> anyhow::Result<()> {
        if self.to_commit.is_empty() || (!now && self.last_commit.elapsed() < COMMIT_EVERY) {
            return Ok(());
        }
        let mut list = TopicPartitionList::new();
        for ((topic, partition), next) in self.to_commit.drain() {
            list.add_partition_offset(&topic, partition, Offset::Offset(next))?;
        }
        let mode = if now {
            CommitMode::Sync
        } else {
            CommitMode::Async
        };
        if let Err(e) = consumer.commit(&list, mode) {
            tracing::warn!("committing offsets: {e}");
        }
        self.last_commit = Instant::now();
        Ok(())
    }

    /// Waits once per batch for the definitions reader when a trigger names a definition not read yet (it may
    /// have been deployed a moment ago), instead of once per trigger.
    async fn catch_up_definitions(
        &self,
        inputs: &[(&OwnedMessage, Result<decode::Input, Reason>)],
    ) {
        let unknown = inputs.iter().any(|(_, d)| {
            matches!(d, Ok(decode::Input::Trigger(t))
                if self.definitions.get(&t.workflow_name, t.workflow_version).is_none())
        });
        if unknown {
            if let Err(e) = self.definitions.catch_up().await {
                tracing::warn!("catching up with definitions: {e:#}");
            }
        }
    }

    /// A partition librdkafka no longer counts as ours (revoked while this batch ran, or this instance was
    /// evicted from the group) is not written to: its outputs and offsets are dropped and its state forgotten.
    /// The new owner redoes the batch from the committed offsets.
    fn drop_lost_partitions(
        &mut self,
        consumer: &InputConsumer,
        out: &mut BatchOutput,
        offsets: &mut HashMap<(String, i32), i64>,
    ) {
        let assigned = consume::assigned(consumer, &self.config.topics.triggers());
        let lost: Vec<i32> = self
            .partitions
            .keys()
            .copied()
            .filter(|p| !assigned.contains(p))
            .collect();
        for partition in lost {
            out.changed.retain(|(p, _)| *p != partition);
            out.purged.retain(|(p, _)| *p != partition);
            out.early.retain(|(p, _)| *p != partition);
            out.expired.retain(|e| e.partition != partition);
            offsets.retain(|(_, p), _| *p != partition);
            self.to_commit.retain(|(_, p), _| *p != partition);
            self.forget(partition, "no longer assigned");
        }
    }
}
