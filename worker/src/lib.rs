//! The worker: joins a consumer group on the task topics of the types it serves, runs each task through its
//! handler with bounded concurrency, publishes the result to `edow.results`, and commits a task's offset only
//! after its result is acknowledged (and after every earlier offset of its partition), so a crash redelivers
//! rather than loses. A task id it has already answered is answered again from memory, not run twice.

pub mod handlers;
pub mod offsets;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use edow_kafka::dead_letters::{self, Reason};
use edow_kafka::{now_millis, produce_all, Kafka, Outgoing, TopicSpec};
use edow_schemas::contracts::{TaskError, TaskRequested, TaskResult, TaskStatus};
use edow_schemas::{Codec, Topics};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use serde_json::Value;
use tokio::sync::{mpsc, Semaphore};

use handlers::{Handler, HandlerError, Task};
use offsets::OffsetTracker;

/// What a worker serves and how it reaches Kafka.
pub struct Config {
    pub kafka: Kafka,
    pub registry_url: String,
    pub topics: Topics,
    pub group: String,
    pub worker_id: String,
    /// Handler per task type.
    pub handlers: HashMap<String, Arc<dyn Handler>>,
    /// Tasks run at once.
    pub concurrency: usize,
    /// A handler running longer fails the attempt with the retryable code `timeout`.
    pub task_timeout: Duration,
    /// Partitions of topics this worker creates when missing.
    pub partitions: i32,
    pub task_partitions: i32,
    pub replication_factor: i32,
}

/// Results of tasks this worker answered recently, to answer redeliveries without running them again.
struct Answered {
    results: HashMap<String, TaskResult>,
    order: VecDeque<String>,
    running: HashSet<String>,
    capacity: usize,
}

impl Answered {
    fn remember(&mut self, result: TaskResult) {
        self.running.remove(&result.task_id);
        if self
            .results
            .insert(result.task_id.clone(), result.clone())
            .is_none()
        {
            self.order.push_back(result.task_id);
            if self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.results.remove(&old);
                }
            }
        }
    }
}

struct Shared {
    config: Config,
    codec: Codec,
    producer: FutureProducer,
    answered: Mutex<Answered>,
}

/// Logs partition assignments, so an operator (and the demo) can see a worker has joined its group.
struct LogRebalances;

impl ClientContext for LogRebalances {}

impl ConsumerContext for LogRebalances {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let assigned: Vec<String> = list
                    .elements()
                    .iter()
                    .map(|e| format!("{}/{}", e.topic(), e.partition()))
                    .collect();
                tracing::info!(?assigned, "partitions assigned");
            }
            Rebalance::Revoke(list) => tracing::info!(count = list.count(), "partitions revoked"),
            Rebalance::Error(e) => tracing::warn!("rebalance failed: {e}"),
        }
    }
}

/// A finished task: its partition and offset, for the commit.
type Done = (String, i32, i64);

/// Runs until `shutdown` resolves; then stops taking tasks, finishes those running, commits and leaves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    anyhow::ensure!(
        !config.handlers.is_empty(),
        "the worker serves no task type; pass --task TYPE=HANDLER"
    );
    let topics = &config.topics;
    let mut subscriptions = Vec::new();
    let mut specs = vec![TopicSpec::new(
        topics.results(),
        config.partitions,
        config.replication_factor,
    )];
    for task_type in config.handlers.keys() {
        for topic in [topics.tasks(task_type), topics.task_retries(task_type)] {
            specs.push(TopicSpec::new(
                topic.clone(),
                config.task_partitions,
                config.replication_factor,
            ));
            specs.push(TopicSpec::new(
                Topics::dead_letters(&topic),
                config.task_partitions,
                config.replication_factor,
            ));
            subscriptions.push(topic);
        }
    }
    config.kafka.ensure_topics(&specs).await?;
    let consumer: StreamConsumer<LogRebalances> = config
        .kafka
        .group_consumer_config(&config.group)
        .create_with_context(LogRebalances)
        .context("creating the worker's consumer")?;
    let names: Vec<&str> = subscriptions.iter().map(String::as_str).collect();
    consumer.subscribe(&names)?;
    tracing::info!(worker = %config.worker_id, topics = ?subscriptions, "worker started");

    let concurrency = config.concurrency.max(1);
    let shared = Arc::new(Shared {
        codec: Codec::new(&config.registry_url)?,
        producer: config.kafka.producer()?,
        answered: Mutex::new(Answered {
            results: HashMap::new(),
            order: VecDeque::new(),
            running: HashSet::new(),
            capacity: 100_000,
        }),
        config,
    });
    let permits = Arc::new(Semaphore::new(concurrency));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut tracker = OffsetTracker::default();
    let mut commit_tick = tokio::time::interval(Duration::from_millis(100));
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = commit_tick.tick() => commit(&consumer, &mut tracker),
            Some((topic, partition, offset)) = done_rx.recv() => tracker.complete(&topic, partition, offset),
            permit = permits.clone().acquire_owned() => {
                let permit = permit.expect("semaphore is never closed");
                let msg = tokio::select! {
                    _ = &mut shutdown => break,
                    msg = consumer.recv() => msg,
                };
                let msg = match msg {
                    Ok(msg) => msg.detach(),
                    Err(e) => {
                        tracing::warn!("consuming tasks: {e}");
                        continue;
                    }
                };
                tracker.start(msg.topic(), msg.partition(), msg.offset());
                let shared = shared.clone();
                let done = done_tx.clone();
                tokio::spawn(async move {
                    let position = (msg.topic().to_string(), msg.partition(), msg.offset());
                    if let Err(e) = handle(&shared, &msg).await {
                        // Not acknowledged: leave the offset uncommitted so the task is redelivered.
                        tracing::error!(topic = %position.0, partition = position.1, offset = position.2, "{e:#}");
                        return;
                    }
                    drop(permit);
                    let _ = done.send(position);
                });
            }
        }
    }
    tracing::info!("shutting down: finishing running tasks");
    let _ = permits.acquire_many(concurrency as u32).await;
    while let Ok((topic, partition, offset)) = done_rx.try_recv() {
        tracker.complete(&topic, partition, offset);
    }
    commit(&consumer, &mut tracker);
    consumer.unsubscribe();
    Ok(())
}

