//! One delivered task record, from bytes to an acknowledged answer: decode it (a record that cannot be decoded is
//! dead-lettered), check its input (too large or not JSON: a non-retryable failure result AND a dead letter), find
//! out whether this task id was answered or is running here, run the handler (in its own task, under the task
//! timeout; a panic is a failure, an output over the limit is `output_too_large`) and publish the result until it
//! is acknowledged. [`Outcome::Acknowledged`] is the only outcome whose offset may be committed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use edow_kafka::dead_letters::Reason;
use edow_kafka::now_millis;
use edow_schemas::contracts::{TaskError, TaskRequested, TaskResult, TaskStatus};
use edow_telemetry::trace::{self, Destination, TraceContext};
use opentelemetry::KeyValue;
use rdkafka::message::OwnedMessage;
use rdkafka::Message;
use serde_json::Value;
use tracing::Instrument as _;

use crate::answered::{Answered, Begin, Finished};
use crate::handlers::{encode_output, truncate, AbortOnDrop, Handler, HandlerError, Task};
use crate::offsets::Lease;
use crate::publish::{Backoff, Publisher, Stop, Stopped};
use crate::shutdown::Shutdown;

/// Longest task id, workflow id and step name together: a result must be able to carry them.
const MAX_ID_BYTES: usize = 16 * 1024;
/// Longest failure message kept in a result (in characters).
const MAX_ERROR_CHARS: usize = 8 * 1024;

/// What every task of a worker shares.
pub struct TaskContext {
    pub worker_id: String,
    /// The consumer group, for spans.
    pub group: String,
    pub handlers: HashMap<String, Arc<dyn Handler>>,
    pub task_timeout: Duration,
    pub max_input_bytes: usize,
    pub max_output_bytes: usize,
    pub blobs: Option<edow_blobs::Blobs>,
    pub publisher: Publisher,
    pub answered: Arc<Answered>,
    pub shutdown: Shutdown,
    /// The circuit breakers of the types that have one, fed with the outcome of every task run here.
    pub breakers: Arc<std::sync::Mutex<crate::breaker::Breakers>>,
    /// The task type of each topic consumed.
    pub topic_types: HashMap<String, String>,
}

