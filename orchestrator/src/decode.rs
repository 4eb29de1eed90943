//! Decoding a batch of input records into typed inputs, before anything is applied. A record that cannot be
//! decoded is a dead letter with its reason; a registry that cannot be reached is retried for a bounded time and
//! then reported as [`Stalled`], so the loop can rewind the batch and keep polling instead of blocking past the
//! consumer's `max.poll.interval.ms` or exiting.

use std::time::{Duration, Instant};

use edow_kafka::dead_letters::Reason;
use edow_schemas::contracts::{TaskResult, WorkflowSignal, WorkflowTrigger};
use edow_schemas::{Codec, CodecError, Contract, Topics};
use rdkafka::message::OwnedMessage;
use rdkafka::Message;

/// One input of a batch, typed.
pub enum Input {
    Trigger(WorkflowTrigger),
    Result(TaskResult),
    Signal(WorkflowSignal),
}

/// The registry stayed unreachable past the bound; nothing of the batch was applied.
#[derive(Debug)]
pub struct Stalled(pub CodecError);

/// Decodes `msg` by its topic; transient registry errors are retried until `give_up_at`.
pub async fn decode(
    codec: &Codec,
    topics: &Topics,
    msg: &OwnedMessage,
    give_up_at: Instant,
) -> Result<Result<Input, Reason>, Stalled> {
    let topic = msg.topic();
    let decoded = if topic == topics.triggers() {
        decode_retrying::<WorkflowTrigger>(codec, msg.payload(), give_up_at)
            .await?
            .map(Input::Trigger)
    } else if topic == topics.results() {
        decode_retrying::<TaskResult>(codec, msg.payload(), give_up_at)
            .await?
            .map(Input::Result)
    } else if topic == topics.signals() {
        decode_retrying::<WorkflowSignal>(codec, msg.payload(), give_up_at)
            .await?
            .map(Input::Signal)
    } else {
        return Ok(Err(Reason::new(
            "unexpected_topic",
            format!("no handler for topic {topic}"),
        )));
    };
    Ok(decoded.map_err(|e| Reason::new(e.kind(), e.to_string())))
}

/// Decodes a `T`, retrying transient registry errors with backoff until `give_up_at`.
pub async fn decode_retrying<T: Contract>(
    codec: &Codec,
    payload: Option<&[u8]>,
    give_up_at: Instant,
) -> Result<Result<T, CodecError>, Stalled> {
    let mut delay = Duration::from_millis(100);
    loop {
        match codec.decode::<T>(payload).await {
            Err(e) if e.is_transient() => {
                if Instant::now() + delay > give_up_at {
                    return Err(Stalled(e));
                }
                tracing::warn!("{e}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            other => return Ok(other),
        }
    }
}
