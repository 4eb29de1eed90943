//! Getting a task's answer onto the broker: a result (or a dead letter) is encoded and produced again and again,
//! each attempt bounded in time, with capped exponential backoff between attempts, until the broker acknowledges
//! it or the task's partition is revoked or the worker abandons its work on shutdown. A failed encode replaces
//! the codec, so an error the registry client cached (it keeps non-retriable ones) does not outlive the outage.
//! A result too big for a Kafka record is replaced by a non-retryable `output_too_large` failure, and a dead
//! letter too big by one without the original value: neither can block a partition.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use edow_kafka::dead_letters::{self, Reason};
use edow_schemas::contracts::{TaskError, TaskResult, TaskStatus};
use edow_schemas::Codec;
use edow_telemetry::trace::{self, Destination, TraceContext};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

use crate::offsets::Lease;
use crate::shutdown::Shutdown;

/// librdkafka's `message.max.bytes`, which the shared producer settings keep: the largest record produced.
pub const MAX_RECORD_BYTES: usize = 1_000_000;

/// The registry client, replaced after a failure so that no cached error outlives its cause.
pub struct Codecs {
    url: String,
    current: RwLock<Arc<Codec>>,
}

impl Codecs {
    pub fn new(url: &str) -> anyhow::Result<Codecs> {
        Ok(Codecs {
            url: url.to_string(),
            current: RwLock::new(Arc::new(Codec::new(url)?)),
        })
    }

    pub fn current(&self) -> Arc<Codec> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn refresh(&self) {
        if let Ok(codec) = Codec::new(&self.url) {
            *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(codec);
        }
    }
}

/// Why a task's publishing stopped before its answer was acknowledged.
#[derive(Debug, PartialEq, Eq)]
pub struct Stopped;

/// When to give up retrying: the task's partition was revoked, or the worker abandons its work.
pub struct Stop<'a> {
    pub lease: &'a Lease,
    pub shutdown: &'a Shutdown,
}

impl Stop<'_> {
    pub fn stopped(&self) -> bool {
        self.lease.is_revoked() || self.shutdown.is_abandoned()
    }

    pub async fn wait(&self) {
        tokio::select! {
            _ = self.lease.revoked() => {}
            _ = self.shutdown.abandoned() => {}
        }
    }
}

/// Capped exponential backoff between attempts, cut short by a [`Stop`].
pub struct Backoff {
    next: Duration,
    max: Duration,
    pub failures: u32,
}

impl Backoff {
    pub fn new(max: Duration) -> Backoff {
        Backoff {
            next: Duration::from_millis(100).min(max),
            max,
            failures: 0,
        }
    }

    /// Counts a failure and sleeps; `Err(Stopped)` if stopped before or while sleeping.
    pub async fn wait(&mut self, stop: &Stop<'_>) -> Result<(), Stopped> {
        self.failures += 1;
        if stop.stopped() {
            return Err(Stopped);
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        tokio::select! {
            _ = tokio::time::sleep(delay) => Ok(()),
            _ = stop.wait() => Err(Stopped),
        }
    }

    /// Whether this failure is worth a log line: the first ones, then one in ten.
    pub fn loud(&self) -> bool {
        self.failures < 3 || self.failures % 10 == 0
    }
}

enum Failure {
    Encode(String),
    TooLarge(usize),
    Produce(String),
}

fn too_large(e: &KafkaError) -> bool {
    matches!(
        e,
        KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)
    )
}

pub struct Publisher {
    pub producer: FutureProducer,
    pub codecs: Codecs,
    pub results_topic: String,
    /// Longest one encode-and-produce may take before it counts as failed.
    pub attempt_timeout: Duration,
    /// Longest pause between attempts.
    pub max_backoff: Duration,
}

impl Publisher {
    /// Retrying on a producer failed for good would hold every permit for ever: the worker exits, and the
    /// uncommitted tasks are redelivered to its restart.
    fn exit_if_fatal(&self) {
        edow_kafka::exit_if_producer_failed(&self.producer, "result");
    }

