//! The orchestrator: one consume-process-produce-commit loop over `edow.triggers`, `edow.signals` and
//! `edow.results`, with the state of every owned partition restored from the changelog `edow.state` before the
//! partition is processed.
//!
//! Per batch of inputs: apply them (and due retry timers) to the pure engine; write the changelog record of every
//! changed workflow, with its outbox, and wait for the acks; produce the tasks, then the lifecycle events, then
//! dead letters, and wait for the acks; only then commit the input offsets. See `partition` for how the outbox
//! makes a crash at any point lose nothing and emit nothing twice.

pub mod definitions;
pub mod partition;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use edow_engine::{
    Command, Definition, Dispatch, Event, EventKind, Failure, Instance, Outcome, Start, TaskOutcome,
};
use edow_kafka::dead_letters::{self, Reason};
use edow_kafka::{now_millis, produce_all, Kafka, Outgoing, TopicSpec, EVENT_ID_HEADER};
use edow_schemas::contracts::{
    LifecycleEvent, LifecycleKind, SignalKind, TaskError, TaskRequested, TaskResult, TaskStatus,
    WorkflowSignal, WorkflowState, WorkflowTrigger,
};
use edow_schemas::{Codec, CodecError, Contract, Topics};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use serde_json::Value;

use definitions::Definitions;
use partition::{Outbox, PartitionState, Persisted};

const SERVICE: &str = "orchestrator";

/// Trigger attribute naming the parent of a child workflow.
pub const PARENT_ATTRIBUTE: &str = "edow.parent";

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
}

/// Partition changes seen by the consumer, handled between batches.
#[derive(Default)]
struct RebalanceTracker {
    changes: Mutex<Vec<(bool, BTreeSet<i32>)>>,
}

impl RebalanceTracker {
    fn record(&self, assigned: bool, list: &TopicPartitionList) {
        let partitions: BTreeSet<i32> = list.elements().iter().map(|e| e.partition()).collect();
        self.changes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((assigned, partitions));
    }

    fn take(&self) -> Vec<(bool, BTreeSet<i32>)> {
        std::mem::take(&mut *self.changes.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl ClientContext for RebalanceTracker {}

impl ConsumerContext for RebalanceTracker {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            self.record(false, list);
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            self.record(true, list);
        }
    }
}

/// The outputs of one batch, in the order they are produced.
#[derive(Default)]
struct BatchOutput {
    /// Workflows changed in this batch, by partition.
    changed: BTreeSet<(i32, String)>,
    dead_letters: Vec<edow_schemas::contracts::DeadLetter>,
}

struct Orchestrator {
    config: Config,
    codec: Arc<Codec>,
    producer: FutureProducer,
    definitions: Definitions,
    partitions: HashMap<i32, PartitionState>,
    task_topics: HashSet<String>,
}

/// Runs the orchestrator until `shutdown` resolves; then finishes the batch in hand, commits, and leaves the group.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
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

    let codec = Arc::new(Codec::new(&config.registry_url)?);
    let definitions =
        Definitions::open(&config.kafka, codec.clone(), &topics.definitions()).await?;
    let producer = config.kafka.producer()?;
    let consumer: StreamConsumer<RebalanceTracker> = config
        .kafka
        .group_consumer_config(&config.group)
        .set("partition.assignment.strategy", "range")
        .create_with_context(RebalanceTracker::default())
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
    };
    tokio::pin!(shutdown);
    loop {
        let batch = tokio::select! {
            _ = &mut shutdown => break,
            batch = orchestrator.collect_batch(&consumer) => batch,
        };
        orchestrator.handle_rebalances(&consumer).await?;
        orchestrator.process(&consumer, batch).await?;
    }
    tracing::info!("shutting down: leaving the consumer group");
    consumer.unsubscribe();
    Ok(())
}

impl Orchestrator {
    /// Waits up to one tick for the first input, then takes what else is ready, up to `max_batch`.
    async fn collect_batch(
        &self,
        consumer: &StreamConsumer<RebalanceTracker>,
    ) -> Vec<OwnedMessage> {
        let mut batch = Vec::new();
        let first = tokio::time::timeout(self.config.tick, consumer.recv()).await;
        match first {
            Ok(Ok(msg)) => batch.push(msg.detach()),
            Ok(Err(e)) => {
                tracing::warn!("consuming: {e}");
                return batch;
            }
            Err(_) => return batch,
        }
        while batch.len() < self.config.max_batch {
            match tokio::time::timeout(Duration::ZERO, consumer.recv()).await {
                Ok(Ok(msg)) => batch.push(msg.detach()),
                _ => break,
            }
        }
        batch
    }

