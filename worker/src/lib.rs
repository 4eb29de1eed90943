//! The worker: joins a consumer group on the task topics of the types it serves, runs each task through its
//! handler with bounded concurrency, publishes the result to `edow.results` (retrying until the broker
//! acknowledges it), and commits a task's offset only after its result is acknowledged (and after every earlier
//! offset of its partition), so a crash redelivers rather than loses. A task id it has already answered is
//! answered again from memory, not run twice.
//!
//! Modules, by concern: [`consume`] (the poll loop, backpressure, commits, rebalances, shutdown sequence),
//! [`offsets`] (what may be committed, per owned partition), [`task`] (one record to one answer), [`publish`]
//! (results and dead letters until acknowledged), [`answered`] (bounded memory of task ids), [`breaker`] (circuit
//! breakers per task type, a sans-IO state machine the loop carries out), [`handlers`], [`shutdown`].

pub mod answered;
pub mod breaker;
pub mod consume;
pub mod handlers;
pub mod offsets;
pub mod publish;
pub mod shutdown;
pub mod task;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use edow_kafka::{Kafka, TopicSpec};
use edow_schemas::Topics;
use rdkafka::consumer::Consumer;

use consume::{Rebalances, TaskConsumer};
use handlers::Handler;
use offsets::OffsetTracker;

/// What `max.poll.interval.ms` exceeds the task timeout by, unless configured.
pub const POLL_INTERVAL_MARGIN: Duration = Duration::from_secs(60);

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
    pub limits: Limits,
    /// The consumer's `max.poll.interval.ms`; default: the task timeout plus [`POLL_INTERVAL_MARGIN`]. The loop
    /// polls all the time, so this only evicts a wedged worker; never below the session timeout.
    pub max_poll_interval: Option<Duration>,
    /// On shutdown, how long running tasks may take to finish and publish before they are abandoned.
    pub shutdown_grace: Duration,
    /// Longest one attempt to publish a result or dead letter may take.
    pub publish_attempt_timeout: Duration,
    /// Where to serve `/metrics` and `/healthz`; nothing is served without it.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Partitions of topics this worker creates when missing.
    pub partitions: i32,
    pub task_partitions: i32,
    pub replication_factor: i32,
    /// Where values passed by reference are (see `edow_blobs`): inputs are resolved before a handler sees them,
    /// outputs over its threshold are stored. `None`: references are handed to handlers as they are.
    pub blobs: Option<edow_blobs::Blobs>,
    /// Circuit breakers, by the task type they guard; types without one always run.
    pub breakers: HashMap<String, breaker::BreakerPolicy>,
}

/// Bounds on what a task brings in and what the worker keeps.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A larger output fails the task with the non-retryable code `output_too_large`.
    pub max_output_bytes: usize,
    /// A larger input fails the task with `input_too_large` (and dead-letters its record).
    pub max_input_bytes: usize,
    /// Results remembered to answer redeliveries: at most this many ...
    pub answered_entries: usize,
    /// ... and this many bytes.
    pub answered_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_output_bytes: handlers::DEFAULT_MAX_OUTPUT_BYTES,
            max_input_bytes: 1024 * 1024,
            answered_entries: 100_000,
            answered_bytes: 64 * 1024 * 1024,
        }
    }
}

impl Config {
    /// The `max.poll.interval.ms` the consumer gets.
    pub fn max_poll_interval(&self) -> Duration {
        self.max_poll_interval
            .unwrap_or(self.task_timeout + POLL_INTERVAL_MARGIN)
            .max(self.kafka.session_timeout)
            // librdkafka's maximum.
            .min(Duration::from_millis(86_400_000))
    }
}

/// Runs until `shutdown` resolves; then stops taking tasks, finishes those running (up to the grace period),
/// commits and leaves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    anyhow::ensure!(
        !config.handlers.is_empty(),
        "the worker serves no task type; pass --task TYPE=HANDLER"
    );
    if let Some(unserved) = config
        .breakers
        .keys()
        .find(|t| !config.handlers.contains_key(*t))
    {
        anyhow::bail!(
            "--circuit-breaker {unserved}: this worker serves no task type {unserved}; give it --task {unserved}=HANDLER \
             or drop the breaker"
        );
    }
    let topics = &config.topics;
    let mut subscriptions = Vec::new();
    let mut topic_types = HashMap::new();
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
            topic_types.insert(topic.clone(), task_type.clone());
            subscriptions.push(topic);
        }
    }
    config.kafka.ensure_topics(&specs).await?;
    edow_telemetry::metrics::init(edow_telemetry::metrics::Exporter::Worker);
    for task_type in config.breakers.keys() {
        edow_telemetry::metrics::CIRCUIT_STATE
            .with_label_values(&[task_type])
            .set(breaker::State::Closed.gauge());
    }
    // Dropped when `run` returns, which stops the listener.
    let (_listener_stop, stop_listener) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = config.metrics_addr {
        edow_telemetry::http::serve(addr, edow_telemetry::http::routes(), "metrics", async {
            let _ = stop_listener.await;
        })
        .await?;
    }
    if config.limits.max_output_bytes >= publish::MAX_RECORD_BYTES {
        tracing::warn!(
            max_output_bytes = config.limits.max_output_bytes,
            "outputs this large do not fit in a record; such results become output_too_large failures"
        );
    }

    let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
    let max_poll_interval = config.max_poll_interval();
    let mut settings = config
        .kafka
        .group_consumer_config_reporting_lag(&config.group);
    settings.set(
        "max.poll.interval.ms",
        max_poll_interval.as_millis().to_string(),
    );
    let consumer: TaskConsumer = settings
        .create_with_context(Rebalances::new(tracker.clone(), &config.group))
        .context("creating the worker's consumer")?;
    let names: Vec<&str> = subscriptions.iter().map(String::as_str).collect();
    consumer.subscribe(&names)?;
    tracing::info!(worker = %config.worker_id, topics = ?subscriptions, ?max_poll_interval, "worker started");

    let ctx = Arc::new(task::TaskContext {
        publisher: publish::Publisher {
            producer: config.kafka.producer()?,
            codecs: publish::Codecs::new(&config.registry_url)?,
            results_topic: topics.results(),
            attempt_timeout: config.publish_attempt_timeout,
            max_backoff: Duration::from_secs(5),
        },
        answered: answered::Answered::new(
            config.limits.answered_entries,
            config.limits.answered_bytes,
        ),
        shutdown: shutdown::Shutdown::new(),
        worker_id: config.worker_id,
        group: config.group.clone(),
        handlers: config.handlers,
        task_timeout: config.task_timeout,
        max_input_bytes: config.limits.max_input_bytes,
        max_output_bytes: config.limits.max_output_bytes,
        blobs: config.blobs,
        breakers: Arc::new(Mutex::new(breaker::Breakers::new(config.breakers))),
        topic_types,
    });
    consume::run(
        consumer,
        ctx,
        tracker,
        config.concurrency.max(1),
        config.shutdown_grace,
        shutdown,
    )
    .await;
    Ok(())
}
