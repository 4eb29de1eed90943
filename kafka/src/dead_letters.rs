//! Dead letters: a record that cannot be processed is kept whole, with why, in `<origin topic>.dlq`, and the
//! process moves on. The value is an Avro `DeadLetter`; the triage facts are also set as `edow.dlq.*` headers.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use edow_schemas::contracts::{AvroBytes, DeadLetter};
use edow_schemas::{Codec, Topics};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;

use crate::now_millis;

/// Why a record is dead-lettered.
#[derive(Debug, Clone)]
pub struct Reason {
    /// Short class, e.g. `not_framed`, `unknown_workflow`.
    pub kind: String,
    /// What is wrong and what to do about it.
    pub error: String,
    pub attempts: i32,
    pub first_failed_at: i64,
}

impl Reason {
    pub fn new(kind: impl Into<String>, error: impl Into<String>) -> Reason {
        Reason {
            kind: kind.into(),
            error: error.into(),
            attempts: 1,
            first_failed_at: now_millis(),
        }
    }
}

/// Largest dead letter produced, below Kafka's default message size of 1 MB.
pub const MAX_DEAD_LETTER_BYTES: usize = 900 * 1024;

/// Builds the dead letter for `message`.
pub fn dead_letter<M>(message: &M, reason: &Reason, service: &str) -> DeadLetter
where
    M: Message,
    M::Headers: crate::headers::RawHeaders,
{
    let mut headers = HashMap::new();
    if let Some(original) = message.headers() {
        for (key, value) in crate::headers::all(original) {
            headers.insert(key, AvroBytes(value.unwrap_or_default()));
        }
    }
    DeadLetter {
        origin_topic: message.topic().to_string(),
        origin_partition: message.partition(),
        origin_offset: message.offset(),
        origin_timestamp: message.timestamp().to_millis(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
        headers,
        error_kind: reason.kind.clone(),
        error: reason.error.clone(),
        attempts: reason.attempts,
        first_failed_at: reason.first_failed_at,
        dead_lettered_at: now_millis(),
        service: service.to_string(),
    }
}

/// Publishes `letter` to its origin's dead-letter topic and waits for the broker's acknowledgement.
pub async fn publish(
    producer: &FutureProducer,
    codec: &Codec,
    letter: &DeadLetter,
) -> anyhow::Result<()> {
    let topic = Topics::dead_letters(&letter.origin_topic);
    let mut value = codec.encode(&topic, letter).await?;
    let kept;
    let letter = if value.len() > MAX_DEAD_LETTER_BYTES {
        // The original and the envelope do not fit one message: keep the facts and where the original is.
        let mut slim = letter.clone();
        let (key, original) = (
            slim.key.as_ref().map_or(0, Vec::len),
            slim.value.as_ref().map_or(0, Vec::len),
        );
        slim.value = None;
        slim.headers.retain(|key, value| {
            (key == edow_telemetry::trace::TRACEPARENT || key == edow_telemetry::trace::TRACESTATE)
                && value.0.len() <= 512
        });
        if key > 1024 {
            slim.key = None;
        }
        crate::truncate_utf8(&mut slim.error, 4096);
        slim.error.push_str(&format!(
            " [the original ({key} + {original} bytes) is too large to keep here; it stays at {}/{}@{} until \
             that topic's retention]",
            slim.origin_topic, slim.origin_partition, slim.origin_offset
        ));
        value = codec.encode(&topic, &slim).await?;
        kept = slim;
        &kept
    } else {
        letter
    };
    let facts = [
        ("edow.dlq.origin-topic", letter.origin_topic.clone()),
        (
            "edow.dlq.origin-partition",
            letter.origin_partition.to_string(),
        ),
        ("edow.dlq.origin-offset", letter.origin_offset.to_string()),
        ("edow.dlq.error-kind", letter.error_kind.clone()),
        ("edow.dlq.error", letter.error.clone()),
        ("edow.dlq.attempts", letter.attempts.to_string()),
        ("edow.dlq.failed-at", letter.dead_lettered_at.to_string()),
        ("edow.dlq.service", letter.service.clone()),
    ];
    let mut headers = OwnedHeaders::new_with_capacity(facts.len() + 2);
    for (key, value) in &facts {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    // The dead letter stays in the trace of the record it holds: the context only, checked (a few hundred bytes
    // at most), never the original header bytes, which could be anything of any size.
    let trace = edow_telemetry::trace::TraceContext::from_values(
        letter
            .headers
            .get(edow_telemetry::trace::TRACEPARENT)
            .map(|v| v.0.as_slice()),
        letter
            .headers
            .get(edow_telemetry::trace::TRACESTATE)
            .map(|v| v.0.as_slice()),
    );
    let trace_headers = trace.map(|t| t.headers()).unwrap_or_default();
    for (key, value) in &trace_headers {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_slice()),
        });
    }
    let mut record = FutureRecord::to(&topic).payload(&value).headers(headers);
    if let Some(key) = letter.key.as_deref() {
        record = record.key(key);
    }
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .with_context(|| format!("publishing a dead letter to {topic}"))?;
    crate::count_produced_one(&topic);
    edow_telemetry::metrics::DEAD_LETTERS
        .with_label_values(&[&letter.origin_topic, &letter.error_kind])
        .inc();
    tracing::warn!(
        origin = %letter.origin_topic,
        partition = letter.origin_partition,
        offset = letter.origin_offset,
        kind = %letter.error_kind,
        "dead-lettered: {}",
        letter.error
    );
    Ok(())
}