    /// Forgets revoked partitions and restores newly assigned ones from the changelog.
    async fn handle_rebalances(
        &mut self,
        consumer: &StreamConsumer<RebalanceTracker>,
    ) -> anyhow::Result<()> {
        for (assigned, partitions) in consumer.context().take() {
            for partition in partitions {
                if assigned {
                    if !self.partitions.contains_key(&partition) {
                        let state = self.restore(partition).await?;
                        self.partitions.insert(partition, state);
                    }
                } else if let Some(state) = self.partitions.remove(&partition) {
                    tracing::info!(
                        partition,
                        workflows = state.instances.len(),
                        "partition revoked; its state is forgotten"
                    );
                }
            }
        }
        Ok(())
    }

    /// Rebuilds one partition's state from the changelog and re-produces what a crash may have left unproduced.
    async fn restore(&mut self, partition: i32) -> anyhow::Result<PartitionState> {
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
        let mut state = PartitionState::default();
        let mut latest: HashMap<String, Option<Persisted>> = HashMap::new();
        for record in &records {
            let Some(key) = record
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned())
            else {
                continue;
            };
            if record.payload().is_none() {
                latest.insert(key, None);
                continue;
            }
            let decoded = self
                .decode_with_retry::<WorkflowState>(record.payload())
                .await;
            match decoded
                .map_err(|e| e.to_string())
                .and_then(|r| Persisted::from_record(&r))
            {
                Ok(persisted) => {
                    latest.insert(key, Some(persisted));
                }
                Err(e) => tracing::error!(
                    partition,
                    offset = record.offset(),
                    "skipping an unreadable changelog record: {e}"
                ),
            }
        }
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
                .map(|id| state.instances[id].outbox.events_from)
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
                let persisted = state
                    .instances
                    .get_mut(&id)
                    .expect("pending instance exists");
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
            let outcome = self.produce_outputs(&changed).await;
            state = self.partitions.remove(&partition).expect("just inserted");
            outcome?;
        }
        tracing::info!(
            partition,
            restored = state.instances.len(),
            running = state.running(),
            replayed,
            records = records.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "restored partition from the changelog"
        );
        Ok(state)
    }

    async fn decode_with_retry<T: Contract>(
        &self,
        payload: Option<&[u8]>,
    ) -> Result<T, CodecError> {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.codec.decode::<T>(payload).await {
                Err(e) if e.is_transient() => {
                    tracing::warn!("{e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }

    async fn process(
        &mut self,
        consumer: &StreamConsumer<RebalanceTracker>,
        batch: Vec<OwnedMessage>,
    ) -> anyhow::Result<()> {
        let now = now_millis();
        let mut out = BatchOutput::default();
        let mut offsets: HashMap<(String, i32), i64> = HashMap::new();
        for msg in &batch {
            // A partition revoked while the batch was collected belongs to another instance now.
            if !self.partitions.contains_key(&msg.partition()) {
                continue;
            }
            offsets.insert((msg.topic().to_string(), msg.partition()), msg.offset() + 1);
            if let Err(reason) = self.apply(msg, now, &mut out).await {
                out.dead_letters
                    .push(dead_letters::dead_letter(msg, &reason, SERVICE));
            }
        }
        self.fire_timers(now, &mut out);
        if out.changed.is_empty() && out.dead_letters.is_empty() && offsets.is_empty() {
            return Ok(());
        }
        self.produce_outputs(&out.changed).await?;
        for letter in &out.dead_letters {
            dead_letters::publish(&self.producer, &self.codec, letter).await?;
        }
        if !offsets.is_empty() {
            let mut list = TopicPartitionList::new();
            for ((topic, partition), next) in &offsets {
                list.add_partition_offset(topic, *partition, Offset::Offset(*next))?;
            }
            if let Err(e) = consumer.commit(&list, CommitMode::Sync) {
                // Inputs will be redelivered and recognised as applied.
                tracing::warn!("committing offsets: {e}");
            }
        }
        Ok(())
    }

    /// Applies one input to the engine. Err means the input is dead-lettered.
    async fn apply(
        &mut self,
        msg: &OwnedMessage,
        now: i64,
        out: &mut BatchOutput,
    ) -> Result<(), Reason> {
        let topics = &self.config.topics;
        let topic = msg.topic();
        let codec_reason = |e: CodecError| Reason::new(e.kind(), e.to_string());
        if topic == topics.triggers() {
            let trigger: WorkflowTrigger = self
                .decode_with_retry(msg.payload())
                .await
                .map_err(codec_reason)?;
            self.start(msg.partition(), trigger, now, out).await
        } else if topic == topics.results() {
            let result: TaskResult = self
                .decode_with_retry(msg.payload())
                .await
                .map_err(codec_reason)?;
            self.apply_result(msg.partition(), result, now, out)
        } else if topic == topics.signals() {
            let signal: WorkflowSignal = self
                .decode_with_retry(msg.payload())
                .await
                .map_err(codec_reason)?;
            self.apply_signal(msg.partition(), signal, now, out)
        } else {
            Err(Reason::new(
                "unexpected_topic",
                format!("no handler for topic {topic}"),
            ))
        }
    }

    async fn start(
        &mut self,
        partition: i32,
        trigger: WorkflowTrigger,
        now: i64,
        out: &mut BatchOutput,
    ) -> Result<(), Reason> {
        if trigger.workflow_id.is_empty() {
            return Err(Reason::new(
                "invalid",
                "the trigger has an empty workflow_id; set one",
            ));
        }
        let state = self.partitions.get(&partition).expect("owned partition");
        if state.instances.contains_key(&trigger.workflow_id) {
            tracing::debug!(workflow_id = %trigger.workflow_id, "already started; trigger ignored");
            return Ok(());
        }
        let mut found = self
            .definitions
            .get(&trigger.workflow_name, trigger.workflow_version);
        if found.is_none() {
            // It may have been deployed a moment ago.
            if let Err(e) = self.definitions.catch_up().await {
                tracing::warn!("catching up with definitions: {e:#}");
            }
            found = self
                .definitions
                .get(&trigger.workflow_name, trigger.workflow_version);
        }
        let Some((version, definition)) = found else {
            let which = trigger
                .workflow_version
                .map_or("any version".to_string(), |v| format!("version {v}"));
            return Err(Reason::new(
                "unknown_workflow",
                format!(
                    "no workflow '{}' ({which}) is deployed; deploy it with `edow deploy FILE`, then replay this trigger",
                    trigger.workflow_name
                ),
            ));
        };
        let input: Value = serde_json::from_str(&trigger.input).map_err(|e| {
            Reason::new(
                "invalid",
                format!("the trigger's input is not a JSON document: {e}"),
            )
        })?;
        let (instance, commands) = Instance::start(
            &definition,
            Start {
                workflow_id: trigger.workflow_id.clone(),
                workflow_version: version,
                input,
                correlation_id: trigger.correlation_id,
                priority: trigger.priority,
                parent: trigger.attributes.get(PARENT_ATTRIBUTE).cloned(),
            },
            now,
        );
        self.record_change(partition, instance, commands, out);
        Ok(())
    }

    /// The instance `workflow_id` of `partition` with its pinned definition, or why the input is dead-lettered.
    fn instance_of(
        &self,
        partition: i32,
        workflow_id: &str,
        what: &str,
    ) -> Result<(Instance, Arc<Definition>), Reason> {
        let state = self.partitions.get(&partition).expect("owned partition");
        let Some(persisted) = state.instances.get(workflow_id) else {
            return Err(Reason::new(
                "unknown_instance",
                format!(
                    "{what} is for workflow {workflow_id}, which this partition does not hold: it was never \
                     started, was purged, or the record was produced with a partitioner other than murmur2"
                ),
            ));
        };
        let instance = persisted.instance.clone();
        let Some((_, definition)) = self
            .definitions
            .get(&instance.workflow_name, Some(instance.workflow_version))
        else {
            return Err(Reason::new(
                "unknown_workflow",
                format!(
                    "workflow {} is pinned to {} version {}, which is no longer deployed",
                    instance.workflow_id, instance.workflow_name, instance.workflow_version
                ),
            ));
        };
        Ok((instance, definition))
    }

    fn apply_result(
        &mut self,
        partition: i32,
        result: TaskResult,
        now: i64,
        out: &mut BatchOutput,
    ) -> Result<(), Reason> {
        let what = format!("result {}", result.task_id);
        let (mut instance, definition) = self.instance_of(partition, &result.workflow_id, &what)?;
        let outcome = match result.status {
            TaskStatus::Completed => {
                let output = result.output.as_deref().unwrap_or("null");
                Outcome::Completed(serde_json::from_str(output).map_err(|e| {
                    Reason::new(
                        "invalid",
                        format!("{what} has an output that is not JSON: {e}"),
                    )
                })?)
            }
            TaskStatus::Failed => {
                let error = result.error.unwrap_or(TaskError {
                    code: "unknown".into(),
                    message: "the worker reported a failure without an error".into(),
                    retryable: true,
                });
                Outcome::Failed(Failure {
                    code: error.code,
                    message: error.message,
                    retryable: error.retryable,
                })
            }
        };
        let before = instance.sequence;
        let outcome = TaskOutcome {
            task_id: result.task_id,
            outcome,
        };
        let commands = instance.on_result(&definition, outcome, now);
        if instance.sequence != before {
            self.record_change(partition, instance, commands, out);
        }
        Ok(())
    }

    fn apply_signal(
        &mut self,
        partition: i32,
        signal: WorkflowSignal,
        now: i64,
        out: &mut BatchOutput,
    ) -> Result<(), Reason> {
        let what = format!("signal {}", signal.signal_id);
        let (mut instance, definition) = self.instance_of(partition, &signal.workflow_id, &what)?;
        let before = instance.sequence;
        let commands = match signal.kind {
            SignalKind::Cancel => {
                instance.on_cancel(&definition, &signal.signal_id, &signal.payload_text(), now)
            }
            SignalKind::Signal => {
                let name = signal.name.clone().ok_or_else(|| {
                    Reason::new(
                        "invalid",
                        format!("{what} has no name; set the name a wait step listens for"),
                    )
                })?;
                let payload: Value = serde_json::from_str(&signal.payload).map_err(|e| {
                    Reason::new(
                        "invalid",
                        format!("{what} has a payload that is not JSON: {e}"),
                    )
                })?;
                instance.on_signal(&definition, &signal.signal_id, &name, payload, now)
            }
            SignalKind::Unknown => {
                return Err(Reason::new(
                    "unsupported",
                    format!(
                    "{what} has a kind this orchestrator does not know; upgrade it, then replay"
                ),
                ))
            }
        };
        if instance.sequence != before {
            self.record_change(partition, instance, commands, out);
        }
        Ok(())
    }

    fn fire_timers(&mut self, now: i64, out: &mut BatchOutput) {
        let owned: Vec<i32> = self.partitions.keys().copied().collect();
        for partition in owned {
            let due = self
                .partitions
                .get_mut(&partition)
                .expect("owned")
                .take_due(now);
            for id in due {
                let Some(persisted) = self.partitions[&partition].instances.get(&id) else {
                    continue;
                };
                let mut instance = persisted.instance.clone();
                let Some((_, definition)) = self
                    .definitions
                    .get(&instance.workflow_name, Some(instance.workflow_version))
                else {
                    tracing::error!(workflow_id = %id, "timer due but its definition is gone");
                    continue;
                };
                let before = instance.sequence;
                let commands = instance.on_timer(&definition, now);
                if instance.sequence == before {
                    // Not due after all (re-armed); keep it indexed.
                    let persisted = self.partitions[&partition].instances[&id].clone();
                    self.partitions
                        .get_mut(&partition)
                        .expect("owned")
                        .put(persisted);
                } else {
                    self.record_change(partition, instance, commands, out);
                }
            }
        }
    }

    /// Stores a changed instance; its outbox collects every command of this batch.
    fn record_change(
        &mut self,
        partition: i32,
        instance: Instance,
        commands: Vec<Command>,
        out: &mut BatchOutput,
    ) {
        let state = self
            .partitions
            .get_mut(&partition)
            .expect("owned partition");
        let id = instance.workflow_id.clone();
        let mut outbox = match state.instances.get(&id) {
            Some(old) if out.changed.contains(&(partition, id.clone())) => old.outbox.clone(),
            _ => Outbox::default(),
        };
        outbox.commands.extend(commands);
        outbox.events_from = state.events_end;
        state.put(Persisted { instance, outbox });
        out.changed.insert((partition, id));
    }

    /// Writes the changelog records of `changed`, then produces their outboxes: tasks first, then events.
    async fn produce_outputs(&mut self, changed: &BTreeSet<(i32, String)>) -> anyhow::Result<()> {
        if changed.is_empty() {
            return Ok(());
        }
        let topics = self.config.topics.clone();
        let mut changelog = Vec::with_capacity(changed.len());
        let mut tasks = Vec::new();
        let mut events = Vec::new();
        for (partition, id) in changed {
            let persisted = self.partitions[partition].instances[id].clone();
            let value = self
                .codec
                .encode(&topics.state(), &persisted.to_record())
                .await?;
            changelog.push(Outgoing {
                topic: topics.state(),
                partition: Some(*partition),
                key: id.as_bytes().to_vec(),
                payload: Some(value),
                headers: Vec::new(),
            });
            for command in &persisted.outbox.commands {
                match command {
                    Command::Dispatch(dispatch) => {
                        tasks.push(self.task_record(&persisted.instance, dispatch).await?)
                    }
                    Command::Emit(event) => events.push(
                        self.event_record(*partition, &persisted.instance, event)
                            .await?,
                    ),
                    other => tasks.push(self.workflow_record(&persisted.instance, other).await?),
                }
            }
        }
        produce_all(&self.producer, &changelog)
            .await
            .context("writing the changelog")?;
        produce_all(&self.producer, &tasks)
            .await
            .context("dispatching tasks")?;
        let positions = produce_all(&self.producer, &events)
            .await
            .context("emitting lifecycle events")?;
        for (partition, offset) in positions {
            if let Some(state) = self.partitions.get_mut(&partition) {
                state.events_end = state.events_end.max(offset + 1);
            }
        }
        Ok(())
    }

    async fn task_record(
        &mut self,
        instance: &Instance,
        dispatch: &Dispatch,
    ) -> anyhow::Result<Outgoing> {
        let topics = &self.config.topics;
        let topic = if dispatch.retry {
            topics.task_retries(&dispatch.task_type)
        } else {
            topics.tasks(&dispatch.task_type)
        };
        if !self.task_topics.contains(&topic) {
            let (p, rf) = (self.config.task_partitions, self.config.replication_factor);
            let main = topics.tasks(&dispatch.task_type);
            let retry = topics.task_retries(&dispatch.task_type);
            let specs = [
                TopicSpec::new(main.clone(), p, rf),
                TopicSpec::new(retry.clone(), p, rf),
                TopicSpec::new(Topics::dead_letters(&main), p, rf),
                TopicSpec::new(Topics::dead_letters(&retry), p, rf),
            ];
            self.config.kafka.ensure_topics(&specs).await?;
            self.task_topics.extend([main, retry]);
        }
        let task = TaskRequested {
            task_id: dispatch.task_id.clone(),
            workflow_id: instance.workflow_id.clone(),
            workflow_name: instance.workflow_name.clone(),
            workflow_version: instance.workflow_version,
            step: dispatch.step.clone(),
            task_type: dispatch.task_type.clone(),
            attempt: dispatch.attempt as i32,
            input: dispatch.input.to_string(),
            deadline_at: dispatch.deadline,
            priority: instance.priority,
            correlation_id: instance.correlation_id.clone(),
            requested_at: now_millis(),
        };
        Ok(Outgoing {
            payload: Some(self.codec.encode(&topic, &task).await?),
            topic,
            partition: None,
            key: instance.workflow_id.as_bytes().to_vec(),
            headers: Vec::new(),
        })
    }

    /// A record that starts, cancels or reports to another workflow.
    async fn workflow_record(
        &self,
        instance: &Instance,
        command: &Command,
    ) -> anyhow::Result<Outgoing> {
        let topics = &self.config.topics;
        let now = now_millis();
        let (topic, key, payload) = match command {
            Command::StartChild {
                child_id,
                name,
                version,
                input,
            } => {
                let trigger = WorkflowTrigger {
                    workflow_id: child_id.clone(),
                    workflow_name: name.clone(),
                    workflow_version: *version,
                    input: input.to_string(),
                    idempotency_key: None,
                    correlation_id: instance.correlation_id.clone(),
                    priority: instance.priority,
                    requested_at: now,
                    attributes: [(PARENT_ATTRIBUTE.to_string(), instance.workflow_id.clone())]
                        .into(),
                };
                let topic = topics.triggers();
                let payload = self.codec.encode(&topic, &trigger).await?;
                (topic, child_id, payload)
            }
            Command::CancelChild { child_id } => {
                let reason = format!("parent {} no longer needs it", instance.workflow_id);
                let signal = WorkflowSignal {
                    signal_id: format!("{child_id}/cancel-by-parent"),
                    workflow_id: child_id.clone(),
                    kind: SignalKind::Cancel,
                    name: None,
                    payload: Value::String(reason).to_string(),
                    correlation_id: instance.correlation_id.clone(),
                    sent_at: now,
                };
                let topic = topics.signals();
                let payload = self.codec.encode(&topic, &signal).await?;
                (topic, child_id, payload)
            }
            Command::ReportToParent {
                parent_id,
                task_id,
                outcome,
            } => {
                let (status, output, error) = match outcome {
                    Outcome::Completed(v) => (TaskStatus::Completed, Some(v.to_string()), None),
                    Outcome::Failed(f) => {
                        let error = TaskError {
                            code: f.code.clone(),
                            message: f.message.clone(),
                            retryable: false,
                        };
                        (TaskStatus::Failed, None, Some(error))
                    }
                };
                let result = TaskResult {
                    task_id: task_id.clone(),
                    workflow_id: parent_id.clone(),
                    step: "child-workflow".into(),
                    attempt: 1,
                    status,
                    output,
                    error,
                    worker_id: format!("workflow:{}", instance.workflow_id),
                    started_at: instance.created_at,
                    finished_at: instance.updated_at,
                };
                let topic = topics.results();
                let payload = self.codec.encode(&topic, &result).await?;
                (topic, parent_id, payload)
            }
            Command::Dispatch(_) | Command::Emit(_) => unreachable!("produced as tasks and events"),
        };
        Ok(Outgoing {
            topic,
            partition: None,
            key: key.as_bytes().to_vec(),
            payload: Some(payload),
            headers: Vec::new(),
        })
    }

    async fn event_record(
        &self,
        partition: i32,
        instance: &Instance,
        event: &Event,
    ) -> anyhow::Result<Outgoing> {
        let topic = self.config.topics.events();
        let record = LifecycleEvent {
            event_id: event.event_id.clone(),
            workflow_id: instance.workflow_id.clone(),
            workflow_name: instance.workflow_name.clone(),
            workflow_version: instance.workflow_version,
            kind: lifecycle_kind(event.kind),
            step: event.step.clone(),
            attempt: event.attempt.map(|a| a as i32),
            detail: event.detail.as_ref().map(Value::to_string),
            correlation_id: instance.correlation_id.clone(),
            at: instance.updated_at,
        };
        Ok(Outgoing {
            payload: Some(self.codec.encode(&topic, &record).await?),
            topic,
            partition: Some(partition),
            key: instance.workflow_id.as_bytes().to_vec(),
            headers: vec![(EVENT_ID_HEADER, event.event_id.as_bytes().to_vec())],
        })
    }
}

fn lifecycle_kind(kind: EventKind) -> LifecycleKind {
    match kind {
        EventKind::WorkflowStarted => LifecycleKind::WorkflowStarted,
        EventKind::StepStarted => LifecycleKind::StepStarted,
        EventKind::StepCompleted => LifecycleKind::StepCompleted,
        EventKind::StepFailed => LifecycleKind::StepFailed,
        EventKind::StepRetried => LifecycleKind::StepRetried,
        EventKind::WorkflowCompleted => LifecycleKind::WorkflowCompleted,
        EventKind::WorkflowFailed => LifecycleKind::WorkflowFailed,
        EventKind::Compensating => LifecycleKind::Compensating,
        EventKind::WorkflowCancelled => LifecycleKind::WorkflowCancelled,
        EventKind::WorkflowCompensated => LifecycleKind::WorkflowCompensated,
        EventKind::WorkflowFiltered => LifecycleKind::WorkflowFiltered,
        EventKind::CompensationFailed => LifecycleKind::CompensationFailed,
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