impl TaskContext {
    fn service(&self) -> String {
        format!("worker:{}", self.worker_id)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The record's answer (a result, a dead letter, or the answer of the same task running alongside) is on the
    /// broker: its offset may be committed.
    Acknowledged,
    /// Given up (partition revoked, or abandoned on shutdown): leave it uncommitted, to be redelivered.
    Abandoned,
}

impl From<Result<(), Stopped>> for Outcome {
    fn from(published: Result<(), Stopped>) -> Outcome {
        match published {
            Ok(()) => Outcome::Acknowledged,
            Err(Stopped) => Outcome::Abandoned,
        }
    }
}

pub async fn process(ctx: &TaskContext, msg: &OwnedMessage, lease: &Lease) -> Outcome {
    let stop = Stop {
        lease,
        shutdown: &ctx.shutdown,
    };
    if stop.stopped() {
        return Outcome::Abandoned;
    }
    let request = match decode(ctx, msg, &stop).await {
        Ok(Some(request)) => request,
        Ok(None) => return Outcome::Acknowledged,
        Err(Stopped) => return Outcome::Abandoned,
    };
    let incoming = edow_kafka::headers::trace_context(msg.headers());
    let mut span = trace::process(
        incoming.as_ref(),
        &Destination {
            topic: msg.topic(),
            partition: Some(msg.partition()),
            key: msg.key().unwrap_or_default(),
        },
        &ctx.group,
        msg.offset(),
        vec![
            KeyValue::new("edow.task.id", request.task_id.clone()),
            KeyValue::new("edow.workflow.id", request.workflow_id.clone()),
            KeyValue::new("edow.task.type", request.task_type.clone()),
        ],
    );
    let log = tracing::info_span!(
        "task",
        task_id = %request.task_id,
        workflow_id = %request.workflow_id,
        correlation_id = request.correlation_id.as_deref().unwrap_or(""),
        trace_id = %span.context.trace_id_hex(),
    );
    let (outcome, failure) = answer(ctx, msg, request, &span.context, &stop)
        .instrument(log)
        .await;
    if let Some(failure) = failure {
        span.fail(&failure);
    }
    outcome
}

/// Answers a decoded task, below the trace context `trace`; returns the outcome, and the failure message when
/// the handler failed.
async fn answer(
    ctx: &TaskContext,
    msg: &OwnedMessage,
    request: TaskRequested,
    trace: &TraceContext,
    stop: &Stop<'_>,
) -> (Outcome, Option<String>) {
    let id_bytes = request.task_id.len() + request.workflow_id.len() + request.step.len();
    if id_bytes > MAX_ID_BYTES {
        let reason = Reason::new(
            "ids_too_long",
            format!(
                "the task id, workflow id and step take {id_bytes} bytes, over {MAX_ID_BYTES}: no result could carry them"
            ),
        );
        let outcome = ctx
            .publisher
            .dead_letter(msg, &reason, &ctx.service(), stop)
            .await
            .into();
        return (outcome, Some(reason.error));
    }
    loop {
        match ctx.answered.begin(&request.task_id) {
            Begin::Answered(mut result) => {
                edow_telemetry::metrics::TASKS
                    .with_label_values(&[
                        &edow_telemetry::metrics::TASK_TYPES.bounded(&request.task_type),
                        "answered_again",
                    ])
                    .inc();
                tracing::info!("redelivered task already answered; publishing its result again");
                let published = ctx.publisher.result(&mut result, Some(trace), stop).await;
                return (published.into(), None);
            }
            Begin::Running(wait) => {
                tracing::info!(
                    "task delivered again while running here; waiting for that attempt's result"
                );
                let finished = tokio::select! {
                    finished = wait.outcome() => finished,
                    _ = stop.wait() => return (Outcome::Abandoned, None),
                };
                match finished {
                    Some(Finished {
                        published: true, ..
                    }) => return (Outcome::Acknowledged, None),
                    Some(Finished { mut result, .. }) => {
                        let published = ctx.publisher.result(&mut result, Some(trace), stop).await;
                        if published.is_ok() {
                            ctx.answered.remember(result);
                        }
                        return (published.into(), None);
                    }
                    // That attempt ended without a result (it was dropped): run the task here.
                    None => continue,
                }
            }
            Begin::Start(attempt) => {
                let (mut result, poison) = run(ctx, &request, Some(trace)).await;
                let failed_retryably = result.error.as_ref().is_some_and(|e| e.retryable);
                let changed = crate::consume::lock_breakers(&ctx.breakers).record(
                    &request.task_type,
                    failed_retryably,
                    std::time::Instant::now(),
                );
                if let Some(transition) = changed {
                    crate::consume::report(&transition);
                }
                let failure = result
                    .error
                    .as_ref()
                    .map(|e| format!("{}: {}", e.code, e.message));
                let published = ctx.publisher.result(&mut result, Some(trace), stop).await;
                attempt.finish(result, published.is_ok());
                if published.is_err() {
                    return (Outcome::Abandoned, failure);
                }
                let outcome = match poison {
                    Some(reason) => ctx
                        .publisher
                        .dead_letter(msg, &reason, &ctx.service(), stop)
                        .await
                        .into(),
                    None => Outcome::Acknowledged,
                };
                return (outcome, failure);
            }
        }
    }
}

/// The task request in `msg`; `None` once a record that is not one has been dead-lettered.
async fn decode(
    ctx: &TaskContext,
    msg: &OwnedMessage,
    stop: &Stop<'_>,
) -> Result<Option<TaskRequested>, Stopped> {
    let mut backoff = Backoff::new(ctx.publisher.max_backoff);
    loop {
        match ctx.publisher.codecs.current().decode(msg.payload()).await {
            Ok(request) => return Ok(Some(request)),
            Err(e) if e.is_transient() => {
                if backoff.loud() {
                    tracing::warn!(
                        topic = msg.topic(),
                        partition = msg.partition(),
                        offset = msg.offset(),
                        "decoding a task: {e}"
                    );
                }
                backoff.wait(stop).await?;
            }
            Err(e) => {
                let reason = Reason::new(e.kind(), e.to_string());
                ctx.publisher
                    .dead_letter(msg, &reason, &ctx.service(), stop)
                    .await?;
                return Ok(None);
            }
        }
    }
}

/// Runs the task's handler; returns its result, and a dead-letter reason when the task's input is unusable.
pub async fn run(
    ctx: &TaskContext,
    request: &TaskRequested,
    trace: Option<&TraceContext>,
) -> (TaskResult, Option<Reason>) {
    let started_at = now_millis();
    tracing::debug!(task_id = %request.task_id, "task started");
    let mut poison = None;
    let outcome = match (
        ctx.handlers.get(&request.task_type),
        parse_input(&request.input, ctx.max_input_bytes),
    ) {
        (None, _) => Err(HandlerError::permanent(
            "no_handler",
            format!(
                "worker {} has no handler for task type {}",
                ctx.worker_id, request.task_type
            ),
        )),
        (_, Err(e)) => {
            poison = Some(Reason::new(e.code.clone(), e.message.clone()));
            Err(e)
        }
        (Some(handler), Ok(input)) => match resolve_input(ctx, request, input).await {
            Err(e) => {
                if !e.retryable {
                    poison = Some(Reason::new(e.code.clone(), e.message.clone()));
                }
                Err(e)
            }
            Ok(input) => {
                let task = Task {
                    task_id: request.task_id.clone(),
                    workflow_id: request.workflow_id.clone(),
                    step: request.step.clone(),
                    task_type: request.task_type.clone(),
                    attempt: request.attempt.max(1) as u32,
                    input,
                    trace: trace.cloned(),
                };
                match run_handler(handler.clone(), task, ctx.task_timeout).await {
                    Ok(output) => store_output(ctx, request, output).await,
                    failed => failed,
                }
            }
        },
    };
    let (status, output, error) = match outcome
        .and_then(|v| encode_output(&v, ctx.max_output_bytes))
    {
        Ok(output) => (TaskStatus::Completed, Some(output), None),
        Err(e) => {
            tracing::info!(task_id = %request.task_id, code = %e.code, "task failed: {}", e.message);
            let error = TaskError {
                code: e.code,
                message: truncate(&e.message, MAX_ERROR_CHARS).to_string(),
                retryable: e.retryable,
            };
            (TaskStatus::Failed, None, Some(error))
        }
    };
    let result = TaskResult {
        task_id: request.task_id.clone(),
        workflow_id: request.workflow_id.clone(),
        step: request.step.clone(),
        attempt: request.attempt,
        status,
        output,
        error,
        worker_id: ctx.worker_id.clone(),
        started_at,
        finished_at: now_millis(),
    };
    count_run(request, &result);
    (result, poison)
}

/// The task's input with the values it holds by reference read from the blob store, so handlers see plain JSON.
async fn resolve_input(
    ctx: &TaskContext,
    request: &TaskRequested,
    input: Value,
) -> Result<Value, HandlerError> {
    let Some(blobs) = &ctx.blobs else {
        return Ok(input);
    };
    if !edow_blobs::Blobs::refers(&input) {
        return Ok(input);
    }
    match tokio::time::timeout(ctx.task_timeout, blobs.resolve(&request.workflow_id, input)).await {
        Ok(Ok(input)) => Ok(input),
        Ok(Err(e)) => Err(blob_failure(e, "reading the input's blobs")),
        Err(_) => Err(HandlerError::retryable(
            "blob_unavailable",
            format!(
                "reading the input's blobs from {} took over the task timeout",
                blobs.location()
            ),
        )),
    }
}

/// The handler's output with what makes it longer than the blob threshold stored by reference.
async fn store_output(
    ctx: &TaskContext,
    request: &TaskRequested,
    output: Value,
) -> Result<Value, HandlerError> {
    let Some(blobs) = &ctx.blobs else {
        return Ok(output);
    };
    match tokio::time::timeout(
        ctx.task_timeout,
        blobs.offload(&request.workflow_id, output),
    )
    .await
    {
        Ok(Ok(output)) => Ok(output),
        Ok(Err(edow_blobs::BlobError::Invalid(message))) => {
            Err(HandlerError::permanent("output_too_large", message))
        }
        Ok(Err(e)) => Err(blob_failure(e, "storing the output")),
        Err(_) => Err(HandlerError::retryable(
            "blob_unavailable",
            format!(
                "storing the output in {} took over the task timeout",
                blobs.location()
            ),
        )),
    }
}

fn blob_failure(error: edow_blobs::BlobError, doing: &str) -> HandlerError {
    match error {
        edow_blobs::BlobError::Invalid(message) => {
            HandlerError::permanent("blob_invalid", format!("{doing}: {message}"))
        }
        unavailable => {
            HandlerError::retryable("blob_unavailable", format!("{doing}: {unavailable}"))
        }
    }
}

/// Adds one handler run to the task metrics.
fn count_run(request: &TaskRequested, result: &TaskResult) {
    use edow_telemetry::metrics::{
        CODES, TASKS, TASK_EXECUTION, TASK_FAILURES, TASK_RETRIES, TASK_SCHEDULE_TO_START,
        TASK_TYPES,
    };
    let task_type = TASK_TYPES.bounded(&request.task_type);
    // `requested_at` comes from the record: any value, so no plain subtraction.
    let seconds = |from: i64, to: i64| to.saturating_sub(from).max(0) as f64 / 1000.0;
    TASK_SCHEDULE_TO_START
        .with_label_values(&[&task_type])
        .observe(seconds(request.requested_at, result.started_at));
    TASK_EXECUTION
        .with_label_values(&[&task_type])
        .observe(seconds(result.started_at, result.finished_at));
    if request.attempt > 1 {
        TASK_RETRIES.with_label_values(&[&task_type]).inc();
    }
    let outcome = match &result.error {
        None => "completed",
        Some(error) => {
            TASK_FAILURES
                .with_label_values(&[&task_type, &CODES.bounded(&error.code)])
                .inc();
            "failed"
        }
    };
    TASKS.with_label_values(&[&task_type, outcome]).inc();
}

fn parse_input(input: &str, limit: usize) -> Result<Value, HandlerError> {
    if input.len() > limit {
        return Err(HandlerError::permanent(
            "input_too_large",
            format!(
                "the task's input is {} bytes, over the worker's input limit of {limit} bytes",
                input.len()
            ),
        ));
    }
    serde_json::from_str(input).map_err(|e| {
        HandlerError::permanent("invalid_input", format!("task input is not JSON: {e}"))
    })
}

/// The handler's outcome, with a panic turned into a failure and a run over `timeout` aborted.
async fn run_handler(
    handler: Arc<dyn Handler>,
    task: Task,
    timeout: Duration,
) -> Result<Value, HandlerError> {
    let task_type = task.task_type.clone();
    let mut running = AbortOnDrop(tokio::spawn(async move { handler.handle(task).await }));
    match tokio::time::timeout(timeout, &mut running.0).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(e)) if e.is_panic() => {
            let panic = e.into_panic();
            let text = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(HandlerError::permanent(
                "handler_panicked",
                format!("the {task_type} handler panicked: {text}"),
            ))
        }
        Ok(Err(e)) => Err(HandlerError::retryable(
            "handler_cancelled",
            format!("the {task_type} handler was cancelled: {e}"),
        )),
        Err(_) => Err(HandlerError::retryable(
            "timeout",
            format!("the handler ran longer than {timeout:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::{HandlerFuture, DEFAULT_MAX_OUTPUT_BYTES};
    use serde_json::json;

    struct Big(usize);
    impl Handler for Big {
        fn handle(&self, _: Task) -> HandlerFuture {
            let n = self.0;
            Box::pin(async move { Ok(json!("z".repeat(n))) })
        }
    }

    struct Panics;
    impl Handler for Panics {
        fn handle(&self, _: Task) -> HandlerFuture {
            Box::pin(async move { panic!("bug in handler") })
        }
    }

    fn task() -> Task {
        Task {
            task_id: "w/s/1".into(),
            workflow_id: "w".into(),
            step: "s".into(),
            task_type: "t".into(),
            attempt: 1,
            input: json!({}),
            trace: None,
        }
    }

    #[tokio::test]
    async fn a_panicking_handler_is_a_failure_not_a_lost_task() {
        let err = run_handler(Arc::new(Panics), task(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(
            (err.code.as_str(), err.retryable),
            ("handler_panicked", false)
        );
        assert!(err.message.contains("bug in handler"), "{}", err.message);
    }

    #[tokio::test]
    async fn a_two_megabyte_output_is_output_too_large() {
        let out = run_handler(Arc::new(Big(2_000_000)), task(), Duration::from_secs(5))
            .await
            .unwrap();
        let err = encode_output(&out, DEFAULT_MAX_OUTPUT_BYTES).unwrap_err();
        assert_eq!(
            (err.code.as_str(), err.retryable),
            ("output_too_large", false)
        );
        assert!(err.message.contains("2000002 bytes"), "{}", err.message);
    }

    #[tokio::test]
    async fn a_slow_handler_times_out_retryably() {
        let slow = Arc::new(crate::handlers::Sleep(Duration::from_secs(30)));
        let started = std::time::Instant::now();
        let err = run_handler(slow, task(), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert_eq!((err.code.as_str(), err.retryable), ("timeout", true));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn unusable_inputs_fail_without_retry() {
        let err = parse_input("{not json", 100).unwrap_err();
        assert_eq!((err.code.as_str(), err.retryable), ("invalid_input", false));
        let err = parse_input(&format!("\"{}\"", "a".repeat(200)), 100).unwrap_err();
        assert_eq!(err.code, "input_too_large");
        assert!(err.message.contains("202 bytes") && err.message.contains("100 bytes"));
        // Deep nesting is an error, not a stack overflow.
        let deep = "[".repeat(100_000);
        assert_eq!(
            parse_input(&deep, 1 << 20).unwrap_err().code,
            "invalid_input"
        );
        assert_eq!(parse_input(" {\"a\":1} ", 100).unwrap(), json!({"a": 1}));
    }
}