    /// Publishes `result` until acknowledged. When it cannot fit in a record it is replaced (in place) by a
    /// non-retryable `output_too_large` failure, which is published instead.
    pub async fn result(
        &self,
        result: &mut TaskResult,
        trace: Option<&TraceContext>,
        stop: &Stop<'_>,
    ) -> Result<(), Stopped> {
        let mut backoff = Backoff::new(self.max_backoff);
        let mut replaced = false;
        // One `send` span for the result, however many attempts its publishing takes.
        let sent = trace.map(|parent| {
            trace::send(
                parent,
                &Destination {
                    topic: &self.results_topic,
                    partition: None,
                    key: result.workflow_id.as_bytes(),
                },
            )
        });
        loop {
            let attempt = self.try_result(result, sent.as_ref());
            let failure = match tokio::time::timeout(self.attempt_timeout, attempt).await {
                Ok(Ok(())) => {
                    if backoff.failures > 0 {
                        tracing::info!(task_id = %result.task_id, failures = backoff.failures, "result published after retrying");
                    }
                    return Ok(());
                }
                Ok(Err(Failure::TooLarge(bytes))) if !replaced => {
                    replaced = true;
                    tracing::warn!(task_id = %result.task_id, bytes, "the result does not fit in a record; publishing an output_too_large failure instead");
                    *result = record_too_large(result, bytes);
                    continue;
                }
                Ok(Err(Failure::TooLarge(bytes))) => {
                    format!("the result is {bytes} bytes, over the record limit")
                }
                Ok(Err(Failure::Encode(e))) => {
                    self.codecs.refresh();
                    e
                }
                Ok(Err(Failure::Produce(e))) => e,
                Err(_) => format!("no acknowledgement within {:?}", self.attempt_timeout),
            };
            self.exit_if_fatal();
            if backoff.loud() {
                tracing::warn!(task_id = %result.task_id, failures = backoff.failures + 1, "publishing the result failed, retrying: {failure}");
            }
            if backoff.wait(stop).await.is_err() {
                tracing::warn!(task_id = %result.task_id, "stopped publishing the result (partition revoked or shutting down); the task stays uncommitted");
                return Err(Stopped);
            }
        }
    }

    async fn try_result(
        &self,
        result: &TaskResult,
        trace: Option<&TraceContext>,
    ) -> Result<(), Failure> {
        let payload = self
            .codecs
            .current()
            .encode(&self.results_topic, result)
            .await
            .map_err(|e| Failure::Encode(e.to_string()))?;
        let mut record = FutureRecord::to(&self.results_topic)
            .key(result.workflow_id.as_bytes())
            .payload(&payload);
        if let Some(trace) = trace {
            let mut headers = rdkafka::message::OwnedHeaders::new_with_capacity(2);
            for (key, value) in trace.headers() {
                headers = headers.insert(rdkafka::message::Header {
                    key,
                    value: Some(&value),
                });
            }
            record = record.headers(headers);
        }
        let delivery = loop {
            match self.producer.send_result(record) {
                Ok(delivery) => break delivery,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) if too_large(&e) => return Err(Failure::TooLarge(payload.len())),
                Err((e, _)) => return Err(Failure::Produce(e.to_string())),
            }
        };
        match delivery.await {
            Ok(Ok(_)) => {
                edow_kafka::count_produced_one(&self.results_topic);
                Ok(())
            }
            Ok(Err((e, _))) if too_large(&e) => Err(Failure::TooLarge(payload.len())),
            Ok(Err((e, _))) => Err(Failure::Produce(e.to_string())),
            Err(_) => Err(Failure::Produce("the producer dropped the record".into())),
        }
    }

    /// Publishes a dead letter for `message` until acknowledged; one too big to hold the original value is
    /// published without it.
    pub async fn dead_letter(
        &self,
        message: &OwnedMessage,
        reason: &Reason,
        service: &str,
        stop: &Stop<'_>,
    ) -> Result<(), Stopped> {
        let mut letter = dead_letters::dead_letter(message, reason, service);
        let mut backoff = Backoff::new(self.max_backoff);
        loop {
            let codec = self.codecs.current();
            let attempt = dead_letters::publish(&self.producer, &codec, &letter);
            let error = match tokio::time::timeout(self.attempt_timeout, attempt).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => {
                    if e.downcast_ref::<KafkaError>().is_some_and(too_large) {
                        if let Some(value) = letter.value.take() {
                            letter.error = format!(
                                "{} (the original value, {} bytes, is not kept: it does not fit in a record)",
                                letter.error,
                                value.len()
                            );
                            continue;
                        }
                    }
                    self.codecs.refresh();
                    format!("{e:#}")
                }
                Err(_) => format!("no acknowledgement within {:?}", self.attempt_timeout),
            };
            if backoff.loud() {
                tracing::warn!(topic = %letter.origin_topic, partition = letter.origin_partition, offset = letter.origin_offset, "dead-lettering failed, retrying: {error}");
            }
            backoff.wait(stop).await?;
        }
    }
}

/// The failure that replaces a result too big for a record.
fn record_too_large(result: &TaskResult, bytes: usize) -> TaskResult {
    TaskResult {
        status: TaskStatus::Failed,
        output: None,
        error: Some(TaskError {
            code: "output_too_large".into(),
            message: format!(
                "the encoded result is {bytes} bytes, over the {MAX_RECORD_BYTES}-byte record limit; lower the \
                 worker's --max-output-bytes or make the handler's output smaller"
            ),
            retryable: false,
        }),
        ..result.clone()
    }
}