fn commit(consumer: &StreamConsumer<LogRebalances>, tracker: &mut OffsetTracker) {
    let ready = tracker.take_committable();
    if ready.is_empty() {
        return;
    }
    let mut list = TopicPartitionList::new();
    for ((topic, partition), next) in &ready {
        if list
            .add_partition_offset(topic, *partition, Offset::Offset(*next))
            .is_err()
        {
            return;
        }
    }
    if let Err(e) = consumer.commit(&list, CommitMode::Async) {
        tracing::warn!("committing offsets: {e}");
    }
}

/// Runs one task and publishes its result (or dead-letters it). Err means nothing was acknowledged.
async fn handle(shared: &Shared, msg: &OwnedMessage) -> anyhow::Result<()> {
    let request: TaskRequested = loop {
        match shared.codec.decode(msg.payload()).await {
            Ok(request) => break request,
            Err(e) if e.is_transient() => {
                tracing::warn!("{e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                let letter = dead_letters::dead_letter(
                    msg,
                    &Reason::new(e.kind(), e.to_string()),
                    &service(shared),
                );
                return dead_letters::publish(&shared.producer, &shared.codec, &letter).await;
            }
        }
    };
    let previous = {
        let mut answered = shared.answered.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(result) = answered.results.get(&request.task_id) {
            Some(Some(result.clone()))
        } else if !answered.running.insert(request.task_id.clone()) {
            // The same attempt is running here already; its result answers both deliveries.
            Some(None)
        } else {
            None
        }
    };
    let result = match previous {
        Some(Some(result)) => {
            tracing::info!(task_id = %request.task_id, "redelivered task already answered; publishing its result again");
            result
        }
        Some(None) => return Ok(()),
        None => run_task(shared, &request).await,
    };
    publish_result(shared, &result).await?;
    shared
        .answered
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remember(result);
    Ok(())
}

fn service(shared: &Shared) -> String {
    format!("worker:{}", shared.config.worker_id)
}

async fn run_task(shared: &Shared, request: &TaskRequested) -> TaskResult {
    let started_at = now_millis();
    tracing::debug!(task_id = %request.task_id, "task started");
    let outcome = match shared.config.handlers.get(&request.task_type) {
        None => Err(HandlerError::permanent(
            "no_handler",
            format!(
                "worker {} has no handler for task type {}",
                shared.config.worker_id, request.task_type
            ),
        )),
        Some(handler) => match serde_json::from_str::<Value>(&request.input) {
            Err(e) => Err(HandlerError::permanent(
                "invalid_input",
                format!("task input is not JSON: {e}"),
            )),
            Ok(input) => {
                let task = Task {
                    task_id: request.task_id.clone(),
                    workflow_id: request.workflow_id.clone(),
                    step: request.step.clone(),
                    task_type: request.task_type.clone(),
                    attempt: request.attempt.max(1) as u32,
                    input,
                };
                match tokio::time::timeout(shared.config.task_timeout, handler.handle(task)).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(HandlerError::retryable(
                        "timeout",
                        format!(
                            "the handler ran longer than {:?}",
                            shared.config.task_timeout
                        ),
                    )),
                }
            }
        },
    };
    let (status, output, error) = match outcome {
        Ok(output) => (TaskStatus::Completed, Some(output.to_string()), None),
        Err(e) => {
            tracing::info!(task_id = %request.task_id, code = %e.code, "task failed: {}", e.message);
            (
                TaskStatus::Failed,
                None,
                Some(TaskError {
                    code: e.code,
                    message: e.message,
                    retryable: e.retryable,
                }),
            )
        }
    };
    TaskResult {
        task_id: request.task_id.clone(),
        workflow_id: request.workflow_id.clone(),
        step: request.step.clone(),
        attempt: request.attempt,
        status,
        output,
        error,
        worker_id: shared.config.worker_id.clone(),
        started_at,
        finished_at: now_millis(),
    }
}

async fn publish_result(shared: &Shared, result: &TaskResult) -> anyhow::Result<()> {
    let topic = shared.config.topics.results();
    let payload = shared.codec.encode(&topic, result).await?;
    produce_all(
        &shared.producer,
        &[Outgoing {
            topic,
            partition: None,
            key: result.workflow_id.as_bytes().to_vec(),
            payload: Some(payload),
            headers: Vec::new(),
        }],
    )
    .await?;
    Ok(())
}
